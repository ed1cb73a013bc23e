"""Dense image registration by Gauss-Newton with a diffusion regulariser (Brox / SUITS / LearnGN).

The moving image is resampled through a map `psi` from the fixed grid's world points into the
moving image: `warped(x) = moving(psi(x))` with `psi(x) = A(x + u(x))` (A: optional affine
pre-alignment; u: a `DisplacementField`, or `exp(v)` of a `StationaryVelocityField`).
Each Gauss-Newton step linearises the residual `r = warped - fixed` (per channel: intensities or
MIND-SSC features) and solves, with the solver core's CG,

    (sum_c g_c g_c^T / C + lam L) du = -sum_c r_c g_c / C - lam L u

where g_c is the world-space gradient of the warped channel (coupled d x d blocks per voxel,
cross terms kept) and L the grid Laplacian (-Delta, Neumann, spacing aware). The update is applied
to u (or to v in SVF mode), then kept only if the objective decreased (else halved). Coarse to
fine over a pyramid, optionally on a B-spline control grid with a `stride`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ._options import CommonOptions
from .deform import Affine, Compose, DisplacementField, StationaryVelocityField
from .errors import ShapeflowError
from .grids import Grid, downsample, sample, spatial_gradient
from .regularizers import grid_laplacian_apply
from .shapes import Image
from .progress import progress_bar
from .solvers import conjugate_gradient, grid_normal_operator

__all__ = ["ImageOptions", "register_images", "IMAGE_MODELS", "FEATURES", "gauss_newton_step", "gauss_newton_layer"]

IMAGE_MODELS = {"displacement": DisplacementField, "svf": StationaryVelocityField, "affine": Affine}


def _identity_features(image: torch.Tensor) -> torch.Tensor:
    return image


def _mind_features(image: torch.Tensor) -> torch.Tensor:
    from .losses.images import mind_ssc

    return mind_ssc(image.mean(0, keepdim=True))


#: what the residual is taken on: "ssd" (intensities) or "mind" (MIND-SSC, multi-modal)
FEATURES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"ssd": _identity_features, "mind": _mind_features}


@dataclass
class ImageOptions(CommonOptions):
    """Keyword options of `register` for images; an unknown name is an error listing these."""

    levels: int = 3                      # pyramid levels (each halves the grid)
    iterations: int | list[int] | None = None   # Gauss-Newton steps per level, or a list (coarse first);
                                                # default 8 on the coarsest level, halved on each finer one
    regularization: float | list[float] = 0.003  # lam (intensities scaled to [0, 1]), or one per level
    stride: int = 1                      # control-grid stride (1: one vector per voxel)
    cg_iterations: int = 20
    cg_tol: float = 1e-3
    prealign: str | None = None          # "affine": fit an affine map first (Gauss-Newton, coarse level)
    normalize: bool = True               # rescale intensities to [0, 1] (1st and 99th percentiles)
    labels_moving: Any = None            # label maps (paths, Images or integer tensors) for Dice/HD95
    labels_fixed: Any = None
    landmarks_moving: Any = None         # (K, d) world points for TRE (paths or arrays)
    landmarks_fixed: Any = None
    snapshots: bool = True               # keep a 2D slice per step for the animation

    _what = "image option"

    def per_level(self, value, level: int, levels: int):
        return value[level] if isinstance(value, (list, tuple)) else value

    def steps(self, level: int, levels: int) -> int:
        """Gauss-Newton steps on `level` (0 = coarsest)."""
        if self.iterations is None:
            return max(8 >> level, 1)
        return int(self.per_level(self.iterations, level, levels))


@dataclass
class _Level:
    fixed: torch.Tensor           # (C, *S) features on the level grid
    moving: torch.Tensor          # (C, *S_m) features on the moving level grid
    grid: Grid
    moving_grid: Grid


def _normalise(data: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.quantile(data.flatten()[:: max(1, data.numel() // 200_000)].float(), torch.tensor([0.01, 0.99]))
    return ((data - lo) / (hi - lo).clamp_min(1e-8)).clamp(-0.5, 1.5)


def _pyramid(data: torch.Tensor, grid: Grid, levels: int) -> list[tuple[torch.Tensor, Grid]]:
    out = [(data, grid)]
    for _ in range(levels - 1):
        if min(out[-1][1].shape) < 16:
            break
        out.append(downsample(*out[-1]))
    return out[::-1]                                                   # coarse first


def gauss_newton_step(residual: torch.Tensor, gradient: torch.Tensor, u: torch.Tensor, grid: Grid, lam: float,
                      project: Callable | None = None, cg_iterations: int = 60, cg_tol: float = 1e-3):
    """One regularised Gauss-Newton update for a displacement `u: (d, *S)`.

    residual: (C, *S) warped minus fixed; gradient: (C, d, *S) world gradient of the warped image.
    Solves `(sum_c g g^T / C + lam L) du = -sum_c r g / C - lam L u` (with `project` = (P, P^T) for a
    control grid: unknowns z, du = P z). Returns `(du (d, *S), CGInfo)`.
    """
    C = gradient.shape[0]
    spacing = grid.spacing.tolist()
    rhs = -(residual[:, None] * gradient).sum(0) / C - lam * grid_laplacian_apply(u, spacing)   # (d, *S)
    if project is None:  # the solver core's fused operator: blocks and stencil in one pass
        operator = grid_normal_operator(gradient / math.sqrt(C), lam=lam, spacing=spacing)
        x, info = conjugate_gradient(operator, rhs.reshape(-1), M=operator.diagonal(), tol=cg_tol, maxiter=cg_iterations)
        return x.view(u.shape), info
    blocks = torch.einsum("ci...,cj...->ij...", gradient, gradient) / C          # (d, d, *S)

    def hessian(z: torch.Tensor) -> torch.Tensor:                              # (d, *S) -> (d, *S)
        return torch.einsum("ij...,j...->i...", blocks, z) + lam * grid_laplacian_apply(z, spacing)

    up, down = project
    z_shape = down(rhs).shape
    x, info = conjugate_gradient(lambda v: down(hessian(up(v.view(z_shape)))).reshape(-1), down(rhs).reshape(-1),
                                 tol=cg_tol, maxiter=cg_iterations)
    return up(x.view(z_shape)), info


def gauss_newton_layer(moving: torch.Tensor, fixed: torch.Tensor, grid: Grid, lam: float,
                       displacement: torch.Tensor | None = None, *, mode: str = "unrolled", tol: float = 1e-8,
                       maxiter: int | None = None) -> torch.Tensor:
    """One Gauss-Newton update as a differentiable layer (for training features through the solver).

    moving, fixed: (C, *S) features on the same `grid` (e.g. the outputs of a CNN);
    displacement: current u (d, *S) or None (zero). Returns du (d, *S) solving
    `(sum_c g g^T / C + lam L) du = -sum_c r g / C - lam L u` with `linear_solve`, so gradients
    flow to `moving`, `fixed` and `displacement`. mode "unrolled" (or "partial") differentiates
    everything; "implicit" solves one adjoint system in the backward pass but, like LearnGN's
    LSESolver, passes no gradient through the system matrix's dependence on the features
    (only through its diagonal and the right-hand side).
    """
    from .solvers import linear_solve

    d = grid.dim
    points = grid.points(moving.dtype, moving.device)
    u = torch.zeros(d, *grid.shape, dtype=moving.dtype, device=moving.device) if displacement is None else displacement
    warped = sample(moving, grid, points + u.movedim(0, -1))
    gradient = (spatial_gradient(warped, grid) + spatial_gradient(fixed, grid)) / 2          # (C, d, *S)
    C = gradient.shape[0]
    blocks = torch.einsum("ci...,cj...->ij...", gradient, gradient) / C
    spacing = grid.spacing.tolist()
    rhs = -((warped - fixed)[:, None] * gradient).sum(0) / C - lam * grid_laplacian_apply(u, spacing)
    eye = torch.eye(d, dtype=blocks.dtype, device=blocks.device).view(d, d, *([1] * d))
    off_diagonal = blocks * (1 - eye)
    diagonal = torch.diagonal(blocks, dim1=0, dim2=1).movedim(-1, 0).reshape(-1)             # (d * prod S,)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        z = v.view(d, *grid.shape)
        return (torch.einsum("ij...,j...->i...", off_diagonal, z) + lam * grid_laplacian_apply(z, spacing)).reshape(-1)

    du = linear_solve(matvec, diagonal, rhs.reshape(-1), mode=mode, tol=tol, maxiter=maxiter)
    return du.view(d, *grid.shape)


def register_images(moving: Image, fixed: Image, model: str = "displacement", loss: str = "ssd", **options: Any):
    """Register `moving` onto `fixed` (both `Image`s of the same dimension). See the module docstring.

    Returns a `Result` whose `warped` is an `Image` on the fixed grid and whose `deformation`
    maps fixed-space world points into the moving image (the resampling convention of ITK/ANTs).
    """
    from .register import Result, _lookup, _resolve_device
    from . import image_metrics

    opts = ImageOptions.from_kwargs(options)
    model_cls = _lookup(IMAGE_MODELS, model, "image model")
    features = _lookup(FEATURES, loss, "image loss")
    if opts.prealign not in (None, "affine"):
        raise ShapeflowError(f"register(): image prealign must be None or 'affine', got {opts.prealign!r}")
    moving = image_metrics.attach_labels(moving, opts.labels_moving, "labels_moving")
    fixed = image_metrics.attach_labels(fixed, opts.labels_fixed, "labels_fixed")
    if moving.dim != fixed.dim:
        raise ShapeflowError(f"register(): moving image is {moving.dim}D but fixed image is {fixed.dim}D"
                             f"{_names(moving, fixed)}")
    if moving.data.shape[0] != fixed.data.shape[0] and loss == "ssd":
        raise ShapeflowError(f"register(): moving has {moving.data.shape[0]} channels, fixed {fixed.data.shape[0]}; "
                             "SSD needs the same (or use loss='mind')")
    device, dtype = _resolve_device(opts.device), getattr(torch, opts.dtype)
    start = time.perf_counter()
    fixed_grid, moving_grid = Grid.of(fixed), Grid.of(moving)
    prep = _normalise if opts.normalize else (lambda x: x)
    f_data, m_data = prep(fixed.data.to(device, dtype)), prep(moving.data.to(device, dtype))
    fixed_levels = _pyramid(f_data, fixed_grid, opts.levels)
    moving_levels = _pyramid(m_data, moving_grid, len(fixed_levels))
    levels = [_Level(features(f), features(m), g, mg) for (f, g), (m, mg) in zip(fixed_levels, moving_levels)]

    history: list[dict] = []
    snapshots: list[torch.Tensor] = []
    slicer = _middle_slice(fixed_grid, device, dtype) if opts.snapshots else None
    affine = _affine_levels(levels, history) if opts.prealign == "affine" or model == "affine" else None
    core = None
    if model != "affine":
        params, params_grid, interrupted = _fit_levels(model_cls, levels, affine, opts, history, snapshots, slicer,
                                                       f"{model} ({loss})", device, dtype)
        if params_grid.shape != fixed_grid.shape:   # interrupted on a coarse level: bring it to full resolution
            params = sample(params, params_grid, fixed_grid.points(dtype, device))
        core = model_cls(fixed_grid).to(device, dtype)
        with torch.no_grad():
            core.control.zero_()
            core.control[(slice(None),) + tuple(slice(1, 1 + n) for n in fixed_grid.shape)] = params
        if interrupted:
            history.append({"stopped": "interrupted"})
    deformation = _assemble(core, affine)
    warped = _warp(moving, moving_grid, fixed, deformation, device, dtype)
    seconds = time.perf_counter() - start
    metrics = image_metrics.image_registration_metrics(moving, fixed, warped, deformation, opts, device, dtype)
    metrics["seconds"] = seconds
    metrics["interrupted"] = any(r.get("stopped") == "interrupted" for r in history)
    record = {"model": model, "loss": loss, **{k: v for k, v in dataclasses.asdict(opts).items()
                                                 if not k.startswith(("labels_", "landmarks_"))},
              "source": moving.source, "target": fixed.source}
    return Result(warped=warped, deformation=deformation, history=[r for r in history if "stopped" not in r],
                  metrics=metrics, source=moving, target=fixed, options=record, snapshots=snapshots)


def _fit_levels(model_cls, levels: list[_Level], affine, opts: ImageOptions, history: list, snapshots: list,
                slicer, description: str, device, dtype):
    """Gauss-Newton coarse to fine. Returns (parameters on the last grid used, that grid, interrupted)."""
    params, grid = None, None
    total_steps = sum(opts.steps(k, len(levels)) for k in range(len(levels)))
    with progress_bar(opts.progress, description, total_steps) as advance:
        for number, level in enumerate(levels):
            points = level.grid.points(dtype, device)                                       # (*S, d)
            if params is None:
                params = torch.zeros(level.grid.dim, *level.grid.shape, dtype=dtype, device=device)
            else:                           # carry the coarser solution to this grid (world units)
                params = sample(params, grid, points)
            grid = level.grid
            lam = float(opts.per_level(opts.regularization, number, len(levels)))
            stepper = _Stepper(model_cls, level, points, affine, lam, opts, advance)
            try:
                params = stepper.run(params, opts.steps(number, len(levels)), history,
                                     number, snapshots, slicer)
            except KeyboardInterrupt:
                return stepper.best, grid, True
    return params, grid, False


def _names(moving: Image, fixed: Image) -> str:
    return f" ({moving.source} -> {fixed.source})" if moving.source or fixed.source else ""


class _Stepper:
    """Gauss-Newton steps on one pyramid level; keeps the best parameters for Ctrl-C."""

    def __init__(self, model_cls, level: _Level, grid_points, affine, lam: float, opts: ImageOptions, advance=None):
        self.advance = advance or (lambda row=None: None)
        self.level, self.points, self.affine, self.lam, self.opts = level, grid_points, affine, lam, opts
        self.svf = model_cls is StationaryVelocityField
        self.helper = StationaryVelocityField(level.grid).to(grid_points) if self.svf else None
        self.project = _projection(level.grid, opts.stride, grid_points) if opts.stride > 1 else None
        self.best = None

    def displacement(self, params: torch.Tensor) -> torch.Tensor:
        return self.helper.exponential(params) if self.svf else params

    def warp(self, params: torch.Tensor) -> torch.Tensor:
        where = self.points + self.displacement(params).movedim(0, -1)
        if self.affine is not None:
            where = self.affine(where.reshape(-1, where.shape[-1])).reshape(where.shape)
        return sample(self.level.moving, self.level.moving_grid, where)

    def objective(self, params: torch.Tensor, warped: torch.Tensor) -> tuple[float, float]:
        data = float((warped - self.level.fixed).pow(2).mean())
        reg = float((params * grid_laplacian_apply(params, self.level.grid.spacing.tolist())).sum(0).mean())
        return data + self.lam * reg, data

    def run(self, params, iterations: int, history: list, number: int, snapshots: list, slicer) -> torch.Tensor:
        with torch.no_grad():
            warped = self.warp(params)
            total, data = self.objective(params, warped)
            self.best = params
            fixed_gradient = spatial_gradient(self.level.fixed, self.level.grid)
            for step in range(iterations):
                # symmetric (ESM) gradient: the mean of the warped and fixed gradients converges in
                # fewer steps than the warped gradient alone (Vercauteren et al. 2009)
                gradient = (spatial_gradient(warped, self.level.grid) + fixed_gradient) / 2
                du, info = gauss_newton_step(warped - self.level.fixed, gradient, params, self.level.grid, self.lam,
                                             self.project, self.opts.cg_iterations, self.opts.cg_tol)
                accepted = False
                for _ in range(4):      # backtrack: keep the step only if the objective decreases
                    trial = params + du
                    trial_warped = self.warp(trial)
                    trial_total, trial_data = self.objective(trial, trial_warped)
                    if trial_total < total:
                        params, warped, total, data, accepted = trial, trial_warped, trial_total, trial_data, True
                        break
                    du = du / 2
                history.append({"stage": f"level{number}", "phase": "gauss-newton", "iteration": step, "total": total,
                                "data": data, "cg_iterations": int(info.iterations.max()), "accepted": accepted})
                self.best = params
                self.advance(history[-1])
                if slicer is not None:
                    snapshots.append(slicer(self, params))
                if not accepted:
                    break
        return params


def _projection(grid: Grid, stride: int, like: torch.Tensor):
    """(P, P^T) for a B-spline control grid of `stride` on `grid`: P maps control values
    `(d, *Sc)` to the dense field `(d, *S)`; P^T is its adjoint (a vector-Jacobian product)."""
    from .grids import bspline_upsample, control_shape

    shape = (grid.dim, *control_shape(grid.shape, stride))
    up = lambda z: bspline_upsample(z, stride, grid.shape)
    _, transpose = torch.func.vjp(up, torch.zeros(shape, dtype=like.dtype, device=like.device))
    return up, lambda w: transpose(w)[0]


def _affine_levels(levels: list[_Level], history: list) -> Affine:
    """Affine pre-alignment coarse to fine over the pyramid."""
    start = None
    for number, level in enumerate(levels):
        start = _prealign(level, history, start=start, stage=f"affine-level{number}")
    return start


def _prealign(level: _Level, history: list, iterations: int = 40, start: Affine | None = None,
              stage: str = "affine") -> Affine:
    """Affine map (fixed world -> moving world) by Levenberg-Marquardt on the SSD at one level.

    The map is `T(x) = M (x - c_f) + c_m + t` (c: grid centres); the Jacobian of the residual
    `moving(T(x)) - fixed(x)` is assembled analytically from the moving image's gradient, since
    `grid_sample` has no forward-mode derivative for `torch.func`.
    """
    d = level.grid.dim
    dtype, device = level.fixed.dtype, level.fixed.device
    points = level.grid.points(dtype, device).reshape(-1, d)                           # (N, d)
    centre = points.mean(0)
    moving_centre = level.moving_grid.points(dtype, device).reshape(-1, d).mean(0)
    moving_gradient = spatial_gradient(level.moving, level.moving_grid)                # (C, d, *S_m)
    fixed = level.fixed.reshape(level.fixed.shape[0], -1)                              # (C, N)
    matrix, shift = torch.eye(d, dtype=dtype, device=device), torch.zeros(d, dtype=dtype, device=device)
    if start is not None:  # T(x) = A x + b  =>  M = A, shift = b + A c_f - c_m
        matrix = start.linear_part.detach().clone()
        shift = start.translation.detach() + centre @ matrix.T - moving_centre

    def evaluate(matrix, shift):
        where = (points - centre) @ matrix.T + moving_centre + shift
        residual = sample(level.moving, level.moving_grid, where) - fixed               # (C, N)
        return residual, where

    residual, where = evaluate(matrix, shift)
    cost = float(residual.pow(2).mean())
    damping = 1e-3
    for step in range(iterations):
        g = sample(moving_gradient.flatten(0, 1), level.moving_grid, where).view(-1, d, points.shape[0])  # (C, d, N)
        jac = torch.cat([(g[:, :, None, :] * (points - centre).T[None, None]).flatten(1, 2), g], dim=1)  # (C, d*d+d, N)
        jac = jac.transpose(1, 2).reshape(-1, d * d + d)                                  # (C*N, P)
        hessian, gradient = jac.T @ jac, jac.T @ residual.reshape(-1)
        accepted = False
        while damping < 1e8:
            delta = torch.linalg.solve(hessian + damping * torch.diag(torch.diagonal(hessian) + 1e-12), -gradient)
            new_matrix, new_shift = matrix + delta[: d * d].view(d, d), shift + delta[d * d:]
            new_residual, new_where = evaluate(new_matrix, new_shift)
            new_cost = float(new_residual.pow(2).mean())
            if new_cost < cost:
                matrix, shift, residual, where, damping, accepted = new_matrix, new_shift, new_residual, new_where, damping / 3, True
                improvement, cost = (cost - new_cost) / max(cost, 1e-30), new_cost
                break
            damping *= 4
        history.append({"stage": stage, "phase": "levenberg-marquardt", "iteration": step, "total": cost})
        if not accepted or improvement < 1e-6:
            break
    affine = Affine(d).to(device, dtype)
    with torch.no_grad():
        affine.linear_part.copy_(matrix)
        affine.translation.copy_(moving_centre + shift - centre @ matrix.T)
    return affine


def _assemble(core, affine):
    parts = [p for p in (core, affine) if p is not None]
    return parts[0] if len(parts) == 1 else Compose(parts)


def _warp(moving: Image, moving_grid: Grid, fixed: Image, deformation, device, dtype) -> Image:
    """The moving image (and its labels, by nearest neighbour) resampled on the fixed grid."""
    with torch.no_grad():
        points = Grid.of(fixed).points(dtype, device)
        where = deformation(points.reshape(-1, fixed.dim)).reshape(points.shape)
        data = sample(moving.data.to(device, dtype), moving_grid, where).cpu()
        labels = None
        if moving.labels is not None:
            labels = sample(moving.labels[None].to(device, dtype), moving_grid, where, mode="nearest")[0].round().long().cpu()
    return dataclasses.replace(fixed, data=data, labels=labels, source=None)


def _middle_slice(grid: Grid, device, dtype):
    """A function giving the warped moving image on the middle slice of the full-resolution fixed
    grid for the current parameters of a `_Stepper` (for the animation)."""
    points = grid.points(dtype, device)
    if grid.dim == 3:
        points = points[:, :, grid.shape[2] // 2]
    flat = points.reshape(-1, grid.dim)

    def snapshot(stepper: _Stepper, params: torch.Tensor) -> torch.Tensor:
        displacement = stepper.displacement(params)
        where = flat + sample(displacement, stepper.level.grid, flat).T
        if stepper.affine is not None:
            where = stepper.affine(where)
        return where.reshape(*points.shape).cpu()

    return snapshot


def displacement_image(result) -> Image:
    """The map of an image registration as a displacement field on the fixed grid, in the ITK/ANTs
    convention: vectors in mm from each fixed voxel to its point in the moving image, components
    in LPS (x and y negated from the NIfTI RAS world) in 3D. Written as NIfTI (X, Y, Z, 1, 3)."""
    grid = Grid.of(result.target)
    ref = next(iter(result.deformation.parameters()))
    with torch.no_grad():
        points = grid.points(ref.dtype, ref.device)
        vectors = (result.deformation(points.reshape(-1, grid.dim)).reshape(points.shape) - points).cpu().double()
    if grid.dim == 3:
        vectors = vectors * torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)
    return dataclasses.replace(result.target, data=vectors.movedim(-1, 0).float(), labels=None, source=None)


def _write_displacement_nifti(image: Image, path) -> None:
    import nibabel as nib
    import numpy as np

    d = image.dim
    affine = np.eye(4)
    affine[:d, :d] = (image.direction * image.spacing).numpy()
    affine[:d, 3] = image.origin.numpy()
    vectors = np.moveaxis(image.data.numpy(), 0, -1)                      # (*S, d)
    array = vectors.reshape(*image.shape, *([1] * (3 - d)), 1, d)         # (X, Y, Z, 1, d)
    nifti = nib.Nifti1Image(array.astype(np.float32), affine)
    nifti.header.set_intent("vector")
    nib.save(nifti, str(path))


def write_image_outputs(result, folder, name=None) -> None:
    """Write the warped image (fixed header), warped labels, displacement.nii.gz and overlay.png."""
    from pathlib import Path

    from ._files import atomic_write
    from .io import suffix_of, write
    from .viz import overlay

    folder = Path(folder)
    suffix = name or (suffix_of(result.target.source) if result.target.source else ".nii.gz")
    if result.warped.dim == 3 and suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        suffix = ".nii.gz"
    write(dataclasses.replace(result.warped, labels=None), folder / f"warped{suffix}")
    if result.warped.labels is not None:
        labels = dataclasses.replace(result.warped, data=result.warped.labels[None].float(), labels=None)
        write(labels, folder / f"warped_labels{'.nii.gz' if result.warped.dim == 3 else '.png'}")
    atomic_write(folder / "displacement.nii.gz", lambda tmp: _write_displacement_nifti(displacement_image(result), tmp))
    overlay(result, folder / "overlay.png")
