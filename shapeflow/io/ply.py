"""PLY, read and written here (ASCII and binary, either byte order) so that nothing in the file
is lost: coordinates at their stored precision, polygons of any size, and every vertex and face
property (`nx ny nz` as `point_data["normals"]`, `red green blue [alpha]` as "colors", any other
scalar property under its own name). Writing is binary little-endian; coordinates are `float`
for float32 points, `double` for float64 ones.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ShapeflowError

__all__ = ["read_ply", "write_ply"]

_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
          "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
          "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
_NAMES = {"i1": "char", "u1": "uchar", "i2": "short", "u2": "ushort", "i4": "int", "u4": "uint", "f4": "float",
          "f8": "double"}
#: groups of scalar properties read as one (N, k) array, and written back as those properties
GROUPS = {"normals": ("nx", "ny", "nz"), "colors": ("red", "green", "blue", "alpha")}
_INDICES = ("vertex_indices", "vertex_index")


# --- reading ------------------------------------------------------------------------------------
def _header(handle) -> tuple[str, list]:
    """(format, [(element, count, [(property, dtype, list count dtype or None)])]); a ValueError
    (reported as an unreadable file) for anything else."""
    if handle.readline().strip() != b"ply":
        raise ValueError("no 'ply' line first")
    fmt, elements = None, []
    for raw in handle:
        words = raw.decode("ascii", "replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            break
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements:
            if words[1] == "list":
                elements[-1][2].append((words[4], _TYPES[words[3]], _TYPES[words[2]]))
            else:
                elements[-1][2].append((words[2], _TYPES[words[1]], None))
        else:
            raise ValueError(f"unexpected header line {raw.decode('ascii', 'replace').strip()[:40]!r}")
    else:
        raise ValueError("no end_header line")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"unknown format {fmt!r}")
    return fmt, elements


def _layout(props, counts, order: str) -> np.dtype:
    """The record dtype of an element whose lists have the given lengths."""
    fields = []
    for (name, kind, count_kind), count in zip(props, counts):
        if count_kind is None:
            fields.append((name, order + kind))
        else:
            fields += [(f"{name}#n", order + count_kind), (name, order + kind, (count,))]
    return np.dtype(fields)


def _read_binary(buffer: bytes, at: int, props, count: int, order: str) -> tuple[dict, int]:
    """One element's properties from `buffer` at byte `at`: ({name: (count,) or list array}, next byte)."""
    lists = [p for p in props if p[2] is not None]
    if not lists:
        layout = _layout(props, [None] * len(props), order)
        data = np.frombuffer(buffer, layout, count, at)
        return {name: data[name] for name, _, _ in props}, at + layout.itemsize * count
    # fast path: every list as long as in the first record
    counts, probe = [], at
    for name, kind, count_kind in props:
        if count_kind is None:
            probe += np.dtype(kind).itemsize
        else:
            counts.append(int(np.frombuffer(buffer, order + count_kind, 1, probe)[0]) if count else 0)
            probe += np.dtype(count_kind).itemsize + counts[-1] * np.dtype(kind).itemsize
    full = [counts.pop(0) if p[2] is not None else None for p in props]
    layout = _layout(props, full, order)
    if count == 0 or at + layout.itemsize * count <= len(buffer):
        data = np.frombuffer(buffer, layout, count, at)
        if all((data[f"{name}#n"] == n).all() for (name, _, kind), n in zip(props, full) if kind is not None):
            return {name: data[name] for name, _, _ in props}, at + layout.itemsize * count
    columns: dict[str, list] = {name: [] for name, _, _ in props}     # mixed list lengths: record by record
    for _ in range(count):
        for name, kind, count_kind in props:
            if count_kind is None:
                columns[name].append(np.frombuffer(buffer, order + kind, 1, at)[0])
                at += np.dtype(kind).itemsize
            else:
                n = int(np.frombuffer(buffer, order + count_kind, 1, at)[0])
                at += np.dtype(count_kind).itemsize
                columns[name].append(np.frombuffer(buffer, order + kind, n, at))
                at += n * np.dtype(kind).itemsize
    return {name: (np.asarray(columns[name], dtype=kind) if count_kind is None else columns[name])
            for name, kind, count_kind in props}, at


def _read_ascii(tokens: list[str], at: int, props, count: int) -> tuple[dict, int]:
    """One element from the ASCII tokens at index `at`: ({name: array or list}, next index)."""
    if all(p[2] is None for p in props):
        table = np.asarray(tokens[at: at + count * len(props)], dtype=np.float64).reshape(count, len(props))
        return {name: _ascii_cast(table[:, j], kind) for j, (name, kind, _) in enumerate(props)}, \
            at + count * len(props)
    columns: dict[str, list] = {name: [] for name, _, _ in props}
    for _ in range(count):
        for name, kind, count_kind in props:
            if count_kind is None:
                columns[name].append(float(tokens[at]))
                at += 1
            else:
                n = int(tokens[at])
                columns[name].append(np.asarray(tokens[at + 1: at + 1 + n], dtype=np.int64))
                at += n + 1
    return {name: (_ascii_cast(np.asarray(columns[name]), kind) if count_kind is None else columns[name])
            for name, kind, count_kind in props}, at


def _ascii_cast(values: np.ndarray, kind: str) -> np.ndarray:
    # an ASCII file may write more digits than its declared float holds: keep them all
    return values if kind[0] == "f" else values.astype(kind)


def _group(columns: dict, path: Path, what: str) -> dict[str, np.ndarray]:
    """Scalar properties -> data arrays, with `GROUPS` joined into (N, k) arrays."""
    out = {}
    names = list(columns)
    for key, members in GROUPS.items():
        present = [m for m in members if m in columns]
        if len(present) >= 3 and present == list(members[:len(present)]):
            out[key] = np.stack([np.asarray(columns[m]) for m in present], axis=1)
            names = [n for n in names if n not in present]
    for name in names:
        if isinstance(columns[name], list):
            raise ShapeflowError(f"{path}: PLY {what} property {name!r} is a list; only scalar {what} properties "
                                 "are read")
        out[name] = np.asarray(columns[name])
    return out


def _check_counts(path: Path, fmt: str, elements, size: int) -> None:
    """Refuse a header whose element counts cannot fit in the `size` bytes after it (a truncated
    file, or a corrupt or hostile count such as 10^9 vertices), before anything is allocated.
    The least a record takes: its fixed-size properties plus empty lists (binary), or one
    character and one separator per property (ASCII)."""
    need = 0
    for name, count, props in elements:
        if fmt == "ascii":
            least = 2 * len(props)
        else:
            least = sum(np.dtype(kind if count_kind is None else count_kind).itemsize
                        for _, kind, count_kind in props)
        need += count * least
        if need > size + 1:         # + 1: the last ASCII value needs no separator
            raise ShapeflowError(f"{path}: the PLY header announces {count} {name} records, which need at least "
                                 f"{need} bytes, but the file holds {size} bytes after its header (truncated, or a "
                                 f"corrupt count)")


def read_ply(path: Path) -> dict:
    """{points (N, 3) as stored (float32 for `float`, float64 for `double` and ASCII), polygons
    (flat) or None, point_data, cell_data} of a PLY file."""
    with open(path, "rb") as handle:
        fmt, elements = _header(handle)
        body = handle.read()
    _check_counts(path, fmt, elements, len(body))
    tokens = body.decode("ascii", "replace").split() if fmt == "ascii" else None
    order = "<" if fmt == "binary_little_endian" else ">"
    at, read = 0, {}
    for name, count, props in elements:
        if tokens is None:
            read[name], at = _read_binary(body, at, props, count, order)
        else:
            read[name], at = _read_ascii(tokens, at, props, count)
    unknown = [f"{n} ({c})" for n, c, _ in elements if c and n not in ("vertex", "face")]
    if unknown:
        raise ShapeflowError(f"{path}: PLY element {', '.join(unknown)} is not read (only vertex and face are)")
    vertex = read.get("vertex", {})
    if not all(axis in vertex for axis in "xyz"):
        raise ShapeflowError(f"{path}: the PLY vertices have no x, y and z properties")
    points = np.stack([np.asarray(vertex.pop(axis)) for axis in "xyz"], axis=1)        # as stored
    face = read.get("face", {})
    polygons = None
    indices = next((face.pop(k) for k in _INDICES if k in face), None)
    if indices is not None and len(indices):
        if isinstance(indices, np.ndarray):                                     # (F, k): one size
            polygons = np.c_[np.full(len(indices), indices.shape[1]), indices].ravel()
        else:
            polygons = np.concatenate([np.r_[len(p), p] for p in indices]).astype(np.int64)
    return {"points": points, "polygons": polygons, "point_data": _group(vertex, path, "vertex"),
            "cell_data": _group(face, path, "face") if polygons is not None else {}}


# --- writing ------------------------------------------------------------------------------------
def _ply_kind(array: np.ndarray, path: Path, name: str) -> str:
    kind = array.dtype.kind
    if kind == "b":
        return "u1"
    if kind in "iu" and array.dtype.itemsize == 8:
        small = array.size == 0 or (array.min() >= np.iinfo(np.int32).min and array.max() <= np.iinfo(np.int32).max)
        return "i4" if small else "f8"
    if kind == "f" and array.dtype.itemsize < 4:
        return "f4"
    code = array.dtype.str[1:]
    if code not in _NAMES:
        raise ShapeflowError(f"{path}: PLY cannot hold {name!r} of type {array.dtype}")
    return code


def _properties(data: dict[str, np.ndarray], path: Path, what: str) -> list[tuple[str, np.ndarray]]:
    """(property name, (N,) column) for each data array: GROUPS split, other arrays one column."""
    out = []
    for key, array in data.items():
        if key in GROUPS and array.ndim == 2 and 3 <= array.shape[1] <= len(GROUPS[key]):
            out += [(member, array[:, j]) for j, member in enumerate(GROUPS[key][:array.shape[1]])]
        elif array.ndim == 1 and key.isidentifier():
            out.append((key, array))
        else:
            raise ShapeflowError(f"{path}: PLY holds {what} data of one column each (and normals, colors), not "
                                 f"{key!r} of shape {array.shape}; write .vtk or .vtp")
    return out


def write_ply(points: np.ndarray, polygons: np.ndarray | None, point_data: dict, cell_data: dict,
              path: Path) -> None:
    """Binary PLY: points (N, 3) float32 or float64, polygons (flat layout) or None, data arrays per
    point and per face."""
    kind = "f4" if points.dtype == np.float32 else "f8"
    vertex = [(axis, points[:, j], kind) for j, axis in enumerate("xyz")]
    vertex += [(n, c, _ply_kind(c, path, n)) for n, c in _properties(point_data, path, "per-point")]
    header = ["ply", "format binary_little_endian 1.0", "comment written by shapeflow",
              f"element vertex {len(points)}"] + [f"property {_NAMES[k]} {n}" for n, _, k in vertex]
    records = np.empty(len(points), np.dtype([(n, "<" + k) for n, _, k in vertex]))
    for name, column, _ in vertex:
        records[name] = column
    chunks = [records.tobytes()]
    if polygons is not None:
        sizes = _sizes(polygons)
        count_kind = "u1" if sizes.max() < 256 else "i4"
        face = [(n, c, _ply_kind(c, path, n)) for n, c in _properties(cell_data, path, "per-face")]
        header += [f"element face {len(sizes)}", f"property list {_NAMES[count_kind]} int vertex_indices"]
        header += [f"property {_NAMES[k]} {n}" for n, _, k in face]
        chunks.append(_face_bytes(polygons, sizes, count_kind, face))
    with open(path, "wb") as handle:
        handle.write(("\n".join(header) + "\nend_header\n").encode("ascii"))
        for chunk in chunks:
            handle.write(chunk)


def _sizes(polygons: np.ndarray) -> np.ndarray:
    from ..shapes import polygon_sizes

    return polygon_sizes(polygons)


def _face_bytes(polygons: np.ndarray, sizes: np.ndarray, count_kind: str, face: list) -> bytes:
    if (sizes == sizes[0]).all():                                        # one size: one structured array
        k = int(sizes[0])
        layout = np.dtype([("n", "<" + count_kind), ("i", "<i4", (k,))] + [(n, "<" + t) for n, _, t in face])
        records = np.empty(len(sizes), layout)
        records["n"] = k
        records["i"] = polygons.reshape(-1, k + 1)[:, 1:]
        for name, column, _ in face:
            records[name] = column
        return records.tobytes()
    parts, at = [], 0
    for f, size in enumerate(sizes):
        parts.append(np.asarray(size, "<" + count_kind).tobytes())
        parts.append(polygons[at + 1: at + 1 + size].astype("<i4").tobytes())
        parts += [np.asarray(column[f], "<" + t).tobytes() for _, column, t in face]
        at += size + 1
    return b"".join(parts)
