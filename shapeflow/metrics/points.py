"""Accuracy figures of a shape registration, in the shapes' own units.

Point sets: `points: (N, d)`. Everything returns plain Python floats for reports.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..kernels import nearest_distances

__all__ = ["landmark_errors", "surface_distances", "chamfer_distance", "hausdorff_distance", "rmse", "jacobian_determinants",
           "min_jacobian_determinant", "flipped_triangles_percent"]


def _nn_distances(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour distances a -> b `(N,)` and b -> a `(M,)`, float64."""
    return nearest_distances(a, b).numpy(), nearest_distances(b, a).numpy()


def chamfer_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Symmetric mean nearest-neighbour distance `(mean_a d(a, B) + mean_b d(b, A)) / 2`."""
    d_ab, d_ba = _nn_distances(a, b)
    return float((d_ab.mean() + d_ba.mean()) / 2)


def hausdorff_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """`max(max_a d(a, B), max_b d(b, A))`."""
    d_ab, d_ba = _nn_distances(a, b)
    return float(max(d_ab.max(), d_ba.max()))


def surface_distances(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """`{"chamfer", "hausdorff"}` of `chamfer_distance` and `hausdorff_distance` from one pair of
    KD-tree queries (the expensive part at a million points)."""
    d_ab, d_ba = _nn_distances(a, b)
    return {"chamfer": float((d_ab.mean() + d_ba.mean()) / 2), "hausdorff": float(max(d_ab.max(), d_ba.max()))}


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean squared distance between corresponding points `a, b: (N, d)`."""
    return float((a - b).pow(2).sum(1).mean().sqrt())


#: points per autograd / forward pass in the Jacobian metrics (bounds their memory)
CHUNK = 32768


def jacobian_determinants(phi: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor) -> torch.Tensor:
    """`det D phi(x)` at each of `points: (N, d)` -> `(N,)`, by automatic differentiation (in
    chunks of `CHUNK` points, so memory does not grow with N)."""
    out = []
    for start in range(0, len(points), CHUNK):
        x = points[start:start + CHUNK].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = phi(x)
            rows = [torch.autograd.grad(y[:, i].sum(), x, retain_graph=i < y.shape[1] - 1)[0]
                    for i in range(y.shape[1])]
        out.append(torch.linalg.det(torch.stack(rows, dim=1)).detach())   # (n, d, d) -> (n,)
    return torch.cat(out) if out else points.new_zeros(0)


def bounding_box_grid(points: torch.Tensor, per_axis: int = 12, margin: float = 0.05) -> torch.Tensor:
    """A regular grid `(per_axis**d, d)` over the bounding box of `points`, grown by `margin`."""
    lo, hi = points.min(0).values, points.max(0).values
    pad = margin * (hi - lo)
    axes = [torch.linspace(float(l - p), float(h + p), per_axis, dtype=points.dtype, device=points.device)
            for l, h, p in zip(lo, hi, pad)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, points.shape[1])


#: `min_jacobian_determinant` checks at most this many of the points themselves (a seeded sample)
MAX_JACOBIAN_POINTS = 20000


def min_jacobian_determinant(phi, points: torch.Tensor, per_axis: int = 12, at_points: float | None = None) -> float:
    """The smallest `det D phi` over a grid of `per_axis` nodes per axis on the bounding box of
    `points: (N, d)` and the points themselves (a seeded random `MAX_JACOBIAN_POINTS` of them when
    there are more); `per_axis=0`: the points only. `at_points`: the smallest at the points when
    the caller has it already (`register`'s fold check): only the grid is evaluated then."""
    points = points.detach()
    if len(points) > MAX_JACOBIAN_POINTS:
        keep = torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[:MAX_JACOBIAN_POINTS]
        points = points[keep.to(points.device)]
    if at_points is not None:
        if not per_axis:
            return float(at_points)
        return min(float(at_points), float(jacobian_determinants(phi, bounding_box_grid(points, per_axis)).min()))
    grid = torch.cat([bounding_box_grid(points, per_axis), points]) if per_axis else points
    return float(jacobian_determinants(phi, grid).min())


def flipped_triangles_percent(phi, vertices: torch.Tensor, faces: torch.Tensor,
                              warped: torch.Tensor | None = None) -> float:
    """Percentage of triangles whose orientation the map reverses.

    An orientation-preserving map sends a small triangle's normal `n` to a positive multiple of
    `J^{-T} n` (J at the triangle's centroid, by automatic differentiation, in chunks). A warped
    triangle whose normal points against that direction has flipped: where the map folds
    (det J < 0), or where it bends a triangle so much between its vertices that the triangle
    turns over. A mirror flips every triangle. `warped` = phi(vertices) is computed when not
    given. Above `MAX_JACOBIAN_POINTS` triangles, a seeded random sample of that many is checked
    (the percentage is then an estimate, within about 0.1 point at 1 %), so the cost is bounded.
    """
    vertices = vertices.detach()
    if len(faces) > MAX_JACOBIAN_POINTS:
        keep = torch.randperm(len(faces), generator=torch.Generator().manual_seed(0))[:MAX_JACOBIAN_POINTS]
        faces = faces[keep.to(faces.device)]
    with torch.no_grad():
        warped = phi(vertices) if warped is None else warped.detach()
    flipped = 0
    for chunk, centroids in zip(faces.split(CHUNK), vertices[faces].mean(1).split(CHUNK)):
        x = centroids.clone().requires_grad_(True)
        with torch.enable_grad():
            y = phi(x)
            jac = torch.stack([torch.autograd.grad(y[:, i].sum(), x, retain_graph=i < 2)[0]
                               for i in range(3)], dim=1)              # (f, 3, 3)
        tri, moved = vertices[chunk], warped[chunk]
        n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        n_w = torch.linalg.cross(moved[:, 1] - moved[:, 0], moved[:, 2] - moved[:, 0])
        expected = (torch.linalg.inv(jac.detach()).transpose(1, 2) @ n[..., None])[..., 0]
        flipped += int(((n_w * expected).sum(1) < 0).sum())
    return 100.0 * flipped / len(faces) if len(faces) else 0.0


def landmark_errors(phi, source: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Landmark error before and after a map, in the data's units: `source, target: (K, d)`
    corresponding landmarks, `phi` moving the source's onto the target's. Returns `{"mean", "max"}`
    of `|phi(source_k) - target_k|` and `{"mean_before", "max_before"}` of `|source_k - target_k|`."""
    with torch.no_grad():
        after = (phi(source) - target).norm(dim=1)
    before = (source - target).norm(dim=1)
    return {"mean": float(after.mean()), "max": float(after.max()),
            "mean_before": float(before.mean()), "max_before": float(before.max())}
