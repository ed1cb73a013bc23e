"""shapeflow.kernels: KeOps against dense torch (values and gradients), the one backend rule,
silent KeOps, Sinkhorn and nearest neighbours through the same rule."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from shapeflow.errors import ShapeflowError
from shapeflow.kernels import (KEOPS_MIN_PAIRS, gaussian_kernel_product, nearest_neighbors, resolve_backend,
                               sinkhorn_backend)
from shapeflow.kernels import backends


def _clouds(dtype, n=120, m=90, d=3, k=2):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
            for shape in [(n, d), (m, d), (m, k)]]


@pytest.mark.keops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keops_matches_dense_in_values_and_gradients(dtype):
    x, y, b = _clouds(dtype)
    results = {}
    for backend in ("torch", "keops"):
        out = gaussian_kernel_product(x, y, b, 0.8, backend=backend)
        weights = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
        results[backend] = (out, *torch.autograd.grad((out * weights).sum(), (x, y, b)))
    for name, dense, keops in zip(["value", "d/dx", "d/dy", "d/db"], results["torch"], results["keops"]):
        assert keops.dtype == dtype and keops.shape == dense.shape, name
        error = (keops - dense).norm() / dense.norm()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"


def test_auto_picks_keops_above_the_threshold_or_on_cuda():
    assert resolve_backend("auto", 10, 10, "cpu") == "torch"
    assert resolve_backend("auto", 10, 10, "cuda") == "keops"
    n = math.isqrt(KEOPS_MIN_PAIRS) + 1
    assert resolve_backend("auto", n, n, "cpu") == "keops"
    assert resolve_backend("keops", 10, 10, "cpu") == "keops"
    assert resolve_backend("torch", 10**6, 10**6, "cuda") == "torch"
    # nearest neighbours: the KD-tree stays on the CPU at any size
    assert resolve_backend("auto", 10**6, 10**6, "cpu", keops_min_pairs=math.inf) == "torch"


def test_auto_follows_the_measured_threshold_through_monkeypatch(monkeypatch):
    """The functions read the threshold at call time, so patching the constant moves the rule."""
    monkeypatch.setattr(backends, "KEOPS_MIN_PAIRS", 99)
    assert resolve_backend("auto", 10, 10, "cpu") == "keops"
    assert resolve_backend("auto", 9, 11, "cpu") == "torch"
    assert sinkhorn_backend("auto", 10, 10, 3, "cpu") == "online"
    assert sinkhorn_backend("auto", 9, 11, 3, "cpu") == "dense"
    monkeypatch.setattr(backends, "MULTISCALE_MIN_PAIRS", 99)
    assert sinkhorn_backend("auto", 10, 10, 3, "cpu") == "multiscale"
    assert sinkhorn_backend("auto", 10, 10, 4, "cpu") == "online"
    assert sinkhorn_backend("tensorized", 10**5, 10**5, 3, "cuda") == "tensorized"


def test_unknown_backend_and_bad_inputs_are_errors_naming_the_argument():
    x, y, b = (t.detach() for t in _clouds(torch.float32))
    with pytest.raises(ShapeflowError, match=r"gaussian_kernel_product\(\): unknown backend 'cuda'; "
                                             r"choose from auto, keops, torch"):
        gaussian_kernel_product(x, y, b, 1.0, backend="cuda")
    with pytest.raises(ShapeflowError, match="sigma must be > 0"):
        gaussian_kernel_product(x, y, b, 0.0)
    with pytest.raises(ShapeflowError, match=r"expected x \(N, d\), y \(M, d\), b \(M, k\)"):
        gaussian_kernel_product(x, y[:, :2], b, 1.0)
    with pytest.raises(ShapeflowError, match=r"nearest_neighbors\(\): unknown backend 'kdtree'"):
        nearest_neighbors(x, y, backend="kdtree")
    with pytest.raises(ShapeflowError, match=r"unknown Sinkhorn backend 'keops'; choose from auto, dense, tensorized"):
        sinkhorn_backend("keops", 10, 10, 3, "cpu")


@pytest.mark.keops
def test_import_loads_no_keops_and_a_first_keops_call_prints_nothing(tmp_path):
    """A fresh cache folder forces a compilation: still nothing on stdout or stderr."""
    code = ("import sys, torch, shapeflow\n"
            "from shapeflow.kernels import gaussian_kernel_product\n"
            "assert 'pykeops' not in sys.modules\n"
            "x = torch.randn(5, 2)\n"
            "gaussian_kernel_product(x, x, x[:, :1], 1.0, backend='keops')\n"
            "assert 'pykeops' in sys.modules\n")
    env = {**__import__("os").environ, "KEOPS_CACHE_FOLDER": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""


@pytest.mark.keops
def test_keops_argmin_matches_the_kd_tree():
    g = torch.Generator().manual_seed(2)
    queries, points = torch.randn(300, 3, generator=g), torch.randn(400, 3, generator=g)
    assert torch.equal(nearest_neighbors(queries, points, backend="keops"),
                       nearest_neighbors(queries, points, backend="torch"))


@pytest.mark.keops
def test_sinkhorn_on_a_large_cloud_goes_to_keops_and_keops_equals_tensorized(monkeypatch):
    from shapeflow.losses import sinkhorn_loss

    assert sinkhorn_backend("auto", 20000, 20000, 3, "cpu") == "multiscale"
    n = math.isqrt(KEOPS_MIN_PAIRS) + 1
    assert sinkhorn_backend("auto", n, n, 4, "cpu") == "online"            # multiscale is for d <= 3
    assert sinkhorn_backend("auto", n - 2, n - 2, 3, "cpu") == "dense"
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(400, 3, generator=g, dtype=torch.float64), torch.rand(300, 3, generator=g, dtype=torch.float64)
    dense = sinkhorn_loss(x, y, blur=0.05, backend="tensorized")
    monkeypatch.setattr(backends, "KEOPS_MIN_PAIRS", 1000)          # "auto" now takes KeOps at this size
    assert sinkhorn_backend("auto", 400, 300, 3, "cpu") == "online"
    keops = sinkhorn_loss(x, y, blur=0.05)
    assert abs(float(keops) - float(dense)) <= 1e-6 * abs(float(dense))


# --------------------------------------------------------------- exp without the underflow slow path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_exp_equals_torch_exp_and_flushes_only_what_underflows(dtype):
    """`fast_exp` is `torch.exp` bit for bit where the result is above 5 * tiny, and exactly 0 below."""
    from shapeflow.kernels import fast_exp
    from shapeflow.kernels.exp import exp_floor
    floor = exp_floor(dtype)
    z = torch.linspace(3 * floor, 5.0, 20001, dtype=dtype)
    ours, reference = fast_exp(z), torch.exp(z)
    kept = reference > 5 * torch.finfo(dtype).tiny
    assert torch.equal(ours[kept], reference[kept])
    assert (ours[~kept] == 0).all() and (~kept).sum() > 1000      # the range really crosses the floor
    assert float((ours - reference).abs().max()) <= 5 * torch.finfo(dtype).tiny


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_logsumexp_matches_torch_on_rows_that_underflow(dtype):
    """Rows spanning thousands (most terms underflow), ordinary rows, a row of -inf, and rows with
    some -inf entries: as torch.logsumexp to rounding."""
    from shapeflow.kernels import fast_logsumexp
    g = torch.Generator().manual_seed(0)
    z = torch.cat([-torch.rand(4, 300, generator=g, dtype=dtype) * 5000,
                   torch.randn(4, 300, generator=g, dtype=dtype),
                   torch.full((1, 300), -math.inf, dtype=dtype)])
    z[5, ::3] = -math.inf
    for dim in (0, 1):
        ours, reference = fast_logsumexp(z, dim), torch.logsumexp(z, dim)
        finite = torch.isfinite(reference)
        assert torch.equal(torch.isfinite(ours), finite) and (ours[~finite] == -math.inf).all()
        tolerance = 50 * torch.finfo(dtype).eps
        assert torch.allclose(ours[finite], reference[finite], rtol=tolerance, atol=tolerance)


def test_fast_exp_and_logsumexp_gradients_pass_gradcheck():
    from shapeflow.kernels import fast_exp, fast_logsumexp
    z = (torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 40).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fast_logsumexp(t, 1), (z,))
    assert torch.autograd.gradcheck(lambda t: fast_exp(t / 20), (z,))
    # where the result is flushed, the gradient is 0 (the true one is below 5 * tiny)
    deep = torch.tensor([-800.0, -1.0], dtype=torch.float64, requires_grad=True)
    fast_exp(deep).sum().backward()
    assert deep.grad.tolist() == [0.0, math.exp(-1.0)]


# ------------------------------------------------------------------ nearest neighbours: dense and KD-tree
@pytest.mark.parametrize("sizes", [(91, 91), (60, 200), (300, 400)], ids=["dense", "dense-unequal", "kd-tree"])
def test_nearest_neighbours_and_distances_match_scipy_on_both_engines(sizes):
    """Up to DENSE_PAIRS pairs an exact dense argmin, above a KD-tree: both equal SciPy's cKDTree
    (a brute-force reference on float64 points)."""
    from scipy.spatial import cKDTree
    from shapeflow.kernels import nearest_distances
    from shapeflow.kernels.neighbors import DENSE_PAIRS
    g = torch.Generator().manual_seed(4)
    queries, points = torch.randn(sizes[0], 3, generator=g), torch.randn(sizes[1], 3, generator=g)
    assert (sizes[0] * sizes[1] <= DENSE_PAIRS) == (sizes != (300, 400))
    distance, index = cKDTree(points.double().numpy()).query(queries.double().numpy())
    assert torch.equal(nearest_neighbors(queries, points, backend="torch"), torch.as_tensor(index))
    torch.testing.assert_close(nearest_distances(queries, points), torch.as_tensor(distance), rtol=1e-12, atol=1e-12)


def test_a_small_registration_imports_no_scipy_spatial():
    """The fish-sized first call never pays SciPy's KD-tree import (0.14-0.27 s of a whole process)."""
    code = ("import sys, numpy as np, shapeflow as sf\n"
            "t = np.linspace(0, 2 * np.pi, 60, endpoint=False)\n"
            "x = np.stack([np.cos(t), 0.6 * np.sin(t)], 1)\n"
            "sf.register(x, 1.1 * x + 0.05, iterations=5, progress=False)\n"
            "print('scipy.spatial' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_fast_logsumexp_with_finite_rows_is_the_same_on_finite_rows():
    from shapeflow.kernels import fast_logsumexp
    z = -torch.rand(7, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 3000
    torch.testing.assert_close(fast_logsumexp(z, 1, finite_rows=True), torch.logsumexp(z, 1), rtol=1e-13, atol=1e-13)
