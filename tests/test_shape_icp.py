"""model="displacement" for shapes (non-rigid ICP on the shared Gauss-Newton core) and landmarks for
shape registration: recovery of known smooth deformations, the Gauss-Newton step against a dense
least-squares solve, the regulariser from `shapeflow.regularizers`, landmarks, save/load, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial import ConvexHull

import shapeflow as sf
from shapeflow.deform import PointDisplacement, load_deformation
from shapeflow.pipelines.shape_icp import IcpProblem, LandmarkTerm, PairTerm, _regularizer
from shapeflow.regularizers import (bending_matrix, cotangent_laplacian, diffusion, shape_laplacian, shape_mass)
from shapeflow.sampling import farthest_point_sample
from shapeflow.synthetic import smooth_deformation


def rmse_percent(warped, target) -> float:
    warped, target = np.asarray(warped, dtype=float), np.asarray(target, dtype=float)
    diagonal = np.linalg.norm(target.max(0) - target.min(0))
    return 100 * float(np.sqrt(((warped - target) ** 2).sum(1).mean())) / diagonal


def sphere(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """A unit sphere: n Fibonacci points and their convex hull's triangles, outward."""
    k = np.arange(n) + 0.5
    z = 1 - 2 * k / n
    theta = math.pi * (1 + 5 ** 0.5) * k
    points = np.stack([np.sqrt(1 - z ** 2) * np.cos(theta), np.sqrt(1 - z ** 2) * np.sin(theta), z], 1)
    faces = ConvexHull(points).simplices
    tri = points[faces]
    inward = (np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]) * tri.mean(1)).sum(1) < 0
    faces[inward] = faces[inward][:, ::-1]
    return points, faces


def rotation_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


@pytest.fixture(scope="module")
def ant():
    mesh = sf.read("assets/ant.ply")
    x = mesh.points.double()
    return mesh, x, smooth_deformation(x, amplitude=0.05, seed=1)


# ----------------------------------------------------------------------------- recovery


def test_displacement_recovers_a_smooth_deformation_of_the_shipped_mesh(ant):
    mesh, x, y = ant
    result = sf.register(sf.Mesh(x, faces=mesh.faces), sf.Mesh(y, faces=mesh.faces), model="displacement",
                         progress=False)
    assert rmse_percent(result.warped.points, y) < 1.0
    assert result.metrics["flipped_triangles_percent"] == 0.0
    assert result.options["loss"] == "chamfer" and result.options["model"] == "displacement"
    assert any(row["stage"].startswith("fine") for row in result.history)
    # the map is exact at the fitted points and interpolates elsewhere; the inverse undoes it
    np.testing.assert_allclose(result.deformation(x.numpy()), result.warped.points.numpy(), atol=1e-5)
    back = result.deformation.inverse(result.warped.points.double().numpy())
    np.testing.assert_allclose(back, x.numpy(), atol=1e-4 * float(x.abs().max()))


def test_displacement_recovers_a_smooth_deformation_of_a_cloud_and_a_2d_contour(ant):
    _, x, y = ant
    result = sf.register(x.numpy(), y.numpy(), model="displacement", progress=False)
    assert rmse_percent(result.warped, y) < 1.0
    horse = sf.read("assets/horse_contour.csv").points.numpy()
    deformed = sf.read("assets/horse_contour_deformed.csv").points.numpy()
    before = rmse_percent(horse, deformed)
    result = sf.register(horse, deformed, model="displacement", progress=False)
    assert rmse_percent(result.warped, deformed) < 1.0 < before


def test_coarse_to_fine_fits_a_subsample_first_and_prolongates(ant):
    mesh, x, y = ant
    result = sf.register(sf.Mesh(x, faces=mesh.faces), sf.Mesh(y, faces=mesh.faces), model="displacement",
                         coarse_points=150, progress=False)
    stages = [row["stage"] for row in result.history]
    assert stages[0].startswith("coarse") and stages[-1].startswith("fine")
    assert rmse_percent(result.warped.points, y) < 1.5


def test_the_fitted_field_saves_and_loads(tmp_path, ant):
    _, x, y = ant
    result = sf.register(x.numpy(), y.numpy(), model="displacement", progress=False)
    path = result.deformation.save(tmp_path / "field.pt")
    loaded = load_deformation(path)
    new_points = x.numpy()[:50] + 0.01
    np.testing.assert_allclose(loaded(new_points), result.deformation(new_points), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the Gauss-Newton step


def _dense_system(problem: IcpProblem, u: torch.Tensor, pairs: dict, landmarks) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked Jacobian J (R, N d) and residual r (R,) of F(u) = 1/2 |r|^2 at fixed pairs, built
    row by row from the module docstring's formula."""
    x, y = problem.x, problem.y
    n, d = x.shape
    moved = x + u
    rows, res = [], []

    def point_row(i, coefficient=None):
        row = torch.zeros(d, n * d, dtype=x.dtype)
        row[:, i * d:(i + 1) * d] = torch.eye(d, dtype=x.dtype) if coefficient is None else coefficient
        return row

    for i in range(n):
        w = float(pairs["a"][i]) ** 0.5
        rows.append(w * point_row(i))
        res.append(w * (moved[i] - y[pairs["source_pairs"][i]]))
    for j in range(len(y)):
        w = float(pairs["b"][j]) ** 0.5
        q = int(pairs["target_pairs"][j])
        rows.append(w * point_row(q))
        res.append(w * (moved[q] - y[j]))
    t = problem.pairs.point_to_plane
    for i in range(n):
        w = (t * float(pairs["a"][i])) ** 0.5
        normal = pairs["normals"][i]
        row = torch.zeros(1, n * d, dtype=x.dtype)
        row[0, i * d:(i + 1) * d] = w * normal
        rows.append(row)
        res.append((w * normal * (moved[i] - y[pairs["source_pairs"][i]])).sum().reshape(1))
    source_marks, target_marks, weight, near, bary = landmarks
    K = len(source_marks)
    for k in range(K):
        row = sum(float(bary[k, m]) * point_row(int(near[k, m])) for m in range(near.shape[1]))
        rows.append((weight / K) ** 0.5 * row)
        res.append((weight / K) ** 0.5 * ((bary[k, :, None] * moved[near[k]]).sum(0) - target_marks[k]))
    R = problem.regularizer.to_dense()
    values, vectors = torch.linalg.eigh(R)
    root = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T           # R = root^T root
    rows.append(torch.kron(root, torch.eye(d, dtype=x.dtype)))
    res.append((root @ u).reshape(-1))
    return torch.cat(rows), torch.cat(res)


@pytest.mark.parametrize("preconditioner", ["factor", "jacobi"])
def test_gauss_newton_step_matches_a_dense_least_squares_solve(preconditioner):
    points, faces = sphere(60)
    x = torch.from_numpy(points)
    f = torch.from_numpy(faces).long()
    y = smooth_deformation(x, amplitude=0.08, seed=2) * 1.1
    options = PointDisplacement.Options(bending=0.5)
    lam = 0.05
    regularizer = (lam * _regularizer(x, f, options)).coalesce()
    source_marks = x[[0, 17, 40]] + 0.01
    target_marks = y[[0, 17, 40]]
    weight = 2.0
    term = LandmarkTerm.build(x, f, source_marks, target_marks, weight)
    problem = IcpProblem(x, y, f, f, PairTerm("closest", None, None, 0.5), regularizer, term,
                         preconditioner=preconditioner, cg_tol=1e-13)
    u = 0.02 * torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    cost, state = problem.cost(u)
    linear = problem.linearize(u, state)
    step, _ = linear.solve(0.0)

    from shapeflow.deform.vertex import interpolation_weights
    near, bary = interpolation_weights(x, f, source_marks)
    J, r = _dense_system(problem, u, state["pairs"], (source_marks, target_marks, weight, near, bary))
    assert cost == pytest.approx(0.5 * float(r.square().sum()), rel=1e-10)
    torch.testing.assert_close(linear.gradient.reshape(-1), J.T @ r, rtol=1e-9, atol=1e-12)
    dense = torch.linalg.lstsq(J, -r.reshape(-1, 1), driver="gelsd").solution.reshape(-1)
    scale = float(dense.abs().max())
    assert float((step.reshape(-1) - dense).abs().max()) <= 1e-8 * scale


def test_the_regulariser_is_the_shared_laplacian():
    points, faces = sphere(80)
    x, f = torch.from_numpy(points), torch.from_numpy(faces).long()
    L, mass = shape_laplacian(x, f)
    cot = cotangent_laplacian(x, f).to_dense()
    torch.testing.assert_close(L.to_dense(), cot * (3 / float((x * (cot @ x)).sum())))
    assert float((x * (L @ x)).sum()) == pytest.approx(3.0) and float(mass.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(shape_mass(x, f), mass)
    options = PointDisplacement.Options(bending=0.7)
    expected = L.to_dense() + 0.7 * (L.to_dense() @ torch.diag(1 / mass) @ L.to_dense())
    torch.testing.assert_close(_regularizer(x, f, options).to_dense(), expected)
    torch.testing.assert_close(0.7 * bending_matrix(L, mass).to_dense(), expected - L.to_dense())
    model = PointDisplacement(3)
    model.prepare(x, f)
    with torch.no_grad():
        model.displacements.copy_(torch.sin(x))
    assert float(model.energy()) == pytest.approx(float(diffusion(torch.sin(x), L)), rel=1e-6)
    cloud_L, cloud_mass = shape_laplacian(x)          # a cloud: the kNN graph, uniform mass
    assert float((x * (cloud_L @ x)).sum()) == pytest.approx(3.0)
    torch.testing.assert_close(cloud_mass, torch.full((80,), 1 / 80, dtype=x.dtype))


# ----------------------------------------------------------------------------- landmarks


@pytest.fixture(scope="module")
def rotated_sphere():
    """A sphere and the same sphere turned 40 degrees about z: the surfaces coincide, so only
    landmarks say how far it turned."""
    points, faces = sphere(300)
    target = points @ rotation_z(math.radians(40)).T
    marks = farthest_point_sample(torch.from_numpy(points), 8).numpy()
    return points, faces, target, points[marks], target[marks]


@pytest.mark.parametrize("model", ["displacement", "resnet"])
def test_landmarks_resolve_a_sliding_ambiguity(rotated_sphere, model):
    points, faces, target, source_marks, target_marks = rotated_sphere
    src = sf.Mesh(torch.from_numpy(points), faces=torch.from_numpy(faces))
    tgt = sf.Mesh(torch.from_numpy(target), faces=torch.from_numpy(faces))
    without = sf.register(src, tgt, model=model, progress=False, landmarks=(source_marks, target_marks),
                          landmark_weight=0.0)
    guided = sf.register(src, tgt, model=model, progress=False, landmarks=(source_marks, target_marks),
                         landmark_weight=1.0)
    error_without, error_with = without.metrics["landmark_error"], guided.metrics["landmark_error"]
    assert error_without["mean_before"] == pytest.approx(error_with["mean_before"])
    assert error_with["mean"] * 10 <= error_without["mean"]
    assert guided.options["landmarks"] == 8


def test_landmark_files_and_their_errors(tmp_path):
    points, _ = sphere(100)
    good_source, good_target, short = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "short.csv"
    np.savetxt(good_source, points[:5], delimiter=",")
    np.savetxt(good_target, points[:5] * 1.1, delimiter=",")
    np.savetxt(short, points[:4], delimiter=",")
    result = sf.register(points, points * 1.1, model="displacement", progress=False,
                         landmarks=(str(good_source), good_target))
    assert set(result.metrics["landmark_error"]) == {"mean", "max", "mean_before", "max_before"}
    with pytest.raises(sf.ShapeflowError, match=r"a\.csv: 5 source landmarks but .*short\.csv has 4"):
        sf.register(points, points, progress=False, landmarks=(good_source, short))
    flat = tmp_path / "flat.csv"
    np.savetxt(flat, points[:5, :2], delimiter=",")
    with pytest.raises(sf.ShapeflowError, match=r"flat\.csv: landmarks have 2 coordinates per point, but the data are 3D"):
        sf.register(points, points, progress=False, landmarks=(flat, good_target))
    with pytest.raises(sf.ShapeflowError, match="NaN"):
        sf.register(points, points, progress=False, landmarks=(np.full((5, 3), np.nan), points[:5]))
    with pytest.raises(sf.ShapeflowError, match="landmarks must be a pair"):
        sf.register(points, points, progress=False, landmarks=points[:5])


# ----------------------------------------------------------------------------- options and errors


def test_displacement_options_are_checked():
    points, _ = sphere(100)
    with pytest.raises(sf.ShapeflowError, match="fitted by Gauss-Newton on point pairs; use loss chamfer, l2, not 'sinkhorn'"):
        sf.register(points, points, model="displacement", loss="sinkhorn", progress=False)
    with pytest.raises(sf.ShapeflowError, match="lr applies to the Adam-fitted models"):
        sf.register(points, points, model="displacement", lr=0.1, progress=False)
    with pytest.raises(sf.ShapeflowError, match="unknown preconditioner 'ilu'; choose from auto, factor, jacobi, amg"):
        sf.register(points, points * 1.1, model="displacement", preconditioner="ilu", progress=False)
    with pytest.raises(sf.ShapeflowError, match="laplacian 'cotangent' needs a triangle mesh"):
        sf.register(points, points * 1.1, model="displacement", laplacian="cotangent", progress=False)
    with pytest.raises(sf.ShapeflowError, match="option 'bending' applies to model 'displacement'"):
        sf.register(points, points, model="resnet", bending=1.0, progress=False)


def test_corresponding_points_fit_with_l2(ant):
    _, x, y = ant
    result = sf.register(x.numpy(), y.numpy(), model="displacement", loss="l2", progress=False)
    assert rmse_percent(result.warped, y) < 0.5
