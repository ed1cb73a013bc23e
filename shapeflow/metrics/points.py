"""Accuracy figures of a shape registration, in the shapes' own units.

Point sets: `points: (N, d)`. Everything returns plain Python floats for reports.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.spatial import cKDTree


__all__ = ["landmark_errors", "chamfer_distance", "hausdorff_distance", "rmse", "jacobian_determinants",
           "min_jacobian_determinant", "flipped_triangles_percent"]


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


def landmark_errors(phi, source: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Landmark error before and after a map, in the data's units: `source, target: (K, d)`
    corresponding landmarks, `phi` moving the source's onto the target's. Returns `{"mean", "max"}`
    of `|phi(source_k) - target_k|` and `{"mean_before", "max_before"}` of `|source_k - target_k|`."""
    with torch.no_grad():
        after = (phi(source) - target).norm(dim=1)
    before = (source - target).norm(dim=1)
    return {"mean": float(after.mean()), "max": float(after.max()),
            "mean_before": float(before.mean()), "max_before": float(before.max())}
