"""Dense image registration by Gauss-Newton with a diffusion regulariser (Brox / SUITS / LearnGN).

The moving image is resampled through a map `psi` from the fixed grid's world points into the
moving image: `warped(x) = moving(psi(x))` with `psi(x) = A(x + u(x))` (A: optional affine
pre-alignment, `image_affine.py`; u: the displacement of the model: a `DisplacementField`, or
`exp(v)` of a `StationaryVelocityField`). Each pyramid level is one least-squares problem
(`GridProblem`) handed to the solver core's one Gauss-Newton loop
(`shapeflow.solvers.minimize_least_squares`). Its linearisation takes the residual
`r = F(warped) - F(fixed)` (per channel; F from the `loss=` residual in `RESIDUALS`) and solves

    (sum_c g_c g_c^T / C + lam L) du = -sum_c r_c g_c / C - lam L u

(`shapeflow.solvers.normal.grid.gauss_newton_step`: coupled d x d blocks per voxel, L the grid
Laplacian, CG matrix free or AMG on the assembled matrix). A step is kept only if the objective
`mean r^2 + lam u^T L u / N` decreases (else halved, at most `MAX_HALVINGS` times, `FOLD_HALVINGS`
while it folds; the level stops when no step helps). For every model a step whose map has `det(I + grad u) <= 0` at some voxel
(central differences, as the metrics measure it) counts as no decrease, so the fitted map never
folds on the fixed grid; on the coarser levels also by the one-sided differences of the cells
around each voxel (what the finer grid's central differences see of the interpolated field), so
the field carried up does not fold either. `svf` needs the check too (on `exp(v)` and on its
inverse `exp(-v)`): `exp(v)` of the continuous
velocity is a diffeomorphism, but scaling and squaring composes linearly interpolated fields on
the grid, and a rough velocity (measured: neighbouring voxels 17 voxels apart where a rotated
picture's empty corner pulls the field) makes that discrete map fold although each squaring's
first step is orientation preserving. Coarse to fine over a pyramid, optionally on a B-spline
control grid with a `stride`.

Landmarks `(m_k, f_k)` (moving, fixed; world mm) with `landmark_weight` w > 0 add
`w mean_k |r_k|^2 / D^2` to the objective, `r_k = f_k + u(f_k) - A^{-1}(m_k)` (u linearly
interpolated at f_k, as the field is sampled; D the fixed image's world diagonal), whose
Gauss-Newton parts enter the same normal equations as a `PointTerm` (`w' B^T B`, B the
interpolation weights at the f_k; for `svf` the step treats d exp(v) / dv as the identity, as the
image term does).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .._optional import import_optional
from .._options import CommonOptions, parse_options
from .._registry import Registry
from ..deform import IMAGE_MODELS, Compose, Deformation
from ..errors import ShapeflowError
from ..grids import (Grid, bspline_upsample, control_shape, downsample, interpolation_weights, min_jacobian_determinant,
                     sample, spatial_gradient)
from ..io.landmarks import landmark_pair
from ..losses import RESIDUALS, ImageResidual
from ..metrics import image_registration_metrics, moving_on_fixed_grid
from ..progress import progress_bar
from ..regularizers import grid_diffusion
from ..result import Result
from ..shapes import Image
from ..solvers import GaussNewtonStep, Linearization, minimize_least_squares
from ..solvers.normal.grid import GRID_SOLVERS, PointTerm, gauss_newton_step
from ..interpolation import INTERPOLATIONS
from ..solvers.continuation import PREDICTORS, check_thetas
from .image_affine import MULTISCALE, OPTIMIZERS, TRANSFORMS, fit_affine

__all__ = ["ImageOptions", "register_images", "GridProblem"]

#: the solver names `register(solver=...)` accepts for images
IMAGE_SOLVERS = Registry("image solver", GRID_SOLVERS)

#: halvings of a Gauss-Newton step that does not decrease the objective before the level stops, and
#: of one that folds the map (a fold needs more: a shorter step always unfolds, and each costs little)
MAX_HALVINGS, FOLD_HALVINGS = 3, 8

#: the smallest image side (voxels) that can be registered (gradients need two voxels per axis)
MIN_SIDE = 2


@dataclass
class ImageOptions(CommonOptions):
    """Keyword options of `register` for images; an unknown name is an error listing these.

    Per-level values (`iterations`, `regularization` as lists) hold one value per requested
    level, coarsest first; when an image is too small for every level (a level needs at least 16
    voxels along each axis to be halved), the coarsest levels are dropped together with their
    values, so the finest level always gets the last value.

    Landmarks (the common options): `landmarks=(moving_points, fixed_points)`, `(K, d)` world mm
    (arrays, `Landmarks` or files; the source side is the moving image). Each must lie inside its
    image (within half a voxel). They always give `metrics["tre"]`, `["tre_before"]` and
    `["landmark_error"]`. `landmark_weight` (default None = 0: landmarks are only measured) > 0
    adds `landmark_weight * mean_k |phi(f_k) - m_k|^2 / D^2` to the Gauss-Newton objective (D: the
    fixed image's world diagonal, so the term is a fraction of the image size squared, as the image
    term is of the intensity range, whatever the resolution; 1 already pulls landmarks to well under
    a voxel where the intensities leave the motion free).
    Non-linear models only (displacement, svf; either solver, any stride); with model="affine" a
    weight > 0 is an error.
    """

    levels: int = 3                      # pyramid levels (each halves the grid)
    iterations: int | list[int] | None = None   # Gauss-Newton steps per level, or a list (coarse first);
                                                # default 8 on the coarsest level, halved on each finer one
    regularization: float | list[float] = 0.003  # lam (intensities scaled to [0, 1]), or one per level
    cg_iterations: int = 20              # non-linear models: inner CG iterations per Gauss-Newton step
    cg_tol: float = 1e-3                 # non-linear models: inner relative residual
    solver: str = "cg"                   # non-linear models: "cg" (matrix free, Jacobi) or "amg" (pyamg, CPU)
    prealign: str | None = "affine"      # non-linear models: fit an affine map first ("affine"), or not
                                         # (None or "none")
    normalize: bool = True               # rescale intensities to [0, 1] (1st and 99th percentiles)
    labels_moving: Any = None            # label maps (paths, Images or integer tensors) for Dice/HD95
    labels_fixed: Any = None
    mask_moving: Any = None              # masks (paths, Images or arrays on the image's grid; nonzero =
    mask_fixed: Any = None               # use): the data term counts only voxels inside both
    snapshots: bool = True               # keep a 2D slice per step for the animation
    optimizer: str = "lm"                # affine stage: "lm", "gauss-newton", "newton" (exact autodiff Hessian,
                                         # trust region) or "gradient" (see `image_affine.py`)
    multiscale: str = "pyramid"          # affine stage: "pyramid", "continuation" or "predictor-corrector" (in theta)
    interpolation: str = "linear"        # affine stage's objective: "linear" or "spline" (C^2 cubic B-spline)
    thetas: list[float] | None = None    # continuation: decreasing spline scales theta (mm^4), last 0 (default:
                                         # blur lengths of 8, 4, 2, 1 voxels, then 0)
    predictor: str = "newton"            # predictor-corrector: "newton" (exact Hessian) or "gauss-newton"
    transform: str = "affine"            # the objective's map for optimizer/multiscale/interpolation other than
                                         # the defaults: "affine" or "rigid"

    _what = "image option"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.levels, int) or self.levels < 1:
            raise ShapeflowError(f"register(): levels must be an int >= 1, got {self.levels!r}")
        for name in ("iterations", "regularization"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and len(value) != self.levels:
                raise ShapeflowError(f"register(): {name} has {len(value)} values but levels={self.levels}; "
                                     "give one per level (coarsest first) or a single value")
        for registry, value in ((OPTIMIZERS, self.optimizer), (MULTISCALE, self.multiscale),
                                (INTERPOLATIONS, self.interpolation), (PREDICTORS, self.predictor),
                                (TRANSFORMS, self.transform)):
            registry.lookup(value, "register()")
        if self.thetas is not None:
            check_thetas(self.thetas, "register()")
        if self.multiscale != "pyramid" and self.interpolation != "spline":
            raise ShapeflowError(f"register(): multiscale={self.multiscale!r} blurs the spline interpolant by theta; "
                                 "use interpolation='spline'")

    def per_level(self, value, level: int, built: int):
        """`value` (or its entry) for pyramid level `level` (0 = coarsest of the `built` levels)."""
        index = self.levels - built + level          # the coarsest requested levels may be dropped
        return value[index] if isinstance(value, (list, tuple)) else value

    def steps(self, level: int, built: int) -> int:
        """Gauss-Newton steps on `level` (0 = coarsest of the `built` levels)."""
        if self.iterations is None:
            return max(8 >> (self.levels - built + level), 1)
        return int(self.per_level(self.iterations, level, built))


@dataclass
class _Level:
    fixed: torch.Tensor           # (C, *S) residual features of the fixed image on the level grid
    moving: torch.Tensor          # (C, *S_m) features on the moving level grid (before warping)
    grid: Grid
    moving_grid: Grid
    fixed_features: torch.Tensor  # (C, *S) the fixed features before `after_warp` (for scores)
    after_warp: Callable[[torch.Tensor], torch.Tensor] | None = None   # (C, *S) -> (C, *S), see `ImageResidual`
    fixed_weight: torch.Tensor | None = None    # (1, *S) in [0, 1]: the fixed mask (None: every voxel)
    moving_weight: torch.Tensor | None = None   # (1, *S_m) in [0, 1]: the moving mask, sampled where warped

    def weight(self, where: torch.Tensor) -> torch.Tensor | None:
        """Per-voxel weight `(1, *S)` of the data term for the moving positions `where: (*S, d)`
        (the fixed mask times the moving mask sampled there), or None when neither image has one."""
        weight = self.fixed_weight
        if self.moving_weight is not None:
            moved = sample(self.moving_weight, self.moving_grid, where)
            weight = moved if weight is None else weight * moved
        return weight


@dataclass
class _Marks:
    """The landmark term: fixed points f (K, d), their targets before the affine map A^{-1}(m) (K, d),
    the weight w and the length D the residuals are divided by (the fixed image's world diagonal)."""

    fixed: torch.Tensor
    target: torch.Tensor
    weight: float
    scale: float

    def on(self, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(index, weights (K, 2^d)) of the interpolation at f on `grid`, and the coefficient
        `w N / (K D^2)` of `B^T B` in the normal equations (which are `N / 2` times the objective's)."""
        index, weights = interpolation_weights(grid, self.fixed)
        return index, weights, self.weight * math.prod(grid.shape) / (len(self.fixed) * self.scale ** 2)


class GridProblem:
    """One pyramid level as a least-squares problem in the parameter field x: (d, *S).

    cost: `mean m (F(warped) - F(fixed))^2 + lam u^T L u / N (+ w mean_k |r_k|^2 / D^2)` (m: the
    masks' weight, `_Level.weight`, 1 without masks); state: (raw warped features, residual
    features, data term, landmark residuals (d, K) or None, landmark term, m or None). linearize: the symmetric (ESM) gradient, the mean of the warped and fixed
    gradients, which converges in fewer steps than the warped one alone (Vercauteren et al. 2009),
    and `gauss_newton_step` as the normal-equation solve (the landmarks as its `PointTerm`).
    """

    def __init__(self, model: Deformation, level: _Level, affine: Deformation | None, lam: float,
                 opts: ImageOptions, stride: int, marks: _Marks | None = None, finest: bool = True):
        self.model, self.level, self.affine, self.lam, self.opts = model, level, affine, lam, opts
        self.finest = finest
        self.points = level.grid.points(opts.torch_dtype, opts.torch_device)            # (*S, d)
        self.spacing = level.grid.spacing.tolist()
        self.project = _projection(level.grid, stride, self.points) if stride > 1 else None
        self.fixed_gradient = spatial_gradient(level.fixed, level.grid)
        self.marks = marks
        if marks is not None:
            self.mark_index, self.mark_weights, self.mark_coefficient = marks.on(level.grid)

    def where(self, x: torch.Tensor, field: torch.Tensor | None = None) -> torch.Tensor:
        """World points (*S, d) of the moving image that the fixed grid's voxels sample."""
        field = self.model.field_of(x) if field is None else field
        where = self.points + field.movedim(0, -1)
        if self.affine is not None:
            where = self.affine(where.reshape(-1, where.shape[-1])).reshape(where.shape)
        return where

    def cost(self, x: torch.Tensor) -> tuple[float, tuple]:
        field = self.model.field_of(x)                                                   # (d, *S)
        where = self.where(x, field)
        raw = sample(self.level.moving, self.level.moving_grid, where)                   # (C, *S)
        warped = raw if self.level.after_warp is None else self.level.after_warp(raw)
        weight = self.level.weight(where)                                                # (1, *S) or None
        square = (warped - self.level.fixed).pow(2)
        data = float((square if weight is None else weight * square).mean())
        reg = float(grid_diffusion(x, self.spacing)) / x[0].numel()
        marks, term = None, 0.0
        if self.marks is not None:   # r_k = f_k + u(f_k) - A^{-1}(m_k): (d, K)
            marks = (self.marks.fixed + sample(field, self.level.grid, self.marks.fixed).T - self.marks.target).T
            term = self.marks.weight * float(marks.pow(2).sum(0).mean()) / self.marks.scale ** 2
        total = data + self.lam * reg + term
        if any(min_jacobian_determinant(f, self.level.grid, corners=not self.finest) <= 0
               for f in self.model.checked_fields(x, field)):
            total = math.inf                # a folding map: the step is halved (or the level stops)
        return total, (raw, warped, data, marks, term, weight)

    def linearize(self, x: torch.Tensor, state: tuple) -> Linearization:
        warped, marks, weight = state[1], state[3], state[5]
        gradient = (spatial_gradient(warped, self.level.grid) + self.fixed_gradient) / 2   # (C, d, *S)
        residual = warped - self.level.fixed
        if weight is not None:      # the masked data term: rows of the residual and its Jacobian times sqrt(w)
            root = weight.clamp_min(0).sqrt()
            residual, gradient = residual * root, gradient * root[:, None]
        points = None if marks is None else PointTerm(self.mark_index, self.mark_weights, self.mark_coefficient, marks)

        def solve(mu: float) -> tuple[torch.Tensor, int]:
            du, info = gauss_newton_step(residual, gradient, x, self.level.grid, self.lam, self.project,
                                         self.opts.cg_iterations, self.opts.cg_tol, self.opts.solver, damping=mu,
                                         points=points)
            return du, int(info.iterations.max())

        g = (residual[:, None] * gradient).sum(0) / gradient.shape[0]                      # (d, *S)
        if points is not None:
            g = g + points.gradient(x[0].numel()).to(g).view(g.shape)
        return Linearization(g, solve)


def _projection(grid: Grid, stride: int, like: torch.Tensor):
    """(P, P^T) for a B-spline control grid of `stride` on `grid`: P maps control values
    `(d, *Sc)` to the dense field `(d, *S)`; P^T is its adjoint (a vector-Jacobian product)."""
    shape = (grid.dim, *control_shape(grid.shape, stride))
    up = lambda z: bspline_upsample(z, stride, grid.shape)
    _, transpose = torch.func.vjp(up, torch.zeros(shape, dtype=like.dtype, device=like.device))
    return up, lambda w: transpose(w)[0]


def _normalise(data: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Intensities rescaled so the 1st and 99th percentiles (of the `valid` voxels) become 0 and 1."""
    values = data.flatten() if valid is None else data[:, valid.to(data.device)].flatten()
    lo, hi = torch.quantile(values[:: max(1, values.numel() // 200_000)].float(), torch.tensor([0.01, 0.99]))
    return ((data - lo) / (hi - lo).clamp_min(1e-8)).clamp(-0.5, 1.5)


def _pyramid(data: torch.Tensor, grid: Grid, levels: int) -> list[tuple[torch.Tensor, Grid]]:
    out = [(data, grid)]
    for _ in range(levels - 1):
        if min(out[-1][1].shape) < 16:
            break
        out.append(downsample(*out[-1]))
    return out[::-1]                                                   # coarse first


def _level(term: ImageResidual, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid, moving_grid: Grid) -> _Level:
    """One pyramid level: fixed (C, *S) and moving (C, *S_m) intensities turned into `term`'s features
    (each image with its role, "fixed" or "moving": a learned network runs each modality's branch),
    or, for a term with `features_before_pyramid`, already features (downsampled with the pyramid)."""
    if term.features_before_pyramid:
        fixed_features, moving_features = fixed, moving
    else:
        fixed_features, moving_features = term.features(fixed, role="fixed"), term.features(moving, role="moving")
    after_warp = term.after_warp(fixed_features)
    if after_warp is None:
        return _Level(fixed_features, moving_features, grid, moving_grid, fixed_features)
    return _Level(after_warp(fixed_features), moving_features, grid, moving_grid, fixed_features, after_warp)


def _names(moving: Image, fixed: Image) -> str:
    return f" ({moving.source} -> {fixed.source})" if moving.source or fixed.source else ""


def _check_image(image: Image, role: str) -> None:
    """A one-line error naming the file for an image that cannot be registered."""
    where = image.source or f"{role} image"
    if min(image.shape) < MIN_SIDE:
        raise ShapeflowError(f"{where}: image is {'x'.join(map(str, image.shape))} voxels; registration needs at "
                             f"least {MIN_SIDE} along each axis")
    lo, hi = float(image.data.min()), float(image.data.max())
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1e-30):
        raise ShapeflowError(f"{where}: the image is constant (every voxel is {lo:g}); there is nothing to register")


def attach_labels(image: Image, labels: Any, name: str) -> Image:
    """`image` with the label map `labels` (a path, an `Image` or an integer array on the same grid)."""
    if labels is None:
        return image
    from ..io import read

    if not isinstance(labels, (Image, torch.Tensor, np.ndarray)):
        labels = read(labels, kind="image")
    if isinstance(labels, Image):
        same = labels.shape == image.shape and torch.allclose(labels.index_to_world, image.index_to_world, atol=1e-3)
        if not same:
            raise ShapeflowError(f"{labels.source or name}: label map grid {labels.shape} (spacing "
                                 f"{[round(s, 4) for s in labels.spacing.tolist()]}) does not match its image "
                                 f"{image.shape} (spacing {[round(s, 4) for s in image.spacing.tolist()]})")
        labels = labels.data[0]
    labels = torch.as_tensor(np.asarray(labels)).round().long()
    return dataclasses.replace(image, labels=labels)


def mask_weight(image: Image, mask: Any, name: str) -> torch.Tensor | None:
    """The data-term weight `(1, *S)` (1 inside, 0 outside) of `image` from its `valid` voxels and
    the `mask` option (a path, an `Image` on the same grid, or an array `S`; nonzero = inside), or
    None when every voxel counts."""
    inside = image.valid
    if mask is not None:
        from ..io import read

        if not isinstance(mask, (Image, torch.Tensor, np.ndarray)):
            mask = read(mask, kind="image")
        where = getattr(mask, "source", None) or name
        if isinstance(mask, Image):
            if mask.shape != image.shape or not torch.allclose(mask.index_to_world, image.index_to_world, atol=1e-3):
                raise ShapeflowError(f"{where}: mask grid {mask.shape} does not match its image {image.shape}")
            mask = mask.data[0]
        mask = torch.as_tensor(np.asarray(mask))
        if tuple(mask.shape) != image.shape:
            raise ShapeflowError(f"{where}: mask has shape {tuple(mask.shape)} but its image is {image.shape}")
        mask = mask != 0
        if not mask.any():
            raise ShapeflowError(f"{where}: the mask is empty (no nonzero voxel)")
        inside = mask if inside is None else inside & mask
    return None if inside is None else inside[None].float()


def _input_name(value: Any) -> str | None:
    """How the report names an image-like option: its path, its source file, "array", or None."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return None if value is None else str(value)
    return getattr(value, "source", None) or "array"


def _landmark_name(value: Any, role: str) -> str:
    """The name errors use for one side of `landmarks` (the file, as `landmark_pair` names it)."""
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    return getattr(value, "source", None) or f"landmarks ({role})"


def _landmark_files(landmarks: Any) -> dict:
    """`{"landmarks": [file, file]}` for the report when both sides are files, else `{}`."""
    if landmarks is not None and all(isinstance(v, (str, os.PathLike)) for v in landmarks):
        return {"landmarks": [str(v) for v in landmarks]}
    return {}


def _check_inside(points: torch.Tensor, image: Image, role: str, name: str) -> None:
    """A one-line error naming the file for a landmark outside `image` (by more than half a voxel)."""
    grid = Grid.of(image)
    index = grid.to_index(points)                                                     # (K, d)
    size = torch.tensor(image.shape, dtype=torch.float64)
    outside = ((index < -0.5) | (index > size - 0.5)).any(1)
    if not bool(outside.any()):
        return
    k = int(outside.nonzero()[0])
    corners = torch.cartesian_prod(*[torch.tensor([-0.5, n - 0.5], dtype=torch.float64) for n in image.shape])
    world = corners.reshape(-1, grid.dim) @ grid.matrix.T + grid.origin
    bounds = " x ".join(f"[{lo:.1f}, {hi:.1f}]" for lo, hi in zip(world.min(0).values.tolist(), world.max(0).values.tolist()))
    at = ", ".join(f"{c:.1f}" for c in points[k].tolist())
    raise ShapeflowError(f"{name}: landmark {k + 1} of {len(points)} at ({at}) lies outside the {role} image "
                         f"(world bounds {bounds} mm)")


def _landmarks(opts: ImageOptions, moving: Image, fixed: Image) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(K, d) float64 world landmarks of the moving and fixed images, checked, or (None, None)."""
    pair = landmark_pair(opts.landmarks, fixed.dim)
    if pair is None:
        if opts.landmark_weight:
            raise ShapeflowError(f"register(): landmark_weight={opts.landmark_weight!r} needs "
                                 "landmarks=(moving_points, fixed_points)")
        return None, None
    for points, image, role, value in zip(pair, (moving, fixed), ("moving", "fixed"), opts.landmarks):
        _check_inside(points, image, role, _landmark_name(value, "source" if role == "moving" else "target"))
    return pair


def _check_combination(model_cls, model: str, opts: ImageOptions, given: set[str], model_opts) -> None:
    """Options that do not apply to the chosen model are errors, not silently ignored."""
    if model_cls.linear:
        unused = sorted(given & {"solver", "cg_iterations", "cg_tol", "prealign"})
        if unused:
            raise ShapeflowError(f"register(): {', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} "
                                 f"to the non-linear image models "
                                 f"({', '.join(k for k, v in IMAGE_MODELS.items() if not v.linear)}), "
                                 f"not to model {model!r}")
        return
    if opts.prealign not in (None, "none", "affine"):
        raise ShapeflowError(f"register(): image prealign must be 'affine' or None ('none'), got {opts.prealign!r}")
    affine_only = sorted(given & {"optimizer", "multiscale", "interpolation", "thetas", "predictor", "transform"})
    if affine_only and opts.prealign in (None, "none"):
        raise ShapeflowError(f"register(): {', '.join(affine_only)} configure the affine stage; with prealign=None "
                             "there is none")
    if opts.solver == "amg":
        if getattr(model_opts, "stride", 1) != 1:
            raise ShapeflowError(f"register(): solver='amg' needs stride=1 (a dense field), got stride={model_opts.stride}")
        if opts.torch_device.type != "cpu":
            raise ShapeflowError(f"register(): solver='amg' runs on the CPU (pyamg), got device "
                                 f"{str(opts.torch_device)!r}; use device='cpu' or solver='cg'")
        import_optional("pyamg", "register(): solver='amg'")


def register_images(moving: Image, fixed: Image, model: str = "svf", loss: str = "ssd",
                    **options: Any) -> Result:
    """Register `moving` onto `fixed` (both `Image`s of the same dimension). See the module docstring.

    Returns a `Result` whose `warped` is an `Image` on the fixed grid and whose `deformation`
    maps fixed-space world points into the moving image (the resampling convention of ITK/ANTs).
    """
    opts, parts = parse_options(ImageOptions, options, {"model": (model, IMAGE_MODELS), "loss": (loss, RESIDUALS)})
    model_cls, residual_cls = IMAGE_MODELS[model], RESIDUALS[loss]
    IMAGE_SOLVERS.lookup(opts.solver)
    _check_combination(model_cls, model, opts, set(options), parts["model"])
    term = residual_cls(parts["loss"])
    moving = attach_labels(moving, opts.labels_moving, "labels_moving")
    fixed = attach_labels(fixed, opts.labels_fixed, "labels_fixed")
    if moving.dim != fixed.dim:
        raise ShapeflowError(f"register(): moving image is {moving.dim}D but fixed image is {fixed.dim}D"
                             f"{_names(moving, fixed)}")
    if moving.data.shape[0] != fixed.data.shape[0] and term.same_channels:
        raise ShapeflowError(f"register(): moving has {moving.data.shape[0]} channels, fixed {fixed.data.shape[0]}; "
                             f"loss={loss!r} needs the same (or use loss='mind')")
    _check_image(moving, "moving")
    _check_image(fixed, "fixed")
    moving_marks, fixed_marks = _landmarks(opts, moving, fixed)
    device, dtype = opts.torch_device, opts.torch_dtype
    start = time.perf_counter()
    fixed_grid, moving_grid = Grid.of(fixed), Grid.of(moving)
    prep = _normalise if opts.normalize else (lambda x, valid: x)
    f_data, m_data = prep(fixed.data.to(device, dtype), fixed.valid), prep(moving.data.to(device, dtype), moving.valid)
    if term.features_before_pyramid:
        f_data, m_data = term.features(f_data, role="fixed"), term.features(m_data, role="moving")
    fixed_levels = _pyramid(f_data, fixed_grid, opts.levels)
    moving_levels = _pyramid(m_data, moving_grid, len(fixed_levels))
    levels = [_level(term, f, m, g, mg) for (f, g), (m, mg) in zip(fixed_levels, moving_levels)]
    for side, image, mask in (("fixed", fixed, opts.mask_fixed), ("moving", moving, opts.mask_moving)):
        weight = mask_weight(image, mask, f"mask_{side}")
        if weight is not None:    # the mask on every level (averaged down: fractional weights at the edges)
            grid = fixed_grid if side == "fixed" else moving_grid
            for level, (w, _) in zip(levels, _pyramid(weight.to(device, dtype), grid, len(levels))):
                setattr(level, f"{side}_weight", w)

    history: list[dict] = []
    snapshots: list[torch.Tensor] = []
    affine, core, interrupted = None, None, False
    diagonal = float(torch.linalg.vector_norm(fixed.spacing * torch.tensor(fixed.shape, dtype=torch.float64)))
    if opts.prealign == "affine" or model_cls.linear:
        affine_marks = None
        if opts.landmark_weight and moving_marks is not None:
            affine_marks = (fixed_marks.to(device, dtype), moving_marks.to(device, dtype),
                            float(opts.landmark_weight), diagonal)
        affine, interrupted = fit_affine([(lv.moving, lv.moving_grid, lv.fixed_features, lv.grid) for lv in levels],
                                         history, landmarks=affine_marks,
                                         weights=[(lv.fixed_weight, lv.moving_weight) for lv in levels],
                                         optimizer=opts.optimizer, multiscale=opts.multiscale,
                                         interpolation=opts.interpolation, thetas=opts.thetas,
                                         predictor=opts.predictor, transform=opts.transform)
    if not model_cls.linear and not interrupted:
        slicer = _middle_slice(fixed_grid, device, dtype) if opts.snapshots else None
        marks = None
        if opts.landmark_weight and moving_marks is not None:
            with torch.no_grad():
                target = moving_marks.to(device, dtype)
                target = target if affine is None else affine.inverse(target)
            marks = _Marks(fixed_marks.to(device, dtype), target, float(opts.landmark_weight), diagonal)
        params, params_grid, interrupted = _fit_levels(model_cls, parts["model"], levels, term, affine, opts, history,
                                                       snapshots, slicer, f"{model} ({loss})", marks)
        if params_grid.shape != fixed_grid.shape:   # interrupted on a coarse level: bring it to full resolution
            params = sample(params, params_grid, fixed_grid.points(dtype, device))
        core = model_cls(fixed_grid).to(device, dtype)
        core.set_dense(params)
    deformation = _assemble(core, affine)
    warped = _warp(moving, moving_grid, fixed, deformation, device, dtype)
    seconds = time.perf_counter() - start
    metrics = image_registration_metrics(moving, fixed, warped, deformation, device, dtype, moving_marks, fixed_marks)
    if term.score_name is not None:
        before = moving_on_fixed_grid(moving, fixed, device, dtype)
        metrics[f"{term.score_name}_before"] = term.score(before, fixed.data.to(before))
        metrics[f"{term.score_name}_after"] = term.score(warped.data.to(before), fixed.data.to(before))
    metrics["seconds"] = seconds
    metrics["interrupted"] = interrupted
    record = {"model": model, "loss": loss,
              **{k: v for k, v in dataclasses.asdict(opts).items()
                 if not k.startswith(("labels_", "mask_")) and k != "landmarks"},
              **{k: _input_name(getattr(opts, k)) for k in ("mask_moving", "mask_fixed")},
              **_landmark_files(opts.landmarks), **dataclasses.asdict(parts["model"]), **dataclasses.asdict(parts["loss"]),
              "source": moving.source, "target": fixed.source}
    return Result(warped=warped, deformation=deformation, history=history, metrics=metrics, source=moving,
                  target=fixed, options=record, snapshots=snapshots)


def _fit_levels(model_cls, model_opts, levels: list[_Level], term: ImageResidual, affine, opts: ImageOptions,
                history: list, snapshots: list, slicer, description: str, marks: _Marks | None = None):
    """Gauss-Newton coarse to fine. Returns (parameters on the last grid used, that grid, interrupted)."""
    params, grid = None, None
    built = len(levels)
    total_steps = sum(opts.steps(k, built) for k in range(built))
    dtype, device = opts.torch_dtype, opts.torch_device
    with progress_bar(opts.progress, description, total_steps) as advance:
        for number, level in enumerate(levels):
            if params is None:
                params = torch.zeros(level.grid.dim, *level.grid.shape, dtype=dtype, device=device)
            else:                           # carry the coarser solution to this grid (world units)
                params = sample(params, grid, level.grid.points(dtype, device))
            grid = level.grid
            model = model_cls.build(level.grid, model_opts).to(device, dtype)
            lam = float(opts.per_level(opts.regularization, number, built))
            problem = GridProblem(model, level, affine, lam, opts, getattr(model_opts, "stride", 1), marks,
                                  finest=number == built - 1)

            def record(step: GaussNewtonStep, number=number, problem=problem) -> None:
                raw, _, data, _, landmarks, _ = step.state
                history.append({"stage": f"level{number}", "phase": "gauss-newton", "iteration": step.iteration,
                                "total": step.cost, "data": data, "cg_iterations": step.inner_iterations,
                                "accepted": step.accepted})
                if step.diverged:
                    history[-1]["diverged"] = True
                if marks is not None:
                    history[-1]["landmarks"] = landmarks
                if term.score_name is not None:
                    history[-1][term.score_name] = term.score(raw, problem.level.fixed_features)
                advance(history[-1])
                if slicer is not None:
                    snapshots.append(slicer(problem, step.x))

            fit = minimize_least_squares(problem, params, maxiter=opts.steps(number, built), damping=0.0,
                                         line_search="decrease", max_halvings=MAX_HALVINGS,
                                         infeasible_halvings=FOLD_HALVINGS, gtol=0.0, xtol=0.0, ftol=-1.0,
                                         callback=record)
            params = fit.x
            if fit.interrupted:
                return params, grid, True
    return params, grid, False


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
        valid = None   # the voxels that sample the moving image's NaN voxels hold no data either
        if moving.valid is not None:
            valid = sample(moving.valid[None].to(device, dtype), moving_grid, where)[0].cpu() >= 0.5
    return dataclasses.replace(fixed, data=data, labels=labels, source=None, valid=valid)


def _middle_slice(grid: Grid, device, dtype):
    """A function giving the sampling positions of the middle slice of the full-resolution fixed
    grid for a level's problem and parameters (for the animation)."""
    points = grid.points(dtype, device)
    if grid.dim == 3:
        points = points[:, :, grid.shape[2] // 2]
    flat = points.reshape(-1, grid.dim)

    def snapshot(problem: GridProblem, params: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            displacement = problem.model.field_of(params)
            where = flat + sample(displacement, problem.level.grid, flat).T
            if problem.affine is not None:
                where = problem.affine(where)
        return where.reshape(*points.shape).cpu()

    return snapshot
