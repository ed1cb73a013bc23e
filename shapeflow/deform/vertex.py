"""One displacement per point of a mesh or a cloud: `model="displacement"` for shapes.

`PointDisplacement` holds the points it was fitted on, `reference_points: (N, d)`, and their
displacements `u: (N, d)`; `phi(x_i) = x_i + u_i` there. Any other point takes a displacement
interpolated from the nearest fitted points (`interpolation_weights`):

* on a mesh, barycentric weights on the closest triangle among those around its 3 nearest
  vertices (the point projected onto each candidate triangle, the projection clipped to it), so
  the map is piecewise linear on the surface and constant along its normals;
* on a cloud, inverse squared distance weights over its 4 nearest fitted points.

Points far from the fitted ones therefore move like their nearest neighbours: the field is only
known where it was fitted. The energy is the diffusion of u with the shape's scale-free Laplacian
(`shapeflow.regularizers.shape_laplacian`). The field is fitted by non-rigid ICP
(`shapeflow.pipelines.shape_icp`), not by Adam: `fitted_by = "gauss-newton"`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InverseError, ShapeflowError
from ..kernels import PointIndex
from ..regularizers import SHAPE_LAPLACIANS, diffusion, shape_laplacian
from .base import Deformation, register_deformation

__all__ = ["PointDisplacement", "interpolation_weights", "vertex_rings"]

#: fitted points a cloud's interpolation averages over
CLOUD_NEIGHBOURS = 4
#: a mesh's interpolation looks for the closest triangle among those around this many nearest vertices
RING_VERTICES = 3


def vertex_rings(faces: torch.Tensor, n: int) -> torch.Tensor:
    """The faces around each vertex, `(n, R)` face indices padded with -1 (R the largest valence).

    faces: (F, 3) long."""
    vertex = faces.reshape(-1)
    face = torch.arange(faces.shape[0], device=faces.device).repeat_interleave(faces.shape[1])
    order = torch.argsort(vertex, stable=True)
    vertex, face = vertex[order], face[order]
    counts = torch.bincount(vertex, minlength=n)
    width = max(int(counts.max()) if counts.numel() else 1, 1)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(vertex.numel(), device=faces.device) - starts[vertex]
    rings = torch.full((n, width), -1, dtype=torch.long, device=faces.device)
    rings[vertex, slot] = face
    return rings


def _clipped_barycentric(p: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Barycentric weights `(..., 3)` of `p: (..., d)` projected onto the plane of `tri: (..., 3, d)`,
    negative weights clipped to 0 and the rest renormalised (a point inside the triangle)."""
    a, b, c = tri.unbind(-2)
    e0, e1, v = b - a, c - a, p - a
    d00, d01, d11 = (e0 * e0).sum(-1), (e0 * e1).sum(-1), (e1 * e1).sum(-1)
    d20, d21 = (v * e0).sum(-1), (v * e1).sum(-1)
    denom = d00 * d11 - d01 * d01
    tiny = 1e-20 * (d00 * d11).clamp_min(1e-300)
    denom = torch.where(denom.abs() > tiny, denom, torch.full_like(denom, float("inf")))   # degenerate: vertex a
    wb = (d11 * d20 - d01 * d21) / denom
    wc = (d00 * d21 - d01 * d20) / denom
    weights = torch.stack([1 - wb - wc, wb, wc], -1).clamp_min(0)
    return weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)


def interpolation_weights(reference: torch.Tensor, faces: torch.Tensor | None, points: torch.Tensor,
                          index: PointIndex | None = None, rings: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """How `points: (P, d)` take a field known at `reference: (N, d)`: `(indices (P, k), weights (P, k))`
    with `field(points) = sum_k weights * field[indices]` (weights sum to 1, differentiable in points).

    faces: (F, 3) for a mesh (barycentric on the closest triangle around the 3 nearest vertices,
    k = 3), None for a cloud (inverse squared distances over the 4 nearest points). index, rings:
    a `PointIndex` of `reference` and `vertex_rings(faces)`, when the caller keeps them.
    """
    index = index if index is not None else PointIndex(reference)
    if faces is None or faces.numel() == 0:
        dist, near = index.query(points, CLOUD_NEIGHBOURS)                       # (P, k)
        squared = (points[:, None, :] - reference[near]).square().sum(-1)        # differentiable
        extent = float((reference.max(0).values - reference.min(0).values).max())
        weights = 1.0 / (squared + (1e-9 * extent) ** 2)
        return near, weights / weights.sum(1, keepdim=True)
    _, nearest = index.query(points, RING_VERTICES)
    rings = rings if rings is not None else vertex_rings(faces, reference.shape[0])
    candidates = rings[nearest].reshape(len(points), -1)                         # (P, k R)
    valid = candidates >= 0
    corners = faces[candidates.clamp_min(0)]                                     # (P, R, 3)
    tri = reference[corners]                                                     # (P, R, 3, d)
    weights = _clipped_barycentric(points[:, None, :], tri)                      # (P, R, 3)
    projected = (weights[..., None] * tri).sum(-2)
    distance = (projected - points[:, None, :]).square().sum(-1).detach()
    distance = torch.where(valid, distance, torch.full_like(distance, float("inf")))
    best = distance.argmin(1)                                                    # (P,)
    rows = torch.arange(len(points), device=points.device)
    chosen, chosen_weights = corners[rows, best], weights[rows, best]
    isolated = ~valid.any(1)                                                     # a vertex in no face
    if bool(isolated.any()):
        chosen = torch.where(isolated[:, None], nearest[:, :1].expand(-1, 3), chosen)
        chosen_weights = torch.where(isolated[:, None], torch.tensor([1.0, 0.0, 0.0], dtype=points.dtype,
                                                                     device=points.device), chosen_weights)
    return chosen, chosen_weights


@register_deformation
class PointDisplacement(Deformation):
    """Per-point displacements `u: (N, d)` on the points it is fitted on (see the module docstring).

    dim: 2 or 3; laplacian: the regulariser's Laplacian ("auto": cotangent on a mesh, kNN on a
    cloud; "cotangent", "uniform", "knn"); neighbors: k of the kNN graph.
    """

    fitted_by: ClassVar[str] = "gauss-newton"
    default_loss: ClassVar[str] = "chamfer"
    #: interpolated off the points (constant along a mesh's normals): det J there says nothing
    ambient_jacobian: ClassVar[bool] = False
    data_sized = ("reference_points", "displacements", "faces")

    @dataclass
    class Options:
        """`register()` options of `model="displacement"` (non-rigid ICP, `pipelines/shape_icp.py`)."""

        laplacian: str = "auto"          # "auto" (cotangent on a mesh, knn on a cloud), "cotangent", "uniform", "knn"
        neighbors: int = 8               # k of the kNN graph Laplacian
        bending: float = 0.3             # weight of u^T L M^-1 L u, relative to the diffusion weight
        stiffness: float = 100.0         # the first stage's weight, in multiples of `regularization`
        stages: int = 5                  # stiffness stages, geometric from stiffness x regularization down
        point_to_plane: float = 0.0      # meshes: weight of the point-to-plane term (sliding along the target)
        normal_angle: float | None = 60.0  # meshes: reject pairs whose normals differ by more (degrees)
        reject: float | None = None      # reject pairs farther than this many times their median distance (None: keep all)
        preconditioner: str = "auto"     # CG preconditioner: "factor" (sparse LU, CPU), "jacobi", "amg"; auto: factor to 60k points
        coarse_points: int | None = 5000  # fit a subsample of this many points first (None: never)

    def __init__(self, dim: int, laplacian: str = "auto", neighbors: int = 8):
        super().__init__()
        if dim not in (2, 3):
            raise ShapeflowError(f"PointDisplacement: dim must be 2 or 3, got {dim}")
        if laplacian not in SHAPE_LAPLACIANS:
            raise ShapeflowError(f"PointDisplacement: unknown laplacian {laplacian!r}; "
                                 f"valid names: {', '.join(SHAPE_LAPLACIANS)}")
        self.dim, self.laplacian, self.neighbors = dim, laplacian, int(neighbors)
        self.register_buffer("reference_points", torch.zeros(0, dim))
        self.register_buffer("faces", torch.zeros(0, 3, dtype=torch.long))
        self.displacements = nn.Parameter(torch.zeros(0, dim))
        self._lookup: tuple[PointIndex, torch.Tensor | None] | None = None

    @classmethod
    def build(cls, domain: Any, options: "PointDisplacement.Options | None" = None, seed: int = 0):
        options = options or cls.Options()
        return cls(domain, options.laplacian, options.neighbors)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "laplacian": self.laplacian, "neighbors": self.neighbors}

    def prepare(self, points: torch.Tensor, cells: torch.Tensor | None = None) -> None:
        """Fit on `points: (N, d)` (zero displacements); `cells`: the mesh's faces (F, 3), or None."""
        self.reference_points = points.detach().clone()
        faces = cells if cells is not None and cells.numel() and cells.shape[1] == 3 and self.dim == 3 else None
        self.faces = (faces.to(points.device).long() if faces is not None
                      else torch.zeros(0, 3, dtype=torch.long, device=points.device))
        self.displacements = nn.Parameter(torch.zeros_like(self.reference_points))
        self._lookup = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._lookup = None

    def _weights(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_points.numel() == 0:
            raise ShapeflowError("PointDisplacement: not fitted (no reference points); call prepare() first")
        if self._lookup is None:
            mesh = self.faces.numel() > 0
            self._lookup = (PointIndex(self.reference_points),
                            vertex_rings(self.faces, len(self.reference_points)) if mesh else None)
        index, rings = self._lookup
        return interpolation_weights(self.reference_points, self.faces if rings is not None else None, points,
                                     index, rings)

    def displacement(self, points: torch.Tensor) -> torch.Tensor:
        """`u(points)`: `(P, d) -> (P, d)`, interpolated from the fitted points."""
        near, weights = self._weights(points)
        return (weights[..., None] * self.displacements[near]).sum(1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return points + self.displacement(points)

    def energy(self, points: torch.Tensor | None = None) -> torch.Tensor:
        """`diffusion(u, L)` with the scale-free Laplacian of the fitted shape (no points) or of the
        kNN graph of `points: (P, d)` with u interpolated there."""
        if points is None:
            L, _ = shape_laplacian(self.reference_points, self.faces if self.faces.numel() else None,
                                   self.laplacian, self.neighbors)
            return diffusion(self.displacements, L)
        L, _ = shape_laplacian(points.detach(), None, "knn", self.neighbors)
        return diffusion(self.displacement(points), L.to(points.dtype))

    def inverse(self, points: torch.Tensor, iterations: int = 30) -> torch.Tensor:
        """`phi^-1(points)`: first the displacements interpolated on the *moved* points `x + u` (with
        the same faces) and subtracted, which is exact at the moved points and, on a mesh, on the
        whole moved surface (the map is piecewise linear there); then the fixed point
        `x <- y - u(x)` while it lowers the residual `|phi(x) - y|`. `InverseError` if a residual
        stays above 1e-4 of the shape's extent (where the map folds)."""
        moved = (self.reference_points + self.displacements).detach()
        faces = self.faces if self.faces.numel() else None
        near, weights = interpolation_weights(moved, faces, points)
        x = points - (weights[..., None] * self.displacements[near]).sum(1)
        extent = float((moved.max(0).values - moved.min(0).values).max())
        residual = (self.forward(x) - points).norm(dim=1)
        for _ in range(iterations):
            if not len(x) or float(residual.max()) <= 1e-7 * extent:
                break
            candidate = points - self.displacement(x)
            candidate_residual = (self.forward(candidate) - points).norm(dim=1)
            better = candidate_residual < residual
            if not bool(better.any()):
                break
            x = torch.where(better[:, None], candidate, x)
            residual = torch.where(better, candidate_residual, residual)
        if len(x) and float(residual.max()) > 1e-4 * extent:
            raise InverseError(f"PointDisplacement.inverse(): {int((residual > 1e-4 * extent).sum())} point(s) "
                               f"not inverted (largest residual {float(residual.max()):.3g}, extent {extent:.3g})")
        return x
