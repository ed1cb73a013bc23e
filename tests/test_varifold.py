"""Currents and varifold data terms: the kernels against a brute-force double sum, KeOps against
dense, gradcheck, invariances (vertex and face order, re-triangulation), orientation, register()."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

import shapeflow as sf
from shapeflow.losses import LOSSES, cell_geometry, varifold_loss
from shapeflow.losses.varifold import cell_features, kernel_inner
from shapeflow.synthetic import smooth_deformation

ORIENTATIONS = ["currents", "oriented", "unoriented"]


def sphere(n_lat: int = 6, n_lon: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A UV sphere of radius 1: vertices (2 + (n_lat - 1) n_lon, 3), faces with outward normals."""
    theta = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    rings = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    vertices = np.vstack([[0, 0, 1], rings, [0, 0, -1]])
    south, idx = len(vertices) - 1, lambda r, k: 1 + r * n_lon + k % n_lon
    faces = [[0, idx(0, k), idx(0, k + 1)] for k in range(n_lon)]
    for r in range(n_lat - 2):
        for k in range(n_lon):
            a, b, c, d = idx(r, k), idx(r, k + 1), idx(r + 1, k), idx(r + 1, k + 1)
            faces += [[a, c, b], [b, c, d]]
    faces += [[south, idx(n_lat - 2, k + 1), idx(n_lat - 2, k)] for k in range(n_lon)]
    faces = np.array(faces)
    centres, normals = cell_geometry(torch.from_numpy(vertices), torch.from_numpy(faces))
    assert bool(((centres * normals).sum(1) > 0).all())       # outward
    return vertices, faces


def height_field(n: int, flip_diagonals: bool = False, amplitude: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """The surface z = amplitude sin(2x) cos(y) over [-1.2, 1.2]^2 on an n x n grid, each square
    split along one diagonal or the other."""
    s = np.linspace(-1.2, 1.2, n)
    x, y = np.meshgrid(s, s, indexing="ij")
    vertices = np.stack([x, y, amplitude * np.sin(2 * x) * np.cos(y)], -1).reshape(-1, 3)
    faces = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = i * n + j, i * n + j + 1, (i + 1) * n + j, (i + 1) * n + j + 1
            faces += [[a, c, d], [a, d, b]] if not flip_diagonals else [[a, c, b], [b, c, d]]
    return vertices, np.array(faces)


def brute_force_inner(x, n, y, m, sigma, orientation):
    """`sum_ij exp(-|x_i - y_j|^2 / sigma^2) k(n_i, m_j)` cell by cell, straight from the definitions."""
    total = 0.0
    for i in range(len(x)):
        for j in range(len(y)):
            gauss = math.exp(-float(np.sum((x[i] - y[j]) ** 2)) / sigma**2)
            a, b = np.linalg.norm(n[i]), np.linalg.norm(m[j])
            cosine = float(n[i] @ m[j]) / (a * b)
            k = {"currents": float(n[i] @ m[j]), "oriented": a * b * ((1 + cosine) / 2) ** 2,
                 "unoriented": a * b * cosine**2}[orientation]
            total += gauss * k
    return total


@pytest.fixture
def two_meshes():
    """A sphere (32 faces) and a deformed, coarser, shifted one (20 faces), float64."""
    vertices, faces = sphere(4, 6)
    other, other_faces = sphere(3, 5)
    w = 1.2 * smooth_deformation(torch.from_numpy(other), amplitude=0.08, seed=1) + 0.1
    return torch.from_numpy(vertices), torch.from_numpy(faces), w, torch.from_numpy(other_faces)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_kernels_match_the_double_sum_over_cells(two_meshes, orientation):
    v, f, w, g = two_meshes
    x, n = cell_geometry(v, f)
    y, m = cell_geometry(w, g)
    for sigma in (0.3, 1.0):
        fast = kernel_inner(x, cell_features(n, orientation), y, cell_features(m, orientation), sigma, "torch")
        slow = brute_force_inner(x.numpy(), n.numpy(), y.numpy(), m.numpy(), sigma, orientation)
        np.testing.assert_allclose(float(fast), slow, rtol=1e-10)
    # the loss: the squared distance over the target's mass, summed over the widths
    widths = (0.5, 0.2)
    expected = 0.0
    for sigma in widths:
        ss = brute_force_inner(x.numpy(), n.numpy(), x.numpy(), n.numpy(), sigma, orientation)
        st = brute_force_inner(x.numpy(), n.numpy(), y.numpy(), m.numpy(), sigma, orientation)
        tt = brute_force_inner(y.numpy(), m.numpy(), y.numpy(), m.numpy(), sigma, orientation)
        a = np.linalg.norm(m.numpy(), axis=1)
        mass = sum(math.exp(-float(np.sum((y[i] - y[j]).numpy() ** 2)) / sigma**2) * a[i] * a[j]
                   for i in range(len(y)) for j in range(len(y)))
        expected += (ss - 2 * st + tt) / mass
    loss = varifold_loss(v, f, w, g, widths, orientation, backend="torch")
    np.testing.assert_allclose(float(loss), expected, rtol=1e-10)


def test_curve_geometry_is_midpoints_and_tangents():
    points = torch.tensor([[0.0, 0.0], [2.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    centres, tangents = cell_geometry(points, torch.tensor([[0, 1], [1, 2]]))
    np.testing.assert_allclose(centres.numpy(), [[1, 0], [2, 0.5]])
    np.testing.assert_allclose(tangents.numpy(), [[2, 0], [0, 1]])
    _, normal = cell_geometry(torch.eye(3, dtype=torch.float64), torch.tensor([[0, 1, 2]]))
    np.testing.assert_allclose(normal.numpy(), [[0.5, 0.5, 0.5]])   # area sqrt(3)/2, normal (1,1,1)/sqrt 3


@pytest.mark.skipif(importlib.util.find_spec("pykeops") is None, reason="pykeops not installed")
def test_keops_agrees_with_dense(two_meshes):
    v, f, w, g = two_meshes
    x, n = cell_geometry(v.float(), f)
    y, m = cell_geometry(w.float(), g)
    fx, gy = cell_features(n, "oriented"), cell_features(m, "oriented")
    dense = kernel_inner(x, fx, y, gy, 0.4, "torch")
    keops = kernel_inner(x, fx, y, gy, 0.4, "keops")
    np.testing.assert_allclose(float(keops), float(dense), rtol=1e-5)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_gradcheck_on_a_tiny_mesh(orientation):
    vertices = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0.5]], dtype=torch.float64)
    faces = torch.tensor([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3], [1, 4, 2]])
    target = vertices * 1.1 + torch.tensor([0.1, -0.05, 0.2], dtype=torch.float64)
    source = (vertices + 0.05 * torch.randn_like(vertices)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, t: varifold_loss(s, faces, t, faces, (0.8, 0.3), orientation, "torch"),
        (source, target.requires_grad_()))


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_invariant_to_vertex_and_face_order(two_meshes, orientation):
    v, f, w, g = two_meshes
    reference = varifold_loss(v, f, w, g, orientation=orientation, backend="torch")
    order = torch.randperm(len(v))                    # new vertex k is old vertex order[k]
    inverse = torch.argsort(order)
    permuted = varifold_loss(v[order], inverse[f], w, g, orientation=orientation, backend="torch")
    shuffled = varifold_loss(v, f[torch.randperm(len(f))][:, [1, 2, 0]], w, g[torch.randperm(len(g))],
                             orientation=orientation, backend="torch")
    np.testing.assert_allclose(float(permuted), float(reference), rtol=1e-10)
    np.testing.assert_allclose(float(shuffled), float(reference), rtol=1e-10)


def _normalised(vertices: np.ndarray, centre: np.ndarray, radius: float) -> torch.Tensor:
    return torch.from_numpy((vertices - centre) / radius)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_retriangulation_changes_the_loss_little(orientation):
    """One surface meshed three ways (two diagonal splits, a finer grid) against a visibly
    different surface (twice the amplitude), in the pipeline's normalised units. The edges (0.1)
    are as long as the finest default width: on a 12 x 12 grid (edges 0.2) the ratios were 0.04
    to 0.06, the cells then seen one by one."""
    v, f = height_field(24)
    centre, radius = v.mean(0), np.sqrt(((v - v.mean(0)) ** 2).sum(1).mean())
    source = _normalised(v, centre, radius), torch.from_numpy(f)
    same = [height_field(24, flip_diagonals=True), height_field(33)]
    different = height_field(24, amplitude=0.6)

    def loss(other):
        return float(varifold_loss(*source, _normalised(other[0], centre, radius), torch.from_numpy(other[1]),
                                   orientation=orientation, backend="torch"))

    far = loss(different)
    ratios = [loss(mesh) / far for mesh in same]
    # measured: 3e-5 (other diagonals) and 1.2e-4 (finer grid) of the different surface's loss
    assert max(ratios) < 0.005, ratios


def test_orientation_flip_is_seen_by_currents_and_oriented_varifold_only():
    vertices, faces = sphere(5, 8)
    v, f = torch.from_numpy(vertices), torch.from_numpy(faces)
    flipped = f[:, [0, 2, 1]]
    losses = {o: float(varifold_loss(v, f, v, flipped, orientation=o, backend="torch")) for o in ORIENTATIONS}
    assert losses["currents"] > 1 and losses["oriented"] > 0.5, losses
    assert losses["unoriented"] < 1e-12, losses


def test_register_a_sphere_with_the_varifold():
    vertices, faces = sphere(8, 14)
    source = sf.Mesh(torch.from_numpy(vertices).float(), torch.from_numpy(faces))
    target = sf.Mesh(smooth_deformation(source.points, amplitude=0.04, seed=3), source.faces)
    before = float((source.points - target.points).pow(2).sum(1).mean().sqrt())
    result = sf.register(source, target, model="resnet", loss="varifold", iterations=80, progress=False)
    data = [row["data"] for row in result.history]
    # measured (seeds 0-3): RMSE 0.18 -> 0.003 to 0.0045, the data term down ~500x
    assert data[-1] < 0.02 * data[0], (data[0], data[-1])
    assert result.metrics["rmse"] < 0.1 * before, (result.metrics["rmse"], before)
    assert result.metrics["flipped_triangles_percent"] == 0
    assert isinstance(result.warped, sf.Mesh) and torch.equal(result.warped.faces, source.faces)


def test_register_refuses_point_clouds_and_mixed_cells():
    vertices, faces = sphere(4, 6)
    cloud = np.random.default_rng(0).random((30, 3))
    with pytest.raises(sf.ShapeflowError, match=r"^register\(\): loss 'varifold' needs faces \(a Mesh\) or edges "
                                                r"\(a Curve\).*the source is a point cloud\. Losses for point "
                                                r"clouds: sinkhorn, chamfer, l2$"):
        sf.register(cloud, cloud, loss="varifold", progress=False)
    mesh = sf.Mesh(vertices, faces)
    curve = sf.Curve(vertices, np.array([[0, 1], [1, 2]]))
    with pytest.raises(sf.ShapeflowError, match="the source is a mesh .faces. and the target a curve .edges."):
        sf.register(mesh, curve, loss="currents", progress=False)
    assert [name for name, loss in LOSSES.items() if loss.needs_cells] == ["varifold", "currents"]


def test_a_2d_curve_registers_with_currents():
    """The curve is matched (Chamfer distance down 8x); its points may slide along it (the RMSE to
    the known target does not fall: currents, like any shape distance, do not see sliding)."""
    angle = torch.linspace(0, 2 * math.pi, 41)[:-1]
    points = torch.stack([torch.cos(angle), 0.7 * torch.sin(angle)], 1)
    edges = torch.stack([torch.arange(40), (torch.arange(40) + 1) % 40], 1)
    source = sf.Curve(points, edges)
    target = sf.Curve(smooth_deformation(points, amplitude=0.05, seed=2), edges)
    result = sf.register(source, target, model="resnet", loss="currents", iterations=80, progress=False)
    data = [row["data"] for row in result.history]
    assert data[-1] < 0.05 * data[0], (data[0], data[-1])
    assert result.metrics["chamfer"] < 0.3 * result.metrics["chamfer_before"], result.metrics
    assert result.metrics["rmse"] is not None and isinstance(result.warped, sf.Curve)


def test_curve_validation_names_the_file():
    with pytest.raises(sf.ShapeflowError, match=r"^c\.txt: edges index vertex 7 but the curve has only 3 vertices$"):
        sf.Curve(np.zeros((3, 2)), np.array([[0, 7]]), source="c.txt")
    with pytest.raises(sf.ShapeflowError, match=r"edges must be an \(E, 2\) array of segments"):
        sf.Curve(np.zeros((3, 2)), np.array([[0, 1, 2]]))
