"""Image registration: the local NCC Gauss-Newton data term and the AMG inner solver."""
import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

import shapeflow as sf
from shapeflow.errors import ShapeflowError
from shapeflow.grids import Grid, sample, spatial_gradient
from shapeflow.losses import RESIDUALS, local_normalise
from shapeflow.solvers import gauss_newton_step
from shapeflow.solvers import assemble_grid_normal_matrix, grid_normal_operator
from shapeflow.synthetic import phantom_pair, smooth_field
from test_register_images import endpoint_error  # mean |psi(x) - truth(x)| (mm), and for psi = id


def biased_pair(shape=(64, 64), amplitude=4.0, bias=0.4, seed=2):
    """A phantom pair (known field) whose moving image also has a smooth multiplicative bias field
    (exp(bias * smooth), here 0.67 to 1.5) and a contrast change and offset: 0.3 + 0.6 * I * b."""
    moving, fixed, truth = phantom_pair(shape, spacing=1.5, amplitude=amplitude, seed=seed)
    points = Grid.of(moving).points()
    extent = float(points.reshape(-1, len(shape)).max(0).values.norm())
    b = torch.exp(bias * smooth_field(points, 1.0, 0.9 * extent, seed=11)[0].float())
    return moving.with_data(0.3 + 0.6 * moving.data * b), fixed, truth


# ----------------------------------------------------------------------------- NCC


@pytest.mark.parametrize("shape, radius", [((2, 9, 11), 1), ((1, 5, 6, 7), 2), ((1, 4, 5), 3)])
def test_local_normalise_matches_scipy_uniform_filter(shape, radius):
    """N(I) = (I - mean_w) / sqrt(var_w + eps var(I)), windows cut at the border, against SciPy."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(shape, dtype=torch.float64, generator=g) * 3 + 2
    eps = 0.05
    out = local_normalise(image, radius, eps)
    size = 2 * radius + 1
    for c, channel in enumerate(image.numpy()):
        inside = ndimage.uniform_filter(np.ones_like(channel), size, mode="constant")   # share of the box inside
        mean = ndimage.uniform_filter(channel, size, mode="constant") / inside
        mean_sq = ndimage.uniform_filter(channel**2, size, mode="constant") / inside
        expected = (channel - mean) / np.sqrt(mean_sq - mean**2 + eps * channel.var())
        np.testing.assert_allclose(out[c].numpy(), expected, rtol=1e-9, atol=1e-9)
    # invariant to a contrast change and offset, so a biased image normalises like the unbiased one
    torch.testing.assert_close(local_normalise(0.2 * image - 7.0, radius, eps), out)
    # the registration's residual map: N scaled by the fixed image's standard deviation per channel
    fixed = torch.rand(shape, dtype=torch.float64, generator=g)
    term = RESIDUALS["ncc"](RESIDUALS["ncc"].Options(ncc_radius=radius, ncc_eps=eps))
    residual = term.after_warp(fixed)
    std = torch.tensor([float(np.std(f, ddof=1)) for f in fixed.numpy()], dtype=torch.float64)
    torch.testing.assert_close(residual(image), std.view(-1, *[1] * (image.dim() - 1)) * out)


def test_ncc_recovers_a_field_under_a_bias_field_and_contrast_change_where_ssd_fails():
    moving, fixed, truth = biased_pair()
    ncc = sf.register(moving, fixed, loss="ncc", progress=False)
    ssd = sf.register(moving, fixed, loss="ssd", progress=False)
    error, before = endpoint_error(ncc, truth, fixed)
    error_ssd, _ = endpoint_error(ssd, truth, fixed)
    # measured: ncc 0.35 mm, ssd 3.35 mm (worse than not moving: the bias field pulls it off), before 1.57 mm
    assert error < 0.5 and error < 0.3 * before, (error, before)           # 0.5 mm = a third of a voxel
    assert error_ssd > 3 * error and error_ssd > 1.0, (error_ssd, error)
    m = ncc.metrics
    assert m["ncc_after"] > m["ncc_before"] + 0.03 and m["ncc_after"] > 0.97, m   # measured 0.929 -> 0.984
    assert m["jacobian_percent_negative"] == 0.0
    steps = [r for r in ncc.history if r["phase"] == "gauss-newton"]
    assert all(0 < r["ncc"] <= 1 for r in steps) and steps[-1]["ncc"] > m["ncc_before"]
    assert "ncc" not in ssd.metrics and "ncc_after" not in ssd.metrics


def test_ncc_options_and_errors():
    moving, fixed, _ = phantom_pair((20, 20), amplitude=1.0, seed=1)
    with pytest.raises(ShapeflowError, match="unknown image loss 'cc'; choose from ssd, ncc, mind"):
        sf.register(moving, fixed, loss="cc", progress=False)
    for bad in (0, 1.5, True):
        with pytest.raises(ShapeflowError, match=r"register\(\): ncc_radius must be an int >= 1"):
            sf.register(moving, fixed, loss="ncc", ncc_radius=bad, progress=False)
    with pytest.raises(ShapeflowError, match=r"ncc_eps must be a number > 0"):
        sf.register(moving, fixed, loss="ncc", ncc_eps=0.0, progress=False)
    two = moving.with_data(moving.data.repeat(2, 1, 1))
    with pytest.raises(ShapeflowError, match="loss='ncc' needs the same"):
        sf.register(two, fixed, loss="ncc", progress=False)
    # an affine pre-alignment stays least squares on the intensities; the flow after it uses NCC
    moving, fixed, _ = biased_pair((32, 32), amplitude=2.0)
    result = sf.register(moving, fixed, loss="ncc", prealign="affine", ncc_radius=3, progress=False)
    assert result.metrics["ncc_after"] > result.metrics["ncc_before"] + 0.02
    assert result.options["ncc_radius"] == 3


# ----------------------------------------------------------------------------- the assembled matrix


def dense_normal_matrix(jac, lam, spacing, damping):
    """Dense `J^T J + damping I + lam kron(I_C, L)`, L built independently as a Kronecker sum of
    1D Neumann second differences (1 / h^2) [[1, -1], [-1, 2, -1], ..., [-1, 1]]."""
    K, C, *S = jac.shape
    N = math.prod(S)
    L = torch.zeros(N, N, dtype=jac.dtype)
    for axis, (n, h) in enumerate(zip(S, spacing)):
        D = torch.zeros(n, n, dtype=jac.dtype)
        for i in range(n - 1):                                   # one edge (i, i + 1) of the path
            D[i, i] += 1
            D[i + 1, i + 1] += 1
            D[i, i + 1] -= 1
            D[i + 1, i] -= 1
        term = torch.ones(1, 1, dtype=jac.dtype)
        for other, m in enumerate(S):
            term = torch.kron(term, D / h**2 if other == axis else torch.eye(m, dtype=jac.dtype))
        L += term
    A = torch.kron(torch.eye(C, dtype=jac.dtype), lam * L) + damping * torch.eye(C * N, dtype=jac.dtype)
    flat = jac.reshape(K, C, N)
    for v in range(N):                                           # the C x C block of voxel v
        block = flat[:, :, v].T @ flat[:, :, v]
        for c in range(C):
            for e in range(C):
                A[c * N + v, e * N + v] += block[c, e]
    return A


@pytest.mark.parametrize("jac_shape, spacing", [
    ((1, 2, 5, 4), (1.0, 2.5)),
    ((2, 3, 4, 3), (0.7, 1.3)),
    ((1, 3, 3, 4, 5), (0.5, 1.0, 2.0)),
    ((2, 2, 4, 1, 3), (1.5, 1.0, 0.8)),
])
def test_assembled_normal_matrix_equals_the_dense_reference_and_the_operator(jac_shape, spacing):
    g = torch.Generator().manual_seed(7)
    jac = torch.randn(jac_shape, dtype=torch.float64, generator=g)
    A = assemble_grid_normal_matrix(jac, lam=0.6, spacing=spacing, damping=0.05)
    assert A.layout == torch.sparse_csr and A.dtype == torch.float64
    reference = dense_normal_matrix(jac, 0.6, spacing, 0.05)
    torch.testing.assert_close(A.to_dense(), reference, rtol=1e-12, atol=1e-12)
    op = grid_normal_operator(jac, lam=0.6, spacing=spacing, damping=0.05)
    V = torch.randn(A.shape[0], 3, dtype=torch.float64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(A @ V, op(V))
    torch.testing.assert_close(op.diagonal(), reference.diagonal())
    # float32 in, float32 out; lam = 0 leaves only the blocks
    A32 = assemble_grid_normal_matrix(jac.float(), lam=0.0, spacing=spacing)
    torch.testing.assert_close(A32.to_dense(), dense_normal_matrix(jac, 0.0, spacing, 0.0).float())


def test_assemble_grid_normal_matrix_checks_its_input():
    with pytest.raises(ShapeflowError, match=r"assemble_grid_normal_matrix\(\): jac must be \(K, C, \*S\)"):
        assemble_grid_normal_matrix(torch.zeros(2, 4, 4), lam=1.0)
    with pytest.raises(ShapeflowError, match="lam and damping must be >= 0"):
        assemble_grid_normal_matrix(torch.zeros(1, 2, 4, 4), lam=1.0, damping=-1.0)
    with pytest.raises(ShapeflowError, match="spacing must be 2 positive numbers"):
        assemble_grid_normal_matrix(torch.zeros(1, 2, 4, 4), lam=1.0, spacing=(1.0, 0.0))


# ----------------------------------------------------------------------------- AMG inside Gauss-Newton


def _step_inputs(dtype=torch.float64):
    moving, fixed, _ = phantom_pair((24, 20), spacing=[1.0, 1.5], amplitude=2.0, seed=8)
    grid = Grid.of(fixed)
    m, f = moving.data.to(dtype), fixed.data.to(dtype)
    warped = sample(m, grid, grid.points(dtype))
    gradient = (spatial_gradient(warped, grid) + spatial_gradient(f, grid)) / 2
    u = 0.1 * torch.randn(2, *grid.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return warped - f, gradient, u, grid


def test_amg_step_gives_the_cg_step():
    pytest.importorskip("pyamg")
    residual, gradient, u, grid = _step_inputs()
    lam = 0.01
    cg, info_cg = gauss_newton_step(residual, gradient, u, grid, lam, cg_iterations=5000, cg_tol=1e-11)
    amg, info = gauss_newton_step(residual, gradient, u, grid, lam, cg_iterations=200, cg_tol=1e-11, solver="amg")
    assert info.backend == "amg" and info.converged and info_cg.converged
    assert int(info.iterations) < int(info_cg.iterations) // 3          # the multigrid pays off
    torch.testing.assert_close(amg, cg, rtol=1e-7, atol=1e-8 * float(cg.abs().max()))
    # and both solve the equations of the module docstring, (g g^T + lam L) du = -r g - lam L u (C = 1), densely
    spacing = grid.spacing.tolist()
    laplacian = dense_normal_matrix(torch.zeros_like(gradient), 1.0, spacing, 0.0)        # kron(I_2, L)
    rhs = -(residual[:, None] * gradient).sum(0).reshape(-1) - lam * laplacian @ u.reshape(-1)
    A = dense_normal_matrix(gradient, lam, spacing, 0.0)
    torch.testing.assert_close(amg.reshape(-1), torch.linalg.solve(A, rhs), rtol=1e-6, atol=1e-8)
    # float32 at the registration's tolerance: the same step to that tolerance
    r32, g32, u32 = residual.float(), gradient.float(), u.float()
    a32, info32 = gauss_newton_step(r32, g32, u32, grid, lam, cg_iterations=60, cg_tol=1e-4, solver="amg")
    assert info32.converged and a32.dtype == torch.float32
    assert float((a32.double() - cg).norm() / cg.norm()) < 1e-3


def test_amg_registration_recovers_the_known_field():
    pytest.importorskip("pyamg")
    moving, fixed, truth = phantom_pair((48, 48), spacing=1.5, amplitude=3.0, seed=2)
    amg = sf.register(moving, fixed, solver="amg", progress=False)
    cg = sf.register(moving, fixed, solver="cg", progress=False)
    error, before = endpoint_error(amg, truth, fixed)
    error_cg, _ = endpoint_error(cg, truth, fixed)
    assert error < 0.45 and error < 0.25 * before, (error, before)
    assert abs(error - error_cg) < 0.1, (error, error_cg)
    assert amg.options["solver"] == "amg" and amg.metrics["jacobian_percent_negative"] == 0.0
    # the two losses and the two solvers combine
    ncc = sf.register(*biased_pair((48, 48), amplitude=3.0)[:2], loss="ncc", solver="amg", progress=False)
    assert ncc.metrics["ncc_after"] > ncc.metrics["ncc_before"] + 0.02


def test_solver_option_errors(monkeypatch):
    moving, fixed, _ = phantom_pair((20, 20), amplitude=1.0, seed=1)
    with pytest.raises(ShapeflowError, match="unknown image solver 'multigrid'; choose from cg, amg"):
        sf.register(moving, fixed, solver="multigrid", progress=False)
    with pytest.raises(ShapeflowError, match=r"solver='amg' needs stride=1"):
        sf.register(moving, fixed, solver="amg", stride=4, progress=False)
    residual, gradient, u, grid = _step_inputs()
    with pytest.raises(ShapeflowError, match=r"gauss_newton_step\(\): unknown solver 'lu'; choose from cg, amg"):
        gauss_newton_step(residual, gradient, u, grid, 0.01, solver="lu")
    import shapeflow._optional as optional

    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(optional.importlib, "import_module", missing)
    with pytest.raises(ImportError, match=r"solver='amg' needs pyamg.*pip install \"shapeflow\[amg\]\""):
        sf.register(moving, fixed, solver="amg", progress=False)


def test_amg_refuses_cuda_tensors():
    """pyamg is CPU only: CUDA tensors (or device='cuda') are a one-line error, not a silent copy."""
    residual, gradient, u, grid = _step_inputs(torch.float32)
    if torch.cuda.is_available():
        residual, gradient, u = residual.cuda(), gradient.cuda(), u.cuda()
        with pytest.raises(ShapeflowError, match="solver='amg' runs on the CPU"):
            gauss_newton_step(residual, gradient, u, grid, 0.01, solver="amg")
        moving, fixed, _ = phantom_pair((20, 20), amplitude=1.0, seed=1)
        with pytest.raises(ShapeflowError, match="solver='amg' runs on the CPU"):
            sf.register(moving, fixed, solver="amg", device="cuda", progress=False)
    else:  # the check itself, on the solver registry's entry (no CUDA device here)
        from shapeflow.solvers import GRID_SOLVERS

        meta = torch.zeros(4, device="meta")
        with pytest.raises(ShapeflowError, match="solver='amg' runs on the CPU"):
            GRID_SOLVERS["amg"](gradient, meta, 0.01, grid.spacing.tolist(), 0.0, 1e-3, 10)


def test_cli_passes_loss_ncc_and_solver_amg(tmp_path):
    pytest.importorskip("pyamg")
    from shapeflow_cli.main import app
    from typer.testing import CliRunner

    moving, fixed, _ = biased_pair((32, 32), amplitude=2.0)
    sf.write(moving, tmp_path / "m.nii.gz")
    sf.write(fixed, tmp_path / "f.nii.gz")
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", str(tmp_path / "m.nii.gz"), str(tmp_path / "f.nii.gz"), "-o", str(out),
                                   "--loss", "ncc", "--solver", "amg", "-q"])
    assert run.exit_code == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["loss"] == "ncc" and report["options"]["solver"] == "amg"
    assert report["metrics"]["ncc_after"] > report["metrics"]["ncc_before"]
    run = CliRunner().invoke(app, ["register", str(tmp_path / "m.nii.gz"), str(tmp_path / "f.nii.gz"), "-o",
                                   str(tmp_path / "bad"), "--solver", "gmres", "-q"])
    assert run.exit_code == 2 and "choose from cg, amg" in run.stderr, run.stderr
