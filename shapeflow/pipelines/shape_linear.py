"""Linear models (rigid, similarity, affine) fitted in closed form: the "procrustes" fitter.

Each stage of the loss's plan (`PointLoss.stages`) alternates two steps on its subsample, as ICP and
CPD do:

* pair the moved source `x: (N, d)` with the target `y: (M, d)`: weighted pairs `(p_k, q_k, w_k)`
  whose weighted squared distances are the stage's loss at fixed pairs;
* move it by the closed-form minimiser of `sum_k w_k |A p_k + t - q_k|^2` over the model's maps
  (`STEPS`, chosen by `closed_form` on the model class): Kabsch (rigid; the determinant fixed to +1,
  so a reflection is never fitted), Umeyama (similarity: rotation and isotropic scale), linear least
  squares (affine).

How a loss pairs (`PAIRINGS`):

* "closest" (`loss="chamfer"`): each moved source point with its closest target point (weight 1/N)
  and each target point with its closest moved source point (1/M): both sums of the loss;
* "corresponding" (`loss="l2"`): point i with point i (1/N); one step is exact;
* "transport" (`loss="sinkhorn"`): soft correspondences, `x_i` with the barycentre
  `sum_j P_ij y_j / sum_j P_ij` of an entropic transport plan `P` (weight `sum_j P_ij`), from a few
  log-domain Sinkhorn iterations (the loss's `reach` makes them unbalanced). Its temperature
  `eps` (kernel `exp(-|x - y|^2 / 2 eps)`) is annealed as CPD anneals its variance: it starts at
  `sum_ij |x_i - y_j|^2 / (N M d)` and is set from the plan's residual after every step,
  `sum_ij P_ij |x_i - y_j|^2 / (d sum P)`, never below the loss's `blur^2`. Starting from a blur of
  the shape's size, the first steps match the shapes' spread rather than nearby points, which
  recovers rotations far beyond ICP's reach.

Landmarks `(source (K, d), target (K, d), weight)` join every step as K more pairs of weight
`weight / K`, as they join the Adam objective. A stage stops after `iterations` steps, or earlier
when the pairs no longer change (closest, corresponding) or, once `eps` is at its floor, when the
map moves by less than `tol`. Losses that are not sums over point pairs (varifold, currents, a new
one) are fitted by the fallback (Adam) instead. Each step appends a history row
(`phase="procrustes"`, `total` = the loss at the pairs before the step: exactly the Chamfer or L2
loss, the transport cost `sum P_ij |x_i - y_j|^2 / 2` for Sinkhorn).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from .._registry import Registry
from ..errors import ShapeflowError
from ..kernels import PointIndex
from ..losses import LOSSES, SinkhornLoss
from ..progress import progress_bar
from ..sampling import farthest_point_sample

__all__ = ["procrustes", "fit_linear", "check_linear", "STEPS", "PAIRINGS", "TransportPairs"]

#: Sinkhorn iterations per step of a transport stage (the potentials carry over between steps)
SINKHORN_ITERATIONS = 3
#: a transport stage pairs at most this many points per shape (a farthest-point subsample): its plan is dense
TRANSPORT_POINTS = 2048


# --- the closed-form steps ------------------------------------------------------------------
def _centred(p: Tensor, q: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    total = w.sum()
    mp, mq = (w @ p) / total, (w @ q) / total
    return p - mp, q - mq, mp, mq


def _rotation_step(p: Tensor, q: Tensor, w: Tensor, scaling: bool) -> tuple[Tensor, Tensor]:
    """Kabsch / Umeyama: the rotation (times the best scale when `scaling`) and translation."""
    P, Q, mp, mq = _centred(p, q, w)
    cross = (Q * w[:, None]).T @ P                                  # (d, d) = sum_k w_k q_k p_k^T
    U, S, Vh = torch.linalg.svd(cross)
    signs = torch.ones_like(S)
    if torch.linalg.det(U @ Vh) < 0:                                # a reflection: flip the weakest axis
        signs[-1] = -1.0
    rotation = (U * signs) @ Vh
    scale = (S * signs).sum() / (w * P.square().sum(1)).sum() if scaling else 1.0
    matrix = scale * rotation
    return matrix, mq - matrix @ mp


def _affine_step(p: Tensor, q: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted linear least squares: `A = (sum w q p^T)(sum w p p^T)^-1`."""
    P, Q, mp, mq = _centred(p, q, w)
    Pw = P * w[:, None]
    matrix = torch.linalg.solve(Pw.T @ P, Pw.T @ Q).T
    return matrix, mq - matrix @ mp


#: closed-form steps by the model's `closed_form`: `(p (K, d), q (K, d), w (K,)) -> (A (d, d), t (d,))`
STEPS: Registry[Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]] = Registry("closed-form step", {
    "rigid": lambda p, q, w: _rotation_step(p, q, w, scaling=False),
    "similarity": lambda p, q, w: _rotation_step(p, q, w, scaling=True),
    "affine": _affine_step,
})


def procrustes(p: Tensor, q: Tensor, weights: Tensor | None = None, kind: str = "rigid") -> tuple[Tensor, Tensor]:
    """The map `x -> A x + t` of kind "rigid", "similarity" or "affine" minimising
    `sum_k w_k |A p_k + t - q_k|^2`: `p, q: (K, d)`, `weights: (K,)` (default 1) ->
    `(A (d, d), t (d,))` in float64. A rigid or similarity `A` is a proper rotation (det +1)."""
    if p.ndim != 2 or p.shape != q.shape:
        raise ShapeflowError(f"procrustes(): p and q must both be (K, d), got {tuple(p.shape)} and {tuple(q.shape)}")
    p, q = p.double(), q.double()
    w = torch.ones(len(p), dtype=p.dtype, device=p.device) if weights is None else weights.double()
    return STEPS.lookup(kind, "procrustes()")(p, q, w)


# --- how a loss pairs the points --------------------------------------------------------------
class _Pairs:
    """One stage's pairing: `(moved (N, d)) -> (p, q, w, data)` with `p` rows of the unmoved
    source (the step fits `A p + t ~ q`), and `converged(change)` after each step."""

    def __init__(self, x: Tensor, y: Tensor, loss: Any):
        self.x, self.y = x, y

    def converged(self, change: float, tol: float) -> bool:
        return change <= tol


class ClosestPairs(_Pairs):
    """Closest points both ways (the Chamfer loss at fixed pairs); converged when no pair changes."""

    def __init__(self, x: Tensor, y: Tensor, loss: Any):
        super().__init__(x, y, loss)
        self.index = PointIndex(y)
        self.previous: tuple[Tensor, Tensor] | None = None
        self.same = False
        n, m = len(x), len(y)
        self.w = torch.cat([x.new_full((n,), 1 / n), x.new_full((m,), 1 / m)])

    def __call__(self, moved: Tensor):
        to_target = self.index.query(moved, 1)[1][:, 0]                  # (N,)
        to_source = PointIndex(moved).query(self.y, 1)[1][:, 0]          # (M,)
        self.same = self.previous is not None and all(
            torch.equal(a, b) for a, b in zip(self.previous, (to_target, to_source)))
        self.previous = (to_target, to_source)
        data = ((moved - self.y[to_target]).square().sum(1).mean()
                + (moved[to_source] - self.y).square().sum(1).mean())
        return (torch.cat([self.x, self.x[to_source]]), torch.cat([self.y[to_target], self.y]), self.w, float(data))

    def converged(self, change: float, tol: float) -> bool:
        return self.same or change <= 1e-12


class CorrespondingPairs(_Pairs):
    """Point i with point i (the L2 loss): fixed pairs, so one step is exact."""

    def __call__(self, moved: Tensor):
        w = self.x.new_full((len(self.x),), 1 / len(self.x))
        return self.x, self.y, w, float((moved - self.y).square().sum(1).mean())

    def converged(self, change: float, tol: float) -> bool:
        return True


class TransportPairs(_Pairs):
    """Barycentres of an entropic transport plan, the temperature annealed as CPD's variance (see
    the module docstring). `loss`: a `SinkhornLoss` (its `blur` and `reach`)."""

    def __init__(self, x: Tensor, y: Tensor, loss: Any):
        super().__init__(x, y, loss)
        self.floor = float(loss.blur) ** 2
        self.rho = None if loss.reach is None else float(loss.reach) ** 2
        n, m = len(x), len(y)
        self.log_a = x.new_full((n,), -math.log(n))
        self.log_b = x.new_full((m,), -math.log(m))
        self.f, self.g = x.new_zeros(n), x.new_zeros(m)
        self.plan: Tensor | None = None
        self.eps: float | None = None

    def __call__(self, moved: Tensor):
        cost = torch.cdist(moved, self.y).square_() / 2                   # (N, M)
        d = moved.shape[1]
        if self.plan is None:
            spread = 2 * float(cost.mean()) / d
        else:      # CPD's variance update: the old plan's residual at the new map
            spread = 2 * float((self.plan * cost).sum() / self.plan.sum()) / d
        self.eps = max(self.floor, spread if self.eps is None else min(spread, self.eps))
        eps = self.eps
        damping = 1.0 if self.rho is None else 1 / (1 + eps / self.rho)
        scaled = cost / -eps                                              # (N, M)
        for _ in range(SINKHORN_ITERATIONS):
            self.f = -eps * damping * torch.logsumexp(scaled + (self.log_b + self.g / eps)[None, :], 1)
            self.g = -eps * damping * torch.logsumexp(scaled + (self.log_a + self.f / eps)[:, None], 0)
        plan = torch.exp(scaled + ((self.f / eps + self.log_a)[:, None] + (self.g / eps + self.log_b)[None, :]))
        self.plan = plan
        mass = plan.sum(1)                                                # (N,)
        barycentres = (plan @ self.y) / mass.clamp_min(1e-300)[:, None]
        return self.x, barycentres, mass, float((plan * cost).sum())

    def converged(self, change: float, tol: float) -> bool:
        return self.eps is not None and self.eps <= self.floor and change <= tol


#: how a stage's loss pairs points (see the module docstring)
PAIRINGS: Registry[type[_Pairs]] = Registry("pairing", {"closest": ClosestPairs, "corresponding": CorrespondingPairs,
                                                         "transport": TransportPairs})


def _pairing(loss: Any) -> str | None:
    """The `PAIRINGS` name for a loss (class or instance), or None when it is not over point pairs."""
    loss_cls = loss if isinstance(loss, type) else type(loss)
    return "transport" if issubclass(loss_cls, SinkhornLoss) else getattr(loss_cls, "pairing", None)


# --- the fitter --------------------------------------------------------------------------------
def fit_linear(model, problem, history: list[dict], prefix: str, *, fallback: Callable) -> bool:
    """Fit the linear `model` (a `Rigid`, `Similarity` or `Affine`) to `problem` (a `ShapeFit`) by
    alternating pairs and closed-form steps through the loss's stages; the model holds the fitted
    map. Falls back to `fallback(model, problem, history, prefix)` (Adam) for a loss that does not
    pair points. Returns True if Ctrl-C stopped it (the model then holds the last completed step)."""
    if any(_pairing(stage.loss) is None for stage in problem.stages):
        return fallback(model, problem, history, prefix)
    step = STEPS.lookup(model.closed_form, "register()")
    opts = problem.opts
    x, y = problem.x.double(), problem.y.double()
    matrix, translation = model.matrix.double(), model.translation.double()
    marks = problem.landmarks
    if marks is not None:
        mark_p, mark_q = marks[0].detach().double(), marks[1].detach().double()
        mark_w = mark_p.new_full((len(mark_p),), marks[2] / len(mark_p))
    interrupted = False
    try:
        for stage in problem.stages:
            xs, ys = _subsample(x, y, stage, opts.seed)
            pairs = PAIRINGS[_pairing(stage.loss)](xs, ys, stage.loss)
            label = f"{prefix}{stage.label}"
            with progress_bar(opts.progress, label, stage.iterations) as advance:
                for iteration in range(stage.iterations):
                    p, q, w, data = pairs(xs @ matrix.T + translation)
                    row = {"stage": label, "phase": "procrustes", "iteration": iteration, "total": data,
                           "data": data, "energy": 0.0}
                    if marks is not None:
                        landmark = float((mark_p @ matrix.T + translation - mark_q).square().sum(1).mean())
                        row["total"] = data + marks[2] * landmark
                        row["landmarks"] = landmark
                        p, q, w = torch.cat([p, mark_p]), torch.cat([q, mark_q]), torch.cat([w, mark_w])
                    history.append(row)
                    advance(row)
                    new_matrix, new_translation = step(p, q, w)
                    change = float(torch.cat([(new_matrix - matrix).flatten(), new_translation - translation]).abs().max())
                    matrix, translation = new_matrix, new_translation
                    if pairs.converged(change, opts.tol):
                        break
    except KeyboardInterrupt:
        interrupted = True
    model.set_matrix(matrix, translation)
    return interrupted


def _subsample(x: Tensor, y: Tensor, stage, seed: int) -> tuple[Tensor, Tensor]:
    """The stage's farthest-point subsamples (every point, in order, for `points=None`), at most
    `TRANSPORT_POINTS` for a dense transport plan."""
    count = stage.points
    if _pairing(stage.loss) == "transport":
        count = min(count or TRANSPORT_POINTS, TRANSPORT_POINTS)
    if count is None:
        return x, y
    return x[farthest_point_sample(x, count, seed)], y[farthest_point_sample(y, count, seed)]


def check_linear(model: str, model_cls, loss: str, loss_cls, given: set[str]) -> None:
    """The closed-form fit takes no step size and no L-BFGS: those options apply to Adam, which
    fits the linear models only for losses that do not pair points (varifold, currents)."""
    if _pairing(loss_cls) is None:
        return
    unused = sorted(given & {"lr", "lbfgs_iterations", "patience"})
    if unused:
        paired = ", ".join(k for k, v in LOSSES.items() if _pairing(v) is not None)
        raise ShapeflowError(f"register(): {', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} to "
                             f"Adam, not to model {model!r} with loss {loss!r}: it is fitted in closed form "
                             f"(losses {paired})")
