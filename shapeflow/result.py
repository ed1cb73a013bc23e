"""`Result`: what every registration returns, whatever the data, model or solver."""
from __future__ import annotations

import copy

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._files import atomic_folder
from .deform import Affine, Compose, Deformation, Normalized
from .errors import ShapeflowError, ShapeflowWarning
from .shapes import Image

__all__ = ["Result", "linear_maps", "world_parts"]


@dataclass
class Result:
    """The outcome of `register`.

    `warped` has the source's kind (an array if the source was an array, an `Image` on the fixed
    grid for images), `deformation` maps source points to target space in world units (for
    images: fixed-space world points into the moving image, ITK's resampling convention),
    `history` holds one row per fitting step, `metrics` the accuracy figures (see `save` for
    the report).
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

    def __post_init__(self) -> None:
        if "diverged" not in self.metrics:
            self.metrics["diverged"] = diverged(self.history, self.deformation)
            if self.metrics["diverged"]:
                warnings.warn("register(): the fit diverged (a non-finite loss or parameters); the last finite state "
                              "is kept and the result is marked diverged", ShapeflowWarning, stacklevel=3)

    def report(self) -> dict[str, Any]:
        """A JSON-able summary: metrics, options (the seed among them), the loss at the start and
        end, the deformation's description, for linear maps their parameters in world units
        (`linear_maps`), and the versions of shapeflow, torch, numpy and Python (`versions`)."""
        fit_rows = [r for r in self.history if str(r.get("stage", "")).startswith("fine")] or self.history
        return {"versions": versions(), "metrics": self.metrics, "options": self.options,
                "loss_start": fit_rows[0]["total"] if fit_rows else None,
                "loss_end": min(r["total"] for r in fit_rows) if fit_rows else None,
                "iterations": len(self.history),
                "deformation": self.deformation.describe(),
                **linear_maps(self.deformation, bool(self.options.get("prealign")), isinstance(self.target, Image))}

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False, name: str | None = None,
             gif: str | os.PathLike | None = None, frames: int = 24) -> Path:
        """Write `warped<ext>`, `deformation.pt`, `report.json` (images also `displacement.nii.gz`,
        warped labels and `overlay.png`; and `gif`, if given, inside the folder when it is a bare
        file name) into `directory`. All files are written into a temporary folder first, which
        then replaces `directory`; an existing folder is an error unless `overwrite`."""
        from .io.outputs import write_warped

        directory = Path(directory)
        with atomic_folder(directory, overwrite) as staging:
            for item in (self.source, self.target):
                where = getattr(item, "source", None)
                if where and Path(where).resolve().is_relative_to(directory.resolve()):
                    raise ShapeflowError(f"{directory}: holds the input {where}; refusing to replace it")
            write_warped(self, staging, name)
            self.deformation.save(staging / "deformation.pt")
            (staging / "report.json").write_text(json.dumps(self.report(), indent=2) + "\n")
            if gif is not None:
                from .viz import animate

                animate(self, staging / Path(gif).name, frames=frames)
        return directory


def versions() -> dict[str, str]:
    """The versions a result depends on: shapeflow, torch, numpy, Python and the platform."""
    import platform

    import numpy

    try:
        from importlib.metadata import version
        own = version("shapeflow")
    except Exception:  # noqa: BLE001 - running from a source tree that was never installed
        own = "unknown"
    return {"shapeflow": own, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def diverged(history: list[dict], deformation: Deformation) -> bool:
    """True when a fitting step met a non-finite loss (the loops then stop and keep the last finite
    state: `solvers.fit`, and Gauss-Newton rejects such steps) or the map's parameters are not finite."""
    if any(not math.isfinite(row["total"]) for row in history if isinstance(row.get("total"), (int, float))):
        return True
    if any(row.get("diverged") for row in history):      # a Gauss-Newton step met a NaN and was rejected
        return True
    return not all(bool(torch.isfinite(p).all()) for p in deformation.parameters())


def world_parts(deformation: Deformation) -> list[Deformation]:
    """The maps `deformation` applies one after the other, the linear ones (`Rigid`,
    `Similarity`, `Affine`) expressed in world units (a map fitted in normalised coordinates
    inside `Normalized` is conjugated back); the others are returned as they are."""
    if isinstance(deformation, Normalized):
        inner = deformation.inner
        parts = list(inner.parts) if isinstance(inner, Compose) else [inner]
        out, center = [], deformation.source_center
        for part in parts:
            out.append(copy.deepcopy(part).double().conjugated(center, deformation.target_center, deformation.scale)
                       if part.linear else part)        # world offsets in float64
            center = deformation.target_center      # later parts map target space to target space
        return out
    if isinstance(deformation, Compose):
        return [q for part in deformation.parts for q in world_parts(part)]
    return [deformation]


def _homogeneous(part: Deformation) -> torch.Tensor:
    """`(d+1, d+1)`: `[[matrix, translation], [0, 1]]` of a linear map, float64 on the CPU."""
    d = part.dim
    out = torch.eye(d + 1, dtype=torch.float64)
    out[:d, :d] = part.matrix.detach().cpu().double()
    out[:d, d] = part.translation.detach().cpu().double()
    return out


def _summary(part: Deformation, maps: str) -> dict[str, Any]:
    """rotation (d, d), translation (d,), scale and the homogeneous matrix (d+1, d+1) of a linear map."""
    return {"rotation": part.rotation.detach().cpu().double().tolist(),
            "translation": part.translation.detach().cpu().double().tolist(),
            "scale": float(part.scale), "matrix": _homogeneous(part).tolist(), "maps": maps}


def linear_maps(deformation: Deformation, prealigned: bool, image: bool) -> dict[str, Any]:
    """The report's entries for linear maps, in world units (the data's own; mm in the RAS world
    for images): `linear` when the whole map is linear (a rigid, similarity or affine model, also
    after a prealignment), `prealign` for the prealignment; each with `rotation` (d, d),
    `translation` (d,), `scale`, and `matrix`, the homogeneous (d+1, d+1) `[[A, t], [0, 1]]` with
    `phi(x) = A x + t`. For images the maps go from the fixed world to the moving world (the
    resampling convention), for shapes from the source to the target. An affine map's rotation
    is that of its polar decomposition, its scale `|det A|^(1/d)`."""
    maps = "fixed world -> moving world" if image else "source -> target"
    parts = world_parts(deformation)
    linear = [p for p in parts if p.linear]
    out: dict[str, Any] = {}
    if linear and len(linear) == len(parts):
        total = linear[0]
        if len(linear) > 1:                       # compose them: the later ones act on the earlier's output
            h = torch.eye(deformation.dim + 1, dtype=torch.float64)
            for part in linear:
                h = _homogeneous(part) @ h
            total = Affine(deformation.dim).double()
            total.set_matrix(h[:-1, :-1], h[:-1, -1])
        out["linear"] = _summary(total, maps)
    if prealigned and linear:
        out["prealign"] = _summary(linear[0], maps)
    return out
