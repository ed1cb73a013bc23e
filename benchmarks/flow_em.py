"""Benchmark: the flow's EM fit on soft correspondences against its Adam stages (issue 12, small shapes).

`model="resnet"` with the default `loss="sinkhorn"` is fitted by EM on the transport plan
(`pipelines/shape_flow_gn.py`) when both shapes have at most 256 points (up to 2048 with about
as many isolated points each); `em=False` gives the Adam stages (coarse Sinkhorn, Chamfer refine) that fitted
every size before. Same data, same run:

1. pycpd's fish stand-in (`linear_vs_cpd.fish`, 91 2D points) under 8 smooth deformations
   (`smooth_deformation(amplitude=0.05, seed)`, unit RMS radius), with pycpd's
   `DeformableRegistration` as its README advises (normalised arrays, defaults); seconds: median
   of 3 runs each (pycpd: one).
2. Synthetic curves: a five-armed star and a bumpy ellipse (no features: any point-set distance
   can slide along it), 60 / 90 / 150 points, 4 deformations each; RMSE over the start's.
3. Small robustness cases: the airplane (PyVista) and the ant (`assets/ant.ply`) reduced to 120
   and 250 farthest points; clean, 30 % of the target cropped, 5 % outliers (two draws), a larger
   deformation (amplitude 0.08), the ant bent by 2 rad (`synthetic.bend`); RMSE to the known truth.
4. Above 256 points: the default, `em=True` and `em=False` on fsaverage5 decimated to 500, 1000
   and 2000 vertices (`shapes_vs_cpd.make_pair`), the whole airplane (1335 points) clean and with
   5 % outliers (4 draws), and the whole ant (486 points) bent by 0.5 and 1 rad.

One torch thread. Writes benchmarks/results/flow_em.json, .md and .png.

    python benchmarks/flow_em.py [--replot]
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))

import shapeflow as sf  # noqa: E402
from shapeflow.sampling import farthest_point_sample  # noqa: E402
from shapeflow.synthetic import bend, smooth_deformation  # noqa: E402

#: issue 12: the fish deformable in at most this many seconds
FISH_SECONDS = 0.1


def rmse(a, b) -> float:
    return float(np.sqrt(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).sum(1).mean()))


def fit(source, target, repeats: int = 1, **options):
    """`(warped points, median seconds, history length, poor fit)` of `sf.register`."""
    times, result, poor = [], None, False
    for _ in range(repeats):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.perf_counter()
            result = sf.register(source, target, progress=False, seed=0, **options)
            times.append(time.perf_counter() - start)
        poor = any(issubclass(w.category, sf.ShapeflowWarning) for w in caught)
    warped = np.asarray(getattr(result.warped, "points", result.warped))
    return warped, statistics.median(times), len(result.history), poor


def fish_rows() -> list[dict]:
    from pycpd import DeformableRegistration
    from shapes_vs_cpd import fish_pair, score

    fit(fish_pair(0)["source"], fish_pair(0)["target"])          # the first call of the process
    rows = []
    for seed in range(8):
        pair = fish_pair(seed)
        row = {"seed": seed, "before_pct": score(pair["source"], pair)["rmse_pct_diag"]}
        for name, options in (("em", {}), ("adam", {"em": False})):
            warped, seconds, steps, _ = fit(pair["source"], pair["target"], repeats=3, **options)
            row[name] = {"rmse_pct": score(warped, pair)["rmse_pct_diag"], "seconds": seconds, "steps": steps}
        start = time.perf_counter()
        warped, _ = DeformableRegistration(X=pair["target"], Y=pair["source"]).register()
        row["pycpd"] = {"rmse_pct": score(warped, pair)["rmse_pct_diag"], "seconds": time.perf_counter() - start}
        rows.append(row)
        print(row, flush=True)
    return rows


def curve(kind: str, n: int, seed: int):
    t = torch.linspace(0, 2 * math.pi, n + 1, dtype=torch.float64)[:-1]
    if kind == "star":
        wave = torch.cos(5 * t)
        r = 1 + 0.35 * wave.sign() * wave.abs().sqrt() + 0.1 * torch.sin(2 * t)
        source = torch.stack([r * torch.cos(t), 0.7 * r * torch.sin(t)], 1)
    else:
        r = 1 + 0.3 * torch.cos(3 * t) + 0.1 * torch.sin(5 * t)
        source = torch.stack([r * torch.cos(t), 0.6 * r * torch.sin(t)], 1)
    return source.numpy(), smooth_deformation(source, amplitude=0.05, seed=seed).numpy()


def curve_rows() -> list[dict]:
    rows = []
    for kind in ("star", "bumpy ellipse"):
        for n in (60, 90, 150):
            for seed in range(4):
                source, target = curve(kind, n, seed)
                row = {"curve": kind, "points": n, "seed": seed, "before": rmse(source, target)}
                for name, options in (("em", {}), ("adam", {"em": False})):
                    warped, seconds, steps, _ = fit(source, target, **options)
                    row[name] = {"relative": rmse(warped, target) / row["before"], "seconds": seconds}
                rows.append(row)
                print(row, flush=True)
    return rows


def small_cases() -> dict[str, tuple]:
    from robust_shapes import airplane

    cases = {}
    full = airplane()
    ant = sf.read(ROOT / "assets" / "ant.ply").points.double()
    for n in (120, 250):
        x = full[farthest_point_sample(torch.from_numpy(full), n, 0).numpy()]
        truth = smooth_deformation(torch.from_numpy(x), amplitude=0.02, seed=0).numpy()
        lo, hi = truth.min(0), truth.max(0)
        centre, half = (lo + hi) / 2, 0.75 * (hi - lo)
        cases[f"airplane {n}, clean"] = (x, truth, truth)
        cases[f"airplane {n}, cropped 30 %"] = (x, truth[truth[:, 0] <= np.quantile(truth[:, 0], 0.7)], truth)
        for draw in (0, 2):
            outliers = np.random.default_rng(draw).uniform(centre - half, centre + half, size=(round(0.05 * n), 3))
            cases[f"airplane {n}, outliers 5 % (draw {draw})"] = (x, np.concatenate([truth, outliers]), truth)
        large = smooth_deformation(torch.from_numpy(x), amplitude=0.08).numpy()
        cases[f"airplane {n}, amplitude 0.08"] = (x, large, large)
        a = ant[farthest_point_sample(ant, n, 0)]
        bent = bend(a, angle=2.0).numpy()
        cases[f"ant {n}, bent 2 rad"] = (a.numpy(), bent, bent)
    return cases


def robust_rows() -> list[dict]:
    rows = []
    for case, (source, target, truth) in small_cases().items():
        row = {"case": case, "points": len(source), "before": rmse(source, truth)}
        for name, options in (("em", {}), ("adam", {"em": False})):
            warped, seconds, steps, poor = fit(source, target, **options)
            row[name] = {"rmse": rmse(warped, truth), "seconds": seconds, "poor_fit": poor}
        rows.append(row)
        print(row, flush=True)
    return rows


def large_rows() -> list[dict]:
    """Above 256 points: the default (EM on shapes without isolated points up to 2048 points, else
    the Adam stages), `em=True` and `em=False` on the same pairs."""
    from robust_shapes import airplane
    from shapes_vs_cpd import make_pair

    rows = []
    x = airplane()
    truth = smooth_deformation(torch.from_numpy(x), amplitude=0.02, seed=0).numpy()
    diagonal = float(np.linalg.norm(truth.max(0) - truth.min(0)))
    cases = {f"fsaverage5 {n}": (lambda p: (p["source"], p["target"], p["target"], p["diagonal"]))(make_pair(n))
             for n in (500, 1000, 2000)}
    cases["airplane 1335, clean"] = (x, truth, truth, diagonal)
    lo, hi = truth.min(0), truth.max(0)
    centre, half = (lo + hi) / 2, 0.75 * (hi - lo)
    for draw in range(4):
        outliers = np.random.default_rng(draw).uniform(centre - half, centre + half, size=(round(0.05 * len(x)), 3))
        cases[f"airplane 1335, outliers 5 % (draw {draw})"] = (x, np.concatenate([truth, outliers]), truth, diagonal)
    ant = sf.read(ROOT / "assets" / "ant.ply").points.double()
    for angle in (0.5, 1.0):
        bent = bend(ant, angle=angle).numpy()
        cases[f"ant 486, bent {angle} rad"] = (ant.numpy(), bent, bent, float(np.linalg.norm(bent.max(0) - bent.min(0))))
    for case, (source, target, truth_points, diag) in cases.items():
        row = {"case": case, "points": len(source), "before_pct": 100 * rmse(source, truth_points) / diag}
        for name, options in (("default", {}), ("em=True", {"em": True}), ("em=False", {"em": False})):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = sf.register(source, target, progress=False, seed=0, **options)
            start = time.perf_counter()
            result = sf.register(source, target, progress=False, seed=0, **options)
            seconds = time.perf_counter() - start
            warped = np.asarray(getattr(result.warped, "points", result.warped))
            phases = {h.get("phase") for h in result.history}
            fitted = "declined" if any(h.get("declined") for h in result.history) else (
                "em" if "em" in phases else "adam")
            row[name] = {"rmse_pct": 100 * rmse(warped, truth_points) / diag, "seconds": seconds, "fit": fitted}
        rows.append(row)
        print(row, flush=True)
    return rows


def markdown(out: dict) -> str:
    m = out["machine"]
    fish = out["fish"]
    em_s = statistics.median(r["em"]["seconds"] for r in fish)
    md = ["# The flow's EM fit against its Adam stages (issue 12, small shapes)", "",
          f"Machine: {m['cpu_count']} CPUs, torch {m['torch']} (1 thread), {m['date']}, load average "
          f"{m['load']:.2f} at start. Written by `benchmarks/flow_em.py` (its docstring: the data). `em`: the "
          f"default at <= 256 points, and up to 2048 when both shapes have as many isolated points (EM on the transport plan, "
          f"Gauss-Newton M-steps); `adam`: `em=False`, the coarse Sinkhorn and Chamfer refine stages (the default "
          f"otherwise).", "",
          "## 1. The fish (91 points), 8 deformations", "",
          "| seed | before (% diag) | em RMSE % | em s | adam RMSE % | adam s | pycpd RMSE % | pycpd s |",
          "|---|---|---|---|---|---|---|---|"]
    for r in fish:
        md.append(f"| {r['seed']} | {r['before_pct']:.2f} | {r['em']['rmse_pct']:.3f} | {r['em']['seconds']:.3f} | "
                  f"{r['adam']['rmse_pct']:.3f} | {r['adam']['seconds']:.3f} | {r['pycpd']['rmse_pct']:.3f} | "
                  f"{r['pycpd']['seconds']:.3f} |")
    med = {k: statistics.median(r[k]["rmse_pct"] for r in fish) for k in ("em", "adam", "pycpd")}
    sec = {k: statistics.median(r[k]["seconds"] for r in fish) for k in ("em", "adam", "pycpd")}
    md += ["", f"Medians: em {med['em']:.3f} % in {sec['em']:.3f} s, adam {med['adam']:.3f} % in {sec['adam']:.3f} s, "
               f"pycpd {med['pycpd']:.3f} % in {sec['pycpd']:.3f} s. Target (issue 12): the fish in <= {FISH_SECONDS} s: "
               f"**{'met' if em_s <= FISH_SECONDS else 'not met'}** ({em_s:.3f} s, {sec['pycpd'] / em_s:.2f}x pycpd's "
               f"speed at {med['em'] / med['pycpd']:.2f}x its RMSE).", "",
           "## 2. Curves: RMSE after / before (4 deformations each)", "",
           "| curve | points | em (each seed) | adam (each seed) | em median | adam median |", "|---|---|---|---|---|---|"]
    for kind in ("star", "bumpy ellipse"):
        for n in (60, 90, 150):
            rs = [r for r in out["curves"] if r["curve"] == kind and r["points"] == n]
            em = [r["em"]["relative"] for r in rs]
            ad = [r["adam"]["relative"] for r in rs]
            md.append(f"| {kind} | {n} | {' '.join(f'{v:.3f}' for v in em)} | {' '.join(f'{v:.3f}' for v in ad)} | "
                      f"{statistics.median(em):.3f} | {statistics.median(ad):.3f} |")
    md += ["", "## 3. Small robustness cases: RMSE to the truth (airplane units; the ant's)", "",
           "| case | before | em | em s | adam | adam s |", "|---|---|---|---|---|---|"]
    for r in out["robust"]:
        flag = {k: " (poor fit)" if r[k]["poor_fit"] else "" for k in ("em", "adam")}
        md.append(f"| {r['case']} | {r['before']:.3g} | {r['em']['rmse']:.4g}{flag['em']} | {r['em']['seconds']:.2f} | "
                  f"{r['adam']['rmse']:.4g}{flag['adam']} | {r['adam']['seconds']:.2f} |")
    md += ["", "## 4. Above 256 points (RMSE % of the diagonal; seconds: the second of two runs)", "",
           "`default`: EM when both shapes have about as many isolated points (up to 2048 points), else the Adam stages; "
           "the `fit` column says which ran (`declined`: EM, then the Adam stages).", "",
           "| case | before | default | fit | s | em=True | s | em=False (Adam stages) | s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in out["large"]:
        md.append(f"| {r['case']} | {r['before_pct']:.2f} | {r['default']['rmse_pct']:.3f} | {r['default']['fit']} | "
                  f"{r['default']['seconds']:.2f} | {r['em=True']['rmse_pct']:.3f} | {r['em=True']['seconds']:.2f} | "
                  f"{r['em=False']['rmse_pct']:.3f} | {r['em=False']['seconds']:.2f} |")
    md += ["", "## Reading", ""] + [f"* {line}" for line in READING]
    return "\n".join(md) + "\n"


READING = [
    "The fish: EM is 4.1x faster than the Adam stages and 3x closer (medians: 0.169 s at 0.036 % against "
    "0.694 s at 0.113 %), on all 8 deformations; it misses issue 12's 0.1 s in this run and is 8x slower than "
    "pycpd (0.020 s), at 0.14x pycpd's RMSE. Its time: ~20 EM steps, each two transport plans (onto the "
    "target, onto itself) and a Gauss-Newton M-step on a linearisation reused for 4 steps; at 91 points "
    "every step is a few hundred small torch operations, so the per-operation overhead is the cost.",
    "Curves: with features (the star) EM ends 2-4x closer than Adam on every fit. Without (the bumpy ellipse) "
    "any distance between point sets can slide along the curve, and both end at 0.15-0.45 of the start on "
    "most fits; this is where EM looks worst (median 0.31 against Adam's 0.24 at 90 points).",
    "Robustness at 120 and 250 points: clean pairs 15-25x closer and large deformations 7-16x closer; 5 % "
    "outliers at 120 points a little farther than Adam (1.58 and 1.70 against 1.54 and 1.55; isolated target "
    "points within 6 source spacings of the "
    "fitted source rejoin the cooled plan; at 250 points the target has 263 points, 13 of them isolated and "
    "none in the source, so Adam fits both columns); a cropped target and the ant bent by 2 rad end at Adam's "
    "result: the EM fit squeezes the source there (min det J < 0.5 at its points) and gives way to the Adam "
    "stages, which costs the EM's time on top.",
    "Above 256 points (section 4) the default is EM when both shapes have about as many isolated points: on "
    "the clean cortex and airplane pairs 2.5-3.1x closer and 3.3-5.9x faster than the Adam stages (1,000 "
    "cortex vertices 0.049 % in 0.50 s against 0.151 % in 2.94 s), on the 486-point ant bent by 0.5 and 1 rad "
    "0.044 and 0.083 % against 0.123 and 0.493 % (its leg tips are isolated in both shapes). With 5 % "
    "outliers on the airplane (isolated points in the target only) the default keeps the Adam stages: "
    "`em=True` ends 1.1-3.5x farther there.",
    "Timing: this run (2026-12-03, late evening) had the slowest machine of the day: the Adam stages on the "
    "fish 0.694 s against 0.269-0.434 s in the earlier runs, and 2.94 s at 1k against 1.43 s. The EM's code "
    "is faster than in those runs (the transport plan's kernel in base 2, the coarse levels' M-step on 128 "
    "points, the flow's output kernel 2.5x faster), but its fish took 0.169 s here against 0.080-0.118 s "
    "then: the ratios within one run (EM / Adam, EM / pycpd) are the comparable numbers.",
]


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fish = out["fish"]
    for name, marker in (("em", "o"), ("adam", "s"), ("pycpd", "^")):
        axes[0].scatter([r[name]["seconds"] for r in fish], [r[name]["rmse_pct"] for r in fish], marker=marker,
                        label=name)
    axes[0].axvline(FISH_SECONDS, color="grey", linestyle="--", linewidth=1)
    axes[0].set(xscale="log", yscale="log", xlabel="seconds", ylabel="RMSE, % of the diagonal",
                title="fish, 8 deformations (dashed: 0.1 s)")
    axes[0].legend()
    rows = out["robust"]
    em = [max(r["em"]["rmse"] / r["before"], 1e-4) for r in rows]
    ad = [max(r["adam"]["rmse"] / r["before"], 1e-4) for r in rows]
    axes[1].scatter(ad, em)
    lo, hi = min(em + ad) / 2, max(em + ad) * 2
    axes[1].plot([lo, hi], [lo, hi], color="grey", linewidth=1)
    axes[1].set(xscale="log", yscale="log", xlabel="adam: RMSE / before", ylabel="em: RMSE / before",
                title="small airplane / ant cases (below the line: em closer)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if "--replot" in sys.argv:          # rewrite the .md and .png from the saved .json
        out = json.loads((RESULTS / "flow_em.json").read_text())
        (RESULTS / "flow_em.md").write_text(markdown(out))
        plot(out, RESULTS / "flow_em.png")
        return
    torch.set_num_threads(1)
    out = {"machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                       "date": datetime.datetime.now().isoformat(timespec="seconds"), "load": os.getloadavg()[0]},
           "fish": fish_rows(), "curves": curve_rows(), "robust": robust_rows(), "large": large_rows()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "flow_em.json").write_text(json.dumps(out, indent=1))
    (RESULTS / "flow_em.md").write_text(markdown(out))
    plot(out, RESULTS / "flow_em.png")
    print(markdown(out))


if __name__ == "__main__":
    main()
