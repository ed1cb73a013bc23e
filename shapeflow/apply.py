"""Applying a saved deformation: shapes (meshes, clouds, landmarks) by mapping their points, images
by resampling them on a reference grid."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .deform.base import Deformation
from .errors import ShapeflowError
from .grids import Grid, sample
from .shapes import Image, PointCloud

__all__ = ["warp", "warp_shape", "warp_image", "is_label_like", "INTERPOLATIONS"]


def _where(obj: Any) -> str:
    return f"{obj.source}: " if getattr(obj, "source", None) else ""


def warp_shape(deformation: Deformation, shape: PointCloud, inverse: bool = False) -> PointCloud:
    """`shape` with its points `(N, d)` mapped by `deformation` (or its inverse); faces are unchanged."""
    if shape.dim != deformation.dim:
        raise ShapeflowError(f"{_where(shape)}shape is {shape.dim}D but the deformation is {deformation.dim}D")
    points = shape.points.to(deformation.device, deformation.dtype)
    with torch.no_grad():
        moved = deformation.inverse(points) if inverse else deformation(points)
    return dataclasses.replace(shape.with_points(moved.cpu().to(shape.points.dtype)), source=None)


def _grid_of(deformation: Deformation) -> Grid | None:
    """The grid a deformation lives on (the fixed image's, for an image registration), if any."""
    for module in deformation.modules():
        grid = getattr(module, "grid", None)
        if isinstance(grid, Grid):
            return grid
    return None


#: how `warp_image` interpolates: "linear" (bi/trilinear) or "nearest" (label maps)
INTERPOLATIONS = ("linear", "nearest")


def is_label_like(image: Image) -> bool:
    """True when `image` holds one channel of whole numbers (a label map, or any integer image):
    `warp_image` then resamples it by nearest neighbour unless told otherwise."""
    data = image.data
    return data.shape[0] == 1 and bool(torch.equal(data, data.round()))


def warp_image(deformation: Deformation, image: Image, reference: Image | None = None,
               interpolation: str | None = None) -> Image:
    """`image` (in the moving image's space) resampled on the grid of `reference` (the fixed image)
    through `deformation`, which maps fixed world points into the moving image as an image
    registration's does: `warped(x) = image(phi(x))`. `image.data: (C, *S)` -> `(C, *S_ref)`.

    reference: None takes the grid the deformation lives on (a displacement or velocity field);
    a purely affine deformation has none, so it needs one.
    interpolation: "linear" or "nearest"; None picks "nearest" for a one-channel image of whole
    numbers (`is_label_like`: a label map keeps its labels, as antsApplyTransforms'
    `-n NearestNeighbor`), else "linear". A nearest-neighbour result of whole numbers also carries
    itself as `labels`, so NIfTI writes it as integers. An image's own labels: nearest neighbour.
    """
    if image.dim != deformation.dim:
        raise ShapeflowError(f"{_where(image)}image is {image.dim}D but the deformation is {deformation.dim}D")
    if interpolation is None:
        interpolation = "nearest" if is_label_like(image) else "linear"
    if interpolation not in INTERPOLATIONS:
        raise ShapeflowError(f"warp(): unknown interpolation {interpolation!r}; "
                             f"choose from {', '.join(INTERPOLATIONS)}")
    if reference is None:
        grid = _grid_of(deformation)
        if grid is None:
            raise ShapeflowError(f"{_where(image)}this deformation holds no grid; give the fixed image as the "
                                 "reference to resample on (--reference)")
    else:
        if reference.dim != image.dim:
            raise ShapeflowError(f"{_where(reference)}reference is {reference.dim}D but the image is {image.dim}D")
        grid = Grid.of(reference)
    dtype, device = deformation.dtype, deformation.device
    with torch.no_grad():
        points = grid.points(dtype, device)
        where = deformation(points.reshape(-1, grid.dim)).reshape(points.shape)
        if interpolation == "nearest":   # in float64: labels up to 2^53 survive exactly
            data = sample(image.data.to(device, torch.float64), Grid.of(image), where.double(), mode="nearest").cpu()
        else:
            data = sample(image.data.to(device, dtype), Grid.of(image), where).cpu()
        labels = None
        if image.labels is not None:
            labels = sample(image.labels[None].to(device, dtype), Grid.of(image), where, mode="nearest")[0]
            labels = labels.round().long().cpu()
        elif interpolation == "nearest" and is_label_like(image):
            labels = data[0].round().long()
    return Image(data.to(image.data.dtype), grid.spacing, grid.origin, grid.direction, labels=labels)


def warp(deformation: Deformation, obj: PointCloud | Image, *, inverse: bool = False,
         reference: Image | None = None, interpolation: str | None = None) -> PointCloud | Image:
    """Apply `deformation` to a shape (`warp_shape`) or an image (`warp_image`)."""
    if isinstance(obj, Image):
        if inverse:
            raise ShapeflowError(f"{_where(obj)}images are warped by resampling on the fixed grid; --inverse "
                                 "applies to shapes (points) only")
        return warp_image(deformation, obj, reference, interpolation)
    if reference is not None:
        raise ShapeflowError(f"{_where(obj)}a reference grid applies to images only")
    if interpolation is not None:
        raise ShapeflowError(f"{_where(obj)}interpolation applies to images only")
    return warp_shape(deformation, obj, inverse=inverse)
