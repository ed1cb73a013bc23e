"""Fuzz every reader of `sf.read` with mutated valid files (issue 16).

Seeds: one small valid file per format, written by `sf.write` (a cloud, a mesh, an image). Each
example takes a seed's bytes and applies a few mutations drawn by hypothesis (bit flips, byte
overwrites, truncation, insertion of random bytes, a number in a text header replaced by a huge or
negative one), writes the file and reads it. The reader must return a shape or an image, or raise
one `ShapeflowError` whose message is one line naming the file; any other exception is a failure.

`IN_PROCESS`: formats parsed by our own code or pure-Python libraries (nibabel, trimesh, pillow,
pydicom). `SUBPROCESS`: formats read by VTK or ITK (C++), which the test suite runs in a child
process so that a crash is reported rather than taking pytest down.

    python benchmarks/fuzz_readers.py [--formats .ply .csv ...] [--examples 2000] [--folder DIR]

tests/test_reliability_io.py runs a minute of it; run this longer by hand.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shapeflow as sf  # noqa: E402
from shapeflow.errors import ShapeflowError  # noqa: E402

IN_PROCESS = [".ply", ".obj", ".off", ".stl", ".csv", ".txt", ".xyz", ".npy", ".nii", ".nii.gz", ".png", ".dcm"]
SUBPROCESS = [".vtk", ".vtp", ".vti", ".mha", ".nrrd"]


def seed_files(folder: Path) -> dict[str, bytes]:
    """One small valid file per format (bytes), written by shapeflow itself."""
    rng = np.random.default_rng(0)
    points = rng.normal(size=(12, 3))
    faces = np.array([[0, 1, 2], [2, 3, 4], [4, 5, 0], [6, 7, 8], [9, 10, 11]])
    mesh = sf.Mesh(torch.from_numpy(points), faces=torch.from_numpy(faces))
    cloud = sf.PointCloud(torch.from_numpy(points))
    volume = sf.Image(torch.from_numpy(rng.random((1, 5, 4, 3)).astype(np.float32)), spacing=[1.0, 2.0, 0.5])
    picture = sf.Image(torch.from_numpy((255 * rng.random((1, 6, 5))).round().astype(np.float32)))
    out = {}
    for suffix, shape in [(".ply", mesh), (".obj", mesh), (".off", mesh), (".stl", mesh), (".vtk", mesh),
                          (".vtp", mesh), (".csv", cloud), (".txt", cloud), (".xyz", cloud), (".npy", cloud),
                          (".nii", volume), (".nii.gz", volume), (".vti", volume), (".mha", volume),
                          (".nrrd", volume), (".png", picture)]:
        out[suffix] = sf.write(shape, folder / f"seed{suffix}", overwrite=True).read_bytes()
    from pydicom.data import get_testdata_file      # a small CT slice shipped with pydicom

    out[".dcm"] = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    return out


_NUMBER = re.compile(rb"\d+")


def mutate(data: bytes, draw) -> bytes:
    """A few mutations of `data`, each drawn with hypothesis's `draw`."""
    from hypothesis import strategies as st

    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "number"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            numbers = list(_NUMBER.finditer(bytes(data[:4096])))
            if numbers:
                m = numbers[draw(st.integers(0, len(numbers) - 1))]
                data[m.start():m.end()] = draw(st.sampled_from([b"0", b"-1", b"1000000000", b"99999999999999999999"]))
    return bytes(data)


def fuzz_one(suffix: str, seed: bytes, folder: Path, draw) -> str:
    """Read one mutation of `seed` saved as a `suffix` file in `folder`: returns "read" or
    "refused"; raises AssertionError for any other outcome (another exception, a multi-line error,
    an error that does not name the file)."""
    path = folder / f"fuzz{suffix}"
    path.write_bytes(mutate(seed, draw))
    try:
        sf.read(path)
        return "read"
    except ShapeflowError as exc:
        message = str(exc)
        assert "\n" not in message and str(path) in message, f"{suffix}: bad error message {message!r}"
        return "refused"
    except Exception as exc:  # noqa: BLE001 - the finding
        raise AssertionError(f"{suffix}: {type(exc).__name__}: {exc}") from exc


def run(formats: list[str], examples: int, folder: Path) -> dict[str, dict[str, int]]:
    """`examples` mutated files per format; {suffix: {"read": n, "refused": n}}."""
    seeds = seed_files(folder)
    counts: dict[str, dict[str, int]] = {}
    for suffix in formats:
        counts[suffix] = _fuzz_format(suffix, seeds[suffix], folder, examples)
    return counts


def _fuzz_format(suffix: str, seed: bytes, folder: Path, examples: int) -> dict[str, int]:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    tally = {"read": 0, "refused": 0}

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data):
        tally[fuzz_one(suffix, seed, folder, data.draw)] += 1

    one()
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", nargs="+", default=IN_PROCESS + SUBPROCESS)
    parser.add_argument("--examples", type=int, default=500, help="mutated files per format")
    parser.add_argument("--folder", type=Path, default=None, help="where the files go (default: a temporary folder)")
    args = parser.parse_args()
    unknown = [s for s in args.formats if s not in IN_PROCESS + SUBPROCESS]
    if unknown:
        parser.error(f"unknown formats {unknown}; choose from {IN_PROCESS + SUBPROCESS}")
    start = time.perf_counter()
    if args.folder is not None:
        args.folder.mkdir(parents=True, exist_ok=True)
        counts = run(args.formats, args.examples, args.folder)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            counts = run(args.formats, args.examples, Path(tmp))
    for suffix, tally in counts.items():
        print(f"{suffix}: {tally['read']} read, {tally['refused']} refused with one line, 0 other outcomes")
    print(f"{sum(sum(t.values()) for t in counts.values())} files in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
