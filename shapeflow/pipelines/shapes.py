"""`register(source, target, model, loss, **options) -> Result`: the entry point the CLI calls.

The source moves onto the target. Both are centred and scaled by one common factor (undone on
output), optionally pre-aligned by a rigid/similarity/affine map, then the model is fitted
coarse to fine: on a farthest-point subsample first, then on more points with a sharper loss.
The fitted map is applied to every source point.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import metrics
from ._files import default_mode
from ._options import CommonOptions
from .deform import MODELS, Compose, Deformation, Normalized, ResNetFlow
from .errors import ShapeflowError
from .io import read, suffix_of, write
from .losses import LOSSES
from .sampling import farthest_point_sample
from .shapes import Image, Landmarks, Mesh, PointCloud, check_points
from .solvers.fit import fit

__all__ = ["register", "Result", "RegistrationOptions"]


@dataclass
class RegistrationOptions(CommonOptions):
    """Keyword options of `register`; an unknown name is an error listing these."""

    iterations: int | None = None       # Adam steps per stage (default 60)
    lr: float | None = None             # Adam step size (default per model)
    lbfgs_iterations: int | None = None  # L-BFGS evaluations after Adam (default: 60 linear, 0 flows)
    regularization: float = 1e-3        # weight of the model's energy (kinetic energy for flows)
    prealign: str | None = None         # "rigid", "similarity" or "affine" before a flow
    normalize: bool = True              # centre and scale before fitting (undone on output)
    subsample: int | None = None        # points per shape in the fine stage (default: 4000 for chamfer,
                                        # 512 for sinkhorn); Sinkhorn's coarse stage uses 256
    coarse_to_fine: bool = True         # sinkhorn: fit 256 points with 3x the blur first
    refine: str | None = "chamfer"      # sinkhorn: the fine stage's loss (None: Sinkhorn throughout)
    blur: float = 0.02                  # Sinkhorn blur, relative to the target's RMS radius
    reach: float | None = None          # unbalanced Sinkhorn reach (relative), None = balanced
    blocks: int = 10                    # ResNetFlow: number of Euler steps L
    width: int = 64                     # ResNetFlow: hidden width m
    activation: str = "relu"            # ResNetFlow: relu (as the paper), tanh, softplus or silu
    tol: float = 1e-5                   # early stop: relative improvement over `patience` steps
    patience: int = 60


@dataclass
class Result:
    """The outcome of `register`.

    `warped` has the source's kind (an array if the source was an array), `deformation` maps
    source points to target space in world units, `history` holds one row per fitting step,
    `metrics` the accuracy figures (see `save` for the report).
    """

    warped: Any
    deformation: Deformation
    history: list[dict]
    metrics: dict[str, Any]
    source: Any = field(repr=False, default=None)
    target: Any = field(repr=False, default=None)
    options: dict[str, Any] = field(default_factory=dict)
    #: image registrations: the sampling positions of the middle slice after each step (animation)
    snapshots: list = field(default_factory=list, repr=False)

    def report(self) -> dict[str, Any]:
        """A JSON-able summary: metrics, options, and the loss at the start and end."""
        fit_rows = [r for r in self.history if str(r.get("stage", "")).startswith("fine")] or self.history
        return {"metrics": self.metrics, "options": self.options,
                "loss_start": fit_rows[0]["total"] if fit_rows else None,
                "loss_end": min(r["total"] for r in fit_rows) if fit_rows else None,
                "iterations": len(self.history),
                "deformation": self.deformation.describe()}

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False, name: str | None = None,
             gif: str | os.PathLike | None = None, frames: int = 24) -> Path:
        """Write `warped<ext>`, `deformation.pt`, `report.json` (and `gif`, if given, inside the
        folder when it is a bare file name) into `directory`. All files are written into a
        temporary folder first, which then replaces `directory`; an existing folder is an error
        unless `overwrite`."""
        directory = Path(directory)
        if directory.exists() and not overwrite:
            raise ShapeflowError(f"{directory}: output folder exists; choose another or pass overwrite (--overwrite)")
        if directory.exists() and not directory.is_dir():
            raise ShapeflowError(f"{directory}: exists and is not a folder")
        parent = directory.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{directory.name}."))
        os.chmod(staging, default_mode(0o777))
        try:
            for item in (self.source, self.target):
                where = getattr(item, "source", None)
                if where and Path(where).resolve().is_relative_to(directory.resolve()):
                    raise ShapeflowError(f"{directory}: holds the input {where}; refusing to replace it")
            if isinstance(self.warped, Image):
                from .register_images import write_image_outputs

                write_image_outputs(self, staging, name)
            else:
                suffix = name or _default_suffix(self.source)
                warped = self.warped if isinstance(self.warped, PointCloud) else PointCloud(torch.as_tensor(self.warped))
                write(dataclasses.replace(warped, source=None), staging / f"warped{suffix}")
            self.deformation.save(staging / "deformation.pt")
            (staging / "report.json").write_text(json.dumps(self.report(), indent=2) + "\n")
            if gif is not None:
                from .viz import animate

                animate(self, staging / Path(gif).name, frames=frames)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(staging, directory)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return directory


def _default_suffix(source: Any) -> str:
    if isinstance(source, PointCloud) and source.source:
        return suffix_of(source.source)
    return ".ply" if isinstance(source, Mesh) or (isinstance(source, PointCloud) and source.dim == 3) else ".csv"


def _load(obj: Any) -> Any:
    """Read paths; leave shapes, images and arrays as they are."""
    return read(obj) if isinstance(obj, (str, os.PathLike)) else obj


def _as_shape(obj: Any, name: str) -> PointCloud:
    if isinstance(obj, PointCloud):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return read(obj)
    return PointCloud(check_points(obj, name))


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ShapeflowError(f"register(): unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ShapeflowError("register(): device 'cuda' asked for, but no CUDA device is available")
    return resolved


def _lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise ShapeflowError(f"register(): unknown {what} {name!r}; choose from {', '.join(registry)}")
    return registry[name]


def register(source: Any, target: Any, model: str | None = None, loss: str | None = None, **options: Any) -> Result:
    """Move `source` onto `target`.

    source, target: shapes (`PointCloud`, `Mesh`, `Landmarks`), file paths, or `(N, d)` arrays
        (arrays in, arrays out), d = 2 or 3, the same for both; or two `Image`s / image files
        (then `register_images` does the work: see `shapeflow.register_images`).
    model: shapes: one of `MODELS` ("rigid", "similarity", "affine", "resnet" (default));
        images: "displacement" (default), "svf" or "affine".
    loss: shapes: one of `LOSSES` ("sinkhorn" (default), "chamfer", "l2"; l2 needs point-to-point
        correspondence); images: "ssd" (default) or "mind" (MIND-SSC features, multi-modal).
    options: see `RegistrationOptions` (shapes) or `ImageOptions` (images).
    """
    source, target = _load(source), _load(target)
    if isinstance(source, Image) or isinstance(target, Image):
        if not (isinstance(source, Image) and isinstance(target, Image)):
            raise ShapeflowError("register(): source and target must both be images, or both shapes")
        from .register_images import register_images

        return register_images(source, target, model or "displacement", loss or "ssd", **options)
    model, loss = model or "resnet", loss or "sinkhorn"
    opts = RegistrationOptions.from_kwargs(options)
    model_cls = _lookup(MODELS, model, "model")
    loss_cls = _lookup(LOSSES, loss, "loss")
    if opts.prealign is not None:
        _lookup({k: v for k, v in MODELS.items() if v.linear}, opts.prealign, "prealign model")
    if opts.refine is not None:
        _lookup({k: v for k, v in LOSSES.items() if not v.correspondence}, opts.refine, "refine loss")
    array_in = not isinstance(source, PointCloud)
    src, tgt = _as_shape(source, "source"), _as_shape(target, "target")
    if src.dim != tgt.dim:
        raise ShapeflowError(f"register(): source has {src.dim} columns but target has {tgt.dim}; both must be 2D or 3D")
    if loss_cls.correspondence and len(src) != len(tgt):
        raise ShapeflowError(f"register(): loss 'l2' needs corresponding points, but source has {len(src)} and target {len(tgt)}")
    device, dtype = _resolve_device(opts.device), getattr(torch, opts.dtype)
    start = time.perf_counter()

    x_world = src.points.to(device, dtype)
    y_world = tgt.points.to(device, dtype)
    source_center, target_center = x_world.mean(0), y_world.mean(0)
    scale = float((y_world - target_center).pow(2).sum(1).mean().sqrt()) if opts.normalize else 1.0
    if not opts.normalize:
        source_center, target_center = torch.zeros_like(source_center), torch.zeros_like(target_center)
    if scale == 0.0:
        raise ShapeflowError(f"register(): all target points coincide{_named(tgt)}; nothing to register onto")
    x = (x_world - source_center) / scale
    y = (y_world - target_center) / scale

    history: list[dict] = []
    stages = _stages(opts, loss, len(x), len(y), correspondence=loss_cls.correspondence)
    parts: list[Deformation] = []
    if opts.prealign is not None and not model_cls.linear:
        pre = MODELS[opts.prealign](src.dim).to(device, dtype)
        _fit_stages(pre, x, y, stages, opts, history, prefix="prealign-", linear=True)
        parts.append(pre)
        with torch.no_grad():
            x = pre(x)
    core = _build(model_cls, src.dim, opts).to(device, dtype)
    _fit_stages(core, x, y, stages, opts, history, prefix="", linear=model_cls.linear)
    parts.append(core)

    deformation = _in_world_units(parts, source_center, target_center, scale)
    with torch.no_grad():
        warped_points = deformation(x_world)
    warped = dataclasses.replace(src, points=warped_points.detach().cpu().to(src.points.dtype), source=None)
    if isinstance(core, ResNetFlow):
        core.reference_points = x[farthest_point_sample(x, _subsample(opts, loss), opts.seed)].detach().clone()
    result_metrics = _metrics(deformation, src, tgt, x_world, y_world, warped_points, loss_cls.correspondence)
    result_metrics["seconds"] = time.perf_counter() - start
    result_metrics["interrupted"] = any(r.get("stopped") == "interrupted" for r in history)
    record = {"model": model, "loss": loss, **dataclasses.asdict(opts),
              "source": getattr(src, "source", None), "target": getattr(tgt, "source", None)}
    return Result(warped=warped.points.numpy() if array_in else warped, deformation=deformation,
                  history=[r for r in history if "stopped" not in r], metrics=result_metrics,
                  source=src, target=tgt, options=record)


def _named(shape: PointCloud) -> str:
    return f" in {shape.source}" if shape.source else ""


def _build(model_cls, dim: int, opts: RegistrationOptions) -> Deformation:
    if model_cls is ResNetFlow:
        return ResNetFlow(dim, blocks=opts.blocks, width=opts.width, activation=opts.activation, seed=opts.seed)
    return model_cls(dim)


@dataclass
class _Stage:
    name: str
    loss: str
    points: int
    blur: float
    iterations: int
    lr_scale: float = 1.0


#: points per shape in Sinkhorn's coarse stage, and the default fine-stage sizes per loss
COARSE_POINTS = 256
FINE_POINTS = {"sinkhorn": 512, "chamfer": 4000}


def _stages(opts: RegistrationOptions, loss: str, n_source: int, n_target: int, correspondence: bool) -> list[_Stage]:
    """The fitting plan.

    l2: one stage on every point. chamfer: one stage on `subsample` (4000) points.
    sinkhorn: a coarse stage on 256 points with 3x the blur, then either a Chamfer refinement on
    `subsample` (4000) points (`refine="chamfer"`, the default: Sinkhorn finds the global match
    cheaply, Chamfer sharpens it at full resolution) or Sinkhorn on `subsample` (512) points.
    """
    iterations = opts.iterations if opts.iterations is not None else 60
    if correspondence:  # known correspondence: every point, one stage
        return [_Stage("fine", loss, max(n_source, n_target), opts.blur, iterations)]
    fine_loss = opts.refine if loss == "sinkhorn" and opts.refine else loss
    fine = _Stage("fine", fine_loss, _subsample(opts, fine_loss), opts.blur, iterations)
    if loss != "sinkhorn" or not opts.coarse_to_fine or min(n_source, n_target) <= COARSE_POINTS and fine_loss == loss:
        return [fine]
    coarse = _Stage("coarse", "sinkhorn", COARSE_POINTS, 3 * opts.blur, iterations)
    return [coarse, dataclasses.replace(fine, lr_scale=1 / 3)]


def _subsample(opts: RegistrationOptions, loss: str) -> int:
    return opts.subsample if opts.subsample is not None else FINE_POINTS.get(loss, 4000)


def _fit_stages(model: Deformation, x: torch.Tensor, y: torch.Tensor, stages: list[_Stage],
                opts: RegistrationOptions, history: list[dict], prefix: str, linear: bool) -> None:
    lr = opts.lr if opts.lr is not None else (2e-2 if linear else 3e-2)
    lbfgs = opts.lbfgs_iterations if opts.lbfgs_iterations is not None else (60 if linear else 0)
    with_energy = isinstance(model, ResNetFlow)
    for number, stage in enumerate(stages):
        loss_cls = LOSSES[stage.loss]
        if loss_cls.correspondence:
            xs, ys = x, y
        else:
            xs = x[farthest_point_sample(x, stage.points, opts.seed)]
            ys = y[farthest_point_sample(y, stage.points, opts.seed)]
        data_term = loss_cls(blur=stage.blur, reach=opts.reach) if loss_cls is LOSSES["sinkhorn"] else loss_cls()

        def objective():
            if with_energy:
                moved, energy = model.forward_with_energy(xs)
                data = data_term(moved, ys)
                return data + opts.regularization * energy, {"data": float(data.detach()), "energy": float(energy.detach())}
            data = data_term(model(xs), ys)
            return data, {"data": float(data.detach())}

        last = number == len(stages) - 1
        # a fresh Adam moves every parameter by about lr at once: refine with smaller steps
        report = fit(model.parameters(), objective, iterations=stage.iterations, lr=lr * stage.lr_scale,
                     lbfgs_iterations=lbfgs if last else 0, tol=opts.tol, patience=opts.patience,
                     progress=opts.progress, stage=f"{prefix}{stage.name} ({stage.loss})")
        history.extend(report.history)
        if report.interrupted:
            history.append({"stopped": "interrupted"})
            break


def _in_world_units(parts: list[Deformation], source_center, target_center, scale: float) -> Deformation:
    """Express the maps fitted in normalised coordinates in the shapes' own units."""
    if len(parts) == 1 and parts[0].linear:
        return parts[0].conjugated(source_center, target_center, scale)
    inner = parts[0] if len(parts) == 1 else Compose(parts)
    return Normalized(inner, source_center, target_center, scale)


def _metrics(deformation, src, tgt, x_world, y_world, warped, correspondence: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "chamfer": metrics.chamfer_distance(warped, y_world),
        "hausdorff": metrics.hausdorff_distance(warped, y_world),
        "chamfer_before": metrics.chamfer_distance(x_world, y_world),
        "bbox_diagonal": float((y_world.max(0).values - y_world.min(0).values).norm()),
    }
    same_mesh = (isinstance(src, Mesh) and isinstance(tgt, Mesh) and src.faces.shape == tgt.faces.shape
                 and bool((src.faces == tgt.faces).all()))
    known = correspondence or same_mesh or (isinstance(src, Landmarks) and isinstance(tgt, Landmarks))
    out["rmse"] = metrics.rmse(warped, y_world) if known and len(src) == len(tgt) else None
    out["min_jacobian_det"] = metrics.min_jacobian_determinant(deformation, x_world)
    if isinstance(src, Mesh):
        out["flipped_triangles_percent"] = metrics.flipped_triangles_percent(
            deformation, x_world, src.faces.to(x_world.device))
    with torch.no_grad():
        out["energy"] = float(deformation.energy(x_world)) if not deformation.linear else 0.0
    return out
