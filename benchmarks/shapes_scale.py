"""Scale curve: `sf.register(src, tgt)` with its defaults from 100 points to a million, beside pycpd.

Each (method, N) runs in its own subprocess, so its peak memory (`ru_maxrss` of the child) is its
own and a crash or a timeout costs only that cell. Data: points on the fsaverage5 pial surface
(unit RMS radius; above its 10,242 vertices, uniformly sampled on its three-times linearly
subdivided mesh), the target the same points under the known smooth deformation of
`shapes_vs_cpd.normalised_pair`, so RMSE is against the true positions. One run per cell after a
warm-up registration in the same child (the first call of a process compiles and loads caches;
`first_call_seconds` records it).

    python benchmarks/shapes_scale.py [--sizes 100 1000 ...] [--pycpd-max 4000] [--from-json] [--first-call]

Writes results/shapes_scale.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SIZES = [100, 300, 1000, 3000, 10000, 30000, 100000, 300000, 1000000]
TIMEOUT = 900


def points_on_surface(n: int, seed: int = 0) -> np.ndarray:
    """n points on fsaverage5's pial surface: its vertices (decimated) up to 10,242, else uniform
    samples on the subdivided surface."""
    sys.path.insert(0, str(HERE))
    from shapes_vs_cpd import fsaverage_mesh

    vertices, faces = fsaverage_mesh()
    if n <= len(vertices):
        rng = np.random.default_rng(seed)
        return vertices[np.sort(rng.choice(len(vertices), n, replace=False))]
    import pyvista as pv

    mesh = pv.PolyData(vertices, np.hstack([np.full((len(faces), 1), 3), faces]).ravel()).subdivide(3, "linear")
    v, f = np.asarray(mesh.points, dtype=np.float64), np.asarray(mesh.faces).reshape(-1, 4)[:, 1:]
    tri = v[f]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(f), n, p=area / area.sum())
    a, b = rng.random((2, n))
    flip = a + b > 1
    a[flip], b[flip] = 1 - a[flip], 1 - b[flip]
    t = tri[pick]
    return t[:, 0] + a[:, None] * (t[:, 1] - t[:, 0]) + b[:, None] * (t[:, 2] - t[:, 0])


def child(method: str, n: int) -> dict:
    """One cell, run inside the subprocess: returns seconds, RMSE % diag, peak MiB."""
    import resource

    import torch

    sys.path.insert(0, str(HERE))
    from shapes_vs_cpd import normalised_pair, score

    pair = normalised_pair(points_on_surface(n), None)
    src, tgt = pair["source"], pair["target"]
    out = {"method": method, "n": n}
    if method == "shapeflow":
        import shapeflow as sf

        small = normalised_pair(points_on_surface(100, seed=1), None)
        t0 = time.perf_counter()
        sf.register(small["source"], small["target"], progress=False)
        out["first_call_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        warped = sf.register(src, tgt, progress=False).warped
    else:
        from pycpd import DeformableRegistration

        t0 = time.perf_counter()
        # as pycpd's README advises: both clouds centred and scaled (they are: unit RMS radius)
        warped, _ = DeformableRegistration(X=tgt, Y=src).register()
    out["seconds"] = time.perf_counter() - t0
    out.update(score(warped, pair))
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["torch_threads"] = torch.get_num_threads()
    return out


def run(method: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(n)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"method": method, "n": n, "error": f"timeout after {TIMEOUT} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"method": method, "n": n, "error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(lines[-1])


def first_call_process(repeats: int = 3) -> dict:
    """Seconds of whole `shapeflow register SRC TGT -o OUT` processes on the 91-point fish and its
    smooth deformation (CSV files in a temporary folder), beside a process that only imports torch:
    the first-call target counts imports, caches and writing the outputs."""
    import tempfile

    import torch

    sys.path.insert(0, str(HERE))
    from linear_vs_cpd import fish
    from shapeflow.synthetic import smooth_deformation

    with tempfile.TemporaryDirectory() as folder:
        src, tgt = Path(folder) / "fish.csv", Path(folder) / "fish_moved.csv"
        points = fish()
        np.savetxt(src, points, delimiter=",", header="x,y", comments="")
        np.savetxt(tgt, smooth_deformation(torch.from_numpy(points), amplitude=0.05, seed=0).numpy(),
                   delimiter=",", header="x,y", comments="")
        script = Path(sys.executable).parent / "shapeflow"      # the console script a user runs
        cli = ([str(script)] if script.exists() else [sys.executable, "-c", "from shapeflow_cli.main import main; main()"])
        cli += ["register", str(src), str(tgt)]

        def timed(command):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, timeout=TIMEOUT)
            return time.perf_counter() - start

        register = [timed(cli + ["-o", str(Path(folder) / f"out{k}")]) for k in range(repeats)]
        imports = [timed([sys.executable, "-c", "import torch"]) for _ in range(repeats)]
    return {"register_seconds": register, "import_torch_seconds": imports, "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def targets(rows: list[dict], meta: dict | None = None) -> list[str]:
    cell = {(r["method"], r["n"]): r for r in rows if "seconds" in r}
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    process = (meta or {}).get("first_call_process")
    if process:
        median = float(np.median(process["register_seconds"]))
        lines.append(f"| first call: `shapeflow register` of the fish as a whole process <= 2 s | {median:.2f} s "
                     f"(median of {len(process['register_seconds'])}; importing torch alone "
                     f"{float(np.median(process['import_torch_seconds'])):.2f} s) | {'met' if median <= 2 else 'not met'} |")

    def check(name, n, test, text):
        r = cell.get(("shapeflow", n))
        if r is None:
            lines.append(f"| {name} | not run | not met |")
            return
        lines.append(f"| {name} | {text(r)} | {'met' if test(r) else 'not met'} |")

    check("160k-class points (100k here; 300k beside) <= 10 s, <= 3 GB, RMSE <= 1 %", 100000,
          lambda r: r["seconds"] <= 10 and r["peak_mib"] <= 3072 and r["rmse_pct_diag"] <= 1,
          lambda r: f"{r['seconds']:.1f} s, {r['peak_mib']:.0f} MiB, RMSE {r['rmse_pct_diag']:.2f} %")
    check("1M points <= 60 s, memory linear in N", 1000000, lambda r: r["seconds"] <= 60,
          lambda r: f"{r['seconds']:.1f} s, {r['peak_mib']:.0f} MiB, RMSE {r['rmse_pct_diag']:.2f} %")
    size = 4000 if ("pycpd", 4000) in cell else 3000
    medium = cell.get(("shapeflow", size)), cell.get(("pycpd", size))
    if all(medium):
        ratio = medium[1]["seconds"] / medium[0]["seconds"]
        ok = ratio >= 20 and medium[0]["rmse_pct_diag"] <= min(1.0, medium[1]["rmse_pct_diag"])
        lines.append(f"| medium ({size} points) >= 20x pycpd at RMSE <= 1 % and <= pycpd's | {ratio:.1f}x, "
                     f"RMSE {medium[0]['rmse_pct_diag']:.2f} % vs {medium[1]['rmse_pct_diag']:.2f} % | "
                     f"{'met' if ok else 'not met'} |")
    for n in (1000,):
        ours, peer = cell.get(("shapeflow", n)), cell.get(("pycpd", n))
        if ours and peer:
            ratio = peer["seconds"] / ours["seconds"]
            ok = ratio >= 10 and ours["rmse_pct_diag"] <= peer["rmse_pct_diag"]
            lines.append(f"| {n} points >= 10x pycpd at <= its RMSE | {ratio:.1f}x, RMSE {ours['rmse_pct_diag']:.2f} % vs "
                         f"{peer['rmse_pct_diag']:.2f} % | {'met' if ok else 'not met'} |")
    return lines


#: what the table does not say by itself (from the 2026-12-03 run; update with a rerun)
READING = [
    "* `first call s`: the first `register` of each child process, a 100-point pair, after the "
    "imports: the per-process cost beyond them (about 0.3 s). The whole-process row of the targets "
    "(`--first-call`, 2026-12-03): `shapeflow register` on the 91-point fish, CSV in and out, 1.80-1.87 s, "
    "of which a process that only imports torch takes 1.20 s.",
    "* N = 3000: the run before this one (same day, the refine stage at a third of the coarse "
    "stage's step) gave 3.14 % here, a wrong basin (min det J 0.03): the coarse stage ends at "
    "2.6-4.8 % on this pair and the Chamfer refine either recovers or locks a misassigned fold. "
    "Over 42 fsaverage pairs (1k-8k points, 4 point samples, 6 deformations) a third failed once, "
    "half, 0.75 and 1 never, at the same median RMSE, so the refine step is now half "
    "(`shapeflow/losses/points.py`); this run's 0.138 % is with it.",
    "* N = 1000, 100k and 1M rerun on 2026-12-03 after the subsamples began to leave isolated points "
    "out (`sampling.isolated_points`: an 8-nearest-neighbour query on at most the 50k-64k-point "
    "presample per subsample): 100k 5.6 -> 6.6 s, 1M 15.6 -> 19.0 s, at the same RMSE (0.47 -> 0.54 %, "
    "0.49 -> 0.48 %); both targets still met.",
    "* RMSE from 10k to 1M (0.29-0.61 %) is above the 2026-12-02 table's (0.30-0.45 %) from 30k on: "
    "that change predates the 2026-12-03 code changes (the start-of-day code gave 0.54 % at 30k, "
    "this run 0.47 %).",
]


def write(rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shapes_scale.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = ["# Scale curve: shapeflow's defaults from 100 points to 1M, beside pycpd", "",
          __doc__.split("\n\n")[1].replace("\n", " "), "",
          f"Machine: {json.dumps(meta.get('machine', {}))}. Threads: torch's default in each child "
          "(as a user runs it).", "", "## Targets (issue 12)", "", *targets(rows, meta), "",
          "## All runs", "", "| method | N | seconds | RMSE % diag | peak MiB | first call s |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["n"])):
        if "error" in r:
            md.append(f"| {r['method']} | {r['n']} | {r['error']} | | | |")
        else:
            first = f"{r['first_call_seconds']:.2f}" if "first_call_seconds" in r else "-"
            md.append(f"| {r['method']} | {r['n']} | {r['seconds']:.2f} | {r['rmse_pct_diag']:.3f} | "
                      f"{r['peak_mib']:.0f} | {first} |")
    md += ["", "## Reading", "", *READING]
    (RESULTS / "shapes_scale.md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in sorted({r["method"] for r in rows}):
        ok = sorted((r for r in rows if r["method"] == method and "seconds" in r), key=lambda r: r["n"])
        axes[0].loglog([r["n"] for r in ok], [r["seconds"] for r in ok], "o-", label=method)
        axes[1].loglog([r["n"] for r in ok], [r["peak_mib"] for r in ok], "o-", label=method)
    axes[0].set(xlabel="points", ylabel="seconds", title="time")
    axes[1].set(xlabel="points", ylabel="peak MiB (process)", title="memory")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "shapes_scale.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--pycpd-max", type=int, default=4000, help="largest N pycpd runs at (O(N^2) memory)")
    parser.add_argument("--from-json", action="store_true")
    parser.add_argument("--merge", action="store_true", help="replace these cells in the saved .json, keep the rest")
    parser.add_argument("--first-call", action="store_true", help="only time whole `shapeflow register` processes "
                        "on the fish; kept in the saved .json")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_call:
        saved = json.loads((RESULTS / "shapes_scale.json").read_text())
        saved["meta"]["first_call_process"] = first_call_process()
        print(saved["meta"]["first_call_process"])
        write(saved["rows"], saved["meta"])
        return
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    if args.from_json:
        saved = json.loads((RESULTS / "shapes_scale.json").read_text())
        write(saved["rows"], saved["meta"])
        return
    sys.path.insert(0, str(HERE))
    from shapes_vs_cpd import machine_info

    rows, meta = [], {}
    if args.merge:
        saved = json.loads((RESULTS / "shapes_scale.json").read_text())
        meta = saved["meta"]
        rows = [r for r in saved["rows"] if r["n"] not in args.sizes]
    for n in args.sizes:
        for method in ("shapeflow", "pycpd"):
            if method == "pycpd" and n > args.pycpd_max:
                continue
            rows.append(run(method, n))
            print(rows[-1], flush=True)
    import torch

    meta = {**meta, "machine": machine_info(torch.get_num_threads())}
    meta.setdefault("dates", []).append(time.strftime("%Y-%m-%dT%H:%M:%S") + f" sizes {args.sizes}")
    write(rows, meta)


if __name__ == "__main__":
    main()
