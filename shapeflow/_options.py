"""Keyword options of a registration: checked names, the common fields, device and dtype resolved once.

A pipeline's options are its own dataclass (a subclass of `CommonOptions`) plus the `Options`
dataclass of each component the user chose (the model, the loss): `parse_options` splits the
keywords among them, so an option of another component (`blocks` with `model="rigid"`) is an
error naming the component it belongs to, and an unknown one an error listing the valid names.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ._registry import Registry
from .errors import ShapeflowError

__all__ = ["CommonOptions", "parse_options", "resolve_device", "DTYPES"]

#: the floating-point types a registration runs in
DTYPES: Registry[torch.dtype] = Registry("dtype", {"float32": torch.float32, "float64": torch.float64})


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" (CUDA when available), or a torch device name that exists on this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ShapeflowError(f"register(): unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ShapeflowError("register(): device 'cuda' asked for, but no CUDA device is available")
    return resolved


@dataclass
class CommonOptions:
    """Options every registration takes; pipelines subclass it. `torch_device` and `torch_dtype`
    are resolved (and checked) once, when the options are made."""

    _what: ClassVar[str] = "option"

    seed: int = 0
    device: str = "auto"                # "auto" (CUDA when available), "cpu", "cuda", ...
    dtype: str = "float32"              # "float32" or "float64"
    progress: bool = True
    landmarks: Any = None               # (source_points, target_points): (K, d) arrays, Landmarks or files
    landmark_weight: float | None = None  # weight of the landmark term in the fit (default: the pipeline's)
    threads: int | None = None          # torch threads inside this call (None: 1 up to 50k points/voxels, else torch's)

    def __post_init__(self) -> None:
        self.torch_dtype: torch.dtype = DTYPES.lookup(self.dtype, "register()")
        self.torch_device: torch.device = resolve_device(self.device)
        if self.landmark_weight is not None and not (isinstance(self.landmark_weight, (int, float))
                                                     and self.landmark_weight >= 0):
            raise ShapeflowError(f"register(): landmark_weight must be a number >= 0, got {self.landmark_weight!r}")

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]):
        """`cls(**options)`, or a one-line error naming the unknown options and the valid ones."""
        return parse_options(cls, options, {})[0]


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def parse_options(cls: type[CommonOptions], options: Mapping[str, Any],
                  parts: Mapping[str, tuple[str, Registry]]) -> tuple[CommonOptions, dict[str, Any]]:
    """Split keyword `options` between the pipeline's own dataclass `cls` and the `Options` of
    each chosen component.

    parts: role -> (chosen name, registry), e.g. `{"model": ("resnet", MODELS)}`; every registry
    entry has an `Options` dataclass (possibly empty). Returns `(cls instance, {role: the chosen
    entry's Options instance})`. Raises a one-line ShapeflowError for an option that belongs to
    another entry of a registry (naming it) and for an unknown option (listing the valid ones).
    """
    chosen = {role: registry.lookup(name, "register()") for role, (name, registry) in parts.items()}
    own = set(_fields(cls))
    mine = {role: set(_fields(entry.Options)) for role, entry in chosen.items()}
    valid = own.union(*mine.values())
    for name in sorted(set(options) - valid):
        for chosen_name, registry in parts.values():
            owners = [f"{registry.what} {n!r}" for n, entry in registry.items() if name in _fields(entry.Options)]
            if owners:
                raise ShapeflowError(f"register(): option {name!r} applies to {' and '.join(owners)}, "
                                     f"not to {registry.what} {chosen_name!r}")
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ShapeflowError(f"register(): unknown {cls._what}(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(valid))}")
    common = cls(**{k: v for k, v in options.items() if k in own})
    split = {role: chosen[role].Options(**{k: v for k, v in options.items() if k in mine[role]}) for role in chosen}
    return common, split
