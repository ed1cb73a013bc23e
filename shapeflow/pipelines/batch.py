"""`register_many(pairs, output)`: register a cohort of pairs on a Dask cluster, one task per pair.

Each pair runs `shapeflow.register` in a Dask worker (a `LocalCluster` of one-thread processes by
default, or any scheduler by address) and writes `OUTPUT/<name>/` with what `shapeflow register`
writes (`Result.save`), plus `complete.json`, written last: the marker a re-run reads to skip the
pair. `OUTPUT/summary.csv` has one row per pair. Paths and output may be fsspec URLs.

Atomic outputs: on a local filesystem a pair is written into a hidden staging folder beside its
final place and renamed into place, marker included, so a killed worker leaves no half-written
`OUTPUT/<name>/` and a retried task replaces, never duplicates, a folder. On an object store (no
folder rename) the files are uploaded, then the marker: a folder without it is redone.

Dask is imported only when a batch runs (the `cluster` extra: `pip install "shapeflow[cluster]"`).
This module sits above `shapeflow.register`, which it calls (tests/test_structure.py's top layer).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

from .._files import atomic_write
from .._optional import import_optional
from ..errors import InverseError, ShapeflowError
from ..progress import progress_bar

__all__ = ["register_many", "cluster_client", "read_pairs", "PairSpec", "BatchSummary", "register_pair",
           "SUMMARY_COLUMNS", "HEADLINE_METRICS", "MARKER", "headline_metrics", "join_url", "is_local"]

#: written last into each finished pair's folder; its presence means the folder is complete
MARKER = "complete.json"
MARKER_FORMAT = "shapeflow-batch/1"
#: the CSV's columns: required, then optional
REQUIRED_COLUMNS = ("source", "target")
OPTIONAL_COLUMNS = ("name", "landmarks_source", "landmarks_target", "labels_source", "labels_target")
#: metrics copied into summary.csv when the registration has them (a dict: its "mean", else the mean of its values)
HEADLINE_METRICS = ("chamfer", "hausdorff", "rmse", "min_jacobian_det", "flipped_triangles_percent", "mse_after",
                    "dice_mean", "hd95", "jacobian_percent_negative", "landmark_error", "poor_fit")
SUMMARY_COLUMNS = ("name", "status", "seconds", "cpu_seconds", *HEADLINE_METRICS, "source", "target", "worker", "error", "warning")
#: options register_many gives every pair unless told otherwise: one torch thread per one-thread worker
PAIR_DEFAULTS = {"threads": 1, "seed": 0}


def _fsspec():
    return import_optional("fsspec", "batch registration")


def is_local(url: str) -> bool:
    """True for a plain path or a file:// URL (the staging-folder rename applies)."""
    fs, _ = _fsspec().core.url_to_fs(str(url))
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def join_url(base: str, name: str) -> str:
    """`base/name` for a path or a URL (forward slashes for URLs)."""
    if "://" in str(base):
        return str(base).rstrip("/") + "/" + name
    return str(Path(base) / name)


def _resolve(value: str, base: str | None) -> str:
    """A path from the CSV: URLs as they are, relative paths against `base` (the current folder
    without one), local paths made absolute (workers may run elsewhere)."""
    if "://" in value:
        return value
    if base is not None and "://" in base:
        return base.rstrip("/") + "/" + value
    return os.path.abspath(os.path.join(base or "", value))


def _stem(path: str) -> str:
    name = PurePosixPath(str(path).rstrip("/")).name
    for suffix in (".nii.gz", ".gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0] if "." in name[1:] else name


@dataclass(frozen=True)
class PairSpec:
    """One row of PAIRS.csv, paths resolved. `error`: why the row cannot run (then it is not submitted)."""

    name: str
    source: str
    target: str
    landmarks_source: str | None = None
    landmarks_target: str | None = None
    labels_source: str | None = None
    labels_target: str | None = None
    line: int = 0
    error: str | None = None

    def inputs(self) -> dict[str, str]:
        """The given input paths by column name."""
        return {k: v for k, v in asdict(self).items() if k in REQUIRED_COLUMNS + OPTIONAL_COLUMNS[1:] and v}


def _spec(row: dict, line: int, base: str | None, where: str) -> PairSpec:
    values = {k: (str(row.get(k) or "").strip() or None) for k in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}
    paths = {k: _resolve(v, base) for k, v in values.items() if v is not None and k != "name"}
    source, target = paths.get("source", ""), paths.get("target", "")
    name = values["name"] or (f"{_stem(source)}_to_{_stem(target)}" if source and target else f"row{line}")
    error = None
    missing = [k for k in REQUIRED_COLUMNS if not values[k]]
    if missing:
        error = f"{where} line {line}: {' and '.join(missing)} empty"
    elif (values["landmarks_source"] is None) != (values["landmarks_target"] is None):
        error = f"{where} line {line}: landmarks_source and landmarks_target go together; give both or neither"
    elif (values["labels_source"] is None) != (values["labels_target"] is None):
        error = f"{where} line {line}: labels_source and labels_target go together; give both or neither"
    elif name.startswith(".") or any(c in name for c in "/\\") or name in ("summary.csv",):
        error = f"{where} line {line}: name {name!r} is not a plain folder name"
    return PairSpec(name=name, source=source, target=target, line=line, error=error,
                    **{k: paths.get(k) for k in OPTIONAL_COLUMNS[1:]})


def read_pairs(pairs: str | os.PathLike | Iterable[Any]) -> list[PairSpec]:
    """The pairs of a batch.

    pairs: the path or fsspec URL of a CSV with columns `source,target` and optional `name`,
        `landmarks_source`, `landmarks_target`, `labels_source`, `labels_target` (relative paths
        are resolved against the CSV's folder); or an iterable of dicts with those keys, or of
        `(source, target)` tuples. Names default to `SOURCE_to_TARGET` (file stems).
    Returns one `PairSpec` per row; a row that cannot run (an empty source, half a landmark pair)
    carries its one-line `error`. Raises `ShapeflowError` for a missing or unknown column, or
    two rows with the same name.
    """
    if isinstance(pairs, (str, os.PathLike)):
        url = str(pairs)
        try:
            with _fsspec().open(url, "r", newline="") as handle:
                text = handle.read()
        except FileNotFoundError:
            raise ShapeflowError(f"{url}: no such pairs file") from None
        except UnicodeDecodeError as exc:
            raise ShapeflowError(f"{url}: not a text (UTF-8) CSV file (byte {exc.start} cannot be decoded)") from None
        reader = csv.DictReader(io.StringIO(text))
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        where, base = url, (url.rsplit("/", 1)[0] if "://" in url else str(Path(url).parent))
        rows = [(row, i + 2) for i, row in enumerate(reader) if any((v or "").strip() for v in row.values())]
    else:
        where, base, rows = "pairs", None, []
        for i, item in enumerate(pairs):
            row = dict(item) if isinstance(item, dict) else dict(zip(REQUIRED_COLUMNS, item))
            rows.append(({k: (None if v is None else str(v)) for k, v in row.items()}, i + 1))
        columns = sorted({k for row, _ in rows for k in row})
    for column in REQUIRED_COLUMNS:
        if column not in columns:
            raise ShapeflowError(f"{where}: missing column {column!r}; a pairs file needs the columns source,target")
    for column in columns:
        if column not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
            raise ShapeflowError(f"{where}: unknown column {column!r}; valid columns: "
                                 f"{', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}")
    specs = [_spec(row, line, base, where) for row, line in rows]
    seen: dict[str, int] = {}
    for spec in specs:
        if spec.name in seen:
            raise ShapeflowError(f"{where}: lines {seen[spec.name]} and {spec.line} have the same name {spec.name!r}; "
                                 "give each pair its own name (column name)")
        seen[spec.name] = spec.line
    if not specs:
        raise ShapeflowError(f"{where}: no pairs")
    return specs


# ----------------------------------------------------------------------------- one pair (in a worker)


def headline_metrics(metrics: dict) -> dict[str, Any]:
    """The `HEADLINE_METRICS` a registration has, as numbers (a dict metric: its mean)."""
    out: dict[str, Any] = {}
    for key in HEADLINE_METRICS:
        value = metrics.get(key)
        if isinstance(value, dict):
            numbers = [v for v in value.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            value = value.get("mean", sum(numbers) / len(numbers) if numbers else None)
        if isinstance(value, (int, float)) or value is None:
            out[key] = value
    return out


def _fetch(url: str, folder: Path) -> str:
    """A local path for `url`: itself when local, else a copy under `folder` (its name kept: the
    reader goes by the extension; a folder, e.g. a DICOM series, is copied whole)."""
    if "://" not in url or is_local(url):
        return url.split("://", 1)[1] if url.startswith("file://") else url
    fs, path = _fsspec().core.url_to_fs(url)
    local = folder / uuid.uuid4().hex[:8] / PurePosixPath(path.rstrip("/")).name
    local.parent.mkdir(parents=True)
    fs.get(path, str(local), recursive=fs.isdir(path))
    return str(local)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    if isinstance(exc, (ShapeflowError, InverseError)):
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _publish_local(result: Any, root: Path, name: str, marker: dict, save: dict) -> None:
    """Write the pair into a staging folder beside `root/name`, marker last, then rename it into place."""
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        result.save(staging, **save)
        atomic_write(staging / MARKER, lambda tmp: tmp.write_text(json.dumps(marker, indent=1) + "\n"))
        final = root / name
        for _ in range(3):     # another attempt of the same pair may publish between our steps
            if final.exists():
                old = root / f".{name}.{uuid.uuid4().hex[:8]}.old"
                try:
                    os.replace(final, old)
                except FileNotFoundError:
                    continue
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.replace(staging, final)
                return
            except OSError:
                if not final.exists():
                    raise
        raise ShapeflowError(f"{final}: could not be replaced (another process keeps writing it)")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _publish_remote(result: Any, url: str, name: str, marker: dict, save: dict, scratch: Path) -> None:
    """Upload the pair's files under `url/name/`, the marker last (an object store has no folder rename)."""
    local = result.save(scratch / "out", **save)
    fs, root = _fsspec().core.url_to_fs(url)
    final = root.rstrip("/") + "/" + name
    if fs.exists(final):
        fs.rm(final, recursive=True)
    for path in sorted(local.iterdir()):
        fs.put_file(str(path), f"{final}/{path.name}")
    fs.pipe_file(f"{final}/{MARKER}", (json.dumps(marker, indent=1) + "\n").encode())


def register_pair(spec: PairSpec, output: str, options: dict, key: dict, save: dict | None = None) -> dict:
    """Register one pair and publish `output/<name>/` (the Dask task). Returns its summary row.

    Bad input (`ShapeflowError`, `InverseError`, a missing or unreadable file) gives a row with
    status "failed" and the one-line error; any other exception propagates, so Dask retries the
    task (`retries`) and the client then records it as failed.
    """
    from ..register import register

    started, cpu = time.perf_counter(), time.process_time()
    row = {"name": spec.name, "source": spec.source, "target": spec.target, "worker": _worker_id()}
    try:
        with tempfile.TemporaryDirectory(prefix="shapeflow-batch-") as tmp:
            scratch = Path(tmp)
            local = {k: _fetch(v, scratch) for k, v in spec.inputs().items()}
            extra: dict[str, Any] = {}
            if "landmarks_source" in local:
                extra["landmarks"] = (local["landmarks_source"], local["landmarks_target"])
            if "labels_source" in local:
                extra["labels_moving"], extra["labels_fixed"] = local["labels_source"], local["labels_target"]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = register(local["source"], local["target"], progress=False, **{**options, **extra})
            if caught:      # one line in the summary instead of every worker's stderr
                row["warning"] = str(caught[0].message).strip().splitlines()[0][:300]
            row.update(status="done", seconds=round(time.perf_counter() - started, 3),
                       cpu_seconds=round(time.process_time() - cpu, 3),
                       **headline_metrics(result.metrics))
            marker = {"format": MARKER_FORMAT, "key": key, "row": row,
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if is_local(output):
                _publish_local(result, Path(_fetch(output, scratch)), spec.name, marker, save or {})
            else:
                _publish_remote(result, output, spec.name, marker, save or {}, scratch)
    except (ShapeflowError, InverseError, OSError) as exc:
        row.update(status="failed", seconds=round(time.perf_counter() - started, 3), error=_one_line(exc))
    return row


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ----------------------------------------------------------------------------- the batch (on the client)


@dataclass
class BatchSummary:
    """What `register_many` did: one row per pair (the columns of `SUMMARY_COLUMNS`), in the
    pairs' order; `status` is "done" (registered now), "kept" (complete from an earlier run,
    left as it was) or "failed" (with `error`)."""

    rows: list[dict]
    output: str
    summary: str
    dashboard: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return sum(row["status"] == "failed" for row in self.rows)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def line(self) -> str:
        """The last line the CLI prints: how many pairs were done, kept and failed."""
        done = sum(row["status"] == "done" for row in self.rows)
        kept = sum(row["status"] == "kept" for row in self.rows)
        return (f"{len(self.rows)} pairs: {done} registered, {kept} already complete, {self.failed} failed"
                + (f" (see {self.summary})" if self.failed else ""))


@contextmanager
def cluster_client(workers: int | None = None, scheduler: str | None = None, *,
                   memory_limit: str | float | None = "auto", dashboard_address: str | None = ":8787") -> Iterator[Any]:
    """A `distributed.Client`: on the scheduler at `scheduler` (an address such as
    "tcp://10.0.0.5:8786", or a scheduler file's path ending in .json), or on a new `LocalCluster`
    of `workers` processes (default: one per CPU core) with one thread each and `memory_limit`
    per worker (Dask's: "auto" shares the machine's memory, "4GiB", 0 = no limit). Closed on exit.
    A remote cluster's workers have the limits they were started with."""
    distributed = import_optional("distributed", "batch registration")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ShapeflowError(f"cluster_client(): workers must be an int >= 1, got {workers!r}")
    if scheduler is not None:
        kind = {"scheduler_file": scheduler} if str(scheduler).endswith(".json") else {"address": scheduler}
        with distributed.Client(**kind) as client:
            yield client
        return
    with distributed.LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                                  memory_limit=memory_limit, dashboard_address=dashboard_address,
                                  silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster) as client:
        yield client


def dashboard_link(client: Any) -> str | None:
    """The dashboard's address, or None where bokeh (which serves it) is not installed."""
    from .._optional import is_available

    return client.dashboard_link if is_available("bokeh") else None


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _read_marker(fs, root: str, name: str) -> dict | None:
    try:
        marker = json.loads(fs.cat_file(f"{root.rstrip('/')}/{name}/{MARKER}"))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


#: what a killed attempt leaves beside the pairs' folders (`_clean_partials`)
_LEFTOVER = re.compile(r"^(?:\.(?P<staged>.+)\.[0-9a-f]{8}\.(?:partial|old)|\.\.(?P<saving>.+)\.[0-9a-f]{8}\.partial\.[^.]+)$")


def _clean_partials(output: str, names: set[str]) -> None:
    """Remove staging folders a killed attempt left (local outputs; only this batch's pairs)."""
    root = Path(_fetch(output, Path(tempfile.gettempdir())))
    if not root.is_dir():
        return
    for entry in root.iterdir():
        # `.{name}.{hex}.partial` / `.old` (`_publish_local`), and `..{name}.{hex}.partial.{random}`, the
        # temporary folder `Result.save` was writing inside the staging one when the attempt was killed
        match = _LEFTOVER.match(entry.name)
        if match and (match.group("staged") or match.group("saving")) in names:
            shutil.rmtree(entry, ignore_errors=True)


def _write_summary(rows: list[dict], output: str) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in SUMMARY_COLUMNS})
    url = join_url(output, "summary.csv")
    if is_local(output):
        path = Path(_fetch(url, Path(tempfile.gettempdir())))
        atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))
    else:
        fs, path = _fsspec().core.url_to_fs(url)
        fs.pipe_file(path, buffer.getvalue().encode())
    return url


def register_many(pairs: str | os.PathLike | Iterable[Any], output: str | os.PathLike, client: Any = None, *,
                  workers: int | None = None, overwrite: bool = False, retries: int = 1,
                  memory_limit: str | float | None = "auto", progress: bool = True, gif: str | None = None,
                  frames: int = 24, **options: Any) -> BatchSummary:
    """Register every pair of `pairs` onto its target, one Dask task per pair.

    pairs: a CSV path or fsspec URL, or rows (see `read_pairs`). output: a folder or fsspec URL;
        each pair writes `output/<name>/` (what `Result.save` writes, plus `complete.json`) and
        `output/summary.csv` gets one row per pair (`SUMMARY_COLUMNS`).
    client: a `distributed.Client` to run on; None starts a `LocalCluster` of `workers` one-thread
        processes (default: one per core) with `memory_limit` per worker, closed at the end.
    overwrite: redo every pair; by default a pair whose folder holds a marker written for the
        same inputs and options is kept as it is, and only missing, failed or changed pairs run.
    retries: Dask retries of a task that raised something other than bad input (a worker that
        dies is rescheduled by Dask in any case, up to `distributed.scheduler.allowed-failures`).
    gif, frames: an animation per pair (a file name inside each pair's folder).
    options: `register()` options for every pair (model, loss, iterations, ...); `threads`
        defaults to 1 and `seed` to 0.
    A failed pair never stops the batch. Ctrl-C cancels the pending tasks, writes the summary of
    what finished and re-raises KeyboardInterrupt; the same call then resumes.
    """
    specs = read_pairs(pairs)
    output = str(output) if "://" in str(output) else os.path.abspath(output)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ShapeflowError(f"register_many(): retries must be an int >= 0, got {retries!r}")
    for name in ("progress", "landmarks", "labels_moving", "labels_fixed"):
        if name in options:
            raise ShapeflowError(f"register_many(): option {name!r} is per pair (a PAIRS.csv column) or set by "
                                 "the batch, not an option")
    options = {**PAIR_DEFAULTS, **options}
    save = {"gif": gif, "frames": frames} if gif else {}
    fs, root = _fsspec().core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    rows: dict[str, dict] = {}
    todo: list[tuple[PairSpec, dict]] = []
    for spec in specs:
        key = _normalised({"inputs": spec.inputs(), "options": options, "save": save})
        if spec.error is not None:
            rows[spec.name] = {"name": spec.name, "source": spec.source, "target": spec.target,
                               "status": "failed", "error": spec.error}
            continue
        marker = None if overwrite else _read_marker(fs, root, spec.name)
        if marker is not None and marker.get("key") == key:
            rows[spec.name] = {**marker["row"], "status": "kept"}
        else:
            todo.append((spec, key))
    local = is_local(output)
    if local:
        _clean_partials(output, {spec.name for spec in specs})
    with (cluster_client(workers, memory_limit=memory_limit) if client is None and todo else nullcontext(client)) as active:
        link = dashboard_link(active) if active is not None else None
        if todo:
            _run(active, todo, rows, output, options, save, retries, progress)
    if local:
        _clean_partials(output, {spec.name for spec in specs})
    ordered = [rows[spec.name] for spec in specs]
    summary = _write_summary(ordered, output)
    return BatchSummary(ordered, output, summary, link)


def _run(client, todo, rows: dict, output: str, options: dict, save: dict, retries: int, progress: bool) -> None:
    distributed = import_optional("distributed", "batch registration")
    futures = {}
    for spec, key in todo:
        future = client.submit(register_pair, spec, output, options, key, save, retries=retries, pure=False,
                               key=f"register-{spec.name}-{uuid.uuid4().hex[:8]}")
        futures[future] = spec
    failed = 0
    try:
        with progress_bar(progress, "batch", len(futures)) as update:
            for future in distributed.as_completed(futures):
                spec = futures[future]
                try:
                    row = future.result()
                except Exception as exc:       # retries spent, or the worker died too often (KilledWorker)
                    row = {"name": spec.name, "source": spec.source, "target": spec.target, "status": "failed",
                           "error": _one_line(exc)}
                rows[spec.name] = row
                failed += row["status"] == "failed"
                update({"failed": failed})
    except KeyboardInterrupt:
        client.cancel(list(futures))
        for spec, _ in todo:
            rows.setdefault(spec.name, {"name": spec.name, "source": spec.source, "target": spec.target,
                                        "status": "failed", "error": "interrupted before it finished"})
        _write_summary([rows[name] for name in rows], output)
        raise
