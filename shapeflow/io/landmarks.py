"""Landmark pairs given to `register(..., landmarks=(source_points, target_points))`.

Both kinds of data take the same option: a pair of `(K, d)` arrays or tensors, `Landmarks`, or
file paths (read with `read(path, kind="landmarks")`). `landmark_pair` checks the pair once and
names the file (or the argument) in a one-line error: a pair that is not two entries, a
different count K on the two sides, the wrong number of coordinates, NaN or infinite values.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ..errors import ShapeflowError
from ..shapes import Landmarks, check_points

__all__ = ["landmark_pair"]

WHO = "register()"


def _one(value: Any, role: str, dim: int) -> tuple[torch.Tensor, str]:
    """`(K, dim)` float64 points of one side and the name errors use (the file, or the argument)."""
    if isinstance(value, (str, os.PathLike)):
        from .files import read

        value = read(value, kind="landmarks")
    if isinstance(value, Landmarks) or hasattr(value, "points"):
        name = value.source or f"landmarks ({role})"
        points = check_points(value.points, "landmarks", value.source, min_points=1)
    else:
        name = f"landmarks ({role})"
        if not isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
            raise ShapeflowError(f"{WHO}: {name} must be a (K, d) array, Landmarks or a file path, "
                                 f"got {type(value).__name__}")
        points = check_points(value, name, min_points=1)
    if points.shape[1] != dim:
        raise ShapeflowError(f"{name}: landmarks have {points.shape[1]} coordinates per point, but the data are {dim}D")
    return points.detach().to(torch.float64), name


def landmark_pair(landmarks: Any, dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(source (K, d), target (K, d))` float64 tensors on the CPU, or None when `landmarks` is None.

    landmarks: `(source_points, target_points)`, each a `(K, d)` array or tensor, `Landmarks` or a
    path. dim: the data's dimension d. The source side is the one that moves (the moving image).
    """
    if landmarks is None:
        return None
    if isinstance(landmarks, (str, os.PathLike, np.ndarray, torch.Tensor)) or not hasattr(landmarks, "__len__") \
            or len(landmarks) != 2:
        raise ShapeflowError(f"{WHO}: landmarks must be a pair (source_points, target_points); got "
                             f"{type(landmarks).__name__}" + (f" of {len(landmarks)}" if hasattr(landmarks, '__len__')
                                                             and not isinstance(landmarks, (str, os.PathLike)) else ""))
    (source, source_name), (target, target_name) = _one(landmarks[0], "source", dim), _one(landmarks[1], "target", dim)
    if len(source) != len(target):
        raise ShapeflowError(f"{source_name}: {len(source)} source landmarks but {target_name} has {len(target)}; "
                             "they must correspond one to one")
    return source, target
