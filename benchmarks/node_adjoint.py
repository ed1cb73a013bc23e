"""NeuralODEFlow: backpropagation through the solver (direct) against the adjoint ODE.

One fitting step (forward with energy + backward) of the default flow (width 64, depth 2,
softplus, rk4, 10 steps) on 3D points, float32, one thread; direct and adjoint runs are
interleaved so that load on a shared machine hits both alike. Writes results/node_adjoint.{json,md}.

    .venv/bin/python benchmarks/node_adjoint.py            # 500 2000 4000 points
    .venv/bin/python benchmarks/node_adjoint.py --quick    # 500 points
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from shapeflow.deform import NeuralODEFlow

RESULTS = Path(__file__).resolve().parent / "results"


def step_seconds(flow: NeuralODEFlow, x: torch.Tensor) -> float:
    start = time.perf_counter()
    moved, energy = flow.forward_with_energy(x)
    ((moved - x).square().sum(1).mean() + 1e-3 * energy).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n in ([500] if args.quick else [500, 2000, 4000]):
        x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
        flows = {}
        for adjoint in (False, True):
            flow = NeuralODEFlow(3, adjoint=adjoint, seed=0)
            with torch.no_grad():                       # a non-trivial field, the same for both
                flow.field.weights[-1].normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
            flows["adjoint" if adjoint else "direct"] = flow
        times: dict[str, list[float]] = {name: [] for name in flows}
        for repeat in range(args.repeats + 1):
            for name, flow in flows.items():
                seconds = step_seconds(flow, x)
                if repeat:                              # the first call warms up
                    times[name].append(seconds)
        row = {"points": n, **{name: statistics.median(t) for name, t in times.items()}}
        row["adjoint / direct"] = row["adjoint"] / row["direct"]
        rows.append(row)
        print(f"{n:6d} points: direct {row['direct']:.3f} s, adjoint {row['adjoint']:.3f} s "
              f"({row['adjoint / direct']:.2f}x)", flush=True)
    name = "node_adjoint.quick" if args.quick else "node_adjoint"
    RESULTS.mkdir(exist_ok=True)
    machine = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor(),
               "threads": 1}
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "machine": machine}, indent=2))
    lines = ["| points | direct (s) | adjoint (s) | adjoint / direct |", "|---|---|---|---|"]
    lines += [f"| {r['points']} | {r['direct']:.3f} | {r['adjoint']:.3f} | {r['adjoint / direct']:.2f} |" for r in rows]
    (RESULTS / f"{name}.md").write_text(
        "One fitting step (forward with energy + backward), NeuralODEFlow defaults (width 64, depth 2, "
        "rk4, 10 steps), 3D, float32, 1 thread, median of "
        f"{args.repeats}.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
