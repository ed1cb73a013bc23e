"""Pictures of registrations: the source flowing into the target as an animated GIF (or MP4),
and convergence plots. PyVista renders 3D offscreen; matplotlib draws 2D."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ._files import atomic_write
from ._optional import import_optional
from .errors import ShapeflowError
from .shapes import Image, Mesh, PointCloud

__all__ = ["animate", "animate_sequence", "plot_history", "render_frames", "overlay", "checkerboard"]


@contextmanager
def _headless_vtk() -> Iterator[None]:
    """Without a display, VTK renders through EGL: `VTK_DEFAULT_OPENGL_WINDOW` is set for the
    duration of our own rendering only (unless the user set it), then restored."""
    name = "VTK_DEFAULT_OPENGL_WINDOW"
    if os.environ.get("DISPLAY") or name in os.environ:
        yield
        return
    os.environ[name] = "vtkEGLRenderWindow"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def render_frames(result: Any, frames: int = 24, size: tuple[int, int] = (480, 400)) -> list[np.ndarray]:
    """RGB images `(H, W, 3)` of the source at `frames` times from t = 0 to 1, target as a ghost."""
    if frames < 2:
        raise ShapeflowError(f"animate(): frames must be at least 2, got {frames}")
    if isinstance(result.warped, Image):
        return _image_frames(result, frames, size)
    source, target = result.source, result.target
    if not isinstance(source, PointCloud) or not isinstance(target, PointCloud):
        raise ShapeflowError("animate(): the result does not hold its source and target shapes")
    points = source.points.to(result.deformation.device, result.deformation.dtype)
    with torch.no_grad():
        path = result.deformation.trajectory(points, frames - 1).cpu().double().numpy()   # (T, N, d)
    if source.dim == 2:
        return _frames_2d(path, target.points.double().numpy(), size)
    return _frames_3d(path, source, target, size)


def animate(result: Any, path: str | os.PathLike, frames: int = 24, fps: int = 12) -> Path:
    """Write the flow of `result` (from `register`) as an animated GIF (or .mp4) at `path`."""
    path = Path(path)
    if path.suffix.lower() not in (".gif", ".mp4"):
        raise ShapeflowError(f"{path}: animations are written as .gif or .mp4")
    images = render_frames(result, frames)
    import imageio.v2 as imageio

    def write(tmp: Path) -> None:
        if path.suffix.lower() == ".gif":  # hold the last frame for an extra second
            durations = [1000 / fps] * (len(images) - 1) + [1000 / fps + 1000]
            imageio.mimsave(tmp, images, format="GIF", duration=durations, loop=0)
        else:
            imageio.mimsave(tmp, images + [images[-1]] * fps, fps=fps)

    atomic_write(path, write)
    return path


def _frames_3d(path: np.ndarray, source: PointCloud, target: PointCloud, size, titles=None) -> list[np.ndarray]:
    with _headless_vtk():
        return _render_3d(import_optional("pyvista", "3D renderings"), path, source, target, size, titles)


def _render_3d(pv, path: np.ndarray, source: PointCloud, target: PointCloud, size, titles=None) -> list[np.ndarray]:

    def poly(points, shape):
        if isinstance(shape, Mesh):
            faces = shape.faces.cpu().numpy()
            return pv.PolyData(points, np.c_[np.full(len(faces), 3), faces].ravel())
        return pv.PolyData(points)

    plotter = pv.Plotter(off_screen=True, window_size=list(size))
    plotter.set_background("white")
    ghost = poly(target.points.double().numpy(), target)
    moving = poly(path[0].copy(), source)
    style = {} if isinstance(source, Mesh) else {"render_points_as_spheres": True, "point_size": 6}
    plotter.add_mesh(ghost, color="#9aa5b1", opacity=0.3, **({} if isinstance(target, Mesh) else
                                                              {"render_points_as_spheres": True, "point_size": 5}))
    plotter.add_mesh(moving, color="#e4572e", smooth_shading=isinstance(source, Mesh), **style)
    everything = np.concatenate([path.reshape(-1, 3), ghost.points])
    # an oblique view from the side of the axis of largest extent, the same for every frame
    plotter.view_vector(_view_direction(everything), viewup=(0, 1, 0) if abs(_view_direction(everything)[1]) < 0.9 else (0, 0, 1))
    plotter.reset_camera(bounds=np.ravel(np.c_[everything.min(0), everything.max(0)]))
    plotter.camera.zoom(1.3)
    label = plotter.add_text("t = 0.00", font_size=10, color="black")
    images = []
    for k, frame in enumerate(path):
        moving.points = frame
        label.set_text("upper_left", titles[k] if titles else f"t = {k / (len(path) - 1):.2f}")
        plotter.render()
        images.append(plotter.screenshot(return_img=True))
    plotter.close()
    return images


def _view_direction(points: np.ndarray) -> np.ndarray:
    """A viewing direction mostly across the longest axis of `points: (N, 3)`, slightly above."""
    extent = points.max(0) - points.min(0)
    longest = int(np.argmax(extent))
    across = [a for a in range(3) if a != longest]
    direction = np.zeros(3)
    direction[across[0]], direction[across[1]], direction[longest] = 1.0, 0.5, 0.35
    return direction / np.linalg.norm(direction)


def _frames_2d(path: np.ndarray, target: np.ndarray, size, titles=None) -> list[np.ndarray]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    everything = np.concatenate([path.reshape(-1, 2), target])
    lo, hi = everything.min(0), everything.max(0)
    pad = 0.05 * (hi - lo).max()
    images = []
    for k, frame in enumerate(path):
        fig = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100)
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.scatter(target[:, 0], target[:, 1], s=6, c="#9aa5b1", alpha=0.5, label="target")
        ax.scatter(frame[:, 0], frame[:, 1], s=6, c="#e4572e", label="source")
        ax.set_xlim(lo[0] - pad, hi[0] + pad)
        ax.set_ylim(lo[1] - pad, hi[1] + pad)
        ax.set_aspect("equal")
        ax.set_title(titles[k] if titles else f"t = {k / (len(path) - 1):.2f}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=2, fontsize=7, frameon=False)
        canvas.draw()
        images.append(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    return images


def animate_sequence(items: list, path: str | os.PathLike, titles: list[str] | None = None, fps: int = 2,
                     size: tuple[int, int] = (480, 400)) -> Path:
    """Write a GIF (or .mp4) of a sequence of shapes with the same points (`PointCloud`s or
    `Mesh`es, `(N, d)` each, drawn over the last one as a grey ghost) or of `Image`s (the middle
    slice), one frame per item, e.g. an atlas template evolving over its iterations."""
    path = Path(path)
    if path.suffix.lower() not in (".gif", ".mp4"):
        raise ShapeflowError(f"{path}: animations are written as .gif or .mp4")
    if len(items) < 1:
        raise ShapeflowError("animate_sequence(): no items")
    titles = titles or [f"{k}" for k in range(len(items))]
    if isinstance(items[0], Image):
        images = _slices_frames([_middle(item.data) for item in items], items[0].dim, titles, size)
    else:
        stack = np.stack([item.points.detach().cpu().double().numpy() for item in items])    # (T, N, d)
        if stack.shape[-1] == 2:
            images = _frames_2d(stack, stack[-1], size, titles)
        else:
            images = _frames_3d(stack, items[0], items[-1], size, titles)
    import imageio.v2 as imageio

    def write(tmp: Path) -> None:
        if path.suffix.lower() == ".gif":
            imageio.mimsave(tmp, images, format="GIF", duration=[1000 / fps] * len(images), loop=0)
        else:
            imageio.mimsave(tmp, images, fps=fps)

    atomic_write(path, write)
    return path


def _slices_frames(slices: list[np.ndarray], dim: int, titles: list[str], size) -> list[np.ndarray]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lo, hi = _display_range(*slices)
    images = []
    for title, image in zip(titles, slices):
        fig = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100)
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        _show(ax, image, dim, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title, fontsize=9)
        canvas.draw()
        images.append(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    return images


def plot_history(result: Any, path: str | os.PathLike) -> Path:
    """Write a PNG of the loss terms per iteration (log scale), one line per term."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    keys = [k for k in result.history[0] if k not in ("stage", "phase", "iteration")] if result.history else []
    for key in keys:
        ax.semilogy([row[key] for row in result.history], label=key)
    ax.set_xlabel("evaluation")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


# --- images -----------------------------------------------------------------------------------
def _middle(data: torch.Tensor) -> np.ndarray:
    """The middle slice (last axis) of `(C, *S)`, channels averaged: a 2D array."""
    data = data.detach().float().mean(0)
    if data.ndim == 3:
        data = data[:, :, data.shape[2] // 2]
    return data.cpu().numpy()


def _show(ax, image: np.ndarray, dim: int, **style) -> None:
    """Draw a 2D array as a picture. A 2D image is drawn as any viewer shows a picture: axis 0
    (rows) top-down, axis 1 left to right; the middle slice of a 3D volume with its first axis
    (x) to the right and the second (y) up, the NIfTI/RAS way."""
    if dim == 2:
        ax.imshow(image, origin="upper", **style)
    else:
        ax.imshow(image.T, origin="lower", **style)
    ax.axis("off")


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Alternate square tiles of two 2D arrays of the same shape."""
    rows, cols = np.indices(a.shape)
    size = max(1, min(a.shape) // tiles)
    return np.where(((rows // size) + (cols // size)) % 2 == 0, a, b)


def _display_range(*arrays: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([a.ravel() for a in arrays])
    return float(np.percentile(values, 1)), float(np.percentile(values, 99.5))


def overlay(result: Any, path: str | os.PathLike) -> Path:
    """PNG with, on the middle slice: checkerboards of fixed/moving before and fixed/warped after,
    and the absolute differences before and after. 2D images are drawn as pictures (axis 0 as
    rows, top-down); 3D middle slices with x to the right and y up."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .grids import Grid, sample

    fixed = result.target
    points = Grid.of(fixed).points()
    before = Image(sample(result.source.data.float(), Grid.of(result.source), points), fixed.spacing, fixed.origin,
                   fixed.direction)
    f, m, w = _middle(fixed.data), _middle(before.data), _middle(result.warped.data)
    lo, hi = _display_range(f, m, w)
    panels = [("before: fixed / moving", checkerboard(f, m), "gray", (lo, hi)),
              ("after: fixed / warped", checkerboard(f, w), "gray", (lo, hi)),
              ("|fixed - moving|", np.abs(f - m), "magma", (0, hi - lo)),
              ("|fixed - warped|", np.abs(f - w), "magma", (0, hi - lo))]
    fig = Figure(figsize=(12, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for k, (title, image, cmap, (vmin, vmax)) in enumerate(panels):
        ax = fig.add_subplot(1, 4, k + 1)
        _show(ax, image, fixed.dim, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def _image_paths(result: Any, frames: int) -> tuple[list[torch.Tensor], list[float], int]:
    """`frames` sampling positions `(*slice, d)` of the fixed middle slice in the moving image,
    from the identity (t = 0) to the final map (t = 1), with the fitting step each one stands
    for and the number of steps. Between two kept snapshots (one per Gauss-Newton step) the
    positions are interpolated linearly; without snapshots (an affine model) the path is the
    straight line from each point to its image."""
    from .grids import Grid

    grid = Grid.of(result.target)
    points = grid.points(torch.float64)
    if grid.dim == 3:
        points = points[:, :, grid.shape[2] // 2]
    if result.snapshots:
        path = [points] + [s.double() for s in result.snapshots]
    else:
        phi = result.deformation
        with torch.no_grad():
            moved = phi(points.reshape(-1, grid.dim).to(phi.device, phi.dtype)).cpu().double()
        path = [points, moved.reshape(points.shape)]
    steps = len(path) - 1
    where = np.linspace(0.0, steps, frames)
    out = []
    for w in where:
        k = min(int(np.floor(w)), steps - 1)
        t = w - k
        out.append((1 - t) * path[k] + t * path[k + 1])
    return out, list(where), len(result.snapshots)


def _image_frames(result: Any, frames: int, size) -> list[np.ndarray]:
    """The middle slice of the moving image as the registration proceeded, beside the fixed one:
    exactly `frames` frames from the unregistered moving image to the registered one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .grids import Grid, sample

    moving, grid, dim = result.source.data.float(), Grid.of(result.source), result.target.dim
    fixed = _middle(result.target.data)
    positions, where, steps = _image_paths(result, frames)
    slices = [sample(moving, grid, p.to(moving)).mean(0).numpy() for p in positions]      # (*slice)
    lo, hi = _display_range(fixed, *slices)
    images = []
    for w, warped in zip(where, slices):
        label = f"moving, step {w:.1f} of {steps}" if steps else f"moving, t = {w:.2f}"
        fig = Figure(figsize=(2 * size[0] / 100, size[1] / 100), dpi=100)
        canvas = FigureCanvasAgg(fig)
        panels = [(label, warped, "gray", hi), ("fixed", fixed, "gray", hi),
                  ("|fixed - moving|", np.abs(fixed - warped), "magma", hi - lo)]
        for col, (title, image, cmap, vmax) in enumerate(panels):
            ax = fig.add_subplot(1, 3, col + 1)
            _show(ax, image, dim, cmap=cmap, vmin=0 if cmap == "magma" else lo, vmax=vmax)
            ax.set_title(title, fontsize=8)
        fig.tight_layout()
        canvas.draw()
        images.append(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    return images
