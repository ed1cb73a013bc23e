"""Multi-scale continuation in a scale parameter theta, with an optional ODE predictor.

For an objective `J(w; theta)` whose minimiser `w*(theta)` moves smoothly with theta (the blur of
an interpolant), differentiating the optimality condition `grad_w J(w*(theta); theta) = 0` gives

    dw*/dtheta = -H^{-1} d/dtheta grad_w J,     H = grad_w^2 J(w*; theta).

`continuation(cost, x0, thetas)` solves at `thetas[0]` (coarse, large theta), then for each next
theta either starts the corrector from the previous minimiser (plain continuation) or, with a
`predictor`, from the forward-Euler prediction `w* + (theta_next - theta) dw*/dtheta`
(predictor-corrector). `predictor="newton"` uses the exact Hessian, `"gauss-newton"` its
Gauss-Newton part `2 J_r^T J_r` for a cost `|r(w; theta)|^2` (needs `residual`). The mixed
derivative `d/dtheta grad_w J` is one forward-mode pass over the reverse-mode gradient
(`torch.func.jvp` of `torch.func.grad`), falling back to reverse-over-reverse for ops without
forward-mode rules. Each prediction is recorded with the cost and gradient norm at the plain start
and at the predicted one (the paper's relative loss / gradient differences).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import math

import torch
from torch import Tensor

from shapeflow._registry import Registry
from shapeflow.errors import ShapeflowError
from shapeflow.solvers.newton import hessian, minimize_newton

__all__ = ["theta_derivative", "continuation", "ContinuationResult", "Prediction", "PREDICTORS"]

ThetaFunction = Callable[[Tensor, "Tensor | float"], Tensor]

#: the Hessians the predictor can use
PREDICTORS: Registry[str] = Registry("predictor", {"newton": "exact Hessian (autodiff)",
                                                   "gauss-newton": "2 J^T J of the residual"})


def _mixed(cost: ThetaFunction, x: Tensor, theta: Tensor) -> Tensor:
    """d/dtheta grad_w J(x; theta): (n,)."""
    gradient = lambda t: torch.func.grad(cost)(x, t)
    try:
        return torch.func.jvp(gradient, (theta,), (torch.ones_like(theta),))[1]
    except NotImplementedError:
        return torch.func.jacrev(gradient)(theta)


def theta_derivative(cost: ThetaFunction, x: Tensor, theta: float, *, predictor: str = "newton",
                     residual: Optional[ThetaFunction] = None, hessian_mode: str = "auto") -> Tensor:
    """`dw/dtheta = -H^{-1} d/dtheta grad_w J` at `x: (n,)` (a minimiser of `cost(., theta)`).

    cost: (x (n,), theta 0-d tensor or float) -> 0-d tensor, written for `torch.func`.
    predictor: "newton" (exact H) or "gauss-newton" (`2 J_r^T J_r`; `residual(x, theta)` with
    `cost == |residual|^2`). Returns (n,). A singular H is a one-line ShapeflowError.
    """
    who = "theta_derivative()"
    PREDICTORS.lookup(predictor, who)
    if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta >= 0):
        raise ShapeflowError(f"{who}: theta must be a number >= 0, got {theta!r}")
    x = x.detach()
    t = torch.tensor(float(theta), dtype=x.dtype, device=x.device)
    mixed = _mixed(cost, x, t).detach()
    if predictor == "newton":
        H = hessian(lambda w: cost(w, float(theta)), x, hessian_mode).detach()
    else:
        if residual is None:
            raise ShapeflowError(f"{who}: predictor='gauss-newton' needs residual (cost = |residual|^2)")
        J = torch.func.jacfwd(lambda w: residual(w, float(theta)).reshape(-1))(x).detach()
        H = 2 * J.T @ J
    evals = torch.linalg.eigvalsh(H)
    if float(evals.abs().min()) <= 1e-12 * max(float(evals.abs().max()), 1e-300):
        raise ShapeflowError(f"{who}: the Hessian is singular at theta={theta} (eigenvalues {float(evals.min()):.3g} .. "
                             f"{float(evals.max()):.3g}); the minimiser does not depend smoothly on theta there")
    return -torch.linalg.solve(H, mixed)


@dataclass
class Prediction:
    """One predictor step from `theta_from` to `theta_to`: the cost and gradient norm at theta_to
    from the previous minimiser (`plain`) and from the Euler prediction (`predicted`)."""

    theta_from: float
    theta_to: float
    cost_plain: float
    cost_predicted: float
    gradient_plain: float
    gradient_predicted: float

    @property
    def relative_cost(self) -> float:
        """(J(w*) - J(w_pred)) / J(w*): > 0 when the prediction helps."""
        return (self.cost_plain - self.cost_predicted) / abs(self.cost_plain)

    @property
    def relative_gradient(self) -> float:
        """(|grad J(w*)| - |grad J(w_pred)|) / |grad J(w*)|: > 0 when the prediction helps."""
        return (self.gradient_plain - self.gradient_predicted) / self.gradient_plain


@dataclass
class ContinuationResult:
    """x: (n,) the minimiser at the last theta; path: the minimiser at every theta; costs: J there;
    iterations: corrector iterations per theta; predictions: one `Prediction` per predictor step."""

    x: Tensor
    thetas: list[float]
    path: list[Tensor] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)


def _newton_corrector(cost: ThetaFunction) -> Callable[[float, Tensor], tuple[Tensor, int]]:
    def correct(theta: float, start: Tensor) -> tuple[Tensor, int]:
        fit = minimize_newton(lambda w: cost(w, theta), start)
        return fit.x, fit.iterations
    return correct


def check_thetas(thetas: Sequence[float], who: str) -> list[float]:
    """`thetas` as floats: at least one, each >= 0, decreasing (coarse to fine); else a ShapeflowError."""
    values = list(thetas) if isinstance(thetas, (list, tuple)) else None
    if not values or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
                             for t in values):
        raise ShapeflowError(f"{who}: thetas must be a non-empty list of numbers, got {thetas!r}")
    if min(values) < 0:
        raise ShapeflowError(f"{who}: theta must be >= 0, got {min(values)}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ShapeflowError(f"{who}: thetas must decrease (coarse to fine), got {values}")
    return [float(t) for t in values]


def continuation(
    cost: ThetaFunction,
    x0: Tensor,
    thetas: Sequence[float],
    *,
    predictor: Optional[str] = None,
    residual: Optional[ThetaFunction] = None,
    corrector: Optional[Callable[[float, Tensor], tuple[Tensor, int]]] = None,
    hessian_mode: str = "auto",
) -> ContinuationResult:
    """Follow the minimiser of `cost(x, theta)` from `thetas[0]` down the decreasing `thetas`.

    x0: (n,) start at thetas[0]. predictor: None (plain continuation), "newton" or "gauss-newton"
    (see `theta_derivative`). corrector: (theta, start (n,)) -> (minimiser (n,), iterations);
    default `minimize_newton` on `cost(., theta)`. Returns a `ContinuationResult`.
    """
    who = "continuation()"
    values = check_thetas(thetas, who)
    if predictor is not None:
        PREDICTORS.lookup(predictor, who)
    correct = corrector or _newton_corrector(cost)
    x, its = correct(values[0], x0.detach())
    result = ContinuationResult(x=x, thetas=values, path=[x], iterations=[its],
                                costs=[float(cost(x, values[0]))])
    for previous, theta in zip(values, values[1:]):
        start = x
        if predictor is not None:
            velocity = theta_derivative(cost, x, previous, predictor=predictor, residual=residual,
                                        hessian_mode=hessian_mode)
            start = x + (theta - previous) * velocity
            g0, f0 = torch.func.grad_and_value(lambda w: cost(w, theta))(x)
            g1, f1 = torch.func.grad_and_value(lambda w: cost(w, theta))(start)
            result.predictions.append(Prediction(previous, theta, float(f0), float(f1), float(g0.norm()),
                                                 float(g1.norm())))
        x, its = correct(theta, start)
        result.path.append(x)
        result.iterations.append(its)
        result.costs.append(float(cost(x, theta)))
    result.x = x
    return result
