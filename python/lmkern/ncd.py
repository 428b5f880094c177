"""gzip-NCD and ZIP-FIT alignment (*ZIP-FIT: Embedding-Free Data Selection via Compression-Based
Alignment*), computed in Rust.

  C(s)       = len(gzip.compress(s, compresslevel=level))          exactly, as stock zlib computes it
  NCD(x, y)  = (C(x ⊕ y) − min(C(x), C(y))) / max(C(x), C(y))     ⊕ = concatenation, x first
  align(x)   = 1 − mean_j NCD(x, y_j)                               over the targets y_1..y_n

Texts are `str` (encoded as UTF-8, strictly: a str holding a lone surrogate has no UTF-8 form and is
rejected) or bytes-like (`bytes`, `bytearray`, `memoryview`: taken as they are). The lengths are
those of stock zlib (bundled into lmkern, so the host's zlib cannot change an answer): zlib-ng,
zlib-rs, libdeflate and the like compress to other lengths and would give other scores.

Every function runs on the CPU over lmkern's threads (`lmkern.set_num_threads`), with the GIL
released; results do not depend on the thread count. The mean in `align` is summed in target order
(acc += v), so scores are bit for bit those of that straightforward formula.

Levels 1–9 compress; level 0 is accepted (the score's later default in the published code) but
stores the text without compressing it, so C(s) is the length plus framing and NCD ignores content:
it warns (:class:`Level0Warning`).

Edge cases, by design: an empty text is a text (C(b"") == 20 at levels 1–9); an empty source list gives empty
results; an empty target list is a ValueError for alignments and selection (a mean over no
targets), and gives a [len(xs), 0] matrix for :func:`ncd_matrix`; ``k`` larger than the number of
sources selects them all.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Iterable, Sequence, Union

import numpy as np

from . import _core

Text = Union[str, bytes, bytearray, memoryview]

__all__ = [
    "Level0Warning", "Scorer", "Text", "compressed_size", "ncd", "ncd_matrix", "zipfit_scores",
    "zipfit_select", "encode_texts", "top_k",
]


class Level0Warning(UserWarning):
    """gzip level 0 stores without compressing: every NCD is blind to the texts' content."""


def _caller_stacklevel() -> int:
    """warnings.warn's stacklevel of the first frame outside lmkern (the user's call)."""
    here = os.path.dirname(os.path.abspath(__file__))
    f, level = sys._getframe(1), 1
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(here + os.sep):
        f, level = f.f_back, level + 1
    return level


def _check_level(level) -> int:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
        raise TypeError(f"level: expected an int from 0 to 9; got {type(level).__name__}")
    level = int(level)
    if not 0 <= level <= 9:
        raise ValueError(f"level: expected an int from 0 to 9 (gzip compresslevel); got {level}")
    if level == 0:
        warnings.warn(
            "level=0: gzip stores the text without compressing it, so C(s) is len(s) plus framing and "
            "NCD no longer depends on the texts' content; use a level from 1 to 9 to select data",
            Level0Warning,
            stacklevel=_caller_stacklevel(),
        )
    return level


def _encode(t, name: str, i: int | None) -> bytes:
    if i is not None:
        name = f"{name}[{i}]"
    if isinstance(t, str):
        try:
            return t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{name}: a str with no UTF-8 form ({e.reason}: {t[e.start:e.end]!r} at index {e.start}); "
                "pass bytes, or clean the text (e.g. s.encode('utf-8', 'replace'))"
            ) from None
    if isinstance(t, bytes):
        return t
    if isinstance(t, (bytearray, memoryview)):
        return bytes(t)
    raise TypeError(f"{name}: expected str or bytes; got {type(t).__name__}")


def encode_texts(texts: Iterable[Text], name: str = "texts") -> list[bytes]:
    """The texts as a list of bytes (str → UTF-8). TypeError/ValueError naming `name[i]` on a bad item."""
    if isinstance(texts, (str, bytes, bytearray, memoryview)):
        raise TypeError(
            f"{name}: expected a sequence of str or bytes; got a single {type(texts).__name__} (wrap it in a list)"
        )
    try:
        it = iter(texts)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of str or bytes; got {type(texts).__name__}") from None
    return [_encode(t, name, i) for i, t in enumerate(it)]


def compressed_size(texts: Iterable[Text], level: int = 9) -> np.ndarray:
    """C(t) = len(gzip.compress(t, compresslevel=level)) for each text, as an int64 array [len(texts)]."""
    level = _check_level(level)
    data = encode_texts(texts)
    return np.asarray(_core.ncd_gzip_sizes(data, level), dtype=np.int64).reshape(len(data))


# Work per Rust call, in bytes deflated (each source once per target, with that target): the call
# runs without the GIL and cannot be interrupted, so Ctrl-C is seen between calls, ~0.1-1 s apart.
_CALL_BYTES = 1 << 25


class Scorer:
    """Fixed targets, compressed once; scores any number of source batches against them.

    Holds a ``lmkern._core.NcdScorer`` (the targets and their sizes live in Rust). This is what the
    streaming engines (lmkern.data) keep per worker. Not picklable: build one per process.
    """

    def __init__(self, targets: Iterable[Text], level: int = 9):
        self.level = _check_level(level)
        targets = encode_texts(targets, "target")
        self._core = _core.NcdScorer(targets, self.level)
        self.n_targets = self._core.n_targets
        self._target_bytes = sum(len(t) for t in targets)

    def _calls(self, data: list[bytes]):
        """(start, stop) of the sources of each Rust call: ~_CALL_BYTES of work, and at least 16
        sources a thread (the kernel's tasks are blocks of 4 sources)."""
        fewest = 16 * _core.get_num_threads()
        start, work = 0, 0
        for i, s in enumerate(data):
            work += len(s) * self.n_targets + self._target_bytes
            if work >= _CALL_BYTES and i + 1 - start >= fewest:
                yield start, i + 1
                start, work = i + 1, 0
        if start < len(data):
            yield start, len(data)

    def target_sizes(self) -> np.ndarray:
        """C(y_j) of each target, int64 [n_targets]."""
        return np.asarray(self._core.target_sizes(), dtype=np.int64).reshape(self.n_targets)

    def ncd(self, sources: Iterable[Text]) -> np.ndarray:
        """NCD(source_i, target_j), float64 [len(sources), n_targets]."""
        data = encode_texts(sources, "source")
        # NaN poison: an element the kernel failed to write cannot pass for a score.
        out = np.full((len(data), self.n_targets), np.nan, dtype=np.float64)
        if out.size:
            for a, b in self._calls(data):
                self._core.ncd_into(data[a:b], out[a:b].ctypes.data)
        return out

    def alignment(self, sources: Iterable[Text]) -> np.ndarray:
        """1 − mean_j NCD(source_i, target_j), float64 [len(sources)]. ValueError without targets."""
        data = encode_texts(sources, "source")
        if self.n_targets == 0:
            raise ValueError("target: expected at least one target text (the alignment is a mean over targets); got none")
        out = np.full(len(data), np.nan, dtype=np.float64)
        if out.size:
            for a, b in self._calls(data):
                self._core.alignment_into(data[a:b], out[a:b].ctypes.data)
        return out

    def __repr__(self) -> str:
        return f"lmkern.ncd.Scorer(n_targets={self.n_targets}, level={self.level})"


def ncd_matrix(xs: Iterable[Text], ys: Iterable[Text], level: int = 9) -> np.ndarray:
    """NCD(xs[i], ys[j]) for every pair, float64 [len(xs), len(ys)] (x first in the concatenation)."""
    return Scorer(ys, level).ncd(xs)


def ncd(x: Text, y: Text, level: int = 9) -> float:
    """NCD(x, y) = (C(x ⊕ y) − min(C(x), C(y))) / max(C(x), C(y)) as a float (not symmetric: x first)."""
    x, y = _encode(x, "x", None), _encode(y, "y", None)
    return float(Scorer([y], level).ncd([x])[0, 0])


def zipfit_scores(source: Iterable[Text], target: Iterable[Text], level: int = 9) -> np.ndarray:
    """ZIP-FIT alignment of each source text to the target set: 1 − mean_j NCD(source_i, target_j),
    float64 [len(source)]. Higher is more aligned. ValueError when `target` is empty."""
    return Scorer(target, level).alignment(source)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first, ties in index order (k > len: all of them)."""
    k = _check_k(k)
    try:
        scores = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"scores: expected real numbers, one per source; got {type(scores).__name__} ({e})") from None
    if scores.ndim != 1:
        raise ValueError(f"scores: expected one score per source (1-D); got shape {scores.shape}")
    # A stable sort of −score keeps equal scores in index order; NaN cannot occur (max(C) >= 20).
    order = np.argsort(-scores, kind="stable")
    return order[:k].astype(np.int64)


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k: expected a non-negative int; got {type(k).__name__}")
    if k < 0:
        raise ValueError(f"k: expected a non-negative int; got {k}")
    return int(k)


def zipfit_select(source: Sequence[Text], target: Iterable[Text], k: int, level: int = 9) -> np.ndarray:
    """Indices (int64) of the k sources best aligned to the target set, best first; equal scores
    keep source order. k larger than len(source) returns every index (sorted the same way)."""
    k = _check_k(k)
    return top_k(zipfit_scores(source, target, level), k)
