"""Regular grids in world space: voxel <-> world coordinates, sampling, pyramids, gradients.

A grid is described by its size S (d axes), `spacing` (d,), `origin` (d,) and `direction`
(d, d) exactly as in `shapeflow.Image`: voxel index i sits at `origin + direction @ (spacing * i)`.
Fields on a grid are `(C, *S)`; points are `(..., d)` in world units (mm).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._numba import run_numba
from .errors import ShapeflowError
from .shapes import Image

__all__ = ["Grid", "sample", "interpolation_weights", "spatial_gradient", "downsample", "bspline_upsample",
           "control_shape", "compose_displacements", "scaling_and_squaring", "velocity_bounds",
           "min_jacobian_determinant"]


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

    mode: "linear" (bi/trilinear) or "nearest"; padding: "border" (clamp), "zeros". Linear
    sampling with border padding of CPU tensors outside autograd is one compiled pass (numba);
    everything else `F.grid_sample` (the same numbers; tests compare them).
    """
    if mode not in SAMPLE_MODES:
        raise ShapeflowError(f"sample(): unknown mode {mode!r}; choose from {', '.join(SAMPLE_MODES)}")
    if padding not in PADDINGS:
        raise ShapeflowError(f"sample(): unknown padding {padding!r}; choose from {', '.join(PADDINGS)}")
    d = grid.dim
    index = grid.to_index(points.to(field.dtype))
    if mode == "linear" and padding == "border" and _fast(field, index):   # one compiled pass (numba)
        out = torch.empty(field.shape[0], math.prod(points.shape[:-1]), dtype=field.dtype)
        run_numba(_kernels()["sample_index"], _as_3d(field).contiguous().numpy(),
                  index.reshape(-1, d).contiguous().numpy(), out.numpy())
        return out.reshape(field.shape[0], *points.shape[:-1])
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


@functools.lru_cache(maxsize=1)
def _kernels():
    """The one-pass CPU kernels of the squarings as {name: (serial, parallel)} numba dispatchers
    (`numba_variants`, compiled or loaded from numba's cache on first call); None without numba.

    Fields are in voxel units on a 3D grid `(C, X, Y, Z)` (C = 2 or 3; a 2D field is one plane,
    Z = 1). Trilinear interpolation with border padding: the point is clamped to the grid, the
    cell's low corner to `n - 2`, exactly as `F.grid_sample(..., align_corners=True,
    padding_mode="border")` reads it.
    """
    try:
        import numba
    except ImportError:
        return None
    from ._numba import numba_variants

    @numba.njit(fastmath=True, cache=True, inline="always")
    def cell(px, py, pz, X, Y, Z):  # pragma: no cover - compiled
        # the voxel cell of the index point (px, py, pz), clamped to the grid (border padding):
        # its low corner, high corner and the fractions along each axis
        px, py, pz = min(max(px, 0.0), X - 1.0), min(max(py, 0.0), Y - 1.0), min(max(pz, 0.0), Z - 1.0)
        i, j, k = min(int(px), max(X - 2, 0)), min(int(py), max(Y - 2, 0)), min(int(pz), max(Z - 2, 0))
        return i, j, k, min(i + 1, X - 1), min(j + 1, Y - 1), min(k + 1, Z - 1), px - i, py - j, pz - k

    @numba.njit(fastmath=True, cache=True, inline="always")
    def blend(s, i, j, k, i1, j1, k1, fx, fy, fz):  # pragma: no cover - compiled
        # trilinear interpolation of s (X, Y, Z) in the cell from `cell`
        low = (1 - fy) * ((1 - fz) * s[i, j, k] + fz * s[i, j, k1]) + fy * ((1 - fz) * s[i, j1, k] + fz * s[i, j1, k1])
        high = (1 - fy) * ((1 - fz) * s[i1, j, k] + fz * s[i1, j, k1]) + fy * ((1 - fz) * s[i1, j1, k] + fz * s[i1, j1, k1])
        return (1 - fx) * low + fx * high

    def compose_index(first, second, out):  # pragma: no cover - compiled
        # out(x) = first(x) + second(x + first(x)), all (C, X, Y, Z) in voxel units
        C, X, Y, Z = first.shape
        for x in numba.prange(X):
            for y in range(Y):
                for z in range(Z):
                    i, j, k, i1, j1, k1, fx, fy, fz = cell(x + first[0, x, y, z], y + first[1, x, y, z],
                                                           z + first[2, x, y, z] if C == 3 else 0.0, X, Y, Z)
                    for c in range(C):
                        out[c, x, y, z] = first[c, x, y, z] + blend(second[c], i, j, k, i1, j1, k1, fx, fy, fz)

    def bounds_index(u, speeds, slopes, products):  # pragma: no cover - compiled
        # per x-slab: max |u|^2 (voxels), max |difference of a component to the next voxel along any
        # axis| and max of |u| times that difference at the same voxel
        C, X, Y, Z = u.shape
        for x in numba.prange(X):
            speed, slope, product = 0.0, 0.0, 0.0
            for y in range(Y):
                for z in range(Z):
                    norm, here = 0.0, 0.0
                    for c in range(C):
                        value = u[c, x, y, z]
                        norm += value * value
                        if x + 1 < X:
                            here = max(here, abs(u[c, x + 1, y, z] - value))
                        if y + 1 < Y:
                            here = max(here, abs(u[c, x, y + 1, z] - value))
                        if z + 1 < Z:
                            here = max(here, abs(u[c, x, y, z + 1] - value))
                    speed, slope = max(speed, norm), max(slope, here)
                    product = max(product, np.sqrt(norm) * here)
            speeds[x], slopes[x], products[x] = speed, slope, product

    def sample_index(field, index, out):  # pragma: no cover - compiled
        # out[c, p] = field[c] trilinearly at the voxel index `index[p]` (D = 2 or 3 columns)
        C, X, Y, Z = field.shape
        P, D = index.shape
        for p in numba.prange(P):
            i, j, k, i1, j1, k1, fx, fy, fz = cell(index[p, 0], index[p, 1], index[p, 2] if D == 3 else 0.0, X, Y, Z)
            for c in range(C):
                out[c, p] = blend(field[c], i, j, k, i1, j1, k1, fx, fy, fz)

    def min_det_index(u, corners, mins):  # pragma: no cover - compiled
        # per x-slab: min of det(I + grad u) (u in voxels) by central differences (one-sided at the
        # borders, as torch.gradient) and, with `corners`, also by every combination of forward /
        # backward differences (the Jacobians of the linear interpolant in the 2^d cells around the
        # voxel). C = 2: the 2x2 determinant of the first two axes.
        C, X, Y, Z = u.shape
        for xp in numba.prange(X):
            x = np.int64(xp)        # prange's index is unsigned: mixed with signed ints it gives floats
            low = np.inf
            fwd = np.zeros((3, 3))
            bwd = np.zeros((3, 3))
            jac = np.zeros((3, 3))
            for y in range(Y):
                for z in range(Z):
                    for a in range(C):
                        at = x if a == 0 else (y if a == 1 else z)
                        n = X if a == 0 else (Y if a == 1 else Z)
                        lo, hi = max(at - 1, 0), min(at + 1, n - 1)
                        for c in range(C):
                            here = u[c, x, y, z]
                            if a == 0:
                                before, after = u[c, lo, y, z], u[c, hi, y, z]
                            elif a == 1:
                                before, after = u[c, x, lo, z], u[c, x, hi, z]
                            else:
                                before, after = u[c, x, y, lo], u[c, x, y, hi]
                            jac[c, a] = (after - before) / max(hi - lo, 1)
                            fwd[c, a] = after - here if hi > at else here - before
                            bwd[c, a] = here - before if lo < at else after - here
                    for m in range(1 + (2 ** C if corners else 0)):
                        if m > 0:
                            for a in range(C):
                                source = fwd if ((m - 1) >> a) & 1 else bwd
                                for c in range(C):
                                    jac[c, a] = source[c, a]
                        a00, a01, a10, a11 = jac[0, 0] + 1.0, jac[0, 1], jac[1, 0], jac[1, 1] + 1.0
                        if C == 2:
                            det = a00 * a11 - a01 * a10
                        else:
                            a02, a12 = jac[0, 2], jac[1, 2]
                            a20, a21, a22 = jac[2, 0], jac[2, 1], jac[2, 2] + 1.0
                            det = a00 * (a11 * a22 - a12 * a21) - a01 * (a10 * a22 - a12 * a20) \
                                + a02 * (a10 * a21 - a11 * a20)
                        low = min(low, det)
            mins[x] = low

    return {fn.__name__: numba_variants(fn) for fn in (compose_index, bounds_index, sample_index, min_det_index)}


def _as_3d(field: torch.Tensor) -> torch.Tensor:
    return field.unsqueeze(-1) if field.dim() == 3 else field


def _fast(*tensors: torch.Tensor) -> bool:
    """True when the numba kernels can take these tensors (CPU float, no autograd, numba present)."""
    return (all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and _kernels() is not None)


def _to_voxels(field: torch.Tensor, grid: Grid) -> torch.Tensor:
    """World-unit vectors `(d, *S)` -> voxel-index units (`M^{-1} v`, M = direction diag(spacing))."""
    return torch.einsum("ij,j...->i...", torch.linalg.inv(grid.matrix).to(field), field)


def velocity_bounds(velocity: torch.Tensor, grid: Grid) -> tuple[float, float, float]:
    """(speed, slope, product) of `velocity: (d, *S)` (world units) in voxel units: max |v|, the
    largest difference of a component between neighbouring voxels, and the largest |v(x)| times
    that difference at the same voxel x (the first-order error term of `x + v / 2^N`), which
    `StationaryVelocityField.squarings` bounds. One compiled pass on the CPU (numba), else torch."""
    u = _to_voxels(velocity.detach(), grid)
    if _fast(u):
        u3 = _as_3d(u).contiguous()
        out = torch.zeros(3, u3.shape[1], dtype=torch.float64)
        run_numba(_kernels()["bounds_index"], u3.numpy(), *out.numpy())
        speed, slope, product = out.amax(1).tolist()
        return speed ** 0.5, slope, product
    norm = u.norm(dim=0)                                                              # (*S)
    local = torch.zeros_like(norm)
    for a in range(1, u.dim()):
        if u.shape[a] > 1:
            diff = torch.diff(u, dim=a).abs().amax(0)
            local = torch.maximum(local, torch.cat([diff, torch.zeros_like(diff.narrow(a - 1, 0, 1))], a - 1))
    return float(norm.max()), float(local.max()), float((norm * local).max())


def _central_min_det(u: torch.Tensor) -> float:
    """min of det(I + J) over the voxels, J by central differences (one-sided at the borders, as
    `torch.gradient` and `shapeflow.regularizers.jacobian_determinant`). u: (d, *S) in voxels."""
    d = u.shape[0]
    J = torch.stack(torch.gradient(u, dim=list(range(1, d + 1))), 1)                  # (d, d, *S): J[c, a]
    J = J + torch.eye(d, dtype=u.dtype).view(d, d, *([1] * d))
    return float(torch.linalg.det(J.movedim(0, -1).movedim(0, -1)).min())


def _one_sided_min_det(u: torch.Tensor) -> float:
    """min of det(I + J) over the voxels and every choice of forward / backward differences per
    axis (torch; the reference of the compiled pass). u: (d, *S) in voxels."""
    d = u.shape[0]
    sides = []
    for a in range(d):
        diff = torch.diff(u, dim=1 + a) if u.shape[1 + a] > 1 else torch.zeros_like(u)
        first, last = diff.narrow(1 + a, 0, 1), diff.narrow(1 + a, diff.shape[1 + a] - 1, 1)
        sides.append((torch.cat([diff, last], 1 + a), torch.cat([first, diff], 1 + a)) if u.shape[1 + a] > 1
                     else (diff, diff))                                         # (forward, backward) (d, *S)
    low = math.inf
    for m in range(2 ** d):
        J = torch.stack([sides[a][(m >> a) & 1] for a in range(d)], 1) + torch.eye(d, dtype=u.dtype).view(
            d, d, *([1] * d))                                                   # (d, d, *S): J[c, a]
        low = min(low, float(torch.linalg.det(J.movedim(0, -1).movedim(0, -1)).min()))
    return low


def min_jacobian_determinant(field: torch.Tensor, grid: Grid, corners: bool = False) -> float:
    """min over the voxels of `det(I + grad u)` for a displacement `field: (d, *S)` in world units
    on `grid`: the same central differences as `shapeflow.regularizers.jacobian_determinant` (the
    determinant does not depend on the axes it is taken in). `corners`: also the one-sided
    differences of the 2^d cells around each voxel (the linear interpolant's Jacobians, which a
    finer grid's central differences see). One compiled pass on the CPU (numba)."""
    u = _to_voxels(field.detach(), grid)
    if not (_fast(u) and min(grid.shape) > 1):
        low = _central_min_det(u) if min(grid.shape) > 1 else math.inf
        return min(low, _one_sided_min_det(u)) if corners else low
    mins = torch.empty(grid.shape[0], dtype=torch.float64)
    run_numba(_kernels()["min_det_index"], _as_3d(u).contiguous().numpy(), bool(corners), mins.numpy())
    return float(mins.min())


def scaling_and_squaring(velocity: torch.Tensor, grid: Grid, squarings: int) -> torch.Tensor:
    """Displacement of `exp(velocity)`: `u <- u + u(x + u)` `squarings` times from `velocity / 2^N`.

    velocity: (d, *S) world units on `grid`; returns (d, *S), the same as `squarings` calls of
    `compose_displacements(u, u, grid)`. The squarings run in voxel-index units (the map world ->
    index is linear, so composition commutes with it). On the CPU without autograd each squaring
    is one compiled pass (numba: trilinear self-composition, border padding); otherwise, and
    whenever gradients are needed, `F.grid_sample` in its normalised coordinates (the same numbers;
    tests compare them).
    """
    d = grid.dim
    u = _to_voxels(velocity, grid) / 2**squarings                                          # voxels (d, *S)
    if squarings and _fast(u):
        u, spare = _as_3d(u).contiguous(), torch.empty((d, *grid.shape) + ((1,) if d == 2 else ()),
                                                        dtype=u.dtype)
        kernel = _kernels()["compose_index"]
        for _ in range(squarings):
            run_numba(kernel, u.numpy(), u.numpy(), spare.numpy())
            u, spare = spare, u
        u = u[..., 0] if d == 2 else u
    elif squarings:
        size = torch.tensor(grid.shape, dtype=velocity.dtype, device=velocity.device)
        scale = (2.0 / (size - 1).clamp_min(1)).reshape(d, *([1] * d))                     # index -> [-1, 1]
        u = u * scale
        axes = [torch.linspace(-1.0, 1.0, n, dtype=velocity.dtype, device=velocity.device) if n > 1
                else torch.zeros(1, dtype=velocity.dtype, device=velocity.device) for n in grid.shape]
        identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))                        # (d, *S)
        for _ in range(squarings):
            where = (identity + u).movedim(0, -1).flip(-1)[None]                           # grid_sample's (x, y, z)
            u = u + F.grid_sample(u[None], where, mode="bilinear", padding_mode="border", align_corners=True)[0]
        u = u / scale
    return torch.einsum("ij,j...->i...", grid.matrix.to(velocity), u)


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
