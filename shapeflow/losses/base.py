"""The base classes of data terms: one per role, with a fixed call signature.

* `PointLoss`: `(source (N, d), target (M, d)) -> 0-d`, between point sets. It brings its own
  keyword options (`Options`, a dataclass of `register()` options only it reads) and its fitting
  plan (`stages`, made from the two shapes): the shape pipeline needs no case per loss. A loss
  with `needs_cells` (the varifold, currents) reads the shapes' faces or edges (`shape.cells`)
  and is fitted on every point, in order.
* `ImageResidual` (`residuals.py`): what a Gauss-Newton image registration takes its residual on.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from ..shapes import PointCloud

__all__ = ["PointLoss", "Stage"]


@dataclass
class Stage:
    """One stage of a shape fit: `loss` on `points` points per shape (None: every point, in
    order, as correspondence needs), for `iterations` Adam steps at `lr_scale` times the step size."""

    name: str
    loss: "PointLoss"
    points: int | None
    iterations: int
    lr_scale: float = 1.0

    @property
    def label(self) -> str:
        return f"{self.name} ({self.loss.name})"


class PointLoss(nn.Module, abc.ABC):
    """A data term between point sets; subclasses implement `forward` and may override `stages`."""

    #: the registry name (set by `register`'s LOSSES)
    name: ClassVar[str] = ""
    #: True when the term needs point-to-point correspondence (source and target in order, N == M)
    correspondence: ClassVar[bool] = False
    #: how a fit pairs points for this term: "closest" (both ways), "corresponding" (point i with
    #: point i), "transport" (soft: barycentres of a transport plan; the linear models' closed-form
    #: steps and a flow's EM), or None (not a sum over point pairs)
    pairing: ClassVar[str | None] = None
    #: True when the term needs the shapes' cells (a Mesh's faces, a Curve's edges), the same
    #: kind on both; `register()` refuses point clouds for it
    needs_cells: ClassVar[bool] = False

    @dataclass
    class Options:
        """The `register()` options this loss reads (none by default)."""

    @abc.abstractmethod
    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`source: (N, d)`, `target: (M, d)` -> 0-d tensor."""

    @classmethod
    def build(cls, options: Any) -> "PointLoss":
        """An instance for `options` (this class's `Options`)."""
        return cls()

    @classmethod
    def stages(cls, options: Any, iterations: int, source: "PointCloud", target: "PointCloud") -> list[Stage]:
        """The fitting plan for `source` onto `target` (shapes: `PointCloud`, `Mesh`, `Curve`, ...;
        `len()` gives their point counts): by default one stage on every point (correspondence) or
        on a subsample of `options.subsample` points per shape when the options have one."""
        points = None if cls.correspondence else getattr(options, "subsample", None)
        return [Stage("fine", cls.build(options), points, iterations)]

    @classmethod
    def soft_pairs(cls, options: Any, source: torch.Tensor, target: torch.Tensor) -> "PointLoss | None":
        """The loss whose soft correspondences (its `pairing`) a flow's EM fit follows instead of
        Adam's stages, for these shapes (`source: (N, d)`, `target: (M, d)`, normalised) and these
        options, or None (the default): Adam."""
        return None

    @classmethod
    def more_robust(cls, options: Any, given: set[str]) -> "tuple[Any, str] | None":
        """`(options, what changed)` for a refit when a non-linear fit with these options folded
        space (typically a part of the source with no counterpart crushed into the target), or
        None: no refit. Only options the user left at their defaults may change (`given`: the
        names passed to `register`)."""
        return None
