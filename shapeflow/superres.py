"""Super-resolution of 2D images from shifted low-resolution views, by variable projection.

`reconstruct(views, factor)` recovers a high-resolution image f (`factor` times finer) and one
affine map per view (the first view is the reference frame and is not moved) from q views
`d_j = K I(w_j) f` (Chung, Haber & Nagy 2006; Watson, Cherry & Lang, seed 001, Sec. 4):

    J(w, f) = |(I (x) K) I(w) f - d|^2 h_d + lam^2 |L f|^2 h_f

I(w_j): interpolation of f at `y(x; w_j) = (I + A_j)(x - c) + c + t_j` on the fine cell-centred
grid of the unit square (zero outside): the C^2 cubic spline (default; linear in f through its
coefficients) or multilinear, whose kinks cap the Taylor test's second-order decay at h^1.5; K: the average over `factor x factor` blocks;
L: forward differences divided by h_f (the gradient). f is eliminated by CG
(`shapeflow.solvers.VariableProjection`), w fitted by Gauss-Newton with the reduced Jacobian
computed as `jacobian=` says ("none", "full", "partial", "inexact"). Views are `(H, W)` arrays or
tensors (or 2D `Image`s, whose data is taken), all the same size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ShapeflowError
from .grids import Grid
from .interpolation import INTERPOLATIONS, linear_sample, spline_coefficients, spline_sample
from .shapes import Image
from .solvers.varpro import VARPRO_JACOBIANS, VariableProjection

__all__ = ["reconstruct", "SuperResolution", "SuperResolutionModel"]


@dataclass
class SuperResolution:
    """image: (factor H, factor W) the reconstruction (solved exactly at the fitted maps);
    parameters: (q - 1, 6) per moved view `(A_11, A_12, A_21, A_22, t_1, t_2)` (A: the deviation from
    the identity; t in units of the unit square); history: reduced cost per Gauss-Newton step;
    gradient_norms: |J^T r| per step."""

    image: torch.Tensor
    parameters: torch.Tensor
    history: list[float] = field(default_factory=list)
    gradient_norms: list[float] = field(default_factory=list)
    iterations: int = 0


class SuperResolutionModel:
    """The forward model `d = (I (x) K) I(w) f` of q views of size (H, W) at `factor`.

    `predict(w, f)`: w (6 (q - 1),), f (factor H, factor W) -> (q, H, W), weighted by sqrt(h_d);
    `gradient(f)`: L f (2, ...) weighted by sqrt(h_f); `warp(w, f)` -> (q, factor H, factor W)
    the high-resolution views before pooling.
    """

    def __init__(self, q: int, shape: tuple[int, int], factor: int, dtype=torch.float64, device=None,
                 interpolation: str = "spline"):
        INTERPOLATIONS.lookup(interpolation, "reconstruct()")
        self.q, self.shape, self.factor, self.interpolation = q, shape, factor, interpolation
        self.fine = (shape[0] * factor, shape[1] * factor)
        self.h_fine = (1.0 / self.fine[0], 1.0 / self.fine[1])
        self.h_data = (1.0 / shape[0], 1.0 / shape[1])
        as64 = lambda v: torch.tensor(v, dtype=torch.float64)
        self.grid = Grid(self.fine, as64(self.h_fine), as64([h / 2 for h in self.h_fine]), torch.eye(2, dtype=torch.float64))
        self.points = self.grid.points(dtype, device).reshape(-1, 2)                      # (N, 2)
        self.centre = torch.full((2,), 0.5, dtype=dtype, device=device)

    def warp(self, w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        views = [f]
        eye = torch.eye(2, dtype=f.dtype, device=f.device)
        coefficients = spline_coefficients(f[None], self.grid) if self.interpolation == "spline" else None
        for j in range(self.q - 1):
            a = w[6 * j: 6 * j + 6]
            where = (self.points - self.centre) @ (eye + a[:4].reshape(2, 2)).T + self.centre + a[4:]
            moved = (linear_sample(f[None], self.grid, where, padding="zeros") if coefficients is None
                     else spline_sample(coefficients, self.grid, where, padding="zeros"))
            views.append(moved.reshape(self.fine))
        return torch.stack(views)

    def predict(self, w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(self.warp(w, f)[:, None], self.factor)[:, 0]
        return pooled * float(np.sqrt(self.h_data[0] * self.h_data[1]))

    def gradient(self, f: torch.Tensor) -> torch.Tensor:
        dx = torch.diff(f, dim=0) / self.h_fine[0]
        dy = torch.diff(f, dim=1) / self.h_fine[1]
        return torch.cat([dx.reshape(-1), dy.reshape(-1)]) * float(np.sqrt(self.h_fine[0] * self.h_fine[1]))


def _as_tensor(view: Any, index: int) -> torch.Tensor:
    data = view.data[0] if isinstance(view, Image) else view
    try:
        data = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data)
    except (TypeError, ValueError):
        raise ShapeflowError(f"reconstruct(): views[{index}] is not an array") from None
    if data.dim() != 2:
        raise ShapeflowError(f"reconstruct(): views[{index}] has shape {tuple(data.shape)}; views are 2D (H, W)")
    return data


def reconstruct(views: Sequence[Any], factor: int = 2, *, lam: float = 0.01, jacobian: str = "full",
                p: float = 0.9, cg_iterations: int = 25, cg_tol: float = 1e-8, iterations: int = 10,
                damping: float = 0.0, w0: Optional[torch.Tensor] = None, dtype: str = "float64",
                interpolation: str = "spline") -> SuperResolution:
    """A `factor` times finer image from q >= 2 views of the same size (module docstring).

    views: (H, W) arrays, tensors or 2D Images; views[0] fixes the frame. lam: weight of the
    gradient regulariser. jacobian: "none" | "full" | "partial" (last fraction `p` of CG
    differentiated) | "inexact" (`cg_iterations` CG steps per projection). iterations: Gauss-Newton
    steps; damping > 0: Levenberg-Marquardt. w0: (6 (q - 1),) start (default: identity maps).
    interpolation: "spline" (C^2) or "linear" (the moved views). Returns a `SuperResolution`.
    """
    who = "reconstruct()"
    VARPRO_JACOBIANS.lookup(jacobian, who)
    if not isinstance(views, (list, tuple)) or len(views) < 2:
        raise ShapeflowError(f"{who}: views must be a list of at least 2 images, got {type(views).__name__}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ShapeflowError(f"{who}: factor must be an int >= 1, got {factor!r}")
    if dtype not in ("float32", "float64"):
        raise ShapeflowError(f"{who}: dtype must be 'float32' or 'float64', got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    data = [_as_tensor(v, i).to(torch_dtype) for i, v in enumerate(views)]
    for i, d in enumerate(data[1:], start=1):
        if d.shape != data[0].shape:
            raise ShapeflowError(f"{who}: views[{i}] is {tuple(d.shape)} but views[0] is {tuple(data[0].shape)}; "
                                 "all views must have the same size")
    q, shape = len(data), tuple(data[0].shape)
    model = SuperResolutionModel(q, shape, factor, torch_dtype, interpolation=interpolation)
    scale = float(np.sqrt(model.h_data[0] * model.h_data[1]))
    problem = VariableProjection(model.predict, torch.stack(data) * scale, model.fine, regularizer=model.gradient,
                                 lam=lam, jacobian=jacobian, p=p, cg_iterations=cg_iterations, cg_tol=cg_tol)
    start = torch.zeros(6 * (q - 1), dtype=torch_dtype) if w0 is None else torch.as_tensor(w0).to(torch_dtype)
    if start.shape != (6 * (q - 1),):
        raise ShapeflowError(f"{who}: w0 must have shape ({6 * (q - 1)},), got {tuple(start.shape)}")
    fit = problem.minimize(start, iterations=iterations, damping=damping)
    return SuperResolution(image=fit.f, parameters=fit.w.reshape(q - 1, 6), history=fit.history,
                           gradient_norms=fit.gradient_norms, iterations=fit.iterations)
