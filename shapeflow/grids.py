"""Regular grids in world space: voxel <-> world coordinates, sampling, pyramids, gradients.

A grid is described by its size S (d axes), `spacing` (d,), `origin` (d,) and `direction`
(d, d) exactly as in `shapeflow.Image`: voxel index i sits at `origin + direction @ (spacing * i)`.
Fields on a grid are `(C, *S)`; points are `(..., d)` in world units (mm).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import ShapeflowError
from .shapes import Image

__all__ = ["Grid", "sample", "interpolation_weights", "spatial_gradient", "downsample", "bspline_upsample",
           "control_shape", "compose_displacements"]


@dataclass(frozen=True)
class Grid:
    """The geometry of an image without its data: size, spacing, origin, direction (float64)."""

    shape: tuple[int, ...]
    spacing: torch.Tensor
    origin: torch.Tensor
    direction: torch.Tensor

    @classmethod
    def of(cls, image: Image) -> "Grid":
        return cls(image.shape, image.spacing, image.origin, image.direction)

    @property
    def dim(self) -> int:
        return len(self.shape)

    @property
    def matrix(self) -> torch.Tensor:
        """(d, d) linear part of index -> world: `direction @ diag(spacing)`."""
        return self.direction * self.spacing

    def points(self, dtype=torch.float32, device=None) -> torch.Tensor:
        """World coordinates of every voxel centre: `(*S, d)`."""
        axes = [torch.arange(n, dtype=torch.float64) for n in self.shape]
        index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        return (index @ self.matrix.T + self.origin).to(device=device, dtype=dtype)

    def to_index(self, points: torch.Tensor) -> torch.Tensor:
        """World `points: (..., d)` -> continuous voxel indices `(..., d)`."""
        inverse = torch.linalg.inv(self.matrix).to(points)
        return (points - self.origin.to(points)) @ inverse.T

    def config(self) -> dict:
        return {"shape": list(self.shape), "spacing": self.spacing.tolist(), "origin": self.origin.tolist(),
                "direction": self.direction.tolist()}

    @classmethod
    def from_config(cls, config: dict) -> "Grid":
        as64 = lambda v: torch.tensor(v, dtype=torch.float64)
        return cls(tuple(config["shape"]), as64(config["spacing"]), as64(config["origin"]), as64(config["direction"]))


#: interpolation modes of `sample` (our names -> torch's), and its paddings
SAMPLE_MODES = {"linear": "bilinear", "nearest": "nearest"}
PADDINGS = ("border", "zeros")


def sample(field: torch.Tensor, grid: Grid, points: torch.Tensor, mode: str = "linear",
           padding: str = "border") -> torch.Tensor:
    """Values of `field: (C, *S)` on `grid` at world `points: (*P, d)` -> `(C, *P)`.

    mode: "linear" (bi/trilinear) or "nearest"; padding: "border" (clamp), "zeros".
    """
    if mode not in SAMPLE_MODES:
        raise ShapeflowError(f"sample(): unknown mode {mode!r}; choose from {', '.join(SAMPLE_MODES)}")
    if padding not in PADDINGS:
        raise ShapeflowError(f"sample(): unknown padding {padding!r}; choose from {', '.join(PADDINGS)}")
    d = grid.dim
    index = grid.to_index(points.to(field.dtype))
    size = torch.tensor(grid.shape, dtype=field.dtype, device=field.device)
    normalised = 2 * index / (size - 1).clamp_min(1) - 1
    flat = normalised.reshape(1, *([1] * (d - 1)), -1, d).flip(-1)     # grid_sample wants (x=W, y=H, z=D)
    out = F.grid_sample(field[None], flat, mode=SAMPLE_MODES[mode],
                        padding_mode=padding, align_corners=True)
    return out.reshape(field.shape[0], *points.shape[:-1])


def interpolation_weights(grid: Grid, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `sample(field, grid, points)` (linear mode, border padding) as a sparse matrix.

    points: world `(K, d)`. Returns `(index (K, 2^d) long, weights (K, 2^d))`: flat voxel indices
    (C order of S) of the 2^d grid nodes around each point and their bi/trilinear weights (same
    dtype as points), so `sample(field, grid, points)[c, k] == (field.reshape(C, -1)[c, index[k]]
    * weights[k]).sum()`. Points outside the grid are clamped to it, as `sample` does.
    """
    d = grid.dim
    size = torch.tensor(grid.shape, device=points.device)
    index = grid.to_index(points)                                                      # (K, d)
    index = torch.minimum(index.clamp_min(0), (size - 1).to(index))
    low = index.floor().long().clamp(max=(size - 2).clamp_min(0))                      # (K, d)
    frac = index - low.to(index)                                                       # (K, d) in [0, 1]
    corners = torch.tensor([[(c >> (d - 1 - a)) & 1 for a in range(d)] for c in range(2 ** d)],
                           device=points.device)                                       # (P, d)
    node = torch.minimum(low[:, None] + corners, size - 1)                             # (K, P, d)
    weights = torch.where(corners.bool(), frac[:, None], 1 - frac[:, None]).prod(-1)   # (K, P)
    strides = torch.tensor([math.prod(grid.shape[a + 1:]) for a in range(d)], device=points.device)
    return (node * strides).sum(-1), weights


def compose_displacements(first: torch.Tensor, second: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Displacement of `x -> y + u2(y)` with `y = x + u1(x)` (apply `first`, then `second`), both
    `(d, *S)` in world units on `grid`: `u(x) = u1(x) + u2(x + u1(x))`, u2 linearly interpolated."""
    moved = grid.points(first.dtype, first.device) + first.movedim(0, -1)
    return first + sample(second, grid, moved)


def scaling_and_squaring(velocity: torch.Tensor, grid: Grid, squarings: int) -> torch.Tensor:
    """Displacement of `exp(velocity)`: `u <- u + u(x + u)` `squarings` times from `velocity / 2^N`.

    velocity: (d, *S) world units on `grid`; returns (d, *S), the same as `squarings` calls of
    `compose_displacements(u, u, grid)`. The squarings run in grid_sample's normalised index
    coordinates (the map world -> index is linear, so composition commutes with it): each one is
    an add and one resampling, with no world-coordinate grid rebuilt.
    """
    d = grid.dim
    to_index = torch.linalg.inv(grid.matrix).to(velocity)                                  # (d, d)
    size = torch.tensor(grid.shape, dtype=velocity.dtype, device=velocity.device)
    scale = (2.0 / (size - 1).clamp_min(1)).reshape(d, *([1] * d))                         # index -> [-1, 1]
    u = torch.einsum("ij,j...->i...", to_index, velocity / 2**squarings) * scale           # normalised (d, *S)
    axes = [torch.linspace(-1.0, 1.0, n, dtype=velocity.dtype, device=velocity.device) if n > 1
            else torch.zeros(1, dtype=velocity.dtype, device=velocity.device) for n in grid.shape]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))                            # (d, *S)
    for _ in range(squarings):
        where = (identity + u).movedim(0, -1).flip(-1)[None]                               # grid_sample's (x, y, z)
        u = u + F.grid_sample(u[None], where, mode="bilinear", padding_mode="border", align_corners=True)[0]
    return torch.einsum("ij,j...->i...", grid.matrix.to(velocity), u / scale)


def spatial_gradient(field: torch.Tensor, grid: Grid) -> torch.Tensor:
    """World-space gradient of `field: (C, *S)` -> `(C, d, *S)`, by central differences.

    The index-space gradient g_i is mapped to world units by `M^{-T} g_i`, M = direction diag(spacing).
    """
    d = grid.dim
    g_index = torch.stack(torch.gradient(field, dim=list(range(1, d + 1))), dim=1)   # (C, d, *S)
    inv_t = torch.linalg.inv(grid.matrix).T.to(field)
    return torch.einsum("ij,cj...->ci...", inv_t, g_index)


def downsample(data: torch.Tensor, grid: Grid, factor: int = 2) -> tuple[torch.Tensor, Grid]:
    """Average `data: (C, *S)` over `factor`-sized blocks -> (C, *S'), and the coarser grid."""
    pool = F.avg_pool3d if grid.dim == 3 else F.avg_pool2d
    coarse = pool(data[None], factor, ceil_mode=True, count_include_pad=False)[0]
    shift = grid.matrix @ torch.full((grid.dim,), (factor - 1) / 2, dtype=torch.float64)
    return coarse, Grid(tuple(coarse.shape[1:]), grid.spacing * factor, grid.origin + shift, grid.direction)


def _bspline_kernel(stride: int, dtype, device) -> torch.Tensor:
    """Cubic B-spline B3 sampled at k / stride for k = -(2 stride - 1) ... 2 stride - 1."""
    t = (torch.arange(-(2 * stride - 1), 2 * stride, dtype=torch.float64) / stride).abs()
    values = torch.where(t < 1, 2 / 3 - t ** 2 + t ** 3 / 2, torch.where(t < 2, (2 - t) ** 3 / 6, torch.zeros_like(t)))
    return values.to(dtype=dtype, device=device)


def control_shape(shape: Sequence[int], stride: int) -> tuple[int, ...]:
    """Control-grid size for a dense grid `shape` and `stride`: one control point every `stride`
    voxels, plus one beyond each border so the B-spline sums to one everywhere inside."""
    return tuple(-(-(n - 1) // stride) + 3 for n in shape)


def bspline_upsample(control: torch.Tensor, stride: int, shape: Sequence[int]) -> torch.Tensor:
    """Cubic B-spline interpolation of a control grid `(C, *Sc)` (from `control_shape`) to the dense
    grid `(C, *shape)`; control point k sits at voxel `(k - 1) * stride`. Linear in `control`."""
    if stride == 1:
        return control[(slice(None),) + tuple(slice(1, 1 + n) for n in shape)]
    kernel = _bspline_kernel(stride, control.dtype, control.device).view(1, 1, -1)
    out = control
    for axis, n in enumerate(shape, start=1):
        moved = out.movedim(axis, -1)
        lead = moved.shape[:-1]
        up = F.conv_transpose1d(moved.reshape(-1, 1, moved.shape[-1]), kernel, stride=stride,
                                padding=2 * stride - 1)
        out = up[..., stride:stride + n].reshape(*lead, n).movedim(-1, axis)
    return out
