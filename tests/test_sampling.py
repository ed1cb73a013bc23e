"""Farthest-point sampling: the compiled greedy against a NumPy reference, and the presample that
keeps large clouds cheap (issue: 28 of 50 s went to sampling 163k points) without losing coverage."""
import numpy as np
import pytest
import torch

from shapeflow import sampling
from shapeflow.errors import ShapeflowError
from shapeflow.sampling import farthest_point_sample


def _greedy_reference(x: np.ndarray, count: int, first: int) -> np.ndarray:
    chosen = [first]
    dist = ((x - x[first]) ** 2).sum(1)
    for _ in range(count - 1):
        chosen.append(int(np.argmax(dist)))
        dist = np.minimum(dist, ((x - x[chosen[-1]]) ** 2).sum(1))
    return np.array(chosen)


def _coverage(x: np.ndarray, chosen: np.ndarray) -> float:
    """The largest distance from a point to the chosen subset."""
    from scipy.spatial import cKDTree

    return float(cKDTree(x[chosen]).query(x)[0].max())


def test_greedy_matches_a_numpy_reference():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(3000, 3)))
    got = farthest_point_sample(x, 200, seed=3).numpy()
    np.testing.assert_array_equal(got, _greedy_reference(x.numpy(), 200, int(got[0])))


def test_presample_keeps_the_coverage_of_the_full_greedy(monkeypatch):
    """Above max(PRESAMPLE x count, 50000) points the greedy runs on a presample: its subset must
    cover the cloud almost as well as the greedy on every point. On this Gaussian cloud a random
    presample missed the tails (covering radius 1.93 against the full greedy's 0.61); one point
    per voxel-grid cell keeps them (0.64); a random choice of 1000 points reaches 6.7."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150_000, 3)) * [3.0, 1.0, 0.5]
    fast = farthest_point_sample(torch.from_numpy(x), 1000, seed=0).numpy()
    assert len(np.unique(fast)) == 1000
    monkeypatch.setattr(sampling, "PRESAMPLE", 10**9)             # the greedy on every point
    full = farthest_point_sample(torch.from_numpy(x), 1000, seed=0).numpy()
    random = rng.choice(len(x), 1000, replace=False)
    assert _coverage(x, fast) < 1.5 * _coverage(x, full) < _coverage(x, random), (
        _coverage(x, fast), _coverage(x, full), _coverage(x, random))


@pytest.mark.parametrize("count", [100, 300])      # the dense path (up to DENSE_PAIRS pairs), the KD-tree
def test_mean_neighbor_distances_match_a_brute_force_reference(count):
    from shapeflow.kernels.neighbors import mean_neighbor_distances

    x = torch.randn(count, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[1] = x[0]                                                        # a duplicate counts, at distance 0
    reference = torch.cdist(x, x).sort(1).values[:, 1:9].mean(1)      # column 0: the point itself (or its twin)
    torch.testing.assert_close(mean_neighbor_distances(x, 8), reference)


def _sphere_with_outliers(n: int = 2000, outliers: int = 100, seed: int = 0):
    """`n` points on the unit sphere, then `outliers` uniform in the cube [-1.5, 1.5]^3 at least
    0.3 from the sphere (so every one is far from the surface)."""
    rng = np.random.default_rng(seed)
    surface = rng.normal(size=(n, 3))
    surface /= np.linalg.norm(surface, axis=1, keepdims=True)
    box = rng.uniform(-1.5, 1.5, size=(20 * outliers, 3))
    box = box[np.abs(np.linalg.norm(box, axis=1) - 1) > 0.3][:outliers]
    return torch.from_numpy(np.concatenate([surface, box]))


def test_isolated_points_are_the_far_outliers():
    from shapeflow.sampling import isolated_points

    points = _sphere_with_outliers()
    flagged = isolated_points(points)
    assert not flagged[:2000].any()                   # no point of a uniformly sampled sphere
    assert flagged[2000:].float().mean() > 0.9        # nearly every outlier 0.3 or more off it
    assert not isolated_points(points[:5]).any()      # too few points to tell
    with pytest.raises(ShapeflowError, match="quantile"):
        isolated_points(points, quantile=1.5)


def test_farthest_points_skip_the_isolated_ones(monkeypatch):
    """The greedy picks the outliers first (5 % of the points, most of a 256-point subset);
    with skip_isolated it picks only flagged-free points and still covers the sphere."""
    from shapeflow.sampling import isolated_points

    points = _sphere_with_outliers()
    plain = farthest_point_sample(points, 256, seed=0)
    assert (plain >= 2000).sum() > 80
    robust = farthest_point_sample(points, 256, seed=0, skip_isolated=True)
    assert len(robust.unique()) == 256 and not isolated_points(points)[robust].any()
    gaps = torch.cdist(points[:2000], points[robust]).min(1).values
    assert float(gaps.max()) < 0.35                   # every sphere point near a chosen one
    # fewer than `count` not isolated: every point is a candidate again, as without skip_isolated
    monkeypatch.setattr(sampling, "isolated_points", lambda p: torch.arange(len(p)) >= 10)
    assert torch.equal(farthest_point_sample(points, 256, seed=0, skip_isolated=True), plain)
