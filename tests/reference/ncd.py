"""Reference gzip-NCD and ZIP-FIT alignment, written straight from PAPERS.md §7 (never calling lmkern).

    C(s)      = len(gzip.compress(s, compresslevel=L))
    NCD(x, y) = (C(x ⊕ y) − min(C(x), C(y))) / max(C(x), C(y))      ⊕: concatenation, x first
    align(x)  = 1 − mean_j NCD(x, y_j)
    select k  = the k highest alignments, best first, ties in source order

The size function is a parameter: by default the host's ``gzip.compress``; tests also pass sizes
from lmkern's bundled stock zlib (the oracle) so that a host with another zlib cannot change the
expected values. The mean is summed in target order with ``acc += v`` (not ``sum()``, whose
algorithm changed in Python 3.12), so an implementation of the same formula matches bit for bit.
"""
from __future__ import annotations

import gzip
import re
import zlib
from typing import Callable, Sequence

SizeFn = Callable[[bytes, int], int]


def as_bytes(t) -> bytes:
    return t.encode("utf-8") if isinstance(t, str) else bytes(t)


def gzip_size(data: bytes, level: int) -> int:
    """len(gzip.compress(data, compresslevel=level)) with the host's zlib (mtime fixed: it changes no length)."""
    return len(gzip.compress(data, compresslevel=level, mtime=0))


def host_is_stock_zlib() -> bool:
    """Whether the host's zlib claims to be stock zlib 1.2.11–1.3.1 (whose lengths all agree).

    zlib-ng in compat mode and similar forks put their name in the version string."""
    v = zlib.ZLIB_RUNTIME_VERSION
    return bool(re.fullmatch(r"1\.2\.1[1-3](\.\d+)?|1\.3(\.[01])?", v))


def ncd_ref(x: bytes, y: bytes, level: int, size: SizeFn = gzip_size) -> float:
    x, y = as_bytes(x), as_bytes(y)
    cx, cy, cxy = size(x, level), size(y, level), size(x + y, level)
    return (cxy - min(cx, cy)) / max(cx, cy)


def ncd_matrix_ref(xs: Sequence, ys: Sequence, level: int, size: SizeFn = gzip_size) -> list[list[float]]:
    return [[ncd_ref(x, y, level, size) for y in ys] for x in xs]


def alignment_ref(x, ys: Sequence, level: int, size: SizeFn = gzip_size) -> float:
    ncds = [ncd_ref(x, y, level, size) for y in ys]
    acc = 0.0
    for v in ncds:
        acc += v
    return 1 - acc / len(ncds)


def alignments_ref(xs: Sequence, ys: Sequence, level: int, size: SizeFn = gzip_size) -> list[float]:
    return [alignment_ref(x, ys, level, size) for x in xs]


def select_ref(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the k highest scores, best first, ties in index order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
