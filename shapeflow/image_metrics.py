"""Figures reported after an image registration: intensity error, label overlap (Dice, HD95),
landmark error (TRE), and Jacobian-determinant statistics of the map on the fixed grid."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import metrics
from .errors import ShapeflowError
from .grids import Grid, sample
from .shapes import Image

__all__ = ["image_registration_metrics", "attach_labels", "as_landmarks"]


def attach_labels(image: Image, labels: Any, name: str) -> Image:
    """`image` with the label map `labels` (a path, an `Image` or an integer array on the same grid)."""
    if labels is None:
        return image
    from .io import read

    if not isinstance(labels, (Image, torch.Tensor, np.ndarray)):
        labels = read(labels, kind="image")
    if isinstance(labels, Image):
        same = labels.shape == image.shape and torch.allclose(labels.index_to_world, image.index_to_world, atol=1e-3)
        if not same:
            raise ShapeflowError(f"{labels.source or name}: label map grid {labels.shape} (spacing "
                                 f"{[round(s, 4) for s in labels.spacing.tolist()]}) does not match its image "
                                 f"{image.shape} (spacing {[round(s, 4) for s in image.spacing.tolist()]})")
        labels = labels.data[0]
    labels = torch.as_tensor(np.asarray(labels)).round().long()
    return Image(image.data, image.spacing, image.origin, image.direction, labels=labels, source=image.source)


def as_landmarks(points: Any, name: str, dim: int) -> torch.Tensor | None:
    """(K, d) world points from a path or an array, or None."""
    if points is None:
        return None
    from .io import read
    from .shapes import check_points

    if not isinstance(points, (torch.Tensor, np.ndarray, list)):
        return read(points, kind="landmarks").points.double()
    return check_points(points, name, min_points=1, dims=(dim,)).double()


def _on_fixed_grid(moving: Image, fixed: Image, device, dtype) -> torch.Tensor:
    points = Grid.of(fixed).points(dtype, device)
    return sample(moving.data.to(device, dtype), Grid.of(moving), points).cpu()


def image_registration_metrics(moving: Image, fixed: Image, warped: Image, deformation, opts, device, dtype) -> dict:
    before = _on_fixed_grid(moving, fixed, device, dtype)
    out: dict[str, Any] = {}
    if before.shape[0] == fixed.data.shape[0]:
        out["mse_before"] = float((before - fixed.data).pow(2).mean())
        out["mse_after"] = float((warped.data - fixed.data).pow(2).mean())
    grid = Grid.of(fixed)
    with torch.no_grad():
        points = grid.points(dtype, device)
        displacement = deformation(points.reshape(-1, grid.dim)).reshape(points.shape) - points   # (*S, d) world
        # components along the grid axes, so finite differences along the axes give det(D psi)
        local = (displacement.double() @ grid.direction.to(device)).movedim(-1, 0).cpu()
    stats = metrics.jacobian_statistics(local, grid.spacing.tolist())
    out.update({f"jacobian_{k}": v for k, v in stats.items()})
    if moving.labels is not None and fixed.labels is not None:
        identity = sample(moving.labels[None].to(device, dtype), Grid.of(moving), points, mode="nearest")[0].round().long().cpu()
        out["dice_before"] = metrics.dice_per_label(identity, fixed.labels)
        out["dice"] = metrics.dice_per_label(warped.labels, fixed.labels)
        out["dice_mean"] = float(np.mean(list(out["dice"].values()))) if out["dice"] else None
        out["hd95"] = metrics.hausdorff95_per_label(warped.labels, fixed.labels, grid.spacing.tolist())
    moving_marks = as_landmarks(opts.landmarks_moving, "landmarks_moving", fixed.dim)
    fixed_marks = as_landmarks(opts.landmarks_fixed, "landmarks_fixed", fixed.dim)
    if (moving_marks is None) != (fixed_marks is None):
        raise ShapeflowError("register(): give both landmarks_moving and landmarks_fixed, or neither")
    if moving_marks is not None:
        if moving_marks.shape != fixed_marks.shape:
            raise ShapeflowError(f"register(): {len(moving_marks)} moving landmarks but {len(fixed_marks)} fixed ones")
        with torch.no_grad():
            mapped = deformation(fixed_marks.to(device, dtype)).double().cpu()
        out["tre_before"] = metrics.target_registration_error(fixed_marks, moving_marks)
        out["tre"] = metrics.target_registration_error(mapped, moving_marks)
    return out
