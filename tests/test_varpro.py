"""Variable projection (shapeflow/solvers/varpro.py) and super-resolution (shapeflow/superres.py)."""
import pytest
import torch
import torch.nn.functional as F

from shapeflow.errors import ShapeflowError
from shapeflow.solvers import VariableProjection
from shapeflow.superres import SuperResolutionModel, reconstruct

D = torch.float64


def _problem(jacobian="full", **kw):
    g = torch.Generator().manual_seed(0)
    model = SuperResolutionModel(3, (4, 4), 2)
    x = torch.linspace(0, 1, 8, dtype=D)
    X, Y = torch.meshgrid(x, x, indexing="ij")
    f_true = torch.exp(-((X - 0.45) ** 2 + (Y - 0.55) ** 2) / 0.08) + 0.3 * X
    w_true = 0.03 * torch.randn(12, dtype=D, generator=g)
    data = model.predict(w_true, f_true)
    vp = VariableProjection(model.predict, data, (8, 8), regularizer=model.gradient, lam=0.05, jacobian=jacobian,
                            cg_tol=1e-12, **kw)
    return vp, model, f_true, w_true


def test_inner_solve_matches_a_dense_least_squares_solve():
    vp, model, _, w_true = _problem()
    w = 0.5 * w_true
    A = torch.func.jacrev(lambda f: model.predict(w, f).reshape(-1))(torch.zeros(8, 8, dtype=D)).reshape(-1, 64)
    L = torch.func.jacrev(model.gradient)(torch.zeros(8, 8, dtype=D)).reshape(-1, 64)
    dense = torch.linalg.solve(A.T @ A + 0.05 ** 2 * L.T @ L, A.T @ vp.data.reshape(-1))
    torch.testing.assert_close(vp.solve(w, "exact").reshape(-1), dense, atol=1e-9, rtol=0)


def _taylor(vp, w, v, hs):
    r0 = vp.residual(w, vp.solve(w, "exact"))
    Jv = vp.jacobian(w) @ v
    first, second = [], []
    for h in hs:
        rh = vp.residual(w + h * v, vp.solve(w + h * v, "exact"))
        first.append(float((rh - r0).norm()))
        second.append(float((rh - r0 - h * Jv).norm()))
    return first, second


def test_full_jacobian_passes_the_taylor_test_and_none_does_not():
    vp, _, _, w_true = _problem("full")
    w = 0.5 * w_true
    v = torch.randn(12, dtype=D, generator=torch.Generator().manual_seed(5))
    hs = [1e-2 / 2 ** k for k in range(5)]
    first, second = _taylor(vp, w, v, hs)
    ratios1 = [a / b for a, b in zip(first, first[1:])]
    ratios2 = [a / b for a, b in zip(second, second[1:])]
    assert all(1.7 < r < 2.3 for r in ratios1)            # E0 = O(h)
    assert all(3.4 < r < 4.6 for r in ratios2), ratios2   # E1 = O(h^2): the Jacobian is exact
    vp_none, _, _, _ = _problem("none")
    _, second_none = _taylor(vp_none, w, v, hs)
    assert (second_none[-2] / second_none[-1]) < 2.5      # only first order without df/dw


def test_partial_and_inexact_jacobians_approach_the_full_one():
    vp, _, _, w_true = _problem("full")
    w = 0.5 * w_true
    full = vp.jacobian(w)
    errors = {}
    for mode, kw in (("partial", {"p": 1.0}), ("partial", {"p": 0.5}), ("none", {})):
        other, _, _, _ = _problem(mode, **kw)
        errors[(mode, kw.get("p"))] = float((other.jacobian(w) - full).norm() / full.norm())
    assert errors[("partial", 1.0)] < 1e-8                # the whole solve tracked: the full Jacobian
    assert errors[("partial", 0.5)] < errors[("none", None)]
    many, _, _, _ = _problem("inexact", cg_iterations=200)
    assert float((many.jacobian(w) - full).norm() / full.norm()) < 1e-6


def test_reconstruct_recovers_the_maps_and_checks_its_input():
    vp, model, f_true, w_true = _problem()
    views = list(F.avg_pool2d(model.warp(w_true, f_true)[:, None], 2)[:, 0])
    fit = reconstruct(views, 2, lam=0.05, jacobian="full", iterations=4, cg_tol=1e-10)
    assert fit.history[-1] < 0.8 * fit.history[0]
    # the regularised minimum is at least as low as the cost at the true maps (which it need not equal)
    scale = model.h_data[0] ** 0.5 * model.h_data[1] ** 0.5
    truth = VariableProjection(model.predict, torch.stack(views) * scale, (8, 8), regularizer=model.gradient,
                               lam=0.05, cg_tol=1e-10)
    assert fit.history[-1] <= truth.cost(w_true) * (1 + 1e-6)
    assert fit.image.shape == (8, 8) and fit.parameters.shape == (2, 6)
    with pytest.raises(ShapeflowError, match=r"views\[1\] is \(5, 4\) but views\[0\] is \(4, 4\)") as info:
        reconstruct([views[0], torch.zeros(5, 4)], 2)
    assert "\n" not in str(info.value)
    with pytest.raises(ShapeflowError, match="unknown jacobian 'half'"):
        reconstruct(views, 2, jacobian="half")
    with pytest.raises(ShapeflowError, match="factor must be an int >= 1"):
        reconstruct(views, 0)
