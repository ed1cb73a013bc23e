"""`shapeflow batch PAIRS.csv -o OUT` and `shapeflow atlas SHAPES... -o OUT`: parse, call
`sf.register_many` / `sf.build_atlas` on a Dask cluster, print. No work here.

Both take `shapeflow register`'s fitting options: the very parameters of `register` (the same
names, defaults and help), joined to each command's own by `_with_register_options`.
"""
from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Optional

import typer

#: `shapeflow register` options that apply to every pair of a batch / every registration of an atlas
SHARED = ("model", "loss", "iterations", "regularization", "prealign", "dtype", "reach", "trim", "direction", "outliers", "blur",
          "subsample",
          "solver", "optimizer", "multiscale", "interpolation", "features", "landmark_weight", "option", "seed", "device")


def commands(register_command) -> tuple:
    """(batch, atlas): typer commands whose parameters are their own followed by
    `register_command`'s SHARED ones (cli/main.py passes its `register`)."""
    return (_with_register_options(_batch, _run_batch, register_command),
            _with_register_options(_atlas, _run_atlas, register_command))


def _with_register_options(own, body, register_command):
    register_signature = inspect.signature(register_command, eval_str=True)
    own_signature = inspect.signature(own, eval_str=True)

    def command(**given) -> None:
        body(**given)

    parameters = [*own_signature.parameters.values(), *(register_signature.parameters[n] for n in SHARED)]
    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {**typing.get_type_hints(own),
                               **{n: register_signature.parameters[n].annotation for n in SHARED}}
    command.__doc__ = own.__doc__
    return command


def _fit_options(given: dict) -> dict:
    from .main import register_options

    shared = {n: given.pop(n) for n in SHARED}
    option, features = shared.pop("option"), shared.pop("features")
    model, loss, seed, device = (shared.pop(n) for n in ("model", "loss", "seed", "device"))
    options = register_options(option, features=None if features is None else str(features), **shared)
    return {**options, **({"model": model} if model else {}), **({"loss": loss} if loss else {}),
            "seed": seed, "device": device}


def _batch(
    pairs: str = typer.Argument(..., help="CSV with columns source,target and optional name, landmarks_source, landmarks_target, labels_source, labels_target (paths relative to the CSV; fsspec URLs allowed)."),
    output: str = typer.Option(..., "-o", "--output", help="Output folder or fsspec URL: OUT/<name>/ per pair and OUT/summary.csv."),
    workers: Optional[int] = typer.Option(None, help="Workers of the local Dask cluster (processes with one thread each; default one per CPU core). Ignored with --scheduler."),
    scheduler: Optional[str] = typer.Option(None, help="Run on an existing Dask cluster: its scheduler's address (tcp://host:8786) or scheduler file (.json)."),
    retries: int = typer.Option(1, help="Dask retries of a pair whose task crashed (bad input is not retried; a dead worker's task is always rescheduled)."),
    memory_limit: str = typer.Option("auto", help="Memory limit of each local worker, Dask's (auto, 4GiB, 0 = none)."),
    dashboard_address: str = typer.Option(":8787", help="Where the local cluster serves its dashboard (Dask's dashboard_address)."),
    gif: Optional[str] = typer.Option(None, help="An animation per pair, this file name inside each pair's folder (.gif or .mp4)."),
    frames: int = typer.Option(24, help="Frames of each animation."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every pair (by default complete pairs from an earlier run are kept)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; print only when a pair failed."),
) -> None:
    """Register every pair of PAIRS.csv on a Dask cluster, one task per pair; OUT/<name>/ holds what
    `shapeflow register` writes, OUT/summary.csv one row per pair. Exit 0 when every pair succeeded,
    1 otherwise; a re-run skips complete pairs."""


def _run_batch(**given) -> None:
    from .main import _fail, _library_errors, _quiet

    pairs, output = given.pop("pairs"), given.pop("output")
    if "://" not in pairs and not Path(pairs).is_file():
        _fail(f"{pairs}: no such pairs file")
    if given["gif"] is not None and Path(given["gif"]).suffix.lower() not in (".gif", ".mp4"):
        _fail(f"{given['gif']}: animations are written as .gif or .mp4")
    options = _fit_options(given)
    quiet = given["quiet"]
    with _quiet(quiet):
        import shapeflow as sf
        from shapeflow.pipelines.batch import cluster_client, read_pairs

        try:
            read_pairs(pairs)                      # a malformed CSV stops before a cluster starts
            with cluster_client(given["workers"], given["scheduler"], memory_limit=_memory(given["memory_limit"]),
                                dashboard_address=given["dashboard_address"]) as client:
                if not quiet:
                    _print_dashboard(client)
                summary = sf.register_many(pairs, output, client=client, overwrite=given["overwrite"],
                                           retries=given["retries"], progress=not quiet, gif=given["gif"],
                                           frames=given["frames"], **options)
        except _library_errors() as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            typer.echo(f"interrupted: {output}/summary.csv lists the pairs that finished; run the same command to "
                       "resume", err=True)
            raise typer.Exit(code=130)
    for row in summary.rows:
        if row["status"] == "failed":
            typer.echo(f"failed: {row['name']}: {row.get('error')}", err=True)
    if not quiet or not summary.ok:
        typer.echo(summary.line())
    raise typer.Exit(code=0 if summary.ok else 1)


def _memory(text: str):
    return 0 if text.strip() == "0" else text


def _print_dashboard(client) -> None:
    from shapeflow._optional import is_available

    link = client.dashboard_link
    typer.echo(f"dask dashboard: {link}" if is_available("bokeh") else
               f"dask dashboard: not served (install bokeh>=3.1 to get it at {link})")


def _atlas(
    shapes: list[Path] = typer.Argument(..., help="The shapes (meshes, point clouds) or images to build the atlas of (at least 2)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder: template, history.csv, atlas.gif, subjects/<name>/deformation.pt."),
    atlas_iterations: int = typer.Option(5, "--atlas-iterations", help="Template updates, each one Dask map over the subjects."),
    workers: Optional[int] = typer.Option(None, help="Workers of the local Dask cluster (processes with one thread each; default one per CPU core). Ignored with --scheduler."),
    scheduler: Optional[str] = typer.Option(None, help="Run on an existing Dask cluster: its scheduler's address (tcp://host:8786) or scheduler file (.json)."),
    memory_limit: str = typer.Option("auto", help="Memory limit of each local worker, Dask's (auto, 4GiB, 0 = none)."),
    dashboard_address: str = typer.Option(":8787", help="Where the local cluster serves its dashboard (Dask's dashboard_address)."),
    gif: str = typer.Option("atlas.gif", help="The template evolving over the iterations, inside OUT (.gif or .mp4)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output folder if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success."),
) -> None:
    """Build an atlas: register every shape to an evolving template (groupwise), one Dask map per
    iteration; write the template, its evolution as a GIF and each subject's deformation."""


def _run_atlas(**given) -> None:
    from .main import _check_inputs, _fail, _library_errors, _quiet

    shapes, output = given.pop("shapes"), given.pop("output")
    _check_inputs(**{f"shape{i}": p for i, p in enumerate(shapes)})
    if len(shapes) < 2:
        _fail("atlas: give at least 2 shapes")
    if output.exists() and not given["overwrite"]:
        _fail(f"{output}: output folder exists; choose another with -o or pass --overwrite")
    if Path(given["gif"]).suffix.lower() not in (".gif", ".mp4"):
        _fail(f"{given['gif']}: animations are written as .gif or .mp4")
    options = _fit_options(given)
    if "iterations" in options:
        options["fit_iterations"] = options.pop("iterations")
    quiet = given["quiet"]
    with _quiet(quiet, vtk=True):
        import shapeflow as sf
        from shapeflow.pipelines.batch import cluster_client

        try:
            with cluster_client(given["workers"], given["scheduler"], memory_limit=_memory(given["memory_limit"]),
                                dashboard_address=given["dashboard_address"]) as client:
                if not quiet:
                    _print_dashboard(client)
                atlas = sf.build_atlas(shapes, client=client, iterations=given["atlas_iterations"],
                                       progress=not quiet, **options)
            atlas.save(output, overwrite=given["overwrite"], gif=given["gif"])
        except _library_errors() as exc:
            _fail(str(exc))
    if not quiet:
        typer.echo("template change per iteration: " + ", ".join(f"{c:.4g}" for c in atlas.change))
        typer.echo(f"wrote {output}/ (template, history.csv, {given['gif']}, subjects/)")
