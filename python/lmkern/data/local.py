"""The local ZIP-FIT engine: streams source records in batches through one Rust scorer and keeps a
bounded top-k heap, so a corpus larger than memory is selected in O(k + batch) memory.

Also the pieces both engines share: :class:`TopK` (the exact global top-k, ties in source order),
:class:`Selection`, :class:`Progress` and :func:`write_records`.
"""
from __future__ import annotations

import heapq
import json
import math
import os
import secrets
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, TextIO

import numpy as np

from .. import ncd as _ncd
from .readers import PARQUET_EXT, DataError, PathLike, Reader, Record, batched, list_files, pyarrow_modules, split_key

DEFAULT_BATCH = 1024


class TopK:
    """The k best (score, key) pairs seen so far: highest score first, equal scores by smaller key
    (= earlier in source order). A min-heap whose root is the worst kept entry."""

    def __init__(self, k: int):
        self.k = _ncd._check_k(k)
        self._heap: list[tuple[float, int, Any]] = []  # (score, -key, payload)

    def push(self, score: float, key: int, payload: Any = None) -> None:
        if self.k <= 0:
            return
        item = (score, -key, payload)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, item)
        elif item[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, item)

    def push_many(self, scores: np.ndarray, keys: Sequence[int], payloads: Sequence[Any] | None = None) -> None:
        if self.k <= 0 or len(scores) == 0:
            return
        # Only a batch's own top k can enter: pre-select them in numpy (score desc, key asc).
        order = np.lexsort((np.asarray(keys, dtype=np.int64), -np.asarray(scores)))[: self.k]
        for i in order:
            self.push(float(scores[i]), int(keys[i]), None if payloads is None else payloads[i])

    def __len__(self) -> int:
        return len(self._heap)

    def items(self) -> list[tuple[float, int, Any]]:
        """(score, key, payload), best first."""
        return [(s, -nk, p) for s, nk, p in sorted(self._heap, key=lambda t: (-t[0], -t[1]))]


@dataclass
class Selection:
    """What a ZIP-FIT selection returns: keys and scores best first, and the selected records (their
    data as read, when the engine kept or fetched them)."""

    keys: np.ndarray
    scores: np.ndarray
    records: list[Record] | None
    n_sources: int
    n_targets: int
    seconds: float
    skipped: int = 0
    files: list[str] = field(default_factory=list)

    @property
    def pairs(self) -> int:
        return self.n_sources * self.n_targets

    def rows(self) -> list[dict]:
        """The selected records as output rows: the record's data plus zipfit_score, zipfit_rank
        (1 = best) and zipfit_source (file:line or file:row N)."""
        if self.records is None:
            raise ValueError("this selection holds keys and scores only; fetch the records first")
        out = []
        for rank, (rec, score) in enumerate(zip(self.records, self.scores.tolist()), 1):
            row = dict(rec.data)
            row["zipfit_score"] = score
            row["zipfit_rank"] = rank
            row["zipfit_source"] = rec.location
            out.append(row)
        return out


class Progress:
    """A one-line progress report on a stream (default stderr): sources, pairs, pairs/s, file i/N."""

    def __init__(self, n_targets: int, n_files: int, stream: TextIO | None = None, every_s: float = 0.5,
                 fraction: Callable[[], float] | None = None):
        self.n_targets, self.n_files = n_targets, n_files
        self.fraction = fraction
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s if self.tty else max(every_s, 10.0)
        self.t0 = time.perf_counter()
        self._last = -math.inf
        self.sources = 0

    def line(self, file_index: int) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        pairs = self.sources * self.n_targets
        bar = ""
        if self.fraction is not None:
            f = self.fraction()
            fill = int(round(20 * f))
            eta = f", ~{dt * (1 - f) / f:.0f} s left" if 0 < f < 1 else ""
            bar = f"[{'#' * fill}{'.' * (20 - fill)}] {100 * f:3.0f}%{eta}, "
        return (f"zipfit: {bar}{self.sources:,} sources x {self.n_targets:,} targets = {pairs:,} pairs, "
                f"{pairs / dt:,.0f} pairs/s, {dt:.1f} s, file {min(file_index + 1, self.n_files)}/{self.n_files}")

    def update(self, n_sources: int, file_index: int, force: bool = False) -> None:
        self.sources += n_sources
        now = time.perf_counter()
        if force or now - self._last >= self.every_s:
            self._last = now
            self._shown = self.sources
            self.stream.write(("\r" if self.tty else "") + self.line(file_index) + ("" if self.tty else "\n"))
            self.stream.flush()

    def close(self, file_index: int) -> None:
        if not self.tty and getattr(self, "_shown", None) == self.sources:
            return  # that line is already there
        self.stream.write(("\r" if self.tty else "") + self.line(file_index) + "\n")
        self.stream.flush()


def select_local(
    source: PathLike | Sequence[PathLike],
    targets: Iterable[_ncd.Text],
    k: int,
    *,
    level: int = 9,
    text_field: str = "text",
    batch_size: int = DEFAULT_BATCH,
    bad_records: str = "error",
    progress: bool | Progress | None = None,
) -> Selection:
    """ZIP-FIT selection of the k records of `source` (files / directories, see lmkern.data.readers)
    best aligned to `targets` (texts), streamed: batches of `batch_size` records are scored in Rust
    while the next batch is read, and only the k best records are kept."""
    k = _ncd._check_k(k)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1; got {batch_size!r}")
    if progress is not None and not isinstance(progress, (bool, Progress)):
        raise TypeError(f"progress: expected a bool, None or a lmkern.data.local.Progress; got {type(progress).__name__}")
    scorer = _ncd.Scorer(targets, level)
    if scorer.n_targets == 0:
        raise ValueError("target: expected at least one target text (the alignment is a mean over targets); got none")
    reader = Reader(list_files(source, "source"), text_field, bad_records)
    if progress is True:
        progress = Progress(scorer.n_targets, len(reader.files), fraction=reader.fraction)
    top = TopK(k)
    n = 0
    t0 = time.perf_counter()

    def consume(batch: list[Record], scores: np.ndarray) -> None:
        top.push_many(scores, [r.key for r in batch], batch)
        if progress:
            progress.update(len(batch), reader.file_index)

    # One batch in flight: Rust scores batch i (GIL released) while this thread reads batch i + 1.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmkern-zipfit")
    try:
        pending = None
        for batch in batched(reader, batch_size):
            fut = pool.submit(scorer.alignment, [r.text for r in batch])
            if pending is not None:
                consume(pending[0], pending[1].result())
            pending = (batch, fut)
            n += len(batch)
        if pending is not None:
            consume(pending[0], pending[1].result())
    except BaseException:
        # Ctrl-C or a bad record: the queued batch is dropped and the one being scored left to
        # finish in the background (`with` would wait for both before raising).
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    if progress:
        progress.close(reader.file_index)
    items = top.items()
    return Selection(
        keys=np.array([key for _, key, _ in items], dtype=np.int64),
        scores=np.array([s for s, _, _ in items], dtype=np.float64),
        records=[r for _, _, r in items],
        n_sources=n,
        n_targets=scorer.n_targets,
        seconds=time.perf_counter() - t0,
        skipped=reader.skipped,
        files=reader.files,
    )


def fetch_records(files: Sequence[str], keys: Sequence[int], text_field: str = "text",
                  bad_records: str = "error") -> list[Record]:
    """The records with these keys (in the order of `keys`), found by one streaming pass over files."""
    if isinstance(files, (str, bytes, os.PathLike)):
        files = [files]
    files = [os.fsdecode(f) for f in files]  # str paths, as Reader and Selection.files have them
    keys = list(keys)
    for k in keys:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"keys: expected int record keys (Selection.keys); got {type(k).__name__} {k!r:.40}")
    want = {int(k): i for i, k in enumerate(keys)}
    found: list[Record | None] = [None] * len(want)
    if want:
        last_file = split_key(max(want))[0]
        reader = Reader(files[: last_file + 1], text_field, bad_records)
        left = len(want)
        for rec in reader:
            i = want.get(rec.key)
            if i is not None and found[i] is None:
                found[i] = rec
                left -= 1
                if not left:
                    break
    missing = [k for k, i in want.items() if found[i] is None]
    if missing:
        raise DataError(f"source: records {missing[:5]} were not found again: did the files change?")
    return found  # type: ignore[return-value]


def _json_default(v):
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "replace")
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def _create_beside(path: str, parent: str) -> tuple[int, str]:
    """A new temporary file next to `path` (to rename over it): the mode of the file it replaces,
    else 0o666 less the umask, as open() gives (tempfile.mkstemp's is 0o600: nobody else could read
    the output)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    for _ in range(100):
        tmp = os.path.join(parent, f".zipfit-{secrets.token_hex(6)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        if mode is not None:
            os.fchmod(fd, mode)
        return fd, tmp
    raise FileExistsError(f"no free temporary name in {parent}")


def output_format(path: PathLike) -> str:
    """"parquet" for a ``.parquet``/``.pq`` path, else "jsonl" (what :func:`write_records` writes)."""
    return "parquet" if os.fspath(path).lower().endswith(PARQUET_EXT) else "jsonl"


def write_records(path: PathLike, rows: Iterable[dict]) -> str:
    """Write rows to `path` by its extension: ``.parquet``/``.pq`` → Parquet, anything else → JSON
    Lines (UTF-8, one object per line). Written to a temporary file, then renamed. Returns the format."""
    path = os.fspath(path)
    rows = list(rows)  # an iterator too (the Parquet writer reads the rows twice)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"rows: expected dicts, one per record; got {type(row).__name__} at row {i}")
    fmt = output_format(path)
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; the output is a file")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        fd, tmp = _create_beside(path, parent)
    except OSError as e:
        raise DataError(f"{path}: cannot write: {e}") from e
    try:
        if fmt == "parquet":
            os.close(fd)
            pa, pq = pyarrow_modules(path)
            columns: dict[str, list] = {}
            for r in rows:
                for c in r:
                    columns.setdefault(c, [])
            for c in columns:
                columns[c] = [r.get(c) for r in rows]
            try:
                table = pa.table(columns) if rows else pa.table({"zipfit_score": pa.array([], pa.float64())})
            except UnicodeEncodeError as e:
                raise DataError(f"{path}: a field holds text that is not valid Unicode ({e.reason}: {e.object[e.start:e.end]!r}),"
                                " which Parquet's UTF-8 strings cannot store; write .jsonl instead") from e
            except (pa.ArrowException, TypeError) as e:
                raise DataError(f"{path}: these records do not fit one Parquet schema ({e}); write .jsonl instead") from e
            try:
                pq.write_table(table, tmp)
            except pa.ArrowException as e:  # e.g. an empty struct ({}) Parquet cannot store
                raise DataError(f"{path}: these records cannot be written as Parquet ({e}); write .jsonl instead") from e
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for r in rows:
                    line = json.dumps(r, ensure_ascii=False, default=_json_default)
                    try:
                        line.encode("utf-8")
                    except UnicodeEncodeError:  # a lone surrogate (from \ud800 in the source): escaped as it came
                        line = json.dumps(r, ensure_ascii=True, default=_json_default)
                    f.write(line)
                    f.write("\n")
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise DataError(f"{path}: cannot write: {e}") from e
        raise
    return fmt
