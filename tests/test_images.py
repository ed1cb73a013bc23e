"""Image container, image IO round trips and bad image input."""
import os

import numpy as np
import pytest
import torch

import shapeflow as sf


def nibabel_file(name):
    import nibabel.testing

    return os.path.join(nibabel.testing.data_path, name)


def rotated_image(shape=(9, 8, 7)):
    direction = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    data = torch.rand(1, *shape)
    return sf.Image(data, spacing=[1.0, 1.5, 2.5], origin=[10.0, -5.0, 3.0], direction=direction)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_volume_round_trip_keeps_geometry(tmp_path, suffix):
    image = rotated_image()
    back = sf.read(sf.write(image, tmp_path / f"v{suffix}"))
    assert isinstance(back, sf.Image)
    torch.testing.assert_close(back.data, image.data)
    torch.testing.assert_close(back.index_to_world, image.index_to_world, atol=1e-5, rtol=0)


def test_npy_picture_and_multichannel_round_trips(tmp_path):
    image = rotated_image()
    back = sf.read(sf.write(image, tmp_path / "v.npy"), kind="image")
    torch.testing.assert_close(back.data, image.data)
    picture = sf.Image(torch.randint(0, 256, (1, 20, 30)).float())
    torch.testing.assert_close(sf.read(sf.write(picture, tmp_path / "p.png")).data, picture.data)
    colour = sf.Image(torch.randint(0, 256, (3, 20, 30)).float())
    torch.testing.assert_close(sf.read(sf.write(colour, tmp_path / "c.png")).data, colour.data)
    with pytest.raises(sf.ShapeflowError, match="time series"):      # 4D NIfTI with a TR: not channels
        sf.read(nibabel_file("example4d.nii.gz"))


def test_real_volumes_load_with_their_affine():
    import nibabel

    path = nibabel_file("anatomical.nii")
    image = sf.read(path)
    torch.testing.assert_close(image.index_to_world, torch.as_tensor(nibabel.load(path).affine, dtype=torch.float64))
    pytest.importorskip("nilearn")
    from nilearn import datasets

    mni = sf.read(datasets.MNI152_FILE_PATH)        # bundled with nilearn, no download
    assert mni.dim == 3 and min(mni.shape) > 50 and float(mni.data.max()) > 0


@pytest.mark.parametrize("make, message", [
    (lambda: sf.Image(torch.zeros(1, 0, 4)), "empty"),
    (lambda: sf.Image(torch.tensor([[[float("nan"), float("nan")]]])), "every voxel is NaN"),
    (lambda: sf.Image(torch.tensor([[[1.0, float("inf")]]])), "infinite"),
    (lambda: sf.Image(torch.zeros(1, 4, 4), direction=[[1, 0], [1, 0]]), "not invertible"),
    (lambda: sf.Image(torch.zeros(1, 4, 4), spacing=[1, 0]), "spacing must be positive"),
    (lambda: sf.Image(torch.zeros(4, 4)), "(C, H, W)"),
    (lambda: sf.Image(torch.zeros(1, 4, 4), labels=torch.zeros(3, 3)), "labels have shape"),
])
def test_bad_images_give_one_line_errors(make, message):
    with pytest.raises(sf.ShapeflowError) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unreadable_and_degenerate_files(tmp_path):
    import nibabel

    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(sf.ShapeflowError, match="bad.nii.gz: unreadable .nii.gz file"):
        sf.read(bad)
    flat = tmp_path / "flat.nii.gz"
    degenerate = nibabel.Nifti1Image(np.zeros((4, 4, 4), np.float32), None)
    degenerate.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)     # a zero voxel axis: no inverse
    degenerate.set_qform(None, code=0)
    nibabel.save(degenerate, str(flat))
    with pytest.raises(sf.ShapeflowError, match="flat.nii.gz: .*not invertible"):
        sf.read(flat)
    with pytest.raises(sf.ShapeflowError, match="cannot be read as points"):
        sf.read(flat, kind="points")
    with pytest.raises(sf.ShapeflowError, match="2D images"):
        sf.write(rotated_image(), tmp_path / "v.png")


def test_dicom_slices_from_pydicom_register_onto_a_deformed_copy():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from shapeflow.deform import DisplacementField
    from shapeflow.grids import Grid, sample
    from shapeflow.synthetic import smooth_field

    ct = sf.read(get_testdata_file("CT_small.dcm"))
    raw = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert ct.shape == (128, 128) and ct.spacing.tolist() == pytest.approx([0.661468, 0.661468])
    assert float(ct.data.min()) == float(raw.pixel_array.min()) * float(raw.RescaleSlope) + float(raw.RescaleIntercept)
    assert sf.read(get_testdata_file("MR_small.dcm")).shape == (64, 64)
    grid = Grid.of(ct)
    points = grid.points(torch.float64)
    truth = DisplacementField(grid).double()
    with torch.no_grad():
        truth.control[:, 1:-1, 1:-1] = smooth_field(points, 2.5, 60.0, seed=3)
    moving = ct.with_data(sample(ct.data, grid, truth.inverse(points.reshape(-1, 2)).reshape(points.shape).float()))
    result = sf.register(moving, ct, progress=False)
    x = points[16:-16, 16:-16].reshape(-1, 2).float()
    with torch.no_grad():
        error = float((result.deformation(x) - truth.float()(x)).norm(dim=1).mean())
        before = float((truth.float()(x) - x).norm(dim=1).mean())
    assert error < 0.5 * before, (error, before)
