"""Dense image registration: Gauss-Newton steps, known fields, spacing, labels, SVF, the GN layer, CLI."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import shapeflow as sf
from shapeflow.grids import Grid, sample, spatial_gradient
from shapeflow.learn import gauss_newton_layer
from shapeflow.solvers import gauss_newton_step
from shapeflow.synthetic import phantom_pair


def endpoint_error(result, truth, fixed, border=0.1):
    """Mean |psi(x) - truth(x)| (mm) over the interior voxels of the fixed grid."""
    points = Grid.of(fixed).points()
    inner = tuple(slice(max(1, int(n * border)), n - max(1, int(n * border))) for n in fixed.shape)
    x = points[inner].reshape(-1, fixed.dim)
    with torch.no_grad():
        return float((result.deformation(x) - truth(x)).norm(dim=1).mean()), float((truth(x) - x).norm(dim=1).mean())


def test_one_gauss_newton_step_reduces_ssd():
    moving, fixed, _ = phantom_pair((40, 40), spacing=1.5, amplitude=3.0, seed=1)
    grid = Grid.of(fixed)
    points = grid.points()
    u = torch.zeros(2, 40, 40)
    warped = sample(moving.data, grid, points)
    du, info = gauss_newton_step(warped - fixed.data, spatial_gradient(warped, grid), u, grid, lam=0.003)
    after = sample(moving.data, grid, points + du.movedim(0, -1))
    assert float((after - fixed.data).pow(2).mean()) < 0.5 * float((warped - fixed.data).pow(2).mean())
    # the step solves its linear system: compare with a dense solve of the same equations
    assert bool(info.converged) or float(info.residual) < 1e-2


@pytest.mark.parametrize("model, stride", [("displacement", 1), ("svf", 1), ("displacement", 4)])
def test_known_field_is_recovered_in_2d(model, stride):
    moving, fixed, truth = phantom_pair((64, 64), spacing=1.5, amplitude=4.0, seed=2)
    result = sf.register(moving, fixed, model=model, progress=False, stride=stride)
    error, before = endpoint_error(result, truth, fixed)
    assert error < 0.45 and error < 0.25 * before, (error, before)        # 0.45 mm = 0.3 voxel
    assert result.metrics["mse_after"] < 0.2 * result.metrics["mse_before"]
    assert result.metrics["jacobian_percent_negative"] == 0.0


def test_known_field_is_recovered_in_3d():
    moving, fixed, truth = phantom_pair((32, 32, 32), spacing=2.0, amplitude=4.0, blobs=120, seed=3)
    result = sf.register(moving, fixed, model="svf", progress=False, levels=2)
    error, before = endpoint_error(result, truth, fixed)
    assert error < 1.0 and error < 0.35 * before, (error, before)          # 1 mm = half a voxel
    assert result.metrics["jacobian_percent_negative"] == 0.0


def test_anisotropic_spacing_gives_the_same_world_space_answer():
    # the same continuous phantom and field (60 x 60 mm), sampled at 1 x 1 mm and at 1 x 2 mm
    iso = phantom_pair((61, 61), spacing=[1.0, 1.0], amplitude=3.0, seed=4)
    aniso = phantom_pair((61, 31), spacing=[1.0, 2.0], amplitude=3.0, seed=4)
    results = [sf.register(m, f, progress=False) for m, f, _ in (iso, aniso)]
    x = Grid.of(aniso[1]).points()[8:-8, 4:-4].reshape(-1, 2)
    with torch.no_grad():
        maps = [r.deformation(x) for r in results]
        truth = iso[2](x)
        torch.testing.assert_close(aniso[2](x), truth, atol=1e-3, rtol=0)     # same field in world units
    difference = float((maps[0] - maps[1]).norm(dim=1).mean())
    displacement = float((truth - x).norm(dim=1).mean())
    assert difference < 0.2 * displacement, (difference, displacement)
    for found in maps:
        assert float((found - truth).norm(dim=1).mean()) < 0.25 * displacement


def test_labels_warp_without_interpolation_artefacts_and_overlap_improves():
    moving, fixed, _ = phantom_pair((48, 48), spacing=1.0, amplitude=4.0, seed=5)
    labels = lambda image: (image.data[0] > 0.3).long() + (image.data[0] > 0.6).long()
    result = sf.register(moving, fixed, progress=False, labels_moving=labels(moving), labels_fixed=labels(fixed))
    assert set(result.warped.labels.unique().tolist()) <= set(labels(moving).unique().tolist())
    assert result.warped.labels.dtype == torch.long
    m = result.metrics
    assert m["dice_mean"] > np.mean(list(m["dice_before"].values())) + 0.2 and m["dice_mean"] > 0.75
    assert all(np.isfinite(v) for v in m["hd95"].values())


def test_landmark_error_uses_the_same_map():
    moving, fixed, truth = phantom_pair((48, 48), spacing=1.0, amplitude=4.0, seed=6)
    fixed_marks = torch.tensor([[15.0, 20.0], [30.0, 25.0], [24.0, 33.0]])
    with torch.no_grad():
        moving_marks = truth(fixed_marks)
    result = sf.register(moving, fixed, progress=False, landmarks_moving=moving_marks, landmarks_fixed=fixed_marks)
    assert result.metrics["tre"]["mean"] < 0.5 * result.metrics["tre_before"]["mean"]


def test_affine_model_recovers_a_known_affine_map():
    moving, fixed, _ = phantom_pair((48, 48), spacing=1.0, amplitude=0.0, seed=7)
    A = torch.tensor([[1.05, 0.08], [-0.06, 0.97]])
    t = torch.tensor([2.0, -1.5])
    points = Grid.of(fixed).points()
    # fixed(x) = moving(A x + t): sample the phantom moving image through the known map
    shifted = fixed.with_data(sample(moving.data, Grid.of(moving), points @ A.T + t))
    result = sf.register(moving, shifted, model="affine", progress=False, levels=2)
    torch.testing.assert_close(result.deformation.matrix.detach(), A, atol=0.02, rtol=0)
    torch.testing.assert_close(result.deformation.translation.detach(), t, atol=0.3, rtol=0)


def test_gauss_newton_layer_passes_gradcheck():
    grid = Grid((4, 5), torch.tensor([1.0, 1.5], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                torch.eye(2, dtype=torch.float64))
    moving = torch.rand(2, 4, 5, dtype=torch.float64, requires_grad=True)
    fixed = torch.rand(2, 4, 5, dtype=torch.float64, requires_grad=True)
    u = (0.1 * torch.randn(2, 4, 5, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, f, d: gauss_newton_layer(m, f, grid, 0.5, d), (moving, fixed, u))


def test_gauss_newton_layer_matches_the_solver_step():
    moving, fixed, _ = phantom_pair((24, 24), spacing=1.0, amplitude=2.0, seed=8)
    grid = Grid.of(fixed)
    m, f = moving.data.double(), fixed.data.double()
    layer = gauss_newton_layer(m, f, grid, 0.01, tol=1e-10)
    warped = sample(m, grid, grid.points(torch.float64))
    gradient = (spatial_gradient(warped, grid) + spatial_gradient(f, grid)) / 2
    step, _ = gauss_newton_step(warped - f, gradient, torch.zeros_like(layer), grid, 0.01, cg_iterations=2000, cg_tol=1e-10)
    torch.testing.assert_close(layer, step, atol=1e-6, rtol=1e-5)


def test_image_cli_writes_every_output_and_rejects_bad_input(tmp_path):
    from shapeflow_cli.main import app

    moving, fixed, truth = phantom_pair((24, 26, 20), spacing=[1.5, 1.2, 2.0], amplitude=2.0, seed=9)
    labels = lambda image: image.with_data(((image.data > 0.4).float() + (image.data > 0.8).float()))
    for name, image in [("m.nii.gz", moving), ("f.nii.gz", fixed), ("ml.nii.gz", labels(moving)), ("fl.nii.gz", labels(fixed))]:
        sf.write(image, tmp_path / name)
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", str(tmp_path / "m.nii.gz"), str(tmp_path / "f.nii.gz"), "-o", str(out),
                                   "--labels-moving", str(tmp_path / "ml.nii.gz"), "--labels-fixed", str(tmp_path / "fl.nii.gz"),
                                   "--model", "svf", "--gif", "flow.gif", "-q", "--iterations", "4"])
    assert run.exit_code == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["deformation.pt", "displacement.nii.gz", "flow.gif", "overlay.png",
                                                      "report.json", "warped.nii.gz", "warped_labels.nii.gz"]
    warped = sf.read(out / "warped.nii.gz")
    torch.testing.assert_close(warped.index_to_world, fixed.index_to_world, atol=1e-5, rtol=0)   # fixed's header
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["jacobian_percent_negative"] == 0.0 and "dice" in report["metrics"]
    import nibabel

    field = nibabel.load(str(out / "displacement.nii.gz"))
    assert field.shape == (24, 26, 20, 1, 3) and field.header.get_intent()[0] == "vector"

    sf.write(sf.Image(torch.rand(1, 20, 20)), tmp_path / "flat.png")
    sf.write(sf.Image(torch.zeros(1, 5, 5, 5)), tmp_path / "small.nii.gz")
    before = sorted(tmp_path.iterdir())
    for args, message in [([str(tmp_path / "flat.png"), str(tmp_path / "f.nii.gz")], "moving image is 2D but fixed image is 3D"),
                          ([str(tmp_path / "m.nii.gz"), str(tmp_path / "f.nii.gz"), "--labels-moving", str(tmp_path / "small.nii.gz")],
                           "does not match its image"),
                          ([str(tmp_path / "m.nii.gz"), str(tmp_path / "ant.ply")], "no such file")]:
        run = CliRunner().invoke(app, ["register", *args, "-o", str(tmp_path / "bad"), "-q"])
        assert run.exit_code == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert sorted(tmp_path.iterdir()) == before


def test_moving_image_on_a_coarser_grid_registers_in_world_space():
    moving, fixed, truth = phantom_pair((48, 48), spacing=1.0, amplitude=3.0, seed=10)
    from shapeflow.grids import downsample

    data, grid = downsample(moving.data, Grid.of(moving), 2)          # moving at 2 mm, fixed at 1 mm
    coarse = sf.Image(data, grid.spacing, grid.origin, grid.direction)
    result = sf.register(coarse, fixed, progress=False)
    assert result.warped.shape == fixed.shape
    error, before = endpoint_error(result, truth, fixed, border=0.15)
    assert error < 0.5 * before, (error, before)


def test_real_brain_template_with_a_known_field():
    """nilearn's MNI152 T1 template (bundled), at 4 mm, deformed by a known smooth field."""
    pytest.importorskip("nilearn")
    from nilearn import datasets

    from shapeflow.grids import downsample
    from shapeflow.synthetic import smooth_field
    from shapeflow.deform import DisplacementField

    template = sf.read(datasets.MNI152_FILE_PATH)
    data, grid = downsample(template.data, Grid.of(template), 4)
    fixed = sf.Image(data, grid.spacing, grid.origin, grid.direction)
    points = grid.points(torch.float64)
    truth = DisplacementField(grid).double()
    with torch.no_grad():
        truth.control[(slice(None),) + tuple(slice(1, 1 + n) for n in grid.shape)] = smooth_field(points, 6.0, 90.0, seed=1)
    inverse = truth.inverse(points.reshape(-1, 3)).reshape(points.shape).float()
    moving = fixed.with_data(sample(fixed.data, grid, inverse))
    result = sf.register(moving, fixed, model="svf", progress=False, levels=2)
    brain = fixed.data[0] > 0.2 * float(fixed.data.max())
    x = points.float()[brain]
    with torch.no_grad():
        error = float((result.deformation(x) - truth.float()(x)).norm(dim=1).mean())
        before = float((truth.float()(x) - x).norm(dim=1).mean())
    assert error < 0.5 * before and error < 2.5, (error, before)      # 2.5 mm: under 2/3 of a 4 mm voxel
    assert result.metrics["jacobian_percent_negative"] == 0.0
