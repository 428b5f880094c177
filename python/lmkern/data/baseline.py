"""The published ZIP-FIT method in pure Python: the peer that lmkern's scorer is benchmarked against.

The ZIP-FIT code computes, for every (source, target) pair, C(x), C(y) and C(x ⊕ y) with
``gzip.compress`` (three compressions per pair), averages the NCDs of a source over the targets,
and spreads the sources over a ``multiprocessing.Pool``. :func:`published_scores` does exactly that;
:func:`cached_scores` is the obvious improvement (C(y) once per target, C(x) once per source: one
compression per pair); :func:`raw_zlib_pairs` times only ``zlib.compress(x + y, level, -15)`` per
pair (a compressobj on Python 3.10), the floor of any method that compresses each pair from
scratch with stock zlib.

The mean is summed in target order (acc += v) as in lmkern and tests/reference/ncd.py, so scores
compare bit for bit (the published code's ``np.mean`` sums pairwise: last-bit differences).
"""
from __future__ import annotations

import gzip
import multiprocessing
import sys
import zlib
from typing import Sequence

import numpy as np

_TARGETS: list[bytes] = []
_TARGET_SIZES: list[int] = []
_LEVEL = 9


def gzip_size(data: bytes, level: int) -> int:
    return len(gzip.compress(data, compresslevel=level))


def published_ncd(x: bytes, y: bytes, level: int) -> float:
    cx, cy, cxy = gzip_size(x, level), gzip_size(y, level), gzip_size(x + y, level)
    return (cxy - min(cx, cy)) / max(cx, cy)


def _mean_alignment(ncds) -> float:
    acc = 0.0
    for v in ncds:
        acc += v
    return 1 - acc / len(ncds)


def published_alignment(x: bytes, targets: Sequence[bytes], level: int) -> float:
    return _mean_alignment([published_ncd(x, y, level) for y in targets])


def _init(targets: list[bytes], level: int) -> None:
    global _TARGETS, _TARGET_SIZES, _LEVEL
    _TARGETS, _LEVEL = targets, level
    _TARGET_SIZES = [gzip_size(y, level) for y in targets]  # used by the cached variant only


def _published_one(x: bytes) -> float:
    return published_alignment(x, _TARGETS, _LEVEL)


def _cached_one(x: bytes) -> float:
    cx = gzip_size(x, _LEVEL)
    ncds = []
    for y, cy in zip(_TARGETS, _TARGET_SIZES):
        cxy = gzip_size(x + y, _LEVEL)
        ncds.append((cxy - min(cx, cy)) / max(cx, cy))
    return _mean_alignment(ncds)


def _raw_deflate_310(data: bytes, level: int, wbits: int) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, wbits)
    return c.compress(data) + c.flush()


# zlib.compress takes wbits from Python 3.11; on 3.10 a compressobj gives the same bytes (slower).
_raw_deflate = zlib.compress if sys.version_info >= (3, 11) else _raw_deflate_310


def _raw_one(x: bytes) -> int:
    total = 0
    for y in _TARGETS:
        total += len(_raw_deflate(x + y, _LEVEL, -15))
    return total


def _enc(texts) -> list[bytes]:
    return [t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in texts]


class Pool:
    """A multiprocessing pool holding the targets (sent once, at start): start it outside a timing."""

    def __init__(self, targets, level: int, processes: int):
        self.targets = _enc(targets)
        self.processes = processes
        ctx = multiprocessing.get_context("fork")
        self.pool = ctx.Pool(processes, initializer=_init, initargs=(self.targets, level)) if processes > 1 else None
        if self.pool is None:
            _init(self.targets, level)

    def map(self, fn, sources: list[bytes]) -> list:
        if self.pool is None:
            return [fn(x) for x in sources]
        chunk = max(1, len(sources) // (8 * self.processes))
        return self.pool.map(fn, sources, chunksize=chunk)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _map(fn, sources, targets, level: int, processes: int, pool: Pool | None) -> list:
    """fn over the sources on `pool`, or on a pool of `processes` started (and closed) for the call."""
    own = pool is None
    pool = pool or Pool(targets, level, processes)
    try:
        return pool.map(fn, _enc(sources))
    finally:
        if own:
            pool.close()


def published_scores(sources, targets, level: int = 9, processes: int = 1, pool: Pool | None = None) -> np.ndarray:
    """ZIP-FIT's published method: three gzip.compress calls per pair, over `processes` processes."""
    return np.array(_map(_published_one, sources, targets, level, processes, pool), dtype=np.float64)


def cached_scores(sources, targets, level: int = 9, processes: int = 1, pool: Pool | None = None) -> np.ndarray:
    """The same scores with C(x) and C(y) cached: one gzip.compress(x ⊕ y) per pair."""
    return np.array(_map(_cached_one, sources, targets, level, processes, pool), dtype=np.float64)


def raw_zlib_pairs(sources, targets, level: int = 9, processes: int = 1, pool: Pool | None = None) -> int:
    """Compress every x ⊕ y with zlib.compress(x + y, level, -15) (raw deflate, stock zlib): the
    floor of compressing each pair from scratch. Returns the total compressed bytes."""
    return int(sum(_map(_raw_one, sources, targets, level, processes, pool)))
