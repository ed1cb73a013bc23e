"""Nearest neighbours between point sets: a SciPy KD-tree on the CPU, a KeOps argmin on CUDA."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import ShapeflowError
from .backends import import_keops, resolve_backend

__all__ = ["nearest_neighbors", "nearest_distances", "mean_neighbor_distances", "PointIndex", "DENSE_PAIRS", "THREADED_QUERIES"]

WHO = "nearest_neighbors()"
#: up to this many query-point pairs, "torch" is an exact dense argmin: measured (one thread) 43 us
#: against the KD-tree's 62 us at 91 x 91 (237 us with two query threads), 263 against 134 us at
#: 256 x 256; and a small registration never imports scipy.spatial (0.14-0.27 s of a first call)
DENSE_PAIRS = 128 * 128
#: the KD-tree queries on torch's threads from this many queries on; below, one thread is faster
#: (measured on 2 cores: 237 vs 62 us at 91 queries, 14.7 vs 10.7 ms at 16k, even at 64k, 264 vs 331 ms at 256k)
THREADED_QUERIES = 100_000


def nearest_neighbors(queries: Tensor, points: Tensor, backend: str = "auto") -> Tensor:
    """Index into `points: (M, d)` of the nearest neighbour of each of `queries: (N, d)` -> `(N,)`
    int64 on `queries.device`; no autograd.

    backend: "torch" is a KD-tree on the CPU (O((N + M) log M) time, linear memory; tensors are
    copied to the host), or up to `DENSE_PAIRS` pairs an exact float64 dense argmin on the tensors'
    device; "keops" a KeOps argmin reduction on the tensors' device (O(N M) time, linear memory);
    "auto" (`resolve_backend` with KeOps only on CUDA: the KD-tree wins on the CPU).
    """
    engine = resolve_backend(backend, queries.shape[0], points.shape[0], queries.device,
                             keops_min_pairs=math.inf, who=WHO)
    if queries.ndim != 2 or points.ndim != 2 or queries.shape[1] != points.shape[1]:
        raise ShapeflowError(f"{WHO}: queries {tuple(queries.shape)} and points {tuple(points.shape)} "
                             "must both be (N, d) with the same d")
    if engine == "keops":
        return _keops_argmin(queries.detach(), points.detach())
    return _nearest(queries.detach(), points.detach())[1].to(queries.device)


def nearest_distances(queries: Tensor, points: Tensor) -> Tensor:
    """Euclidean distance from each of `queries: (N, d)` to its nearest neighbour in `points: (M, d)`
    -> `(N,)` float64 on the CPU; no autograd. The dense argmin up to `DENSE_PAIRS` pairs, else
    the KD-tree (as `nearest_neighbors(backend="torch")`)."""
    if queries.ndim != 2 or points.ndim != 2 or queries.shape[1] != points.shape[1]:
        raise ShapeflowError(f"nearest_distances(): queries {tuple(queries.shape)} and points "
                             f"{tuple(points.shape)} must both be (N, d) with the same d")
    return _nearest(queries.detach(), points.detach())[0].cpu()


def mean_neighbor_distances(points: Tensor, k: int) -> Tensor:
    """The mean Euclidean distance from each of `points: (N, d)` to its `k` nearest others
    -> `(N,)` float64 on the CPU (no autograd): dense distances up to `DENSE_PAIRS` pairs, else a
    KD-tree. Duplicates count, at distance 0."""
    if points.ndim != 2 or points.shape[0] < 2:
        raise ShapeflowError(f"mean_neighbor_distances(): points {tuple(points.shape)} must be (N, d) with N >= 2")
    k = min(int(k), points.shape[0] - 1)
    if points.shape[0] ** 2 <= DENSE_PAIRS:
        p = points.detach().cpu().double()
        distances = torch.cdist(p, p, compute_mode="donot_use_mm_for_euclid_dist")
        distances.fill_diagonal_(-1.0)          # the point itself first, whatever its duplicates
        return distances.topk(k + 1, dim=1, largest=False).values[:, 1:].mean(1)
    x = points.detach().cpu().double().numpy()
    distances, _ = _kdtree()(x).query(x, k=k + 1, workers=_workers(len(x)))     # the first is the point itself
    return torch.as_tensor(np.asarray(distances, dtype=np.float64)[:, 1:].mean(1))


def _nearest(queries: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """Distances `(N,)` float64 and indices `(N,)` int64 of the nearest of `points: (M, d)` to each of
    `queries: (N, d)`: a dense float64 argmin on their device up to `DENSE_PAIRS` pairs (differences,
    not the |q|^2 - 2 q.p + |p|^2 expansion: exact as the KD-tree's distances), else the KD-tree on
    the CPU (results on the CPU)."""
    if queries.shape[0] * points.shape[0] <= DENSE_PAIRS:
        distances = torch.cdist(queries.double(), points.double(), compute_mode="donot_use_mm_for_euclid_dist")
        return distances.min(1)
    distances, index = _kdtree()(points.cpu().double().numpy()).query(queries.cpu().double().numpy(), k=1,
                                                                      workers=_workers(len(queries)))
    return (torch.as_tensor(np.asarray(distances, dtype=np.float64)),
            torch.as_tensor(np.asarray(index, dtype=np.int64)))


def _workers(queries: int) -> int:
    """Threads for a KD-tree query of `queries` points (see `THREADED_QUERIES`)."""
    return torch.get_num_threads() if queries >= THREADED_QUERIES else 1


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
        dist, index = self._tree.query(queries.detach().cpu().double().numpy(), k=k, workers=_workers(len(queries)))
        dist, index = np.asarray(dist).reshape(len(queries), k), np.asarray(index, dtype=np.int64).reshape(len(queries), k)
        return (torch.as_tensor(dist, dtype=queries.dtype, device=queries.device),
                torch.as_tensor(index, device=queries.device))


def _kdtree():
    """SciPy's `cKDTree`, imported on first use (it costs a noticeable part of `import shapeflow`)."""
    from scipy.spatial import cKDTree

    return cKDTree
