"""Rigid, similarity and affine maps in 2D or 3D: `phi(x) = x @ matrix.T + translation`.

Rotations are parameterised by the exponential of a skew-symmetric matrix (one angle in 2D,
an axis-angle vector in 3D), so every parameter vector is a valid rotation and t * params gives
the geodesic path used by `trajectory`.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import ShapeflowError
from .base import Deformation, _as_tensor, register_deformation

__all__ = ["Rigid", "Similarity", "Affine"]


def _check_dim(dim: int, who: str) -> int:
    if dim not in (2, 3):
        raise ShapeflowError(f"{who}: dim must be 2 or 3, got {dim}")
    return dim


def _skew(params: torch.Tensor, dim: int) -> torch.Tensor:
    """Skew-symmetric (d, d) matrix with `-params` above the diagonal (so in 2D a positive
    parameter turns counter-clockwise)."""
    out = params.new_zeros(dim, dim)
    rows, cols = torch.triu_indices(dim, dim, offset=1)
    return out.index_put((rows, cols), -params).index_put((cols, rows), params)


def _rotation(params: torch.Tensor, dim: int) -> torch.Tensor:
    """`exp(skew(params))`, a (d, d) rotation, evaluated in float64 for accuracy."""
    return torch.linalg.matrix_exp(_skew(params.double(), dim)).to(params.dtype)


@register_deformation
class Rigid(Deformation):
    """Rotation and translation. `rotation: (d, d)`, `translation: (d,)`, `scale` = 1."""

    linear = True

    def __init__(self, dim: int = 3):
        super().__init__()
        self.dim = _check_dim(dim, type(self).__name__)
        self.rotation_params = nn.Parameter(torch.zeros(dim * (dim - 1) // 2))
        self.translation = nn.Parameter(torch.zeros(dim))

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim}

    def _log_scale(self) -> torch.Tensor:
        return self.translation.new_zeros(())

    @property
    def rotation(self) -> torch.Tensor:
        """The rotation matrix `(d, d)`."""
        return _rotation(self.rotation_params, self.dim)

    @property
    def scale(self) -> torch.Tensor:
        """The isotropic scale factor (a 0-d tensor; 1 for `Rigid`)."""
        return self._log_scale().exp()

    @property
    def matrix(self) -> torch.Tensor:
        """The linear part `(d, d)`: scale * rotation."""
        return self.scale * self.rotation

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return points @ self.matrix.T + self.translation

    def trajectory(self, points: torch.Tensor, steps: int = 10) -> torch.Tensor:
        """Along the geodesic: rotation angle, log-scale and translation grow linearly in t."""
        x = _as_tensor(points, self)
        frames = []
        for t in torch.linspace(0, 1, steps + 1).tolist():
            rot = _rotation(t * self.rotation_params, self.dim)
            frames.append(x @ (torch.exp(t * self._log_scale()) * rot).T + t * self.translation)
        return torch.stack(frames)

    def inverse(self, points: torch.Tensor) -> torch.Tensor:
        x = _as_tensor(points, self)
        return torch.linalg.solve(self.matrix, (x - self.translation).T).T

    def conjugated(self, source_center: torch.Tensor, target_center: torch.Tensor, scale: float):
        """The same map expressed in world units: `x -> scale * phi((x - c_s) / scale) + c_t`.

        Used to undo the normalisation applied before fitting; the linear part is unchanged.
        """
        out = copy.deepcopy(self)
        with torch.no_grad():
            out.translation.copy_(target_center + scale * self.translation - source_center @ self.matrix.T)
        return out


@register_deformation
class Similarity(Rigid):
    """Rotation, isotropic scale and translation."""

    def __init__(self, dim: int = 3):
        super().__init__(dim)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def _log_scale(self) -> torch.Tensor:
        return self.log_scale


@register_deformation
class Affine(Rigid):
    """A general linear map plus translation. `matrix: (d, d)` is a free parameter."""

    def __init__(self, dim: int = 3):
        Deformation.__init__(self)
        self.dim = _check_dim(dim, type(self).__name__)
        self.linear_part = nn.Parameter(torch.eye(dim))
        self.translation = nn.Parameter(torch.zeros(dim))

    @property
    def matrix(self) -> torch.Tensor:
        return self.linear_part

    @property
    def rotation(self) -> torch.Tensor:
        """The rotation of the polar decomposition `matrix = rotation @ stretch`."""
        u, _, vh = torch.linalg.svd(self.linear_part)
        d = torch.sign(torch.linalg.det(u @ vh))
        u = torch.cat([u[:, :-1], u[:, -1:] * d], dim=1)
        return u @ vh

    @property
    def scale(self) -> torch.Tensor:
        """The geometric-mean scale `|det matrix|^(1/d)`."""
        return torch.linalg.det(self.linear_part).abs() ** (1.0 / self.dim)

    def trajectory(self, points: torch.Tensor, steps: int = 10) -> torch.Tensor:
        return Deformation.trajectory(self, points, steps)
