"""linear_solve: gradcheck against the dense solve; implicit vs unrolled vs partial derivatives."""

import pytest
import torch
from torch.autograd import gradcheck

from shapeflow.errors import ShapeflowError
from shapeflow.solvers import linear_solve

D = torch.float64
N = 8


def sym_pattern(seed=0):
    """A sparse symmetric pattern and values: A(vals) = (P(vals) + P(vals)^T) / 2 is SPD at vals0."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(N, N, dtype=D, generator=g)
    mask = (torch.rand(N, N, generator=g) < 0.4) | torch.eye(N, dtype=torch.bool)
    mask = mask | mask.T
    A = (Q @ Q.T + N * torch.eye(N, dtype=D)) * mask
    sp = A.to_sparse()
    return sp.indices(), sp.values().clone()


def build_sym(idx, vals, layout="coo"):
    A = torch.sparse_coo_tensor(torch.cat([idx, idx.flip(0)], 1), torch.cat([vals, vals]) / 2, (N, N)).coalesce()
    return A.to_sparse_csr() if layout == "csr" else A


def inputs(seed=1, k=2):
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(N, dtype=D, generator=g) + 1).requires_grad_()
    b = torch.randn(N, k, dtype=D, generator=g).requires_grad_()
    return d, b


@pytest.mark.parametrize("mode,layout", [("implicit", "coo"), ("implicit", "csr"), ("unrolled", "coo"), ("partial", "coo")])
def test_gradcheck_symmetric_sparse(mode, layout):
    idx, vals = sym_pattern()
    vals.requires_grad_()
    d, b = inputs()
    fn = lambda v, d, b: linear_solve(build_sym(idx, v, layout), d, b, tol=1e-13, mode=mode)  # noqa: E731
    assert gradcheck(fn, (vals, d, b), fast_mode=layout == "csr")  # torch's small-CSR matmul is slow


@pytest.mark.parametrize("method", ["bicgstab", "direct"])
@pytest.mark.parametrize("mode", ["implicit", "unrolled"])
def test_gradcheck_nonsymmetric(method, mode):
    g = torch.Generator().manual_seed(5)
    A = torch.randn(N, N, dtype=D, generator=g) + N * torch.eye(N, dtype=D)
    sp = A.to_sparse()
    vals = sp.values().clone().requires_grad_()
    d, b = inputs(k=1)
    fn = lambda v, d, b: linear_solve(  # noqa: E731
        torch.sparse_coo_tensor(sp.indices(), v, (N, N)), d, b, tol=1e-13, mode=mode, method=method
    )
    assert gradcheck(fn, (vals, d, b))
    # dense A and a callable A (adjoint through a vector-Jacobian product)
    Ad = A.clone().requires_grad_()
    assert gradcheck(lambda A_, d, b: linear_solve(A_, d, b, tol=1e-13, method=method, mode=mode), (Ad, d, b))
    if method == "bicgstab":
        assert gradcheck(lambda d, b: linear_solve(lambda v: A @ v, d, b, tol=1e-13, method=method, mode=mode), (d, b))


def test_implicit_gradients_equal_dense_formulas():
    idx, vals = sym_pattern()
    A = build_sym(idx, vals).requires_grad_()
    d, b = inputs(k=3)
    x = linear_solve(A, d, b, tol=1e-13)
    gx = torch.randn_like(x)
    (x * gx).sum().backward()
    S = A.detach().to_dense() + torch.diag(d.detach())
    x_ref = torch.linalg.solve(S, b.detach())
    g_b = torch.linalg.solve(S.T, gx)
    torch.testing.assert_close(x.detach(), x_ref)
    torch.testing.assert_close(b.grad, g_b)
    torch.testing.assert_close(d.grad, -(x_ref * g_b).sum(1))
    # sparse gradient with A's pattern: -g_b x^T restricted to the stored entries
    assert A.grad.layout == torch.sparse_coo
    full = -g_b @ x_ref.T
    rows, cols = A.grad.coalesce().indices()
    torch.testing.assert_close(A.grad.coalesce().values(), full[rows, cols])
    assert A.grad._nnz() == A._nnz()


def _grads(mode, A, d0, b0, gx, **kw):
    d = d0.clone().requires_grad_()
    b = b0.clone().requires_grad_()
    x = linear_solve(A, d, b, mode=mode, **kw)
    (x * gx).sum().backward()
    return x.detach(), d.grad, b.grad


def test_modes_agree_with_dense_derivative_when_converged():
    idx, vals = sym_pattern()
    A = build_sym(idx, vals)
    d0, b0 = (t.detach() for t in inputs())
    gx = torch.randn(N, 2, dtype=D)
    S = A.to_dense() + torch.diag(d0)
    d_ref, b_ref = d0.clone().requires_grad_(), b0.clone().requires_grad_()
    (torch.linalg.solve(A.to_dense() + torch.diag(d_ref), b_ref) * gx).sum().backward()
    for mode in ("implicit", "unrolled", "partial"):
        x, gd, gb = _grads(mode, A, d0, b0, gx, tol=1e-12, p=0.3)
        torch.testing.assert_close(x, torch.linalg.solve(S, b0))
        torch.testing.assert_close(gd, d_ref.grad, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(gb, b_ref.grad, rtol=1e-7, atol=1e-9)


def test_modes_differ_for_truncated_solves():
    """With 3 CG iterations on an ill-conditioned system, unrolled is the exact derivative of the
    truncated computation (finite differences agree), implicit is not (it differentiates the exact
    solve); partial differentiates only the recorded tail."""
    g = torch.Generator().manual_seed(2)
    n = 30
    Q = torch.linalg.qr(torch.randn(n, n, dtype=D, generator=g))[0]
    A = Q @ torch.diag(torch.logspace(0, 3, n, dtype=D)) @ Q.T
    A = (A + A.T) / 2
    d0 = torch.rand(n, dtype=D, generator=g)
    b0 = torch.randn(n, dtype=D, generator=g)
    gx = torch.randn(n, dtype=D, generator=g)
    kw = dict(tol=0.0, maxiter=3)

    def truncated(d):  # the forward computation that actually ran (same for implicit/unrolled)
        return (linear_solve(A, d, b0, mode="implicit", **kw) * gx).sum()

    eps = 1e-6
    fd = torch.stack([(truncated(d0 + eps * e) - truncated(d0 - eps * e)) / (2 * eps) for e in torch.eye(n, dtype=D)])
    _, g_unrolled, _ = _grads("unrolled", A, d0, b0, gx, **kw)
    _, g_implicit, _ = _grads("implicit", A, d0, b0, gx, **kw)
    _, g_partial, _ = _grads("partial", A, d0, b0, gx, p=0.34, **kw)
    _, g_exact, _ = _grads("unrolled", A, d0, b0, gx, method="direct")

    def rel(a, b):
        return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))

    assert rel(g_unrolled, fd) < 1e-6  # exact derivative of the truncated solve
    assert rel(g_implicit, fd) > 0.1  # implicit is not
    assert rel(g_partial, fd) > 0.1 and rel(g_partial, g_unrolled) > 0.1
    assert rel(g_unrolled, g_exact) > 0.1  # and the truncated solve is far from the exact one


def test_jacobi_and_backend_options_in_linear_solve():
    pytest.importorskip("pyamg")
    idx, vals = sym_pattern()
    A = build_sym(idx, vals)
    d, b = inputs()
    x_ref = torch.linalg.solve(A.to_dense() + torch.diag(d.detach()), b.detach())
    for kw in (dict(M="jacobi"), dict(backend="amg"), dict(M="amg")):
        x = linear_solve(A, d, b, tol=1e-12, **kw)
        torch.testing.assert_close(x.detach(), x_ref)
        x.sum().backward()
    assert d.grad is not None


def test_linear_solve_validation():
    idx, vals = sym_pattern()
    A = build_sym(idx, vals)
    b = torch.ones(N, dtype=D)
    with pytest.raises(ShapeflowError, match=r"linear_solve\(\): unknown mode 'adjoint'; valid names"):
        linear_solve(A, None, b, mode="adjoint")
    with pytest.raises(ShapeflowError, match=r"unknown method 'gmres'; valid names"):
        linear_solve(A, None, b, method="gmres")
    with pytest.raises(ShapeflowError, match=r"diag must be a tensor of shape \(8,\)"):
        linear_solve(A, torch.ones(3, dtype=D), b)
    with pytest.raises(ShapeflowError, match=r"p must be in \(0, 1\]"):
        linear_solve(A, None, b, mode="partial", p=0.0)
    x = linear_solve(A, None, b, tol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(A.to_dense(), b))


@pytest.mark.parametrize("zero_diag", [True, False])
def test_linear_solve_keeps_the_fused_operator_path(zero_diag):
    """With a GridNormalOperator, the forward and adjoint CG use its fused `apply_dot` and its
    diagonal for Jacobi, and the result and gradients equal the dense solve."""
    from shapeflow.solvers.normal.grid import grid_normal_operator

    g = torch.Generator().manual_seed(5)
    jac = torch.randn(1, 2, 5, 4, dtype=D, generator=g)
    op = grid_normal_operator(jac, lam=0.8, spacing=(1.0, 1.5), damping=0.1)
    n = op.n
    dense = torch.stack([op(e) for e in torch.eye(n, dtype=D)], dim=1)
    calls = []
    fused = op.apply_dot
    op.apply_dot = lambda v: (calls.append(1), fused(v))[1]
    d = (torch.zeros(n, dtype=D) if zero_diag else torch.rand(n, dtype=D, generator=g)).requires_grad_()
    b = torch.randn(n, dtype=D, generator=g).requires_grad_()
    x = linear_solve(op, d, b, M="jacobi", tol=1e-12)
    S = dense + torch.diag(d.detach())
    torch.testing.assert_close(x.detach(), torch.linalg.solve(S, b.detach()))
    w = torch.randn(n, dtype=D, generator=g)
    (x * w).sum().backward()
    g_b = torch.linalg.solve(S.T, w)
    torch.testing.assert_close(b.grad, g_b)
    torch.testing.assert_close(d.grad, -x.detach() * g_b)
    assert len(calls) > 2  # forward and backward went through the fused product
