"""Running shapeflow's numba kernels without touching the user's process state.

numba's thread count is process state the user may have set (`numba.set_num_threads`): our
kernels follow torch's thread count only inside `numba_threads()`, which restores numba's count.
numba stays optional at run time: callers check it can be imported (`_optional.is_available`).
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator

import torch

__all__ = ["target_threads", "numba_threads", "numba_variants", "run_numba"]


def target_threads() -> int:
    """Threads for shapeflow's numba kernels: `torch.get_num_threads()`, capped at
    `NUMBA_NUM_THREADS` (numba must be importable)."""
    import numba

    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


@contextlib.contextmanager
def numba_threads() -> Iterator[None]:
    """Run numba's parallel kernels with `torch.get_num_threads()` threads, restoring numba's count.

    numba's thread count is process state the user may have set (`numba.set_num_threads`); the
    kernels of `shapeflow.solvers.normal._fused` and `shapeflow.solvers.linear._sparse` follow torch's count
    (capped at `NUMBA_NUM_THREADS`) only inside this block. Needs numba to be importable.
    """
    import numba

    old = numba.get_num_threads()
    want = target_threads()
    if want == old:
        yield
        return
    numba.set_num_threads(want)
    try:
        yield
    finally:
        numba.set_num_threads(old)


def numba_variants(fn: Callable) -> tuple[Callable, Callable]:
    """(serial, parallel) numba dispatchers (fastmath, cached) of one Python kernel using `prange`.

    The two get distinct qualified names so numba's on-disk cache keeps them apart; each
    compiles (or loads from that cache) on its first call only.
    """
    import numba

    def variant(parallel: bool) -> Callable:
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        copy.__qualname__ = f"{fn.__qualname__}_{'parallel' if parallel else 'serial'}"
        return numba.njit(parallel=parallel, fastmath=True, cache=True)(copy)

    return variant(False), variant(True)


def run_numba(variants: tuple[Callable, Callable], *args, serial_at_one_thread: bool = True):
    """Run a kernel from `numba_variants` with torch's thread count: the serial variant at one
    thread (no numba thread pool involved: on a busy machine each parallel launch could stall for
    a scheduler tick, measured 8x slower on the sparse CG), the parallel one inside
    `numba_threads()` otherwise (always with `serial_at_one_thread=False`)."""
    serial, parallel = variants
    if serial_at_one_thread and target_threads() == 1:
        return serial(*args)
    with numba_threads():
        return parallel(*args)
