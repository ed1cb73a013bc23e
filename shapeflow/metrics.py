"""Accuracy figures of a registration, in the shapes' own units.

Point sets: `points: (N, d)`. Everything returns plain Python floats for reports.
Images: integer label maps `(*S)` (0 = background) with `spacing` in mm per axis of S, and
displacement fields `(d, *S)`; per-label figures come as `{label: float}`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure
from scipy.spatial import cKDTree

from .errors import ShapeflowError
from .regularizers import folding_statistics, jacobian_determinant

__all__ = ["chamfer_distance", "hausdorff_distance", "rmse", "jacobian_determinants",
           "min_jacobian_determinant", "flipped_triangles_percent",
           "dice_per_label", "hausdorff95_per_label", "target_registration_error", "jacobian_statistics"]


def _nn_distances(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    a_np, b_np = a.detach().cpu().double().numpy(), b.detach().cpu().double().numpy()
    workers = torch.get_num_threads()
    return cKDTree(b_np).query(a_np, workers=workers)[0], cKDTree(a_np).query(b_np, workers=workers)[0]


def chamfer_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Symmetric mean nearest-neighbour distance `(mean_a d(a, B) + mean_b d(b, A)) / 2`."""
    d_ab, d_ba = _nn_distances(a, b)
    return float((d_ab.mean() + d_ba.mean()) / 2)


def hausdorff_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """`max(max_a d(a, B), max_b d(b, A))`."""
    d_ab, d_ba = _nn_distances(a, b)
    return float(max(d_ab.max(), d_ba.max()))


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean squared distance between corresponding points `a, b: (N, d)`."""
    return float((a - b).pow(2).sum(1).mean().sqrt())


def jacobian_determinants(phi: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor) -> torch.Tensor:
    """`det D phi(x)` at each of `points: (N, d)` -> `(N,)`, by automatic differentiation."""
    x = points.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = phi(x)
        rows = [torch.autograd.grad(y[:, i].sum(), x, retain_graph=i < y.shape[1] - 1)[0]
                for i in range(y.shape[1])]
    return torch.linalg.det(torch.stack(rows, dim=1)).detach()   # (N, d, d) -> (N,)


def bounding_box_grid(points: torch.Tensor, per_axis: int = 12, margin: float = 0.05) -> torch.Tensor:
    """A regular grid `(per_axis**d, d)` over the bounding box of `points`, grown by `margin`."""
    lo, hi = points.min(0).values, points.max(0).values
    pad = margin * (hi - lo)
    axes = [torch.linspace(float(l - p), float(h + p), per_axis, dtype=points.dtype, device=points.device)
            for l, h, p in zip(lo, hi, pad)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, points.shape[1])


def min_jacobian_determinant(phi, points: torch.Tensor, per_axis: int = 12) -> float:
    """The smallest `det D phi` over a grid on the bounding box of `points` and the points themselves."""
    grid = torch.cat([bounding_box_grid(points, per_axis), points.detach()])
    return float(jacobian_determinants(phi, grid).min())


def flipped_triangles_percent(phi, vertices: torch.Tensor, faces: torch.Tensor) -> float:
    """Percentage of triangles whose orientation the map reverses.

    An orientation-preserving map sends a small triangle's normal `n` to a positive multiple of
    `J^{-T} n` (J at the triangle's centroid). A warped triangle whose normal points against that
    direction has flipped: where the map folds (det J < 0), or where it bends a triangle so much
    between its vertices that the triangle turns over. A mirror flips every triangle.
    """
    def normals(v):
        tri = v[faces]                                                   # (F, 3, 3)
        return torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])

    warped = phi(vertices).detach()
    centroids = vertices[faces].mean(1).detach().requires_grad_(True)
    with torch.enable_grad():
        y = phi(centroids)
        jac = torch.stack([torch.autograd.grad(y[:, i].sum(), centroids, retain_graph=i < 2)[0]
                           for i in range(3)], dim=1)                  # (F, 3, 3)
    expected = (torch.linalg.inv(jac).transpose(1, 2) @ normals(vertices.detach())[..., None])[..., 0]
    return float(((normals(warped) * expected).sum(1) < 0).double().mean() * 100)


# ----------------------------------------------------------------------------- images


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
