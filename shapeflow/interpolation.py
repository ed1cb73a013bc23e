"""Twice-differentiable interpolation of grid data at world points: cubic B-splines with a scale theta.

`sample` in `shapeflow.grids` resamples with `F.grid_sample`, which has a reverse-mode derivative
(and a double backward) but no forward-mode one, so `torch.func.jacfwd(torch.func.grad(f))`
(forward-over-reverse Hessians) and `torch.func.jvp` fail on it; its bilinear interpolant is also
only C^0 across cells, so a Newton method sees a Hessian that jumps. The interpolants here are
written in plain torch ops (`gather` and polynomial weights), so every `torch.func` transform
composes on them (jvp, vjp, jacfwd of grad, hessian), in the coordinates and in theta.

* `spline_coefficients(data, grid, theta)`: per axis the coefficients c of the cubic B-spline
  `s(t) = sum_k c_k B3(t - k)` (t the voxel index) minimising

      sum_i (s(i) - y_i)^2 + (theta / h^4) int_0^{n-1} s''(t)^2 dt + |E c|^2,

  i.e. `theta int s_xx^2 dx` in world units per unit of `h sum_i` (h: the axis spacing; theta has
  units mm^4). E are two fourth differences of c at the ends (the "not-a-knot" conditions: the third
  derivative does not jump at the first and last inner knot), so at theta = 0 the spline
  interpolates the data exactly and reproduces cubic polynomials; theta > 0 blurs it (a smoothing
  spline, applied axis by axis as a tensor product; linear functions are left unchanged). The
  coefficient array has n + 2 entries per axis (c_{-1} ... c_n) and is differentiable in theta
  (a dense (n+2) x (n+2) solve per axis).
* `spline_sample(coefficients, grid, points, padding)`: s at world points, C^2 in the points inside
  the grid. padding "border" (default, as `grids.sample`): a point outside reads the nearest
  border point (its index clamped); "zeros": the spline itself, which falls to zero two voxels
  beyond the grid (coefficients outside c_{-1..n} are 0), C^2 everywhere.
* `linear_sample(data, grid, points, padding)`: multilinear interpolation, the same numbers as
  `grids.sample(..., padding=padding)`, in plain torch ops.

`INTERPOLATIONS` names them for `register(interpolation=...)`; `Interpolant(data, grid, kind)`
holds the data (and theta) and is called on points.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import torch

from ._registry import Registry
from .errors import ShapeflowError
from .grids import Grid

__all__ = ["spline_coefficients", "spline_sample", "linear_sample", "smooth_spline_matrix", "Interpolant",
           "INTERPOLATIONS"]

#: points sampled per gather batch (keeps the (C, P, 4^d) temporaries small)
CHUNK = 1 << 16


def _check_theta(theta, who: str) -> None:
    """A number theta must be finite and >= 0 (a tensor theta is an internal, differentiated one)."""
    if isinstance(theta, torch.Tensor):
        return
    if isinstance(theta, bool) or not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta >= 0):
        raise ShapeflowError(f"{who}: theta must be a number >= 0, got {theta!r}")


def smooth_spline_matrix(n: int, h: float, theta, dtype=torch.float64, device=None) -> torch.Tensor:
    """The (n+2, n) matrix P(theta) mapping data `y (n,)` on one axis to spline coefficients
    `c (n+2,) = (B^T B + E^T E + theta / h^4 D^T G D)^{-1} B^T y` (see the module docstring).

    B (n, n+2): B-spline values at the nodes (1/6, 4/6, 1/6); D (n, n+2): s'' at the nodes (second
    differences of c); G (n, n): the mass matrix of the piecewise linear s'' on [0, n-1] (so
    `c^T D^T G D c = int s''^2`); E (2, n+2): fourth differences of c at both ends.
    theta: float or 0-d tensor (differentiable). n >= 4.
    """
    if n < 4:
        raise ShapeflowError(f"spline_coefficients(): every axis needs at least 4 voxels, got {n}")
    _check_theta(theta, "spline_coefficients()")
    kw = dict(dtype=dtype, device=device)
    rows = torch.arange(n, device=device)
    B = torch.zeros(n, n + 2, **kw)
    D = torch.zeros(n, n + 2, **kw)
    for offset, (b, d2) in enumerate(((1 / 6, 1.0), (4 / 6, -2.0), (1 / 6, 1.0))):
        B[rows, rows + offset] = b
        D[rows, rows + offset] = d2
    G = torch.zeros(n, n, **kw)
    idx = torch.arange(n - 1, device=device)
    G[idx, idx] += 1 / 3
    G[idx + 1, idx + 1] += 1 / 3
    G[idx, idx + 1] = 1 / 6
    G[idx + 1, idx] = 1 / 6
    E = torch.zeros(2, n + 2, **kw)
    fourth = torch.tensor([1.0, -4.0, 6.0, -4.0, 1.0], **kw)
    E[0, :5] = fourth
    E[1, -5:] = fourth
    A = B.T @ B + E.T @ E
    theta_t = theta if isinstance(theta, torch.Tensor) else torch.tensor(float(theta), **kw)
    A = A + (theta_t.to(**kw) / h ** 4) * (D.T @ G @ D)
    return torch.linalg.solve(A, B.T)


def spline_coefficients(data: torch.Tensor, grid: Grid, theta=0.0) -> torch.Tensor:
    """Cubic B-spline coefficients of `data: (C, *S)` on `grid` at scale `theta` (float or 0-d tensor,
    >= 0; mm^4) -> `(C, *(S + 2))`. Differentiable in `data` and `theta`."""
    if data.dim() != grid.dim + 1 or tuple(data.shape[1:]) != tuple(grid.shape):
        raise ShapeflowError(f"spline_coefficients(): data has shape {tuple(data.shape)}, expected (C, *{grid.shape})")
    out = data
    for axis, (n, h) in enumerate(zip(grid.shape, grid.spacing.tolist())):
        P = smooth_spline_matrix(n, h, theta, data.dtype, data.device)                     # (n+2, n)
        out = torch.tensordot(out, P, dims=([axis + 1], [1])).movedim(-1, axis + 1)
    return out


def _cubic_weights(u: torch.Tensor) -> torch.Tensor:
    """B3 weights of the 4 coefficients j-1..j+2 for the fraction u = t - j in [0, 1): (..., 4)."""
    u2, u3 = u * u, u * u * u
    return torch.stack([(1 - u) ** 3 / 6, (3 * u3 - 6 * u2 + 4) / 6, (-3 * u3 + 3 * u2 + 3 * u + 1) / 6, u3 / 6], -1)


def _tensor_gather(values: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
                   shape: tuple[int, ...]) -> torch.Tensor:
    """sum over the taps of `values (C, *shape)` at per-axis indices `index (P, d, K)` with weights
    `(P, d, K)` (taps outside the array, `valid` False, read 0) -> (C, P)."""
    C, d, K = values.shape[0], index.shape[1], index.shape[2]
    flat = values.reshape(C, -1)
    strides = [math.prod(shape[a + 1:]) for a in range(d)]
    out = 0
    for taps in itertools.product(range(K), repeat=d):
        ok = valid[:, 0, taps[0]]
        where = index[:, 0, taps[0]] * strides[0]
        w = weights[:, 0, taps[0]]
        for a in range(1, d):
            ok = ok & valid[:, a, taps[a]]
            where = where + index[:, a, taps[a]] * strides[a]
            w = w * weights[:, a, taps[a]]
        picked = torch.index_select(flat, 1, torch.where(ok, where, torch.zeros_like(where)))   # (C, P)
        out = out + picked * torch.where(ok, w, torch.zeros_like(w))
    return out


def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    if index.shape[0] <= CHUNK:
        return fn(index)
    return torch.cat([fn(index[i:i + CHUNK]) for i in range(0, index.shape[0], CHUNK)], 1)


PADDINGS = ("border", "zeros")


def _index(grid: Grid, points: torch.Tensor, dtype, padding: str, who: str) -> torch.Tensor:
    """Continuous voxel indices (P, d) of world `points (*P, d)`, clamped to the grid for "border"."""
    if padding not in PADDINGS:
        raise ShapeflowError(f"{who}: unknown padding {padding!r}; choose from {', '.join(PADDINGS)}")
    t = grid.to_index(points.to(dtype)).reshape(-1, grid.dim)
    if padding == "border":
        top = torch.tensor([n - 1 for n in grid.shape], dtype=t.dtype, device=t.device)
        t = torch.minimum(torch.clamp(t, min=0), top)
    return t


def spline_sample(coefficients: torch.Tensor, grid: Grid, points: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """The cubic spline of `coefficients: (C, *(S + 2))` (from `spline_coefficients`, data grid
    `grid` of size S) at world `points: (*P, d)` -> `(C, *P)`. C^2 in the points inside the grid;
    padding "border" or "zeros" (module docstring)."""
    shape = tuple(n + 2 for n in grid.shape)
    if tuple(coefficients.shape[1:]) != shape:
        raise ShapeflowError(f"spline_sample(): coefficients have shape {tuple(coefficients.shape)}, "
                             f"expected (C, *{shape}) for a grid of {grid.shape}")
    t = _index(grid, points, coefficients.dtype, padding, "spline_sample()")            # (P, d)
    size = torch.tensor(shape, device=t.device)

    def one(t: torch.Tensor) -> torch.Tensor:
        j = torch.floor(t.detach())
        u = t - j                                                                          # (P, d)
        index = j.long()[..., None] + torch.arange(4, device=t.device)   # tap k = j - 1 + o at array k + 1
        valid = (index >= 0) & (index < size[None, :, None])
        return _tensor_gather(coefficients, index.clamp(min=0), _cubic_weights(u), valid, shape)

    return _chunked(one, t).reshape(coefficients.shape[0], *points.shape[:-1])


def linear_sample(data: torch.Tensor, grid: Grid, points: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """Multilinear interpolation of `data: (C, *S)` at world `points: (*P, d)` -> `(C, *P)`; outside
    the grid "border" clamps, "zeros" fades to 0 within one voxel (as `grid_sample`'s paddings)."""
    t = _index(grid, points, data.dtype, padding, "linear_sample()")
    size = torch.tensor(grid.shape, device=t.device)

    def one(t: torch.Tensor) -> torch.Tensor:
        j = torch.floor(t.detach())
        u = t - j
        index = j.long()[..., None] + torch.arange(2, device=t.device)                    # (P, d, 2)
        valid = (index >= 0) & (index < size[None, :, None])
        return _tensor_gather(data, index.clamp(min=0), torch.stack([1 - u, u], -1), valid, tuple(grid.shape))

    return _chunked(one, t).reshape(data.shape[0], *points.shape[:-1])


class Interpolant:
    """Grid data as a function of world points (and, for "spline", of the scale theta).

    data: (C, *S) on `grid`; kind: a name in `INTERPOLATIONS`. `interpolant(points, theta=0.0)`
    -> (C, *P) for points (*P, d); theta (float or 0-d tensor) only for "spline" (the coefficients
    are cached per float theta; a tensor theta recomputes them so derivatives in theta flow).
    """

    def __init__(self, data: torch.Tensor, grid: Grid, kind: str = "spline"):
        INTERPOLATIONS.lookup(kind, "Interpolant()")
        self.data, self.grid, self.kind = data, grid, kind
        self._cache: dict[float, torch.Tensor] = {}

    def coefficients(self, theta=0.0) -> torch.Tensor:
        if isinstance(theta, torch.Tensor):
            return spline_coefficients(self.data, self.grid, theta)
        if theta not in self._cache:
            self._cache[theta] = spline_coefficients(self.data, self.grid, theta)
        return self._cache[theta]

    def __call__(self, points: torch.Tensor, theta=0.0) -> torch.Tensor:
        if self.kind == "linear":
            if not (isinstance(theta, (int, float)) and theta == 0):
                raise ShapeflowError("Interpolant(): theta (the blur of the spline) needs kind='spline'")
            return linear_sample(self.data, self.grid, points)
        _check_theta(theta, "Interpolant()")
        return spline_sample(self.coefficients(theta), self.grid, points)


#: the objective interpolations of `register(interpolation=...)`
INTERPOLATIONS: Registry[str] = Registry("interpolation", {"linear": "multilinear, C^0",
                                                            "spline": "cubic B-spline, C^2, scale theta"})
