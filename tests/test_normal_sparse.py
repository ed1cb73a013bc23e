"""The sparse Gauss-Newton normal operator of per-point fields (meshes, clouds) against a dense reference."""
import pytest
import torch

from shapeflow.errors import ShapeflowError
from shapeflow.regularizers import knn_laplacian, mesh_laplacian
from shapeflow.solvers import assemble_sparse_normal_matrix, conjugate_gradient, sparse_normal_operator


def _dense(blocks, L, lam, damping):
    N, d = blocks.shape[:2]
    A = torch.block_diag(*blocks) + lam * torch.kron(L.to_dense(), torch.eye(d, dtype=blocks.dtype))
    return A + damping * torch.eye(N * d, dtype=blocks.dtype)


def _problem(d=3, n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(n, d, dtype=torch.float64, generator=g)
    J = torch.randn(n, 2, d, dtype=torch.float64, generator=g)
    blocks = J.transpose(1, 2) @ J                                              # (N, d, d) PSD
    blocks[::4] = 0                                                             # points without a pair
    return points, blocks, knn_laplacian(points, k=6).to(torch.float64)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("layout", ["coo", "csr", "dense"])
def test_operator_and_assembled_matrix_equal_the_dense_matrix(d, layout):
    _, blocks, L = _problem(d)
    L_in = {"coo": L, "csr": L.to_sparse_csr(), "dense": L.to_dense()}[layout]
    ref = _dense(blocks, L, 0.7, 0.05)
    op = sparse_normal_operator(blocks, L_in, lam=0.7, damping=0.05)
    v = torch.randn(blocks.shape[0] * d, dtype=torch.float64)
    torch.testing.assert_close(op(v), ref @ v)
    torch.testing.assert_close(op(v.view(-1, d)), (ref @ v).view(-1, d))             # (N, d) in, (N, d) out
    V = torch.randn(blocks.shape[0] * d, 3, dtype=torch.float64)
    torch.testing.assert_close(op(V), ref @ V)
    Av, dot = op.apply_dot(v)
    torch.testing.assert_close(dot, v @ ref @ v)
    torch.testing.assert_close(op.diagonal(), torch.diagonal(ref))
    torch.testing.assert_close(assemble_sparse_normal_matrix(blocks, L_in, lam=0.7, damping=0.05).to_dense(), ref)


def test_cg_on_a_mesh_normal_operator_matches_a_dense_solve():
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=2)
    vertices = torch.as_tensor(mesh.vertices, dtype=torch.float64)
    faces = torch.as_tensor(mesh.faces, dtype=torch.long)
    L = mesh_laplacian(vertices, faces, "cotangent").to(torch.float64)
    normals = torch.as_tensor(mesh.vertex_normals, dtype=torch.float64)
    blocks = normals[:, :, None] * normals[:, None, :] + 0.1 * torch.eye(3, dtype=torch.float64)  # point-to-plane
    rhs = torch.randn(len(vertices) * 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    op = sparse_normal_operator(blocks, L, lam=0.5)
    x, info = conjugate_gradient(op, rhs, M=op.diagonal(), tol=1e-10, maxiter=2000)
    ref = torch.linalg.solve(_dense(blocks, L, 0.5, 0.0), rhs)
    assert info.converged
    torch.testing.assert_close(x, ref, rtol=1e-7, atol=1e-8)


def test_operator_is_differentiable_in_the_blocks():
    _, blocks, L = _problem(2, n=8)
    blocks = blocks.clone().requires_grad_(True)
    v = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, x: sparse_normal_operator(b, L, lam=0.3)(x), (blocks, v))


def test_bad_arguments_name_the_problem():
    _, blocks, L = _problem(3, n=10)
    with pytest.raises(ShapeflowError, match=r"blocks must be \(N, d, d\)"):
        sparse_normal_operator(blocks[:, :2], L, lam=1.0)
    with pytest.raises(ShapeflowError, match=r"laplacian must be an \(10, 10\) tensor"):
        sparse_normal_operator(blocks, torch.eye(9, dtype=torch.float64), lam=1.0)
    with pytest.raises(ShapeflowError, match="lam and damping must be >= 0"):
        assemble_sparse_normal_matrix(blocks, L, lam=-1.0)
    with pytest.raises(ShapeflowError, match="expected"):
        sparse_normal_operator(blocks, L, lam=1.0)(torch.zeros(7, dtype=torch.float64))
