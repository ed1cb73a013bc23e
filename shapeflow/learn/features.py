"""Networks trained through the solver: SUITS features, LearnGN's gradient/residual CNN, a DIO UNet.

Every network is `Net(dim, **hyper)` (dim 2 or 3, small defaults: 2D phantoms of 96 x 96 train on
two CPU cores in minutes), has `.dim`, `.config()` (`{"name", "dim", **hyper}`, JSON-able;
`Net(**config minus name)` rebuilds it) and `.kind`, and is registered by name in
`FEATURE_NETWORKS` (the registry lives in `shapeflow.losses.learned`, below the pipelines, so
that `loss="learned"` can load saved networks; see that module). Save and load them with
`save_features(path, net, extra)` / `load_features(path) -> (net, info)` (tensors + JSON, read
with `weights_only=True`).

* "suits" (`SuitsNet`, Blendowski et al., SUITS, Table 1): a Y-shaped CNN. One first block per
  modality (conv 5, dilation 2, then conv 3; `width` and `2 width` channels), a shared rest
  (conv 3 stride 2, conv 3, conv 3 to `out_channels`), instance norm and ReLU between, a sigmoid
  at the end; the half-resolution output is upsampled (bi/trilinear) to the input size.
* "unet" (`UNetFeatures`, DIO): a small multi-scale UNet (`depth` poolings, `width * 2^k`
  channels, skip connections), one input convolution per modality, a 1 x 1 head to
  `out_channels`, sigmoid.
* "learngn" (`LearnGNNet`, LearnGN): a compact CNN on (warped, fixed, their hand-crafted
  gradient and residual) that predicts corrections to the gradient (d channels) and residual
  (1 channel) of the Gauss-Newton system. Its last layer starts at zero, so an untrained network
  gives exactly the hand-crafted `spatial_gradient(warped)` and `warped - fixed`.

Scaling of the features (suits, unet): the input is standardised per image and channel (zero
mean, unit variance: the z-transform SUITS applies to its inputs, so the pipeline's intensity
rescaling or a contrast change does not matter), and the output passes a sigmoid, so features
lie in (0, 1) like MIND-SSC's: the Gauss-Newton residual has the scale of `loss="mind"`'s and
the same `regularization` values apply.

`pretrain_mind(net, images, steps)` regresses a SuitsNet (or UNet) to MIND-SSC descriptors (L1,
Adam, as SUITS pre-trains its FeatCNN): the targets are `mind_ssc` at dilation 2 (what
`loss="mind"` uses), then 1, 3, 4, ... concatenated up to `out_channels` (3D, 12 channels: exactly
MIND-SSC; 2D, 12 channels: MIND-SSC at dilations 2, 1 and 3).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeflowError
from ..losses import mind_ssc
from ..losses.learned import FEATURE_NETWORKS, build_features, load_features, save_features

__all__ = ["FEATURE_NETWORKS", "SuitsNet", "UNetFeatures", "LearnGNNet", "build_features", "pretrain_mind",
           "mind_targets", "save_features", "load_features", "standardise", "central_gradient"]


def _conv(dim: int):
    return nn.Conv2d if dim == 2 else nn.Conv3d


class _InstanceNorm(nn.Module):
    """Instance norm with a learned scale and shift per channel (as `nn.InstanceNorm2d/3d(affine=True)`),
    that also takes a single voxel (torch's refuses one; coarse pyramid levels of tiny images give it)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return standardise(x, self.eps) * self.weight.view(shape) + self.bias.view(shape)


def _norm(dim: int, channels: int) -> nn.Module:
    return _InstanceNorm(channels)


def _check_dim(who: str, dim: Any) -> None:
    if dim not in (2, 3) or isinstance(dim, bool):
        raise ShapeflowError(f"{who}: dim must be 2 or 3, got {dim!r}")


def _check_positive(who: str, **values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ShapeflowError(f"{who}: {name} must be an int >= 1, got {value!r}")


def _check_input(net: nn.Module, image: torch.Tensor, name: str = "image") -> None:
    """A one-line error for an input that is not `(B, in_channels, *S)` with `net.dim` axes."""
    if image.dim() != net.dim + 2 or image.shape[1] != net.in_channels:
        raise ShapeflowError(f"{type(net).__name__}(): {name} must be (B, {net.in_channels}, "
                             f"{', '.join('S' + str(i) for i in range(net.dim))}), got {tuple(image.shape)}")


def standardise(image: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(B, C, *S) -> the same, zero mean and unit variance per image and channel."""
    axes = tuple(range(2, image.dim()))
    centred = image - image.mean(axes, keepdim=True)
    return centred / torch.sqrt(centred.square().mean(axes, keepdim=True) + eps)


def _check_modality(net: nn.Module, modality: Any) -> None:
    if not isinstance(modality, int) or isinstance(modality, bool) or not 0 <= modality < net.modalities:
        raise ShapeflowError(f"{type(net).__name__}(): modality must be an int in 0..{net.modalities - 1}, "
                             f"got {modality!r}")


class _Block(nn.Sequential):
    """conv -> instance norm -> ReLU."""

    def __init__(self, dim: int, cin: int, cout: int, kernel: int = 3, dilation: int = 1, stride: int = 1):
        super().__init__(_conv(dim)(cin, cout, kernel, stride=stride, padding=dilation * (kernel - 1) // 2,
                                    dilation=dilation),
                         _norm(dim, cout), nn.ReLU(inplace=True))


@FEATURE_NETWORKS.add("suits")
class SuitsNet(nn.Module):
    """SUITS's Y-shaped feature CNN: `forward(image (B, C, *S), modality) -> (B, out_channels, *S)`.

    Layers (SUITS Table 1, with `width` = 16 as there): per modality conv 5 x 5 (dilation 2) to
    `width`, conv 3 to `2 width`; shared: conv 3 stride 2, conv 3 (both `2 width`), conv 3 to
    `out_channels`; instance norm + ReLU after all but the last, a sigmoid after it; upsampled
    back to the input size. Input standardised per image and channel; features in (0, 1).
    """

    kind = "features"

    def __init__(self, dim: int, *, in_channels: int = 1, out_channels: int = 12, modalities: int = 2,
                 width: int = 16):
        super().__init__()
        _check_dim("SuitsNet()", dim)
        _check_positive("SuitsNet()", in_channels=in_channels, out_channels=out_channels, modalities=modalities,
                        width=width)
        self.dim, self.in_channels, self.out_channels = dim, in_channels, out_channels
        self.modalities, self.width = modalities, width
        self.first = nn.ModuleList(nn.Sequential(_Block(dim, in_channels, width, kernel=5, dilation=2),
                                                 _Block(dim, width, 2 * width)) for _ in range(modalities))
        self.shared = nn.Sequential(_Block(dim, 2 * width, 2 * width, stride=2), _Block(dim, 2 * width, 2 * width),
                                    _conv(dim)(2 * width, out_channels, 3, padding=1))

    def config(self) -> dict[str, Any]:
        return {"name": "suits", "dim": self.dim, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "modalities": self.modalities, "width": self.width}

    def forward(self, image: torch.Tensor, modality: int = 0) -> torch.Tensor:
        """image: (B, in_channels, *S) -> features (B, out_channels, *S) in (0, 1)."""
        _check_input(self, image)
        _check_modality(self, modality)
        out = self.shared(self.first[modality](standardise(image)))
        out = F.interpolate(out, size=image.shape[2:], mode="bilinear" if self.dim == 2 else "trilinear",
                            align_corners=False)
        return torch.sigmoid(out)


@FEATURE_NETWORKS.add("unet")
class UNetFeatures(nn.Module):
    """A small multi-scale UNet (DIO's feature network): `forward(image (B, C, *S), modality)
    -> (B, out_channels, *S)`.

    One input block per modality (`modalities`, default 2; with 1 the same block serves every
    image) to `width` channels, then `depth` times (average pooling by 2, two conv blocks
    doubling the channels), and back up (bi/trilinear upsampling to the skip's size,
    concatenation, two conv blocks), a 1 x 1 head to `out_channels`, sigmoid. Input standardised
    per image and channel; features in (0, 1).
    """

    kind = "features"

    def __init__(self, dim: int, *, in_channels: int = 1, out_channels: int = 12, modalities: int = 2,
                 width: int = 16, depth: int = 2):
        super().__init__()
        _check_dim("UNetFeatures()", dim)
        _check_positive("UNetFeatures()", in_channels=in_channels, out_channels=out_channels, modalities=modalities,
                        width=width, depth=depth)
        self.dim, self.in_channels, self.out_channels = dim, in_channels, out_channels
        self.modalities, self.width, self.depth = modalities, width, depth
        self.stem = nn.ModuleList(_Block(dim, in_channels, width) for _ in range(modalities))
        sizes = [width * 2 ** k for k in range(depth + 1)]
        self.down = nn.ModuleList(nn.Sequential(_Block(dim, sizes[k], sizes[k + 1]),
                                                _Block(dim, sizes[k + 1], sizes[k + 1])) for k in range(depth))
        self.up = nn.ModuleList(nn.Sequential(_Block(dim, sizes[k + 1] + sizes[k], sizes[k]),
                                              _Block(dim, sizes[k], sizes[k])) for k in range(depth))
        self.head = _conv(dim)(width, out_channels, 1)

    def config(self) -> dict[str, Any]:
        return {"name": "unet", "dim": self.dim, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "modalities": self.modalities, "width": self.width, "depth": self.depth}

    def forward(self, image: torch.Tensor, modality: int = 0) -> torch.Tensor:
        """image: (B, in_channels, *S) -> features (B, out_channels, *S) in (0, 1)."""
        _check_input(self, image)
        _check_modality(self, modality)
        pool = F.avg_pool2d if self.dim == 2 else F.avg_pool3d
        mode = "bilinear" if self.dim == 2 else "trilinear"
        skips = [self.stem[modality](standardise(image))]
        for block in self.down:
            window = [min(2, n) for n in skips[-1].shape[2:]]       # an axis of one voxel stays one
            skips.append(block(pool(skips[-1], window, window, ceil_mode=True)))
        out = skips.pop()
        for block in reversed(self.up):
            skip = skips.pop()
            out = block(torch.cat([F.interpolate(out, size=skip.shape[2:], mode=mode, align_corners=False), skip], 1))
        return torch.sigmoid(self.head(out))


def central_gradient(image: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """(B, *S) -> (B, d, *S): central differences (one-sided at the border, as
    `shapeflow.grids.spatial_gradient`), per axis divided by `spacing` (default 1: voxel units)."""
    d = image.dim() - 1
    spacing = [1.0] * d if spacing is None else [float(s) for s in spacing]
    return torch.stack(torch.gradient(image, dim=list(range(1, d + 1)), spacing=spacing), 1)


@FEATURE_NETWORKS.add("learngn")
class LearnGNNet(nn.Module):
    """LearnGN's compact CNN: `forward(warped, fixed) -> (gradient (B, d, *S), residual (B, 1, *S))`.

    warped, fixed: (B, in_channels, *S) (intensities or features). The hand-crafted values are
    `g0 = central_gradient(mean_c warped)` and `r0 = mean_c (warped - fixed)`; the network sees
    (warped, fixed, g0, r0) through `layers` conv 3 blocks of `width` channels (ReLU, dilations
    1, 2, 1, 2, ...) and a 1 x 1 convolution that starts at zero, and returns `g0 + its first d
    channels` and `r0 + its last`: the per-voxel Jacobian row and residual of the Gauss-Newton
    system `(g g^T + lam L) du = -r g - lam L u`.

    symmetric (default True): the correction is averaged over the 2^d axis flips of its input
    (`flip^-1 cnn(flip x)`, the gradient's flipped components negated), so the network is exactly
    flip-equivariant like the Gauss-Newton system itself: it cannot learn a preferred direction
    (a constant push along x, say) from a few training pairs. Without it, training on 64 phantom
    pairs lowered the training loss but not the held-out Dice (benchmarks/results/learning.md).
    The 2^d flips run as one batch.
    """

    kind = "gauss-newton"

    def __init__(self, dim: int, *, in_channels: int = 1, width: int = 16, layers: int = 3, symmetric: bool = True):
        super().__init__()
        _check_dim("LearnGNNet()", dim)
        _check_positive("LearnGNNet()", in_channels=in_channels, width=width, layers=layers)
        if not isinstance(symmetric, bool):
            raise ShapeflowError(f"LearnGNNet(): symmetric must be True or False, got {symmetric!r}")
        self.dim, self.in_channels, self.width, self.layers = dim, in_channels, width, layers
        self.symmetric = symmetric
        conv = _conv(dim)
        body: list[nn.Module] = []
        cin = 2 * in_channels + dim + 1
        for k in range(layers):
            dilation = 1 + k % 2
            body += [conv(cin, width, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
            cin = width
        self.body = nn.Sequential(*body)
        self.head = conv(width, dim + 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def config(self) -> dict[str, Any]:
        return {"name": "learngn", "dim": self.dim, "in_channels": self.in_channels, "width": self.width,
                "layers": self.layers, "symmetric": self.symmetric}

    def _flips(self) -> list[list[int]]:
        """The spatial axes (of a (B, C, *S) tensor) flipped by each element of the flip group."""
        if not self.symmetric:
            return [[]]
        return [[2 + a for a in range(self.dim) if mask >> a & 1] for mask in range(2 ** self.dim)]

    def _correction(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs (B, 2 C + d + 1, *S) (warped, fixed, g0, r0) -> correction (B, d + 1, *S),
        averaged over the flips (equivariant: vector channels change sign with their axis)."""
        d, B = self.dim, inputs.shape[0]
        first = 2 * self.in_channels                     # the g0 channels of the input; the output's 0..d-1

        def act(x: torch.Tensor, axes: list[int], start: int) -> torch.Tensor:
            """The flip of `axes` on x, the vector channels start..start+d-1 negated along them."""
            if not axes:
                return x
            sign = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
            for axis in axes:
                sign[start + axis - 2] = -1
            return x.flip(axes) * sign.view(1, -1, *([1] * d))

        flips = self._flips()
        out = self.head(self.body(torch.cat([act(inputs, axes, first) for axes in flips])))
        return sum(act(part, axes, 0) for part, axes in zip(out.split(B), flips)) / len(flips)

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor,
                spacing: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """warped, fixed: (B, in_channels, *S) -> gradient (B, d, *S), residual (B, 1, *S);
        `spacing` (per axis) scales the hand-crafted gradient to world units (default voxels)."""
        _check_input(self, warped, "warped")
        _check_input(self, fixed, "fixed")
        if warped.shape != fixed.shape:
            raise ShapeflowError(f"LearnGNNet(): warped {tuple(warped.shape)} and fixed {tuple(fixed.shape)} differ")
        gradient = central_gradient(warped.mean(1), spacing)                     # (B, d, *S)
        residual = (warped - fixed).mean(1, keepdim=True)                          # (B, 1, *S)
        correction = self._correction(torch.cat([warped, fixed, gradient, residual], 1))
        return gradient + correction[:, :self.dim], residual + correction[:, self.dim:]


def mind_targets(image: torch.Tensor, channels: int) -> torch.Tensor:
    """(C, *S) -> (channels, *S): MIND-SSC of the channel mean at dilation 2, then 1, 3, 4, ...,
    concatenated and cut to `channels` (the regression targets of `pretrain_mind`)."""
    out, dilations = [], [2, 1] + list(range(3, 64))
    count = 0
    for dilation in dilations:
        if count >= channels:
            break
        out.append(mind_ssc(image, dilation=dilation))
        count += out[-1].shape[0]
    return torch.cat(out)[:channels]


def pretrain_mind(net: nn.Module, images: list[torch.Tensor], steps: int, lr: float = 1e-3, *,
                  modalities: list[int] | None = None, batch: int = 4) -> list[float]:
    """Train `net` (SuitsNet or UNetFeatures) to reproduce MIND-SSC descriptors (`mind_targets`)
    with an L1 loss and Adam (SUITS's pre-training). Returns the loss of each step.

    images: (C, *S) tensors (any sizes); image i goes through modality branch `modalities[i]`,
    by default `i % net.modalities` (so a list [moving, fixed, moving, fixed, ...] of phantom
    pairs trains branch 0 on moving images and 1 on fixed ones, the defaults of
    `loss="learned"`). Each step takes the next `batch` images in turn. Deterministic.
    """
    if getattr(net, "kind", None) != "features":
        raise ShapeflowError(f"pretrain_mind(): net must be a feature network (suits, unet), got {type(net).__name__}")
    _check_positive("pretrain_mind()", steps=steps, batch=batch)
    if not images:
        raise ShapeflowError("pretrain_mind(): images is empty")
    if modalities is None:
        modalities = [i % net.modalities for i in range(len(images))]
    if len(modalities) != len(images):
        raise ShapeflowError(f"pretrain_mind(): {len(modalities)} modalities for {len(images)} images")
    param = next(net.parameters())
    inputs = []
    for k, image in enumerate(images):
        if image.dim() != net.dim + 1:
            raise ShapeflowError(f"pretrain_mind(): images[{k}] must be (C, *S) with {net.dim} spatial axes, "
                                 f"got {tuple(image.shape)}")
        image = image.to(param)
        if image.shape[0] != net.in_channels and net.in_channels == 1:
            image = image.mean(0, keepdim=True)
        with torch.no_grad():
            target = mind_targets(image, net.out_channels)
        inputs.append((image[None], target[None], modalities[k]))
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    losses = []
    for step in range(steps):
        chosen = [inputs[(step * batch + j) % len(inputs)] for j in range(min(batch, len(inputs)))]
        optimiser.zero_grad()
        loss = sum(F.l1_loss(net(x, m), t) for x, t, m in chosen) / len(chosen)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    net.eval()
    return losses
