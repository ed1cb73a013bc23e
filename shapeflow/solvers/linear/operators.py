"""Linear operators as the solvers see them: a sparse/dense tensor or a callable `v -> A v`.

Internal helpers shared by `cg.py`, `bicgstab.py` and `linear_solve.py`. Vectors are handled as
`(n, k)` blocks of `k` right-hand sides; a callable given by the user receives the same shape as
the right-hand side it was called for (`(n,)` or `(n, k)`).
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from shapeflow.errors import ShapeflowError

Operator = Union[Tensor, Callable[[Tensor], Tensor]]
Matvec = Callable[[Tensor], Tensor]

SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr)


def is_sparse(A: object) -> bool:
    """True for a torch sparse COO or CSR tensor."""
    return isinstance(A, Tensor) and A.layout in SPARSE_LAYOUTS


def check_operator(func: str, A: Operator, n: int) -> None:
    """Raise a ShapeflowError unless `A` is an (n, n) tensor (sparse or dense) or a callable."""
    if callable(A) and not isinstance(A, Tensor):
        return
    if not isinstance(A, Tensor):
        raise ShapeflowError(
            f"{func}(): A must be a torch sparse/dense (n, n) tensor or a callable v -> A v, "
            f"got {type(A).__name__}"
        )
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] != n:
        raise ShapeflowError(
            f"{func}(): A has shape {tuple(A.shape)} but b has {n} rows; A must be ({n}, {n})"
        )
    if A.layout not in SPARSE_LAYOUTS + (torch.strided,):
        raise ShapeflowError(f"{func}(): A has unsupported layout {A.layout}; use COO, CSR or dense")


def block_matvec(A: Operator, vector_rhs: bool) -> Matvec:
    """Return `V -> A V` on `(n, k)` blocks.

    A: sparse/dense (n, n) tensor or a callable; for a callable and `vector_rhs=True` the callable
    is applied to the single column `(n,)`, else to the `(n, k)` block.
    """
    if isinstance(A, Tensor):
        return lambda V: A @ V
    if vector_rhs:
        def column(V: Tensor) -> Tensor:
            return A(V[:, 0]).reshape(-1, 1)

        if hasattr(A, "apply_dot"):  # optional fused `v -> (A v, v . A v)`, used by CG
            pass_out = accepts_out(A.apply_dot)

            def column_dot(V: Tensor, out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
                if pass_out and out is not None:
                    AV, dot = A.apply_dot(V[:, 0], out=out[:, 0])
                else:
                    AV, dot = A.apply_dot(V[:, 0])
                return AV.reshape(-1, 1), dot

            column.apply_dot = column_dot
        return column
    return A


def accepts_out(apply_dot: Callable) -> bool:
    """True when an operator's `apply_dot` takes an `out=` buffer to write `A v` into.

    The CG loop then reuses one buffer for every `A p` instead of allocating a fresh vector per
    iteration (for large fields the page faults of a fresh allocation cost as much as the matvec).
    """
    try:
        return "out" in inspect.signature(apply_dot).parameters
    except (TypeError, ValueError):
        return False


def diagonal(A: Tensor) -> Tensor:
    """Diagonal of a sparse (COO/CSR) or dense square tensor. A: (n, n) -> (n,)."""
    if A.layout == torch.strided:
        return A.diagonal()
    coo = (A.to_sparse_coo() if A.layout == torch.sparse_csr else A).coalesce()
    rows, cols = coo.indices()
    on_diag = rows == cols
    out = torch.zeros(A.shape[0], dtype=A.dtype, device=A.device)
    return out.index_add(0, rows[on_diag], coo.values()[on_diag])


def transpose(A: Tensor) -> Tensor:
    """Transpose of a sparse or dense (n, n) tensor, in the same layout."""
    if A.layout == torch.sparse_csr:
        return A.to_sparse_coo().t().coalesce().to_sparse_csr()
    if A.layout == torch.sparse_coo:
        return A.t().coalesce()
    return A.mT


def adjoint_matvec(A: Operator, n: int, like: Tensor) -> Matvec:
    """Return `W -> A^T W` on `(n, k)` blocks.

    For a tensor the transpose is formed; for a callable linear `A` it is the vector-Jacobian
    product of `v -> A v` (exact because `A` is linear), so any differentiable callable works.
    """
    if isinstance(A, Tensor):
        At = transpose(A)
        return lambda W: At @ W

    def apply(W: Tensor) -> Tensor:
        cols = []
        with torch.enable_grad():
            for j in range(W.shape[1]):
                _, pullback = torch.func.vjp(A, torch.zeros(n, dtype=like.dtype, device=like.device))
                cols.append(pullback(W[:, j])[0])
        return torch.stack(cols, dim=1)

    return apply


def with_diagonal(A: Tensor, d: Tensor) -> Tensor:
    """Assemble `A + diag(d)` in A's layout. A: (n, n) sparse or dense, d: (n,)."""
    n = A.shape[0]
    if A.layout == torch.strided:
        return A + torch.diag(d)
    idx = torch.arange(n, device=A.device).expand(2, n)
    coo = A.to_sparse_coo() if A.layout == torch.sparse_csr else A
    out = (coo + torch.sparse_coo_tensor(idx, d.to(A.dtype), (n, n), check_invariants=False)).coalesce()
    return out.to_sparse_csr() if A.layout == torch.sparse_csr else out


def sparse_pattern(A: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column indices of A's stored entries, in the order of `A.values()` (coalesced COO)."""
    if A.layout == torch.sparse_csr:
        crow = A.crow_indices()
        rows = torch.repeat_interleave(
            torch.arange(A.shape[0], device=A.device), crow[1:] - crow[:-1]
        )
        return rows, A.col_indices()
    rows, cols = A.indices()
    return rows, cols


def to_scipy_csr(A: Tensor):
    """A torch sparse/dense (n, n) CPU tensor as a `scipy.sparse.csr_matrix` (shares memory where it can)."""
    import scipy.sparse as sp

    if A.device.type != "cpu":
        raise ShapeflowError(f"to_scipy_csr(): A is on {A.device}; the SciPy/pyamg path is CPU only")
    A = A.detach()
    if A.layout == torch.strided:
        return sp.csr_matrix(A.numpy())
    csr = A if A.layout == torch.sparse_csr else A.coalesce().to_sparse_csr()
    return sp.csr_matrix(
        (csr.values().numpy(), csr.col_indices().numpy(), csr.crow_indices().numpy()),
        shape=tuple(A.shape),
    )
