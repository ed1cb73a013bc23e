"""Training methods: how a network and the Gauss-Newton solver turn a batch of pairs into a loss.

`METHODS[name](network, batch, options, generator) -> (loss, metrics)` and
`register_pair(network, pair, options) -> u` (inference, no graph) for

* "suits" (Blendowski & Heinrich): features of both images from a network (`SuitsNet`:
  `net(image (B, C, *S), modality) -> (B, K, *S)`); k - 1 regularised Gauss-Newton steps on
  them without a graph, then one tracked step (`gauss_newton_system_layer` on the linearised
  features, adjoint CG backward); the loss compares the moving labels warped by the final field
  with the fixed labels. k is drawn per batch from `options.iterations`.
* "learngn" (Heinrich & Hansen): k Gauss-Newton steps whose Jacobian rows and residual come from
  a network (`LearnGNNet`: `net(warped, fixed) -> (gradient (B, d, *S), residual (B, 1, *S))`)
  at the current warp; every step tracked (`gauss_newton_system_layer`).
* "dio" (Jena et al.): the whole optimiser on the network's features as one layer
  (`implicit_registration_layer`), its gradient by `options.backward`: "ift", "jfb" or "unrolled".

A pair is a `Pair` of tensors on one grid; the displacement u maps fixed-grid points x to the
moving image at `x + u(x)` (world units), as everywhere in shapeflow.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

import torch

from .._registry import Registry
from ..errors import ShapeflowError
from ..grids import Grid, sample
from ..losses.images import dice_loss, one_hot
from ..shapes import Image
from .layers import BACKWARDS, gauss_newton_steps, gauss_newton_system_layer, implicit_registration_layer, linearise

__all__ = ["METHODS", "LOSSES", "MethodOptions", "Pair", "as_pair", "register_pair", "warp_labels"]


class Pair(NamedTuple):
    """One registration pair on the fixed grid: images `(C, *S)`, integer labels `(*S)`, and the
    feature network's modality branch of each image (moving 0, fixed 1: the defaults of
    `loss="learned"` and of `pretrain_mind`, so a trained network is used as it was trained)."""

    moving: torch.Tensor
    fixed: torch.Tensor
    moving_labels: torch.Tensor
    fixed_labels: torch.Tensor
    grid: Grid
    modalities: tuple[int, int] = (0, 1)


def as_pair(moving: Image, fixed: Image, *, modalities: tuple[int, int] = (0, 1), device=None,
            dtype: torch.dtype = torch.float32) -> Pair:
    """A `Pair` from two `Image`s with label maps on grids of one size (the fixed grid is used)."""
    if moving.labels is None or fixed.labels is None:
        raise ShapeflowError("as_pair(): both images need label maps (Image.labels) to train on")
    if tuple(moving.shape) != tuple(fixed.shape):
        raise ShapeflowError(f"as_pair(): the moving image {tuple(moving.shape)} and the fixed image "
                             f"{tuple(fixed.shape)} must be on grids of one size (resample them first)")
    grid = Grid.of(fixed)
    to = dict(device=device, dtype=dtype)
    return Pair(moving.data.to(**to), fixed.data.to(**to), moving.labels.to(device).long(),
                fixed.labels.to(device).long(), grid, tuple(modalities))


@dataclass(frozen=True)
class MethodOptions:
    """The [method] section: name, Gauss-Newton iterations `[low, high]` (k drawn per batch,
    inclusive; inference uses `high`), `lam` (diffusion weight), `step` (u += step * du),
    `backward` (DIO: "ift", "jfb", "unrolled"), `loss` ("dice" or "ce" on the warped labels),
    `cg_tol` / `cg_iterations` of every linear solve (forward and adjoint)."""

    name: str
    iterations: tuple[int, int] = (1, 6)
    lam: float = 0.1
    step: float = 1.0
    backward: str = "ift"
    loss: str = "dice"
    cg_tol: float = 1e-3
    cg_iterations: int = 100

    def __post_init__(self):
        METHODS.lookup(self.name, "[method] name")
        LOSSES.lookup(self.loss, "[method] loss")
        if self.backward not in BACKWARDS:
            raise ShapeflowError(f"[method] backward: unknown {self.backward!r}; choose from {', '.join(BACKWARDS)}")
        its = self.iterations
        if isinstance(its, int) and not isinstance(its, bool):
            its = (its, its)
        if not (isinstance(its, (list, tuple)) and len(its) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                                          for i in its) and 1 <= its[0] <= its[1]):
            raise ShapeflowError(f"[method] iterations: expected an int >= 1 or [low, high] with 1 <= low <= high, "
                                 f"got {self.iterations!r}")
        object.__setattr__(self, "iterations", tuple(its))
        for name, low in (("lam", 0.0), ("step", 0.0), ("cg_tol", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
                raise ShapeflowError(f"[method] {name}: expected a number > {low:g}, got {value!r}")
        if isinstance(self.cg_iterations, bool) or not isinstance(self.cg_iterations, int) or self.cg_iterations < 1:
            raise ShapeflowError(f"[method] cg_iterations: expected an int >= 1, got {self.cg_iterations!r}")

    @classmethod
    def from_dict(cls, section: dict) -> "MethodOptions":
        known = [f.name for f in fields(cls)]
        for key in section:
            if key not in known:
                raise ShapeflowError(f"[method]: unknown key {key!r}; valid keys: {', '.join(known)}")
        if "name" not in section:
            raise ShapeflowError(f"[method]: missing key 'name'; choose from {', '.join(METHODS)}")
        return cls(**section)


# ----------------------------------------------------------------------------- label losses


def warp_labels(labels: torch.Tensor, u: torch.Tensor, grid: Grid, classes: int) -> torch.Tensor:
    """One-hot `labels (*S)` of the moving image warped by `u (d, *S)` (linear): `(classes, *S)`."""
    points = grid.points(u.dtype, u.device) + u.movedim(0, -1)
    return sample(one_hot(labels, classes, dtype=u.dtype), grid, points)


def _dice(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    return dice_loss(warped, fixed)


def _cross_entropy(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    return -(fixed * warped.clamp_min(1e-6).log()).sum(0).mean()


#: label losses: (warped one-hot (K, *S), fixed one-hot (K, *S)) -> 0-d
LOSSES: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry(
    "loss", {"dice": _dice, "ce": _cross_entropy})


def _label_loss(pair: Pair, u: torch.Tensor, options: MethodOptions) -> tuple[torch.Tensor, float]:
    """(loss, soft Dice) of the moving labels warped by u against the fixed labels."""
    classes = int(max(pair.moving_labels.max(), pair.fixed_labels.max())) + 1
    classes = max(classes, 2)
    warped = warp_labels(pair.moving_labels, u, pair.grid, classes)
    fixed = one_hot(pair.fixed_labels, classes, dtype=u.dtype)
    loss = LOSSES[options.loss](warped, fixed)
    soft = 1.0 - float(dice_loss(warped.detach(), fixed))
    return loss, soft


def _draw(options: MethodOptions, generator: torch.Generator | None) -> int:
    low, high = options.iterations
    if generator is None or low == high:
        return high
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _features(network, pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's features of both images: `(K, *S)` each."""
    return network(pair.moving[None], pair.modalities[0])[0], network(pair.fixed[None], pair.modalities[1])[0]


def _mean(batch: list[Pair], per_pair: Callable[[Pair], tuple[torch.Tensor, float]]) -> tuple[torch.Tensor, dict]:
    if not batch:
        raise ShapeflowError("training method: the batch holds no pairs")
    losses, dice = zip(*(per_pair(pair) for pair in batch))
    loss = torch.stack(losses).mean()
    return loss, {"loss": float(loss.detach()), "dice": sum(dice) / len(dice)}


# ----------------------------------------------------------------------------- the methods


def suits(network, batch: list[Pair], options: MethodOptions,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """SUITS: k - 1 untracked Gauss-Newton steps on the features, one tracked, label loss."""
    k = _draw(options, generator)

    def one(pair: Pair):
        moving, fixed = _features(network, pair)
        u = gauss_newton_steps(moving, fixed, pair.grid, options.lam, k - 1, step=options.step, tol=options.cg_tol,
                               maxiter=options.cg_iterations)
        residual, gradient = linearise(moving, fixed, pair.grid, u)
        du = gauss_newton_system_layer(gradient, residual, u, pair.grid, options.lam, "implicit",
                                       tol=options.cg_tol, maxiter=options.cg_iterations)
        return _label_loss(pair, u + options.step * du, options)

    loss, metrics = _mean(batch, one)
    return loss, {**metrics, "k": k}


def _takes_spacing(network) -> bool:
    """Whether `network.forward` takes `spacing=` (LearnGNNet: its hand-crafted gradient in world units)."""
    try:
        return "spacing" in inspect.signature(network.forward).parameters
    except (TypeError, ValueError):
        return False


def _learngn_steps(network, pair: Pair, options: MethodOptions, k: int) -> torch.Tensor:
    """k Gauss-Newton steps with the network's gradient and residual at the current warp -> u."""
    grid = pair.grid
    points = grid.points(pair.moving.dtype, pair.moving.device)
    u = torch.zeros(grid.dim, *grid.shape, dtype=pair.moving.dtype, device=pair.moving.device)
    spacing = {"spacing": grid.spacing.tolist()} if _takes_spacing(network) else {}
    for _ in range(k):
        warped = sample(pair.moving, grid, points + u.movedim(0, -1))
        gradient, residual = network(warped[None], pair.fixed[None], **spacing)               # (1, d, *S), (1, 1, *S)
        du = gauss_newton_system_layer(gradient, residual[0], u, grid, options.lam, "implicit",
                                       tol=options.cg_tol, maxiter=options.cg_iterations)
        u = u + options.step * du
    return u


def learngn(network, batch: list[Pair], options: MethodOptions,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """LearnGN: k tracked Gauss-Newton steps whose system comes from the network, label loss."""
    k = _draw(options, generator)
    loss, metrics = _mean(batch, lambda pair: _label_loss(pair, _learngn_steps(network, pair, options, k), options))
    return loss, {**metrics, "k": k}


def dio(network, batch: list[Pair], options: MethodOptions,
        generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """DIO: the optimiser on the network's features as one implicit layer, label loss."""
    k = _draw(options, generator)

    def one(pair: Pair):
        moving, fixed = _features(network, pair)
        u = implicit_registration_layer(moving, fixed, pair.grid, options.lam, k, options.backward,
                                        step=options.step, tol=options.cg_tol, maxiter=options.cg_iterations)
        return _label_loss(pair, u, options)

    loss, metrics = _mean(batch, one)
    return loss, {**metrics, "k": k}


#: training methods: (network, batch of pairs, MethodOptions, generator) -> (loss, metrics)
METHODS: Registry[Callable] = Registry("method", {"suits": suits, "learngn": learngn, "dio": dio})

#: the network kind (its class attribute `kind`) each method trains: "features" (image -> features) or
#: "gauss-newton" ((warped, fixed) -> (gradient, residual))
NETWORK_KINDS = {"suits": "features", "learngn": "gauss-newton", "dio": "features"}


def register_pair(network, pair: Pair, options: MethodOptions) -> torch.Tensor:
    """Inference: u (d, *S) after `options.iterations[1]` steps of the method's Gauss-Newton, no graph."""
    k = options.iterations[1]
    with torch.no_grad():
        if NETWORK_KINDS[options.name] == "gauss-newton":
            return _learngn_steps(network, pair, options, k)
        moving, fixed = _features(network, pair)
        return gauss_newton_steps(moving, fixed, pair.grid, options.lam, k, step=options.step, tol=options.cg_tol,
                                  maxiter=options.cg_iterations)
