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
        # the centres stay float64 whatever `.to(dtype)` does to `inner` (see `_apply`): a shape a
        # unit across at 1e6 from the origin keeps its detail only in float64 world coordinates
        self.register_buffer("source_center", (zeros.clone() if source_center is None
                                               else source_center.detach().clone()).double())
        self.register_buffer("target_center", (zeros.clone() if target_center is None
                                               else target_center.detach().clone()).double())
        self.scale = float(scale)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in ("source_center", "target_center"):     # moved to the new device, kept in float64
            self._buffers[name] = self._buffers[name].double()
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point type of `inner`'s parameters (the centres are always float64)."""
        return self.inner.dtype

    def input_dtype(self, given: torch.dtype) -> torch.dtype:
        """NumPy points keep float64: the centring is done in it before `inner`'s dtype."""
        return torch.float64 if given == torch.float64 else self.dtype

    def config(self) -> dict[str, Any]:
        return {"inner": self.inner.describe(), "scale": self.scale}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Normalized":
        return cls(build_deformation(config["inner"]), scale=config["scale"])

    def to_inner(self, points: torch.Tensor) -> torch.Tensor:
        """World points of the source `(N, d)` (any float dtype) -> the normalised coordinates
        `inner` works in, in `inner`'s dtype (centred in float64 first)."""
        return ((points.double() - self.source_center) / self.scale).to(self.dtype)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """`points: (N, d) -> (N, d)` in the points' dtype (the world offset added in float64)."""
        return (self.scale * self.inner(self.to_inner(points)).double() + self.target_center).to(points.dtype)

    def trajectory(self, points: torch.Tensor, steps: int = 10) -> torch.Tensor:
        """`points: (N, d)` -> `(steps + 1, N, d)`: `inner`'s path, with the centre moving linearly."""
        path = self.inner.trajectory(self.to_inner(points), steps).double()
        t = torch.linspace(0, 1, path.shape[0], dtype=torch.float64, device=points.device).view(-1, 1, 1)
        out = self.scale * path + self.source_center + t * (self.target_center - self.source_center)
        return out.to(points.dtype)

    def energy(self, points: torch.Tensor | None = None) -> torch.Tensor:
        """`inner`'s energy of `points: (N, d)` taken to its normalised coordinates."""
        return self.inner.energy(None if points is None else self.to_inner(points))

    def inverse(self, points: torch.Tensor) -> torch.Tensor:
        """`phi^{-1}(points)`: `(N, d) -> (N, d)`, by `inner`'s inverse."""
        inner = ((points.double() - self.target_center) / self.scale).to(self.dtype)
        return (self.scale * self.inner.inverse(inner).double() + self.source_center).to(points.dtype)
