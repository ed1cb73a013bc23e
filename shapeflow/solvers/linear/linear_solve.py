"""`linear_solve(A, diag, b)`: a differentiable solve of `(A + diag(d)) x = b`.

Three ways to differentiate (`mode`):

* "implicit" (default): an autograd Function. The forward solve runs without a graph; the backward
  solves the adjoint system once, `(A + diag(d))^T g_b = g_x`, and returns `g_d = -x * g_b`
  (summed over columns), `g_b`, and for a tensor `A` the gradient on its stored entries,
  `g_A[i, j] = -sum_c g_b[i, c] x[j, c]` (sparse, with A's pattern). Exact for an exact solve;
  memory O(n) whatever the iteration count.
* "unrolled": autograd through every iteration of the Krylov loop. The exact derivative of the
  (possibly truncated) computation that ran; memory grows with the iterations.
* "partial": the first `(1 - p)` of the iterations run without a graph; CG then restarts from
  that constant iterate with autograd on (CG only). The iteration count is taken from a first,
  graph-free solve, so the forward pass costs about two solves. Exact at convergence; for a
  truncated solve it differentiates only the recorded tail.

Methods: "cg" (symmetric positive-definite A + diag(d); the adjoint reuses A since it is
symmetric), "bicgstab" (general non-singular matrices; the adjoint uses A^T, or the
vector-Jacobian product of a callable A), "direct" (dense `torch.linalg.solve`, small systems).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from shapeflow.errors import ShapeflowError
from shapeflow.solvers.linear.operators import (
    Operator,
    accepts_out,
    adjoint_matvec,
    check_operator,
    diagonal,
    sparse_pattern,
    transpose,
    with_diagonal,
)
from shapeflow.solvers.linear.bicgstab import bicgstab
from shapeflow.solvers.linear.cg import Preconditioner, conjugate_gradient, default_maxiter


def _direct(S: Operator, B: Tensor, M=None, x0=None, *, tol=0.0, maxiter=None, backend="auto"):
    if not isinstance(S, Tensor):
        raise ShapeflowError("linear_solve(): method='direct' needs A as a tensor, not a callable")
    dense = S if S.layout == torch.strided else S.to_dense()
    return torch.linalg.solve(dense, B), None


def _bicgstab(S, B, M=None, x0=None, *, tol=1e-6, maxiter=None, backend="auto"):
    if backend not in ("auto", "torch"):
        raise ShapeflowError(f"linear_solve(): method='bicgstab' runs on the torch backend only, got {backend!r}")
    return bicgstab(S, B, M, x0, tol=tol, maxiter=maxiter)


METHODS: dict[str, Callable] = {"cg": conjugate_gradient, "bicgstab": _bicgstab, "direct": _direct}
MODES = ("implicit", "unrolled", "partial")


class _Shifted:
    """The operator `V -> A V + d * V` (A a tensor or a callable; V of shape (n,) or (n, k)).

    Keeps what makes `A` fast: `apply_dot` (the fused `(A v, v . A v)` the CG loop uses) and
    `diagonal()` are passed through when A has them. A zero `d` that needs no gradient is dropped,
    so the shift costs nothing in the common case `diag=None`.
    """

    def __init__(self, A: Operator, d: Tensor):
        self.A = A
        keep = bool(d.any()) or (torch.is_grad_enabled() and d.requires_grad)
        self.d = d if keep else None
        if hasattr(A, "apply_dot"):
            self.apply_dot = self._apply_dot
        if hasattr(A, "diagonal") and not isinstance(A, Tensor):
            self.diagonal = self._diagonal

    def _shift(self, V: Tensor) -> Tensor:
        return self.d * V if V.dim() == 1 else self.d[:, None] * V

    def __call__(self, V: Tensor) -> Tensor:
        AV = self.A @ V if isinstance(self.A, Tensor) else self.A(V)
        return AV if self.d is None else AV + self._shift(V)

    def _apply_dot(self, v: Tensor, out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        if out is not None and accepts_out(self.A.apply_dot):
            Av, dot = self.A.apply_dot(v, out=out)
        else:
            Av, dot = self.A.apply_dot(v)
        if self.d is None:
            return Av, dot
        dv = self._shift(v)
        Av = Av.add_(dv) if out is not None else Av + dv
        return Av, dot + (v * dv).sum()

    def _diagonal(self) -> Tensor:
        diag = self.A.diagonal().reshape(-1)
        return diag if self.d is None else diag + self.d


def _shifted(A: Operator, d: Tensor, assemble: bool) -> Operator:
    """The operator `A + diag(d)`: assembled (A a tensor and `assemble`) or as a `_Shifted`."""
    if isinstance(A, Tensor) and assemble:
        return with_diagonal(A, d)
    return _Shifted(A, d)


def _preconditioner(A: Operator, d: Tensor, M: Preconditioner) -> Preconditioner:
    """Jacobi on the shifted system uses diag(A) + d."""
    if isinstance(M, str) and M == "jacobi":
        if not isinstance(A, Tensor):
            if hasattr(A, "diagonal"):  # an operator that knows its diagonal (GridNormalOperator)
                return A.diagonal().reshape(-1) + d
            raise ShapeflowError(
                "linear_solve(): M='jacobi' needs A as a tensor or an operator with diagonal(); "
                "for another callable A pass diag(A) + d as M"
            )
        return diagonal(A) + d
    return M


def _adjoint(A: Operator, d: Tensor, method: str, like: Tensor) -> Operator:
    """`(A + diag d)^T` as an operator; CG assumes symmetry and reuses A."""
    if method == "cg":
        return _shifted(A, d, assemble=True)
    if isinstance(A, Tensor):
        return with_diagonal(transpose(A), d)
    n = like.shape[0]
    At = adjoint_matvec(A, n, like)
    return lambda V: (At(V.reshape(n, -1)).reshape(V.shape) + (d * V if V.dim() == 1 else d[:, None] * V))


def _sparse_like(A: Tensor, values: Tensor) -> Tensor:
    """A tensor with A's sparsity pattern (layout, indices) and the given values."""
    if A.layout == torch.sparse_csr:
        return torch.sparse_csr_tensor(A.crow_indices(), A.col_indices(), values, A.shape, check_invariants=False)
    return torch.sparse_coo_tensor(A._indices(), values, A.shape, check_invariants=False)


class LinearSolveFunction(torch.autograd.Function):
    """Forward: solve `(A + diag d) x = b`; backward: one adjoint solve (see module docstring)."""

    @staticmethod
    def forward(ctx, A, d, b, solver, opts):  # type: ignore[override]
        S = _shifted(A, d, assemble=True)
        M = _preconditioner(A, d, opts["M"])
        x, _ = solver(S, b, M, None, tol=opts["tol"], maxiter=opts["maxiter"], backend=opts["backend"])
        ctx.A, ctx.solver, ctx.opts, ctx.M = A, solver, opts, M
        ctx.save_for_backward(d, x)
        return x

    @staticmethod
    def backward(ctx, g_x):  # type: ignore[override]
        d, x = ctx.saved_tensors
        A, opts = ctx.A, ctx.opts
        St = _adjoint(A, d, opts["method"], x)
        M = ctx.M
        if isinstance(M, Tensor) or opts["method"] == "cg":
            Mt = M
        else:
            Mt = None  # a callable / AMG preconditioner of A is not one of A^T
        g_b, _ = ctx.solver(St, g_x.contiguous(), Mt, None, tol=opts["tol"], maxiter=opts["maxiter"],
                            backend=opts["backend"])
        X = x.reshape(x.shape[0], -1)
        G = g_b.reshape(x.shape[0], -1)
        g_d = -(X * G).sum(1) if ctx.needs_input_grad[1] else None
        g_A = None
        if ctx.needs_input_grad[0] and isinstance(A, Tensor):
            if A.layout == torch.strided:
                g_A = -G @ X.T
            else:
                rows, cols = sparse_pattern(A) if A.layout == torch.sparse_csr else A._indices()
                g_A = _sparse_like(A, -(G[rows] * X[cols]).sum(1))
        return g_A, g_d, g_b, None, None


def _partial_cg(S: Operator, b: Tensor, M: Preconditioner, tol: float, maxiter: int, p: float) -> Tensor:
    """CG whose last fraction `p` of iterations is recorded by autograd.

    A first graph-free solve counts the iterations N; the first `floor((1 - p) N)` iterations are
    rerun without a graph, then CG restarts from that (constant) iterate with autograd on and runs
    to the tolerance (or the rest of `maxiter`). Because the recorded tail solves for the residual
    `b - A x_0` of a constant `x_0`, the derivative is exact once the tail has converged.
    """
    with torch.no_grad():
        _, info = conjugate_gradient(S, b, M, tol=tol, maxiter=maxiter, backend="torch")
        total = int(info.iterations.max())
        n0 = int(math.floor((1.0 - p) * total + 1e-9))
        x0, _ = conjugate_gradient(S, b, M, tol=tol, maxiter=n0, backend="torch")
    x, _ = conjugate_gradient(S, b, M, x0.detach(), tol=tol, maxiter=maxiter - n0, backend="torch")
    return x


def linear_solve(
    A: Operator,
    diag: Optional[Tensor],
    b: Tensor,
    *,
    method: str = "cg",
    mode: str = "implicit",
    p: float = 0.5,
    M: Preconditioner = None,
    tol: float = 1e-6,
    maxiter: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """Differentiable solve of `(A + diag(d)) x = b`.

    A: (n, n) sparse (COO/CSR) or dense tensor, or a callable `v -> A v` (shape of b).
    diag: (n,) tensor d, or None for zeros.
    b: (n,) or (n, k).
    method: "cg" (A + diag(d) symmetric positive-definite), "bicgstab" (general), "direct" (dense).
    mode: "implicit" (adjoint solve), "unrolled" (autograd through all iterations), "partial"
      (autograd through the last fraction `p` in (0, 1] of the CG iterations).
    M, tol, maxiter, backend: passed to the iterative solver (see `conjugate_gradient`); with
      M="jacobi" the diagonal used is diag(A) + d. backend "cupy"/"amg" need mode "implicit".

    Returns x: shape of b. Gradients flow to `diag`, `b` and, for a tensor A, to A's stored values
    (implicit mode returns a sparse gradient with A's pattern). For a callable A, gradients to
    tensors captured inside it need mode "unrolled" or "partial".
    """
    if method not in METHODS:
        raise ShapeflowError(f"linear_solve(): unknown method {method!r}; valid names: {sorted(METHODS)}")
    if mode not in MODES:
        raise ShapeflowError(f"linear_solve(): unknown mode {mode!r}; valid names: {list(MODES)}")
    if not isinstance(b, Tensor) or b.dim() not in (1, 2):
        raise ShapeflowError("linear_solve(): b must be a tensor of shape (n,) or (n, k)")
    n = b.shape[0]
    check_operator("linear_solve", A, n)
    if diag is None:
        diag = torch.zeros(n, dtype=b.dtype, device=b.device)
    if not isinstance(diag, Tensor) or diag.shape != (n,):
        raise ShapeflowError(
            f"linear_solve(): diag must be a tensor of shape ({n},), got "
            f"{tuple(diag.shape) if isinstance(diag, Tensor) else type(diag).__name__}"
        )
    if not 0.0 < p <= 1.0:
        raise ShapeflowError(f"linear_solve(): p must be in (0, 1], got {p}")
    maxiter = default_maxiter(n) if maxiter is None else int(maxiter)
    if mode == "implicit":
        opts = {"method": method, "M": M, "tol": tol, "maxiter": maxiter, "backend": backend}
        return LinearSolveFunction.apply(A, diag, b, METHODS[method], opts)
    if backend not in ("auto", "torch"):
        raise ShapeflowError(f"linear_solve(): mode={mode!r} runs on backend 'torch' only, got {backend!r}")
    if method == "direct":
        if mode == "partial":
            raise ShapeflowError("linear_solve(): mode='partial' needs an iterative method ('cg')")
        if not isinstance(A, Tensor):
            raise ShapeflowError("linear_solve(): method='direct' needs A as a tensor, not a callable")
        dense = A if A.layout == torch.strided else A.to_dense()
        return torch.linalg.solve(dense + torch.diag(diag), b)
    S = _shifted(A, diag, assemble=False)
    Md = _preconditioner(A, diag, M)
    if mode == "partial":
        if method != "cg":
            raise ShapeflowError("linear_solve(): mode='partial' is implemented for method='cg' only")
        return _partial_cg(S, b, Md, tol, maxiter, p)
    solver = conjugate_gradient if method == "cg" else bicgstab
    x, _ = solver(S, b, Md, tol=tol, maxiter=maxiter)
    return x
