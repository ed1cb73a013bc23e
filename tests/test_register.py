import math

import numpy as np
import pytest
import torch

import shapeflow as sf
from shapeflow.solvers.fit import fit
from shapeflow.synthetic import smooth_deformation


def rotation_2d(angle):
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]])


def rotation_3d(axis_angle):
    w = torch.tensor(axis_angle, dtype=torch.float64)
    a = float(w.norm())
    k = w / a
    K = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=torch.float64)
    return (torch.eye(3, dtype=torch.float64) + math.sin(a) * K + (1 - math.cos(a)) * K @ K).float()


@pytest.mark.parametrize("loss", ["l2", "chamfer"])
def test_rigid_recovers_a_known_rotation_and_translation_in_3d(ant, loss):
    R, t = rotation_3d([0.3, -0.2, 0.4]), torch.tensor([5.0, -3.0, 2.0])
    target = ant.points @ R.T + t
    result = sf.register(ant, sf.PointCloud(target), model="rigid", loss=loss, progress=False)
    assert result.deformation.dtype == torch.float64     # a linear map in world units keeps float64 offsets
    torch.testing.assert_close(result.deformation.rotation.float(), R, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.deformation.translation.float(), t, atol=1e-4 * 50, rtol=0)
    assert float(result.deformation.scale) == 1.0
    assert result.metrics["chamfer"] < 1e-3


def test_rigid_recovers_a_known_rotation_and_translation_in_2d(assets):
    contour = sf.read(assets / "horse_contour.csv").points.float()
    R, t = rotation_2d(0.45), torch.tensor([-20.0, 35.0])
    result = sf.register(contour.numpy(), (contour @ R.T + t).numpy(), model="rigid", loss="chamfer", progress=False)
    assert isinstance(result.warped, np.ndarray)
    torch.testing.assert_close(result.deformation.rotation.float(), R, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.deformation.translation.float(), t, atol=1e-4 * 400, rtol=0)


def test_similarity_recovers_the_scale(assets):
    contour = sf.read(assets / "horse_contour.csv").points.float()
    target = 1.7 * contour @ rotation_2d(-0.3).T + torch.tensor([3.0, 4.0])
    result = sf.register(contour, target, model="similarity", loss="l2", progress=False)
    assert float(result.deformation.scale.detach()) == pytest.approx(1.7, abs=1e-4)
    torch.testing.assert_close(result.deformation(contour).detach(), target, atol=1e-2, rtol=0)


def test_known_smooth_deformation_of_a_shipped_mesh_is_recovered(ant):
    """Correspondence-free (Sinkhorn) fit; the vertex order is only used to score it."""
    target = sf.Mesh(smooth_deformation(ant.points, amplitude=0.04, seed=1), faces=ant.faces)
    diagonal = float((target.points.max(0).values - target.points.min(0).values).norm())
    before = float((target.points - ant.points).pow(2).sum(1).mean().sqrt())
    result = sf.register(ant, target, progress=False)
    m = result.metrics
    assert isinstance(result.warped, sf.Mesh) and torch.equal(result.warped.faces, ant.faces)
    assert m["rmse"] < 0.01 * diagonal, (m["rmse"], before)
    assert m["rmse"] < 0.2 * before
    assert m["min_jacobian_det"] > 0
    assert m["flipped_triangles_percent"] == 0.0
    # the saved map reproduces the warped shape, and warps new points the same way
    torch.testing.assert_close(result.deformation(ant.points).detach(), result.warped.points, atol=1e-4, rtol=0)


def test_flow_with_prealignment_handles_a_rotated_scaled_and_bent_contour(assets):
    contour = sf.read(assets / "horse_contour.csv").points.float()
    target = smooth_deformation(1.3 * contour @ rotation_2d(0.5).T, amplitude=0.03, seed=2)
    result = sf.register(contour, target, prealign="similarity", loss="chamfer", progress=False, iterations=120)
    diagonal = float((target.max(0).values - target.min(0).values).norm())
    assert result.metrics["chamfer"] < 0.005 * diagonal
    assert type(result.deformation.inner).__name__ == "Compose"


def test_same_seed_gives_the_same_result(assets):
    x = sf.read(assets / "horse_contour.csv")
    y = sf.read(assets / "horse_contour_deformed.csv")
    a = sf.register(x, y, loss="chamfer", iterations=20, progress=False, seed=3)
    b = sf.register(x, y, loss="chamfer", iterations=20, progress=False, seed=3)
    assert torch.equal(a.warped.points, b.warped.points)
    assert a.options["seed"] == 3


def test_result_save_writes_everything_atomically(ant, tmp_path):
    target = sf.Mesh(smooth_deformation(ant.points, 0.02, seed=4), faces=ant.faces)
    result = sf.register(ant, target, loss="chamfer", iterations=10, progress=False)
    out = result.save(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["deformation.pt", "report.json", "warped.ply"]
    with pytest.raises(sf.ShapeflowError, match="output folder exists"):
        result.save(out)
    loaded = sf.load_deformation(out / "deformation.pt")
    torch.testing.assert_close(loaded(ant.points), result.warped.points, atol=1e-4, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]          # no staging folder left


@pytest.mark.parametrize("kwargs, message", [
    ({"model": "spline"}, "unknown model 'spline'; choose from rigid, similarity, affine, resnet, node"),
    ({"loss": "emd"}, "unknown loss 'emd'; choose from sinkhorn, chamfer, l2"),
    ({"learning_rate": 1}, "unknown option(s) learning_rate; valid:"),
    ({"prealign": "resnet"}, "unknown prealign model 'resnet'"),
])
def test_bad_options_name_the_valid_choices(kwargs, message):
    with pytest.raises(sf.ShapeflowError) as info:
        sf.register(np.random.rand(10, 3), np.random.rand(10, 3), **kwargs)
    assert message in str(info.value)


def test_dimension_mismatch_and_correspondence_errors():
    with pytest.raises(sf.ShapeflowError, match="source has 2 columns but target has 3"):
        sf.register(np.random.rand(10, 2), np.random.rand(10, 3))
    with pytest.raises(sf.ShapeflowError, match="loss 'l2' needs corresponding points"):
        sf.register(np.random.rand(10, 3), np.random.rand(12, 3), loss="l2")


def test_fit_keeps_the_best_state_when_interrupted():
    x = torch.nn.Parameter(torch.tensor([5.0]))
    calls = {"n": 0}
    best = {}

    def objective():
        calls["n"] += 1
        if calls["n"] == 40:
            best["x"] = x.detach().clone()
            raise KeyboardInterrupt
        value = (x - 1.0).pow(2).sum()
        return value, {"data": float(value)}

    report = fit([x], objective, iterations=100, lr=0.1, progress=False)
    assert report.interrupted and len(report.history) == 39
    best_row = min(report.history, key=lambda r: r["total"])
    assert float((x.detach() - 1.0) ** 2) == pytest.approx(best_row["total"])


def test_fit_stops_early_when_converged():
    x = torch.nn.Parameter(torch.tensor([5.0]))
    report = fit([x], lambda: ((x - 1).pow(2).sum(), {}), iterations=5000, lr=0.5, patience=20, progress=False)
    assert report.stopped == "converged" and len(report.history) < 5000
    assert float(x) == pytest.approx(1.0, abs=1e-2)


def test_register_reports_an_interruption(monkeypatch, assets):
    import shapeflow.losses.points as points

    original, calls = points.chamfer_loss, {"n": 0}

    def interrupting(source, target):
        calls["n"] += 1
        if calls["n"] > 15:
            raise KeyboardInterrupt
        return original(source, target)

    monkeypatch.setattr(points, "chamfer_loss", interrupting)
    x = sf.read(assets / "horse_contour.csv")
    result = sf.register(x, sf.read(assets / "horse_contour_deformed.csv"), loss="chamfer", progress=False)
    assert result.metrics["interrupted"] is True and len(result.history) == 15


def test_small_problems_run_on_one_thread_inside_the_call_only(monkeypatch):
    import importlib

    entry = importlib.import_module("shapeflow.register")

    seen = []
    monkeypatch.setattr(entry, "register_shapes", lambda *a, **k: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        points = np.random.default_rng(0).random((50, 2))
        sf.register(points, points)
        sf.register(points, points, threads=2)
        assert seen == [1, 2] and torch.get_num_threads() == 2
        with pytest.raises(sf.ShapeflowError, match="threads must be an int >= 1"):
            sf.register(points, points, threads=0)
    finally:
        torch.set_num_threads(before)


def test_progress_bar_leaves_nothing_on_a_stderr_that_is_not_a_terminal(capfd):
    """A script logging to a file saw two blank lines per fit: rich's transient bar on a non-terminal."""
    x = np.random.default_rng(0).normal(size=(40, 2))
    sf.register(x, x + 0.1, model="rigid", progress=True)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
