"""What `Result.save` writes besides the deformation and the report: the warped shape or image,
and for images the displacement field (ITK/ANTs convention), the warped labels and an overlay."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import atomic_write, suffix_of
from ..grids import Grid
from ..shapes import Image, Mesh, PointCloud
from .files import write
from .images import IMAGE_WRITERS

__all__ = ["write_warped", "displacement_image", "write_displacement_nifti"]


def write_warped(result: Any, folder: Path, name: str | None = None) -> None:
    """`folder/warped<ext>` in the source's kind and format (`name`: another extension); images
    also get the displacement field, warped labels and an overlay (`write_image_outputs`)."""
    if isinstance(result.warped, Image):
        write_image_outputs(result, folder, name)
        return
    suffix = name or _default_suffix(result.source)
    warped = result.warped if isinstance(result.warped, PointCloud) else PointCloud(torch.as_tensor(result.warped))
    # with_points: a cloud's normals are not the warped cloud's (a mesh's are recomputed)
    write(dataclasses.replace(warped.with_points(warped.points), source=None), Path(folder) / f"warped{suffix}")


def _default_suffix(source: Any) -> str:
    if isinstance(source, PointCloud) and source.source:
        return suffix_of(source.source)
    return ".ply" if isinstance(source, Mesh) or (isinstance(source, PointCloud) and source.dim == 3) else ".csv"


def displacement_image(result: Any) -> Image:
    """The map of an image registration as a displacement field on the fixed grid, in the ITK/ANTs
    convention: vectors in mm from each fixed voxel to its point in the moving image, components
    in LPS (x and y negated from the NIfTI RAS world) in 3D. Returns an `Image` with data (d, *S)."""
    grid = Grid.of(result.target)
    phi = result.deformation
    with torch.no_grad():
        points = grid.points(phi.dtype, phi.device)
        vectors = (phi(points.reshape(-1, grid.dim)).reshape(points.shape) - points).cpu().double()
    if grid.dim == 3:
        vectors = vectors * torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)
    return dataclasses.replace(result.target, data=vectors.movedim(-1, 0).float(), labels=None, source=None)


def write_displacement_nifti(image: Image, path: Path) -> None:
    """A displacement `Image` (d, *S) as a NIfTI vector image (X, Y, Z, 1, d), as ANTs reads it."""
    import nibabel as nib

    d = image.dim
    affine = np.eye(4)
    affine[:d, :d] = (image.direction * image.spacing).numpy()
    affine[:d, 3] = image.origin.numpy()
    vectors = np.moveaxis(image.data.numpy(), 0, -1)                      # (*S, d)
    array = vectors.reshape(*image.shape, *([1] * (3 - d)), 1, d)         # (X, Y, Z, 1, d)
    nifti = nib.Nifti1Image(array.astype(np.float32), affine)
    nifti.header.set_intent("vector")
    nib.save(nifti, str(path))


def write_image_outputs(result: Any, folder: Path, name: str | None = None) -> None:
    """Write the warped image (fixed header), warped labels, displacement.nii.gz and overlay.png."""
    from ..viz import overlay

    folder = Path(folder)
    suffix = name or (suffix_of(result.target.source) if result.target.source else ".nii.gz")
    # NIfTI where the fixed image's format can't hold the result: a 3D image from a 2D picture
    # format, or a format we read but do not write (a DICOM file or series folder)
    if suffix not in IMAGE_WRITERS or (result.warped.dim == 3 and suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff")):
        suffix = ".nii.gz"
    write(dataclasses.replace(result.warped, labels=None), folder / f"warped{suffix}")
    if result.warped.labels is not None:
        # the label map carried as its own labels: NIfTI then stores whole numbers as integers
        labels = dataclasses.replace(result.warped, data=result.warped.labels[None].float())
        write(labels, folder / f"warped_labels{'.nii.gz' if result.warped.dim == 3 else '.png'}")
    atomic_write(folder / "displacement.nii.gz", lambda tmp: write_displacement_nifti(displacement_image(result), tmp))
    overlay(result, folder / "overlay.png")
