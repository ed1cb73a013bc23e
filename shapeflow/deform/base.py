"""The deformation interface shared by every model, and its safe save/load.

A `Deformation` maps points `(N, d) -> (N, d)`. Every model also gives its trajectory over
t in [0, 1], its own energy (a regulariser), and where one exists, its inverse. `save(path)` stores
a JSON config plus tensors (loaded with `torch.load(weights_only=True)`, so no arbitrary object is
unpickled).

The points decide what comes back (`points_io`, applied to every model by
`Deformation.__init_subclass__`): every public method that takes points (`__call__`/`forward`,
`trajectory`, `inverse`, `energy`, and any other public method with a `points` argument)

* given a NumPy array, computes without autograd in the model's dtype and device and returns
  NumPy arrays in the input's float dtype (float64 for integer input);
* given a tensor, returns tensors and stays differentiable;
* given no points (only `energy()`), returns a read-out: a detached 0-d tensor, so `float()` takes
  it. Pass the points as a tensor for a differentiable energy.

Parameter read-outs (`rotation`, `translation`, `scale`, `matrix`, `linear_part` of the linear
models) are detached as well; fitting works on `parameters()`, which are unchanged.
"""
from __future__ import annotations

import abc
import functools
from dataclasses import dataclass
import inspect
import json
import os
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from .._files import atomic_write
from ..errors import ShapeflowError
from ..sampling import farthest_point_sample

__all__ = ["Deformation", "KineticFlow", "load_deformation", "register_deformation", "points_io", "DEFORMATIONS"]

#: every concrete deformation class by name, for loading saved files
DEFORMATIONS: dict[str, type["Deformation"]] = {}

_FORMAT = "shapeflow-deformation/1"
#: the parameter dtypes a saved deformation may name
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def register_deformation(cls: type["Deformation"]) -> type["Deformation"]:
    """Class decorator: make `cls` loadable by `load_deformation`."""
    DEFORMATIONS[cls.__name__] = cls
    return cls


#: the interface methods whose first argument is the points, whatever it is called
_POINT_METHODS = ("forward", "trajectory", "inverse", "energy")


def points_io(method: Callable) -> Callable:
    """Make a method taking `points` follow the module's rule (see the module docstring).

    `points` is the method's parameter of that name, else its first one after `self`. A NumPy
    array is converted to a tensor in the model's dtype and device and the method runs under
    `torch.no_grad()` (`input_dtype`: float64 points stay float64 for maps that keep world
    coordinates in it); every tensor in the result (nested in tuples and lists too) comes back as
    a NumPy array of the input's float dtype. A tensor passes through untouched. `None` (only
    where the parameter defaults to `None`) runs under `torch.no_grad()`: a detached read-out.
    Idempotent; `Deformation` subclasses get it automatically.
    """
    if getattr(method, "_points_io", False):
        return method
    params = list(inspect.signature(method).parameters.values())[1:]      # without self
    named = [i for i, p in enumerate(params) if p.name == "points"]
    index = named[0] if named else 0
    if not params or params[index].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                 inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise TypeError(f"points_io: {method.__qualname__} takes no positional points argument")
    name, optional = params[index].name, params[index].default is None

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        in_args = index < len(args)
        points = args[index] if in_args else kwargs.get(name, params[index].default)
        if points is None and optional:
            with torch.no_grad():
                return method(self, *args, **kwargs)
        if isinstance(points, torch.Tensor):
            _check_points(points, self, method, name)
            return method(self, *args, **kwargs)
        where = _where(self, method)
        if not isinstance(points, np.ndarray):
            raise ShapeflowError(f"{where}: {name} must be a NumPy array or a torch tensor, "
                                 f"got {type(points).__name__}")
        if points.dtype.kind not in "biuf":
            raise ShapeflowError(f"{where}: {name} must hold real numbers, got dtype {points.dtype}")
        _check_points(points, self, method, name)
        dtype = points.dtype if points.dtype.kind == "f" else np.dtype(np.float64)
        x = torch.as_tensor(points, dtype=self.input_dtype(torch.from_numpy(np.empty(0, dtype)).dtype),
                            device=self.device)
        if in_args:
            args = args[:index] + (x,) + args[index + 1:]
        else:
            kwargs[name] = x
        with torch.no_grad():
            return _to_numpy(method(self, *args, **kwargs), dtype)

    wrapper._points_io = True  # type: ignore[attr-defined]
    return wrapper


def _where(module: "Deformation", method: Callable) -> str:
    """How an error names the call: `Rigid()` or `Rigid.inverse()`."""
    return type(module).__name__ + ("()" if method.__name__ == "__call__" else f".{method.__name__}()")


def _check_points(points, module: "Deformation", method: Callable, name: str) -> None:
    dim = getattr(module, "dim", None)
    if points.ndim < 1 or (dim is not None and points.shape[-1] != dim):
        raise ShapeflowError(f"{_where(module, method)}: {name} must have shape (N, {dim}), "
                             f"got {tuple(points.shape)}")


def _to_numpy(value, dtype: np.dtype):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().astype(dtype, copy=False)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_numpy(v, dtype) for v in value)
    return value


class Deformation(nn.Module, abc.ABC):
    """A map of points `x: (N, d) -> phi(x): (N, d)`.

    Subclasses implement `forward` and `config` (the JSON-able constructor arguments) and, where
    they can, `trajectory`, `energy` and `inverse`, all on tensors: the NumPy handling (`points_io`)
    is added to them, and to every other public method with a `points` argument, when the class
    is defined.
    """

    dim: int
    #: True for maps with a closed-form parameterised inverse (rigid, affine)
    linear: ClassVar[bool] = False
    #: Adam's step size when `register` gets no `lr` (a property of the parameterisation)
    default_lr: ClassVar[float] = 3e-2
    #: parameters and buffers whose size the data sets (in `prepare`): resized to the saved size
    #: when a state is loaded
    data_sized: ClassVar[tuple[str, ...]] = ()
    #: how the shape pipeline fits it: "adam" (first order, through the loss's stages) or
    #: "gauss-newton" (non-rigid ICP on the shared solver core, `pipelines/shape_icp.py`)
    fitted_by: ClassVar[str] = "adam"
    #: the shape loss when `register` gets none
    default_loss: ClassVar[str] = "sinkhorn"
    #: the weight of the model's energy when `register` gets no `regularization`
    default_regularization: ClassVar[float] = 1e-3
    #: True when the map's Jacobian anywhere in space says whether it folds (flows, linear maps);
    #: False for a field known only at the points it was fitted on (`PointDisplacement`)
    ambient_jacobian: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for attr, value in list(vars(cls).items()):
            if not inspect.isfunction(value) or (attr.startswith("_") and attr != "__call__"):
                continue
            if attr in _POINT_METHODS or "points" in inspect.signature(value).parameters:
                setattr(cls, attr, points_io(value))

    @dataclass
    class Options:
        """The `register()` options this model reads (none by default); a model with options of
        its own (`ResNetFlow`: blocks, width, activation) defines its own `Options` dataclass."""

    @classmethod
    def build(cls, domain: Any, options: Any = None, seed: int = 0) -> "Deformation":
        """A new model (the identity map) for `register`: `domain` is the dimension d for shape
        models, the fixed image's `Grid` for grid models; `options` an instance of `cls.Options`."""
        return cls(domain)

    @abc.abstractmethod
    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Map `points: (N, d)` to `(N, d)`."""

    def forward_with_energy(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`phi(points)` and the energy along the way, `points: (N, d)` -> `((N, d), 0-d)`; models
        whose energy comes with the forward pass (flows) compute both at once."""
        return self.forward(points), self.energy(points)

    def prepare(self, points: torch.Tensor, cells: torch.Tensor | None = None) -> None:
        """Called once before fitting with the source points `(N, d)` the model will be fitted on,
        in its own coordinates (normalised, pre-aligned), and the source's cells (a mesh's faces
        (F, 3), or None): a model that needs them (control points, reference points for
        `energy()`, a mesh to live on) takes them here. Nothing by default."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this deformation (before its state is loaded)."""

    @points_io
    def __call__(self, points):
        """`phi(points)`: `(N, d) -> (N, d)`; a NumPy array in gives a NumPy array out."""
        return super().__call__(points)

    @points_io
    def trajectory(self, points: torch.Tensor, steps: int = 10) -> torch.Tensor:
        """Positions of `points: (N, d)` at t = 0, 1/steps, ..., 1: `(steps + 1, N, d)`.

        The default is the straight path from `x` to `phi(x)`; flows override it with their own.
        """
        t = torch.linspace(0, 1, steps + 1, dtype=points.dtype, device=points.device).view(-1, 1, 1)
        return points + t * (self.forward(points) - points)

    @points_io
    def energy(self, points: torch.Tensor | None = None) -> torch.Tensor:
        """The model's own regulariser (kinetic energy for flows), a 0-d value; 0 for models
        without one. `points: (N, d)` as a tensor gives a differentiable tensor, as an array a 0-d
        array; without points it is a detached read-out."""
        return torch.zeros((), dtype=self.dtype, device=self.device)

    @points_io
    def inverse(self, points: torch.Tensor) -> torch.Tensor:
        """`phi^{-1}(points)`: `(N, d) -> (N, d)`; raises `InverseError` if it cannot be computed
        reliably, `NotImplementedError` for models without an inverse."""
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
        payload = {"format": _FORMAT, "model": json.dumps(self.describe()), "dtype": str(self.dtype).removeprefix("torch."),
                   "state": {k: v.detach().cpu() for k, v in self.state_dict().items()}}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
        return path

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.data_sized:
            key = prefix + name
            if key in state_dict:
                current = getattr(self, name)
                empty = torch.empty(state_dict[key].shape, dtype=current.dtype, device=current.device)
                setattr(self, name, nn.Parameter(empty) if isinstance(current, nn.Parameter) else empty)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- where the model lives ---------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The floating-point type of the parameters (the default dtype for a model without any)."""
        for t in list(self.parameters()) + list(self.buffers()):
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    def input_dtype(self, given: torch.dtype) -> torch.dtype:
        """The dtype NumPy points of dtype `given` are converted to: the model's own, except for
        maps that keep float64 world coordinates (`Normalized`, the linear maps)."""
        return self.dtype

    @property
    def device(self) -> torch.device:
        """The device of the parameters (the CPU for a model without any)."""
        for t in list(self.parameters()) + list(self.buffers()):
            return t.device
        return torch.device("cpu")


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
        dtype = payload.get("dtype", "float32")     # files before the field: float32 models
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}")
        model.to(_DTYPES[dtype]).load_state_dict(payload["state"])
        bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise ShapeflowError(f"{path}: the deformation holds NaN or infinite values ({', '.join(bad[:3])})")
    except ShapeflowError as exc:       # a model we do not know, or a bad config: say which file
        message = str(exc)
        raise ShapeflowError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is not ours
        raise ShapeflowError(f"{path}: not a readable shapeflow deformation ({type(exc).__name__})") from None
    return model.eval()


class KineticFlow(Deformation):
    """A flow whose regulariser is its kinetic energy along the paths of points (`ResNetFlow`,
    `NeuralODEFlow`): `prepare` keeps a farthest-point subsample of the source as the reference
    points that `energy()` without points measures the flow on."""

    #: the most reference points kept
    REFERENCE_POINTS: ClassVar[int] = 2000
    data_sized = ("reference_points",)

    def _init_reference(self, dim: int) -> None:
        """Call from `__init__`: an empty `reference_points: (0, d)` buffer."""
        self.register_buffer("reference_points", torch.zeros(0, dim))

    def prepare(self, points: torch.Tensor, cells: torch.Tensor | None = None) -> None:
        """Keep (a farthest-point subsample of) `points: (N, d)` as the reference points."""
        keep = farthest_point_sample(points, self.REFERENCE_POINTS)
        self.reference_points = points[keep].detach().clone()

    def _points_for_energy(self, points: torch.Tensor | None) -> torch.Tensor:
        """`points`, or the reference points when None (an error if there are none)."""
        if points is not None:
            return points
        if self.reference_points.numel() == 0:
            raise ShapeflowError(f"{type(self).__name__}.energy(): no points given and no reference points stored")
        return self.reference_points
