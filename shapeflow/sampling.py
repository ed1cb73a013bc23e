"""Choosing a well-spread subset of points for coarse-to-fine fitting."""
from __future__ import annotations

import torch

__all__ = ["farthest_point_sample"]


def farthest_point_sample(points: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Indices `(count,)` of a farthest-point subset of `points: (N, d)` (all of them if N <= count).

    Greedy: start at a random point (from `seed`), then repeatedly add the point farthest from
    those chosen. O(N * count) time, O(N) memory. When `count` is at least half of N the subset
    covers the shape anyway, and a seeded random subset is taken instead (O(N)).
    """
    n = points.shape[0]
    if count >= n:
        return torch.arange(n, device=points.device)
    gen = torch.Generator().manual_seed(seed)
    if 2 * count >= n:
        return torch.randperm(n, generator=gen)[:count].sort().values.to(points.device)
    x = points.detach()
    chosen = torch.empty(count, dtype=torch.long, device=x.device)
    chosen[0] = int(torch.randint(n, (1,), generator=gen))
    dist = (x - x[chosen[0]]).pow(2).sum(1)
    for i in range(1, count):
        chosen[i] = torch.argmax(dist)
        dist = torch.minimum(dist, (x - x[chosen[i]]).pow(2).sum(1))
    return chosen
