"""Dense image registration by Gauss-Newton with a diffusion regulariser (Brox / SUITS / LearnGN).

The moving image is resampled through a map `psi` from the fixed grid's world points into the
moving image: `warped(x) = moving(psi(x))` with `psi(x) = A(x + u(x))` (A: optional affine
pre-alignment; u: a `DisplacementField`, or `exp(v)` of a `StationaryVelocityField`).
Each Gauss-Newton step linearises the residual `r = F(warped) - F(fixed)` (per channel; F from
the `loss=` data term in `FEATURES`: intensities "ssd", locally normalised intensities "ncc",
MIND-SSC features "mind") and solves

    (sum_c g_c g_c^T / C + lam L) du = -sum_c r_c g_c / C - lam L u

where g_c is the world-space gradient of the warped channel (coupled d x d blocks per voxel,
cross terms kept) and L the grid Laplacian (-Delta, Neumann, spacing aware), with the solver core's
CG (matrix free, Jacobi; `solver="cg"`) or AMG-preconditioned CG on the assembled sparse matrix
(pyamg, CPU; `solver="amg"`). The update is applied to u (or to v in SVF mode), then kept only if
the objective `mean r^2 + lam u^T L u / N` decreased (else halved). Coarse to fine over a pyramid,
optionally on a B-spline control grid with a `stride`.

Local NCC ("ncc"): for a window of n voxels with zero-mean, unit-variance contents a and b,
`1 - NCC = |a - b|^2 / (2 n)`, so the residual is the difference of the locally normalised images
`N(I) = (I - mean_w I) / sqrt(var_w I + eps)` (box window of `2 ncc_radius + 1` voxels per axis,
cut at the border; `eps = ncc_eps * var(I)` over the whole image), times the fixed image's standard
deviation (so the residual is in intensity units and `regularization` means about what it means for
"ssd"). N is recomputed on the warped moving image at every evaluation, so the objective is the
SSD of N(warped) and N(fixed). Two approximations, both standard: each voxel is normalised by the statistics of its own window (the
sum over voxels approximates the mean of window NCCs where the local statistics vary slowly), and
the Jacobian treats N as pointwise, `d N(warped)(x) / d u(x) ~ grad N(warped)(x)` (exact when
warping commutes with normalisation, e.g. for translations), ignoring how u moves the window
statistics. The local NCC itself (`shapeflow.losses.images.ncc_loss`, the same window) is
reported per step in `history` ("ncc") and before/after in the metrics ("ncc_before", "ncc_after").
An affine pre-alignment (`prealign="affine"`, `model="affine"`) stays least squares on the
features before `after_warp` (for "ncc": the intensities).
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
from .solvers import CGInfo, assemble_grid_normal_matrix, conjugate_gradient, grid_normal_operator

__all__ = ["ImageOptions", "register_images", "IMAGE_MODELS", "FEATURES", "DataTerm", "SOLVERS", "local_normalise",
           "gauss_newton_step", "gauss_newton_layer"]

IMAGE_MODELS = {"displacement": DisplacementField, "svf": StationaryVelocityField, "affine": Affine}


def _identity_features(image: torch.Tensor) -> torch.Tensor:
    return image


def _mind_features(image: torch.Tensor) -> torch.Tensor:
    from .losses.images import mind_ssc

    return mind_ssc(image.mean(0, keepdim=True))


def local_normalise(image: torch.Tensor, radius: int = 2, eps: float = 1e-2) -> torch.Tensor:
    """`N(I) = (I - mean_w I) / sqrt(var_w I + eps var(I))` per channel: the local NCC residual's images.

    image: (C, *S); mean_w and var_w (population) over the box of `2 radius + 1` voxels per axis
    centred at each voxel, cut at the border (`shapeflow.losses.images.box_mean`); var(I) is the
    channel's variance over the whole image, so N is unchanged by any map `a I + b`, a > 0, and
    flat regions give about 0 rather than amplified noise. Returns (C, *S).
    """
    from .losses.images import box_mean

    axes = tuple(range(1, image.dim()))
    centred = image - image.mean(axes, keepdim=True)          # less cancellation in E[I^2] - E[I]^2
    floor = eps * centred.square().mean(axes, keepdim=True).clamp_min(torch.finfo(image.dtype).tiny)
    mean, mean_square = box_mean(torch.cat([centred, centred * centred]), 2 * radius + 1).chunk(2)
    variance = (mean_square - mean * mean).clamp_min(0)
    return (centred - mean) / torch.sqrt(variance + floor)


def _ncc_residual(fixed: torch.Tensor, opts: ImageOptions) -> Callable[[torch.Tensor], torch.Tensor]:
    """`I -> std(fixed) N(I)` per channel: locally normalised, in the fixed image's intensity units
    (so `regularization` means about the same as for "ssd"). fixed: (C, *S)."""
    scale = fixed.std(tuple(range(1, fixed.dim())), keepdim=True)                  # (C, 1, ...)
    return lambda image: scale * local_normalise(image, opts.ncc_radius, opts.ncc_eps)


def _ncc_score(warped: torch.Tensor, fixed: torch.Tensor, opts: ImageOptions) -> float:
    from .losses.images import ncc_loss

    return 1.0 - float(ncc_loss(warped, fixed, window=2 * opts.ncc_radius + 1))


@dataclass(frozen=True)
class DataTerm:
    """One image `loss=`: what the Gauss-Newton residual `r = F(warped) - F(fixed)` is taken on.

    features: (C, *S) -> (C', *S), applied once per pyramid level to both images before warping
        (the moving features are then resampled, which is exact for intensities).
    after_warp: None, or `(fixed features (C', *S), ImageOptions) -> map`, called once per level; the
        map `(C', *S) -> (C', *S)` is applied to the fixed features then and to the warped moving
        features at every evaluation (for maps that do not commute with warping, such as local
        normalisation); the spatial gradient of its output is taken as the Jacobian.
    same_channels: moving and fixed must have the same number of channels.
    score: None, or `(name, fn(warped (C, *S), fixed (C, *S), opts) -> float)`: a similarity
        reported per step in `history[name]` and as `metrics[name + "_before" / "_after"]`.
    """

    features: Callable[[torch.Tensor], torch.Tensor] = _identity_features
    after_warp: Callable[[torch.Tensor, Any], Callable[[torch.Tensor], torch.Tensor]] | None = None
    same_channels: bool = True
    score: tuple[str, Callable[..., float]] | None = None


#: what the residual is taken on: "ssd" (intensities), "ncc" (locally normalised intensities:
#: local NCC, robust to smooth bias fields and contrast changes) or "mind" (MIND-SSC, multi-modal)
FEATURES: dict[str, DataTerm] = {
    "ssd": DataTerm(),
    "ncc": DataTerm(after_warp=_ncc_residual, score=("ncc", _ncc_score)),
    "mind": DataTerm(features=_mind_features, same_channels=False),
}


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
    solver: str = "cg"                   # Gauss-Newton system: "cg" (matrix free, Jacobi) or "amg" (pyamg, CPU)
    ncc_radius: int = 2                  # loss="ncc": window of 2 r + 1 voxels per axis (ANTs' CC radius)
    ncc_eps: float = 1e-2                # loss="ncc": variance floor, relative to the image's variance
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
    fixed: torch.Tensor           # (C, *S) residual features of the fixed image on the level grid
    moving: torch.Tensor          # (C, *S_m) features on the moving level grid (before warping)
    grid: Grid
    moving_grid: Grid
    fixed_features: torch.Tensor  # (C, *S) the fixed features before `after_warp` (for scores)
    after_warp: Callable[[torch.Tensor], torch.Tensor] | None = None   # (C, *S) -> (C, *S), see `DataTerm`


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


def _solve_cg(jac: torch.Tensor, rhs: torch.Tensor, lam: float, spacing: list[float], tol: float,
              maxiter: int) -> tuple[torch.Tensor, CGInfo]:
    """Jacobi-preconditioned CG with the fused matrix-free operator (any device)."""
    operator = grid_normal_operator(jac, lam=lam, spacing=spacing)
    return conjugate_gradient(operator, rhs, M=operator.diagonal(), tol=tol, maxiter=maxiter)


def _solve_amg(jac: torch.Tensor, rhs: torch.Tensor, lam: float, spacing: list[float], tol: float,
               maxiter: int) -> tuple[torch.Tensor, CGInfo]:
    """AMG-preconditioned CG (pyamg smoothed aggregation) on the assembled sparse matrix (CPU)."""
    if rhs.device.type != "cpu":
        raise ShapeflowError(f"gauss_newton_step(): solver='amg' runs on the CPU (pyamg) but the tensors are on "
                             f"{rhs.device}; use solver='cg' or device='cpu'")
    # float64 throughout: pyamg needs the matrix and the vectors in one dtype, and its hierarchy is
    # more robust in double precision; the step comes back in the caller's dtype
    A = assemble_grid_normal_matrix(jac.double(), lam=lam, spacing=spacing)
    x, info = conjugate_gradient(A, rhs.double(), tol=tol, maxiter=maxiter, backend="amg")
    return x.to(rhs.dtype), info


#: inner solvers of the Gauss-Newton system: `(jac (K, d, *S), rhs (d prod S,), lam, spacing, tol,
#: maxiter) -> (du (d prod S,), CGInfo)` for `(J^T J + lam L) du = rhs`
SOLVERS: dict[str, Callable[..., tuple[torch.Tensor, CGInfo]]] = {"cg": _solve_cg, "amg": _solve_amg}


def gauss_newton_step(residual: torch.Tensor, gradient: torch.Tensor, u: torch.Tensor, grid: Grid, lam: float,
                      project: Callable | None = None, cg_iterations: int = 60, cg_tol: float = 1e-3,
                      solver: str = "cg"):
    """One regularised Gauss-Newton update for a displacement `u: (d, *S)`.

    residual: (C, *S) warped minus fixed; gradient: (C, d, *S) world gradient of the warped image.
    Solves `(sum_c g g^T / C + lam L) du = -sum_c r g / C - lam L u` (with `project` = (P, P^T) for a
    control grid: unknowns z, du = P z) to relative residual `cg_tol` in at most `cg_iterations`
    iterations. solver: a name in `SOLVERS`: "cg" (matrix-free operator, Jacobi preconditioner)
    or "amg" (the matrix assembled by `assemble_grid_normal_matrix`, AMG-preconditioned CG through
    pyamg: CPU tensors, `pip install "shapeflow[amg]"`, no control grid). Returns `(du (d, *S), CGInfo)`.
    """
    if solver not in SOLVERS:
        raise ShapeflowError(f"gauss_newton_step(): unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
    if solver != "cg" and project is not None:
        raise ShapeflowError(f"gauss_newton_step(): solver={solver!r} needs a dense field (stride=1); "
                             "use solver='cg' with a control grid")
    C = gradient.shape[0]
    spacing = grid.spacing.tolist()
    rhs = -(residual[:, None] * gradient).sum(0) / C - lam * grid_laplacian_apply(u, spacing)   # (d, *S)
    if project is None:  # per-voxel blocks and the stencil: fused operator (cg) or assembled matrix (amg)
        x, info = SOLVERS[solver](gradient / math.sqrt(C), rhs.reshape(-1), lam, spacing, cg_tol, cg_iterations)
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
    term = _lookup(FEATURES, loss, "image loss")
    _lookup(SOLVERS, opts.solver, "image solver")
    if opts.prealign not in (None, "affine"):
        raise ShapeflowError(f"register(): image prealign must be None or 'affine', got {opts.prealign!r}")
    if not isinstance(opts.ncc_radius, int) or isinstance(opts.ncc_radius, bool) or opts.ncc_radius < 1:
        raise ShapeflowError(f"register(): ncc_radius must be an int >= 1 (voxels), got {opts.ncc_radius!r}")
    if not (isinstance(opts.ncc_eps, (int, float)) and opts.ncc_eps > 0):
        raise ShapeflowError(f"register(): ncc_eps must be a number > 0, got {opts.ncc_eps!r}")
    moving = image_metrics.attach_labels(moving, opts.labels_moving, "labels_moving")
    fixed = image_metrics.attach_labels(fixed, opts.labels_fixed, "labels_fixed")
    if moving.dim != fixed.dim:
        raise ShapeflowError(f"register(): moving image is {moving.dim}D but fixed image is {fixed.dim}D"
                             f"{_names(moving, fixed)}")
    if moving.data.shape[0] != fixed.data.shape[0] and term.same_channels:
        raise ShapeflowError(f"register(): moving has {moving.data.shape[0]} channels, fixed {fixed.data.shape[0]}; "
                             f"loss={loss!r} needs the same (or use loss='mind')")
    device, dtype = _resolve_device(opts.device), getattr(torch, opts.dtype)
    if opts.solver == "amg" and model != "affine":
        if opts.stride != 1:
            raise ShapeflowError(f"register(): solver='amg' needs stride=1 (a dense field), got stride={opts.stride}")
        if device.type != "cpu":
            raise ShapeflowError(f"register(): solver='amg' runs on the CPU (pyamg), got device {str(device)!r}; "
                                 "use device='cpu' or solver='cg'")
        from .solvers._optional import import_optional

        import_optional("pyamg", "register(): solver='amg'")
    start = time.perf_counter()
    fixed_grid, moving_grid = Grid.of(fixed), Grid.of(moving)
    prep = _normalise if opts.normalize else (lambda x: x)
    f_data, m_data = prep(fixed.data.to(device, dtype)), prep(moving.data.to(device, dtype))
    fixed_levels = _pyramid(f_data, fixed_grid, opts.levels)
    moving_levels = _pyramid(m_data, moving_grid, len(fixed_levels))
    levels = [_level(term, f, m, g, mg, opts) for (f, g), (m, mg) in zip(fixed_levels, moving_levels)]

    history: list[dict] = []
    snapshots: list[torch.Tensor] = []
    slicer = _middle_slice(fixed_grid, device, dtype) if opts.snapshots else None
    affine = _affine_levels(levels, history) if opts.prealign == "affine" or model == "affine" else None
    core = None
    if model != "affine":
        params, params_grid, interrupted = _fit_levels(model_cls, levels, term, affine, opts, history, snapshots,
                                                       slicer, f"{model} ({loss})", device, dtype)
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
    if term.score is not None:
        name, score = term.score
        before = image_metrics._on_fixed_grid(moving, fixed, device, dtype)
        metrics[f"{name}_before"] = score(before, fixed.data.to(before), opts)
        metrics[f"{name}_after"] = score(warped.data.to(before), fixed.data.to(before), opts)
    metrics["seconds"] = seconds
    metrics["interrupted"] = any(r.get("stopped") == "interrupted" for r in history)
    record = {"model": model, "loss": loss, **{k: v for k, v in dataclasses.asdict(opts).items()
                                                 if not k.startswith(("labels_", "landmarks_"))},
              "source": moving.source, "target": fixed.source}
    return Result(warped=warped, deformation=deformation, history=[r for r in history if "stopped" not in r],
                  metrics=metrics, source=moving, target=fixed, options=record, snapshots=snapshots)


def _level(term: DataTerm, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid, moving_grid: Grid,
           opts: ImageOptions) -> _Level:
    """One pyramid level: fixed (C, *S) and moving (C, *S_m) intensities turned into `term`'s features."""
    fixed_features, moving_features = term.features(fixed), term.features(moving)
    if term.after_warp is None:
        return _Level(fixed_features, moving_features, grid, moving_grid, fixed_features)
    after_warp = term.after_warp(fixed_features, opts)
    return _Level(after_warp(fixed_features), moving_features, grid, moving_grid, fixed_features, after_warp)


def _fit_levels(model_cls, levels: list[_Level], term: DataTerm, affine, opts: ImageOptions, history: list,
                snapshots: list, slicer, description: str, device, dtype):
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
            stepper = _Stepper(model_cls, level, term, points, affine, lam, opts, advance)
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

    def __init__(self, model_cls, level: _Level, term: DataTerm, grid_points, affine, lam: float, opts: ImageOptions,
                 advance=None):
        self.advance = advance or (lambda row=None: None)
        self.level, self.points, self.affine, self.lam, self.opts = level, grid_points, affine, lam, opts
        self.term = term
        self.svf = model_cls is StationaryVelocityField
        self.helper = StationaryVelocityField(level.grid).to(grid_points) if self.svf else None
        self.project = _projection(level.grid, opts.stride, grid_points) if opts.stride > 1 else None
        self.best = None

    def displacement(self, params: torch.Tensor) -> torch.Tensor:
        return self.helper.exponential(params) if self.svf else params

    def warp(self, params: torch.Tensor) -> torch.Tensor:
        """The moving features resampled through the current map, (C, *S) on the level grid."""
        where = self.points + self.displacement(params).movedim(0, -1)
        if self.affine is not None:
            where = self.affine(where.reshape(-1, where.shape[-1])).reshape(where.shape)
        return sample(self.level.moving, self.level.moving_grid, where)

    def residual_features(self, warped: torch.Tensor) -> torch.Tensor:
        """F(warped): the warped features after the data term's `after_warp` (e.g. local normalisation)."""
        return warped if self.level.after_warp is None else self.level.after_warp(warped)

    def objective(self, params: torch.Tensor, warped: torch.Tensor) -> tuple[float, float]:
        data = float((warped - self.level.fixed).pow(2).mean())
        reg = float((params * grid_laplacian_apply(params, self.level.grid.spacing.tolist())).sum(0).mean())
        return data + self.lam * reg, data

    def run(self, params, iterations: int, history: list, number: int, snapshots: list, slicer) -> torch.Tensor:
        with torch.no_grad():
            raw = self.warp(params)
            warped = self.residual_features(raw)
            total, data = self.objective(params, warped)
            self.best = params
            fixed_gradient = spatial_gradient(self.level.fixed, self.level.grid)
            for step in range(iterations):
                # symmetric (ESM) gradient: the mean of the warped and fixed gradients converges in
                # fewer steps than the warped gradient alone (Vercauteren et al. 2009)
                gradient = (spatial_gradient(warped, self.level.grid) + fixed_gradient) / 2
                du, info = gauss_newton_step(warped - self.level.fixed, gradient, params, self.level.grid, self.lam,
                                             self.project, self.opts.cg_iterations, self.opts.cg_tol, self.opts.solver)
                accepted = False
                for _ in range(4):      # backtrack: keep the step only if the objective decreases
                    trial = params + du
                    trial_raw = self.warp(trial)
                    trial_warped = self.residual_features(trial_raw)
                    trial_total, trial_data = self.objective(trial, trial_warped)
                    if trial_total < total:
                        params, raw, warped, total, data, accepted = (trial, trial_raw, trial_warped, trial_total,
                                                                      trial_data, True)
                        break
                    du = du / 2
                history.append({"stage": f"level{number}", "phase": "gauss-newton", "iteration": step, "total": total,
                                "data": data, "cg_iterations": int(info.iterations.max()), "accepted": accepted})
                if self.term.score is not None:
                    name, score = self.term.score
                    history[-1][name] = score(raw, self.level.fixed_features, self.opts)
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
    fixed = level.fixed_features.reshape(level.fixed_features.shape[0], -1)            # (C, N)
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

    from .image_io import IMAGE_WRITERS

    folder = Path(folder)
    suffix = name or (suffix_of(result.target.source) if result.target.source else ".nii.gz")
    # NIfTI where the fixed image's format can't hold the result: a 3D image from a 2D picture
    # format, or a format we read but do not write (a DICOM file or series folder)
    if suffix not in IMAGE_WRITERS or (result.warped.dim == 3 and suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff")):
        suffix = ".nii.gz"
    write(dataclasses.replace(result.warped, labels=None), folder / f"warped{suffix}")
    if result.warped.labels is not None:
        labels = dataclasses.replace(result.warped, data=result.warped.labels[None].float(), labels=None)
        write(labels, folder / f"warped_labels{'.nii.gz' if result.warped.dim == 3 else '.png'}")
    atomic_write(folder / "displacement.nii.gz", lambda tmp: _write_displacement_nifti(displacement_image(result), tmp))
    overlay(result, folder / "overlay.png")
