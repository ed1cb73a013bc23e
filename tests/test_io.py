import numpy as np
import pytest
import torch

import shapeflow as sf

MESH_FORMATS = [".ply", ".obj", ".stl", ".off", ".vtk", ".vtp"]
TABLE_FORMATS = [".xyz", ".txt", ".csv", ".npy"]


def _triangles(mesh):
    """The set of triangles as sorted coordinate tuples: independent of vertex numbering."""
    tri = mesh.points[mesh.faces].numpy().round(4)
    return sorted(tuple(sorted(map(tuple, t))) for t in tri)


@pytest.mark.parametrize("suffix", MESH_FORMATS)
def test_mesh_round_trip(ant, tmp_path, suffix):
    path = sf.write(ant, tmp_path / f"ant{suffix}")
    back = sf.read(path)
    assert isinstance(back, sf.Mesh)
    assert back.faces.shape == ant.faces.shape
    if suffix == ".stl":  # triangle soup: vertices are re-merged, possibly renumbered
        assert _triangles(back) == _triangles(ant)
    else:
        torch.testing.assert_close(back.points, ant.points, atol=1e-4, rtol=0)
        assert torch.equal(back.faces, ant.faces)


CLOUD_CASES = [(s, d) for s in TABLE_FORMATS + [".ply", ".vtk", ".vtp"] for d in (2, 3)
               if not (d == 2 and s == ".ply")]  # PLY holds 3D points only (writing 2D raises, tested below)


@pytest.mark.parametrize("suffix, dim", CLOUD_CASES)
def test_point_cloud_round_trip(tmp_path, suffix, dim):
    points = torch.rand(50, dim) * 10 - 5
    back = sf.read(sf.write(sf.PointCloud(points), tmp_path / f"cloud{suffix}"))
    assert type(back) is sf.PointCloud
    torch.testing.assert_close(back.points[:, :dim], points, atol=1e-5, rtol=0)


def test_csv_with_header_and_landmarks(tmp_path):
    path = tmp_path / "marks.csv"
    path.write_text("x,y,z\n1,2,3\n4,5,6\n")
    marks = sf.read(path, kind="landmarks")
    assert isinstance(marks, sf.Landmarks) and marks.points.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_real_surface_from_nilearn_reads_as_mesh(tmp_path):
    pytest.importorskip("nilearn")
    from nilearn import datasets, surface

    mesh = surface.load_surf_mesh(datasets.fetch_surf_fsaverage("fsaverage5").white_left)
    shape = sf.Mesh(np.asarray(mesh.coordinates), faces=np.asarray(mesh.faces))
    back = sf.read(sf.write(shape, tmp_path / "white.ply"))
    assert back.points.shape == (10242, 3) and torch.equal(back.faces, shape.faces)


@pytest.mark.parametrize("name, content, message", [
    ("missing.ply", None, "no such file"),
    ("shape.abc", b"1 2 3", "unknown extension '.abc'"),
    ("empty.csv", b"", "the file is empty"),
    ("garbage.ply", b"this is not a ply file at all", "unreadable .ply file"),
    ("words.csv", b"a,b,c\nd,e,f\n", "unreadable .csv file"),
    ("one.csv", b"1,2,3\n", "1 point"),
    ("nan.csv", b"1,2,3\nnan,2,3\n", "NaN"),
    ("four.csv", b"1,2,3,4\n5,6,7,8\n", "4 coordinates"),
])
def test_bad_files_give_one_line_errors_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(sf.ShapeflowError) as info:
        sf.read(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


PLY_HEADER = ("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
              "element face 1\nproperty list uchar int vertex_indices\nend_header\n0 0 0\n1 0 0\n0 1 0\n")


@pytest.mark.parametrize("name, text", [("bad.off", "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 5\n"),
                                        ("bad.ply", PLY_HEADER + "3 0 1 5\n")])
def test_faces_past_the_vertices_are_rejected(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(sf.ShapeflowError, match="faces index vertex 5 but the mesh has only 3 vertices|"
                                                "face index outside the range of its vertices") as info:
        sf.read(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_write_is_atomic_and_never_overwrites_the_input(ant, tmp_path):
    path = sf.write(ant, tmp_path / "a.ply")
    source = sf.read(path)
    before = path.read_bytes()
    with pytest.raises(sf.ShapeflowError, match="refusing to overwrite"):
        sf.write(source, path)
    assert path.read_bytes() == before
    with pytest.raises(sf.ShapeflowError, match="3D points"):
        sf.write(sf.PointCloud(torch.rand(5, 2)), tmp_path / "flat.ply")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ply"]   # no temporary left behind
