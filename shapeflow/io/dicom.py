"""Reading DICOM (pydicom): single slices, multi-frame files and folders holding a series.

Slices are sorted along the slice normal and checked (one orientation, uniform gaps, one size);
each slice's rescale slope/intercept is applied. The world is DICOM's LPS, converted to the RAS
world the rest of shapeflow uses (as for NIfTI).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._optional import import_optional
from ..errors import ShapeflowError
from ..shapes import Image

__all__ = ["read_dicom_file", "read_dicom_series", "LPS"]

LPS = np.diag([-1.0, -1.0, 1.0])   # DICOM's / ITK's LPS world <-> NIfTI's RAS world (3D)


def read_dicom_file(path: Path) -> Image:
    """One DICOM file. A single slice is a 2D image in its own plane: axis 0 runs down the rows
    (along the column direction cosine), axis 1 along a row; spacing from PixelSpacing; the origin
    is the first pixel's position projected on those two directions (mm); modality LUT applied
    (e.g. HU). A multi-frame file (NumberOfFrames > 1) is a 3D volume: see `read_dicom_series`."""
    pydicom = import_optional("pydicom", "reading DICOM")

    ds = pydicom.dcmread(str(path))
    if _frame_count(ds) > 1:
        return _read_multiframe(path, ds)
    pixels = _modality(ds.pixel_array, ds)
    if pixels.ndim != 2:
        raise ShapeflowError(f"{path}: DICOM with pixel data of shape {pixels.shape}; one 2D slice is supported")
    spacing = [float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])]
    position = np.asarray(ds.get("ImagePositionPatient", [0.0, 0.0, 0.0]), dtype=np.float64)
    cosines = np.asarray(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=np.float64)
    row_direction, column_direction = cosines[:3], cosines[3:]
    origin = [float(position @ column_direction), float(position @ row_direction)]
    return Image(torch.from_numpy(pixels[None].copy()), spacing=spacing, origin=origin, source=str(path))


# --- DICOM volumes: a folder of slices, or one multi-frame file ---------------------------------
#
# Both become a 3D `Image` laid out as SimpleITK reads a DICOM series (so a series and the same
# volume saved as .mha or .nii.gz read alike): data (1, Columns, Rows, slices), i.e. axis 0 is the
# column index (along the row direction cosine, spacing PixelSpacing[1]), axis 1 the row index
# (along the column direction cosine, spacing PixelSpacing[0]), axis 2 the slices sorted by their
# position along the slice normal (row cosine x column cosine). Voxel (i, j, k) sits at
#     ImagePositionPatient[k] + i * PixelSpacing[1] * row_cosine + j * PixelSpacing[0] * column_cosine
# in DICOM's LPS patient coordinates, converted to shapeflow's RAS world like the ITK formats.

_DICOMDIR = "1.2.840.10008.1.3.10"   # Media Storage Directory Storage: a DICOMDIR index, not an image
_SAME_COSINE = 1e-3                   # orientations closer than this (per cosine) count as equal
_UNIFORM = 0.01                       # slice gaps may differ by 1% of the mean gap


@dataclass
class _Plane:
    """The geometry of one 2D slice (a file of a series, or a frame of a multi-frame file)."""

    name: str                      # the file name or "frame 3", for messages
    rows: int
    columns: int
    position: np.ndarray | None    # ImagePositionPatient (3,): LPS mm of the first pixel
    cosines: np.ndarray | None     # ImageOrientationPatient (6,): row direction, then column direction
    pixel_spacing: np.ndarray      # PixelSpacing (2,): between rows, between columns (mm)
    thickness: float | None = None  # SpacingBetweenSlices or SliceThickness; used for a single slice only


def _frame_count(ds) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def _modality(pixels: np.ndarray, ds, slope_intercept: tuple[float, float] | None = None) -> np.ndarray:
    """Stored values -> physical values as float32: `slope_intercept` when given (a frame's
    PixelValueTransformation), else the file's modality LUT or RescaleSlope/Intercept; RT doses
    are also multiplied by DoseGridScaling (Gy)."""
    from pydicom.pixels import apply_modality_lut

    if slope_intercept is not None:
        values = pixels.astype(np.float64) * slope_intercept[0] + slope_intercept[1]
    else:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    if "DoseGridScaling" in ds:
        values = values * float(ds.DoseGridScaling)
    return values.astype(np.float32)


def _floats(value) -> np.ndarray | None:
    return None if value is None or len(value) == 0 else np.asarray([float(v) for v in value], dtype=np.float64)


def _plane(ds, name: str, groups=()) -> _Plane:
    """The plane of a slice; `groups` are functional-group items (per frame, then shared) that
    override the top-level attributes of an enhanced multi-frame file."""
    def find(sequence: str, keyword: str):
        for group in groups:
            items = group.get(sequence) if group is not None else None
            if items and keyword in items[0]:
                return items[0].get(keyword)
        return ds.get(keyword)

    spacing = _floats(find("PixelMeasuresSequence", "PixelSpacing"))
    thickness = find("PixelMeasuresSequence", "SpacingBetweenSlices") or find("PixelMeasuresSequence", "SliceThickness")
    return _Plane(name, int(ds.Rows), int(ds.Columns),
                  position=_floats(find("PlanePositionSequence", "ImagePositionPatient")),
                  cosines=_floats(find("PlaneOrientationSequence", "ImageOrientationPatient")),
                  pixel_spacing=np.ones(2) if spacing is None else spacing,
                  thickness=float(thickness) if thickness else None)


def _show(values) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def _stack_geometry(planes: list[_Plane], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Check that `planes` form one regular volume and sort them along the slice normal.

    Returns (order, spacing (3,), origin (3,), direction (3, 3)): `order[k]` is the index in
    `planes` of slice k; the geometry is in shapeflow's RAS world for the axes (column index,
    row index, slice), so direction[:, 2] is the world direction from a slice to the next one.
    Raises a one-line `ShapeflowError` starting with `where` on any inconsistency.
    """
    first = planes[0]
    for plane in planes:
        if plane.position is None or len(plane.position) != 3:
            raise ShapeflowError(f"{where}: {plane.name} has no ImagePositionPatient; cannot place it in the volume")
        if plane.cosines is None or len(plane.cosines) != 6:
            raise ShapeflowError(f"{where}: {plane.name} has no ImageOrientationPatient; cannot place it in the volume")
    for plane in planes[1:]:
        if np.abs(plane.cosines - first.cosines).max() > _SAME_COSINE:
            raise ShapeflowError(f"{where}: slices have different ImageOrientationPatient: {_show(first.cosines)} in "
                                 f"{first.name}, {_show(plane.cosines)} in {plane.name}")
        if (plane.rows, plane.columns) != (first.rows, first.columns):
            raise ShapeflowError(f"{where}: slices differ in size: {first.rows}x{first.columns} (rows x columns) in "
                                 f"{first.name}, {plane.rows}x{plane.columns} in {plane.name}")
        if not np.allclose(plane.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-6):
            raise ShapeflowError(f"{where}: slices have different PixelSpacing: {_show(first.pixel_spacing)} in "
                                 f"{first.name}, {_show(plane.pixel_spacing)} in {plane.name}")
    row, column = first.cosines[:3], first.cosines[3:]
    normal = np.cross(row, column)
    if np.linalg.norm(normal) < 0.5:
        raise ShapeflowError(f"{where}: ImageOrientationPatient {_show(first.cosines)} is not two perpendicular unit vectors")
    row, column, normal = row / np.linalg.norm(row), column / np.linalg.norm(column), normal / np.linalg.norm(normal)

    positions = np.stack([plane.position for plane in planes])           # (n, 3) LPS mm
    heights = positions @ normal
    order = np.argsort(heights, kind="stable")
    positions, heights = positions[order], heights[order]
    gaps = np.diff(heights)
    if len(planes) == 1:
        step = normal * (first.thickness or 1.0)
    else:
        duplicate = np.flatnonzero(gaps <= 1e-3 * float(first.pixel_spacing.min()))
        if duplicate.size:
            a, b = planes[order[duplicate[0]]], planes[order[duplicate[0] + 1]]
            shared = len(np.union1d(duplicate, duplicate + 1))
            raise ShapeflowError(f"{where}: {shared} slices share a position, e.g. {a.name} and {b.name} at "
                                 f"{_show(a.position)}; several time points or echoes in one series?")
        mean_gap = (heights[-1] - heights[0]) / (len(planes) - 1)
        if gaps.max() - gaps.min() > _UNIFORM * mean_gap:
            raise ShapeflowError(f"{where}: slice spacing is not uniform: gaps from {gaps.min():.6g} to {gaps.max():.6g} mm "
                                 f"along the slice normal; missing slices?")
        step = (positions[-1] - positions[0]) / (len(planes) - 1)
        off_line = np.linalg.norm(positions - (positions[0] + np.arange(len(planes))[:, None] * step), axis=1).max()
        if off_line > _UNIFORM * np.linalg.norm(step):
            raise ShapeflowError(f"{where}: slice positions do not lie on one line (a slice is {off_line:.3g} mm off it); "
                                 f"several stacks in one series?")
        across = step @ normal
        if np.linalg.norm(step - across * normal) <= 1e-4 * np.linalg.norm(step):
            step = across * normal              # rounding in the positions, not a tilted (sheared) stack
    spacing = np.array([first.pixel_spacing[1], first.pixel_spacing[0], np.linalg.norm(step)])
    direction = np.stack([row, column, step / spacing[2]], axis=1)
    return order, spacing, LPS @ positions[0], LPS @ direction


def _volume(slices: list[np.ndarray], geometry, source: str) -> Image:
    """Stack sorted (Rows, Columns) slices into the (1, Columns, Rows, slices) image."""
    _, spacing, origin, direction = geometry
    data = np.ascontiguousarray(np.stack(slices, axis=-1).transpose(1, 0, 2)[None], dtype=np.float32)
    return Image(torch.from_numpy(data), spacing=spacing, origin=origin, direction=direction, source=source)


def _read_multiframe(path: Path, ds) -> Image:
    """A multi-frame DICOM file as a 3D volume (see `read_dicom_series` for the layout).

    Frame positions come from the enhanced functional groups (PerFrameFunctionalGroupsSequence /
    PlanePositionSequence, orientation and PixelSpacing per frame or shared) or, for RT doses,
    from GridFrameOffsetVector; a per-frame PixelValueTransformationSequence rescales each frame.
    """
    frames = _frame_count(ds)
    pixels = ds.pixel_array
    if pixels.shape != (frames, int(ds.Rows), int(ds.Columns)):
        raise ShapeflowError(f"{path}: multi-frame DICOM with pixel data of shape {pixels.shape}; "
                             f"grey-value frames of {int(ds.Rows)}x{int(ds.Columns)} are supported")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    if len(per_frame) == frames:
        planes = [_plane(ds, f"frame {i + 1}", (per_frame[i], shared)) for i in range(frames)]
        if any(plane.position is None for plane in planes):
            raise ShapeflowError(f"{path}: multi-frame DICOM without a PlanePositionSequence for every frame; "
                                 f"cannot place the frames as a 3D volume")
    elif ds.get("GridFrameOffsetVector") is not None and len(ds.GridFrameOffsetVector) == frames:
        plane = _plane(ds, "frame 1")
        if plane.position is None or plane.cosines is None:
            raise ShapeflowError(f"{path}: GridFrameOffsetVector without ImagePositionPatient and "
                                 f"ImageOrientationPatient; cannot place the frames as a 3D volume")
        normal = np.cross(plane.cosines[:3], plane.cosines[3:])
        offsets = _floats(ds.GridFrameOffsetVector)
        # the offsets are relative to ImagePositionPatient when the first is 0, else absolute
        # heights whose first is that of ImagePositionPatient: either way, minus the first
        planes = [_Plane(f"frame {i + 1}", plane.rows, plane.columns, plane.position + (offset - offsets[0]) * normal,
                         plane.cosines, plane.pixel_spacing) for i, offset in enumerate(offsets)]
    else:
        raise ShapeflowError(f"{path}: multi-frame DICOM with {frames} frames but no per-frame positions "
                             f"(PlanePositionSequence or GridFrameOffsetVector); cannot place them as a 3D volume")
    geometry = _stack_geometry(planes, str(path))
    slices = []
    for i in geometry[0]:
        groups = (per_frame[i], shared) if len(per_frame) == frames else ()
        slices.append(_modality(pixels[i], ds, _rescale(groups)))
    return _volume(slices, geometry, str(path))


def _rescale(groups) -> tuple[float, float] | None:
    """RescaleSlope/Intercept of a frame's PixelValueTransformationSequence (per frame, then shared)."""
    for group in groups:
        items = group.get("PixelValueTransformationSequence") if group is not None else None
        if items and "RescaleSlope" in items[0] and "RescaleIntercept" in items[0]:
            return float(items[0].RescaleSlope), float(items[0].RescaleIntercept)
    return None


def _is_dicom_file(path: Path) -> bool:
    """A file with the DICOM preamble: 128 bytes, then b"DICM"."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def read_dicom_series(directory: Path, series: str | None = None) -> Image:
    """A folder of DICOM slices as one 3D image `(1, Columns, Rows, slices)`.

    Reads the files directly in `directory` that start with the DICOM preamble (any name, with or
    without .dcm; subfolders are not searched), skipping other files, DICOMDIR indexes and DICOM
    objects without an image. The slices are grouped by SeriesInstanceUID: a folder with several
    series needs `series=` (a UID), and the error lists them. A series made of one multi-frame file
    is read as that file. Slices are sorted by ImagePositionPatient projected on the slice normal
    (row cosine x column cosine); the slice spacing and direction[:, 2] come from those positions
    (not SliceThickness), so a series stored in reverse order gets the same world geometry.
    RescaleSlope/Intercept (or a modality LUT) apply per slice. Different orientations, slice
    sizes or PixelSpacing, shared positions, gaps differing by more than 1% or a missing
    ImagePositionPatient raise a one-line `ShapeflowError` naming the folder and the slices.

    World geometry as for the other 3D formats (RAS mm): voxel (i, j, k) sits at
    ImagePositionPatient[k] + i * PixelSpacing[1] * row_cosine + j * PixelSpacing[0] * column_cosine
    (mirrored from DICOM's LPS to RAS), the layout SimpleITK's series reader gives.
    """
    pydicom = import_optional("pydicom", "reading DICOM")

    directory = Path(directory)
    headers: dict[str, list[tuple[Path, object]]] = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        if not _is_dicom_file(path):
            continue
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - a broken file inside the series
            raise ShapeflowError(f"{path}: unreadable DICOM file ({_first_line(exc)})") from None
        media_class = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
        if _DICOMDIR in (ds.get("SOPClassUID"), media_class) or "Rows" not in ds or "Columns" not in ds:
            continue                        # a DICOMDIR index, a report, a structure set: no image
        headers.setdefault(str(ds.get("SeriesInstanceUID", "") or "(none)"), []).append((path, ds))
    if not headers:
        raise ShapeflowError(f"{directory}: no DICOM images in this folder (subfolders are not searched)")
    found = ", ".join(f"{uid} ({len(files)} file{'s' * (len(files) != 1)})" for uid, files in headers.items())
    if series is not None and series not in headers:
        raise ShapeflowError(f"{directory}: no DICOM series {series}; found {found}")
    if series is None and len(headers) > 1:
        raise ShapeflowError(f"{directory}: holds {len(headers)} DICOM series; choose one with series=UID: {found}")
    files = headers[series if series is not None else next(iter(headers))]
    multiframe = [path.name for path, ds in files if _frame_count(ds) > 1]
    if multiframe and len(files) == 1:
        return read_dicom_file(files[0][0])
    if multiframe:
        raise ShapeflowError(f"{directory}: the series mixes multi-frame files ({', '.join(multiframe)}) with other "
                             f"files; read the multi-frame files one by one")
    geometry = _stack_geometry([_plane(ds, path.name) for path, ds in files], str(directory))
    slices = []
    for index in geometry[0]:
        path, header = files[index]
        try:
            ds = pydicom.dcmread(str(path))
            pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - e.g. a compressed transfer syntax without its decoder
            raise ShapeflowError(f"{path}: cannot read the pixel data ({_first_line(exc)})") from None
        if pixels.shape != (int(header.Rows), int(header.Columns)):
            raise ShapeflowError(f"{path}: pixel data of shape {pixels.shape}; grey-value slices of "
                                 f"{int(header.Rows)}x{int(header.Columns)} are supported")
        slices.append(_modality(pixels, ds))
    return _volume(slices, geometry, str(directory))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:120] if text else type(exc).__name__
