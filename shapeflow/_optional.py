"""Import optional heavy dependencies where they are used, with the install hint in the error."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# module name -> the shapeflow extra that installs it
EXTRAS = {"cupy": "gpu", "cupyx": "gpu", "pyamg": "amg", "SimpleITK": "itk", "pydicom": "dicom",
          "dask": "cluster", "distributed": "cluster", "fsspec": "cluster"}


def is_available(module: str) -> bool:
    """True when `module` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def import_optional(module: str, feature: str) -> ModuleType:
    """Import `module` or raise an ImportError naming `feature` and the extra that installs it.

    The one helper for optional parts (CuPy, pyamg, SimpleITK, pydicom; core dependencies such as
    PyVista or KeOps also go through it, so a broken install gives the same one-line hint)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        root = module.split(".")[0]
        extra = EXTRAS.get(root)
        hint = f'pip install "shapeflow[{extra}]"' if extra else f"pip install {root} (a dependency of shapeflow)"
        raise ImportError(f"{feature} needs {root}, which is not installed: {hint}") from exc
