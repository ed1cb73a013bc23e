"""Benchmark: the shape models side by side, `resnet`, `node` and `lddmm`, beside pycpd.

Pairs (each a source and its known smoothly deformed target, so target[i] is where source[i]
should go; `shapeflow.synthetic.smooth_deformation`, amplitude 5 % of the RMS radius):

* fsaverage5's left pial surface (nilearn, no download) decimated to about 1k and 4k vertices,
  normalised as in `shapes_vs_cpd.py` (the same arrays go to every tool);
* PyVista's ant (`assets/ant.ply`, 486 vertices), a mesh with thin legs;
* the outline of scikit-image's horse (`assets/horse_contour.csv`), a 2D contour;
* `lddmm` alone on the full fsaverage5 surface (10,242 vertices): the 10k timing target.

Every tool moves the source onto the target; scored the same way: seconds (wall clock around
the call), RMSE as % of the target's bounding-box diagonal, minimum Jacobian determinant of the
map (shapeflow's metric on a grid over the source's box), flipped triangles % for meshes, the
model's energy. shapeflow runs with its defaults (`loss="sinkhorn"`, coarse to fine), one torch
thread; pycpd's `DeformableRegistration` with its defaults (alpha=2, beta=2), on the same
normalised arrays; the dense-torch kernel LDDMM is shapeflow's `lddmm` with the kernel sums forced
to dense torch (`kernel_backend="torch"`), the KeOps tutorial's formulation with the same kernel.

    python benchmarks/shape_models.py [--quick]

Writes benchmarks/results/shape_models.json, .md and .png (`--quick`: `shape_models.quick.*`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import shapeflow as sf

sys.path.insert(0, str(Path(__file__).parent))
from shapes_vs_cpd import machine_info, make_pair, normalised_pair, score  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
NAME = "shape_models"
AMPLITUDE = 0.05
TARGET_RMSE_PCT, TARGET_NODE_RATIO, TARGET_LDDMM_10K = 1.0, 3.0, 20.0

NOTES = """\
* Where we look worst: pycpd is the most accurate on fsaverage 1k (0.05 % against 0.18-0.51 %) and
  the fastest on the small shapes (0.1-0.3 s against 2-9 s); it scales as O(N^3) per EM iteration
  (188 s at 4k, where it is also the least accurate). `node` is the slowest shapeflow model on the
  surfaces (1.8x resnet's time, median; 1.9x at 4k, with rk4 in 5 steps: in 10 steps it was 3.7x).
* The two lddmm rows are the same computation: at these sizes the kernel sums are below the
  `auto` rule's crossover (2500^2 point pairs on this CPU, `kernels.md`: the control points are 64,
  so even 10k points make 0.66M pairs) and run dense; KeOps takes over above it and on a GPU.
* `node` fits with Adam at lr 5e-3 (`NeuralODEFlow.default_lr`): at the flows' 3e-2 the coarse
  Sinkhorn stage oscillated and the 4k fit stopped at 3.8 % RMSE (0.24 % at 5e-3).
* One deformation (seed 0, amplitude 5 % of the RMS radius) per pair and one run per tool; run-to-run
  time varies by 20-50 % on this shared machine (resnet on the ant: 8.8 s in one run, 11.3 s in the next).
"""


def pairs(quick: bool) -> dict[str, dict]:
    ant = sf.read(ASSETS / "ant.ply")
    horse = sf.read(ASSETS / "horse_contour.csv").points.double().numpy()
    out = {"ant mesh (486)": normalised_pair(ant.points.double().numpy(), ant.faces.numpy()),
           "horse contour 2D": normalised_pair(horse, None),
           "fsaverage5 pial 1k": make_pair(1000)}
    if not quick:
        out["fsaverage5 pial 4k"] = make_pair(4000)
    return out


def shapes_of(pair: dict):
    if pair["faces"] is None:
        return pair["source"], pair["target"]
    faces = torch.as_tensor(np.asarray(pair["faces"]), dtype=torch.long)
    return (sf.Mesh(torch.as_tensor(pair["source"]), faces),
            sf.Mesh(torch.as_tensor(pair["target"]), faces))


def run_shapeflow(pair: dict, model: str, label: str, **options) -> dict:
    source, target = shapes_of(pair)
    t0 = time.perf_counter()
    res = sf.register(source, target, model=model, progress=False, seed=0, **options)
    seconds = time.perf_counter() - t0
    warped = res.warped if isinstance(res.warped, np.ndarray) else res.warped.points.numpy()
    return {"tool": "shapeflow", "config": label, "seconds": seconds, **score(warped, pair),
            "min_jacobian_det": res.metrics["min_jacobian_det"],
            "flipped_percent": res.metrics.get("flipped_triangles_percent"), "energy": res.metrics["energy"]}


def run_pycpd(pair: dict) -> dict:
    from pycpd import DeformableRegistration

    t0 = time.perf_counter()
    reg = DeformableRegistration(X=pair["target"], Y=pair["source"])
    warped, _ = reg.register()
    seconds = time.perf_counter() - t0
    return {"tool": "pycpd", "config": "DeformableRegistration (alpha=2, beta=2)", "seconds": seconds,
            **score(warped, pair), "min_jacobian_det": None, "flipped_percent": None, "energy": None}


CONFIGS = {
    "resnet (default)": ("resnet", {}),
    "node (default)": ("node", {}),
    "lddmm (default)": ("lddmm", {}),
    "lddmm, dense torch kernels": ("lddmm", {"kernel_backend": "torch"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-pycpd", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for case, pair in pairs(args.quick).items():
        n = len(pair["source"])
        for label, (model, options) in CONFIGS.items():
            try:
                row = run_shapeflow(pair, model, label, **options)
            except sf.ShapeflowError as exc:      # e.g. an option this build does not have
                row = {"tool": "shapeflow", "config": label, "error": str(exc)}
            rows.append({"case": case, "points": n, **row})
            print(json.dumps(rows[-1]), flush=True)
        if not args.no_pycpd:
            rows.append({"case": case, "points": n, **run_pycpd(pair)})
            print(json.dumps(rows[-1]), flush=True)
    if not args.quick:
        pair = make_pair(10242)
        rows.append({"case": "fsaverage5 pial 10k", "points": len(pair["source"]),
                     **run_shapeflow(pair, "lddmm", "lddmm (default)")})
        print(json.dumps(rows[-1]), flush=True)
    write(rows, args.quick)


def _targets(rows: list[dict]) -> list[str]:
    lines = []
    ok = [r for r in rows if "error" not in r]
    for model in ("node", "lddmm"):
        worst = max((r["rmse_pct_diag"] for r in ok if r["config"] == f"{model} (default)"), default=float("nan"))
        lines.append(f"| {model} RMSE < {TARGET_RMSE_PCT} % of the diagonal on every pair | worst {worst:.3g} % | "
                     f"{'met' if worst < TARGET_RMSE_PCT else 'not met'} |")
    ratios = []
    for case in {r["case"] for r in ok}:
        by = {r["config"]: r for r in ok if r["case"] == case}
        if "node (default)" in by and "resnet (default)" in by:
            ratios.append(by["node (default)"]["seconds"] / by["resnet (default)"]["seconds"])
    worst_ratio = max(ratios, default=float("nan"))
    lines.append(f"| node within {TARGET_NODE_RATIO}x resnet's time | worst {worst_ratio:.2f}x (median "
                 f"{np.median(ratios) if ratios else float('nan'):.2f}x) | "
                 f"{'met' if worst_ratio <= TARGET_NODE_RATIO else 'not met'} |")
    big = [r for r in ok if r["case"] == "fsaverage5 pial 10k"]
    if big:
        lines.append(f"| lddmm at 10k points under {TARGET_LDDMM_10K} s | {big[0]['seconds']:.1f} s | "
                     f"{'met' if big[0]['seconds'] < TARGET_LDDMM_10K else 'not met'} |")
    return lines


def write(rows: list[dict], quick: bool) -> None:
    stem = NAME + (".quick" if quick else "")
    RESULTS.mkdir(exist_ok=True)
    info = machine_info(1)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    table = ["| case | points | tool | config | seconds | RMSE % diag | min det J | flipped % | energy |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "" if v is None else (f % v)
    for r in rows:
        if "error" in r:
            table.append(f"| {r['case']} | {r['points']} | {r['tool']} | {r['config']} | error: {r['error']} | | | | |")
            continue
        table.append(f"| {r['case']} | {r['points']} | {r['tool']} | {r['config']} | {r['seconds']:.2f} | "
                     f"{r['rmse_pct_diag']:.3f} | {fmt(r['min_jacobian_det'], '%.3f')} | "
                     f"{fmt(r['flipped_percent'], '%.2f')} | {fmt(r['energy'], '%.4g')} |")
    text = ["# Shape models: resnet, node, lddmm (and pycpd)", "",
            f"Machine: {info['cpu_count']} CPUs, torch {info['torch']}, 1 thread, load {info['load_average_start']}, "
            f"{info['date']}. Written by `benchmarks/shape_models.py`{' --quick' if quick else ''}.", "",
            "## Targets", "", "| target | measured | verdict |", "|---|---|---|", *_targets(rows), "",
            "## All runs", "", *table, "", "## Notes", "", NOTES,
            "KeOps against dense kernel sums (the crossover the `auto` rule switches at): "
            "[kernels.md](kernels.md).", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(text))
    plot(rows, RESULTS / f"{stem}.png")


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = [r for r in rows if "error" not in r and r["case"] != "fsaverage5 pial 10k"]
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = {"resnet (default)": "o", "node (default)": "s", "lddmm (default)": "^",
               "lddmm, dense torch kernels": "v", "DeformableRegistration (alpha=2, beta=2)": "x"}
    for config, marker in markers.items():
        pts = [(r["seconds"], r["rmse_pct_diag"]) for r in ok if r["config"] == config]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=config.replace(" (alpha=2, beta=2)", " (pycpd)"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(TARGET_RMSE_PCT, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("seconds (1 thread)")
    ax.set_ylabel("RMSE, % of the bounding-box diagonal")
    ax.set_title("Shape models on every pair: time against error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
