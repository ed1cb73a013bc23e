import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import shapeflow as sf
from shapeflow_cli.main import app

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def shapeflow(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "shapeflow_cli.main", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env={**os.environ, "COLUMNS": "120"})


def test_register_and_warp_through_subprocesses(tmp_path):
    out = tmp_path / "out"
    run = shapeflow("register", ASSETS / "horse_contour.csv", ASSETS / "horse_contour_deformed.csv",
                    "-o", out, "--loss", "chamfer", "--iterations", "30", "--gif", "flow.gif", "--frames", "5")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["deformation.pt", "flow.gif", "report.json", "warped.csv"]
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["loss"] == "chamfer" and report["metrics"]["chamfer"] < report["metrics"]["chamfer_before"]
    assert "chamfer" in run.stdout and "wrote" in run.stdout

    warped = tmp_path / "again.csv"
    run = shapeflow("warp", out / "deformation.pt", ASSETS / "horse_contour.csv", "-o", warped)
    assert run.returncode == 0, run.stderr
    np.testing.assert_allclose(np.loadtxt(warped, delimiter=","), np.loadtxt(out / "warped.csv", delimiter=","), atol=1e-3)


def test_help_is_complete():
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "register" in top.output and "warp" in top.output
    for command, options in [("register", ["--output", "--model", "--loss", "--iterations", "--gif", "--seed",
                                           "--device", "--overwrite", "--landmarks-source", "--landmarks-target",
                                           "--landmark-weight"]),
                             ("warp", ["--output", "--inverse", "--reference"])]:
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        for option in options:
            assert option in text, (command, option)


def _write(path, text):
    path.write_text(text)
    return path


BAD_CASES = {
    "missing file": lambda d: ([d / "nope.ply", ASSETS / "ant.ply"], "nope.ply: no such file"),
    "unknown extension": lambda d: ([_write(d / "a.foo", "1 2 3"), ASSETS / "ant.ply"], "unknown extension '.foo'"),
    "unreadable file": lambda d: ([_write(d / "bad.ply", "garbage"), ASSETS / "ant.ply"], "bad.ply: unreadable .ply file"),
    "empty cloud": lambda d: ([_write(d / "empty.csv", "x,y,z\n"), ASSETS / "ant.ply"], "empty.csv: "),
    "one point": lambda d: ([_write(d / "one.csv", "1,2,3\n"), ASSETS / "ant.ply"], "one.csv: points has 1 point(s)"),
    "nan": lambda d: ([_write(d / "nan.csv", "1,2,3\n4,nan,6\n7,8,9\n"), ASSETS / "ant.ply"], "nan.csv: points has 1 point(s) with NaN"),
    "inf": lambda d: ([_write(d / "inf.xyz", "1 2 3\n4 inf 6\n7 8 9\n"), ASSETS / "ant.ply"], "inf.xyz: points has 1 point(s) with NaN or infinite"),
    "2D vs 3D": lambda d: ([ASSETS / "horse_contour.csv", ASSETS / "ant.ply"], "source has 2 columns but target has 3"),
    "faces past vertices": lambda d: ([_write(d / "f.ply", "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\n"
                                               "property float y\nproperty float z\nelement face 1\nproperty list uchar int "
                                               "vertex_indices\nend_header\n0 0 0\n1 0 0\n0 1 0\n3 0 1 9\n"), ASSETS / "ant.ply"],
                                      "f.ply: faces index vertex 9 but the mesh has only 3 vertices"),
    "unknown model": lambda d: ([ASSETS / "ant.ply", ASSETS / "ant_bent.ply", "--model", "bspline"], "unknown model 'bspline'"),
    "--set of another model": lambda d: ([ASSETS / "ant.ply", ASSETS / "ant_bent.ply", "--model", "rigid", "--set", "blocks=4"],
                                         "option 'blocks' applies to model 'resnet', not to model 'rigid'"),
    "--set without =": lambda d: ([ASSETS / "ant.ply", ASSETS / "ant_bent.ply", "--set", "blocks"], "expected NAME=VALUE"),
    "--set twice": lambda d: ([ASSETS / "ant.ply", ASSETS / "ant_bent.ply", "--iterations", "3", "--set", "iterations=4"],
                              "iterations has its own option"),
    "identical source points": lambda d: ([_write(d / "same.csv", "1,2,3\n" * 30), ASSETS / "ant.ply"],
                                          "same.csv: all 30 points coincide"),
    "identical target points": lambda d: ([ASSETS / "ant.ply", _write(d / "same.xyz", "5 5 5\n" * 30)],
                                          "same.xyz: all 30 points coincide"),
    "nearly identical points": lambda d: ([_write(d / "near.csv", "1000,1000,1000\n1000,1000,1000.000001\n" * 5),
                                           ASSETS / "ant.ply"], "near.csv: all 10 points coincide"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, case):
    args, message = BAD_CASES[case](tmp_path)
    out = tmp_path / "out"
    before = sorted(tmp_path.iterdir())
    result = CliRunner().invoke(app, ["register", *map(str, args), "-o", str(out), "-q"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shapeflow: error: ") and message in lines[0], result.stderr
    assert sorted(tmp_path.iterdir()) == before                  # no output folder, no temporary files


def test_existing_output_folder_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["register", str(ASSETS / "horse_contour.csv"), str(ASSETS / "horse_contour_deformed.csv"), "-o", str(out),
            "-q", "--loss", "chamfer", "--iterations", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "output folder exists" in result.stderr and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(app, args + ["--overwrite"])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["deformation.pt", "report.json", "warped.csv"]


def test_warp_refuses_a_wrong_dimension_and_existing_output(tmp_path):
    deformation = sf.Rigid(3).save(tmp_path / "rigid.pt")
    result = CliRunner().invoke(app, ["warp", str(deformation), str(ASSETS / "horse_contour.csv"), "-o", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "shape is 2D but the deformation is 3D" in result.stderr
    result = CliRunner().invoke(app, ["warp", str(deformation), str(ASSETS / "ant.ply"), "-o", str(ASSETS / "ant.ply")])
    assert result.exit_code == 2 and "exists" in result.stderr


def test_set_passes_model_and_loss_options(tmp_path):
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", str(ASSETS / "horse_contour.csv"), str(ASSETS / "horse_contour_deformed.csv"),
                                   "-o", str(out), "-q", "--iterations", "3", "--set", "blocks=3", "--set", "refine=null",
                                   "--set", "activation=tanh", "--set", "blur=0.05"])
    assert run.exit_code == 0, run.stderr
    import json

    options = json.loads((out / "report.json").read_text())["options"]
    assert options["blocks"] == 3 and options["refine"] is None and options["activation"] == "tanh"
    assert options["blur"] == 0.05


def _band_images(tmp_path):
    """A 2D Gaussian band and the same band moved by (2, 5) mm, written as NIfTI, with landmark files."""
    import torch

    n, c = 32, 15.5
    index = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"), -1).double()
    band = lambda p: torch.exp(-((p[..., 0] - c) ** 2) / (2 * 4.0 ** 2))[None].float()
    shift = torch.tensor([2.0, 5.0], dtype=torch.float64)
    sf.write(sf.Image(band(index)), tmp_path / "fixed.nii.gz")
    sf.write(sf.Image(band(index - shift)), tmp_path / "moving.nii.gz")
    marks = np.array([[c - 3, c - 8], [c + 2, c], [c, c + 8]])
    np.savetxt(tmp_path / "lm_moving.csv", marks + shift.numpy(), delimiter=",")
    np.savetxt(tmp_path / "lm_fixed.csv", marks, delimiter=",")
    return [tmp_path / name for name in ("moving.nii.gz", "fixed.nii.gz", "lm_moving.csv", "lm_fixed.csv")]


def test_landmark_flags_reach_register_and_the_old_ones_are_gone(tmp_path):
    moving, fixed, lm_moving, lm_fixed = _band_images(tmp_path)
    errors = {}
    for weight in ("0", "1"):
        out = tmp_path / f"out{weight}"
        run = CliRunner().invoke(app, ["register", str(moving), str(fixed), "-o", str(out), "-q", "--iterations", "4",
                                       "--landmarks-source", str(lm_moving), "--landmarks-target", str(lm_fixed),
                                       "--landmark-weight", weight])
        assert run.exit_code == 0, run.stderr
        report = json.loads((out / "report.json").read_text())
        assert report["options"]["landmark_weight"] == float(weight)
        assert report["options"]["landmarks"] == [str(lm_moving), str(lm_fixed)]
        errors[weight] = report["metrics"]["landmark_error"]
        assert set(errors[weight]) == {"mean", "max", "mean_before", "max_before"} and "tre" in report["metrics"]
    assert errors["1"]["mean"] < 0.2 * errors["0"]["mean"], errors          # the weight reached the fit
    before = sorted(tmp_path.iterdir())
    for args, message in [(["--landmarks-source", str(lm_moving)], "--landmarks-source and --landmarks-target go together"),
                          (["--landmarks-target", str(lm_fixed)], "--landmarks-source and --landmarks-target go together"),
                          (["--landmarks-source", str(lm_moving), "--landmarks-target", str(tmp_path / "none.csv")],
                           "none.csv: no such file")]:
        run = CliRunner().invoke(app, ["register", str(moving), str(fixed), "-o", str(tmp_path / "bad"), "-q", *args])
        lines = run.stderr.strip().splitlines()
        assert run.exit_code == 2 and len(lines) == 1 and message in lines[0], run.stderr
    for old in ("--landmarks-moving", "--landmarks-fixed"):
        run = CliRunner().invoke(app, ["register", str(moving), str(fixed), "-o", str(tmp_path / "bad"), "-q", old,
                                       str(lm_moving)])
        assert run.exit_code == 2 and "No such option" in run.output + run.stderr
    assert sorted(tmp_path.iterdir()) == before


def test_landmark_flags_pass_through_for_shapes(tmp_path):
    source = np.loadtxt(ASSETS / "horse_contour.csv", delimiter=",", skiprows=1)[:4]
    target = np.loadtxt(ASSETS / "horse_contour_deformed.csv", delimiter=",", skiprows=1)[:4]
    np.savetxt(tmp_path / "a.csv", source, delimiter=",")
    np.savetxt(tmp_path / "b.csv", target, delimiter=",")
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", str(ASSETS / "horse_contour.csv"), str(ASSETS / "horse_contour_deformed.csv"),
                                   "-o", str(out), "-q", "--loss", "chamfer", "--iterations", "3",
                                   "--landmarks-source", str(tmp_path / "a.csv"), "--landmarks-target", str(tmp_path / "b.csv"),
                                   "--landmark-weight", "0.5"])
    assert run.exit_code == 0, run.stderr
    assert json.loads((out / "report.json").read_text())["options"]["landmark_weight"] == 0.5
