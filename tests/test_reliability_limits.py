"""Size and count limits (issue 16): absurd headers are refused with one line naming the file,
before the announced memory is allocated (the process stays small)."""
from __future__ import annotations

import resource
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import shapeflow as sf

PLY_HEADER = "ply\nformat {fmt} 1.0\nelement vertex {n}\nproperty float x\nproperty float y\nproperty float z\nend_header\n"


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("fmt, body", [("binary_little_endian", b"\0" * 12), ("ascii", b"1 2 3\n")])
def test_a_ply_header_announcing_a_billion_vertices_is_refused_before_allocation(tmp_path, fmt, body):
    path = tmp_path / "huge.ply"
    path.write_bytes(PLY_HEADER.format(fmt=fmt, n=10 ** 9).encode() + body)
    before = _peak_mib()
    with pytest.raises(sf.ShapeflowError, match=r"huge\.ply: the PLY header announces 1000000000 vertex records") as info:
        sf.read(path)
    assert "\n" not in str(info.value) and _peak_mib() - before < 500     # 10^9 float32 points would be 12 GB


def test_a_truncated_ply_names_the_shortfall(tmp_path):
    path = tmp_path / "short.ply"
    path.write_bytes(PLY_HEADER.format(fmt="binary_little_endian", n=10).encode() + b"\0" * 60)
    with pytest.raises(sf.ShapeflowError, match="need at least 120 bytes, but the file holds 60"):
        sf.read(path)
    exact = tmp_path / "exact.ply"
    exact.write_bytes(PLY_HEADER.format(fmt="binary_little_endian", n=10).encode() + np.arange(30, dtype="<f4").tobytes())
    assert sf.read(exact).points.shape == (10, 3)       # the bound is tight, not off by one


def _nifti_with_dims(path: Path, dims: tuple[int, ...]) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    raw[40:56] = struct.pack("<8h", len(dims), *dims, *([1] * (7 - len(dims))))
    path.write_bytes(raw)
    return path


def test_a_nifti_header_announcing_an_absurd_volume_is_refused(tmp_path):
    path = _nifti_with_dims(tmp_path / "huge.nii", (30000, 30000, 30000))
    with pytest.raises(sf.ShapeflowError, match=r"30000 x 30000 x 30000 = 2\.7e\+13 voxels, above the limit"):
        sf.read(path)


def test_a_nifti_with_less_data_than_its_header_says_is_refused(tmp_path):
    path = _nifti_with_dims(tmp_path / "short.nii", (64, 64, 64))
    with pytest.raises(sf.ShapeflowError, match=r"short\.nii: the header announces 64 x 64 x 64 voxels .* but the file holds"):
        sf.read(path)


def test_an_itk_header_announcing_an_absurd_volume_is_refused(tmp_path):
    pytest.importorskip("SimpleITK")
    path = tmp_path / "huge.mha"
    path.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\nElementType = MET_FLOAT\n"
                     b"ElementDataFile = LOCAL\n" + b"\0" * 16)
    with pytest.raises(sf.ShapeflowError, match=r"huge\.mha: the header announces 100000 x 100000 x 100000"):
        sf.read(path)
