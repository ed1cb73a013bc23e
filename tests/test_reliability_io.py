"""Readers and writers under property tests and fuzzing (issue 16).

Round trips: random valid clouds, meshes and images written in every format and read back equal
(hypothesis). Fuzz: mutated valid files (bit flips, truncations, insertions, random headers) fed to
every reader: each answers with a shape/image or one `ShapeflowError` line naming the file, never
another exception. Formats read by our own or pure-Python parsers are fuzzed in this process; those
read by VTK/ITK (C++: a crash would take the process down) run in a subprocess per format, which
must exit normally. A minute at most here; `benchmarks/fuzz_readers.py` runs longer.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import shapeflow as sf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from fuzz_readers import IN_PROCESS, SUBPROCESS, fuzz_one, seed_files  # noqa: E402

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
coordinate = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=64)


def _cloud(draw_points: np.ndarray) -> sf.PointCloud:
    return sf.PointCloud(torch.from_numpy(draw_points))


@settings(max_examples=25, **SETTINGS)
@given(data=st.data(), dim=st.sampled_from([2, 3]), n=st.integers(2, 40))
def test_clouds_round_trip_through_every_point_format(tmp_path_factory, data, dim, n):
    points = np.array(data.draw(st.lists(st.lists(coordinate, min_size=dim, max_size=dim), min_size=n, max_size=n)))
    folder = tmp_path_factory.mktemp("cloud")
    suffixes = [".csv", ".txt", ".xyz", ".npy"] + ([".ply", ".vtk", ".vtp"] if dim == 3 else [])
    for suffix in suffixes:
        back = sf.read(sf.write(_cloud(points), folder / f"c{suffix}"))
        np.testing.assert_array_equal(back.points.numpy(), points, err_msg=suffix)


@settings(max_examples=15, **SETTINGS)
@given(data=st.data(), n=st.integers(3, 30))
def test_meshes_round_trip_with_their_faces(tmp_path_factory, data, n):
    points = np.array(data.draw(st.lists(st.lists(coordinate, min_size=3, max_size=3), min_size=n, max_size=n)))
    faces = np.array(data.draw(st.lists(st.permutations(range(n)).map(lambda p: p[:3]), min_size=1, max_size=20)))
    mesh = sf.Mesh(torch.from_numpy(points), faces=torch.from_numpy(faces))
    folder = tmp_path_factory.mktemp("mesh")
    for suffix in (".ply", ".obj", ".off", ".vtk", ".vtp"):
        back = sf.read(sf.write(mesh, folder / f"m{suffix}"))
        np.testing.assert_allclose(back.points.numpy(), points, rtol=1e-6 if suffix in (".obj", ".off") else 0,
                                   err_msg=suffix)
        np.testing.assert_array_equal(back.faces.numpy(), faces, err_msg=suffix)
    # STL stores float32 triangle corners (no shared vertices); the reader merges corners that agree
    # to 8 decimals (trimesh's merge tolerance, 1e-8), so only points apart by more than that come back
    merged = np.round(points.astype(np.float32).astype(np.float64) * 1e8)
    if len(np.unique(faces, axis=0)) == len(faces) and len(np.unique(merged, axis=0)) == n:
        # the same triangles, as float32
        back = sf.read(sf.write(mesh, folder / "m.stl"))
        np.testing.assert_array_equal(np.sort(back.points.numpy()[back.faces.numpy()].reshape(-1, 9), axis=0),
                                      np.sort(points.astype(np.float32)[faces].reshape(-1, 9), axis=0))


@settings(max_examples=15, **SETTINGS)
@given(shape=st.lists(st.integers(2, 7), min_size=2, max_size=3), seed=st.integers(0, 2 ** 16),
       spacing=st.floats(0.1, 5.0), origin=st.floats(-100, 100))
def test_images_round_trip_with_their_geometry(tmp_path_factory, shape, seed, spacing, origin):
    data = torch.from_numpy(np.random.default_rng(seed).normal(size=(1, *shape)).astype(np.float32))
    image = sf.Image(data, spacing=[spacing] * len(shape), origin=[origin] * len(shape))
    folder = tmp_path_factory.mktemp("image")
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd", ".vti"):
        back = sf.read(sf.write(image, folder / f"i{suffix}"))
        torch.testing.assert_close(back.data, image.data, rtol=0, atol=0)
        np.testing.assert_allclose(back.spacing, image.spacing, rtol=1e-6, err_msg=suffix)
        np.testing.assert_allclose(back.origin, image.origin, rtol=1e-6, atol=1e-6, err_msg=suffix)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return seed_files(tmp_path_factory.mktemp("seeds"))


@pytest.mark.parametrize("suffix", IN_PROCESS)
def test_fuzzed_files_get_a_shape_or_one_line_error_in_process(seeds, tmp_path_factory, suffix):
    folder = tmp_path_factory.mktemp("fuzz")

    @settings(max_examples=60, **SETTINGS)
    @given(st.data())
    def run(data):
        fuzz_one(suffix, seeds[suffix], folder, data.draw)

    run()


def test_fuzzed_files_read_by_vtk_and_itk_never_crash_the_process(tmp_path):
    """Each C++-backed format in its own process (30 mutated files each)."""
    for suffix in SUBPROCESS:
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz_readers.py"), "--formats", suffix,
                              "--examples", "30", "--folder", str(tmp_path / suffix.strip("."))],
                             capture_output=True, encoding="utf-8", errors="replace", timeout=300)
        assert run.returncode == 0, f"{suffix}: exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"


@settings(max_examples=15, **SETTINGS)
@given(shape=st.lists(st.integers(2, 9), min_size=2, max_size=3), seed=st.integers(0, 2 ** 16))
def test_arrays_and_pictures_round_trip(tmp_path_factory, shape, seed):
    """.npy images keep every value and the unit grid; 2D pictures (.png) keep 8-bit integers."""
    rng = np.random.default_rng(seed)
    folder = tmp_path_factory.mktemp("array")
    image = sf.Image(torch.from_numpy(rng.normal(size=(1, *shape)).astype(np.float32)))
    back = sf.read(sf.write(image, folder / "a.npy"), kind="image")
    torch.testing.assert_close(back.data, image.data, rtol=0, atol=0)
    if len(shape) == 2:
        picture = sf.Image(torch.from_numpy(rng.integers(0, 256, size=(1, *shape)).astype(np.float32)))
        back = sf.read(sf.write(picture, folder / "p.png"))
        torch.testing.assert_close(back.data, picture.data, rtol=0, atol=0)
