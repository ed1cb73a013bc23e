"""Linear operators as the solvers see them: a sparse/dense tensor or a callable `v -> A v`.

Internal helpers shared by `cg.py`, `bicgstab.py` and `linear_solve.py`. Vectors are handled as
`(n, k)` blocks of `k` right-hand sides; a callable given by the user receives the same shape as
the right-hand side it was called for (`(n,)` or `(n, k)`).
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from shapeflow.errors import ShapeflowError

Operator = Union[Tensor, Callable[[Tensor], Tensor]]
Matvec = Callable[[Tensor], Tensor]

SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr)


def is_sparse(A: object) -> bool:
    """True for a torch sparse COO or CSR tensor."""
    return isinstance(A, Tensor) and A.layout in SPARSE_LAYOUTS


def check_operator(func: str, A: Operator, n: int) -> None:
    """Raise a ShapeflowError unless `A` is an (n, n) tensor (sparse or dense) or a callable."""
    if callable(A) and not isinstance(A, Tensor):
        return
    if not isinstance(A, Tensor):
        raise ShapeflowError(
            f"{func}(): A must be a torch sparse/dense (n, n) tensor or a callable v -> A v, "
            f"got {type(A).__name__}"
        )
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] != n:
        raise ShapeflowError(
            f"{func}(): A has shape {tuple(A.shape)} but b has {n} rows; A must be ({n}, {n})"
        )
    if A.layout not in SPARSE_LAYOUTS + (torch.strided,):
        raise ShapeflowError(f"{func}(): A has unsupported layout {A.layout}; use COO, CSR or dense")


def block_matvec(A: Operator, vector_rhs: bool) -> Matvec:
    """Return `V -> A V` on `(n, k)` blocks.

    A: sparse/dense (n, n) tensor or a callable; for a callable and `vector_rhs=True` the callable
    is applied to the single column `(n,)`, else to the `(n, k)` block.
    """
    if isinstance(A, Tensor):
        return lambda V: A @ V
    if vector_rhs:
        def column(V: Tensor) -> Tensor:
            return A(V[:, 0]).reshape(-1, 1)

        if hasattr(A, "apply_dot"):  # optional fused `v -> (A v, v . A v)`, used by CG
            pass_out = accepts_out(A.apply_dot)

            def column_dot(V: Tensor, out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
                if pass_out and out is not None:
                    AV, dot = A.apply_dot(V[:, 0], out=out[:, 0])
                else:
                    AV, dot = A.apply_dot(V[:, 0])
                return AV.reshape(-1, 1), dot

            column.apply_dot = column_dot
        return column
    return A


def accepts_out(apply_dot: Callable) -> bool:
    """True when an operator's `apply_dot` takes an `out=` buffer to write `A v` into.

    The CG loop then reuses one buffer for every `A p` instead of allocating a fresh vector per
    iteration (for large fields the page faults of a fresh allocation cost as much as the matvec).
    """
    try:
        return "out" in inspect.signature(apply_dot).parameters
    except (TypeError, ValueError):
        return False


def diagonal(A: Tensor) -> Tensor:
    """Diagonal of a sparse (COO/CSR) or dense square tensor. A: (n, n) -> (n,)."""
    if A.layout == torch.strided:
        return A.diagonal()
    coo = (A.to_sparse_coo() if A.layout == torch.sparse_csr else A).coalesce()
    rows, cols = coo.indices()
    on_diag = rows == cols
    out = torch.zeros(A.shape[0], dtype=A.dtype, device=A.device)
    return out.index_add(0, rows[on_diag], coo.values()[on_diag])


def transpose(A: Tensor) -> Tensor:
    """Transpose of a sparse or dense (n, n) tensor, in the same layout."""
    if A.layout == torch.sparse_csr:
        return A.to_sparse_coo().t().coalesce().to_sparse_csr()
    if A.layout == torch.sparse_coo:
        return A.t().coalesce()
    return A.mT


def adjoint_matvec(A: Operator, n: int, like: Tensor) -> Matvec:
    """Return `W -> A^T W` on `(n, k)` blocks.

    For a tensor the transpose is formed; for a callable linear `A` it is the vector-Jacobian
    product of `v -> A v` (exact because `A` is linear), so any differentiable callable works.
    """
    if isinstance(A, Tensor):
        At = transpose(A)
        return lambda W: At @ W

    def apply(W: Tensor) -> Tensor:
        cols = []
        with torch.enable_grad():
            for j in range(W.shape[1]):
                _, pullback = torch.func.vjp(A, torch.zeros(n, dtype=like.dtype, device=like.device))
                cols.append(pullback(W[:, j])[0])
        return torch.stack(cols, dim=1)

    return apply


def with_diagonal(A: Tensor, d: Tensor) -> Tensor:
    """Assemble `A + diag(d)` in A's layout. A: (n, n) sparse or dense, d: (n,)."""
    n = A.shape[0]
    if A.layout == torch.strided:
        return A + torch.diag(d)
    idx = torch.arange(n, device=A.device).expand(2, n)
    coo = A.to_sparse_coo() if A.layout == torch.sparse_csr else A
    out = (coo + torch.sparse_coo_tensor(idx, d.to(A.dtype), (n, n), check_invariants=False)).coalesce()
    return out.to_sparse_csr() if A.layout == torch.sparse_csr else out


def sparse_pattern(A: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column indices of A's stored entries, in the order of `A.values()` (coalesced COO)."""
    if A.layout == torch.sparse_csr:
        crow = A.crow_indices()
        rows = torch.repeat_interleave(
            torch.arange(A.shape[0], device=A.device), crow[1:] - crow[:-1]
        )
        return rows, A.col_indices()
    rows, cols = A.indices()
    return rows, cols


def to_scipy_csr(A: Tensor):
    """A torch sparse/dense (n, n) CPU tensor as a `scipy.sparse.csr_matrix` (shares memory where it can)."""
    import scipy.sparse as sp

    if A.device.type != "cpu":
        raise ShapeflowError(f"to_scipy_csr(): A is on {A.device}; the SciPy/pyamg path is CPU only")
    A = A.detach()
    if A.layout == torch.strided:
        return sp.csr_matrix(A.numpy())
    csr = A if A.layout == torch.sparse_csr else A.coalesce().to_sparse_csr()
    return sp.csr_matrix(
        (csr.values().numpy(), csr.col_indices().numpy(), csr.crow_indices().numpy()),
        shape=tuple(A.shape),
    )


class GridNormalOperator:
    """`v -> (J^T J + damping I + lam L) v` on a (C, *S) field, matrix free and cache blocked.

    The Gauss-Newton matrix of a dense registration: per-voxel data blocks `J_v^T J_v` (C x C,
    from the (K, C) Jacobian of K residuals at voxel v) plus `lam` times the grid Laplacian
    (`shapeflow.regularizers.grid_laplacian_slab`, Neumann) of every component. The stencil and
    the block product run slab by slab along the first spatial axis, so every slab is read from
    memory once and all the elementwise passes over it hit the cache. On the CPU with numba
    installed, a compiled kernel (`shapeflow.solvers._fused`) does the whole product in one pass.

    Build it with `grid_normal_operator`. Call it on `(C, *S)`, `(n,)` or `(n, k)` tensors
    (n = C prod(S), rows in `v.reshape(C, -1)` order); `diagonal()` gives `(n,)` for Jacobi;
    `apply_dot(v)` gives `(A v, v . A v)` in one pass (used by the in-place CG loop). With
    autograd recording and `v` or `jac` requiring grad, it runs an unblocked, differentiable path.
    """

    def __init__(self, jac: Tensor, lam: float, spacing, damping: float):
        from shapeflow.regularizers import _spacing

        self.jac = jac if jac.is_contiguous() else jac.contiguous()  # (K, C, *S)
        self.field_shape = tuple(jac.shape[1:])
        self.n = math.prod(self.field_shape)
        self.lam, self.damping = float(lam), float(damping)
        self.weights = [self.lam / h**2 for h in _spacing("grid_normal_operator", spacing, jac.dim() - 2)]

    def __call__(self, v: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """`A v`; out: optional contiguous buffer for one vector's result (no autograd)."""
        if v.dim() == 2 and v.shape[0] == self.n:  # (n, k) block: one column at a time
            return torch.stack([self(v[:, j]) for j in range(v.shape[1])], dim=1)
        return self._apply(v, with_dot=False, out=out)[0]

    def apply_dot(self, v: Tensor, out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """`(A v, v . A v)` in one pass (the dot taken per slab while it is in cache); v: one vector.

        out: optional contiguous buffer with v's number of elements to write `A v` into (no autograd).
        """
        return self._apply(v, with_dot=True, out=out)

    def _apply(self, v: Tensor, with_dot: bool, out: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        if v.numel() != self.n:
            raise ShapeflowError(
                f"GridNormalOperator: expected a field {self.field_shape} or ({self.n},) vectors, got {tuple(v.shape)}"
            )
        from shapeflow.regularizers import grid_laplacian_slab, grid_slabs

        u = v.reshape(self.field_shape)  # (C, *S)
        if torch.is_grad_enabled() and (v.requires_grad or self.jac.requires_grad):
            out = grid_laplacian_slab(u, self.weights, 0, u.shape[1], center=self.damping)
            t = (self.jac * u).sum(1, keepdim=True)  # (K, 1, *S): J_k . u per voxel
            out = out + (self.jac * t).sum(0)
            return out.reshape(v.shape), ((v.reshape(-1) * out.reshape(-1)).sum() if with_dot else None)
        if out is None:
            out = torch.empty_like(u, memory_format=torch.contiguous_format)
        elif out.numel() != self.n or not out.is_contiguous() or out.dtype != u.dtype:
            raise ShapeflowError(
                f"GridNormalOperator: out must be a contiguous {u.dtype} tensor with {self.n} elements, "
                f"got {out.dtype} {tuple(out.shape)}"
            )
        else:
            out = out.view(self.field_shape)
        from shapeflow.solvers import _fused

        if _fused.available(u, self.jac):  # one pass over memory (numba)
            dot = _fused.normal_matvec(u.contiguous(), self.jac, self.weights, self.damping, out, with_dot)
            return out.reshape(v.shape), dot
        plane = math.prod(self.field_shape[2:])
        slabs = grid_slabs(self.field_shape)
        tmp = torch.empty(slabs[0][1] * plane, dtype=u.dtype, device=u.device)
        dots = []
        for start, stop in slabs:
            o, us = out[:, start:stop], u[:, start:stop]  # (C, rows, ...)
            grid_laplacian_slab(u, self.weights, start, stop, center=self.damping, out=o)
            t = tmp[: (stop - start) * plane].view(o.shape[1:])  # (rows, ...)
            for J in self.jac[:, :, start:stop]:  # (C, rows, ...) per residual
                torch.mul(J[0], us[0], out=t)  # t = J_k . u per voxel
                for c in range(1, J.shape[0]):
                    t.addcmul_(J[c], us[c])
                o.addcmul_(J, t.unsqueeze(0))
            if with_dot:  # per component: us[c] and o[c] are contiguous (no copy)
                dots += [torch.dot(us[c].reshape(-1), o[c].reshape(-1)) for c in range(o.shape[0])]
        return out.reshape(v.shape), (sum(dots) if with_dot else None)

    def diagonal(self) -> Tensor:
        """diag of the operator, (n,) in `v.reshape(C, -1)` order."""
        ones = torch.ones((1,) + self.field_shape[1:], dtype=self.jac.dtype, device=self.jac.device)
        # diag(L) = 2 sum w, less w on each border face (the missing neighbour is the voxel itself)
        lap_diag = 2.0 * sum(self.weights) * ones
        for axis, w in enumerate(self.weights, start=1):
            n = self.field_shape[axis]
            if n == 1:
                lap_diag -= 2.0 * w
            else:
                lap_diag.narrow(axis, 0, 1).sub_(w)
                lap_diag.narrow(axis, n - 1, 1).sub_(w)
        d = self.jac.square().sum(0) + lap_diag + self.damping  # (C, *S)
        return d.reshape(-1)


def grid_normal_operator(jac: Tensor, *, lam: float, spacing=None, damping: float = 0.0) -> GridNormalOperator:
    """The Gauss-Newton matrix `J^T J + damping I + lam L` of a (C, *S) field as a fast callable.

    jac: (K, C, *S) per-voxel Jacobian of K residuals (K = 1 with `jac = grad(I).unsqueeze(0)`
    for an SSD term); lam >= 0 the weight of the Neumann grid Laplacian; spacing per spatial axis;
    damping >= 0 (Levenberg-Marquardt). Pass it as `A` to `conjugate_gradient` with
    `M=op.diagonal()`.
    """
    _check_normal_args("grid_normal_operator", jac, lam, damping)
    return GridNormalOperator(jac, lam, spacing, damping)


def _check_normal_args(func: str, jac, lam: float, damping: float) -> None:
    """Raise a ShapeflowError naming `func` unless jac is (K, C, *S), S 2D/3D, and lam, damping >= 0."""
    if not isinstance(jac, Tensor) or jac.dim() not in (4, 5):
        raise ShapeflowError(
            f"{func}(): jac must be (K, C, *S) with S 2D or 3D, got "
            f"{tuple(jac.shape) if isinstance(jac, Tensor) else type(jac).__name__}"
        )
    if not (lam >= 0 and damping >= 0):
        raise ShapeflowError(f"{func}(): lam and damping must be >= 0, got {lam}, {damping}")


def assemble_grid_normal_matrix(jac: Tensor, *, lam: float, spacing=None, damping: float = 0.0) -> Tensor:
    """The Gauss-Newton matrix of `grid_normal_operator` assembled as a sparse CSR tensor.

    jac: (K, C, *S) per-voxel Jacobian of K residuals (S 2D or 3D); lam >= 0 the weight of the
    Neumann grid Laplacian (`shapeflow.regularizers.grid_laplacian`, spacing aware) of every
    component; spacing: one number or one per spatial axis; damping >= 0. Returns the
    (n, n) matrix `J^T J + damping I + lam kron(I_C, L)`, n = C prod(S), rows and columns in
    `v.reshape(C, -1)` order (the order `grid_normal_operator` uses): the data blocks couple the
    C components of one voxel (entries `(c N + v, e N + v) = sum_k jac[k, c, v] jac[k, e, v]`),
    the Laplacian couples neighbouring voxels of one component. Same dtype and device as `jac`;
    for matrix-based solvers such as algebraic multigrid (`conjugate_gradient(A, b,
    backend="amg")`), which need the entries rather than a matvec. Not differentiable.
    """
    from shapeflow.regularizers import grid_laplacian

    _check_normal_args("assemble_grid_normal_matrix", jac, lam, damping)
    jac = jac.detach()
    K, C = jac.shape[:2]
    shape = tuple(jac.shape[2:])
    N = math.prod(shape)
    flat = jac.reshape(K, C, N)
    blocks = torch.einsum("kcv,kev->cev", flat, flat)  # (C, C, N)
    blocks = blocks + float(damping) * torch.eye(C, dtype=jac.dtype, device=jac.device)[:, :, None]
    voxel = torch.arange(N, device=jac.device)
    comp = torch.arange(C, device=jac.device) * N
    rows = (comp[:, None, None] + voxel).expand(C, C, N)  # (C, C, N): c N + v
    cols = (comp[None, :, None] + voxel).expand(C, C, N)  # (C, C, N): e N + v
    index, values = [torch.stack([rows.reshape(-1), cols.reshape(-1)])], [blocks.reshape(-1)]
    if lam > 0:
        L = grid_laplacian(shape, spacing, components=C, dtype=jac.dtype, device=jac.device)
        index.append(L.indices())
        values.append(float(lam) * L.values())
    n = C * N
    A = torch.sparse_coo_tensor(torch.cat(index, 1), torch.cat(values), (n, n), check_invariants=False)
    return A.coalesce().to_sparse_csr()
