"""Data terms between images: SSD, local NCC, MIND-SSC and soft Dice on label maps.

Functions do the work (`ncc_loss(moving, fixed)`); the `nn.Module` wrappers only hold options.
Images are `(C, *S)` with `S = (H, W)` in 2D or `(D, H, W)` in 3D, channels first and no batch
dimension (`ssd_loss` also takes `(B, C, *S)`; for the others map over a batch with
`torch.func.vmap`). Every loss returns a 0-d tensor, 0 for a perfect match, and is
differentiable in both images. Window sizes, radii and dilations are in voxels.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ShapeflowError
from ..kernels.exp import fast_exp

__all__ = ["ssd_loss", "ncc_loss", "mind_ssc", "mind_loss", "dice_loss", "one_hot", "box_mean", "mind_pairs",
           "SSDLoss", "NCCLoss", "MINDLoss", "DiceLoss", "IMAGE_LOSSES"]

Window = Union[int, Sequence[int]]

_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


# ----------------------------------------------------------------------------- checks


def _check_image(who: str, name: str, image: Tensor) -> None:
    if not isinstance(image, Tensor) or image.dim() not in (3, 4):
        got = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ShapeflowError(f"{who}(): {name} must be an image (C, H, W) or (C, D, H, W), got {got}")
    if not image.is_floating_point():
        raise ShapeflowError(f"{who}(): {name} must be floating point, got {image.dtype}")


def _check_pair(who: str, moving: Tensor, fixed: Tensor) -> None:
    _check_image(who, "moving", moving)
    _check_image(who, "fixed", fixed)
    if moving.shape != fixed.shape:
        raise ShapeflowError(f"{who}(): moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} "
                             "must have the same shape (resample one onto the other's grid first)")


def _window(who: str, window: Window, ndim: Optional[int]) -> tuple[int, ...]:
    """`window` as one odd size per spatial axis (`ndim` of them; any number when None)."""
    sizes = (window,) * (ndim or 1) if isinstance(window, int) else tuple(window)
    if (not sizes or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 or w % 2 == 0 for w in sizes)
            or (ndim is not None and len(sizes) != ndim)):
        raise ShapeflowError(f"{who}(): window must be an odd positive int or {ndim or 'd'} of them "
                             f"(one per spatial axis), got {window!r}")
    return sizes


def _check_int(who: str, name: str, value: int, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ShapeflowError(f"{who}(): {name} must be an int >= {low}, got {value!r}")


# ----------------------------------------------------------------------------- building blocks


def box_mean(x: Tensor, window: Window) -> Tensor:
    """Mean of `x: (C, *S)` over a box of `window` voxels (odd, per axis) centred at each voxel.

    Near the border the box is cut to the part inside the image (the mean of the voxels it still
    covers, no padding values); a window may exceed the image. Separable (the mean over a
    product of intervals is the product of the 1D means): one `avg_pool` per axis, so the cost
    is `sum(window)` rather than `prod(window)` per voxel. Returns `(C, *S)`, differentiable.
    """
    if not isinstance(x, Tensor) or x.dim() not in (2, 3, 4):
        raise ShapeflowError(f"box_mean(): x must be (C, *S) with 1 to 3 spatial axes, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    d = x.dim() - 1
    sizes = _window("box_mean", window, d)
    pool = _AVG_POOL[d]
    out = x.unsqueeze(0)                                                  # (1, C, *S)
    for axis, w in enumerate(sizes):
        if w == 1:
            continue
        n, r = x.shape[axis + 1], w // 2
        kernel = [1] * d
        kernel[axis] = w
        pad = [0] * (2 * d)                                   # F.pad lists the last axis first
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = r
        out = pool(F.pad(out, pad), kernel_size=kernel, stride=1)         # zero-padded sum / w
        # Rescale to the mean over the voxels the cut box covers: w / (number inside).
        i = torch.arange(n, device=x.device)
        inside = (i + r).clamp_max(n - 1) - (i - r).clamp_min(0) + 1
        shape = [1] * (d + 2)
        shape[axis + 2] = n
        out = out * (w / inside.to(out.dtype)).reshape(shape)
    return out[0]


def _spatial(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


# ----------------------------------------------------------------------------- intensity losses


def ssd_loss(moving: Tensor, fixed: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean squared difference `mean (moving - fixed)^2` over voxels and channels.

    moving, fixed: `(C, *S)` or `(B, C, *S)`, the same shape. mask (optional): boolean or
    non-negative weights broadcastable to that shape, e.g. `(*S)`, `(1, *S)` or `(C, *S)`; the
    loss is then the weighted mean `sum w (m - f)^2 / sum w`. Returns a 0-d tensor.
    """
    if not isinstance(moving, Tensor) or not isinstance(fixed, Tensor) or moving.dim() not in (3, 4, 5):
        raise ShapeflowError("ssd_loss(): moving and fixed must be tensors (C, *S) or (B, C, *S), got "
                             f"{getattr(moving, 'shape', type(moving).__name__)}")
    if moving.shape != fixed.shape:
        raise ShapeflowError(f"ssd_loss(): moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} "
                             "must have the same shape")
    squared = (moving - fixed).pow(2)
    if mask is None:
        return squared.mean()
    try:
        broadcast = torch.broadcast_shapes(mask.shape, moving.shape)
    except (AttributeError, RuntimeError):
        broadcast = None
    if broadcast != moving.shape:
        raise ShapeflowError(f"ssd_loss(): mask {tuple(getattr(mask, 'shape', ()))} must be a tensor that "
                             f"broadcasts to the image shape {tuple(moving.shape)}")
    weights = mask.to(squared.dtype).expand_as(squared)
    total = weights.sum()
    if not total > 0:
        raise ShapeflowError("ssd_loss(): mask selects no voxel (its weights sum to 0)")
    return (weights * squared).sum() / total


def ncc_loss(moving: Tensor, fixed: Tensor, *, window: Window = 9, eps: float = 1e-5) -> Tensor:
    """Local normalised cross-correlation loss `1 - mean_x NCC_x`, in [0, 2], 0 when equal.

    moving, fixed: `(C, *S)`; window: odd box size in voxels, one int or one per spatial axis.
    At every voxel x and channel, over the box around x (cut at the border, see `box_mean`):

        NCC_x = (cov + eps) / sqrt((var_moving + eps) * (var_fixed + eps))

    with the local (population) means, variances and covariance. `eps` (in squared intensity
    units; keep it small against the local variances) makes flat regions well defined: two flat
    patches give NCC 1, a flat against a structured one about 0. NCC is invariant to intensity
    maps `a * I + b` with a > 0 (up to eps); a < 0 gives -NCC. The mean runs over voxels and
    channels. Returns a 0-d tensor.
    """
    _check_pair("ncc_loss", moving, fixed)
    sizes = _window("ncc_loss", window, moving.dim() - 1)
    channels, axes = moving.shape[0], _spatial(moving)
    # Centre each channel first: the same NCC, but E[I^2] - E[I]^2 cancels far less in float32.
    m = moving - moving.mean(axes, keepdim=True)
    f = fixed - fixed.mean(axes, keepdim=True)
    stats = box_mean(torch.cat([m, f, m * m, f * f, m * f]), sizes)      # (5C, *S)
    mean_m, mean_f, mean_mm, mean_ff, mean_mf = stats.split(channels)
    var_m = (mean_mm - mean_m * mean_m).clamp_min(0)
    var_f = (mean_ff - mean_f * mean_f).clamp_min(0)
    cov = mean_mf - mean_m * mean_f
    ncc = (cov + eps) / torch.sqrt((var_m + eps) * (var_f + eps))      # (C, *S)
    return 1 - ncc.mean()


# ----------------------------------------------------------------------------- MIND-SSC


def mind_pairs(ndim: int, dilation: int = 1) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The offset pairs `(p, q)` of MIND-SSC in channel order: 12 in 3D, 4 in 2D.

    The neighbours are `-dilation * e_0, +dilation * e_0, -dilation * e_1, ...` (in that order)
    and the pairs are those two-element combinations of them, in `itertools.combinations`
    order, whose points lie `sqrt(2) * dilation` apart (neighbours on two different axes).
    """
    neighbours = []
    for axis in range(ndim):
        for sign in (-1, 1):
            offset = [0] * ndim
            offset[axis] = sign * dilation
            neighbours.append(tuple(offset))
    return [(p, q) for p, q in itertools.combinations(neighbours, 2)
            if sum((a - b) ** 2 for a, b in zip(p, q)) == 2 * dilation ** 2]


def _shifted(padded: Tensor, offset: Sequence[int], pad: int, size: Sequence[int]) -> Tensor:
    """`image[clamp(x + offset)]` for every x, read from the edge-replicated `padded: (1, *S + 2 pad)`."""
    index = tuple(slice(pad + o, pad + o + n) for o, n in zip(offset, size))
    return padded[(slice(None),) + index]


def mind_ssc(image: Tensor, *, radius: int = 1, dilation: int = 2) -> Tensor:
    """MIND with self-similarity context (Heinrich et al., MICCAI 2013) at every voxel.

    image: `(C, *S)`; a multi-channel image is first averaged over its channels. Returns
    `(12, *S)` in 3D and `(4, *S)` in 2D, values in (0, 1], the largest channel equal to 1.

    For each pair `(p, q)` of `mind_pairs(d, dilation)` (neighbours of the 6- or
    4-neighbourhood at distance `dilation` that lie `sqrt(2) * dilation` apart) the patch
    distance `D_pq(x)` is the mean of `(I(x + p + y) - I(x + q + y))^2` over the patch
    `|y|_inf <= radius` (`box_mean` of the squared difference of two shifted images; the image
    is edge-replicated beyond its border, the patch cut at it). Then, as in the reference
    implementations (Heinrich's C++ and PyTorch code),

        MIND_pq(x) = exp(-(D_pq(x) - min_pq D(x)) / V(x)),   V(x) = mean_pq (D_pq(x) - min D(x)),

    which is `exp(-D / V)` divided by its maximum over the channels. V is clamped to
    `[1e-3, 1e3]` times its mean over the image, so flat regions give 1 everywhere. The
    descriptor is unchanged by any intensity map `a * I + b`, a != 0 (contrast inversion
    included). Differentiable almost everywhere.
    """
    _check_image("mind_ssc", "image", image)
    _check_int("mind_ssc", "radius", radius, 0)
    _check_int("mind_ssc", "dilation", dilation, 1)
    size = image.shape[1:]
    d = len(size)
    mean = image.mean(0, keepdim=True)                                  # (1, *S)
    padded = F.pad(mean.unsqueeze(0), [dilation] * (2 * d), mode="replicate")[0]   # (1, *S + 2 dil)
    shifted = {}
    for offset in itertools.chain.from_iterable(mind_pairs(d, dilation)):
        if offset not in shifted:
            shifted[offset] = _shifted(padded, offset, dilation, size)
    squared = torch.cat([(shifted[p] - shifted[q]).pow(2) for p, q in mind_pairs(d, dilation)])
    distance = box_mean(squared, 2 * radius + 1)                        # (P, *S)
    distance = distance - distance.min(0, keepdim=True).values
    variance = distance.mean(0, keepdim=True)                            # (1, *S)
    level = variance.mean()
    variance = torch.clamp(variance, min=1e-3 * level, max=1e3 * level)
    variance = variance.clamp_min(torch.finfo(variance.dtype).tiny)
    return fast_exp(-distance / variance)


def mind_loss(moving: Tensor, fixed: Tensor, *, radius: int = 1, dilation: int = 2) -> Tensor:
    """Mean squared difference between the MIND-SSC descriptors of `moving` and `fixed`.

    moving, fixed: `(C, *S)`, possibly of different modalities. Returns a 0-d tensor,
    `mean((mind_ssc(moving) - mind_ssc(fixed))^2)` over descriptor channels and voxels.
    """
    _check_pair("mind_loss", moving, fixed)
    return (mind_ssc(moving, radius=radius, dilation=dilation)
            - mind_ssc(fixed, radius=radius, dilation=dilation)).pow(2).mean()


# ----------------------------------------------------------------------------- label maps


def one_hot(labels: Tensor, num_labels: Optional[int] = None, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot encoding of an integer label map `labels: (*S)` -> `(K, *S)` of `dtype`.

    Channel k is 1 where `labels == k`; label 0 is the background. K is `num_labels`, or
    `labels.max() + 1` when None.
    """
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise ShapeflowError("one_hot(): labels must be an integer tensor (*S), got "
                             f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}")
    if labels.numel() and int(labels.min()) < 0:
        raise ShapeflowError(f"one_hot(): labels must be >= 0, got {int(labels.min())}")
    largest = int(labels.max()) if labels.numel() else -1
    if num_labels is None:
        num_labels = largest + 1
    elif not isinstance(num_labels, int) or num_labels <= largest:
        raise ShapeflowError(f"one_hot(): num_labels must be an int > the largest label {largest}, "
                             f"got {num_labels!r}")
    return F.one_hot(labels.long(), num_labels).movedim(-1, 0).to(dtype)


def dice_loss(moving_onehot: Tensor, fixed_onehot: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Soft Dice loss `1 - mean_{k >= 1} Dice_k` over the foreground labels.

    moving_onehot, fixed_onehot: `(K, *S)`, K >= 2, one-hot or soft (probabilities), channel 0
    the background (left out of the mean). `Dice_k = (2 sum a_k b_k + eps) / (sum a_k + sum b_k
    + eps)`, so a label absent from both counts as a perfect match. Returns a 0-d tensor.
    """
    _check_pair("dice_loss", moving_onehot, fixed_onehot)
    if moving_onehot.shape[0] < 2:
        raise ShapeflowError("dice_loss(): needs K >= 2 channels (background and at least one label), "
                             f"got {tuple(moving_onehot.shape)}")
    axes = _spatial(moving_onehot)
    overlap = (moving_onehot * fixed_onehot).sum(axes)                  # (K,)
    total = moving_onehot.sum(axes) + fixed_onehot.sum(axes)            # (K,)
    dice = (2 * overlap + eps) / (total + eps)
    return 1 - dice[1:].mean()


# ----------------------------------------------------------------------------- modules


class SSDLoss(nn.Module):
    """`ssd_loss` as a module: `(moving, fixed, mask=None) -> 0-d`. Mono-modal."""

    def forward(self, moving: Tensor, fixed: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return ssd_loss(moving, fixed, mask)


class NCCLoss(nn.Module):
    """`ncc_loss` as a module holding `window` and `eps`. Mono-modal, robust to intensity scaling."""

    def __init__(self, *, window: Window = 9, eps: float = 1e-5):
        super().__init__()
        _window("NCCLoss", window, None)
        self.window = window if isinstance(window, int) else tuple(window)
        self.eps = eps

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        return ncc_loss(moving, fixed, window=self.window, eps=self.eps)

    def extra_repr(self) -> str:
        return f"window={self.window}, eps={self.eps}"


class MINDLoss(nn.Module):
    """`mind_loss` as a module holding `radius` and `dilation`. Multi-modal."""

    def __init__(self, *, radius: int = 1, dilation: int = 2):
        super().__init__()
        _check_int("MINDLoss", "radius", radius, 0)
        _check_int("MINDLoss", "dilation", dilation, 1)
        self.radius, self.dilation = radius, dilation

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        return mind_loss(moving, fixed, radius=self.radius, dilation=self.dilation)

    def extra_repr(self) -> str:
        return f"radius={self.radius}, dilation={self.dilation}"


class DiceLoss(nn.Module):
    """`dice_loss` as a module holding `eps`: `(moving_onehot, fixed_onehot) -> 0-d`."""

    def __init__(self, *, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, moving_onehot: Tensor, fixed_onehot: Tensor) -> Tensor:
        return dice_loss(moving_onehot, fixed_onehot, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


IMAGE_LOSSES = {"ssd": SSDLoss, "ncc": NCCLoss, "mind": MINDLoss}
