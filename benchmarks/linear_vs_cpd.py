"""Benchmark: linear shape registration (rigid, similarity, affine), shapeflow against pycpd.

Data (every tool gets the same float64 arrays, in this process):

* "fish": pycpd's fish example is not shipped with pycpd, so its stand-in is the horse contour
  (`assets/horse_contour.csv`) subsampled evenly to 91 points (the fish's count), centred and
  scaled to unit RMS radius. Targets as in pycpd's examples: a 30 degree turn and translation
  (0.5, 1.0) (rigid), the same turn scaled by 1.2 (similarity), `[[1.2, 0.3], [0.1, 0.9]]` (affine).
* "4k 3D": FreeSurfer's fsaverage5 left pial surface (bundled with nilearn) decimated to about
  4000 vertices (as in `shapes_vs_cpd.py`), turned 30 degrees about (1, 1, 1) and translated.

The target is the source moved by the known map, so RMSE = sqrt(mean_i |warped_i - target_i|^2)
(relative to the target's RMS radius). shapeflow: `sf.register(source, target, model=...)` with the
default loss (soft correspondences, then closest points), default float32 and float64; seconds
are the median of 10 calls after a warm-up call, at 1 and 2 torch threads (wall clock), and the
process CPU time at 1 thread (less sensitive to other load on the machine). pycpd:
`RigidRegistration` (which fits a scale: a similarity) and `AffineRegistration` with their
defaults (NumPy's threads as they are), the median of 10 calls (3 at 4k) after a warm-up.

    python benchmarks/linear_vs_cpd.py [--quick]

Writes benchmarks/results/linear_vs_cpd.json and .md.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import shapeflow as sf

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def normalised(points: np.ndarray) -> np.ndarray:
    centred = points - points.mean(0)
    return centred / np.sqrt((centred ** 2).sum(1).mean())


def fish() -> np.ndarray:
    contour = np.loadtxt(ROOT / "assets" / "horse_contour.csv", delimiter=",", skiprows=1)
    return normalised(contour[np.linspace(0, len(contour) - 1, 91).astype(int)])


def surface_4k() -> np.ndarray:
    from shapes_vs_cpd import make_pair
    return make_pair(4000)["source"]


def rotation_2d(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def rotation_3d(degrees: float, axis=(1.0, 1.0, 1.0)) -> np.ndarray:
    k = np.asarray(axis) / np.linalg.norm(axis)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = math.radians(degrees)
    return np.eye(3) + math.sin(a) * K + (1 - math.cos(a)) * K @ K


def cases(quick: bool) -> list[dict]:
    x = fish()
    R, t = rotation_2d(30), np.array([0.5, 1.0])
    maps = {"rigid": R, "similarity": 1.2 * R, "affine": np.array([[1.2, 0.3], [0.1, 0.9]])}
    out = [{"data": "fish (91, 2D)", "model": m, "source": x, "target": x @ A.T + t, "repeats": 10}
           for m, A in maps.items()]
    if not quick:
        y = surface_4k()
        R3, t3 = rotation_3d(30), np.array([0.3, -0.2, 0.5])
        out += [{"data": f"surface ({len(y)}, 3D)", "model": m, "source": y, "target": y @ A.T + t3, "repeats": 10}
                for m, A in {"rigid": R3, "similarity": 1.2 * R3, "affine": R3 @ np.diag([1.2, 0.9, 1.0])}.items()]
    return out


def median_seconds(fn, repeats: int, clock=time.perf_counter):
    fn()
    times, out = [], None
    for _ in range(repeats):
        start = clock()
        out = fn()
        times.append(clock() - start)
    return statistics.median(times), out


def rmse(warped, target) -> float:
    radius = np.sqrt(((target - target.mean(0)) ** 2).sum(1).mean())
    return float(np.sqrt(((np.asarray(warped, dtype=np.float64) - target) ** 2).sum(1).mean()) / radius)


def run_case(case: dict) -> dict:
    from pycpd import AffineRegistration, RigidRegistration

    x, y, model = case["source"], case["target"], case["model"]
    row = {"data": case["data"], "model": model}
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            seconds, result = median_seconds(lambda: sf.register(x, y, model=model, progress=False), case["repeats"])
            row[f"shapeflow_s_{n}thread"] = seconds
            row["shapeflow_rmse"] = rmse(result.warped, y)
        torch.set_num_threads(1)
        row["shapeflow_cpu_s_1thread"], _ = median_seconds(lambda: sf.register(x, y, model=model, progress=False),
                                                           case["repeats"], time.process_time)
        _, result = median_seconds(lambda: sf.register(x, y, model=model, progress=False, dtype="float64"), 1)
        row["shapeflow_rmse_float64"] = rmse(result.warped, y)
    finally:
        torch.set_num_threads(threads)
    cpd_cls = AffineRegistration if model == "affine" else RigidRegistration
    repeats = case["repeats"] if len(x) < 1000 else 3
    seconds, (warped, _) = median_seconds(lambda: cpd_cls(X=y, Y=x).register(), repeats)
    cpu, _ = median_seconds(lambda: cpd_cls(X=y, Y=x).register(), repeats, time.process_time)
    row.update(pycpd=f"{cpd_cls.__name__}", pycpd_s=seconds, pycpd_cpu_s=cpu, pycpd_rmse=rmse(warped, y))
    return row


def table(rows: list[dict]) -> list[str]:
    lines = ["| data | model | shapeflow wall, 1 thread | 2 threads | CPU, 1 thread | shapeflow RMSE (float32 / "
             "float64) | pycpd | pycpd wall | pycpd CPU | pycpd RMSE |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['model']} | {1e3 * r['shapeflow_s_1thread']:.1f} ms | "
                     f"{1e3 * r['shapeflow_s_2thread']:.1f} ms | {1e3 * r['shapeflow_cpu_s_1thread']:.1f} ms | "
                     f"{r['shapeflow_rmse']:.1e} / {r['shapeflow_rmse_float64']:.1e} | {r['pycpd']} | "
                     f"{1e3 * r['pycpd_s']:.1f} ms | {1e3 * r['pycpd_cpu_s']:.1f} ms | {r['pycpd_rmse']:.1e} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the fish only")
    args = parser.parse_args()
    rows = []
    for case in cases(args.quick):
        rows.append(run_case(case))
        print(table(rows)[-1], flush=True)
    stem = RESULTS / ("linear_vs_cpd.quick" if args.quick else "linear_vs_cpd")
    Path(f"{stem}.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    md = ["# Linear registration: shapeflow (closed-form fitter) vs pycpd", "",
          "RMSE relative to the target's RMS radius; see the script's docstring for the data.", ""] + table(rows)
    Path(f"{stem}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
