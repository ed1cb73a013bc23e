"""The learning issue's data: multi-modal label phantoms (deterministic, disjoint splits, a known
field) and pairs from a folder."""
import numpy as np
import pytest
import torch

import shapeflow as sf
from shapeflow.grids import Grid, sample
from shapeflow.learn import PairFolder, SPLITS, phantom_pair, split_seeds


def test_same_seed_same_pair_and_splits_are_disjoint():
    a, b = phantom_pair(7), phantom_pair(7)
    assert torch.equal(a[0].data, b[0].data) and torch.equal(a[1].labels, b[1].labels)
    assert not torch.equal(phantom_pair(8)[1].data, a[1].data)
    ranges = [set(r) for r in SPLITS.values()]
    assert all(not (x & y) for i, x in enumerate(ranges) for y in ranges[i + 1:])
    assert split_seeds("test", 3) == [20000, 20001, 20002]
    with pytest.raises(sf.ShapeflowError, match="unknown split 'dev'"):
        split_seeds("dev", 1)


@pytest.mark.parametrize("size", [(96, 96), (48, 48, 48)])
def test_labels_and_the_known_field(size):
    """4-6 labels; the moving labels are the fixed geometry seen through x -> x + u(x): the fixed
    labels resampled there agree with the moving labels almost everywhere (edges differ by the
    nearest-neighbour rounding)."""
    moving, fixed, u = phantom_pair(3, size=size, return_field=True)
    assert moving.shape == fixed.shape == size and u.shape == (len(size), *size)
    for image in (moving, fixed):
        assert 4 <= len(image.labels.unique()) <= 6
    grid = Grid.of(fixed)
    points = grid.points(torch.float64)
    seen = sample(fixed.labels[None].double(), grid, points + u.movedim(0, -1), mode="nearest")[0].long()
    assert float((seen == moving.labels).double().mean()) > 0.97
    assert 0.5 < float(u.abs().max()) < 0.1 * max(size)


def test_multi_modal_intensities_are_unrelated_and_mono_ones_the_same():
    """Per-label mean intensities of moving against fixed: correlation near 1 for "mono" (measured
    0.99-1.0 on 10 seeds), anything for "multi" (-0.77 ... 0.57): no monotonic map relates them."""
    def correlation(seed, modality):
        moving, fixed = phantom_pair(seed, modality=modality)
        means = [[float(img.data[0][img.labels == k].mean()) for k in range(int(img.labels.max()) + 1)]
                 for img in (moving, fixed)]
        return float(np.corrcoef(*means)[0, 1])
    multi = [correlation(s, "multi") for s in range(10)]
    mono = [correlation(s, "mono") for s in range(10)]
    assert min(mono) > 0.97 and max(multi) < 0.8 and np.mean(multi) < 0.3, (mono, multi)


def test_ssd_fails_and_mind_helps_on_multi_modal_pairs():
    """What the data is for: SSD lowers the foreground Dice (measured on 8 test seeds: 0.661 ->
    0.617), MIND raises it (-> 0.699), local NCC too (-> 0.713)."""
    def foreground(d):
        return np.mean([v for k, v in d.items() if k > 0])
    dice = {"ssd": [], "mind": []}
    for seed in split_seeds("test", 3):
        moving, fixed = phantom_pair(seed)
        for loss in dice:
            m = sf.register(moving, fixed, model="displacement", loss=loss, prealign=None, progress=False).metrics
            dice[loss].append(foreground(m["dice"]) - foreground(m["dice_before"]))
    assert np.mean(dice["mind"]) > 0.01 > np.mean(dice["ssd"]), dice


def test_pair_folder_serves_ordered_pairs_with_labels(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for seed in range(3):
        moving, _ = phantom_pair(seed, size=(32, 32))
        sf.write(moving, tmp_path / "images" / f"s{seed}.nii.gz")
        sf.write(moving.with_data(moving.labels[None].float()), tmp_path / "labels" / f"s{seed}.nii.gz")
    pairs = PairFolder(tmp_path)
    assert len(pairs) == 6
    seen = set()
    for k in range(6):
        moving, fixed = pairs.pair(k)
        assert moving.labels is not None and fixed.labels is not None and moving.source != fixed.source
        seen.add((moving.source, fixed.source))
    assert len(seen) == 6
    (tmp_path / "labels" / "s2.nii.gz").unlink()
    with pytest.raises(sf.ShapeflowError, match="no label map for s2.nii.gz"):
        PairFolder(tmp_path)
    with pytest.raises(sf.ShapeflowError, match="expected the subfolders images/ and labels/"):
        PairFolder(tmp_path / "images")
