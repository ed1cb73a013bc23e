"""implicit_argmin on ridge regression with closed-form derivatives."""

import pytest
import torch

from shapeflow.errors import ShapeflowError
from shapeflow.solvers import implicit_argmin

D = torch.float64


def ridge_data(seed=0, m=20, n=6):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, dtype=D, generator=g)
    y = torch.randn(m, dtype=D, generator=g)
    target = torch.randn(n, dtype=D, generator=g)
    return A, y, target


def f_weights(A, y):
    # theta: per-coordinate ridge weights; x* = (A^T A + diag(theta))^{-1} A^T y
    return lambda x, th: 0.5 * ((A @ x - y) ** 2).sum() + 0.5 * (th * x**2).sum()


def true_grad_weights(A, y, target, theta):
    th = theta.clone().requires_grad_()
    x = torch.linalg.solve(A.T @ A + torch.diag(th), A.T @ y)
    (0.5 * ((x - target) ** 2).sum()).backward()
    return x.detach(), th.grad


def test_ift_matches_closed_form_derivative():
    A, y, target = ridge_data()
    theta0 = torch.linspace(0.5, 2.0, 6, dtype=D)
    theta = theta0.clone().requires_grad_()
    x = implicit_argmin(f_weights(A, y), torch.zeros(6, dtype=D), theta, mode="ift")
    (0.5 * ((x - target) ** 2).sum()).backward()
    x_ref, g_ref = true_grad_weights(A, y, target, theta0)
    torch.testing.assert_close(x.detach(), x_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(theta.grad, g_ref, rtol=1e-6, atol=1e-9)


def test_jfb_is_a_descent_direction_but_not_the_gradient():
    # theta = the data y: f = 1/2 |A x - theta|^2 + lam/2 |x|^2; true dL/dtheta = A H^{-1} g,
    # JFB gives alpha A g; <A g, A H^{-1} g> > 0 since A^T A and H commute.
    A, y, target = ridge_data(1)
    lam = 0.3
    f = lambda x, th: 0.5 * ((A @ x - th) ** 2).sum() + 0.5 * lam * (x**2).sum()  # noqa: E731
    grads = {}
    for mode in ("ift", "jfb"):
        theta = y.clone().requires_grad_()
        x = implicit_argmin(f, torch.zeros(6, dtype=D), theta, mode=mode)
        (0.5 * ((x - target) ** 2).sum()).backward()
        grads[mode] = theta.grad
    th = y.clone().requires_grad_()
    x = torch.linalg.solve(A.T @ A + lam * torch.eye(6, dtype=D), A.T @ th)
    (0.5 * ((x - target) ** 2).sum()).backward()
    torch.testing.assert_close(grads["ift"], th.grad, rtol=1e-6, atol=1e-9)
    cos = torch.dot(grads["jfb"], th.grad) / (grads["jfb"].norm() * th.grad.norm())
    assert float(cos) > 0.05
    assert float((grads["jfb"] - th.grad).norm() / th.grad.norm()) > 0.1
    # and the JFB formula itself: alpha * A g with g = x* - target
    g = x.detach() - target
    torch.testing.assert_close(grads["jfb"], A @ g, rtol=1e-8, atol=1e-10)


def test_inside_a_network_with_custom_inner_solver():
    A, y, target = ridge_data(2)
    layer = torch.nn.Linear(3, 6).double()
    z = torch.randn(3, dtype=D)

    def lbfgs(f, x0, theta):
        x = x0.clone().requires_grad_()
        opt = torch.optim.LBFGS([x], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            val = f(x, theta)
            val.backward()
            return val

        with torch.enable_grad():
            opt.step(closure)
        return x.detach()

    theta = torch.nn.functional.softplus(layer(z))
    x = implicit_argmin(f_weights(A, y), torch.zeros(6, dtype=D), theta, inner=lbfgs)
    (0.5 * ((x - target) ** 2).sum()).backward()
    got = layer.weight.grad.clone()
    layer.zero_grad()
    theta = torch.nn.functional.softplus(layer(z))
    x_ref = torch.linalg.solve(A.T @ A + torch.diag(theta), A.T @ y)
    (0.5 * ((x_ref - target) ** 2).sum()).backward()
    torch.testing.assert_close(got, layer.weight.grad, rtol=1e-5, atol=1e-8)


def test_implicit_validation():
    with pytest.raises(ShapeflowError, match=r"implicit_argmin\(\): unknown mode 'neumann'; valid names"):
        implicit_argmin(lambda x, t: (x**2).sum(), torch.zeros(2), torch.zeros(1), mode="neumann")
