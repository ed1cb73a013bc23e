"""Figures reported after an image registration: intensity error, label overlap (Dice, HD95),
landmark error (TRE), and Jacobian-determinant statistics of the map on the fixed grid.

Integer label maps `(*S)` (0 = background) with `spacing` in mm per axis of S, displacement
fields `(d, *S)`; per-label figures come as `{label: float}`; everything else as Python floats.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ShapeflowError
from ..grids import Grid, sample
from ..regularizers import folding_statistics, jacobian_determinant
from ..shapes import Image

__all__ = ["image_registration_metrics", "moving_on_fixed_grid", "dice_per_label", "hausdorff95_per_label",
           "target_registration_error", "jacobian_statistics"]


def _label_array(who: str, name: str, labels) -> np.ndarray:
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer) or array.ndim == 0:
        raise ShapeflowError(f"{who}(): {name} must be an integer label map (*S), got dtype "
                             f"{array.dtype} and shape {array.shape}")
    if array.size and array.min() < 0:
        raise ShapeflowError(f"{who}(): {name} must hold labels >= 0, got {array.min()}")
    return array


def _label_pair(who: str, labels_a, labels_b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _label_array(who, "labels_a", labels_a), _label_array(who, "labels_b", labels_b)
    if a.shape != b.shape:
        raise ShapeflowError(f"{who}(): labels_a {a.shape} and labels_b {b.shape} must be on the same grid")
    return a, b


def _foreground(a: np.ndarray, b: np.ndarray) -> list[int]:
    return [int(k) for k in np.union1d(np.unique(a), np.unique(b)) if k != 0]


def dice_per_label(labels_a, labels_b) -> dict[int, float]:
    """Dice overlap `2 |A_k & B_k| / (|A_k| + |B_k|)` of each foreground label k.

    labels_a, labels_b: integer label maps `(*S)` (tensors or arrays) on the same grid. Every
    label > 0 present in either map gets an entry (0.0 when it is missing from one); a label
    absent from both has none. Returns `{label: dice}` in increasing label order.
    """
    a, b = _label_pair("dice_per_label", labels_a, labels_b)
    a, b = a.ravel().astype(np.int64), b.ravel().astype(np.int64)
    length = int(max(a.max(initial=0), b.max(initial=0))) + 1
    size_a, size_b = np.bincount(a, minlength=length), np.bincount(b, minlength=length)
    overlap = np.bincount(a[a == b], minlength=length)
    return {k: float(2 * overlap[k] / (size_a[k] + size_b[k])) for k in _foreground(a, b)}


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of `mask` with a face neighbour outside it (or outside the image)."""
    from scipy.ndimage import binary_erosion, generate_binary_structure     # on first use: slow to import

    return mask & ~binary_erosion(mask, structure=generate_binary_structure(mask.ndim, 1), border_value=0)


def hausdorff95_per_label(labels_a, labels_b, spacing: Sequence[float]) -> dict[int, float]:
    """95th percentile Hausdorff distance (HD95, in mm) of each foreground label.

    labels_a, labels_b: integer label maps `(*S)` on the same grid; spacing: voxel size in mm,
    one number per axis of S. The surface of a label is its voxels with a face neighbour outside
    it (binary erosion, the image border counting as outside). Each surface voxel of A gets its
    distance to the nearest surface voxel of B (Euclidean, in mm, by
    `scipy.ndimage.distance_transform_edt(..., sampling=spacing)`) and the other way round; HD95
    is the 95th percentile (linear interpolation) of both sets pooled, as in medpy's `hd95`.
    Missing labels: a label absent from both maps has no entry, a label present in one map only
    gets `inf` (no surface to measure against). Returns `{label: hd95}` in increasing order.
    """
    a, b = _label_pair("hausdorff95_per_label", labels_a, labels_b)
    if isinstance(spacing, (int, float)) or len(spacing) != a.ndim or any(not float(h) > 0 for h in spacing):
        raise ShapeflowError(f"hausdorff95_per_label(): spacing must be {a.ndim} positive numbers "
                             f"(mm per axis of S), got {spacing!r}")
    sampling = [float(h) for h in spacing]
    result = {}
    for k in _foreground(a, b):
        mask_a, mask_b = a == k, b == k
        if not mask_a.any() or not mask_b.any():
            result[k] = float("inf")
            continue
        # Work in the bounding box of both, one voxel wider where the image allows: the
        # erosion is unchanged and the distance transform is exact Euclidean, not geodesic.
        box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(mask_a | mask_b))
        surface_a, surface_b = _surface(mask_a[box]), _surface(mask_b[box])
        from scipy.ndimage import distance_transform_edt

        to_b = distance_transform_edt(~surface_b, sampling=sampling)[surface_a]
        to_a = distance_transform_edt(~surface_a, sampling=sampling)[surface_b]
        result[k] = float(np.percentile(np.concatenate([to_b, to_a]), 95))
    return result


def target_registration_error(points_a: torch.Tensor, points_b: torch.Tensor) -> dict:
    """Target registration error between corresponding landmarks `points_a, points_b: (K, d)` in mm.

    Returns `{"mean", "median", "max": float, "per_point": list of K floats}`, the Euclidean
    distances `|a_i - b_i|`.
    """
    a, b = (np.asarray(p.detach().cpu().double() if isinstance(p, torch.Tensor) else p, dtype=float)
            for p in (points_a, points_b))
    if a.ndim != 2 or a.shape != b.shape or len(a) == 0:
        raise ShapeflowError(f"target_registration_error(): points_a {a.shape} and points_b {b.shape} "
                             "must both be (K, d) with the same K >= 1 and d")
    errors = np.linalg.norm(a - b, axis=1)
    return {"mean": float(errors.mean()), "median": float(np.median(errors)),
            "max": float(errors.max()), "per_point": [float(e) for e in errors]}


def jacobian_statistics(displacement: torch.Tensor, spacing: float | Sequence[float]) -> dict[str, float]:
    """Folding statistics of `x -> x + u(x)` for a displacement field `u: (d, *S)` in mm.

    spacing: voxel size in mm, one number or one per axis of S. The determinants come from
    `shapeflow.regularizers.jacobian_determinant` (central differences) and the summary from
    `folding_statistics`: `{"percent_negative": % of voxels with det J <= 0, "min": min det J,
    "std_log": standard deviation of log det J (clipped at 1e-9)}`.
    """
    if not isinstance(displacement, torch.Tensor) or displacement.dim() not in (3, 4) \
            or displacement.shape[0] != displacement.dim() - 1:
        got = tuple(displacement.shape) if isinstance(displacement, torch.Tensor) else type(displacement).__name__
        raise ShapeflowError("jacobian_statistics(): displacement must be a field (d, *S) with "
                             f"d = len(S) in {{2, 3}}, got {got}")
    return folding_statistics(jacobian_determinant(displacement.detach(), spacing))


def moving_on_fixed_grid(moving: Image, fixed: Image, device, dtype) -> torch.Tensor:
    """The moving image resampled on the fixed grid by the identity map (world to world): (C, *S)."""
    points = Grid.of(fixed).points(dtype, device)
    return sample(moving.data.to(device, dtype), Grid.of(moving), points).cpu()


def _valid_image(image: Image) -> Image:
    """`image`'s valid voxels as a one-channel 0/1 image on its grid."""
    return image.with_data(image.valid[None].to(image.data.dtype))


def _both_valid(fixed: Image, other: torch.Tensor | None) -> torch.Tensor | None:
    """The voxels `(*S)` of the fixed grid holding data in the fixed image and in `other` (None: all)."""
    if fixed.valid is None:
        return other
    return fixed.valid if other is None else fixed.valid & other


def _mean_square(difference: torch.Tensor, valid: torch.Tensor | None) -> float:
    """mean of `difference: (C, *S)` squared over the voxels where `valid` (None: all)."""
    return float(difference.pow(2).mean() if valid is None else difference[:, valid].pow(2).mean())


def image_registration_metrics(moving: Image, fixed: Image, warped: Image, deformation, device, dtype,
                               moving_marks: torch.Tensor | None = None, fixed_marks: torch.Tensor | None = None) -> dict:
    """MSE before/after, Jacobian statistics of the map on the fixed grid, Dice/HD95 per label when
    both images carry labels, TRE when landmarks `(K, d)` (world, moving and fixed) are given:
    `tre`, `tre_before` (`target_registration_error`) and `landmark_error` = `{"mean", "max",
    "mean_before", "max_before"}` in mm (the layout the shape pipeline reports too)."""
    before = moving_on_fixed_grid(moving, fixed, device, dtype)
    out: dict[str, Any] = {}
    if before.shape[0] == fixed.data.shape[0]:
        # over the voxels that hold data in both (NaN voxels of either image are left out)
        valid_before = _both_valid(fixed, moving_on_fixed_grid(_valid_image(moving), fixed, device, dtype)[0] >= 0.5
                                   if moving.valid is not None else None)
        out["mse_before"] = _mean_square(before - fixed.data, valid_before)
        out["mse_after"] = _mean_square(warped.data - fixed.data, _both_valid(fixed, warped.valid))
    grid = Grid.of(fixed)
    with torch.no_grad():
        points = grid.points(dtype, device)
        displacement = deformation(points.reshape(-1, grid.dim)).reshape(points.shape) - points   # (*S, d) world
        # components along the grid axes, so finite differences along the axes give det(D psi)
        local = (displacement.double() @ grid.direction.to(device)).movedim(-1, 0).cpu()
    stats = jacobian_statistics(local, grid.spacing.tolist())
    out.update({f"jacobian_{k}": v for k, v in stats.items()})
    if moving.labels is not None and fixed.labels is not None:
        identity = sample(moving.labels[None].to(device, dtype), Grid.of(moving), points, mode="nearest")[0].round().long().cpu()
        out["dice_before"] = dice_per_label(identity, fixed.labels)
        out["dice"] = dice_per_label(warped.labels, fixed.labels)
        out["dice_mean"] = float(np.mean(list(out["dice"].values()))) if out["dice"] else None
        out["hd95"] = hausdorff95_per_label(warped.labels, fixed.labels, grid.spacing.tolist())
    if moving_marks is not None:
        with torch.no_grad():
            mapped = deformation(fixed_marks.to(device, dtype)).double().cpu()
        out["tre_before"] = target_registration_error(fixed_marks, moving_marks)
        out["tre"] = target_registration_error(mapped, moving_marks)
        out["landmark_error"] = {"mean": out["tre"]["mean"], "max": out["tre"]["max"],
                                 "mean_before": out["tre_before"]["mean"], "max_before": out["tre_before"]["max"]}
    return out
