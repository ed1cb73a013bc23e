"""What a Gauss-Newton image registration takes its residual on: `r = F(warped) - F(fixed)`.

Each image `loss=` is an `ImageResidual` class with its own options (`Options`, the `register()`
options only it reads):

* "ssd": the intensities themselves.
* "ncc": locally normalised intensities. For a window of n voxels with zero-mean, unit-variance
  contents a and b, `1 - NCC = |a - b|^2 / (2 n)`, so the residual is the difference of the
  locally normalised images `N(I) = (I - mean_w I) / sqrt(var_w I + eps)` (box window of
  `2 ncc_radius + 1` voxels per axis, cut at the border; `eps = ncc_eps * var(I)` over the whole
  image), times the fixed image's standard deviation (so the residual is in intensity units and
  `regularization` means about what it means for "ssd"). N is recomputed on the warped moving
  image at every evaluation (`after_warp`). Two approximations, both standard: each voxel is
  normalised by the statistics of its own window, and the Jacobian treats N as pointwise,
  `d N(warped)(x) / d u(x) ~ grad N(warped)(x)` (exact when warping commutes with normalisation,
  e.g. for translations). The local NCC itself is reported per step (`score`).
* "mind": MIND-SSC self-similarity features (multi-modal).
* "learned": the features of a trained network (`learned.py`; the networks are in `shapeflow.learn`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from .._registry import Registry
from ..errors import ShapeflowError
from .images import box_mean, mind_ssc, ncc_loss

__all__ = ["ImageResidual", "SSDResidual", "NCCResidual", "MINDResidual", "RESIDUALS", "local_normalise"]


class ImageResidual:
    """One image `loss=`: what the Gauss-Newton residual `r = F(warped) - F(fixed)` is taken on.

    `features(image (C, *S), role) -> (C', *S)` is applied once per pyramid level to both images
    (`role` "fixed" or "moving") before warping (the moving features are then resampled, which is
    exact for intensities).
    `after_warp(fixed features)` returns None, or a map `(C', *S) -> (C', *S)` applied to the fixed
    features once and to the warped moving features at every evaluation (for maps that do not
    commute with warping, such as local normalisation); the spatial gradient of its output is
    the Jacobian. `score` (with `score_name`) is a similarity reported per step and before/after.
    """

    #: moving and fixed must have the same number of channels
    same_channels: ClassVar[bool] = True
    #: True: `features` runs once on the full-resolution images and the pyramid is built from the
    #: features (a network trained at one resolution); False: on each pyramid level's images
    features_before_pyramid: ClassVar[bool] = False
    #: the name under which `score` is reported (`history[name]`, `metrics[name + "_before"/"_after"]`)
    score_name: ClassVar[str | None] = None

    @dataclass
    class Options:
        """The `register()` options this residual reads (none by default)."""

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def features(self, image: torch.Tensor, role: str = "fixed") -> torch.Tensor:
        """(C, *S) -> (C', *S); the identity by default. `role` ("fixed" or "moving") says which
        image it is, for features that differ by image (a learned network's modality branch);
        the hand-crafted ones ignore it."""
        return image

    def after_warp(self, fixed: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """None, or a map applied to the fixed features and to every warped moving feature image."""
        return None

    def score(self, warped: torch.Tensor, fixed: torch.Tensor) -> float:
        """A similarity of warped and fixed images (C, *S) (only when `score_name` is set)."""
        raise NotImplementedError


class SSDResidual(ImageResidual):
    """The intensities: sum of squared differences (mono-modal)."""


def local_normalise(image: torch.Tensor, radius: int = 2, eps: float = 1e-2) -> torch.Tensor:
    """`N(I) = (I - mean_w I) / sqrt(var_w I + eps var(I))` per channel: the local NCC residual's images.

    image: (C, *S); mean_w and var_w (population) over the box of `2 radius + 1` voxels per axis
    centred at each voxel, cut at the border (`shapeflow.losses.images.box_mean`); var(I) is the
    channel's variance over the whole image, so N is unchanged by any map `a I + b`, a > 0, and
    flat regions give about 0 rather than amplified noise. Returns (C, *S).
    """
    axes = tuple(range(1, image.dim()))
    centred = image - image.mean(axes, keepdim=True)          # less cancellation in E[I^2] - E[I]^2
    floor = eps * centred.square().mean(axes, keepdim=True).clamp_min(torch.finfo(image.dtype).tiny)
    mean, mean_square = box_mean(torch.cat([centred, centred * centred]), 2 * radius + 1).chunk(2)
    variance = (mean_square - mean * mean).clamp_min(0)
    return (centred - mean) / torch.sqrt(variance + floor)


class NCCResidual(ImageResidual):
    """Locally normalised intensities: local NCC (robust to smooth bias fields and contrast changes)."""

    score_name = "ncc"

    @dataclass
    class Options:
        ncc_radius: int = 2              # window of 2 r + 1 voxels per axis (ANTs' CC radius)
        ncc_eps: float = 1e-2            # variance floor, relative to the image's variance

        def __post_init__(self):
            if not isinstance(self.ncc_radius, int) or isinstance(self.ncc_radius, bool) or self.ncc_radius < 1:
                raise ShapeflowError(f"register(): ncc_radius must be an int >= 1 (voxels), got {self.ncc_radius!r}")
            if not (isinstance(self.ncc_eps, (int, float)) and self.ncc_eps > 0):
                raise ShapeflowError(f"register(): ncc_eps must be a number > 0, got {self.ncc_eps!r}")

    def after_warp(self, fixed: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """`I -> std(fixed) N(I)` per channel: locally normalised, in the fixed image's intensity
        units (so `regularization` means about the same as for "ssd"). fixed: (C, *S)."""
        scale = fixed.std(tuple(range(1, fixed.dim())), keepdim=True)                  # (C, 1, ...)
        radius, eps = self.options.ncc_radius, self.options.ncc_eps
        return lambda image: scale * local_normalise(image, radius, eps)

    def score(self, warped: torch.Tensor, fixed: torch.Tensor) -> float:
        return 1.0 - float(ncc_loss(warped, fixed, window=2 * self.options.ncc_radius + 1))


class MINDResidual(ImageResidual):
    """MIND-SSC features of the channel mean: multi-modal."""

    same_channels = False

    def features(self, image: torch.Tensor, role: str = "fixed") -> torch.Tensor:
        return mind_ssc(image.mean(0, keepdim=True))


#: the image `loss=` names
RESIDUALS: Registry[type[ImageResidual]] = Registry("image loss", {"ssd": SSDResidual, "ncc": NCCResidual,
                                                                   "mind": MINDResidual})
