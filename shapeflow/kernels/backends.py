"""The one place where a pairwise computation picks its engine: KeOps or dense torch.

`resolve_backend(backend, n, m, device)` is the rule for every N x M reduction in shapeflow
(Gaussian kernel sums, Sinkhorn through geomloss, nearest neighbours):

* "auto" -> "keops" on a CUDA device, or when `n * m > keops_min_pairs`; "torch" below.
* "keops" / "torch" are taken as given; any other name is a ShapeflowError listing the valid ones.

`KEOPS_MIN_PAIRS` is measured on the CPU by `benchmarks/kernels.py` (the crossover of dense
torch and KeOps for a Gaussian kernel sum, forward + backward, float32; see
benchmarks/results/kernels.md). Operations with a better CPU path than KeOps pass their own
`keops_min_pairs` (nearest neighbours: a KD-tree, so KeOps only on CUDA).

pykeops is imported only when a KeOps path runs, through `import_keops`, silently: its CUDA
notice and compilation messages are not printed (`pykeops.set_verbose(False)` once imported).
"""
from __future__ import annotations

import contextlib
import io
import sys
from types import ModuleType

import torch

from .._optional import import_optional
from .._registry import Registry

__all__ = ["BACKENDS", "SINKHORN_BACKENDS", "KEOPS_MIN_PAIRS", "MULTISCALE_MIN_PAIRS", "resolve_backend",
           "sinkhorn_backend", "import_keops", "quiet_import"]

BACKENDS = Registry("backend", {
    "auto": "KeOps on CUDA or above KEOPS_MIN_PAIRS point pairs, dense torch below",
    "keops": "pykeops LazyTensor reductions: O(N + M) memory, compiled once per formula",
    "torch": "dense torch: an (N, M) matrix in memory",
})

#: N * M above which `auto` takes KeOps on the CPU. The dense sum is a matrix product
#: (`|x|^2 + |y|^2 - 2 x.y`) and beat KeOps forward + backward on the 2-core dev CPU up to
#: N = M = 12000; KeOps won at 16000 (1.15x; benchmarks/kernels.py, results/kernels.md). The
#: switch sits at the crossover, 14000^2 pairs, where the dense (N, M) matrix is also 0.8 GB in
#: float32 (the backward holds several); KeOps needs O(N + M) memory.
KEOPS_MIN_PAIRS = 14_000 ** 2

#: Sinkhorn backends (ours dense, geomloss's otherwise); "auto" goes through `resolve_backend`.
SINKHORN_BACKENDS = Registry("Sinkhorn backend", {
    "auto": "dense below the KeOps threshold, online or multiscale (KeOps) above",
    "dense": "dense cost matrices in torch, warm-started across a fit's steps (shapeflow.losses.sinkhorn)",
    "tensorized": "geomloss's dense cost matrices in torch (no warm start: the reference)",
    "online": "KeOps reductions, exact",
    "multiscale": "KeOps block-sparse reductions on clustered points (d <= 3), truncated kernel",
})

#: N * M above which Sinkhorn on the KeOps side uses geomloss's multiscale scheme (d <= 3),
#: geomloss's own heuristic.
MULTISCALE_MIN_PAIRS = 10000 ** 2


def resolve_backend(backend: str, n: int, m: int, device: torch.device | str,
                    *, keops_min_pairs: float | None = None, who: str = "resolve_backend()") -> str:
    """"keops" or "torch" for an N x M reduction on `device`.

    backend: "auto", "keops" or "torch". "auto" is "keops" on CUDA or when `n * m >
    keops_min_pairs` (None: `KEOPS_MIN_PAIRS`, measured; `math.inf`: KeOps only on CUDA).
    """
    BACKENDS.lookup(backend, who)
    if backend != "auto":
        return backend
    if keops_min_pairs is None:
        keops_min_pairs = KEOPS_MIN_PAIRS
    return "keops" if torch.device(device).type == "cuda" or n * m > keops_min_pairs else "torch"


def sinkhorn_backend(backend: str, n: int, m: int, d: int, device: torch.device | str,
                     *, who: str = "sinkhorn_loss()") -> str:
    """geomloss backend for Sinkhorn between (N, d) and (M, d) clouds on `device`.

    backend: "auto", "dense", "tensorized", "online" or "multiscale". "auto": "dense" where
    `resolve_backend` says "torch"; otherwise "multiscale" when d <= 3 and `n * m >
    MULTISCALE_MIN_PAIRS`, else "online".
    """
    SINKHORN_BACKENDS.lookup(backend, who)
    if backend != "auto":
        return backend
    if resolve_backend("auto", n, m, device, who=who) == "torch":
        return "dense"
    return "multiscale" if d <= 3 and n * m > MULTISCALE_MIN_PAIRS else "online"


def quiet_import(module: str, feature: str) -> ModuleType:
    """`import_optional(module, feature)` with stdout and stderr silenced (pykeops prints a CUDA
    notice on import, also when geomloss imports it); pykeops messages stay off afterwards."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        imported = import_optional(module, feature)
        pykeops = sys.modules.get("pykeops")
        if pykeops is not None and getattr(pykeops, "verbose", False):
            pykeops.set_verbose(False)
    return imported


def import_keops(feature: str) -> ModuleType:
    """`pykeops.torch`, imported silently (an ImportError naming `feature` when missing)."""
    return quiet_import("pykeops.torch", feature)

