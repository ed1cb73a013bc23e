"""Choosing a well-spread subset of points for coarse-to-fine fitting."""
from __future__ import annotations

import numpy as np
import torch

from ._optional import is_available
from .errors import ShapeflowError
from .kernels.neighbors import mean_neighbor_distances

__all__ = ["farthest_point_sample", "isolated_points"]

#: points per chosen one that the greedy sweeps at most (see `farthest_point_sample`)
PRESAMPLE = 16
#: `isolated_points`: a point whose mean distance to its ISOLATED_NEIGHBOURS nearest others is
#: above ISOLATED_RATIO times the ISOLATED_QUANTILE of that distance over the points (statistical
#: outlier removal, as PCL's filter, against a high quantile: a CAD mesh's sparse flat parts are
#: legitimate). Measured: of 67 points uniform in a box 1.5x PyVista's airplane (5 %), 52-63 are
#: flagged over 14 draws (benchmarks/results/robust_shapes.md, section 4; the rest lie near the
#: surface); of the shapes' own points none of the airplane's (whole or cropped by 30 %),
#: fsaverage5's (whole, 4k, random 1,000 or 200), the fish's, or PyVista's globe, sphere, hexbeam,
#: uniform and random hills, and 8 of the ant's 486 (leg tips).
#: Against the median instead, 3x flagged 33 of the cropped airplane's points and 13 of the ant's;
#: against the 90 % quantile, 3x left 14 outliers in, and one draw of four still ended at RMSE 25.6
ISOLATED_NEIGHBOURS, ISOLATED_QUANTILE, ISOLATED_RATIO = 8, 0.9, 2.0


def farthest_point_sample(points: torch.Tensor, count: int, seed: int = 0,
                          skip_isolated: bool = False) -> torch.Tensor:
    """Indices `(count,)` of a farthest-point subset of `points: (N, d)` (all of them if N <= count).

    Greedy: start at a random point (from `seed`), then repeatedly add the point farthest from
    those chosen (the first of equally far ones). O(N * count) time, O(N) memory: one compiled
    pass per chosen point on the CPU with numba (`_fps_kernel`), torch operations otherwise. When
    `count` is at least half of N the subset covers the shape anyway, and a seeded random subset
    is taken instead (O(N)). Above `PRESAMPLE` x count points (and 50000), the greedy runs on a
    presample of that many points (`_presample`: one point per occupied cell of a voxel grid, so
    sparse parts and outliers stay in reach, filled up at random), which keeps the cost
    O(count^2) at any N.

    `skip_isolated`: choose among the points that are not isolated (`isolated_points`, on the
    presample above that size), unless fewer than `count` are left. The greedy picks the points
    farthest from the rest first, so 5 % of outliers around a shape become a quarter of a
    256-point subset (64-67 of 67 on the airplane of `tests/test_robust_shapes.py`), which a coarse
    fit then pulls toward; skipping them leaves the outliers to the full-resolution stages, at
    their own share.
    """
    n = points.shape[0]
    if count >= n:
        return torch.arange(n, device=points.device)
    pool = max(PRESAMPLE * count, 50000)
    if skip_isolated:
        base = (torch.arange(n) if n <= pool
                else torch.from_numpy(_presample(points.detach().cpu().double().numpy(), pool, seed)))
        keep = base[~isolated_points(points[base.to(points.device)]).cpu()].to(points.device)
        if len(keep) >= count:      # else too few are left: every point is a candidate, as without
            return keep[farthest_point_sample(points[keep], count, seed)]
    gen = torch.Generator().manual_seed(seed)
    if 2 * count >= n:
        return torch.randperm(n, generator=gen)[:count].sort().values.to(points.device)
    if n > pool:
        subset = torch.from_numpy(_presample(points.detach().cpu().double().numpy(), pool, seed)).to(points.device)
        return subset[farthest_point_sample(points[subset], count, seed)]
    first = int(torch.randint(n, (1,), generator=gen))
    x = points.detach()
    if x.device.type == "cpu" and is_available("numba"):
        chosen = np.empty(count, dtype=np.int64)
        _compiled()(np.ascontiguousarray(x.double().numpy()), first, chosen)
        return torch.from_numpy(chosen)
    chosen = torch.empty(count, dtype=torch.long, device=x.device)
    chosen[0] = first
    dist = (x - x[first]).pow(2).sum(1)
    for i in range(1, count):
        chosen[i] = torch.argmax(dist)
        dist = torch.minimum(dist, (x - x[chosen[i]]).pow(2).sum(1))
    return chosen


def isolated_points(points: torch.Tensor, neighbours: int = ISOLATED_NEIGHBOURS,
                    quantile: float = ISOLATED_QUANTILE, ratio: float = ISOLATED_RATIO) -> torch.Tensor:
    """Which of `points: (N, d)` are isolated -> `(N,)` bool on their device: the mean distance to
    their `neighbours` nearest others is above `ratio` times its `quantile` over the points. None
    when N <= `neighbours` (too few to tell)."""
    if not (int(neighbours) >= 1 and 0 < quantile <= 1 and ratio > 0):
        raise ShapeflowError(f"isolated_points(): needs neighbours >= 1, 0 < quantile <= 1 and ratio > 0; got "
                             f"{neighbours}, {quantile}, {ratio}")
    if points.shape[0] <= neighbours:
        return torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    spread = mean_neighbor_distances(points, neighbours)         # (N,) float64 on the CPU
    return (spread > ratio * float(np.quantile(spread.numpy(), quantile))).to(points.device)


def _presample(x: np.ndarray, pool: int, seed: int) -> np.ndarray:
    """Sorted indices of about `pool` points of `x: (N, d)` spread over all of it: one point (drawn
    at random) per occupied cell of a voxel grid whose size is adjusted until it has between pool/2
    and pool occupied cells, then random other points up to `pool`. O(N log N)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    y = x[order] - x.min(0)
    size = (np.ptp(x, 0).max() + 1e-300) / pool ** (1.0 / x.shape[1])    # pool cells if the points filled the box
    keep, dimension = order[:0], float(x.shape[1])
    for _ in range(12):
        cells = np.floor(y / size).astype(np.int64)                        # (N, d)
        key = np.zeros(len(y), dtype=np.int64)
        for column in cells.T:                                             # one integer per cell
            key = key * (int(column.max()) + 1) + column
        _, first = np.unique(key, return_index=True)
        if len(first) <= pool:
            keep = order[first]
            if len(first) >= pool // 2:
                break
        # the count goes as size^-dimension (2 on a surface, 3 in a volume): aim at 3/4 pool
        size *= (len(first) / (0.75 * pool)) ** (1.0 / dimension)
        dimension = 2.0
    rest = np.setdiff1d(order, keep, assume_unique=True)
    extra = rng.permutation(rest)[: pool - len(keep)]
    return np.sort(np.concatenate([keep, extra]))


def _fps_kernel(x, first, out):  # pragma: no cover - compiled by numba
    """Farthest-point sampling of `x: (N, d)` float64 from index `first` into `out: (count,)`:
    each pass lowers the distances to the newest point and finds the farthest in one sweep."""
    n, d = x.shape
    dist = np.full(n, np.inf)
    newest = first
    out[0] = first
    for i in range(1, out.shape[0]):
        best, best_value = 0, -1.0
        for j in range(n):
            s = 0.0
            for c in range(d):
                t = x[j, c] - x[newest, c]
                s += t * t
            if s < dist[j]:
                dist[j] = s
            if dist[j] > best_value:
                best_value = dist[j]
                best = j
        out[i] = best
        newest = best


_KERNEL = []


def _compiled():
    """`_fps_kernel` compiled once (numba, cached on disk)."""
    if not _KERNEL:
        import numba

        _KERNEL.append(numba.njit(cache=True, fastmath=False)(_fps_kernel))
    return _KERNEL[0]
