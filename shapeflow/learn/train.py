"""`train(config, output)`: train a network through the Gauss-Newton solver, resumable and seeded.

The config (a TOML file or a dict) has four sections, every key checked:

    [data]     source = "phantoms" | "folder", size = [96, 96], modality = "multi" | "mono",
               amplitude = 0.06, train = 200, validation = 8, test = 16, folder = "DIR"
    [network]  name = "suits" | "unet" | "learngn", init = "model.pt" (optional: start from
               these weights), pretrain_mind = 0 (steps of `pretrain_mind` on the training
               images before training; feature networks), and the network's own
               hyper-parameters (passed to `build_features`, e.g. width, out_channels)
    [method]   name = "suits" | "learngn" | "dio", iterations = [1, 8], lam = 0.1, step = 1.0,
               backward = "ift" | "jfb" | "unrolled", loss = "dice" | "ce", cg_tol, cg_iterations
    [train]    steps = 200, batch = 4, lr = 1e-3, seed = 0, validate_every = 50,
               checkpoint_every = 25, threads = 1, device = "cpu" | "cuda" | "auto"

Phantom pairs come from `phantom_pair` on the disjoint seed ranges of `SPLITS`; a folder holds
`train/`, `validation/` and `test/`, each laid out as `PairFolder` reads it (images/ and labels/),
so no image is shared between splits.

OUTPUT/ receives `checkpoint.pt` (weights, optimizer state, step, RNG states, config, history:
tensors and JSON text only, read with `torch.load(..., weights_only=True)`, written atomically
every `checkpoint_every` steps, on Ctrl-C and at the end), `model.pt` (`save_features`, the
config in `extra`), `report.json` (test pairs: Dice before/after, HD95, % folding) and
`curve.png`. Training resumes from `checkpoint.pt` to exactly the state a straight run reaches.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import signal
import threading
import time
import tomllib
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .._threads import torch_threads
from ..errors import ShapeflowError
from ..grids import sample
from ..metrics.images import dice_per_label, hausdorff95_per_label, jacobian_statistics
from ..progress import progress_bar
from .methods import METHODS, NETWORK_KINDS, MethodOptions, Pair, as_pair, register_pair
from .phantoms import PairFolder, phantom_pair, split_seeds

__all__ = ["train", "load_config", "load_checkpoint", "evaluate", "evaluate_register", "DataOptions", "TrainOptions",
           "SECTIONS"]

#: the config's sections, all required
SECTIONS = ("data", "network", "method", "train")
CHECKPOINT_FORMAT = "shapeflow-train-checkpoint/1"
#: the kind of each built-in network (`.kind`), checked against the method before anything is built
KNOWN_NETWORKS = {"suits": "features", "unet": "features", "learngn": "gauss-newton"}
_KIND_NAMES = {"features": "a feature network (suits, unet)", "gauss-newton": "a Gauss-Newton network (learngn)"}
#: [network] keys of the training itself; the others are the network's hyper-parameters
NETWORK_KEYS = ("name", "init", "pretrain_mind")
#: [train] keys that may change between a run and its resumption
RESUMABLE_CHANGES = ("steps", "threads", "checkpoint_every")


def _unknown(section: str, cls, given: dict) -> None:
    known = [f.name for f in fields(cls)]
    for key in given:
        if key not in known:
            raise ShapeflowError(f"[{section}]: unknown key {key!r}; valid keys: {', '.join(known)}")


def _int(section: str, name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ShapeflowError(f"[{section}] {name}: expected an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class DataOptions:
    """The [data] section (see the module docstring)."""

    source: str = "phantoms"
    size: tuple = (96, 96)
    modality: str = "multi"
    amplitude: float = 0.06
    train: int = 200
    validation: int = 8
    test: int = 16
    folder: str | None = None

    def __post_init__(self):
        if self.source not in ("phantoms", "folder"):
            raise ShapeflowError(f"[data] source: unknown {self.source!r}; choose from phantoms, folder")
        if self.modality not in ("multi", "mono"):
            raise ShapeflowError(f"[data] modality: unknown {self.modality!r}; choose from multi, mono")
        size = self.size
        if not (isinstance(size, (list, tuple)) and len(size) in (2, 3)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 8 for n in size)):
            raise ShapeflowError(f"[data] size: expected 2 or 3 ints >= 8, got {size!r}")
        object.__setattr__(self, "size", tuple(size))
        if isinstance(self.amplitude, bool) or not isinstance(self.amplitude, (int, float)) or self.amplitude < 0:
            raise ShapeflowError(f"[data] amplitude: expected a number >= 0, got {self.amplitude!r}")
        _int("data", "train", self.train, 1)
        _int("data", "validation", self.validation, 0)
        _int("data", "test", self.test, 0)
        if self.source == "folder" and not isinstance(self.folder, str):
            raise ShapeflowError("[data] folder: source = \"folder\" needs folder = \"DIR\" (with train/, "
                                 "validation/ and test/ inside)")


@dataclass(frozen=True)
class TrainOptions:
    """The [train] section (see the module docstring)."""

    steps: int = 200
    batch: int = 4
    lr: float = 1e-3
    seed: int = 0
    validate_every: int = 50
    checkpoint_every: int = 25
    threads: int = 1
    device: str = "cpu"

    def __post_init__(self):
        _int("train", "steps", self.steps, 0)
        _int("train", "batch", self.batch, 1)
        _int("train", "seed", self.seed, 0)
        _int("train", "validate_every", self.validate_every, 0)
        _int("train", "checkpoint_every", self.checkpoint_every, 1)
        _int("train", "threads", self.threads, 1)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ShapeflowError(f"[train] lr: expected a number > 0, got {self.lr!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ShapeflowError(f"[train] device: unknown {self.device!r}; choose from cpu, cuda, auto")


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def load_config(config: dict | str | Path) -> dict:
    """The config checked and completed with the defaults, as plain JSON-able data.

    config: a dict or the path of a TOML file. Raises a one-line `ShapeflowError` on a missing or
    unknown section, an unknown key (listing the valid ones) or a bad value.
    """
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise ShapeflowError(f"{path}: no such config file")
        try:
            config = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ShapeflowError(f"{path}: not valid TOML ({exc})") from None
        try:
            return _checked_config(config)
        except ShapeflowError as exc:       # name the file the bad key or value is in
            raise ShapeflowError(f"{path}: {exc}") from None
    return _checked_config(config)


def _checked_config(config) -> dict:
    """`load_config`'s checks on the parsed config (a dict)."""
    if not isinstance(config, dict):
        raise ShapeflowError(f"train(): config must be a dict or a TOML file path, got {type(config).__name__}")
    for name in config:
        if name not in SECTIONS:
            raise ShapeflowError(f"config: unknown section [{name}]; valid sections: {', '.join(SECTIONS)}")
    for name in SECTIONS:
        if name not in config:
            raise ShapeflowError(f"config: missing section [{name}]; a config needs "
                                 f"{', '.join(f'[{s}]' for s in SECTIONS)}")
        if not isinstance(config[name], dict):
            raise ShapeflowError(f"config: [{name}] must be a table of keys, got {type(config[name]).__name__}")
    _unknown("data", DataOptions, config["data"])
    _unknown("train", TrainOptions, config["train"])
    data = DataOptions(**config["data"])
    method = MethodOptions.from_dict(config["method"])
    options = TrainOptions(**config["train"])
    network = dict(config["network"])
    if not isinstance(network.get("name"), str):
        raise ShapeflowError("[network]: missing key 'name' (e.g. name = \"suits\")")
    if "init" in network and not isinstance(network["init"], str):
        raise ShapeflowError(f"[network] init: expected the path of a model.pt, got {network['init']!r}")
    if isinstance(network.get("pretrain_mind", 0), bool) or not isinstance(network.get("pretrain_mind", 0), int) \
            or network.get("pretrain_mind", 0) < 0:
        raise ShapeflowError(f"[network] pretrain_mind: expected an int >= 0 (steps), got {network['pretrain_mind']!r}")
    kind = KNOWN_NETWORKS.get(network["name"])
    if kind is None and "init" not in network:
        raise ShapeflowError(f"[network] name: unknown network {network['name']!r}; choose from "
                             f"{', '.join(KNOWN_NETWORKS)}")
    if kind is not None and NETWORK_KINDS[method.name] != kind:
        raise ShapeflowError(f"[network] name: method {method.name!r} trains "
                             f"{_KIND_NAMES[NETWORK_KINDS[method.name]]}, got {network['name']!r}")
    if kind == "gauss-newton" and network.get("pretrain_mind"):
        raise ShapeflowError("[network] pretrain_mind: only feature networks (suits, unet) are pre-trained on MIND")
    return _jsonable({"data": asdict(data), "network": network, "method": asdict(method), "train": asdict(options)})


# ----------------------------------------------------------------------------- data


class _Split:
    """The pairs of one split as `Pair`s, made on first use and kept."""

    def __init__(self, data: DataOptions, split: str, count: int, device):
        self.data, self.split, self.count, self.device = data, split, count, device
        self._cache: dict[int, tuple] = {}
        if data.source == "phantoms":
            self.seeds = split_seeds(split, count)
        else:
            self.folder = PairFolder(Path(data.folder) / split)
            if count > len(self.folder):
                raise ShapeflowError(f"[data] {split}: asked for {count} pairs but {self.folder.folder} has "
                                     f"{len(self.folder)}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Pair:
        return self.images(i)[2]

    def images(self, i: int):
        """(moving Image, fixed Image, Pair) of pair i."""
        if i not in self._cache:
            if self.data.source == "phantoms":
                moving, fixed = phantom_pair(self.seeds[i], self.data.size, self.data.modality, self.data.amplitude)
            else:
                moving, fixed = self.folder.pair(i)
            self._cache[i] = (moving, fixed, as_pair(moving, fixed, device=self.device))
        return self._cache[i]


# ----------------------------------------------------------------------------- networks


def _build_network(config: dict, dim: int, images: Callable[[], list[torch.Tensor]]) -> torch.nn.Module:
    """The configured network: built, started from `init`, pre-trained on MIND (`images()`: the
    training images, moving and fixed in turn) when asked."""
    from .features import build_features, load_features, pretrain_mind

    section = config["network"]
    hyper = {k: v for k, v in section.items() if k not in NETWORK_KEYS}
    try:
        net = build_features(section["name"], dim, **hyper)
    except TypeError as exc:
        raise ShapeflowError(f"[network]: {exc}; valid keys: {', '.join(NETWORK_KEYS)} and the network's own") from None
    want = NETWORK_KINDS[config["method"]["name"]]
    if getattr(net, "kind", want) != want:
        raise ShapeflowError(f"[network] name: method {config['method']['name']!r} trains {_KIND_NAMES[want]}, "
                             f"got {section['name']!r} ({net.kind})")
    init = section.get("init")
    if init is not None:
        start, _ = load_features(init)
        if type(start) is not type(net) or start.config() != net.config():
            raise ShapeflowError(f"[network] init: {init} holds a {type(start).__name__} {start.config()}, "
                                 f"not the configured {type(net).__name__} {net.config()}")
        net.load_state_dict(start.state_dict())
    if section.get("pretrain_mind"):
        pretrain_mind(net, images(), section["pretrain_mind"], config["train"]["lr"])
    return net


# ----------------------------------------------------------------------------- checkpoints


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint read safely (`weights_only=True`), its JSON parts decoded.

    Raises a one-line `ShapeflowError` for a corrupt file or one that is not a shapeflow
    training checkpoint.
    """
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):     # torch.save writes a zip; a cut one loses its index
        raise ShapeflowError(f"{path}: not a readable training checkpoint (not a torch file, or truncated or "
                             "corrupt); remove it or start again without resuming")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ShapeflowError(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError:
        raise ShapeflowError(f"{path}: not a shapeflow training checkpoint (it holds Python objects beyond tensors; "
                             "refusing to unpickle them); remove it or start again without resuming") from None
    except Exception as exc:  # pickle, zip and torch errors alike: the file is not ours or is damaged
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShapeflowError(f"{path}: not a readable training checkpoint ({reason[:120]}); remove it or start "
                             "again without resuming") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ShapeflowError(f"{path}: not a shapeflow training checkpoint (no {CHECKPOINT_FORMAT!r} format tag); "
                             "remove it or start again without resuming")
    try:
        for key in ("config", "history", "validation"):
            state[key] = json.loads(state[key])
        int(state["step"]), state["weights"], state["initial"], state["optimizer"], state["rng"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ShapeflowError(f"{path}: damaged training checkpoint ({type(exc).__name__}: {exc})") from None
    return state


def _resumable(config: dict) -> dict:
    return {**config, "train": {k: v for k, v in config["train"].items() if k not in RESUMABLE_CHANGES}}


def _first_difference(a, b, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
    return f"{prefix}: {a!r} then, {b!r} now"


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Ctrl-C (or SIGTERM) inside the block is raised at its end, so an update is never half applied."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {sig: signal.signal(sig, lambda *args: caught.append(args)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------- evaluation


def _warped_labels(pair: Pair, u: torch.Tensor) -> torch.Tensor:
    points = pair.grid.points(u.dtype, u.device) + u.movedim(0, -1)
    return sample(pair.moving_labels[None].to(u.dtype), pair.grid, points, mode="nearest")[0].round().long()


def _mean(values) -> float:
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.median(values)), 4) if values else None


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return _mean(dice_per_label(a.cpu(), b.cpu()).values())


def evaluate(network, pairs, options: MethodOptions, *, surfaces: bool = True) -> dict:
    """Register every pair with the method's inference and measure it.

    pairs: a sequence of `Pair`s. Returns `{"pairs", "dice_before", "dice_after", "hd95_before",
    "hd95_after", "folding_percent", "jacobian_min", "per_pair": [...]}`: Dice and HD95 (mm) are
    means over the foreground labels (HD95 over those present in both maps), then over pairs.
    """
    rows = []
    for pair in pairs:
        u = register_pair(network, pair, options)
        warped = _warped_labels(pair, u)
        row = {"dice_before": _dice(pair.moving_labels, pair.fixed_labels),
               "dice_after": _dice(warped, pair.fixed_labels)}
        if surfaces:
            spacing = pair.grid.spacing.tolist()
            row["hd95_before"] = _mean(hausdorff95_per_label(pair.moving_labels.cpu(), pair.fixed_labels.cpu(),
                                                             spacing).values())
            row["hd95_after"] = _mean(hausdorff95_per_label(warped.cpu(), pair.fixed_labels.cpu(), spacing).values())
            folding = jacobian_statistics(u.cpu(), spacing)
            row["folding_percent"], row["jacobian_min"] = folding["percent_negative"], folding["min"]
        rows.append(row)
    summary = {key: _mean(r[key] for r in rows) for key in (rows[0] if rows else {})}
    return {"pairs": len(rows), **summary, "per_pair": rows}


def _label_means(metrics: dict, key: str) -> float:
    value = metrics.get(key)
    return _mean(value.values()) if isinstance(value, dict) else float("nan")


def evaluate_register(network, images, *, losses: tuple[str, ...] = ("learned", "mind"),
                      models: tuple[str, ...] = ("displacement", "svf"), **options) -> dict:
    """Register every `(moving, fixed)` Image pair (with labels) as `sf.register` does with each of
    `losses` ("learned": the network's features, `features=network`; or any image loss, e.g. "mind"
    as a baseline) and each image model of `models`, with the registration `options`. Returns
    `{loss: {model: {"pairs", "dice_before", "dice_after", "hd95_after", "folding_percent",
    "seconds"}}}` (means over foreground labels, then pairs)."""
    from ..pipelines.images import register_images

    out: dict = {}
    for loss in losses:
        extra = {"features": network} if loss == "learned" else {}
        for model in models:
            rows = []
            for moving, fixed in images:
                started = time.perf_counter()
                metrics = register_images(moving, fixed, model, loss, labels_moving=moving.labels,
                                          labels_fixed=fixed.labels, progress=False, **extra, **options).metrics
                rows.append({"dice_before": _label_means(metrics, "dice_before"),
                             "dice_after": _label_means(metrics, "dice"),
                             "hd95_after": _label_means(metrics, "hd95"),
                             "folding_percent": float(metrics.get("jacobian_percent_negative", float("nan"))),
                             "seconds": time.perf_counter() - started})
            summary = {key: _mean(r[key] for r in rows) for key in (rows[0] if rows else {})}
            out.setdefault(loss, {})[model] = {"pairs": len(rows), **summary}
    return out


def _plot_curve(history: list[dict], validation: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    steps = [row["step"] for row in history]
    losses = [row["loss"] for row in history]
    ax.plot(steps, losses, color="0.7", lw=0.8, label="training loss")
    if len(losses) >= 5:
        width = max(len(losses) // 20, 2)
        smooth = np.convolve(losses, np.ones(width) / width, mode="valid")
        ax.plot(steps[width - 1:], smooth, color="C0", label=f"mean of {width}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if validation:
        other = ax.twinx()
        other.plot([v["step"] for v in validation], [v["dice"] for v in validation], "o-", color="C1",
                   label="validation Dice")
        other.set_ylabel("validation Dice")
        other.legend(loc="lower right")
    ax.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path)


# ----------------------------------------------------------------------------- training


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ShapeflowError("[train] device: cuda asked for but no CUDA device is available")
    return torch.device(name)


def _rng_state(generator: torch.Generator, device: torch.device) -> dict:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(generator: torch.Generator, state: dict, device: torch.device) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _forked_rng(device: torch.device):
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@contextlib.contextmanager
def _data_parallel(device: torch.device) -> Iterator[tuple[int, int]]:
    """(rank, world size): under `torchrun` (WORLD_SIZE > 1 in the environment) a process group
    (gloo on the CPU, nccl on CUDA) is joined for the duration of training, unless one exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        yield 0, 1
        return
    dist = torch.distributed
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        if created:
            dist.destroy_process_group()


def _all_reduce_mean(tensors: list[torch.Tensor], world: int) -> None:
    """Average `tensors` in place over the process group, in one flat all-reduce (what
    DistributedDataParallel does to the gradients)."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def train(config: dict | str | Path, output: str | Path, *, resume: bool = True, progress: bool = True) -> dict:
    """Train the configured network with the configured method; write OUTPUT/ (module docstring).

    config: a dict or a TOML path (sections [data], [network], [method], [train]); output: a
    folder, created if missing. resume: continue from OUTPUT/checkpoint.pt when it exists (the
    config must match it, except [train] steps, threads and checkpoint_every); False starts
    afresh, overwriting it. progress: a rich progress bar with the losses on stderr.
    Ctrl-C saves a checkpoint and returns `{"interrupted": True, "step": ...}`; otherwise
    returns the report also written to OUTPUT/report.json. Seeded: the same config gives the
    same weights on the CPU, straight or resumed.

    Under `torchrun --nproc-per-node P` (data parallel): every process draws the same global
    batch of [train] batch pairs (a multiple of P) and trains on its 1/P share; the gradients
    and the logged loss are averaged over the processes (gloo on the CPU, nccl on CUDA), so the
    loss curve is that of one process with the same global batch and seed. Rank 0 validates and
    writes OUTPUT/; the other ranks return `{"rank": r}`.
    """
    config = load_config(config)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ShapeflowError(f"{output}: exists and is not a folder")
    data, method = DataOptions(**config["data"]), MethodOptions(**config["method"])
    options = TrainOptions(**config["train"])
    device = _device(options.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    checkpoint = output / "checkpoint.pt"
    state = load_checkpoint(checkpoint) if resume and checkpoint.exists() else None
    if state is not None and _resumable(state["config"]) != _resumable(config):
        difference = _first_difference(_resumable(state["config"]), _resumable(config))
        raise ShapeflowError(f"{checkpoint}: written for another config ({difference}); use another output folder "
                             "or start again without resuming")
    if state is not None and state["step"] > options.steps:
        raise ShapeflowError(f"{checkpoint}: already at step {state['step']}, beyond [train] steps = {options.steps}")
    output.mkdir(parents=True, exist_ok=True)
    with torch_threads(options.threads), _forked_rng(device), _data_parallel(device) as (rank, world):
        if options.batch % world:
            raise ShapeflowError(f"[train] batch: {options.batch} pairs do not split over {world} processes; "
                                 "choose a multiple of the process count")
        splits = {name: _Split(data, name, getattr(data, name), device) for name in ("train", "validation", "test")}
        dim = len(data.size) if data.source == "phantoms" else splits["train"][0].grid.dim
        torch.manual_seed(options.seed)
        network = _build_network(config, dim, lambda: [image for i in range(len(splits["train"]))
                                                       for image in splits["train"][i][:2]]).to(device)
        initial_weights = {k: v.detach().clone() for k, v in network.state_dict().items()}
        optimizer = torch.optim.Adam(network.parameters(), lr=options.lr)
        generator = torch.Generator().manual_seed(options.seed)
        step, history, validation, seconds = 0, [], [], 0.0
        if state is not None:
            network.load_state_dict(state["weights"])
            initial_weights = state["initial"]
            optimizer.load_state_dict(state["optimizer"])
            _set_rng_state(generator, state["rng"], device)
            step, history, validation = int(state["step"]), state["history"], state["validation"]
            seconds = float(state.get("seconds", 0.0))

        if world > 1:          # the same start everywhere (the seed gives it; rank 0's weights make sure)
            for tensor in network.state_dict().values():
                torch.distributed.broadcast(tensor, 0)

        def save(rng: dict) -> None:
            if rank:
                return
            _atomic_save({"format": CHECKPOINT_FORMAT, "step": step, "weights": network.state_dict(),
                          "initial": initial_weights,
                          "optimizer": optimizer.state_dict(), "rng": rng, "config": json.dumps(config),
                          "history": json.dumps(history), "validation": json.dumps(validation),
                          "network": json.dumps(network.config()), "seconds": elapsed()}, checkpoint)
            saved.append(step)

        def elapsed() -> float:
            return seconds + time.perf_counter() - started

        def validate() -> dict:
            """Mean Dice on the validation pairs when due at `step` and not yet measured there."""
            due = not rank and options.validate_every and len(splits["validation"]) and step > 0 \
                and (step % options.validate_every == 0 or step == options.steps)
            if not due or (validation and validation[-1]["step"] == step):
                return {}
            network.eval()
            score = evaluate(network, splits["validation"], method, surfaces=False)["dice_after"]
            validation.append({"step": step, "dice": score})
            return {"val_dice": score}

        rng, saved, started = _rng_state(generator, device), [], time.perf_counter()
        try:
            validate()                                   # one that Ctrl-C cut short before the checkpoint
            with progress_bar(progress and not rank, f"train {method.name}", max(options.steps - step, 0)) as update:
                while step < options.steps:
                    rng = _rng_state(generator, device)          # the state a resumed run restarts from
                    began = time.perf_counter()
                    network.train()
                    index = torch.randint(len(splits["train"]), (options.batch,), generator=generator).tolist()
                    batch = [splits["train"][i] for i in index[rank::world]]     # this process's share
                    loss, metrics = METHODS[method.name](network, batch, method, generator)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if world > 1:
                        _all_reduce_mean([p.grad for p in network.parameters() if p.grad is not None], world)
                        logged = [k for k, v in metrics.items() if k in ("loss", "dice") and isinstance(v, float)]
                        means = torch.tensor([metrics[k] for k in logged], dtype=torch.float64)
                        _all_reduce_mean([means], world)
                        metrics = {**metrics, **dict(zip(logged, means.tolist()))}
                    finite = bool(torch.isfinite(loss.detach()).all()) and all(
                        bool(torch.isfinite(p.grad).all()) for p in network.parameters() if p.grad is not None)
                    bad = torch.tensor([0.0 if finite else 1.0], dtype=torch.float64)
                    if world > 1:          # every process stops if one diverged
                        _all_reduce_mean([bad], world)
                    if float(bad) > 0:
                        # diverged (a non-finite loss or gradient; the solver's backward may hide a NaN
                        # loss as a finite gradient): the weights are still the last good step's; stop
                        save(rng)
                        return {"diverged": True, "step": step, "steps": options.steps, "output": str(output),
                                "checkpoint": str(checkpoint)}
                    with _deferred_interrupt():
                        optimizer.step()
                        step += 1
                        history.append({"step": step, **metrics, "seconds": round(time.perf_counter() - began, 4)})
                        rng = _rng_state(generator, device)
                    row = {**metrics, **validate()}
                    if step % options.checkpoint_every == 0 or step == options.steps:
                        with _deferred_interrupt():
                            save(rng)
                    update(row)
        except KeyboardInterrupt:
            save(rng)
            return {"interrupted": True, "step": step, "steps": options.steps, "output": str(output),
                    "checkpoint": str(checkpoint)}
        if state is None and not saved:      # steps = 0: still leave a checkpoint of the initial state
            save(rng)
        if rank:
            return {"rank": rank, "steps": options.steps, "output": str(output)}
        initial = copy.deepcopy(network)
        initial.load_state_dict(initial_weights)
        return _finish(network, initial, config, method, splits["test"], history, validation, elapsed(), output)


def _test_report(network, initial, method: MethodOptions, test: _Split) -> dict | None:
    """The test pairs registered by the method's Gauss-Newton with the trained and the initial
    network, and by `sf.register` with the learned features (feature networks) and with MIND,
    each with the displacement and the svf model, at the training's solver settings: one level
    (the network saw full-resolution images only), the method's `lam` and largest iteration
    count, and for phantoms (no affine part) no affine pre-alignment."""
    if not len(test):
        return None
    pairs = [test[i] for i in range(len(test))]
    images = [test.images(i)[:2] for i in range(len(test))]
    report = {"pairs": len(pairs), "method": evaluate(network, pairs, method),
              "initial": evaluate(initial, pairs, method)}
    losses = ("learned", "mind") if getattr(network, "kind", None) == "features" else ("mind",)
    options = {"regularization": method.lam, "levels": 1, "iterations": method.iterations[1],
               **({"prealign": None} if test.data.source == "phantoms" else {})}
    report["register"] = evaluate_register(network, images, losses=losses, **options)
    report["register_options"] = options
    return report


def _finish(network, initial, config: dict, method: MethodOptions, test: _Split, history: list, validation: list,
            seconds: float, output: Path) -> dict:
    """Write model.pt, report.json and curve.png; return the report."""
    from .features import save_features

    network.eval()
    initial.eval()
    save_features(output / "model.pt", network, extra={"config": config, "method": method.name,
                                                       "steps": config["train"]["steps"]})
    last = [row["loss"] for row in history[-10:]]
    report = {"method": method.name, "network": network.config(), "steps": config["train"]["steps"],
              "seconds": round(seconds, 3), "seconds_per_step": _median(row.get("seconds") for row in history),
              "final_loss": _mean(last) if last else None, "validation": validation,
              "test": _test_report(network, initial, method, test), "config": config,
              "interrupted": False}
    _plot_curve(history, validation, output / "curve.png")
    report["files"] = sorted(p.name for p in output.iterdir() if not p.name.startswith("."))
    if "report.json" not in report["files"]:
        report["files"] = sorted(report["files"] + ["report.json"])
    (output / "report.json").write_text(json.dumps(report, indent=2, allow_nan=True))
    return {**report, "output": str(output)}
