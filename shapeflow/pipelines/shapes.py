"""Shape registration: linear models, neural flows and per-point fields on point sets and meshes.

The source moves onto the target. Both are centred and scaled by one common factor (undone on
output), optionally pre-aligned by a rigid/similarity/affine map, then the model is fitted by the
fitter it names (`Deformation.fitted_by`, `FITTERS`): "adam" runs Adam through the stages its loss
plans (`PointLoss.stages`: e.g. Sinkhorn on a coarse subsample, then Chamfer on more points);
"procrustes" fits the linear models through the same stages by closed-form steps on point pairs
(`shape_linear.py`: ICP, or soft correspondences for Sinkhorn); "gauss-newton" runs non-rigid ICP
on the shared solver core (`shape_icp.py`, for `model="displacement"`); "output-gauss-newton" fits a
flow's output weights to corresponding points by Gauss-Newton (`shape_flow_gn.py`, `model="resnet"`
with `loss="l2"`; Adam for the other losses). Landmarks, when given, join either fit.
`StartGuard` chooses the start (centroids aligned, or the shapes as given) and keeps the start when
the fit ends worse by its own data term; `_check_fit` warns (`ShapeflowWarning`) of a poor fit. The
fitted map is applied to every source point. A model or a loss is chosen by name from `MODELS` /
`LOSSES`; each brings its own options and behaviour, so nothing here depends on which one it is.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .. import metrics
from .._options import CommonOptions, parse_options
from .._registry import Registry
from ..deform import MODELS, Compose, Deformation, Normalized
from ..errors import ShapeflowError, ShapeflowWarning
from ..losses import LOSSES, Stage
from ..losses.points import ChamferLoss, L2Loss, PairWeights, chamfer_loss
from ..result import Result
from ..sampling import farthest_point_sample
from ..shapes import Landmarks, Mesh, PointCloud
from ..io.landmarks import landmark_pair
from ..solvers import fit
from .shape_flow_gn import fit_output_gauss_newton
from .shape_icp import PAIRINGS as ICP_PAIRINGS, PairTerm, fit_point_displacement
from .shape_linear import check_linear, fit_linear

__all__ = ["ShapeOptions", "register_shapes"]


@dataclass
class ShapeOptions(CommonOptions):
    """Keyword options of `register` for shapes (the model and the loss add their own:
    `ResNetFlow.Options`, `SinkhornLoss.Options`, ...); an unknown name is an error listing these."""

    iterations: int | None = None       # Adam / closed-form (linear models) steps per stage (default 60); Gauss-Newton steps per stiffness stage (10; 20 for resnet with loss l2)
    lr: float | None = None             # Adam step size (default: the model's `default_lr`)
    lbfgs_iterations: int | None = None  # L-BFGS evaluations after Adam (default: 60 linear models on varifold/currents, 0 flows)
    regularization: float | None = None  # weight of the model's energy (default: the model's `default_regularization`)
    prealign: str | None = None         # "rigid", "similarity" or "affine" before a non-linear model
    normalize: bool = True              # centre and scale before fitting (undone on output)
    tol: float = 1e-5                   # early stop: relative improvement over `patience` steps
    # a stage stops when its best total has not improved for this many steps (the best state is
    # kept): 20 stops the fish's refine stage, whose fresh Adam first undoes the coarse fit and
    # does not win it back (0.45 -> 0.31 s, RMSE 0.10 -> 0.13 % of the diagonal); the 1k and 4k
    # surfaces and the damaged airplane (tests/test_robust_shapes.py) improve to the end, unchanged
    patience: int = 20


def _named(shape: PointCloud) -> str:
    return f"{shape.source}: " if shape.source else ""


def check_extent(shape: PointCloud, role: str) -> None:
    """A one-line error naming the file when the points of `shape: (N, d)` (nearly) coincide: the
    normalisation divides by their extent, and no map is determined by a single point."""
    points = shape.points.double()
    extent = float((points.max(0).values - points.min(0).values).max())
    magnitude = float(points.abs().max())
    if extent <= 1e-9 * magnitude or extent == 0.0:
        raise ShapeflowError(f"{_named(shape) or role + ': '}all {len(points)} points coincide (extent {extent:.3g} "
                             f"in every direction); there is nothing to register")


def _cell_kind(shape: PointCloud) -> str:
    cells = shape.cells
    if cells is None or len(cells) == 0:
        return "a point cloud"
    return "a mesh (faces)" if cells.shape[1] == 3 else "a curve (edges)"


def check_cells_match(src: PointCloud, tgt: PointCloud, loss: str) -> None:
    """A one-line error unless `src` and `tgt` both have cells of one kind (faces or edges), which a
    loss with `needs_cells` reads; it names the losses that work on point clouds."""
    source_kind, target_kind = _cell_kind(src), _cell_kind(tgt)
    if source_kind == target_kind != "a point cloud":
        return
    point_losses = ", ".join(LOSSES.where(needs_cells=False))
    found = (f"the source is {source_kind}" if source_kind == target_kind
             else f"the source is {source_kind} and the target {target_kind}")
    raise ShapeflowError(f"register(): loss {loss!r} needs faces (a Mesh) or edges (a Curve), the same on both "
                         f"shapes; {found}. Losses for point clouds: {point_losses}")


def register_shapes(src: PointCloud, tgt: PointCloud, model: str = "resnet", loss: str | None = None,
                    *, array_in: bool = False, **options: Any) -> Result:
    """Move `src` onto `tgt` (shapes of the same dimension). See the module docstring.

    loss: a name in LOSSES, or None for the model's `default_loss`.
    array_in: the caller passed arrays, so `Result.warped` is an `(N, d)` array.
    """
    loss = loss if loss is not None else MODELS.lookup(model).default_loss
    opts, parts = parse_options(ShapeOptions, options, {"model": (model, MODELS), "loss": (loss, LOSSES)})
    model_cls, loss_cls = MODELS[model], LOSSES[loss]
    fitter = FITTERS.lookup(model_cls.fitted_by)
    fitter.check(model, model_cls, loss, loss_cls, set(options))
    if "em" in options and not fitter.soft_pairs:
        takers = ", ".join(k for k, v in MODELS.items() if FITTERS.lookup(v.fitted_by).soft_pairs)
        raise ShapeflowError(f"register(): em chooses how a flow follows soft correspondences (models {takers}); "
                             f"model {model!r} is fitted by {model_cls.fitted_by}")
    if opts.prealign is not None:
        if model_cls.linear:
            raise ShapeflowError(f"register(): prealign applies before a non-linear model; model {model!r} is "
                                 f"itself linear (fit it directly, or prealign a 'resnet')")
        Registry("prealign model", MODELS.where(linear=True)).lookup(opts.prealign)
    if src.dim != tgt.dim:
        raise ShapeflowError(f"register(): source has {src.dim} columns but target has {tgt.dim}; both must be 2D or 3D")
    if loss_cls.correspondence and len(src) != len(tgt):
        raise ShapeflowError(f"register(): loss {loss!r} needs corresponding points, but source has {len(src)} "
                             f"and target {len(tgt)}")
    if loss_cls.needs_cells:
        check_cells_match(src, tgt, loss)
    check_extent(src, "source")
    check_extent(tgt, "target")
    marks = landmark_pair(opts.landmarks, src.dim)
    device, dtype = opts.torch_device, opts.torch_dtype
    start = time.perf_counter()

    # centre and scale in float64, then cast: float32 world coordinates far from the origin (a
    # unit-size shape at 1e6) would keep only a few distinct values
    x64, y64 = src.points.to(device, torch.float64), tgt.points.to(device, torch.float64)
    x_world, y_world = x64.to(dtype), y64.to(dtype)
    source_center, target_center = x64.mean(0), y64.mean(0)
    scale = float((y64 - target_center).pow(2).sum(1).mean().sqrt()) if opts.normalize else 1.0
    if not opts.normalize:
        source_center, target_center = torch.zeros_like(source_center), torch.zeros_like(target_center)
    y = ((y64 - target_center) / scale).to(dtype)
    iterations = opts.iterations if opts.iterations is not None else 60
    stages = loss_cls.stages(parts["loss"], iterations, src, tgt)
    guard = StartGuard.make(stages, loss_cls, x_world, y_world, scale, opts.seed)
    weight = opts.landmark_weight if opts.landmark_weight is not None else 1.0
    world_marks = None if marks is None else (marks[0].to(device, dtype), marks[1].to(device, dtype), float(weight))
    start_pose = "centroids"
    if opts.normalize and guard is not None and guard.as_given_is_closer(source_center.to(dtype),
                                                                         target_center.to(dtype), world_marks):
        source_center, start_pose = target_center, "as given"     # the shapes overlap better where they are
    x = ((x64 - source_center) / scale).to(dtype)
    landmarks = None if marks is None else (((marks[0].to(device, torch.float64) - source_center) / scale).to(dtype),
                                            ((marks[1].to(device, torch.float64) - target_center) / scale).to(dtype),
                                            world_marks[2])

    history: list[dict] = []
    fitted: list[Deformation] = []
    interrupted = False
    problem = ShapeFit(x, y, src.cells, tgt.cells, stages, loss_cls,
                       landmarks, opts, parts["model"], parts["loss"])
    if opts.prealign is not None:
        pre = MODELS[opts.prealign].build(src.dim, seed=opts.seed).to(device, dtype)
        interrupted = FITTERS.lookup(pre.fitted_by)(pre, problem, history, prefix="prealign-")
        fitted.append(pre)
        with torch.no_grad():
            problem = problem.moved_by(pre)
    core = model_cls.build(src.dim, parts["model"], seed=opts.seed).to(device, dtype)
    core.prepare(problem.x, problem.source_cells)
    identity = copy.deepcopy(core.state_dict())     # a new model is the identity map
    if not interrupted:
        interrupted = fitter(core, problem, history, prefix="")
    refit, at_points = None, None       # at_points: the kept map's min det J at the source's points, if measured
    if not interrupted and not model_cls.linear and model_cls.ambient_jacobian:
        robust = loss_cls.more_robust(parts["loss"], set(options))
        # at the source's points, where a crushed part is; a fold in the empty space between sparse
        # samples crushes nothing (see `_refit`)
        # a fitter may report it in its last history row (the EM fit, which checked it already)
        last = history[-1] if history else {}
        reported = last.get("min_jacobian_det") if last.get("phase") == "em" and not last.get("declined") else None
        folds = (1.0 if robust is None else reported if reported is not None
                 else metrics.min_jacobian_determinant(core, problem.x, per_axis=0))
        at_points = None if robust is None else folds
        if folds <= 0:      # see `_refit`
            core, problem, interrupted, refit = _refit(core, problem, robust, folds, identity, history, fitter, src, tgt,
                                                       iterations)
            guard = StartGuard.make(problem.stages, loss_cls, x_world, y_world, scale, opts.seed) if guard else None
            at_points = refit["refit_min_jacobian_det" if refit["kept"] == "refit" else "first_min_jacobian_det"]
    fitted.append(core)
    kept = guard.keep_the_best(fitted, identity, x, y, landmarks) if guard else "fit"
    if kept != "fit" or len(fitted) > 1:    # the map reported is not the one measured (det J at the same points:
        at_points = None                    # the normalisation only scales and shifts them)

    deformation = _in_world_units(fitted, source_center, target_center, scale)     # float64 centres
    with torch.no_grad():   # the fitted map on the normalised source, back to world units in float64
        inner = fitted[0] if len(fitted) == 1 else Compose(fitted)
        warped64 = scale * inner(x).double() + target_center
        warped_points = warped64.to(dtype)
    warped = dataclasses.replace(src.with_points(warped64.cpu().to(src.points.dtype)), source=None)
    result_metrics = _metrics(deformation, src, tgt, x_world, y_world, warped_points, loss_cls.correspondence,
                              model_cls.ambient_jacobian, at_points)
    if marks is not None:
        result_metrics["landmark_error"] = metrics.landmark_errors(deformation, marks[0].to(device, dtype),
                                                                   marks[1].to(device, dtype))
    result_metrics["start"] = start_pose
    result_metrics["refit"] = refit
    result_metrics["kept"] = kept
    _check_fit(result_metrics, y_world, kept)
    result_metrics["seconds"] = time.perf_counter() - start
    result_metrics["interrupted"] = interrupted
    record = {"model": model, "loss": loss,
              **{k: v for k, v in dataclasses.asdict(opts).items() if k != "landmarks"},
              "landmarks": None if marks is None else len(marks[0]), **dataclasses.asdict(parts["model"]),
              **dataclasses.asdict(parts["loss"]), "source": src.source, "target": tgt.source}
    return Result(warped=warped.points.numpy() if array_in else warped, deformation=deformation,
                  history=history, metrics=result_metrics, source=src, target=tgt, options=record)


def _refit(core: Deformation, problem: "ShapeFit", robust: tuple[Any, str], folds: float, identity: dict,
           history: list[dict], fitter, src: PointCloud, tgt: PointCloud, iterations: int):
    """A non-linear fit that folds space at the source's own points (min det J <= 0 there) has,
    nearly always, crushed a part of the source that the target lacks into what is there: a close
    fit by any distance to the data, and far worse than no registration. A fold only in the empty
    space between sparse samples (the bounding-box grid of `metrics.min_jacobian_determinant`) is
    not that, and no reason to refit: on 1,000 random vertices of a cortex against 1,000 others
    (benchmarks/shapes_resampled.py) it refitted 2 pairs of 3 with the reach / 3, far smaller than
    the samples' spacing, and the RMSE went 2.0 -> 3.4-5.5 % of the diagonal; the airplane cropped
    by 30 % folds at 4.6 % of its points. Fit once more from the identity
    with the loss's more robust options (`PointLoss.more_robust`, e.g. Sinkhorn's reach / 3) and
    keep the refit unless it folds more. Returns `(model, problem, interrupted, what was done)`; the
    history rows of the refit are prefixed "refit-"."""
    options, change = robust
    second = copy.deepcopy(core)
    second.load_state_dict(identity)
    retry = dataclasses.replace(problem, stages=problem.loss_cls.stages(options, iterations, src, tgt),
                                loss_options=options)
    interrupted = fitter(second, retry, history, prefix="refit-")
    again = metrics.min_jacobian_determinant(second, problem.x, per_axis=0)
    if again < folds:       # the refit is no better: keep the first fit, and say so
        return core, problem, interrupted, {"options": change, "first_min_jacobian_det": folds,
                                            "refit_min_jacobian_det": again, "kept": "first"}
    return second, retry, interrupted, {"options": change, "first_min_jacobian_det": folds,
                                        "refit_min_jacobian_det": again, "kept": "refit"}


def _sample(points: torch.Tensor, count: int | None, seed: int) -> torch.Tensor:
    """Indices of a farthest-point subsample of `count` points, isolated points (outliers) left to
    the stages on every point (`farthest_point_sample(skip_isolated=True)`); every point, in
    order, for None."""
    if count is None:
        return torch.arange(len(points), device=points.device)
    return farthest_point_sample(points, count, seed, skip_isolated=True)


@dataclass
class ShapeFit:
    """What a fitter gets: the normalised (and pre-aligned) source `x: (N, d)` and target
    `y: (M, d)`, their cells (a mesh's faces (F, 3), a curve's edges (E, 2), or None), the loss's stages and class, the landmarks
    `(source (K, d), target (K, d), weight)` in the same coordinates (or None), and the options."""

    x: torch.Tensor
    y: torch.Tensor
    source_cells: torch.Tensor | None
    target_cells: torch.Tensor | None
    stages: list[Stage]
    loss_cls: type
    landmarks: tuple[torch.Tensor, torch.Tensor, float] | None
    opts: ShapeOptions
    model_options: Any = None
    loss_options: Any = None

    def moved_by(self, deformation: Deformation) -> "ShapeFit":
        """The same problem with the source (and its landmarks) moved by `deformation`."""
        marks = self.landmarks and (deformation(self.landmarks[0]), self.landmarks[1], self.landmarks[2])
        return dataclasses.replace(self, x=deformation(self.x), landmarks=marks)


def _fit_adam(model: Deformation, problem: ShapeFit, history: list[dict], prefix: str) -> bool:
    """Fit `model` by Adam (and L-BFGS) through the loss's stages, the landmark term added when
    there are landmarks; append the history rows. Returns True if Ctrl-C stopped it."""
    opts, x, y = problem.opts, problem.x, problem.y
    lr = opts.lr if opts.lr is not None else model.default_lr
    lbfgs = opts.lbfgs_iterations if opts.lbfgs_iterations is not None else (60 if model.linear else 0)
    weight = opts.regularization if opts.regularization is not None else model.default_regularization
    marks = problem.landmarks
    for number, stage in enumerate(problem.stages):
        xs, ys = x[_sample(x, stage.points, opts.seed)], y[_sample(y, stage.points, opts.seed)]
        data_term = stage.loss

        def objective():
            moved, energy = model.forward_with_energy(xs)
            data = data_term(moved, ys)
            total = data + weight * energy
            terms = {"data": float(data.detach()), "energy": float(energy.detach())}
            if marks is not None:
                landmark = (model(marks[0]) - marks[1]).square().sum(1).mean()
                total = total + marks[2] * landmark
                terms["landmarks"] = float(landmark.detach())
            return total, terms

        last = number == len(problem.stages) - 1
        report = fit(model.parameters(), objective, iterations=stage.iterations, lr=lr * stage.lr_scale,
                     lbfgs_iterations=lbfgs if last else 0, tol=opts.tol, patience=opts.patience,
                     progress=opts.progress, stage=f"{prefix}{stage.label}")
        history.extend(report.history)
        if report.interrupted:
            return True
    return False


def _check_adam(model: str, model_cls, loss: str, loss_cls, given: set[str]) -> None:
    """Every loss works with a first-order fit."""


def _fit_gauss_newton(model: Deformation, problem: ShapeFit, history: list[dict], prefix: str) -> bool:
    """Fit a per-point field by non-rigid ICP (`shape_icp.fit_point_displacement`). Returns True if
    Ctrl-C stopped it."""
    opts = problem.opts
    options = problem.model_options
    weight = opts.regularization if opts.regularization is not None else model.default_regularization
    loss = problem.stages[-1].loss
    pairs = PairTerm(problem.loss_cls.pairing, options.reject, options.normal_angle, options.point_to_plane,
                     sides=getattr(loss, "sides", (True, True)), robust=getattr(loss, "weights", PairWeights()))
    u, interrupted = fit_point_displacement(
        problem.x, problem.y, _triangles(problem.source_cells), _triangles(problem.target_cells), options, pairs=pairs,
        regularization=weight, iterations=opts.iterations, landmarks=problem.landmarks, progress=opts.progress,
        history=history, prefix=prefix, seed=opts.seed)
    with torch.no_grad():
        model.displacements.copy_(u)
    return interrupted


def _triangles(cells: torch.Tensor | None) -> torch.Tensor | None:
    """A mesh's faces (F, 3); None for a cloud or a curve (fitted as a cloud, with the kNN Laplacian)."""
    return cells if cells is not None and cells.numel() and cells.shape[1] == 3 else None


def _check_gauss_newton(model: str, model_cls, loss: str, loss_cls, given: set[str]) -> None:
    """Gauss-Newton fits point pairs: chamfer (closest points) or l2 (corresponding points); the
    Adam options do not apply."""
    if loss_cls.pairing not in ICP_PAIRINGS:
        paired = ", ".join(k for k, v in LOSSES.items() if v.pairing in ICP_PAIRINGS)
        raise ShapeflowError(f"register(): model {model!r} is fitted by Gauss-Newton on point pairs; use loss "
                             f"{paired}, not {loss!r}")
    unused = sorted(given & {"lr", "lbfgs_iterations", "tol", "patience"})
    if unused:
        raise ShapeflowError(f"register(): {', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} to "
                             f"the Adam-fitted models, not to model {model!r} (Gauss-Newton)")


@dataclass(frozen=True)
class Fitter:
    """How a model is fitted (`Deformation.fitted_by` names one): `fit(model, problem, history,
    prefix) -> interrupted` and `check(model, model_cls, loss, loss_cls, given options)`;
    `soft_pairs`: it follows a loss's soft correspondences (`PointLoss.soft_pairs`) by EM."""

    fit: Any
    check: Any
    soft_pairs: bool = False

    def __call__(self, model: Deformation, problem: ShapeFit, history: list[dict], prefix: str) -> bool:
        return self.fit(model, problem, history, prefix)


#: the fitters by `Deformation.fitted_by`
FITTERS: Registry[Fitter] = Registry("fitter", {"adam": Fitter(_fit_adam, _check_adam),
                                                "gauss-newton": Fitter(_fit_gauss_newton, _check_gauss_newton),
                                                "output-gauss-newton": Fitter(
                                                    functools.partial(fit_output_gauss_newton, fallback=_fit_adam),
                                                    _check_adam, soft_pairs=True),
                                                "procrustes": Fitter(functools.partial(fit_linear, fallback=_fit_adam),
                                                                     check_linear)})


#: the start and the result are compared on a subsample of at most this many points per shape
GUARD_POINTS = 4000
#: a fit whose mean closest-point distance (both ways) exceeds this fraction of the target's RMS
#: radius is reported as poor
POOR_FIT = 0.05


class StartGuard:
    """Never end worse than the start. The data term of the fit's last stage (its Chamfer loss
    with the robust options, or L2; after a Sinkhorn stage the Chamfer capped at its reach) plus the
    landmark term, on a subsample of the normalised shapes (the stage's farthest points, at most
    `GUARD_POINTS`; every point, in order, for corresponding points), scores (1) where the fit
    starts: the centroids aligned or the shapes as given, whichever is closer, and (2) what the fit
    ends with against that start and the pre-aligned start: the best one is kept."""

    def __init__(self, loss, xs: torch.Tensor, ys: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor, scale: float):
        self.loss, self.xs, self.ys, self.xi, self.yi, self.scale = loss, xs, ys, xi, yi, scale

    @classmethod
    def make(cls, stages, loss_cls, x_world: torch.Tensor, y_world: torch.Tensor, scale: float,
             seed: int) -> "StartGuard | None":
        """None for a loss that needs cells (varifold, currents): closest points do not score it."""
        if loss_cls.needs_cells:
            return None
        last = stages[-1]
        loss = (last.loss if isinstance(last.loss, (ChamferLoss, L2Loss))
                else ChamferLoss(reach=getattr(last.loss, "reach", None)))    # Sinkhorn: the capped Chamfer
        if loss_cls.correspondence:
            xi = yi = torch.arange(len(x_world), device=x_world.device)
        else:
            count = min(last.points or GUARD_POINTS, GUARD_POINTS)
            xi, yi = _sample(x_world, count, seed), _sample(y_world, count, seed)
        return cls(loss, x_world[xi], y_world[yi], xi, yi, scale)

    def score(self, moved: torch.Tensor, y: torch.Tensor, landmarks=None, phi=None) -> float:
        """The data term of `moved: (n, d)` against `y: (m, d)` (normalised), plus the landmark term
        `w mean |phi(s_k) - t_k|^2` when there are landmarks."""
        with torch.no_grad():
            if isinstance(self.loss, ChamferLoss):
                w = self.loss.weights
                value = float(chamfer_loss(moved, y, trim=w.trim, direction=self.loss.direction, reach=w.reach,
                                           outliers=w.outliers))
            else:
                value = float(self.loss(moved, y))
            if landmarks is not None and landmarks[2] > 0:
                ends = phi(landmarks[0]) if phi is not None else landmarks[0]
                value += landmarks[2] * float((ends - landmarks[1]).square().sum(1).mean())
        return value

    def as_given_is_closer(self, source_center: torch.Tensor, target_center: torch.Tensor, marks=None) -> bool:
        """Whether the shapes where they are score lower than with their centroids aligned;
        `marks`: the landmarks `(source (K, d), target (K, d), weight)` in world units, or None."""
        y = (self.ys - target_center) / self.scale

        def score(center):
            moved = None if marks is None else ((marks[0] - center) / self.scale,
                                                (marks[1] - target_center) / self.scale, marks[2])
            return self.score((self.xs - center) / self.scale, y, moved)

        return score(target_center) < score(source_center)

    def keep_the_best(self, fitted: list[Deformation], identity: dict, x: torch.Tensor, y: torch.Tensor,
                      landmarks) -> str:
        """Score the fit against the start (and the pre-aligned start); reset the parts that made it
        worse (the model to `identity`, its state when new; the pre-alignment to the identity).
        Returns what was kept: "fit", "prealign" or "start"."""
        xs, ys = x[self.xi], y[self.yi]
        core, pre = fitted[-1], fitted[0] if len(fitted) > 1 else None
        chain = (lambda p: core(pre(p))) if pre is not None else core
        with torch.no_grad():
            scores = {"fit": self.score(chain(xs), ys, landmarks, chain), "start": self.score(xs, ys, landmarks)}
            if pre is not None:
                scores["prealign"] = self.score(pre(xs), ys, landmarks, pre)
        best = min(scores, key=lambda k: (scores[k], k != "fit"))      # ties go to the fit
        if best != "fit":
            core.load_state_dict(identity)
            if best == "start" and pre is not None:
                eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
                pre.set_matrix(eye, torch.zeros(x.shape[1], dtype=x.dtype, device=x.device))
        self.scores = scores
        return best


def _check_fit(result_metrics: dict[str, Any], y_world: torch.Tensor, kept: str) -> None:
    """`poor_fit` in the metrics, and one `ShapeflowWarning` naming the measured value, when the mean
    closest-point distance after the fit (`chamfer`) is above `POOR_FIT` times the target's RMS
    radius or above `chamfer_before` (the shapes as given; by more than 1e-4 of the radius), when the
    map folds space (`min_jacobian_det` <= 0: on a partial target a close fit can crush the missing
    part into what is there, which no distance to the data reveals), when a first fit folded and was
    refitted (`_refit`), or when the fit scored worse than its start (which is then kept)."""
    radius = float((y_world - y_world.mean(0)).square().sum(1).mean().sqrt())
    chamfer = result_metrics["chamfer"]
    reasons = []
    if kept != "fit":
        reasons.append(f"the fitted map scored worse than the {'pre-aligned ' if kept == 'prealign' else ''}start, "
                       f"which is kept")
    if chamfer > result_metrics["chamfer_before"] + 1e-4 * radius:     # rounding is not a worse fit
        reasons.append(f"the mean closest-point distance went up, from {result_metrics['chamfer_before']:.4g} to "
                       f"{chamfer:.4g}")
    elif chamfer > POOR_FIT * radius:
        reasons.append(f"the mean closest-point distance after it is {chamfer:.4g} ({100 * chamfer / radius:.1f} % of "
                       f"the target's RMS radius, above {100 * POOR_FIT:.0f} %)")
    refit = result_metrics.get("refit")
    if refit is not None:
        reasons.append(f"the first fit folded space (min det J {refit['first_min_jacobian_det']:.3g}) and was refitted "
                       f"with {refit['options']}, as when the target lacks a part of the source; the "
                       f"{'refit' if refit['kept'] == 'refit' else 'first fit (the refit folded more)'} is kept")
    folds = result_metrics.get("min_jacobian_det")
    if folds is not None and folds <= 0:    # a close fit that folds space: typically a part pushed into another
        reasons.append(f"the map folds space (min det J {folds:.3g}), as when the target lacks a part of the source "
                       f"and the flow crushes it into what is there")
    result_metrics["poor_fit"] = bool(reasons)
    if reasons:
        warnings.warn(f"register(): poor fit: {'; '.join(reasons)}. A wrong minimum, or shapes that only partly "
                      f"match (see the loss options trim, direction, reach, outliers)", ShapeflowWarning, stacklevel=4)


def _in_world_units(parts: list[Deformation], source_center, target_center, scale: float) -> Deformation:
    """Express the maps fitted in normalised coordinates in the shapes' own units."""
    if len(parts) == 1 and parts[0].linear:
        return copy.deepcopy(parts[0]).double().conjugated(source_center, target_center, scale)  # offsets in float64
    inner = parts[0] if len(parts) == 1 else Compose(parts)
    return Normalized(inner, source_center, target_center, scale)


#: `chamfer_before` is estimated on a seeded sample of this many points per shape above it
BEFORE_POINTS = 200_000


def _at_most(points: torch.Tensor, count: int) -> torch.Tensor:
    """`points`, or a seeded random `count` of them when there are more."""
    if len(points) <= count:
        return points
    keep = torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[:count]
    return points[keep.to(points.device)]


def _metrics(deformation, src, tgt, x_world, y_world, warped, correspondence: bool,
             ambient_jacobian: bool = True, at_points: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        **metrics.surface_distances(warped, y_world),
        "chamfer_before": metrics.chamfer_distance(_at_most(x_world, BEFORE_POINTS), _at_most(y_world, BEFORE_POINTS)),
        "bbox_diagonal": float((y_world.max(0).values - y_world.min(0).values).norm()),
    }
    # two meshes (or curves) with the same cells: the vertices correspond
    same_cells = (src.cells is not None and tgt.cells is not None and src.cells.shape == tgt.cells.shape
                  and bool((src.cells == tgt.cells).all()))
    known = correspondence or same_cells or (isinstance(src, Landmarks) and isinstance(tgt, Landmarks))
    out["rmse"] = metrics.rmse(warped, y_world) if known and len(src) == len(tgt) else None
    # a field known only at its points (model="displacement") has no Jacobian off them worth a number
    out["min_jacobian_det"] = (metrics.min_jacobian_determinant(deformation, x_world, at_points=at_points)
                               if ambient_jacobian else None)
    if isinstance(src, Mesh):
        out["flipped_triangles_percent"] = metrics.flipped_triangles_percent(
            deformation, x_world, src.faces.to(x_world.device), warped)
    with torch.no_grad():   # on a seeded sample of the points above MAX_JACOBIAN_POINTS (a mean: the same)
        sample = _at_most(x_world, metrics.MAX_JACOBIAN_POINTS)
        out["energy"] = float(deformation.energy(sample)) if not deformation.linear else 0.0
    return out
