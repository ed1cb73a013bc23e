"""Gauss-Newton / Levenberg-Marquardt for (regularised) nonlinear least squares.

Minimises `F(x) = 1/2 |r(x)|^2 + lam/2 x^T L x` for a residual `r` (any tensor-valued function of a
tensor `x`, any shapes; both are flattened). Each iteration solves

    (J^T J + lam L + mu I) dx = -(J^T r + lam L x)

with `J^T J` applied matrix-free (`torch.func.jvp` then `vjp`, inner CG from `cg.py`) or, for small
problems, with the Jacobian assembled (`torch.func.jacfwd`) and a dense solve. `mu` is the
Levenberg-Marquardt damping, adapted each iteration (divided by 3 after a full step, multiplied by
4 after a failed one); a backtracking (Armijo) line search guards every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from shapeflow.errors import ShapeflowError
from shapeflow.solvers.cg import conjugate_gradient

Regulariser = Optional[tuple[Union[Tensor, Callable[[Tensor], Tensor]], float]]


@dataclass
class GaussNewtonResult:
    """Outcome of `gauss_newton`.

    x: the solution, shape of x0. cost: final F(x). history: F at x0 and after every iteration.
    iterations: outer iterations run. converged: a stopping test (gtol/xtol/ftol) was met.
    damping: the Levenberg-Marquardt mu used at each iteration. cg_iterations: inner CG count per
    iteration (0 for the dense solve).
    """

    x: Tensor
    cost: float
    history: list[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False
    damping: list[float] = field(default_factory=list)
    cg_iterations: list[int] = field(default_factory=list)


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
) -> GaussNewtonResult:
    """Minimise `1/2 |residual(x)|^2 + lam/2 x^T L x` by damped Gauss-Newton.

    residual: x -> r, x of the shape of x0 (any), r any shape; must work with `torch.func`.
    x0: starting point (not modified). regulariser: (L, lam) with L (n, n) sparse/dense or a
      callable on the flattened x (n = x0.numel()), PSD; or None.
    jacobian: "matrix_free" (jvp/vjp + CG), "dense" (assembled J, dense solve), or "auto"
      (dense when n <= 200).
    Stops when |grad F| <= gtol, the step is below xtol (|x| + xtol), or the relative decrease
    of F is below ftol. Returns a GaussNewtonResult (history of F per iteration).
    """
    if jacobian not in ("auto", "matrix_free", "dense"):
        raise ShapeflowError(
            f"gauss_newton(): unknown jacobian {jacobian!r}; valid names: ['auto', 'dense', 'matrix_free']"
        )
    shape = x0.shape
    n = x0.numel()
    _check_regulariser(regulariser, n)
    dense = jacobian == "dense" or (jacobian == "auto" and n <= 200)

    def r_flat(z: Tensor) -> Tensor:
        return residual(z.reshape(shape)).reshape(-1)

    def cost(z: Tensor) -> float:
        r = r_flat(z)
        return float(0.5 * (r * r).sum() + 0.5 * (z * _reg_apply(regulariser, z)).sum())

    x = x0.detach().reshape(-1).clone()
    mu = float(damping)
    with torch.no_grad():
        f = cost(x)
    result = GaussNewtonResult(x=x0, cost=f, history=[f])
    for it in range(maxiter):
        with torch.no_grad():
            r, pullback = torch.func.vjp(r_flat, x)
            g = pullback(r)[0] + _reg_apply(regulariser, x)
        g_norm = float(torch.linalg.vector_norm(g))
        if it == 0:
            g0_norm = g_norm
        if g_norm <= gtol:
            result.converged = True
            break
        if dense:
            Jm = torch.func.jacfwd(r_flat)(x)  # (m, n)
            H = Jm.T @ Jm
            if regulariser is not None:
                H = H + torch.stack([_reg_apply(regulariser, e) for e in torch.eye(n, dtype=x.dtype, device=x.device)], 1)
        accepted = False
        for _ in range(30):  # raise mu until a step decreases F
            if dense:
                dx = torch.linalg.solve(H + mu * torch.eye(n, dtype=x.dtype, device=x.device), -g)
                cg_its = 0
            else:
                def op(v: Tensor, mu=mu) -> Tensor:
                    Jv = torch.func.jvp(r_flat, (x,), (v,))[1]
                    return pullback(Jv)[0] + _reg_apply(regulariser, v) + mu * v

                with torch.no_grad():
                    dx, info = conjugate_gradient(op, -g, tol=cg_tol, maxiter=cg_maxiter)
                cg_its = int(info.iterations)
            slope = float((g * dx).sum())
            t = 1.0
            with torch.no_grad():
                while True:
                    f_new = cost(x + t * dx)
                    if f_new <= f + 1e-4 * t * slope or not line_search:
                        break
                    t *= 0.5
                    if t < 1e-4:
                        break
            if f_new < f or (f_new == f and slope == 0):
                accepted = True
                break
            mu = max(mu * 4.0, 1e-12)
        result.damping.append(mu)
        result.cg_iterations.append(cg_its)
        result.iterations = it + 1
        if not accepted:  # no damping gives a decrease: stationary up to rounding, or stuck
            result.converged = float(torch.linalg.vector_norm(g)) <= 1e-6 * max(1.0, g0_norm)
            break
        step = t * dx
        x = x + step
        rel_decrease = (f - f_new) / max(abs(f), 1e-300)
        f = f_new
        result.history.append(f)
        mu = max(mu / 3.0, 1e-12) if t == 1.0 else mu
        if float(torch.linalg.vector_norm(step)) <= xtol * (float(torch.linalg.vector_norm(x)) + xtol) or rel_decrease <= ftol:
            result.converged = True
            break
    result.x = x.reshape(shape)
    result.cost = f
    return result
