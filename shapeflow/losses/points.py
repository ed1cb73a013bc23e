"""Data terms between point sets: Chamfer, Sinkhorn (optimal transport through geomloss) and L2.

Functions do the work (`chamfer_loss(x, y)`); the `nn.Module` wrappers only hold options.
Every function takes `source: (N, d)` and `target: (M, d)` and returns a 0-d tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ShapeflowError
from ..kernels import SINKHORN_BACKENDS, nearest_neighbors, sinkhorn_backend
from ..kernels.backends import quiet_import
from ..shapes import PointCloud
from .base import PointLoss, Stage

__all__ = ["chamfer_loss", "sinkhorn_loss", "l2_loss", "nearest_neighbors",
           "ChamferLoss", "SinkhornLoss", "L2Loss"]


def chamfer_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Symmetric squared Chamfer distance
    `mean_i min_j |x_i - y_j|^2 + mean_j min_i |x_i - y_j|^2`.

    The nearest neighbours come from `nearest_neighbors` (a KD-tree on the CPU, a KeOps argmin
    on CUDA; no (N, M) matrix either way); the loss is then taken on
    the gathered pairs, so its gradient is exact almost everywhere (away from ties).
    """
    _check_pair(source, target, "chamfer_loss")
    to_target = nearest_neighbors(source, target)   # (N,)
    to_source = nearest_neighbors(target, source)   # (M,)
    return ((source - target[to_target]).pow(2).sum(1).mean()
            + (target - source[to_source]).pow(2).sum(1).mean())


def sinkhorn_loss(source: torch.Tensor, target: torch.Tensor, blur: float = 0.02,
                  reach: float | None = None, scaling: float = 0.5, backend: str = "auto") -> torch.Tensor:
    """Debiased Sinkhorn divergence between the uniform measures on `source: (N, d)` and
    `target: (M, d)` (geomloss, cost `|x - y|^2 / 2`) -> 0-d tensor. `blur` is the length scale
    of the entropic blur, `reach` (optional) makes it unbalanced, tolerating outliers and
    missing parts. backend: "auto" (`shapeflow.kernels.sinkhorn_backend`: dense "tensorized"
    below the KeOps threshold, KeOps "online"/"multiscale" above or on CUDA), or a geomloss
    backend by name ("tensorized", "online", "multiscale")."""
    _check_pair(source, target, "sinkhorn_loss")
    return _samples_loss(source, target, blur, reach, scaling, backend)(source, target)


def _samples_loss(source: torch.Tensor, target: torch.Tensor, blur: float, reach: float | None,
                  scaling: float, backend: str):
    """geomloss `SamplesLoss` for this pair, its backend resolved by `sinkhorn_backend`."""
    chosen = sinkhorn_backend(backend, source.shape[0], target.shape[0], source.shape[1], source.device)
    SamplesLoss = quiet_import("geomloss", "sinkhorn_loss()").SamplesLoss
    return SamplesLoss("sinkhorn", p=2, blur=blur, reach=reach, scaling=scaling, debias=True, backend=chosen)


def l2_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between corresponding points `mean_i |x_i - y_i|^2` (N == M)."""
    _check_pair(source, target, "l2_loss")
    if source.shape[0] != target.shape[0]:
        raise ShapeflowError(f"l2_loss: needs point-to-point correspondence, but source has "
                             f"{source.shape[0]} points and target {target.shape[0]}")
    return (source - target).pow(2).sum(1).mean()


def _check_pair(source: torch.Tensor, target: torch.Tensor, who: str) -> None:
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ShapeflowError(f"{who}: source {tuple(source.shape)} and target {tuple(target.shape)} "
                             "must both be (N, d) with the same d")


class ChamferLoss(PointLoss):
    """`chamfer_loss` as a module. Needs no correspondence; cheap at any size. Fitted on a
    farthest-point subsample of `subsample` points per shape (default 4000)."""

    name = "chamfer"
    pairing = "closest"

    @dataclass
    class Options:
        subsample: int = 4000           # points per shape the loss is fitted on

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return chamfer_loss(source, target)


class SinkhornLoss(PointLoss):
    """`sinkhorn_loss` as a module holding `blur`, `reach`, `scaling` and `backend`.

    Its fitting plan (`stages`) is coarse to fine: the Sinkhorn divergence on a 256-point
    farthest-point subsample with 3x the blur finds the global correspondence cheaply, then a
    refinement runs with `refine` (default "chamfer", on `subsample` = 4000 points) or, with
    `refine=None`, with Sinkhorn itself (on `subsample` = 512 points).
    """

    name = "sinkhorn"
    #: points per shape in the coarse stage, and the fine stage's default size per refinement
    COARSE_POINTS = 256
    FINE_POINTS = {None: 512, "chamfer": 4000}

    @dataclass
    class Options:
        blur: float = 0.02               # entropic blur, relative to the target's RMS radius
        reach: float | None = None       # unbalanced Sinkhorn reach (relative), None = balanced
        subsample: int | None = None     # points per shape in the fine stage (default 4000, or 512 with refine=None)
        coarse_to_fine: bool = True      # fit 256 points with 3x the blur first
        refine: str | None = "chamfer"   # the fine stage's loss ("chamfer"), or None: Sinkhorn throughout

    def __init__(self, *, blur: float = 0.02, reach: float | None = None, scaling: float = 0.5,
                 backend: str = "auto"):
        super().__init__()
        SINKHORN_BACKENDS.lookup(backend, "SinkhornLoss()")
        self.blur, self.reach, self.scaling, self.backend = blur, reach, scaling, backend

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sinkhorn_loss(source, target, self.blur, self.reach, self.scaling, self.backend)

    @classmethod
    def build(cls, options: "SinkhornLoss.Options", blur_scale: float = 1.0) -> "SinkhornLoss":
        return cls(blur=blur_scale * options.blur, reach=options.reach)

    @classmethod
    def stages(cls, options: "SinkhornLoss.Options", iterations: int, source: PointCloud,
               target: PointCloud) -> list[Stage]:
        if options.refine not in (None, "chamfer"):
            raise ShapeflowError(f"register(): unknown refine loss {options.refine!r}; choose from chamfer, "
                                 "or None (Sinkhorn throughout)")
        points = options.subsample if options.subsample is not None else cls.FINE_POINTS[options.refine]
        fine_loss = cls.build(options) if options.refine is None else ChamferLoss()
        fine = Stage("fine", fine_loss, points, iterations)
        if not options.coarse_to_fine or (min(len(source), len(target)) <= cls.COARSE_POINTS and options.refine is None):
            return [fine]
        coarse = Stage("coarse", cls.build(options, blur_scale=3.0), cls.COARSE_POINTS, iterations)
        # a fresh Adam moves every parameter by about lr at once: refine with smaller steps
        fine.lr_scale = 1 / 3
        return [coarse, fine]


class L2Loss(PointLoss):
    """`l2_loss` as a module. Needs point-to-point correspondence; fitted on every point."""

    name = "l2"
    correspondence = True
    pairing = "corresponding"

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return l2_loss(source, target)
