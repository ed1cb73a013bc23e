"""`Result`: what every registration returns, whatever the data, model or solver."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._files import default_mode
from .deform import Deformation
from .errors import ShapeflowError

__all__ = ["Result"]


@dataclass
class Result:
    """The outcome of `register`.

    `warped` has the source's kind (an array if the source was an array, an `Image` on the fixed
    grid for images), `deformation` maps source points to target space in world units (for
    images: fixed-space world points into the moving image, ITK's resampling convention),
    `history` holds one row per fitting step, `metrics` the accuracy figures (see `save` for
    the report).
    """

    warped: Any
    deformation: Deformation
    history: list[dict]
    metrics: dict[str, Any]
    source: Any = field(repr=False, default=None)
    target: Any = field(repr=False, default=None)
    options: dict[str, Any] = field(default_factory=dict)
    #: image registrations: the sampling positions of the middle slice after each step (animation)
    snapshots: list = field(default_factory=list, repr=False)

    def report(self) -> dict[str, Any]:
        """A JSON-able summary: metrics, options, and the loss at the start and end."""
        fit_rows = [r for r in self.history if str(r.get("stage", "")).startswith("fine")] or self.history
        return {"metrics": self.metrics, "options": self.options,
                "loss_start": fit_rows[0]["total"] if fit_rows else None,
                "loss_end": min(r["total"] for r in fit_rows) if fit_rows else None,
                "iterations": len(self.history),
                "deformation": self.deformation.describe()}

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False, name: str | None = None,
             gif: str | os.PathLike | None = None, frames: int = 24) -> Path:
        """Write `warped<ext>`, `deformation.pt`, `report.json` (images also `displacement.nii.gz`,
        warped labels and `overlay.png`; and `gif`, if given, inside the folder when it is a bare
        file name) into `directory`. All files are written into a temporary folder first, which
        then replaces `directory`; an existing folder is an error unless `overwrite`."""
        from .io.outputs import write_warped

        directory = Path(directory)
        if directory.exists() and not overwrite:
            raise ShapeflowError(f"{directory}: output folder exists; choose another or pass overwrite (--overwrite)")
        if directory.exists() and not directory.is_dir():
            raise ShapeflowError(f"{directory}: exists and is not a folder")
        parent = directory.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{directory.name}."))
        os.chmod(staging, default_mode(0o777))
        try:
            for item in (self.source, self.target):
                where = getattr(item, "source", None)
                if where and Path(where).resolve().is_relative_to(directory.resolve()):
                    raise ShapeflowError(f"{directory}: holds the input {where}; refusing to replace it")
            write_warped(self, staging, name)
            self.deformation.save(staging / "deformation.pt")
            (staging / "report.json").write_text(json.dumps(self.report(), indent=2) + "\n")
            if gif is not None:
                from .viz import animate

                animate(self, staging / Path(gif).name, frames=frames)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(staging, directory)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return directory
