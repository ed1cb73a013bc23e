"""Atlas building on a 2-worker Dask LocalCluster (shapeflow/pipelines/atlas.py, `shapeflow atlas`)."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

import shapeflow as sf

pytest.importorskip("distributed")

AXES = [(1.0, 0.5), (1.4, 0.5), (1.0, 0.9), (1.4, 0.9)]


def _ellipse(a: float, b: float, n: int = 40, phase: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + phase
    return np.c_[a * np.cos(t), b * np.sin(t)]


def _chamfer(points: np.ndarray, reference: np.ndarray) -> float:
    return (cKDTree(reference).query(points)[0].mean() + cKDTree(points).query(reference)[0].mean()) / 2


def test_atlas_of_four_ellipses_converges_to_their_mean(tmp_path, dask_client):
    """Four ellipses with semi-axes (1 or 1.4) x (0.5 or 0.9), sampled at shifted angles: the
    template starts as the first and settles on the ellipse of the mean axes (1.2, 0.7), the
    change per iteration falling."""
    subjects = [sf.PointCloud(_ellipse(a, b, phase=0.05 * i)) for i, (a, b) in enumerate(AXES)]
    atlas = sf.build_atlas(subjects, client=dask_client, iterations=3, loss="chamfer", progress=False)
    assert len(atlas.templates) == 4 and len(atlas.change) == 3
    assert atlas.change[1] < 0.5 * atlas.change[0] and atlas.change[2] < 0.25 * atlas.change[0]
    mean = _ellipse(1.2, 0.7, 2000)
    before, after = (_chamfer(t.points.double().numpy(), mean) for t in (atlas.templates[0], atlas.template))
    assert after < 0.2 * before and after < 0.04
    # each subject's map carries the template onto it
    for subject, phi in zip(subjects, atlas.deformations):
        moved = phi(atlas.templates[-2].points.double().numpy())
        assert _chamfer(moved, subject.points.double().numpy()) < 0.05
    atlas.save(tmp_path / "atlas")
    assert sorted(p.name for p in (tmp_path / "atlas").iterdir()) == ["atlas.gif", "history.csv", "subjects",
                                                                     "template.csv"]
    rows = list(csv.DictReader(open(tmp_path / "atlas" / "history.csv")))
    assert [float(r["change"]) for r in rows] == pytest.approx(atlas.change, rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "atlas" / "subjects" / "subject2").iterdir()) == \
        ["deformation.pt", "report.json"]
    np.testing.assert_allclose(sf.read(tmp_path / "atlas" / "template.csv").points.double().numpy(),
                               atlas.template.points.double().numpy(), atol=1e-6)


def test_mesh_template_starts_from_the_vertex_mean(dask_client):
    """Meshes of one topology: the first template is the vertex mean; with corresponding points
    (loss l2, affine maps) every subject is fitted exactly, so one update leaves it in place."""
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=float)
    faces = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 4]])
    scales = [0.8, 1.0, 1.2]
    subjects = [sf.Mesh(vertices * s + 0.1 * i, faces) for i, s in enumerate(scales)]
    atlas = sf.build_atlas(subjects, client=dask_client, iterations=1, model="affine", loss="l2", progress=False)
    np.testing.assert_allclose(atlas.templates[0].points.double().numpy(), vertices * 1.0 + 0.1, atol=1e-6)
    assert atlas.change[0] < 1e-4
    assert isinstance(atlas.template, sf.Mesh)


def test_atlas_refuses_bad_input():
    with pytest.raises(sf.ShapeflowError, match="at least 2 shapes"):
        sf.build_atlas([np.zeros((3, 2))], iterations=1)
    with pytest.raises(sf.ShapeflowError, match="iterations must be an int >= 1"):
        sf.build_atlas([np.zeros((3, 2))] * 2, iterations=0)


def _disk(shift: float, size: int = 24) -> np.ndarray:
    y, x = np.mgrid[:size, :size].astype(float)
    return (np.hypot(y - size / 2 - shift, x - size / 2 + shift) < 6).astype(np.float32)


def test_image_atlas_sharpens_the_voxel_mean(dask_client):
    """Disks shifted by -2, 0, +2 voxels (diagonally): the voxel mean is a blurred disk; the atlas
    moves each subject onto the template, and the template's mean stays a disk at the centre,
    closer to the centred disk than the plain voxel mean."""
    subjects = [sf.Image(torch.from_numpy(_disk(s))[None]) for s in (-2.0, 0.0, 2.0)]
    atlas = sf.build_atlas(subjects, client=dask_client, iterations=2, model="displacement", prealign=None,
                           progress=False)
    centred = _disk(0.0)
    first = atlas.templates[0].data[0].numpy()
    np.testing.assert_allclose(first, np.mean([_disk(s) for s in (-2.0, 0.0, 2.0)], axis=0), atol=1e-6)
    error = [float(np.abs(t.data[0].numpy() - centred).mean()) for t in atlas.templates]
    assert error[-1] < 0.6 * error[0]
    assert atlas.change[-1] < atlas.change[0]
    assert isinstance(atlas.template, sf.Image) and atlas.template.data.shape == (1, 24, 24)
