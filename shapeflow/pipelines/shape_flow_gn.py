"""Flows fitted by Gauss-Newton in their output weights: the "output-gauss-newton" fitter.

On corresponding points it is plain Gauss-Newton; on soft correspondences (the default
`loss="sinkhorn"` on small shapes) it is EM with a Gauss-Newton M-step (the second part below).

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
  to Adam, send the fit to Adam, as does every loss without correspondences or soft pairs
  (`fallback`).
* At most `GN_ROWS / d` farthest source points (with their partners) and the landmarks enter the
  fit; the fitted map then moves every point. The kernel is dense, so this bounds an iteration's
  cost (about 30 ms at 256 points in 3D, with its damping tries), and a smooth flow is fixed by a
  few hundred points: at 1k points the fit on 256 of them ends at 0.057 % RMSE on all of them.

EM on soft correspondences (`PointLoss.soft_pairs`: `loss="sinkhorn"` when both shapes have at
most `SinkhornLoss.EM_POINTS` = 256 points, or at most `EM_CLEAN_POINTS` = 2048 and about as many
isolated points each, or `em=True`), as CPD fits its Gaussian mixture:

* E-step: every moved source point `x_i` is paired with `x_i + b_i - s_i`, where `b_i` is the
  barycentre of where its mass goes in the entropic transport plan onto the target
  (`losses.sinkhorn.transport_plan`) and `s_i` the same in the plan of the moved source onto
  itself, weighted by its mass (below 1 where an unbalanced plan lets mass go). `b_i - x_i` is
  the debiased Sinkhorn divergence's pull as `loss="sinkhorn"` has it (geomloss's debiasing):
  the blur's shrinkage towards the target's local means is taken out (`s_i - x_i` is that
  shrinkage), and a fit that stops is at a stationary point of the divergence at the final blur.
  (Measured before the M-step took its ridge on the whole map: on a bumpy ellipse, 12
  deformations, 3 fits of 12 ended near exact without it, 6 with it.) The temperature
  `eps = blur^2` (the plan's kernel is `exp(-|x - y|^2 / 2 eps)`) starts at CPD's first variance
  (the mean squared distance of all pairs, per dimension) and follows CPD's update, the plan's
  spread about the new map (never rising), down to the loss's `blur^2`; the reach is `max(reach, EM_REACH_BLURS * blur)`:
  balanced while hot, letting mass go once cooled. While hot, isolated target points (outliers,
  `sampling.isolated_points`) stay out of the plan, as out of the Adam stages' subsamples.
* M-step, CPD's: the output weights minimising the weighted squared distance of the rows to their
  pairs plus `lambda |W3|^2`, to first order (`_SoftStep`), with `lambda = EM_RIDGE sigma^2`
  relative to the kernel's mean diagonal: a ridge on the whole map, so two different samplings
  of one shape, whose pairs stay noisy, give a smooth map rather than one chasing the noise.
  `sigma^2` is CPD's variance (the plan's spread about the map, never rising, not floored), so
  the ridge fades as a pair of the same points is matched exactly.
* It stops once cooled when no point moved by more than `EM_TOL` (or the option `tol`).
* Levels (`_levels`), when the source has more points than the M-step's rows (`EM_ROWS / d`, 288 in
  3D): the hot steps run on the first 128, then 256, farthest source points (the plans' sources;
  the M-step's rows are the first `EM_COARSE_ROWS` of them) and as many farthest target points,
  each subsample weighted by its Voronoi
  cell's share of its shape (`_cell_weights`: an outlier drawn into it keeps its own 1/N), while
  the blur is at least `EM_COARSE` times the level's spacing and the plan keeps cooling on it; then
  every point enters the plans, the rows become all `EM_ROWS / d`, and the temperature drops by
  `EM_JUMP` (at most to half the last plan's blur, `EM_SCALING`, so the warm plan needs no
  annealing). The potentials carry over to the new points (`losses.sinkhorn.target_potential`).
  1k surface points: 1.16 s at 0.057 % RMSE -> 0.39 s at 0.050 % with this, 288 rows and the
  faster plan. `iterations` (default `EM_ITERATIONS`) bounds each level.
* Once cooled on every point (at the final blur, or the temperature no longer falling), shapes of
  at least `EM_SUPPORT_FROM` points have their plans computed on each row's `EM_SUPPORT` nearest
  candidates (`_Candidates`, `transport_plan(support=)`), wherever the kernel is negligible beyond
  them; elsewhere, and below that size, the plans are dense.
* Once cooled, isolated target points within `EM_FAR` source spacings of the fitted source rejoin
  the plan (a sparse tip the map has reached), the others stay out (`_rejoining`).
* A fit still running `EM_CHECK_AFTER` steps after cooling on every point checks its min det J at its rows
  every `EM_CHECK_EVERY` steps and is declined at once below `EM_SQUEEZE` (below).
* The fit is declined when it compresses the source by more than 2x at one of its points
  (`EM_SQUEEZE`: min det J < 0.5), as when a part missing from the target was crushed into it
  (a smooth crush that no fold reveals): the Adam stages then fit from the start, and the fold
  refit of `register` follows as for them. This also declines some good fits that compress
  between sparse samples (the ant bent by 2 rad at 120 and 250 points ends at Adam's result).

Measured (`benchmarks/results/flow_em.md`, `shapes_resampled.md`; one thread): the README's
paragraph "Small shapes, soft correspondences: EM" has the numbers, and where it looks worse.
"""
from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Callable

import torch
from torch import Tensor

from .. import metrics
from .._threads import torch_threads
from ..errors import ShapeflowError
from ..progress import progress_bar
from ..kernels.neighbors import PointIndex, mean_neighbor_distances, nearest_neighbors
from ..sampling import farthest_point_sample, isolated_points
from ..solvers import Linearization, minimize_least_squares
from ..losses.sinkhorn import target_potential, transport_plan

__all__ = ["fit_output_gauss_newton", "GN_ROWS", "GN_ITERATIONS", "GN_DAMPING", "EM_ITERATIONS", "EM_RIDGE"]

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
#: EM iterations at most when `register` gets no `iterations`
EM_ITERATIONS = 40
#: the M-step's ridge on W3, relative to the kernel's mean diagonal, per unit of CPD's variance
#: (`lambda sigma^2`, `_SoftStep`). Medians over the fish (8 deformations, same points) and two
#: samplings of the fish / of 200 cortex points (3 seeds, `benchmarks/shapes_resampled.py`), % of
#: the diagonal: 3: 0.016 / 2.00 / 5.05; 10: 0.024 / 1.58 / 4.67; 30: 0.036 / 1.68 / 3.94 (the
#: Adam stages: 0.114 / 1.76 / 5.05; pycpd 0.26 / 1.52 / 4.14). A ridge on the step instead (the
#: Levenberg-Marquardt damping) let the map chase the noise of two samplings: 3.4 / 6.3.
EM_RIDGE = 30.0
#: the EM fit is declined (the Adam stages fit instead) when it compresses the source by more than
#: this factor somewhere (min det J at its points): a part missing from the target crushed into it
EM_SQUEEZE = 0.5
#: the plan's reach is at least this many times its current blur: balanced while hot, letting mass
#: go once cooled (a fixed reach of 0.15 from the start left the fish at 6.7 %, 3 blurs at 1.0 %;
#: 4 and 6 0.05 %, 4 the better on outliers)
EM_REACH_BLURS = 4.0
#: Sinkhorn sweeps per E-step after the epsilon-scaling from the last plan's blur (its target
#: potential carried over): 3 and 200 ended alike on the fish and the 1k surface
EM_SWEEPS = 3
#: the plan has cooled when a step lowers its temperature by less than this factor
EM_PLATEAU = 0.99
#: once cooled, the fit stops when no point moved by more than this (or the option `tol` if larger)
EM_TOL = 1e-3
#: M-steps per linearisation of the flow (a chord step in between): 1, 3, 6 took the fish 0.106,
#: 0.069, 0.060 s at 0.053-0.060 % RMSE
EM_RELINEARIZE = 4
#: a coarse level of the EM fit (`_levels`) is used while the blur is at least this many times the
#: mean spacing of its points (1k surface points, 0.5: 0.49 s at 0.058 % RMSE; 0.35: as close, no
#: faster; 0.25: the coarse plans' own floor, near 0.3 spacings, was never reached)
EM_COARSE = 0.5
#: a coarse level gives way to the next when a step lowers the temperature by less than this factor
EM_LEVEL_PLATEAU = 0.95
#: the coarse levels' sizes (farthest points first, both shapes): below the M-step's rows
EM_LEVELS = (128, 256)
#: the coarse levels' M-step rows: at most this many of their points (the 256-point level's step on
#: its first 128: the same steps and RMSE on the benchmark pairs, 1k points 50 ms faster: a kernel and
#: Cholesky factor of 384 rows, not 768; the map's detail comes at the finest level)
EM_COARSE_ROWS = 128
#: once cooled, isolated target points within this many source spacings of the fitted source rejoin
#: the plan: 5 % outliers around 120 airplane points, RMSE 1.71 / 1.70 (none) -> 1.58 / 1.62 (3) ->
#: 1.58 / 1.70 (6); the 486-point ant bent by 0.5 / 1 rad (its leg tips are isolated, out of the hot
#: plan, squeezed towards the legs): 0.40 / 0.43 (3) -> 0.023 / 0.044 (6; the Adam stages 0.065)
EM_FAR = 6.0
#: the EM fit's M-step rows (points times dimension), farthest points first: 1k surface points,
#: 768 rows 0.057 % RMSE, 864 0.050 %, 960 0.047 %, 1152 0.042 % (0.49, 0.49, 0.50, 0.7 s)
EM_ROWS = 864
#: on reaching every point (the finest level) the temperature drops by this factor (the blur by
#: its square root): the coarse levels' map is already close there. 1k points: 28 -> 24 steps,
#: 0.49 -> 0.39 s at the same RMSE (0.25: alike; 0: straight to the final blur, no faster)
EM_JUMP = 0.3
#: `transport_plan`'s epsilon-scaling factor (its default): a warm plan anneals, in the log domain on
#: every pair, from its start's blur when that is above blur / EM_SCALING; the jump stops short of it
EM_SCALING = 0.5
#: once cooled on every point, the plans are computed on each source point's `EM_SUPPORT` nearest
#: candidates (`_Supports`) when the shapes have at least `EM_SUPPORT_FROM` points: N k entries
#: instead of N M, used only where the kernel is negligible beyond them (`transport_plan`); a
#: 2k plan 22-34 -> 5-11 ms, 4k 160 -> 10-30 ms
EM_SUPPORT = 64
EM_SUPPORT_FROM = 1024
#: a fit still running after this many cooled steps on every point checks its min det J at its rows
#: (and then every `EM_CHECK_EVERY` steps): below `EM_SQUEEZE` it is declined at once. Fits that
#: converge stop within about 5 cooled steps; a crushed missing part never settles (the 1,335-point
#: airplane with 30 % of its target cropped ran 40 steps there: 4.8 s in all, the Adam stages alone
#: 3.0 s; 4.0 s checking all points after 16 steps)
EM_CHECK_AFTER = 8
EM_CHECK_EVERY = 8


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
    by Gauss-Newton on corresponding points, or by EM on the soft pairs its loss offers
    (`PointLoss.soft_pairs`; see the module docstring), or by `fallback(model, problem, history,
    prefix)` (Adam) for any other loss, when Adam's options were given, or when the EM fit is
    declined. Returns True if Ctrl-C stopped it (the model then holds the best iterate)."""
    opts = problem.opts
    adam = [name for name in ADAM_OPTIONS if getattr(opts, name) is not None]
    if adam and getattr(problem.loss_options, "em", None) is True:
        raise ShapeflowError(f"register(): {', '.join(adam)} {'applies' if len(adam) == 1 else 'apply'} to Adam, "
                             f"which em=True replaces by EM on the transport plan")
    if adam:
        return fallback(model, problem, history, prefix)
    if not problem.loss_cls.correspondence:
        soft = problem.loss_cls.soft_pairs(problem.loss_options, problem.x.detach(), problem.y.detach())
        if soft is None:
            return fallback(model, problem, history, prefix)
        start = copy.deepcopy(model.state_dict())
        # one thread: the dense plans' matrix-vector products sum in another order on two, and the
        # fit must repeat bit for bit whatever `threads` (the default runs problems this small on one)
        with torch_threads(1):
            interrupted, squeezed = _fit_soft_pairs(model, problem, soft, history, prefix)
        if interrupted:
            return True
        if squeezed is None:
            squeezed = metrics.min_jacobian_determinant(model, problem.x, per_axis=0)
        if squeezed >= EM_SQUEEZE:
            if history:     # the fitted map's min det J at the source's points (`register`'s fold check reads it)
                history[-1]["min_jacobian_det"] = squeezed
            return False
        # a part of the source crushed into the target, as when the target lacks it: the Adam
        # stages fit instead, from the start (and the fold refit of `register` follows, as for them)
        history.append({"stage": f"{prefix}transport ({problem.loss_cls.name})", "phase": "em", "declined": True,
                        "min_jacobian_det": squeezed})
        model.load_state_dict(start)
        return fallback(model, problem, history, prefix)
    x, y, d = problem.x.detach(), problem.y.detach(), problem.x.shape[1]
    keep = _rows(x, d, opts.seed)
    points, targets = x[keep], y[keep]
    count = len(points)
    weights = points.new_full((count,), 1.0 / count)
    marks = problem.landmarks
    if marks is not None and marks[2] > 0:
        points = torch.cat([points, marks[0].detach()])
        targets, weights = _with_landmarks(targets, weights, marks)
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


def _with_landmarks(targets: Tensor, weights: Tensor, marks) -> tuple[Tensor, Tensor]:
    """`targets: (n, d)` and `weights: (n,)` with the K landmark rows after them: their targets
    `marks[1]`, each of weight `marks[2] / K` (the landmark term of the Adam objective, halved)."""
    count = len(marks[0])
    return (torch.cat([targets, marks[1].detach()]),
            torch.cat([weights, weights.new_full((count,), marks[2] / count)]))


def _rows(x: Tensor, d: int, seed: int, rows: int = GN_ROWS):
    """The source points of the least squares: at most `rows / d`, farthest first."""
    return farthest_point_sample(x, rows // d, seed) if len(x) * d > rows else slice(None)


class _SoftStep:
    """The M-step of the EM fit, CPD's: the output weights `W3` minimising
    `sum_i w_i |phi(p_i) - t_i|^2 + lambda |W3|^2` over the rows `p` (the source's rows, then the
    landmarks; `points: (n, d)`), to first order: `W3 <- J^T (K_w + lambda I)^-1 (t - phi + J W3)`
    with the weighted kernel `K_w = R J J^T R`, `R = diag(sqrt(w))`, and `lambda` = `ridge` times
    its mean diagonal. The ridge is on the whole map, not on the step, so the fit stays smooth when
    the pairs are noisy (two samplings of one shape). The linearisation (`ResNetFlow.linearize`)
    is reused for `EM_RELINEARIZE` steps (a chord step: the flow moves little between them), and
    is redone at once when a step did not lower the objective, which the step then halves.
    `forward() -> (all moved points, rows)` evaluates the map after a step; the E-step reuses it."""

    def __init__(self, model, points: Tensor, forward: Callable[[], tuple[Tensor, Tensor]]):
        self.model, self.points, self.forward = model, points, forward
        self.lin, self.kernel, self.age = None, None, 0

    def __call__(self, rows: Tensor, targets: Tensor, weights: Tensor, ridge: float) -> tuple[bool, Tensor, Tensor]:
        """`rows: (n, d)` at the current map -> (whether a step was taken, `forward()` after it)."""
        if self.lin is None or self.age >= EM_RELINEARIZE:
            self.lin = self.model.linearize(self.points)
            self.kernel, self.age = self.lin.kernel().float(), 0
        self.age += 1
        weights = weights.double()
        d = rows.shape[1]
        per_row = weights.repeat_interleave(d)                                   # (n d,)
        lam = max(ridge, 1e-12) * max(float((self.kernel.diagonal().double() * per_row).mean()), 1e-30)
        w3 = self.model.W3.detach()
        residual = rows.double() - targets.double()                               # (n, d)
        before = float((residual.square().sum(1) * weights).sum()) + lam * float(w3.double().square().sum())
        # (R K R + lam I) R^-1 z = R offset with R = diag(sqrt(w)) is (K + lam W^-1) z = offset:
        # the weights only on the diagonal (a row of weight 0 drops out: its z is 0)
        offset = (residual - self.lin.push(w3).double()).reshape(-1)              # phi - t - J W3
        # the system is the kernel with the ridge added to its diagonal in place (restored below: no
        # copy of the matrix); in float32 (the kernel's precision; half the time of float64 at 768
        # rows), with one refinement step; two triangular solves (torch's cholesky_solve copies the factor)
        system, diagonal = self.kernel, self.kernel.diagonal().clone()
        system.diagonal().add_((lam / per_row.clamp_min(1e-30)).float())
        factor = torch.linalg.cholesky(system)
        offset = offset.float()[:, None]

        def solve(b: Tensor) -> Tensor:
            half = torch.linalg.solve_triangular(factor, b, upper=False)
            return torch.linalg.solve_triangular(factor.mT, half, upper=True)

        dual = solve(offset)
        dual = (dual + solve(offset - system @ dual))[:, 0].view_as(residual)
        system.diagonal().copy_(diagonal)
        step = -self.lin.pullback(dual.to(rows.dtype)) - w3                      # to the minimiser, from W3
        with torch.no_grad():
            for _ in range(GN_HALVINGS + 1):
                self.model.W3.add_(step)
                moved, after = self.forward()
                value = float(((after.double() - targets.double()).square().sum(1) * weights).sum())
                if value + lam * float(self.model.W3.double().square().sum()) <= before:
                    return True, moved, after
                self.model.W3.sub_(step)
                step = step / 2
                self.age = EM_RELINEARIZE        # a stale linearisation: redo it next time
            return (False, *self.forward())


class _Level:
    """One resolution of the EM fit: the plans' source points `x[source]`, the M-step's rows
    `x[source][rows]` (`rows is source`: all of them; with the landmarks), the plans' target points
    (`hot` while the plan is hot, `cold` once cooled), used while the blur is at least `min_blur`."""

    def __init__(self, model, x: Tensor, rows, source, hot: Tensor, cold: Tensor, min_blur: float, marks,
                 a: Tensor | None = None, b: Tensor | None = None):
        self.rows, self.source, self.hot, self.cold, self.min_blur = rows, source, hot, cold, min_blur
        self.a, self.b = a, b
        self.model, self.x, self.marks = model, x, marks
        points = x[source] if rows is source else x[source][rows]
        points = points if marks is None else torch.cat([points, marks])
        self.m_step = _SoftStep(model, points, self.forward)

    def forward(self) -> tuple[Tensor, Tensor]:
        """The plans' source points moved by the map, and the rows of the M-step (with the landmarks)."""
        with torch.no_grad():
            moved = self.model(self.x[self.source])
            rows = moved if self.rows is self.source else moved[self.rows]
            return moved, rows if self.marks is None else torch.cat([rows, self.model(self.marks)])


class _Candidates:
    """Each plan row's candidate points in `points: (M, d)` for `transport_plan(support=)`: the `k`
    nearest (from `EM_SUPPORT`), queried at the rows' positions when first asked and again after a
    plan on stale candidates came back dense; fresh candidates that gave a dense plan double `k`
    (up to a 16th of the points: then the plans stay dense; at 2k points and k = 256 the gathers
    took 40-60 ms a plan against the dense plan's 22-37 ms). `at_rest`: the rows are `points`
    themselves, found once (a source's plan onto itself: the map is smooth)."""

    def __init__(self, points: Tensor, at_rest: bool = False):
        self.points, self.at_rest, self.k = points, at_rest, EM_SUPPORT
        self.index, self.support, self.fresh = None, None, False
        self.off = len(points) < EM_SUPPORT_FROM

    def __call__(self, rows: Tensor) -> Tensor | None:
        """`(N, k)` int64 candidates for the rows at `rows: (N, d)`, or None (a dense plan)."""
        if self.off:
            return None
        if self.support is None:
            if self.index is None:
                self.index = PointIndex(self.points)
            self.support = self.index.query(self.points if self.at_rest else rows, self.k)[1]
            self.fresh = True
        return self.support

    def used(self, plan) -> None:
        """After the plan given these candidates: keep them, or find them again (more when fresh)."""
        if self.support is None or plan.sparse:
            self.fresh = False
            return
        if self.fresh:
            self.k *= 2
            self.off = self.k > len(self.points) // 16
        self.support = None


def _cell_weights(points: Tensor, sample: Tensor) -> Tensor:
    """The share of `points: (N, d)` nearest to each of `sample: (K, d)` -> `(K,)`, summing to 1: the
    sample as a quantisation of the points' measure (an outlier drawn into it keeps its own 1/N)."""
    counts = torch.bincount(nearest_neighbors(points, sample), minlength=len(sample)).to(points.dtype)
    return counts / counts.sum()


def _rejoining(y: Tensor, lonely: Tensor, moved: Tensor, x: Tensor) -> Tensor:
    """Which target points `y: (M, d)` the cooled plan takes -> `(M,)` bool: all but the isolated
    ones (`lonely: (M,)`) farther than `EM_FAR` times the source's mean nearest-neighbour spacing
    (`x: (N, d)`) from every moved source point (`moved: (N, d)`): an outlier off the shape stays
    out, a sparse tip the map has reached comes back."""
    spacing = float(mean_neighbor_distances(x, 1).mean())
    near = torch.cdist(y[lonely], moved).min(1).values <= EM_FAR * spacing
    taken = ~lonely
    taken[lonely.nonzero()[:, 0][near]] = True
    return taken


def _reach(loss, blur: float) -> float | None:
    """The plan's reach at `blur`: the loss's, or `EM_REACH_BLURS` blurs if larger (None: balanced)."""
    return None if loss.reach is None else max(float(loss.reach), EM_REACH_BLURS * blur)


def _levels(model, x: Tensor, y_hot: Tensor, y: Tensor, keep, marks, seed: int) -> list[_Level]:
    """The EM fit's resolutions, coarsest first: the finest has the rows `keep` and every point in
    its plans; below it, for each count of `EM_LEVELS` under the rows' number, the first `count` of
    them (farthest points first) in the plans and the first `EM_COARSE_ROWS` of those in the M-step,
    with as many farthest target points, in use while the blur is at least `EM_COARSE` times their
    mean spacing."""
    finest = _Level(model, x, keep, slice(None), y_hot, y, 0.0, marks)
    if isinstance(keep, slice):
        return [finest]
    levels = []
    for count in EM_LEVELS:
        if count > len(keep):
            continue
        source = keep[:count]
        rows = source if count <= EM_COARSE_ROWS else slice(0, EM_COARSE_ROWS)     # of `source`
        targets = y_hot[farthest_point_sample(y_hot, min(len(y_hot), count), seed)]
        spacing = float(mean_neighbor_distances(x[source], 1).mean())
        levels.append(_Level(model, x, rows, source, targets, targets, EM_COARSE * spacing, marks,
                             _cell_weights(x, x[source]), _cell_weights(y_hot, targets)))
    # a level whose blur a coarser one already covers is never used
    return [level for k, level in enumerate(levels) if all(level.min_blur < c.min_blur for c in levels[:k])] + [finest]


def _fit_soft_pairs(model, problem, loss, history: list[dict], prefix: str) -> tuple[bool, float | None]:
    """EM on soft correspondences with Gauss-Newton M-steps (see the module docstring). `loss`:
    what `PointLoss.soft_pairs` returned (its `blur` and `reach`). Returns whether Ctrl-C stopped
    it (the model then holds the last completed step), and the map's min det J at the source's
    points when a check during the fit (`EM_CHECK_AFTER`) found it below `EM_SQUEEZE` (the fit then
    stopped there), else None."""
    opts = problem.opts
    x, y, d = problem.x.detach(), problem.y.detach(), problem.x.shape[1]
    keep = _rows(x, d, opts.seed, EM_ROWS)
    if not isinstance(keep, slice):
        keep = torch.as_tensor(keep)
    marks = problem.landmarks
    weighted_marks = marks is not None and marks[2] > 0
    iterations = opts.iterations if opts.iterations is not None else EM_ITERATIONS
    label = f"{prefix}transport ({problem.loss_cls.name})"
    floor = float(loss.blur) ** 2
    # while the plan is hot, isolated target points (outliers) stay out of it, as out of the Adam
    # stages' subsamples; once cooled, every point is in, and the reach lets far ones go
    lonely = isolated_points(y)
    y_hot = y[~lonely] if int((~lonely).sum()) >= max(d + 1, len(y) // 2) else y
    levels = _levels(model, x, y_hot, y, keep, marks[0].detach() if weighted_marks else None, opts.seed)
    interrupted, last = False, model.W3.detach().clone()
    with progress_bar(opts.progress, label, iterations) as advance:
        try:
            # CPD's first variance: the mean squared distance of all pairs, per dimension
            with torch.no_grad():
                sigma2 = float(torch.cdist(model(x), y).square().mean()) / d
            eps = max(sigma2, floor)
            level, start, own_start, old, plateau, steps = None, None, None, None, False, 0
            cold_target, settled = None, 0          # settled: the steps on every point once cooled
            onto_target, onto_itself, cooled = None, _Candidates(x, at_rest=True), False
            for iteration in itertools.count():        # at most `iterations` on each level
                if steps >= iterations and level is levels[-1]:
                    break
                # the next finer level once the blur is below this one's, or the plan stopped cooling on it
                index = 0 if level is None else levels.index(level) + (
                    (plateau or steps >= iterations) and level is not levels[-1])
                now = next(lv for lv in levels[index:] if math.sqrt(eps) >= lv.min_blur)
                if now is not level:
                    moved, rows = now.forward()
                    if level is not None:        # the potentials carried over to the new points (at their blur)
                        reach = _reach(loss, start[2])
                        start = (None, target_potential(old, start[0], now.cold if eps <= floor else now.hot,
                                                        start[2], reach, level.a), start[2])
                        own_start = (None, target_potential(old, own_start[0], moved, own_start[2], reach, level.a),
                                     own_start[2])
                        if now is levels[-1]:
                            # at most one epsilon-scaling factor below the last plan's blur: the warm
                            # plan needs no annealing (its log-domain schedule on every point took
                            # 1.4 s a plan at 4k when the drop went past it)
                            eps = max(floor, EM_JUMP * eps, (1 + 1e-6) * (EM_SCALING * start[2]) ** 2)
                            sigma2 = min(sigma2, eps)
                    level, steps, cooled = now, 0, False
                blur = math.sqrt(eps)
                reach = _reach(loss, blur)
                steps += 1
                target = level.cold if eps <= floor else level.hot
                if eps <= floor and level is levels[-1] and bool(lonely.any()):
                    if cold_target is None:         # fixed once cooled, so the potentials carry over
                        cold_target = y[_rejoining(y, lonely, moved, x)]
                    target = cold_target
                sparse = cooled and level is levels[-1]         # cooled on every point: on candidates
                if sparse and (onto_target is None or onto_target.points is not target):
                    onto_target = _Candidates(target)
                plan = transport_plan(moved, target, blur, reach, start=start, max_sweeps=EM_SWEEPS, a=level.a,
                                      b=level.b, support=onto_target(moved) if sparse else None)
                own = transport_plan(moved, moved, blur, reach, start=own_start, max_sweeps=EM_SWEEPS, a=level.a,
                                     b=level.a, support=onto_itself(moved) if sparse else None)
                if sparse:
                    onto_target.used(plan)
                    onto_itself.used(own)
                start, own_start, old = plan.potentials, own.potentials, moved
                # debiased: less the shrinkage of the source onto itself
                pick = (lambda t: t) if level.rows is level.source else (lambda t: t[level.rows])
                targets = pick(plan.barycentres) - pick(own.barycentres) + pick(moved)
                mass = plan.mass if level.a is None else plan.mass * level.a      # each row's share of the mass
                weights = pick(mass)
                weights = weights / weights.sum().clamp_min(1e-30)
                if weighted_marks:
                    targets, weights = _with_landmarks(targets, weights, marks)
                stepped, new, rows = level.m_step(rows, targets, weights, EM_RIDGE * sigma2)
                last = model.W3.detach().clone()
                change = float((new - moved).abs().max())
                moved = new
                # CPD's variance update: the plan's spread about the new map, never rising
                spread = float((mass * ((moved - plan.barycentres).square().sum(1) + plan.spread)).sum()
                               / (d * mass.sum().clamp_min(1e-30)))
                sigma2 = min(spread, sigma2)
                previous, eps = eps, max(sigma2, floor)
                plateau = eps > (EM_PLATEAU if level is levels[-1] else EM_LEVEL_PLATEAU) * previous
                cooled = eps <= floor or plateau
                row = {"stage": label, "phase": "em", "iteration": iteration, "total": plan.cost, "data": plan.cost,
                       "temperature": previous, "sweeps": plan.sweeps, "change": change, "points": len(moved)}
                history.append(row)
                advance(row)
                if cooled and stepped and change <= max(opts.tol, EM_TOL) and level is levels[-1]:
                    break
                settled += bool(cooled and level is levels[-1])
                if settled >= EM_CHECK_AFTER and (settled - EM_CHECK_AFTER) % EM_CHECK_EVERY == 0:
                    # a fit this long may be crushing a part the target lacks: decline it now, not at the end
                    squeezed = metrics.min_jacobian_determinant(model, x[keep], per_axis=0)    # the rows: 3x cheaper
                    if squeezed < EM_SQUEEZE:
                        return False, squeezed
        except KeyboardInterrupt:
            interrupted = True
            with torch.no_grad():
                model.W3.copy_(last)
    return interrupted, None
