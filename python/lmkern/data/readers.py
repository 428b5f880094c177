"""Streaming readers of text corpora: JSON Lines, Parquet and plain text files, and directories of them.

What a record is, by format (chosen by the file's extension; ``.gz`` may follow a line format):

- JSON Lines (``.jsonl``, ``.ndjson``, ``.json``): one JSON object per line; its text is the string
  field ``text_field`` (default ``"text"``). Blank lines are skipped. A ``.json`` file whose first
  character is ``[`` is read as one JSON array of objects instead (loaded whole: not streamed).
- Parquet (``.parquet``, ``.pq``): one row per record; its text is the string (or UTF-8 binary)
  column ``text_field``. Read a row batch at a time.
- Plain text (``.txt``, ``.text``): ONE LINE PER RECORD, the line ending (``\\n`` or ``\\r\\n``)
  removed; lines holding only whitespace are skipped. The record is ``{text_field: line}``.

A directory stands for every file with one of those extensions below it (recursively, sorted by
path, hidden files skipped). Files are read in the order given, so every record has a stable key:
``file_index << 40 | row`` (row = the record's 0-based number within its file); keys order records
exactly as they are read ("source order"), which is how equal scores are ordered.

Text is UTF-8: an undecodable line, a JSON string holding a lone surrogate (``"\\ud800"``), a record
without the text field, or one whose field is not a string is a bad record: by default a
:class:`DataError` naming the file and line (or row); with ``bad_records="skip"`` it is counted and
skipped. A file that is missing, of an unknown kind, or cannot be read is always a DataError (or
FileNotFoundError).
"""
from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

JSONL_EXT = (".jsonl", ".ndjson", ".json")
PARQUET_EXT = (".parquet", ".pq")
TEXT_EXT = (".txt", ".text")
SUPPORTED = JSONL_EXT + PARQUET_EXT + TEXT_EXT + tuple(e + ".gz" for e in JSONL_EXT + TEXT_EXT)

#: Bits of a key that hold the row within a file (the rest hold the file's index).
ROW_BITS = 40
BAD_RECORDS = ("error", "skip")


class DataError(ValueError):
    """A corpus cannot be read as asked: the message names the file (and line or row)."""


def pyarrow_modules(path: str):
    """(pyarrow, pyarrow.parquet) for a Parquet file at `path`, or an ImportError that says how to get them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"{path}: Parquet files need pyarrow: pip install 'lmkern[data]' ({e})") from e
    return pa, pq


@dataclass(frozen=True)
class Record:
    """One source record: `key` orders records as read; `text` is UTF-8 bytes; `data` the record as
    read (the JSON object, the Parquet row, or ``{text_field: line}`` for plain text)."""

    key: int
    text: bytes
    data: dict = field(repr=False)
    location: str


def make_key(file_index: int, row: int) -> int:
    return (file_index << ROW_BITS) | row


def split_key(key: int) -> tuple[int, int]:
    return key >> ROW_BITS, key & ((1 << ROW_BITS) - 1)


def _kind(path: str) -> str | None:
    p = path.lower()
    if p.endswith(".gz"):
        p = p[:-3]
        if p.endswith(PARQUET_EXT):
            return None
    if p.endswith(JSONL_EXT):
        return "jsonl"
    if p.endswith(PARQUET_EXT):
        return "parquet"
    if p.endswith(TEXT_EXT):
        return "text"
    return None


def list_files(paths: PathLike | Sequence[PathLike], name: str = "source") -> list[str]:
    """The files that `paths` stand for, in order (a directory: its supported files, sorted)."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    if not isinstance(paths, Iterable):
        raise TypeError(f"{name}: expected a path or a sequence of paths; got {type(paths).__name__}")
    paths = list(paths)
    if not paths:
        raise DataError(f"{name}: expected at least one file or directory; got none")
    files: list[str] = []
    for p in paths:
        if not isinstance(p, (str, bytes, os.PathLike)):
            raise TypeError(f"{name}: expected paths (str, bytes or os.PathLike); got {type(p).__name__} {p!r:.60}")
        p = os.fsdecode(p)
        if os.path.isdir(p):
            found = []
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, n) for n in names if not n.startswith(".") and _kind(n)]
            if not found:
                raise DataError(f"{name}: directory {p} holds no {'/'.join(SUPPORTED)} files")
            files += sorted(found)
        elif os.path.exists(p):
            if _kind(p) is None:
                raise DataError(
                    f"{name}: {p}: unknown file kind; expected one of {', '.join(SUPPORTED)} (or a directory)"
                )
            files.append(p)
        else:
            raise FileNotFoundError(f"{name}: no such file or directory: {p}")
    if len(files) >= 1 << (63 - ROW_BITS):
        raise DataError(f"{name}: at most {1 << (63 - ROW_BITS)} files; got {len(files)}")
    return files


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _open_binary(path: str):
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror or e}") from e
    return _GzipFile(fileobj=f, mode="rb") if path.lower().endswith(".gz") else f


class _GzipFile(gzip.GzipFile):
    """A GzipFile that closes the file object it was given too (GzipFile leaves it open)."""

    def close(self) -> None:
        raw = self.fileobj
        try:
            super().close()
        finally:
            if raw is not None:
                raw.close()


class _Bad(Exception):
    """A bad record (reported with its location, or skipped)."""


def _text_of(obj: Any, text_field: str) -> tuple[bytes, dict]:
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object; got {type(obj).__name__}")
    if text_field not in obj:
        fields = ", ".join(map(repr, list(obj)[:8])) + (", ..." if len(obj) > 8 else "")
        raise _Bad(f"no field {text_field!r} (fields: {fields or 'none'}); choose one with --text-field / text_field=")
    value = obj[text_field]
    if isinstance(value, bytes):  # Parquet binary column
        try:
            obj = dict(obj)
            obj[text_field] = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Bad(f"field {text_field!r} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        return value, obj
    if not isinstance(value, str):
        raise _Bad(f"field {text_field!r} is {'null' if value is None else type(value).__name__}; expected a string")
    try:
        return value.encode("utf-8"), obj
    except UnicodeEncodeError as e:
        raise _Bad(
            f"field {text_field!r} holds a lone surrogate ({value[e.start:e.end]!r} at index {e.start}): no UTF-8 form"
        ) from None


class Reader:
    """Iterates the records of files in order. Counts what it skipped (``bad_records="skip"``)."""

    def __init__(self, files: Sequence[str], text_field: str = "text", bad_records: str = "error",
                 parquet_batch: int = 4096):
        if bad_records not in BAD_RECORDS:
            raise ValueError(f"bad_records: expected one of {BAD_RECORDS}; got {bad_records!r}")
        if not isinstance(text_field, str) or not text_field:
            raise ValueError(f"text_field: expected a non-empty field name; got {text_field!r}")
        self.files = list(files)
        self.text_field = text_field
        self.skip = bad_records == "skip"
        self.parquet_batch = parquet_batch
        self.skipped = 0
        self.first_skipped: str | None = None
        self.file_index = -1  # the file being read (progress)
        self._sizes = [_size(f) for f in self.files]
        self._done_bytes = 0  # bytes of the files already read
        self._here = lambda: 0.0  # fraction of the current file read

    def fraction(self) -> float:
        """About how much of the input has been read, from 0 to 1 (by file sizes on disk)."""
        total = sum(self._sizes)
        if total <= 0:
            return 1.0 if self.file_index >= len(self.files) - 1 else 0.0
        cur = self._sizes[self.file_index] if 0 <= self.file_index < len(self.files) else 0
        return min(1.0, (self._done_bytes + cur * min(1.0, self._here())) / total)

    def _bad(self, location: str, why: str):
        if not self.skip:
            raise DataError(f"{location}: {why}")
        self.skipped += 1
        if self.first_skipped is None:
            self.first_skipped = f"{location}: {why}"

    def __iter__(self) -> Iterator[Record]:
        for i, path in enumerate(self.files):
            self.file_index = i
            self._here = lambda: 0.0
            kind = _kind(path)
            try:
                if kind == "parquet":
                    yield from self._parquet(i, path)
                elif kind == "jsonl":
                    yield from self._jsonl(i, path)
                else:
                    yield from self._text(i, path)
            except (DataError, FileNotFoundError):
                raise
            except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:  # zlib.error: corrupt .gz data
                raise DataError(f"{path}: cannot read: {e}") from e
            self._done_bytes += self._sizes[i]

    def _lines(self, path: str) -> Iterator[tuple[int, bytes]]:
        with _open_binary(path) as f:
            raw = getattr(f, "fileobj", f)  # a .gz: the compressed file's position
            size = max(1, _size(path))
            self._here = lambda: raw.tell() / size if not raw.closed else 1.0
            for lineno, line in enumerate(f, 1):
                yield lineno, line

    def _jsonl(self, fi: int, path: str) -> Iterator[Record]:
        if path.lower().endswith((".json", ".json.gz")) and self._starts_with_bracket(path):
            yield from self._json_array(fi, path)
            return
        row = 0
        for lineno, line in self._lines(path):
            if not line.strip():
                continue
            loc = f"{path}:{lineno}"
            try:
                try:
                    obj = json.loads(line)
                except UnicodeDecodeError as e:
                    raise _Bad(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
                except json.JSONDecodeError as e:
                    raise _Bad(f"invalid JSON ({e.msg}, column {e.colno})") from None
                text, data = _text_of(obj, self.text_field)
            except _Bad as e:
                self._bad(loc, str(e))
                row += 1
                continue
            yield Record(make_key(fi, row), text, data, loc)
            row += 1

    @staticmethod
    def _starts_with_bracket(path: str) -> bool:
        with _open_binary(path) as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return head[:1] == b"["

    def _json_array(self, fi: int, path: str) -> Iterator[Record]:
        with _open_binary(path) as f:
            try:
                items = json.load(io.TextIOWrapper(f, encoding="utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{path}: not a JSON array of objects ({e})") from e
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON array of objects or JSON Lines")
        for row, obj in enumerate(items):
            loc = f"{path}:[{row}]"
            try:
                text, data = _text_of(obj, self.text_field)
            except _Bad as e:
                self._bad(loc, str(e))
                continue
            yield Record(make_key(fi, row), text, data, loc)

    def _text(self, fi: int, path: str) -> Iterator[Record]:
        row = 0
        for lineno, line in self._lines(path):
            line = line.rstrip(b"\n")
            if line.endswith(b"\r"):
                line = line[:-1]
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark: not text
                line = line[3:]
            if not line.strip():
                continue
            loc = f"{path}:{lineno}"
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError as e:
                self._bad(loc, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                row += 1
                continue
            if not s.strip():  # only whitespace beyond ASCII's (no-break space, ideographic space)
                continue
            yield Record(make_key(fi, row), line, {self.text_field: s}, loc)
            row += 1

    def _parquet(self, fi: int, path: str) -> Iterator[Record]:
        pa, pq = pyarrow_modules(path)

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read as Parquet: {e}") from e
        names = pf.schema_arrow.names
        if self.text_field not in names:
            raise DataError(f"{path}: no column {self.text_field!r} (columns: {', '.join(map(repr, names))}); "
                            "choose one with --text-field / text_field=")
        row = 0
        n_rows = max(1, pf.metadata.num_rows)
        self._here = lambda: row / n_rows
        try:
            for batch in pf.iter_batches(batch_size=self.parquet_batch):
                for obj in batch.to_pylist():
                    loc = f"{path}:row {row}"
                    try:
                        text, data = _text_of(obj, self.text_field)
                    except _Bad as e:
                        self._bad(loc, str(e))
                        row += 1
                        continue
                    yield Record(make_key(fi, row), text, data, loc)
                    row += 1
        except pa.ArrowException as e:
            raise DataError(f"{path}: cannot read as Parquet: {e}") from e
        finally:
            pf.close()


def iter_records(paths: PathLike | Sequence[PathLike], text_field: str = "text", bad_records: str = "error",
                 name: str = "source") -> Iterator[Record]:
    """Records of `paths` (files and directories), streamed in order. See the module docstring."""
    return iter(Reader(list_files(paths, name), text_field, bad_records))


def read_texts(paths: PathLike | Sequence[PathLike], text_field: str = "text", bad_records: str = "error",
               name: str = "target") -> list[bytes]:
    """Every record's text (UTF-8 bytes) of `paths`, in memory: for target sets."""
    return [r.text for r in iter_records(paths, text_field, bad_records, name)]


def batched(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for r in records:
        batch.append(r)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
