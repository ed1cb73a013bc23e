"""The CuPy backend: `cupyx.scipy.sparse.linalg.cg` on a CSR matrix shared with torch by DLPack.

Only imported when tensors are on a CUDA device and backend "cupy" was chosen; nothing is copied
to the host. CuPy's CG takes one right-hand side at a time, so columns are solved in turn.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from shapeflow.errors import ShapeflowError
from shapeflow.solvers.linear.operators import diagonal
from shapeflow._optional import import_optional


def _modules():
    cp = import_optional("cupy", 'backend="cupy"')
    csp = import_optional("cupyx.scipy.sparse", 'backend="cupy"')
    spla = import_optional("cupyx.scipy.sparse.linalg", 'backend="cupy"')
    return cp, csp, spla


def to_cupy_csr(A: Tensor):
    """A torch sparse (n, n) CUDA tensor as a `cupyx.scipy.sparse.csr_matrix`, zero-copy by DLPack
    for the values (indices are cast to int32 on the device, as cuSPARSE wants)."""
    cp, csp, _ = _modules()
    csr = A.to_sparse_csr() if A.layout != torch.sparse_csr else A
    csr = csr.detach()
    data = cp.from_dlpack(csr.values().contiguous())
    indices = cp.from_dlpack(csr.col_indices().to(torch.int32).contiguous())
    indptr = cp.from_dlpack(csr.crow_indices().to(torch.int32).contiguous())
    return csp.csr_matrix((data, indices, indptr), shape=tuple(A.shape))


def _preconditioner(A: Tensor, M, cp, csp, spla):
    if M is None:
        return None
    if isinstance(M, str) and M == "jacobi":
        M = diagonal(A)
    if isinstance(M, Tensor):
        return csp.diags(cp.from_dlpack((1.0 / M.detach()).contiguous()))
    if callable(M) and not isinstance(M, str):
        n = A.shape[0]

        def apply(r):
            return cp.from_dlpack(M(torch.from_dlpack(r)).contiguous())

        return spla.LinearOperator((n, n), matvec=apply, dtype=cp.dtype(str(A.dtype).split(".")[-1]))
    raise ShapeflowError(f"conjugate_gradient(): backend='cupy' supports M=None, 'jacobi', a tensor or a callable, got {M!r}")


def cg_cupy(A: Tensor, B: Tensor, M, X0: Tensor, tol: float, maxiter: int) -> tuple[Tensor, Tensor]:
    """Solve A X = B on the GPU. A: (n, n) sparse CUDA tensor; B, X0: (n, k). Returns X, iterations (k,)."""
    cp, csp, spla = _modules()
    mat = to_cupy_csr(A)
    Mop = _preconditioner(A, M, cp, csp, spla)
    tol_name = "rtol" if "rtol" in inspect.signature(spla.cg).parameters else "tol"
    cols, its = [], []
    for j in range(B.shape[1]):
        count = [0]

        def callback(_xk, count=count):
            count[0] += 1

        x, _ = spla.cg(
            mat, cp.from_dlpack(B[:, j].detach().contiguous()),
            x0=cp.from_dlpack(X0[:, j].detach().contiguous()), maxiter=maxiter, M=Mop,
            callback=callback, atol=0.0, **{tol_name: tol},
        )
        cols.append(torch.from_dlpack(x))
        its.append(count[0])
    return torch.stack(cols, dim=1), torch.tensor(its, dtype=torch.int64, device=B.device)
