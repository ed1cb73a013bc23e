"""Shape file formats: one reader and one writer per extension (meshes, clouds, point tables).

Readers: path -> dict(points (N, d) array at the file's precision, and where the file has them: faces (F, 3),
polygons (VTK's flat layout), point_data, cell_data, columns, normals=True for a mesh whose
normals are to be recomputed from its faces), or an `Image` for a VTK image. Writers:
(shape, points (N, d) float32 or float64 array, path) -> None. `shapeflow.io.read` / `write`
pick them by extension.

Nothing is dropped without an error: what a format holds is written back (polygons, per-point and
per-face data, a table's header, coordinates at full precision); what it cannot hold is refused
in one line naming the file. Normals are the exception: a mesh's are derived from its faces
(`shapeflow.shapes`), so a format without them simply leaves them out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable
import warnings

import numpy as np

from .._files import suffix_of
from ..errors import ShapeflowError
from ..shapes import Mesh, PointCloud
from .isolated import read_isolated
from .limits import check_vtk_counts
from .ply import read_ply, write_ply

__all__ = ["READERS", "WRITERS"]

_TABLE = (".xyz", ".txt", ".csv")


def _text(column: np.ndarray) -> list[str]:
    """One column as text: integers as such; floats with 9 significant digits where float32 holds
    every value exactly (the digits that give it back), else the shortest text giving back the float64."""
    if column.dtype.kind in "iub":
        return [str(int(v)) for v in column.tolist()]
    column = np.asarray(column, dtype=np.float64)
    if np.array_equal(column.astype(np.float32).astype(np.float64), column):
        return np.char.mod("%.9g", column).tolist()
    return [repr(v) for v in column.tolist()]


def _lines(columns: list[np.ndarray], delimiter: str = " ", prefix: str = "") -> str:
    """Rows of text, one per point, from (N,) columns; '' without columns."""
    texts = [_text(np.asarray(c)) for c in columns]
    return "".join(prefix + delimiter.join(row) + "\n" for row in zip(*texts))


def _data_to_write(shape: PointCloud) -> dict[str, np.ndarray]:
    """The shape's per-point data that must reach the file (a mesh's normals are derived, so optional)."""
    return {k: v for k, v in shape.point_data.items() if not (k == "normals" and isinstance(shape, Mesh))}


def _refuse(path: Path, what: str, names) -> None:
    if names:
        raise ShapeflowError(f"{path}: {suffix_of(path)} cannot hold the {what} {', '.join(map(repr, names))}; "
                             f"write .vtk or .vtp (or .ply), or drop them (dataclasses.replace(shape, {what}={{}}))")


def _polygons(shape: PointCloud) -> np.ndarray | None:
    """The faces to write in VTK's flat layout: the polygons as read, else the triangles."""
    if not isinstance(shape, Mesh):
        return None
    if shape.polygons is not None:
        return shape.polygons
    faces = shape.faces.cpu().numpy()
    return np.c_[np.full(len(faces), 3), faces].ravel()


def _split(polygons: np.ndarray) -> list[np.ndarray]:
    from ..shapes import polygon_sizes

    sizes = polygon_sizes(polygons)
    starts = np.cumsum(np.r_[0, sizes[:-1] + 1]) + 1
    return [polygons[s: s + n] for s, n in zip(starts, sizes)]


# --- PLY ----------------------------------------------------------------------------------------
def _write_ply(shape: PointCloud, points: np.ndarray, path: Path) -> None:
    _need_3d(points, path)
    cell_data = shape.cell_data if isinstance(shape, Mesh) else {}
    write_ply(points, _polygons(shape), shape.point_data, cell_data, path)


def _need_3d(points: np.ndarray, path: Path) -> None:
    if points.shape[1] != 3:
        raise ShapeflowError(f"{path}: {suffix_of(path)} files hold 3D points; write 2D points as .csv, .txt, "
                             ".xyz or .npy")


# --- OBJ and OFF (text, read and written here to keep polygons and the file's vertex order) ----------
def _read_obj(path: Path) -> dict:
    vertices, colors, sizes, indices, normals = [], [], [], [], False
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            words = line.split()
            if not words:
                continue
            if words[0] == "v":
                values = [float(w) for w in words[1:]]
                vertices.append(values[:3])
                colors.append(values[3:6] if len(values) >= 6 else None)
            elif words[0] == "vn":
                normals = True
            elif words[0] == "f":
                corner = [int(w.split("/")[0]) for w in words[1:]]
                sizes.append(len(corner))
                indices += [i - 1 if i > 0 else len(vertices) + i for i in corner]
    points = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    point_data = {}
    if colors and all(c is not None for c in colors):
        point_data["colors"] = np.asarray(colors)
    if not sizes:
        return {"points": points, "point_data": point_data}
    polygons = np.insert(np.asarray(indices, dtype=np.int64), np.cumsum([0] + sizes[:-1]), sizes)
    return {"points": points, "polygons": polygons, "point_data": point_data, "normals": normals}


def _mesh_polygons(shape: PointCloud, points: np.ndarray, path: Path) -> np.ndarray:
    """The polygons of a 3D mesh for a format that holds only meshes (.obj, .off), else one line."""
    _need_3d(points, path)
    polygons = _polygons(shape)
    if polygons is None:
        raise ShapeflowError(f"{path}: a point cloud without faces can be written as .ply, .vtk, .vtp, "
                             f".csv, .txt, .xyz or .npy, not {path.suffix}")
    return polygons


def _write_obj(shape: PointCloud, points: np.ndarray, path: Path) -> None:
    polygons = _mesh_polygons(shape, points, path)
    data = shape.point_data
    _refuse(path, "point_data", [k for k in _data_to_write(shape) if k != "colors"])
    _refuse(path, "cell_data", list(shape.cell_data))
    columns = list(points.T)
    if "colors" in data:
        columns += list(data["colors"][:, :3].T / (255.0 if data["colors"].dtype == np.uint8 else 1.0))
    with open(path, "w") as handle:
        handle.write(_lines(columns, prefix="v "))
        if "normals" in data:
            handle.write(_lines(list(data["normals"].T), prefix="vn "))
        corner = "{0}//{0}" if "normals" in data else "{0}"
        handle.writelines("f " + " ".join(corner.format(i + 1) for i in face) + "\n" for face in _split(polygons))


def _read_off(path: Path) -> dict:
    lines = [line.split("#")[0].split() for line in path.read_text(errors="replace").splitlines()]
    lines = [words for words in lines if words]
    keyword = lines[0][0] if lines and lines[0][0].isalpha() else None
    if keyword is None or not keyword.endswith("OFF"):
        raise ValueError("no OFF header")
    head = lines[0][1:] or lines[1]
    body = lines[1:] if lines[0][1:] else lines[2:]
    n_vertices, n_faces = int(head[0]), int(head[1])
    rows = [[float(w) for w in words] for words in body[:n_vertices]]
    if len(rows) < n_vertices or len({len(r) for r in rows}) > 1:
        raise ValueError(f"expected {n_vertices} vertex lines of equal length")
    table = np.asarray(rows, dtype=np.float64).reshape(n_vertices, -1)
    point_data, at = {}, 3
    if "N" in keyword[:-3]:
        point_data["normals"], at = table[:, 3:6], 6
    if table.shape[1] > at:                                  # COFF, or colours without the C
        point_data["colors"] = table[:, at:]
    faces = [[float(w) for w in words] for words in body[n_vertices: n_vertices + n_faces]]
    if len(faces) < n_faces:
        raise ValueError(f"expected {n_faces} face lines, found {len(faces)}")
    if not faces:
        return {"points": table[:, :3], "point_data": point_data}
    polygons = np.concatenate([face[: int(face[0]) + 1] for face in faces]).astype(np.int64)
    extra = [face[int(face[0]) + 1:] for face in faces]
    cell_data = {"colors": np.asarray(extra)} if extra[0] and len({len(e) for e in extra}) == 1 else {}
    normals = point_data.pop("normals", None) is not None    # a mesh recomputes them from its faces
    return {"points": table[:, :3], "polygons": polygons, "point_data": point_data, "cell_data": cell_data,
            "normals": normals}


def _write_off(shape: PointCloud, points: np.ndarray, path: Path) -> None:
    polygons = _mesh_polygons(shape, points, path)
    data, cells = shape.point_data, shape.cell_data
    _refuse(path, "point_data", [k for k in _data_to_write(shape) if k != "colors"])
    _refuse(path, "cell_data", [k for k in cells if k != "colors" or cells[k].ndim != 2])
    keyword = ("C" if "colors" in data else "") + ("N" if "normals" in data else "") + "OFF"
    columns = list(points.T) + [c for k in ("normals", "colors") if k in data for c in data[k].T]
    faces = _split(polygons)
    colors = [] if "colors" not in cells else _lines(list(cells["colors"].T)).splitlines()
    with open(path, "w") as handle:
        handle.write(f"{keyword}\n{len(points)} {len(faces)} 0\n")
        handle.write(_lines(columns))
        handle.writelines(f"{len(face)} " + " ".join(map(str, face.tolist())) + (f" {colors[f]}" if colors else "")
                          + "\n" for f, face in enumerate(faces))


# --- STL (triangles only, through trimesh) --------------------------------------------------------
def _read_stl(path: Path) -> dict:
    import trimesh

    # triangle soup: corners that agree to 8 decimals (trimesh's merge tolerance) become one vertex
    loaded = trimesh.load(str(path), process=True, force="mesh")
    with open(path, "rb") as handle:                                  # binary STL stores float32
        head = handle.read(84)
    binary = len(head) == 84 and path.stat().st_size == 84 + 50 * int(np.frombuffer(head[80:], "<u4")[0])
    return {"points": np.asarray(loaded.vertices, dtype=np.float32 if binary else np.float64),
            "faces": np.asarray(loaded.faces)}


def _write_stl(shape: PointCloud, points: np.ndarray, path: Path) -> None:
    import trimesh

    _need_3d(points, path)
    if not isinstance(shape, Mesh):
        raise ShapeflowError(f"{path}: a point cloud without faces can be written as .ply, .vtk, .vtp, "
                             ".csv, .txt, .xyz or .npy, not .stl")
    _refuse(path, "point_data", list(_data_to_write(shape)))
    _refuse(path, "cell_data", list(shape.cell_data))
    trimesh.Trimesh(points, shape.faces.cpu().numpy(), process=False).export(str(path), file_type="stl")


# --- VTK (pyvista) ------------------------------------------------------------------------------
_SURFACE_CELLS = {5, 7, 9}          # VTK_TRIANGLE, VTK_POLYGON, VTK_QUAD
_POINT_CELLS = {1, 2}               # VTK_VERTEX, VTK_POLY_VERTEX


def _arrays(attributes) -> dict[str, np.ndarray]:
    return {("normals" if name == "Normals" else name): np.asarray(attributes[name]) for name in attributes.keys()}


def _read_vtk(path: Path):
    import pyvista  # noqa: F401 - imported once here, not in every forked reader

    check_vtk_counts(path)       # before VTK allocates what a corrupt header announces
    return read_isolated(_read_vtk_here, path)      # a crash on a corrupt file stays in a child


def _read_vtk_here(path: Path):
    import pyvista as pv

    data = pv.read(str(path))
    if isinstance(data, pv.ImageData):
        from .images import image_from_vtk

        return image_from_vtk(data, path)
    if isinstance(data, pv.UnstructuredGrid):
        kinds = set(np.unique(np.asarray(data.celltypes)).tolist())
        if kinds and kinds <= _SURFACE_CELLS:
            return {"points": np.asarray(data.points), "polygons": np.asarray(data.cells),
                    "point_data": _arrays(data.point_data), "cell_data": _arrays(data.cell_data)}
        if not kinds <= _POINT_CELLS:
            names = sorted(pv.CellType(k).name for k in kinds - _SURFACE_CELLS - _POINT_CELLS)
            raise ShapeflowError(f"{path}: an unstructured grid with {', '.join(names)} cells, not a surface; "
                                 "extract its surface first (pyvista: grid.extract_surface().save('surface.vtk'))")
        data = _as_cloud(data)
    if not isinstance(data, pv.PolyData):
        raise ShapeflowError(f"{path}: a VTK {type(data).__name__}, neither a mesh, a point cloud nor a regular image "
                             "(ImageData); convert it to one of those")
    if data.GetNumberOfStrips():
        data = data.triangulate()
    points = np.asarray(data.points)                                      # as stored: float32 or float64
    other = data.GetNumberOfVerts() + data.GetNumberOfLines()
    if data.GetNumberOfPolys() and other and data.cell_data.keys():
        raise ShapeflowError(f"{path}: cell data on a mix of faces and vertices or lines is not read; keep the faces "
                             "only (pyvista: mesh.extract_cells_by_type) or drop the cell data")
    if not data.GetNumberOfPolys():
        if data.cell_data.keys() and data.n_cells:
            raise ShapeflowError(f"{path}: cell data on vertices or lines ({', '.join(data.cell_data.keys())}) is not "
                                 "read; move it to point data (pyvista: cell_data_to_point_data) or drop it")
        return {"points": points, "point_data": _arrays(data.point_data)}
    return {"points": points, "polygons": np.asarray(data.faces, dtype=np.int64),
            "point_data": _arrays(data.point_data), "cell_data": _arrays(data.cell_data)}


def _as_cloud(grid):
    import pyvista as pv

    cloud = pv.PolyData(np.asarray(grid.points))
    for name in grid.point_data.keys():
        cloud.point_data[name] = grid.point_data[name]
    return cloud


def _write_vtk(shape: PointCloud, points: np.ndarray, path: Path) -> None:
    import pyvista as pv

    if points.shape[1] == 2:
        points = np.c_[points, np.zeros(len(points), dtype=points.dtype)]
    polygons = _polygons(shape)
    poly = pv.PolyData(points) if polygons is None else pv.PolyData(points, faces=polygons)
    for name, array in shape.point_data.items():
        poly.point_data["Normals" if name == "normals" else name] = array
    if "normals" in shape.point_data:
        poly.point_data.active_normals_name = "Normals"
    for name, array in (shape.cell_data.items() if isinstance(shape, Mesh) else ()):
        poly.cell_data["Normals" if name == "normals" else name] = array
    poly.save(str(path))


# --- tables and .npy ----------------------------------------------------------------------------
def _read_table(path: Path) -> dict:
    delimiter = "," if suffix_of(path) == ".csv" else None
    header, skip = None, 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for skip, line in enumerate(handle, start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                fields = [f.strip().strip("\"'") for f in line.split(delimiter)]
                try:
                    [float(f) for f in fields]
                    skip -= 1
                except ValueError:
                    header = fields
                break
    with warnings.catch_warnings():  # an empty table is reported by the caller, not as a warning
        warnings.simplefilter("ignore", UserWarning)
        table = np.loadtxt(path, delimiter=delimiter, ndmin=2, skiprows=skip)
    if header is None:
        return {"points": table}
    if table.size == 0:
        table = np.zeros((0, len(header)))
    if table.shape[1] != len(header):
        raise ShapeflowError(f"{path}: the header names {len(header)} columns but the rows have {table.shape[1]}")
    if len(set(header)) != len(header):
        raise ShapeflowError(f"{path}: the header repeats a column name ({','.join(header)})")
    lower = [name.lower() for name in header]
    if not ("x" in lower and "y" in lower) or len(set(lower)) != len(lower):
        return {"points": table, "columns": tuple(header)}          # every column a coordinate
    axes = _axes([name for name in header if name.lower() in ("x", "y", "z")])
    coordinates = sorted((axes[name], j) for j, name in enumerate(header) if name in axes)
    coordinates = [j for _, j in coordinates]
    point_data = {name: table[:, j] for j, name in enumerate(header) if j not in coordinates}
    return {"points": table[:, coordinates], "point_data": point_data, "columns": tuple(header)}


def _axes(names: list[str]) -> dict[str, int]:
    """The coordinate axis of each coordinate column: by name when they are x, y[, z] (any case
    and order), else in file order."""
    lower = [n.lower() for n in names]
    if sorted(lower) in (["x", "y"], ["x", "y", "z"]):
        return {n: "xyz".index(n.lower()) for n in names}
    return {n: k for k, n in enumerate(names)}


def _table_columns(shape: PointCloud, data: dict, path: Path) -> list[str] | None:
    """Column names in file order: the shape's header as read when it still fits, else x, y[, z]
    and the data's names; None (no header) without per-point data or a header."""
    _refuse(path, "point_data", [k for k, v in data.items() if v.ndim != 1])
    if shape.columns is not None:
        coordinates = [c for c in shape.columns if c not in data]
        if len(coordinates) == shape.dim and set(data) <= set(shape.columns):
            return list(shape.columns)
    if not data:
        return None
    return list("xyz"[:shape.dim]) + list(data)


def _write_table(shape: PointCloud, points: np.ndarray, path: Path) -> None:
    data = _data_to_write(shape)
    columns = _table_columns(shape, data, path)
    if columns is None:
        values = list(points.T)
    else:
        axes = _axes([c for c in columns if c not in data])
        values = [data[c] if c in data else points[:, axes[c]] for c in columns]
    delimiter = "," if suffix_of(path) == ".csv" else " "
    with open(path, "w") as handle:
        handle.write("" if columns is None else delimiter.join(columns) + "\n")
        handle.write(_lines(values, delimiter))


def _read_npy(path: Path) -> dict:
    return {"points": np.load(path, allow_pickle=False)}


def _write_npy(shape: PointCloud, points: np.ndarray, path: Path) -> None:
    _refuse(path, "point_data", list(_data_to_write(shape)))
    with open(path, "wb") as handle:
        np.save(handle, points)


READERS: dict[str, Callable] = {".ply": read_ply, ".obj": _read_obj, ".off": _read_off, ".stl": _read_stl,
                                ".vtk": _read_vtk, ".vtp": _read_vtk, **{s: _read_table for s in _TABLE},
                                ".npy": _read_npy}
WRITERS: dict[str, Callable] = {".ply": _write_ply, ".obj": _write_obj, ".off": _write_off, ".stl": _write_stl,
                                ".vtk": _write_vtk, ".vtp": _write_vtk, **{s: _write_table for s in _TABLE},
                                ".npy": _write_npy}
