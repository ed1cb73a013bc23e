"""Pairs of shapes related by a known smooth deformation, for tests, demos and benchmarks."""
from __future__ import annotations

import math

import torch

__all__ = ["smooth_deformation", "bend", "smooth_field", "phantom_pair", "warped_pair"]


def smooth_deformation(points: torch.Tensor, amplitude: float = 0.05, frequency: float = 1.0,
                       components: int = 3, seed: int = 0) -> torch.Tensor:
    """Apply a known smooth, invertible deformation to `points: (N, d)` -> `(N, d)`.

    The map is the composition of `components` random sinusoidal shears
    `x <- x + a * sin(2 pi f <k, x> / extent + phase) * u` with `u` orthogonal to the wave
    vector `k`. Each shear has Jacobian determinant exactly 1, so the composition is a
    volume-preserving diffeomorphism whatever the amplitude; `amplitude` is relative to the
    bounding-box diagonal of the points.
    """
    gen = torch.Generator().manual_seed(seed)
    x = points.detach().double()
    dim = x.shape[1]
    extent = float((x.max(0).values - x.min(0).values).norm())
    for _ in range(components):
        k = torch.randn(dim, generator=gen, dtype=torch.float64)
        k = k / k.norm()
        u = torch.randn(dim, generator=gen, dtype=torch.float64)
        u = u - (u @ k) * k
        u = u / u.norm()
        phase = float(torch.rand((), generator=gen)) * 2 * math.pi
        x = x + amplitude * extent * torch.sin(2 * math.pi * frequency * (x @ k) / extent + phase)[:, None] * u
    return x.to(points.dtype)


def bend(points: torch.Tensor, angle: float = 0.6, axis: int = 0, up: int = 2) -> torch.Tensor:
    """Bend `points: (N, 3)` (or 2D) along `axis` into an arc of total angle `angle` (radians),
    curving towards coordinate `up`; the shape keeps its length along the arc."""
    x = points.detach().double().clone()
    centre = x.mean(0)
    length = float(x[:, axis].max() - x[:, axis].min())
    radius = length / angle
    s = x[:, axis] - centre[axis]
    h = x[:, up] - centre[up]
    theta = s / radius
    x[:, axis] = centre[axis] + (radius - h) * torch.sin(theta)
    x[:, up] = centre[up] + radius - (radius - h) * torch.cos(theta)
    return x.to(points.dtype)


def blob_phantom(points: torch.Tensor, extent: torch.Tensor | None = None, blobs: int = 60, seed: int = 0) -> torch.Tensor:
    """A textured phantom evaluated at world `points: (*P, d)` -> `(1, *P)`: a sum of random Gaussian
    blobs of several sizes inside the box [0, extent] (default: the points' bounding box), so image
    gradients (the registration's information) cover the whole image. Analytic, so a deformed
    copy can be sampled exactly: `blob_phantom(psi_inverse(x))`."""
    gen = torch.Generator().manual_seed(seed)
    d = points.shape[-1]
    flat = points.reshape(-1, d).double()
    if extent is None:
        extent = flat.max(0).values - flat.min(0).values
    extent = torch.as_tensor(extent, dtype=torch.float64)
    image = torch.zeros(flat.shape[0], dtype=torch.float64)
    for _ in range(blobs):
        centre = torch.rand(d, generator=gen, dtype=torch.float64) * extent
        width = (0.03 + 0.08 * float(torch.rand((), generator=gen))) * float(extent.max())
        weight = 0.5 + float(torch.rand((), generator=gen))
        image += weight * torch.exp(-((flat - centre) ** 2).sum(-1) / (2 * width ** 2))
    return (image / blobs * 8).clamp(max=1.5).reshape(1, *points.shape[:-1]).to(points.dtype)


def smooth_field(points: torch.Tensor, amplitude: float, wavelength: float, seed: int = 0) -> torch.Tensor:
    """A smooth displacement at world `points: (*P, d)` -> `(d, *P)`: each component a random
    sum of sinusoids of the given `wavelength` (mm) and peak `amplitude` (mm)."""
    gen = torch.Generator().manual_seed(seed)
    d = points.shape[-1]
    components = []
    for _ in range(d):
        total = torch.zeros(points.shape[:-1], dtype=points.dtype)
        for _ in range(2):
            k = torch.randn(d, generator=gen, dtype=points.dtype)
            k = 2 * math.pi * k / (k.norm() * wavelength)
            phase = float(torch.rand((), generator=gen)) * 2 * math.pi
            total = total + torch.sin(points @ k + phase)
        components.append(amplitude / 2 * total)
    return torch.stack(components)


def phantom_pair(shape: tuple[int, ...], spacing: float | list[float] = 1.0, amplitude: float = 3.0,
                 wavelength: float | None = None, blobs: int = 60, seed: int = 0):
    """`(moving, fixed, truth)` for image tests and benchmarks: `fixed` is a blob phantom on the
    grid `shape` with `spacing`; `moving` is the same phantom sampled exactly at `truth^{-1}(x)`, so
    that `fixed(x) = moving(truth(x))` for the known smooth map `truth: x -> x + u(x)`
    (a `DisplacementField` on the fixed grid, peak |u| about `amplitude` mm)."""
    from .deform import DisplacementField
    from .grids import Grid
    from .shapes import Image

    d = len(shape)
    spacing_t = torch.as_tensor(spacing, dtype=torch.float64).expand(d).clone()
    grid = Grid(tuple(shape), spacing_t, torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64))
    points = grid.points(torch.float64)
    extent = spacing_t * (torch.tensor(shape, dtype=torch.float64) - 1)
    u = smooth_field(points, amplitude, wavelength or float(extent.norm()) / 1.5, seed)
    truth = DisplacementField(grid).double()
    with torch.no_grad():
        truth.control[(slice(None),) + tuple(slice(1, 1 + n) for n in shape)] = u
    inverse = truth.inverse(points.reshape(-1, d), tol=1e-6).reshape(points.shape)
    fixed = Image(blob_phantom(points, extent, blobs, seed).float(), spacing=spacing_t)
    moving = Image(blob_phantom(inverse, extent, blobs, seed).float(), spacing=spacing_t)
    return moving, fixed, truth.float()


def warped_pair(fixed, amplitude: float = 4.0, wavelength: float = 80.0, seed: int = 0):
    """`(moving, fixed, truth)` from a real image: `moving` is `fixed: Image` resampled (trilinear,
    border) at `truth^{-1}(x)` for the known smooth map `truth: x -> x + u(x)` on its grid (u from
    `smooth_field`, peak about `amplitude` mm, `wavelength` mm), so that
    `fixed(x) ~ moving(truth(x))` up to interpolation; `truth` is a `DisplacementField`."""
    import dataclasses

    from .deform import DisplacementField
    from .grids import Grid, sample

    grid = Grid.of(fixed)
    points = grid.points(torch.float64)                                   # (*S, d)
    truth = DisplacementField(grid).double()
    truth.set_dense(smooth_field(points, amplitude, wavelength, seed))
    inverse = truth.inverse(points.reshape(-1, grid.dim), tol=1e-6).reshape(points.shape)
    data = sample(fixed.data.double(), grid, inverse).to(fixed.data.dtype)
    return dataclasses.replace(fixed, data=data, labels=None, source=None), fixed, truth.float()
