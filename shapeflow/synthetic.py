"""Pairs of shapes related by a known smooth deformation, for tests, demos and benchmarks."""
from __future__ import annotations

import math

import torch

__all__ = ["smooth_deformation", "bend"]


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
