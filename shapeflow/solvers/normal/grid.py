"""The Gauss-Newton normal operator of a field on a grid: `J^T J + damping I + lam L`.

Dense image registration linearises a per-voxel residual; its normal matrix couples the d
components of one voxel (the `J_v^T J_v` blocks) and neighbouring voxels of one component (the
grid Laplacian). `grid_normal_operator` applies it matrix free, cache blocked, and on the CPU with
numba in one compiled pass (`_fused.py`); `assemble_grid_normal_matrix` gives the same matrix as a
sparse CSR tensor for matrix-based solvers (AMG). `solve_grid_normal` solves the system with an
inner solver from `GRID_SOLVERS` ("cg": matrix-free Jacobi CG, "amg": pyamg-preconditioned CG).

A `PointTerm` adds the residuals of K points (landmarks) that interpolate the field: a sparse
`B: (K, N)` with 2^d interpolation weights per row, entering every component's block as
`weight B^T B` (applied as `B^T (B v)`, in the Jacobi diagonal and in the assembled matrix) and
the right-hand side as `-weight B^T r`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
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

__all__ = ["PointTerm", "GridNormalOperator", "grid_normal_operator", "assemble_grid_normal_matrix", "solve_grid_normal",
           "gauss_newton_step",
           "GRID_SOLVERS"]


@dataclass(frozen=True)
class PointTerm:
    """Least-squares residuals of K points that interpolate a field `(C, *S)` on a grid.

    Residual k of component c is `r[c, k] + (B u_c)_k`, with `B: (K, N)` (N = prod S) stored as
    `index: (K, P)` flat voxel indices (C order of S) and `weights: (K, P)` (P = 2^d, e.g. from
    `shapeflow.grids.interpolation_weights`). Its Gauss-Newton parts are `weight B^T B` in each
    component's diagonal block of the normal matrix and `weight B^T r` in the gradient.
    residual: `(C, K)` at the current field (only the right-hand side uses it; None: zero).
    """

    index: Tensor
    weights: Tensor
    weight: float
    residual: Optional[Tensor] = None

    def apply(self, u: Tensor) -> Tensor:
        """`B u` per component: `(C, N)` -> `(C, K)`."""
        return (u[:, self.index] * self.weights.to(u)).sum(-1)

    def adjoint(self, r: Tensor, n: int) -> Tensor:
        """`B^T r` per component: `(C, K)` -> `(C, n)`."""
        out = r.new_zeros(r.shape[0], n)
        values = (r[:, :, None] * self.weights.to(r)).reshape(r.shape[0], -1)   # (C, K P)
        return out.index_add_(1, self.index.reshape(-1).to(r.device), values)

    def normal(self, u: Tensor) -> Tensor:
        """`weight B^T B u` per component: `(C, N)` -> `(C, N)`."""
        return self.weight * self.adjoint(self.apply(u), u.shape[1])

    def gradient(self, n: int) -> Tensor:
        """`weight B^T r`: `(C, n)` (zeros without a residual)."""
        if self.residual is None:
            raise ShapeflowError("PointTerm.gradient(): no residual given")
        return self.weight * self.adjoint(self.residual, n)

    def diagonal(self, n: int) -> Tensor:
        """`diag(weight B^T B)`, the same for every component: `(n,)`."""
        w = self.weights
        return self.weight * w.new_zeros(n).index_add_(0, self.index.reshape(-1), (w * w).reshape(-1))

    def entries(self, components: int, n: int) -> tuple[Tensor, Tensor]:
        """`weight B^T B` in each of `components` diagonal blocks as COO `(index (2, E), values (E,))`,
        rows and columns in `v.reshape(C, -1)` order."""
        rows = self.index[:, :, None].expand(-1, -1, self.index.shape[1]).reshape(-1)       # (K P P,)
        cols = self.index[:, None, :].expand(-1, self.index.shape[1], -1).reshape(-1)
        values = self.weight * (self.weights[:, :, None] * self.weights[:, None, :]).reshape(-1)
        offset = torch.arange(components, device=rows.device)[:, None] * n                 # (C, 1)
        index = torch.stack([(offset + rows).reshape(-1), (offset + cols).reshape(-1)])
        return index, values.repeat(components)


def _check_points(func: str, points: Optional[PointTerm], n_voxels: int) -> None:
    if points is None:
        return
    if not isinstance(points, PointTerm) or points.index.shape != points.weights.shape or points.index.dim() != 2:
        raise ShapeflowError(f"{func}(): points must be a PointTerm with index and weights of one shape (K, P)")
    if not points.weight >= 0:
        raise ShapeflowError(f"{func}(): points.weight must be >= 0, got {points.weight}")
    if points.index.numel() and (int(points.index.min()) < 0 or int(points.index.max()) >= n_voxels):
        raise ShapeflowError(f"{func}(): points.index must lie in [0, {n_voxels}), the grid's voxels")


class GridNormalOperator:
    """`v -> (J^T J + damping I + lam L + w B^T B) v` on a (C, *S) field, matrix free and cache blocked.

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
    points: an optional `PointTerm` (`w B^T B` per component, applied as `B^T (B v)` after the rest).
    """

    def __init__(self, jac: Tensor, lam: float, spacing, damping: float, points: Optional[PointTerm] = None):
        self.jac = jac if jac.is_contiguous() else jac.contiguous()  # (K, C, *S)
        self.field_shape = tuple(jac.shape[1:])
        self.n = math.prod(self.field_shape)
        self.lam, self.damping = float(lam), float(damping)
        self.weights = [self.lam / h**2 for h in as_spacing("grid_normal_operator", spacing, jac.dim() - 2)]
        self.points = points

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
        result, dot = self._apply_grid(v, with_dot, out)
        if self.points is None:
            return result, dot
        u = v.reshape(self.field_shape[0], -1)                              # (C, N)
        extra = self.points.normal(u)                                       # (C, N): w B^T B u
        if result.requires_grad or extra.requires_grad:
            result = result + extra.reshape(result.shape)
        else:
            result.view(self.field_shape[0], -1).add_(extra)
        return result, (dot + (u * extra).sum() if with_dot else None)

    def _apply_grid(self, v: Tensor, with_dot: bool, out: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
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
        if self.points is not None:
            d = d.reshape(self.field_shape[0], -1) + self.points.diagonal(d[0].numel()).to(d)
        return d.reshape(-1)


def grid_normal_operator(jac: Tensor, *, lam: float, spacing=None, damping: float = 0.0,
                         points: Optional[PointTerm] = None) -> GridNormalOperator:
    """The Gauss-Newton matrix `J^T J + damping I + lam L (+ w B^T B)` of a (C, *S) field as a fast callable.

    jac: (K, C, *S) per-voxel Jacobian of K residuals (K = 1 with `jac = grad(I).unsqueeze(0)`
    for an SSD term); lam >= 0 the weight of the Neumann grid Laplacian; spacing per spatial axis;
    damping >= 0 (Levenberg-Marquardt); points: an optional `PointTerm` (landmarks). Pass it as `A`
    to `conjugate_gradient` with `M=op.diagonal()`.
    """
    _check_normal_args("grid_normal_operator", jac, lam, damping)
    _check_points("grid_normal_operator", points, math.prod(jac.shape[2:]))
    return GridNormalOperator(jac, lam, spacing, damping, points)


def _check_normal_args(func: str, jac, lam: float, damping: float) -> None:
    """Raise a ShapeflowError naming `func` unless jac is (K, C, *S), S 2D/3D, and lam, damping >= 0."""
    if not isinstance(jac, Tensor) or jac.dim() not in (4, 5):
        raise ShapeflowError(
            f"{func}(): jac must be (K, C, *S) with S 2D or 3D, got "
            f"{tuple(jac.shape) if isinstance(jac, Tensor) else type(jac).__name__}"
        )
    if not (lam >= 0 and damping >= 0):
        raise ShapeflowError(f"{func}(): lam and damping must be >= 0, got {lam}, {damping}")


def assemble_grid_normal_matrix(jac: Tensor, *, lam: float, spacing=None, damping: float = 0.0,
                                points: Optional[PointTerm] = None) -> Tensor:
    """The Gauss-Newton matrix of `grid_normal_operator` assembled as a sparse CSR tensor.

    jac: (K, C, *S) per-voxel Jacobian of K residuals (S 2D or 3D); lam >= 0 the weight of the
    Neumann grid Laplacian (`shapeflow.regularizers.grid_laplacian`, spacing aware) of every
    component; spacing: one number or one per spatial axis; damping >= 0. Returns the
    (n, n) matrix `J^T J + damping I + lam kron(I_C, L)`, n = C prod(S), rows and columns in
    `v.reshape(C, -1)` order (the order `grid_normal_operator` uses): the data blocks couple the
    C components of one voxel (entries `(c N + v, e N + v) = sum_k jac[k, c, v] jac[k, e, v]`),
    the Laplacian couples neighbouring voxels of one component. Same dtype and device as `jac`;
    for matrix-based solvers such as algebraic multigrid (`conjugate_gradient(A, b,
    backend="amg")`), which need the entries rather than a matvec. Not differentiable. points: an
    optional `PointTerm` whose `w B^T B` is added to every component's block.
    """
    _check_normal_args("assemble_grid_normal_matrix", jac, lam, damping)
    _check_points("assemble_grid_normal_matrix", points, math.prod(jac.shape[2:]))
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
    if points is not None:
        extra_index, extra_values = points.entries(C, N)
        index.append(extra_index.to(jac.device))
        values.append(extra_values.to(jac))
    n = C * N
    A = torch.sparse_coo_tensor(torch.cat(index, 1), torch.cat(values), (n, n), check_invariants=False)
    return A.coalesce().to_sparse_csr()


def _solve_cg(jac: Tensor, rhs: Tensor, lam: float, spacing: list[float], damping: float, tol: float,
              maxiter: int, points: Optional[PointTerm] = None) -> tuple[Tensor, CGInfo]:
    """Jacobi-preconditioned CG with the fused matrix-free operator (any device)."""
    operator = grid_normal_operator(jac, lam=lam, spacing=spacing, damping=damping, points=points)
    return conjugate_gradient(operator, rhs, M=operator.diagonal(), tol=tol, maxiter=maxiter)


def _solve_amg(jac: Tensor, rhs: Tensor, lam: float, spacing: list[float], damping: float, tol: float,
               maxiter: int, points: Optional[PointTerm] = None) -> tuple[Tensor, CGInfo]:
    """AMG-preconditioned CG (pyamg smoothed aggregation) on the assembled sparse matrix (CPU)."""
    if rhs.device.type != "cpu":
        raise ShapeflowError(f"gauss_newton_step(): solver='amg' runs on the CPU (pyamg) but the tensors are on "
                             f"{rhs.device}; use solver='cg' or device='cpu'")
    import_optional("pyamg", "solver='amg'")
    # float64 throughout: pyamg needs the matrix and the vectors in one dtype, and its hierarchy is
    # more robust in double precision; the step comes back in the caller's dtype
    A = assemble_grid_normal_matrix(jac.double(), lam=lam, spacing=spacing, damping=damping, points=points)
    x, info = conjugate_gradient(A, rhs.double(), tol=tol, maxiter=maxiter, backend="amg")
    return x.to(rhs.dtype), info


#: inner solvers of `(J^T J + damping I + lam L [+ w B^T B]) x = rhs` on a grid: `(jac (K, d, *S), rhs (d prod S,),
#: lam, spacing, damping, tol, maxiter, points=None) -> (x (d prod S,), CGInfo)`
GRID_SOLVERS: Registry[Callable[..., tuple[Tensor, CGInfo]]] = Registry("solver", {"cg": _solve_cg, "amg": _solve_amg})


def solve_grid_normal(jac: Tensor, rhs: Tensor, *, lam: float, spacing=None, damping: float = 0.0,
                      solver: str = "cg", tol: float = 1e-3, maxiter: int = 60,
                      points: Optional[PointTerm] = None) -> tuple[Tensor, CGInfo]:
    """Solve `(J^T J + damping I + lam L + w B^T B) x = rhs` for a field on a grid.

    jac: (K, d, *S) per-voxel Jacobian of K residuals; rhs: (d prod S,) in `v.reshape(d, -1)`
    order; solver: a name in `GRID_SOLVERS`; points: an optional `PointTerm` (its `w B^T B` in
    every component's block). Returns `(x (d prod S,), CGInfo)`.
    """
    spacing = as_spacing("solve_grid_normal", spacing, jac.dim() - 2)
    return GRID_SOLVERS.lookup(solver, "gauss_newton_step()")(jac, rhs, lam, spacing, damping, tol, maxiter, points)


def gauss_newton_step(residual: Tensor, gradient: Tensor, u: Tensor, grid, lam: float,
                      project: Optional[tuple[Callable, Callable]] = None, cg_iterations: int = 60,
                      cg_tol: float = 1e-3, solver: str = "cg", damping: float = 0.0,
                      points: Optional[PointTerm] = None) -> tuple[Tensor, CGInfo]:
    """One regularised Gauss-Newton update for a displacement `u: (d, *S)` on `grid` (a `shapeflow.grids.Grid`).

    residual: (C, *S) warped minus fixed; gradient: (C, d, *S) world gradient of the warped image.
    Solves `(sum_c g g^T / C + lam L + damping I) du = -sum_c r g / C - lam L u` (with `project` =
    (P, P^T) for a control grid: unknowns z, du = P z) to relative residual `cg_tol` in at most
    `cg_iterations` iterations. solver: a name in `GRID_SOLVERS`: "cg" (matrix-free operator,
    Jacobi preconditioner) or "amg" (the matrix assembled by `assemble_grid_normal_matrix`,
    AMG-preconditioned CG through pyamg: CPU tensors, `pip install "shapeflow[amg]"`, no control
    grid). points: an optional `PointTerm` on the field's grid with its residual `(d, K)` (e.g.
    landmarks: `r_k = phi(f_k) - m_k`, B the interpolation at f_k): `w B^T B` joins every
    component's block of the matrix and `-w B^T r` the right-hand side. Returns `(du (d, *S), CGInfo)`.
    """
    GRID_SOLVERS.lookup(solver, "gauss_newton_step()")
    _check_points("gauss_newton_step", points, u[0].numel())
    if solver != "cg" and project is not None:
        raise ShapeflowError(f"gauss_newton_step(): solver={solver!r} needs a dense field (stride=1); "
                             "use solver='cg' with a control grid")
    C = gradient.shape[0]
    spacing = grid.spacing.tolist()
    rhs = -(residual[:, None] * gradient).sum(0) / C - lam * grid_laplacian_apply(u, spacing)   # (d, *S)
    if points is not None and points.residual is not None:
        rhs = rhs - points.gradient(u[0].numel()).to(rhs).view(rhs.shape)
    if project is None:  # per-voxel blocks and the stencil: fused operator (cg) or assembled matrix (amg)
        x, info = solve_grid_normal(gradient / math.sqrt(C), rhs.reshape(-1), lam=lam, spacing=spacing,
                                    damping=damping, solver=solver, tol=cg_tol, maxiter=cg_iterations, points=points)
        return x.view(u.shape), info
    blocks = torch.einsum("ci...,cj...->ij...", gradient, gradient) / C          # (d, d, *S)

    def hessian(z: Tensor) -> Tensor:                                           # (d, *S) -> (d, *S)
        out = torch.einsum("ij...,j...->i...", blocks, z) + lam * grid_laplacian_apply(z, spacing) + damping * z
        return out if points is None else out + points.normal(z.reshape(z.shape[0], -1)).view(z.shape)

    up, down = project
    z_shape = down(rhs).shape
    x, info = conjugate_gradient(lambda v: down(hessian(up(v.view(z_shape)))).reshape(-1), down(rhs).reshape(-1),
                                 tol=cg_tol, maxiter=cg_iterations)
    return up(x.view(z_shape)), info
