"""Laplacians and regularisers against independent references and closed forms."""

import math

import pytest
import torch

from shapeflow.errors import ShapeflowError
from shapeflow.regularizers import (
    LAPLACIANS,
    bending,
    diffusion,
    folding_statistics,
    grid_bending,
    grid_diffusion,
    grid_laplacian,
    grid_laplacian_apply,
    jacobian_determinant,
    knn_laplacian,
    mesh_laplacian,
    mesh_mass,
)

D = torch.float64


def icosphere(subdivisions=3):
    trimesh = pytest.importorskip("trimesh")
    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    return torch.tensor(m.vertices, dtype=D), torch.tensor(m.faces, dtype=torch.long)


def check_laplacian(L, tol=1e-10):
    dense = L.to_dense()
    torch.testing.assert_close(dense, dense.T)
    assert float(torch.linalg.eigvalsh(dense).min()) > -tol * float(dense.abs().max())
    ones = torch.ones(dense.shape[0], dtype=dense.dtype)
    assert float((dense @ ones).abs().max()) < 1e-9 * float(dense.abs().max())


# --------------------------------------------------------------------------------- grid


@pytest.mark.parametrize("shape,spacing", [((6, 5), (1.0, 2.5)), ((4, 5, 3), (0.5, 1.0, 2.0))])
def test_grid_stencil_and_matrix_agree(shape, spacing):
    u = torch.randn(2, *shape, dtype=D)
    L = grid_laplacian(shape, spacing, dtype=D)
    via_matrix = (L @ u.reshape(2, -1).T).T.reshape(u.shape)
    torch.testing.assert_close(grid_laplacian_apply(u, spacing), via_matrix)
    check_laplacian(L)
    # block form for a flattened (2, *S) field
    L2 = grid_laplacian(shape, spacing, components=2, dtype=D)
    torch.testing.assert_close((L2 @ u.reshape(-1)).reshape(u.shape), via_matrix)


@pytest.mark.parametrize("slab", [1, 7, 150, 1 << 30])  # elements per slab: 1 row, 1-2 rows, uneven, one slab
@pytest.mark.parametrize(
    "shape,spacing",
    [((7, 5), (1.0, 2.5)), ((5, 4, 6), (0.5, 1.0, 2.0)), ((1, 3, 4), (1.0, 1.0, 1.0)), ((6, 1, 3), (2.0, 1.0, 0.5))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_stencil_matches_the_assembled_laplacian(monkeypatch, slab, shape, spacing, dtype):
    import shapeflow.regularizers.laplacians as reg

    monkeypatch.setattr(reg, "SLAB_ELEMENTS", slab)
    u = torch.randn(3, *shape, dtype=dtype)
    L = grid_laplacian(shape, spacing, components=3, dtype=torch.float64)
    ref = (L @ u.double().reshape(-1)).reshape(u.shape).to(dtype)  # plain torch sparse reference
    with torch.no_grad():
        fast = grid_laplacian_apply(u, spacing)
    torch.testing.assert_close(fast, ref)
    # the differentiable (unblocked) path gives the same values
    torch.testing.assert_close(grid_laplacian_apply(u.requires_grad_(), spacing).detach(), fast)
    # a non-contiguous input
    ut = u.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    with torch.no_grad():
        torch.testing.assert_close(grid_laplacian_apply(ut, spacing), ref)


def test_grid_energy_is_sum_of_squared_forward_differences():
    spacing = (0.5, 1.0, 2.0)
    u = torch.randn(3, 4, 5, 6, dtype=D)
    ref = sum(((torch.diff(u, dim=a + 1) / h) ** 2).sum() for a, h in enumerate(spacing))
    torch.testing.assert_close(grid_diffusion(u, spacing), ref)
    L = grid_laplacian(u.shape[1:], spacing, dtype=D)
    flat = u.reshape(3, -1).T
    torch.testing.assert_close(diffusion(flat, L), ref)
    torch.testing.assert_close(grid_bending(u, spacing), bending(flat, L))


def test_grid_laplacian_1d_interior_is_second_difference():
    # u = 3 x^2 along axis 0 (spacing h): -u'' = -6 at interior points, exactly
    h = 0.5
    x = torch.arange(8, dtype=D) * h
    u = (3.0 * x**2).reshape(1, 8, 1).expand(1, 8, 4).contiguous()
    Lu = grid_laplacian_apply(u, (h, 1.0))
    torch.testing.assert_close(Lu[0, 1:-1], torch.full((6, 4), -6.0, dtype=D))


def test_grid_apply_is_differentiable():
    u = torch.randn(1, 4, 5, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: grid_laplacian_apply(v, (1.0, 2.0)), (u,))


# --------------------------------------------------------------------------------- meshes


def test_cotangent_matches_robust_laplacian():
    robust_laplacian = pytest.importorskip("robust_laplacian")
    V, F = icosphere(2)
    L = mesh_laplacian(V, F, kind="cotangent")
    Lr, Mr = robust_laplacian.mesh_laplacian(V.numpy(), F.numpy())
    # same sign (PSD, positive diagonal) and scale ((cot a + cot b) / 2) on a Delaunay mesh
    torch.testing.assert_close(L.to_dense(), torch.tensor(Lr.toarray()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mesh_mass(V, F), torch.tensor(Mr.diagonal()), rtol=1e-6, atol=1e-9)


def test_cotangent_sphere_eigenfunctions():
    # on the unit sphere -Delta x = 2 x for the coordinate functions, so L x ~ 2 M x
    V, F = icosphere(3)
    L = mesh_laplacian(V, F)
    M = mesh_mass(V, F)
    for c in range(3):
        x = V[:, c]
        rel = torch.linalg.vector_norm(L @ x - 2 * M * x) / torch.linalg.vector_norm(2 * M * x)
        assert float(rel) < 0.03
    assert abs(float(M.sum()) - 4 * math.pi) < 0.01 * 4 * math.pi


@pytest.mark.parametrize("kind", sorted(LAPLACIANS))
def test_mesh_laplacians_are_symmetric_psd_with_constant_nullspace(kind):
    V, F = icosphere(1)
    check_laplacian(mesh_laplacian(V, F, kind=kind))


def test_uniform_laplacian_is_degree_minus_adjacency():
    # a square split in two triangles: edges 01 12 20 23 30 (degree 3, 2, 3, 2)
    V = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=D)
    F = torch.tensor([[0, 1, 2], [0, 2, 3]])
    L = mesh_laplacian(V, F, kind="uniform").to_dense()
    ref = torch.tensor([[3, -1, -1, -1], [-1, 2, -1, 0], [-1, -1, 3, -1], [-1, 0, -1, 2]], dtype=D)
    torch.testing.assert_close(L, ref)


def test_unknown_laplacian_lists_the_valid_names():
    V, F = icosphere(0)
    with pytest.raises(ShapeflowError, match=r"valid names: \['cotangent', 'uniform'\]"):
        mesh_laplacian(V, F, kind="fem")


# --------------------------------------------------------------------------------- point clouds


def test_knn_laplacian_against_brute_force():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(60, 3, dtype=D, generator=g)
    k, sigma = 5, 0.2
    L = knn_laplacian(X, k, sigma).to_dense()
    # brute force: dense distances, k nearest, symmetrised, Gaussian weights
    d2 = torch.cdist(X, X) ** 2
    nn = d2.argsort(dim=1)[:, 1 : k + 1]
    A = torch.zeros(60, 60, dtype=torch.bool)
    A[torch.arange(60).repeat_interleave(k), nn.reshape(-1)] = True
    A = A | A.T
    W = torch.where(A, torch.exp(-d2 / (2 * sigma**2)), torch.zeros_like(d2))
    torch.testing.assert_close(L, torch.diag(W.sum(1)) - W)
    check_laplacian(knn_laplacian(X, k))


# --------------------------------------------------------------------------------- energies


def test_diffusion_and_bending_closed_forms_on_a_path_graph():
    # path graph 0-1-2: L = [[1,-1,0],[-1,2,-1],[0,-1,1]]
    L = torch.tensor([[1.0, -1, 0], [-1, 2, -1], [0, -1, 1]], dtype=D)
    u = torch.tensor([[0.0, 1.0], [1.0, 1.0], [3.0, 1.0]], dtype=D)
    assert float(diffusion(u, L.to_sparse())) == pytest.approx((1 - 0) ** 2 + (3 - 1) ** 2)
    Lu = torch.tensor([-1.0, -1.0, 2.0], dtype=D)
    assert float(bending(u, lambda v: L @ v)) == pytest.approx(float((Lu**2).sum()))


# --------------------------------------------------------------------------------- Jacobians


@pytest.mark.parametrize("d", [2, 3])
def test_affine_field_has_constant_determinant(d):
    g = torch.Generator().manual_seed(d)
    A = torch.eye(d, dtype=D) + 0.3 * torch.randn(d, d, dtype=D, generator=g)
    t = torch.randn(d, dtype=D, generator=g)
    spacing = [0.7, 1.3, 2.0][:d]
    shape = [6, 7, 5][:d]
    axes = torch.meshgrid(*[torch.arange(n, dtype=D) * h for n, h in zip(shape, spacing)], indexing="ij")
    x = torch.stack(axes)  # (d, *S)
    u = torch.einsum("ij,j...->i...", A - torch.eye(d, dtype=D), x) + t.reshape(d, *[1] * d)
    detJ = jacobian_determinant(u, spacing)
    torch.testing.assert_close(detJ, torch.full(shape, float(torch.linalg.det(A)), dtype=D))
    stats = folding_statistics(detJ)
    assert stats["std_log"] < 1e-10 and stats["min"] == pytest.approx(float(torch.linalg.det(A)))


def test_known_folding_field_has_expected_negative_fraction():
    # u_x = a sin(k x): detJ = 1 + a k cos(k x) < 0 where cos(k x) < -1/(a k) -> fraction 1/3 for a k = 2
    n = 600
    x = torch.arange(n, dtype=D) * (2 * math.pi / n)
    k = 3.0
    a = 2.0 / k
    u = torch.zeros(2, n, 8, dtype=D)
    u[0] = (a * torch.sin(k * x)).reshape(n, 1)
    stats = folding_statistics(jacobian_determinant(u, (2 * math.pi / n, 1.0)))
    assert stats["percent_negative"] == pytest.approx(100 / 3, abs=0.5)
    assert stats["min"] == pytest.approx(1 - a * k, abs=1e-3)


def test_bad_fields_raise():
    with pytest.raises(ShapeflowError, match=r"jacobian_determinant\(\).*d == len\(S\)"):
        jacobian_determinant(torch.zeros(3, 4, 4))
    with pytest.raises(ShapeflowError, match=r"grid_laplacian_apply\(\): spacing"):
        grid_laplacian_apply(torch.zeros(1, 4, 4), (1.0, -1.0))
