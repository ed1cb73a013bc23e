"""Learned-registration layers: gradients against finite differences, implicit against unrolled."""
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from shapeflow.errors import ShapeflowError
from shapeflow.grids import Grid, sample
from shapeflow.learn.layers import (gauss_newton_layer, gauss_newton_system_layer, implicit_registration_layer,
                                    linearise, normal_factor)
from shapeflow.solvers import gauss_newton_step

D = torch.float64


def grid_of(shape, spacing=(1.0, 1.0)):
    return Grid(tuple(shape), torch.tensor(spacing, dtype=D), torch.zeros(len(shape), dtype=D),
                torch.eye(len(shape), dtype=D))


def smooth_problem(size=16, channels=3, seed=0, amplitude=1.0):
    """Smooth random features and the same features under a known smooth displacement."""
    rng = np.random.default_rng(seed)
    features = np.stack([gaussian_filter(rng.normal(size=(size, size)), 2.5) for _ in range(channels)])
    field = np.stack([gaussian_filter(rng.normal(size=(size, size)), 4) for _ in range(2)])
    grid = grid_of((size, size))
    moving = torch.from_numpy(features / np.abs(features).max())
    shift = torch.from_numpy(field / np.abs(field).max() * amplitude)
    fixed = sample(moving, grid, grid.points(D) + shift.movedim(0, -1))
    return moving, fixed, grid


@pytest.mark.parametrize("mode", ["implicit", "unrolled"])
def test_system_layer_passes_gradcheck(mode):
    grid = grid_of((4, 5), (1.0, 1.5))
    g = torch.Generator().manual_seed(1)
    gradient = torch.randn(2, 2, 4, 5, dtype=D, generator=g).requires_grad_()
    residual = torch.randn(2, 4, 5, dtype=D, generator=g).requires_grad_()
    u = (0.3 * torch.randn(2, 4, 5, dtype=D, generator=g)).requires_grad_()
    layer = lambda gr, r, v: gauss_newton_system_layer(gr, r, v, grid, 0.5, mode, tol=1e-13)  # noqa: E731
    assert torch.autograd.gradcheck(layer, (gradient, residual, u), fast_mode=mode == "unrolled")


def test_system_layer_matches_the_solver_step_in_3d():
    grid = grid_of((5, 4, 6), (1.0, 2.0, 1.5))
    g = torch.Generator().manual_seed(2)
    gradient, residual = torch.randn(3, 3, 5, 4, 6, dtype=D, generator=g), torch.randn(3, 5, 4, 6, dtype=D, generator=g)
    u = 0.2 * torch.randn(3, 5, 4, 6, dtype=D, generator=g)
    du = gauss_newton_system_layer(gradient, residual, u, grid, 0.3, tol=1e-12)
    step, _ = gauss_newton_step(residual, gradient, u, grid, 0.3, cg_iterations=5000, cg_tol=1e-12)
    torch.testing.assert_close(du, step, atol=1e-8, rtol=1e-7)


def test_system_layer_on_linearised_features_equals_gauss_newton_layer():
    moving, fixed, grid = smooth_problem(size=10)
    u = 0.3 * torch.ones(2, 10, 10, dtype=D)
    residual, gradient = linearise(moving, fixed, grid, u)
    torch.testing.assert_close(gauss_newton_system_layer(gradient, residual, u, grid, 0.1, tol=1e-12),
                               gauss_newton_layer(moving, fixed, grid, 0.1, u, tol=1e-12), atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("channels, dim", [(12, 2), (5, 3), (1, 2)])
def test_normal_factor_keeps_the_blocks(channels, dim):
    gradient = torch.randn(channels, dim, *([4] * dim), dtype=D, generator=torch.Generator().manual_seed(channels))
    gradient[:, :, 0] = 0                                   # flat voxels: singular blocks
    factor = normal_factor(gradient)
    assert factor.shape[0] == min(channels, dim)
    torch.testing.assert_close(torch.einsum("ki...,kj...->ij...", factor, factor),
                               torch.einsum("ci...,cj...->ij...", gradient, gradient) / channels, atol=1e-12, rtol=0)


def test_one_unrolled_registration_step_passes_gradcheck():
    moving, fixed, grid = smooth_problem(size=6, channels=2, seed=3, amplitude=0.5)
    layer = lambda m, f: implicit_registration_layer(m, f, grid, 0.2, 2, "unrolled", tol=1e-13,  # noqa: E731
                                                       maxiter=500)
    assert torch.autograd.gradcheck(layer, (moving.requires_grad_(), fixed.requires_grad_()), fast_mode=True)


def _gradients(moving, fixed, grid, loss, backward, lam=0.05, iterations=30):
    m, f = moving.clone().requires_grad_(), fixed.clone().requires_grad_()
    u = implicit_registration_layer(m, f, grid, lam, iterations, backward, tol=1e-12, maxiter=2000)
    loss(u).backward()
    return u.detach(), torch.cat([m.grad.reshape(-1), f.grad.reshape(-1)])


def test_implicit_and_jacobian_free_gradients_follow_the_unrolled_one():
    # Converged tiny problem: 30 Gauss-Newton steps, CG to 1e-12. Measured cosines to the
    # unrolled gradient (seeds 0-3): IFT 0.995-0.998, JFB 0.79-0.94 for this smooth loss.
    cosine = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    for seed in range(2):
        moving, fixed, grid = smooth_problem(seed=seed)
        rng = np.random.default_rng(seed + 10)
        weights = torch.from_numpy(np.stack([gaussian_filter(rng.normal(size=(16, 16)), 3) for _ in range(2)]))
        loss = lambda u: (weights * u).sum()  # noqa: E731
        results = {mode: _gradients(moving, fixed, grid, loss, mode) for mode in ("ift", "jfb", "unrolled")}
        reference = results["unrolled"][1]
        for mode in ("ift", "jfb"):
            torch.testing.assert_close(results[mode][0], results["unrolled"][0], atol=1e-9, rtol=0)  # same u*
        assert cosine(results["ift"][1], reference) > 0.95
        assert cosine(results["jfb"][1], reference) > 0.5


def test_layers_reject_bad_input():
    moving, fixed, grid = smooth_problem(size=8)
    with pytest.raises(ShapeflowError, match="backward"):
        implicit_registration_layer(moving, fixed, grid, 0.1, 3, "exact")
    with pytest.raises(ShapeflowError, match="channels"):
        implicit_registration_layer(moving, fixed[:2], grid, 0.1, 3)
    with pytest.raises(ShapeflowError, match="gradient must be"):
        gauss_newton_system_layer(torch.zeros(1, 3, 8, 8, dtype=D), torch.zeros(1, 8, 8, dtype=D), None, grid, 0.1)
