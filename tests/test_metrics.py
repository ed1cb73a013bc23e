import math

import pytest
import torch

from shapeflow import metrics


def test_chamfer_and_hausdorff_match_brute_force():
    a, b = torch.rand(70, 3), torch.rand(50, 3)
    d = torch.cdist(a.double(), b.double())
    assert metrics.chamfer_distance(a, b) == pytest.approx(float(d.min(1).values.mean() + d.min(0).values.mean()) / 2, rel=1e-6)
    assert metrics.hausdorff_distance(a, b) == pytest.approx(float(max(d.min(1).values.max(), d.min(0).values.max())), rel=1e-6)


def test_jacobian_determinant_of_a_linear_map_is_its_determinant():
    A = torch.tensor([[2.0, 0.3, 0.0], [0.1, 1.5, 0.2], [0.0, -0.4, 0.7]])
    dets = metrics.jacobian_determinants(lambda x: x @ A.T + 1.0, torch.rand(20, 3))
    torch.testing.assert_close(dets, torch.linalg.det(A).expand(20))


def test_jacobian_determinant_of_a_nonlinear_map_matches_the_closed_form():
    # phi(x, y) = (x + 0.5 sin y, y + 0.3 x^2): det = 1 - 0.5 cos(y) * 0.6 x
    x = torch.rand(30, 2, dtype=torch.float64)
    phi = lambda p: torch.stack([p[:, 0] + 0.5 * torch.sin(p[:, 1]), p[:, 1] + 0.3 * p[:, 0] ** 2], 1)
    expected = 1 - 0.5 * torch.cos(x[:, 1]) * 0.6 * x[:, 0]
    torch.testing.assert_close(metrics.jacobian_determinants(phi, x), expected)


def test_folding_map_has_negative_minimum_determinant():
    phi = lambda p: torch.stack([p[:, 0] - 2 * p[:, 0] ** 3, p[:, 1]], 1)  # det = 1 - 6 x^2 < 0 for |x| > 0.41
    assert metrics.min_jacobian_determinant(phi, torch.rand(50, 2) * 2 - 1) < 0


def test_a_fold_between_the_points_is_seen_by_the_grid_only():
    """phi(x, y) = (x - 0.1 tanh(x / 0.05), y): det = 1 - 2 sech^2(x / 0.05), -1 at x = 0 and
    1 - 2 sech^2(6) at x = +-0.3. Points on the lines x = +-0.3 do not fold; the grid over their
    bounding box has nodes near x = 0, between them, where the map folds."""
    phi = lambda p: torch.stack([p[:, 0] - 0.1 * torch.tanh(p[:, 0] / 0.05), p[:, 1]], 1)
    y = torch.linspace(-1, 1, 7, dtype=torch.float64)
    line = torch.stack([torch.full_like(y, 0.3), y], 1)
    points = torch.cat([line, line * torch.tensor([-1.0, 1.0], dtype=torch.float64)])
    at_points = 1 - 2 / math.cosh(6.0) ** 2
    assert metrics.min_jacobian_determinant(phi, points, per_axis=0) == pytest.approx(at_points)
    nodes = torch.linspace(-0.33, 0.33, 12, dtype=torch.float64)      # the grid's x (box grown by 5 %)
    nearest = float(nodes.abs().min())
    assert metrics.min_jacobian_determinant(phi, points) == pytest.approx(1 - 2 / math.cosh(nearest / 0.05) ** 2)
    assert metrics.min_jacobian_determinant(phi, points) < 0
    # the points' minimum given (register's fold check measured it): the grid alone, then the smaller
    assert metrics.min_jacobian_determinant(phi, points, at_points=at_points) == pytest.approx(
        metrics.min_jacobian_determinant(phi, points))
    assert metrics.min_jacobian_determinant(phi, points, per_axis=0, at_points=-5.0) == -5.0
    assert metrics.min_jacobian_determinant(lambda p: p, points, at_points=0.5) == 0.5


def test_register_reports_min_det_j_on_the_grid_and_the_points():
    """`register` measures det J at the source's points once (the fold check) and adds the grid:
    the reported minimum is the full one, evaluated afresh on the world-unit map."""
    import shapeflow as sf
    from shapeflow.synthetic import smooth_deformation

    t = torch.linspace(0, 2 * math.pi, 81, dtype=torch.float64)[:-1]
    source = torch.stack([torch.cos(t) * (1 + 0.3 * torch.cos(3 * t)), 0.6 * torch.sin(t)], 1) * 40 + 7
    target = smooth_deformation(source / 40, amplitude=0.1, seed=1) * 40
    res = sf.register(source.numpy(), target.numpy(), progress=False, seed=0)
    assert res.metrics["kept"] == "fit"
    full = metrics.min_jacobian_determinant(res.deformation, source)
    assert res.metrics["min_jacobian_det"] == pytest.approx(full, rel=1e-5)
    # on this pair the grid, between the points, holds the minimum (0.74 against 0.77 at the points)
    assert full < metrics.min_jacobian_determinant(res.deformation, source, per_axis=0) - 0.01


def test_flipped_triangles(ant):
    faces = ant.faces
    assert metrics.flipped_triangles_percent(lambda x: 2 * x + 1, ant.points, faces) == 0.0
    R = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    assert metrics.flipped_triangles_percent(lambda x: x @ R.T, ant.points, faces) == 0.0
    assert metrics.flipped_triangles_percent(lambda x: x * torch.tensor([-1.0, 1, 1]), ant.points, faces) == 100.0
    # a fold along x (det J = 1 - 6 (x/s)^2 < 0 for |x| > 0.41 s) flips the triangles out there, only those
    s = float(ant.points[:, 0].abs().max())
    fold = lambda p: torch.stack([p[:, 0] - 2 * p[:, 0] ** 3 / s ** 2, p[:, 1], p[:, 2]], 1)
    centroid_x = ant.points[faces].mean(1)[:, 0].abs() / s
    expected = float(((centroid_x > 0.45)).double().mean() * 100)
    flipped = metrics.flipped_triangles_percent(fold, ant.points, faces)
    assert flipped > 5 and abs(flipped - expected) < 5
