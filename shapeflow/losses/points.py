"""Data terms between point sets: Chamfer, Sinkhorn (optimal transport: our dense loop, geomloss
and KeOps for large clouds) and L2.

Functions do the work (`chamfer_loss(x, y)`); the `nn.Module` wrappers only hold options.
Every function takes `source: (N, d)` and `target: (M, d)` and returns a 0-d tensor.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from .._registry import Registry
from ..errors import ShapeflowError
from ..kernels import SINKHORN_BACKENDS, nearest_neighbors, sinkhorn_backend
from ..kernels.backends import quiet_import
from ..sampling import isolated_points
from ..shapes import PointCloud
from .base import PointLoss, Stage
from .sinkhorn import SinkhornState, sinkhorn_divergence, with_unbalanced_gradient

__all__ = ["chamfer_loss", "sinkhorn_loss", "l2_loss", "nearest_neighbors", "PairWeights", "DIRECTIONS",
           "ChamferLoss", "SinkhornLoss", "L2Loss"]

#: which sums of the Chamfer distance a fit uses: (source -> target, target -> source)
DIRECTIONS: Registry[tuple[bool, bool]] = Registry("chamfer direction", {
    "both": (True, True), "source": (True, False), "target": (False, True)})
#: EM steps estimating the inlier variance of `PairWeights(outliers=w)` per evaluation
OUTLIER_EM_STEPS = 5


@dataclass(frozen=True)
class PairWeights:
    """The robust options of a closest-point (Chamfer) term, applied to each direction's pairs
    alike, in every fitter (Adam, closed form, Gauss-Newton). Distances are in the fit's
    normalised units (the target's RMS radius is 1).

    trim: the fraction (in [0, 0.5)) of each direction's pairs, the farthest ones, left out;
    reach: pairs farther than this cost `reach^2` and pull no more (a truncated quadratic,
        the closest-point counterpart of unbalanced transport's reach), None: no cap;
    outliers: CPD's `w` in [0, 1): each pair is weighted by its posterior probability of being
        an inlier of the mixture `(1 - w) Gaussian(residual; sigma^2) + w uniform(bounding box of
        the target)`, sigma^2 estimated from the weighted residuals (a few EM steps); 0: off.
    """

    trim: float = 0.0
    reach: float | None = None
    outliers: float = 0.0

    def check(self, who: str) -> "PairWeights":
        if not 0.0 <= self.trim < 0.5:
            raise ShapeflowError(f"{who}: trim must be in [0, 0.5), got {self.trim!r}")
        if self.reach is not None and not self.reach > 0:
            raise ShapeflowError(f"{who}: reach must be > 0 or None, got {self.reach!r}")
        if not 0.0 <= self.outliers < 1.0:
            raise ShapeflowError(f"{who}: outliers must be in [0, 1), got {self.outliers!r}")
        return self

    @property
    def active(self) -> bool:
        return self.trim > 0 or self.reach is not None or self.outliers > 0

    def __call__(self, squared: torch.Tensor, base: torch.Tensor, volume: float = 1.0,
                 dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """`squared: (..., K)` squared pair distances (no autograd), `base: (K,)` or `(..., K)`
        the plain weights (1/K on a cloud) -> `(weights (..., K), constant (...,))`: the term is
        `sum_k weights_k squared_k + constant` (the constant: `reach^2` for each capped pair), and
        `weights` are what a closed-form or Gauss-Newton step weighs each pair by. `volume`: of the
        region the outliers are spread over; `dim`: the points' dimension."""
        squared = squared.detach()
        weights = base.expand_as(squared).clone()
        if self.trim > 0:
            order = squared.argsort(-1)
            sorted_w = weights.gather(-1, order)
            before = sorted_w.cumsum(-1) - sorted_w                       # weight of the closer pairs
            keep_sorted = before < (1 - self.trim) * weights.sum(-1, keepdim=True)
            weights = weights * torch.zeros_like(weights).scatter(-1, order, keep_sorted.to(weights.dtype))
        if self.outliers > 0:
            weights = weights * self._inliers(squared, weights, volume, dim)
        constant = squared.new_zeros(squared.shape[:-1])
        if self.reach is not None:
            far = squared > self.reach ** 2
            constant = (weights * far).sum(-1) * self.reach ** 2
            weights = weights * ~far
        return weights, constant

    def _inliers(self, squared: torch.Tensor, weights: torch.Tensor, volume: float, dim: int) -> torch.Tensor:
        """Posterior inlier probability of each pair (see the class docstring), `(..., K)`."""
        w = self.outliers
        count = squared.shape[-1]
        posterior = torch.ones_like(squared)
        floor = 1e-12 * float(volume) ** (2 / dim)
        for _ in range(OUTLIER_EM_STEPS):
            mass = weights * posterior
            sigma2 = ((mass * squared).sum(-1, keepdim=True) / (dim * mass.sum(-1, keepdim=True).clamp_min(1e-300))
                      ).clamp_min(floor)
            # a pair's Gaussian share (1 - w) / K against the uniform w / volume, in logs
            inlier = (math.log(1 - w) - math.log(count) - squared / (2 * sigma2)
                      - dim / 2 * torch.log(2 * math.pi * sigma2))
            outlier = math.log(w) - math.log(volume)
            posterior = torch.sigmoid(inlier - outlier)
        return posterior


def bounding_volume(points: torch.Tensor) -> float:
    """The volume (area in 2D) of the bounding box of `points: (N, d)`, each side at least 1 %
    of the largest (a flat shape still spreads its outliers over some volume)."""
    sides = (points.max(0).values - points.min(0).values).detach()
    sides = sides.clamp_min(0.01 * float(sides.max()))
    return float(sides.prod())


def chamfer_loss(source: torch.Tensor, target: torch.Tensor, *, trim: float = 0.0, direction: str = "both",
                 reach: float | None = None, outliers: float = 0.0) -> torch.Tensor:
    """Symmetric squared Chamfer distance
    `mean_i min_j |x_i - y_j|^2 + mean_j min_i |x_i - y_j|^2`, optionally robust.

    The nearest neighbours come from `nearest_neighbors` (a KD-tree on the CPU, a KeOps argmin
    on CUDA; no (N, M) matrix either way); the loss is then taken on
    the gathered pairs, so its gradient is exact almost everywhere (away from ties).
    direction: "both", "source" (only the first sum: every source point to its closest target
    point; a target with outliers or extra parts) or "target" (only the second: every target point
    to its closest source point; a partial target). `trim`, `reach`, `outliers`: see
    `PairWeights` (weights held fixed in the gradient, as in an EM step).
    """
    _check_pair(source, target, "chamfer_loss")
    from_source, from_target = DIRECTIONS.lookup(direction, "chamfer_loss()")
    robust = PairWeights(trim, reach, outliers).check("chamfer_loss()")
    if not _finite(source, target):
        return _diverged(source, target)
    total = source.new_zeros(())
    sums = []
    if from_source:
        to_target = nearest_neighbors(source, target)   # (N,)
        sums.append((source - target[to_target]).pow(2).sum(1))
    if from_target:
        to_source = nearest_neighbors(target, source)   # (M,)
        sums.append((target - source[to_source]).pow(2).sum(1))
    if not robust.active:
        return sum(squared.mean() for squared in sums)
    volume = bounding_volume(target)
    for squared in sums:
        base = squared.new_full(squared.shape, 1 / len(squared))
        weights, constant = robust(squared, base, volume, source.shape[1])
        total = total + (weights * squared).sum() + constant
    return total


def sinkhorn_loss(source: torch.Tensor, target: torch.Tensor, blur: float = 0.02,
                  reach: float | None = None, scaling: float = 0.5, backend: str = "auto",
                  state: SinkhornState | None = None) -> torch.Tensor:
    """Debiased Sinkhorn divergence between the uniform measures on `source: (N, d)` and
    `target: (M, d)` (geomloss, cost `|x - y|^2 / 2`) -> 0-d tensor. `blur` is the length scale
    of the entropic blur, `reach` (optional) makes it unbalanced, tolerating outliers and
    missing parts. backend: "auto" (`shapeflow.kernels.sinkhorn_backend`: our "dense" solver
    below the KeOps threshold, KeOps "online"/"multiscale" above or on CUDA), or by name: "dense",
    or a geomloss backend ("tensorized", "online", "multiscale"). `state` (dense only): the
    potentials of a previous call, a warm start that is updated (`shapeflow.losses.sinkhorn`)."""
    _check_pair(source, target, "sinkhorn_loss")
    if not _finite(source, target):
        return _diverged(source, target)
    chosen = sinkhorn_backend(backend, source.shape[0], target.shape[0], source.shape[1], source.device)
    if chosen == "dense":
        return sinkhorn_divergence(source, target, blur, reach, scaling, state=state)
    value = _samples_loss(source, target, blur, reach, scaling, chosen)(source, target)
    if reach is None:
        return value
    return with_unbalanced_gradient(value, blur, reach)     # as the dense loop's (Prop. 12)


def _samples_loss(source: torch.Tensor, target: torch.Tensor, blur: float, reach: float | None,
                  scaling: float, chosen: str):
    """geomloss `SamplesLoss` for this pair on its backend `chosen`."""
    SamplesLoss = quiet_import("geomloss", "sinkhorn_loss()").SamplesLoss
    return SamplesLoss("sinkhorn", p=2, blur=blur, reach=reach, scaling=scaling, debias=True, backend=chosen)


def l2_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between corresponding points `mean_i |x_i - y_i|^2` (N == M)."""
    _check_pair(source, target, "l2_loss")
    if source.shape[0] != target.shape[0]:
        raise ShapeflowError(f"l2_loss: needs point-to-point correspondence, but source has "
                             f"{source.shape[0]} points and target {target.shape[0]}")
    return (source - target).pow(2).sum(1).mean()


def _finite(source: torch.Tensor, target: torch.Tensor) -> bool:
    return bool(torch.isfinite(source).all()) and bool(torch.isfinite(target).all())


def _diverged(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A NaN loss (in the graph) for non-finite points: a fit that diverged. A KD-tree or
    geomloss's epsilon schedule would raise from deep inside; the NaN lets the fitting loop see the
    divergence, stop and keep its last finite state."""
    return (source.sum() + target.sum()) * float("nan")


def _check_pair(source: torch.Tensor, target: torch.Tensor, who: str) -> None:
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ShapeflowError(f"{who}: source {tuple(source.shape)} and target {tuple(target.shape)} "
                             "must both be (N, d) with the same d")


class ChamferLoss(PointLoss):
    """`chamfer_loss` as a module holding its robust options (`trim`, `direction`, `reach`,
    `outliers`; `weights` the `PairWeights` every fitter applies). Needs no correspondence;
    cheap at any size. Fitted on a farthest-point subsample of `subsample` points per shape
    (default 4000)."""

    name = "chamfer"
    pairing = "closest"

    @dataclass
    class Options:
        subsample: int = 4000           # points per shape the loss is fitted on
        trim: float = 0.0               # fraction of each direction's farthest pairs left out, [0, 0.5)
        direction: str = "both"         # "both", "source" (source -> target only), "target" (target -> source only)
        reach: float | None = None      # pairs farther than this (relative to the target's RMS radius) stop pulling
        outliers: float = 0.0           # CPD's w: prior fraction of outliers, [0, 1)

    def __init__(self, *, trim: float = 0.0, direction: str = "both", reach: float | None = None,
                 outliers: float = 0.0):
        super().__init__()
        self.sides = DIRECTIONS.lookup(direction, "register()")
        self.direction = direction
        self.weights = PairWeights(trim, reach, outliers).check("register()")

    @classmethod
    def build(cls, options: "ChamferLoss.Options") -> "ChamferLoss":
        return cls(trim=options.trim, direction=options.direction, reach=options.reach, outliers=options.outliers)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = self.weights
        if not w.active and self.direction == "both":
            return chamfer_loss(source, target)
        return chamfer_loss(source, target, trim=w.trim, direction=self.direction, reach=w.reach, outliers=w.outliers)


class SinkhornLoss(PointLoss):
    """`sinkhorn_loss` as a module holding `blur`, `reach`, `scaling` and `backend`.

    Its fitting plan (`stages`) is coarse to fine: the Sinkhorn divergence on a 256-point
    farthest-point subsample with 3x the blur finds the global correspondence cheaply, then a
    refinement runs with `refine` (default "chamfer", on `subsample` = 4000 points) or, with
    `refine=None`, with Sinkhorn itself (on `subsample` = 512 points). The `register()` option
    `reach` (default 0.15, relative to the target's RMS radius; None: balanced) makes every stage
    robust: the transport unbalanced, the Chamfer refine capped at the same distance (`PairWeights`),
    which `trim` can also trim. `warm_start=True` starts each step's Sinkhorn loop from the last
    step's potentials (`shapeflow.losses.sinkhorn`): 10-25 % faster on clouds of 100-4000 points,
    but the lagging potentials cost accuracy on some pairs (the ant to its bent copy: RMSE 0.039
    -> 0.05-0.38 by the sweep budget), so it is off by default.
    """

    name = "sinkhorn"
    #: points per shape in the coarse stage, and the fine stage's default size per refinement
    COARSE_POINTS = 256
    FINE_POINTS = {None: 512, "chamfer": 4000}

    @dataclass
    class Options:
        blur: float = 0.02               # entropic blur, relative to the target's RMS radius
        reach: float | None = 0.15       # unbalanced reach (relative; None = balanced), also the Chamfer refine's cap
        subsample: int | None = None     # points per shape in the fine stage (default 4000, or 512 with refine=None)
        coarse_to_fine: bool = True      # fit 256 points with 3x the blur first
        refine: str | None = "chamfer"   # the fine stage's loss ("chamfer"), or None: Sinkhorn throughout
        trim: float = 0.0                # the Chamfer refine's trim (`ChamferLoss`), [0, 0.5)
        warm_start: bool = False         # each step starts from the last step's potentials (dense backend)
        em: bool | None = None           # model="resnet": EM on the transport plan; None: both shapes <= EM_POINTS

    def __init__(self, *, blur: float = 0.02, reach: float | None = None, scaling: float = 0.5,
                 backend: str = "auto", warm_start: bool = False):
        super().__init__()
        SINKHORN_BACKENDS.lookup(backend, "SinkhornLoss()")
        self.blur, self.reach, self.scaling, self.backend = blur, reach, scaling, backend
        # the last call's potentials, a fit's next step starts from them (dense backend only)
        self.state = SinkhornState() if warm_start else None

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sinkhorn_loss(source, target, self.blur, self.reach, self.scaling, self.backend, state=self.state)

    #: `em=None` fits a flow by EM when both shapes have at most this many points (the plan is dense)
    EM_POINTS = 256
    #: ... or at most this many when the shapes have about as many isolated points
    #: (`sampling.isolated_points`; `EM_ISOLATED_SLACK`): isolated points in one shape and not the
    #: other are outliers or parts without a counterpart, where the Adam stages ended closer above
    #: 256 points (5 % outliers on the 1,335-point airplane); sparse tips in both (the ant's legs) are
    #: shape. Above 2k the dense plans make EM slower than the stages
    EM_CLEAN_POINTS = 2048
    #: the isolated points' counts may differ by this fraction of the points (or 2)
    EM_ISOLATED_SLACK = 0.01
    #: the pairing of the EM fit (`soft_pairs`): barycentres of the transport plan
    pairing = "transport"

    @classmethod
    def soft_pairs(cls, options: "SinkhornLoss.Options", source: torch.Tensor,
                   target: torch.Tensor) -> "SinkhornLoss | None":
        """EM on the transport plan (`pipelines/shape_flow_gn.py`) for a flow when `em=True`, or when
        `em=None`, the Adam stages' options keep their defaults and both shapes (`source: (N, d)`,
        `target: (M, d)`) have at most `EM_POINTS` points, or at most `EM_CLEAN_POINTS` and about as
        many isolated points each; None (Adam's stages) otherwise."""
        if options.em is False:
            return None
        staged = [name for name, value, default in (
            ("subsample", options.subsample, None), ("coarse_to_fine", options.coarse_to_fine, True),
            ("refine", options.refine, "chamfer"), ("trim", options.trim, 0.0),
            ("warm_start", options.warm_start, False)) if value != default]
        if options.em is True and staged:
            raise ShapeflowError(f"register(): {', '.join(staged)} {'shapes' if len(staged) == 1 else 'shape'} "
                                 f"the Adam stages, which em=True replaces by EM on the transport plan")
        if options.em is None:
            size = max(len(source), len(target))
            if staged or size > cls.EM_CLEAN_POINTS or (size > cls.EM_POINTS and abs(
                    int(isolated_points(target).sum()) - int(isolated_points(source).sum()))
                    > max(cls.EM_ISOLATED_SLACK * size, 2)):
                return None
        return cls(blur=options.blur, reach=options.reach)

    #: a fit that folds space is refitted with the default reach divided by this (0.15 -> 0.05)
    REFIT_REACH_DIVISOR = 3.0

    @classmethod
    def more_robust(cls, options: "SinkhornLoss.Options", given: set[str]) -> tuple[Any, str] | None:
        """A smaller reach (unless the user chose one): mass farther than it from any target point
        is destroyed rather than pulled in, which stops a missing part being crushed into what is
        there (the airplane with 30 % of its target cropped: RMSE 54.6 -> 229 at 0.15, 21 at 0.05),
        at some cost on large deformations, which is why it is not the default."""
        if "reach" in given or options.reach is None:
            return None
        reach = options.reach / cls.REFIT_REACH_DIVISOR
        return dataclasses.replace(options, reach=reach, em=False), f"reach={reach:.3g}"

    @classmethod
    def build(cls, options: "SinkhornLoss.Options", blur_scale: float = 1.0) -> "SinkhornLoss":
        return cls(blur=blur_scale * options.blur, reach=options.reach, warm_start=options.warm_start)

    @classmethod
    def stages(cls, options: "SinkhornLoss.Options", iterations: int, source: PointCloud,
               target: PointCloud) -> list[Stage]:
        if options.refine not in (None, "chamfer"):
            raise ShapeflowError(f"register(): unknown refine loss {options.refine!r}; choose from chamfer, "
                                 "or None (Sinkhorn throughout)")
        if options.refine is None and options.trim:
            raise ShapeflowError("register(): trim applies to the Chamfer refine stage; refine=None has none")
        points = options.subsample if options.subsample is not None else cls.FINE_POINTS[options.refine]
        fine_loss = (cls.build(options) if options.refine is None
                     else ChamferLoss(trim=options.trim, reach=options.reach))
        fine = Stage("fine", fine_loss, points, iterations)
        if not options.coarse_to_fine or (min(len(source), len(target)) <= cls.COARSE_POINTS and options.refine is None):
            return [fine]
        coarse = Stage("coarse", cls.build(options, blur_scale=3.0), cls.COARSE_POINTS, iterations)
        # the refine stage's fresh Adam moves every parameter by about lr at once: smaller steps. Half
        # the step, not a third (as until 2026-12-03): over 42 fsaverage pairs (1k-8k points, 4 point
        # samples, 6 deformations) a third fell into a wrong basin once (3.1 % RMSE; a sixth twice),
        # half, 0.75 and 1 never, median RMSE 0.126-0.129 % either way; the ant to its bent copy went
        # 0.042 -> 0.111 (0.2 % of its diagonal), the damaged airplanes 26.6 -> 25.3 and 20.3 -> 19.2
        # (0.75 and 1 crushed the cropped one: 34.4)
        fine.lr_scale = 0.5
        return [coarse, fine]


class L2Loss(PointLoss):
    """`l2_loss` as a module. Needs point-to-point correspondence; fitted on every point."""

    name = "l2"
    correspondence = True
    pairing = "corresponding"

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return l2_loss(source, target)
