"""Image metrics against brute force (explicit surfaces, all pairwise distances) and closed forms."""
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from shapeflow import metrics
from shapeflow.errors import ShapeflowError
from shapeflow.regularizers import folding_statistics, jacobian_determinant


def random_labels(shape, labels, seed):
    """Smooth random blobs: each voxel takes the label of the largest of `labels` smoothed noises."""
    rng = np.random.default_rng(seed)
    fields = np.stack([gaussian_filter(rng.standard_normal(shape), 1.5) for _ in range(labels + 1)])
    fields[0] += 0.15                                            # a little more background
    return fields.argmax(0)


def brute_force_dice(a, b, k):
    in_a, in_b = a == k, b == k
    return 2 * np.sum(in_a & in_b) / (np.sum(in_a) + np.sum(in_b))


def brute_force_surface(mask):
    """Coordinates of the voxels of `mask` with a face neighbour outside the mask or the image."""
    coords = []
    for index in zip(*np.nonzero(mask)):
        for axis in range(mask.ndim):
            for step in (-1, 1):
                neighbour = list(index)
                neighbour[axis] += step
                if not 0 <= neighbour[axis] < mask.shape[axis] or not mask[tuple(neighbour)]:
                    coords.append(index)
                    break
            else:
                continue
            break
    return np.array(coords, dtype=float)


def brute_force_hd95(a, b, k, spacing):
    surface_a = brute_force_surface(a == k) * spacing
    surface_b = brute_force_surface(b == k) * spacing
    distances = np.linalg.norm(surface_a[:, None] - surface_b[None], axis=-1)   # (Na, Nb)
    return np.percentile(np.concatenate([distances.min(1), distances.min(0)]), 95)


@pytest.mark.parametrize("shape, spacing", [((24, 20), (1.0, 1.0)), ((24, 20), (0.7, 2.5)),
                                            ((12, 14, 10), (1.0, 1.0, 1.0)), ((12, 14, 10), (2.0, 0.8, 1.3))])
def test_dice_and_hd95_match_brute_force_on_random_blobs(shape, spacing):
    a, b = random_labels(shape, 3, 1), random_labels(shape, 3, 2)
    dice = metrics.dice_per_label(torch.from_numpy(a), torch.from_numpy(b))
    hd95 = metrics.hausdorff95_per_label(a, b, spacing)
    assert list(dice) == list(hd95) == [1, 2, 3]
    for k in (1, 2, 3):
        assert dice[k] == pytest.approx(brute_force_dice(a, b, k), rel=1e-12)
        assert hd95[k] == pytest.approx(brute_force_hd95(a, b, k, np.array(spacing)), rel=1e-9)
        assert isinstance(dice[k], float) and isinstance(hd95[k], float)


def test_missing_labels():
    a = np.zeros((8, 9), dtype=np.int64)
    b = np.zeros((8, 9), dtype=np.int64)
    a[1:4, 1:4], b[2:5, 1:4] = 1, 1                             # label 1 in both, shifted by a row
    a[6:8, 6:8] = 3                                              # label 3 only in a; 2 in neither
    b[0, 8] = 5                                                  # label 5 only in b
    dice = metrics.dice_per_label(a, b)
    hd95 = metrics.hausdorff95_per_label(a, b, (2.0, 1.0))
    assert list(dice) == list(hd95) == [1, 3, 5]
    assert dice[1] == pytest.approx(2 * 6 / 18) and dice[3] == dice[5] == 0.0
    assert hd95[3] == hd95[5] == float("inf")
    assert hd95[1] == pytest.approx(brute_force_hd95(a, b, 1, np.array([2.0, 1.0])))
    assert metrics.hausdorff95_per_label(a, a, (1.0, 1.0)) == {1: 0.0, 3: 0.0}
    assert metrics.dice_per_label(a, a) == {1: 1.0, 3: 1.0}


def test_hd95_of_a_shifted_box_is_the_shift():
    a = np.zeros((20, 20, 20), dtype=np.int32)
    b = np.zeros_like(a)
    a[5:12, 5:12, 5:12] = 2
    b[5:12, 5:12, 7:14] = 2                                      # shifted 2 voxels along the last axis
    # Every surface voxel is within 2 voxels (2 * 0.5 mm) of the other surface, most much closer.
    hd95 = metrics.hausdorff95_per_label(a, b, (3.0, 3.0, 0.5))[2]
    assert 0 < hd95 <= 1.0
    assert hd95 == pytest.approx(brute_force_hd95(a, b, 2, np.array([3.0, 3.0, 0.5])))


def test_label_metric_errors_name_the_function():
    labels = np.zeros((4, 5), dtype=np.int64)
    with pytest.raises(ShapeflowError, match=r"dice_per_label\(\): labels_a .* same grid"):
        metrics.dice_per_label(labels, np.zeros((4, 6), dtype=np.int64))
    with pytest.raises(ShapeflowError, match=r"dice_per_label\(\): labels_b must be an integer"):
        metrics.dice_per_label(labels, labels.astype(float))
    with pytest.raises(ShapeflowError, match=r"hausdorff95_per_label\(\): spacing"):
        metrics.hausdorff95_per_label(labels, labels, (1.0, 1.0, 1.0))
    with pytest.raises(ShapeflowError, match=r"hausdorff95_per_label\(\): spacing"):
        metrics.hausdorff95_per_label(labels, labels, (1.0, 0.0))


def test_target_registration_error_closed_form():
    a = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 0.0, 5.0], [0.0, 0.0, 0.0]])
    b = a + torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 2.0], [0.0, 0.0, 12.0]])
    tre = metrics.target_registration_error(a, b)
    assert tre["per_point"] == pytest.approx([5.0, 0.0, 3.0, 12.0])
    assert tre["mean"] == pytest.approx(5.0) and tre["median"] == pytest.approx(4.0) and tre["max"] == 12.0
    assert all(isinstance(v, float) for v in (tre["mean"], tre["median"], tre["max"], *tre["per_point"]))
    with pytest.raises(ShapeflowError, match="target_registration_error"):
        metrics.target_registration_error(a, b[:, :2])


def grid(shape, spacing):
    """Physical coordinates `(d, *S)` in mm of the voxel centres."""
    axes = [torch.arange(n, dtype=torch.float64) * h for n, h in zip(shape, spacing)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


@pytest.mark.parametrize("shape, spacing", [((7, 8), (1.0, 2.5)), ((5, 6, 7), (2.0, 0.5, 1.5))])
def test_jacobian_statistics_of_an_affine_field(shape, spacing):
    d = len(shape)
    B = 0.2 * torch.randn(d, d, dtype=torch.float64)
    u = torch.einsum("ij,j...->i...", B, grid(shape, spacing))  # u(x) = B x: det J = det(I + B)
    stats = metrics.jacobian_statistics(u, spacing)
    det = float(torch.linalg.det(torch.eye(d, dtype=torch.float64) + B))
    assert stats["min"] == pytest.approx(det)
    assert stats["percent_negative"] == (100.0 if det <= 0 else 0.0)
    assert stats["std_log"] == pytest.approx(0.0, abs=1e-7)
    assert stats == folding_statistics(jacobian_determinant(u, spacing))


def test_jacobian_statistics_counts_the_folded_slab():
    # u_0 = -x0^2 / 2 along axis 0 (spacing h): det J = 1 - x0, exact by central differences
    # inside; one-sided at the last row: 1 - (x_last - h / 2). Folded where x0 >= 1.
    h, n = 0.25, 10
    x0 = grid((n, 4, 3), (h, 1.0, 1.0))[0]
    u = torch.stack([-x0 ** 2 / 2, torch.zeros_like(x0), torch.zeros_like(x0)])
    stats = metrics.jacobian_statistics(u, (h, 1.0, 1.0))
    rows = np.arange(n) * h
    assert stats["percent_negative"] == pytest.approx(100 * np.mean(1 - rows <= 0))
    assert stats["min"] == pytest.approx(1 - (rows[-1] - h / 2))
    with pytest.raises(ShapeflowError, match=r"jacobian_statistics\(\): displacement"):
        metrics.jacobian_statistics(u[:2], (h, 1.0, 1.0))
