"""How many threads torch uses inside one of our calls, restored afterwards.

torch's thread count is process state: `register` changes it only inside its own call
(`torch_threads`), never for the rest of the user's process. On a machine shared with other jobs,
two OpenMP threads can stall each other for a scheduler tick at every parallel region; a small
problem then runs 10-50x slower with 2 threads than with 1 (measured on this project's 2-core
machine: pycpd's fish 43 s instead of ~1 s), while one thread loses little where the work per
call is small. `auto_threads` therefore runs small problems on one thread and leaves large ones
to torch's setting.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["torch_threads", "auto_threads", "SMALL_PROBLEM"]

#: problems up to this size (points of both shapes, or voxels of the fixed image) run on one thread
SMALL_PROBLEM = 50_000


def auto_threads(size: int, threads: int | None) -> int:
    """The threads a call of `size` (points or voxels) runs with: `threads` when given, else 1
    for a small problem and torch's current count otherwise."""
    if threads is not None:
        return int(threads)
    return 1 if size <= SMALL_PROBLEM else torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `torch.set_num_threads(count)`, restoring the caller's count after."""
    old = torch.get_num_threads()
    if count == old:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(old)
