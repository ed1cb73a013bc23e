"""`read` and `write`: shapes and images, the format picked by the file's extension.

`read(path)` gives a `Mesh` when the file has faces, a `PointCloud` otherwise (or
`Landmarks` with `kind="landmarks"`), an `Image` for image files, VTK images and DICOM folders.
Coordinates keep the file's precision (float32 where the file stores float32, float64 for
text and double); per-point data, polygons and a table's header come along (see
`shapeflow.io.shapes`). `write(obj, path)` writes atomically (a temporary file renamed into
place), refuses an existing file unless `overwrite=True`, and never overwrites the file the
object was read from.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .._files import atomic_write, suffix_of
from ..errors import ShapeflowError
from ..shapes import Image, Landmarks, Mesh, PointCloud
from .dicom import read_dicom_series
from .images import IMAGE_READERS, IMAGE_WRITERS, read_image, write_image
from .shapes import READERS, WRITERS

__all__ = ["read", "write", "IMAGE_SUFFIXES"]

_NIFTI = (".nii", ".nii.gz")
_PICTURE = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_ITK = (".mha", ".mhd", ".nrrd", ".dcm")
#: extensions that always hold images (a .npy holds points unless read with kind="image"; a .vtk
#: holding ImageData is read as an image too)
IMAGE_SUFFIXES = _NIFTI + _PICTURE + _ITK + (".vti",)


def read(path: str | os.PathLike, kind: str | None = None, *, series: str | None = None) -> PointCloud | Image:
    """Read a shape or an image file, or a folder of DICOM slices.

    `kind` is None (from the extension: an `Image` for image files, else a `Mesh` if the file has
    faces, else a `PointCloud`), "points", "mesh", "landmarks" or "image" (e.g. for a .npy volume).
    Shapes: .ply .obj .stl .off .vtk .vtp .xyz .txt .csv .npy.
    Images: .nii .nii.gz .png .jpg .jpeg .tif .tiff .mha .mhd .nrrd .dcm .vti (and .npy with kind="image",
    and a .vtk holding ImageData),
    and a folder: a DICOM series read as one 3D `Image` (see `shapeflow.io.dicom.read_dicom_series`);
    `series` picks one SeriesInstanceUID when the folder holds several.
    """
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, kind, series)
    if series is not None:
        raise ShapeflowError(f"read(): series= picks a series in a folder of DICOM files, but {path} is not a folder")
    suffix = suffix_of(path)
    if suffix not in READERS and suffix not in IMAGE_READERS:
        known = sorted(set(READERS) | set(IMAGE_READERS))
        raise ShapeflowError(f"{path}: unknown extension {suffix!r}; supported: {' '.join(known)}")
    if kind not in (None, "points", "mesh", "landmarks", "image"):
        raise ShapeflowError(f"read(): kind must be None, 'points', 'mesh', 'landmarks' or 'image', got {kind!r}")
    is_image = kind == "image" or (kind is None and suffix in IMAGE_SUFFIXES)
    if (kind == "image" and suffix not in IMAGE_READERS) or (suffix in IMAGE_SUFFIXES and not is_image):
        raise ShapeflowError(f"{path}: a {suffix} file cannot be read as {kind}")
    if not path.is_file():
        raise ShapeflowError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ShapeflowError(f"{path}: the file is empty")
    try:
        loaded = read_image(path, suffix) if is_image else READERS[suffix](path)
    except (ShapeflowError, ImportError):
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure means an unreadable file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShapeflowError(f"{path}: unreadable {suffix} file ({first[:120]})") from None
    if isinstance(loaded, Image):
        if kind not in (None, "image"):
            raise ShapeflowError(f"{path}: a VTK image (ImageData), not a {'point set' if kind == 'points' else kind}; "
                                 "read it as an image (kind='image') or convert it to NIfTI")
        return loaded
    return _shape(loaded, path, kind)


def _shape(loaded: dict, path: Path, kind: str | None) -> PointCloud:
    """The container for what a shape reader found: Landmarks, Mesh or PointCloud."""
    points = np.asarray(loaded["points"])
    if points.ndim != 2:
        raise ShapeflowError(f"{path}: expected a table of points (N rows, 2 or 3 columns), got shape {points.shape}")
    if points.dtype.kind not in "fiub":
        raise ShapeflowError(f"{path}: the points hold {points.dtype} values, not real numbers")
    # the file's own precision: float32 as stored, else float64
    tensor = torch.as_tensor(np.array(points, dtype=np.float32 if points.dtype == np.float32 else np.float64))
    common = {"source": str(path), "point_data": loaded.get("point_data"), "columns": loaded.get("columns")}
    has_faces = loaded.get("faces") is not None or loaded.get("polygons") is not None
    if kind == "landmarks":
        return Landmarks(tensor, **common)
    if kind == "mesh" and not has_faces:
        raise ShapeflowError(f"{path}: has no faces, so it is not a mesh")
    if has_faces and kind != "points":
        faces = loaded.get("faces")
        faces = torch.zeros(0, 3, dtype=torch.long) if faces is None else torch.as_tensor(np.asarray(faces, np.int64))
        if loaded.get("normals"):        # the file has normals: the mesh recomputes them from its faces
            common["point_data"] = {**(common["point_data"] or {}), "normals": np.zeros((len(tensor), 3))}
        return Mesh(tensor, faces, polygons=loaded.get("polygons"), cell_data=loaded.get("cell_data"), **common)
    return PointCloud(tensor, **common)


def _read_folder(path: Path, kind: str | None, series: str | None) -> Image:
    if kind not in (None, "image"):
        raise ShapeflowError(f"{path}: a folder is read as a DICOM series (an image), not as {kind}")
    try:
        return read_dicom_series(path, series=series)
    except (ShapeflowError, ImportError):
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure means an unreadable series
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShapeflowError(f"{path}: unreadable DICOM series ({first[:120]})") from None


def write(shape: PointCloud | Image, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a shape or an image to `path`, format from the extension, atomically. Meshes keep
    their faces (polygons as read) where the format holds them; per-point and per-face data and a
    table's header are written back, or refused in one line where the format cannot hold them
    (tables and .npy hold no faces). Coordinates are written at full precision. Images keep their
    spacing, origin and direction where the format holds them.

    An existing `path` is an error unless `overwrite=True`; the file the shape was read from is
    never overwritten.
    """
    path = Path(path)
    suffix = suffix_of(path)
    writers = IMAGE_WRITERS if isinstance(shape, Image) else WRITERS
    if suffix not in writers:
        raise ShapeflowError(f"{path}: cannot write a{'n image' if writers is IMAGE_WRITERS else ' shape'} as "
                             f"{suffix!r}; supported: {' '.join(sorted(writers))}")
    if not isinstance(shape, (PointCloud, Image)):
        raise ShapeflowError(f"write(): expected a PointCloud, Mesh, Landmarks or Image, got {type(shape).__name__}")
    if shape.source and path.exists() and os.path.samefile(path, shape.source):
        raise ShapeflowError(f"{path}: refusing to overwrite the file this shape was read from")
    if path.exists() and not overwrite:
        raise ShapeflowError(f"{path}: exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise ShapeflowError(f"{path}: the folder {path.parent} does not exist")
    if isinstance(shape, Image):
        atomic_write(path, _naming(path, lambda tmp: write_image(shape, tmp, suffix)))
        return path
    points = shape.points.detach().cpu()                       # written at its own precision
    points = (points if points.dtype in (torch.float32, torch.float64) else points.double()).numpy()
    atomic_write(path, _naming(path, lambda tmp: WRITERS[suffix](shape, points, tmp)))
    return path


def _naming(path: Path, writer: Callable[[Path], None]) -> Callable[[Path], None]:
    """`writer`, with its errors naming `path` rather than the temporary file it writes."""
    def write_to(tmp: Path) -> None:
        try:
            writer(tmp)
        except ShapeflowError as exc:
            raise ShapeflowError(str(exc).replace(str(tmp), str(path))) from None
    return write_to
