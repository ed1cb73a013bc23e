"""Batched, preconditioned conjugate gradient on torch tensors, with CuPy and pyamg backends.

`conjugate_gradient(A, b)` solves `A x = b` for a symmetric positive-definite `A` given as a
torch sparse matrix (COO or CSR), a dense matrix, or a callable `v -> A v`. Every column of a
block right-hand side `b: (n, k)` runs its own CG (its own step sizes); a column that reached the
tolerance is frozen while the others go on. The backend ("torch", "cupy", "amg") is chosen in one
place, `resolve_backend`.

Without autograd the torch loop works in place and fuses its vector updates into cache-sized
chunks (three passes over memory per iteration besides `A p`). A callable operator may offer
`apply_dot(v) -> (A v, v . A v)` (one pass instead of two) and `diagonal() -> (n,)` (for
`M="jacobi"`), as `shapeflow.solvers.normal.grid.GridNormalOperator` does.

A torch sparse matrix (COO or CSR) is wrapped once per graph-free solve in a
`shapeflow.solvers.linear._sparse.CsrOperator`: converted to CSR a single time (no per-iteration
conversion or validation), Jacobi's diagonal read from the CSR arrays, and on the CPU with numba
`A p` (+ `p . A p`) computed by a compiled CSR kernel, the vector updates of a single right-hand
side by two compiled passes (torch's CSR matmul and the chunked torch updates elsewhere). When a
gradient may be needed (`records_graph`), the user's tensor and its differentiable `A @ V` are
used instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from shapeflow.errors import ShapeflowError
from shapeflow.solvers.linear.operators import (
    Matvec,
    Operator,
    accepts_out,
    block_matvec,
    check_operator,
    diagonal,
    is_sparse,
)
from shapeflow._optional import is_available
from shapeflow.solvers.linear import _sparse
from shapeflow.solvers.linear._sparse import CsrOperator

Preconditioner = Union[None, str, Tensor, Callable[[Tensor], Tensor]]


@dataclass
class CGInfo:
    """Convergence report of a linear solve.

    iterations: (k,) int64 iterations per column (shape `()` for a vector right-hand side).
    residual: (k,) final relative residual `|b - A x| / |b|` per column (true residual).
    converged: True when every column reached the tolerance.
    backend: the backend that ran ("torch", "cupy", "amg", "direct").
    """

    iterations: Tensor
    residual: Tensor
    converged: bool
    backend: str


# ----------------------------------------------------------------------------- preconditioners


def _jacobi(A: Operator, M: Optional[Tensor] = None) -> Matvec:
    """Jacobi preconditioner `r -> r / diag(A)` on (n, k) blocks; diag from A or the given tensor."""
    if M is None:
        if isinstance(A, Tensor):
            M = diagonal(A)
        elif callable(getattr(A, "diagonal", None)):  # an operator that knows its diagonal
            M = A.diagonal()
        else:
            raise ShapeflowError(
                "conjugate_gradient(): M='jacobi' needs A as a tensor or an operator with a "
                "diagonal() method; for a plain callable A pass the diagonal of A as M (a tensor of shape (n,))"
            )
    return Diagonal(1.0 / M)


class Diagonal:
    """The preconditioner `R -> inv * R` (row-wise) on (n, k) blocks; `inv`: (n,) = 1 / diag(A).

    A class rather than a lambda so the in-place CG loop can fuse it with its vector updates.
    """

    def __init__(self, inv: Tensor):
        self.inv = inv.reshape(-1, 1)

    def __call__(self, R: Tensor) -> Tensor:
        return R * self.inv


def _amg(A: Operator, M: Optional[Tensor] = None) -> Matvec:
    """One smoothed-aggregation AMG V-cycle (pyamg, CPU) as an SPD preconditioner on (n, k) blocks."""
    from shapeflow.solvers.linear._amg import amg_preconditioner

    if not isinstance(A, Tensor):
        raise ShapeflowError("conjugate_gradient(): M='amg' needs A as a sparse or dense CPU tensor")
    return amg_preconditioner(A)


PRECONDITIONERS: dict[str, Callable[..., Matvec]] = {"jacobi": _jacobi, "amg": _amg}


def make_preconditioner(A: Operator, M: Preconditioner, n: int, vector_rhs: bool) -> Optional[Matvec]:
    """Turn the user's `M` into `R -> M^{-1} R` on (n, k) blocks (None for no preconditioning).

    M: None, a name in PRECONDITIONERS, a tensor (n,) holding diag(A), or a callable `r -> M^{-1} r`
    (applied to the same shape as b).
    """
    if M is None:
        return None
    if isinstance(M, str):
        if M not in PRECONDITIONERS:
            raise ShapeflowError(
                f"conjugate_gradient(): unknown preconditioner M={M!r}; "
                f"valid names: {sorted(PRECONDITIONERS)}"
            )
        return PRECONDITIONERS[M](A)
    if isinstance(M, Tensor):
        if M.shape != (n,):
            raise ShapeflowError(
                f"conjugate_gradient(): M as a tensor is diag(A) and must have shape ({n},), "
                f"got {tuple(M.shape)}"
            )
        return _jacobi(A, M)
    if callable(M):
        return block_matvec(M, vector_rhs)
    raise ShapeflowError(
        f"conjugate_gradient(): M must be None, a name, a (n,) tensor or a callable, got {type(M).__name__}"
    )


# ----------------------------------------------------------------------------- the CG iteration


@dataclass
class CGState:
    """State of the batched CG loop; all blocks are (n, k), all per-column values (1, k)."""

    x: Tensor
    r: Tensor
    p: Tensor
    rz: Tensor
    bnorm: Tensor
    active: Tensor
    iterations: Tensor


def _dot(U: Tensor, V: Tensor) -> Tensor:
    # einsum reduces without the (n, k) temporary of (U * V).sum(0): ~5x faster on large n
    return torch.einsum("nk,nk->k", U, V).unsqueeze(0)


def _norm(U: Tensor) -> Tensor:
    return torch.linalg.vector_norm(U, dim=0, keepdim=True)


def cg_start(matvec: Matvec, precond: Optional[Matvec], B: Tensor, X0: Tensor, tol: float) -> CGState:
    """Initial CG state for A X = B from X0. B, X0: (n, k)."""
    bnorm = _norm(B)
    # a non-finite right-hand side gives a non-finite solution (NaN), never the silent X0 that
    # the inactive column would otherwise keep (a NaN upstream gradient must not become 0)
    X0 = torch.where(torch.isfinite(bnorm), X0, torch.full_like(X0, float("nan")))
    R = B - matvec(X0)
    Z = R.clone() if precond is None else precond(R)  # p must not alias r (in-place updates)
    safe = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    active = (_norm(R) / safe > tol) & (bnorm > 0)
    iterations = torch.zeros(B.shape[1], dtype=torch.int64, device=B.device)
    return CGState(X0, R, Z, _dot(R, Z), bnorm, active, iterations)


def cg_steps(
    s: CGState, matvec: Matvec, precond: Optional[Matvec], tol: float, steps: int, inplace: bool
) -> CGState:
    """Run at most `steps` CG iterations on the columns still active (frozen ones keep their x).

    inplace: update x, r, p in place (fast, no autograd graph; see `_steps_inplace`); False keeps
    every iteration differentiable (unrolled CG).
    """
    if inplace:
        run = _steps_vector if s.r.shape[1] == 1 else _steps_inplace
        return run(s, matvec, precond, tol, steps)
    safe_b = torch.where(s.bnorm > 0, s.bnorm, torch.ones_like(s.bnorm))
    for _ in range(steps):
        if not bool(s.active.any()):
            break
        Ap = matvec(s.p)
        alpha = _ratio(s.active, s.rz, _dot(s.p, Ap))
        s.x = s.x + alpha * s.p
        s.r = s.r - alpha * Ap
        s.iterations = s.iterations + s.active[0].to(torch.int64)
        s.active = s.active & (_norm(s.r) / safe_b > tol)
        z = s.r if precond is None else precond(s.r)
        rz_new = _dot(s.r, z)
        s.p = z + _ratio(s.active, rz_new, s.rz) * s.p
        s.rz = rz_new
    return s


def _ratio(active: Tensor, num: Tensor, den: Tensor) -> Tensor:
    """num / den on the active columns with den != 0, else 0. All (1, k)."""
    ok = active & (den != 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


# Rows per chunk of the fused vector updates: a chunk of the 5 vectors touched together stays in
# the 2 MiB L2 cache of a typical core, so each vector is streamed from memory once per phase
# instead of once per elementwise op.
CHUNK_ELEMENTS = 1 << 18


def _chunks(n: int, k: int) -> list[slice]:
    rows = max(1, CHUNK_ELEMENTS // max(k, 1))
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def _steps_vector(s: CGState, matvec: Matvec, precond: Optional[Matvec], tol: float, steps: int) -> CGState:
    """`_steps_inplace` for one column: scalar step sizes (axpy kernels, BLAS dots on flat views).

    Per iteration, besides `Ap`: `p . Ap` (or from `A.apply_dot`), then a pass updating r with
    `r . r` and `r . z`, then a pass updating x and p (x's update waits until p is read anyway).
    On the CPU with numba, and no or Jacobi preconditioning, those two passes are compiled
    kernels (`_sparse.cg_update_r`, `_sparse.cg_update_xp`) instead of chunked torch ops.
    """
    chunks = _chunks(s.r.shape[0], 1)
    s.x, s.r, s.p = s.x.contiguous(), s.r.contiguous(), s.p.contiguous()  # flat views alias them
    x, r, p = s.x.view(-1), s.r.view(-1), s.p.view(-1)
    inv = precond.inv.reshape(-1) if isinstance(precond, Diagonal) else None
    apply_dot = getattr(matvec, "apply_dot", None)
    ap_out = torch.empty_like(s.p) if apply_dot is not None and accepts_out(apply_dot) else None
    bnorm = float(s.bnorm)
    stop2 = (tol * (bnorm if bnorm > 0 else 1.0)) ** 2
    rz = float(s.rz)
    buf = torch.empty(chunks[0].stop, dtype=r.dtype, device=r.device)
    active = bool(s.active.any())
    its = 0
    fused = (precond is None or inv is not None) and _sparse.fused_updates_available(
        x, r, p, *([] if inv is None else [inv]))
    while active and its < steps:
        if apply_dot is not None:
            Ap, pAp = apply_dot(s.p) if ap_out is None else apply_dot(s.p, out=ap_out)
            Ap, pAp = Ap.reshape(-1), float(pAp)
        else:
            Ap = matvec(s.p).reshape(-1)
            pAp = float(sum(torch.dot(p[c], Ap[c]) for c in chunks))
        alpha = rz / pAp if pAp != 0 else 0.0
        if fused:  # compiled passes (numba): r and its dots, then x and p
            rr, rz_new = _sparse.cg_update_r(r, Ap.contiguous(), alpha, inv)
            del Ap
            its += 1
            active = rr > stop2
            rz_new = rr if precond is None else rz_new
            beta = rz_new / rz if (active and rz != 0) else 0.0
            _sparse.cg_update_xp(x, p, r, alpha, beta, inv)
            rz = rz_new
            continue
        rr_acc, rz_acc = [], []
        for c in chunks:
            rc = r[c].add_(Ap[c], alpha=-alpha)
            rr_acc.append(torch.dot(rc, rc))
            if inv is not None:
                rz_acc.append(torch.dot(rc, torch.mul(rc, inv[c], out=buf[: rc.numel()])))
        del Ap
        its += 1
        rr = float(sum(rr_acc))
        active = rr > stop2
        if precond is None:
            rz_new, z = rr, r
        elif inv is None:
            z = precond(s.r).reshape(-1)
            rz_new = float(torch.dot(r, z))
        else:
            rz_new, z = float(sum(rz_acc)), None
        beta = rz_new / rz if (active and rz != 0) else 0.0
        for c in chunks:
            x[c].add_(p[c], alpha=alpha)
            pc = p[c].mul_(beta)
            pc.addcmul_(r[c], inv[c]) if z is None else pc.add_(z[c])
        rz = rz_new
    s.iterations += its
    s.active = torch.full_like(s.active, active)
    s.rz = torch.full_like(s.rz, rz)
    return s


def _steps_inplace(s: CGState, matvec: Matvec, precond: Optional[Matvec], tol: float, steps: int) -> CGState:
    """The graph-free CG loop, with its vector work fused into cache-sized chunks.

    Per iteration, besides `A p`: one pass for `p . Ap`; one pass that updates x and r and
    accumulates `r . r` and `r . z` (z = M^{-1} r, not stored for Jacobi); one pass for
    `p = z + beta p`. Eager torch would otherwise stream every vector once per elementwise op.
    """
    n, k = s.r.shape
    chunks = _chunks(n, k)
    inv = precond.inv if isinstance(precond, Diagonal) else None
    safe_b2 = torch.where(s.bnorm > 0, s.bnorm, torch.ones_like(s.bnorm)).square()
    tol2 = tol * tol
    buf = torch.empty(min(n, chunks[0].stop) * k, dtype=s.r.dtype, device=s.r.device)
    for _ in range(steps):
        if not bool(s.active.any()):
            break
        Ap = matvec(s.p)
        pAp = torch.zeros_like(s.rz)
        for c in chunks:
            pAp += _dot(s.p[c], Ap[c])
        alpha = _ratio(s.active, s.rz, pAp)
        neg_alpha = -alpha
        rr = torch.zeros_like(s.rz)
        rz = torch.zeros_like(s.rz)
        for c in chunks:
            r = s.r[c]
            s.x[c].addcmul_(alpha, s.p[c])
            r.addcmul_(neg_alpha, Ap[c])
            rr += _dot(r, r)
            if inv is not None:
                z = torch.mul(r, inv[c], out=buf[: r.numel()].view(r.shape))
                rz += _dot(r, z)
        del Ap
        s.iterations += s.active[0].to(torch.int64)
        s.active = s.active & (rr / safe_b2 > tol2)
        if precond is None:
            rz, z_full = rr, s.r
        elif inv is None:
            z_full = precond(s.r)
            rz = _dot(s.r, z_full)
        beta = _ratio(s.active, rz, s.rz)
        for c in chunks:
            p = s.p[c].mul_(beta)
            if inv is not None:
                p.addcmul_(s.r[c], inv[c])
            else:
                p.add_(z_full[c])
        s.rz = rz
    return s


def solve_info(matvec: Matvec, B: Tensor, X: Tensor, iterations: Tensor, tol: float, vector: bool, backend: str) -> CGInfo:
    with torch.no_grad():
        bnorm = _norm(B)[0]
        res = _norm(B - matvec(X))[0] / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    converged = bool((res <= tol * (1 + 1e-3) + 10 * torch.finfo(B.dtype).eps).all())
    if vector:
        iterations, res = iterations[0], res[0]
    return CGInfo(iterations, res, converged, backend)


def default_maxiter(n: int) -> int:
    """Default iteration cap: min(10 n, 10000)."""
    return int(min(10 * n, 10_000))


def records_graph(A: Operator, B: Tensor, M: Preconditioner, X0: Tensor) -> bool:
    """True when the solve must be differentiable (unrolled CG through torch ops).

    That is when autograd is recording and A is a callable or a callable M (either may capture
    tensors that require grad), or any of the tensors A, b, x0, M requires grad.
    """
    if not torch.is_grad_enabled():
        return False
    if not isinstance(A, Tensor) or (callable(M) and not isinstance(M, Tensor)):
        return True
    return any(isinstance(t, Tensor) and t.requires_grad for t in (A, B, X0, M))


def _cg_torch(A, B, M, X0, tol, maxiter, vector):
    n = B.shape[0]
    if records_graph(A, B, M, X0):  # unrolled: every iteration through differentiable torch ops
        matvec = block_matvec(A, vector)
        precond = make_preconditioner(A, M, n, vector)
        state = cg_start(matvec, precond, B, X0, tol)
        state = cg_steps(state, matvec, precond, tol, maxiter, inplace=False)
        return state.x, solve_info(matvec, B, state.x, state.iterations, tol, vector, "torch")
    with torch.no_grad():
        # a sparse matrix is converted to CSR once here (numba SpMV on the CPU, `_sparse`)
        op = CsrOperator(A) if is_sparse(A) else A
        matvec = block_matvec(op, vector)
        precond = make_preconditioner(op if isinstance(M, str) and M == "jacobi" else A, M, n, vector)
        state = cg_start(matvec, precond, B, X0.clone(), tol)
        state = cg_steps(state, matvec, precond, tol, maxiter, inplace=True)
        return state.x, solve_info(matvec, B, state.x, state.iterations, tol, vector, "torch")


def _cg_cupy(A, B, M, X0, tol, maxiter, vector):
    from shapeflow.solvers.linear._cupy import cg_cupy

    X, iterations = cg_cupy(A, B, M, X0, tol, maxiter)
    return X, solve_info(block_matvec(A, vector), B, X, iterations, tol, vector, "cupy")


def _cg_amg(A, B, M, X0, tol, maxiter, vector):
    from shapeflow.solvers.linear._amg import amg_solve

    if M is not None:
        raise ShapeflowError("conjugate_gradient(): backend='amg' brings its own preconditioner; leave M=None")
    X, iterations = amg_solve(A, B, X0, tol, maxiter)
    return X, solve_info(block_matvec(A, vector), B, X, iterations, tol, vector, "amg")


BACKENDS: dict[str, Callable] = {"torch": _cg_torch, "cupy": _cg_cupy, "amg": _cg_amg}


def resolve_backend(backend: str, A: Operator, b: Tensor) -> str:
    """The one place where the backend is chosen.

    "auto": CuPy when b is on a CUDA device, A is a sparse tensor, CuPy is installed and no
    gradient is being recorded; torch otherwise (pyamg is never chosen automatically).
    "cupy" explicitly: needs CUDA tensors and CuPy, else a one-line error naming the `gpu` extra.
    """
    if backend == "auto":
        if (
            b.device.type == "cuda"
            and is_sparse(A)
            and not (torch.is_grad_enabled() and (b.requires_grad or A.requires_grad))
            and is_available("cupy")
        ):
            return "cupy"
        return "torch"
    if backend not in BACKENDS:
        raise ShapeflowError(
            f"conjugate_gradient(): unknown backend {backend!r}; valid names: {['auto'] + sorted(BACKENDS)}"
        )
    if backend == "cupy":
        if b.device.type != "cuda":
            raise ShapeflowError(
                f"conjugate_gradient(): backend='cupy' needs CUDA tensors, got b on {b.device}; "
                'use backend="torch" or move the tensors to a GPU (pip install "shapeflow[gpu]")'
            )
        if not is_available("cupy"):
            raise ImportError('conjugate_gradient(): backend="cupy" needs CuPy: pip install "shapeflow[gpu]"')
        if not isinstance(A, Tensor):
            raise ShapeflowError("conjugate_gradient(): backend='cupy' needs A as a sparse tensor, not a callable")
    if backend == "amg":
        if not isinstance(A, Tensor) or b.device.type != "cpu":
            raise ShapeflowError("conjugate_gradient(): backend='amg' needs A as a sparse/dense CPU tensor")
    return backend


def conjugate_gradient(
    A: Operator,
    b: Tensor,
    M: Preconditioner = None,
    x0: Optional[Tensor] = None,
    *,
    tol: float = 1e-6,
    maxiter: Optional[int] = None,
    backend: str = "auto",
) -> tuple[Tensor, CGInfo]:
    """Solve `A x = b` for symmetric positive-definite A by (preconditioned) conjugate gradients.

    A: (n, n) torch sparse (COO or CSR) or dense tensor, or a callable `v -> A v` taking the shape
       of b ((n,) or (n, k)); optionally with `apply_dot(v) -> (A v, v . A v)` (used for a vector
       b without autograd) and `diagonal() -> (n,)` (used by M="jacobi").
    b: (n,) or (n, k); each column is its own CG with its own step sizes, and a column whose
       relative residual `|b - A x| / |b|` fell below `tol` is frozen.
    M: None; "jacobi" (diag of A, or A.diagonal() for an operator); "amg" (one pyamg V-cycle, CPU, needs `shapeflow[amg]`);
       a tensor (n,) holding diag(A); or a callable `r -> M^{-1} r` (shape of b).
    x0: (n,) or (n, k) starting guess (zeros by default).
    tol: relative residual tolerance; maxiter: iteration cap (default min(10 n, 10000)).
    backend: "auto" | "torch" | "cupy" | "amg" (see `resolve_backend`).

    Returns (x, info): x with the shape of b, info a CGInfo. With autograd recording (and
    backend "torch") and a gradient possibly needed (`records_graph`), every iteration is
    differentiable (unrolled CG); otherwise the loop updates its vectors in place, which is
    faster, and a sparse A is converted once to CSR for a fast SpMV (see the module docstring).
    """
    if not isinstance(b, Tensor) or b.dim() not in (1, 2):
        raise ShapeflowError(
            f"conjugate_gradient(): b must be a tensor of shape (n,) or (n, k), got "
            f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}"
        )
    if not (tol >= 0):
        raise ShapeflowError(f"conjugate_gradient(): tol must be >= 0, got {tol}")
    vector = b.dim() == 1
    n = b.shape[0]
    check_operator("conjugate_gradient", A, n)
    B = b.reshape(n, -1)
    if x0 is None:
        X0 = torch.zeros_like(B)
    elif x0.shape != b.shape:
        raise ShapeflowError(
            f"conjugate_gradient(): x0 has shape {tuple(x0.shape)} but b has {tuple(b.shape)}"
        )
    else:
        X0 = x0.reshape(n, -1).to(B.dtype)
    maxiter = default_maxiter(n) if maxiter is None else int(maxiter)
    if maxiter < 0:
        raise ShapeflowError(f"conjugate_gradient(): maxiter must be >= 0, got {maxiter}")
    name = resolve_backend(backend, A, b)
    X, info = BACKENDS[name](A, B, M, X0, tol, maxiter, vector)
    return X.reshape(b.shape), info
