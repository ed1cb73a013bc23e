"""General sparse matrices in the CG loop: one CSR conversion per solve and a fast CPU SpMV.

`conjugate_gradient` on a torch sparse tensor (COO or CSR) that records no gradient wraps it
once per solve in a `CsrOperator`: the matrix is coalesced and converted to CSR (int64 indices)
a single time, its diagonal is taken from the CSR arrays (for `M="jacobi"`), and every product
`A p` then runs on those arrays, never re-converting or re-validating the matrix:

* CPU float32/float64 with numba installed: a compiled, row-parallel CSR kernel that also
  returns `p . A p` in the same pass (`apply_dot`, used by the in-place vector CG loop) and
  handles an `(n, k)` block of right-hand sides reading the matrix once. Compiled on first use
  and cached by numba (nothing is compiled when shapeflow is imported); threads follow
  `torch.get_num_threads()` and numba's own setting is restored after each call
  (`shapeflow._numba.numba_threads`).
* Elsewhere (CUDA tensors, other dtypes, numba missing): torch's CSR matmul on the converted
  matrix (on the CPU about 10x faster than a COO matmul).

With autograd recording and A, b, x0 or M requiring grad, CG keeps the user's tensor and its
differentiable `A @ V` instead (see `shapeflow.solvers.linear.cg`).
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from shapeflow._numba import numba_variants, run_numba


@functools.lru_cache(maxsize=1)
def _kernels() -> Optional[dict]:
    """The kernels by name, each as (serial, parallel) numba dispatchers; None without numba.

    Both variants come from one Python source (`prange` is `range` in the serial one) under
    distinct qualified names, so numba's on-disk cache keeps them apart. They compile (or load
    from that cache) on first call only.
    """
    try:
        import numba
    except ImportError:
        return None

    def csr_matvec(crow, col, val, x, out):  # pragma: no cover - compiled
        """out = A x for one vector; returns x . out (accumulated in float64)."""
        n = crow.shape[0] - 1
        dot = 0.0
        for i in numba.prange(n):
            s = 0.0
            for j in range(crow[i], crow[i + 1]):
                s += val[j] * x[col[j]]
            out[i] = s
            dot += x[i] * s
        return dot

    def csr_matmat(crow, col, val, X, out):  # pragma: no cover - compiled
        """out = A X for an (n, k) C-contiguous block (each row of A read once for all k)."""
        n, k = X.shape
        for i in numba.prange(n):
            o = out[i]
            for c in range(k):
                o[c] = 0.0
            for j in range(crow[i], crow[i + 1]):
                v = val[j]
                xr = X[col[j]]
                for c in range(k):
                    o[c] += v * xr[c]

    def cg_update_r(r, Ap, alpha, inv):  # pragma: no cover - compiled
        """r -= alpha Ap; returns (r . r, r . (inv * r)) (inv empty: no preconditioner)."""
        has_inv = inv.shape[0] > 0
        rr = 0.0
        rz = 0.0
        for i in numba.prange(r.shape[0]):
            ri = r[i] - alpha * Ap[i]
            r[i] = ri
            rr += ri * ri
            if has_inv:
                rz += ri * ri * inv[i]
        return rr, rz

    def cg_update_xp(x, p, r, alpha, beta, inv):  # pragma: no cover - compiled
        """x += alpha p; p = inv * r + beta p (inv empty: p = r + beta p)."""
        has_inv = inv.shape[0] > 0
        for i in numba.prange(x.shape[0]):
            pi = p[i]
            x[i] += alpha * pi
            p[i] = (inv[i] * r[i] if has_inv else r[i]) + beta * pi

    def csr_diagonal(crow, col, val, out):  # pragma: no cover - compiled
        """out += diag(A) (duplicate diagonal entries summed)."""
        for i in range(out.shape[0]):
            for j in range(crow[i], crow[i + 1]):
                if col[j] == i:
                    out[i] += val[j]

    kernels = (csr_matvec, csr_matmat, cg_update_r, cg_update_xp, csr_diagonal)
    return {fn.__name__: numba_variants(fn) for fn in kernels}


def _run(name: str, *args):
    """Run kernel `name` (serial at one torch thread, else parallel; see `run_numba`)."""
    return run_numba(_kernels()[name], *args)


def numba_available() -> bool:
    """True when numba can be imported (the kernels compile on first use)."""
    return _kernels() is not None


def to_csr(A: Tensor) -> Tensor:
    """A sparse (n, n) COO or CSR tensor as CSR with int64 indices and 1-D values (no grad).

    The one conversion a solve makes: CG calls it once, then applies the result every iteration.
    """
    A = A.detach()
    if A.layout == torch.sparse_coo:
        A = (A if A.is_coalesced() else A.coalesce()).to_sparse_csr()
    crow, col = A.crow_indices(), A.col_indices()
    if crow.dtype != torch.int64:  # int32 CSR: the kernels are compiled for int64 indices only
        A = torch.sparse_csr_tensor(crow.to(torch.int64), col.to(torch.int64), A.values(), A.shape,
                                    check_invariants=False)
    return A


def _kernel_arrays(csr: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crow, col, values) numpy arrays for the kernels, indices unsigned.

    Unsigned indices spare numba the negative-index check of every gather (measured 2x on the
    SpMV); uint32 (one copy) when the matrix allows it, else a free uint64 view of the int64 ones.
    """
    crow, col = csr.crow_indices().numpy(), csr.col_indices().numpy()
    if csr.shape[0] < 2**32 and col.shape[0] < 2**32:
        crow, col = crow.astype(np.uint32), col.astype(np.uint32)
    else:
        crow, col = crow.view(np.uint64), col.view(np.uint64)
    return crow, col, csr.values().contiguous().numpy()


class CsrOperator:
    """`V -> A V` for a sparse (n, n) matrix converted once to CSR (see the module docstring).

    Called on `(n,)` or `(n, k)`; `apply_dot(v, out=None)` gives `(A v, v . A v)` for one vector
    `(n,)` in one pass; `diagonal()` gives `(n,)`. Not differentiable (built only when CG records
    no gradient); `csr` is the converted matrix.
    """

    def __init__(self, A: Tensor):
        self.csr = to_csr(A)
        self.n = int(self.csr.shape[0])
        self.dtype, self.device = self.csr.dtype, self.csr.device
        self.fast = (
            self.device.type == "cpu"
            and self.dtype in (torch.float32, torch.float64)
            and self.csr.values().dim() == 1
            and numba_available()
        )
        if self.fast:
            self._arrays = _kernel_arrays(self.csr)
        self._diag: Optional[Tensor] = None

    def _usable(self, v: Tensor) -> bool:
        return self.fast and v.device.type == "cpu" and v.dtype == self.dtype

    def __call__(self, V: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """`A V` for V: (n,) or (n, k); out: optional contiguous buffer of V's shape and dtype."""
        if not self._usable(V):
            AV = self.csr @ V
            return AV if out is None else out.copy_(AV)
        V = V if V.is_contiguous() else V.contiguous()
        if out is None:
            out = torch.empty_like(V, memory_format=torch.contiguous_format)
        _run("csr_matvec" if V.dim() == 1 else "csr_matmat", *self._arrays, V.numpy(), out.numpy())
        return out

    def apply_dot(self, v: Tensor, out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """`(A v, v . A v)` for one vector v: (n,); out: optional contiguous (n,) buffer."""
        if not self._usable(v):
            Av = self(v, out=out)
            return Av, torch.dot(v.reshape(-1), Av.reshape(-1))
        v = v if v.is_contiguous() else v.contiguous()
        if out is None:
            out = torch.empty_like(v, memory_format=torch.contiguous_format)
        dot = _run("csr_matvec", *self._arrays, v.reshape(-1).numpy(), out.reshape(-1).numpy())
        return out, torch.tensor(dot, dtype=v.dtype)

    def diagonal(self) -> Tensor:
        """diag(A): (n,), from the CSR arrays (computed once)."""
        if self._diag is None and self.fast:
            d = torch.zeros(self.n, dtype=self.dtype)
            _kernels()["csr_diagonal"][0](*self._arrays, d.numpy())
            self._diag = d
        if self._diag is None:
            crow, col = self.csr.crow_indices(), self.csr.col_indices()
            rows = torch.repeat_interleave(torch.arange(self.n, device=self.device), crow[1:] - crow[:-1])
            on_diag = rows == col
            d = torch.zeros(self.n, dtype=self.dtype, device=self.device)
            self._diag = d.index_add_(0, rows[on_diag], self.csr.values()[on_diag])
        return self._diag


# ----------------------------------------------------------------------------- fused CG updates


def fused_updates_available(*vectors: Tensor) -> bool:
    """True when the compiled CG vector updates can run on these (n,) tensors (CPU, one float
    dtype, contiguous, numba installed)."""
    dtype = vectors[0].dtype
    return (
        dtype in (torch.float32, torch.float64)
        and all(v.device.type == "cpu" and v.dtype == dtype and v.is_contiguous() for v in vectors)
        and numba_available()
    )


def _inv_array(inv: Optional[Tensor], like: Tensor) -> np.ndarray:
    return np.empty(0, dtype=like.numpy().dtype) if inv is None else inv.numpy()


def cg_update_r(r: Tensor, Ap: Tensor, alpha: float, inv: Optional[Tensor]) -> tuple[float, float]:
    """In one pass: `r -= alpha Ap`, and return `(r . r, r . (inv * r))` (0.0 for the second
    when inv is None). r, Ap, inv: (n,) contiguous CPU tensors of one dtype."""
    rr, rz = _run("cg_update_r", r.numpy(), Ap.numpy(), float(alpha), _inv_array(inv, r))
    return float(rr), float(rz)


def cg_update_xp(x: Tensor, p: Tensor, r: Tensor, alpha: float, beta: float, inv: Optional[Tensor]) -> None:
    """In one pass: `x += alpha p` and `p = inv * r + beta p` (`r + beta p` when inv is None).
    All (n,) contiguous CPU tensors of one dtype."""
    _run("cg_update_xp", x.numpy(), p.numpy(), r.numpy(), float(alpha), float(beta), _inv_array(inv, r))
