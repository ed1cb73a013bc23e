"""A one-pass CPU kernel for the Gauss-Newton matrix of a dense field (optional, needs numba).

`(J^T J + damping I + lam L) u` touches every voxel's `u`, its six neighbours and the Jacobian
once. Eager torch needs about ten passes over memory for it (one per neighbour and per product);
this kernel makes one, so the matvec runs near the machine's memory bandwidth. It is used by
`GridNormalOperator` for CPU float32/float64 tensors that do not require grad, when numba is
installed (`pip install "shapeflow[fast]"`); everything else takes the torch path, which gives
the same numbers (tests compare them).

2D fields are handled as 3D with one plane (`(C, X, Y)` -> `(C, X, Y, 1)`, no neighbours on
the last axis).
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from shapeflow._numba import numba_variants, run_numba


@functools.lru_cache(maxsize=1)
def _kernel():
    """The kernel as (serial, parallel) numba dispatchers (`numba_variants`, compiled on first
    call); None when numba is not installed."""
    try:
        import numba
    except ImportError:
        return None

    def normal_matvec(u, jac, out, wx, wy, wz, center, with_dot):  # pragma: no cover - compiled
        C, X, Y, Z = u.shape
        K = jac.shape[0]
        diag = 2.0 * (wx + wy + wz) + center
        dots = np.zeros(X)
        for x in numba.prange(X):
            t = np.empty(Z, dtype=u.dtype)
            xm, xp = max(x - 1, 0), min(x + 1, X - 1)  # Neumann: a missing neighbour is the voxel
            dot = 0.0
            for y in range(Y):
                ym, yp = max(y - 1, 0), min(y + 1, Y - 1)
                for c in range(C):  # the Laplacian, one row of z at a time
                    uc, oc = u[c, x, y], out[c, x, y]
                    a, b, d, e = u[c, xm, y], u[c, xp, y], u[c, x, ym], u[c, x, yp]
                    for z in range(Z):
                        oc[z] = diag * uc[z] - wx * (a[z] + b[z]) - wy * (d[z] + e[z])
                    if Z > 1:
                        oc[0] -= wz * (uc[0] + uc[1])
                        for z in range(1, Z - 1):
                            oc[z] -= wz * (uc[z - 1] + uc[z + 1])
                        oc[Z - 1] -= wz * (uc[Z - 2] + uc[Z - 1])
                    else:
                        oc[0] -= 2.0 * wz * uc[0]
                for k in range(K):  # the data blocks: out += J_k (J_k . u)
                    for z in range(Z):
                        t[z] = 0.0
                    for c in range(C):
                        jkc, uc = jac[k, c, x, y], u[c, x, y]
                        for z in range(Z):
                            t[z] += jkc[z] * uc[z]
                    for c in range(C):
                        jkc, oc = jac[k, c, x, y], out[c, x, y]
                        for z in range(Z):
                            oc[z] += jkc[z] * t[z]
                if with_dot:
                    for c in range(C):
                        uc, oc = u[c, x, y], out[c, x, y]
                        for z in range(Z):
                            dot += uc[z] * oc[z]
            dots[x] = dot
        return dots.sum()

    return numba_variants(normal_matvec)  # (serial, parallel)


def available(u: Tensor, jac: Tensor) -> bool:
    """True when the fused kernel can run on these tensors (CPU, same float dtype, numba present)."""
    return (
        u.device.type == "cpu"
        and jac.device.type == "cpu"
        and u.dtype in (torch.float32, torch.float64)
        and jac.dtype == u.dtype
        and not (torch.is_grad_enabled() and (u.requires_grad or jac.requires_grad))
        and _kernel() is not None
    )


def normal_matvec(
    u: Tensor, jac: Tensor, weights, center: float, out: Tensor, with_dot: bool
) -> Optional[Tensor]:
    """Write `(J^T J + center I + L_w) u` into `out` in one pass; return `u . out` if asked.

    u, out: (C, *S) contiguous; jac: (K, C, *S) contiguous; weights: lam / h^2 per spatial axis
    (2 or 3 of them); center: the extra diagonal (damping). S is 2D or 3D.
    """
    kernel = _kernel()
    w = list(weights) + [0.0] * (3 - len(weights))
    if u.dim() == 3:  # 2D field (C, X, Y) as (C, X, 1, Y): the innermost loop runs along the contiguous
        # axis (as (C, X, Y, 1) it had length 1, and a 96x96 matvec cost 1.8 ms instead of 0.03 ms)
        u, out, jac = u.unsqueeze(2), out.unsqueeze(2), jac.unsqueeze(3)
        w = [w[0], 0.0, w[1]]
    # torch's thread count, numba's own count restored after; the parallel build also at one
    # thread (its serial build measured 20-30 % slower for this kernel)
    dot = run_numba(kernel, u.detach().numpy(), jac.detach().numpy(), out.detach().numpy(),
                    float(w[0]), float(w[1]), float(w[2]), float(center), bool(with_dot),
                    serial_at_one_thread=False)
    return torch.tensor(dot, dtype=u.dtype) if with_dot else None
