"""Reading and writing images: NIfTI (nibabel), PNG/JPG/TIFF (imageio), MHA/NRRD (SimpleITK), VTK
ImageData (.vti, .vtk; pyvista), .npy, and reading DICOM (pydicom, `dicom.py`): single slices,
multi-frame files and folders holding a series.

`sf.read` and `sf.write` call these for image files; world geometry (spacing, origin,
direction) is kept: NIfTI through its affine (RAS world), ITK formats through their header
(LPS world, converted to RAS so both agree), pictures and .npy with unit spacing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .._optional import import_optional
from ..errors import ShapeflowError
from ..shapes import Image
from .dicom import LPS, read_dicom_file, read_dicom_series
from .isolated import read_isolated
from .limits import MAX_VOXELS, check_vtk_counts

__all__ = ["IMAGE_READERS", "IMAGE_WRITERS", "image_from_vtk", "read_dicom_series", "read_image", "write_image"]

#: NIfTI intents whose 4th/5th axis holds the components of one value per voxel: read as channels
_VECTOR_INTENTS = ("vector", "displacement vector", "rgb vector", "rgba vector", "general matrix", "symmetric matrix")


def _read_nifti(path: Path) -> Image:
    """A 2D or 3D NIfTI image; the components of a vector image (5D, dim[4] = 1, or 4D with a vector
    intent) and a 4D stack without time meaning become channels. A time series is refused: its
    volumes are not channels of one image, and a written result could not keep its timing."""
    import nibabel as nib

    img = nib.load(str(path))
    header, shape = img.header, img.shape
    affine = np.asarray(img.affine, dtype=np.float64)
    if len(shape) == 5 and shape[3] != 1:
        raise ShapeflowError(f"{path}: a 5D NIfTI with {shape[3]} time points of {shape[4]} components; "
                             f"register one time point, e.g. nibabel.load(path).slicer[:, :, :, 0]")
    if len(shape) > 5:
        raise ShapeflowError(f"{path}: NIfTI with {len(shape)} dimensions is not a 2D or 3D image")
    if len(shape) == 4 and shape[3] > 1 and _is_time_series(header):
        step, unit = float(header["pixdim"][4]), header.get_xyzt_units()[1]
        timing = f", {step:g} {unit} apart" if step and unit != "unknown" else ""
        raise ShapeflowError(f"{path}: a 4D NIfTI time series ({shape[3]} volumes{timing}), not a multi-channel "
                             "image; register one volume, e.g. nibabel.save(nibabel.load(path).slicer[..., 0], "
                             "'volume.nii.gz')")
    _check_voxels(path, shape, header)
    if header.get_data_dtype().kind not in "fiub":
        raise ShapeflowError(f"{path}: NIfTI of {header.get_data_dtype()} voxels; only real numbers are registered "
                             "(for complex data, register the magnitude: numpy.abs)")
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 5:                   # (X, Y, Z, 1, C) vector images
        data = data[:, :, :, 0]
    if data.ndim == 4:                   # (X, Y, Z, C): channels first
        channels = np.moveaxis(data, 3, 0)
    elif data.ndim in (2, 3):
        channels = data[None]
    else:
        raise ShapeflowError(f"{path}: NIfTI with {data.ndim} dimensions is not a 2D or 3D image")
    if channels.ndim == 4 and channels.shape[3] == 1 and min(channels.shape[1:3]) > 1:   # one slice: a 2D image
        channels, affine = channels[..., 0], _drop_axis(affine)
    elif channels.ndim == 3:
        affine = _drop_axis(affine)
    return _from_affine(channels, affine, path)


def _check_voxels(path: Path, shape: tuple[int, ...], header) -> None:
    """Refuse, before reading any data, a header announcing more than `MAX_VOXELS` voxels or (an
    uncompressed file) more data than the file holds."""
    voxels = int(np.prod(shape, dtype=np.float64))
    dims = " x ".join(str(n) for n in shape)
    if voxels > MAX_VOXELS:
        raise ShapeflowError(f"{path}: the header announces {dims} = {voxels:.3g} voxels, above the limit of "
                             f"{MAX_VOXELS:.3g} (shapeflow.io.limits.MAX_VOXELS); a corrupt header, or crop the image first")
    if not str(path).endswith(".gz"):
        need = int(header.get("vox_offset", 0)) + voxels * header.get_data_dtype().itemsize
        have = path.stat().st_size
        if need > have:
            raise ShapeflowError(f"{path}: the header announces {dims} voxels ({need} bytes with its offset) but the "
                                 f"file holds {have} bytes (truncated, or a corrupt header)")


def _is_time_series(header) -> bool:
    """Whether a 4D NIfTI's 4th axis is time: a time unit, a time-series intent, or a step other
    than the 0 or 1 a plain stack of volumes gets, unless the intent says the axis holds vector
    components."""
    intent = header.get_intent()[0]
    if intent in _VECTOR_INTENTS:
        return False
    step = float(header["pixdim"][4])
    return intent == "time series" or header.get_xyzt_units()[1] != "unknown" or step not in (0.0, 1.0)


def _drop_axis(affine: np.ndarray) -> np.ndarray:
    """The 2D affine of the first two axes of a 3D one."""
    return np.r_[np.c_[affine[:2, :2], affine[:2, 3]], [[0, 0, 1]]]


def _from_affine(channels: np.ndarray, affine: np.ndarray, path: Path) -> Image:
    d = channels.ndim - 1
    linear = affine[:d, :d]
    spacing = np.linalg.norm(linear, axis=0)
    if (spacing == 0).any():
        raise ShapeflowError(f"{path}: direction matrix is not invertible (a zero voxel axis in the affine)")
    return Image(torch.from_numpy(np.ascontiguousarray(channels)), spacing=spacing, origin=affine[:d, d],
                 direction=linear / spacing, source=str(path))


def _read_picture(path: Path) -> Image:
    import imageio.v3 as iio

    data = np.asarray(iio.imread(path), dtype=np.float32)
    if data.ndim == 2:
        channels = data[None]
    elif data.ndim == 3 and data.shape[2] in (3, 4):  # colour: channels first, alpha dropped
        channels = np.moveaxis(data[..., :3], 2, 0)
    elif data.ndim == 3:                             # a multi-page TIFF: a 3D volume
        channels = data[None]
    else:
        raise ShapeflowError(f"{path}: picture of shape {data.shape} is not a 2D image")
    return Image(torch.from_numpy(np.ascontiguousarray(channels)), source=str(path))


def _read_itk(path: Path) -> Image:
    """An .mha/.mhd/.nrrd image through SimpleITK, in a forked child: ITK crashes on some corrupt
    headers (NDims = -1, found by benchmarks/fuzz_readers.py)."""
    import_optional("SimpleITK", "reading .mha/.mhd/.nrrd")
    return read_isolated(_read_itk_here, path)


def _read_itk_here(path: Path) -> Image:
    sitk = import_optional("SimpleITK", "reading .mha/.mhd/.nrrd")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()           # the header only: refuse an absurd size before reading
    size = tuple(reader.GetSize()) + ((reader.GetNumberOfComponents(),) if reader.GetNumberOfComponents() > 1 else ())
    voxels = int(np.prod(size, dtype=np.float64))
    if voxels > MAX_VOXELS:
        raise ShapeflowError(f"{path}: the header announces {' x '.join(map(str, size))} = {voxels:.3g} voxels, above "
                             f"the limit of {MAX_VOXELS:.3g} (shapeflow.io.limits.MAX_VOXELS); a corrupt header, or "
                             f"crop the image first")
    img = reader.Execute()
    array = sitk.GetArrayFromImage(img).astype(np.float32)        # (z, y, x[, C])
    d = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() > 1:
        channels = np.moveaxis(array, -1, 0)
    else:
        channels = array[None]
    channels = np.ascontiguousarray(np.moveaxis(channels, list(range(1, d + 1)), list(range(d, 0, -1))))  # -> x, y, z
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(d, d)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    if d == 3:
        direction, origin = LPS @ direction, LPS @ origin
    return Image(torch.from_numpy(channels), spacing=img.GetSpacing(), origin=origin, direction=direction, source=str(path))


def image_from_vtk(grid, path: Path) -> Image:
    """A pyvista ImageData (regular grid) as an `Image`: its one data array (point data, or cell
    data on the grid of cell centres) as channels, with spacing, origin and direction. A grid with
    no or several arrays is refused (which one would be the image?)."""
    arrays = [("point", n) for n in grid.point_data.keys()] + [("cell", n) for n in grid.cell_data.keys()]
    if len(arrays) != 1:
        names = ", ".join(n for _, n in arrays) or "none"
        raise ShapeflowError(f"{path}: a VTK image (ImageData) with {len(arrays)} data arrays ({names}); "
                             "keep one (pyvista) or convert it to NIfTI")
    where, name = arrays[0]
    dims = np.asarray(grid.dimensions)
    spacing, origin = np.asarray(grid.spacing, np.float64), np.asarray(grid.origin, np.float64)
    direction = np.asarray(grid.direction_matrix, np.float64)
    values = np.asarray((grid.point_data if where == "point" else grid.cell_data)[name])
    if where == "cell":                  # one value per cell: a grid of the cell centres
        origin = origin + direction @ (spacing / 2 * (dims > 1))
        dims = np.maximum(dims - 1, 1)
    if values.dtype.kind not in "fiub":
        raise ShapeflowError(f"{path}: the VTK image array {name!r} holds {values.dtype}, not numbers")
    values = values.reshape(int(np.prod(dims)), -1).astype(np.float32)
    channels = values.reshape(dims[2], dims[1], dims[0], -1).transpose(3, 2, 1, 0)        # (C, x, y, z)
    if dims[2] == 1:                     # one slice: a 2D image
        channels, spacing, origin, direction = channels[..., 0], spacing[:2], origin[:2], direction[:2, :2]
    return Image(torch.from_numpy(np.ascontiguousarray(channels)), spacing=spacing, origin=origin,
                 direction=direction, source=str(path))


def _read_vtk_image(path: Path) -> Image:
    import pyvista  # noqa: F401 - imported once here, not in every forked reader

    check_vtk_counts(path)
    return read_isolated(_read_vtk_image_here, path)     # a crash on a corrupt file stays in a child


def _read_vtk_image_here(path: Path) -> Image:
    import pyvista as pv

    grid = pv.read(str(path))
    if not isinstance(grid, pv.ImageData):
        raise ShapeflowError(f"{path}: a VTK {type(grid).__name__}, not an image (ImageData)")
    return image_from_vtk(grid, path)


def _read_npy(path: Path) -> Image:
    data = np.load(path, allow_pickle=False)
    if data.ndim in (2, 3):
        data = data[None]
    return Image(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), source=str(path))


IMAGE_READERS: dict[str, Callable[[Path], Image]] = {
    ".nii": _read_nifti, ".nii.gz": _read_nifti, ".mha": _read_itk, ".mhd": _read_itk, ".nrrd": _read_itk,
    ".npy": _read_npy, ".dcm": read_dicom_file, ".vti": _read_vtk_image, ".vtk": _read_vtk_image,
    **{s: _read_picture for s in (".png", ".jpg", ".jpeg", ".tif", ".tiff")}}


def read_image(path: Path, suffix: str) -> Image:
    return IMAGE_READERS[suffix](path)


# --- writers ----------------------------------------------------------------------------------
def _write_nifti(image: Image, path: Path) -> None:
    import nibabel as nib

    d = image.dim
    affine = np.eye(4)
    affine[:d, :d] = (image.direction * image.spacing).numpy()
    affine[:d, 3] = image.origin.numpy()
    data = image.data_with_nan().detach().cpu().numpy()
    array = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
    if d == 2 and data.shape[0] > 1:     # (X, Y, 1, C): the channels stay on the 4th axis
        array = array[:, :, None]
    if image.labels is not None and data.shape[0] == 1 and np.array_equal(array, np.round(array)):
        array = array.astype(np.int16)
    nifti = nib.Nifti1Image(array, affine)
    nifti.header.set_xyzt_units("mm")    # the world is in mm; channels on the 4th axis carry no time unit
    nib.save(nifti, str(path))


def _write_picture(image: Image, path: Path) -> None:
    import imageio.v3 as iio

    if image.dim != 2:
        raise ShapeflowError(f"{path}: {path.suffix} holds 2D images; write 3D images as .nii.gz, .mha or .npy")
    data = image.data.detach().cpu().numpy()
    array = data[0] if data.shape[0] == 1 else np.moveaxis(data[:3], 0, -1)
    iio.imwrite(path, np.clip(np.round(array), 0, 255).astype(np.uint8), extension=path.suffix)


def _write_itk(image: Image, path: Path) -> None:
    sitk = import_optional("SimpleITK", "writing .mha/.nrrd")
    d = image.dim
    data = image.data_with_nan().detach().cpu().numpy()
    array = np.moveaxis(data, list(range(1, d + 1)), list(range(d, 0, -1)))     # (C, z, y, x)
    img = sitk.GetImageFromArray(array[0] if data.shape[0] == 1 else np.moveaxis(array, 0, -1),
                                 isVector=data.shape[0] > 1)
    direction, origin = image.direction.numpy(), image.origin.numpy()
    if d == 3:
        direction, origin = LPS @ direction, LPS @ origin
    img.SetSpacing(image.spacing.tolist())
    img.SetOrigin(origin.tolist())
    img.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(img, str(path), imageIO="NrrdImageIO" if path.suffix == ".nrrd" else "MetaImageIO")


def _write_vtk_image(image: Image, path: Path) -> None:
    import pyvista as pv

    if path.suffix.lower() == ".vtk" and not torch.equal(image.direction, torch.eye(image.dim, dtype=torch.float64)):
        raise ShapeflowError(f"{path}: a legacy .vtk image cannot hold a direction (the grid is rotated); "
                             "write .vti or .nii.gz")
    data = image.data_with_nan().detach().cpu().numpy()
    spacing, origin, direction = np.ones(3), np.zeros(3), np.eye(3)
    spacing[:image.dim], origin[:image.dim] = image.spacing.numpy(), image.origin.numpy()
    direction[:image.dim, :image.dim] = image.direction.numpy()
    volume = data if image.dim == 3 else data[..., None]                                  # (C, x, y, z)
    grid = pv.ImageData(dimensions=volume.shape[1:], spacing=spacing, origin=origin)
    grid.direction_matrix = direction
    values = volume.transpose(3, 2, 1, 0).reshape(-1, data.shape[0])                     # x fastest
    grid.point_data["values"] = values[:, 0] if data.shape[0] == 1 else values
    grid.save(str(path))


def _write_npy(image: Image, path: Path) -> None:
    """The array as `_read_npy` reads it back: (H, W) or (D, H, W) for one channel, (C, D, H, W) for
    a 3D image with channels; a 2D image with channels has no unambiguous .npy layout."""
    data = image.data_with_nan().detach().cpu().numpy()
    if data.shape[0] == 1:
        data = data[0]
    elif data.ndim == 3:
        raise ShapeflowError(f"{path}: a 2D image with {data.shape[0]} channels would read back as a 3D volume "
                             "from .npy; write it as .nii.gz or .mha")
    with open(path, "wb") as handle:
        np.save(handle, data)


IMAGE_WRITERS: dict[str, Callable[[Image, Path], None]] = {
    ".nii": _write_nifti, ".nii.gz": _write_nifti, ".mha": _write_itk, ".nrrd": _write_itk, ".npy": _write_npy,
    ".vti": _write_vtk_image, ".vtk": _write_vtk_image,
    **{s: _write_picture for s in (".png", ".jpg", ".jpeg", ".tif", ".tiff")}}


def write_image(image: Image, path: Path, suffix: str) -> None:
    IMAGE_WRITERS[suffix](image, path)
