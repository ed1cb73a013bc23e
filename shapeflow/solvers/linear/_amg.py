"""Algebraic multigrid (pyamg, CPU) as a solver and as a preconditioner for our CG.

pyamg is imported here, on use, with an error naming the `amg` extra.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from shapeflow.solvers.linear.operators import Matvec, to_scipy_csr
from shapeflow._optional import import_optional


def amg_hierarchy(A: Tensor):
    """Smoothed-aggregation AMG hierarchy of a symmetric positive-definite A: (n, n) CPU tensor.

    Built in float64 whatever A's dtype (pyamg's solve refuses a float32 matrix with float64
    vectors); the callers convert their vectors to float64 and back.
    """
    pyamg = import_optional("pyamg", "algebraic multigrid (backend='amg' / M='amg')")
    return pyamg.smoothed_aggregation_solver(to_scipy_csr(A).astype(np.float64))


def amg_solve(A: Tensor, B: Tensor, X0: Tensor, tol: float, maxiter: int) -> tuple[Tensor, Tensor]:
    """Solve A X = B column by column with AMG-preconditioned CG (pyamg `accel="cg"`).

    A: (n, n), B, X0: (n, k) CPU tensors. Returns X (n, k) and iterations (k,).
    """
    ml = amg_hierarchy(A)
    cols, its = [], []
    for j in range(B.shape[1]):
        b = B[:, j].detach().numpy().astype(np.float64)
        residuals: list[float] = []
        x = ml.solve(
            b, x0=X0[:, j].detach().numpy().astype(np.float64), tol=tol, maxiter=max(maxiter, 1),
            accel="cg", residuals=residuals,
        )
        cols.append(torch.from_numpy(np.ascontiguousarray(x)).to(B.dtype))
        its.append(max(len(residuals) - 1, 0))
    return torch.stack(cols, dim=1), torch.tensor(its, dtype=torch.int64)


def amg_preconditioner(A: Tensor) -> Matvec:
    """`R -> V-cycle(R)` on (n, k) CPU blocks: an SPD approximation of A^{-1} for CG."""
    op = amg_hierarchy(A).aspreconditioner(cycle="V")

    def apply(R: Tensor) -> Tensor:
        out = [torch.from_numpy(np.asarray(op.matvec(R[:, j].detach().numpy().astype(np.float64)))).to(R.dtype)
               for j in range(R.shape[1])]
        return torch.stack(out, dim=1)

    return apply
