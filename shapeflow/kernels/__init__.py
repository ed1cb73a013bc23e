"""Kernel sums over point sets: `sum_j k(x_i, y_j) b_j`, the engine of kernel LDDMM and varifolds."""
from .gaussian import gaussian_kernel_product

__all__ = ["gaussian_kernel_product"]
