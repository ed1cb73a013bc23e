"""Flows on corresponding points, fitted by Gauss-Newton in their output weights: the "output-gauss-newton" fitter.

With corresponding points (`loss="l2"`: source point i goes to target point i) and landmarks, a
flow's fit is a nonlinear least-squares problem,

    F(W3) = 1/2 sum_i |phi(x_i) - y_i|^2 / n  +  1/2 w sum_k |phi(s_k) - t_k|^2 / K,

half the Adam objective's data and landmark terms. Gauss-Newton solves it in a handful of
iterations where Adam needs hundreds: on the fish (91 points) 7 iterations reach an RMSE of
0.0001 % of the diagonal in 34 ms, where 60 Adam steps stopped at 0.27 % in 0.105 s
(`benchmarks/results/flow_gauss_newton.md`).

* The unknowns are the output weights `W3: (L, d, m)` of every block (`ResNetFlow.linearize`);
  the other weights keep their seeded random start, as random features. The map stays a flow of
  the same model (its energy, trajectory and inverse unchanged).
* Each iteration solves the damped normal equations in their dual form,
  `(J^T J + mu kappa I) dW = -J^T r  <=>  dW = -J^T (J J^T + mu kappa I)^-1 r`, with the
  `(n d, n d)` kernel `J J^T` (`OutputLinearization.kernel`) and kappa its mean diagonal, so the
  damping mu is relative. The loop, its line search and damping updates, and Ctrl-C are
  `solvers.minimize_least_squares`, the Gauss-Newton loop of every other fit.
* The smoothness comes from the damped least-norm steps from the identity, not from the model's
  energy: an explicit `regularization` (and `lr`, `lbfgs_iterations`), which only mean something
  to Adam, send the fit to Adam, as does every loss without correspondences (`fallback`).
* At most `GN_ROWS / d` farthest source points (with their partners) and the landmarks enter the
  fit; the fitted map then moves every point. The kernel is dense, so this bounds an iteration's
  cost (about 30 ms at 256 points in 3D, with its damping tries), and a smooth flow is fixed by a
  few hundred points: at 1k points the fit on 256 of them ends at 0.057 % RMSE on all of them.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..progress import progress_bar
from ..sampling import farthest_point_sample
from ..solvers import Linearization, minimize_least_squares

__all__ = ["fit_output_gauss_newton", "GN_ROWS", "GN_ITERATIONS", "GN_DAMPING"]

#: the fit uses at most this many residual rows (points times dimension), farthest points first
GN_ROWS = 768
#: Gauss-Newton iterations when `register` gets no `iterations`
GN_ITERATIONS = 20
#: the initial Levenberg-Marquardt damping, relative to the kernel's mean diagonal
GN_DAMPING = 1e-3
#: the fit stops when an iteration lowers F by less than this fraction
GN_FTOL = 1e-4
#: line-search halvings, and damping rises, per iteration
GN_HALVINGS = 4
#: options that only Adam reads: given, they send the fit to Adam
ADAM_OPTIONS = ("lr", "lbfgs_iterations", "regularization")


class _OutputProblem:
    """`F(W3)` for `solvers.minimize_least_squares`: `points: (n, d)` moved onto `targets: (n, d)`,
    residual row i weighted by `weights[i]` (the 1/n of the mean, w / K for a landmark)."""

    def __init__(self, model, points: Tensor, targets: Tensor, weights: Tensor):
        self.model, self.points, self.targets = model, points, targets
        self.root = weights.sqrt()[:, None]                                   # (n, 1)

    def _set(self, w: Tensor) -> None:
        with torch.no_grad():
            self.model.W3.copy_(w.view_as(self.model.W3))

    def cost(self, w: Tensor) -> tuple[float, Tensor]:
        self._set(w)
        with torch.no_grad():
            residual = (self.model(self.points) - self.targets) * self.root   # (n, d)
        return 0.5 * float(residual.double().square().sum()), residual

    def linearize(self, w: Tensor, residual: Tensor) -> Linearization:
        self._set(w)
        lin = self.model.linearize(self.points)
        rows = self.root.expand_as(residual).reshape(-1).double()
        kernel = lin.kernel().double() * rows[:, None] * rows[None, :]       # J_w J_w^T, (n d, n d)
        kappa = float(kernel.diagonal().mean())
        eye = torch.eye(len(kernel), dtype=kernel.dtype, device=kernel.device)
        r = residual.reshape(-1).double()
        gradient = lin.pullback(residual * self.root).reshape(-1)

        def solve(mu: float) -> tuple[Tensor, int]:
            factor = torch.linalg.cholesky(kernel + max(mu, 1e-12) * max(kappa, 1e-30) * eye)
            dual = torch.cholesky_solve(r[:, None], factor)[:, 0].to(residual.dtype)
            return -lin.pullback(dual.view_as(residual) * self.root).reshape(-1), 0

        return Linearization(gradient, solve)


def fit_output_gauss_newton(model, problem, history: list[dict], prefix: str, *, fallback: Callable) -> bool:
    """Fit the flow `model` (with `linearize`, output weights `W3`) to `problem` (a `ShapeFit`)
    by Gauss-Newton on corresponding points (see the module docstring), or by
    `fallback(model, problem, history, prefix)` (Adam) for a loss without correspondences or
    when Adam's options were given. Returns True if Ctrl-C stopped it (the model then holds the
    best iterate)."""
    opts = problem.opts
    if not problem.loss_cls.correspondence or any(getattr(opts, name) is not None for name in ADAM_OPTIONS):
        return fallback(model, problem, history, prefix)
    x, y, d = problem.x.detach(), problem.y.detach(), problem.x.shape[1]
    keep = farthest_point_sample(x, GN_ROWS // d, opts.seed) if len(x) * d > GN_ROWS else slice(None)
    points, targets = x[keep], y[keep]
    count = len(points)
    weights = points.new_full((count,), 1.0 / count)
    marks = problem.landmarks
    if marks is not None and marks[2] > 0:
        points, targets = torch.cat([points, marks[0].detach()]), torch.cat([targets, marks[1].detach()])
        weights = torch.cat([weights, weights.new_full((len(marks[0]),), marks[2] / len(marks[0]))])
    least_squares = _OutputProblem(model, points, targets, weights)
    iterations = opts.iterations if opts.iterations is not None else GN_ITERATIONS
    label = f"{prefix}{problem.stages[-1].label}"

    with progress_bar(opts.progress, label, iterations) as advance:
        def report(step: Any) -> None:
            squared = step.state.double().square().sum(1)           # weighted residual rows
            row = {"stage": label, "phase": "gauss-newton", "iteration": step.iteration, "total": 2 * step.cost,
                   "data": float(squared[:count].sum())}
            least_squares._set(step.x)
            with torch.no_grad():
                row["energy"] = float(model.energy(points[:count]))
            if len(points) > count:
                row["landmarks"] = float(squared[count:].sum()) / marks[2]
            row.update(accepted=step.accepted, damping=step.damping)
            history.append(row)
            advance(row)

        start = model.W3.detach().reshape(-1).clone()
        # a fit that reaches its data stops at the option `tol` on the RMS residual (normalised units:
        # the shapes' RMS radius is 1); near float rounding few halvings and damping rises are worth trying
        result = minimize_least_squares(least_squares, start, maxiter=iterations, damping=GN_DAMPING, ftol=GN_FTOL,
                                        fatol=0.5 * opts.tol ** 2, max_halvings=GN_HALVINGS,
                                        max_damping_tries=GN_HALVINGS, callback=report)
    least_squares._set(result.x)
    return result.interrupted
