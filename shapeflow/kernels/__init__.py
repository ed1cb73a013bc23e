"""Kernel sums over point sets: `sum_j k(x_i, y_j) b_j`, the engine of kernel LDDMM and varifolds.

`resolve_backend` is the one rule choosing KeOps or dense torch for every pairwise reduction
(also Sinkhorn, through `sinkhorn_backend`, and nearest neighbours).
"""
from .backends import BACKENDS, KEOPS_MIN_PAIRS, SINKHORN_BACKENDS, resolve_backend, sinkhorn_backend
from .exp import fast_exp, fast_logsumexp
from .gaussian import gaussian_kernel_product
from .neighbors import PointIndex, nearest_distances, nearest_neighbors

__all__ = ["gaussian_kernel_product", "nearest_neighbors", "nearest_distances", "PointIndex", "resolve_backend",
           "sinkhorn_backend", "BACKENDS", "SINKHORN_BACKENDS", "KEOPS_MIN_PAIRS", "fast_exp", "fast_logsumexp"]
