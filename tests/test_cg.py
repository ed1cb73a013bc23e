"""conjugate_gradient and bicgstab against dense solves; backend dispatch; the CuPy path on CUDA."""

import pytest
import torch

import shapeflow._optional as optional
from shapeflow.errors import ShapeflowError
from shapeflow.solvers.linear import cg as cgmod
from shapeflow.solvers import bicgstab, conjugate_gradient


def spd(n, seed=0, dtype=torch.float64, density=0.3):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(n, n, generator=g, dtype=dtype)
    mask = (torch.rand(n, n, generator=g) < density) | torch.eye(n, dtype=torch.bool)
    mask = mask | mask.T
    A = (Q + Q.T) * mask
    # diagonally dominant with a varied diagonal => SPD and a use for Jacobi
    A = A + torch.diag(A.abs().sum(1) + torch.linspace(1, 50, n, dtype=dtype))
    return A


@pytest.mark.parametrize("layout", ["dense", "coo", "csr", "callable"])
@pytest.mark.parametrize("rhs_shape", [(40,), (40, 3)])
def test_cg_matches_dense_solve(layout, rhs_shape):
    A = spd(40)
    b = torch.randn(rhs_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    op = {"dense": A, "coo": A.to_sparse(), "csr": A.to_sparse_csr(), "callable": lambda v: A @ v}[layout]
    x, info = conjugate_gradient(op, b, tol=1e-10)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-8)
    assert info.converged and info.backend == "torch"
    assert info.iterations.shape == rhs_shape[1:] and info.residual.shape == rhs_shape[1:]
    assert bool((info.residual < 1e-10).all())


def test_columns_have_their_own_steps_and_freeze():
    A = spd(30)
    b = torch.randn(30, 2, dtype=torch.float64)
    b[:, 1] = A @ torch.ones(30, dtype=torch.float64)
    x0 = torch.zeros(30, 2, dtype=torch.float64)
    x0[:, 1] = 1.0  # second column starts at the solution: frozen at 0 iterations
    x, info = conjugate_gradient(A, b, x0=x0, tol=1e-10)
    assert int(info.iterations[1]) == 0 and int(info.iterations[0]) > 5
    torch.testing.assert_close(x[:, 1], torch.ones(30, dtype=torch.float64))
    # one column alone gives the same answer and the same count as in the batch
    x_alone, info_alone = conjugate_gradient(A, b[:, 0], tol=1e-10)
    torch.testing.assert_close(x[:, 0], x_alone)
    assert int(info_alone.iterations) == int(info.iterations[0])


def test_zero_rhs_and_float32():
    A = spd(20, dtype=torch.float32)
    x, info = conjugate_gradient(A, torch.zeros(20), tol=1e-5)
    assert info.converged and torch.count_nonzero(x) == 0 and int(info.iterations) == 0
    b = torch.randn(20)
    x, info = conjugate_gradient(A, b, tol=1e-5)
    assert x.dtype == torch.float32 and info.converged
    torch.testing.assert_close(x, torch.linalg.solve(A.double(), b.double()).float(), rtol=1e-4, atol=1e-4)


def test_jacobi_reduces_iterations_and_forms_agree():
    A = spd(60, density=0.05)
    A = A + torch.diag(torch.logspace(0, 4, 60, dtype=torch.float64))  # badly scaled diagonal
    b = torch.randn(60, dtype=torch.float64)
    ref = torch.linalg.solve(A, b)
    _, plain = conjugate_gradient(A, b, tol=1e-10)
    results = [
        conjugate_gradient(A.to_sparse(), b, M="jacobi", tol=1e-10),
        conjugate_gradient(lambda v: A @ v, b, M=A.diagonal(), tol=1e-10),
        conjugate_gradient(A, b, M=lambda r: r / A.diagonal(), tol=1e-10),
    ]
    for x, info in results:
        torch.testing.assert_close(x, ref, rtol=1e-8, atol=1e-8)
        assert int(info.iterations) < int(plain.iterations)
    assert len({int(info.iterations) for _, info in results}) == 1


def test_maxiter_reports_not_converged():
    A = spd(50)
    x, info = conjugate_gradient(A, torch.randn(50, dtype=torch.float64), tol=1e-12, maxiter=3)
    assert not info.converged and int(info.iterations) == 3 and float(info.residual) > 1e-6


def test_amg_backend_and_preconditioner_match_dense():
    pytest.importorskip("pyamg")
    # 2D Poisson-like SPD matrix: AMG's home ground
    from shapeflow.regularizers import grid_laplacian

    L = grid_laplacian((24, 24), dtype=torch.float64)
    A = (L + 1e-2 * torch.eye(L.shape[0], dtype=torch.float64).to_sparse()).coalesce()
    b = torch.randn(A.shape[0], 2, dtype=torch.float64)
    ref = torch.linalg.solve(A.to_dense(), b)
    x, info = conjugate_gradient(A, b, tol=1e-10, backend="amg")
    assert info.backend == "amg" and info.converged
    torch.testing.assert_close(x, ref, rtol=1e-7, atol=1e-7)
    x2, info2 = conjugate_gradient(A.to_sparse_csr(), b, M="amg", tol=1e-10)
    torch.testing.assert_close(x2, ref, rtol=1e-7, atol=1e-7)
    _, plain = conjugate_gradient(A, b, tol=1e-10)
    assert int(info2.iterations.max()) < int(plain.iterations.max()) // 3
    # float32 systems work too (the hierarchy is built in float64), to float32 accuracy
    A32, b32 = A.float(), b.float()
    for kw in (dict(backend="amg"), dict(M="amg")):
        x32, info32 = conjugate_gradient(A32, b32, tol=1e-5, **kw)
        assert x32.dtype == torch.float32 and info32.converged
        torch.testing.assert_close(x32.double(), ref, rtol=1e-3, atol=1e-3)


def test_bicgstab_nonsymmetric_matches_dense():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(30, 30, dtype=torch.float64, generator=g) + 12 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, 2, dtype=torch.float64, generator=g)
    for op in (A, A.to_sparse(), lambda v: A @ v):
        x, info = bicgstab(op, b, tol=1e-11)
        assert info.converged
        torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-8)
    x, _ = bicgstab(A, b, M="jacobi", tol=1e-11)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-8)


def test_bad_input_errors_name_the_function():
    A = spd(5)
    with pytest.raises(ShapeflowError, match=r"conjugate_gradient\(\).*valid names"):
        conjugate_gradient(A, torch.ones(5, dtype=torch.float64), backend="magma")
    with pytest.raises(ShapeflowError, match=r"conjugate_gradient\(\).*preconditioner"):
        conjugate_gradient(A, torch.ones(5, dtype=torch.float64), M="ilu")
    with pytest.raises(ShapeflowError, match=r"A has shape \(5, 5\) but b has 4 rows"):
        conjugate_gradient(A, torch.ones(4, dtype=torch.float64))
    with pytest.raises(ShapeflowError, match="jacobi"):
        conjugate_gradient(lambda v: A @ v, torch.ones(5, dtype=torch.float64), M="jacobi")


# ------------------------------------------------------------------ CuPy dispatch, tested on the CPU


def test_auto_never_looks_for_cupy_on_cpu(monkeypatch):
    def boom(name):
        raise AssertionError(f"is_available({name!r}) called for CPU tensors")

    monkeypatch.setattr(cgmod, "is_available", boom)
    A = spd(6).to_sparse()
    assert cgmod.resolve_backend("auto", A, torch.ones(6, dtype=torch.float64)) == "torch"
    _, info = conjugate_gradient(A, torch.ones(6, dtype=torch.float64))
    assert info.backend == "torch"


def test_explicit_cupy_on_cpu_tensors_is_a_one_line_error():
    A = spd(6).to_sparse()
    with pytest.raises(ShapeflowError, match=r'needs CUDA tensors.*shapeflow\[gpu\]') as exc:
        conjugate_gradient(A, torch.ones(6, dtype=torch.float64), backend="cupy")
    assert "\n" not in str(exc.value)


class _FakeCuda:
    """A stand-in for a CUDA tensor, enough for resolve_backend."""

    def __init__(self):
        self.device = torch.device("cuda")
        self.requires_grad = False


def test_explicit_cupy_without_cupy_names_the_gpu_extra(monkeypatch):
    monkeypatch.setattr(cgmod, "is_available", lambda name: False)
    with pytest.raises(ImportError, match=r'pip install "shapeflow\[gpu\]"') as exc:
        cgmod.resolve_backend("cupy", spd(4).to_sparse(), _FakeCuda())
    assert "\n" not in str(exc.value)


def test_auto_picks_cupy_on_cuda_only_when_installed(monkeypatch):
    A = spd(4).to_sparse()
    monkeypatch.setattr(cgmod, "is_available", lambda name: name == "cupy")
    assert cgmod.resolve_backend("auto", A, _FakeCuda()) == "cupy"
    assert cgmod.resolve_backend("auto", lambda v: v, _FakeCuda()) == "torch"  # needs a matrix
    monkeypatch.setattr(cgmod, "is_available", lambda name: False)
    assert cgmod.resolve_backend("auto", A, _FakeCuda()) == "torch"


def test_import_optional_error_names_the_extra(monkeypatch):
    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(optional.importlib, "import_module", missing)
    with pytest.raises(ImportError, match=r'needs cupy.*pip install "shapeflow\[gpu\]"'):
        optional.import_optional("cupy", 'backend="cupy"')
    with pytest.raises(ImportError, match=r'pip install "shapeflow\[amg\]"'):
        optional.import_optional("pyamg", "algebraic multigrid")


def test_importing_solvers_does_not_import_cupy_or_pyamg():
    import subprocess
    import sys

    code = "import sys, shapeflow.solvers; print('cupy' in sys.modules, 'pyamg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.gpu
def test_cupy_backend_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("cupy")
    A = spd(200).cuda().to_sparse_csr()
    b = torch.randn(200, 2, dtype=torch.float64, device="cuda")
    x, info = conjugate_gradient(A, b, M="jacobi", tol=1e-10, backend="cupy")
    assert info.backend == "cupy" and info.converged and x.device.type == "cuda"
    torch.testing.assert_close(x, torch.linalg.solve(A.to_dense(), b), rtol=1e-7, atol=1e-7)
    x_auto, info_auto = conjugate_gradient(A, b, tol=1e-10)
    assert info_auto.backend == "cupy"


# ----------------------------------------------------------------------------- fast paths


def assembled_normal_matrix(jac, lam, spacing, damping):
    """Dense `J^T J + damping I + lam kron(I_C, L)` from the sparse grid Laplacian (reference)."""
    from shapeflow.regularizers import grid_laplacian

    K, C = jac.shape[:2]
    S = jac.shape[2:]
    N = jac[0, 0].numel()
    Jf = jac.reshape(K, C, N)
    A = lam * grid_laplacian(S, spacing, components=C, dtype=jac.dtype).to_dense()
    for c in range(C):
        for d in range(C):
            A[c * N:(c + 1) * N, d * N:(d + 1) * N] += torch.diag((Jf[:, c] * Jf[:, d]).sum(0))
    return A + damping * torch.eye(C * N, dtype=jac.dtype)


@pytest.mark.parametrize("path,slab", [("torch", 1), ("torch", 80), ("torch", 1 << 30), ("numba", 80)])
@pytest.mark.parametrize(
    "jac_shape,spacing",
    [((1, 3, 5, 4, 3), (1.0, 0.5, 2.0)), ((2, 2, 6, 5), (1.5, 1.0)), ((1, 3, 4, 1, 5), (1.0, 1.0, 1.0)),
     ((3, 2, 1, 7), (2.0, 1.0))],
)
def test_grid_normal_operator_matches_the_assembled_matrix(monkeypatch, path, slab, jac_shape, spacing):
    """Both the slab-blocked torch path and the one-pass numba kernel equal the dense matrix."""
    import shapeflow.regularizers.laplacians as reg
    from shapeflow.solvers.normal import _fused
    from shapeflow.solvers.normal.grid import grid_normal_operator

    monkeypatch.setattr(reg, "SLAB_ELEMENTS", slab)
    if path == "torch":
        monkeypatch.setattr(_fused, "available", lambda u, jac: False)
    elif _fused._kernel() is None:
        pytest.skip("numba is not installed")
    else:
        monkeypatch.setattr(_fused, "normal_matvec", _counting(_fused.normal_matvec))
    g = torch.Generator().manual_seed(3)
    jac = torch.randn(jac_shape, dtype=torch.float64, generator=g)
    op = grid_normal_operator(jac, lam=0.7, spacing=spacing, damping=0.05)
    A = assembled_normal_matrix(jac, 0.7, spacing, 0.05)
    n = A.shape[0]
    v = torch.randn(n, dtype=torch.float64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(op(v), A @ v)
        torch.testing.assert_close(op(v.reshape(jac_shape[1:])), (A @ v).reshape(jac_shape[1:]))
        Av, dot = op.apply_dot(v)
        torch.testing.assert_close(Av, A @ v)
        torch.testing.assert_close(dot, v @ A @ v)
        buf = torch.full((n,), float("nan"), dtype=torch.float64)  # written into, all of it
        Av2, dot2 = op.apply_dot(v, out=buf)
        assert Av2.data_ptr() == buf.data_ptr()
        torch.testing.assert_close(buf, A @ v)
        torch.testing.assert_close(dot2, v @ A @ v)
        torch.testing.assert_close(op(v, out=torch.empty(n, dtype=torch.float64)), A @ v)
        with pytest.raises(ShapeflowError, match="out must be"):
            op(v, out=torch.empty(n + 1, dtype=torch.float64))
        V = torch.randn(n, 2, dtype=torch.float64, generator=g)
        torch.testing.assert_close(op(V), A @ V)
    torch.testing.assert_close(op.diagonal(), A.diagonal())
    # float32 fast path to float tolerance
    op32 = grid_normal_operator(jac.float(), lam=0.7, spacing=spacing, damping=0.05)
    with torch.no_grad():
        torch.testing.assert_close(op32(v.float()), (A @ v).float(), rtol=1e-5, atol=1e-5)
    if path == "numba":
        assert _fused.normal_matvec.calls > 0  # the kernel, not the fallback, was checked


def _counting(fn):
    def wrapped(*args, **kwargs):
        wrapped.calls += 1
        return fn(*args, **kwargs)

    wrapped.calls = 0
    return wrapped


def test_grid_normal_operator_is_differentiable_and_checked():
    from shapeflow.solvers.normal.grid import grid_normal_operator

    jac = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda J, x: grid_normal_operator(J, lam=0.5, spacing=(1.0, 2.0), damping=0.1)(x), (jac, v)
    )
    with pytest.raises(ShapeflowError, match=r"grid_normal_operator\(\): jac"):
        grid_normal_operator(torch.zeros(3, 4, 4), lam=1.0)
    with pytest.raises(ShapeflowError, match="lam and damping"):
        grid_normal_operator(torch.zeros(1, 2, 4, 4), lam=-1.0)


def test_cg_with_the_grid_normal_operator_and_its_jacobi():
    from shapeflow.solvers.normal.grid import grid_normal_operator

    g = torch.Generator().manual_seed(4)
    jac = torch.randn(1, 3, 6, 5, 4, dtype=torch.float64, generator=g)
    op = grid_normal_operator(jac, lam=2.0, damping=0.01)
    A = assembled_normal_matrix(jac, 2.0, None, 0.01)
    b = torch.randn(A.shape[0], dtype=torch.float64, generator=g)
    with torch.no_grad():
        x, info = conjugate_gradient(op, b, M="jacobi", tol=1e-10)  # fused apply_dot path
        x_ref, info_ref = conjugate_gradient(A, b, M="jacobi", tol=1e-10)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-8)
    assert info.converged and int(info.iterations) == int(info_ref.iterations)
    # with autograd on, the unrolled loop goes through the differentiable operator path
    bb = b.clone().requires_grad_()
    x_g, _ = conjugate_gradient(op, bb, M="jacobi", tol=1e-10)
    torch.testing.assert_close(x_g.detach(), x, rtol=1e-8, atol=1e-8)
    x_g.sum().backward()
    torch.testing.assert_close(bb.grad, torch.linalg.solve(A, torch.ones_like(b)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("M", [None, "jacobi", "callable"])
@pytest.mark.parametrize("k", [None, 3])
def test_chunked_inplace_loop_matches_one_chunk(monkeypatch, M, k):
    A = spd(45, density=0.1)
    b = torch.randn((45,) if k is None else (45, k), dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    prec = (lambda r: r / A.diagonal().reshape(-1, *([1] * (r.dim() - 1)))) if M == "callable" else M
    with torch.no_grad():
        monkeypatch.setattr(cgmod, "CHUNK_ELEMENTS", 1 << 30)
        x1, i1 = conjugate_gradient(A, b, M=prec, tol=1e-10)
        monkeypatch.setattr(cgmod, "CHUNK_ELEMENTS", 7)  # uneven chunks of 7 (vector) or 2 rows
        x2, i2 = conjugate_gradient(A, b, M=prec, tol=1e-10)
    torch.testing.assert_close(x2, x1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x1, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-8)
    assert torch.equal(i1.iterations, i2.iterations) and i1.converged and i2.converged


def test_a_non_finite_right_hand_side_gives_nan_not_zero():
    """A NaN column of B (e.g. a NaN upstream gradient in an adjoint solve) must come out NaN,
    not as the untouched initial guess 0 (which hid a diverged training loss as a zero gradient)."""
    from shapeflow.solvers import conjugate_gradient

    A = torch.diag(torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    B = torch.ones(4, 2, dtype=torch.float64)
    B[1, 1] = float("nan")
    X, _ = conjugate_gradient(lambda v: A @ v, B)
    torch.testing.assert_close(X[:, 0], 1 / torch.diagonal(A))
    assert torch.isnan(X[:, 1]).all()
