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

That is the default (`optimizer="lm"`, `multiscale="pyramid"`, `interpolation="linear"`). The
other choices fit `AffineSSD`, the objective of Watson, Cherry & Lang (seed 001),

    J(w; theta) = prod(h) sum_c sum_x (T_theta(y(x; w)) - R_theta(x))^2 + lam |w - w_id|^2,

with T, R interpolated by `shapeflow.interpolation` (a C^2 cubic B-spline whose scale theta blurs
both images, or multilinear), written in plain torch ops so `torch.func` gives exact Hessians:

* optimizer: "lm" / "gauss-newton" (the solver core's Gauss-Newton loop on the residual, Jacobian
  by `jacfwd`), "newton" (`minimize_newton`: exact Hessian, trust region), "gradient";
* multiscale: "pyramid" (the optimizer on each pyramid level, coarse to fine), "continuation"
  (on the finest level along decreasing thetas, warm started) or "predictor-corrector"
  (`shapeflow.solvers.continuation` with the Euler predictor in theta, `predictor="newton"` or
  `"gauss-newton"`, then the optimizer as corrector).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .._registry import Registry
from ..deform import Affine
from ..errors import ShapeflowError
from ..grids import Grid, sample, spatial_gradient
from ..interpolation import INTERPOLATIONS, Interpolant
from ..solvers import (Linearization, continuation, gauss_newton, minimize_gradient, minimize_least_squares,
                       minimize_newton)
from ..solvers.continuation import PREDICTORS, check_thetas

__all__ = ["AffineProblem", "AffineSSD", "fit_affine", "OPTIMIZERS", "MULTISCALE", "TRANSFORMS", "default_thetas"]

#: the affine stage's optimizers (`register(optimizer=...)`)
OPTIMIZERS: Registry[str] = Registry("optimizer", {
    "lm": "Levenberg-Marquardt", "gauss-newton": "Gauss-Newton (no damping, Armijo line search)",
    "newton": "exact Newton, autodiff Hessian, trust region", "gradient": "steepest descent (Barzilai-Borwein)"})
#: the affine stage's multi-scale strategies (`register(multiscale=...)`)
MULTISCALE: Registry[str] = Registry("multiscale", {
    "pyramid": "coarse-to-fine image pyramid", "continuation": "decreasing spline scale theta, warm starts",
    "predictor-corrector": "decreasing theta, Euler predictor dw/dtheta, then the optimizer"})
#: parameter count of each transform of `AffineSSD` for dimension d
TRANSFORMS: Registry[Callable[[int], int]] = Registry("transform", {
    "affine": lambda d: d * d + d, "rigid": lambda d: d + d * (d - 1) // 2})


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
               weights: list[tuple[torch.Tensor | None, torch.Tensor | None]] | None = None, *,
               optimizer: str = "lm", multiscale: str = "pyramid", interpolation: str = "linear",
               thetas: list[float] | None = None, predictor: str = "newton",
               transform: str = "affine") -> tuple[Affine, bool]:
    """Affine map (fixed world -> moving world) fitted coarse to fine.

    levels: (moving features (C, *S_m), moving grid, fixed features (C, *S), fixed grid) per
    pyramid level, coarse first; landmarks: (fixed (K, d), moving (K, d), weight, length) or None;
    weights: per level (fixed mask weight (1, *S), moving mask weight (1, *S_m)), either None.
    optimizer, multiscale, interpolation, thetas, predictor, transform: the defaults run the
    analytic Levenberg-Marquardt pyramid (`AffineProblem`; "gauss-newton" too, undamped); any other
    choice `fit_affine_ssd`, which takes no masks or landmarks.
    Appends one history row per iteration. Returns the `Affine` and whether Ctrl-C stopped the fit
    (the map is then the best one reached).
    """
    classic = (optimizer in ("lm", "gauss-newton") and multiscale == "pyramid" and interpolation == "linear"
               and transform == "affine")
    if not classic:
        if landmarks is not None or (weights is not None and any(w is not None for pair in weights for w in pair)):
            raise ShapeflowError("register(): masks and landmark_weight in the affine stage need optimizer 'lm' or "
                                 "'gauss-newton' with multiscale='pyramid', interpolation='linear'")
        return fit_affine_ssd(levels, history, iterations=iterations, optimizer=optimizer, multiscale=multiscale,
                              interpolation=interpolation, thetas=thetas, predictor=predictor,
                              transform=transform), False
    damped = optimizer == "lm"
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
            {"stage": stage, "phase": "levenberg-marquardt" if damped else "gauss-newton", "iteration": step.iteration,
             "total": step.cost, **({"diverged": True} if step.diverged else {})})
        fit = minimize_least_squares(problem, x0, maxiter=iterations, damping=1e-3 if damped else 0.0,
                                     line_search="decrease" if damped else "armijo", max_halvings=0 if damped else 14,
                                     max_damping_tries=17, gtol=0.0, xtol=0.0, ftol=1e-6, callback=rows)
        affine = problem.to_affine(fit.x)
        if fit.interrupted:
            return affine, True
    return affine, False


# ----------------------------------------------------------------------------- the seed-001 objective


def _skew(r: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(r[0])
    return torch.stack([torch.stack([zero, -r[2], r[1]]), torch.stack([r[2], zero, -r[0]]),
                        torch.stack([-r[1], r[0], zero])])


def _rotation_vector(matrix: torch.Tensor) -> torch.Tensor:
    """The rotation vector of a 3D rotation matrix (the inverse of `matrix_exp(skew(r))`, angle < pi)."""
    angle = torch.arccos(((torch.trace(matrix) - 1) / 2).clamp(-1, 1))
    axis = torch.stack([matrix[2, 1] - matrix[1, 2], matrix[0, 2] - matrix[2, 0], matrix[1, 0] - matrix[0, 1]])
    factor = 0.5 if float(angle) < 1e-8 else float(angle) / (2 * math.sin(float(angle)))
    return factor * axis


class AffineSSD:
    """`J(w; theta) = prod(h) sum (T_theta(y(x; w)) - R_theta(x))^2 + lam |w - w_id|^2` (module docstring).

    moving T: (C, *S_m) on `moving_grid`; fixed R: (C, *S) on `grid` (its voxel centres x, spacing
    h). `y(x; w) = M (x - c_f) + c_m + L t`: c the grid centres, L half the fixed image's largest
    world extent (so every parameter is of order one). transform "affine": w = (vec M, t), d^2 + d
    numbers; "rigid": w = (angle or rotation vector, t), M = exp(skew). interpolation: "spline"
    (theta >= 0 blurs T and R) or "linear" (theta = 0 only). Every method is `torch.func`-compatible
    in w and theta (theta a float, or a 0-d tensor to differentiate in it).
    """

    def __init__(self, moving: torch.Tensor, moving_grid: Grid, fixed: torch.Tensor, grid: Grid, *,
                 transform: str = "affine", interpolation: str = "spline", regularization: float = 0.0):
        TRANSFORMS.lookup(transform, "AffineSSD()")
        INTERPOLATIONS.lookup(interpolation, "AffineSSD()")
        if not regularization >= 0:
            raise ShapeflowError(f"AffineSSD(): regularization must be >= 0, got {regularization}")
        d = grid.dim
        self.d, self.transform, self.interpolation, self.lam = d, transform, interpolation, float(regularization)
        dtype, device = fixed.dtype, fixed.device
        self.template = Interpolant(moving, moving_grid, interpolation)
        self.reference = Interpolant(fixed, grid, interpolation)
        self.fixed = fixed.reshape(fixed.shape[0], -1)                                    # (C, N)
        self.points = grid.points(dtype, device).reshape(-1, d)                           # (N, d)
        self.centre = self.points.mean(0)
        self.moving_centre = moving_grid.points(dtype, device).reshape(-1, d).mean(0)
        self.length = float((torch.tensor(grid.shape, dtype=torch.float64) - 1).mul(grid.spacing).max()) / 2 or 1.0
        self.weight = float(torch.prod(grid.spacing))
        self.size = TRANSFORMS[transform](d)

    def identity(self) -> torch.Tensor:
        """w of the identity map (the centres matched): (n,)."""
        d, kw = self.d, dict(dtype=self.fixed.dtype, device=self.fixed.device)
        if self.transform == "affine":
            return torch.cat([torch.eye(d, **kw).reshape(-1), torch.zeros(d, **kw)])
        return torch.zeros(self.size, **kw)

    def matrix_shift(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M (d, d), t (d,) in world units) of the parameters w (n,)."""
        d = self.d
        if self.transform == "affine":
            return w[: d * d].reshape(d, d), self.length * w[d * d:]
        k = d * (d - 1) // 2
        if d == 2:
            c, s = torch.cos(w[0]), torch.sin(w[0])
            matrix = torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
        else:
            matrix = torch.linalg.matrix_exp(_skew(w[:3]))
        return matrix, self.length * w[k:]

    def where(self, w: torch.Tensor) -> torch.Tensor:
        """y(x; w) for every fixed voxel centre: (N, d)."""
        matrix, shift = self.matrix_shift(w)
        return (self.points - self.centre) @ matrix.T + self.moving_centre + shift

    def residual(self, w: torch.Tensor, theta=0.0) -> torch.Tensor:
        """`sqrt(prod h) (T_theta(y) - R_theta)` flattened (C N,), then `sqrt(lam) (w - w_id)` when lam > 0;
        `cost == |residual|^2`."""
        warped = self.template(self.where(w), theta)                                     # (C, N)
        reference = self.fixed if (not isinstance(theta, torch.Tensor) and theta == 0) else \
            self.reference(self.points, theta)
        r = math.sqrt(self.weight) * (warped - reference).reshape(-1)
        if self.lam > 0:
            r = torch.cat([r, math.sqrt(self.lam) * (w - self.identity())])
        return r

    def cost(self, w: torch.Tensor, theta=0.0) -> torch.Tensor:
        """J(w; theta): 0-d."""
        return self.residual(w, theta).pow(2).sum()

    def to_affine(self, w: torch.Tensor) -> Affine:
        """The fitted map as an `Affine` `x -> A x + b` (fixed world -> moving world)."""
        matrix, shift = self.matrix_shift(w.detach())
        affine = Affine(self.d).to(w.device, w.dtype)
        with torch.no_grad():
            affine.linear_part.copy_(matrix)
            affine.translation.copy_(self.moving_centre + shift - self.centre @ matrix.T)
        return affine

    def from_affine(self, affine: Affine) -> torch.Tensor:
        """w of a given `Affine` (for "rigid", of the rotation nearest to its linear part)."""
        matrix = affine.matrix.detach().to(self.fixed)
        shift = (affine.translation.detach().to(self.fixed) + self.centre @ matrix.T - self.moving_centre) / self.length
        if self.transform == "affine":
            return torch.cat([matrix.reshape(-1), shift])
        u, _, vh = torch.linalg.svd(matrix)
        rotation = u @ vh
        angle = (torch.atan2(rotation[1, 0], rotation[0, 0]).reshape(1) if self.d == 2
                 else _rotation_vector(rotation))
        return torch.cat([angle, shift])


def default_thetas(grid: Grid) -> list[float]:
    """The default theta schedule (mm^4) on `grid`: blur lengths of 8, 4, 2 and 1 voxels, then 0."""
    h = float(grid.spacing.max())
    return [(k * h) ** 4 for k in (8, 4, 2, 1)] + [0.0]


def minimize_affine(objective: AffineSSD, w0: torch.Tensor, theta: float, optimizer: str, iterations: int,
                    record: Callable[[int, float], None] | None = None) -> tuple[torch.Tensor, int]:
    """Minimise `objective.cost(., theta)` from w0 (n,) with `optimizer` (a name in `OPTIMIZERS`);
    `record(iteration, cost)` after every iteration. Returns (w (n,), iterations)."""
    OPTIMIZERS.lookup(optimizer, "minimize_affine()")
    cost = lambda w: objective.cost(w, theta)
    tell = (lambda it, x, f, g: record(it, f)) if record is not None else None
    if optimizer == "newton":
        # reverse-over-reverse: measured 1.6-2.4x faster than forward-over-reverse here on the CPU
        # (benchmarks/results/newton.md, cost of AD), where vmap falls back to loops for some ops
        fit = minimize_newton(cost, w0, maxiter=iterations, radius=0.25, ftol=1e-10, xtol=1e-12, callback=tell,
                              hessian_mode="reverse-over-reverse")
    elif optimizer == "gradient":
        fit = minimize_gradient(cost, w0, maxiter=5 * iterations, step=1e-3 / max(float(objective.weight), 1e-12),
                                xtol=1e-12, callback=tell)
    else:
        rows = (lambda step: record(step.iteration, 2 * step.cost)) if record is not None else None
        fit = gauss_newton(lambda w: objective.residual(w, theta), w0, maxiter=iterations, jacobian="dense",
                           damping=1e-3 if optimizer == "lm" else 0.0, ftol=1e-10, gtol=0.0, callback=rows)
    if fit.diverged and record is not None:     # a NaN met and rejected: one row says so (Result.diverged)
        record(fit.iterations, float("nan"))
    return fit.x.detach(), fit.iterations


def fit_affine_ssd(levels: list[tuple[torch.Tensor, Grid, torch.Tensor, Grid]], history: list, *,
                   iterations: int = 40, optimizer: str = "newton", multiscale: str = "pyramid",
                   interpolation: str = "spline", thetas: list[float] | None = None, predictor: str = "newton",
                   transform: str = "affine") -> Affine:
    """The affine (or rigid) map fixed world -> moving world fitted on `AffineSSD` (module docstring).

    levels: as in `fit_affine` (coarse first); "pyramid" uses them all, the theta strategies the
    finest. thetas: decreasing, >= 0 (default `default_thetas` of the finest grid). One history row
    per iteration (`phase`: the optimizer; `stage`: the level or the theta).
    """
    who = "register()"
    OPTIMIZERS.lookup(optimizer, who)
    MULTISCALE.lookup(multiscale, who)
    INTERPOLATIONS.lookup(interpolation, who)
    PREDICTORS.lookup(predictor, who)
    if multiscale != "pyramid" and interpolation != "spline":
        raise ShapeflowError(f"register(): multiscale={multiscale!r} blurs the spline interpolant by theta; "
                             "use interpolation='spline'")

    def recorder(stage: str):
        return lambda it, f: history.append({"stage": stage, "phase": optimizer, "iteration": it, "total": f})

    if multiscale == "pyramid":
        affine = None
        for number, (moving, moving_grid, fixed, grid) in enumerate(levels):
            objective = AffineSSD(moving, moving_grid, fixed, grid, transform=transform, interpolation=interpolation)
            w0 = objective.identity() if affine is None else objective.from_affine(affine)
            w, _ = minimize_affine(objective, w0, 0.0, optimizer, iterations, recorder(f"affine-level{number}"))
            affine = objective.to_affine(w)
        return affine
    moving, moving_grid, fixed, grid = levels[-1]
    schedule = check_thetas(default_thetas(grid) if thetas is None else thetas, who)
    objective = AffineSSD(moving, moving_grid, fixed, grid, transform=transform, interpolation="spline")

    def correct(theta: float, start: torch.Tensor) -> tuple[torch.Tensor, int]:
        return minimize_affine(objective, start, theta, optimizer, iterations, recorder(f"affine-theta{theta:.4g}"))

    path = continuation(objective.cost, objective.identity(), schedule, corrector=correct,
                        predictor=predictor if multiscale == "predictor-corrector" else None,
                        residual=objective.residual)
    return objective.to_affine(path.x)
