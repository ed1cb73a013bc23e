"""First-order fitting loops (Adam, then optionally L-BFGS) for neural flows and small transforms.

`fit(parameters, objective, ...)` minimises `objective() -> (total, terms)` where `terms` names
the parts of the loss for the progress bar and the history. The best state seen is kept and
restored at the end, after an early stop, and after Ctrl-C (`FitReport.interrupted`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ..progress import progress_bar
from .adam import Adam

__all__ = ["fit", "FitReport"]

Objective = Callable[[], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class FitReport:
    """What a fit did: per-iteration `history` rows, the best total, and how it stopped."""

    history: list[dict] = field(default_factory=list)
    best: float = math.inf
    stopped: str = "iterations"   # "iterations", "converged" or "interrupted"
    seconds: float = 0.0

    @property
    def interrupted(self) -> bool:
        return self.stopped == "interrupted"


def fit(parameters: Iterable[torch.nn.Parameter], objective: Objective, *, iterations: int = 500,
        lr: float = 1e-2, lbfgs_iterations: int = 0, tol: float = 1e-5, patience: int = 50,
        progress: bool = True, stage: str = "fit") -> FitReport:
    """Minimise `objective` over `parameters` with Adam for `iterations` steps (early stop when
    the best total has not improved by a relative `tol` in `patience` steps), then L-BFGS for
    `lbfgs_iterations` evaluations. Returns a `FitReport`; the parameters hold the best state."""
    params = [p for p in parameters if p.requires_grad]
    report = FitReport()
    best_state = [p.detach().clone() for p in params]
    start = time.perf_counter()
    last_improvement = 0

    def evaluate(step: int, phase: str) -> torch.Tensor:
        nonlocal best_state, last_improvement
        total, terms = objective()
        value = float(total.detach())
        report.history.append({"stage": stage, "phase": phase, "iteration": step, "total": value, **terms})
        if math.isfinite(value) and value < report.best:
            if not math.isfinite(report.best) or value < report.best - tol * abs(report.best):
                last_improvement = step
            report.best = value
            best_state = [p.detach().clone() for p in params]
        return total

    try:
        with progress_bar(progress, stage, iterations + lbfgs_iterations) as advance:
            adam = Adam(params, lr=lr)
            for step in range(iterations):
                adam.zero_grad()
                total = evaluate(step, "adam")
                if not torch.isfinite(total):
                    break
                total.backward()
                adam.step()
                advance(report.history[-1])
                if step - last_improvement > patience:
                    report.stopped = "converged"
                    break
            if lbfgs_iterations:
                _restore(params, best_state)
                lbfgs = torch.optim.LBFGS(params, lr=1, max_iter=lbfgs_iterations, history_size=20,
                                          tolerance_grad=1e-12, tolerance_change=1e-14,
                                          line_search_fn="strong_wolfe")

                def closure():
                    lbfgs.zero_grad(set_to_none=True)
                    total = evaluate(len(report.history), "lbfgs")
                    total.backward()
                    advance(report.history[-1])
                    return total

                lbfgs.step(closure)
    except KeyboardInterrupt:
        report.stopped = "interrupted"
    _restore(params, best_state)
    report.seconds = time.perf_counter() - start
    return report


def _restore(params: list[torch.Tensor], state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, state):
            p.copy_(s)
