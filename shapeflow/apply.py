"""Applying a fitted deformation to shapes: the same map for meshes, clouds and landmarks."""
from __future__ import annotations

import dataclasses

import torch

from .deform.base import Deformation
from .errors import ShapeflowError
from .shapes import PointCloud

__all__ = ["warp_shape"]


def warp_shape(deformation: Deformation, shape: PointCloud, inverse: bool = False) -> PointCloud:
    """`shape` with its points mapped by `deformation` (or its inverse); faces are unchanged."""
    if shape.dim != deformation.dim:
        where = f"{shape.source}: " if shape.source else ""
        raise ShapeflowError(f"{where}shape is {shape.dim}D but the deformation is {deformation.dim}D")
    floats = [t for t in deformation.parameters()] + [b for b in deformation.buffers() if b.is_floating_point()]
    ref = floats[0] if floats else torch.zeros(())
    points = shape.points.to(ref.device, ref.dtype)
    with torch.no_grad():
        moved = deformation.inverse(points) if inverse else deformation(points)
    return dataclasses.replace(shape, points=moved.cpu().to(shape.points.dtype), source=None)
