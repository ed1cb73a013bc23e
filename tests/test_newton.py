"""Exact Newton, trust region, autodiff Hessians, continuation in theta, and the affine optimizers."""
import math

import pytest
import torch
import torch.nn.functional as F

import shapeflow as sf
from shapeflow.errors import ShapeflowError
from shapeflow.grids import Grid, sample
from shapeflow.pipelines.image_affine import AffineSSD
from shapeflow.solvers import (continuation, hessian, minimize_gradient, minimize_newton, theta_derivative,
                               trust_region_step)
from shapeflow.synthetic import phantom_pair

D = torch.float64


def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def test_hessian_modes_match_the_closed_form():
    x = torch.tensor([0.3, -0.7], dtype=D)
    exact = torch.tensor([[2 - 400 * (x[1] - 3 * x[0] ** 2), -400 * x[0]], [-400 * x[0], 200]], dtype=D)
    for mode in ("forward-over-reverse", "reverse-over-reverse", "auto"):
        torch.testing.assert_close(hessian(rosenbrock, x, mode), exact)


def test_grid_sample_blocks_forward_over_reverse_and_auto_falls_back():
    image = torch.randn(1, 1, 6, 6, dtype=D, generator=torch.Generator().manual_seed(0))
    where = torch.tensor([[[[0.1, -0.2], [0.3, 0.25]]]], dtype=D)
    f = lambda w: F.grid_sample(image, where + w, align_corners=True).pow(2).sum()
    w = torch.zeros(2, dtype=D)
    with pytest.raises(NotImplementedError):
        hessian(f, w, "forward-over-reverse")
    torch.testing.assert_close(hessian(f, w, "auto"), torch.autograd.functional.hessian(f, w))


def test_trust_region_step_solves_the_subproblem():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    for H in (torch.diag(torch.tensor([2.0, 1.0, 3.0], dtype=D)), torch.diag(torch.tensor([-1.0, 2.0, 0.5], dtype=D))):
        for radius in (0.1, 1.0, 10.0):
            p = trust_region_step(g, H, radius)
            model = lambda q: float(g @ q + 0.5 * q @ H @ q)
            assert float(p.norm()) <= radius * (1 + 1e-9)
            samples = torch.randn(4000, 3, dtype=D, generator=torch.Generator().manual_seed(1))
            samples = samples / samples.norm(dim=1, keepdim=True) * radius * torch.rand(4000, 1, dtype=D) ** (1 / 3)
            assert model(p) <= min(model(q) for q in samples) + 1e-9     # no sampled point in the ball is lower


def test_newton_and_gradient_descent_minimise_rosenbrock():
    fit = minimize_newton(rosenbrock, torch.tensor([-1.2, 1.0], dtype=D), maxiter=100)
    assert fit.converged and torch.allclose(fit.x, torch.ones(2, dtype=D), atol=1e-8)
    slow = minimize_gradient(lambda x: (x - 3).pow(2).sum() + 0.1 * x.pow(4).sum(), torch.zeros(3, dtype=D))
    grad = torch.func.grad(lambda x: (x - 3).pow(2).sum() + 0.1 * x.pow(4).sum())(slow.x)
    assert float(grad.norm()) < 1e-6


def _affine_pair(n=24):
    grid = Grid((n, n), torch.ones(2, dtype=D), torch.zeros(2, dtype=D), torch.eye(2, dtype=D))
    P = grid.points(D)
    img = lambda P: (torch.exp(-((P[..., 0] - 10) ** 2 / 18 + (P[..., 1] - 12) ** 2 / 30))
                     + 0.6 * torch.exp(-((P[..., 0] - 15) ** 2 / 10 + (P[..., 1] - 8) ** 2 / 8)))
    A = torch.tensor([[1.05, 0.08], [-0.05, 0.97]], dtype=D)
    t = torch.tensor([0.7, -0.5], dtype=D)
    c = P.reshape(-1, 2).mean(0)
    moving = img((P - c - t) @ torch.linalg.inv(A).T + c)[None]       # moving(A (x - c) + c + t) = fixed(x)
    return AffineSSD(moving, grid, img(P)[None], grid), A, t


def test_newton_converges_quadratically_on_a_smooth_affine_problem():
    objective, A, t = _affine_pair()
    fit = minimize_newton(objective.cost, objective.identity(), maxiter=30, gtol=1e-13)
    assert fit.converged
    matrix, shift = objective.matrix_shift(fit.x)
    torch.testing.assert_close(matrix, A, atol=2e-3, rtol=0)
    torch.testing.assert_close(shift, t, atol=2e-2, rtol=0)
    # error to the converged minimiser, per iteration: e_{k+1} <= C e_k^2 once close
    iterates = []
    minimize_newton(objective.cost, objective.identity(), maxiter=30, gtol=1e-13,
                    callback=lambda it, x, f, g: iterates.append(x.clone()))
    errors = [float((x - fit.x).norm()) for x in iterates]
    errors = [e for e in errors if e > 1e-11]
    ratios = [b / a ** 2 for a, b in zip(errors, errors[1:]) if a < 0.05]
    assert len(ratios) >= 2 and max(ratios) < 50, (errors, ratios)
    assert errors[-1] < 1e-3 * errors[-2]                            # superlinear at the end


def test_singular_hessian_without_damping_is_a_one_line_error():
    flat = lambda x: (x[0] + x[1] - 1) ** 2            # H = [[2, 2], [2, 2]]: singular
    with pytest.raises(ShapeflowError, match="Hessian is singular") as info:
        minimize_newton(flat, torch.zeros(2, dtype=D), trust_region=False)
    assert "\n" not in str(info.value)
    fit = minimize_newton(flat, torch.zeros(2, dtype=D), trust_region=False, damping=1e-3)
    assert float(flat(fit.x)) < 1e-10
    fit = minimize_newton(flat, torch.zeros(2, dtype=D))          # the trust region copes as well
    assert float(flat(fit.x)) < 1e-10


def test_predictor_matches_finite_differences_of_solved_minimisers():
    objective, _, _ = _affine_pair(20)
    theta, delta = 2.0, 1e-3
    solve = lambda th, start: minimize_newton(lambda w: objective.cost(w, th), start, maxiter=40, gtol=1e-12).x
    w = solve(theta, objective.identity())
    fd = (solve(theta + delta, w) - solve(theta - delta, w)) / (2 * delta)
    exact = theta_derivative(objective.cost, w, theta, predictor="newton")
    assert float((exact - fd).norm()) < 1e-3 * float(fd.norm()) + 1e-9
    approx = theta_derivative(objective.cost, w, theta, predictor="gauss-newton", residual=objective.residual)
    assert float((approx - fd).norm()) > float((exact - fd).norm())   # the Gauss-Newton Hessian is only close


def test_continuation_follows_the_minimiser_and_records_predictions():
    objective, A, _ = _affine_pair(20)
    path = continuation(objective.cost, objective.identity(), [16.0, 4.0, 1.0, 0.0], predictor="newton")
    assert len(path.path) == 4 and len(path.predictions) == 3
    direct = minimize_newton(objective.cost, objective.identity(), gtol=1e-12).x
    torch.testing.assert_close(path.x, direct, atol=1e-6, rtol=0)
    assert all(p.relative_cost > 0 for p in path.predictions)        # the exact predictor helps here
    for bad in ([1.0, 2.0], [1.0, -1.0]):
        with pytest.raises(ShapeflowError, match="thetas must decrease|theta must be >= 0"):
            continuation(objective.cost, objective.identity(), bad)


def _shifted_pair():
    moving, fixed, _ = phantom_pair((32, 32), spacing=1.0, amplitude=0.0, seed=7)
    A = torch.tensor([[1.04, 0.06], [-0.05, 0.98]])
    t = torch.tensor([1.5, -1.0])
    points = Grid.of(fixed).points()
    shifted = fixed.with_data(sample(moving.data, Grid.of(moving), points @ A.T + t))
    return moving, shifted, A, t


@pytest.mark.parametrize("options", [
    {"optimizer": "newton", "interpolation": "spline"},
    {"optimizer": "gauss-newton"},
    {"optimizer": "lm", "interpolation": "spline", "multiscale": "continuation", "thetas": [16.0, 1.0, 0.0]},
    {"optimizer": "newton", "interpolation": "spline", "multiscale": "predictor-corrector",
     "thetas": [16.0, 1.0, 0.0], "predictor": "gauss-newton"},
])
def test_register_affine_with_each_optimizer_and_multiscale(options):
    moving, shifted, A, t = _shifted_pair()
    result = sf.register(moving, shifted, model="affine", progress=False, levels=2, **options)
    torch.testing.assert_close(result.deformation.matrix.detach(), A, atol=0.03, rtol=0)
    torch.testing.assert_close(result.deformation.translation.detach(), t, atol=0.4, rtol=0)
    assert result.history and result.options["optimizer"] == options["optimizer"]


def test_rigid_transform_and_prealign_use_the_same_machinery():
    moving, fixed, _ = phantom_pair((32, 32), spacing=1.0, amplitude=0.0, seed=3)
    angle = 0.08
    R = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    c = Grid.of(fixed).points().reshape(-1, 2).mean(0)
    t = torch.tensor([1.0, 0.5])
    rotated = fixed.with_data(sample(moving.data, Grid.of(moving), (Grid.of(fixed).points() - c) @ R.T + c + t))
    result = sf.register(moving, rotated, model="affine", progress=False, levels=2, optimizer="newton",
                         interpolation="spline", transform="rigid")
    torch.testing.assert_close(result.deformation.matrix.detach(), R, atol=5e-3, rtol=0)
    deformable = sf.register(moving, rotated, model="displacement", progress=False, levels=1, iterations=1,
                             optimizer="newton", interpolation="spline", transform="rigid")
    assert any(row.get("phase") == "newton" for row in deformable.history)


def test_bad_register_options_are_one_line_errors():
    moving, shifted, _, _ = _shifted_pair()
    cases = [({"optimizer": "bfgs"}, "unknown optimizer 'bfgs'; choose from lm, gauss-newton, newton, gradient"),
             ({"multiscale": "continuation"}, "use interpolation='spline'"),
             ({"interpolation": "spline", "multiscale": "continuation", "thetas": [1.0, -1.0]}, "theta must be >= 0"),
             ({"predictor": "secant"}, "unknown predictor")]
    for options, message in cases:
        with pytest.raises(ShapeflowError, match=message) as info:
            sf.register(moving, shifted, model="affine", progress=False, **options)
        assert "\n" not in str(info.value)
    with pytest.raises(ShapeflowError, match="configure the affine stage"):
        sf.register(moving, shifted, model="displacement", progress=False, prealign=None, optimizer="newton")
