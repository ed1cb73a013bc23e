"""The debiased Sinkhorn divergence on dense cost matrices, warm-started from a previous call.

geomloss (Feydy et al.) is the reference: a cold call here runs its algorithm (symmetric,
averaged Sinkhorn updates over an epsilon-scaling schedule from the diameter down to the blur,
then one last update with gradients: the envelope theorem gives the gradient of the converged
divergence without back-propagating through the loop) and returns its value. What differs is
`SinkhornState`: a fit calls the loss a hundred times on points that move a little between
calls, so the dual potentials of the previous call are a better start than the schedule. A warm
call starts from them at the final epsilon and sweeps until the potentials change by less than
`TOL * epsilon`, at most `MAX_ITERATIONS` (3) times, instead of the schedule's ten or so; the
target's self-transport potential, which never changes, is converged once and kept. Over a
fit's steps the potentials converge with the points (they lag by a few sweeps), so the fit
minimises the *converged* divergence, which the cold schedule only approximates; repeated on
the same points, warm calls reach it (`tests/test_sinkhorn.py` checks both against geomloss, the
second run to convergence, and the gradient against finite differences).

Measured (`sf.register` defaults with `warm_start=True` against the cold loop, one thread, quiet
machine): the 91-point fish 0.51 -> 0.39 s, 1k surface points 2.15 -> 1.69 s, 4k 3.40 -> 3.10 s,
at RMSE 0.090 -> 0.099, 0.181 -> 0.145 and 0.125 -> 0.135 % of the diagonal; but the ant to its
bent copy 0.039 -> 0.38 (0.050 with TOL 1e-2 and 5 sweeps, which leaves 5-10 % of the time
saved; 0.041 with 30 sweeps, slower than cold). The lagging potentials steer the first steps,
when the points move most. So the loss uses warm starts only when asked (`SinkhornLoss(warm_start=
True)`, `register(..., warm_start=True)`); a cold call is geomloss's loop without importing it.

Cost `C(x, y) = |x - y|^2 / 2`, `epsilon = blur^2`, `rho = reach^2` (None: balanced), uniform
weights; `x: (N, d)`, `y: (M, d)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ShapeflowError
from ..kernels.exp import exp_floor, fast_logsumexp
from ._small_plan import plan_sweeps

__all__ = ["SinkhornState", "sinkhorn_divergence", "epsilon_schedule", "with_unbalanced_gradient", "TransportPlan",
           "transport_plan", "target_potential"]

#: a warm call stops when no potential moved by more than TOL * epsilon in a sweep
TOL = 0.1
#: sweeps of a warm call at most: the potentials lag the moving points a little and catch up
#: over the next steps (1 sweep was too few: the fish ended at 2 % RMSE instead of 0.1 %)
MAX_ITERATIONS = 3
#: the cold loop's four softmins are one reduction when the costs have one shape and at most this
#: many entries each: measured (one thread) 3.2 -> 2.0 ms a call at 91 points, 3.3 -> 2.3 ms at
#: 128, even at 180, and 6.5 -> 8.3 ms at 256 (the stacked temporaries no longer fit in the cache)
STACK_ENTRIES = 160 * 160
#: the target's self-potential, converged once per fit stage to this tolerance (sweeps at most)
SELF_TOL, SELF_ITERATIONS = 1e-4, 200


@dataclass
class SinkhornState:
    """The potentials of the last call, on its points: `f_ba: (N,)`, `g_ab: (M,)`, `f_aa: (N,)`,
    `g_bb: (M,)`; `target` is the target tensor they belong to (a new target means a cold start),
    `c_yy: (M, M)` its cost matrix.
    `sweeps` counts the Sinkhorn sweeps of the last call (for tests and benchmarks)."""

    f_ba: torch.Tensor | None = None
    g_ab: torch.Tensor | None = None
    f_aa: torch.Tensor | None = None
    g_bb: torch.Tensor | None = None
    target: torch.Tensor | None = None
    sweeps: int = 0
    c_yy: torch.Tensor | None = None

    def fits(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        return (self.f_ba is not None and self.target is y and self.f_ba.shape[0] == x.shape[0]
                and self.f_ba.dtype == x.dtype and self.f_ba.device == x.device)


def epsilon_schedule(diameter: float, blur: float, scaling: float) -> list[float]:
    """geomloss's annealing for p = 2: `diameter^2`, then `blur^2` reached by factors `scaling^2`."""
    steps = []
    e = 2 * math.log(diameter)
    while e > 2 * math.log(blur):
        steps.append(math.exp(e))
        e += 2 * math.log(scaling)
    return [diameter ** 2] + steps + [blur ** 2]


def _cost(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`|a_i - b_j|^2 / 2`: (N, M), as geomloss's tensorized cost."""
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T) / 2


def _softmin(eps: float, cost: torch.Tensor, h: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`-scale eps log sum_j exp(h_j - C_ij / eps)`: `cost: (..., N, M)`, `h: (..., M)` -> `(..., N)`
    (`scale`: a damping folded into the same multiplication)."""
    return (-eps * scale) * fast_logsumexp(torch.add(h[..., None, :], cost, alpha=-1 / eps), dim=-1,
                                           finite_rows=True)


def _damping(eps: float, rho: float | None) -> float:
    return 1.0 if rho is None else 1.0 / (1.0 + eps / rho)


def _annealed(schedule: list[float], rho: float | None, costs: list[torch.Tensor],
              log_weights: list[torch.Tensor], feeds: tuple[int, ...] = (1, 0, 2, 3),
              start: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """geomloss's symmetric epsilon-scaling loop: the potentials of the `costs` (by default
    `[C_xy, C_yx, C_xx, C_yy]` -> `[f_ba, g_ab, f_aa, g_bb]`), each updated from the previous
    sweep's values of the potential `feeds` names, averaged; from `start` (potentials) or from the
    first epsilon's softmins of the weights alone.

    `log_weights`: the log-weights each softmin sums over: `[log b, log a, log a, log b]`. When the
    costs have one shape and at most `STACK_ENTRIES` entries each, they are stacked, so a sweep is
    one reduction over `(K, N, N)`: on small clouds the time is torch's per-operation overhead, a
    quarter of it this way."""
    feeds = list(feeds)
    if all(c.shape == costs[0].shape for c in costs) and costs[0].numel() <= STACK_ENTRIES:
        cost, log_w = torch.stack(costs), torch.stack(log_weights)                      # (K, N, N), (K, N)
        e = schedule[0]
        potentials = _softmin(e, cost, log_w, _damping(e, rho)) if start is None else torch.stack(start)
        for e in schedule:
            update = _softmin(e, cost, torch.add(log_w, potentials[feeds], alpha=1 / e), _damping(e, rho))
            potentials = torch.lerp(potentials, update, 0.5)
        return list(potentials.unbind())
    e = schedule[0]
    potentials = ([_softmin(e, c, w, _damping(e, rho)) for c, w in zip(costs, log_weights)] if start is None
                  else list(start))
    for e in schedule:
        updates = [_softmin(e, c, torch.add(w, potentials[k], alpha=1 / e), _damping(e, rho))
                   for c, w, k in zip(costs, log_weights, feeds)]
        potentials = [torch.lerp(p, u, 0.5) for p, u in zip(potentials, updates)]
    return potentials


def sinkhorn_divergence(x: torch.Tensor, y: torch.Tensor, blur: float, reach: float | None = None,
                        scaling: float = 0.5, state: SinkhornState | None = None) -> torch.Tensor:
    """Debiased (unbalanced if `reach`) Sinkhorn divergence between the uniform measures on
    `x: (N, d)` and `y: (M, d)` -> 0-d tensor, differentiable in both. With `state`, start from
    (and update) the potentials of its previous call when they belong to the same target and
    sizes; without, or on a mismatch, run the epsilon-scaling schedule first."""
    eps, rho = blur ** 2, None if reach is None else reach ** 2
    log_a = torch.full((x.shape[0],), -math.log(x.shape[0]), dtype=x.dtype, device=x.device)
    log_b = torch.full((y.shape[0],), -math.log(y.shape[0]), dtype=y.dtype, device=y.device)
    xd, yd = x.detach(), y.detach()
    warm = state is not None and state.fits(x, y)
    # the cost matrices with gradients (x detached in the second argument, as geomloss), and
    # their detached values for the loop
    c_xy_grad, c_xx_grad = _cost(x, yd), _cost(x, xd)
    c_yx_grad = _cost(y, xd) if y.requires_grad else None
    c_yy = state.c_yy if warm and not y.requires_grad else _cost(yd, yd)
    with torch.no_grad():
        c_xy, c_xx = c_xy_grad.detach(), c_xx_grad.detach()
        c_yx = c_xy.T
        if warm:
            f_ba, g_ab, f_aa, g_bb = state.f_ba, state.g_ab, state.f_aa, state.g_bb
            sweeps = 0
            damping = _damping(eps, rho)
            for sweeps in range(1, MAX_ITERATIONS + 1):
                # alternating updates for the cross potentials (faster than the schedule's averaged
                # ones from a good start), the averaged one for the symmetric self-transport
                ft_ba = damping * _softmin(eps, c_xy, log_b + g_ab / eps)
                gt_ab = damping * _softmin(eps, c_yx, log_a + ft_ba / eps)
                ft_aa = damping * _softmin(eps, c_xx, log_a + f_aa / eps)
                change = max(float((ft_ba - f_ba).abs().max()), float((gt_ab - g_ab).abs().max()),
                             float((ft_aa - f_aa).abs().max()))
                f_ba, g_ab, f_aa = ft_ba, gt_ab, 0.5 * (f_aa + ft_aa)
                if change < TOL * eps:
                    break
        else:
            mins = torch.minimum(xd.min(0).values, yd.min(0).values)
            maxs = torch.maximum(xd.max(0).values, yd.max(0).values)
            schedule = epsilon_schedule(float((maxs - mins).norm()), blur, scaling)
            f_ba, g_ab, f_aa, g_bb = _annealed(schedule, rho, [c_xy, c_yx, c_xx, c_yy],
                                               [log_b, log_a, log_a, log_b])
            sweeps = len(schedule)
            if state is not None:       # the target's self-potential never changes: converge it once
                damping = _damping(eps, rho)
                for _ in range(SELF_ITERATIONS):
                    gt_bb = damping * _softmin(eps, c_yy, log_b + g_bb / eps)
                    change = float((gt_bb - g_bb).abs().max())
                    g_bb = 0.5 * (g_bb + gt_bb)
                    if change < SELF_TOL * eps:
                        break
        if state is not None:
            state.f_ba, state.g_ab, state.f_aa, state.g_bb = f_ba, g_ab, f_aa, g_bb
            state.target, state.sweeps, state.c_yy = y, sweeps, c_yy
    # the last update with gradients (x detached in the second argument, as geomloss): the
    # envelope theorem makes this the gradient of the divergence at the converged potentials
    damping = _damping(eps, rho)
    f_ba, g_ab = (damping * _softmin(eps, c_xy_grad, log_b + g_ab / eps),      # the cross updates in parallel
                  damping * _softmin(eps, c_yx if c_yx_grad is None else c_yx_grad, log_a + f_ba / eps))
    f_aa = damping * _softmin(eps, c_xx_grad, log_a + f_aa / eps)
    if state is None or y.requires_grad:
        g_bb = damping * _softmin(eps, c_yy if not y.requires_grad else _cost(y, yd), log_b + g_bb / eps)
    # else: g_bb is converged and constant (the target does not move): its update is itself
    a, b = log_a.exp(), log_b.exp()
    if rho is None:
        return (a * (f_ba - f_aa)).sum() + (b * (g_ab - g_bb)).sum()
    # Sejourne et al. 2019, Prop. 12: the value weighs the exponentiated potentials by rho + eps/2,
    # the gradient by rho + eps (geomloss writes the second weight in an nn.Module `backward` that
    # autograd never calls, so its unbalanced gradients are (rho + eps/2) / (rho + eps) too small)
    spread = ((a * ((-f_aa / rho).exp() - (-f_ba / rho).exp())).sum()
              + (b * ((-g_bb / rho).exp() - (-g_ab / rho).exp())).sum())
    return with_unbalanced_gradient((rho + eps / 2) * spread, blur, reach)


def with_unbalanced_gradient(value: torch.Tensor, blur: float, reach: float) -> torch.Tensor:
    """`value`, an unbalanced divergence whose gradient carries geomloss's weight rho + eps/2, with
    the same value and its gradient scaled to Prop. 12's rho + eps."""
    eps, rho = blur ** 2, reach ** 2
    scale = (rho + eps) / (rho + eps / 2)
    return scale * value - (scale - 1) * value.detach()


@dataclass
class TransportPlan:
    """What `transport_plan` returns for `x: (N, d)`, `y: (M, d)`: each source point's
    `barycentres: (N, d)` `sum_j P_ij y_j / sum_j P_ij` and `mass: (N,)` `sum_j P_ij / a_i` (1 in
    balanced transport; below 1 where an unbalanced plan lets mass go), the transport `cost`
    `sum_ij P_ij |x_i - y_j|^2 / 2`, the `potentials` `f: (N,)`, `g: (M,)` (a warm start for the next
    call, with the blur: `(f, g, blur)`), the number of `sweeps` run, and each source point's
    `spread: (N,)` `sum_j P_ij |y_j - barycentre_i|^2 / sum_j P_ij` (the plan's own variance);
    `sparse`: whether it was computed on the given `support` (False: the dense plan)."""

    barycentres: torch.Tensor
    mass: torch.Tensor
    cost: float
    potentials: tuple[torch.Tensor, torch.Tensor, float]
    sweeps: int
    spread: torch.Tensor
    sparse: bool = False


#: log2(e): a kernel `exp(z)` computed as `exp2(z log2 e)`
LOG2E = 1.0 / math.log(2.0)
#: a plan on a `support` is used when, on every row, the kernel on the farthest quarter of its
#: candidates is below this fraction of the row's largest entry (2^-30, about 1e-9): the entries
#: left out, farther still, carry no mass that a float32 sum would keep
SUPPORT_CUTOFF = 2.0 ** -30
#: a plan of at most this many pairs (N M) sweeps in NumPy (`losses._small_plan`, where the
#: measurements are): below it, torch's per-operation cost is most of a plan's
SMALL_PLAN_ENTRIES = 180 * 180


def _log_weights(weights: torch.Tensor | None, points: torch.Tensor, name: str) -> torch.Tensor:
    """log of `weights: (N,)` (positive, summing to 1) for `points: (N, d)`; None: uniform."""
    if weights is None:
        return torch.full((points.shape[0],), -math.log(points.shape[0]), dtype=points.dtype, device=points.device)
    if weights.shape != (points.shape[0],):
        raise ShapeflowError(f"transport_plan(): {name} has shape {tuple(weights.shape)}, expected "
                             f"({points.shape[0]},)")
    return weights.to(points.dtype).log()


def target_potential(x: torch.Tensor, f: torch.Tensor, y: torch.Tensor, blur: float,
                     reach: float | None = None, a: torch.Tensor | None = None) -> torch.Tensor:
    """The target potential `g: (M,)` on `y: (M, d)` that a source potential `f: (N,)` on the
    measure on `x: (N, d)` (weights `a: (N,)`, uniform if None) gives at `blur` (one Sinkhorn half-sweep, the c-transform
    `g_j = -lambda eps log sum_i a_i exp((f_i - C_ij) / eps)`): a warm start for `transport_plan`
    onto new target points, `start=(f, g, blur)`. No autograd."""
    eps, rho = blur ** 2, None if reach is None else reach ** 2
    with torch.no_grad():
        log_a = _log_weights(a, x, "a")
        return _softmin(eps, _cost(y, x), log_a + f / eps, _damping(eps, rho))


def transport_plan(x: torch.Tensor, y: torch.Tensor, blur: float, reach: float | None = None,
                   start: tuple[torch.Tensor, torch.Tensor, float] | None = None, tol: float = 1e-3,
                   max_sweeps: int = 200, scaling: float = 0.5, a: torch.Tensor | None = None,
                   b: torch.Tensor | None = None, support: torch.Tensor | None = None) -> TransportPlan:
    """The entropic transport plan `P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)` between the
    measures on `x: (N, d)` and `y: (M, d)` with weights `a: (N,)` and `b: (M,)` (each positive,
    summing to 1; None: uniform) (cost `|x - y|^2 / 2`, `eps = blur^2`;
    unbalanced with `reach`, as `sinkhorn_divergence`'s cross term), summarised per source point
    (`TransportPlan`). Start: `start = (f, g, its blur)`, a previous plan's potentials on the same
    target (its `g` carries over; `f` is made afresh, the source having moved), with geomloss's
    epsilon-scaling from its blur when that is more than one scaling step above `blur`; else the
    schedule from the pair's diameter. Then Sinkhorn sweeps at `blur` until no potential moves by
    more than `tol * eps` (at most `max_sweeps`), as scalings of the kernel with the potentials
    absorbed (stabilised Sinkhorn: two matrix-vector products a sweep instead of two log-sum-exps;
    the scalings' logarithms stay small, as the potentials are near their fixed point).

    `support: (N, k)` int64, each row's candidate target points, nearest first (a k-nearest-neighbour
    query): with a warm `start` at this blur, the plan is computed on these N k entries only when
    the kernel is negligible on the farthest quarter of every row's candidates (`SUPPORT_CUTOFF`),
    else on the dense matrix as without it (`TransportPlan.sparse` says which). No autograd."""
    eps, rho = blur ** 2, None if reach is None else reach ** 2
    damping = _damping(eps, rho)
    with torch.no_grad():
        log_a, log_b = _log_weights(a, x, "a"), _log_weights(b, y, "b")
        schedule = []
        if start is not None and start[1].shape == log_b.shape:
            g = start[1]
            schedule = epsilon_schedule(start[2], blur, scaling)[1:-1] if start[2] > blur / scaling else []
            if schedule:        # the source's potential made afresh from the target's, then the scaling
                c_xy = _cost(x, y)
                f = _softmin(schedule[0], c_xy, log_b + g / schedule[0], _damping(schedule[0], rho))
                f, g = _annealed(schedule, rho, [c_xy, c_xy.T], [log_b, log_a], feeds=(1, 0), start=[f, g])
        else:
            both = torch.cat([x, y])
            schedule = epsilon_schedule(float((both.max(0).values - both.min(0).values).norm()), blur, scaling)[:-1]
            c_xy = _cost(x, y)
            f, g = _annealed(schedule, rho, [c_xy, c_xy.T], [log_b, log_a], feeds=(1, 0))
        if support is None and _small(x, y):
            return _small_plan(x, y, g, log_a, log_b, blur, damping, tol, max_sweeps, len(schedule))
        # the kernel with g and a row shift absorbed, times b: relative_ij = exp(z_ij - top_i) with
        # z_ij = (g_j - C_ij) / eps + log b_j, on every pair or on the support's
        x2, y2 = x.square().sum(1), y.square().sum(1)
        kernel = None
        if support is not None and start is not None and not schedule and start[1].shape == log_b.shape:
            kernel = _SupportKernel.make(x, y, y2, g, log_b, eps, support)
        if kernel is None:
            kernel = _DenseKernel(x, y, x2, y2, g, log_b, eps)
        relative, top = kernel.relative, kernel.top
        f_abs, g_abs = top * (-eps / LOG2E), g                       # the potentials absorbed in `relative`
        tiny = torch.finfo(x.dtype).tiny        # a row or column with no mass left: log(tiny), not -inf
        a = log_a.exp()
        log_v = torch.zeros_like(g)                                  # g = g_abs + eps log_v
        # f <- -lambda eps log sum_j b_j exp((g_j - C_ij) / eps), g likewise from the new f; in the
        # scalings: log u = -lambda log((relative v)_i) + (lambda - 1) f_abs / eps, and for log v
        # the kernel's transpose weighted by a u (relative = K b, so K^T (a u) = relative^T (a u) / b):
        # log v = -lambda log((relative^T (a u))_j) + lambda log b_j + (lambda - 1) g_abs / eps, the
        # shifts computed once (each small operation counts at 100 points).
        # The first update of u is the softmin of the warm g (f = f_abs + eps log_u).
        shift_u = f_abs * ((damping - 1) / eps)
        shift_v = g_abs * ((damping - 1) / eps) + damping * log_b
        log_u = torch.log(relative.sum(1).clamp_min_(tiny)).mul_(-damping).add_(shift_u)
        sweeps = 0
        for sweeps in range(1, max_sweeps + 1):
            new_u = torch.log(kernel.rows(log_v.exp()).clamp_min_(tiny)).mul_(-damping).add_(shift_u)
            new_v = torch.log(kernel.columns(a * new_u.exp()).clamp_min_(tiny)).mul_(-damping).add_(shift_v)
            if sweeps == max_sweeps:        # the last one allowed: no test
                log_u, log_v = new_u, new_v
                break
            # a potential moves by eps times its log-scaling's change
            change = float(torch.maximum((new_u - log_u).abs().max(), (new_v - log_v).abs().max()))
            log_u, log_v = new_u, new_v
            if change < tol:
                break
        f, g = f_abs + eps * log_u, g_abs + eps * log_v
        # per source point, sums over the plan's row of 1, y and |y|^2 (P_ij / a_i = u_i relative_ij v_j)
        sums = kernel.row_sums(torch.cat([y, y2[:, None], torch.ones_like(y2)[:, None]], 1).mul_(log_v.exp()[:, None]))
        mass = torch.nan_to_num(log_u.exp() * sums[:, -1], nan=0.0, posinf=0.0)   # a row with no mass: none
        total = sums[:, -1].clamp_min(tiny)
        barycentres = sums[:, :-2] / total[:, None]
        spread = (sums[:, -2] / total - barycentres.square().sum(1)).clamp_min_(0)  # sum_j P_ij |y_j - b_i|^2 / sum_j P_ij
        # sum_ij P_ij C_ij with C_ij = |x_i|^2 / 2 + |y_j|^2 / 2 - x_i . y_j, from the same sums
        cost = float((a * mass * (x2 / 2 + sums[:, -2] / (2 * total) - (x * barycentres).sum(1))).sum())
    return TransportPlan(barycentres, mass, cost, (f, g, blur), sweeps + len(schedule), spread, kernel.sparse)


def _small(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether `transport_plan` sweeps in NumPy (`losses._small_plan`): on the CPU, in float32 or
    float64, at most `SMALL_PLAN_ENTRIES` pairs."""
    return (x.shape[0] * y.shape[0] <= SMALL_PLAN_ENTRIES and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64))


def _small_plan(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
                blur: float, damping: float, tol: float, max_sweeps: int, annealed: int) -> TransportPlan:
    """`transport_plan`'s sweeps and summaries from the target potential `g: (M,)`, in NumPy
    (`losses._small_plan`); `annealed`: the schedule's sweeps already run."""
    arrays = [t.detach().numpy() for t in (x, y, g, log_b, log_a.exp())]
    barycentres, mass, cost, f, g, sweeps, spread = plan_sweeps(*arrays, blur ** 2, damping, tol, max_sweeps,
                                                                exp_floor(x.dtype))
    tensor = torch.from_numpy
    return TransportPlan(tensor(barycentres), tensor(mass), cost, (tensor(f), tensor(g), blur), sweeps + annealed,
                         tensor(spread), False)


def _shifted_exp2(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(2^(z - top), top)` with `top: (N,)` the row maxima of `z: (N, K)`, in place in `z`, entries
    below 5 times the dtype's smallest normal number flushed to 0 (no subnormals: see `kernels.exp`)."""
    top = z.amax(1)
    relative = z.sub_(top[:, None]).clamp_min_(exp_floor(z.dtype) * LOG2E).exp2_()
    torch.nn.functional.threshold_(relative, 5 * torch.finfo(z.dtype).tiny, 0.0)
    return relative, top


class _DenseKernel:
    """`transport_plan`'s kernel on every pair: `relative: (N, M)` = exp(z - top) with
    z_ij = (g_j - C_ij) / eps + log b_j, `top: (N,)` its row maxima (in base 2, see below)."""

    sparse = False

    def __init__(self, x: torch.Tensor, y: torch.Tensor, x2: torch.Tensor, y2: torch.Tensor, g: torch.Tensor,
                 log_b: torch.Tensor, eps: float):
        # with C_ij = |x_i|^2 / 2 + |y_j|^2 / 2 - x_i . y_j, z_ij = x_i . y_j / eps + r_j - |x_i|^2 / 2 eps,
        # r_j = (g_j - |y_j|^2 / 2) / eps + log b_j: the last term is the same along a row, so it
        # cancels in z - top and only shifts top; the rest is one matrix product, of x with a column
        # of ones and y with r (four passes over the (N, M) matrix in all, with the shift and exp),
        # in base 2 (torch's exp2 is 1.2-1.7x faster than exp)
        ones = torch.ones_like(x2)[:, None]
        z = torch.mm(torch.cat([x * (LOG2E / eps), ones], 1),
                     torch.cat([y, (((g - y2 / 2) / eps + log_b) * LOG2E)[:, None]], 1).T)
        self.relative, top = _shifted_exp2(z)
        self.top = top - x2 * (LOG2E / (2 * eps))

    def rows(self, v: torch.Tensor) -> torch.Tensor:
        """`relative @ v`: `(M,)` -> `(N,)`."""
        return self.relative @ v

    def columns(self, w: torch.Tensor) -> torch.Tensor:
        """`relative^T @ w`: `(N,)` -> `(M,)`."""
        return self.relative.T @ w

    def row_sums(self, columns: torch.Tensor) -> torch.Tensor:
        """`relative @ columns`: `(M, c)` -> `(N, c)`, as `(columns^T relative^T)^T` (torch's product
        with a few columns on the right is 3-5x slower than on the left)."""
        return (columns.T @ self.relative.T).T


class _SupportKernel:
    """`transport_plan`'s kernel on each row's candidates `support: (N, k)` only: `relative: (N, k)`
    and `top: (N,)` as `_DenseKernel`'s, the costs from the differences (exact)."""

    sparse = True

    def __init__(self, relative: torch.Tensor, top: torch.Tensor, flat: torch.Tensor, targets: int):
        self.relative, self.top, self.flat, self.targets = relative, top, flat, targets

    @classmethod
    def make(cls, x: torch.Tensor, y: torch.Tensor, y2: torch.Tensor, g: torch.Tensor, log_b: torch.Tensor,
             eps: float, support: torch.Tensor) -> "_SupportKernel | None":
        """The kernel on `support`, or None when it is not negligible on the farthest quarter of some
        row's candidates (`SUPPORT_CUTOFF`): the dense plan is needed there."""
        n, k = support.shape
        if n != x.shape[0] or support.dtype != torch.int64:
            raise ShapeflowError(f"transport_plan(): support must be ({x.shape[0]}, k) int64, got "
                                 f"{tuple(support.shape)} {support.dtype}")
        flat = support.reshape(-1)
        cost = (x[:, None, :] - y.index_select(0, flat).view(n, k, -1)).square().sum(2)       # 2 C, (N, k)
        z = (g.index_select(0, flat) + eps * log_b.index_select(0, flat)).view(n, k).sub_(cost, alpha=0.5)
        relative, top = _shifted_exp2(z.mul_(LOG2E / eps))
        if not bool((relative[:, -max(1, k // 4):].amax(1) <= SUPPORT_CUTOFF).all()):
            return None
        return cls(relative, top, flat, y.shape[0])

    def rows(self, v: torch.Tensor) -> torch.Tensor:
        return (self.relative * v.index_select(0, self.flat).view_as(self.relative)).sum(1)

    def columns(self, w: torch.Tensor) -> torch.Tensor:
        return w.new_zeros(self.targets).scatter_add_(0, self.flat, (self.relative * w[:, None]).view(-1))

    def row_sums(self, columns: torch.Tensor) -> torch.Tensor:
        n, k = self.relative.shape
        gathered = columns.index_select(0, self.flat).view(n, k, -1)
        return (self.relative[:, :, None] * gathered).sum(1)
