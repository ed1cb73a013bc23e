"""Bad input and options that do not apply: one-line errors naming the file or option, never a
silent fallback (regressions of the "tried as a new user would" issue)."""
import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import shapeflow as sf
from shapeflow.grids import Grid, sample
from shapeflow.pipelines.images import ImageOptions
from shapeflow.synthetic import phantom_pair
from shapeflow_cli.main import app


def _cloud(n=40, d=2, seed=0):
    return np.random.default_rng(seed).random((n, d))


# --- identical points --------------------------------------------------------------------


@pytest.mark.parametrize("which", ["source", "target"])
def test_a_cloud_of_identical_points_is_refused(which):
    same = np.tile([[1.0, 2.0, 3.0]], (30, 1))
    pair = (same, _cloud(30, 3)) if which == "source" else (_cloud(30, 3), same)
    with pytest.raises(sf.ShapeflowError, match=rf"{which}: all 30 points coincide"):
        sf.register(*pair, model="rigid", progress=False)


def test_a_flat_but_spread_cloud_is_accepted():
    """Zero extent along one axis (a planar contour in 3D) is a legitimate shape, not an error."""
    flat = np.c_[_cloud(50, 2), np.zeros(50)]
    result = sf.register(flat, flat + [0.1, 0.0, 0.0], model="rigid", loss="l2", progress=False, iterations=30)
    assert result.metrics["rmse"] < 0.01


# --- options that do not apply, and bad values ---------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "rigid", "blocks": 4}, "option 'blocks' applies to model 'resnet', not to model 'rigid'"),
    ({"loss": "chamfer", "refine": None}, "option 'refine' applies to loss 'sinkhorn', not to loss 'chamfer'"),
    ({"loss": "l2", "subsample": 100}, "option 'subsample' applies to loss 'sinkhorn' and loss 'chamfer', not to loss 'l2'"),
    ({"loss": "chamfer", "blur": 0.1}, "option 'blur' applies to loss 'sinkhorn', not to loss 'chamfer'"),
    ({"model": "rigid", "prealign": "affine"}, "prealign applies before a non-linear model; model 'rigid'"),
    ({"dtype": "foo"}, "unknown dtype 'foo'; choose from float32, float64"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"refine": "l2"}, "unknown refine loss 'l2'"),
])
def test_shape_options_that_do_not_apply_are_errors(kwargs, message):
    with pytest.raises(sf.ShapeflowError) as info:
        sf.register(_cloud(), _cloud(seed=1), progress=False, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "affine", "solver": "amg"}, "solver applies to the non-linear image models"),
    ({"model": "affine", "prealign": "affine"}, "prealign applies to the non-linear image models"),
    ({"model": "affine", "stride": 2}, "option 'stride' applies to image model 'displacement' and image model 'svf'"),
    ({"ncc_radius": 3}, "option 'ncc_radius' applies to image loss 'ncc', not to image loss 'ssd'"),
    ({"stride": 0}, "stride must be an int >= 1"),
    ({"iterations": [2, 1]}, "iterations has 2 values but levels=3"),
    ({"regularization": [0.1, 0.1], "levels": 3}, "regularization has 2 values but levels=3"),
    ({"dtype": "half"}, "unknown dtype 'half'"),
])
def test_image_options_that_do_not_apply_are_errors(kwargs, message):
    moving, fixed, _ = phantom_pair((20, 20), amplitude=1.0, seed=1)
    with pytest.raises(sf.ShapeflowError) as info:
        sf.register(moving, fixed, progress=False, **kwargs)
    assert message in str(info.value)


def test_per_level_lists_drop_the_coarsest_values_with_their_levels():
    """A 24-voxel image builds 2 of 3 requested levels (a level needs 16 voxels to be halved):
    the list's first (coarsest) value goes with the dropped level, the finest level gets the last."""
    moving, fixed, _ = phantom_pair((24, 24), amplitude=1.0, seed=1)
    result = sf.register(moving, fixed, iterations=[5, 2, 1], levels=3, prealign=None, progress=False, snapshots=False)
    per_level = {}
    for row in result.history:
        per_level[row["stage"]] = per_level.get(row["stage"], 0) + 1
    assert set(per_level) == {"level0", "level1"}
    assert per_level["level0"] <= 2 and per_level["level1"] <= 1
    opts = ImageOptions(levels=3, iterations=[5, 2, 1])
    assert [opts.steps(k, 2) for k in range(2)] == [2, 1] and [opts.steps(k, 3) for k in range(3)] == [5, 2, 1]


def test_sample_refuses_an_unknown_mode():
    grid = Grid((4, 4), torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                torch.eye(2, dtype=torch.float64))
    with pytest.raises(sf.ShapeflowError, match="sample\\(\\): unknown mode 'cubic'; choose from linear, nearest"):
        sample(torch.zeros(1, 4, 4), grid, torch.zeros(3, 2), mode="cubic")
    with pytest.raises(sf.ShapeflowError, match="unknown padding 'reflect'"):
        sample(torch.zeros(1, 4, 4), grid, torch.zeros(3, 2), padding="reflect")


# --- images ----------------------------------------------------------------------------------


def test_a_constant_image_is_refused_naming_the_file(tmp_path):
    moving, fixed, _ = phantom_pair((20, 20), amplitude=1.0, seed=1)
    flat = sf.Image(torch.full((1, 20, 20), 7.0), source=str(tmp_path / "flat.nii.gz"))
    with pytest.raises(sf.ShapeflowError, match=r"flat.nii.gz: the image is constant \(every voxel is 7\)"):
        sf.register(flat, fixed, progress=False)
    with pytest.raises(sf.ShapeflowError, match="the image is constant"):
        sf.register(moving, sf.Image(torch.zeros(1, 20, 20)), progress=False)
    sf.write(sf.Image(torch.full((1, 20, 20), 7.0)), tmp_path / "c.nii.gz")
    sf.write(fixed, tmp_path / "f.nii.gz")
    run = CliRunner().invoke(app, ["register", str(tmp_path / "c.nii.gz"), str(tmp_path / "f.nii.gz"),
                                   "-o", str(tmp_path / "out"), "-q"])
    assert run.exit_code == 2 and "c.nii.gz: the image is constant" in run.stderr
    assert not (tmp_path / "out").exists()


def test_a_one_voxel_nifti_is_3d_and_refused_as_too_small(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ones((1, 1, 1), dtype=np.float32), np.eye(4)), str(tmp_path / "dot.nii.gz"))
    dot = sf.read(tmp_path / "dot.nii.gz")
    assert dot.dim == 3 and dot.shape == (1, 1, 1)
    # a genuine single slice (X, Y, 1) still reads as 2D
    nib.save(nib.Nifti1Image(np.random.rand(5, 6, 1).astype(np.float32), np.eye(4)), str(tmp_path / "slice.nii.gz"))
    assert sf.read(tmp_path / "slice.nii.gz").shape == (5, 6)
    fixed = sf.Image(torch.rand(1, 8, 8, 8))
    with pytest.raises(sf.ShapeflowError, match=r"dot.nii.gz: image is 1x1x1 voxels; registration needs at least 2"):
        sf.register(dot, fixed, progress=False)


def test_a_4d_nifti_time_series_is_refused_not_registered_as_channels(tmp_path):
    import nibabel.testing

    series = os.path.join(nibabel.testing.data_path, "functional.nii")          # 20 volumes, TR 2 s
    with pytest.raises(sf.ShapeflowError, match=r"functional.nii: a 4D NIfTI time series \(20 volumes, 2 sec apart\)"):
        sf.register(series, os.path.join(nibabel.testing.data_path, "anatomical.nii"), progress=False)
    run = CliRunner().invoke(app, ["register", series, os.path.join(nibabel.testing.data_path, "anatomical.nii"),
                                   "-o", str(tmp_path / "out"), "-q"])
    assert run.exit_code == 2 and "register one volume" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_write_refuses_data_its_format_cannot_hold_naming_the_file(tmp_path):
    cloud = sf.PointCloud(_cloud(10, 3), point_data={"colors": np.zeros((10, 3), np.uint8)})
    for name, message in [("c.npy", ".npy cannot hold the point_data 'colors'"),
                          ("c.csv", ".csv cannot hold the point_data 'colors'")]:
        with pytest.raises(sf.ShapeflowError) as info:
            sf.write(cloud, tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and message in str(info.value)
        assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []                               # nothing written, no temporary left
    with pytest.raises(sf.ShapeflowError, match=r"point_data\['colors'\] must be an array of 10 rows"):
        sf.PointCloud(_cloud(10, 3), point_data={"colors": np.zeros((9, 3))})


def test_warp_applies_an_image_deformation_to_images_and_points(tmp_path):
    moving, fixed, truth = phantom_pair((24, 24), amplitude=2.0, seed=3)
    result = sf.register(moving, fixed, progress=False)
    result.save(tmp_path / "reg")
    sf.write(moving, tmp_path / "m.nii.gz")
    sf.write(fixed, tmp_path / "f.nii.gz")
    runner = CliRunner()
    run = runner.invoke(app, ["warp", str(tmp_path / "reg" / "deformation.pt"), str(tmp_path / "m.nii.gz"),
                              "-o", str(tmp_path / "w.nii.gz")])
    assert run.exit_code == 0, run.stderr
    warped = sf.read(tmp_path / "w.nii.gz")
    # the same resampling as the registration's own warped image
    np.testing.assert_allclose(warped.data.numpy(), result.warped.data.numpy(), atol=1e-4)
    run = runner.invoke(app, ["warp", str(tmp_path / "reg" / "deformation.pt"), str(tmp_path / "m.nii.gz"),
                              "-o", str(tmp_path / "w2.nii.gz"), "--reference", str(tmp_path / "f.nii.gz")])
    assert run.exit_code == 0, run.stderr
    run = runner.invoke(app, ["warp", str(tmp_path / "reg" / "deformation.pt"), str(tmp_path / "m.nii.gz"),
                              "-o", str(tmp_path / "w3.nii.gz"), "--inverse"])
    assert run.exit_code == 2 and "--inverse applies to shapes" in run.stderr
    # an affine-only deformation has no grid: the reference is needed
    affine = sf.register(moving, fixed, model="affine", progress=False)
    affine.deformation.save(tmp_path / "affine.pt")
    run = runner.invoke(app, ["warp", str(tmp_path / "affine.pt"), str(tmp_path / "m.nii.gz"), "-o",
                              str(tmp_path / "w4.nii.gz")])
    assert run.exit_code == 2 and "give the fixed image as the reference" in run.stderr
    assert not (tmp_path / "w3.nii.gz").exists() and not (tmp_path / "w4.nii.gz").exists()


# --- global state ---------------------------------------------------------------------------


def test_rendering_leaves_the_process_environment_and_matplotlib_alone(tmp_path, monkeypatch):
    import matplotlib

    monkeypatch.delenv("VTK_DEFAULT_OPENGL_WINDOW", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    backend = matplotlib.get_backend()
    contour = _cloud(30, 2)
    result = sf.register(contour, contour + 0.05, model="rigid", progress=False, iterations=5)
    sf.viz.animate(result, tmp_path / "flow.gif", frames=3)
    assert matplotlib.get_backend() == backend
    before = dict(os.environ)
    moving3 = _cloud(30, 3)
    result3 = sf.register(moving3, moving3 + 0.05, model="rigid", progress=False, iterations=5)
    sf.viz.animate(result3, tmp_path / "flow3.gif", frames=2)
    assert dict(os.environ) == before
    assert json.loads(json.dumps(result3.report()))   # still a JSON-able report
