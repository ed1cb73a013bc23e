"""Gaussian kernel sums `sum_j exp(-|x_i - y_j|^2 / sigma^2) b_j`, dense in torch or with KeOps.

Differentiable in x, y and b on both engines. Dense torch holds the (N, M) matrix (memory
O(N M)); KeOps streams over it (memory O(N + M)). `backend="auto"` picks one by
`resolve_backend` (KeOps on CUDA or above `KEOPS_MIN_PAIRS` point pairs).
"""
from __future__ import annotations

from torch import Tensor

from ..errors import ShapeflowError
from .backends import import_keops, resolve_backend
from .exp import fast_exp

__all__ = ["gaussian_kernel_product"]

WHO = "gaussian_kernel_product()"


def gaussian_kernel_product(x: Tensor, y: Tensor, b: Tensor, sigma: float, backend: str = "torch") -> Tensor:
    """`K(x, y) b` with `K_ij = exp(-|x_i - y_j|^2 / sigma^2)`.

    x: (N, d), y: (M, d), b: (M, k), same dtype and device; sigma > 0. Returns (N, k).
    backend: "torch" (dense), "keops" (pykeops LazyTensor reduction) or "auto"
    (`resolve_backend`: KeOps on CUDA or when N * M > KEOPS_MIN_PAIRS).
    """
    engine = resolve_backend(backend, x.shape[0], y.shape[0], x.device, who=WHO)
    if x.dim() != 2 or y.dim() != 2 or b.dim() != 2 or x.shape[1] != y.shape[1] or b.shape[0] != y.shape[0]:
        raise ShapeflowError(f"{WHO}: expected x (N, d), y (M, d), b (M, k), got "
                             f"{tuple(x.shape)}, {tuple(y.shape)}, {tuple(b.shape)}")
    if not sigma > 0:
        raise ShapeflowError(f"{WHO}: sigma must be > 0, got {sigma}")
    if engine == "keops":
        return _keops(x, y, b, float(sigma))
    return _dense(x, y, b, sigma)


def _dense(x: Tensor, y: Tensor, b: Tensor, sigma: float) -> Tensor:
    # |x - y|^2 = |x|^2 + |y|^2 - 2 x.y: a matrix product instead of an (N, M, d) difference tensor
    # (3x faster forward and backward at 4000 x 250); centred on y's mean first, so the cancellation
    # in the sum stays at the rounding of the points' spread, not of their distance to the origin
    centre = y.mean(0).detach()
    x, y = x - centre, y - centre
    squared = (x.square().sum(1, keepdim=True) + y.square().sum(1) - 2 * x @ y.T).clamp_min(0)   # (N, M)
    return fast_exp(-squared / sigma**2) @ b                            # (N, k)


def _keops(x: Tensor, y: Tensor, b: Tensor, sigma: float) -> Tensor:
    LazyTensor = import_keops("gaussian_kernel_product(backend='keops')").LazyTensor
    x_i = LazyTensor(x.contiguous()[:, None, :])                        # (N, 1, d)
    y_j = LazyTensor(y.contiguous()[None, :, :])                        # (1, M, d)
    b_j = LazyTensor(b.contiguous()[None, :, :])                        # (1, M, k)
    # sigma as a scalar parameter: one compiled formula for every sigma
    kernel = (-((x_i - y_j) ** 2).sum(-1) / sigma**2).exp()             # (N, M) symbolic
    return (kernel * b_j).sum(dim=1)                                    # (N, k)
