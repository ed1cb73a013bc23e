"""Batched BiCGSTAB for non-symmetric systems, on torch tensors (any device, differentiable).

Same conventions as `conjugate_gradient`: `A` a sparse/dense tensor or a callable, `b: (n,)` or
`(n, k)` with each column its own iteration, converged columns frozen.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from shapeflow.errors import ShapeflowError
from shapeflow.solvers.linear.operators import Operator, block_matvec, check_operator
from shapeflow.solvers.linear.cg import CGInfo, Preconditioner, solve_info, default_maxiter, make_preconditioner


def _safe_div(num: Tensor, den: Tensor, mask: Tensor) -> Tensor:
    ok = mask & (den != 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def bicgstab(
    A: Operator,
    b: Tensor,
    M: Preconditioner = None,
    x0: Optional[Tensor] = None,
    *,
    tol: float = 1e-6,
    maxiter: Optional[int] = None,
) -> tuple[Tensor, CGInfo]:
    """Solve `A x = b` for a general (non-symmetric, non-singular) A by preconditioned BiCGSTAB.

    A: (n, n) sparse/dense tensor or callable `v -> A v`; b: (n,) or (n, k); M: as in
    `conjugate_gradient` (right preconditioning); x0: like b. Returns (x, info) with
    `info.backend == "torch"`; one iteration costs two matvecs.
    """
    if not isinstance(b, Tensor) or b.dim() not in (1, 2):
        raise ShapeflowError("bicgstab(): b must be a tensor of shape (n,) or (n, k)")
    vector = b.dim() == 1
    n = b.shape[0]
    check_operator("bicgstab", A, n)
    B = b.reshape(n, -1)
    X = torch.zeros_like(B) if x0 is None else x0.reshape(n, -1).to(B.dtype)
    maxiter = default_maxiter(n) if maxiter is None else int(maxiter)
    matvec = block_matvec(A, vector)
    precond = make_preconditioner(A, M, n, vector) or (lambda R: R)

    def norm(U: Tensor) -> Tensor:
        return torch.linalg.vector_norm(U, dim=0, keepdim=True)

    def dot(U: Tensor, V: Tensor) -> Tensor:
        return torch.einsum("nk,nk->k", U, V).unsqueeze(0)

    R = B - matvec(X)
    Rhat = R.detach().clone()
    bnorm = norm(B)
    safe_b = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    active = (norm(R) / safe_b > tol) & (bnorm > 0)
    ones = torch.ones_like(bnorm)
    rho, alpha, omega = ones, ones, ones
    P = torch.zeros_like(B)
    V = torch.zeros_like(B)
    iterations = torch.zeros(B.shape[1], dtype=torch.int64, device=B.device)
    for _ in range(maxiter):
        if not bool(active.any()):
            break
        rho_new = dot(Rhat, R)
        beta = _safe_div(rho_new, rho, active) * _safe_div(alpha, omega, active)
        P = R + beta * (P - omega * V)
        Phat = precond(P)
        V = matvec(Phat)
        alpha = _safe_div(rho_new, dot(Rhat, V), active)
        S = R - alpha * V
        Shat = precond(S)
        T = matvec(Shat)
        omega = _safe_div(dot(T, S), dot(T, T), active)
        X = X + alpha * Phat + omega * Shat
        R = S - omega * T
        rho = torch.where(active, rho_new, rho)
        iterations = iterations + active[0].to(torch.int64)
        active = active & (norm(R) / safe_b > tol)
    return X.reshape(b.shape), solve_info(matvec, B, X, iterations, tol, vector, "torch")
