"""Gauss-Newton / Levenberg-Marquardt for (regularised) nonlinear least squares: one loop.

`minimize_least_squares(problem, x0)` is the loop every Gauss-Newton fit in shapeflow runs (dense
image registration, the affine image pre-alignment, the autodiff `gauss_newton` below). What
varies is injected by the `problem`:

* `cost(x) -> (F(x), state)`: the objective and whatever the linearisation reuses (a warped image);
* `linearize(x, state) -> Linearization`: the gradient `g = J^T r + lam L x` and a `solve(mu)`
  that returns the step of `(J^T J + lam L + mu D) dx = -g` with the problem's normal operator
  (matrix-free CG on a grid, a dense solve for a few parameters, ...; D is I or diag(J^T J)).

Each iteration solves for the step, then a line search (`"armijo"`: sufficient decrease along the
slope `g . dx`; `"decrease"`: any decrease) halves it at most `max_halvings` times; if no step
length decreases F, the damping mu is multiplied by 4 and the step solved again (at most
`max_damping_tries` times; with `damping=0` there is no damping to raise, so the fit stops). mu is
divided by 3 after a full step. It stops when `|g| <= gtol`, the step is below `xtol (|x| + xtol)`,
the relative decrease of F is below `ftol`, after `maxiter` iterations, or when no step decreases
F. Ctrl-C stops it cleanly with the best x so far (`interrupted=True`).

`gauss_newton(residual, x0, regulariser)` minimises `1/2 |r(x)|^2 + lam/2 x^T L x` for a residual
function with `J^T J` applied matrix-free (`torch.func.jvp` then `vjp`, inner CG) or, for small
problems, with the Jacobian assembled (`torch.func.jacfwd`) and a dense solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Union

import torch
from torch import Tensor

from shapeflow._registry import Registry
from shapeflow.errors import ShapeflowError
from shapeflow.solvers.linear.cg import conjugate_gradient

__all__ = ["GaussNewtonResult", "GaussNewtonStep", "Linearization", "LeastSquaresProblem",
           "minimize_least_squares", "gauss_newton"]

Regulariser = Optional[tuple[Union[Tensor, Callable[[Tensor], Tensor]], float]]


@dataclass
class Linearization:
    """The problem linearised at x: `gradient` g (shape of x) and `solve(mu) -> (dx, inner
    iterations)` with dx (shape of x) solving `(J^T J + lam L + mu D) dx = -g`."""

    gradient: Tensor
    solve: Callable[[float], tuple[Tensor, int]]


class LeastSquaresProblem(Protocol):
    """What `minimize_least_squares` needs from a problem (see the module docstring)."""

    def cost(self, x: Tensor) -> tuple[float, Any]: ...

    def linearize(self, x: Tensor, state: Any) -> Linearization: ...


@dataclass
class GaussNewtonStep:
    """One iteration as reported to a callback: the iterate x after it (unchanged when the step was
    rejected), its cost and state, whether the step was accepted, inner iterations, damping, step length."""

    iteration: int
    x: Tensor
    cost: float
    state: Any
    accepted: bool
    inner_iterations: int
    damping: float
    step_length: float
    diverged: bool = False      # a non-finite gradient or trial cost was met (the iterate x stays finite)


@dataclass
class GaussNewtonResult:
    """Outcome of a Gauss-Newton fit.

    x: the solution, shape of x0. cost: final F(x). state: the problem's state at x.
    history: F at x0 and after every accepted iteration. iterations: outer iterations run.
    converged: a stopping test (gtol/xtol/ftol) was met. damping: the Levenberg-Marquardt mu used
    at each iteration. cg_iterations: inner iterations per iteration (0 for a dense solve).
    interrupted: stopped by Ctrl-C (x is the best iterate reached). diverged: a NaN gradient or
    trial cost was met (the step was rejected; x is the last finite iterate).
    """

    x: Tensor
    cost: float
    history: list[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False
    damping: list[float] = field(default_factory=list)
    cg_iterations: list[int] = field(default_factory=list)
    interrupted: bool = False
    state: Any = field(default=None, repr=False)
    diverged: bool = False


#: line searches: (f_new, f, t, slope) -> accept the step length t
LINE_SEARCHES: Registry[Callable[[float, float, float, float], bool]] = Registry("line search", {
    "armijo": lambda f_new, f, t, slope: f_new <= f + 1e-4 * t * slope,
    "decrease": lambda f_new, f, t, slope: f_new < f,
})


def _norm(v: Tensor) -> float:
    return float(torch.linalg.vector_norm(v))


def minimize_least_squares(
    problem: LeastSquaresProblem,
    x0: Tensor,
    *,
    maxiter: int = 50,
    damping: float = 1e-3,
    line_search: str = "armijo",
    max_halvings: int = 14,
    max_damping_tries: int = 30,
    infeasible_halvings: int | None = None,
    gtol: float = 1e-10,
    xtol: float = 1e-12,
    ftol: float = 1e-15,
    fatol: float = 0.0,
    callback: Optional[Callable[[GaussNewtonStep], None]] = None,
) -> GaussNewtonResult:
    """Minimise a least-squares `problem` from `x0` by damped Gauss-Newton (see the module docstring).

    x0: any shape (not modified). damping: initial Levenberg-Marquardt mu (0: plain Gauss-Newton,
    never raised). infeasible_halvings: halvings allowed while the cost is infinite (a step the
    problem refuses, e.g. one that folds a map), when more than `max_halvings` (default: the same).
    line_search: a name in `LINE_SEARCHES`. fatol: also stop (converged) once F <= fatol, an
    absolute floor for problems that can fit their data exactly. callback: called after every
    iteration with a `GaussNewtonStep`. Returns a `GaussNewtonResult`.
    """
    accept = LINE_SEARCHES.lookup(line_search, "minimize_least_squares()")
    if not (damping >= 0 and maxiter >= 0 and max_halvings >= 0 and max_damping_tries >= 1):
        raise ShapeflowError("minimize_least_squares(): damping, maxiter and max_halvings must be >= 0 and "
                             f"max_damping_tries >= 1, got {damping}, {maxiter}, {max_halvings}, {max_damping_tries}")
    tries = max_damping_tries if damping > 0 else 1
    x = x0.detach().clone()
    with torch.no_grad():
        f, state = problem.cost(x)
    result = GaussNewtonResult(x=x, cost=f, history=[f], state=state)
    mu, g0_norm = float(damping), None
    try:
        for it in range(maxiter):
            with torch.no_grad():
                lin = problem.linearize(x, state)
            g_norm = _norm(lin.gradient)
            if math.isnan(g_norm):      # a diverged linearisation: keep the last finite iterate
                result.diverged = True
                if callback is not None:
                    callback(GaussNewtonStep(it, x, f, state, False, 0, mu, 0.0, True))
                break
            g0_norm = g_norm if g0_norm is None else g0_norm
            if g_norm <= gtol or f <= fatol:
                result.converged = True
                break
            accepted, inner, t = False, 0, 0.0
            for _ in range(tries):  # raise mu until a step decreases F
                with torch.no_grad():
                    dx, inner = lin.solve(mu)
                    slope = float((lin.gradient * dx).sum())
                    t = 1.0
                    limit = max(max_halvings, infeasible_halvings or 0)
                    for halving in range(limit + 1):
                        f_new, state_new = problem.cost(x + t * dx)
                        result.diverged |= math.isnan(f_new)     # inf is a refused step (e.g. a fold), NaN is not
                        if accept(f_new, f, t, slope) or halving == limit or (
                                halving >= max_halvings and math.isfinite(f_new)):
                            break
                        t *= 0.5
                if math.isfinite(f_new) and (f_new < f or (f_new == f and slope == 0)):
                    accepted = True
                    break
                mu = max(mu * 4.0, 1e-12) if damping > 0 else mu
            result.damping.append(mu)
            result.cg_iterations.append(int(inner))
            result.iterations = it + 1
            if accepted:
                step = t * dx
                x = x + step
                rel_decrease = (f - f_new) / max(abs(f), 1e-300)
                f, state = f_new, state_new
                result.history.append(f)
                result.x, result.cost, result.state = x, f, state
                if damping > 0 and t == 1.0:
                    mu = max(mu / 3.0, 1e-12)
            if callback is not None:
                callback(GaussNewtonStep(it, x, f, state, accepted, int(inner), mu, t if accepted else 0.0,
                                         result.diverged))
            if not accepted:  # no damping gives a decrease: stationary up to rounding, or stuck
                result.converged = g_norm <= 1e-6 * max(1.0, g0_norm)
                break
            if _norm(step) <= xtol * (_norm(x) + xtol) or rel_decrease <= ftol:
                result.converged = True
                break
    except KeyboardInterrupt:
        result.interrupted = True
    return result


# ----------------------------------------------------------------------------- autodiff residuals


def _reg_apply(reg: Regulariser, v: Tensor) -> Tensor:
    if reg is None:
        return torch.zeros_like(v)
    L, lam = reg
    Lv = L(v) if callable(L) and not isinstance(L, Tensor) else L @ v
    return lam * Lv


def _check_regulariser(reg: Regulariser, n: int) -> None:
    if reg is None:
        return
    if not (isinstance(reg, tuple) and len(reg) == 2):
        raise ShapeflowError("gauss_newton(): regulariser must be a tuple (L, lam) or None")
    L, lam = reg
    if isinstance(L, Tensor) and tuple(L.shape) != (n, n):
        raise ShapeflowError(f"gauss_newton(): regulariser L has shape {tuple(L.shape)}, expected ({n}, {n})")
    if not float(lam) >= 0:
        raise ShapeflowError(f"gauss_newton(): regulariser weight lam must be >= 0, got {lam}")


class _ResidualProblem:
    """`1/2 |r(x)|^2 + lam/2 x^T L x` for a residual function, x flattened to (n,); the normal
    operator from autodiff: matrix free (jvp, vjp, CG) or dense (jacfwd, dense solve)."""

    def __init__(self, residual: Callable[[Tensor], Tensor], shape: torch.Size, regulariser: Regulariser,
                 dense: bool, cg_tol: float, cg_maxiter: Optional[int]):
        self.r_flat = lambda z: residual(z.reshape(shape)).reshape(-1)
        self.reg, self.dense, self.cg_tol, self.cg_maxiter = regulariser, dense, cg_tol, cg_maxiter

    def cost(self, x: Tensor) -> tuple[float, None]:
        r = self.r_flat(x)
        return float(0.5 * (r * r).sum() + 0.5 * (x * _reg_apply(self.reg, x)).sum()), None

    def linearize(self, x: Tensor, state: None) -> Linearization:
        r, pullback = torch.func.vjp(self.r_flat, x)
        g = pullback(r)[0] + _reg_apply(self.reg, x)
        n = x.numel()
        if self.dense:
            Jm = torch.func.jacfwd(self.r_flat)(x)  # (m, n)
            H = Jm.T @ Jm
            if self.reg is not None:
                H = H + torch.stack([_reg_apply(self.reg, e) for e in torch.eye(n, dtype=x.dtype, device=x.device)], 1)
            eye = torch.eye(n, dtype=x.dtype, device=x.device)
            return Linearization(g, lambda mu: (torch.linalg.solve(H + mu * eye, -g), 0))

        def solve(mu: float) -> tuple[Tensor, int]:
            def op(v: Tensor) -> Tensor:
                Jv = torch.func.jvp(self.r_flat, (x,), (v,))[1]
                return pullback(Jv)[0] + _reg_apply(self.reg, v) + mu * v

            dx, info = conjugate_gradient(op, -g, tol=self.cg_tol, maxiter=self.cg_maxiter)
            return dx, int(info.iterations)

        return Linearization(g, solve)


#: how `gauss_newton` forms the normal operator
JACOBIANS = ("auto", "dense", "matrix_free")


def gauss_newton(
    residual: Callable[[Tensor], Tensor],
    x0: Tensor,
    regulariser: Regulariser = None,
    *,
    maxiter: int = 50,
    gtol: float = 1e-10,
    xtol: float = 1e-12,
    ftol: float = 1e-15,
    damping: float = 1e-3,
    jacobian: str = "auto",
    cg_tol: float = 1e-8,
    cg_maxiter: Optional[int] = None,
    line_search: bool = True,
    callback: Optional[Callable[[GaussNewtonStep], None]] = None,
) -> GaussNewtonResult:
    """Minimise `1/2 |residual(x)|^2 + lam/2 x^T L x` by damped Gauss-Newton (`minimize_least_squares`).

    residual: x -> r, x of the shape of x0 (any), r any shape; must work with `torch.func`.
    x0: starting point (not modified). regulariser: (L, lam) with L (n, n) sparse/dense or a
      callable on the flattened x (n = x0.numel()), PSD; or None.
    jacobian: "matrix_free" (jvp/vjp + CG), "dense" (assembled J, dense solve), or "auto"
      (dense when n <= 200). line_search: Armijo backtracking (True) or full steps only.
    Stops when |grad F| <= gtol, the step is below xtol (|x| + xtol), or the relative decrease
    of F is below ftol. callback: as in `minimize_least_squares` (x flattened). Returns a
    GaussNewtonResult (history of F per iteration).
    """
    if jacobian not in JACOBIANS:
        raise ShapeflowError(f"gauss_newton(): unknown jacobian {jacobian!r}; valid names: {sorted(JACOBIANS)}")
    n = x0.numel()
    _check_regulariser(regulariser, n)
    dense = jacobian == "dense" or (jacobian == "auto" and n <= 200)
    problem = _ResidualProblem(residual, x0.shape, regulariser, dense, cg_tol, cg_maxiter)
    result = minimize_least_squares(problem, x0.detach().reshape(-1), maxiter=maxiter, damping=damping,
                                    line_search="armijo", max_halvings=13 if line_search else 0,
                                    gtol=gtol, xtol=xtol, ftol=ftol, callback=callback)
    result.x = result.x.reshape(x0.shape)
    return result
