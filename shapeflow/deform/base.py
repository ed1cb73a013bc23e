"""The deformation interface shared by every model, and its safe save/load.

A `Deformation` maps points `(N, d) -> (N, d)`. Every model also gives its trajectory over
t in [0, 1], its own energy (a regulariser), and where one exists, its inverse. A NumPy array in
gives a NumPy array out. `save(path)` stores a JSON config plus tensors (loaded with
`torch.load(weights_only=True)`, so no arbitrary object is unpickled).
"""
from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .._files import atomic_write
from ..errors import ShapeflowError

__all__ = ["Deformation", "load_deformation", "register_deformation", "DEFORMATIONS"]

#: every concrete deformation class by name, for loading saved files
DEFORMATIONS: dict[str, type["Deformation"]] = {}

_FORMAT = "shapeflow-deformation/1"


def register_deformation(cls: type["Deformation"]) -> type["Deformation"]:
    """Class decorator: make `cls` loadable by `load_deformation`."""
    DEFORMATIONS[cls.__name__] = cls
    return cls


class Deformation(nn.Module, abc.ABC):
    """A map of points `x: (N, d) -> phi(x): (N, d)`.

    Subclasses implement `forward` and `config` (the JSON-able constructor arguments) and, where
    they can, `trajectory`, `energy` and `inverse`.
    """

    dim: int
    #: True for maps with a closed-form parameterised inverse (rigid, affine)
    linear: ClassVar[bool] = False

    @abc.abstractmethod
    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Map `points: (N, d)` to `(N, d)`."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this deformation (before its state is loaded)."""

    def __call__(self, points):  # NumPy in, NumPy out
        if isinstance(points, np.ndarray):
            with torch.no_grad():
                x = torch.as_tensor(points, dtype=self._dtype(), device=self._device())
                return super().__call__(x).cpu().numpy().astype(points.dtype, copy=False)
        return super().__call__(points)

    def trajectory(self, points: torch.Tensor, steps: int = 10) -> torch.Tensor:
        """Positions at t = 0, 1/steps, ..., 1: `(steps + 1, N, d)`.

        The default is the straight path from `x` to `phi(x)`; flows override it with their own.
        """
        x = _as_tensor(points, self)
        t = torch.linspace(0, 1, steps + 1, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x + t * (self.forward(x) - x)

    def energy(self, points: torch.Tensor | None = None) -> torch.Tensor:
        """The model's own regulariser (kinetic energy for flows); 0 for models without one."""
        return torch.zeros((), dtype=self._dtype(), device=self._device())

    def inverse(self, points: torch.Tensor) -> torch.Tensor:
        """`phi^{-1}(points)`; raises `InverseError` if it cannot be computed reliably."""
        raise NotImplementedError(f"{type(self).__name__} has no inverse")

    # --- persistence -------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Deformation":
        """Build an instance from `config()` output (state not loaded)."""
        return cls(**config)

    def describe(self) -> dict[str, Any]:
        """A JSON-able tree: class name and config (children described recursively)."""
        return {"type": type(self).__name__, "config": self.config()}

    def save(self, path: str | os.PathLike) -> Path:
        """Write this deformation to `path` (atomically). Load it back with `load_deformation`."""
        path = Path(path)
        payload = {"format": _FORMAT, "model": json.dumps(self.describe()),
                   "state": {k: v.detach().cpu() for k, v in self.state_dict().items()}}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        return path

    # --- helpers -----------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        for t in list(self.parameters()) + list(self.buffers()):
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    def _device(self) -> torch.device:
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")


def _as_tensor(points, module: Deformation) -> torch.Tensor:
    if isinstance(points, np.ndarray):
        return torch.as_tensor(points, dtype=module._dtype(), device=module._device())
    return points


def build_deformation(tree: dict[str, Any]) -> Deformation:
    """Rebuild a deformation (without its state) from `Deformation.describe()` output."""
    name = tree.get("type")
    if name not in DEFORMATIONS:
        raise ShapeflowError(f"unknown deformation type {name!r}; known: {', '.join(sorted(DEFORMATIONS))}")
    return DEFORMATIONS[name].from_config(tree["config"])  # type: ignore[attr-defined]


def load_deformation(path: str | os.PathLike) -> Deformation:
    """Load a deformation written by `Deformation.save` (safe: tensors and JSON only)."""
    path = Path(path)
    if not path.is_file():
        raise ShapeflowError(f"{path}: no such deformation file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError("not a shapeflow deformation")
        model = build_deformation(json.loads(payload["model"]))
        model.load_state_dict(payload["state"])
    except ShapeflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is not ours
        raise ShapeflowError(f"{path}: not a readable shapeflow deformation ({type(exc).__name__})") from None
    return model.eval()
