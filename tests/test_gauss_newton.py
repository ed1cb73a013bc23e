"""gauss_newton on least-squares problems with known minima and against SciPy."""

import numpy as np
import pytest
import torch

from shapeflow.errors import ShapeflowError
from shapeflow.regularizers import grid_laplacian
from shapeflow.solvers import gauss_newton

D = torch.float64


def rosenbrock(x):
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


@pytest.mark.parametrize("jacobian", ["dense", "matrix_free"])
def test_rosenbrock_minimum(jacobian):
    res = gauss_newton(rosenbrock, torch.tensor([-1.2, 1.0], dtype=D), jacobian=jacobian)
    torch.testing.assert_close(res.x, torch.ones(2, dtype=D), rtol=0, atol=1e-8)
    assert res.converged and res.cost < 1e-16
    assert all(b <= a for a, b in zip(res.history, res.history[1:]))  # monotone (line search)
    assert len(res.history) == res.iterations + 1 or res.converged


def curve_problem(noise):
    t = torch.linspace(0, 1, 40, dtype=D)
    g = torch.Generator().manual_seed(0)
    y = 2.0 * torch.exp(-1.3 * t) + 0.5 + noise * torch.randn(40, dtype=D, generator=g)
    return lambda p: p[0] * torch.exp(p[1] * t) + p[2] - y


def test_exponential_fit_recovers_parameters_without_noise():
    res = gauss_newton(curve_problem(0.0), torch.tensor([1.0, 0.0, 0.0], dtype=D))
    torch.testing.assert_close(res.x, torch.tensor([2.0, -1.3, 0.5], dtype=D), rtol=0, atol=1e-8)


@pytest.mark.parametrize("jacobian", ["dense", "matrix_free"])
def test_exponential_fit_matches_scipy_least_squares(jacobian):
    # What defines the answer is the minimiser, not SciPy's stopping rule at the 7th digit: at ours
    # the gradient J^T r vanishes, its cost is within 1e-12 (relative) of a tightly converged
    # reference, and the parameters agree within what the conditioning of J^T J allows.
    from scipy.optimize import least_squares

    r = curve_problem(0.05)
    res = gauss_newton(r, torch.tensor([1.0, 0.0, 0.0], dtype=D), jacobian=jacobian)
    ref = least_squares(lambda p: r(torch.tensor(p)).numpy(), [1.0, 0.0, 0.0], xtol=1e-15, ftol=1e-15, gtol=1e-15)
    J = torch.func.jacfwd(r)(res.x)                                  # (40, 3)
    gradient = J.T @ r(res.x)
    assert float(gradient.norm()) <= 1e-9 * float(J.norm() * r(res.x).norm() + 1)
    assert abs(res.cost - ref.cost) <= 1e-12 * ref.cost
    # |dx| <~ cond(J^T J) * sqrt(|d cost| / cost) * |x|: the cost agrees to ~1e-12 (rounding), so the
    # parameters may differ by sqrt(1e-12) times the condition number of J (not of J^T J)
    singular = torch.linalg.svdvals(J)
    allowed = float(singular[0] / singular[-1]) * 1e-6 * float(res.x.norm())
    assert float(np.abs(res.x.numpy() - ref.x).max()) <= allowed
    # and the tolerance is not vacuous: it is far below the parameters' own size
    assert allowed < 1e-2 * float(res.x.norm())


def test_regularised_linear_problem_matches_closed_form():
    # r(u) = u - y on a 2D grid field (2, 6, 5), regulariser lam * L (diffusion): the minimiser is
    # (I + lam L)^{-1} y per component; matrix-free path with a sparse L over the flattened field
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 6, 5, dtype=D, generator=g)
    L = grid_laplacian((6, 5), components=2, dtype=D)
    lam = 0.7
    res = gauss_newton(lambda u: u - y, torch.zeros_like(y), (L, lam), jacobian="matrix_free", damping=1e-6)
    ref = torch.linalg.solve(torch.eye(60, dtype=D) + lam * L.to_dense(), y.reshape(-1)).reshape(y.shape)
    torch.testing.assert_close(res.x, ref, rtol=1e-7, atol=1e-8)
    # the dense path with a callable regulariser gives the same
    res2 = gauss_newton(lambda u: u - y, torch.zeros_like(y), (lambda v: L @ v, lam), jacobian="dense")
    torch.testing.assert_close(res2.x, ref, rtol=1e-7, atol=1e-8)


def test_gauss_newton_validation():
    with pytest.raises(ShapeflowError, match=r"gauss_newton\(\): unknown jacobian 'bfgs'; valid names"):
        gauss_newton(rosenbrock, torch.zeros(2, dtype=D), jacobian="bfgs")
    with pytest.raises(ShapeflowError, match=r"regulariser L has shape \(3, 3\), expected \(2, 2\)"):
        gauss_newton(rosenbrock, torch.zeros(2, dtype=D), (torch.eye(3, dtype=D), 1.0))
