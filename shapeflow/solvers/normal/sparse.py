"""The Gauss-Newton normal operator of a per-point field on a mesh or a cloud: `J^T J + lam L + damping I`.

Non-rigid ICP on meshes and clouds (one displacement per vertex / point, `u: (N, d)`) linearises a
residual per correspondence: its normal matrix has one d x d data block per point (`J_i^T J_i`:
the identity for point-to-point pairs, `n n^T` for point-to-plane, weighted) and a sparse graph
Laplacian (cotangent, uniform or kNN, `shapeflow.regularizers`) applied to every component.
Unknowns are flattened point by point: index `i d + c` is component c of point i
(`u.reshape(-1)`). `sparse_normal_operator` applies it matrix free (the Laplacian converted to CSR
once); `assemble_sparse_normal_matrix` gives the same matrix as a sparse CSR tensor (for AMG).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from shapeflow.errors import ShapeflowError

__all__ = ["SparseNormalOperator", "sparse_normal_operator", "assemble_sparse_normal_matrix"]


def _check(func: str, blocks: Tensor, laplacian: Tensor, lam: float, damping: float) -> None:
    if not isinstance(blocks, Tensor) or blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
        raise ShapeflowError(f"{func}(): blocks must be (N, d, d), got "
                             f"{tuple(blocks.shape) if isinstance(blocks, Tensor) else type(blocks).__name__}")
    n = blocks.shape[0]
    if not isinstance(laplacian, Tensor) or tuple(laplacian.shape) != (n, n):
        raise ShapeflowError(f"{func}(): laplacian must be an ({n}, {n}) tensor (sparse or dense), got "
                             f"{tuple(laplacian.shape) if isinstance(laplacian, Tensor) else type(laplacian).__name__}")
    if not (lam >= 0 and damping >= 0):
        raise ShapeflowError(f"{func}(): lam and damping must be >= 0, got {lam}, {damping}")


class SparseNormalOperator:
    """`v -> (blockdiag(J_i^T J_i) + lam kron(L, I_d) + damping I) v` on a per-point field.

    Build it with `sparse_normal_operator`. Call it on `(N, d)`, `(N d,)` or `(N d, k)` tensors;
    `diagonal()` gives `(N d,)` for Jacobi; `apply_dot(v)` gives `(A v, v . A v)`. Differentiable
    in `v` and `blocks` when autograd records.
    """

    def __init__(self, blocks: Tensor, laplacian: Tensor, lam: float, damping: float):
        self.blocks = blocks                                            # (N, d, d)
        self.n_points, self.d = blocks.shape[0], blocks.shape[1]
        self.n = self.n_points * self.d
        L = laplacian.to(blocks.dtype)
        with warnings.catch_warnings():   # torch's "sparse CSR support is in beta" notice
            warnings.simplefilter("ignore", UserWarning)
            self.laplacian = L.to_sparse_csr() if L.layout != torch.strided else L   # converted once
        self.lam, self.damping = float(lam), float(damping)

    def __call__(self, v: Tensor) -> Tensor:
        if v.numel() % self.n or (v.dim() == 2 and v.shape[0] != self.n and v.shape != (self.n_points, self.d)):
            raise ShapeflowError(f"SparseNormalOperator: expected ({self.n_points}, {self.d}), ({self.n},) or "
                                 f"({self.n}, k) tensors, got {tuple(v.shape)}")
        k = v.numel() // self.n
        u = v.reshape(self.n_points, self.d, k)                          # (N, d, k)
        out = torch.einsum("nij,njk->nik", self.blocks, u)               # the data blocks
        if self.lam:
            out = out + self.lam * (self.laplacian @ u.reshape(self.n_points, -1)).reshape(u.shape)
        if self.damping:
            out = out + self.damping * u
        return out.reshape(v.shape)

    def apply_dot(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """`(A v, v . A v)` for one vector v."""
        out = self(v)
        return out, (v.reshape(-1) * out.reshape(-1)).sum()

    def diagonal(self) -> Tensor:
        """diag of the operator, `(N d,)`."""
        lap = self.laplacian.to_dense().diagonal() if self.laplacian.layout == torch.strided else \
            _sparse_diagonal(self.laplacian)
        diag = torch.diagonal(self.blocks, dim1=1, dim2=2) + self.lam * lap[:, None] + self.damping   # (N, d)
        return diag.reshape(-1)


def _sparse_diagonal(L: Tensor) -> Tensor:
    coo = L.to_sparse_coo().coalesce()
    rows, cols = coo.indices()
    out = torch.zeros(L.shape[0], dtype=L.dtype, device=L.device)
    keep = rows == cols
    return out.index_add_(0, rows[keep], coo.values()[keep])


def sparse_normal_operator(blocks: Tensor, laplacian: Tensor, *, lam: float, damping: float = 0.0
                           ) -> SparseNormalOperator:
    """The Gauss-Newton matrix of a per-point field as a callable for `conjugate_gradient`.

    blocks: (N, d, d) symmetric PSD data blocks `J_i^T J_i` (zero for points without a pair);
    laplacian: (N, N) sparse (COO/CSR) or dense PSD Laplacian of the mesh or cloud; lam, damping >= 0.
    Pass it as `A` to `conjugate_gradient` with `M=op.diagonal()`.
    """
    _check("sparse_normal_operator", blocks, laplacian, lam, damping)
    return SparseNormalOperator(blocks, laplacian, lam, damping)


def assemble_sparse_normal_matrix(blocks: Tensor, laplacian: Tensor, *, lam: float, damping: float = 0.0,
                                  dtype: Optional[torch.dtype] = None) -> Tensor:
    """The matrix of `sparse_normal_operator` as a sparse CSR tensor `(N d, N d)` (not differentiable).

    Entries `(i d + a, i d + b) = blocks[i, a, b] + damping [a == b]` and
    `(i d + c, j d + c) += lam L[i, j]`.
    """
    _check("assemble_sparse_normal_matrix", blocks, laplacian, lam, damping)
    blocks = blocks.detach().to(dtype or blocks.dtype)
    N, d = blocks.shape[:2]
    device = blocks.device
    point = torch.arange(N, device=device)[:, None, None] * d
    a = torch.arange(d, device=device)
    rows = (point + a[None, :, None]).expand(N, d, d)
    cols = (point + a[None, None, :]).expand(N, d, d)
    values = blocks + damping * torch.eye(d, dtype=blocks.dtype, device=device)
    index, vals = [torch.stack([rows.reshape(-1), cols.reshape(-1)])], [values.reshape(-1)]
    if lam > 0:
        L = (laplacian.to_sparse_coo() if laplacian.layout != torch.strided else laplacian.to_sparse()).coalesce()
        i, j = L.indices()
        index.append(torch.stack([(i[:, None] * d + a).reshape(-1), (j[:, None] * d + a).reshape(-1)]))
        vals.append((float(lam) * L.values().to(blocks.dtype))[:, None].expand(-1, d).reshape(-1))
    n = N * d
    A = torch.sparse_coo_tensor(torch.cat(index, 1), torch.cat(vals), (n, n), check_invariants=False)
    return A.coalesce().to_sparse_csr()
