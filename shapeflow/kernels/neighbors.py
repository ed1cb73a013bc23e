"""Nearest neighbours between point sets: a SciPy KD-tree on the CPU, a KeOps argmin on CUDA."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import ShapeflowError
from .backends import import_keops, resolve_backend

__all__ = ["nearest_neighbors", "PointIndex"]

WHO = "nearest_neighbors()"


def nearest_neighbors(queries: Tensor, points: Tensor, backend: str = "auto") -> Tensor:
    """Index into `points: (M, d)` of the nearest neighbour of each of `queries: (N, d)` -> `(N,)`
    int64 on `queries.device`; no autograd.

    backend: "torch" is a KD-tree on the CPU (O((N + M) log M) time, linear memory; tensors are
    copied to the host), "keops" a KeOps argmin reduction on the tensors' device (O(N M) time,
    linear memory), "auto" (`resolve_backend` with KeOps only on CUDA: the KD-tree wins on the CPU).
    """
    engine = resolve_backend(backend, queries.shape[0], points.shape[0], queries.device,
                             keops_min_pairs=math.inf, who=WHO)
    if queries.ndim != 2 or points.ndim != 2 or queries.shape[1] != points.shape[1]:
        raise ShapeflowError(f"{WHO}: queries {tuple(queries.shape)} and points {tuple(points.shape)} "
                             "must both be (N, d) with the same d")
    if engine == "keops":
        return _keops_argmin(queries.detach(), points.detach())
    tree = _kdtree()(points.detach().cpu().double().numpy())
    _, index = tree.query(queries.detach().cpu().double().numpy(), k=1, workers=torch.get_num_threads())
    return torch.as_tensor(np.asarray(index, dtype=np.int64), device=queries.device)


def _keops_argmin(queries: Tensor, points: Tensor) -> Tensor:
    LazyTensor = import_keops("nearest_neighbors(backend='keops')").LazyTensor
    q_i = LazyTensor(queries.contiguous()[:, None, :])                  # (N, 1, d)
    p_j = LazyTensor(points.contiguous()[None, :, :])                   # (1, M, d)
    index = ((q_i - p_j) ** 2).sum(-1).argmin(dim=1)                    # (N, 1)
    return index.view(-1).long()


class PointIndex:
    """A KD-tree over `points: (M, d)` built once and queried many times (CPU, no autograd):
    `query(queries (N, d), k)` -> `(distances (N, k), indices (N, k) int64)` on the queries' device.
    Non-rigid ICP queries the fixed target every iteration through one of these."""

    def __init__(self, points: Tensor):
        if points.ndim != 2:
            raise ShapeflowError(f"PointIndex(): points must be (M, d), got {tuple(points.shape)}")
        self.n, self.dim = points.shape
        self._tree = _kdtree()(points.detach().cpu().double().numpy())

    def query(self, queries: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ShapeflowError(f"PointIndex.query(): queries must be (N, {self.dim}), got {tuple(queries.shape)}")
        k = min(int(k), self.n)
        dist, index = self._tree.query(queries.detach().cpu().double().numpy(), k=k, workers=torch.get_num_threads())
        dist, index = np.asarray(dist).reshape(len(queries), k), np.asarray(index, dtype=np.int64).reshape(len(queries), k)
        return (torch.as_tensor(dist, dtype=queries.dtype, device=queries.device),
                torch.as_tensor(index, device=queries.device))


def _kdtree():
    """SciPy's `cKDTree`, imported on first use (it costs a noticeable part of `import shapeflow`)."""
    from scipy.spatial import cKDTree

    return cKDTree
