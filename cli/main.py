"""The `shapeflow` command: parse arguments, call the library, print. No work happens here.

Only typer is imported at start: `shapeflow` (and with it torch) is imported once the arguments
and input paths have been checked, so `--help` and a mistyped path answer at once.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Register shapes or images: the first argument always moves onto the second.")


#: exit codes: 0 done, 1 a batch with failed pairs, 2 bad input (one line on stderr), 3 the fit diverged
DIVERGED = 3


def _fail(message: str) -> None:
    typer.echo(f"shapeflow: error: {message}", err=True)
    raise typer.Exit(code=2)


def _library_errors():
    import shapeflow as sf

    return (sf.ShapeflowError, sf.InverseError, ImportError, OSError)


def _check_inputs(**paths: Optional[Path]) -> None:
    """Every given input path exists (a file, or a folder of DICOM slices), else the library's
    one-line error, before the library (and torch) is imported."""
    for path in paths.values():
        if path is not None and not path.exists():
            _fail(f"{path}: no such file")


@contextmanager
def _quiet(on: bool, vtk: bool = False) -> Iterator[None]:
    """With -q: no Python warnings (torch's, PyVista's, ...) and, when the command may render in
    3D (`vtk`), no VTK log lines on stderr; for the duration of the command only."""
    if not on:
        yield
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _vtk_silenced() if vtk else nullcontext():
            yield


@contextmanager
def _vtk_silenced() -> Iterator[None]:
    """VTK's log (e.g. `bad X server connection`) and its warning window off, then restored."""
    try:
        from vtkmodules.vtkCommonCore import vtkLogger, vtkObject
    except ImportError:  # no VTK: nothing to silence (the animation reports it)
        yield
        return
    verbosity, display = vtkLogger.GetCurrentVerbosityCutoff(), vtkObject.GetGlobalWarningDisplay()
    vtkLogger.SetStderrVerbosity(vtkLogger.VERBOSITY_OFF)
    vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        if verbosity >= vtkLogger.VERBOSITY_OFF:    # -10 when VTK was built without logging
            vtkLogger.SetStderrVerbosity(verbosity)
        vtkObject.SetGlobalWarningDisplay(display)


@app.command()
def register(
    source: Path = typer.Argument(..., help="The shape or image that moves (.ply .obj .stl .off .vtk .vtp .xyz .txt .csv .npy; .nii .nii.gz .png .jpg .tif .mha .nrrd .dcm, or a folder of DICOM slices)."),
    target: Path = typer.Argument(..., help="The shape or image it moves onto (fixed)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output folder (default: SOURCE_to_TARGET)."),
    model: Optional[str] = typer.Option(None, help="Shapes: rigid, similarity, affine, resnet (default), node, lddmm or displacement (per-point field, non-rigid ICP). Images: svf (default, diffeomorphic), displacement or affine."),
    loss: Optional[str] = typer.Option(None, help="Shapes: sinkhorn (default), chamfer, l2 (corresponding points), varifold or currents (meshes: they read the faces; --set widths=[1,0.4,0.2,0.1] --set oriented=false). Images: ssd (default), ncc (local NCC: bias fields, contrast changes), mind (multi-modal) or learned (a trained feature network: --features model.pt)."),
    iterations: Optional[int] = typer.Option(None, help="Shapes: Adam steps per stage (60). Images: Gauss-Newton steps per level (8, halved per finer level)."),
    regularization: Optional[float] = typer.Option(None, help="Weight of the regulariser (shapes: kinetic energy, 1e-3; images: diffusion, 0.003)."),
    prealign: Optional[str] = typer.Option(None, help="Shapes: rigid, similarity or affine before a flow (default none). Images: affine (the default) or none."),
    dtype: Optional[str] = typer.Option(None, help="float32 (default) or float64: the precision the fit runs in."),
    reach: Optional[float] = typer.Option(None, help="Shapes: sinkhorn's unbalanced transport reach (default 0.15; --set reach=null: balanced) or chamfer's distance cap (default none), relative to the target's RMS radius; tolerates outliers and missing parts."),
    trim: Optional[float] = typer.Option(None, help="Shapes, loss chamfer (or sinkhorn's chamfer refine): the farthest fraction of pairs left out, in [0, 0.5) (default 0)."),
    direction: Optional[str] = typer.Option(None, help="Shapes, loss chamfer: both (default), source (each source point to its closest target point: a target with extra parts or outliers) or target (a partial target)."),
    outliers: Optional[float] = typer.Option(None, help="Shapes, loss chamfer: CPD's outlier weight w in [0, 1) (default 0: off)."),
    blur: Optional[float] = typer.Option(None, help="Shapes, loss sinkhorn: entropic blur, relative to the target's size (0.02)."),
    subsample: Optional[int] = typer.Option(None, help="Shapes, losses sinkhorn and chamfer: points per shape the fine stage is fitted on (4000; 512 for sinkhorn with --set refine=null)."),
    optimizer: Optional[str] = typer.Option(None, help="Images, affine stage: lm (default, Levenberg-Marquardt), gauss-newton, newton (exact autodiff Hessian, trust region) or gradient."),
    multiscale: Optional[str] = typer.Option(None, help="Images, affine stage: pyramid (default), continuation or predictor-corrector (along the spline blur theta; needs --interpolation spline)."),
    interpolation: Optional[str] = typer.Option(None, help="Images, affine stage's objective: linear (default) or spline (C2 cubic B-spline)."),
    solver: Optional[str] = typer.Option(None, help="Images: inner solver of each Gauss-Newton step, cg (default, matrix free) or amg (algebraic multigrid, CPU, needs the amg extra: pip install 'shapeflow\\[amg]')."),
    labels_moving: Optional[Path] = typer.Option(None, help="Images: label map of the moving image (warped with it; Dice, HD95)."),
    labels_fixed: Optional[Path] = typer.Option(None, help="Images: label map of the fixed image."),
    mask_moving: Optional[Path] = typer.Option(None, help="Images: mask of the moving image (nonzero = inside); the data term counts only voxels inside both masks."),
    mask_fixed: Optional[Path] = typer.Option(None, help="Images: mask of the fixed image (nonzero = inside)."),
    features: Optional[Path] = typer.Option(None, help="Images, --loss learned: the trained feature network (a model.pt written by `shapeflow train`)."),
    landmarks_source: Optional[Path] = typer.Option(None, help="Landmarks (K points, .csv/.txt/.xyz/.npy; images: world mm) on SOURCE (the moving image); give --landmarks-target too. Reported as landmark_error (and tre for images); fitted with --landmark-weight."),
    landmarks_target: Optional[Path] = typer.Option(None, help="The K corresponding landmarks on TARGET (the fixed image), in the same order."),
    landmark_weight: Optional[float] = typer.Option(None, help="Weight of the landmark term in the fit (images: default 0, landmarks only measured; 1 pulls them visibly)."),
    option: list[str] = typer.Option([], "--set", metavar="NAME=VALUE", help="Any other register() option, repeatable: a model's or loss's own (e.g. --set blocks=20 --set refine=null); VALUE is read as JSON (numbers, true/false, null, [lists]) or else as text."),
    gif: Optional[Path] = typer.Option(None, help="Write an animation of the flow (.gif or .mp4); a bare name goes into the output folder."),
    frames: int = typer.Option(24, help="Frames in the animation (images: interpolated between the fitting steps)."),
    seed: int = typer.Option(0, help="Random seed (recorded in the report)."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output folder if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success: no progress bar, summary or warnings."),
) -> None:
    """Register SOURCE onto TARGET; write the warped shape or image, deformation.pt and report.json
    (images also: displacement.nii.gz, warped labels, overlay.png)."""
    _check_inputs(source=source, target=target, labels_moving=labels_moving, labels_fixed=labels_fixed,
                  mask_moving=mask_moving, mask_fixed=mask_fixed, features=features,
                  landmarks_source=landmarks_source, landmarks_target=landmarks_target)
    output = output or Path(f"{source.stem}_to_{target.stem}")
    if output.exists() and not overwrite:
        _fail(f"{output}: output folder exists; choose another with -o or pass --overwrite")
    if gif is not None and gif.suffix.lower() not in (".gif", ".mp4"):
        _fail(f"{gif}: animations are written as .gif or .mp4")
    if gif is not None and frames < 2:
        _fail(f"--frames {frames}: an animation needs at least 2 frames")
    if (landmarks_source is None) != (landmarks_target is None):
        _fail("--landmarks-source and --landmarks-target go together; give both or neither")
    landmarks = None if landmarks_source is None else (str(landmarks_source), str(landmarks_target))
    options = register_options(option, iterations=iterations, regularization=regularization, prealign=prealign,
                                dtype=dtype, reach=reach, trim=trim, direction=direction, outliers=outliers, blur=blur,
                                subsample=subsample, solver=solver, optimizer=optimizer, multiscale=multiscale,
                                interpolation=interpolation, labels_moving=labels_moving,
                                labels_fixed=labels_fixed, mask_moving=mask_moving,
                                mask_fixed=mask_fixed, features=None if features is None else str(features),
                                landmarks=landmarks, landmark_weight=landmark_weight)
    inside = gif is not None and (gif.parent == Path(".") and not gif.is_absolute()
                                  or gif.resolve().parent == output.resolve())
    with _quiet(quiet, vtk=gif is not None):
        import shapeflow as sf
        from shapeflow.viz import animate

        try:
            with _sigterm_as_interrupt():
                result = sf.register(sf.read(source), sf.read(target), model=model, loss=loss, seed=seed,
                                     device=device, progress=not quiet, **options)
            result.save(output, overwrite=overwrite, gif=gif.name if inside else None, frames=frames)
            if gif is not None and not inside:
                animate(result, gif, frames=frames)
        except _library_errors() as exc:
            _fail(str(exc))
    if not quiet:
        _summary(result, output, None if inside else gif)
    if result.metrics.get("diverged"):
        typer.echo(f"{output}: the fit diverged (a non-finite loss); the last finite state was written, "
                   f"marked diverged in report.json", err=True)
        raise typer.Exit(DIVERGED)


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler's kill, `timeout`) stops the fit like Ctrl-C: the best state is kept
    and written, marked interrupted. Restored afterwards; only in the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def register_options(option: list[str], **given) -> dict:
    """register() options from the command line (`register`, `batch`): the given ones and the
    `--set NAME=VALUE`s; `--prealign none` is an explicit None (images pre-align by default)."""
    if given.get("dtype") not in (None, "float32", "float64"):
        _fail(f"--dtype {given['dtype']}: choose float32 or float64")
    options = {k: v for k, v in given.items() if v is not None}
    if given.get("prealign") is not None and given["prealign"].lower() == "none":
        options["prealign"] = None
    for item in option:
        name, value = _parse_set(item)
        if name in options or name in ("seed", "device", "progress"):
            _fail(f"--set {item}: {name} has its own option")
        options[name] = value
    return options


def _parse_set(item: str) -> tuple[str, object]:
    """`NAME=VALUE` -> (NAME, VALUE as JSON, or the text itself)."""
    import json

    name, sep, text = item.partition("=")
    if not sep or not name.strip().isidentifier():
        _fail(f"--set {item}: expected NAME=VALUE, e.g. --set blocks=20")
    try:
        return name.strip(), json.loads(text)
    except ValueError:
        return name.strip(), text


def _summary(result, output: Path, gif: Optional[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"shapeflow register -> {output}", show_header=False)
    for key, value in result.metrics.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v:.4g}" for k, v in value.items() if isinstance(v, (int, float)))
        if value is not None:
            table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    Console().print(table)
    written = sorted(p.name for p in output.iterdir())
    typer.echo("wrote " + ", ".join(str(output / name) for name in written)
               + (f", {gif}" if gif is not None else ""))
    if result.metrics.get("interrupted"):
        typer.echo("interrupted: kept the best state reached so far", err=True)


@app.command()
def warp(
    deformation: Path = typer.Argument(..., help="A deformation.pt written by `shapeflow register`."),
    shape: Path = typer.Argument(..., help="The shape or image to move (any supported format)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output file; its extension picks the format."),
    inverse: bool = typer.Option(False, "--inverse", help="Shapes: apply the inverse map instead (target -> source)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Images: the fixed image whose grid the result is resampled on (default: the deformation's own grid)."),
    interpolation: Optional[str] = typer.Option(None, help="Images: linear or nearest (default: nearest for a one-channel image of whole numbers, e.g. a label map, which then stays integer in NIfTI; linear otherwise)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success."),
) -> None:
    """Apply a saved deformation to SHAPE (e.g. a full-resolution version of the source), or to an
    image in the moving image's space (resampled on the fixed grid, like antsApplyTransforms)."""
    _check_inputs(deformation=deformation, shape=shape, reference=reference)
    if output.exists() and not overwrite:
        _fail(f"{output}: exists; pass --overwrite to replace it")
    if interpolation not in (None, "linear", "nearest"):
        _fail(f"--interpolation {interpolation}: choose linear or nearest")
    with _quiet(quiet):
        import shapeflow as sf
        from shapeflow.apply import is_label_like, warp as apply_warp

        try:
            moving = sf.read(shape)
            moved = apply_warp(sf.load_deformation(deformation), moving, inverse=inverse, interpolation=interpolation,
                               reference=None if reference is None else sf.read(reference))
            sf.write(moved, output, overwrite=overwrite)
        except _library_errors() as exc:
            _fail(str(exc))
    if not quiet:
        chosen = interpolation is None and isinstance(moving, sf.Image) and is_label_like(moving)
        typer.echo(f"wrote {output}" + (" (nearest neighbour: the image holds whole numbers; --interpolation linear "
                                         "to blend)" if chosen else ""))


from .train import train_command  # noqa: E402  (`shapeflow train`: cli/train.py, issue 13)
app.command("train")(train_command)
from .batch import commands as cohort_commands  # noqa: E402  (`shapeflow batch`, `shapeflow atlas`: issue 15)
batch_command, atlas_command = cohort_commands(register)
app.command("batch")(batch_command)
app.command("atlas")(atlas_command)

def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
