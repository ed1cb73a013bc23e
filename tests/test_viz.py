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


def _bright_in_panel(rgb):
    """The bright block's centroid in a rendered panel `(H, W, 3)`, relative to the grey picture's
    box (0 = top/left, 1 = bottom/right), and the box's (height, width)."""
    grey = rgb.mean(-1)
    picture = np.abs(grey - 100) < 20
    rows = np.flatnonzero(picture.sum(1) > 0.3 * picture.sum(1).max())     # not the title's anti-aliasing
    cols = np.flatnonzero(picture.sum(0) > 0.3 * picture.sum(0).max())
    inside = grey[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    r, c = np.nonzero(inside > 230)
    return (r.mean() / inside.shape[0], c.mean() / inside.shape[1]), inside.shape


def test_3d_middle_slices_keep_x_right_y_up_and_gifs_have_the_frames(tmp_path):
    """A 3D volume's middle slice is drawn with axis 0 (x) to the right and axis 1 (y) up; the
    animation of an image registration has exactly the frames asked for."""
    import scipy.ndimage as ndi

    volume = np.full((28, 18, 10), 100.0)
    volume[18:26, 2:7, :] = 250.0                                    # high x, low y: bottom right
    volume[2:8, 11:16, :] = 0.0                                      # low x, high y (sets the display range)
    fixed = sf.Image(ndi.gaussian_filter(volume, 0.7)[None])
    moving = sf.Image(ndi.shift(fixed.data[0].numpy(), (1.0, 0.5, 0), order=1, mode="nearest")[None])
    result = sf.register(moving, fixed, iterations=2, progress=False)
    overlay = imageio.imread(sf.viz.overlay(result, tmp_path / "overlay.png"))[..., :3]
    (row, col), (height, width) = _bright_in_panel(overlay[:, : overlay.shape[1] // 4])
    assert row > 0.6 and col > 0.6 and width > 1.2 * height
    for count in (2, 5, 3 * len(result.snapshots)):
        frames = imageio.mimread(sf.viz.animate(result, tmp_path / f"f{count}.gif", frames=count))
        assert len(frames) == count
    (row, col), _ = _bright_in_panel(frames[-1][:, frames[-1].shape[1] // 3: 2 * frames[-1].shape[1] // 3])
    assert row > 0.6 and col > 0.6
