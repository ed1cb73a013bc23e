"""Gaussian kernel sums `sum_j exp(-|x_i - y_j|^2 / sigma^2) b_j`, dense in torch.

Differentiable in x, y and b. Memory O(N M): fine for the small and medium clouds this runs on.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ShapeflowError

__all__ = ["gaussian_kernel_product"]


def gaussian_kernel_product(x: Tensor, y: Tensor, b: Tensor, sigma: float, backend: str = "torch") -> Tensor:
    """`K(x, y) b` with `K_ij = exp(-|x_i - y_j|^2 / sigma^2)`.

    x: (N, d), y: (M, d), b: (M, k); sigma > 0. Returns (N, k). backend: "torch" (dense).
    """
    if backend != "torch":
        raise ShapeflowError(f"gaussian_kernel_product(): unknown backend {backend!r}; choose from torch")
    if x.dim() != 2 or y.dim() != 2 or b.dim() != 2 or x.shape[1] != y.shape[1] or b.shape[0] != y.shape[0]:
        raise ShapeflowError(f"gaussian_kernel_product(): expected x (N, d), y (M, d), b (M, k), got "
                             f"{tuple(x.shape)}, {tuple(y.shape)}, {tuple(b.shape)}")
    if not sigma > 0:
        raise ShapeflowError(f"gaussian_kernel_product(): sigma must be > 0, got {sigma}")
    squared = (x[:, None, :] - y[None, :, :]).square().sum(-1)          # (N, M)
    return torch.exp(-squared / sigma**2) @ b
