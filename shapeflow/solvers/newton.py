"""Exact Newton with a trust region, autodiff Hessians (`torch.func`), and gradient descent.

For a smooth scalar objective `f(x)` of a few parameters (an affine or rigid map: 3 to 12; a small
network: ~50), the Hessian is cheap to form exactly with automatic differentiation:

* `hessian(f, x, mode)`: "forward-over-reverse" (`torch.func.jacfwd(torch.func.grad(f))`, one
  forward-mode pass per parameter over the reverse-mode gradient: the cheapest) or
  "reverse-over-reverse" (`jacrev(grad(f))`, for functions whose ops lack forward-mode rules).
  `F.grid_sample` is such an op: it has a double backward but no forward-mode derivative, so
  forward-over-reverse (and `jvp`, `jacfwd`) raise NotImplementedError on it. The image objectives
  therefore interpolate with `shapeflow.interpolation` (gather + polynomial weights, plain torch
  ops), on which every transform composes; "auto" tries forward-over-reverse and falls back to
  reverse-over-reverse on NotImplementedError.
* `minimize_newton(f, x0)`: Newton's method. With `trust_region=True` (default) each step solves
  the trust-region subproblem `min_p g.p + 1/2 p^T H p, |p| <= radius` exactly (eigendecomposition
  of H and a bisection on the secular equation, More & Sorensen; an indefinite H is handled), and the
  radius adapts to the ratio of actual to predicted decrease (Nocedal & Wright, Alg. 4.1): near a
  non-degenerate minimum the full Newton step is taken and convergence is quadratic. With
  `trust_region=False` it takes plain (damped) Newton steps `(H + damping I) p = -g`; a singular
  (or, without damping, indefinite) system is a one-line `ShapeflowError`.
* `minimize_gradient(f, x0)`: steepest descent with Barzilai-Borwein step lengths and Armijo
  backtracking (the first-order baseline).

Both return a `NewtonResult` (x, cost, per-iteration cost and gradient norm history, trust radii).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from shapeflow._registry import Registry
from shapeflow.errors import ShapeflowError

__all__ = ["NewtonResult", "hessian", "minimize_newton", "minimize_gradient", "trust_region_step", "HESSIAN_MODES"]

Objective = Callable[[Tensor], Tensor]


def _forward_over_reverse(f: Objective, x: Tensor) -> Tensor:
    return torch.func.jacfwd(torch.func.grad(f))(x)


def _reverse_over_reverse(f: Objective, x: Tensor) -> Tensor:
    return torch.func.jacrev(torch.func.grad(f))(x)


def _auto(f: Objective, x: Tensor) -> Tensor:
    try:
        return _forward_over_reverse(f, x)
    except NotImplementedError:          # an op without a forward-mode rule (e.g. F.grid_sample)
        return _reverse_over_reverse(f, x)


#: how `hessian` differentiates twice
HESSIAN_MODES: Registry[Callable[[Objective, Tensor], Tensor]] = Registry("hessian mode", {
    "auto": _auto, "forward-over-reverse": _forward_over_reverse, "reverse-over-reverse": _reverse_over_reverse})


def hessian(f: Objective, x: Tensor, mode: str = "auto") -> Tensor:
    """The Hessian `(n, n)` of a scalar `f` at `x: (n,)` by automatic differentiation (see `HESSIAN_MODES`).
    f must be written for `torch.func` (no in-place ops on its input, no `.item()`)."""
    H = HESSIAN_MODES.lookup(mode, "hessian()")(f, x)
    return (H + H.T) / 2


@dataclass
class NewtonResult:
    """Outcome of `minimize_newton` / `minimize_gradient`.

    x: (n,) the last accepted iterate. cost: f(x). history: f at x0 and after every accepted step.
    gradient_norms: |grad f| at the same points. radii: trust radius per iteration (Newton, trust
    region). iterations: iterations run. converged: |grad f| <= gtol or the step fell below xtol.
    diverged: a trial point's value was NaN.
    """

    x: Tensor
    cost: float
    history: list[float] = field(default_factory=list)
    gradient_norms: list[float] = field(default_factory=list)
    radii: list[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False
    diverged: bool = False      # a trial point gave a NaN (rejected; x stays the last finite iterate)


def trust_region_step(g: Tensor, H: Tensor, radius: float, iterations: int = 200) -> Tensor:
    """The exact minimiser `p: (n,)` of `g.p + 1/2 p^T H p` subject to `|p| <= radius`.

    g: (n,), H: (n, n) symmetric (may be indefinite). Solution `p(lam) = -(H + lam I)^{-1} g` with
    `lam >= max(0, -lambda_min)`: the Newton step if it is inside, else lam found by bisection so
    that `|p(lam)| = radius`; in the hard case (g orthogonal to the lowest eigenvector) the step is
    completed along that eigenvector to the boundary."""
    evals, Q = torch.linalg.eigh(H)
    a = Q.T @ g                                                      # g in the eigenbasis
    low = float(evals[0])
    scale = max(float(evals.abs().max()), 1e-300)

    def step(lam: float) -> Tensor:
        return -(Q @ (a / (evals + lam)))

    if low > 1e-12 * scale:
        p = step(0.0)
        if float(p.norm()) <= radius:
            return p
    lo = max(0.0, -low)
    if float(a.norm()) == 0.0:
        return radius * Q[:, 0]
    hard = float(a[0].abs()) <= 1e-10 * float(a.norm()) and low < 0
    if hard:
        denom = evals[1:] - low
        p = -(Q[:, 1:] @ (a[1:] / torch.where(denom > 0, denom, torch.ones_like(denom))))
        rest = radius ** 2 - float(p @ p)
        if rest >= 0:
            return p + math.sqrt(rest) * Q[:, 0]
    lo = lo + 1e-15 * scale
    hi = lo + float(a.norm()) / radius + scale
    while float(step(hi).norm()) > radius:
        hi *= 2
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if float(step(mid).norm()) > radius:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * hi:
            break
    return step(hi)


def _value_and_grad(f: Objective, x: Tensor) -> tuple[Tensor, Tensor]:
    g, value = torch.func.grad_and_value(f)(x)
    return value.detach(), g.detach()


def _check(x0: Tensor, who: str, maxiter: int) -> Tensor:
    if not isinstance(x0, Tensor) or x0.dim() != 1:
        raise ShapeflowError(f"{who}: x0 must be a tensor of shape (n,), got "
                             f"{tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__}")
    if not (isinstance(maxiter, int) and maxiter >= 0):
        raise ShapeflowError(f"{who}: maxiter must be an int >= 0, got {maxiter!r}")
    return x0.detach().clone()


def minimize_newton(
    f: Objective,
    x0: Tensor,
    *,
    maxiter: int = 50,
    gtol: float = 1e-10,
    xtol: float = 1e-14,
    ftol: float = 0.0,
    trust_region: bool = True,
    radius: float = 1.0,
    max_radius: float = 1e4,
    eta: float = 1e-4,
    damping: float = 0.0,
    hessian_mode: str = "auto",
    callback: Optional[Callable[[int, Tensor, float, float], None]] = None,
) -> NewtonResult:
    """Minimise a smooth scalar `f` of `x0: (n,)` by Newton's method with exact autodiff Hessians.

    f: x (n,) -> 0-d tensor, written for `torch.func`. trust_region: exact trust-region steps
    (initial `radius`, at most `max_radius`; a step is accepted when the actual decrease is at least
    `eta` times the predicted one). Otherwise full steps `(H + damping I) p = -g`, each kept only if
    f decreases (else halved, at most 30 times): damping = 0 with a singular or indefinite H raises
    a ShapeflowError. Stops when |grad f| <= gtol, |p| <= xtol (|x| + xtol), an accepted step
    decreases f by at most ftol |f| (or the model predicts no more than that), or a step is rejected
    with a radius below xtol. callback(iteration,
    x, f, |grad f|) after every iteration. Returns a `NewtonResult`.
    """
    who = "minimize_newton()"
    x = _check(x0, who, maxiter)
    HESSIAN_MODES.lookup(hessian_mode, who)
    if not (damping >= 0 and radius > 0 and max_radius >= radius):
        raise ShapeflowError(f"{who}: need damping >= 0 and 0 < radius <= max_radius, got damping={damping}, "
                             f"radius={radius}, max_radius={max_radius}")
    value, g = _value_and_grad(f, x)
    result = NewtonResult(x=x, cost=float(value), history=[float(value)], gradient_norms=[float(g.norm())])
    H = None
    for it in range(maxiter):
        gnorm = float(g.norm())
        if gnorm <= gtol:
            result.converged = True
            break
        if H is None:                      # a rejected trust-region step keeps x, hence H
            H = hessian(f, x, hessian_mode).detach()
        if not (math.isfinite(gnorm) and bool(torch.isfinite(H).all())):    # diverged: keep the last finite x
            result.diverged = True
            break
        n = x.numel()
        if trust_region:
            p = trust_region_step(g, H, radius)
            predicted = -float(g @ p + 0.5 * p @ H @ p)
            if predicted <= max(ftol, 1e-15) * abs(float(value)):      # nothing left to gain above rounding
                result.converged = True
                break
            new_value, new_g = _value_and_grad(f, x + p)
            result.diverged |= math.isnan(float(new_value))
            actual = float(value - new_value)
            rho = actual / predicted if predicted > 0 else -1.0
            pnorm = float(p.norm())
            if not math.isfinite(rho) or rho < 0.25:
                radius = 0.25 * pnorm if math.isfinite(float(new_value)) else 0.25 * radius
            elif rho > 0.75 and pnorm >= 0.99 * radius:
                radius = min(2 * radius, max_radius)
            result.radii.append(radius)
            accepted = math.isfinite(rho) and rho > eta
        else:
            system = H + damping * torch.eye(n, dtype=H.dtype, device=H.device)
            evals = torch.linalg.eigvalsh(system)
            top = float(evals.abs().max())
            if float(evals.abs().min()) <= 1e-12 * max(top, 1e-300) or (damping == 0 and float(evals.min()) < 0):
                kind = "singular" if float(evals.abs().min()) <= 1e-12 * max(top, 1e-300) else "indefinite"
                raise ShapeflowError(f"{who}: the Hessian is {kind} at iteration {it} (eigenvalues "
                                     f"{float(evals.min()):.3g} .. {float(evals.max()):.3g}); use trust_region=True "
                                     "or damping > 0")
            p = torch.linalg.solve(system, -g)
            accepted = False
            for _ in range(31):
                new_value, new_g = _value_and_grad(f, x + p)
                result.diverged |= math.isnan(float(new_value))
                if math.isfinite(float(new_value)) and float(new_value) < float(value):
                    accepted = True
                    break
                p = p / 2
            pnorm = float(p.norm())
        result.iterations = it + 1
        if accepted:
            x, value, g, H = x + p, new_value, new_g, None
            result.x, result.cost = x, float(value)
            result.history.append(float(value))
            result.gradient_norms.append(float(g.norm()))
        if callback is not None:
            callback(it, x, float(value), float(g.norm()))
        if accepted and (pnorm <= xtol * (float(x.norm()) + xtol)
                         or result.history[-2] - result.history[-1] <= ftol * abs(result.history[-1])):
            result.converged = True
            break
        if not accepted and (not trust_region or radius <= xtol * (float(x.norm()) + xtol)):
            result.converged = float(g.norm()) <= max(gtol, 1e-8 * result.gradient_norms[0])
            break
    else:
        result.converged = float(g.norm()) <= gtol
    return result


def minimize_gradient(
    f: Objective,
    x0: Tensor,
    *,
    maxiter: int = 200,
    gtol: float = 1e-10,
    xtol: float = 1e-14,
    step: float = 1e-3,
    callback: Optional[Callable[[int, Tensor, float, float], None]] = None,
) -> NewtonResult:
    """Minimise `f` by steepest descent: Barzilai-Borwein step lengths (the first one `step`),
    halved until Armijo's sufficient decrease holds (at most 40 times). Same stopping tests and
    result as `minimize_newton`."""
    who = "minimize_gradient()"
    x = _check(x0, who, maxiter)
    if not step > 0:
        raise ShapeflowError(f"{who}: step must be > 0, got {step}")
    value, g = _value_and_grad(f, x)
    result = NewtonResult(x=x, cost=float(value), history=[float(value)], gradient_norms=[float(g.norm())])
    alpha = step
    for it in range(maxiter):
        if float(g.norm()) <= gtol:
            result.converged = True
            break
        if not math.isfinite(float(g.norm())):      # diverged: keep the last finite x
            result.diverged = True
            break
        slope = -float(g @ g)
        accepted = False
        for _ in range(41):
            new_value, new_g = _value_and_grad(f, x - alpha * g)
            result.diverged |= math.isnan(float(new_value))
            if math.isfinite(float(new_value)) and float(new_value) <= float(value) + 1e-4 * alpha * slope:
                accepted = True
                break
            alpha /= 2
        result.iterations = it + 1
        if not accepted:
            break
        s, y = -alpha * g, new_g - g
        x, value, g = x + s, new_value, new_g
        result.x, result.cost = x, float(value)
        result.history.append(float(value))
        result.gradient_norms.append(float(g.norm()))
        if callback is not None:
            callback(it, x, float(value), float(g.norm()))
        if float(s.norm()) <= xtol * (float(x.norm()) + xtol):
            result.converged = True
            break
        sy = float(s @ y)
        alpha = float(s @ s) / sy if sy > 0 else 2 * alpha          # BB1 step for the next iteration
    else:
        result.converged = float(g.norm()) <= gtol
    return result
