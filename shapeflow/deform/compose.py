"""Deformations built from others: `Compose` (a sequence) and `Normalized` (a map fitted in
normalised coordinates, expressed in world units)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ShapeflowError
from .base import Deformation, build_deformation, register_deformation

__all__ = ["Compose", "Normalized"]


@register_deformation
class Compose(Deformation):
    """Apply `parts[0]`, then `parts[1]`, ... The trajectory runs through the parts one after
    the other, each over an equal share of [0, 1]."""

    def __init__(self, parts: list[Deformation]):
        super().__init__()
        if not parts:
            raise ShapeflowError("Compose: needs at least one deformation")
        dims = {p.dim for p in parts}
        if len(dims) != 1:
            raise ShapeflowError(f"Compose: parts have different dimensions {sorted(dims)}")
        self.parts = nn.ModuleList(parts)
        self.dim = dims.pop()

    def config(self) -> dict[str, Any]:
        return {"parts": [p.describe() for p in self.parts]}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Compose":
        return cls([build_deformation(tree) for tree in config["parts"]])

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            points = part(points)
        return points

    def trajectory(self, points: torch.Tensor, steps: int = 10) -> torch.Tensor:
        """`points: (N, d)` -> `(steps + 1, N, d)`, through the parts one after the other."""
        x = points
        k = len(self.parts)
        frames = [x[None]]
        for i, part in enumerate(self.parts):
            # frames of this part: those with t in (i/k, (i+1)/k]
            n = round(steps * (i + 1) / k) - round(steps * i / k)
            if n == 0:
                x = part(x)
                continue
            path = part.trajectory(x, n)
            frames.append(path[1:])
            x = path[-1]
        return torch.cat(frames)

    def energy(self, points: torch.Tensor | None = None) -> torch.Tensor:
        """The sum of the parts' energies, each of `points: (N, d)` moved by the parts before it."""
        total = super().energy()
        for part in self.parts:
            total = total + part.energy(points)
            if points is not None:
                points = part(points)
        return total

    def inverse(self, points: torch.Tensor) -> torch.Tensor:
        """`phi^{-1}(points)`: `(N, d) -> (N, d)`, the parts' inverses in reverse order."""
        for part in reversed(self.parts):
            points = part.inverse(points)
        return points


@register_deformation
class Normalized(Deformation):
    """`x -> scale * inner((x - source_center) / scale) + target_center`.

    Registration fits `inner` on shapes centred and scaled to unit size; this wrapper gives the
    same map in the shapes' own units. Its trajectory moves the centre linearly from
    `source_center` to `target_center` while `inner` flows.
    """

    def __init__(self, inner: Deformation, source_center: torch.Tensor | None = None,
                 target_center: torch.Tensor | None = None, scale: float = 1.0):
        super().__init__()
        self.inner, self.dim = inner, inner.dim
        zeros = torch.zeros(inner.dim)
        self.register_buffer("source_center", zeros.clone() if source_center is None else source_center.detach().clone())
        self.register_buffer("target_center", zeros.clone() if target_center is None else target_center.detach().clone())
        self.scale = float(scale)

    def config(self) -> dict[str, Any]:
        return {"inner": self.inner.describe(), "scale": self.scale}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Normalized":
        return cls(build_deformation(config["inner"]), scale=config["scale"])

    def to_inner(self, points: torch.Tensor) -> torch.Tensor:
        """World points of the source -> the normalised coordinates `inner` works in."""
        return (points - self.source_center) / self.scale

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.scale * self.inner(self.to_inner(points)) + self.target_center

    def trajectory(self, points: torch.Tensor, steps: int = 10) -> torch.Tensor:
        """`points: (N, d)` -> `(steps + 1, N, d)`: `inner`'s path, with the centre moving linearly."""
        path = self.inner.trajectory(self.to_inner(points), steps)
        t = torch.linspace(0, 1, path.shape[0], dtype=points.dtype, device=points.device).view(-1, 1, 1)
        return self.scale * path + self.source_center + t * (self.target_center - self.source_center)

    def energy(self, points: torch.Tensor | None = None) -> torch.Tensor:
        """`inner`'s energy of `points: (N, d)` taken to its normalised coordinates."""
        return self.inner.energy(None if points is None else self.to_inner(points))

    def inverse(self, points: torch.Tensor) -> torch.Tensor:
        """`phi^{-1}(points)`: `(N, d) -> (N, d)`, by `inner`'s inverse."""
        return self.scale * self.inner.inverse((points - self.target_center) / self.scale) + self.source_center
