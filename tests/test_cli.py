import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
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
    np.testing.assert_allclose(np.loadtxt(warped, delimiter=",", skiprows=1),
                               np.loadtxt(out / "warped.csv", delimiter=",", skiprows=1), atol=1e-3)


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
    "--reach with l2": lambda d: ([ASSETS / "ant.ply", ASSETS / "ant_bent.ply", "--loss", "l2", "--reach", "0.1"],
                                  "option 'reach' applies to loss 'sinkhorn' and loss 'chamfer', not to loss 'l2'"),
    "--blur with rigid chamfer": lambda d: ([ASSETS / "ant.ply", ASSETS / "ant_bent.ply", "--model", "rigid", "--loss",
                                             "chamfer", "--blur", "0.1"], "option 'blur' applies to loss 'sinkhorn'"),
    "--dtype float16": lambda d: ([ASSETS / "ant.ply", ASSETS / "ant_bent.ply", "--dtype", "float16"],
                                  "--dtype float16: choose float32 or float64"),
    "--frames 1": lambda d: ([ASSETS / "ant.ply", ASSETS / "ant_bent.ply", "--gif", "a.gif", "--frames", "1"],
                             "an animation needs at least 2 frames"),
    "missing landmarks": lambda d: ([ASSETS / "ant.ply", ASSETS / "ant_bent.ply", "--landmarks-source", d / "no.csv",
                                     "--landmarks-target", d / "no2.csv"], "no.csv: no such file"),
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


def test_first_class_fit_options_reach_register(tmp_path):
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", str(ASSETS / "horse_contour.csv"), str(ASSETS / "horse_contour_deformed.csv"),
                                   "-o", str(out), "-q", "--iterations", "3", "--dtype", "float64", "--reach", "0.5",
                                   "--blur", "0.05", "--subsample", "100"])
    assert run.exit_code == 0, run.stderr
    options = json.loads((out / "report.json").read_text())["options"]
    assert (options["dtype"], options["reach"], options["blur"], options["subsample"]) == ("float64", 0.5, 0.05, 100)
    state = torch.load(out / "deformation.pt", weights_only=True)["state"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float64}   # fitted in float64


def test_robust_chamfer_options_reach_register(tmp_path):
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", str(ASSETS / "horse_contour.csv"), str(ASSETS / "horse_contour_deformed.csv"),
                                   "-o", str(out), "-q", "--iterations", "3", "--loss", "chamfer", "--trim", "0.1",
                                   "--direction", "target", "--outliers", "0.05"])
    assert run.exit_code == 0, run.stderr
    options = json.loads((out / "report.json").read_text())["options"]
    assert (options["trim"], options["direction"], options["outliers"]) == (0.1, "target", 0.05)
    bad = CliRunner().invoke(app, ["register", str(ASSETS / "horse_contour.csv"), str(ASSETS / "horse_contour_deformed.csv"),
                                   "-o", str(tmp_path / "bad"), "--loss", "chamfer", "--outliers", "1.5"])
    assert bad.exit_code == 2 and "outliers must be in [0, 1)" in bad.stderr and not (tmp_path / "bad").exists()


def _imports(*args) -> str:
    """The modules `shapeflow ARGS` imports (python -X importtime), one name a line."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "shapeflow_cli.main", *map(str, args)],
                         capture_output=True, text=True)
    return "\n".join(line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:"))


def test_help_and_bad_paths_answer_without_importing_torch(tmp_path):
    for args in (["--help"], ["register", "--help"], ["warp", "--help"],
                 ["register", tmp_path / "missing.ply", ASSETS / "ant.ply"],
                 ["warp", tmp_path / "missing.pt", ASSETS / "ant.ply", "-o", tmp_path / "x.ply"]):
        modules = _imports(*args).splitlines()
        assert "torch" not in modules and "shapeflow" not in modules, args
    run = shapeflow("register", tmp_path / "missing.ply", ASSETS / "ant.ply")
    assert run.returncode == 2 and run.stderr.strip() == f"shapeflow: error: {tmp_path / 'missing.ply'}: no such file"


def test_quiet_prints_nothing_and_silences_warnings(tmp_path, monkeypatch):
    import warnings

    points = np.loadtxt(ASSETS / "horse_contour.csv", delimiter=",", skiprows=1)
    cloud = np.c_[points, np.sin(points[:, :1])]                       # a small 3D cloud: the GIF goes through VTK
    np.savetxt(tmp_path / "a.csv", cloud, delimiter=",")
    np.savetxt(tmp_path / "b.csv", cloud * 1.1 + 0.2, delimiter=",")
    run = subprocess.run([sys.executable, "-m", "shapeflow_cli.main", "register", tmp_path / "a.csv", tmp_path / "b.csv",
                          "-o", tmp_path / "out", "-q", "--iterations", "2", "--loss", "chamfer", "--gif", "f.gif",
                          "--frames", "2"], capture_output=True, text=True,
                         env={**os.environ, "DISPLAY": ":99", "PYTHONWARNINGS": "always"})   # VTK would log "bad X server"
    assert run.returncode == 0 and run.stdout == "" and run.stderr == "", run.stderr
    assert (tmp_path / "out" / "f.gif").exists()

    real = sf.register

    def noisy(*args, **kwargs):
        warnings.warn("a library warning", UserWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(sf, "register", noisy)
    args = ["register", str(ASSETS / "horse_contour.csv"), str(ASSETS / "horse_contour_deformed.csv"), "--loss", "chamfer",
            "--iterations", "2"]
    for quiet, expected in ((True, 0), (False, 1)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = CliRunner().invoke(app, [*args, "-o", str(tmp_path / f"q{quiet}"), *(["-q"] if quiet else [])])
        assert run.exit_code == 0, run.stderr
        assert len([w for w in caught if "a library warning" in str(w.message)]) == expected
        assert (run.output == "") == quiet


def _similar(points, angle=0.5, scale=1.2, shift=(3.0, -1.0)):
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s], [s, c]])
    return scale * points @ rotation.T + np.array(shift), rotation


def test_report_has_the_linear_map_in_world_units(tmp_path):
    source = np.loadtxt(ASSETS / "horse_contour.csv", delimiter=",", skiprows=1)
    target, rotation = _similar(source)
    np.savetxt(tmp_path / "a.csv", source, delimiter=",")
    np.savetxt(tmp_path / "b.csv", target, delimiter=",")
    for model, key, extra in (("similarity", "linear", []), ("resnet", "prealign", ["--prealign", "similarity", "--iterations", "2"])):
        out = tmp_path / model
        run = CliRunner().invoke(app, ["register", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "-o", str(out), "-q",
                                       "--model", model, "--loss", "l2", *extra])
        assert run.exit_code == 0, run.stderr
        report = json.loads((out / "report.json").read_text())
        linear = report[key]
        assert ("linear" in report) == (model == "similarity")
        matrix = np.array(linear["matrix"])
        assert matrix.shape == (3, 3) and np.allclose(matrix[2], [0, 0, 1])
        np.testing.assert_allclose(source @ matrix[:2, :2].T + matrix[:2, 2], target, atol=1e-3)
        np.testing.assert_allclose(linear["rotation"], rotation, atol=1e-4)
        np.testing.assert_allclose(linear["translation"], matrix[:2, 2])
        assert abs(linear["scale"] - 1.2) < 1e-4 and linear["maps"] == "source -> target"


# --- images drawn as pictures, animations, warping label maps ---------------------------------
def _picture(shift=(0, 0)):
    """A 48 x 64 (rows x columns) picture: grey, a bright block top-left, a dark one bottom-right."""
    import scipy.ndimage as ndi

    image = np.full((48, 64), 100.0)
    image[4:16, 6:26] = 250.0
    image[30:44, 44:60] = 0.0
    return ndi.shift(ndi.gaussian_filter(image, 1.0), shift, order=1, mode="nearest").round().astype(np.uint8)


def _panel_layout(rgb):
    """Where the grey picture lies in a rendered panel `(H, W, 3)`, and the centroids of its bright
    and dark blocks relative to that box (0 = top/left, 1 = bottom/right): (box, bright, dark)."""
    grey = rgb.mean(-1)
    picture = np.abs(grey - 100) < 20                              # the picture's grey background
    rows = np.flatnonzero(picture.sum(1) > 0.3 * picture.sum(1).max())     # not the title's anti-aliasing
    cols = np.flatnonzero(picture.sum(0) > 0.3 * picture.sum(0).max())
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    inside = grey[top:bottom + 1, left:right + 1]

    def centroid(mask):
        r, c = np.nonzero(mask)
        return r.mean() / inside.shape[0], c.mean() / inside.shape[1]

    return (bottom - top + 1, right - left + 1), centroid(inside > 230), centroid(inside < 25)


def test_2d_pictures_are_drawn_upright_and_gif_has_the_frames(tmp_path):
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "moving.png", _picture((2, -1)))
    iio.imwrite(tmp_path / "fixed.png", _picture())
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", str(tmp_path / "moving.png"), str(tmp_path / "fixed.png"), "-o", str(out), "-q",
                                   "--iterations", "2", "--gif", "flow.gif", "--frames", "7"])
    assert run.exit_code == 0, run.stderr
    overlay = iio.imread(out / "overlay.png")[..., :3]
    (height, width), bright, dark = _panel_layout(overlay[:, : overlay.shape[1] // 4])    # "before" checkerboard
    assert width > 1.2 * height                                     # 64 columns across, 48 rows down
    assert bright[0] < 0.4 and bright[1] < 0.4                      # top-left, as in the file
    assert dark[0] > 0.6 and dark[1] > 0.6                          # bottom-right
    frames = iio.imread(out / "flow.gif", index=None)
    assert len(frames) == 7
    fixed_panel = frames[-1][:, frames.shape[2] // 3: 2 * frames.shape[2] // 3]
    (height, width), bright, dark = _panel_layout(fixed_panel)
    assert width > 1.2 * height and bright[0] < 0.4 and bright[1] < 0.4 and dark[0] > 0.6 and dark[1] > 0.6
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 0.1       # the moving panel moves
    for count in (3, 40):                                          # fewer, and more frames than fitting steps
        sf.viz.animate(_registered(out, tmp_path), tmp_path / f"f{count}.gif", frames=count)
        assert len(iio.imread(tmp_path / f"f{count}.gif", index=None)) == count


def _registered(out, folder):
    """The registration behind `out`, redone in Python (the CLI does not return it)."""
    return sf.register(sf.read(folder / "moving.png"), sf.read(folder / "fixed.png"), iterations=2, progress=False)


def test_image_affine_report_maps_fixed_to_moving(tmp_path):
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "moving.png", _picture((3, -2)))
    iio.imwrite(tmp_path / "fixed.png", _picture())
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", str(tmp_path / "moving.png"), str(tmp_path / "fixed.png"), "-o", str(out),
                                   "-q", "--model", "affine", "--gif", "flow.gif", "--frames", "4"])
    assert run.exit_code == 0, run.stderr
    linear = json.loads((out / "report.json").read_text())["linear"]
    assert linear["maps"] == "fixed world -> moving world"
    matrix = np.array(linear["matrix"])
    grid = np.stack(np.meshgrid(np.arange(48.0), np.arange(64.0), indexing="ij"), -1).reshape(-1, 2)
    phi = sf.load_deformation(out / "deformation.pt")
    np.testing.assert_allclose(grid @ matrix[:2, :2].T + matrix[:2, 2], phi(grid), atol=1e-3)   # the saved map itself
    centre = np.array([23.5, 31.5])
    # moving = fixed shifted by (3, -2): fixed pixel x shows what moving holds at x + (3, -2)
    np.testing.assert_allclose(matrix[:2, :2] @ centre + matrix[:2, 2], centre + [3.0, -2.0], atol=0.5)
    assert len(iio.imread(out / "flow.gif", index=None)) == 4          # an affine fit animates too


def test_warp_resamples_label_maps_by_nearest_neighbour(tmp_path):
    import nibabel as nib

    labels = np.zeros((40, 30), dtype=np.int16)
    labels[5:20, 4:15], labels[22:35, 10:26], labels[8:14, 18:28] = 3, 7, 12
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "labels.nii.gz"))
    shift = np.array([1.6, -2.3])
    phi = sf.Affine(2)
    phi.set_matrix(np.eye(2), shift)                                    # fixed x -> moving x + shift
    phi.save(tmp_path / "phi.pt")
    base = ["warp", str(tmp_path / "phi.pt"), str(tmp_path / "labels.nii.gz"), "--reference", str(tmp_path / "labels.nii.gz")]
    run = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "nearest.nii.gz")])
    assert run.exit_code == 0 and "nearest neighbour" in run.output, run.output
    warped = nib.load(str(tmp_path / "nearest.nii.gz"))
    assert np.issubdtype(warped.get_data_dtype(), np.integer)
    values = np.asarray(warped.dataobj)
    # ground truth: the label at the nearest moving voxel, rows +2 and columns -2 (inside the grid)
    np.testing.assert_array_equal(values[:38, 2:], labels[2:, :28])
    assert set(np.unique(values)) <= {0, 3, 7, 12}

    run = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "linear.nii.gz"), "--interpolation", "linear"])
    assert run.exit_code == 0 and "nearest" not in run.output
    blended = np.asarray(nib.load(str(tmp_path / "linear.nii.gz")).dataobj)
    assert not np.array_equal(blended, np.round(blended))             # linear blends the labels' edges
    run = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "x.nii.gz"), "--interpolation", "cubic"])
    assert run.exit_code == 2 and "--interpolation cubic: choose linear or nearest" in run.stderr


def test_image_masks_and_prealign_none_reach_register(tmp_path):
    """--mask-fixed/--mask-moving become the mask options; --prealign none switches off the images'
    default affine start (the report's options say which ran); a missing mask file is one line."""
    from shapeflow.synthetic import phantom_pair

    moving, fixed, _ = phantom_pair((32, 32), amplitude=2.0, seed=4)
    paths = {name: tmp_path / f"{name}.nii.gz" for name in ("moving", "fixed", "mask")}
    sf.write(moving, paths["moving"])
    sf.write(fixed, paths["fixed"])
    mask = np.zeros((1, 32, 32), dtype=np.float32)
    mask[:, 4:28, 4:28] = 1
    sf.write(fixed.with_data(torch.from_numpy(mask)), paths["mask"])
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", str(paths["moving"]), str(paths["fixed"]), "-o", str(out), "-q",
                                   "--mask-fixed", str(paths["mask"]), "--mask-moving", str(paths["mask"]),
                                   "--prealign", "none"])
    assert run.exit_code == 0, run.output
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["prealign"] is None and report["options"]["model"] == "svf"
    assert report["options"]["mask_fixed"].endswith("mask.nii.gz")
    run = CliRunner().invoke(app, ["register", str(paths["moving"]), str(paths["fixed"]), "-o", str(tmp_path / "o2"),
                                   "-q", "--mask-fixed", str(tmp_path / "nope.nii.gz")])
    assert run.exit_code == 2 and "nope.nii.gz: no such file" in run.output


def test_image_affine_newton_options_reach_register(tmp_path):
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "moving.png", _picture((3, -2)))
    iio.imwrite(tmp_path / "fixed.png", _picture())
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", str(tmp_path / "moving.png"), str(tmp_path / "fixed.png"), "-o", str(out),
                                   "-q", "--model", "affine", "--optimizer", "newton", "--interpolation", "spline",
                                   "--multiscale", "predictor-corrector"])
    assert run.exit_code == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["options"]["optimizer"], report["options"]["multiscale"]) == ("newton", "predictor-corrector")
    matrix = np.array(report["linear"]["matrix"])
    centre = np.array([23.5, 31.5])
    np.testing.assert_allclose(matrix[:2, :2] @ centre + matrix[:2, 2], centre + [3.0, -2.0], atol=0.5)
    bad = CliRunner().invoke(app, ["register", str(tmp_path / "moving.png"), str(tmp_path / "fixed.png"), "-o",
                                   str(tmp_path / "bad"), "-q", "--model", "affine", "--optimizer", "bfgs"])
    assert bad.exit_code != 0 and "unknown optimizer 'bfgs'" in bad.stderr
