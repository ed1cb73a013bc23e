"""Training data for learned registration: multi-modal label phantoms, and pairs from a folder.

`phantom_pair(seed)` draws a random label map (a body with nested ellipses and blobs, 4-6
labels counting the background), renders the fixed image from it and the moving image from the
same shapes under a known smooth deformation, each through its own *modality*: a random,
non-monotonic intensity per label (so intensities of the two images are not related by any
monotonic map, as CT and MR are not, and SSD fails), with texture, a smooth multiplicative bias
field and noise. `modality="mono"` renders both through the same map. Everything is drawn from
`numpy.random.default_rng(seed)`, so a seed always gives the same pair.

Seeds are split so that training never sees a validation or test pair (`SPLITS`):
train 0-9999, validation 10000-10999, test 20000-20999.

`PairFolder(folder)` serves real pairs the same way: `folder/images/NAME.nii.gz` with
`folder/labels/NAME.nii.gz` (same grid), every ordered pair of two different names.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import ShapeflowError
from ..shapes import Image

__all__ = ["phantom_pair", "PairFolder", "SPLITS", "split_seeds"]

#: disjoint seed ranges of `phantom_pair` per split
SPLITS = {"train": range(0, 10_000), "validation": range(10_000, 11_000), "test": range(20_000, 21_000)}


def split_seeds(split: str, count: int, start: int = 0) -> list[int]:
    """The first `count` seeds of `split` ("train", "validation" or "test") from offset `start`."""
    if split not in SPLITS:
        raise ShapeflowError(f"split_seeds(): unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    seeds = SPLITS[split][start:start + count]
    if len(seeds) < count:
        raise ShapeflowError(f"split_seeds(): split {split!r} has {len(SPLITS[split])} seeds, asked for "
                             f"{count} from {start}")
    return list(seeds)


def _coordinates(size: tuple[int, ...]) -> np.ndarray:
    """Voxel centres in [-1, 1] along each axis: (d, *S)."""
    axes = [np.linspace(-1.0, 1.0, n) for n in size]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _smooth_noise(rng: np.random.Generator, size: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-peak smooth random field `(*S)`, correlation length `sigma` voxels."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.normal(size=size), sigma, mode="wrap")
    return field / (np.abs(field).max() + 1e-12)


class _Shapes:
    """The random label geometry of one phantom, evaluated at any points (no resampling)."""

    def __init__(self, rng: np.random.Generator, dim: int):
        self.dim = dim
        self.labels = int(rng.integers(4, 7))                     # counting the background (0)
        self.body = (rng.uniform(-0.08, 0.08, dim), rng.uniform(0.68, 0.85, dim), self._rotation(rng, dim))
        self.parts = []                                           # (label, centre, radii, rotation, inside)
        for label in range(2, self.labels):
            parent = self.parts[int(rng.integers(len(self.parts)))] if self.parts and rng.random() < 0.35 else None
            if parent is None:
                centre, radii = rng.uniform(-0.4, 0.4, dim), rng.uniform(0.12, 0.3, dim)
            else:   # nested inside an earlier structure
                centre = parent[1] + rng.uniform(-0.3, 0.3, dim) * parent[2]
                radii = parent[2] * rng.uniform(0.3, 0.5, dim)
            self.parts.append((label, centre, radii, self._rotation(rng, dim), rng.uniform(0.6, 1.4)))
        self.lobes = rng.uniform(0, 2 * math.pi, (3, dim)), rng.uniform(0.04, 0.1, 3)

    @staticmethod
    def _rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
        q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
        return q * np.sign(np.diag(r))

    def _inside(self, x: np.ndarray, centre, radii, rotation, power: float = 1.0, scale=1.0) -> np.ndarray:
        """Points of `x: (d, *S)` inside the (super-)ellipsoid, its radii times `scale` (*S)."""
        d = self.dim
        y = np.tensordot(rotation.T, x - centre.reshape(d, *([1] * (x.ndim - 1))), axes=1)
        r = sum((y[a] / radii[a]) ** 2 for a in range(d)) / np.square(scale)
        return r ** power < 1.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Integer labels `(*S)` at points `x: (d, *S)` (coordinates in [-1, 1])."""
        phases, amplitudes = self.lobes
        wobble = sum(a * np.sin(3 * x[k % self.dim] + phases[k].sum()) for k, a in enumerate(amplitudes))
        centre, radii, rotation = self.body
        out = np.where(self._inside(x, centre, radii, rotation, scale=1 + wobble), 1, 0)
        for label, centre, radii, rotation, power in self.parts:
            out = np.where(self._inside(x, centre, radii, rotation, power) & (out > 0), label, out)
        return out


def _render(labels: np.ndarray, rng: np.random.Generator, values: np.ndarray, noise: float) -> np.ndarray:
    """An image `(*S)` of `labels` through one modality: `values[label]`, texture, bias, noise."""
    size = labels.shape
    image = values[labels]
    image = image + 0.05 * _smooth_noise(rng, size, 2.0)                         # texture
    bias = np.exp(0.25 * _smooth_noise(rng, size, max(size) / 3))                # smooth bias field
    return (image * bias + noise * rng.normal(size=size)).astype(np.float32)


def phantom_pair(seed: int, size: tuple[int, ...] = (96, 96), modality: str = "multi",
                 amplitude: float = 0.06, return_field: bool = False):
    """`(moving, fixed)`: two `Image`s (unit spacing) with label maps, from `seed`.

    size: (H, W) or (D, H, W) (3D: e.g. (48, 48, 48)). modality: "multi" (each image through its
    own random non-monotonic intensity per label) or "mono" (both through the same one).
    amplitude: peak displacement as a fraction of the image side. The moving image at y shows
    the fixed image's shapes at `y + u(y)` (u smooth, known), so the map a registration should
    find (fixed point x -> moving point) is `psi = (id + u)^-1`. With `return_field=True` also
    returns u: `(d, *S)` in voxels (world units, as spacing is 1).
    """
    if modality not in ("multi", "mono"):
        raise ShapeflowError(f"phantom_pair(): modality must be 'multi' or 'mono', got {modality!r}")
    size = tuple(int(n) for n in size)
    if len(size) not in (2, 3) or min(size) < 8:
        raise ShapeflowError(f"phantom_pair(): size must be 2 or 3 sides of at least 8 voxels, got {size}")
    rng = np.random.default_rng(int(seed))
    dim = len(size)
    shapes = _Shapes(rng, dim)
    x = _coordinates(size)
    voxels = np.array([(n - 1) / 2 for n in size]).reshape(dim, *([1] * dim))     # [-1, 1] -> voxels
    u = np.stack([_smooth_noise(rng, size, max(size) / 5) for _ in range(dim)]) * amplitude * max(size)
    fixed_labels = shapes(x)
    moving_labels = shapes(x + u / voxels)         # the fixed geometry seen through x -> x + u(x)
    first = rng.uniform(0.05, 1.0, shapes.labels)
    first[0] = rng.uniform(0.0, 0.15)
    second = first if modality == "mono" else rng.permutation(rng.uniform(0.05, 1.0, shapes.labels))
    noise = 0.03
    fixed = _render(fixed_labels, rng, first, noise)
    moving = _render(moving_labels, rng, second, noise)
    pair = (Image(torch.from_numpy(moving[None]), labels=torch.from_numpy(moving_labels)),
            Image(torch.from_numpy(fixed[None]), labels=torch.from_numpy(fixed_labels)))
    return (*pair, torch.from_numpy(u)) if return_field else pair


class PairFolder:
    """Registration pairs on disk: `folder/images/NAME.nii.gz` (or any image format `sf.read`
    reads) with the label map `folder/labels/NAME.<same extension>`; `len()` ordered pairs of two
    different names, `pair(k) -> (moving, fixed)` with labels attached."""

    def __init__(self, folder: str | Path):
        from ..io import read

        self.folder = Path(folder)
        images, labels = self.folder / "images", self.folder / "labels"
        if not images.is_dir() or not labels.is_dir():
            raise ShapeflowError(f"{self.folder}: expected the subfolders images/ and labels/")
        self.names = sorted(p.name for p in images.iterdir() if not p.name.startswith("."))
        missing = [n for n in self.names if not (labels / n).exists()]
        if missing:
            raise ShapeflowError(f"{labels}: no label map for {', '.join(missing[:3])}"
                                 f"{' ...' if len(missing) > 3 else ''}")
        if len(self.names) < 2:
            raise ShapeflowError(f"{images}: needs at least 2 images to form a pair, found {len(self.names)}")
        self._read = read

    def __len__(self) -> int:
        return len(self.names) * (len(self.names) - 1)

    def _image(self, name: str) -> Image:
        image = self._read(self.folder / "images" / name, kind="image")
        labels = self._read(self.folder / "labels" / name, kind="image")
        if labels.shape != image.shape:
            raise ShapeflowError(f"{labels.source}: label map grid {labels.shape} does not match its image {image.shape}")
        return Image(image.data, image.spacing, image.origin, image.direction,
                     labels=labels.data[0].round().long(), source=image.source)

    def pair(self, k: int) -> tuple[Image, Image]:
        """The k-th ordered pair (moving, fixed), 0 <= k < len(self)."""
        n = len(self.names)
        if not 0 <= k < len(self):
            raise ShapeflowError(f"PairFolder.pair(): index {k} outside 0..{len(self) - 1}")
        i, j = divmod(k, n - 1)
        j = j + (j >= i)
        return self._image(self.names[i]), self._image(self.names[j])
