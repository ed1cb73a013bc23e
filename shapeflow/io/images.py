"""Reading and writing images: NIfTI (nibabel), PNG/JPG/TIFF (imageio), MHA/NRRD (SimpleITK), .npy,
and reading DICOM (pydicom, `dicom.py`): single slices, multi-frame files and folders holding a series.

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

__all__ = ["IMAGE_READERS", "IMAGE_WRITERS", "read_dicom_series", "read_image", "write_image"]

def _read_nifti(path: Path) -> Image:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    while data.ndim > 3 and data.shape[3] == 1 and data.ndim > 4:
        data = data[:, :, :, 0]
    if data.ndim == 5:                   # (X, Y, Z, 1, C) vector images
        data = data[:, :, :, 0]
    if data.ndim == 4:                   # (X, Y, Z, C): channels (or time points) first
        channels = np.moveaxis(data, 3, 0)
    elif data.ndim == 3 and data.shape[2] == 1 and min(data.shape[:2]) > 1:   # one slice: a 2D image
        channels, affine = data[None, :, :, 0], _drop_axis(affine)
    elif data.ndim == 3:
        channels = data[None]
    elif data.ndim == 2:
        channels, affine = data[None], _drop_axis(affine)
    else:
        raise ShapeflowError(f"{path}: NIfTI with {data.ndim} dimensions is not a 2D or 3D image")
    return _from_affine(channels, affine, path)


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
    sitk = import_optional("SimpleITK", "reading .mha/.mhd/.nrrd")
    img = sitk.ReadImage(str(path))
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


def _read_npy(path: Path) -> Image:
    data = np.load(path, allow_pickle=False)
    if data.ndim in (2, 3):
        data = data[None]
    return Image(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), source=str(path))


IMAGE_READERS: dict[str, Callable[[Path], Image]] = {
    ".nii": _read_nifti, ".nii.gz": _read_nifti, ".mha": _read_itk, ".mhd": _read_itk, ".nrrd": _read_itk,
    ".npy": _read_npy, ".dcm": read_dicom_file, **{s: _read_picture for s in (".png", ".jpg", ".jpeg", ".tif", ".tiff")}}


def read_image(path: Path, suffix: str) -> Image:
    return IMAGE_READERS[suffix](path)


# --- writers ----------------------------------------------------------------------------------
def _write_nifti(image: Image, path: Path) -> None:
    import nibabel as nib

    d = image.dim
    affine = np.eye(4)
    affine[:d, :d] = (image.direction * image.spacing).numpy()
    affine[:d, 3] = image.origin.numpy()
    data = image.data.detach().cpu().numpy()
    array = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
    if image.labels is not None and data.shape[0] == 1 and np.array_equal(array, np.round(array)):
        array = array.astype(np.int16)
    nib.save(nib.Nifti1Image(array, affine), str(path))


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
    data = image.data.detach().cpu().numpy()
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


def _write_npy(image: Image, path: Path) -> None:
    with open(path, "wb") as handle:
        np.save(handle, image.data.detach().cpu().numpy())


IMAGE_WRITERS: dict[str, Callable[[Image, Path], None]] = {
    ".nii": _write_nifti, ".nii.gz": _write_nifti, ".mha": _write_itk, ".nrrd": _write_itk, ".npy": _write_npy,
    **{s: _write_picture for s in (".png", ".jpg", ".jpeg", ".tif", ".tiff")}}


def write_image(image: Image, path: Path, suffix: str) -> None:
    IMAGE_WRITERS[suffix](image, path)
