"""Kernel LDDMM: diffeomorphisms by geodesic shooting of momenta on control points.

The velocity field at time t is a Gaussian kernel sum over K control points `q(t): (K, d)`
carrying momenta `p(t): (K, d)`:

    v_t(x) = sum_j k(x, q_j(t)) p_j(t),      k(x, y) = exp(-|x - y|^2 / sigma^2),

with sigma = `kernel_width` in the model's units (`register` normalises the shapes to unit RMS
radius, so the default 0.5 is half the shape's RMS radius). The control points and momenta
follow Hamilton's equations of `H(q, p) = 1/2 <p, K(q, q) p>` (a geodesic of the kernel metric):

    dq/dt = K(q, q) p,
    dp_i/dt = -dH/dq_i = (2 / sigma^2) sum_j k(q_i, q_j) <p_i, p_j> (q_i - q_j),

and every other point is carried along, `dx/dt = v_t(x)`; the whole system is integrated from
t = 0 to 1 by the same Runge-Kutta scheme (`rk4` or `rk2`, Heun) in `time_steps` steps. H is
conserved by the exact flow, so the energy `1/2 <p0, K(q0, q0) p0>` (the kinetic energy
`1/2 int |v_t|_V^2 dt` of the whole path) depends on the initial momenta only, not on the points.

Every kernel sum goes through `shapeflow.kernels.gaussian_kernel_product` with the model's
`backend` (default `BACKEND`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ShapeflowError
from ..kernels import BACKENDS as KERNEL_BACKENDS
from ..kernels import gaussian_kernel_product
from ..sampling import farthest_point_sample
from .base import Deformation, register_deformation

__all__ = ["KernelLDDMM", "INTEGRATORS", "BACKEND", "lddmm_hamiltonian", "lddmm_velocities"]

#: the kernel backend a new model uses: "auto" (KeOps on CUDA or for large sums, dense torch below;
#: the rule is `shapeflow.kernels.resolve_backend`)
BACKEND = "auto"

State = tuple[Tensor, ...]
Field = Callable[[State], State]


def lddmm_velocities(q: Tensor, p: Tensor, sigma: float, backend: str = BACKEND,
                     points: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Hamilton's equations of `H = 1/2 <p, K(q, q) p>` for the Gaussian kernel of width `sigma`,
    and the velocity `v(x) = K(x, q) p` of the points carried along.

    q, p: (K, d); points: (N, d) or None (N = 0). Returns `(dq/dt, dp/dt, v)`, (K, d), (K, d),
    (N, d), from one kernel sum over the rows `[q; points]`: with `b_j = [p_j, p_j q_j^T]`,
    `K b` gives `(K p)_i` and `sum_j k_ij p_j q_j^T`, so
    `dp_i/dt = (2 / sigma^2) (<p_i, (K p)_i> q_i - p_i^T sum_j k_ij p_j q_j^T)`.
    """
    n, d = p.shape
    rows = q if points is None else torch.cat([q, points])                          # (K + N, d)
    b = torch.cat([p, (p[:, :, None] * q[:, None, :]).reshape(n, d * d)], dim=1)   # (K, d + d^2)
    kb = gaussian_kernel_product(rows, q, b, sigma, backend=backend)                # (K + N, d + d^2)
    kp, kpq = kb[:n, :d], kb[:n, d:].reshape(n, d, d)                              # (K, d), (K, d, d)
    dp = (2.0 / sigma**2) * ((p * kp).sum(1, keepdim=True) * q - torch.einsum("ka,kab->kb", p, kpq))
    return kp, dp, kb[n:, :d]


def lddmm_hamiltonian(q: Tensor, p: Tensor, sigma: float, backend: str = BACKEND) -> Tensor:
    """`H(q, p) = 1/2 <p, K(q, q) p>`, q, p: (K, d) -> 0-d."""
    return 0.5 * (p * gaussian_kernel_product(q, q, p, sigma, backend=backend)).sum()


def _rk2(field: Field, state: State, dt: float) -> State:
    """One Heun step (explicit trapezoid, order 2)."""
    k1 = field(state)
    k2 = field(tuple(s + dt * k for s, k in zip(state, k1)))
    return tuple(s + 0.5 * dt * (a + b) for s, a, b in zip(state, k1, k2))


def _rk4(field: Field, state: State, dt: float) -> State:
    """One classical Runge-Kutta step (order 4)."""
    k1 = field(state)
    k2 = field(tuple(s + 0.5 * dt * k for s, k in zip(state, k1)))
    k3 = field(tuple(s + 0.5 * dt * k for s, k in zip(state, k2)))
    k4 = field(tuple(s + dt * k for s, k in zip(state, k3)))
    return tuple(s + dt / 6 * (a + 2 * b + 2 * c + e) for s, a, b, c, e in zip(state, k1, k2, k3, k4))


#: one step of each integrator: `(field, state, dt) -> state`, with the order of the scheme
INTEGRATORS: dict[str, tuple[Callable[[Field, State, float], State], int]] = {"rk2": (_rk2, 2), "rk4": (_rk4, 4)}


@register_deformation
class KernelLDDMM(Deformation):
    """Geodesic shooting of momenta on control points (see the module docstring).

    Parameter `p0: (K, d)`, the initial momenta scaled to displacement units: the momenta are
    `p0 / kernel_mass`, where `kernel_mass` (a buffer) is the mean row sum of `K(q0, q0)`. A
    change of `p0` by delta then moves the shape by about delta, whatever the number and spacing
    of the control points, so Adam's step size is a displacement (as for the other flows).
    Buffer `q0: (K, d)`, the control points, set by `prepare` (none before: the identity).
    `p0` starts at zero, so a new model is the identity.
    """

    def __init__(self, dim: int = 3, kernel_width: float = 0.5, time_steps: int = 5, integrator: str = "rk4",
                 control_points: int = 64, backend: str = BACKEND):
        super().__init__()
        if dim not in (2, 3):
            raise ShapeflowError(f"KernelLDDMM: dim must be 2 or 3, got {dim}")
        if not kernel_width > 0:
            raise ShapeflowError(f"KernelLDDMM: kernel_width must be > 0, got {kernel_width}")
        if not (isinstance(time_steps, int) and time_steps >= 1):
            raise ShapeflowError(f"KernelLDDMM: time_steps must be a positive integer, got {time_steps!r}")
        if integrator not in INTEGRATORS:
            raise ShapeflowError(f"KernelLDDMM: unknown integrator {integrator!r}; "
                                 f"choose from {', '.join(INTEGRATORS)}")
        if not (isinstance(control_points, int) and control_points >= 1):
            raise ShapeflowError(f"KernelLDDMM: control_points must be a positive integer, got {control_points!r}")
        KERNEL_BACKENDS.lookup(backend, "KernelLDDMM")
        self.dim, self.kernel_width, self.time_steps = dim, float(kernel_width), time_steps
        self.integrator, self.control_points, self.backend = integrator, control_points, backend
        self.p0 = nn.Parameter(torch.zeros(0, dim))
        self.register_buffer("q0", torch.zeros(0, dim))
        self.register_buffer("kernel_mass", torch.ones(()))

    data_sized = ("p0", "q0")     # their size depends on the shape the model was fitted on

    @dataclass
    class Options:
        """`register()` options of `model="lddmm"`.

        Defaults, for shapes normalised to unit RMS radius (as `register` does): sigma = 0.5 bends
        a limb without moving the whole shape. 64 control points leave every source point within
        about sigma / 2 of one (measured on the shipped ant: 0.49 sigma; the horse contour: 0.28),
        the usual density for kernel LDDMM (control-point spacing ~ sigma); 100 or 150 fit the
        shipped shapes no better and cost more (the carried points' kernel sums grow with it).
        RK4 in 5 steps costs as much as RK2 in 10 (20 kernel sums per shot) and is about 100x more
        accurate (measured: 7e-6 vs 7e-4 of the RMS radius on a fitted flow).
        """

        kernel_width: float = 0.5       # Gaussian width sigma, in units of the shape's RMS radius
        control_points: int = 64        # farthest-point subsample of the source carrying momenta
        time_steps: int = 5             # integrator steps from t = 0 to 1
        integrator: str = "rk4"         # rk4 (order 4) or rk2 (Heun, order 2; half the kernel sums)
        kernel_backend: str = BACKEND   # "auto", "keops" or "torch" (dense): see shapeflow.kernels

    @classmethod
    def build(cls, domain: int, options: "KernelLDDMM.Options | None" = None, seed: int = 0) -> "KernelLDDMM":
        options = options or cls.Options()
        return cls(domain, kernel_width=options.kernel_width, time_steps=options.time_steps,
                   integrator=options.integrator, control_points=options.control_points,
                   backend=options.kernel_backend)

    def prepare(self, points: Tensor, cells: Tensor | None = None) -> None:
        """Take a farthest-point subsample of `control_points` of `points: (N, d)` (all of them if
        fewer) as the control points `q0`, and reset the momenta `p0` to zero (the identity)."""
        keep = farthest_point_sample(points, self.control_points)
        q0 = points[keep].detach().clone().to(self.q0.dtype)
        self.q0 = q0
        ones = torch.ones(len(q0), 1, dtype=q0.dtype, device=q0.device)
        self.kernel_mass = gaussian_kernel_product(q0, q0, ones, self.kernel_width, backend=self.backend).mean()
        self.p0 = nn.Parameter(torch.zeros_like(q0))

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "kernel_width": self.kernel_width, "time_steps": self.time_steps,
                "integrator": self.integrator, "control_points": self.control_points, "backend": self.backend}

    # --- the dynamics --------------------------------------------------------------------
    @property
    def momenta(self) -> Tensor:
        """The initial momenta `p0 / kernel_mass`, (K, d): a detached read-out."""
        return self._momenta().detach()

    def _momenta(self) -> Tensor:
        return self.p0 / self.kernel_mass

    def velocity(self, points: Tensor, q: Tensor, p: Tensor) -> Tensor:
        """`v(x) = sum_j k(x, q_j) p_j` at `points: (N, d)` for control points and momenta
        `q, p: (K, d)` -> `(N, d)`."""
        return gaussian_kernel_product(points, q, p, self.kernel_width, backend=self.backend)

    def _field(self, state: State) -> State:
        """The right-hand side of `(q, p, x)`: (K, d), (K, d), (N, d)."""
        q, p, x = state
        return lddmm_velocities(q, p, self.kernel_width, self.backend, points=x)

    def shoot(self, points: Tensor | None = None, time_steps: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Integrate `(q, p, x)` from t = 0 to 1: control points `(T + 1, K, d)`, momenta
        `(T + 1, K, d)` and positions of `points: (N, d)` at `(T + 1, N, d)` (`(T + 1, 0, d)`
        without points) at t = k / T, T = `time_steps` (default the model's)."""
        return self._shoot(points, time_steps)

    def _shoot(self, points: Tensor | None = None, time_steps: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        steps = self.time_steps if time_steps is None else time_steps
        step = INTEGRATORS[self.integrator][0]
        if points is None:
            points = self.q0.new_zeros(0, self.dim)
        state: State = (self.q0, self._momenta(), points)
        path = [state]
        if len(self.q0):
            for _ in range(steps):
                state = step(self._field, state, 1.0 / steps)
                path.append(state)
        else:
            path = path * (steps + 1)
        q, p, x = (torch.stack(s) for s in zip(*path))
        return q, p, x

    def forward(self, points: Tensor) -> Tensor:
        return self._shoot(points)[2][-1]

    def forward_with_energy(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """`phi(points)`, `(N, d)`, and the energy (independent of the points), 0-d."""
        return self.forward(points), self._energy()

    def energy(self, points: Tensor | None = None) -> Tensor:
        """`1/2 <p0, K(q0, q0) p0>` with the momenta `p0 / kernel_mass`, 0-d: the kinetic energy of
        the geodesic, the same for any `points: (N, d)` (accepted for the common interface)."""
        return self._energy()

    def _energy(self) -> Tensor:
        if not len(self.q0):
            return self.p0.sum() * 0.0
        return lddmm_hamiltonian(self.q0, self._momenta(), self.kernel_width, self.backend)

    def trajectory(self, points: Tensor, steps: int | None = None) -> Tensor:
        """Positions of `points: (N, d)` at t = k / steps, `(steps + 1, N, d)` (steps defaults to
        `time_steps`). At the integrator's steps these are the integrated positions (so the last
        frame is exactly `forward(points)`); in between, the cubic Hermite interpolant of the
        positions and velocities at the two neighbouring steps (the standard dense output of
        RK4, error O(dt^4), more accurate than the RK2 scheme itself)."""
        steps = self.time_steps if steps is None else steps
        if not (isinstance(steps, int) and steps >= 1):
            raise ShapeflowError(f"KernelLDDMM.trajectory(): steps must be a positive integer, got {steps!r}")
        q, p, x = self._shoot(points)
        n = self.time_steps
        if steps == n:
            return x
        v = torch.stack([self.velocity(x[k], q[k], p[k]) for k in range(n + 1)]) if len(self.q0) \
            else torch.zeros_like(x)
        frames = []
        for i in range(steps + 1):
            s = i * n / steps
            k = min(int(s), n - 1)
            u = s - k
            h00, h10 = (1 + 2 * u) * (1 - u) ** 2, u * (1 - u) ** 2
            h01, h11 = u * u * (3 - 2 * u), u * u * (u - 1)
            frames.append(h00 * x[k] + h01 * x[k + 1] + (h10 * v[k] + h11 * v[k + 1]) / n)
        return torch.stack(frames)

    def inverse(self, points: Tensor) -> Tensor:
        """`phi^{-1}(points)`, `(N, d) -> (N, d)`: shoot `(q, p)` forward, then carry the points from
        t = 1 back to 0, each step by the same scheme with `-dt`, the control points and momenta
        restarting from their forward values at the step's end. Differentiable."""
        if not len(self.q0):
            return points
        q, p, _ = self._shoot()
        step, n = INTEGRATORS[self.integrator][0], self.time_steps
        x = points
        for k in range(n, 0, -1):
            x = step(self._field, (q[k], p[k], x), -1.0 / n)[2]
        return x
