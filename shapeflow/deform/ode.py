"""Neural ODE flow: points follow `dx/dt = v_theta(x, t)` for t in [0, 1], solved by torchdiffeq.

`v_theta` is one MLP on `(x, t)` (time is an input, so the field changes along the path). The
map `phi(x) = x(1)` is the flow of a smooth, Lipschitz vector field, hence a diffeomorphism: the
activations offered are the smooth ones (softplus, tanh, silu); ReLU is left out on purpose, its
kinks make the field only Lipschitz. The kinetic energy `int_0^1 mean_i |v(x_i(t), t)|^2 dt` is
integrated with the points as an augmented state `(x, e)`, `de/dt = mean_i |v|^2`, so the fit
gets the map and its regulariser from one solve. The inverse solves the same ODE from t = 1 back
to t = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .._optional import import_optional
from .._registry import Registry
from ..errors import ShapeflowError
from .base import KineticFlow, register_deformation

__all__ = ["NeuralODEFlow", "VelocityNetwork", "SOLVERS", "SMOOTH_ACTIVATIONS"]

#: smooth activations only: the flow of a smooth field is a diffeomorphism (no ReLU)
SMOOTH_ACTIVATIONS: Registry[Callable] = Registry("activation", {
    "softplus": nn.functional.softplus, "tanh": torch.tanh, "silu": nn.functional.silu})
#: the torchdiffeq methods offered, and whether each takes fixed steps or adapts them
SOLVERS: Registry[str] = Registry("solver", {"euler": "fixed", "midpoint": "fixed", "rk4": "fixed",
                                             "dopri5": "adaptive"})


class VelocityNetwork(nn.Module):
    """`v(x, t)`: an MLP on the concatenation `(x, t)`, points `(N, d)` and a 0-d time -> `(N, d)`.

    `depth` hidden layers of `width` units; weights `(width, d + 1)`, then `(width, width)`, then
    `(d, width)`. The last layer starts at zero, so the field is zero and the flow the identity.
    Called as `v(t, x)`, the order torchdiffeq uses.
    """

    def __init__(self, dim: int, width: int, depth: int, activation: str, frequency: float = 1.0,
                 seed: int | None = None):
        super().__init__()
        self.activation = SMOOTH_ACTIVATIONS[activation]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        sizes = [dim + 1] + [width] * depth
        weights, biases = [], []
        for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            # the first layer sets the spatial frequency over a unit-sized shape (as ResNetFlow's W1)
            scale = frequency if index == 0 else 1.0 / math.sqrt(fan_in)
            weights.append(nn.Parameter(scale * torch.randn(fan_out, fan_in, generator=gen)))
            biases.append(nn.Parameter((0.5 * frequency * torch.randn(fan_out, generator=gen)) if index == 0
                                       else torch.zeros(fan_out)))
        weights.append(nn.Parameter(torch.zeros(dim, width)))
        biases.append(nn.Parameter(torch.zeros(dim)))
        self.weights, self.biases = nn.ParameterList(weights), nn.ParameterList(biases)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        w0 = self.weights[0]
        # (x, t) @ W0^T without building the (N, d + 1) input
        h = self.activation(x @ w0[:, :-1].T + t * w0[:, -1] + self.biases[0])   # (N, m)
        for w, b in zip(self.weights[1:-1], self.biases[1:-1]):
            h = self.activation(h @ w.T + b)                                     # (N, m)
        return h @ self.weights[-1].T + self.biases[-1]                          # (N, d)


class _WithEnergy(nn.Module):
    """The augmented field `(x, e) -> (v(x, t), mean_i |v_i|^2)`: `((N, d), 0-d)`."""

    def __init__(self, field: VelocityNetwork):
        super().__init__()
        self.field = field

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        v = self.field(t, state[0])
        return v, v.square().sum(1).mean()


def _uniform_grid(per_unit: int) -> Callable:
    """A torchdiffeq `grid_constructor`: `round(per_unit * |t1 - t0|)` equal steps from t0 to t1
    (exact nodes, unlike `step_size`, whose `ceil((t1 - t0) / h)` can add a sliver step)."""
    def grid(func, y0, t):
        n = max(1, round(per_unit * abs(float(t[-1] - t[0]))))
        return torch.linspace(float(t[0]), float(t[-1]), n + 1, dtype=t.dtype, device=t.device)
    return grid


@register_deformation
class NeuralODEFlow(KineticFlow):
    """`phi(x) = x(1)` with `dx/dt = v(x, t)`, `x(0) = x`; `v` a `VelocityNetwork` of `depth`
    hidden layers of `width` units, solved by torchdiffeq's `solver` (`euler`, `midpoint`, `rk4`
    in `time_steps` equal steps, or adaptive `dopri5` to `rtol`/`atol`).

    `adjoint=True` backpropagates with the adjoint ODE (`odeint_adjoint`: memory independent of
    the number of steps, at the price of one more solve, backwards). The default, `False`,
    backpropagates through the solver's operations, which was faster at every size measured
    (`benchmarks/node_adjoint.py`: one fitting step, forward with energy + backward, 3D points,
    rk4, 10 steps, width 64, depth 2, float32, one CPU thread, median of 7):

        points   direct   adjoint
           500   0.063 s  0.101 s   (1.6x)
          2000   0.138 s  0.203 s   (1.5x)
          4000   0.228 s  0.333 s   (1.5x)

    It is also exact for the discrete map; with fixed steps the adjoint gives the gradient of the
    continuous ODE, off by the solver's error (8e-5 relative for rk4 in 10 steps on a test flow;
    the two agree to 1e-7 in 40 steps, and to 1e-9 for dopri5 at tolerance 1e-10).

    `frequency` scales the first layer's weights and biases (features over a unit-sized shape,
    as `ResNetFlow`'s): at 2 (the default) a softplus unit bends over half the distance it does at
    1, which fitted the known deformation of the shipped ant to 0.2% of its diagonal where 1 left
    2.8% (register defaults, seed 0). Points are `(N, d)` throughout; `trajectory` gives
    `(steps + 1, N, d)`.
    """

    #: Adam's step size in `register` (measured on the benchmark pairs: 3e-2, the flows' default,
    #: oscillates in the coarse Sinkhorn stage, 3.8 % RMSE on fsaverage 4k; 5e-3 gives 0.24 %)
    default_lr = 5e-3

    def __init__(self, dim: int = 3, width: int = 64, depth: int = 2, activation: str = "softplus",
                 solver: str = "rk4", time_steps: int = 5, rtol: float = 1e-5, atol: float = 1e-7,
                 adjoint: bool = False, frequency: float = 2.0, seed: int | None = None):
        super().__init__()
        if dim not in (2, 3):
            raise ShapeflowError(f"NeuralODEFlow: dim must be 2 or 3, got {dim}")
        for name, value in (("width", width), ("depth", depth), ("time_steps", time_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ShapeflowError(f"NeuralODEFlow: {name} must be a positive integer, got {value!r}")
        for name, value in (("rtol", rtol), ("atol", atol), ("frequency", frequency)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ShapeflowError(f"NeuralODEFlow: {name} must be a positive number, got {value!r}")
        if not isinstance(adjoint, bool):
            raise ShapeflowError(f"NeuralODEFlow: adjoint must be True or False, got {adjoint!r}")
        SMOOTH_ACTIVATIONS.lookup(activation, "NeuralODEFlow")
        SOLVERS.lookup(solver, "NeuralODEFlow")
        self.dim, self.width, self.depth, self.activation = dim, width, depth, activation
        self.solver, self.time_steps, self.rtol, self.atol = solver, time_steps, float(rtol), float(atol)
        self.adjoint, self.frequency = adjoint, float(frequency)
        self.field = VelocityNetwork(dim, width, depth, activation, self.frequency, seed)
        # points the kinetic energy is measured on when energy() gets none (set by prepare)
        self._init_reference(dim)

    @dataclass
    class Options:
        """`register()` options of `model="node"`."""

        width: int = 64                 # hidden units per layer
        depth: int = 2                  # hidden layers
        activation: str = "softplus"    # softplus, tanh or silu (smooth: a diffeomorphism; no relu)
        solver: str = "rk4"             # euler, midpoint, rk4 (fixed steps) or dopri5 (adaptive)
        time_steps: int = 5             # steps of the fixed-step solvers (rk4 in 5 fits fsaverage 4k as
                                        # well as in 10, 0.24 % RMSE, in half the time; the fitted
                                        # flow's inverse is exact to 6e-8 of the diagonal)
        rtol: float = 1e-5              # tolerances of dopri5
        atol: float = 1e-7
        adjoint: bool = False           # backpropagate by the adjoint ODE (less memory, slower here)

    @classmethod
    def build(cls, domain: int, options: "NeuralODEFlow.Options | None" = None, seed: int = 0) -> "NeuralODEFlow":
        o = options or cls.Options()
        return cls(domain, width=o.width, depth=o.depth, activation=o.activation, solver=o.solver,
                   time_steps=o.time_steps, rtol=o.rtol, atol=o.atol, adjoint=o.adjoint, seed=seed)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "width": self.width, "depth": self.depth, "activation": self.activation,
                "solver": self.solver, "time_steps": self.time_steps, "rtol": self.rtol, "atol": self.atol,
                "adjoint": self.adjoint, "frequency": self.frequency}

    # --- solving -------------------------------------------------------------------------
    def _solve(self, func: nn.Module, state, times: torch.Tensor, per_unit: int | None = None):
        """torchdiffeq's solution of `func` from `state` at `times: (T,)`: each state `(T, ...)`.
        Fixed-step solvers take `per_unit` (default `time_steps`) equal steps per unit of time."""
        if SOLVERS[self.solver] == "fixed":
            kwargs = {"options": {"grid_constructor": _uniform_grid(per_unit or self.time_steps)}}
        else:
            kwargs = {"rtol": self.rtol, "atol": self.atol}
        torchdiffeq = import_optional("torchdiffeq", "NeuralODEFlow")    # imported on first use
        if self.adjoint:
            return torchdiffeq.odeint_adjoint(func, state, times, method=self.solver,
                                              adjoint_params=tuple(self.field.parameters()), **kwargs)
        return torchdiffeq.odeint(func, state, times, method=self.solver, **kwargs)

    def _times(self, points: torch.Tensor, *values: float) -> torch.Tensor:
        return torch.tensor(values, dtype=points.dtype, device=points.device)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self._solve(self.field, points, self._times(points, 0.0, 1.0))[-1]

    def forward_with_energy(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`phi(points)` and the kinetic energy `int_0^1 mean_i |v(x_i(t), t)|^2 dt` from one solve
        of the augmented state: `(N, d)` -> `((N, d), 0-d)`."""
        start = (points, torch.zeros((), dtype=points.dtype, device=points.device))
        xs, es = self._solve(_WithEnergy(self.field), start, self._times(points, 0.0, 1.0))
        return xs[-1], es[-1]

    def energy(self, points: torch.Tensor | None = None) -> torch.Tensor:
        """Kinetic energy `int_0^1 mean_i |v(x_i(t), t)|^2 dt` of the flow of `points: (N, d)`, 0-d.

        Without `points`, the points the flow was fitted on (`reference_points`) are used.
        """
        points = self._points_for_energy(points)
        return self.forward_with_energy(points)[1]

    def inverse(self, points: torch.Tensor) -> torch.Tensor:
        """`phi^{-1}(points)`: the ODE solved backwards from t = 1 to 0 with the same solver,
        `(N, d) -> (N, d)`; exact up to the solver's error (O(h^4) for rk4)."""
        return self._solve(self.field, points, self._times(points, 1.0, 0.0))[-1]

    def trajectory(self, points: torch.Tensor, steps: int = 10) -> torch.Tensor:
        """Positions at t = k / steps, `(steps + 1, N, d)`, from one solve.

        Fixed-step solvers take `ceil(time_steps / steps)` equal steps between consecutive output
        times, so every output time is a solver node (no interpolation); when `steps` divides
        `time_steps` the last frame is exactly `phi(points)`, otherwise equal to it up to the
        solver's error (a finer grid).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ShapeflowError(f"NeuralODEFlow.trajectory(): steps must be a positive integer, got {steps!r}")
        per_unit = steps * math.ceil(self.time_steps / steps)
        times = torch.linspace(0, 1, steps + 1, dtype=points.dtype, device=points.device)
        return self._solve(self.field, points, times, per_unit)
