import imageio.v2 as imageio
import numpy as np
import pytest

import shapeflow as sf


@pytest.fixture(scope="module")
def contour_result():
    from pathlib import Path

    assets = Path(__file__).resolve().parents[1] / "assets"
    return sf.register(sf.read(assets / "horse_contour.csv"), sf.read(assets / "horse_contour_deformed.csv"),
                       loss="chamfer", iterations=40, progress=False)


def test_2d_animation_has_the_frames_and_moves(contour_result, tmp_path):
    path = sf.viz.animate(contour_result, tmp_path / "flow.gif", frames=6, fps=4)
    frames = imageio.mimread(path)
    assert len(frames) == 6
    assert np.abs(frames[0].astype(int) - frames[5].astype(int)).mean() > 0.5


def test_3d_animation_renders_offscreen(ant, tmp_path):
    from shapeflow.synthetic import smooth_deformation

    target = sf.Mesh(smooth_deformation(ant.points, 0.05, seed=1), faces=ant.faces)
    result = sf.register(ant, target, loss="chamfer", iterations=15, progress=False)
    frames = imageio.mimread(sf.viz.animate(result, tmp_path / "ant.gif", frames=4, fps=2))
    assert len(frames) == 4 and frames[0].shape[2] == 3
    assert (frames[0] < 200).any(axis=2).mean() > 0.02           # something was drawn on white
    assert np.abs(frames[0].astype(int) - frames[3].astype(int)).mean() > 0.1


def test_convergence_plot(contour_result, tmp_path):
    path = sf.viz.plot_history(contour_result, tmp_path / "loss.png")
    assert imageio.imread(path).shape[0] > 100


def test_animation_rejects_other_formats(contour_result, tmp_path):
    with pytest.raises(sf.ShapeflowError, match=".gif or .mp4"):
        sf.viz.animate(contour_result, tmp_path / "flow.png")
