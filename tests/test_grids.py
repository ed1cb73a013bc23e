import math

import pytest
import torch

import shapeflow as sf
from shapeflow.deform import DisplacementField, StationaryVelocityField
from shapeflow.grids import (Grid, bspline_upsample, compose_displacements, control_shape, downsample, sample,
                             scaling_and_squaring, spatial_gradient)
from shapeflow.regularizers import jacobian_determinant


def rotated_grid(shape=(12, 10, 9), spacing=(1.0, 1.5, 2.0), angle=0.4):
    c, s = math.cos(angle), math.sin(angle)
    direction = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)
    return Grid(shape, torch.tensor(spacing, dtype=torch.float64), torch.tensor([5.0, -3.0, 2.0], dtype=torch.float64), direction)


def test_grid_points_follow_the_index_to_world_matrix():
    grid = rotated_grid()
    image = sf.Image(torch.zeros(1, *grid.shape), grid.spacing, grid.origin, grid.direction)
    index = torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64)
    expected = image.index_to_world @ torch.cat([index, torch.ones(1, dtype=torch.float64)])
    torch.testing.assert_close(grid.points(torch.float64)[3, 4, 5], expected[:3])
    torch.testing.assert_close(grid.to_index(expected[None, :3])[0], index)


def test_sampling_and_gradient_are_exact_for_linear_functions():
    grid = rotated_grid()
    a, b = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64), 2.0
    field = (grid.points(torch.float64) @ a + b)[None]                   # f(x) = a.x + b in world units
    inside = grid.points(torch.float64)[1:-1, 1:-1, 1:-1].reshape(-1, 3) + 0.37
    torch.testing.assert_close(sample(field, grid, inside)[0], inside @ a + b)
    gradient = spatial_gradient(field, grid)[0]                           # (3, *S)
    torch.testing.assert_close(gradient, a.view(3, 1, 1, 1).expand_as(gradient))


def test_bspline_upsampling_sums_to_one_and_reproduces_lines():
    shape = (17, 13)
    for stride in (1, 2, 4):
        ones = torch.ones(1, *control_shape(shape, stride), dtype=torch.float64)
        torch.testing.assert_close(bspline_upsample(ones, stride, shape), torch.ones(1, *shape, dtype=torch.float64))
        k = torch.arange(control_shape(shape, stride)[0], dtype=torch.float64) - 1
        line = (k * stride).view(1, -1, 1).expand(1, *control_shape(shape, stride))
        torch.testing.assert_close(bspline_upsample(line, stride, shape)[0, :, 0], torch.arange(17, dtype=torch.float64))


def test_downsampled_grid_places_voxels_at_block_centres():
    grid = rotated_grid(shape=(8, 6, 4))
    data = grid.points(torch.float64).movedim(-1, 0)                     # the world coordinates themselves
    coarse, coarse_grid = downsample(data, grid, 2)
    torch.testing.assert_close(coarse.movedim(0, -1), coarse_grid.points(torch.float64))
    torch.testing.assert_close(coarse_grid.spacing, grid.spacing * 2)


def test_displacement_field_inverse_and_save_load(tmp_path):
    grid = rotated_grid()
    field = DisplacementField(grid, stride=3)
    with torch.no_grad():
        field.control.normal_(0, 0.4, generator=torch.Generator().manual_seed(0))
    x = grid.points()[2:-2, 2:-2, 2:-2].reshape(-1, 3)
    torch.testing.assert_close(field.inverse(field(x)), x, atol=1e-3, rtol=0)
    loaded = sf.load_deformation(field.save(tmp_path / "field.pt"))
    torch.testing.assert_close(loaded(x), field(x))


def test_svf_is_invertible_and_does_not_fold_even_for_large_velocities():
    grid = Grid((24, 24), torch.tensor([1.0, 1.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                torch.eye(2, dtype=torch.float64))
    svf = StationaryVelocityField(grid, stride=4)
    with torch.no_grad():
        svf.control.normal_(0, 6.0, generator=torch.Generator().manual_seed(1))   # displacements of many voxels
    u = svf.field().detach()
    assert float(u.norm(dim=0).max()) > 4
    assert float(jacobian_determinant(u, [1.0, 1.0]).min()) > 0
    x = grid.points()[4:-4, 4:-4].reshape(-1, 2)
    y = svf(x).detach()
    inside = ((y > 3) & (y < 20)).all(1)        # the field is clamped outside its grid: compare inside only
    assert inside.sum() > 50
    error = (svf.inverse(y)[inside] - x[inside]).norm(dim=1)     # exp(-v) o exp(v): only discretisation error
    assert float(error.mean()) < 0.15 and float(error.max()) < 0.6
    path = svf.trajectory(x, 4)
    torch.testing.assert_close(path[0], x, atol=1e-5, rtol=0)
    torch.testing.assert_close(path[-1], svf(x))


def test_same_velocity_twice_as_long_is_the_composition():
    grid = Grid((20, 20), torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    svf = StationaryVelocityField(grid, stride=5)
    with torch.no_grad():
        svf.control.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    half = StationaryVelocityField(grid, stride=5)
    with torch.no_grad():
        half.control.copy_(svf.control / 2)
    x = grid.points()[5:-5, 5:-5].reshape(-1, 2)
    torch.testing.assert_close(half(half(x)), svf(x), atol=0.05, rtol=0)


def test_composing_affine_displacements_matches_the_matrix_product():
    grid = rotated_grid()
    x = grid.points(torch.float64)
    A = torch.tensor([[1.02, 0.03, 0.0], [-0.02, 0.98, 0.01], [0.0, 0.02, 1.01]], dtype=torch.float64)
    B = torch.tensor([[0.99, 0.0, 0.02], [0.01, 1.03, 0.0], [0.0, -0.01, 1.0]], dtype=torch.float64)
    first = (x @ A.T - x + 0.5).movedim(-1, 0)           # x -> A x + 0.5
    second = (x @ B.T - x - 0.2).movedim(-1, 0)          # y -> B y - 0.2 (linear, so interpolation is exact)
    composed = compose_displacements(first, second, grid).movedim(0, -1)
    inner = (slice(2, -2),) * 3                          # away from the clamped border
    expected = (x @ A.T + 0.5) @ B.T - 0.2 - x
    torch.testing.assert_close(composed[inner], expected[inner])


@pytest.mark.parametrize("shape,spacing", [((12, 10, 9), (1.0, 1.5, 2.0)), ((11, 1, 8), (2.0, 1.0, 0.5))])
def test_scaling_and_squaring_equals_repeated_world_composition(shape, spacing):
    """The normalised-coordinate squaring gives the world-space `compose_displacements(u, u)` loop."""
    grid = rotated_grid(shape, spacing)
    g = torch.Generator().manual_seed(4)
    kernel = tuple(3 if k > 1 else 1 for k in shape)
    velocity = 3.0 * torch.nn.functional.avg_pool3d(torch.randn(1, 3, *shape, dtype=torch.float64, generator=g),
                                                    kernel, 1, tuple(k // 2 for k in kernel),
                                                    count_include_pad=False)[0]
    n = 5
    u = velocity / 2**n
    for _ in range(n):
        u = compose_displacements(u, u, grid)
    torch.testing.assert_close(scaling_and_squaring(velocity, grid, n), u, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scaling_and_squaring(velocity, grid, 0), velocity)
    grid2 = Grid(shape[:2], torch.tensor(spacing[:2], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                 torch.eye(2, dtype=torch.float64))
    v2 = velocity[:2, :, :, 0]
    u2 = v2 / 8
    for _ in range(3):
        u2 = compose_displacements(u2, u2, grid2)
    torch.testing.assert_close(scaling_and_squaring(v2, grid2, 3), u2, rtol=1e-10, atol=1e-10)


def _random_grid(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = len(shape)
    direction = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))[0]
    return Grid(tuple(shape), torch.rand(d, dtype=torch.float64, generator=g) + 0.5,
                torch.randn(d, dtype=torch.float64, generator=g), direction)


@pytest.mark.parametrize("shape", [(9, 7, 6), (11, 8), (6, 1, 5)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_sampling_and_squaring_match_grid_sample(shape, dtype):
    """The numba passes (no autograd) against torch's grid_sample path (taken under autograd)."""
    pytest.importorskip("numba")
    grid = _random_grid(shape)
    g = torch.Generator().manual_seed(1)
    field = torch.randn(2, *shape, dtype=dtype, generator=g)
    points = grid.points(torch.float64) + 2 * torch.randn(*shape, len(shape), dtype=torch.float64, generator=g)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    fast = sample(field, grid, points)                                       # some points outside: border
    reference = sample(field.clone().requires_grad_(True), grid, points)
    torch.testing.assert_close(fast, reference.detach(), **tol)
    velocity = 3 * torch.randn(len(shape), *shape, dtype=dtype, generator=g)
    fast = scaling_and_squaring(velocity, grid, 4)
    reference = scaling_and_squaring(velocity.clone().requires_grad_(True), grid, 4)
    torch.testing.assert_close(fast, reference.detach(), **tol)


def test_sampling_and_squaring_keep_gradients():
    """Under autograd both run through grid_sample: gradcheck in float64."""
    grid = _random_grid((5, 4, 3))
    g = torch.Generator().manual_seed(2)
    field = torch.randn(1, 5, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    points = grid.points(torch.float64)[1:-1, 1:-1] + 0.3 * torch.rand(3, 2, 3, 3, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda f: sample(f, grid, points), (field,))
    velocity = (0.5 * torch.randn(3, 5, 4, 3, dtype=torch.float64, generator=g)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: scaling_and_squaring(v, grid, 2), (velocity,))


def test_velocity_bounds_and_fewer_squarings_for_small_velocities(monkeypatch):
    from shapeflow import grids
    from shapeflow.grids import velocity_bounds

    grid = _random_grid((10, 9, 8))
    g = torch.Generator().manual_seed(3)
    velocity = torch.randn(3, 10, 9, 8, dtype=torch.float64, generator=g)
    voxels = torch.einsum("ij,j...->i...", torch.linalg.inv(grid.matrix), velocity)
    local = torch.zeros(10, 9, 8, dtype=torch.float64)
    for a in (1, 2, 3):                        # |v_c(x + e_a) - v_c(x)|, at x, max over c and a
        diff = torch.diff(voxels, dim=a).abs().amax(0)
        local[tuple(slice(0, n - 1) if k == a - 1 else slice(None) for k, n in enumerate((10, 9, 8)))] = \
            torch.maximum(local[tuple(slice(0, n - 1) if k == a - 1 else slice(None)
                                      for k, n in enumerate((10, 9, 8)))], diff)
    expected = (float(voxels.norm(dim=0).max()), float(local.max()), float((voxels.norm(dim=0) * local).max()))
    assert velocity_bounds(velocity, grid) == pytest.approx(expected)
    monkeypatch.setattr(grids, "_fast", lambda *t: False)                     # the torch fallback
    assert velocity_bounds(velocity, grid) == pytest.approx(expected)
    monkeypatch.undo()
    svf = StationaryVelocityField(grid)
    constant = torch.ones(3, 10, 9, 8, dtype=torch.float64) * torch.tensor([5.0, -3.0, 2.0]).view(3, 1, 1, 1)
    assert svf.squarings(constant) == 0                   # a translation is its own exponential
    assert svf.squarings(velocity * 1e-3) == 0
    assert svf.squarings(velocity * 0.1) < svf.squarings(velocity) <= svf.max_squarings
    u = scaling_and_squaring(velocity, grid, svf.squarings(velocity))
    reference = scaling_and_squaring(velocity, grid, 14)
    assert float((torch.einsum("ij,j...->i...", torch.linalg.inv(grid.matrix), u - reference)).norm(dim=0).max()) < 0.1


@pytest.mark.parametrize("shape", [(9, 7, 6), (11, 8)])
def test_min_jacobian_determinant_matches_the_torch_reference(shape, monkeypatch):
    from shapeflow import grids
    from shapeflow.grids import min_jacobian_determinant
    from shapeflow.synthetic import smooth_field

    grid = _random_grid(shape, seed=5)
    for amplitude in (6.0, 0.5):                   # folding, and not
        u = smooth_field(grid.points(torch.float64), amplitude, 6.0)
        local = (u.movedim(0, -1) @ grid.direction).movedim(-1, 0)             # components along the axes
        central = float(jacobian_determinant(local, grid.spacing.tolist()).min())
        fast = (min_jacobian_determinant(u, grid), min_jacobian_determinant(u, grid, corners=True))
        assert fast[0] == pytest.approx(central, rel=1e-9, abs=1e-9) and fast[1] <= fast[0]
        with monkeypatch.context() as patch:
            patch.setattr(grids, "_fast", lambda *t: False)
            assert (min_jacobian_determinant(u, grid), min_jacobian_determinant(u, grid, corners=True)) == \
                pytest.approx(fast, rel=1e-9, abs=1e-9)
