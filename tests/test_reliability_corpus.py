"""A corpus of bad inputs per entry point (issue 16): each is answered by exit code 2, one line on
stderr naming the file and the problem, and no output left behind (no output folder or file, no
temporary folder).

Entry points: `shapeflow register` with a bad shape (either side), with a bad image (either
side), `shapeflow warp` with a bad deformation file, `register` with bad landmark files,
`shapeflow batch` with a bad pairs CSV, and `shapeflow train` with a bad config. Files are made
from valid ones (the shipped assets) by the corruptions below, so each case is one way a real
file goes wrong.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import shapeflow as sf
from shapeflow_cli.main import app

ASSETS = Path(__file__).resolve().parents[1] / "assets"
GOOD_2D = ASSETS / "horse_contour.csv"
GOOD_MESH = ASSETS / "ant.ply"


def _text(name, body):
    return lambda d: _write(d / name, body.encode() if isinstance(body, str) else body)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _npy(name, array):
    def make(d):
        np.save(d / name, array)
        return d / name
    return make


def _ply_from_ant(mutate):
    def make(d):
        return _write(d / "bad.ply", mutate(GOOD_MESH.read_bytes()))
    return make


def _nifti(name, data, affine=None, patch=None):
    def make(d):
        path = d / name
        nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
        if patch is not None:
            raw = bytearray(path.read_bytes())
            patch(raw)
            path.write_bytes(raw)
        return path
    return make


SHAPES = {
    "empty csv": _text("bad.csv", ""),
    "header only": _text("bad.csv", "x,y\n"),
    "one point": _text("bad.csv", "x,y\n1,2\n"),
    "text in numbers": _text("bad.csv", "x,y\n1,2\n3,abc\n5,6\n"),
    "ragged rows": _text("bad.csv", "x,y,z\n1,2,3\n4,5\n"),
    "four columns": _text("bad.csv", "1,2,3,4\n5,6,7,8\n9,1,2,3\n"),
    "one column": _text("bad.csv", "1\n2\n3\n"),
    "nan": _text("bad.csv", "1,2\n3,nan\n5,6\n"),
    "inf": _text("bad.csv", "1,2\n3,inf\n5,6\n"),
    "identical points": _text("bad.csv", "1,2\n1,2\n1,2\n1,2\n"),
    "binary garbage csv": _text("bad.csv", bytes(range(256)) * 4),
    "xyz garbage": _text("bad.xyz", "hello world\nfoo bar\n"),
    "txt semicolons": _text("bad.txt", "1;2\n3;4\n5;6\n"),
    "npy 1d": _npy("bad.npy", np.arange(10.0)),
    "npy 3d array": _npy("bad.npy", np.zeros((4, 3, 2))),
    "npy object": _text("bad.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (3,), }"
                        + b" " * 60 + b"\n" + b"\x80\x04N."),
    "npy strings": _npy("bad.npy", np.array([["a", "b"], ["c", "d"]])),
    "npy nan": _npy("bad.npy", np.array([[0.0, 1.0], [np.nan, 2.0], [3.0, 4.0]])),
    "ply truncated": _ply_from_ant(lambda b: b[: len(b) // 2]),
    "ply no header end": _ply_from_ant(lambda b: b.replace(b"end_header", b"end_headr")),
    "ply huge count": _ply_from_ant(lambda b: b.replace(b"element vertex", b"element vertex 9" , 1)),
    "ply not ply": _text("bad.ply", "this is not a ply file\n"),
    "ply no xyz": _text("bad.ply", "ply\nformat ascii 1.0\nelement vertex 2\nproperty float a\nproperty float b\n"
                        "end_header\n1 2\n3 4\n"),
    "ply face out of range": _text("bad.ply", "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\n"
                                   "property float y\nproperty float z\nelement face 1\nproperty list uchar int "
                                   "vertex_indices\nend_header\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n"),
    "obj garbage": _text("bad.obj", "v 1 2\nv a b c\nf 1 2 3\n"),
    "off bad header": _text("bad.off", "OFF\n3 1\n0 0 0\n"),
    "stl garbage": _text("bad.stl", b"\0" * 90),
    "vtk garbage": _text("bad.vtk", "# vtk DataFile Version 4.2\nx\nASCII\nDATASET POLYDATA\nPOINTS 1000000000 float\n"),
    "vtp garbage": _text("bad.vtp", "<VTKFile type='PolyData'><PolyData><Piece NumberOfPoints='-5'>"),
    "unknown extension": _text("bad.abc", "1,2\n3,4\n"),
    "folder without dicom": lambda d: (d / "folder").mkdir() or d / "folder",
    "2D against 3D": lambda d: GOOD_MESH,
}


def _assert_refused(run, out: Path, names: str, tmp: Path) -> None:
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    assert run.exit_code == 2, (run.exit_code, run.stderr[-500:])
    assert len(lines) == 1 and lines[0].startswith("shapeflow: error:"), run.stderr[-500:]
    assert names in lines[0], (names, lines[0])
    assert not out.exists() and not [p for p in tmp.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("side", ["source", "target"])
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_register_refuses_a_bad_shape(tmp_path, case, side):
    bad = SHAPES[case](tmp_path)
    pair = (bad, GOOD_2D) if side == "source" else (GOOD_2D, bad)
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", str(pair[0]), str(pair[1]), "-o", str(out), "-q", "--iterations", "2"])
    named = bad.name if case != "2D against 3D" else "source has"
    _assert_refused(run, out, named if case != "2D against 3D" else "columns", tmp_path)


def _set_dims(dims):
    def patch(raw):
        raw[40:56] = struct.pack("<8h", len(dims), *dims, *([1] * (7 - len(dims))))
    return patch


def _set_sform(row_x):
    """Replace the first row of the sform (the voxel -> world affine), sform_code kept at 2."""
    def patch(raw):
        raw[252:256] = struct.pack("<2h", 0, 2)          # qform_code 0, sform_code 2: the sform rules
        raw[280:296] = struct.pack("<4f", *row_x)
    return patch


VOLUME = np.random.default_rng(0).random((12, 10, 8)).astype(np.float32)
IMAGES = {
    "nifti truncated": lambda d: _write(d / "bad.nii", _nifti("x.nii", VOLUME)(d).read_bytes()[:600]),
    "nifti garbage": _text("bad.nii", b"\0" * 400),
    "nifti gz garbage": _text("bad.nii.gz", b"\x1f\x8b" + b"\0" * 100),
    "nifti huge header": _nifti("bad.nii", VOLUME, patch=_set_dims((30000, 30000, 30000))),
    "nifti singular affine": _nifti("bad.nii", VOLUME, patch=_set_sform([0.0, 0.0, 0.0, 0.0])),
    "nifti nan affine": _nifti("bad.nii", VOLUME, patch=_set_sform([float("nan"), 0.0, 0.0, 0.0])),
    "nifti absurd spacing": _nifti("bad.nii", VOLUME, patch=_set_sform([1e30, 0.0, 0.0, 0.0])),
    "nifti all nan": _nifti("bad.nii", np.full((6, 6, 6), np.nan, np.float32)),
    "nifti 4d time series": _nifti("bad.nii", np.zeros((6, 6, 6, 3), np.float32),
                                   patch=lambda raw: raw.__setitem__(slice(123, 124), bytes([8 | 2]))),
    "nifti 6d": _nifti("bad.nii", np.zeros((3, 3, 3, 1, 1, 2), np.float32)),
    "nifti complex": _nifti("bad.nii", (VOLUME + 1j * VOLUME).astype(np.complex64)),
    "png garbage": _text("bad.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 50),
    "jpg empty-ish": _text("bad.jpg", b"\xff\xd8\xff"),
    "tif garbage": _text("bad.tif", b"II*\0" + b"\0" * 40),
    "mha huge": _text("bad.mha", "ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\n"
                      "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n"),
    "mha garbage": _text("bad.mha", "not an image at all"),
    "nrrd garbage": _text("bad.nrrd", "NRRD0004\ntype: float\ndimension: 3\nsizes: 2 2\n"),
    "vti garbage": _text("bad.vti", "<VTKFile type='ImageData'><ImageData WholeExtent='0 99999 0 99999 0 99999'>"),
    "dcm garbage": _text("bad.dcm", b"\0" * 200),
    "dcm no preamble": _text("bad.dcm", b"DICM" + b"\1" * 64),
}


@pytest.mark.parametrize("side", ["moving", "fixed"])
@pytest.mark.parametrize("case", sorted(IMAGES))
def test_register_refuses_a_bad_image(tmp_path, case, side):
    good = _nifti("good.nii.gz", VOLUME)(tmp_path)
    bad = IMAGES[case](tmp_path)
    pair = (bad, good) if side == "moving" else (good, bad)
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", str(pair[0]), str(pair[1]), "-o", str(out), "-q", "--iterations", "1"])
    _assert_refused(run, out, bad.name, tmp_path)


def _deformation(tmp: Path) -> Path:
    x = np.loadtxt(GOOD_2D, delimiter=",", skiprows=1)
    return sf.register(x, x + 1.0, model="rigid", progress=False).deformation.save(tmp / "good.pt")


def _mutate_payload(change):
    def make(d):
        payload = torch.load(_deformation(d), weights_only=True)
        change(payload)
        torch.save(payload, d / "bad.pt")
        return d / "bad.pt"
    return make


DEFORMATIONS = {
    "empty": _text("bad.pt", b""),
    "truncated": lambda d: _write(d / "bad.pt", _deformation(d).read_bytes()[:100]),
    "garbage": _text("bad.pt", bytes(range(256))),
    "foreign pickle": _text("bad.pt", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93."),
    "a plain tensor": lambda d: (torch.save(torch.zeros(3), d / "bad.pt"), d / "bad.pt")[1],
    "a dict without format": lambda d: (torch.save({"a": 1}, d / "bad.pt"), d / "bad.pt")[1],
    "wrong format version": _mutate_payload(lambda p: p.__setitem__("format", "shapeflow-deformation/99")),
    "unknown model": _mutate_payload(lambda p: p.__setitem__("model", json.dumps({"type": "Warp9", "config": {}}))),
    "model json garbage": _mutate_payload(lambda p: p.__setitem__("model", "{not json")),
    "missing state": _mutate_payload(lambda p: p.pop("state")),
    "state of the wrong size": _mutate_payload(lambda p: p["state"].__setitem__("translation", torch.zeros(7))),
    "state missing a key": _mutate_payload(lambda p: p["state"].pop("translation")),
    "unknown dtype": _mutate_payload(lambda p: p.__setitem__("dtype", "float8")),
    "bad config": _mutate_payload(lambda p: p.__setitem__("model", json.dumps({"type": "Rigid", "config": {"dim": 7}}))),
    "a numpy file": _npy("bad.pt", np.zeros(3)),
    "a zip that is not torch": _text("bad.pt", b"PK\x03\x04" + b"\0" * 60),
    "model json a list": _mutate_payload(lambda p: p.__setitem__("model", "[1, 2]")),
    "model without type": _mutate_payload(lambda p: p.__setitem__("model", json.dumps({"config": {"dim": 2}}))),
    "model without config": _mutate_payload(lambda p: p.__setitem__("model", json.dumps({"type": "Rigid"}))),
    "state not a dict": _mutate_payload(lambda p: p.__setitem__("state", [1, 2])),
    "state with an extra key": _mutate_payload(lambda p: p["state"].__setitem__("extra", torch.zeros(2))),
    "state with NaN": _mutate_payload(lambda p: p["state"].__setitem__("translation", torch.full((2,), float("nan")))),
    "state with inf": _mutate_payload(lambda p: p["state"].__setitem__("translation", torch.tensor([float("inf"), 0.0]))),
    "normalized without inner": _mutate_payload(lambda p: p.__setitem__(
        "model", json.dumps({"type": "Normalized", "config": {"scale": 1.0}}))),
    "compose without parts": _mutate_payload(lambda p: p.__setitem__(
        "model", json.dumps({"type": "Compose", "config": {"parts": []}}))),
    "resnet of zero blocks": _mutate_payload(lambda p: p.__setitem__(
        "model", json.dumps({"type": "ResNetFlow", "config": {"dim": 2, "blocks": 0, "width": 4}}))),
    "float16 dtype": _mutate_payload(lambda p: p.__setitem__("dtype", "float16")),
    "format a number": _mutate_payload(lambda p: p.__setitem__("format", 5)),
    "a folder": lambda d: (d / "bad.pt").mkdir() or d / "bad.pt",
    "gzip bytes": _text("bad.pt", b"\x1f\x8b\x08\x00" + b"\0" * 40),
    "plain text": _text("bad.pt", "a deformation, honestly\n"),
    "a 3D map for a 2D shape": lambda d: sf.Rigid(3).save(d / "bad.pt"),
}


@pytest.mark.parametrize("case", sorted(DEFORMATIONS))
def test_warp_refuses_a_bad_deformation_file(tmp_path, case):
    bad = DEFORMATIONS[case](tmp_path)
    out = tmp_path / "out.csv"
    run = CliRunner().invoke(app, ["warp", str(bad), str(GOOD_2D), "-o", str(out), "-q"])
    assert run.exit_code == 2, (case, run.exit_code, run.stderr[-400:], run.stdout[-400:])
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    named = GOOD_2D.name if case == "a 3D map for a 2D shape" else bad.name      # the pairing is what is wrong
    assert len(lines) == 1 and named in lines[0], lines
    assert not out.exists()


LANDMARKS = {
    "empty": "",
    "header only": "x,y\n",
    "one landmark row of text": "x,y\n1,2\nfoo,bar\n3,4\n",
    "semicolons": "1;2\n3;4\n5;6\n",
    "tabs and text": "1\ta\n3\t4\n5\t6\n",
    "four columns": "1,2,3,4\n5,6,7,8\n9,1,2,3\n",
    "binary": bytes(range(200)).decode("latin-1"),
    "huge count of columns": ",".join(["1"] * 50) + "\n",
    "count differs by one": "1,2\n3,4\n5,6\n7,8\n",
    "nan in the first row": "nan,2\n3,4\n5,6\n",
    "only commas": ",,\n,,\n,,\n",
    "unicode garbage": "\u2603,\u2603\n1,2\n3,4\n",
    "negative inf": "1,2\n-inf,3\n4,5\n",
    "hex numbers": "0x1,0x2\n0x3,0x4\n0x5,0x6\n",
    "quoted text": "\"a\",\"b\"\n\"c\",\"d\"\n\"e\",\"f\"\n",
    "empty lines only": "\n\n\n",
    "one column": "1\n2\n",
    "wrong dimension": "1,2,3\n4,5,6\n7,8,9\n",
    "nan": "1,2\nnan,3\n4,5\n",
    "text": "a,b\nc,d\n",
    "count differs": "1,2\n3,4\n",
    "inf": "1,2\ninf,3\n4,5\n",
    "ragged": "1,2\n3\n4,5\n",
}


LANDMARK_FILES = {
    "npy 1D": np.arange(6.0), "npy 3D": np.zeros((3, 2, 2)), "npy strings": np.array([["a", "b"]] * 3),
    "npy nan": np.array([[1.0, 2.0], [np.nan, 1.0], [0.0, 0.0]]), "npy empty": np.zeros((0, 2)),
    "npy wrong count": np.zeros((5, 2)), "npy wrong dimension": np.zeros((3, 3)),
}


@pytest.mark.parametrize("case", sorted(LANDMARKS) + sorted(LANDMARK_FILES))
def test_register_refuses_bad_landmarks(tmp_path, case):
    good = tmp_path / "good_marks.csv"
    good.write_text("1,2\n3,4\n5,6\n")
    if case in LANDMARK_FILES:
        bad = tmp_path / "bad_marks.npy"
        np.save(bad, LANDMARK_FILES[case])
    else:
        bad = tmp_path / "bad_marks.csv"
        bad.write_text(LANDMARKS[case], encoding="latin-1" if case == "binary" else "utf-8")
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", str(GOOD_2D), str(ASSETS / "horse_contour_deformed.csv"), "-o", str(out),
                                   "-q", "--iterations", "2", "--landmarks-source", str(good),
                                   "--landmarks-target", str(bad)])
    _assert_refused(run, out, "marks", tmp_path)


PAIRS = {
    "empty": "",
    "only a name column": "name\np\n",
    "source only with rows": "source\na.csv\nb.csv\n",
    "target only": "target\nb.csv\n",
    "columns in capitals": "SOURCE,TARGET\na.csv,b.csv\n",
    "typo in landmarks column": "source,target,landmark_source\na.csv,b.csv,m.csv\n",
    "unknown masks column": "source,target,mask_source\na.csv,b.csv,m.csv\n",
    "two duplicate unnamed rows": "source,target\na.csv,b.csv\na.csv,b.csv\n",
    "three duplicate names": "name,source,target\nq,a.csv,b.csv\nr,a.csv,b.csv\nq,c.csv,d.csv\n",
    "tab separated": "source\ttarget\na.csv\tb.csv\n",
    "a json file": '{"source": "a.csv", "target": "b.csv"}\n',
    "an xml file": "<pairs><pair source='a' target='b'/></pairs>\n",
    "only blank lines": "\n\n\n",
    "header with spaces only": "   ,   \n",
    "a header of nul bytes": "\x00\x00,\x00\na.csv,b.csv\n",
    "utf-16": "source,target\na.csv,b.csv\n".encode("utf-16").decode("latin-1"),
    "empty column name": "source,target,\na.csv,b.csv,x\n",
    "a pairs file of pairs files": "pairs\npairs.csv\n",
    "unknown labels column": "source,target,labels\na.csv,b.csv,l.nii\n",
    "image-style column names": "source,target,landmarks_moving\na.csv,b.csv,m.csv\n",
    "missing header, data only": "a.csv,b.csv\nc.csv,d.csv\n",
    "header repeated as the only row": "source,target\nsource,target\nsource,target\n",
    "a very long unknown column": "source,target," + "x" * 500 + "\na.csv,b.csv,1\n",
    "header only": "source,target\n",
    "missing target column": "source\na.csv\n",
    "misspelt columns": "src,tgt\na.csv,b.csv\n",
    "unknown column": "source,target,weight\na.csv,b.csv,1\n",
    "duplicate names": "name,source,target\np,a.csv,b.csv\np,a.csv,b.csv\n",
    "binary garbage": bytes(range(256)).decode("latin-1"),
    "semicolons": "source;target\na.csv;b.csv\n",
}


@pytest.mark.parametrize("case", sorted(PAIRS))
def test_batch_refuses_a_bad_pairs_file(tmp_path, case):
    bad = tmp_path / "pairs.csv"
    bad.write_text(PAIRS[case], encoding="latin-1")
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["batch", str(bad), "-o", str(out), "-q"])
    _assert_refused(run, out, "pairs.csv", tmp_path)


SHIPPED_CONFIG = (ASSETS / "models" / "suits2d.toml").read_text()
CONFIGS = {
    "empty": "",
    "float steps": SHIPPED_CONFIG.replace("steps = 120", "steps = 1.5"),
    "boolean batch": SHIPPED_CONFIG.replace("batch = 2", "batch = true"),
    "string seed": SHIPPED_CONFIG.replace("seed = 0", 'seed = "zero"'),
    "iterations reversed": SHIPPED_CONFIG.replace("iterations = [2, 6]", "iterations = [6, 2]"),
    "iterations of text": SHIPPED_CONFIG.replace("iterations = [2, 6]", 'iterations = "many"'),
    "negative lam": SHIPPED_CONFIG.replace("lam = 0.1", "lam = -0.1"),
    "size of text": SHIPPED_CONFIG.replace("size = [96, 96]", 'size = "large"'),
    "zero train pairs": SHIPPED_CONFIG.replace("train = 64", "train = 0"),
    "binary file": bytes(range(256)).decode("latin-1"),
    "method as a value": SHIPPED_CONFIG.replace('[method]\nname = "suits"', 'method = "suits"\n[unused]\nname = "suits"'),
    "not toml": "this is = = not toml",
    "missing section": SHIPPED_CONFIG.replace("[method]", "[methods]"),
    "unknown section": SHIPPED_CONFIG + "\n[extra]\na = 1\n",
    "unknown key": SHIPPED_CONFIG.replace("steps = 120", "stepz = 120"),
    "negative steps": SHIPPED_CONFIG.replace("steps = 120", "steps = -5"),
    "zero batch": SHIPPED_CONFIG.replace("batch = 2", "batch = 0"),
    "string lr": SHIPPED_CONFIG.replace("lr = 5e-4", 'lr = "fast"'),
    "negative lr": SHIPPED_CONFIG.replace("lr = 5e-4", "lr = -1.0"),
    "unknown method": SHIPPED_CONFIG.replace('name = "suits"\niterations', 'name = "magic"\niterations'),
    "unknown network": SHIPPED_CONFIG.replace('name = "suits"\npretrain_mind', 'name = "resnet9000"\npretrain_mind'),
    "wrong network for method": SHIPPED_CONFIG.replace('name = "suits"\npretrain_mind = 200', 'name = "learngn"'),
    "unknown modality": SHIPPED_CONFIG.replace('modality = "multi"', 'modality = "xray"'),
    "tiny size": SHIPPED_CONFIG.replace("size = [96, 96]", "size = [4, 4]"),
    "4D size": SHIPPED_CONFIG.replace("size = [96, 96]", "size = [16, 16, 16, 16]"),
    "unknown source": SHIPPED_CONFIG.replace('source = "phantoms"', 'source = "internet"'),
    "folder without path": SHIPPED_CONFIG.replace('source = "phantoms"', 'source = "folder"'),
    "unknown device": SHIPPED_CONFIG.replace("seed = 0", 'seed = 0\ndevice = "tpu"'),
    "negative pretraining": SHIPPED_CONFIG.replace("pretrain_mind = 200", "pretrain_mind = -3"),
    "init not a path": SHIPPED_CONFIG.replace("pretrain_mind = 200", "pretrain_mind = 200\ninit = 5"),
    "section is a value": SHIPPED_CONFIG.replace("[network]\nname = \"suits\"\npretrain_mind = 200\n", "network = 3\n"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_train_refuses_a_bad_config(tmp_path, case):
    bad = tmp_path / "config.toml"
    bad.write_text(CONFIGS[case], encoding="latin-1" if case == "binary file" else "utf-8")
    out = tmp_path / "run"
    run = CliRunner().invoke(app, ["train", str(bad), "-o", str(out), "-q"])
    assert run.exit_code == 2, (case, run.exit_code, run.stderr[-400:], run.stdout[-300:])
    lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "config.toml" in lines[0], lines
    assert not out.exists() or not any(out.iterdir())


def _image_pair_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Cases needing more than one bad file: (register arguments, the name the error must carry)."""
    from pydicom.data import get_testdata_file
    import shutil

    good = _nifti("good.nii.gz", VOLUME)(tmp)
    flat = _nifti("flat.nii.gz", np.random.default_rng(1).random((12, 10)).astype(np.float32))(tmp)
    constant = _nifti("constant.nii.gz", np.ones((12, 10, 8), np.float32))(tmp)
    labels = _nifti("labels_wrong.nii.gz", np.zeros((5, 5, 5), np.int16))(tmp)
    mixed = tmp / "mixed"
    mixed.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), mixed / name)
    return {
        "2D moving, 3D fixed": ([flat, good], "flat.nii.gz"),
        "3D moving, 2D fixed": ([good, flat], "flat.nii.gz"),
        "constant moving": ([constant, good], "constant.nii.gz"),
        "constant fixed": ([good, constant], "constant.nii.gz"),
        "labels on another grid": ([good, good, "--labels-moving", labels, "--labels-fixed", labels], "labels_wrong"),
        "a DICOM folder with two series": ([mixed, good], "mixed"),
    }


@pytest.mark.parametrize("case", ["2D moving, 3D fixed", "3D moving, 2D fixed", "constant moving", "constant fixed",
                                  "labels on another grid", "a DICOM folder with two series"])
def test_register_refuses_a_bad_image_pair(tmp_path, case):
    pytest.importorskip("pydicom")
    args, named = _image_pair_cases(tmp_path)[case]
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["register", *map(str, args), "-o", str(out), "-q", "--iterations", "1"])
    _assert_refused(run, out, named, tmp_path)


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_atlas_refuses_a_bad_subject(tmp_path, case):
    """The same corruptions as a subject of `shapeflow atlas`: refused on the client, before any
    cluster starts."""
    bad = SHAPES[case](tmp_path)
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["atlas", str(GOOD_2D), str(bad), str(ASSETS / "horse_contour_deformed.csv"),
                                   "-o", str(out), "-q"])
    named = "2D" if case == "2D against 3D" else bad.name
    _assert_refused(run, out, named, tmp_path)
