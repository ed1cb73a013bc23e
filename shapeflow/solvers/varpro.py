"""Variable projection for separable least squares, the inner solve differentiated fully, partly or not.

The problem `min_{w, f} |A(w) f - b|^2 + lam^2 |L f|^2` is linear in f: for fixed w the best f is
`f(w) = (A^T A + lam^2 L^T L)^{-1} A^T b`, found by CG on the normal equations (`A^T` applied by a
vector-Jacobian product of the forward map, which is linear in f). The reduced residual

    r(w) = [A(w) f(w) - b ; lam L f(w)]

is minimised over w alone by Gauss-Newton (`minimize_least_squares`). Its Jacobian
`dr/dw = dA/dw f + A df/dw` is computed by forward-mode AD (`torch.func.jacfwd`: all parameters' tangents in one batched pass;
CG's data-dependent stopping test is replaced by the step count found first without tangents,
which gives the same iterates), with df/dw (`jacobian=`):

* "none": ignored (f held constant; Chung, Haber & Nagy 2006). The gradient J^T r is still exact
  at an exact inner solve, the Gauss-Newton matrix is not;
* "full": differentiated through every CG iteration (unrolled CG, run to `cg_tol`);
* "partial": through the last fraction `p` of the iterations only: the first `(1 - p) N` run on a
  detached operator (N from a first solve to `cg_tol`), CG then restarts from that constant
  iterate with the tangents on;
* "inexact": through every iteration of a fixed, inexact number `cg_iterations` of CG steps (the
  cost and the Jacobian then both belong to that truncated solve).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from shapeflow._registry import Registry
from shapeflow.errors import ShapeflowError
from shapeflow.solvers.gauss_newton import Linearization, minimize_least_squares
from shapeflow.solvers.linear.cg import conjugate_gradient

__all__ = ["VariableProjection", "VarProResult", "VARPRO_JACOBIANS"]

#: how df/dw enters the reduced Jacobian
VARPRO_JACOBIANS: Registry[str] = Registry("jacobian", {
    "none": "df/dw ignored", "full": "through all CG iterations", "partial": "through the last fraction p",
    "inexact": "through a fixed number of CG iterations"})


@dataclass
class VarProResult:
    """w: (n,) the parameters; f: the linear unknowns at w (shape `f_shape`, solved to `cg_tol`);
    history: the reduced cost `1/2 |r|^2` at w0 and after each accepted Gauss-Newton step;
    gradient_norms: |J^T r| at each linearisation; iterations: Gauss-Newton iterations run."""

    w: Tensor
    f: Tensor
    history: list[float] = field(default_factory=list)
    gradient_norms: list[float] = field(default_factory=list)
    iterations: int = 0


class VariableProjection:
    """`min_w min_f |A(w) f - b|^2 + lam^2 |L f|^2` by variable projection (module docstring).

    forward: (w (n,), f `f_shape`) -> prediction (any shape), linear in f; data b: that shape.
    regularizer: f -> L f (any shape), linear; None for L = 0 (lam ignored). jacobian: a name in
    `VARPRO_JACOBIANS`; p: the differentiated fraction for "partial", in (0, 1]; cg_iterations:
    the CG steps of "inexact". cg_tol, cg_maxiter: the inner solves otherwise.
    """

    def __init__(self, forward: Callable[[Tensor, Tensor], Tensor], data: Tensor, f_shape: tuple[int, ...], *,
                 regularizer: Optional[Callable[[Tensor], Tensor]] = None, lam: float = 0.0, jacobian: str = "full",
                 p: float = 0.9, cg_iterations: int = 25, cg_tol: float = 1e-8, cg_maxiter: Optional[int] = None):
        who = "VariableProjection()"
        VARPRO_JACOBIANS.lookup(jacobian, who)
        if not 0.0 < p <= 1.0:
            raise ShapeflowError(f"{who}: p must be in (0, 1], got {p}")
        if not (isinstance(cg_iterations, int) and cg_iterations >= 1):
            raise ShapeflowError(f"{who}: cg_iterations must be an int >= 1, got {cg_iterations!r}")
        if not lam >= 0:
            raise ShapeflowError(f"{who}: lam must be >= 0, got {lam}")
        self.forward, self.data, self.f_shape = forward, data, tuple(f_shape)
        self.regularizer, self.lam, self.mode, self.p = regularizer, float(lam), jacobian, float(p)
        self.cg_iterations, self.cg_tol = cg_iterations, cg_tol
        self.cg_maxiter = cg_maxiter or 10 * math.prod(self.f_shape)

    # ------------------------------------------------------------------ the inner problem

    def _normal(self, w: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
        """(v -> (A^T A + lam^2 L^T L) v, A^T b), both on flattened f (m,)."""
        shape = self.f_shape
        zero = torch.zeros(math.prod(shape), dtype=self.data.dtype, device=self.data.device)
        _, a_t = torch.func.vjp(lambda f: self.forward(w, f.reshape(shape)), zero)
        if self.regularizer is not None and self.lam > 0:
            _, l_t = torch.func.vjp(lambda f: self.regularizer(f.reshape(shape)), zero)
        else:
            l_t = None

        def op(v: Tensor) -> Tensor:
            out = a_t(self.forward(w, v.reshape(shape)))[0]
            if l_t is not None:
                out = out + self.lam ** 2 * l_t(self.regularizer(v.reshape(shape)))[0]
            return out

        return op, a_t(self.data)[0]

    def _plan(self, w: Tensor, mode: str) -> tuple[Tensor | None, int]:
        """(constant start f0 or None, CG steps to differentiate) for `mode` at w, found without
        tangents: "full": the steps CG needs to reach cg_tol; "partial": the first (1 - p) of those
        run here (f0), then the steps the restarted CG needs from f0; "inexact": cg_iterations."""
        if mode == "inexact":
            return None, self.cg_iterations
        op, rhs = self._normal(w.detach())
        with torch.no_grad():
            _, info = conjugate_gradient(op, rhs, tol=self.cg_tol, maxiter=self.cg_maxiter, backend="torch")
            total = int(info.iterations)
            if mode == "full":
                return None, total
            first = int(math.floor((1.0 - self.p) * total + 1e-9))
            f0, _ = conjugate_gradient(op, rhs, tol=0.0, maxiter=first, backend="torch")
            _, info = conjugate_gradient(op, rhs, x0=f0, tol=self.cg_tol, maxiter=self.cg_maxiter, backend="torch")
        return f0.detach(), int(info.iterations)

    def _tracked(self, w: Tensor, plan: tuple[Tensor | None, int]) -> Tensor:
        """f(w) by exactly `plan[1]` CG steps from the constant `plan[0]`, every step differentiable
        (a fixed count: no data-dependent stop, so `torch.func.jacfwd` can batch the tangents)."""
        op, rhs = self._normal(w)
        f, _ = conjugate_gradient(op, rhs, x0=plan[0], tol=0.0, maxiter=plan[1], backend="torch")
        return f.reshape(self.f_shape)

    def solve(self, w: Tensor, mode: Optional[str] = None) -> Tensor:
        """f(w): `f_shape`, by CG on the normal equations, differentiable in w as `mode` (default:
        this problem's `jacobian`) says; "exact" (and "none") solve to `cg_tol` without tangents."""
        mode = mode or self.mode
        if mode in ("none", "exact"):
            op, rhs = self._normal(w.detach())
            with torch.no_grad():
                f, _ = conjugate_gradient(op, rhs, tol=self.cg_tol, maxiter=self.cg_maxiter, backend="torch")
            return f.reshape(self.f_shape)
        with torch.enable_grad():
            return self._tracked(w, self._plan(w, mode))

    # ------------------------------------------------------------------ the reduced problem

    def residual(self, w: Tensor, f: Optional[Tensor] = None) -> Tensor:
        """r(w) = [A(w) f - b; lam L f] flattened, f = `solve(w)` unless given (held constant)."""
        f = self.solve(w) if f is None else f
        r = (self.forward(w, f) - self.data).reshape(-1)
        if self.regularizer is not None and self.lam > 0:
            r = torch.cat([r, self.lam * self.regularizer(f).reshape(-1)])
        return r

    def jacobian(self, w: Tensor) -> Tensor:
        """dr/dw: (m, n) by forward-mode AD (`torch.func.jacfwd`; df/dw as `jacobian` says). The CG
        step counts are fixed first, without tangents, so the batched tangents see no data-dependent
        stopping test."""
        w = w.detach()
        if self.mode == "none":
            f0 = self.solve(w, "exact")
            fn = lambda v: self.residual(v, f0)
        else:
            plan = self._plan(w, self.mode)
            fn = lambda v: self.residual(v, self._tracked(v, plan))
        with torch.enable_grad():
            return torch.func.jacfwd(fn)(w)

    def cost(self, w: Tensor) -> float:
        """1/2 |r(w)|^2 (f solved as `jacobian` says: to cg_tol, or by cg_iterations steps for "inexact")."""
        with torch.no_grad():
            return float(0.5 * self.residual(w.detach(), self.solve(w, "inexact" if self.mode == "inexact" else "exact"))
                         .pow(2).sum())

    def minimize(self, w0: Tensor, *, iterations: int = 10, damping: float = 0.0,
                 callback: Optional[Callable[[int, Tensor, float], None]] = None) -> VarProResult:
        """Gauss-Newton on r(w) from `w0: (n,)` for at most `iterations` steps (Armijo line search;
        `damping` > 0: Levenberg-Marquardt). callback(iteration, w, cost). Returns a `VarProResult`."""
        norms: list[float] = []
        problem = _Reduced(self, norms)
        tell = (lambda step: callback(step.iteration, step.x, step.cost)) if callback is not None else None
        fit = minimize_least_squares(problem, w0.detach().clone(), maxiter=iterations, damping=damping,
                                     line_search="armijo", max_halvings=10, gtol=0.0, xtol=0.0, ftol=0.0,
                                     callback=tell)
        with torch.no_grad():
            f = self.solve(fit.x, "exact")
        return VarProResult(w=fit.x, f=f, history=fit.history, gradient_norms=norms, iterations=fit.iterations)


class _Reduced:
    """The reduced problem as a `LeastSquaresProblem` for `minimize_least_squares`."""

    def __init__(self, vp: VariableProjection, norms: list[float]):
        self.vp, self.norms = vp, norms

    def cost(self, w: Tensor) -> tuple[float, None]:
        return self.vp.cost(w), None

    def linearize(self, w: Tensor, state: None) -> Linearization:
        with torch.enable_grad():
            J = self.vp.jacobian(w).detach()
        mode = "inexact" if self.vp.mode == "inexact" else "exact"
        r = self.vp.residual(w, self.vp.solve(w, mode)).detach()
        g = J.T @ r
        self.norms.append(float(g.norm()))
        H = J.T @ J
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)

        def solve(mu: float) -> tuple[Tensor, int]:
            try:
                return torch.linalg.solve(H + mu * eye, -g), 0
            except RuntimeError:
                raise ShapeflowError("VariableProjection.minimize(): the Gauss-Newton matrix J^T J is singular; "
                                     "use damping > 0") from None

        return Linearization(g, solve)
