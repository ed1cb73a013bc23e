"""`build_atlas(shapes)`: groupwise registration of N shapes or images to an evolving template on Dask.

Each iteration is one Dask map (one task per subject, the template broadcast to the workers)
and one template update on the client:

* shapes (point clouds, meshes): the template moves onto every subject, `phi_i: template ->
  subject`, and the new template is the point-wise mean of the moved templates,
  `T <- mean_i phi_i(T)`: each subject's points matched to the template's points, so the
  template keeps its points (and faces). It starts from the vertex mean when all subjects are
  meshes of one topology (same faces), else from the first subject;
* images: every subject moves onto the template (`register(subject, template)`), and the new
  template is the voxel mean of the warped subjects on the template's grid. It starts from the
  voxel mean when all subjects share one grid, else from the first subject.

`Atlas.change[k]` is the RMS change of the template at iteration k (world units for shapes,
intensity for images); it falls as the template settles at the population's centre.
This module sits above `shapeflow.register`, which it calls (tests/test_structure.py's top layer).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .._files import atomic_folder
from ..errors import ShapeflowError
from ..io import read, write
from ..progress import progress_bar
from ..shapes import Image, Mesh, PointCloud
from .batch import PAIR_DEFAULTS, cluster_client, headline_metrics

__all__ = ["build_atlas", "Atlas"]


@dataclass
class Atlas:
    """What `build_atlas` returns. `template`: the final template (a `PointCloud`/`Mesh` or an
    `Image`); `templates`: the template before the first and after every iteration;
    `change[k]`: RMS change of the template at iteration k; `deformations[i]`: the last
    iteration's map of subject i (shapes: template -> subject; images: the template's points into
    the subject, ITK's resampling convention); `metrics[i]`: its headline metrics."""

    template: Any
    templates: list
    change: list[float]
    deformations: list
    metrics: list[dict]
    names: list[str]
    options: dict = field(default_factory=dict)

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False, gif: str | None = "atlas.gif") -> Path:
        """Write `template<ext>`, `history.csv` (iteration, change), `gif` (the template evolving),
        `subjects/<name>/deformation.pt` and `report.json` per subject, into a staging folder
        renamed onto `directory` at the end; an existing folder is an error unless `overwrite`."""
        from ..viz import animate_sequence

        directory = Path(directory)
        with atomic_folder(directory, overwrite) as staging:
            write(dataclasses.replace(self.template, source=None), staging / f"template{_suffix(self.template)}")
            table = io.StringIO()
            rows = csv.writer(table, lineterminator="\n")
            rows.writerow(["iteration", "change"])
            rows.writerows([k + 1, f"{c:.6g}"] for k, c in enumerate(self.change))
            (staging / "history.csv").write_text(table.getvalue())
            if gif:
                animate_sequence(self.templates, staging / Path(gif).name,
                                 [f"template, iteration {k}" for k in range(len(self.templates))])
            for name, phi, metrics in zip(self.names, self.deformations, self.metrics):
                folder = staging / "subjects" / name
                folder.mkdir(parents=True)
                phi.save(folder / "deformation.pt")
                (folder / "report.json").write_text(json.dumps({"metrics": metrics}, indent=2) + "\n")
        return directory


def _suffix(template: Any) -> str:
    if isinstance(template, Image):
        return ".nii.gz"
    return ".ply" if isinstance(template, Mesh) or template.dim == 3 else ".csv"


def _names(subjects: Sequence[Any], given: Sequence[Any]) -> list[str]:
    names = []
    for i, (item, shape) in enumerate(zip(given, subjects)):
        where = item if isinstance(item, (str, os.PathLike)) else getattr(shape, "source", None)
        stem = Path(str(where)).name.split(".")[0] if where else f"subject{i}"
        names.append(stem if stem not in names else f"{stem}_{i}")
    return names


def _initial(subjects: list) -> Any:
    first = subjects[0]
    if isinstance(first, Image):
        if all(s.data.shape == first.data.shape and torch.equal(s.spacing, first.spacing)
               and torch.equal(s.origin, first.origin) for s in subjects):
            data = torch.stack([s.data.float() for s in subjects]).mean(0)
            return dataclasses.replace(first, data=data, labels=None, source=None)
        return dataclasses.replace(first, labels=None, source=None)
    if isinstance(first, Mesh) and all(isinstance(s, Mesh) and s.faces.shape == first.faces.shape
                                       and torch.equal(s.faces, first.faces) for s in subjects):
        points = torch.stack([s.points.double() for s in subjects]).mean(0)
        return first.with_points(points.to(first.points.dtype))
    return first


def atlas_step(template: Any, subject: Any, options: dict) -> tuple[torch.Tensor, Any, dict]:
    """One subject of one iteration (the Dask task): shapes, the template registered onto the
    subject, returning the moved template points `(N, d)`; images, the subject registered onto
    the template, returning the warped subject `(C, *S)` on the template's grid. Also returns the
    deformation and the headline metrics."""
    from ..register import register

    if isinstance(template, Image):
        result = register(subject, template, progress=False, **options)
        return result.warped.data.float(), result.deformation, headline_metrics(result.metrics)
    result = register(template, subject, progress=False, **options)
    return torch.as_tensor(result.warped.points).detach().cpu(), result.deformation, headline_metrics(result.metrics)


def build_atlas(shapes: Sequence[Any], client: Any = None, *, iterations: int = 5, workers: int | None = None,
                progress: bool = True, **options: Any) -> Atlas:
    """Build a template of `shapes` by groupwise registration (module docstring).

    shapes: at least 2 paths, `PointCloud`s / `Mesh`es (of one dimension), or `Image`s.
    client: a `distributed.Client`; None starts a `LocalCluster` of `workers` one-thread processes.
    iterations: template updates (each one Dask map over the subjects).
    options: `register()` options for every registration (model, loss, ...); `fit_iterations`
        is register's `iterations` (the name is taken by the atlas's); `threads` defaults to 1,
        `seed` to 0.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ShapeflowError(f"build_atlas(): iterations must be an int >= 1, got {iterations!r}")
    given = list(shapes)
    if len(given) < 2:
        raise ShapeflowError(f"build_atlas(): needs at least 2 shapes, got {len(given)}")
    subjects = [read(s) if isinstance(s, (str, os.PathLike)) else s for s in given]
    images = [isinstance(s, Image) for s in subjects]
    if any(images) and not all(images):
        raise ShapeflowError("build_atlas(): shapes must all be images, or all shapes")
    if not all(images):
        bad = [i for i, s in enumerate(subjects) if not isinstance(s, PointCloud)]
        if bad:
            raise ShapeflowError(f"build_atlas(): shape {bad[0]} is a {type(subjects[bad[0]]).__name__}, not a "
                                 "PointCloud, Mesh or Image")
        if len({s.dim for s in subjects}) > 1:
            raise ShapeflowError("build_atlas(): shapes must all be 2D or all 3D")
    if "fit_iterations" in options:
        options["iterations"] = options.pop("fit_iterations")
    options = {**PAIR_DEFAULTS, **options}
    names = _names(subjects, given)
    template = _initial(subjects)
    templates, change = [template], []
    with (cluster_client(workers) if client is None else nullcontext(client)) as active:
        subject_futures = active.scatter(subjects)
        with progress_bar(progress, "atlas", iterations * len(subjects)) as update:
            for k in range(iterations):
                shared = active.scatter(template, broadcast=True)
                futures = [active.submit(atlas_step, shared, s, options, pure=False,
                                         key=f"atlas-{k}-{i}-{uuid.uuid4().hex[:8]}")
                           for i, s in enumerate(subject_futures)]
                outputs = []
                for future in futures:
                    outputs.append(future.result())
                    update()
                new = _update(template, [o[0] for o in outputs])
                change.append(_rms_change(template, new))
                template = new
                templates.append(template)
    return Atlas(template, templates, change, [o[1] for o in outputs], [o[2] for o in outputs], names, options)


def _update(template: Any, moved: list[torch.Tensor]) -> Any:
    """The new template: the mean of the moved templates (shapes, `(N, d)` each) or of the warped
    subjects (images, `(C, *S)` each)."""
    mean = torch.stack([m.double() for m in moved]).mean(0)
    if isinstance(template, Image):
        return dataclasses.replace(template, data=mean.float())
    return template.with_points(mean.to(template.points.dtype))


def _rms_change(old: Any, new: Any) -> float:
    if isinstance(old, Image):
        a, b = old.data.double(), new.data.double()
    else:
        a, b = old.points.double(), new.points.double()
    return float(((a - b) ** 2).sum(0 if isinstance(old, Image) else -1).mean().sqrt())
