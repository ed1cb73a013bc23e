"""File helpers: extensions, and atomic writes (a temporary file beside the target, renamed into place)."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import ShapeflowError

__all__ = ["atomic_folder", "atomic_write", "default_mode", "suffix_of"]

#: errno values of a full disk or an exhausted quota
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def suffix_of(path: str | os.PathLike) -> str:
    """The lower-case extension of `path` (".nii.gz" counts as one)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def default_mode(kind: int = 0o666) -> int:
    """`kind` masked by the process umask (mkstemp/mkdtemp create 0600/0700 entries)."""
    mask = os.umask(0)
    os.umask(mask)
    return kind & ~mask


def atomic_write(path: Path, writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp)` on a temporary file beside `path`, then rename it onto `path`.
    A failure leaves `path` as it was and no temporary file behind."""
    path = Path(path)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix   # writers look at it
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:-len(suffix) or None]}.", suffix=suffix)
    os.close(fd)
    try:
        writer(Path(tmp))
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise ShapeflowError(f"{path}: no space left on the device while writing; nothing was written "
                                 f"(free some space and run again)") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(directory: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden staging folder beside `directory`; when the block ends without error, the
    staging folder replaces `directory`. A failure (or Ctrl-C) leaves `directory` as it was and
    no staging folder behind. An existing `directory` is an error unless `overwrite`."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise ShapeflowError(f"{directory}: output folder exists; choose another or pass overwrite (--overwrite)")
    if directory.exists() and not directory.is_dir():
        raise ShapeflowError(f"{directory}: exists and is not a folder")
    parent = directory.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{directory.name}."))
    os.chmod(staging, default_mode(0o777))
    try:
        yield staging
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise ShapeflowError(f"{directory}: no space left on the device while writing; nothing was written "
                                 f"(free some space and run again)") from None
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
