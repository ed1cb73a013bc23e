import numpy as np
import pytest
import torch

import shapeflow as sf


def test_point_cloud_accepts_arrays_and_lists():
    cloud = sf.PointCloud(np.zeros((4, 2)))
    assert cloud.points.shape == (4, 2) and cloud.dim == 2 and len(cloud) == 4
    assert sf.PointCloud([[0, 0, 0], [1, 1, 1]]).points.dtype.is_floating_point


@pytest.mark.parametrize("points, message", [
    (np.zeros((0, 3)), "empty"),
    (np.zeros((1, 3)), "1 point"),
    (np.zeros((5, 4)), "4 coordinates"),
    (np.zeros(5), "(N, d)"),
    (np.array([[0, 0, 0], [np.nan, 0, 0]]), "NaN"),
    (np.array([[0, 0, 0], [np.inf, 0, 0]]), "infinite"),
])
def test_bad_points_give_one_line_errors(points, message):
    with pytest.raises(sf.ShapeflowError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        sf.PointCloud(points, source="cloud.csv")
    assert "\n" not in str(info.value) and str(info.value).startswith("cloud.csv: ")


def test_mesh_checks_faces():
    vertices = torch.rand(4, 3)
    with pytest.raises(sf.ShapeflowError, match="faces index vertex 7"):
        sf.Mesh(vertices, faces=torch.tensor([[0, 1, 7]]))
    with pytest.raises(sf.ShapeflowError, match="negative"):
        sf.Mesh(vertices, faces=torch.tensor([[0, 1, -1]]))
    with pytest.raises(sf.ShapeflowError, match="2 coordinates per point; expected 3"):
        sf.Mesh(torch.rand(4, 2), faces=torch.tensor([[0, 1, 2]]))
    mesh = sf.Mesh(vertices, faces=np.array([[0, 1, 2], [0, 2, 3]]))
    assert mesh.faces.dtype == torch.long and mesh.vertices is mesh.points


def test_landmarks_allow_a_single_point():
    assert len(sf.Landmarks(np.zeros((1, 3)))) == 1


def test_mesh_takes_its_faces_as_the_second_argument(ant):
    """`sf.Mesh(vertices, faces)` as the README writes it: the faces are not mistaken for `source`."""
    mesh = sf.Mesh(ant.points, ant.faces)
    assert mesh.faces.shape == ant.faces.shape and mesh.source is None
    with pytest.raises(TypeError):
        sf.PointCloud(ant.points, "name.ply")          # source is keyword-only
