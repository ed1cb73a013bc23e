"""Differentiate through an inner optimum `x*(theta) = argmin_x f(x, theta)` without unrolling.

`implicit_argmin(f, x0, theta, mode)` runs an inner solver without a graph, then returns `x*` as
the output of an autograd Function whose backward is, for an outer gradient `g = dL/dx*`:

* mode "ift" (implicit function theorem): `grad_x f(x*, theta) = 0` gives
  `dL/dtheta = -(d^2 f / dtheta dx)^T H^{-1} g`, `H = d^2 f / dx^2` at x*. `H^{-1} g` is one CG
  solve on Hessian-vector products (double backward); the mixed term is one more backward.
  Exact when x* is a minimum with H positive definite.
* mode "jfb" (Jacobian-free backprop, Fung et al. 2021, as in DIO): treat the Jacobian of the
  fixed-point map `T(x) = x - alpha grad_x f(x, theta)` as the identity, i.e. replace `H^{-1}` by
  `alpha I`: `dL/dtheta = -alpha (d^2 f / dtheta dx)^T g`, the derivative of one gradient step.
  No linear solve; a descent direction when H is well conditioned, not the exact gradient.

Gradients flow to `theta` only (one tensor; pack several parameters into it, or produce it with
a network): tensors captured inside `f` are treated as constants.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from shapeflow.errors import ShapeflowError
from shapeflow.solvers.linear.cg import conjugate_gradient

Objective = Callable[[Tensor, Tensor], Tensor]
InnerSolver = Callable[[Objective, Tensor, Tensor], Tensor]

MODES = ("ift", "jfb")


def newton_cg(f: Objective, x0: Tensor, theta: Tensor, *, maxiter: int = 50, gtol: float = 1e-10,
              cg_tol: float = 1e-10) -> Tensor:
    """Minimise `x -> f(x, theta)` by Newton steps (CG on Hessian-vector products) with backtracking.

    x0: any shape; f returns a scalar. Returns x* (detached), shape of x0. The default inner solver.
    """
    x = x0.detach().clone()
    theta = theta.detach()
    for _ in range(maxiter):
        with torch.enable_grad():
            xr = x.requires_grad_(True)
            fx = f(xr, theta)
            (g,) = torch.autograd.grad(fx, xr, create_graph=True)
        if float(torch.linalg.vector_norm(g)) <= gtol:
            break

        def hvp(v: Tensor) -> Tensor:
            return torch.autograd.grad(g, xr, grad_outputs=v.reshape(x.shape), retain_graph=True)[0].reshape(-1)

        step, _ = conjugate_gradient(hvp, -g.detach().reshape(-1), tol=cg_tol, maxiter=10 * x.numel())
        step = step.reshape(x.shape)
        slope = float((g.detach() * step).sum())
        if slope >= 0:  # not a descent direction (H not PD here): fall back to the gradient
            step, slope = -g.detach(), -float((g.detach() ** 2).sum())
        t, f0 = 1.0, float(fx)
        with torch.no_grad():
            while float(f(x.detach() + t * step, theta)) > f0 + 1e-4 * t * slope and t > 1e-8:
                t *= 0.5
        x = (x.detach() + t * step).detach()
    return x.detach()


def _grad_x(f: Objective, x: Tensor, theta: Tensor):
    """grad_x f at (x, theta) with a graph (for Hessian-vector and mixed products)."""
    xr = x.detach().requires_grad_(True)
    th = theta.detach().requires_grad_(True)
    (gx,) = torch.autograd.grad(f(xr, th), xr, create_graph=True)
    return xr, th, gx


class _ImplicitArgmin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta, f, x0, mode, inner, opts):  # type: ignore[override]
        x_star = inner(f, x0, theta.detach())
        ctx.f, ctx.mode, ctx.opts = f, mode, opts
        ctx.save_for_backward(theta, x_star)
        return x_star

    @staticmethod
    def backward(ctx, g_x):  # type: ignore[override]
        theta, x_star = ctx.saved_tensors
        with torch.enable_grad():
            xr, th, gx = _grad_x(ctx.f, x_star, theta)
            if ctx.mode == "ift":
                def hvp(v: Tensor) -> Tensor:
                    return torch.autograd.grad(gx, xr, grad_outputs=v.reshape(xr.shape), retain_graph=True)[0].reshape(-1)

                v, _ = conjugate_gradient(hvp, g_x.reshape(-1), tol=ctx.opts["cg_tol"],
                                          maxiter=ctx.opts["cg_maxiter"])
                v = v.reshape(xr.shape)
            else:
                v = ctx.opts["jfb_step"] * g_x
            (g_theta,) = torch.autograd.grad(gx, th, grad_outputs=v, allow_unused=True)
        if g_theta is None:
            g_theta = torch.zeros_like(theta)
        return -g_theta, None, None, None, None, None


def implicit_argmin(
    f: Objective,
    x0: Tensor,
    theta: Tensor,
    *,
    mode: str = "ift",
    inner: Optional[InnerSolver] = None,
    jfb_step: float = 1.0,
    cg_tol: float = 1e-10,
    cg_maxiter: Optional[int] = None,
) -> Tensor:
    """`x* = argmin_x f(x, theta)`, differentiable in theta by IFT or JFB (see module docstring).

    f: (x, theta) -> scalar, twice differentiable in x and once in (x, theta).
    x0: starting point for the inner solver, any shape. theta: tensor of any shape.
    mode: "ift" | "jfb". inner: (f, x0, theta) -> x*, run without a graph (default `newton_cg`;
      plug in any solver, e.g. a registration loop). jfb_step: alpha of the JFB step.
    cg_tol, cg_maxiter: for the IFT solve `H v = g` (CG on Hessian-vector products).
    Returns x*: shape of x0, with a grad_fn when theta requires grad.
    """
    if mode not in MODES:
        raise ShapeflowError(f"implicit_argmin(): unknown mode {mode!r}; valid names: {list(MODES)}")
    if not isinstance(theta, Tensor) or not isinstance(x0, Tensor):
        raise ShapeflowError("implicit_argmin(): x0 and theta must be tensors")
    if not jfb_step > 0:
        raise ShapeflowError(f"implicit_argmin(): jfb_step must be > 0, got {jfb_step}")
    inner = newton_cg if inner is None else inner
    opts = {"cg_tol": cg_tol, "cg_maxiter": cg_maxiter, "jfb_step": jfb_step}
    return _ImplicitArgmin.apply(theta, f, x0.detach(), mode, inner, opts)
