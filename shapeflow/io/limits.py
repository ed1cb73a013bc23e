"""Size limits checked from a file's header before a reader allocates anything.

A corrupt or hostile header can announce 10^9 vertices or a 10^5-cubed volume; the libraries we
read with (VTK above all) would try to allocate that and be killed by the system. Each check here
reads only the header text and refuses, in one line naming the file, counts that cannot fit in
the file (uncompressed formats) or exceed `MAX_POINTS` / `MAX_VOXELS` (compressed ones).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import ShapeflowError

__all__ = ["MAX_POINTS", "MAX_VOXELS", "check_vtk_counts"]

#: the most voxels (times channels) an image may have: 2^31, 8 GiB in float32
MAX_VOXELS = 2 ** 31
#: the most points (or cells) a shape file may announce where its size cannot bound them
MAX_POINTS = 2 * 10 ** 8

_LEGACY = {  # keyword -> how many values each announced item takes at least (None: read the size field)
    rb"POINTS": 3, rb"VERTICES": None, rb"LINES": None, rb"POLYGONS": None, rb"TRIANGLE_STRIPS": None,
    rb"CELLS": None, rb"POINT_DATA": 1, rb"CELL_DATA": 1,
}
_LEGACY_LINE = re.compile(rb"^[ \t]*(POINTS|VERTICES|LINES|POLYGONS|TRIANGLE_STRIPS|CELLS|POINT_DATA|CELL_DATA|"
                          rb"DIMENSIONS)[ \t]+([-+0-9 \t]+)", re.MULTILINE)
_XML_COUNT = re.compile(rb'(NumberOfPoints|NumberOfCells|NumberOfPolys|NumberOfVerts|NumberOfLines|NumberOfStrips)'
                        rb'="\s*(-?\d+)\s*"')
_XML_EXTENT = re.compile(rb'WholeExtent="([-+0-9 \t]+)"')


def check_vtk_counts(path: Path) -> None:
    """Refuse a VTK file (legacy `.vtk` or XML `.vtp/.vti/.vtu`) whose header announces more than
    it can hold. Legacy files are not compressed: every announced value takes at least one byte.
    XML files may be compressed: points and cells are capped at `MAX_POINTS`, voxels at `MAX_VOXELS`."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(64)
        handle.seek(0)
        text = handle.read()
    if head.lstrip().startswith(b"# vtk DataFile"):
        lines = text.split(b"\n", 4)
        version = re.match(rb"\s*# vtk DataFile Version ([1-5])\.([0-9])\s*$", lines[0])
        if version is None or not 1 <= int(version.group(1)) <= 5:
            raise ShapeflowError(f"{path}: not a VTK legacy file of a known version (first line "
                                 f"{lines[0][:60].decode('ascii', 'replace')!r})")
        if len(lines) < 4 or lines[2].strip() not in (b"ASCII", b"BINARY") or not lines[3].startswith(b"DATASET "):
            raise ShapeflowError(f"{path}: a VTK legacy header needs a title line, ASCII or BINARY, and a DATASET line")
        values = 0
        for match in _LEGACY_LINE.finditer(text):
            keyword, numbers = match.group(1), [int(n) for n in match.group(2).split() if n.lstrip(b"+-").isdigit()]
            if not numbers:
                continue
            if any(n < 0 for n in numbers):
                raise ShapeflowError(f"{path}: the VTK header announces a negative count ({keyword.decode()} "
                                     f"{' '.join(map(str, numbers))})")
            if keyword == b"DIMENSIONS":
                values += math.prod(numbers[:3])
            elif _LEGACY[keyword] is None:
                values += numbers[1] if len(numbers) > 1 else numbers[0]
            else:
                values += _LEGACY[keyword] * numbers[0]
        if values > size:
            raise ShapeflowError(f"{path}: the VTK header announces {values} values but the file holds {size} bytes "
                                 f"(truncated, or a corrupt count)")
        return
    for match in _XML_COUNT.finditer(text[:1 << 20]):
        count = int(match.group(2))
        if not 0 <= count <= MAX_POINTS:
            raise ShapeflowError(f"{path}: the VTK header announces {match.group(1).decode()}={count}, outside "
                                 f"[0, {MAX_POINTS:.3g}] (shapeflow.io.limits.MAX_POINTS)")
    for match in _XML_EXTENT.finditer(text[:1 << 20]):
        bounds = [int(n) for n in match.group(1).split()]
        if len(bounds) == 6:
            voxels = math.prod(max(0, hi - lo + 1) for lo, hi in zip(bounds[::2], bounds[1::2]))
            if voxels > MAX_VOXELS:
                raise ShapeflowError(f"{path}: the VTK header announces an extent of {voxels:.3g} voxels, above the "
                                     f"limit of {MAX_VOXELS:.3g} (shapeflow.io.limits.MAX_VOXELS)")
