"""`shapeflow train CONFIG.toml -o RUN/`: parse, call `shapeflow.learn.train`, print. No work here."""
from __future__ import annotations

from pathlib import Path

import typer


def train_command(
    config: Path = typer.Argument(..., help="Training config (TOML) with the sections data, network, method and train."),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder: checkpoint.pt, model.pt, report.json, curve.png."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start afresh even if RUN/checkpoint.pt exists (it is overwritten)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Train a network through the Gauss-Newton solver (methods suits, learngn, dio); Ctrl-C saves a
    checkpoint that the same command resumes from."""
    from .main import _fail, _library_errors, _quiet, _sigterm_as_interrupt

    if not config.is_file():
        _fail(f"{config}: no such config file")
    with _quiet(quiet):
        from shapeflow.learn import train

        try:
            with _sigterm_as_interrupt():      # a scheduler's SIGTERM saves a checkpoint like Ctrl-C
                result = train(config, output, resume=not no_resume, progress=not quiet)
        except _library_errors() as exc:
            _fail(str(exc))
    if result.get("rank"):          # under torchrun, rank 0 reports and writes
        return
    if result.get("diverged"):
        typer.echo(f"{config}: training diverged at step {result['step']} (a non-finite loss or gradient); the last "
                   f"good state is in {result['checkpoint']}: lower [train] lr and resume", err=True)
        raise typer.Exit(code=3)
    if result.get("interrupted"):
        typer.echo(f"interrupted at step {result['step']} of {result['steps']}; checkpoint {result['checkpoint']}; "
                   "run the same command to resume", err=True)
        raise typer.Exit(code=130)
    if not quiet:
        typer.echo(f"trained {result['method']} for {result['steps']} steps in {result['seconds']:.1f} s")
        test = result.get("test") or {}
        rows = [("method, trained", test.get("method")), ("method, initial", test.get("initial"))]
        rows += [(f"register {loss} {model}", figures) for loss, models in (test.get("register") or {}).items()
                 for model, figures in models.items()]
        for name, figures in rows:
            if figures:
                typer.echo(f"  test, {name}: Dice {figures['dice_before']:.3f} -> {figures['dice_after']:.3f}, "
                           f"HD95 {figures['hd95_after']:.2f} mm, folding {figures['folding_percent']:.2f} %")
        typer.echo("wrote " + ", ".join(str(output / name) for name in result["files"]))
