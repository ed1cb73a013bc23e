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
        torch.testing.assert_close(back.points, ant.points, atol=1e-4, rtol=0, check_dtype=False)
        assert torch.equal(back.faces, ant.faces)
    # float32 as stored in binary files, float64 from text
    assert back.points.dtype == (torch.float64 if suffix in (".obj", ".off") else torch.float32)


CLOUD_CASES = [(s, d) for s in TABLE_FORMATS + [".ply", ".vtk", ".vtp"] for d in (2, 3)
               if not (d == 2 and s == ".ply")]  # PLY holds 3D points only (writing 2D raises, tested below)


@pytest.mark.parametrize("suffix, dim", CLOUD_CASES)
def test_point_cloud_round_trip(tmp_path, suffix, dim):
    points = torch.rand(50, dim) * 10 - 5
    back = sf.read(sf.write(sf.PointCloud(points), tmp_path / f"cloud{suffix}"))
    text = suffix in (".xyz", ".txt", ".csv")
    assert type(back) is sf.PointCloud and back.points.dtype == (torch.float64 if text else torch.float32)
    # binary formats give the float32 values back exactly; text writes the 9 digits that identify them
    torch.testing.assert_close(back.points[:, :dim], points.double(), atol=1e-8 if text else 0.0, rtol=0,
                               check_dtype=False)


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


# --- nothing dropped or changed without notice (issue 17, items 4, 7 and 8) -------------------------

def _pyvista_example(name):
    """A file shipped inside pyvista's package (no download)."""
    import pyvista.examples

    from pathlib import Path

    return Path(pyvista.examples.__file__).parent / name


def _nibabel_file(name):
    import os

    import nibabel.testing

    return os.path.join(nibabel.testing.data_path, name)


def _one_line(info, path):
    text = str(info.value)
    assert str(path) in text and "\n" not in text
    return text


@pytest.mark.parametrize("name, volumes", [("example4d.nii.gz", 2), ("functional.nii", 20)])
def test_a_4d_nifti_time_series_is_refused_not_read_as_channels(name, volumes):
    path = _nibabel_file(name)
    with pytest.raises(sf.ShapeflowError) as info:
        sf.read(path)
    text = _one_line(info, path)
    assert f"4D NIfTI time series ({volumes} volumes" in text and "register one volume" in text


def test_a_4d_stack_without_time_and_a_vector_image_are_channels_and_keep_their_header(tmp_path):
    import nibabel as nib

    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    volumes = np.random.default_rng(0).random((5, 6, 7, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(volumes, affine), str(tmp_path / "stack.nii.gz"))        # no time unit, pixdim[4] = 1
    stack = sf.read(tmp_path / "stack.nii.gz")
    assert stack.data.shape == (3, 5, 6, 7) and stack.spacing.tolist() == [2, 3, 4]
    out = nib.load(str(sf.write(stack, tmp_path / "back.nii.gz")))
    assert out.shape == (5, 6, 7, 3) and out.header.get_xyzt_units() == ("mm", "unknown")
    assert float(out.header["pixdim"][4]) in (0.0, 1.0)                                  # no time step invented
    np.testing.assert_array_equal(out.get_fdata(dtype=np.float32), volumes)
    assert torch.equal(sf.read(tmp_path / "back.nii.gz").data, stack.data)               # still channels
    # a vector image: 5D with one time point, or 4D with a vector intent even when a time unit is set
    vector = nib.Nifti1Image(volumes[:, :, :, None], affine)
    vector.header.set_intent("vector")
    nib.save(vector, str(tmp_path / "vector.nii.gz"))
    assert sf.read(tmp_path / "vector.nii.gz").data.shape == (3, 5, 6, 7)
    tagged = nib.Nifti1Image(volumes, affine)
    tagged.header.set_xyzt_units("mm", "sec")
    tagged.header.set_intent("vector")
    nib.save(tagged, str(tmp_path / "tagged.nii.gz"))
    assert sf.read(tmp_path / "tagged.nii.gz").data.shape == (3, 5, 6, 7)
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7, 4, 3), np.float32), affine), str(tmp_path / "series5d.nii.gz"))
    with pytest.raises(sf.ShapeflowError, match="5D NIfTI with 4 time points of 3 components"):
        sf.read(tmp_path / "series5d.nii.gz")
    # a 2D multi-channel image keeps its channels through NIfTI
    picture = sf.Image(torch.rand(2, 5, 6), spacing=[0.5, 2.0])
    back = sf.read(sf.write(picture, tmp_path / "two.nii.gz"))
    assert back.dim == 2 and torch.equal(back.data, picture.data)


def _coloured_sphere(tmp_path):
    """pyvista's sphere.ply with per-vertex normals and colours, as VTK's PLY writer saves them."""
    import pyvista as pv

    sphere = pv.read(_pyvista_example("sphere.ply")).compute_normals(split_vertices=False, consistent_normals=False)
    rgb = (np.random.default_rng(1).random((sphere.n_points, 3)) * 255).astype(np.uint8)
    sphere.point_data["RGB"] = rgb
    sphere.save(str(tmp_path / "sphere.ply"), texture="RGB")
    return tmp_path / "sphere.ply", np.asarray(sphere.point_normals), rgb


def test_ply_keeps_colours_normals_and_scalars(tmp_path):
    path, normals, rgb = _coloured_sphere(tmp_path)
    mesh = sf.read(path)
    assert sorted(mesh.point_data) == ["colors", "normals"]
    np.testing.assert_array_equal(mesh.point_data["colors"], rgb)
    cosine = (mesh.point_data["normals"] * normals).sum(1)          # recomputed from the faces: the file's
    assert cosine.min() > 0.99
    mesh.point_data["quality"] = np.arange(len(mesh), dtype=np.float32)
    back = sf.read(sf.write(mesh, tmp_path / "back.ply"))
    assert sorted(back.point_data) == ["colors", "normals", "quality"]
    for key in ("colors", "quality"):
        np.testing.assert_array_equal(back.point_data[key], mesh.point_data[key])
        assert back.point_data[key].dtype == mesh.point_data[key].dtype
    assert torch.equal(back.points, mesh.points) and torch.equal(back.faces, mesh.faces)
    # .vtk and .vtp hold them too; .stl cannot, and says so
    for suffix in (".vtk", ".vtp"):
        again = sf.read(sf.write(back, tmp_path / f"back{suffix}"))
        np.testing.assert_array_equal(again.point_data["colors"], rgb)
    with pytest.raises(sf.ShapeflowError) as info:
        sf.write(back, tmp_path / "back.stl")
    assert "cannot hold the point_data 'colors', 'quality'" in _one_line(info, tmp_path / "back.stl")
    assert not (tmp_path / "back.stl").exists()


def test_normals_follow_the_deformation_and_colours_travel_unchanged(tmp_path):
    import dataclasses

    path, _, rgb = _coloured_sphere(tmp_path)
    mesh = sf.read(path)
    turn = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=mesh.points.dtype)
    for moved in (mesh.with_points(mesh.points @ turn.T),
                  dataclasses.replace(mesh, points=mesh.points @ turn.T, source=None)):   # as register builds it
        np.testing.assert_allclose(moved.point_data["normals"], mesh.point_data["normals"] @ turn.numpy().T,
                                   atol=1e-6)
        np.testing.assert_array_equal(moved.point_data["colors"], rgb)
        back = sf.read(sf.write(moved, tmp_path / "moved.ply", overwrite=True))
        np.testing.assert_allclose(back.point_data["normals"], moved.point_data["normals"], atol=1e-6)
    # a point cloud's normals cannot be recomputed: a moved cloud drops them, and keeps its colours
    cloud = sf.read(path, kind="points")
    assert "normals" in cloud.point_data
    moved = cloud.with_points(cloud.points @ turn.T)
    assert sorted(moved.point_data) == ["colors"]


def test_warped_point_cloud_is_written_without_stale_normals(tmp_path):
    path, _, rgb = _coloured_sphere(tmp_path)
    cloud = sf.read(path, kind="points")
    sf.write(cloud, tmp_path / "cloud.ply")
    target = sf.PointCloud(cloud.points + torch.tensor([0.05, 0.0, 0.0], dtype=torch.float64))
    result = sf.register(sf.read(tmp_path / "cloud.ply"), target, model="rigid", progress=False, iterations=5)
    result.save(tmp_path / "out")
    warped = sf.read(tmp_path / "out" / "warped.ply")
    assert sorted(warped.point_data) == ["colors"]
    np.testing.assert_array_equal(warped.point_data["colors"], rgb)


QUADS_AND_TRIANGLES = ("ply\nformat ascii 1.0\nelement vertex 5\nproperty double x\nproperty double y\n"
                       "property double z\nproperty float quality\nelement face 2\n"
                       "property list uchar int vertex_indices\nproperty uchar label\nend_header\n"
                       "0 0 0 1\n1 0 0 2\n1 1 0 3\n0 1 0 4\n2 0.5 0.25 5\n4 0 1 2 3 7\n3 1 4 2 9\n")


@pytest.mark.parametrize("suffix", [".ply", ".obj", ".off", ".vtk", ".vtp"])
def test_quads_are_registered_as_triangles_and_written_as_quads(tmp_path, suffix):
    import pyvista as pv

    surface = pv.read(_pyvista_example("hexbeam.vtk")).extract_surface(pass_pointid=False, pass_cellid=False,
                                                                  algorithm="dataset_surface")
    surface.clear_data()
    polygons = np.asarray(surface.faces)
    assert (polygons.reshape(-1, 5)[:, 0] == 4).all()                        # the beam's surface: all quads
    mesh = sf.read(sf.write(sf.Mesh(np.asarray(surface.points), polygons=polygons), tmp_path / f"beam{suffix}"))
    assert mesh.faces.shape == (2 * surface.n_cells, 3)                       # each quad split in two
    np.testing.assert_array_equal(mesh.polygons, polygons)
    moved = mesh.with_points(mesh.points * 2 + 1)
    path = sf.write(moved, tmp_path / f"moved{suffix}")
    if suffix == ".off":                                                      # pyvista does not read OFF
        lines = path.read_text().splitlines()
        faces = np.array([line.split() for line in lines[2 + len(mesh):]], dtype=np.int64)
        np.testing.assert_array_equal(faces.ravel(), polygons)
        return
    written = pv.read(str(path))
    np.testing.assert_array_equal(np.asarray(written.faces), polygons)        # the quads, not triangles
    np.testing.assert_allclose(np.asarray(written.points), moved.points.numpy())


def test_mixed_polygons_and_face_data_round_trip(tmp_path):
    (tmp_path / "mixed.ply").write_text(QUADS_AND_TRIANGLES)
    mesh = sf.read(tmp_path / "mixed.ply")
    assert mesh.polygons.tolist() == [4, 0, 1, 2, 3, 3, 1, 4, 2]
    assert mesh.faces.tolist() == [[0, 1, 2], [0, 2, 3], [1, 4, 2]]
    assert mesh.cell_data["label"].tolist() == [7, 9] and mesh.point_data["quality"].tolist() == [1, 2, 3, 4, 5]
    for suffix in (".ply", ".vtk", ".vtp"):
        back = sf.read(sf.write(mesh, tmp_path / f"back{suffix}"))
        assert back.polygons.tolist() == mesh.polygons.tolist()
        assert back.cell_data["label"].tolist() == [7, 9] and back.point_data["quality"].tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(sf.ShapeflowError, match="cannot hold the point_data 'quality'"):
        sf.write(mesh, tmp_path / "back.obj")
    # faces that are not the polygons' triangulation are an error, not a silent mismatch
    with pytest.raises(sf.ShapeflowError, match="faces are not the triangulation of polygons"):
        sf.Mesh(mesh.points, torch.tensor([[0, 1, 2]]), polygons=mesh.polygons)


def test_off_and_obj_keep_colours(tmp_path):
    (tmp_path / "c.off").write_text("COFF\n4 2 0\n0 0 0 255 0 0\n1 0 0 0 255 0\n1 1 0 0 0 255\n0 1 0 9 9 9\n"
                                    "3 0 1 2 0.5 0.5 0.5\n3 0 2 3 1 1 1\n")
    mesh = sf.read(tmp_path / "c.off")
    assert mesh.point_data["colors"][:, 0].tolist() == [255, 0, 0, 9]
    assert mesh.cell_data["colors"].tolist() == [[0.5, 0.5, 0.5], [1, 1, 1]]
    back = sf.read(sf.write(mesh, tmp_path / "back.off"))
    np.testing.assert_array_equal(back.point_data["colors"], mesh.point_data["colors"])
    np.testing.assert_array_equal(back.cell_data["colors"], mesh.cell_data["colors"])
    (tmp_path / "c.obj").write_text("v 0 0 0 1 0 0\nv 1 0 0 0 1 0\nv 1 1 0 0 0 1\nv 0 1 0 1 1 1\nvt 0 0\n"
                                    "f 1/1 2/1 3/1 4/1\n")
    quad = sf.read(tmp_path / "c.obj")
    assert quad.polygons.tolist() == [4, 0, 1, 2, 3] and quad.point_data["colors"].shape == (4, 3)
    again = sf.read(sf.write(quad, tmp_path / "back.obj"))
    np.testing.assert_array_equal(again.point_data["colors"], quad.point_data["colors"])
    assert again.polygons.tolist() == [4, 0, 1, 2, 3]


def test_vtk_image_data_is_read_as_an_image_not_a_mesh(tmp_path):
    import pyvista as pv

    path = _pyvista_example("uniform.vtk")            # ImageData with a point and a cell array
    with pytest.raises(sf.ShapeflowError) as info:
        sf.read(path)
    assert "a VTK image (ImageData) with 2 data arrays" in _one_line(info, path)
    grid = pv.read(str(path))
    grid.cell_data.remove("Spatial Cell Data")
    grid.spacing, grid.origin = (0.5, 1.0, 2.0), (10.0, -5.0, 3.0)
    for suffix in (".vtk", ".vti"):
        grid.save(str(tmp_path / f"one{suffix}"))
        image = sf.read(tmp_path / f"one{suffix}")
        assert isinstance(image, sf.Image) and image.data.shape == (1, 10, 10, 10)
        assert image.spacing.tolist() == [0.5, 1.0, 2.0] and image.origin.tolist() == [10.0, -5.0, 3.0]
        values = np.asarray(grid.point_data["Spatial Point Data"])
        i, j, k = 3, 5, 7                                  # x varies fastest in VTK's arrays
        assert float(image.data[0, i, j, k]) == pytest.approx(values[i + 10 * j + 100 * k])
        with pytest.raises(sf.ShapeflowError, match="not a mesh|cannot be read as mesh"):
            sf.read(tmp_path / f"one{suffix}", kind="mesh")
        back = sf.read(sf.write(image, tmp_path / f"back{suffix}"))
        assert torch.equal(back.data, image.data) and torch.equal(back.index_to_world, image.index_to_world)
    turned = sf.Image(torch.rand(1, 4, 5, 6), direction=[[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    back = sf.read(sf.write(turned, tmp_path / "turned.vti"))
    torch.testing.assert_close(back.index_to_world, turned.index_to_world)
    with pytest.raises(sf.ShapeflowError, match="legacy .vtk image cannot hold a direction"):
        sf.write(turned, tmp_path / "turned.vtk")


def test_volume_meshes_and_other_grids_are_refused(tmp_path):
    for name, message in [("hexbeam.vtk", "unstructured grid with HEXAHEDRON cells, not a surface"),
                          ("rectilinear.vtk", "a VTK RectilinearGrid")]:
        path = _pyvista_example(name)
        with pytest.raises(sf.ShapeflowError) as info:
            sf.read(path)
        assert message in _one_line(info, path)


def test_csv_header_and_extra_columns_round_trip(assets, tmp_path):
    horse = sf.read(assets / "horse_contour.csv")
    assert horse.columns == ("x", "y") and horse.points.shape[1] == 2
    moved = horse.with_points(horse.points + 0.5)
    path = sf.write(moved, tmp_path / "moved.csv")
    assert path.read_text().splitlines()[0] == "x,y"
    torch.testing.assert_close(sf.read(path).points, moved.points, atol=0, rtol=0)
    (tmp_path / "marks.csv").write_text("label,Z,Y,X\n1,3,2,1\n2,6,5,4\n")
    marks = sf.read(tmp_path / "marks.csv", kind="landmarks")
    assert marks.points.tolist() == [[1, 2, 3], [4, 5, 6]] and marks.point_data["label"].tolist() == [1, 2]
    back = sf.write(marks.with_points(marks.points + 10), tmp_path / "back.csv")
    assert back.read_text().splitlines() == ["label,Z,Y,X", "1,13,12,11", "2,16,15,14"]
    (tmp_path / "bad.csv").write_text("x,y,z\n1,2\n3,4\n")
    with pytest.raises(sf.ShapeflowError, match="the header names 3 columns but the rows have 2"):
        sf.read(tmp_path / "bad.csv")


@pytest.mark.parametrize("suffix", [".csv", ".txt", ".xyz", ".npy", ".ply", ".vtk", ".vtp"])
def test_coordinates_far_from_the_origin_keep_full_precision(tmp_path, suffix):
    points = np.random.default_rng(0).random((200, 3)) + 1e6       # unit size, 1e6 from the origin
    back = sf.read(sf.write(sf.PointCloud(points), tmp_path / f"far{suffix}"))
    assert back.points.dtype == torch.float64
    np.testing.assert_array_equal(back.points.numpy(), points)


def test_mesh_formats_keep_full_precision(ant, tmp_path):
    far = ant.with_points(ant.points.double() / 100 + 1e6)
    for suffix in (".ply", ".obj", ".off", ".vtk", ".vtp"):
        back = sf.read(sf.write(far, tmp_path / f"far{suffix}"))
        np.testing.assert_array_equal(back.points.numpy(), far.points.numpy())


def test_a_rigid_registration_far_from_the_origin_keeps_every_distinct_coordinate(tmp_path):
    points = np.random.default_rng(0).random((200, 3)) + 1e6
    sf.write(sf.PointCloud(points), tmp_path / "a.csv")
    sf.write(sf.PointCloud(points + [0.01, 0.0, 0.0]), tmp_path / "b.csv")
    result = sf.register(tmp_path / "a.csv", tmp_path / "b.csv", model="rigid", progress=False)
    result.save(tmp_path / "out")
    warped = sf.read(tmp_path / "out" / "warped.csv").points.numpy()
    assert len(np.unique(warped[:, 0])) == 200
    assert np.abs(warped - (points + [0.01, 0.0, 0.0])).max() < 1e-3


@pytest.mark.parametrize("model", ["rigid", "affine", "resnet"])
def test_the_saved_deformation_keeps_world_coordinates_far_from_the_origin(tmp_path, model):
    """Fitted in float32, the map in world units keeps its offsets in float64: applied to the
    source at 1e6 (NumPy float64 in, after a save/load round trip too) it reproduces `warped`
    and keeps every distinct coordinate (float32 at 1e6 has a step of 0.0625)."""
    rng = np.random.default_rng(0)
    points = rng.random((200, 3)) + 1e6
    target = points + [0.01, 0.0, 0.0]
    result = sf.register(points, target, model=model, iterations=20, progress=False)
    assert result.deformation.dtype == (torch.float32 if model == "resnet" else torch.float64)
    moved = result.deformation(points)
    assert moved.dtype == np.float64 and len(np.unique(moved[:, 0])) == 200
    np.testing.assert_allclose(moved, result.warped, rtol=0, atol=1e-6)
    assert np.abs(moved - target).max() < 0.05
    loaded = sf.load_deformation(result.deformation.save(tmp_path / "phi.pt"))
    np.testing.assert_allclose(loaded(points), moved, rtol=0, atol=1e-9)
    back = result.deformation.inverse(moved) if model != "resnet" else None
    if back is not None:
        np.testing.assert_allclose(back, points, rtol=0, atol=1e-6)


def test_write_refuses_an_existing_file_unless_overwrite(ant, tmp_path):
    path = sf.write(ant, tmp_path / "a.ply")
    before = path.read_bytes()
    with pytest.raises(sf.ShapeflowError) as info:
        sf.write(ant, path)
    assert "exists; pass overwrite=True" in _one_line(info, path) and path.read_bytes() == before
    moved = ant.with_points(ant.points + 1)
    sf.write(moved, path, overwrite=True)
    assert torch.equal(sf.read(path).points, moved.points)
    with pytest.raises(sf.ShapeflowError, match="refusing to overwrite the file this shape was read from"):
        sf.write(sf.read(path), path, overwrite=True)
