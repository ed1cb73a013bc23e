"""The Gauss-Newton normal operator of a field on a grid: `J^T J + damping I + lam L`.

Dense image registration linearises a per-voxel residual; its normal matrix couples the d
components of one voxel (the `J_v^T J_v` blocks) and neighbouring voxels of one component (the
grid Laplacian). `grid_normal_operator` applies it matrix free, cache blocked, and on the CPU with
numba in one compiled pass (`_fused.py`); `assemble_grid_normal_matrix` gives the same matrix as a
sparse CSR tensor for matrix-based solvers (AMG). `solve_grid_normal` solves the system with an
inner solver from `GRID_SOLVERS` ("cg": matrix-free Jacobi CG, "amg": pyamg-preconditioned CG).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from shapeflow._optional import import_optional
from shapeflow._registry import Registry
from shapeflow.errors import ShapeflowError
from shapeflow.regularizers.laplacians import (as_spacing, grid_laplacian, grid_laplacian_apply, grid_laplacian_slab,
                                                 grid_slabs)
from shapeflow.solvers.linear.cg import CGInfo, conjugate_gradient
from shapeflow.solvers.normal import _fused

__all__ = ["GridNormalOperator", "grid_normal_operator", "assemble_grid_normal_matrix", "solve_grid_normal",
           "gauss_newton_step",
           "GRID_SOLVERS"]


class GridNormalOperator:
    """`v -> (J^T J + damping I + lam L) v` on a (C, *S) field, matrix free and cache blocked.

    The Gauss-Newton matrix of a dense registration: per-voxel data blocks `J_v^T J_v` (C x C,
    from the (K, C) Jacobian of K residuals at voxel v) plus `lam` times the grid Laplacian
    (`shapeflow.regularizers.grid_laplacian_slab`, Neumann) of every component. The stencil and
    the block product run slab by slab along the first spatial axis, so every slab is read from
    memory once and all the elementwise passes over it hit the cache. On the CPU with numba
    installed, a compiled kernel (`shapeflow.solvers.normal._fused`) does the whole product in one pass.

    Build it with `grid_normal_operator`. Call it on `(C, *S)`, `(n,)` or `(n, k)` tensors
    (n = C prod(S), rows in `v.reshape(C, -1)` order); `diagonal()` gives `(n,)` for Jacobi;
    `apply_dot(v)` gives `(A v, v . A v)` in one pass (used by the in-place CG loop). With
    autograd recording and `v` or `jac` requiring grad, it runs an unblocked, differentiable path.
    """

    def __init__(self, jac: Tensor, lam: float, spacing, damping: float):
        self.jac = jac if jac.is_contiguous() else jac.contiguous()  # (K, C, *S)
        self.field_shape = tuple(jac.shape[1:])
        self.n = math.prod(self.field_shape)
        self.lam, self.damping = float(lam), float(damping)
        self.weights = [self.lam / h**2 for h in as_spacing("grid_normal_operator", spacing, jac.dim() - 2)]

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


def _solve_cg(jac: Tensor, rhs: Tensor, lam: float, spacing: list[float], damping: float, tol: float,
              maxiter: int) -> tuple[Tensor, CGInfo]:
    """Jacobi-preconditioned CG with the fused matrix-free operator (any device)."""
    operator = grid_normal_operator(jac, lam=lam, spacing=spacing, damping=damping)
    return conjugate_gradient(operator, rhs, M=operator.diagonal(), tol=tol, maxiter=maxiter)


def _solve_amg(jac: Tensor, rhs: Tensor, lam: float, spacing: list[float], damping: float, tol: float,
               maxiter: int) -> tuple[Tensor, CGInfo]:
    """AMG-preconditioned CG (pyamg smoothed aggregation) on the assembled sparse matrix (CPU)."""
    if rhs.device.type != "cpu":
        raise ShapeflowError(f"gauss_newton_step(): solver='amg' runs on the CPU (pyamg) but the tensors are on "
                             f"{rhs.device}; use solver='cg' or device='cpu'")
    import_optional("pyamg", "solver='amg'")
    # float64 throughout: pyamg needs the matrix and the vectors in one dtype, and its hierarchy is
    # more robust in double precision; the step comes back in the caller's dtype
    A = assemble_grid_normal_matrix(jac.double(), lam=lam, spacing=spacing, damping=damping)
    x, info = conjugate_gradient(A, rhs.double(), tol=tol, maxiter=maxiter, backend="amg")
    return x.to(rhs.dtype), info


#: inner solvers of `(J^T J + damping I + lam L) x = rhs` on a grid: `(jac (K, d, *S), rhs (d prod S,), lam,
#: spacing, damping, tol, maxiter) -> (x (d prod S,), CGInfo)`
GRID_SOLVERS: Registry[Callable[..., tuple[Tensor, CGInfo]]] = Registry("solver", {"cg": _solve_cg, "amg": _solve_amg})


def solve_grid_normal(jac: Tensor, rhs: Tensor, *, lam: float, spacing=None, damping: float = 0.0,
                      solver: str = "cg", tol: float = 1e-3, maxiter: int = 60) -> tuple[Tensor, CGInfo]:
    """Solve `(J^T J + damping I + lam L) x = rhs` for a field on a grid.

    jac: (K, d, *S) per-voxel Jacobian of K residuals; rhs: (d prod S,) in `v.reshape(d, -1)`
    order; solver: a name in `GRID_SOLVERS`. Returns `(x (d prod S,), CGInfo)`.
    """
    spacing = as_spacing("solve_grid_normal", spacing, jac.dim() - 2)
    return GRID_SOLVERS.lookup(solver, "gauss_newton_step()")(jac, rhs, lam, spacing, damping, tol, maxiter)


def gauss_newton_step(residual: Tensor, gradient: Tensor, u: Tensor, grid, lam: float,
                      project: Optional[tuple[Callable, Callable]] = None, cg_iterations: int = 60,
                      cg_tol: float = 1e-3, solver: str = "cg", damping: float = 0.0) -> tuple[Tensor, CGInfo]:
    """One regularised Gauss-Newton update for a displacement `u: (d, *S)` on `grid` (a `shapeflow.grids.Grid`).

    residual: (C, *S) warped minus fixed; gradient: (C, d, *S) world gradient of the warped image.
    Solves `(sum_c g g^T / C + lam L + damping I) du = -sum_c r g / C - lam L u` (with `project` =
    (P, P^T) for a control grid: unknowns z, du = P z) to relative residual `cg_tol` in at most
    `cg_iterations` iterations. solver: a name in `GRID_SOLVERS`: "cg" (matrix-free operator,
    Jacobi preconditioner) or "amg" (the matrix assembled by `assemble_grid_normal_matrix`,
    AMG-preconditioned CG through pyamg: CPU tensors, `pip install "shapeflow[amg]"`, no control
    grid). Returns `(du (d, *S), CGInfo)`.
    """
    GRID_SOLVERS.lookup(solver, "gauss_newton_step()")
    if solver != "cg" and project is not None:
        raise ShapeflowError(f"gauss_newton_step(): solver={solver!r} needs a dense field (stride=1); "
                             "use solver='cg' with a control grid")
    C = gradient.shape[0]
    spacing = grid.spacing.tolist()
    rhs = -(residual[:, None] * gradient).sum(0) / C - lam * grid_laplacian_apply(u, spacing)   # (d, *S)
    if project is None:  # per-voxel blocks and the stencil: fused operator (cg) or assembled matrix (amg)
        x, info = solve_grid_normal(gradient / math.sqrt(C), rhs.reshape(-1), lam=lam, spacing=spacing,
                                    damping=damping, solver=solver, tol=cg_tol, maxiter=cg_iterations)
        return x.view(u.shape), info
    blocks = torch.einsum("ci...,cj...->ij...", gradient, gradient) / C          # (d, d, *S)

    def hessian(z: Tensor) -> Tensor:                                           # (d, *S) -> (d, *S)
        return torch.einsum("ij...,j...->i...", blocks, z) + lam * grid_laplacian_apply(z, spacing) + damping * z

    up, down = project
    z_shape = down(rhs).shape
    x, info = conjugate_gradient(lambda v: down(hessian(up(v.view(z_shape)))).reshape(-1), down(rhs).reshape(-1),
                                 tol=cg_tol, maxiter=cg_iterations)
    return up(x.view(z_shape)), info
