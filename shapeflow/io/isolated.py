"""Run a reader backed by C++ code (VTK, ITK) in a forked child process, so that a corrupt file
which crashes it (a segmentation fault on out-of-range cell indices in VTK, on `NDims = -1` in
ITK; found by benchmarks/fuzz_readers.py) becomes a one-line `ShapeflowError` instead of killing
the user's process.

The child runs the reader and sends back its result (NumPy arrays, `Image` fields) through a pipe;
the parent rebuilds it. Where `fork` does not exist (Windows, macOS' default), the reader runs in
this process, as before.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ShapeflowError
from ..shapes import Image

__all__ = ["read_isolated"]


def _to_wire(value: Any) -> Any:
    """Tensors and Images as plain NumPy structures (what crosses the pipe)."""
    if isinstance(value, Image):
        return {"__image__": True, "data": value.data.numpy(), "spacing": np.asarray(value.spacing),
                "origin": np.asarray(value.origin), "direction": np.asarray(value.direction), "source": value.source}
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


def _from_wire(value: Any) -> Any:
    if isinstance(value, dict) and value.get("__image__"):
        return Image(torch.from_numpy(value["data"]), spacing=value["spacing"], origin=value["origin"],
                     direction=value["direction"], source=value["source"])
    if isinstance(value, dict):
        return {k: _from_wire(v) for k, v in value.items()}
    return value


def _child(reader: Callable[[Path], Any], path: Path, conn) -> None:
    try:
        conn.send(("ok", _to_wire(reader(path))))
    except ShapeflowError as exc:
        conn.send(("refused", str(exc)))
    except Exception as exc:  # noqa: BLE001 - reported by the parent like any unreadable file
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def read_isolated(reader: Callable[[Path], Any], path: Path) -> Any:
    """`reader(path)`, run in a forked child; a child killed by a signal (a crash in C++ code) is
    a `ShapeflowError` naming the file. Other failures come back as they would in process."""
    if "fork" not in multiprocessing.get_all_start_methods() or os.environ.get("SHAPEFLOW_NO_ISOLATION"):
        return reader(path)
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(reader, path, send), daemon=True)
    child.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:            # the child died before sending: a crash
        status, payload = "crashed", None
    finally:
        receive.close()
        child.join()
    if status == "ok":
        return _from_wire(payload)
    if status == "refused":
        raise ShapeflowError(payload)
    if status == "failed":
        raise ValueError(payload)       # `sf.read` turns it into its "unreadable" one-liner
    code = -child.exitcode if child.exitcode and child.exitcode < 0 else child.exitcode
    name = signal.Signals(code).name if code in signal.Signals._value2member_map_ else str(code)
    raise ShapeflowError(f"{path}: the reader crashed on this file ({name}): a corrupt or truncated file")
