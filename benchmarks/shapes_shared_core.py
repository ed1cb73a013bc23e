"""Benchmark: shapeflow's `displacement` model (non-rigid ICP, Laplacian Gauss-Newton) beside
trimesh's NRICP, pycpd and shapeflow's `resnet`, on the same cortical-surface pairs (issue 11).

Pairs: `shapes_vs_cpd.make_pair(n)` — fsaverage5's left pial surface (nilearn, no download)
decimated with PyVista to about N vertices, centred and scaled to unit RMS radius, and its known
smooth deformation `smooth_deformation(source, amplitude=0.05, seed=0)`, so target[i] is where
source[i] should go. fsaverage5 has 10,242 vertices and the full fsaverage (163,842) is not
available offline, so for N > 10,242 the fsaverage5 surface is first linearly subdivided (each
triangle into 4, PyVista `subdivide(k, "linear")`: the same surface, the new vertices on the old
triangles; 1 level = 40,962 vertices, 2 levels = 163,842) and then decimated to about N.

Methods (in this process, same arrays, one run per cell):

* shapeflow `register(Mesh, Mesh, model="displacement")`, defaults (mesh Laplacian);
* the same as point clouds (`register(array, array, model="displacement")`, kNN Laplacian);
* the same meshes with 8 landmarks (farthest-point-sampled source vertices and their known target
  positions, `landmark_weight=1.0`);
* shapeflow `model="resnet"` with `loss="varifold"` (meshes) and with the default Sinkhorn loss;
* `trimesh.registration.nricp_amberg(source_mesh, target_mesh)` with its default steps, the target
  given as a mesh with faces (its docstring: `use_faces=True` "use proximity.closest_point" on the
  target's surface, `use_vertex_normals=True` interpolates its normals; gamma=1 "recommended");
* `pycpd.DeformableRegistration` (alpha=2, beta=2, as in shapes_vs_cpd.py), only N <= 4000.

    python benchmarks/shapes_shared_core.py [--sizes 1000 4000 16000] [--large 40000 160000]
    python benchmarks/shapes_shared_core.py --from-json      # table and plot from the saved json

Writes benchmarks/results/shapes_shared_core.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

import numpy as np
import torch

import shapeflow as sf

sys.path.insert(0, str(Path(__file__).parent))
from shapes_vs_cpd import (fsaverage_mesh, machine_info, make_pair, normalised_pair,  # noqa: E402
                           score, timed)

RESULTS = Path(__file__).parent / "results"
NAME = "shapes_shared_core"
THREADS = 2
TARGET_RMSE_PCT = 1.0
NRICP_MAX_SECONDS = 150.0      # skip a trimesh size whose predicted time exceeds this
PYCPD_MAX_N = 4000
N_LANDMARKS = 8
NRICP_CONFIG = ("nricp_amberg (default steps, target as a Trimesh with faces, use_faces=False: kd-tree closest "
                "vertices; use_faces=True needs rtree, not installed)")


NOTES = """\
* Where we look worst: at 16k vertices `displacement` (mesh) took 78.1 s, the same as trimesh's
  NRICP (78.1 s, ratio 1.00x), so "faster at every size" is not met there; at 1k and 4k it is 2.8x and
  5.9x faster. Its time grows far faster than N between 4k and 16k (1.9 s -> 78 s, 42x for 4x the
  points), not investigated here: the 16k surface is the linearly subdivided then decimated one
  (other triangle shapes than the plain decimation), and the machine's load rose from ~1.9 to ~3.4
  (other jobs on the 2 cores) during those rows. trimesh, run under the same load, grew 11 s -> 78 s.
* `displacement` alone at 40,000 vertices (fsaverage5 subdivided once, decimated): 134 s, 0.52 % RMSE,
  0 % flipped. 160,000 was not run (it did not fit the session's time; at 134 s for 40k it would be
  several minutes at least). The 40k run had a lower load (~1.3-3) than the 16k rows, so the 16k ->
  40k growth (78 s -> 134 s) is less steep than 4k -> 16k.
* trimesh's NRICP is far less accurate (4.3-5.3 % RMSE against 0.3-0.45 %): closest-vertex
  correspondences on a folded surface lock onto the wrong gyri (as in shapes_vs_cpd.md). It ran with
  `use_faces=False` because `use_faces=True` (its docstring's closest point on the target surface)
  failed at 1k with `ModuleNotFoundError: No module named 'rtree'` (rtree is not installed here); the
  target is still a Trimesh with faces. Default steps, eps 1e-4, gamma 1, distance_threshold 0.1.
* pycpd is the most accurate at 1k (0.053 % against 0.28-0.32 % for displacement) but 3.5x slower
  (2.2 s vs 0.63 s). At 4k it did not run in this run: the N <= 4000 rule compared the decimated mesh's
  4001 vertices (fixed afterwards: the rule now reads the asked size); shapes_vs_cpd.md measured it at
  188-232 s at 4k with 1 thread.
* The landmark row: 8 farthest-point source vertices pinned to their known targets take the landmark
  error from 5.3-5.4 % of the diagonal to 0.024 % at every size, with the RMSE unchanged (0.32 % ->
  0.32 %, 0.45 -> 0.43 % at 16k). At 4k it was 13.4 s against 1.9 s without landmarks (the load rose
  at that moment; not re-measured).
* `resnet` with `loss="varifold"` ran at 1k only: 41.9 s and +1.5 GiB peak RSS (dense kernel sums over
  face pairs); at 4k, with 4x the faces, that scales to about 16x the memory and time, which did not
  fit this session's budget, so it was not run. resnet's default Sinkhorn: 5.7 s, 0.17 % at 1k.
* `make_pair(16000)` alone returns fsaverage5's 10,242 vertices (it decimates, never refines), hence
  the subdivision above 10,242 (`make_pair_any`). The first shapeflow call in a process also pays
  one-off costs (an earlier 1k run of displacement took 2.8 s as the first call, 0.63 s here).
* Peak RSS is the whole process's high-water mark (the varifold row from an earlier process with the
  same code, merged with `--merge`); one run per cell, torch and BLAS at 2 threads on a shared 2-core
  machine, so timings carry +-50 % or more of load noise.
"""


# ----------------------------------------------------------------------------- data

def make_pair_any(n: int) -> dict:
    """`make_pair(n)` up to fsaverage5's 10,242 vertices; above, linearly subdivided first."""
    vertices, _ = fsaverage_mesh()
    if n <= len(vertices):
        return make_pair(n)
    import pyvista as pv

    vertices, faces = fsaverage_mesh()
    mesh = pv.PolyData(vertices, np.hstack([np.full((len(faces), 1), 3), faces]).ravel())
    levels = 1
    while len(vertices) * 4 ** levels < n:      # a level multiplies the vertices by about 4
        levels += 1
    mesh = mesh.subdivide(levels, "linear")
    if mesh.n_points > n * 1.01:
        mesh = mesh.decimate(1.0 - n / mesh.n_points)
    pair = normalised_pair(np.asarray(mesh.points, dtype=np.float64), np.asarray(mesh.faces).reshape(-1, 4)[:, 1:])
    pair["subdivided"] = levels
    return pair


def farthest_points(points: np.ndarray, k: int) -> np.ndarray:
    idx = [0]
    dist = np.linalg.norm(points - points[0], axis=1)
    for _ in range(k - 1):
        idx.append(int(dist.argmax()))
        dist = np.minimum(dist, np.linalg.norm(points - points[idx[-1]], axis=1))
    return np.array(idx)


def flipped_vs_target(warped: np.ndarray, pair: dict) -> float:
    """% of triangles whose warped normal points against the same triangle's normal in the target."""
    f = pair["faces"]

    def normals(v):
        t = v[f]
        return np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])

    return float(100 * ((normals(np.asarray(warped)) * normals(pair["target"])).sum(1) < 0).mean())


def meshes(pair: dict):
    faces = torch.tensor(np.asarray(pair["faces"]), dtype=torch.long)
    return sf.Mesh(torch.tensor(pair["source"]), faces=faces), sf.Mesh(torch.tensor(pair["target"]), faces=faces)


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- methods

def run_sf(pair: dict, method: str, as_mesh: bool, **options) -> dict:
    if as_mesh:
        src, tgt = meshes(pair)
    else:
        src, tgt = pair["source"], pair["target"]
    rss0 = maxrss_mib()
    seconds, _, res = timed(lambda: sf.register(src, tgt, progress=False, seed=0, **options))
    warped = res.warped if isinstance(res.warped, np.ndarray) else res.warped.points.double().numpy()
    row = {"method": method, "tool": "shapeflow", "seconds": seconds, **score(warped, pair),
           "flipped_metric": res.metrics.get("flipped_triangles_percent"),
           "flipped_vs_target": flipped_vs_target(warped, pair),
           "maxrss_mib": maxrss_mib(), "maxrss_delta_mib": maxrss_mib() - rss0,
           "internal_seconds": res.metrics.get("seconds"), "options": {k: v for k, v in options.items()
                                                                        if k != "landmarks"}}
    if "landmark_error" in res.metrics:
        le = res.metrics["landmark_error"]
        row["landmark_error"] = {k: float(v) for k, v in le.items()}
        row["landmark_error_pct_diag"] = {k: 100 * float(v) / pair["diagonal"] for k, v in le.items()}
    return row


def run_nricp(pair: dict) -> dict:
    import trimesh

    src = trimesh.Trimesh(pair["source"], pair["faces"], process=False)
    tgt = trimesh.Trimesh(pair["target"], pair["faces"], process=False)
    seconds, _, warped = timed(lambda: trimesh.registration.nricp_amberg(src, tgt, use_faces=False))
    return {"method": "trimesh nricp_amberg", "tool": "trimesh", "config": NRICP_CONFIG, "seconds": seconds,
            **score(warped, pair), "flipped_metric": None, "flipped_vs_target": flipped_vs_target(warped, pair)}


def run_cpd(pair: dict) -> dict:
    """`shapes_vs_cpd.run_pycpd`'s settings (defaults: alpha=2, beta=2, 100 iterations, tol 1e-3); here the
    warped points are kept for the flipped-triangle count (that runner returns only its scores)."""
    from pycpd import DeformableRegistration

    def go():
        reg = DeformableRegistration(X=pair["target"], Y=pair["source"])   # moves Y onto X
        return reg, reg.register()[0]

    seconds, _, (reg, warped) = timed(go)
    return {"method": "pycpd deformable", "tool": "pycpd", "config": "DeformableRegistration (alpha=2, beta=2)",
            "seconds": seconds, "iterations": int(reg.iteration), **score(warped, pair), "flipped_metric": None,
            "flipped_vs_target": flipped_vs_target(warped, pair)}


METHODS = {   # label -> (runner taking pair, sizes rule)
    "displacement (mesh)": lambda p: run_sf(p, "displacement (mesh)", True, model="displacement"),
    "displacement (points)": lambda p: run_sf(p, "displacement (points)", False, model="displacement"),
    "displacement + 8 landmarks": None,   # built in main (needs the landmark arrays)
    "resnet varifold": lambda p: run_sf(p, "resnet varifold", True, model="resnet", loss="varifold"),
    "resnet sinkhorn (default)": lambda p: run_sf(p, "resnet sinkhorn (default)", True, model="resnet"),
    "trimesh nricp_amberg": run_nricp,
    "pycpd deformable": run_cpd,
}
RESNET_SIZES = (1000, 4000)


def run_landmarks(pair: dict) -> dict:
    idx = farthest_points(pair["source"], N_LANDMARKS)
    row = run_sf(pair, "displacement + 8 landmarks", True, model="displacement",
                 landmarks=(pair["source"][idx], pair["target"][idx]), landmark_weight=1.0)
    row["landmark_vertices"] = idx.tolist()
    return row


# ----------------------------------------------------------------------------- output

def fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def by(rows, method, n):
    return next((r for r in rows if r["method"] == method and r["n"] == n and "seconds" in r), None)


def targets(out: dict) -> list[str]:
    rows = out["rows"]
    disp = [r for r in rows if r["method"] == "displacement (mesh)" and "seconds" in r]
    worst = max(disp, key=lambda r: r["rmse_pct_diag"]) if disp else None
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    if worst:
        lines.append(f"| displacement (mesh) RMSE < {TARGET_RMSE_PCT:g} % of the diagonal at every size "
                     f"({', '.join(str(r['n']) for r in disp)}) | worst {worst['rmse_pct_diag']:.3f} % at N={worst['n']} "
                     f"| {'met' if worst['rmse_pct_diag'] < TARGET_RMSE_PCT else 'not met'} |")
    pts = [r for r in rows if r["method"] == "displacement (points)" and "seconds" in r]
    if pts:
        w = max(pts, key=lambda r: r["rmse_pct_diag"])
        lines.append(f"| (same, point clouds / kNN Laplacian) | worst {w['rmse_pct_diag']:.3f} % at N={w['n']} | "
                     f"{'met' if w['rmse_pct_diag'] < TARGET_RMSE_PCT else 'not met'} |")
    ratios = []
    for r in disp:
        t = by(rows, "trimesh nricp_amberg", r["n"])
        if t:
            ratios.append((t["seconds"] / r["seconds"], r["n"], t["seconds"], r["seconds"]))
    if ratios:
        low = min(ratios)
        text = "; ".join(f"N={n}: {ts:.1f} s / {ds:.1f} s = {q:.1f}x" for q, n, ts, ds in ratios)
        lines.append(f"| displacement (mesh) faster than trimesh nricp_amberg at every size both ran | {text} "
                     f"(lowest {low[0]:.2f}x at N={low[1]}) | {'met' if low[0] > 1 else 'not met'} |")
    marks = [r for r in rows if r["method"] == "displacement + 8 landmarks" and "seconds" in r]
    if marks:
        text = "; ".join(f"N={r['n']}: RMSE {r['rmse_pct_diag']:.3f} %, landmark error "
                         f"{r['landmark_error_pct_diag']['mean_before']:.2f} -> {r['landmark_error_pct_diag']['mean']:.3f} % diag"
                         for r in marks)
        lines.append(f"| a landmark row | {text} | met |")
    var = [r for r in rows if r["method"] == "resnet varifold" and "seconds" in r]
    if var:
        text = "; ".join(f"N={r['n']}: {r['seconds']:.1f} s, RMSE {r['rmse_pct_diag']:.3f} %" for r in var)
        lines.append(f"| a varifold row | {text} | met |")
    return lines


def table(rows: list[dict]) -> list[str]:
    lines = ["| method | N | seconds | RMSE % diag | surface (Chamfer) % diag | flipped % (shapeflow metric) | "
             "flipped % vs target normals | landmark error mean % diag (before -> after) | "
             "trimesh s / this s | peak RSS MiB (delta) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "seconds" not in r:
            lines.append(f"| {r['method']} | {r['n']} | {r.get('skipped') or 'error: ' + r.get('error', '')} "
                         f"| | | | | | | |")
            continue
        le = r.get("landmark_error_pct_diag")
        le_text = f"{le['mean_before']:.2f} -> {le['mean']:.3f}" if le else "—"
        t = by(rows, "trimesh nricp_amberg", r["n"])
        ratio = f"{t['seconds'] / r['seconds']:.2f}" if t and r["tool"] != "trimesh" else "—"
        rss = f"{r['maxrss_mib']:.0f} (+{r['maxrss_delta_mib']:.0f})" if r.get("maxrss_mib") else "—"
        lines.append(f"| {r['method']} | {r['n']} | {r['seconds']:.2f} | {r['rmse_pct_diag']:.3f} | "
                     f"{r['chamfer_pct_diag']:.3f} | {fmt(r.get('flipped_metric'))} | {fmt(r.get('flipped_vs_target'))} | "
                     f"{le_text} | {ratio} | {rss} |")
    return lines


def write(out: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    out["rows"].sort(key=lambda r: (r["n"], list(METHODS).index(r["method"])))
    m = out["machine"]
    before = ", ".join(f"{b['rmse_pct_diag']:.2f} % at N={b['n']}" for b in out["before"])
    md = ["# Shared core: shapeflow `displacement` (non-rigid ICP) vs trimesh NRICP, pycpd and `resnet`", "",
          "What is measured: each method moves a decimated fsaverage5 pial surface (unit RMS radius) onto its "
          "copy under a known smooth deformation (`smooth_deformation(amplitude=0.05, seed=0)`), so every "
          "vertex's true destination is known. `seconds` is the wall clock around one call (one run per cell, "
          f"no repeats; shapeflow's metrics included); RMSE = sqrt(mean |warped_i - target_i|^2) as % of the "
          f"target's bounding-box diagonal (before registration: {before}); surface distance = symmetric Chamfer "
          "(mean nearest-neighbour distance both ways) in % of the diagonal; flipped triangles: shapeflow's "
          "`metrics['flipped_triangles_percent']` (normal against J^-T n of the fitted map) and, for every "
          "method, the % of triangles whose warped normal points against the same triangle's normal in the "
          "target mesh. Above 10,242 vertices the surface is fsaverage5 linearly subdivided, then decimated "
          "(the full fsaverage is not available offline). Peak RSS: the process's `ru_maxrss` after the run "
          "(a high-water mark over the whole process, so only its growth, the delta, is attributable to a run).", "",
          f"Machine: {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads, BLAS "
          f"{m['blas_threads']}), numpy {m['numpy']}, trimesh {m['trimesh']}, pycpd {m['pycpd']}, {m['date']}, "
          f"load average {m['load_average_start'][0]:.2f} at start, {m.get('load_average_end', [float('nan')])[0]:.2f} "
          "at the end (a shared machine). Written by `benchmarks/shapes_shared_core.py`"
          f"{' ' + ' '.join(out['argv']) if out.get('argv') else ''}.", "",
          "## Targets (issue 11)", "", *targets(out), "",
          "## All runs", "", *table(out["rows"]), "",
          "## Notes", "", NOTES, ""]
    (RESULTS / f"{NAME}.md").write_text("\n".join(md))
    plot(out, RESULTS / f"{NAME}.png")


def plot(out: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.2))
    FigureCanvasAgg(fig)
    ax_t, ax_e = fig.subplots(1, 2)
    ok = [r for r in out["rows"] if "seconds" in r]
    for method in METHODS:
        rows = sorted((r for r in ok if r["method"] == method), key=lambda r: r["n"])
        if not rows:
            continue
        style = "o-" if len(rows) > 1 else "o"
        ax_t.plot([r["n"] for r in rows], [r["seconds"] for r in rows], style, label=method)
        ax_e.plot([r["n"] for r in rows], [r["rmse_pct_diag"] for r in rows], style, label=method)
    ax_e.plot([b["n"] for b in out["before"]], [b["rmse_pct_diag"] for b in out["before"]], "k:", label="before registration")
    ax_e.axhline(TARGET_RMSE_PCT, color="grey", ls="--", lw=0.8)
    ns = sorted({r["n"] for r in ok})
    for ax, ylabel in ((ax_t, "seconds (log)"), (ax_e, "RMSE, % of bbox diagonal (log)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns], rotation=30, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("N vertices")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_title(f"time ({out['machine']['cpu_count']} CPUs, {out['machine']['torch_threads']} threads, 1 run)")
    ax_e.set_title("accuracy against the known deformation (dashed: 1 % target)")
    handles, names = ax_e.get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000], help="sizes for every method")
    parser.add_argument("--large", type=int, nargs="*", default=[40000, 160000],
                        help="extra sizes for displacement (mesh) alone")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="subset of: " + ", ".join(METHODS))
    parser.add_argument("--resnet-sizes", type=int, nargs="*", default=list(RESNET_SIZES),
                        help="sizes (of --sizes) at which the resnet rows run")
    parser.add_argument("--from-json", action="store_true", help="rebuild .md and .png from the saved .json")
    parser.add_argument("--merge", action="store_true", help="add these rows to the saved .json (replacing equal cells)")
    args = parser.parse_args()
    path = RESULTS / f"{NAME}.json"
    if args.from_json:
        write(json.loads(path.read_text()))
        return
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(THREADS)
    threadpool_limits(THREADS)
    out = {"machine": machine_info(THREADS), "argv": sys.argv[1:], "rows": [], "before": [], "notes": [],
           "nricp_config": NRICP_CONFIG, "repeats": 1}
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        out["notes"], out["before"], out["rows"] = old.get("notes", []), old["before"], old["rows"]
    runners = dict(METHODS, **{"displacement + 8 landmarks": run_landmarks})
    nricp_last = None                     # (n, seconds) of the last trimesh run
    for n in list(args.sizes) + list(args.large):
        pair = make_pair_any(n)
        n_actual = len(pair["source"])
        out["before"] = [b for b in out["before"] if b["n"] != n_actual] + [{"n": n_actual, **score(pair["source"], pair)}]
        print(f"N={n_actual} (asked {n}, subdivided {pair.get('subdivided', 0)}): before "
              f"{out['before'][-1]['rmse_pct_diag']:.2f} %", flush=True)
        methods = args.methods if n in args.sizes else [m for m in args.methods if m == "displacement (mesh)"]
        for method in methods:
            cell = {"method": method, "n": n_actual, "load_average": os.getloadavg()}
            if method.startswith("resnet") and n not in args.resnet_sizes:
                continue
            if method == "pycpd deformable" and n > PYCPD_MAX_N:
                cell["skipped"] = f"skipped: pycpd only at N <= {PYCPD_MAX_N} (O(N^3) per iteration)"
            elif method == "trimesh nricp_amberg" and nricp_last and \
                    nricp_last[1] * n_actual / nricp_last[0] > NRICP_MAX_SECONDS:
                cell["skipped"] = (f"skipped: {nricp_last[1]:.0f} s at N={nricp_last[0]} predicts "
                                   f">= {nricp_last[1] * n_actual / nricp_last[0]:.0f} s (linear), over {NRICP_MAX_SECONDS:.0f} s")
            else:
                try:
                    cell.update(runners[method](pair))
                except Exception as exc:     # record and go on
                    cell["error"] = f"{type(exc).__name__}: {exc}"
            if method == "trimesh nricp_amberg" and "seconds" in cell:
                nricp_last = (n_actual, cell["seconds"])
            out["rows"] = [r for r in out["rows"] if (r["method"], r["n"]) != (method, n_actual)] + [cell]
            print("  " + json.dumps({k: v for k, v in cell.items() if k not in ("landmark_vertices",)}), flush=True)
            out["machine"]["load_average_end"] = os.getloadavg()
            path.write_text(json.dumps(out, indent=2) + "\n")        # after every cell: a crash keeps the rest
            write(out)
    out["rows"].sort(key=lambda r: (list(METHODS).index(r["method"]), r["n"]))
    path.write_text(json.dumps(out, indent=2) + "\n")
    write(out)


if __name__ == "__main__":
    main()
