"""Batch registration on Dask (issue 15): 20 small pairs on 1 against 2 workers, per-task overhead,
and the numbers a 1,000-pair cohort on a multi-node cluster is planned from.

* Pairs: 20 distinct 2D contours (the horse contour of assets/, each bent by its own smooth
  deformation and turned), registered with the default model and loss (`resnet`, `sinkhorn`,
  float32, one torch thread per worker), through `sf.register_many` on a LocalCluster of one-thread
  processes. Each cluster is started and warmed (torch and shapeflow imported in every worker)
  before the clock starts; the start-up is reported on its own row.
* Per-task overhead: (a) 400 no-op tasks through the same scheduler (submit to result), (b) a
  batch's wall time times its workers minus the registrations' own seconds, per pair: Dask,
  input reading, writing the outputs (warped shape, deformation, report, marker) and the rename.

Writes benchmarks/results/batch.json and batch.md. Run: `.venv/bin/python benchmarks/batch.py`
(about 3 minutes on 2 cores; `--quick`: 6 pairs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import shapeflow as sf

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def make_pairs(folder: Path, count: int) -> Path:
    """`count` (source, target) contour pairs as CSV files and the PAIRS.csv listing them."""
    base = sf.read(ROOT / "assets" / "horse_contour.csv").points.double().numpy()
    base = (base - base.mean(0)) / np.sqrt(((base - base.mean(0)) ** 2).sum(1).mean())
    rng = np.random.default_rng(0)
    lines = ["name,source,target"]
    for k in range(count):
        a, f, angle = rng.uniform(0.1, 0.25), rng.uniform(1.0, 2.0), rng.uniform(-0.3, 0.3)
        bent = base + a * np.c_[np.sin(f * base[:, 1]), np.cos(f * base[:, 0])]
        turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        target = bent @ turn.T
        source = base + rng.normal(0, 0.01, base.shape)
        sf.write(sf.PointCloud(source), folder / f"s{k}.csv")
        sf.write(sf.PointCloud(target), folder / f"t{k}.csv")
        lines.append(f"pair{k:02d},s{k}.csv,t{k}.csv")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


def _warm() -> int:
    import shapeflow  # noqa: F401  (torch and shapeflow imported once per worker)

    return os.getpid()


def _noop(x):
    return x


def run(pairs: Path, workers: int, work: Path) -> dict:
    from distributed import Client, LocalCluster

    started = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.run(_warm)
        startup = time.perf_counter() - started
        out = work / f"out{workers}"
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        summary = sf.register_many(pairs, out, client=client, progress=False)
        wall = time.perf_counter() - t0
        load = max(load, os.getloadavg()[0])
        noop = None
        if workers > 1:
            t1 = time.perf_counter()
            client.gather([client.submit(_noop, i, pure=False) for i in range(400)])
            noop = (time.perf_counter() - t1) / 400
    seconds = [float(r["seconds"]) for r in summary.rows]
    cpu = [float(r["cpu_seconds"]) for r in summary.rows]
    assert summary.ok, [r.get("error") for r in summary.rows if r["status"] == "failed"]
    return {"workers": workers, "pairs": len(seconds), "wall_s": wall, "startup_s": startup,
            "register_s_sum": sum(seconds), "register_s_median": statistics.median(seconds),
            "overhead_per_pair_s": (wall * workers - sum(seconds)) / len(seconds), "noop_task_s": noop,
            "register_cpu_s_median": statistics.median(cpu), "cpu_share": sum(cpu) / (wall * workers),
            "chamfer_median": statistics.median(float(r["chamfer"]) for r in summary.rows),
            "load_average_max": load}


def plan(one: dict, two: dict) -> list[str]:
    """The 1,000-pair plan, from the measured per-pair seconds and overheads."""
    per_pair = min(one["register_cpu_s_median"], two["register_cpu_s_median"]) + max(two["overhead_per_pair_s"], 0.0)
    lines = []
    for nodes, cores in ((4, 32), (10, 32)):
        workers = nodes * cores
        wall = 1000 * per_pair / workers
        lines.append(f"| {nodes} nodes x {cores} cores = {workers} one-thread workers | {1000 * per_pair / 3600:.2f} "
                     f"core-hours | {wall:.0f} s of registering + about {two['startup_s']:.0f} s of worker start-up |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 pairs instead of 20")
    parser.add_argument("--table-only", action="store_true", help="rewrite the .md from the .json (no runs)")
    args = parser.parse_args()
    count = 6 if args.quick else 20
    name = "batch.quick" if args.quick else "batch"
    if args.table_only:
        saved = json.loads((RESULTS / f"{name}.json").read_text())
        write_table(name, count, args.quick, *saved["rows"], saved["machine"])
        return
    work = Path(tempfile.mkdtemp(prefix="shapeflow-batch-bench-"))
    try:
        pairs = make_pairs(work, count)
        one = run(pairs, 1, work)
        two = run(pairs, 2, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
               "dask": __import__("dask").__version__, "load_average_max": max(one["load_average_max"],
                                                                              two["load_average_max"])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": [one, two], "speedup": one["wall_s"] / two["wall_s"],
                                                       "machine": machine}, indent=2) + "\n")
    write_table(name, count, args.quick, one, two, machine)


def write_table(name: str, count: int, quick: bool, one: dict, two: dict, machine: dict) -> None:
    speedup = one["wall_s"] / two["wall_s"]
    # what two idle cores would give: both workers at the 1-worker run's CPU per pair, plus the overhead
    idle = 2 * (one["register_cpu_s_median"] + one["overhead_per_pair_s"]) / (
        two["register_cpu_s_median"] + max(two["overhead_per_pair_s"], 0.0))
    met = "met" if speedup >= 1.8 else "not met"
    busy = machine["load_average_max"] > 0.5 * (os.cpu_count() or 1)
    md = [f"# Batch registration on Dask: {count} pairs, 1 vs 2 workers", "",
          f"`benchmarks/batch.py{' --quick' if quick else ''}`: {count} 2D contour pairs (the horse contour, "
          f"{len(sf.read(ROOT / 'assets' / 'horse_contour.csv'))} points, bent and turned), default model and loss "
          "(`resnet`, `sinkhorn`), one torch thread per worker, through `sf.register_many` on a LocalCluster of "
          "one-thread processes; clusters started and warmed before timing.", "",
          "| workers | wall (s) | start-up (s) | sum of registrations (s) | median pair (s) | median pair CPU (s) "
          "| CPU share | overhead per pair (s) | no-op task (ms) | median Chamfer | load average (max) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (one, two):
        noop = f"{1000 * r['noop_task_s']:.2f}" if r["noop_task_s"] is not None else "-"
        md.append(f"| {r['workers']} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | {r['register_s_sum']:.1f} | "
                  f"{r['register_s_median']:.2f} | {r['register_cpu_s_median']:.2f} | {r['cpu_share']:.2f} | "
                  f"{r['overhead_per_pair_s']:.3f} | {noop} | "
                  f"{r['chamfer_median']:.4f} | {r['load_average_max']:.1f} |")
    md += ["", f"**Speed-up 2 workers / 1 worker: {speedup:.2f}x; target >= 1.8x: {met}.**"
           + (f" The machine was shared (load average up to {machine['load_average_max']:.1f} on "
              f"{os.cpu_count()} cores during the runs): other jobs took CPU time from the two workers, so the "
              "ratio understates what two free cores give. From the CPU times instead (each worker busy with "
              "its pair for the pair's CPU seconds plus the overhead, as on idle cores): "
              f"2 x ({one['register_cpu_s_median']:.2f} + {one['overhead_per_pair_s']:.3f}) / "
              f"({two['register_cpu_s_median']:.2f} + {max(two['overhead_per_pair_s'], 0):.3f}) = {idle:.2f}x, an "
              "estimate, not a measurement." if busy else ""), "",
           f"Machine: {machine['cpus']} CPUs, torch {machine['torch']}, dask {machine['dask']}, "
           f"Python {machine['python']}.", "",
           "Overhead per pair = (wall x workers - the registrations' own seconds) / pairs: Dask's scheduling, "
           "reading the two CSVs, writing warped.csv, deformation.pt, report.json and the marker into a staging "
           "folder and renaming it. The no-op row is Dask alone (400 empty tasks, submit to result, 2 workers). "
           "CPU share = the registrations' CPU seconds / (wall x workers): the fraction of the workers' cores "
           "the registrations got (1.0 on an idle machine; less when other jobs share the cores).", "",
           "## A 1,000-pair cohort on a multi-node Dask cluster", "",
           "Per pair, from the runs here: "
           f"{min(one['register_cpu_s_median'], two['register_cpu_s_median']):.2f} CPU seconds of registration "
           f"(the median pair's CPU time, which load does not inflate) + {max(two['overhead_per_pair_s'], 0):.3f} s of "
           "overhead, one core each (a 2D contour of a few hundred points; a 4k-point surface or a 3D image costs "
           "more: multiply by its own single-core time, e.g. from shapes_vs_cpd.md or images_vs_ants.md).", "",
           "| cluster | CPU cost | wall |", "|---|---|---|", *plan(one, two), "",
           "* How: start a scheduler and workers with one thread each (`dask scheduler`; `dask worker tcp://HOST:8786 "
           "--nworkers 32 --nthreads 1 --memory-limit 4GiB` per node, or dask-jobqueue / dask-kubernetes), put "
           "PAIRS.csv and the shapes where every worker reads them (a shared filesystem or an object store: "
           "`s3://...` paths in the CSV, with s3fs installed on the workers), then "
           "`shapeflow batch s3://bucket/pairs.csv -o s3://bucket/out --scheduler tcp://HOST:8786`.",
           f"* Scheduler: Dask spends about {1000 * (two['noop_task_s'] or 0):.1f} ms per task here (the no-op row); "
           "1,000 tasks are about a second of scheduler time: not a bottleneck. The client holds one small row "
           "per pair.",
           "* Where it would bottleneck: (1) worker start-up (each worker imports torch and shapeflow, "
           f"{two['startup_s']:.0f} s here for 2 workers; on a shared filesystem hundreds of workers importing at "
           "once can take minutes: use a container image or a local venv per node); (2) input and output I/O: "
           "every pair reads two shapes and writes its folder; small for shapes (kilobytes to a few MB), but 3D "
           "images (tens of MB each, plus displacement.nii.gz) make an object store's per-request latency and "
           "bandwidth the limit (tens of pairs per second is well within S3's rates); (3) memory: one 3D image "
           "registration takes a few GB, so set `--memory-limit` and fewer workers per node than cores; a worker "
           "over its limit is restarted by Dask and its pair retried (`allowed-failures`, default 3) before it is "
           "reported failed; (4) stragglers: one slow pair at the end leaves the rest idle; 1,000 pairs over 320 "
           "workers is about 3 waves, so the tail is at most one pair's time.",
           "* Failure and restart: a killed node's pairs are rescheduled; the marker written last lets a re-run "
           "of the same command skip finished pairs, so a cluster lost mid-cohort costs only the pairs in flight.",
           ""]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
