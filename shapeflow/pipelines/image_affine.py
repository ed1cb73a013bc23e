"""Affine image registration (and the affine pre-alignment of the non-linear models), coarse to fine.

The map from fixed world points to moving world points is `T(x) = M (x - c_f) + c_m + t`
(c: the grid centres), fitted by Levenberg-Marquardt on the least squares of the residual
`moving(T(x)) - fixed(x)` over the fixed grid: the solver core's one Gauss-Newton loop
(`minimize_least_squares`) with the (d^2 + d)-parameter normal matrix assembled here. Its
Jacobian comes analytically from the moving image's gradient, since `grid_sample` has no
forward-mode derivative for `torch.func`; the damping is Marquardt's, `mu diag(J^T J)`.

Landmarks `(f_k, m_k)` (fixed, moving; world) with weight w add `w mean_k |T(f_k) - m_k|^2 / D^2`
(D: the fixed image's world diagonal), the same term as the non-linear models'; T is linear in
the parameters, so its rows of J are exact.
"""
from __future__ import annotations

import torch

from ..deform import Affine
from ..grids import Grid, sample, spatial_gradient
from ..solvers import Linearization, minimize_least_squares

__all__ = ["AffineProblem", "fit_affine"]


class AffineProblem:
    """The affine least-squares problem on one pyramid level, in x = (vec M (d*d,), t (d,)).

    moving: (C, *S_m) on `moving_grid`; fixed: (C, *S) on `grid`. cost: `mean m r^2`, m the masks'
    weight: `fixed_weight (1, *S)` times `moving_weight (1, *S_m)` sampled where the voxel lands
    (either None: 1).
    """

    def __init__(self, moving: torch.Tensor, moving_grid: Grid, fixed: torch.Tensor, grid: Grid,
                 landmarks: tuple[torch.Tensor, torch.Tensor, float, float] | None = None,
                 fixed_weight: torch.Tensor | None = None, moving_weight: torch.Tensor | None = None):
        d = grid.dim
        self.fixed_weight = None if fixed_weight is None else fixed_weight.reshape(1, -1)         # (1, N)
        self.moving_weight = moving_weight
        self.landmarks = landmarks     # (fixed (K, d), moving (K, d), weight w, length D) or None
        self.d, self.moving, self.moving_grid = d, moving, moving_grid
        dtype, device = fixed.dtype, fixed.device
        self.points = grid.points(dtype, device).reshape(-1, d)                          # (N, d)
        self.centre = self.points.mean(0)
        self.moving_centre = moving_grid.points(dtype, device).reshape(-1, d).mean(0)
        self.moving_gradient = spatial_gradient(moving, moving_grid)                     # (C, d, *S_m)
        self.fixed = fixed.reshape(fixed.shape[0], -1)                                    # (C, N)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[: self.d * self.d].view(self.d, self.d), x[self.d * self.d:]

    def cost(self, x: torch.Tensor) -> tuple[float, tuple]:
        matrix, shift = self.split(x)
        where = (self.points - self.centre) @ matrix.T + self.moving_centre + shift        # (N, d)
        residual = sample(self.moving, self.moving_grid, where) - self.fixed               # (C, N)
        mask = self.fixed_weight
        if self.moving_weight is not None:
            moved = sample(self.moving_weight, self.moving_grid, where)                   # (1, N)
            mask = moved if mask is None else mask * moved
        if mask is not None:       # rows of the residual (and, in linearize, of J) times sqrt(m)
            residual = residual * mask.clamp_min(0).sqrt()
        cost = float(residual.pow(2).mean())
        if self.landmarks is not None:
            fixed_marks, moving_marks, weight, length = self.landmarks
            cost += weight * float(self._landmark_residual(x).pow(2).sum(1).mean()) / length ** 2
        return cost, (residual, where, mask)

    def _landmark_residual(self, x: torch.Tensor) -> torch.Tensor:
        """`T(f_k) - m_k`: (K, d)."""
        matrix, shift = self.split(x)
        fixed_marks, moving_marks = self.landmarks[0], self.landmarks[1]
        return (fixed_marks - self.centre) @ matrix.T + self.moving_centre + shift - moving_marks

    def linearize(self, x: torch.Tensor, state: tuple) -> Linearization:
        residual, where, mask = state
        d, n = self.d, self.points.shape[0]
        g = sample(self.moving_gradient.flatten(0, 1), self.moving_grid, where).view(-1, d, n)              # (C, d, N)
        if mask is not None:
            g = g * mask.clamp_min(0).sqrt()[:, None]
        jac = torch.cat([(g[:, :, None, :] * (self.points - self.centre).T[None, None]).flatten(1, 2), g], 1)  # (C, P, N)
        jac = jac.transpose(1, 2).reshape(-1, d * d + d)                                                     # (C N, P)
        hessian, gradient = jac.T @ jac, jac.T @ residual.reshape(-1)
        if self.landmarks is not None:   # cost = mean r^2 + ...: rows scaled by (C N) w / (K D^2)
            fixed_marks, _, weight, length = self.landmarks
            coefficient = residual.numel() * weight / (len(fixed_marks) * length ** 2)
            eye = torch.eye(d, dtype=x.dtype, device=x.device)
            # d T(f)_a / d M_ib = [a == i] (f - c)_b, d T(f)_a / d t_i = [a == i]
            linear = torch.einsum("ai,kb->kaib", eye, fixed_marks - self.centre).reshape(-1, d, d * d)
            rows = torch.cat([linear, eye.expand(len(fixed_marks), d, d)], 2).reshape(-1, d * d + d)   # (K d, P)
            hessian = hessian + coefficient * rows.T @ rows
            gradient = gradient + coefficient * rows.T @ self._landmark_residual(x).reshape(-1)
        scaling = torch.diag(torch.diagonal(hessian) + 1e-12)
        return Linearization(gradient, lambda mu: (torch.linalg.solve(hessian + mu * scaling, -gradient), 0))

    def to_affine(self, x: torch.Tensor) -> Affine:
        """The fitted map as an `Affine` `x -> A x + b` in world units."""
        matrix, shift = self.split(x)
        affine = Affine(self.d).to(x.device, x.dtype)
        with torch.no_grad():
            affine.linear_part.copy_(matrix)
            affine.translation.copy_(self.moving_centre + shift - self.centre @ matrix.T)
        return affine

    def from_affine(self, affine: Affine) -> torch.Tensor:
        """x for a given `Affine` (T(x) = A x + b  =>  M = A, t = b + A c_f - c_m)."""
        matrix = affine.matrix.detach()
        shift = affine.translation.detach() + self.centre @ matrix.T - self.moving_centre
        return torch.cat([matrix.reshape(-1), shift])


def fit_affine(levels: list[tuple[torch.Tensor, Grid, torch.Tensor, Grid]], history: list,
               iterations: int = 40, landmarks: tuple[torch.Tensor, torch.Tensor, float, float] | None = None,
               weights: list[tuple[torch.Tensor | None, torch.Tensor | None]] | None = None) -> tuple[Affine, bool]:
    """Affine map (fixed world -> moving world) fitted coarse to fine.

    levels: (moving features (C, *S_m), moving grid, fixed features (C, *S), fixed grid) per
    pyramid level, coarse first; landmarks: (fixed (K, d), moving (K, d), weight, length) or None;
    weights: per level (fixed mask weight (1, *S), moving mask weight (1, *S_m)), either None.
    Appends one history row per iteration. Returns the `Affine` and whether Ctrl-C stopped the fit
    (the map is then the best one reached).
    """
    affine = None
    for number, (moving, moving_grid, fixed, grid) in enumerate(levels):
        problem = AffineProblem(moving, moving_grid, fixed, grid, landmarks,
                                *(weights[number] if weights is not None else (None, None)))
        d = grid.dim
        x0 = (torch.cat([torch.eye(d, dtype=fixed.dtype, device=fixed.device).reshape(-1),
                         torch.zeros(d, dtype=fixed.dtype, device=fixed.device)])
              if affine is None else problem.from_affine(affine))
        stage = f"affine-level{number}"
        rows = lambda step, stage=stage: history.append(
            {"stage": stage, "phase": "levenberg-marquardt", "iteration": step.iteration, "total": step.cost,
             **({"diverged": True} if step.diverged else {})})
        fit = minimize_least_squares(problem, x0, maxiter=iterations, damping=1e-3, line_search="decrease",
                                     max_halvings=0, max_damping_tries=17, gtol=0.0, xtol=0.0, ftol=1e-6,
                                     callback=rows)
        affine = problem.to_affine(fit.x)
        if fit.interrupted:
            return affine, True
    return affine, False
