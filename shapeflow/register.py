"""`register(source, target, model, loss, **options) -> Result`: the entry point the CLI calls.

The source always moves onto the target. This module only reads files and dispatches by the
kind of data to a pipeline: shapes (`pipelines/shapes.py`: point clouds, meshes, landmarks and
arrays) or images (`pipelines/images.py`). No pipeline imports it back.
"""
from __future__ import annotations

import os
from typing import Any

from ._threads import auto_threads, torch_threads
from .errors import ShapeflowError
from .io import read
from .pipelines.images import register_images
from .pipelines.shapes import register_shapes
from .result import Result
from .shapes import Image, PointCloud, check_points

__all__ = ["register"]


def _load(obj: Any) -> Any:
    """Read paths; leave shapes, images and arrays as they are."""
    return read(obj) if isinstance(obj, (str, os.PathLike)) else obj


def register(source: Any, target: Any, model: str | None = None, loss: str | None = None, **options: Any) -> Result:
    """Move `source` onto `target`.

    source, target: shapes (`PointCloud`, `Mesh`, `Curve`, `Landmarks`), file paths, or `(N, d)` arrays
        (arrays in, arrays out), d = 2 or 3, the same for both; or two `Image`s / image files.
    model: shapes: a name in `shapeflow.deform.MODELS` ("rigid", "similarity", "affine", "resnet"
        (default), "node", "lddmm", "displacement" (per-point field by non-rigid ICP, loss "chamfer")); images: in `IMAGE_MODELS` ("svf" (default), "displacement" or "affine").
    loss: shapes: a name in `shapeflow.losses.LOSSES` ("sinkhorn" (default), "chamfer", "l2"; l2
        needs point-to-point correspondence; "varifold", "currents": between two meshes or two
        `Curve`s, reading their faces or edges); images: in `RESIDUALS` ("ssd" (default), "ncc", "mind").
    options: keyword-only; see `ShapeOptions` / `ImageOptions` and the chosen model's and loss's
        `Options` (e.g. `ResNetFlow.Options`: blocks, width, activation). An option that belongs to
        another model or loss, or an unknown one, is an error naming the valid ones.
    """
    source, target = _load(source), _load(target)
    threads = options.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ShapeflowError(f"register(): threads must be an int >= 1 (or None: automatic), got {threads!r}")
    if isinstance(source, Image) or isinstance(target, Image):
        if not (isinstance(source, Image) and isinstance(target, Image)):
            raise ShapeflowError("register(): source and target must both be images, or both shapes")
        if loss == "learned":   # its feature files name networks that shapeflow.learn registers
            from . import learn  # noqa: F401
        with torch_threads(auto_threads(target.data[0].numel(), threads)):
            return register_images(source, target, model or "svf", loss or "ssd", **options)
    array_in = not isinstance(source, PointCloud)
    src = source if isinstance(source, PointCloud) else PointCloud(check_points(source, "source"))
    tgt = target if isinstance(target, PointCloud) else PointCloud(check_points(target, "target"))
    with torch_threads(auto_threads(len(src) + len(tgt), threads)):
        return register_shapes(src, tgt, model or "resnet", loss, array_in=array_in, **options)
