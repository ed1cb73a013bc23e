"""Crossover of dense torch and KeOps for the Gaussian kernel sum on this CPU.

`gaussian_kernel_product(x, y, b, sigma)` with x, y: (N, 3), b: (N, 3), N = M, float32,
timed with backend="torch" (dense (N, M) matrix) and backend="keops" (LazyTensor reduction),
forward alone and forward + backward (gradients w.r.t. x, y and b). Times are medians of
repeats after a warm-up call (KeOps compiles each formula once, into KEOPS_CACHE_FOLDER).
Torch runs with one thread inside `torch_threads` (restored after); KeOps's CPU loops follow
OMP_NUM_THREADS (recorded). The crossover (the smallest N where KeOps forward + backward is
faster) sets `shapeflow.kernels.backends.KEOPS_MIN_PAIRS`.

    OMP_NUM_THREADS=1 python benchmarks/kernels.py [--quick] [--sizes 500 1000 ...]

Writes benchmarks/results/kernels.json, .md and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from shapeflow.kernels import KEOPS_MIN_PAIRS, gaussian_kernel_product
from solver_core import torch_threads  # noqa: E402 - the benchmark next door (the script folder is on sys.path)

RESULTS = Path(__file__).parent / "results"


def median_time(fn, repeats: int) -> float:
    fn()   # warm-up (and KeOps compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def case(n: int, backend: str, backward: bool, repeats: int) -> float:
    g = torch.Generator().manual_seed(n)
    x, y, b = (torch.randn(n, 3, generator=g) for _ in range(3))
    x.requires_grad_(backward), y.requires_grad_(backward), b.requires_grad_(backward)

    def run():
        out = gaussian_kernel_product(x, y, b, 0.5, backend=backend)
        if backward:
            torch.autograd.grad(out.square().sum(), (x, y, b))

    return median_time(run, repeats)


#: why KEOPS_MIN_PAIRS is what it is (written under the table)
THRESHOLD_REASON = (
    "Since the dense sum is a matrix product (`|x|^2 + |y|^2 - 2 x.y`), it beats KeOps on this CPU "
    "forward + backward up to N = M = 12000, and KeOps wins at 16000 (1.15x); the threshold sits at "
    "that crossover, 14000^2 pairs, where the dense (N, M) matrix also reaches 0.8 GB in float32 (the "
    "backward holds several), while KeOps needs O(N + M) memory. On a GPU `auto` always takes KeOps.")


def crossover(rows: list[dict], key: str) -> int | None:
    """The smallest N from which KeOps is faster at every measured size (None: never)."""
    found = None
    for row in reversed(rows):
        if row[f"keops_{key}"] >= row[f"torch_{key}"]:
            break
        found = row["n"]
    return found


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    n = [r["n"] for r in rows]
    for key, label, style in [("torch_forward", "dense torch, forward", "C0--"),
                              ("torch_backward", "dense torch, forward + backward", "C0-"),
                              ("keops_forward", "KeOps, forward", "C1--"),
                              ("keops_backward", "KeOps, forward + backward", "C1-")]:
        ax.plot(n, [r[key] for r in rows], style, marker="o", label=label)
    ax.axvline(KEOPS_MIN_PAIRS ** 0.5, color="gray", lw=0.8, label="KEOPS_MIN_PAIRS (N = M)")
    ax.set(xscale="log", yscale="log", xlabel="N = M points (d = 3, k = 3, float32)", ylabel="seconds",
           title="Gaussian kernel sum on the CPU: dense torch vs KeOps")
    ax.set_xticks(n, [str(v) for v in n], fontsize=8)
    ax.minorticks_off()
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[250, 500, 1000, 2000, 3000, 4000, 6000, 8000, 12000, 16000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="sizes 250..2000, one repeat")
    parser.add_argument("--from-json", action="store_true", help="rewrite the table and plot from kernels.json")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads((RESULTS / "kernels.json").read_text())
        write({**saved["meta"], "KEOPS_MIN_PAIRS": KEOPS_MIN_PAIRS}, saved["rows"])
        return
    sizes, repeats = (args.sizes[:4], 1) if args.quick else (args.sizes, args.repeats)

    load_before = os.getloadavg()
    rows = []
    with torch_threads(1):
        for n in sizes:
            row = {"n": n}
            for backend in ("torch", "keops"):
                row[f"{backend}_forward"] = case(n, backend, False, repeats)
                row[f"{backend}_backward"] = case(n, backend, True, repeats)
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": 1, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "load_before": load_before, "load_after": os.getloadavg(), "repeats": repeats,
            "crossover_forward_n": crossover(rows, "forward"), "crossover_backward_n": crossover(rows, "backward"),
            "KEOPS_MIN_PAIRS": KEOPS_MIN_PAIRS}
    write(meta, rows)


def write(meta: dict, rows: list[dict]) -> None:
    """kernels.json, kernels.png and kernels.md from the measured rows."""
    load_before, repeats = meta["load_before"], meta["repeats"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, RESULTS / "kernels.png")
    lines = ["# Gaussian kernel sum: dense torch vs KeOps on the CPU", "",
             f"x, y, b: (N, 3), N = M, float32; medians of {repeats} after a warm-up; torch 1 thread, "
             f"OMP_NUM_THREADS={meta['OMP_NUM_THREADS']}, {meta['cpus']} CPUs, load {load_before[0]:.2f} -> "
             f"{meta['load_after'][0]:.2f}. Seconds.", "",
             "| N = M | dense fwd | KeOps fwd | dense fwd+bwd | KeOps fwd+bwd | KeOps speed-up (fwd+bwd) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['torch_forward']:.4f} | {r['keops_forward']:.4f} | {r['torch_backward']:.4f} "
                     f"| {r['keops_backward']:.4f} | {r['torch_backward'] / r['keops_backward']:.2f}x |")
    at = lambda n: "no measured size" if n is None else f"every measured N = M >= {n}"
    lines += ["", f"KeOps is faster at {at(meta['crossover_forward_n'])} (forward) and at "
              f"{at(meta['crossover_backward_n'])} (forward + backward).",
              f"`shapeflow.kernels.KEOPS_MIN_PAIRS` = {KEOPS_MIN_PAIRS:,} (N * M): `backend=\"auto\"` uses KeOps "
              "above it (and always on CUDA), dense torch below. " + THRESHOLD_REASON, "",
              "![dense vs KeOps](kernels.png)", ""]
    (RESULTS / "kernels.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
