"""Shape file formats: one reader and one writer per extension (meshes, clouds, point tables).

Readers: path -> (points (N, d) array, faces (F, 3) array or None); writers: (points, faces or
None, path) -> None. `shapeflow.io.read` / `write` pick them by extension.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable
import warnings

import numpy as np

from .._files import suffix_of
from ..errors import ShapeflowError

__all__ = ["READERS", "WRITERS"]

_TRIMESH = (".ply", ".obj", ".stl", ".off")
_VTK = (".vtk", ".vtp")
_TABLE = (".xyz", ".txt", ".csv")


# --- readers: path -> (points (N, d) array, faces (F, 3) array or None) -------------------------
def _read_trimesh(path: Path):
    import trimesh

    # process=False keeps the vertex order of the file; STL stores triangle soup, so merge it.
    loaded = trimesh.load(str(path), process=suffix_of(path) == ".stl", force=None)
    if isinstance(loaded, trimesh.Scene):
        geometries = list(loaded.geometry.values())
        if not geometries:
            return np.zeros((0, 3)), None
        loaded = trimesh.util.concatenate(geometries) if len(geometries) > 1 else geometries[0]
    faces = getattr(loaded, "faces", None)
    faces = None if faces is None or len(faces) == 0 else np.asarray(faces)
    return np.asarray(loaded.vertices, dtype=np.float64), faces


def _read_vtk(path: Path):
    import pyvista as pv

    data = pv.read(str(path))
    if not isinstance(data, pv.PolyData):
        data = data.extract_surface()
    if data.faces.size > 0:
        tri = data.triangulate()
        return np.asarray(tri.points, dtype=np.float64), tri.faces.reshape(-1, 4)[:, 1:]
    return np.asarray(data.points, dtype=np.float64), None


def _read_table(path: Path):
    delimiter = "," if suffix_of(path) == ".csv" else None
    with warnings.catch_warnings():  # an empty table is reported by the caller, not as a warning
        warnings.simplefilter("ignore", UserWarning)
        try:
            return np.loadtxt(path, delimiter=delimiter, ndmin=2), None
        except ValueError:  # a header line
            return np.loadtxt(path, delimiter=delimiter, ndmin=2, skiprows=1), None


def _read_npy(path: Path):
    return np.load(path, allow_pickle=False), None


READERS: dict[str, Callable] = {**{s: _read_trimesh for s in _TRIMESH}, **{s: _read_vtk for s in _VTK},
                                **{s: _read_table for s in _TABLE}, ".npy": _read_npy}


# --- writers: (points array, faces array or None, path) -> None ------------------------------
def _write_trimesh(points: np.ndarray, faces, path: Path) -> None:
    import trimesh

    if points.shape[1] != 3:
        raise ShapeflowError(f"{path}: {suffix_of(path)} files hold 3D points; write 2D points as .csv, .txt, .xyz or .npy")
    if faces is None:
        if suffix_of(path) != ".ply":
            raise ShapeflowError(f"{path}: a point cloud without faces can be written as .ply, .vtk, .vtp, "
                                 ".csv, .txt, .xyz or .npy, not {suffix_of(path)}")
        trimesh.PointCloud(points).export(str(path), file_type="ply")
    else:
        trimesh.Trimesh(points, faces, process=False).export(str(path), file_type=suffix_of(path)[1:])


def _write_vtk(points: np.ndarray, faces, path: Path) -> None:
    import pyvista as pv

    if points.shape[1] == 2:
        points = np.c_[points, np.zeros(len(points))]
    if faces is None:
        poly = pv.PolyData(points)
    else:
        poly = pv.PolyData(points, np.c_[np.full(len(faces), 3), faces].ravel())
    poly.save(str(path))


def _write_table(points: np.ndarray, faces, path: Path) -> None:
    np.savetxt(path, points, delimiter="," if suffix_of(path) == ".csv" else " ", fmt="%.9g")


def _write_npy(points: np.ndarray, faces, path: Path) -> None:
    with open(path, "wb") as handle:
        np.save(handle, points)


WRITERS: dict[str, Callable] = {**{s: _write_trimesh for s in _TRIMESH}, **{s: _write_vtk for s in _VTK},
                                **{s: _write_table for s in _TABLE}, ".npy": _write_npy}
