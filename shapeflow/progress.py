"""A progress bar on stderr with the current loss terms (rich), or nothing (disabled, or stderr is
not a terminal)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

__all__ = ["progress_bar", "format_terms"]


def format_terms(row: dict) -> str:
    """`total 0.012  data 0.01 ...` from a history row (bookkeeping keys left out)."""
    skip = {"stage", "phase", "iteration", "accepted"}
    return "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k not in skip)


@contextmanager
def progress_bar(enabled: bool, description: str, total: int) -> Iterator:
    """Yield `update(row)` advancing the bar by one step and showing `row`'s loss terms."""
    if not enabled:
        yield lambda row=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_interactive:     # a log file or a pipe: a transient bar would leave blank lines there
        yield lambda row=None: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[terms]}"), console=console, transient=True) as bar:
        task = bar.add_task(description, total=total, terms="")

        def update(row: dict | None = None) -> None:
            bar.update(task, advance=1, terms=format_terms(row) if row else "")

        yield update
