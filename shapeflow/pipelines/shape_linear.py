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
  and each target point with its closest moved source point (1/M): both sums of the loss (or one,
  by its `direction`), each pair's weight then multiplied by the loss's robust `PairWeights`
  (trim, reach, outliers);
* "corresponding" (`loss="l2"`): point i with point i (1/N); one step is exact;
* "transport" (`loss="sinkhorn"`): soft correspondences, `x_i` with the barycentre
  `sum_j P_ij y_j / sum_j P_ij` of an entropic transport plan `P` (weight `sum_j P_ij`), from a few
  stabilised Sinkhorn iterations per step (the loss's `reach` makes them unbalanced). Its
  temperature `eps` (kernel `exp(-|x - y|^2 / 2 eps)`) is annealed as CPD anneals its variance: it
  starts at `sum_ij |x_i - y_j|^2 / (N M d)` and is set from the plan's residual after every step,
  `sum_ij P_ij |x_i - y_j|^2 / (d sum P)`, never rising nor going below the loss's `blur^2`; it
  has cooled at that floor or where the residual stops falling (two samples of one surface keep a
  gap between their points). The first steps, at a blur of the shape's size, match the shapes'
  spread rather than nearby points. With a `reach` the plan is unbalanced, its reach annealed as
  `max(reach, REACH_BLURS * sqrt(eps))`: balanced while hot, letting mass go once cooled.

The first stage of a fit, soft or closest pairs, runs at once (as a batch) from the current map and
from every proper rotation taking the source's principal axes to the target's (`starts`: 3 maps in
2D, 5 in 3D); when one of them has cooled (soft pairs) or after `CLOSEST_SETTLE` steps (closest
pairs) the one closest to the target (the stage's Chamfer loss; the symmetric Chamfer for soft
pairs) goes on alone. Together they recover turns far beyond a local fit's reach (60 to 180 degrees).

Landmarks `(source (K, d), target (K, d), weight)` join every step as K more pairs of weight
`weight / K`, as they join the Adam objective. A stage stops after `iterations` steps, or earlier
when the pairs no longer change (closest, corresponding) or, once cooled, when the map moves by
less than `tol` (at least `COARSE_TOL` for a stage a finer one follows). Losses that are not sums
over point pairs (varifold, currents, a new one) are fitted by the fallback (Adam) instead. Each
step appends a history row (`phase="procrustes"`, `total` = the loss at the pairs before the step:
exactly the Chamfer or L2 loss, the transport cost `sum P_ij |x_i - y_j|^2 / 2` for Sinkhorn, of
the best start).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .._registry import Registry
from ..errors import ShapeflowError
from ..kernels import PointIndex, fast_exp
from ..losses import LOSSES, ChamferLoss, chamfer_loss
from ..losses.points import PairWeights, bounding_volume
from ..progress import progress_bar
from ..sampling import farthest_point_sample

__all__ = ["procrustes", "fit_linear", "check_linear", "starts", "STEPS", "PAIRINGS", "TransportPairs"]

#: Sinkhorn iterations per step of a transport stage (the potentials carry over between steps)
SINKHORN_ITERATIONS = 3
#: the tolerance on the map's change of a stage that a finer one follows (normalised units: the
#: shapes' RMS radius is 1); the last stage stops at the option `tol`
COARSE_TOL = 1e-3
#: the temperature has stopped falling when a step lowers it by less than this factor
PLATEAU = 0.99
#: a transport stage pairs at most this many points per shape (a farthest-point subsample): its plan is dense
TRANSPORT_POINTS = 2048
#: a transport stage's reach is at least this many times its current blur `sqrt(eps)` (annealed with it)
REACH_BLURS = 3.0
#: a closest-point stage with several starts keeps the best one after this many steps
CLOSEST_SETTLE = 10


# --- the closed-form steps (batched: B maps at once) ----------------------------------------------
def _centred(p: Tensor, q: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`p`, `q` less their weighted means `(B, 1, d)`, and the means."""
    weights = (w / w.sum(-1, keepdim=True))[:, None, :]                      # (B, 1, K)
    mp, mq = weights @ p, weights @ q                                       # (B, 1, d)
    return p - mp, q - mq, mp, mq


def _rotation_step(p: Tensor, q: Tensor, w: Tensor, scaling: bool) -> tuple[Tensor, Tensor]:
    """Kabsch / Umeyama: the rotations (times the best scales when `scaling`) and translations."""
    P, Q, mp, mq = _centred(p, q, w)
    Pw = P * w[..., None]
    cross = Q.transpose(1, 2) @ Pw                                           # (B, d, d) = sum_k w_k q_k p_k^T
    U, S, Vh = torch.linalg.svd(cross)
    signs = torch.ones_like(S)
    signs[:, -1] = torch.where(torch.linalg.det(U @ Vh) < 0, -1.0, 1.0)     # no reflection: flip the weakest axis
    matrix = (U * signs[:, None, :]) @ Vh
    if scaling:
        matrix = matrix * ((S * signs).sum(-1) / (Pw * P).sum((1, 2)))[:, None, None]
    return matrix, (mq - mp @ matrix.transpose(1, 2))[:, 0]


def _affine_step(p: Tensor, q: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Weighted linear least squares: `A = (sum w q p^T)(sum w p p^T)^-1`."""
    P, Q, mp, mq = _centred(p, q, w)
    Pw = P * w[..., None]
    matrix = torch.linalg.solve(Pw.transpose(1, 2) @ P, Pw.transpose(1, 2) @ Q).transpose(1, 2)
    return matrix, (mq - mp @ matrix.transpose(1, 2))[:, 0]


#: closed-form steps by the model's `closed_form`:
#: `(p (B, K, d), q (B, K, d), w (B, K)) -> (A (B, d, d), t (B, d))`
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
    matrix, translation = STEPS.lookup(kind, "procrustes()")(p[None], q[None], w[None])
    return matrix[0], translation[0]


# --- how a loss pairs the points --------------------------------------------------------------
class _Pairs:
    """One stage's pairing for B maps at once: `(moved (B, N, d)) -> (p, q, w, data)`, `p, q:
    (B, K, d)` with `p` rows of the unmoved source (the step fits `A p + t ~ q`), `w: (B, K)`,
    `data: (B,)` the loss at these pairs; `converged(change (B,), tol) -> (B,) bool` after each step."""

    def __init__(self, x: Tensor, y: Tensor, loss: Any):
        self.x, self.y = x, y

    def converged(self, change: Tensor, tol: float) -> Tensor:
        return change <= tol

    def settled(self) -> bool:
        """Whether the starts have run long enough to choose one."""
        return True

    def select(self, index: int) -> None:
        """Keep the state of start `index` only."""


class ClosestPairs(_Pairs):
    """Closest points both ways (the Chamfer loss at fixed pairs), or one way (`direction`), each
    direction's pairs weighted by the loss's `PairWeights` (trim, reach, outliers); converged
    when no pair changes."""

    def __init__(self, x: Tensor, y: Tensor, loss: Any):
        super().__init__(x, y, loss)
        self.index = PointIndex(y)
        self.previous: list[Tensor] | None = None
        self.same: Tensor | None = None
        self.sides = getattr(loss, "sides", (True, True))
        self.robust = getattr(loss, "weights", PairWeights())
        self.volume = bounding_volume(y)

    def _weighted(self, squared: Tensor) -> tuple[Tensor, Tensor]:
        """One direction's pair weights `(B, K)` and its loss `(B,)` at these pairs."""
        base = squared.new_full(squared.shape[-1:], 1 / squared.shape[-1])
        weights, constant = self.robust(squared, base, self.volume, self.x.shape[1])
        return weights, (weights * squared).sum(-1) + constant

    def __call__(self, moved: Tensor):
        b = len(moved)
        batch = torch.arange(b)[:, None]
        ps, qs, ws, pairs = [], [], [], []
        data = moved.new_zeros(b)
        if self.sides[0]:
            to_target = torch.stack([self.index.query(one, 1)[1][:, 0] for one in moved])            # (B, N)
            weights, value = self._weighted((moved - self.y[to_target]).square().sum(-1))
            ps.append(self.x.expand(b, -1, -1)), qs.append(self.y[to_target]), ws.append(weights)
            pairs.append(to_target)
            data = data + value
        if self.sides[1]:
            to_source = torch.stack([PointIndex(one).query(self.y, 1)[1][:, 0] for one in moved])    # (B, M)
            weights, value = self._weighted((moved[batch, to_source] - self.y).square().sum(-1))
            ps.append(self.x[to_source]), qs.append(self.y.expand(b, -1, -1)), ws.append(weights)
            pairs.append(to_source)
            data = data + value
        pairs = torch.cat(pairs, 1)
        self.same = (pairs == self.previous).all(1) if self.previous is not None else torch.zeros(b, dtype=torch.bool)
        self.previous = pairs
        return torch.cat(ps, 1), torch.cat(qs, 1), torch.cat(ws, 1), data

    def converged(self, change: Tensor, tol: float) -> Tensor:
        return self.same.to(change.device) | (change <= 1e-12)

    def settled(self) -> bool:
        """After `CLOSEST_SETTLE` steps each start has fallen into its basin."""
        self.steps = getattr(self, "steps", 0) + 1
        return self.steps >= CLOSEST_SETTLE

    def select(self, index: int) -> None:
        self.previous, self.same = self.previous[index:index + 1], self.same[index:index + 1]


class CorrespondingPairs(_Pairs):
    """Point i with point i (the L2 loss): fixed pairs, so one step is exact."""

    def __call__(self, moved: Tensor):
        b = len(moved)
        w = self.x.new_full((b, len(self.x)), 1 / len(self.x))
        return self.x.expand(b, -1, -1), self.y.expand(b, -1, -1), w, (moved - self.y).square().sum(-1).mean(-1)

    def converged(self, change: Tensor, tol: float) -> Tensor:
        return torch.ones_like(change, dtype=torch.bool)


class TransportPairs(_Pairs):
    """Barycentres of an entropic transport plan, the temperature annealed as CPD's variance (see
    the module docstring). `loss`: a `SinkhornLoss` (its `blur` and `reach`)."""

    def __init__(self, x: Tensor, y: Tensor, loss: Any):
        super().__init__(x, y, loss)
        self.floor = float(loss.blur) ** 2
        self.rho = None if loss.reach is None else float(loss.reach) ** 2
        n, m = len(x), len(y)
        self.a, self.b = x.new_full((n,), 1 / n), x.new_full((m,), 1 / m)     # the marginals
        # the plan is exp((f_i + g_j - cost_ij) / eps), f and g carried over between steps
        self.f = self.g = self.plan = self.eps = None
        self.cooled = torch.zeros(1, dtype=torch.bool)

    def __call__(self, moved: Tensor):
        b, n, d = moved.shape
        cost = torch.cdist(moved, self.y.expand(b, -1, -1)).square_() / 2           # (B, N, M)
        if self.plan is None:
            spread = 2 * cost.mean((1, 2)) / d
            self.eps = spread.clamp_min(self.floor)
            self.f, self.g = moved.new_zeros(b, n), moved.new_zeros(b, len(self.y))
        else:      # CPD's variance update: the old plan's residual at the new map
            spread = 2 * (self.plan * cost).sum((1, 2)) / (d * self.plan.sum((1, 2)))
            previous, self.eps = self.eps, torch.minimum(spread, self.eps).clamp_min(self.floor)
            # cooled: at the floor, or the residual no longer falls (two samples of one surface
            # keep a gap between their points, whatever the map)
            self.cooled = (self.eps <= self.floor) | (self.eps > PLATEAU * previous)
        eps = self.eps[:, None]                                                       # (B, 1)
        # the reach never below REACH_BLURS times the current blur: while the temperature is high
        # every pair is within reach, and the soft pairs find the global map before any mass is let go
        damping = 1.0 if self.rho is None else 1 / (1 + eps / torch.clamp(REACH_BLURS ** 2 * eps, min=self.rho))
        # scaling iterations on the kernel with the last potentials absorbed (stabilised Sinkhorn:
        # its entries stay near the plan's, so none of them over- or underflows where it matters)
        kernel = fast_exp((self.f[:, :, None] + self.g[:, None, :] - cost) / eps[..., None])   # (B, N, M)
        u, v = self._scalings(kernel, eps, damping)                                   # (B, N, 1), (B, M, 1)
        self.f, self.g = self.f + eps * u[..., 0].log(), self.g + eps * v[..., 0].log()
        plan = u * kernel * v.transpose(1, 2)
        self.plan = plan
        mass = plan.sum(2)                                                            # (B, N)
        barycentres = (plan @ self.y) / mass.clamp_min(1e-300)[..., None]
        return self.x.expand(b, -1, -1), barycentres, mass, (plan * cost).sum((1, 2))

    def _scalings(self, kernel: Tensor, eps: Tensor, damping) -> tuple[Tensor, Tensor]:
        """`SINKHORN_ITERATIONS` scaling iterations: `u (B, N, 1)`, `v (B, M, 1)` with `u K v^T` the plan."""
        a, b = self.a[:, None], self.b[:, None]
        kernel_t = kernel.transpose(1, 2)
        v = torch.ones_like(self.g)[..., None]
        if self.rho is None:
            for _ in range(SINKHORN_ITERATIONS):
                u = a / (kernel @ v).clamp_min(1e-300)
                v = b / (kernel_t @ u).clamp_min(1e-300)
            return u, v
        # with reach rho the potentials are damped, f <- lambda (eps log a - eps log sum_j exp((g_j - C_ij) / eps)):
        # in the scalings u = exp((f_new - f) / eps) that is (a / K v)^lambda exp((lambda - 1) f / eps)
        shrink_f = torch.exp((damping - 1) * self.f / eps)[..., None]
        shrink_g = torch.exp((damping - 1) * self.g / eps)[..., None]
        damping = damping[..., None]
        for _ in range(SINKHORN_ITERATIONS):
            u = (a / (kernel @ v).clamp_min(1e-300)) ** damping * shrink_f
            v = (b / (kernel_t @ u).clamp_min(1e-300)) ** damping * shrink_g
        return u, v

    def settled(self) -> bool:
        """A start has cooled: time to choose one."""
        return bool(self.cooled.any())

    def select(self, index: int) -> None:
        """Keep the state of start `index` only."""
        self.f, self.g, self.plan, self.eps, self.cooled = (
            t[index:index + 1] for t in (self.f, self.g, self.plan, self.eps, self.cooled))

    def converged(self, change: Tensor, tol: float) -> Tensor:
        return self.cooled.to(change.device) & (change <= tol)


#: how a stage's loss pairs points (see the module docstring)
PAIRINGS: Registry[type[_Pairs]] = Registry("pairing", {"closest": ClosestPairs, "corresponding": CorrespondingPairs,
                                                         "transport": TransportPairs})
#: the pairings whose first stage runs from every map of `starts` (corresponding points need no start)
MULTISTART = ("transport", "closest")


def _pairing(loss: Any) -> str | None:
    """The `PAIRINGS` name for a loss (class or instance), or None when it is not over point pairs."""
    loss_cls = loss if isinstance(loss, type) else type(loss)
    return getattr(loss_cls, "pairing", None)


def starts(x: Tensor, y: Tensor, matrix: Tensor, translation: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """The maps a first stage (soft or closest pairs) starts from: the current one `(matrix (d, d), translation (d,))`
    and every proper rotation taking the principal axes of `x: (N, d)` onto those of `y: (M, d)`
    (the axes' signs are ambiguous: 2 in 2D, 4 in 3D), scaled by the ratio of the spreads unless
    `kind` is "rigid", centroid onto centroid. -> `(B, d, d)`, `(B, d)`."""
    d = x.shape[1]
    mx, my = x.mean(0), y.mean(0)
    cx, cy = torch.cov((x - mx).T), torch.cov((y - my).T)
    ux, uy = torch.linalg.eigh(cx)[1], torch.linalg.eigh(cy)[1]
    signs = torch.cartesian_prod(*[torch.tensor([1.0, -1.0], dtype=x.dtype)] * d).reshape(-1, d)
    rotations = uy[None] * signs[:, None, :].to(x.device) @ ux.T[None]               # (2^d, d, d)
    rotations = rotations[torch.linalg.det(rotations) > 0]
    if kind != "rigid":
        rotations = rotations * (cy.trace() / cx.trace()).sqrt()
    matrices = torch.cat([matrix[None], rotations])
    return matrices, torch.cat([translation[None], my - rotations @ mx])


# --- the fitter --------------------------------------------------------------------------------
def fit_linear(model, problem, history: list[dict], prefix: str, *, fallback: Callable) -> bool:
    """Fit the linear `model` (a `Rigid`, `Similarity` or `Affine`) to `problem` (a `ShapeFit`) by
    alternating pairs and closed-form steps through the loss's stages; the model holds the fitted
    map. A first stage with soft or closest pairs runs from every map of `starts` at once and keeps
    the one closest to the target (see the module docstring). Falls back to `fallback(model, problem,
    history, prefix)` (Adam) for a loss that does not pair points. Returns True if Ctrl-C stopped
    it (the model then holds the last completed step)."""
    if any(_pairing(stage.loss) is None for stage in problem.stages):
        return fallback(model, problem, history, prefix)
    step = STEPS.lookup(model.closed_form, "register()")
    opts = problem.opts
    x, y = problem.x.detach().double(), problem.y.detach().double()
    matrix, translation = model.matrix.double()[None], model.translation.double()[None]    # (1, d, d), (1, d)
    marks = problem.landmarks
    if marks is not None:
        mark_p, mark_q = marks[0].detach().double(), marks[1].detach().double()
        mark_w = mark_p.new_full((len(mark_p),), marks[2] / len(mark_p))
    interrupted = False
    xs = ys = None
    try:
        for number, stage in enumerate(problem.stages):
            xs, ys = _subsample(x, y, stage, opts.seed)
            pairing = _pairing(stage.loss)
            if number == 0 and pairing in MULTISTART:
                matrix, translation = starts(xs, ys, matrix[0], translation[0], model.closed_form)
            pairs = PAIRINGS[pairing](xs, ys, stage.loss)
            label = f"{prefix}{stage.label}"
            tol = opts.tol if number == len(problem.stages) - 1 else max(opts.tol, COARSE_TOL)
            with progress_bar(opts.progress, label, stage.iterations) as advance:
                for iteration in range(stage.iterations):
                    p, q, w, data = pairs(xs @ matrix.transpose(1, 2) + translation[:, None])
                    total = data
                    row = {"stage": label, "phase": "procrustes", "iteration": iteration}
                    if marks is not None:
                        landmark = (mark_p @ matrix.transpose(1, 2) + translation[:, None] - mark_q).square().sum(-1).mean(-1)
                        total = data + marks[2] * landmark
                        b = len(matrix)
                        p, q = torch.cat([p, mark_p.expand(b, -1, -1)], 1), torch.cat([q, mark_q.expand(b, -1, -1)], 1)
                        w = torch.cat([w, mark_w.expand(b, -1)], 1)
                    best = int(total.argmin())
                    row.update(total=float(total[best]), data=float(data[best]), energy=0.0)
                    if marks is not None:
                        row["landmarks"] = float(landmark[best])
                    if len(matrix) > 1:
                        row["starts"] = len(matrix)
                    history.append(row)
                    advance(row)
                    new_matrix, new_translation = step(p, q, w)
                    stuck = w.sum(-1) <= 0                       # no pair left (a reach below every distance)
                    if bool(stuck.any()):
                        new_matrix = torch.where(stuck[:, None, None], matrix, new_matrix)
                        new_translation = torch.where(stuck[:, None], translation, new_translation)
                    change = torch.cat([new_matrix - matrix, (new_translation - translation)[:, None]], 1).abs().amax((1, 2))
                    matrix, translation = new_matrix, new_translation
                    if bool(pairs.converged(change, tol).all()):
                        break
                    if len(matrix) > 1 and pairs.settled():    # continue from the closest start only
                        best = _closest(xs, ys, matrix, translation, stage.loss)
                        matrix, translation = matrix[best:best + 1], translation[best:best + 1]
                        pairs.select(best)
            best = _closest(xs, ys, matrix, translation, stage.loss)
            matrix, translation = matrix[best:best + 1], translation[best:best + 1]
    except KeyboardInterrupt:
        interrupted = True
        if xs is not None:
            best = _closest(xs, ys, matrix, translation, stage.loss)
            matrix, translation = matrix[best:best + 1], translation[best:best + 1]
    model.set_matrix(matrix[0], translation[0])
    return interrupted


def _closest(x: Tensor, y: Tensor, matrix: Tensor, translation: Tensor, loss: Any = None) -> int:
    """Which of the maps `(B, d, d)`, `(B, d)` takes `x: (N, d)` closest to `y: (M, d)`: by the
    stage's Chamfer loss (its robust options) for a closest-point stage, else by the symmetric
    Chamfer distance."""
    if len(matrix) == 1:
        return 0
    score = loss if isinstance(loss, ChamferLoss) else chamfer_loss
    scores = [float(score(x @ A.T + t, y)) for A, t in zip(matrix, translation)]
    return min(range(len(scores)), key=scores.__getitem__)


def _subsample(x: Tensor, y: Tensor, stage, seed: int) -> tuple[Tensor, Tensor]:
    """The stage's farthest-point subsamples, isolated points skipped (every point, in order, for
    `points=None`), at most `TRANSPORT_POINTS` for a dense transport plan."""
    count = stage.points
    if _pairing(stage.loss) == "transport":
        count = min(count or TRANSPORT_POINTS, TRANSPORT_POINTS)
    if count is None:
        return x, y
    return (x[farthest_point_sample(x, count, seed, skip_isolated=True)],
            y[farthest_point_sample(y, count, seed, skip_isolated=True)])


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
