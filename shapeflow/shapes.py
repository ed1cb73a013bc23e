"""Plain data containers: `PointCloud` (N, d), `Mesh` (vertices (N, 3), faces (F, 3)), `Curve`
(points (N, d), edges (E, 2)), `Landmarks` (K, d).

A shape's `cells` are what connects its points: a `Mesh`'s faces, a `Curve`'s edges, None for a
point cloud (data terms such as the varifold read them).

What a file holds besides the coordinates travels with the shape, unchanged by a deformation:
`point_data` (per-point arrays: colours, scalars, normals), `columns` (a table's header), and for a
`Mesh` its `polygons` (quads and larger faces as read; `faces` is their triangulation) and
`cell_data` (per-face arrays). Normals are geometry, not data: a mesh's `point_data["normals"]`
is recomputed from its own vertices and faces whenever it is built (so a warped mesh carries the
warped normals), and `with_points` drops a point cloud's (they cannot be recomputed).

Each holds torch tensors, checks its input once at construction and names the problem
(and the file it came from, when known) in a one-line `ShapeflowError`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from .errors import ShapeflowError

__all__ = ["PointCloud", "Mesh", "Curve", "Landmarks", "Image", "Shape", "as_points"]


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def check_points(points: Any, name: str, source: str | None = None, min_points: int = 2,
                 dims: tuple[int, ...] = (2, 3)) -> torch.Tensor:
    """Return `points` as a floating (N, d) tensor, or raise a one-line `ShapeflowError`."""
    if isinstance(points, np.ndarray):
        points = torch.from_numpy(np.ascontiguousarray(points))
    if not isinstance(points, torch.Tensor):
        try:
            points = torch.as_tensor(np.asarray(points, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise ShapeflowError(f"{_where(source)}{name} is not an array of numbers ({exc})") from None
    if points.ndim != 2:
        raise ShapeflowError(f"{_where(source)}{name} must be an (N, d) array, got shape {tuple(points.shape)}")
    if points.shape[0] == 0:
        raise ShapeflowError(f"{_where(source)}{name} is empty (0 points)")
    if points.shape[1] not in dims:
        raise ShapeflowError(
            f"{_where(source)}{name} has {points.shape[1]} coordinates per point; expected {' or '.join(map(str, dims))}")
    if points.shape[0] < min_points:
        raise ShapeflowError(f"{_where(source)}{name} has {points.shape[0]} point(s); at least {min_points} are needed")
    if not points.is_floating_point():
        points = points.to(torch.get_default_dtype())
    if not torch.isfinite(points).all():
        bad = int((~torch.isfinite(points)).any(dim=1).sum())
        raise ShapeflowError(f"{_where(source)}{name} has {bad} point(s) with NaN or infinite coordinates")
    return points


def check_data(data: Any, rows: int, name: str, source: str | None = None) -> dict[str, np.ndarray]:
    """Return `data` as a new dict of NumPy arrays `(rows,)` or `(rows, k)`, or raise a one-line
    `ShapeflowError` (naming the file `source`, when known)."""
    where = _where(source)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ShapeflowError(f"{where}{name} must be a dict of arrays, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if not isinstance(key, str) or array.ndim not in (1, 2) or len(array) != rows or array.dtype == object:
            raise ShapeflowError(f"{where}{name}[{key!r}] must be an array of {rows} rows (one per "
                                 f"{'point' if name == 'point_data' else 'face'}), got shape {array.shape}")
        out[key] = array
    return out


@dataclass
class PointCloud:
    """A set of points. `points: (N, d)` with d = 2 or 3.

    point_data: per-point arrays `(N,)` or `(N, k)` read with the points (colours, scalars,
    "normals") and written back with them; columns: the header of the table the points came from
    (coordinate names and `point_data` names, in file order), written back as the header.
    """

    points: torch.Tensor
    #: the file the shape was read from (keyword only, so `Mesh(vertices, faces)` reads as it looks)
    source: str | None = field(default=None, compare=False, kw_only=True)
    point_data: dict[str, np.ndarray] = field(default_factory=dict, compare=False, kw_only=True, repr=False)
    columns: tuple[str, ...] | None = field(default=None, compare=False, kw_only=True, repr=False)

    def __post_init__(self) -> None:
        self.points = check_points(self.points, "points", self.source)
        self._check_data()

    def _check_data(self) -> None:
        self.point_data = check_data(self.point_data, len(self.points), "point_data", self.source)
        self.columns = None if self.columns is None else tuple(str(c) for c in self.columns)

    @property
    def dim(self) -> int:
        return int(self.points.shape[1])

    def __len__(self) -> int:
        return int(self.points.shape[0])

    @property
    def cells(self) -> torch.Tensor | None:
        """The cells connecting the points ((F, 3) faces, (E, 2) edges), or None: a point cloud."""
        return None

    def with_points(self, points: torch.Tensor):
        """The same shape (faces, source, point data) with new `points: (N, d)`. A point cloud's
        normals are dropped (a deformation turns them); a mesh's are recomputed."""
        point_data = self.point_data if isinstance(self, Mesh) else \
            {k: v for k, v in self.point_data.items() if k != "normals"}
        return replace(self, points=points, point_data=point_data)

    def to(self, device=None, dtype=None):
        return replace(self, points=self.points.to(device=device, dtype=dtype))


@dataclass
class Landmarks(PointCloud):
    """Labelled points in correspondence across shapes. `points: (K, d)`."""

    def __post_init__(self) -> None:
        self.points = check_points(self.points, "landmarks", self.source, min_points=1)
        self._check_data()


@dataclass
class Mesh(PointCloud):
    """A triangle surface. `points` are the vertices `(N, 3)`, `faces: (F, 3)` integer indices.

    polygons: the faces as read when some are not triangles (quads, mixed polygons), in VTK's
    flat layout `[n0, i_0 ... i_{n0-1}, n1, ...]`; `faces` is then their fan triangulation (given
    faces must equal it; leave faces out to have it computed). Writers write the polygons.
    cell_data: per-face arrays `(P,)` or `(P, k)`, one row per polygon (per face without polygons).
    """

    faces: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    polygons: np.ndarray | None = field(default=None, compare=False, kw_only=True, repr=False)
    cell_data: dict[str, np.ndarray] = field(default_factory=dict, compare=False, kw_only=True, repr=False)

    def __post_init__(self) -> None:
        self.points = check_points(self.points, "vertices", self.source, min_points=3, dims=(3,))
        rows = None
        if self.polygons is not None:
            self.polygons, sizes, triangles = _check_polygons(self.polygons, self.source)
            faces = self.faces.cpu() if isinstance(self.faces, torch.Tensor) else \
                torch.as_tensor(np.asarray(self.faces))
            if len(faces) == 0:
                self.faces = triangles
            elif not torch.equal(faces.long(), triangles):
                raise ShapeflowError(f"{_where(self.source)}faces are not the triangulation of polygons; "
                                     "pass polygons=None with new faces")
            rows = len(sizes)
            if (sizes == 3).all():                               # all triangles: nothing to keep
                self.polygons = None
        self.faces = check_cells(self.faces, "faces", 3, len(self.points), self.source)
        self._check_data()
        self.cell_data = check_data(self.cell_data, len(self.faces) if rows is None else rows, "cell_data", self.source)
        if "normals" in self.point_data:
            normals = self.point_data["normals"]
            fresh = vertex_normals(self.points, self.faces).cpu().numpy()
            self.point_data["normals"] = fresh.astype(normals.dtype if normals.dtype.kind == "f" else np.float64)

    @property
    def vertices(self) -> torch.Tensor:
        """Alias of `points`: (N, 3)."""
        return self.points

    @property
    def cells(self) -> torch.Tensor:
        """The faces: (F, 3)."""
        return self.faces

    def to(self, device=None, dtype=None):
        return replace(self, points=self.points.to(device=device, dtype=dtype), faces=self.faces.to(device=device))


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit vertex normals `(N, 3)` of a triangle mesh: the area-weighted sum of the normals of
    the faces around each vertex (zero for a vertex on no face). vertices: (N, 3), faces: (F, 3)."""
    v = vertices.detach().double()
    corners = v[faces]                                                                   # (F, 3, 3)
    face_normals = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals = torch.zeros_like(v)
    for k in range(3):
        normals.index_add_(0, faces[:, k], face_normals)
    length = normals.norm(dim=1, keepdim=True)
    return normals / torch.where(length > 0, length, torch.ones_like(length))


def polygon_sizes(polygons: np.ndarray) -> np.ndarray:
    """The vertex count of each polygon of a flat `[n0, i..., n1, ...]` array (one pass)."""
    first = int(polygons[0])
    if first > 0 and len(polygons) % (first + 1) == 0 and (polygons[:: first + 1] == first).all():
        return np.full(len(polygons) // (first + 1), first)
    sizes, at = [], 0
    while at < len(polygons):
        sizes.append(int(polygons[at]))
        if sizes[-1] < 1:
            raise ValueError("a polygon with no vertices")
        at += sizes[-1] + 1
    if at != len(polygons):
        raise ValueError("inconsistent polygon counts")
    return np.asarray(sizes)


def _check_polygons(polygons: Any, source: str | None) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """`polygons` as a flat int64 array, the polygons' sizes `(P,)` and their fan triangulation
    `(T, 3)`, or a one-line error."""
    where = _where(source)
    flat = np.asarray(polygons.cpu() if isinstance(polygons, torch.Tensor) else polygons)
    if flat.ndim != 1 or flat.size == 0 or flat.dtype.kind not in "iu":
        raise ShapeflowError(f"{where}polygons must be a flat integer array [n, i_0 ... i_(n-1), ...], "
                             f"got shape {flat.shape} of {flat.dtype}")
    flat = flat.astype(np.int64)
    try:
        sizes = polygon_sizes(flat)
    except ValueError:
        raise ShapeflowError(f"{where}polygons: the vertex counts do not match the array's length") from None
    if sizes.min() < 3:
        raise ShapeflowError(f"{where}polygons hold a face with {int(sizes.min())} vertices; faces need at least 3")
    starts = np.cumsum(np.r_[0, sizes[:-1] + 1]) + 1                        # index of each polygon's first vertex
    count = sizes - 2                                                        # triangles per polygon
    first = np.repeat(starts, count)
    step = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    triangles = np.stack([flat[first], flat[first + step + 1], flat[first + step + 2]], axis=1)
    return flat, sizes, torch.from_numpy(triangles)


@dataclass
class Curve(PointCloud):
    """A polygonal curve (or several) in 2D or 3D. `points: (N, d)`, `edges: (E, 2)` integer
    indices of the segments' end points (their order gives the curve's orientation)."""

    edges: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 2, dtype=torch.long))

    def __post_init__(self) -> None:
        self.points = check_points(self.points, "points", self.source)
        self.edges = check_cells(self.edges, "edges", 2, len(self.points), self.source)
        self._check_data()

    @property
    def cells(self) -> torch.Tensor:
        """The edges: (E, 2)."""
        return self.edges

    def to(self, device=None, dtype=None):
        return replace(self, points=self.points.to(device=device, dtype=dtype), edges=self.edges.to(device=device))


def check_cells(cells: Any, name: str, width: int, n_points: int, source: str | None = None) -> torch.Tensor:
    """Return `cells` as a long (C, width) tensor of indices below `n_points`, or raise a one-line
    `ShapeflowError` (naming the file `source`, when known)."""
    where = _where(source)
    what, shape = {3: ("triangles", "mesh"), 2: ("segments", "curve")}[width]
    cells = torch.as_tensor(np.asarray(cells)) if not isinstance(cells, torch.Tensor) else cells
    if cells.ndim != 2 or cells.shape[1] != width:
        raise ShapeflowError(f"{where}{name} must be an ({name[0].upper()}, {width}) array of {what}, "
                             f"got shape {tuple(cells.shape)}")
    if cells.numel() and (cells.is_floating_point() or cells.dtype == torch.bool):
        raise ShapeflowError(f"{where}{name} must hold integer vertex indices")
    cells = cells.long()
    if cells.numel() and cells.max() >= n_points:
        raise ShapeflowError(f"{where}{name} index vertex {int(cells.max())} but the {shape} has only "
                             f"{n_points} vertices")
    if cells.numel() and cells.min() < 0:
        raise ShapeflowError(f"{where}{name} hold a negative vertex index")
    return cells


Shape = PointCloud  # every shape kind is a PointCloud with extras


def as_points(obj: Any, name: str) -> torch.Tensor:
    """The (N, d) coordinates of a shape, a tensor or an array, validated."""
    if isinstance(obj, PointCloud):
        return obj.points
    return check_points(obj, name)


#: the voxel sizes an image may have, in world units (mm for medical images): 1 nm to 1000 km
MIN_SPACING, MAX_SPACING = 1e-6, 1e9


@dataclass
class Image:
    """A 2D or 3D image on a regular grid placed in world space (millimetres).

    data: (C, *S) with S = (H, W) or (D, H, W) in the file's array order; spacing: (d,) voxel size
    per axis of S; origin: (d,) world position of voxel 0; direction: (d, d) whose column k is the
    world direction of axis k. A voxel index `i` sits at `origin + direction @ (spacing * i)`.
    labels: optional integer label map `S` (0 = background) that travels with the image.
    valid: optional boolean map `S`, False at voxels that hold no data. NaN voxels (e.g. outside
    the head of a skull-stripped scan) are such voxels: they become `valid` False, and the data
    there is filled with each channel's smallest value so it can be interpolated; registration
    leaves them out of the data term, and writers put NaN back. Infinite values are an error.
    """

    data: torch.Tensor
    spacing: Any = None
    origin: Any = None
    direction: Any = None
    labels: torch.Tensor | None = None
    source: str | None = field(default=None, compare=False)
    valid: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = _where(self.source)
        data = torch.as_tensor(np.asarray(self.data)) if not isinstance(self.data, torch.Tensor) else self.data
        if data.ndim not in (3, 4):
            raise ShapeflowError(f"{where}image data must be (C, H, W) or (C, D, H, W), got shape {tuple(data.shape)}")
        if data.numel() == 0:
            raise ShapeflowError(f"{where}image is empty (shape {tuple(data.shape)})")
        if not data.is_floating_point():
            data = data.to(torch.get_default_dtype())
        if torch.isinf(data).any():
            raise ShapeflowError(f"{where}image has {int(torch.isinf(data).sum())} infinite voxel(s)")
        valid = None if self.valid is None else torch.as_tensor(np.asarray(self.valid)).bool()
        if valid is not None and tuple(valid.shape) != tuple(data.shape[1:]):
            raise ShapeflowError(f"{where}valid has shape {tuple(valid.shape)} but the image grid is "
                                 f"{tuple(data.shape[1:])}")
        missing = torch.isnan(data)
        if missing.any():
            known = ~missing.any(0)                                                   # (*S)
            valid = known if valid is None else valid & known
            if not known.any():
                raise ShapeflowError(f"{where}every voxel is NaN: the image holds no data")
            fill = torch.where(missing, torch.full_like(data, math.inf), data).flatten(1).amin(1)   # (C,)
            data = torch.where(missing, fill.view(-1, *([1] * (data.ndim - 1))).expand_as(data), data)
        self.data, self.valid = data, (None if valid is None or bool(valid.all()) else valid)
        d = data.ndim - 1
        self.spacing = self._vector(self.spacing, 1.0, "spacing", d)
        if (self.spacing <= 0).any():
            raise ShapeflowError(f"{where}spacing must be positive, got {self.spacing.tolist()}")
        if ((self.spacing < MIN_SPACING) | (self.spacing > MAX_SPACING)).any():
            raise ShapeflowError(f"{where}spacing {self.spacing.tolist()} is outside [{MIN_SPACING:g}, {MAX_SPACING:g}] "
                                 f"world units per voxel: a corrupt header (or rescale the image's units)")
        self.origin = self._vector(self.origin, 0.0, "origin", d)
        direction = torch.eye(d, dtype=torch.float64) if self.direction is None else \
            torch.as_tensor(np.asarray(self.direction, dtype=np.float64))
        if direction.shape != (d, d):
            raise ShapeflowError(f"{where}direction must be a {d}x{d} matrix, got shape {tuple(direction.shape)}")
        if not torch.isfinite(direction).all() or abs(float(torch.linalg.det(direction))) < 1e-6:
            raise ShapeflowError(f"{where}direction matrix is not invertible")
        self.direction = direction
        if self.labels is not None:
            labels = torch.as_tensor(np.asarray(self.labels)) if not isinstance(self.labels, torch.Tensor) else self.labels
            if tuple(labels.shape) != self.shape:
                raise ShapeflowError(f"{where}labels have shape {tuple(labels.shape)} but the image grid is {self.shape}")
            self.labels = labels.long()

    def _vector(self, value, default: float, name: str, d: int) -> torch.Tensor:
        if value is None:
            return torch.full((d,), default, dtype=torch.float64)
        out = torch.as_tensor(np.asarray(value, dtype=np.float64)).reshape(-1)
        if out.numel() == 1:
            out = out.expand(d).clone()
        if out.numel() != d or not torch.isfinite(out).all():
            raise ShapeflowError(f"{_where(self.source)}{name} must hold {d} finite numbers, got {out.tolist()}")
        return out

    @property
    def dim(self) -> int:
        return self.data.ndim - 1

    @property
    def shape(self) -> tuple[int, ...]:
        """The grid size S."""
        return tuple(self.data.shape[1:])

    @property
    def index_to_world(self) -> torch.Tensor:
        """The (d+1, d+1) homogeneous matrix mapping voxel indices to world coordinates."""
        d = self.dim
        out = torch.eye(d + 1, dtype=torch.float64)
        out[:d, :d] = self.direction * self.spacing
        out[:d, d] = self.origin
        return out

    def with_data(self, data: torch.Tensor, labels: torch.Tensor | None = None,
                  valid: torch.Tensor | None = None) -> "Image":
        """The same grid holding new `data: (C, *S)` (and `labels`, `valid`)."""
        return replace(self, data=data, labels=labels, source=None, valid=valid)

    def data_with_nan(self) -> torch.Tensor:
        """`data` with NaN at the voxels that hold none (`valid` False): what writers store."""
        if self.valid is None:
            return self.data
        return self.data.masked_fill(~self.valid.to(self.data.device), float("nan"))

    def to(self, device=None, dtype=None) -> "Image":
        labels = None if self.labels is None else self.labels.to(device)
        valid = None if self.valid is None else self.valid.to(device)
        return replace(self, data=self.data.to(device=device, dtype=dtype), labels=labels, valid=valid)
