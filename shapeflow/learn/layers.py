"""Layers for training networks through the solver core (learned features, learned Gauss-Newton)."""
from __future__ import annotations

import torch

from ..grids import Grid, sample, spatial_gradient
from ..regularizers import grid_laplacian_apply
from ..solvers import linear_solve

__all__ = ["gauss_newton_layer"]


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
