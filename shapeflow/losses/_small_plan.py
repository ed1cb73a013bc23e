"""`transport_plan`'s sweeps and summaries for small pairs, in NumPy.

At a hundred points a plan is ~140 small torch operations of 3-8 us each on this project's CPU:
their dispatch, not the arithmetic, is the cost, and the EM (`pipelines/shape_flow_gn.py`) runs
two plans a step. NumPy's operations on arrays this small cost 1-3 us, so the same steps here take
half the time (one thread, float32, a warm plan of 3 sweeps: 91 x 91 points 0.57 -> 0.23 ms,
128 x 128 1.17 -> 0.53 ms, 180 x 180 0.63 -> 0.34 ms; at 512 x 512 no faster), hence
`SMALL_PLAN_ENTRIES` in `losses.sinkhorn`. (A numba kernel was as fast at 91 points, but importing
numba and loading its cache cost a whole `shapeflow register` process about a second more.)

The matrix-vector products are `einsum`s, which NumPy runs in its own loops: OpenBLAS's would
start its thread pool from 9,216 entries (`threads` does not reach it, and on a busy 2-core machine
two threads can stall each other); the 5-column product stays below OpenBLAS's threading threshold
of a matrix product (65,536 x 4 multiply-adds) at `SMALL_PLAN_ENTRIES`.
`tests/test_flow_em.py` checks this path and the torch one against a plain Sinkhorn and each other.
"""
from __future__ import annotations

import numpy as np

__all__ = ["plan_sweeps"]


def plan_sweeps(x: np.ndarray, y: np.ndarray, g: np.ndarray, log_b: np.ndarray, a: np.ndarray, eps: float,
                damping: float, tol: float, max_sweeps: int, floor: float) -> tuple:
    """The plan of `x: (N, d)` onto `y: (M, d)` from the target potential `g: (M,)`, the weights'
    logarithms `log_b: (M,)` and the weights `a: (N,)`, all of one dtype, as
    `losses.sinkhorn.transport_plan` runs it (in base e; `floor`: the smallest exponent kept).
    Returns `(barycentres (N, d), mass (N,), cost, f (N,), g (M,), sweeps, spread (N,))`."""
    dtype = x.dtype
    tiny = np.finfo(dtype).tiny
    x2, y2 = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    # z_ij = (g_j - |x_i - y_j|^2 / 2) / eps + log b_j; relative = exp(z - top_i), flushed below `floor`
    z = (x * dtype.type(1 / eps)) @ y.T
    z += (g - y2 / 2) / dtype.type(eps) + log_b
    z -= (x2 / dtype.type(2 * eps))[:, None]
    top = z.max(1)
    z -= top[:, None]
    relative = np.exp(np.maximum(z, floor, out=z), out=z)
    relative[relative < 5 * tiny] = 0.0                 # no subnormal numbers in the sweeps
    # the scalings of the absorbed potentials f_abs = -eps top and g: f = f_abs + eps log u
    f_abs = top * dtype.type(-eps)
    shift_u = f_abs * dtype.type((damping - 1) / eps)
    shift_v = g * dtype.type((damping - 1) / eps) + dtype.type(damping) * log_b
    scale = dtype.type(-damping)
    log_u = np.log(np.maximum(relative.sum(1), tiny)) * scale + shift_u
    log_v = np.zeros_like(g)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        new_u = np.log(np.maximum(np.einsum("ij,j->i", relative, np.exp(log_v)), tiny)) * scale + shift_u
        new_v = np.log(np.maximum(np.einsum("ij,i->j", relative, a * np.exp(new_u)), tiny)) * scale + shift_v
        if sweeps == max_sweeps:        # the last one allowed: no test
            log_u, log_v = new_u, new_v
            break
        change = max(np.abs(new_u - log_u).max(), np.abs(new_v - log_v).max())
        log_u, log_v = new_u, new_v
        if change < tol:
            break
    # per row, sums of the plan's entries over a_i u_i times y_j, |y_j|^2 and 1
    columns = np.concatenate([y, y2[:, None], np.ones_like(y2)[:, None]], 1) * np.exp(log_v)[:, None]
    sums = relative @ columns
    with np.errstate(over="ignore", invalid="ignore"):
        mass = np.nan_to_num(np.exp(log_u) * sums[:, -1], nan=0.0, posinf=0.0)    # a row with no mass: none
    total = np.maximum(sums[:, -1], tiny)
    barycentres = sums[:, :-2] / total[:, None]
    spread = np.maximum(sums[:, -2] / total - np.einsum("ij,ij->i", barycentres, barycentres), 0)
    cost = float((a * mass * (x2 / 2 + sums[:, -2] / (2 * total) - np.einsum("ij,ij->i", x, barycentres))).sum())
    return barycentres, mass, cost, f_abs + dtype.type(eps) * log_u, g + dtype.type(eps) * log_v, sweeps, spread
