"""Deformations stored on a regular grid: `DisplacementField` and `StationaryVelocityField`.

Both live on a grid in world space (usually the fixed image's) and map world points
`(N, d) -> (N, d)`, so images, labels, points and landmarks are all moved by the same map.
Either holds its parameters on a control grid with a `stride` (1 = one per voxel); the dense field
is its cubic B-spline interpolation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InverseError, ShapeflowError
from ..grids import Grid, bspline_upsample, control_shape, sample, scaling_and_squaring, velocity_bounds
from ..regularizers import grid_diffusion
from .base import Deformation, register_deformation

__all__ = ["DisplacementField", "StationaryVelocityField"]


class _GridDeformation(Deformation):
    """Shared parts: the grid, the control parameters and sampling of the dense field."""

    #: True when the continuous map is orientation preserving for every parameter value; the image
    #: pipeline still rejects Gauss-Newton steps that fold the discrete map, for every model
    diffeomorphic: ClassVar[bool] = False

    def __init__(self, grid: Grid | dict, stride: int = 1):
        super().__init__()
        self.grid = grid if isinstance(grid, Grid) else Grid.from_config(grid)
        self.dim = self.grid.dim
        self.stride = int(stride)
        self.control = nn.Parameter(torch.zeros(self.dim, *control_shape(self.grid.shape, self.stride)))

    @dataclass
    class Options:
        """`register()` options of the grid models."""

        stride: int = 1                 # control-grid stride (1: one vector per voxel)

        def __post_init__(self):
            if not isinstance(self.stride, int) or isinstance(self.stride, bool) or self.stride < 1:
                raise ShapeflowError(f"register(): stride must be an int >= 1, got {self.stride!r}")

    @classmethod
    def build(cls, domain: Grid, options: Any = None, seed: int = 0) -> "_GridDeformation":
        return cls(domain, stride=(options or cls.Options()).stride)

    def config(self) -> dict[str, Any]:
        return {"grid": self.grid.config(), "stride": self.stride}

    def set_dense(self, field: torch.Tensor) -> None:
        """Set the parameters from a dense parameter field `(d, *S)` (stride 1 only)."""
        if self.stride != 1:
            raise NotImplementedError("set_dense() needs stride=1")
        with torch.no_grad():
            self.control.zero_()
            self.control[(slice(None),) + tuple(slice(1, 1 + n) for n in self.grid.shape)] = field

    def field_of(self, parameters: torch.Tensor) -> torch.Tensor:
        """The displacement `(d, *S)` this model gives for a dense parameter field `(d, *S)`."""
        raise NotImplementedError

    def checked_fields(self, parameters: torch.Tensor, field: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The displacements `(d, *S)` that must not fold for the dense `parameters` (whose own
        displacement is `field`): the map itself, and for a model with an exact inverse the inverse."""
        return (field,)

    def energy(self, points=None) -> torch.Tensor:
        """Diffusion energy `u^T L u / N` of the dense parameter field (L: the grid Laplacian)."""
        dense = self.dense()
        return grid_diffusion(dense, self.grid.spacing.tolist()) / dense[0].numel()

    def dense(self, control: torch.Tensor | None = None) -> torch.Tensor:
        """The parameter field interpolated to every voxel: `(d, *S)`."""
        return bspline_upsample(self.control if control is None else control, self.stride, self.grid.shape)

    def field(self) -> torch.Tensor:
        """The displacement `phi(x) - x` at every voxel of the grid: `(d, *S)` in world units.

        Outside autograd the field is kept until the parameters change (in place or moved), so
        warping an image, the metrics and the landmarks of one result share one computation."""
        if torch.is_grad_enabled():
            return self.field_of(self.dense())
        key = (self.control._version, self.control.data_ptr(), self.control.dtype, self.control.device)
        cached = self.__dict__.get("_field_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.field_of(self.dense()))
            self.__dict__["_field_cache"] = cached
        return cached[1]

    def _displace(self, displacement: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        flat = points.reshape(-1, self.dim)
        return (flat + sample(displacement, self.grid, flat).T).reshape(points.shape)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self._displace(self.field(), points)


@register_deformation
class DisplacementField(_GridDeformation):
    """`phi(x) = x + u(x)` with `u: (d, *S)` in world units, linearly interpolated between voxels
    (and clamped to the border value outside the grid)."""

    def field_of(self, parameters: torch.Tensor) -> torch.Tensor:
        return parameters

    def inverse(self, points: torch.Tensor, tol: float = 1e-4, max_iter: int = 100) -> torch.Tensor:
        """Solve `x + u(x) = y` by the fixed-point iteration `x <- y - u(x)` (converges while the
        field is a contraction, |grad u| < 1); raises `InverseError` otherwise. `tol` in voxels."""
        y = points
        u = self.field().detach()
        voxel = float(self.grid.spacing.min())
        with torch.no_grad():
            x = y.clone()
            for _ in range(max_iter):
                x_new = y - sample(u, self.grid, x.reshape(-1, self.dim)).T.reshape(y.shape)
                step = float((x_new - x).abs().max())
                x = x_new
                if step < tol * voxel:
                    break
            residual = float((self._displace(u, x) - y).abs().max())
        if not math.isfinite(residual) or residual > 10 * tol * voxel:
            raise InverseError(f"DisplacementField.inverse(): no convergence (residual {residual:.3g} mm); "
                               "the field folds or is not a contraction")
        return x


@register_deformation
class StationaryVelocityField(_GridDeformation):
    """`phi = exp(v)`: the flow for unit time of the stationary velocity `v: (d, *S)`, by scaling and
    squaring. The number of squarings (`squarings`) keeps each first step's Jacobian small enough
    that every step, and so the composition, is orientation preserving, and the error of the
    first step a fraction of a voxel. The inverse is `exp(-v)`; the trajectory is `exp(t v)`."""

    diffeomorphic = True

    def __init__(self, grid: Grid | dict, stride: int = 1, max_squarings: int = 12):
        super().__init__(grid, stride)
        self.max_squarings = int(max_squarings)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "max_squarings": self.max_squarings}

    def squarings(self, velocity: torch.Tensor) -> int:
        """The fewest N (at most `max_squarings`) with `2^N >= max(2 p, 2 d g, 1)`, g = the largest
        difference of a component of v between neighbouring voxels and p = the largest |v(x)| times
        that difference at the same voxel, both in voxels (`grids.velocity_bounds`).

        `2 d g / 2^N <= 1` keeps every entry of the first step's Jacobian at most 1/(2d), so its
        norm is at most 1/2 and each step, and so the composition, is orientation preserving
        (trilinear interpolation's derivatives are convex combinations of those differences).
        That argument is about maps; the squarings compose linearly interpolated fields on the grid,
        and a rough velocity can make that discrete map fold anyway (the image pipeline checks every
        step). `2 p / 2^N <= 1` bounds the error of `x + v / 2^N` for `exp(v / 2^N)`, which halves with
        each squaring: measured at most 0.4 p / 2^N voxels on smooth fields (under 0.2 voxel
        here), 0.06 voxel on a registered brain's velocity. A small or slowly varying velocity
        takes few squarings (a constant one none: its flow is exactly the translation).
        """
        _, slope, product = velocity_bounds(velocity, self.grid) if velocity.numel() else (0.0, 0.0, 0.0)
        need = max(2 * product, 2 * self.dim * slope, 1.0)
        return min(int(math.ceil(math.log2(need))), self.max_squarings)

    def exponential(self, velocity: torch.Tensor) -> torch.Tensor:
        """Displacement of `exp(velocity)` on the grid: `(d, *S)`."""
        return scaling_and_squaring(velocity, self.grid, self.squarings(velocity))

    def field_of(self, parameters: torch.Tensor) -> torch.Tensor:
        return self.exponential(parameters)

    def checked_fields(self, parameters: torch.Tensor, field: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return field, self.exponential(-parameters)

    def inverse(self, points: torch.Tensor) -> torch.Tensor:
        """`exp(-v)(points)`: `(N, d) -> (N, d)`."""
        return self._displace(self.exponential(-self.dense()), points)

    def trajectory(self, points: torch.Tensor, steps: int = 10) -> torch.Tensor:
        """`exp(t v)(points)` for t = 0, 1/steps, ..., 1: `(N, d)` -> `(steps + 1, N, d)`."""
        v = self.dense()
        return torch.stack([self._displace(self.exponential(t * v), points)
                            for t in torch.linspace(0, 1, steps + 1).tolist()])
