"""Benchmark: global starts and robust data terms for shapes (issue 17, items 1 and 3).

1. Large turns: the airplane (PyVista's `load_airplane`, 1335 points) turned 60 / 135 / 180
   degrees about (0.3, 0.5, 0.81), the fsaverage5 left pial surface (nilearn, 10242 vertices)
   turned 135 / 180 degrees; `model="rigid"` with the default loss and with `loss="chamfer"`;
   the rotation error in degrees.
2. Partial overlap and outliers: source = the airplane, truth = `smooth_deformation(source,
   amplitude=0.02, seed=0)` (known correspondence, source order); targets: the truth ("clean"),
   the truth with its points above the 70 % quantile of x removed ("cropped 30 %"), the truth
   with 5 % more points uniform in a box 1.5x its bounding box ("outliers 5 %"). RMSE =
   sqrt(mean_i |warped_i - truth_i|^2) in the airplane's units, before (the shapes as given) and
   after, per model and options.
3. The defaults on clean pairs: assets/ant.ply -> assets/ant_bent.ply (same faces: RMSE over the
   vertices), fsaverage5 decimated to ~4000 vertices and its `smooth_deformation` target (as in
   `shapes_vs_cpd.py`, unit RMS radius), and two larger deformations (the ant bent by 2 rad
   with `synthetic.bend`, the airplane with amplitude 0.08), with Sinkhorn's reach at its old
   default (None, balanced), the new one (0.15) and a smaller one, and a refine trim.

4. The default flow over 14 draws of the 5 % outliers, with isolated points left out of the
   farthest-point subsamples (as now) and with every point a candidate (as before).

One torch thread, one run per row (seconds include the metrics).

    python benchmarks/robust_shapes.py

Writes benchmarks/results/robust_shapes.json and .md.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

import shapeflow as sf
from shapeflow.errors import ShapeflowWarning
from shapeflow.synthetic import bend, smooth_deformation

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
AXIS = np.array([0.3, 0.5, 0.81]) / np.linalg.norm([0.3, 0.5, 0.81])


def airplane() -> np.ndarray:
    from pyvista import examples

    return np.asarray(examples.load_airplane().points, dtype=np.float64)


def pial() -> np.ndarray:
    from shapes_vs_cpd import fsaverage_mesh

    return fsaverage_mesh()[0]


def rmse(a, b) -> float:
    return float(np.sqrt(((np.asarray(a, dtype=np.float64) - b) ** 2).sum(1).mean()))


def run(source, target, options: dict):
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sf.register(source, target, progress=False, **options)
    poor = any(issubclass(w.category, ShapeflowWarning) for w in caught)
    return result, time.perf_counter() - start, poor


def label(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) or v is None else f"{k}={v}" for k, v in options.items())


def turns() -> list[dict]:
    rows = []
    for name, points in (("airplane", airplane()), ("fsaverage5 pial", pial())):
        for degrees in ((60, 135, 180) if name == "airplane" else (135, 180)):
            R = Rotation.from_rotvec(AXIS * math.radians(degrees)).as_matrix()
            target = points @ R.T + np.array([10.0, -5.0, 3.0])
            for loss in ("sinkhorn", "chamfer"):
                result, seconds, poor = run(points, target, {"model": "rigid", "loss": loss})
                A = np.asarray(result.deformation.rotation, dtype=np.float64)
                error = math.degrees(math.acos(np.clip((np.trace(A.T @ R) - 1) / 2, -1, 1)))
                rows.append({"shape": name, "points": len(points), "degrees": degrees, "loss": loss,
                             "error_degrees": error, "seconds": seconds, "poor_fit": poor})
                print(rows[-1], flush=True)
    return rows


PARTIAL_CONFIGS = [
    {"model": "resnet"}, {"model": "resnet", "reach": None}, {"model": "resnet", "reach": 0.05},
    {"model": "resnet", "reach": 0.1, "trim": 0.3},
    {"model": "displacement"}, {"model": "displacement", "trim": 0.3}, {"model": "displacement", "reach": 0.1},
    {"model": "displacement", "direction": "target"}, {"model": "displacement", "outliers": 0.1},
    {"model": "rigid"}, {"model": "rigid", "reach": None}, {"model": "rigid", "loss": "chamfer"},
    {"model": "rigid", "loss": "chamfer", "direction": "target"},
]


def partial() -> tuple[float, list[dict]]:
    x = airplane()
    truth = smooth_deformation(torch.from_numpy(x), amplitude=0.02, seed=0).numpy()
    lo, hi = truth.min(0), truth.max(0)
    centre, half = (lo + hi) / 2, 0.75 * (hi - lo)
    outliers = np.random.default_rng(0).uniform(centre - half, centre + half, size=(round(0.05 * len(truth)), 3))
    targets = {"clean": truth, "cropped 30 %": truth[truth[:, 0] <= np.quantile(truth[:, 0], 0.7)],
               "outliers 5 %": np.concatenate([truth, outliers])}
    before = rmse(x, truth)
    rows = []
    for options in PARTIAL_CONFIGS:
        for case, target in targets.items():
            result, seconds, poor = run(x, target, options)
            rows.append({"case": case, "config": label(options), "rmse": rmse(result.warped, truth),
                         "seconds": seconds, "start": result.metrics["start"], "kept": result.metrics["kept"],
                         "poor_fit": poor})
            print(rows[-1], flush=True)
    return before, rows


#: draws of the 5 % outliers in section 4
OUTLIER_DRAWS = 14
#: a fit this far from the truth (airplane units; 54.6 before) is counted as a wrong basin
WRONG_BASIN = 5.0


def outlier_draws() -> list[dict]:
    """The default flow on the airplane with 5 % outliers, over `OUTLIER_DRAWS` draws of them,
    with the subsamples as they are (isolated points left out) and with every point a candidate
    (`sampling.isolated_points` replaced by one that flags none: the farthest-point subsamples
    before 2026-12-03)."""
    import shapeflow.sampling as sampling

    x = airplane()
    truth = smooth_deformation(torch.from_numpy(x), amplitude=0.02, seed=0).numpy()
    lo, hi = truth.min(0), truth.max(0)
    centre, half = (lo + hi) / 2, 0.75 * (hi - lo)
    rows = []
    flagging = sampling.isolated_points
    for draw in range(OUTLIER_DRAWS):
        outliers = np.random.default_rng(draw).uniform(centre - half, centre + half, size=(round(0.05 * len(truth)), 3))
        target = np.concatenate([truth, outliers])
        row = {"draw": draw, "flagged_outliers": int(flagging(torch.from_numpy(target))[len(truth):].sum()),
               "outliers": len(outliers)}
        for name, rule in (("skipped", flagging), ("all candidates", lambda p, *a, **k: torch.zeros(
                len(p), dtype=torch.bool, device=p.device))):
            sampling.isolated_points = rule
            try:
                result, seconds, _ = run(x, target, {})
            finally:
                sampling.isolated_points = flagging
            row[name] = rmse(result.warped, truth)
        rows.append(row)
        print(row, flush=True)
    return rows


CLEAN_CONFIGS = [{"reach": None}, {}, {"reach": 0.07}, {"trim": 0.1}]


def clean() -> list[dict]:
    from shapes_vs_cpd import make_pair

    ant, bent = sf.read(ROOT / "assets" / "ant.ply"), sf.read(ROOT / "assets" / "ant_bent.ply")
    pair = make_pair(4000)
    x = airplane()
    ant_points = ant.points.double()
    cases = {"ant -> ant_bent": (ant, bent, bent.points.numpy()),
             f"fsaverage5 {len(pair['source'])} (unit radius)": (pair["source"], pair["target"], pair["target"]),
             "ant bent 2 rad": (ant_points.numpy(), bend(ant_points, angle=2.0).numpy(),
                                bend(ant_points, angle=2.0).numpy()),
             "airplane amplitude 0.08": (x, smooth_deformation(torch.from_numpy(x), amplitude=0.08).numpy(),
                                         smooth_deformation(torch.from_numpy(x), amplitude=0.08).numpy())}
    rows = []
    for case, (source, target, truth) in cases.items():
        before = rmse(np.asarray(getattr(source, "points", source)), truth)
        configs = [dict(c, model="resnet") for c in CLEAN_CONFIGS]
        if case.startswith(("ant ->", "fsaverage")):
            configs += [{"model": "displacement"}, {"model": "displacement", "reach": 0.3}]
        for options in configs:
            result, seconds, poor = run(source, target, options)
            warped = np.asarray(getattr(result.warped, "points", result.warped))
            rows.append({"case": case, "before": before, "config": label(options), "rmse": rmse(warped, truth),
                         "seconds": seconds, "poor_fit": poor})
            print(rows[-1], flush=True)
    return rows


def markdown(out: dict) -> str:
    m = out["machine"]
    md = ["# Global starts and robust data terms for shapes (issue 17, items 1 and 3)", "",
          f"Machine: {m['cpu_count']} CPUs, torch {m['torch']} (1 thread), {m['date']}, load average "
          f"{m['load_average_start'][0]:.2f} at start. Written by `benchmarks/robust_shapes.py` (see its docstring "
          "for the data). One run per row; `poor fit` = a `ShapeflowWarning` was raised.", "",
          "## 1. Large turns, `model=\"rigid\"` (rotation error, degrees)", "",
          "Before this change (commit 01e356c) `loss=\"chamfer\"` was plain ICP from the identity: airplane 60 / 135 "
          "/ 180 degrees ended 90.6 / 90.6 / 180 degrees off, the pial surface 135 / 180 degrees 180 / 180 off, "
          "silently; the default loss was already exact.", "",
          "| shape | points | turn | loss | error (deg) | seconds | poor fit |", "|---|---|---|---|---|---|---|"]
    for r in out["turns"]:
        md.append(f"| {r['shape']} | {r['points']} | {r['degrees']} | {r['loss']} | {r['error_degrees']:.3f} | "
                  f"{r['seconds']:.2f} | {'yes' if r['poor_fit'] else ''} |")
    md += ["", "## 2. Partial overlap and outliers: airplane, RMSE to the known truth", "",
           f"Before registration (the shapes as given): RMSE {out['partial_before']:.1f} (airplane units; bounding-box "
           "diagonal 1963). `start`: where the fit started (centroids aligned, or the shapes as given when they "
           "score lower); `kept`: `fit`, or `start` when the fit scored worse than its start.", "",
           "| config | clean | cropped 30 % | outliers 5 % | seconds (cropped) | start / kept (cropped) |",
           "|---|---|---|---|---|---|"]
    by = {}
    for r in out["partial"]:
        by.setdefault(r["config"], {})[r["case"]] = r
    for config, cells in by.items():
        def cell(case):
            r = cells[case]
            mark = "**" if r["rmse"] > out["partial_before"] else ""
            return f"{mark}{r['rmse']:.1f}{mark}{' (poor fit)' if r['poor_fit'] else ''}"
        crop = cells["cropped 30 %"]
        md.append(f"| {config} | {cell('clean')} | {cell('cropped 30 %')} | {cell('outliers 5 %')} | "
                  f"{crop['seconds']:.1f} | {crop['start']} / {crop['kept']} |")
    md += ["", "Bold: worse than before registration.", "",
           "## 3. The defaults on clean pairs (RMSE; Sinkhorn's reach: old default None, new default 0.15)", "",
           "| case | before | config | RMSE | seconds |", "|---|---|---|---|---|"]
    for r in out["clean"]:
        md.append(f"| {r['case']} | {r['before']:.4g} | {r['config']} | {r['rmse']:.4g} | {r['seconds']:.1f} |")
    if out.get("outlier_draws"):
        rows = out["outlier_draws"]
        wrong = {k: sum(r[k] > WRONG_BASIN for r in rows) for k in ("skipped", "all candidates")}
        md += ["", f"## 4. The default flow over {len(rows)} draws of the 5 % outliers (airplane, RMSE; 54.6 before)", "",
               "`isolated points skipped`: the subsamples as they are (`sampling.isolated_points` left out of the "
               "farthest-point subsamples); `every point a candidate`: as before 2026-12-03. `flagged`: outliers "
               "flagged as isolated (of the 67).", "",
               "| draw | flagged | isolated points skipped | every point a candidate |", "|---|---|---|---|"]
        md += [f"| {r['draw']} | {r['flagged_outliers']} | {r['skipped']:.3g} | {r['all candidates']:.3g} |" for r in rows]
        md += ["", f"Above {WRONG_BASIN:g} (a wrong basin): {wrong['skipped']} of {len(rows)} with isolated points "
               f"skipped, {wrong['all candidates']} of {len(rows)} with every point a candidate; medians "
               f"{np.median([r['skipped'] for r in rows]):.3g} and {np.median([r['all candidates'] for r in rows]):.3g}."]
    md += ["", "## Reading", "", *READING]
    return "\n".join(md) + "\n"


#: what the tables do not say by themselves (from the 2026-12-03 run; update with a rerun)
READING = [
    "* `model='resnet'` on the cropped airplane: the first fit crushes the missing 30 % into the fuselage "
    "(it folds at 4.6 % of the source's points), and the fold triggers the one refit with the reach / 3 "
    "(`pipelines/shapes.py:_refit`), which is what the row shows (19.9, poor fit warned: the crop leaves "
    "the closest-point distance high). Since 2026-12-03 the refit is triggered by folds at the source's "
    "own points only, not on the bounding-box grid around them (`benchmarks/shapes_resampled.md`).",
    "* Against the 2026-12-02 run of this script, on the same data: outliers 5 % 26.4 -> 1.9 (the "
    "subsamples now leave isolated points out, `sampling.isolated_points`: a farthest-point subsample "
    "took 64-67 of the 67 outliers into the 256-point coarse stage, and over 14 draws of the outliers "
    "the default ended in a wrong basin on 9, now on 1; `tests/test_robust_shapes.py`); the ant to its "
    "bent copy 0.038 -> 0.043 (0.113 in between, with the refine stage's step at half the coarse "
    "stage's and before the isolated points were left out: 8 of the ant's 486 points are flagged); "
    "worse: the airplane at amplitude 0.08 2.56 -> 4.73 (0.3 % of its diagonal; from the 2026-12-03 "
    "changes to the stages, not attributed one by one). The refit rule did not change these rows "
    "(checked: the airplane at 0.08 gives 4.73 with either rule, no refit).",
]


def main() -> None:
    torch.set_num_threads(1)
    out = {"machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                       "date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "load_average_start": os.getloadavg()}}
    out["turns"] = turns()
    out["partial_before"], out["partial"] = partial()
    out["clean"] = clean()
    out["outlier_draws"] = outlier_draws()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "robust_shapes.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "robust_shapes.md").write_text(markdown(out))


if __name__ == "__main__":
    main()
