"""Layers for training networks through the solver core (learned features, learned Gauss-Newton, DIO).

All three solve the regularised Gauss-Newton system of a displacement `u: (d, *S)` on a grid,

    (sum_c g_c g_c^T / C + lam L) du = -sum_c r_c g_c / C - lam L u,

with per-voxel coupled `d x d` blocks and the global (Neumann, spacing aware) grid Laplacian L,
through `shapeflow.solvers.linear_solve`:

* `gauss_newton_layer(moving, fixed, ...)`: one step on two feature images (SUITS);
* `gauss_newton_system_layer(gradient, residual, u, ...)`: one step from the system's parts
  directly (LearnGN: a CNN predicts g and r); the matrix is assembled sparse, so the adjoint solve
  also gives the gradient of its coupled blocks;
* `implicit_registration_layer(features_moving, features_fixed, ...)`: the whole Gauss-Newton
  optimiser as a layer (DIO), run without a graph, its gradient attached at the solution by the
  implicit function theorem, Jacobian-free backprop, or by differentiating every iteration.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch

from ..errors import ShapeflowError
from ..grids import Grid, sample, spatial_gradient
from ..regularizers import grid_laplacian, grid_laplacian_apply
from ..solvers import grid_normal_operator, linear_solve

__all__ = ["gauss_newton_layer", "gauss_newton_system_layer", "implicit_registration_layer", "gauss_newton_steps",
           "linearise", "normal_factor", "BACKWARDS"]

#: how `implicit_registration_layer` differentiates the optimiser
BACKWARDS = ("ift", "jfb", "unrolled")


def linearise(moving: torch.Tensor, fixed: torch.Tensor, grid: Grid,
              u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual and symmetric (ESM) gradient of two feature images under a displacement.

    moving, fixed: (C, *S) on `grid`; u: (d, *S) world displacement (None: zero). The moving
    features are sampled at `x + u(x)` (linear, border). Returns `(residual (C, *S) = warped -
    fixed, gradient (C, d, *S) = (grad warped + grad fixed) / 2)`, both differentiable.
    """
    points = grid.points(moving.dtype, moving.device)
    warped = sample(moving, grid, points if u is None else points + u.movedim(0, -1))
    gradient = (spatial_gradient(warped, grid) + spatial_gradient(fixed, grid)) / 2          # (C, d, *S)
    return warped - fixed, gradient


def gauss_newton_layer(moving: torch.Tensor, fixed: torch.Tensor, grid: Grid, lam: float,
                       displacement: torch.Tensor | None = None, *, mode: str = "unrolled", tol: float = 1e-8,
                       maxiter: int | None = None) -> torch.Tensor:
    """One Gauss-Newton update as a differentiable layer (for training features through the solver).

    moving, fixed: (C, *S) features on the same `grid` (e.g. the outputs of a CNN);
    displacement: current u (d, *S) or None (zero). Returns du (d, *S) solving
    `(sum_c g g^T / C + lam L) du = -sum_c r g / C - lam L u` with `linear_solve`, so gradients
    flow to `moving`, `fixed` and `displacement`. mode "unrolled" (or "partial") differentiates
    everything; "implicit" solves one adjoint system in the backward pass but, like LearnGN's
    LSESolver, passes no gradient through the system matrix's dependence on the features
    (only through its diagonal and the right-hand side).
    """
    d = grid.dim
    points = grid.points(moving.dtype, moving.device)
    u = torch.zeros(d, *grid.shape, dtype=moving.dtype, device=moving.device) if displacement is None else displacement
    warped = sample(moving, grid, points + u.movedim(0, -1))
    gradient = (spatial_gradient(warped, grid) + spatial_gradient(fixed, grid)) / 2          # (C, d, *S)
    C = gradient.shape[0]
    blocks = torch.einsum("ci...,cj...->ij...", gradient, gradient) / C
    spacing = grid.spacing.tolist()
    rhs = -((warped - fixed)[:, None] * gradient).sum(0) / C - lam * grid_laplacian_apply(u, spacing)
    eye = torch.eye(d, dtype=blocks.dtype, device=blocks.device).view(d, d, *([1] * d))
    off_diagonal = blocks * (1 - eye)
    diagonal = torch.diagonal(blocks, dim1=0, dim2=1).movedim(-1, 0).reshape(-1)             # (d * prod S,)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        z = v.view(d, *grid.shape)
        return (torch.einsum("ij...,j...->i...", off_diagonal, z) + lam * grid_laplacian_apply(z, spacing)).reshape(-1)

    du = linear_solve(matvec, diagonal, rhs.reshape(-1), mode=mode, tol=tol, maxiter=maxiter)
    return du.view(d, *grid.shape)


# ----------------------------------------------------------------------------- the system's parts


@functools.lru_cache(maxsize=8)
def _laplacian_pattern(shape: tuple[int, ...], spacing: tuple[float, ...], d: int, dtype: torch.dtype,
                       device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`kron(I_d, L)` of the grid as COO `(index (2, E), values (E,))`, built once per grid."""
    L = grid_laplacian(shape, list(spacing), components=d, dtype=dtype, device=device)
    return L.indices(), L.values()


def _off_diagonal_index(d: int, n: int, device) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """COO index of the off-diagonal entries of the per-voxel d x d blocks: (2, d (d - 1) n)."""
    voxel = torch.arange(n, device=device)
    pairs = [(i, j) for i in range(d) for j in range(d) if i != j]
    rows = torch.cat([i * n + voxel for i, _ in pairs])
    cols = torch.cat([j * n + voxel for _, j in pairs])
    return torch.stack([rows, cols]), pairs


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_system(gradient, residual, u, grid: Grid) -> None:
    d, shape = grid.dim, tuple(grid.shape)
    if not isinstance(gradient, torch.Tensor) or gradient.dim() != d + 2 or gradient.shape[1] != d \
            or tuple(gradient.shape[2:]) != shape:
        raise ShapeflowError(f"gauss_newton_system_layer(): gradient must be (C, {d}, {', '.join(map(str, shape))}), "
                             f"got {_shape(gradient)}")
    if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != (gradient.shape[0], *shape):
        raise ShapeflowError(f"gauss_newton_system_layer(): residual must be ({gradient.shape[0]}, "
                             f"{', '.join(map(str, shape))}) like the gradient's channels, got "
                             f"{_shape(residual)}")
    if u is not None and (not isinstance(u, torch.Tensor) or tuple(u.shape) != (d, *shape)):
        raise ShapeflowError(f"gauss_newton_system_layer(): u must be ({d}, {', '.join(map(str, shape))}), got "
                             f"{_shape(u)}")


def gauss_newton_system_layer(gradient: torch.Tensor, residual: torch.Tensor, u: torch.Tensor | None, grid: Grid,
                              lam: float, mode: str = "implicit", *, tol: float = 1e-8,
                              maxiter: int | None = None) -> torch.Tensor:
    """One Gauss-Newton update from the system's parts, differentiable in all of them.

    gradient: (C, d, *S) per-voxel Jacobian rows g_c (e.g. predicted by a CNN, as in LearnGN);
    residual: (C, *S) r_c; u: current displacement (d, *S) or None (zero); lam >= 0. Returns
    du (d, *S) solving `(sum_c g_c g_c^T / C + lam L) du = -sum_c r_c g_c / C - lam L u` (the
    coupled d x d blocks, L the global grid Laplacian, Neumann, spacing aware) with
    `linear_solve` (CG, Jacobi preconditioner, relative tolerance `tol`).

    mode "implicit": the matrix is assembled as a sparse tensor whose values depend on
    `gradient`; the backward pass solves one adjoint system by CG and returns the gradient of
    every stored entry (`-g_b du^T` on the pattern), so gradients reach `gradient` through the
    whole matrix, `residual` and `u` (LearnGN's LSESolver, plus the blocks it leaves out).
    "unrolled" / "partial": autograd through (the last part of) the CG iterations, matrix free.
    """
    _check_system(gradient, residual, u, grid)
    if not lam >= 0:
        raise ShapeflowError(f"gauss_newton_system_layer(): lam must be >= 0, got {lam}")
    d, shape = grid.dim, tuple(grid.shape)
    C = gradient.shape[0]
    spacing = tuple(float(h) for h in grid.spacing.tolist())
    blocks = torch.einsum("ci...,cj...->ij...", gradient, gradient) / C                      # (d, d, *S)
    rhs = -(residual[:, None] * gradient).sum(0) / C                                          # (d, *S)
    if u is not None:
        rhs = rhs - lam * grid_laplacian_apply(u, list(spacing))
    if mode == "implicit":
        A, diagonal = _assembled_system(gradient, grid, lam, blocks)
    else:
        diagonal = torch.diagonal(blocks, dim1=0, dim2=1).movedim(-1, 0).reshape(-1)         # (d n,)
        eye = torch.eye(d, dtype=blocks.dtype, device=blocks.device).view(d, d, *([1] * d))
        off_diagonal = blocks * (1 - eye)
        lap_diagonal = grid_normal_operator(torch.zeros(1, d, *shape, dtype=gradient.dtype, device=gradient.device),
                                            lam=lam, spacing=list(spacing)).diagonal()

        def A(v: torch.Tensor) -> torch.Tensor:
            z = v.view(d, *shape)
            return (torch.einsum("ij...,j...->i...", off_diagonal, z) + lam * grid_laplacian_apply(z, list(spacing))
                    ).reshape(-1)

        A.diagonal = lambda: lap_diagonal                                                    # for M="jacobi"
    return _solve(A, diagonal, rhs.reshape(-1), tol, maxiter, mode).view(d, *shape)


def _assembled_system(gradient: torch.Tensor, grid: Grid, lam: float,
                      blocks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gauss-Newton matrix `sum_c g_c g_c^T / C + lam L` of gradient (C, d, *S) as `(A, diagonal)`:
    A sparse COO (lam L and the blocks' off-diagonal entries, values differentiable in `gradient`),
    diagonal (d n,) the blocks' diagonal (`linear_solve`'s `diag`)."""
    d, shape = grid.dim, tuple(grid.shape)
    n = math.prod(shape)
    if blocks is None:
        blocks = torch.einsum("ci...,cj...->ij...", gradient, gradient) / gradient.shape[0]
    spacing = tuple(float(h) for h in grid.spacing.tolist())
    lap_index, lap_values = _laplacian_pattern(shape, spacing, d, gradient.dtype, str(gradient.device))
    off_index, pairs = _off_diagonal_index(d, n, gradient.device)
    flat = blocks.reshape(d, d, n)
    values = torch.cat([lam * lap_values, *[flat[i, j] for i, j in pairs]])
    A = torch.sparse_coo_tensor(torch.cat([lap_index, off_index], 1), values, (d * n, d * n), check_invariants=False)
    return A, torch.diagonal(blocks, dim1=0, dim2=1).movedim(-1, 0).reshape(-1)


def _solve(A, diagonal: torch.Tensor, rhs: torch.Tensor, tol: float, maxiter: int | None,
           mode: str = "implicit") -> torch.Tensor:
    with warnings.catch_warnings():      # torch's one-time "CSR support is in beta" notice
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return linear_solve(A, diagonal, rhs, mode=mode, M="jacobi", tol=tol, maxiter=maxiter)


# ----------------------------------------------------------------------------- the optimiser as a layer


def _check_features(moving, fixed, grid: Grid) -> None:
    shape = tuple(grid.shape)
    for name, f in (("features_moving", moving), ("features_fixed", fixed)):
        if not isinstance(f, torch.Tensor) or f.dim() != grid.dim + 1 or tuple(f.shape[1:]) != shape:
            raise ShapeflowError(f"implicit_registration_layer(): {name} must be (C, {', '.join(map(str, shape))}) "
                                 f"on the grid, got {_shape(f)}")
    if moving.shape[0] != fixed.shape[0]:
        raise ShapeflowError(f"implicit_registration_layer(): features_moving has {moving.shape[0]} channels but "
                             f"features_fixed {fixed.shape[0]}; they must match")


def normal_factor(gradient: torch.Tensor) -> torch.Tensor:
    """A per-voxel factor of the Gauss-Newton blocks with the fewest rows: `(K, d, *S)`, K = min(C, d).

    gradient: (C, d, *S). Returns F with `sum_k F_k F_k^T = sum_c g_c g_c^T / C` at every voxel
    (for C > d from the blocks' eigen-decomposition, `F_k = sqrt(w_k) v_k`), so the fused normal
    operator reads d rows per voxel instead of C (12 feature channels: 2-3x faster CG in 2D).
    """
    C, d = gradient.shape[:2]
    if C <= d:
        return gradient / math.sqrt(C)
    blocks = torch.einsum("ci...,cj...->...ij", gradient, gradient) / C                       # (*S, d, d)
    w, V = torch.linalg.eigh(blocks)
    factor = w.clamp_min(0).sqrt()[..., :, None] * V.transpose(-1, -2)                        # (*S, k, i)
    return factor.movedim(-1, 0).movedim(-1, 0).contiguous()                                  # (k, i, *S)


def _gauss_newton_rhs(residual: torch.Tensor, gradient: torch.Tensor, u: torch.Tensor, grid: Grid,
                      lam: float) -> torch.Tensor:
    """`-sum_c r_c g_c / C - lam L u`: (d, *S)."""
    data = (residual[:, None] * gradient).sum(0) / gradient.shape[0]
    return -data - lam * grid_laplacian_apply(u, grid.spacing.tolist())


def gauss_newton_steps(moving: torch.Tensor, fixed: torch.Tensor, grid: Grid, lam: float, iterations: int, *,
                       step: float = 1.0, tol: float = 1e-3, maxiter: int = 100) -> torch.Tensor:
    """`iterations` Gauss-Newton steps on two feature images from u = 0, without a graph.

    moving, fixed: (C, *S) on `grid`. Each step solves the system of `gauss_newton_layer`
    exactly as `gauss_newton_system_layer` does (the coupled blocks and the Laplacian assembled
    sparse, Jacobi CG to relative tolerance `tol` in at most `maxiter` iterations) and adds
    `step * du`, so a graph-free forward (DIO's "ift" and "jfb") computes the very iterates the
    "unrolled" mode differentiates. Returns u (d, *S), detached.
    """
    with torch.no_grad():
        moving, fixed = moving.detach(), fixed.detach()
        u = torch.zeros(grid.dim, *grid.shape, dtype=moving.dtype, device=moving.device)
        for _ in range(iterations):
            residual, gradient = linearise(moving, fixed, grid, u)
            u = u + step * gauss_newton_system_layer(gradient, residual, u, grid, lam, "implicit", tol=tol,
                                                     maxiter=maxiter)
    return u


def implicit_registration_layer(features_moving: torch.Tensor, features_fixed: torch.Tensor, grid: Grid,
                                lam: float, iterations: int, backward: str = "ift", *, step: float = 1.0,
                                tol: float = 1e-6, maxiter: int = 200) -> torch.Tensor:
    """The Gauss-Newton registration of two feature images as one layer (DIO), -> u (d, *S).

    features_moving, features_fixed: (C, *S) on `grid` (e.g. a network's outputs); lam: weight of
    the diffusion regulariser; iterations: Gauss-Newton steps from u = 0 (each `u += step * du`,
    CG to relative residual `tol` in at most `maxiter` iterations). The optimiser runs without a
    graph; u* is its result, and the stationarity condition at u* is
    `F(u, theta) = -(sum_c r_c g_c / C + lam L u) = 0` (r, g from `linearise`). `backward`:

    * "ift": implicit function theorem with the regularised Gauss-Newton Hessian
      `H = sum_c g g^T / C + lam L` (coupled blocks, global Laplacian) standing for -dF/du:
      `du*/dtheta = H^-1 dF/dtheta`, one adjoint CG solve (`linear_solve`, implicit mode) in the
      backward pass. Exact for the Gauss-Newton fixed point when the residual is small.
    * "jfb": Jacobian-free backprop: H^-1 replaced by its Jacobi (diagonal) inverse,
      `du*/dtheta ~ diag(H)^-1 dF/dtheta`: no solve, one backward through F.
    * "unrolled": autograd through every iteration (each step's exact solve differentiated by
      `gauss_newton_system_layer`); the reference, memory growing with the iterations.

    The returned value is u* in every mode; gradients flow to both feature images.
    """
    _check_features(features_moving, features_fixed, grid)
    if backward not in BACKWARDS:
        raise ShapeflowError(f"implicit_registration_layer(): unknown backward {backward!r}; "
                             f"choose from {', '.join(BACKWARDS)}")
    if not isinstance(iterations, int) or iterations < 1:
        raise ShapeflowError(f"implicit_registration_layer(): iterations must be an int >= 1, got {iterations!r}")
    if not lam > 0:
        raise ShapeflowError(f"implicit_registration_layer(): lam must be > 0, got {lam}")
    if backward == "unrolled":
        u = torch.zeros(grid.dim, *grid.shape, dtype=features_moving.dtype, device=features_moving.device)
        for _ in range(iterations):
            residual, gradient = linearise(features_moving, features_fixed, grid, u)
            u = u + step * gauss_newton_system_layer(gradient, residual, u, grid, lam, "implicit", tol=tol,
                                                     maxiter=maxiter)
        return u
    u = gauss_newton_steps(features_moving, features_fixed, grid, lam, iterations, step=step, tol=tol, maxiter=maxiter)
    if not torch.is_grad_enabled() or not (features_moving.requires_grad or features_fixed.requires_grad):
        return u
    residual, gradient = linearise(features_moving, features_fixed, grid, u)
    F = _gauss_newton_rhs(residual, gradient, u, grid, lam)                                   # (d, *S)
    if backward == "ift":      # H^-1 F: the system of the forward steps at u*, H held constant
        A, diagonal = _assembled_system(gradient.detach(), grid, lam)
        du = _solve(A, diagonal, F.reshape(-1), tol, maxiter).view(u.shape)
    else:
        hessian = grid_normal_operator(normal_factor(gradient.detach()), lam=lam, spacing=grid.spacing.tolist())
        du = F / hessian.diagonal().view(u.shape)
    return u + (du - du.detach())
