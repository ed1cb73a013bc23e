"""Batch registration on a 2-worker Dask LocalCluster (shapeflow/pipelines/batch.py, `shapeflow batch`)."""
from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
from scipy.spatial import cKDTree

import shapeflow as sf
from shapeflow.pipelines.batch import MARKER, read_pairs

distributed = pytest.importorskip("distributed")


@pytest.fixture
def client(dask_client):
    return dask_client


def _contour(k: int, n: int = 40) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.c_[np.cos(t) * (1 + 0.1 * k), 0.6 * np.sin(t) + 0.05 * np.sin(3 * t)]


def _affine(k: int) -> tuple[np.ndarray, np.ndarray]:
    angle = 0.2 + 0.1 * k
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return rotation @ np.diag([1.1, 0.9]), np.array([0.3, -0.1 * k])


def _pairs(folder, count: int, extra_rows: tuple = ()) -> tuple:
    """`count` pairs source_k -> target_k = A_k source_k + t_k as CSV files, and PAIRS.csv."""
    (folder / "data").mkdir(parents=True)
    rows, truth = [], {}
    for k in range(count):
        source = _contour(k)
        matrix, shift = _affine(k)
        target = source @ matrix.T + shift
        sf.write(sf.PointCloud(source), folder / "data" / f"s{k}.csv")
        sf.write(sf.PointCloud(target), folder / "data" / f"t{k}.csv")
        rows.append({"name": f"pair{k}", "source": f"data/s{k}.csv", "target": f"data/t{k}.csv"})
        truth[f"pair{k}"] = target
    rows += list(extra_rows)
    with open(folder / "pairs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["name", "source", "target"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "pairs.csv", truth


FAST = {"model": "affine", "loss": "l2"}      # closed form: a known affine map recovered exactly


def _check_done(out, name: str, target: np.ndarray, row: dict) -> None:
    folder = out / name
    assert sorted(p.name for p in folder.iterdir()) == sorted([MARKER, "deformation.pt", "report.json", "warped.csv"])
    warped = sf.read(folder / "warped.csv").points.double().numpy()
    np.testing.assert_allclose(warped, target, atol=1e-4)          # the known map, recovered
    # the summary's chamfer is that of the files on disk (scipy KD-tree as the reference)
    d_wt, d_tw = cKDTree(target).query(warped)[0], cKDTree(warped).query(target)[0]
    assert float(row["chamfer"]) == pytest.approx((d_wt.mean() + d_tw.mean()) / 2, abs=1e-5)
    marker = json.loads((folder / MARKER).read_text())
    assert marker["row"]["name"] == name and marker["row"]["status"] == "done"


def test_bad_rows_are_reported_and_the_others_done(tmp_path, client):
    bad = ({"name": "missing", "source": "data/s0.csv", "target": "data/nowhere.csv"},
           {"name": "empty", "source": "", "target": "data/t0.csv"})
    pairs, truth = _pairs(tmp_path, 4, bad)
    out = tmp_path / "out"
    summary = sf.register_many(pairs, out, client=client, progress=False, **FAST)
    status = {row["name"]: row["status"] for row in summary.rows}
    assert status == {"pair0": "done", "pair1": "done", "pair2": "done", "pair3": "done",
                      "missing": "failed", "empty": "failed"}
    errors = {row["name"]: row.get("error") for row in summary.rows}
    assert "nowhere.csv" in errors["missing"] and "\n" not in errors["missing"]
    assert "source empty" in errors["empty"]
    assert summary.failed == 2 and not summary.ok
    assert summary.line().startswith("6 pairs: 4 registered, 0 already complete, 2 failed")
    table = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["name"] for r in table] == ["pair0", "pair1", "pair2", "pair3", "missing", "empty"]
    for row in table[:4]:
        _check_done(out, row["name"], truth[row["name"]], row)
        assert float(row["seconds"]) > 0
    assert sorted(p.name for p in out.iterdir()) == ["pair0", "pair1", "pair2", "pair3", "summary.csv"]


def test_cli_on_a_scheduler_exit_code_and_last_line(tmp_path, client):
    from typer.testing import CliRunner

    from shapeflow_cli.main import app

    pairs, _ = _pairs(tmp_path, 2, ({"name": "missing", "source": "data/s0.csv", "target": "data/no.csv"},))
    args = ["batch", str(pairs), "-o", str(tmp_path / "out"), "--scheduler", client.scheduler.address,
            "--model", "affine", "--loss", "l2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("dask dashboard: ")
    assert lines[-1].startswith("3 pairs: 2 registered, 0 already complete, 1 failed")
    assert "failed: missing: " in result.output
    (tmp_path / "ok.csv").write_text("name,source,target\npair0,data/s0.csv,data/t0.csv\n")
    result = CliRunner().invoke(app, ["batch", str(tmp_path / "ok.csv"), "-o", str(tmp_path / "out2"), "-q",
                                      "--scheduler", client.scheduler.address, "--model", "affine", "--loss", "l2"])
    assert result.exit_code == 0 and result.output == ""


def test_an_interrupted_batch_resumes(tmp_path, client):
    pairs, truth = _pairs(tmp_path, 4)
    out = tmp_path / "out"
    first = sf.register_many(pairs, out, client=client, progress=False, **FAST)
    assert first.ok
    # what an interruption leaves: a pair never started, one half written (no marker), a killed
    # attempt's staging folder
    import shutil

    shutil.rmtree(out / "pair1")
    (out / "pair2" / MARKER).unlink()
    (out / ".pair3.0badc0de.partial").mkdir()
    kept = {name: (out / name / MARKER).stat().st_mtime_ns for name in ("pair0", "pair3")}
    second = sf.register_many(pairs, out, client=client, progress=False, **FAST)
    assert {r["name"]: r["status"] for r in second.rows} == {"pair0": "kept", "pair1": "done", "pair2": "done",
                                                             "pair3": "kept"}
    assert {name: (out / name / MARKER).stat().st_mtime_ns for name in kept} == kept     # not rewritten
    assert sorted(p.name for p in out.iterdir()) == ["pair0", "pair1", "pair2", "pair3", "summary.csv"]
    table = {r["name"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    for name in truth:
        _check_done(out, name, truth[name], table[name])
    # other options: nothing is complete for them; --overwrite redoes everything
    third = sf.register_many(pairs, out, client=client, progress=False, model="affine", loss="l2", seed=1)
    assert {r["status"] for r in third.rows} == {"done"}
    fourth = sf.register_many(pairs, out, client=client, progress=False, overwrite=True, **FAST, seed=1)
    assert {r["status"] for r in fourth.rows} == {"done"}


def test_a_worker_killed_mid_batch(tmp_path, client):
    """The killed worker's tasks are rescheduled (retried elsewhere); every pair ends with
    exactly one complete folder and no staging leftovers."""
    pairs, truth = _pairs(tmp_path, 6)
    out = tmp_path / "out"
    options = {"model": "resnet", "loss": "l2", "iterations": 150, "seed": 0}
    holder = {}
    runner = threading.Thread(target=lambda: holder.update(
        summary=sf.register_many(pairs, out, client=client, progress=False, **options)))
    runner.start()
    victim, assigned, deadline = None, [], time.monotonic() + 120
    while time.monotonic() < deadline:
        busy = {w: keys for w, keys in client.processing().items() if keys}
        if busy and list(out.glob(f"*/{MARKER}")):         # mid-batch: something finished, something running
            victim, keys = next(iter(busy.items()))
            assigned = [k.split("-")[1] for k in keys]
            if any(not (out / name / MARKER).exists() for name in assigned):
                break
        time.sleep(0.05)
    assert victim is not None, "the batch never got under way"
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    running = [name for name in assigned if not (out / name / MARKER).exists()]    # unfinished when killed
    runner.join(timeout=300)
    summary = holder["summary"]
    assert [r["status"] for r in summary.rows] == ["done"] * 6, summary.rows
    assert sorted(p.name for p in out.iterdir()) == [f"pair{k}" for k in range(6)] + ["summary.csv"]
    for name in truth:
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == sorted([MARKER, "deformation.pt", "report.json", "warped.csv"])
    for name in running:          # redone by another worker process than the one killed
        marker = json.loads((out / name / MARKER).read_text())
        assert not marker["row"]["worker"].endswith(f":{pid}")
    assert running, "no task was running on the killed worker"


def test_a_killed_attempts_leftovers_are_cleaned(tmp_path):
    """A worker killed while `Result.save` wrote inside its staging folder leaves two hidden folders:
    the staging one and the save's own temporary inside the output folder's parent. Both go, for
    this batch's pairs only; a complete pair folder stays."""
    from shapeflow.pipelines.batch import _clean_partials

    for name in ["pair0", ".pair0.1234abcd.partial", "..pair0.1234abcd.partial.x_y7z", ".pair0.89abcdef.old",
                 ".other.1234abcd.partial", "..other.1234abcd.partial.q1"]:
        (tmp_path / name).mkdir()
    _clean_partials(str(tmp_path), {"pair0"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["..other.1234abcd.partial.q1", ".other.1234abcd.partial",
                                                          "pair0"]


def test_fsspec_urls_for_inputs_and_outputs(tmp_path):
    """Inputs read from and outputs written to an fsspec filesystem (memory://, shared by a
    threaded cluster), the marker last; a re-run keeps the complete pair."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    source = _contour(0)
    target = source @ _affine(0)[0].T + _affine(0)[1]
    for name, points in (("s.csv", source), ("t.csv", target)):
        sf.write(sf.PointCloud(points), tmp_path / name)
        fs.pipe_file(f"/cohort/{name}", (tmp_path / name).read_bytes())
    fs.pipe_file("/cohort/pairs.csv", b"source,target\ns.csv,t.csv\nnothing.csv,t.csv\n")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        summary = sf.register_many("memory://cohort/pairs.csv", "memory://cohort/out", client=client, progress=False,
                                   **FAST)
        assert [r["status"] for r in summary.rows] == ["done", "failed"]
        assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("/cohort/out/s_to_t", detail=False)) == \
            sorted([MARKER, "deformation.pt", "report.json", "warped.csv"])
        (tmp_path / "warped.csv").write_bytes(fs.cat_file("/cohort/out/s_to_t/warped.csv"))
        np.testing.assert_allclose(sf.read(tmp_path / "warped.csv").points.double().numpy(), target, atol=1e-4)
        again = sf.register_many("memory://cohort/pairs.csv", "memory://cohort/out", client=client, progress=False,
                                 **FAST)
        assert [r["status"] for r in again.rows] == ["kept", "failed"]
        assert fs.cat_file("/cohort/out/summary.csv").decode().splitlines()[1].startswith("s_to_t,kept,")


def test_read_pairs_checks_the_table(tmp_path):
    (tmp_path / "a.csv").write_text("source,target,weight\na.ply,b.ply,1\n")
    with pytest.raises(sf.ShapeflowError, match="unknown column 'weight'; valid columns: source, target, name"):
        read_pairs(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("source\na.ply\n")
    with pytest.raises(sf.ShapeflowError, match="missing column 'target'"):
        read_pairs(tmp_path / "b.csv")
    (tmp_path / "c.csv").write_text("source,target\na.ply,b.ply\na.ply,b.ply\n")
    with pytest.raises(sf.ShapeflowError, match="lines 2 and 3 have the same name 'a_to_b'"):
        read_pairs(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("source,target,landmarks_source\nx/a.nii.gz,/abs/b.ply,la.csv\n")
    [spec] = read_pairs(tmp_path / "d.csv")
    assert (spec.name, spec.source, spec.target) == ("a_to_b", str(tmp_path / "x/a.nii.gz"), "/abs/b.ply")
    assert spec.error and "landmarks_source and landmarks_target go together" in spec.error


def test_import_shapeflow_does_not_import_dask():
    import subprocess
    import sys

    code = "import sys, shapeflow; print(sorted(m for m in ('dask', 'distributed') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
