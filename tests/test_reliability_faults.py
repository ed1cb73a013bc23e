"""Faults (issue 16): a diverging fit is detected, keeps its last finite state and is reported;
SIGTERM during fitting writes a consistent result marked interrupted (or nothing); reports carry
the versions and the seed; no unsafe deserialisation anywhere in the package."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import shapeflow as sf
from shapeflow.errors import ShapeflowWarning
from shapeflow.losses import chamfer_loss, sinkhorn_loss
from shapeflow_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"


def _contour() -> np.ndarray:
    points = np.loadtxt(ASSETS / "horse_contour.csv", delimiter=",", skiprows=1)
    return (points - points.mean(0)) / points.std()


@pytest.mark.parametrize("model", ["resnet", "node", "lddmm"])
def test_a_diverging_adam_fit_keeps_its_last_finite_state_and_says_so(model):
    """Adam with lr = 1e30 blows the parameters up after one step: the loss turns non-finite, the
    loop stops, the best (finite) state is restored, and the result is marked diverged."""
    x = _contour()
    with pytest.warns(ShapeflowWarning, match="diverged"):
        result = sf.register(x, 1.1 * x, model=model, lr=1e30, iterations=5, progress=False)
    assert result.metrics["diverged"] is True
    assert any(not np.isfinite(row["total"]) for row in result.history)
    assert np.isfinite(result.warped).all()
    assert all(bool(torch.isfinite(p).all()) for p in result.deformation.parameters())
    assert result.report()["metrics"]["diverged"] is True


def test_a_normal_fit_is_not_marked_diverged():
    x = _contour()
    result = sf.register(x, 1.1 * x, iterations=5, progress=False)
    assert result.metrics["diverged"] is False


@pytest.mark.parametrize("loss", [chamfer_loss, sinkhorn_loss])
def test_point_losses_answer_nan_for_non_finite_points_instead_of_raising(loss):
    x = torch.randn(20, 3, requires_grad=True)
    bad = x.detach().clone()
    bad[3, 1] = float("inf")
    value = loss(bad.requires_grad_(True), torch.randn(15, 3))
    assert torch.isnan(value)
    assert torch.isfinite(loss(x, torch.randn(15, 3)))


def test_the_cli_writes_a_diverged_fit_and_exits_3(tmp_path):
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", str(ASSETS / "horse_contour.csv"), str(ASSETS / "horse_contour_deformed.csv"),
                                   "-o", str(out), "-q", "--iterations", "5", "--set", "lr=1e30"])
    assert run.exit_code == 3, run.stderr
    assert "diverged" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["diverged"] is True
    assert np.isfinite(sf.read(out / "warped.csv").points.numpy()).all()


def test_every_report_records_the_versions_and_the_seed():
    x = _contour()
    report = sf.register(x, 1.1 * x, iterations=2, seed=7, progress=False).report()
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["numpy"] == np.__version__
    assert {"shapeflow", "python", "platform"} <= set(report["versions"])
    assert report["options"]["seed"] == 7


def test_sigterm_during_fitting_writes_a_result_marked_interrupted_or_nothing(tmp_path):
    """A fit far longer than the test, killed by SIGTERM once it is running: exit 0 with a complete,
    consistent output folder marked interrupted, or (if the signal came before the fit started)
    the default SIGTERM death with no output and no staging folder left behind."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "shapeflow_cli.main", "register", str(ASSETS / "horse_contour.csv"),
                                str(ASSETS / "horse_contour_deformed.csv"), "-o", str(out), "-q",
                                "--iterations", "1000000", "--set", "patience=1000000",      # no early stop
                                "--set", "em=false"],        # Adam's stages (the EM fit stops when converged)
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(12)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert not leftovers
    if process.returncode == -signal.SIGTERM:
        assert not out.exists()
        return
    assert process.returncode == 0, stderr.decode()
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["interrupted"] is True
    assert sorted(p.name for p in out.iterdir()) == ["deformation.pt", "report.json", "warped.csv"]
    warped = sf.read(out / "warped.csv").points.numpy()
    np.testing.assert_allclose(sf.load_deformation(out / "deformation.pt")(sf.read(ASSETS / "horse_contour.csv").points.numpy()),
                               warped, atol=1e-3 * np.abs(warped).max())


UNSAFE = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (re.compile(r"weights_only\s*=\s*False"), "torch.load(weights_only=False)"),
    (re.compile(r"\bdill\b|\bjoblib\.load\b|\bcloudpickle\.load"), "another unpickler"),
]


def test_no_unsafe_deserialisation_in_the_package():
    """Safe formats only: every torch.load passes weights_only=True, nothing unpickles a user's file."""
    problems = []
    for path in sorted([*(ROOT / "shapeflow").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]):
        text = path.read_text()
        for pattern, name in UNSAFE:
            if pattern.search(text):
                problems.append(f"{path.relative_to(ROOT)}: {name}")
        for call in re.finditer(r"torch\.load\(", text):
            args = text[call.end():text.find(")", call.end()) + 200]
            if "weights_only=True" not in args.split("\n\n")[0][:300]:
                problems.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert not problems, problems


class _Quadratic:
    """`1/2 |x - 3|^2`, whose cost turns NaN beyond x = 2 (a model that blows up there)."""

    def cost(self, x):
        value = 0.5 * float((x - 3).square().sum())
        return (float("nan") if float(x.max()) > 2 else value), None

    def linearize(self, x, state):
        from shapeflow.solvers import Linearization

        return Linearization(x - 3, lambda mu: (-(x - 3) / (1 + mu), 1))


def test_gauss_newton_rejects_a_nan_step_keeps_the_last_finite_iterate_and_says_diverged():
    from shapeflow.solvers import minimize_least_squares

    steps = []
    result = minimize_least_squares(_Quadratic(), torch.zeros(2, dtype=torch.float64), maxiter=5, damping=0.0,
                                    line_search="decrease", max_halvings=0, callback=steps.append)
    assert result.diverged and steps[-1].diverged
    assert torch.isfinite(result.x).all() and float(result.x.max()) <= 2


def test_a_diverging_image_fit_is_reported(monkeypatch):
    """The image pipeline's objective turns NaN after a few evaluations (injected): the Gauss-Newton
    loop rejects those steps, the result is finite and marked diverged."""
    import shapeflow.pipelines.images as images
    from shapeflow.learn import phantom_pair

    calls = {"n": 0}
    real = images.grid_diffusion

    def failing(u, spacing=None):
        calls["n"] += 1
        return real(u, spacing) * (float("nan") if calls["n"] > 4 else 1.0)

    monkeypatch.setattr(images, "grid_diffusion", failing)
    moving, fixed = phantom_pair(1, size=(32, 32), modality="mono")
    with pytest.warns(ShapeflowWarning, match="diverged"):
        result = sf.register(moving, fixed, prealign=None, progress=False)
    assert result.metrics["diverged"] is True
    assert torch.isfinite(result.warped.data).all()


def test_a_full_disk_on_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """The deformation file hits ENOSPC half-way: one line naming the output, exit 2, no output
    folder and no staging folder left."""
    import errno

    from shapeflow.deform import base

    def full(self, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(base.Deformation, "save", full)
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", str(ASSETS / "horse_contour.csv"), str(ASSETS / "horse_contour_deformed.csv"),
                                   "-o", str(out), "-q", "--iterations", "2"])
    assert run.exit_code == 2 and "no space left on the device" in run.stderr and str(out) in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


KILL_WHILE_WRITING = """
import sys, time
import numpy as np
import shapeflow as sf
from shapeflow.deform import base
real = base.Deformation.save
def slow(self, path):
    real(self, path)
    print("writing", flush=True)
    time.sleep(60)             # killed here, half-way through the output folder
base.Deformation.save = slow
x = np.loadtxt(sys.argv[1], delimiter=",", skiprows=1)
sf.register(x, x + 1.0, model="rigid", progress=False).save(sys.argv[2])
"""


def test_a_process_killed_while_writing_leaves_no_output_folder(tmp_path):
    """SIGKILL half-way through writing: the output folder does not exist (everything goes into a
    hidden staging folder first, renamed at the end). The staging folder itself cannot be removed
    by a killed process: it stays, hidden (`.out.*`), for the user or the next run to delete."""
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", KILL_WHILE_WRITING, str(ASSETS / "horse_contour.csv"), str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    process.kill()
    process.wait(timeout=30)
    assert not out.exists()
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert len(staging) == 1 and (staging[0] / "deformation.pt").exists()      # hidden, complete files only


def _nan_after(function, calls: int):
    """`function` that returns NaN in its float result (first element of a tuple) after `calls` calls."""
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        out = function(*args, **kwargs)
        count["n"] += 1
        if count["n"] <= calls:
            return out
        return (float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
    return wrapped


@pytest.mark.parametrize("case", ["shape displacement (non-rigid ICP)", "image affine (Levenberg-Marquardt)",
                                  "image displacement (Gauss-Newton)", "image svf (Gauss-Newton)"])
def test_every_gauss_newton_pipeline_reports_a_nan_as_diverged(monkeypatch, case):
    """A NaN injected into the objective after a few evaluations: the step is rejected, the
    result stays finite and is marked diverged, with the warning."""
    from shapeflow.learn import phantom_pair

    if case.startswith("shape"):
        from shapeflow.pipelines import shape_icp

        monkeypatch.setattr(shape_icp.IcpProblem, "cost", _nan_after(shape_icp.IcpProblem.cost, 3))
        x = _contour()
        with pytest.warns(ShapeflowWarning, match="diverged"):
            result = sf.register(x, 1.1 * x, model="displacement", progress=False)
        assert np.isfinite(result.warped).all()
    else:
        from shapeflow.pipelines import image_affine, images

        if "affine" in case:
            monkeypatch.setattr(image_affine.AffineProblem, "cost", _nan_after(image_affine.AffineProblem.cost, 3))
            options = {"model": "affine"}
        else:
            monkeypatch.setattr(images.GridProblem, "cost", _nan_after(images.GridProblem.cost, 3))
            options = {"model": case.split()[1], "prealign": None}
        moving, fixed = phantom_pair(2, size=(32, 32), modality="mono")
        with pytest.warns(ShapeflowWarning, match="diverged"):
            result = sf.register(moving, fixed, progress=False, **options)
        assert torch.isfinite(result.warped.data).all()
    assert result.metrics["diverged"] is True


@pytest.mark.parametrize("optimizer", ["newton", "gradient", "gauss-newton"])
def test_the_newton_affine_path_reports_a_nan_as_diverged(monkeypatch, optimizer):
    from shapeflow.learn import phantom_pair
    from shapeflow.pipelines import image_affine

    name = "residual" if optimizer == "gauss-newton" else "cost"        # what each optimizer evaluates
    monkeypatch.setattr(image_affine.AffineSSD, name, _nan_after(getattr(image_affine.AffineSSD, name), 4))
    moving, fixed = phantom_pair(2, size=(32, 32), modality="mono")
    with pytest.warns(ShapeflowWarning, match="diverged"):
        result = sf.register(moving, fixed, model="affine", optimizer=optimizer, interpolation="spline",
                             progress=False)
    assert result.metrics["diverged"] is True and torch.isfinite(result.warped.data).all()


TINY_TRAINING = """
[data]
source = "phantoms"
size = [32, 32]
modality = "multi"
train = 8
validation = 2
test = 2

[network]
name = "suits"

[method]
name = "suits"
iterations = [1, 2]

[train]
steps = 100000
batch = 1
validate_every = 100000
checkpoint_every = 100000
"""


def test_sigterm_during_training_saves_a_checkpoint_that_resumes(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TRAINING)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "shapeflow_cli.main", "train", str(config), "-o", str(run), "-q"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(15)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == -signal.SIGTERM:      # the signal came before training started
        assert not (run / "checkpoint.pt").exists()
        return
    assert process.returncode == 130, stderr[-500:]
    assert "interrupted at step" in stderr and (run / "checkpoint.pt").exists()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert isinstance(state, dict)


def test_the_train_command_reports_a_diverged_training_with_exit_3(tmp_path, monkeypatch):
    from shapeflow.learn.methods import METHODS

    original = METHODS["suits"]

    def failing(*args, **kwargs):
        loss, metrics = original(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setitem(METHODS, "suits", failing)
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TRAINING.replace("steps = 100000", "steps = 3"))
    run = CliRunner().invoke(app, ["train", str(config), "-o", str(tmp_path / "run"), "-q"])
    assert run.exit_code == 3, run.stderr[-500:]
    assert "training diverged at step 0" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert (tmp_path / "run" / "checkpoint.pt").exists()
