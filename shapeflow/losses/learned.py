"""The `loss="learned"` image residual: a trained feature network inside Gauss-Newton, and its files.

    sf.register(moving, fixed, loss="learned", features="run/model.pt")     # or features=<nn.Module>

`LearnedResidual.features(image, role)` runs the network (without gradient) on each pyramid
level's image, with the moving image's modality branch for the moving image
(`modality_moving`, default 0) and the fixed image's for the fixed one (`modality_fixed`,
default 1); the residual is then `F(warped) - F(fixed)` on those features, as for "mind", so any
image model (`displacement`, `svf`), label maps, masks and landmark terms combine with it
without retraining.

Layering. The networks are defined and trained in `shapeflow.learn` (which sits above the
pipelines), but this module sits below them, so it must not import `shapeflow.learn`. The
dependency is turned around, as `shapeflow.deform` does for its saved models: this module owns
the registry `FEATURE_NETWORKS` (name -> `nn.Module` class) and the file format
(`save_features` / `load_features`), and `shapeflow.learn.features` registers its classes
(`@FEATURE_NETWORKS.add("suits")`, ...) when it is imported. A file naming a network nobody
registered is a one-line error saying so (importing `shapeflow.learn` registers the built-in
ones). A registered class needs `__init__(dim, **hyper)`, `.dim`, `.config()` (JSON-able,
`{"name": ..., "dim": ..., **hyper}`) and a class attribute `kind`: "features" for networks
mapping an image `(B, C, *S)` to features `(B, K, *S)` (`forward(image, modality)`), anything
else (LearnGN's "gauss-newton") for networks this loss cannot use.

The file: `torch.save` of a dict holding only tensors and strings (`format`
"shapeflow-features/1", `network` (JSON of `config()`), `extra` (JSON, e.g. the training
config), `state` (the state dict on the CPU)), written atomically and read with
`torch.load(weights_only=True)`, so no Python object is ever unpickled.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import atomic_write
from .._registry import Registry
from ..errors import ShapeflowError
from .residuals import RESIDUALS, ImageResidual

__all__ = ["FEATURE_NETWORKS", "FORMAT", "LearnedResidual", "save_features", "load_features", "build_features"]

#: feature network classes by name (filled by `shapeflow.learn.features` when it is imported)
FEATURE_NETWORKS: Registry[type[nn.Module]] = Registry("feature network")

#: the file format tag and version `save_features` writes and `load_features` reads
FORMAT_NAME, FORMAT_VERSION = "shapeflow-features", 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"


def build_features(name: str, dim: int, **hyper: Any) -> nn.Module:
    """A new (untrained) registered network `name` for `dim`-dimensional images."""
    if not FEATURE_NETWORKS:
        raise ShapeflowError("build_features(): no feature network is registered; import shapeflow.learn "
                             "(it registers suits, learngn and unet)")
    return FEATURE_NETWORKS.lookup(name, "build_features()")(dim, **hyper)


def save_features(path: str | os.PathLike, net: nn.Module, extra: dict | None = None) -> Path:
    """Write `net` (a registered network) and the JSON-able `extra` (e.g. the training config) to
    `path`, atomically (a crash leaves the old file or none, never half of one). Returns the path."""
    path = Path(path)
    config = net.config() if callable(getattr(net, "config", None)) else None
    name = config.get("name") if isinstance(config, dict) else None
    if name not in FEATURE_NETWORKS or not isinstance(net, FEATURE_NETWORKS[name]):
        raise ShapeflowError(f"save_features(): {type(net).__name__} is not a registered feature network "
                             f"({', '.join(FEATURE_NETWORKS) or 'none registered'})")
    try:
        network, extra_json = json.dumps(config), json.dumps({} if extra is None else extra)
    except (TypeError, ValueError) as exc:
        raise ShapeflowError(f"save_features(): extra (or the network config) is not JSON-able: {exc}") from None
    payload = {"format": FORMAT, "network": network, "extra": extra_json,
               "state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def load_features(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The network saved at `path` (on the CPU, in eval mode) and `{"format", "config", "extra"}`.

    Every bad file is a one-line `ShapeflowError` naming it: missing, truncated or corrupt, a
    torch file that is not a shapeflow feature model, an unknown format version, an unknown
    network name, weights that do not fit the network's config.
    """
    path = Path(path)
    if not path.is_file():
        raise ShapeflowError(f"{path}: no such feature model file")
    if not zipfile.is_zipfile(path):       # torch.save writes a zip archive; a cut one loses its directory
        raise ShapeflowError(f"{path}: not a readable feature model (not a torch file, or truncated or corrupt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ShapeflowError(f"{path}: not a shapeflow feature model (it holds Python objects beyond tensors; "
                             "refusing to unpickle them)") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise ShapeflowError(f"{path}: not a readable feature model (truncated or corrupt: "
                             f"{type(exc).__name__})") from None
    tag = payload.get("format") if isinstance(payload, dict) else None
    if not isinstance(tag, str) or not tag.startswith("shapeflow-"):
        raise ShapeflowError(f"{path}: a torch file but not a shapeflow feature model (no {FORMAT_NAME!r} format tag)")
    kind, _, version = tag.partition("/")
    if kind != FORMAT_NAME:
        raise ShapeflowError(f"{path}: a {kind.removeprefix('shapeflow-')} file, not a feature model")
    if version != str(FORMAT_VERSION):
        raise ShapeflowError(f"{path}: feature model format version {version!r} is not supported "
                             f"(this shapeflow reads version {FORMAT_VERSION}); use the shapeflow that wrote it")
    try:
        config = json.loads(payload["network"])
        extra = json.loads(payload.get("extra", "{}"))
        state = payload["state"]
        name, hyper = config["name"], {k: v for k, v in config.items() if k != "name"}
    except Exception as exc:  # noqa: BLE001
        raise ShapeflowError(f"{path}: damaged feature model header ({type(exc).__name__})") from None
    if name not in FEATURE_NETWORKS:
        hint = " (none is registered: import shapeflow.learn)" if not FEATURE_NETWORKS else ""
        raise ShapeflowError(f"{path}: unknown feature network {name!r}; choose from "
                             f"{', '.join(FEATURE_NETWORKS) or 'nothing'}{hint}")
    try:
        net = FEATURE_NETWORKS[name](**hyper)
        net.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001
        raise ShapeflowError(f"{path}: the weights do not fit a {name} network with {hyper} "
                             f"({type(exc).__name__})") from None
    return net.eval(), {"format": tag, "config": config, "extra": extra}


@RESIDUALS.add("learned")
class LearnedResidual(ImageResidual):
    """Features of a trained network (`shapeflow.learn`: "suits", "unet"), per modality.

    Options: `features` (required): a file written by `save_features` or the network itself (an
    `nn.Module` with `.dim`, `forward(image (B, C, *S), modality) -> (B, K, *S)`; it is copied,
    so the caller's module is not changed); `modality_moving` (default 0) and `modality_fixed`
    (default 1): the network's input branch for each image (a one-branch network uses its only
    one for both). Images with several channels are averaged to one when the network takes one.
    """

    same_channels = False
    features_before_pyramid = True      # the network saw full-resolution images in training

    @dataclass
    class Options:
        features: Any = None              # path of a feature model (save_features), or an nn.Module
        modality_moving: int = 0          # the network's input branch for the moving image
        modality_fixed: int = 1           # ... and for the fixed image

        def __post_init__(self) -> None:
            for name in ("modality_moving", "modality_fixed"):
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ShapeflowError(f"register(): {name} must be an int >= 0, got {value!r}")
            if isinstance(self.features, nn.Module):   # keep the module out of the JSON-able options
                self.network, self.features = self.features, f"{type(self.features).__name__} (in memory)"
            elif isinstance(self.features, (str, os.PathLike)):
                self.network, self.features = None, str(self.features)
            else:
                raise ShapeflowError("register(): loss='learned' needs features=PATH (a model written by "
                                     "shapeflow.learn.save_features) or features=<a feature network>, got "
                                     f"{type(self.features).__name__}")

    def __init__(self, options: Any = None):
        super().__init__(options)
        opts = self.options
        if opts.network is None:
            net, _ = load_features(opts.features)
        else:
            net = copy.deepcopy(opts.network).eval()
        self.name = opts.features
        kind = getattr(net, "kind", "features")
        if kind != "features" or not isinstance(getattr(net, "dim", None), int):
            usable = [k for k, v in FEATURE_NETWORKS.items() if getattr(v, "kind", "") == "features"]
            raise ShapeflowError(f"{self.name}: {type(net).__name__} ({kind}) is not a feature network with a "
                                 f"`dim`; loss='learned' takes {', '.join(usable) or 'a feature network'}")
        branches = int(getattr(net, "modalities", 1))
        for name in ("modality_moving", "modality_fixed"):
            if branches > 1 and getattr(opts, name) >= branches:
                raise ShapeflowError(f"register(): {name}={getattr(opts, name)} but {self.name} has "
                                     f"{branches} modality branches (0-{branches - 1})")
        self.network = net
        self.branches = branches

    def features(self, image: torch.Tensor, role: str = "fixed") -> torch.Tensor:
        """(C, *S) -> (K, *S): the network's features of `image` (the `role` image's modality branch),
        computed without gradient, in the image's dtype and on its device."""
        net = self.network
        if image.dim() - 1 != net.dim:
            raise ShapeflowError(f"{self.name}: the feature network is {net.dim}D but the images are "
                                 f"{image.dim() - 1}D")
        channels = getattr(net, "in_channels", image.shape[0])
        if image.shape[0] != channels:
            if channels != 1:
                raise ShapeflowError(f"{self.name}: the feature network takes {channels} channels but the "
                                     f"{role} image has {image.shape[0]}")
            image = image.mean(0, keepdim=True)
        modality = getattr(self.options, f"modality_{role}") if self.branches > 1 else 0
        net.to(device=image.device, dtype=image.dtype)
        with torch.no_grad():
            return net(image[None], modality)[0]
