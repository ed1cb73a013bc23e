"""Keyword options shared by every registration: checked names, and the common fields."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ShapeflowError

__all__ = ["CommonOptions"]


@dataclass
class CommonOptions:
    """Options every registration takes; subclasses add their own. Build with `from_kwargs`."""

    _what: ClassVar[str] = "option"

    seed: int = 0
    device: str = "auto"                # "auto" (CUDA when available), "cpu", "cuda", ...
    dtype: str = "float32"
    progress: bool = True

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]):
        """`cls(**options)`, or a one-line error naming the unknown options and the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ShapeflowError(f"register(): unknown {cls._what}(s) {', '.join(unknown)}; "
                                 f"valid: {', '.join(sorted(names))}")
        return cls(**options)
