"""Benchmark: deformable point-set registration, shapeflow against probreg's BCPD, CPD and FilterReg.

Issue 12 names Hirose's Bayesian Coherent Point Drift (BCPD) as the peer at large sizes. This
script measures the Python implementation most users reach for, probreg 0.3.8 (`pip install
probreg`): its BCPD (`bcpd.registration_bcpd`, "experimental" in probreg's README), its non-rigid
CPD (`cpd.registration_cpd(..., tf_type_name="nonrigid")`) and its FilterReg
(`filterreg.registration_filterreg`). probreg's FilterReg is rigid only for plain point clouds
(its deformable variant, `DeformableKinematicFilterReg`, needs the `dq3d` package and a skinning
graph of nodes and per-point weights), so it is run rigid: a speed reference, not an accuracy peer.

Data (the pairs of `shapes_vs_cpd.py`, same normalisation and the same known deformation):

* N = 91: `shapes_vs_cpd.fish_pair()` (2D contour);
* N <= 10,242: `shapes_vs_cpd.make_pair(N)`, the fsaverage5 pial surface decimated to ~N vertices;
* N > 10,242: N points sampled uniformly on the three-times subdivided fsaverage5 surface
  (`shapes_scale.points_on_surface`), normalised by `shapes_vs_cpd.normalised_pair`.

The target is `smooth_deformation(source, amplitude=0.05, seed=0)`, so target[i] is where
source[i] should go; every tool moves the source and is scored by `shapes_vs_cpd.score` (RMSE
against the known positions, also as % of the target's bounding-box diagonal, and the symmetric
Chamfer distance as % of the diagonal).

Tools:

* shapeflow `register(source, target)` (default model and loss), in this process: one warm-up
  call first (a process's first call pays imports), then the median of `--repeats` runs;
* probreg, in a separate interpreter (`--probreg-python`, default $PROBREG_PYTHON, else
  /tmp/prvenv/bin/python: probreg needs open3d, which conflicts with our venv). Each (method, N)
  runs in its own child process (`python shapes_vs_probreg.py --worker JOB.json`) that imports
  probreg, times only the registration call (time.perf_counter), applies the returned
  transformation to the source points (so warped[i] corresponds to source[i]) and writes the
  warped points and the seconds back as .npz. One run each. Arrays travel as .npz files in a
  temporary directory. If the interpreter is missing or cannot import probreg, the probreg rows
  say "not installed" with the reason and the shapeflow rows are still written.

Threads: 1 torch thread and OMP/MKL/OpenBLAS threads 1 for both tools (a shared 2-core machine);
the `load` column is the 1-minute load average before each row.

    python benchmarks/shapes_vs_probreg.py [--quick] [--sizes 91 1000 4000 20000 100000]
        [--probreg-python /path/to/python] [--timeout 420] [--replot]

Writes benchmarks/results/shapes_vs_probreg.json, .md and .png (``--quick``: fish and 1000 only,
one shapeflow repeat, writes ``shapes_vs_probreg.quick.*``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NAME = "shapes_vs_probreg"
#: `--sizes 91` is the fish (2D), not a decimated surface
FISH = 91
#: fsaverage5's vertex count: above it the points are sampled on the subdivided surface
FSAVERAGE5_VERTICES = 10242
SIZES = [FISH, 1000, 4000, 20000, 100000]
QUICK_SIZES = [FISH, 1000]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
DEFAULT_PROBREG_PYTHON = "/tmp/prvenv/bin/python"

#: probreg methods: name -> tool and config labels, keyword arguments (its defaults, written out), the largest N
#: it is run at, and why not above (measured on this machine, 1 thread)
PEERS = {
    "bcpd": {
        "tool": "probreg BCPD",
        "label": "BCPD (defaults: w=0, lmd=2, k=1e20, gamma=1, maxiter=50, tol=1e-3)",
        "kwargs": {"w": 0.0, "lmd": 2.0, "k": 1.0e20, "gamma": 1.0, "maxiter": 50, "tol": 1.0e-3},
        "max_n": 4001,
        "skip": "not run above 4k: probreg's BCPD is dense, with (N*d) x (N*d) Kronecker matrices per "
                "iteration (3.1 GB and ~11 s per iteration at 4k; one such matrix is 29 GB at 20k)",
    },
    "cpd": {
        "tool": "probreg CPD",
        "label": "CPD nonrigid (defaults: beta=2, lmd=2, w=0, maxiter=50, tol=1e-3)",
        "kwargs": {"tf_type_name": "nonrigid", "beta": 2.0, "lmd": 2.0, "w": 0.0, "maxiter": 50, "tol": 1.0e-3},
        "max_n": 4001,
        "skip": "not run above 4k: a dense N x N kernel solve per EM iteration (O(N^3)), "
                "~125x the 4k cost at 20k",
    },
    "filterreg": {
        "tool": "probreg FilterReg (rigid)",
        "label": "FilterReg RIGID (pt2pt, sigma2=None, update_sigma2=True, w=0, maxiter=50, tol=1e-3)",
        "kwargs": {"objective_type": "pt2pt", "sigma2": None, "update_sigma2": True, "w": 0.0,
                   "maxiter": 50, "tol": 1.0e-3},
        "max_n": None,
        "skip": None,
    },
}
SHAPEFLOW_CONFIG = "register(source, target) (default model and loss)"

NOTES = """\
* What is measured: wall-clock seconds of one registration (shapeflow: median of 3 after a warm-up
  call; probreg: one run, only the registration call, probreg's import excluded) and the error
  against the known deformation. shapeflow's seconds include its metrics (`register` computes
  them); probreg's include nothing but its own initialisation and EM loop.
* Peers' configurations: probreg's defaults, written out in the table (no tuning), called as its
  README and examples call them: `bcpd.registration_bcpd(source, target)`,
  `cpd.registration_cpd(source, target, tf_type_name="nonrigid")` and, for FilterReg, its rigid
  example's `registration_filterreg(source, target, objective_type="pt2pt", sigma2=None,
  update_sigma2=True)` (in 2D with `tf_init_params={"rot": I2, "t": 0}`, as in its 2D example).
  probreg moves the source onto the target; warped = `transformation.transform(source)` (for BCPD
  the full combined rigid + scale + non-rigid transformation), so warped[i] pairs with target[i].
* probreg's BCPD is not Hirose's BCPD program: it is a dense NumPy version (inverse-multiquadric
  kernel, no Nystrom / KD-tree acceleration), marked experimental by probreg. With its defaults it
  made the alignment worse, not better, at every size: its similarity part shrinks the source
  (scale 0.21 on the fish, 0.72 at 1k, in a check before this run) and the RMSE ends above the
  unregistered one. Tried by hand before the run (not in the table): gamma=0.1 with maxiter=200,
  tol=1e-5 gave 2.3 % (fish) and 3.5 % (1k, 9.6 s); gamma 0.01-0.03 and lmd 0.5-50 gave 2.0-6.6 %
  at 1k, never near CPD's or shapeflow's. So these rows say nothing about Hirose's program at
  large N: the peer issue 12 names at 100k remains to be measured with Hirose's own code.
* probreg's non-rigid CPD stops at 50 EM iterations (pycpd's default is 100): at 4k it is less
  accurate than pycpd was in shapes_vs_cpd (2.5 % against 1.0 % of the diagonal).
* shapeflow's fixed cost: on the fish every probreg method finishes in milliseconds and shapeflow
  needs tenths of a second (its Adam steps through a neural flow), so at small N it loses on time
  to every peer here, even to those it beats on accuracy.
* probreg's FilterReg is rigid here (see the docstring): its RMSE is that of a rigid fit, its time
  a speed reference only. Its `sigma2=None` start computes a dense N x N kernel sum
  (`math_utils.squared_kernel_sum`): ~3.7 s of its time at 20k (the 50 filter iterations take
  about 1 s) and 80 GB at 100k, where it fails with `std::bad_alloc`. It ran all 50 iterations
  (no convergence by its `tol`) at 20k.
* Threads: 1 for every tool (torch.set_num_threads(1), threadpoolctl in this process; OMP, MKL and
  OpenBLAS variables set to 1 in probreg's processes). Other jobs shared the 2-core machine, so
  differences under ~1.5x in seconds are noise.
"""


# ----------------------------------------------------------------------------- probreg worker
# Runs under probreg's interpreter: numpy and the standard library only (no torch, no shapeflow).

def worker(job_file: str) -> None:
    """Run one probreg registration described by JOB.json; write warped points and seconds as .npz."""
    job = json.loads(Path(job_file).read_text())
    data = np.load(job["data"])
    source, target = data["source"], data["target"]
    from probreg import bcpd, cpd, filterreg
    from probreg.version import __version__

    kwargs, iterations = dict(job["kwargs"]), []
    callbacks = [lambda transformation: iterations.append(1)]
    if job["method"] == "bcpd":
        def register():
            return bcpd.registration_bcpd(source, target, callbacks=callbacks, **kwargs)
    elif job["method"] == "cpd":
        def register():
            return cpd.registration_cpd(source, target, callbacks=callbacks, **kwargs).transformation
    elif job["method"] == "filterreg":
        if source.shape[1] == 2:   # as probreg's examples/filterreg_rigid2d.py
            kwargs["tf_init_params"] = {"rot": np.identity(2), "t": np.zeros(2)}

        def register():
            return filterreg.registration_filterreg(source, target, callbacks=callbacks, **kwargs).transformation
    else:
        raise ValueError(f"unknown method {job['method']!r}")
    t0 = time.perf_counter()
    transformation = register()
    seconds = time.perf_counter() - t0
    warped = np.asarray(transformation.transform(source), dtype=np.float64)
    np.savez(job["out"], warped=warped, seconds=seconds, iterations=len(iterations),
             peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, probreg=__version__)


def check_probreg(python: str) -> tuple[str | None, str | None]:
    """("probreg_version numpy_version", None) if `python` imports probreg, else (None, one-line reason)."""
    if not Path(python).exists():
        return None, f"{python} does not exist"
    try:
        done = subprocess.run([python, "-c", "import numpy, probreg.version as v; print(v.__version__, numpy.__version__)"],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"{python}: {error}"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return None, f"{python}: {lines[-1]}"
    return done.stdout.strip(), None


def run_probreg(method: str, pair: dict, python: str, workdir: Path, timeout: float) -> dict:
    """One probreg registration in a child process; the row, with `status` "ok" or why not."""
    peer = PEERS[method]
    n = len(pair["source"])
    row = {"tool": peer["tool"], "config": peer["label"], "kwargs": peer["kwargs"], "seconds": None}
    data, job, out = (workdir / f"{method}_{n}{ext}" for ext in ("_data.npz", ".json", "_out.npz"))
    np.savez(data, source=pair["source"], target=pair["target"])
    job.write_text(json.dumps({"method": method, "kwargs": peer["kwargs"], "data": str(data), "out": str(out)}))
    env = {**os.environ, **{name: "1" for name in THREAD_VARIABLES}}
    try:
        done = subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(job)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0 or not out.exists():
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return {**row, "status": f"failed: {lines[-1]}"}
    result = np.load(out)
    return {**row, "status": "ok", "seconds": float(result["seconds"]), "iterations": int(result["iterations"]),
            "peak_mib": float(result["peak_mib"]), **B.score(result["warped"], pair)}


# ----------------------------------------------------------------------------- data and shapeflow

def make_pair(n: int) -> dict:
    """The fish (n=91), fsaverage5 decimated to ~n vertices, or n points on its subdivided surface."""
    if n == FISH:
        return B.fish_pair()
    if n <= FSAVERAGE5_VERTICES:
        return B.make_pair(n)
    from shapes_scale import points_on_surface

    return B.normalised_pair(points_on_surface(n), None)


def run_shapeflow(pair: dict, repeats: int) -> dict:
    import shapeflow as sf

    seconds, times, result = B.timed(lambda: sf.register(pair["source"], pair["target"], progress=False, seed=0),
                                      repeats)
    return {"tool": "shapeflow", "config": SHAPEFLOW_CONFIG, "status": "ok", "seconds": seconds,
            "seconds_all": times, "iterations": len(result.history), **B.score(result.warped, pair)}


# ----------------------------------------------------------------------------- output

def machine_info(probreg_python: str, probreg_versions: str | None, probreg_error: str | None) -> dict:
    import torch

    import shapeflow

    probreg, probreg_numpy = (probreg_versions or "- -").split()
    return {"cpu_count": os.cpu_count(), "threads": 1, "torch": torch.__version__, "numpy": np.__version__,
            "shapeflow": getattr(shapeflow, "__version__", "?"), "probreg": None if probreg_error else probreg,
            "probreg_numpy": None if probreg_error else probreg_numpy, "probreg_python": probreg_python,
            "probreg_error": probreg_error, "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "load_average_start": os.getloadavg()}


def add_ratios(rows: list[dict]) -> None:
    """peer_over_shapeflow = peer seconds / shapeflow seconds at the same N (> 1: shapeflow faster)."""
    for r in rows:
        ours = next((s for s in rows if s["tool"] == "shapeflow" and s["n"] == r["n"]), None)
        if ours is not None and r["seconds"] is not None:
            r["peer_over_shapeflow"] = r["seconds"] / ours["seconds"]


def fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def table(rows: list[dict]) -> list[str]:
    lines = ["| N | tool | config | seconds | RMSE | RMSE % diag | Chamfer % diag | peer s / shapeflow s | "
             "load | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = "" if r["status"] == "ok" else r["status"]
        if r["status"] == "ok" and r["tool"] != "shapeflow":
            note = f"{r['iterations']} iterations, {r['peak_mib']:.0f} MiB peak"
        lines.append(f"| {r['n']} | {r['tool']} | {r['config']} | {fmt(r['seconds'], '.3g')} | {fmt(r.get('rmse'), '.4f')} | "
                     f"{fmt(r.get('rmse_pct_diag'), '.2f')} | {fmt(r.get('chamfer_pct_diag'), '.2f')} | "
                     f"{fmt(r.get('peer_over_shapeflow'), '.3g')} | {r['load_average'][0]:.1f} | {note} |")
    return lines


def findings(rows: list[dict]) -> list[str]:
    """Computed from the rows: every cell where a peer beat shapeflow on time or RMSE (worst first),
    and every cell that did not run."""
    wins = []
    for r in (r for r in rows if r["tool"] != "shapeflow" and r["status"] == "ok"):
        ours = next(s for s in rows if s["tool"] == "shapeflow" and s["n"] == r["n"])
        time_text = f"{r['seconds']:.3g} s against shapeflow's {ours['seconds']:.3g} s"
        rmse_text = f"RMSE {r['rmse_pct_diag']:.2f} % against {ours['rmse_pct_diag']:.2f} % of the diagonal"
        faster, better = r["seconds"] < ours["seconds"], r["rmse"] < ours["rmse"]
        if faster and better:
            text, badness = f"faster ({time_text}) and more accurate ({rmse_text})", 1e6
        elif better:
            text, badness = f"more accurate ({rmse_text}; {time_text})", ours["rmse"] / r["rmse"]
        elif faster:
            text, badness = f"{ours['seconds'] / r['seconds']:.0f}x faster ({time_text}) but less accurate ({rmse_text})", 0
        else:
            continue
        wins.append((badness, f"* N={r['n']}: {r['tool']} is {text}."))
    wins = [text for _, text in sorted(wins, key=lambda w: -w[0])]
    lines = [f"Where shapeflow looks worst: {wins[0][2:]}" if wins else "No peer beat shapeflow on time or RMSE.", "",
             "Every cell where a peer beat shapeflow on time or RMSE (computed from the table, most telling first):", ""]
    lines += wins or ["* nowhere."]
    skipped = [r for r in rows if r["status"] != "ok"]
    lines += ["", "Not run or failed:", ""]
    lines += [f"* N={r['n']}, {r['tool']}: {r['status']}." for r in skipped] or ["* none."]
    return lines


def write(out: dict, stem: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    m = out["machine"]
    probreg = (f"probreg {m['probreg']} (numpy {m['probreg_numpy']}, {m['probreg_python']})" if m["probreg"]
               else f"probreg not installed ({m['probreg_error']})")
    md = ["# shapeflow vs probreg (BCPD, non-rigid CPD, rigid FilterReg): deformable registration", "",
          f"Machine: {m['cpu_count']} CPUs, 1 thread per tool, torch {m['torch']}, numpy {m['numpy']}, {probreg}, "
          f"{m['date']}, load average {m['load_average_start'][0]:.2f} at start (other jobs shared the machine; "
          "`load` is the 1-minute load average before each row).", "",
          "Shapes: the fish (N=91, 2D), fsaverage5's pial surface decimated to ~N vertices (N <= 10,242) or N "
          "points sampled on its subdivided surface (N > 10,242), unit RMS radius; target = "
          "`smooth_deformation(source, amplitude=0.05, seed=0)` (known correspondence). RMSE = "
          "sqrt(mean |warped_i - target_i|^2), also as % of the target's bounding-box diagonal; before "
          "registration it is " + ", ".join(f"{b['rmse_pct_diag']:.2f} % at N={b['n']}" for b in out["before"]) +
          f". shapeflow: median of {out['repeats']} run(s) after a warm-up call; probreg: one run per cell in its own "
          "process, only the registration call timed. `peer s / shapeflow s` > 1 means shapeflow was faster. "
          "**FilterReg is rigid** (probreg has no deformable FilterReg for plain point clouds): a speed "
          "reference, not an accuracy peer.", ""]
    md += table(out["rows"])
    md += ["", "## Reading", ""] + findings(out["rows"]) + ["", NOTES]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    plot(out, RESULTS / f"{stem}.png")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(11, 5.2))
    ok = [r for r in out["rows"] if r["status"] == "ok"]
    for tool in sorted({r["tool"] for r in ok}, key=lambda t: (t != "shapeflow", t)):
        rows = sorted((r for r in ok if r["tool"] == tool), key=lambda r: r["n"])
        name = tool if tool != "shapeflow" else "shapeflow: register() defaults"
        style = "o--" if "rigid" in tool else "o-"
        ax_t.plot([r["n"] for r in rows], [r["seconds"] for r in rows], style, label=name)
        ax_e.plot([r["n"] for r in rows], [r["rmse_pct_diag"] for r in rows], style, label=name)
    ax_e.plot([b["n"] for b in out["before"]], [b["rmse_pct_diag"] for b in out["before"]], "k:",
              label="before registration")
    ns = sorted({r["n"] for r in out["rows"]})
    for ax, ylabel in ((ax_t, "seconds (log)"), (ax_e, "RMSE, % of bbox diagonal (log)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ns)
        ax.set_xticklabels([f"{n}\n(fish, 2D)" if n == FISH else str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("N points")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_title(f"time ({out['machine']['cpu_count']} CPUs, 1 thread per tool)")
    ax_e.set_title("accuracy against the known deformation")
    handles, names = ax_e.get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=3, frameon=False, bbox_to_anchor=(0.5, 0.06))
    missing = {}
    for r in out["rows"]:
        if r["status"] != "ok":
            word = "failed" if r["status"].startswith(("failed", "timed out")) else "not run"
            missing.setdefault((r["tool"], word), []).append(str(r["n"]))
    if missing:
        fig.text(0.5, 0.01, "; ".join(f"{tool} {word} at N={', '.join(ns)}" for (tool, word), ns in missing.items()),
                 ha="center", fontsize=8, color="grey")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fish and 1000 only, one repeat; writes *.quick.*")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="points per shape; 91 is the fish (2D)")
    parser.add_argument("--repeats", type=int, default=3, help="shapeflow repeats (median)")
    parser.add_argument("--probreg-python", default=os.environ.get("PROBREG_PYTHON", DEFAULT_PROBREG_PYTHON),
                        help="interpreter with probreg installed (default: $PROBREG_PYTHON, else %(default)s)")
    parser.add_argument("--timeout", type=float, default=420, help="seconds allowed to one probreg child")
    parser.add_argument("--replot", action="store_true", help="rewrite .md and .png from the saved .json")
    parser.add_argument("--worker", metavar="JOB.json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    stem = NAME + (".quick" if args.quick else "")
    if args.replot:
        write(json.loads((RESULTS / f"{stem}.json").read_text()), stem)
        return
    if args.quick:
        args.sizes, args.repeats = QUICK_SIZES, 1

    import torch
    from threadpoolctl import threadpool_limits

    for name in THREAD_VARIABLES:
        os.environ[name] = "1"
    torch.set_num_threads(1)
    threadpool_limits(1)
    versions, error = check_probreg(args.probreg_python)
    machine = machine_info(args.probreg_python, versions, error)
    print(f"load average {machine['load_average_start']}; probreg: {versions or error}", flush=True)
    out = {"machine": machine, "quick": args.quick, "repeats": args.repeats, "amplitude": B.AMPLITUDE,
           "peers": PEERS, "rows": [], "before": []}

    pairs = [make_pair(n) for n in args.sizes]
    t0 = time.perf_counter()
    run_shapeflow(pairs[0], 1)
    out["shapeflow_first_call_seconds"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix=NAME) as tmp:
        for pair in pairs:
            n = len(pair["source"])
            out["before"].append({"n": n, **B.score(pair["source"], pair)})
            print(f"N={n}: before RMSE {out['before'][-1]['rmse_pct_diag']:.2f} % of diagonal", flush=True)
            cells = [lambda: run_shapeflow(pair, args.repeats)]
            for method, peer in PEERS.items():
                if error:
                    cells.append(lambda method=method: {"tool": PEERS[method]["tool"], "config": PEERS[method]["label"],
                                                        "seconds": None, "status": f"not installed: {error}"})
                elif peer["max_n"] is not None and n > peer["max_n"]:
                    cells.append(lambda method=method: {"tool": PEERS[method]["tool"], "config": PEERS[method]["label"],
                                                        "seconds": None, "status": PEERS[method]["skip"]})
                else:
                    cells.append(lambda method=method: run_probreg(method, pair, args.probreg_python, Path(tmp),
                                                                   args.timeout))
            for cell in cells:
                load = os.getloadavg()
                row = {"n": n, "load_average": load, **cell()}
                out["rows"].append(row)
                print(f"  {row['tool']}: {fmt(row['seconds'], '.3g')} s, RMSE {fmt(row.get('rmse_pct_diag'), '.3f')} % "
                      f"({row['status']}; load {load[0]:.2f})", flush=True)
    add_ratios(out["rows"])
    out["machine"]["load_average_end"] = os.getloadavg()
    write(out, stem)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    if "--worker" not in sys.argv:   # probreg's interpreter has no torch: the worker needs none of B
        import shapes_vs_cpd as B   # data (fish_pair, make_pair, normalised_pair), score, timed
    main()
