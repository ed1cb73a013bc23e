"""Cubic B-spline interpolation with a scale theta (shapeflow/interpolation.py)."""
import pytest
import torch

from shapeflow.errors import ShapeflowError
from shapeflow.grids import Grid, sample
from shapeflow.interpolation import Interpolant, linear_sample, spline_coefficients, spline_sample

D = torch.float64


def _grid(shape, spacing, origin):
    return Grid(shape, torch.tensor(spacing, dtype=D), torch.tensor(origin, dtype=D), torch.eye(len(shape), dtype=D))


def _inside(grid, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    extent = (torch.tensor(grid.shape, dtype=D) - 1) * grid.spacing
    return torch.rand(k, grid.dim, generator=g, dtype=D) * extent + grid.origin


def _cubic(x):   # cubic in each coordinate (a tensor product of cubics)
    return 0.3 + x[..., 0] - 0.2 * x[..., 1] ** 2 + 0.05 * x[..., 0] ** 3 - 0.01 * x[..., 0] * x[..., 1] ** 3


@pytest.mark.parametrize("dim", [2, 3])
def test_spline_reproduces_polynomials_up_to_cubic(dim):
    grid = _grid((7, 9, 6)[:dim], [0.7, 1.3, 1.1][:dim], [1.0, -2.0, 0.5][:dim])
    poly = (lambda x: _cubic(x) + 0.02 * x[..., 2] ** 3 * x[..., 0]) if dim == 3 else _cubic
    c = spline_coefficients(poly(grid.points(D))[None], grid, 0.0)
    q = _inside(grid, 40)
    assert torch.allclose(spline_sample(c, grid, q)[0], poly(q), atol=1e-10)
    nodes = grid.points(D)
    assert torch.allclose(spline_sample(c, grid, nodes), poly(nodes)[None], atol=1e-10)   # interpolates


def test_spline_derivatives_match_finite_differences():
    grid = _grid((8, 9), [1.0, 0.8], [0.0, 0.0])
    data = torch.randn(2, 8, 9, dtype=D, generator=torch.Generator().manual_seed(1))
    theta = torch.tensor(0.3, dtype=D)
    q = _inside(grid, 5, seed=2)
    f = lambda x, t: spline_sample(spline_coefficients(data, grid, t), grid, x).sum()
    g_x = torch.func.grad(f)(q, theta)
    hess = torch.func.hessian(lambda x: f(x, theta))(q)                   # second derivatives exist
    eps = 1e-6
    for i in range(2):
        e = torch.zeros_like(q)
        e[:, i] = eps
        fd = (spline_sample(spline_coefficients(data, grid, theta), grid, q + e)
              - spline_sample(spline_coefficients(data, grid, theta), grid, q - e)).sum(0) / (2 * eps)
        assert torch.allclose(g_x[:, i], fd, atol=1e-7)
        gp, gm = torch.func.grad(f)(q + e, theta), torch.func.grad(f)(q - e, theta)
        assert torch.allclose(torch.stack([hess[k, :, k, i] for k in range(5)]), (gp - gm) / (2 * eps), atol=1e-5)
    d_theta = torch.func.grad(f, argnums=1)(q, theta)
    fd_theta = (f(q, theta + eps) - f(q, theta - eps)) / (2 * eps)
    assert abs(float(d_theta - fd_theta)) < 1e-6


def test_theta_to_zero_recovers_interpolation_and_blurs_otherwise():
    grid = _grid((10, 10), [1.0, 1.0], [0.0, 0.0])
    data = torch.randn(1, 10, 10, dtype=D, generator=torch.Generator().manual_seed(3))
    nodes = grid.points(D)
    errors = [float((spline_sample(spline_coefficients(data, grid, t), grid, nodes) - data).abs().max())
              for t in (1e-2, 1e-4, 1e-6, 0.0)]
    assert errors[-1] < 1e-12
    assert errors[0] > errors[1] > errors[2] > errors[3]          # monotone approach to interpolation
    assert 50 < errors[1] / errors[2] < 200                       # first order in theta: O(theta)
    # a linear intensity is not changed by any blur; a random one loses variance
    linear = (0.5 + nodes[..., 0] - 0.3 * nodes[..., 1])[None]
    assert torch.allclose(spline_sample(spline_coefficients(linear, grid, 100.0), grid, nodes), linear, atol=1e-9)
    blurred = spline_sample(spline_coefficients(data, grid, 10.0), grid, nodes)
    assert float(blurred.var()) < 0.5 * float(data.var())


def test_linear_sample_matches_grid_sample_and_is_forward_differentiable():
    grid = _grid((6, 7), [1.2, 0.9], [1.0, 2.0])
    data = torch.randn(3, 6, 7, dtype=D, generator=torch.Generator().manual_seed(4))
    q = _inside(grid, 30)
    outside = torch.cat([q, q + 2.5 * grid.spacing, q - 4 * grid.spacing])
    for padding in ("zeros", "border"):
        assert torch.allclose(linear_sample(data, grid, outside, padding), sample(data, grid, outside, padding=padding),
                              atol=1e-12)
    tangent = torch.randn_like(q)
    _, jvp = torch.func.jvp(lambda x: linear_sample(data, grid, x), (q,), (tangent,))
    _, vjp = torch.func.vjp(lambda x: linear_sample(data, grid, x), q)
    u = torch.randn(3, 30, dtype=D)
    assert torch.allclose((jvp * u).sum(), (vjp(u)[0] * tangent).sum())      # jvp and vjp agree


def test_bad_theta_and_sizes_are_one_line_errors():
    grid = _grid((6, 6), [1.0, 1.0], [0.0, 0.0])
    data = torch.zeros(1, 6, 6, dtype=D)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ShapeflowError, match="theta must be a number >= 0") as info:
            spline_coefficients(data, grid, bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ShapeflowError, match="theta must be"):
        Interpolant(data, grid)(grid.points(D), -0.5)
    with pytest.raises(ShapeflowError, match="at least 4 voxels"):
        spline_coefficients(torch.zeros(1, 3, 6, dtype=D), _grid((3, 6), [1.0, 1.0], [0.0, 0.0]))
    with pytest.raises(ShapeflowError, match="unknown interpolation"):
        Interpolant(data, grid, "cubic")
