"""The general sparse CG path: one CSR conversion per solve, the numba CSR kernels, fallbacks.

No timings here (the CPU is shared); `benchmarks/solver_core.py --sparse-only` measures speed.
"""

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch

from shapeflow.regularizers import grid_laplacian
from shapeflow.solvers import conjugate_gradient
from shapeflow.solvers.linear import _sparse
from shapeflow.solvers.normal import _fused
from shapeflow.solvers.linear.operators import to_scipy_csr
from shapeflow._numba import numba_threads

needs_numba = pytest.mark.skipif(not _sparse.numba_available(), reason="numba is not installed")


def laplacian_system(s=6, dtype=torch.float64, layout="coo"):
    """3D 7-point Laplacian (Neumann) + a varied positive diagonal, s^3 unknowns."""
    n = s**3
    L = grid_laplacian((s, s, s), dtype=dtype)
    d = torch.linspace(0.05, 5.0, n, dtype=dtype)
    A = (L + torch.sparse_coo_tensor(torch.arange(n).expand(2, n), d, (n, n))).coalesce()
    return A.to_sparse_csr() if layout == "csr" else A


def random_sparse(n=50, density=0.1, seed=0, dtype=torch.float64):
    """Unsymmetric, uncoalesced COO (duplicate entries, some empty rows)."""
    g = torch.Generator().manual_seed(seed)
    nnz = int(density * n * n)
    rows = torch.randint(0, n - 5, (nnz,), generator=g)  # the last 5 rows stay empty
    cols = torch.randint(0, n, (nnz,), generator=g)
    rows, cols = torch.cat([rows, rows[:10]]), torch.cat([cols, cols[:10]])  # duplicates
    vals = torch.randn(rows.shape[0], generator=g, dtype=dtype)
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n))


def counting(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rhs", [(216,), (216, 3)])
@pytest.mark.parametrize("M", [None, "jacobi"])
def test_sparse_cg_matches_spsolve(layout, dtype, rhs, M, monkeypatch):
    A = laplacian_system(6, dtype, layout)
    b = torch.randn(rhs, dtype=dtype, generator=torch.Generator().manual_seed(1))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    built = counting(monkeypatch, _sparse, "to_csr")
    x, info = conjugate_gradient(A, b, M=M, tol=tol)
    ref = spla.spsolve(to_scipy_csr(A).astype(np.float64).tocsc(), b.double().numpy())
    rtol = 1e-3 if dtype == torch.float32 else 1e-8
    np.testing.assert_allclose(x.double().numpy(), ref.reshape(rhs), rtol=rtol, atol=rtol)
    assert x.dtype == dtype and x.shape == b.shape and len(built) == 1
    assert info.converged and info.backend == "torch" and info.iterations.shape == rhs[1:]
    assert int(info.iterations.min()) > 1
    true_res = (b - A @ x.reshape(216, -1).reshape(b.shape)).reshape(216, -1).norm(dim=0) / b.reshape(216, -1).norm(dim=0)
    torch.testing.assert_close(info.residual.reshape(-1), true_res, rtol=1e-2, atol=10 * tol)


def test_jacobi_uses_the_matrix_diagonal_and_cuts_iterations():
    A = laplacian_system(6)
    b = torch.randn(216, dtype=torch.float64)
    _, plain = conjugate_gradient(A, b, tol=1e-10)
    _, jac = conjugate_gradient(A, b, M="jacobi", tol=1e-10)
    _, given = conjugate_gradient(A, b, M=A.to_dense().diagonal(), tol=1e-10)
    assert int(jac.iterations) < int(plain.iterations) and int(jac.iterations) == int(given.iterations)
    torch.testing.assert_close(_sparse.CsrOperator(A).diagonal(), A.to_dense().diagonal())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_spmv_kernel_matches_scipy(dtype, index_dtype):
    A = random_sparse(dtype=dtype)
    csr = A.coalesce().to_sparse_csr()
    if index_dtype == torch.int32:
        csr = torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape)
    ref = to_scipy_csr(A).astype(np.float64)
    op = _sparse.CsrOperator(csr)
    assert op.fast == _sparse.numba_available()
    g = torch.Generator().manual_seed(2)
    x, X = torch.randn(50, generator=g, dtype=dtype), torch.randn(50, 4, generator=g, dtype=dtype)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(op(x).double().numpy(), ref @ x.double().numpy(), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(op(X).double().numpy(), ref @ X.double().numpy(), rtol=rtol, atol=rtol)
    out = torch.empty(50, dtype=dtype)
    Ax, dot = op.apply_dot(x, out=out)
    assert Ax.data_ptr() == out.data_ptr()
    np.testing.assert_allclose(float(dot), x.double().numpy() @ (ref @ x.double().numpy()), rtol=rtol * 10)
    np.testing.assert_allclose(op.diagonal().double().numpy(), ref.diagonal(), rtol=rtol)
    strided = X[:, 1]  # a non-contiguous column
    np.testing.assert_allclose(op(strided).double().numpy(), ref @ strided.double().numpy(), rtol=rtol, atol=rtol)


def test_conversion_once_per_solve_not_per_iteration(monkeypatch):
    A = laplacian_system(8)
    b = torch.randn(512, 2, dtype=torch.float64)
    built = counting(monkeypatch, _sparse, "to_csr")
    coalesced = counting(monkeypatch, torch.Tensor, "coalesce")
    to_csr = counting(monkeypatch, torch.Tensor, "to_sparse_csr")
    _, info = conjugate_gradient(A, b, M="jacobi", tol=1e-10)
    assert int(info.iterations.min()) > 10
    assert len(built) == 1 and len(to_csr) == 1 and len(coalesced) == 0  # A was coalesced already
    _, info = conjugate_gradient(A, b[:, 0], tol=1e-10)
    assert len(built) == 2 and len(to_csr) == 2


def test_gradients_flow_when_autograd_records(monkeypatch):
    """Unrolled CG through torch ops: gradients to b and to symmetric perturbations of A (a scale
    of A's entries and an extra diagonal; CG differentiates correctly only along symmetric ones)."""
    A = laplacian_system(4)
    n = 64
    g = torch.Generator().manual_seed(3)
    b = torch.randn(n, dtype=torch.float64, generator=g, requires_grad=True)
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    theta = torch.rand(n, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(n, dtype=torch.float64, generator=g)
    idx = torch.cat([A.indices(), torch.arange(n).expand(2, n)], 1)

    def matrix(scale, theta, layout):
        M = torch.sparse_coo_tensor(idx, torch.cat([scale * A.values(), theta]), A.shape)
        return M.to_dense() if layout == "dense" else M

    built = counting(monkeypatch, _sparse, "to_csr")
    x, info = conjugate_gradient(matrix(scale, theta, "coo"), b, M="jacobi", tol=1e-12)
    assert len(built) == 0 and x.requires_grad  # unrolled through torch ops, not the kernels
    grads = torch.autograd.grad((x * w).sum(), (b, scale, theta))
    x_ref = torch.linalg.solve(matrix(scale, theta, "dense"), b)
    refs = torch.autograd.grad((x_ref * w).sum(), (b, scale, theta))
    torch.testing.assert_close(x.detach(), x_ref.detach(), rtol=1e-9, atol=1e-9)
    for got, ref in zip(grads, refs):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)


def test_grad_mode_without_grad_inputs_takes_the_fast_path(monkeypatch):
    A = laplacian_system(6)
    b = torch.randn(216, dtype=torch.float64)
    built = counting(monkeypatch, _sparse, "to_csr")
    x, _ = conjugate_gradient(A, b, tol=1e-10)  # grad mode on, nothing requires grad
    assert len(built) == 1 and not x.requires_grad


@pytest.mark.parametrize("rhs", [(216,), (216, 2)])
def test_torch_fallback_without_numba(rhs, monkeypatch):
    A = laplacian_system(6)
    b = torch.randn(rhs, dtype=torch.float64)
    x_fast, _ = conjugate_gradient(A, b, M="jacobi", tol=1e-10)
    _sparse._kernels.cache_clear()
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    try:
        assert not _sparse.numba_available()
        op = _sparse.CsrOperator(A)
        assert not op.fast
        x, info = conjugate_gradient(A, b, M="jacobi", tol=1e-10)
    finally:
        _sparse._kernels.cache_clear()
    assert info.converged
    torch.testing.assert_close(x, x_fast, rtol=1e-8, atol=1e-8)


@needs_numba
def test_user_numba_thread_count_is_restored():
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2")
    old_torch, old_numba = torch.get_num_threads(), numba.get_num_threads()
    A = laplacian_system(6)
    b = torch.randn(216, dtype=torch.float64)
    jac = torch.randn(1, 3, 6, 6, 6, dtype=torch.float64)
    u, out = torch.randn(3, 6, 6, 6, dtype=torch.float64), torch.empty(3, 6, 6, 6, dtype=torch.float64)
    try:
        for torch_n, user_n in [(2, 1), (1, 2)]:
            torch.set_num_threads(torch_n)
            numba.set_num_threads(user_n)
            with numba_threads():
                assert numba.get_num_threads() == torch_n
            conjugate_gradient(A, b, M="jacobi", tol=1e-8)
            assert numba.get_num_threads() == user_n
            _fused.normal_matvec(u, jac, [1.0, 1.0, 1.0], 0.1, out, True)
            assert numba.get_num_threads() == user_n
    finally:
        torch.set_num_threads(old_torch)
        numba.set_num_threads(old_numba)


def test_importing_shapeflow_compiles_nothing():
    code = ("import sys, shapeflow, shapeflow.solvers; from shapeflow.solvers.linear import _sparse; from shapeflow.solvers.normal import _fused; "
            "print(_sparse._kernels.cache_info().currsize, _fused._kernel.cache_info().currsize, 'numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0", "False"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_cg_on_cuda_uses_torch_ops():
    A = laplacian_system(6).cuda()
    b = torch.randn(216, 2, dtype=torch.float64, device="cuda")
    x, info = conjugate_gradient(A, b, M="jacobi", tol=1e-10, backend="torch")
    ref = torch.linalg.solve(A.to_dense(), b)
    assert info.converged and x.device.type == "cuda"
    torch.testing.assert_close(x, ref, rtol=1e-8, atol=1e-8)


@needs_numba
def test_serial_and_parallel_kernels_agree():
    """One torch thread runs the serial variant of each sparse kernel, more the parallel one (the
    grid-normal kernel always its parallel one); the numbers agree."""
    op = _sparse.CsrOperator(random_sparse())
    g = torch.Generator().manual_seed(4)
    x, X = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, 3, generator=g, dtype=torch.float64)
    jac = torch.randn(2, 3, 5, 4, 3, generator=g, dtype=torch.float64)
    u = torch.randn(3, 5, 4, 3, generator=g, dtype=torch.float64)
    old = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = torch.empty_like(u)
            dot = _fused.normal_matvec(u, jac, [1.0, 0.5, 2.0], 0.1, out, True)
            results.append((op(x), op(X), op.apply_dot(x)[1], out, dot))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert _sparse._kernels()["csr_matvec"][0].signatures  # the serial build ran
