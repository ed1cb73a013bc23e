"""Image data terms against independent references: loops over windows, closed forms, gradcheck."""
import itertools
import math

import numpy as np
import pytest
import torch

from shapeflow.errors import ShapeflowError
from shapeflow.losses.images import (IMAGE_LOSSES, DiceLoss, MINDLoss, NCCLoss, SSDLoss, box_mean, dice_loss,
                                     mind_loss, mind_pairs, mind_ssc, ncc_loss, one_hot, ssd_loss)


def clamped_box(index, shape, window):
    """The voxels of the box `window` around `index`, cut at the border (brute force)."""
    ranges = [range(max(0, i - w // 2), min(n, i + w // 2 + 1)) for i, n, w in zip(index, shape, window)]
    return list(itertools.product(*ranges))


# ----------------------------------------------------------------------------- box mean, SSD


@pytest.mark.parametrize("shape, window", [((6, 7), (3, 5)), ((4, 5, 6), (3, 1, 5)), ((3, 4, 2), (9, 9, 9))])
def test_box_mean_matches_loops(shape, window):
    x = torch.rand(2, *shape, dtype=torch.float64)
    expected = torch.zeros_like(x)
    for c in range(2):
        for index in np.ndindex(*shape):
            expected[(c, *index)] = torch.stack([x[(c, *v)] for v in clamped_box(index, shape, window)]).mean()
    torch.testing.assert_close(box_mean(x, window), expected)


def test_ssd_closed_form_and_mask():
    moving, fixed = torch.rand(2, 5, 6, 7), torch.rand(2, 5, 6, 7)
    torch.testing.assert_close(ssd_loss(moving, fixed), ((moving - fixed) ** 2).sum() / moving.numel())
    mask = torch.rand(5, 6, 7) > 0.5                       # (*S), shared by the channels
    expected = ((moving - fixed) ** 2)[:, mask].sum() / (2 * mask.sum())
    torch.testing.assert_close(ssd_loss(moving, fixed, mask), expected)
    weights = torch.rand(1, 5, 6, 7)
    expected = (weights * (moving - fixed) ** 2).sum() / (2 * weights.sum())
    torch.testing.assert_close(SSDLoss()(moving, fixed, weights), expected)
    batch = torch.rand(3, 2, 5, 6, 7)                      # (B, C, *S) is just a larger mean
    torch.testing.assert_close(ssd_loss(batch, 0 * batch), (batch ** 2).mean())
    with pytest.raises(ShapeflowError, match="ssd_loss.*mask"):
        ssd_loss(moving, fixed, torch.ones(4, 6, 7))
    with pytest.raises(ShapeflowError, match="ssd_loss.*selects no voxel"):
        ssd_loss(moving, fixed, torch.zeros(5, 6, 7, dtype=torch.bool))


# ----------------------------------------------------------------------------- NCC


def brute_force_ncc_loss(moving, fixed, window, eps):
    """1 - mean of the local NCC, each voxel's statistics taken over its own box by a loop."""
    m, f = moving.double().numpy(), fixed.double().numpy()
    values = []
    for c in range(m.shape[0]):
        for index in np.ndindex(*m.shape[1:]):
            box = tuple(np.array(clamped_box(index, m.shape[1:], window)).T)
            a, b = m[c][box], f[c][box]
            cov = ((a - a.mean()) * (b - b.mean())).mean()
            values.append((cov + eps) / math.sqrt((a.var() + eps) * (b.var() + eps)))
    return 1 - float(np.mean(values))


@pytest.mark.parametrize("shape, window", [((1, 7, 8), 5), ((2, 6, 5), (3, 5)), ((1, 4, 5, 6), 3)])
def test_ncc_matches_brute_force_windows(shape, window):
    moving, fixed = torch.rand(shape, dtype=torch.float64), torch.rand(shape, dtype=torch.float64)
    fixed = fixed + 0.5 * moving                            # correlated, so NCC is far from 0
    sizes = (window,) * (len(shape) - 1) if isinstance(window, int) else window
    expected = brute_force_ncc_loss(moving, fixed, sizes, 1e-5)
    assert float(ncc_loss(moving, fixed, window=window, eps=1e-5)) == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("shape", [(1, 5, 6), (1, 3, 4, 5)])
def test_ncc_gradcheck(shape):
    moving = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    fixed = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, f: ncc_loss(m, f, window=3), (moving, fixed))


def test_ncc_is_invariant_to_affine_intensity_maps():
    moving = torch.rand(1, 8, 9, 10)
    fixed = moving + 0.3 * torch.rand(1, 8, 9, 10)
    loss = ncc_loss(moving, fixed, window=5)
    assert 0.01 < float(loss) < 1
    torch.testing.assert_close(ncc_loss(3.0 * moving + 7.0, 0.5 * fixed - 2.0, window=5), loss, atol=2e-4, rtol=0)
    assert float(ncc_loss(moving, 2.0 * moving + 1.0, window=5)) == pytest.approx(0, abs=1e-4)
    assert float(ncc_loss(moving, 1.0 - moving, window=5)) == pytest.approx(2, abs=1e-3)   # a < 0: -NCC
    flat = torch.zeros(1, 8, 9, 10)
    assert float(ncc_loss(flat, flat)) == pytest.approx(0, abs=1e-6)   # flat regions are defined


def test_ncc_maps_over_a_batch_with_vmap():
    moving, fixed = torch.rand(3, 1, 6, 7), torch.rand(3, 1, 6, 7)
    batched = torch.func.vmap(lambda m, f: ncc_loss(m, f, window=3))(moving, fixed)
    torch.testing.assert_close(batched, torch.stack([ncc_loss(m, f, window=3) for m, f in zip(moving, fixed)]))


# ----------------------------------------------------------------------------- MIND-SSC


def slow_mind(image, radius, dilation):
    """MIND-SSC by explicit loops: edge-clamped reads, patches cut at the border, pairs of
    axis neighbours sqrt(2) * dilation apart in `itertools.combinations` order."""
    img = image.double().numpy().mean(0)
    shape, d = img.shape, img.ndim
    neighbours = [tuple(sign * dilation * (axis == k) for k in range(d)) for axis in range(d) for sign in (-1, 1)]
    pairs = [(p, q) for p, q in itertools.combinations(neighbours, 2)
             if np.sum((np.array(p) - np.array(q)) ** 2) == 2 * dilation ** 2]

    def at(z):
        return img[tuple(min(max(i, 0), n - 1) for i, n in zip(z, shape))]

    distance = np.zeros((len(pairs),) + shape)
    for x in np.ndindex(*shape):
        for c, (p, q) in enumerate(pairs):
            values = []
            for y in itertools.product(range(-radius, radius + 1), repeat=d):
                z = [i + j for i, j in zip(x, y)]
                if all(0 <= i < n for i, n in zip(z, shape)):
                    values.append((at([a + b for a, b in zip(z, p)]) - at([a + b for a, b in zip(z, q)])) ** 2)
            distance[(c, *x)] = np.mean(values)
    distance -= distance.min(0)
    variance = distance.mean(0)
    variance = np.clip(variance, 1e-3 * variance.mean(), 1e3 * variance.mean())
    return torch.from_numpy(np.exp(-distance / variance))


@pytest.mark.parametrize("shape, radius, dilation", [((1, 4, 5, 6), 1, 1), ((1, 5, 4, 6), 1, 2),
                                                     ((2, 7, 8), 2, 2), ((1, 6, 5), 0, 1)])
def test_mind_ssc_matches_slow_loops(shape, radius, dilation):
    image = torch.rand(shape, dtype=torch.float64)
    descriptor = mind_ssc(image, radius=radius, dilation=dilation)
    assert descriptor.shape == ((12,) if len(shape) == 4 else (4,)) + shape[1:]
    torch.testing.assert_close(descriptor, slow_mind(image, radius, dilation))


def test_mind_pairs_are_the_orthogonal_neighbour_pairs():
    for d, count in ((2, 4), (3, 12)):
        pairs = mind_pairs(d, 3)
        assert len(pairs) == count and len(set(pairs)) == count
        for p, q in pairs:
            assert sorted(map(abs, p)) == sorted(map(abs, q)) == [0] * (d - 1) + [3]
            assert math.dist(p, q) == pytest.approx(3 * math.sqrt(2))


def test_mind_ssc_range_and_affine_invariance():
    image = torch.rand(1, 10, 11, 12)
    descriptor = mind_ssc(image)
    assert descriptor.shape == (12, 10, 11, 12)
    assert float(descriptor.min()) > 0 and float(descriptor.max()) <= 1
    torch.testing.assert_close(descriptor.max(0).values, torch.ones(10, 11, 12))   # normalised by the max
    for a, b in ((4.0, -3.0), (0.01, 0.3), (250.0, 0.5)):
        torch.testing.assert_close(mind_ssc(a * image + b), descriptor, atol=1e-4, rtol=0)
    image = image.double()                                       # b >> a: exact in float64
    torch.testing.assert_close(mind_ssc(1e-3 * image + 100.0), mind_ssc(image), atol=1e-9, rtol=0)
    torch.testing.assert_close(mind_ssc(torch.full((1, 5, 6, 7), 3.0)), torch.ones(12, 5, 6, 7))   # flat


def phantom(noise, generator):
    """A CT-like 3D phantom (air, soft tissue, bone; Hounsfield-like values) and its class map."""
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, 20)] * 3, indexing="ij")
    classes = torch.zeros(20, 20, 20, dtype=torch.long)
    classes[(z / 0.8) ** 2 + (y / 0.9) ** 2 + (x / 0.7) ** 2 < 1] = 1            # body
    classes[(z - 0.2) ** 2 + (y + 0.1) ** 2 + (x - 0.1) ** 2 < 0.3 ** 2] = 2    # bone
    hu = torch.tensor([-1000.0, 40.0, 700.0])[classes]
    return (hu + noise * torch.randn(hu.shape, generator=generator))[None], classes


def test_mind_ssc_is_modality_independent_in_structured_regions():
    generator = torch.Generator().manual_seed(1)
    ct, classes = phantom(10.0, generator)
    inverted, _ = phantom(10.0, generator)
    inverted = 1500.0 - 1.3 * inverted                        # contrast inverted, independent noise
    mind_ct, mind_inv = mind_ssc(ct), mind_ssc(inverted)
    # Structured: the voxel's whole reach (dilation + radius = 3) sees an edge between classes.
    edge = torch.nn.functional.max_pool3d(classes[None, None].double(), 7, 1, 3)[0, 0] \
        != -torch.nn.functional.max_pool3d(-classes[None, None].double(), 7, 1, 3)[0, 0]
    gradient = torch.stack(torch.gradient(classes.double())).abs().sum(0) > 0    # on the edge itself
    assert gradient.sum() > 500
    difference = (mind_ct - mind_inv).abs()                   # (12, *S)
    assert float(difference[:, gradient].mean()) < 0.05
    assert float(difference[:, ~edge].mean()) > 0.1           # flat regions only hold noise
    other = mind_ssc(torch.randn(1, 20, 20, 20))
    assert float((mind_ct - other).abs()[:, gradient].mean()) > 0.2
    # The losses: MIND prefers the aligned pair (noise aside) where NCC sees opposites.
    assert float(mind_loss(ct, inverted)) < 0.5 * float(mind_loss(ct, torch.roll(inverted, 3, 1)))
    assert float(ncc_loss(ct, inverted)) > 1


def test_mind_ssc_is_exact_on_two_class_neighbourhoods_under_any_class_remapping():
    _, classes = phantom(0.0, None)
    ct = torch.tensor([-1000.0, 40.0, 700.0])[classes][None].double()
    mr = torch.tensor([10.0, 600.0, 150.0])[classes][None].double()   # T1-like ordering, not monotone
    reach = 2 * (2 + 1) + 1
    present = torch.stack([torch.nn.functional.max_pool3d((classes == k)[None, None].double(), reach, 1, reach // 2)
                           for k in range(3)]).sum(0)[0, 0]
    two = present == 2
    assert two.sum() > 1000
    torch.testing.assert_close(mind_ssc(ct)[:, two], mind_ssc(mr)[:, two])


@pytest.mark.parametrize("shape, dilation", [((1, 5, 6), 1), ((1, 3, 4, 5), 1)])
def test_mind_loss_gradcheck(shape, dilation):
    moving = torch.rand(shape, dtype=torch.float64, requires_grad=True)
    fixed = torch.rand(shape, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m: mind_loss(m, fixed, radius=1, dilation=dilation), (moving,))


def test_mind_loss_is_the_mean_squared_descriptor_difference():
    moving, fixed = torch.rand(2, 6, 7, 8), torch.rand(2, 6, 7, 8)
    expected = ((mind_ssc(moving, radius=2, dilation=1) - mind_ssc(fixed, radius=2, dilation=1)) ** 2).mean()
    torch.testing.assert_close(mind_loss(moving, fixed, radius=2, dilation=1), expected)
    torch.testing.assert_close(MINDLoss(radius=2, dilation=1)(moving, fixed), expected)
    # A multi-channel image is described through its channel mean.
    torch.testing.assert_close(mind_ssc(moving), mind_ssc(moving.mean(0, keepdim=True)))


# ----------------------------------------------------------------------------- labels, Dice


def test_one_hot_matches_comparisons():
    labels = torch.randint(0, 4, (5, 6, 7))
    encoded = one_hot(labels)
    assert encoded.shape == (4, 5, 6, 7) and encoded.dtype == torch.float32
    for k in range(4):
        assert torch.equal(encoded[k], (labels == k).float())
    assert one_hot(labels, 6).shape == (6, 5, 6, 7)
    with pytest.raises(ShapeflowError, match="one_hot.*num_labels"):
        one_hot(labels, 3)
    with pytest.raises(ShapeflowError, match="one_hot.*integer"):
        one_hot(labels.float())
    with pytest.raises(ShapeflowError, match="one_hot.*>= 0"):
        one_hot(labels - 1)


def test_dice_loss_closed_form_and_gradcheck():
    a, b = torch.zeros(3, 4, 5), torch.zeros(3, 4, 5)          # K = 3 labels on a 4 x 5 grid
    a[1, :2], b[1, :1] = 1, 1                                    # 10 vs 5 voxels, 5 shared
    a[2, 3, :2], b[2, 2, :] = 1, 1                               # 2 vs 5, none shared
    a[0], b[0] = 1 - a[1:].sum(0), 1 - b[1:].sum(0)
    expected = 1 - (2 * 5 / 15 + 0) / 2
    torch.testing.assert_close(dice_loss(a, b, eps=0.0), torch.tensor(expected))
    torch.testing.assert_close(DiceLoss(eps=0.0)(a, b), torch.tensor(expected))
    labels = torch.randint(0, 3, (6, 7))
    assert float(dice_loss(one_hot(labels, 4), one_hot(labels, 4))) == pytest.approx(0, abs=1e-6)  # 3 absent
    soft_a = torch.rand(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    soft_b = torch.rand(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dice_loss, (soft_a, soft_b))


# ----------------------------------------------------------------------------- modules, registry, errors


def test_modules_hold_options_and_match_the_functions():
    moving, fixed = torch.rand(1, 6, 7, 8), torch.rand(1, 6, 7, 8)
    assert set(IMAGE_LOSSES) == {"ssd", "ncc", "mind"}
    torch.testing.assert_close(IMAGE_LOSSES["ssd"]()(moving, fixed), ssd_loss(moving, fixed))
    torch.testing.assert_close(IMAGE_LOSSES["ncc"](window=5)(moving, fixed), ncc_loss(moving, fixed, window=5))
    torch.testing.assert_close(IMAGE_LOSSES["mind"]()(moving, fixed), mind_loss(moving, fixed))
    assert NCCLoss(window=[3, 5, 7]).window == (3, 5, 7)
    with pytest.raises(ShapeflowError, match="NCCLoss.*window"):
        NCCLoss(window=4)
    with pytest.raises(ShapeflowError, match="MINDLoss.*dilation"):
        MINDLoss(dilation=0)
    with pytest.raises(TypeError):
        NCCLoss(5)                                               # options are keyword-only


def test_errors_name_the_function_and_argument():
    image = torch.rand(1, 6, 7)
    with pytest.raises(ShapeflowError, match=r"ncc_loss\(\): moving .* and fixed .* same shape"):
        ncc_loss(image, torch.rand(1, 6, 8))
    with pytest.raises(ShapeflowError, match=r"ncc_loss\(\): window"):
        ncc_loss(image, image, window=(3, 3, 3))
    with pytest.raises(ShapeflowError, match=r"mind_ssc\(\): image"):
        mind_ssc(torch.rand(6, 7))
    with pytest.raises(ShapeflowError, match=r"mind_ssc\(\): radius"):
        mind_ssc(image, radius=-1)
    with pytest.raises(ShapeflowError, match=r"dice_loss\(\): needs K >= 2"):
        dice_loss(torch.rand(1, 4, 4), torch.rand(1, 4, 4))
