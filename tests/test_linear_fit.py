"""The closed-form ("procrustes") fit of the linear models: the Kabsch / Umeyama / least-squares
steps against known maps and SciPy, `set_matrix`, large rotations recovered without
correspondences, reflections, landmarks, and the fitter's contract (history, iterations, Ctrl-C,
prealign, options, the Adam fallback)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import shapeflow as sf
import shapeflow.pipelines.shape_linear as shape_linear
from shapeflow.pipelines.shape_linear import procrustes
from shapeflow.pipelines.shapes import FITTERS


def random_rotation(dim: int, seed: int, angle: float | None = None) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if dim == 2:
        a = rng.uniform(-math.pi, math.pi) if angle is None else angle
        return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    a = rng.uniform(0, math.pi) if angle is None else angle
    return torch.from_numpy(Rotation.from_rotvec(axis * a).as_matrix())


def known_map(kind: str, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rotation = random_rotation(dim, seed)
    matrix = {"rigid": rotation, "similarity": 1.7 * rotation,
              "affine": rotation + 0.3 * torch.randn(dim, dim, generator=gen, dtype=torch.float64)}[kind]
    return matrix, torch.randn(dim, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("kind", ["rigid", "similarity", "affine"])
def test_the_closed_form_step_recovers_a_known_map_exactly(kind, dim):
    p = torch.randn(40, dim, dtype=torch.float64)
    matrix, translation = known_map(kind, dim, seed=dim)
    q = p @ matrix.T + translation
    weights = torch.rand(40, dtype=torch.float64) + 0.1
    for w in (None, weights):
        A, t = procrustes(p, q, w, kind=kind)
        torch.testing.assert_close(A, matrix, atol=1e-10, rtol=0)
        torch.testing.assert_close(t, translation, atol=1e-10, rtol=0)


def test_the_rigid_step_matches_scipy_on_noisy_weighted_pairs():
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    q = p @ random_rotation(3, 1).T + 0.2 * torch.randn(30, 3, generator=gen, dtype=torch.float64)
    w = torch.rand(30, generator=gen, dtype=torch.float64)
    A, t = procrustes(p, q, w, kind="rigid")
    # SciPy: the rotation minimising sum w |a - R b|^2 for centred pairs
    mp, mq = (w @ p) / w.sum(), (w @ q) / w.sum()
    reference, _ = Rotation.align_vectors((q - mq).numpy(), (p - mp).numpy(), weights=w.numpy())
    np.testing.assert_allclose(A.numpy(), reference.as_matrix(), atol=1e-10)
    torch.testing.assert_close(t, mq - A @ mp, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["rigid", "similarity"])
def test_a_mirrored_target_gives_the_best_proper_rotation_not_a_reflection(kind):
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(50, 3, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    q = p @ (mirror @ random_rotation(3, 3)).T          # det = -1: no rotation reaches it
    A, t = procrustes(p, q, kind=kind)
    assert float(torch.linalg.det(A)) > 0
    rotation = A / torch.linalg.det(A) ** (1 / 3)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    reference, _ = Rotation.align_vectors((q - q.mean(0)).numpy(), (p - p.mean(0)).numpy())
    np.testing.assert_allclose(rotation.numpy(), reference.as_matrix(), atol=1e-9)


@pytest.mark.parametrize("dim", [2, 3])
def test_set_matrix_round_trips_every_rotation(dim):
    angles = [0.0, 1e-9, 0.7, 2.5, math.pi - 1e-9, math.pi]
    for seed, angle in enumerate(angles):
        R = random_rotation(dim, seed, angle)
        rigid, similarity, affine = sf.Rigid(dim).double(), sf.Similarity(dim).double(), sf.Affine(dim).double()
        t = torch.arange(dim, dtype=torch.float64)
        rigid.set_matrix(R, t)
        similarity.set_matrix(0.4 * R, t)
        affine.set_matrix(R + 0.1, t)
        torch.testing.assert_close(rigid.rotation, R, atol=1e-12, rtol=0)
        torch.testing.assert_close(similarity.matrix, 0.4 * R, atol=1e-12, rtol=0)
        torch.testing.assert_close(affine.matrix, R + 0.1, atol=0, rtol=0)
        torch.testing.assert_close(rigid.translation, t)
    with pytest.raises(sf.ShapeflowError, match="positive determinant"):
        sf.Rigid(3).set_matrix(-torch.eye(3), torch.zeros(3))
    with pytest.raises(sf.ShapeflowError, match="must be a rotation"):
        sf.Rigid(2).set_matrix(2 * torch.eye(2), torch.zeros(2))


def _shape(assets, dim: int) -> np.ndarray:
    if dim == 2:
        return sf.read(assets / "horse_contour.csv").points.float().double().numpy()
    return sf.read(assets / "ant.ply").points.double().numpy()


@pytest.mark.parametrize("model, dim", [("rigid", 2), ("rigid", 3), ("similarity", 3), ("affine", 2)])
def test_a_120_degree_rotation_is_recovered_without_correspondences(assets, model, dim):
    x = _shape(assets, dim)
    R = random_rotation(dim, 5, math.radians(120)).numpy()
    scale = 1.3 if model != "rigid" else 1.0
    y = scale * x @ R.T + np.arange(1, dim + 1)
    result = sf.register(x, y, model=model, progress=False, dtype="float64")    # the default loss
    radius = np.sqrt(((y - y.mean(0)) ** 2).sum(1).mean())
    assert np.sqrt(((result.warped - y) ** 2).sum(1).mean()) < 1e-8 * radius
    np.testing.assert_allclose(result.deformation.matrix.numpy(), scale * R, atol=1e-8)


def test_icp_runs_from_the_current_map_and_the_principal_axes(assets):
    """loss="chamfer" is ICP from the identity and the principal-axis rotations (3 starts in 2D),
    run as one batch until they settle, then the best alone: exact for a small turn."""
    x = _shape(assets, 2)
    y = x @ random_rotation(2, 0, 0.3).numpy().T
    result = sf.register(x, y, model="rigid", loss="chamfer", progress=False, dtype="float64")
    assert result.metrics["chamfer"] < 1e-12
    assert all(row["phase"] == "procrustes" for row in result.history)
    assert result.history[0]["starts"] == 3 and "starts" not in result.history[-1]


def test_an_unbalanced_transport_recovers_a_rotation(assets):
    x = _shape(assets, 2)
    y = x @ random_rotation(2, 0, 1.0).numpy().T
    result = sf.register(x, y, model="rigid", reach=0.5, refine=None, progress=False, dtype="float64")
    np.testing.assert_allclose(result.deformation.rotation.numpy(), random_rotation(2, 0, 1.0).numpy(), atol=1e-3)


def _fibonacci_sphere(n: int) -> np.ndarray:
    k = np.arange(n) + 0.5
    z, theta = 1 - 2 * k / n, math.pi * (1 + 5 ** 0.5) * k
    return np.stack([np.sqrt(1 - z ** 2) * np.cos(theta), np.sqrt(1 - z ** 2) * np.sin(theta), z], 1)


def test_landmarks_turn_a_sphere_that_the_surfaces_leave_undetermined():
    """The target is another sampling of the sphere, turned 40 degrees: no closest-point start
    (identity or principal axes) sees the turn, 5 landmarks do."""
    points = _fibonacci_sphere(300)
    R = Rotation.from_rotvec([0, 0, math.radians(40)]).as_matrix()
    target = _fibonacci_sphere(257) @ R.T
    marks = [0, 50, 120, 200, 280]
    landmarks = (points[marks], points[marks] @ R.T)
    without = sf.register(points, target, model="rigid", loss="chamfer", landmarks=landmarks, landmark_weight=0.0,
                          progress=False)
    guided = sf.register(points, target, model="rigid", loss="chamfer", landmarks=landmarks, landmark_weight=1.0,
                         progress=False)
    assert guided.metrics["landmark_error"]["mean"] < 0.15 * guided.metrics["landmark_error"]["mean_before"]
    assert without.metrics["landmark_error"]["mean"] > 0.3
    assert "landmarks" in guided.history[-1]


def test_the_linear_models_name_the_procrustes_fitter():
    assert sf.Rigid.fitted_by == sf.Similarity.fitted_by == sf.Affine.fitted_by == "procrustes"
    assert "procrustes" in FITTERS


def test_history_iterations_and_prealign_go_through_the_closed_form(assets):
    contour = sf.read(assets / "horse_contour.csv").points.float()
    y = 1.2 * contour @ random_rotation(2, 0, 2.0).T.float() + 5.0
    capped = sf.register(contour, y, model="similarity", iterations=3, progress=False)
    stages = [row["stage"] for row in capped.history]
    assert stages.count("coarse (sinkhorn)") == 3 and stages.count("fine (chamfer)") <= 3
    assert {"stage", "phase", "iteration", "total", "data", "energy"} <= set(capped.history[0])
    flow = sf.register(contour, y, prealign="similarity", loss="chamfer", iterations=5, progress=False)
    pre = [row for row in flow.history if row["stage"].startswith("prealign-")]
    assert pre and all(row["phase"] == "procrustes" for row in pre)


def test_ctrl_c_returns_the_last_step(monkeypatch, assets):
    calls = {"n": 0}
    original = shape_linear.ClosestPairs.__call__

    def interrupting(self, moved):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return original(self, moved)

    monkeypatch.setattr(shape_linear.ClosestPairs, "__call__", interrupting)
    x = _shape(assets, 2)
    y = x @ random_rotation(2, 0, 0.2).numpy().T
    result = sf.register(x, y, model="rigid", loss="chamfer", progress=False)
    assert result.metrics["interrupted"] is True and len(result.history) == 2
    assert result.metrics["chamfer"] < result.metrics["chamfer_before"]


def test_adam_options_are_refused_and_non_pair_losses_fall_back_to_adam(ant):
    with pytest.raises(sf.ShapeflowError, match="lr applies to Adam, not to model 'rigid'"):
        sf.register(ant, ant, model="rigid", loss="chamfer", lr=0.1, progress=False)
    result = sf.register(ant, ant, model="rigid", loss="varifold", iterations=2, lbfgs_iterations=0, progress=False)
    assert {row["phase"] for row in result.history} == {"adam"}
