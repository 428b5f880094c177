"""Tests of lmkern.ncd (gzip-NCD, ZIP-FIT) against tests/reference/ncd.py.

Exactness: compressed sizes equal ``len(gzip.compress(t, compresslevel=L))`` as stock zlib computes
it, checked against lmkern's bundled stock zlib (``_core.zlib_gzip_size``, the oracle: a host with
another zlib cannot move the expected values) AND against the host's gzip.compress where the host's
zlib is stock (CPython here: 1.2.13). NCDs, alignments and selections are compared BIT FOR BIT
(float64 equality of every element, NaN-poisoned outputs) with the straightforward Python formulas.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lmkern
from lmkern import _core
from lmkern import ncd as N

from reference.ncd import (
    alignments_ref, as_bytes, gzip_size, host_is_stock_zlib, ncd_matrix_ref, ncd_ref, select_ref,
)

LEVELS = list(range(1, 10))
HOST_STOCK = host_is_stock_zlib()
needs_stock_host = pytest.mark.skipif(not HOST_STOCK, reason="the host's zlib is not stock zlib")


def oracle_size(data: bytes, level: int) -> int:
    return _core.zlib_gzip_size(data, level)


def size_fns():
    """The size functions the expected values are computed with: the bundled oracle, and the host's
    gzip.compress when the host is stock zlib."""
    return [oracle_size] + ([gzip_size] if HOST_STOCK else [])


def bits(a) -> np.ndarray:
    """float64 values as their bit patterns: equality of these is bit-identity (and NaN != anything)."""
    return np.ascontiguousarray(np.asarray(a, dtype=np.float64)).view(np.uint64)


def assert_bit_identical(out, ref, what=""):
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64).reshape(out.shape)
    assert out.shape == ref.shape
    assert not np.isnan(out).any(), f"{what}: NaN in the output (an element left unwritten?)"
    diff = np.nonzero(bits(out) != bits(ref))
    assert diff[0].size == 0, (
        f"{what}: {diff[0].size} element(s) differ, first at {tuple(int(d[0]) for d in diff)}: "
        f"{out[tuple(d[0] for d in diff)]!r} != {ref[tuple(d[0] for d in diff)]!r}"
    )


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
WORDS = ("the of and to in is that for it as with was on be by this are or not from at which data model "
         "language train token loss gradient proof lemma theorem def return import class self None 0 1 2 "
         "λ ∑ 数据 ümlaut ∀x").split()


def word_text(rng: random.Random, n_words: int) -> str:
    """Text-like input: words from a small vocabulary (compressible, with shared substrings across texts)."""
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def big_input(kind: str, size: int, seed: int) -> bytes:
    """A large deterministic input of exactly `size` bytes: random bytes, text-like, or a repeated block."""
    rng = random.Random(seed)
    if kind == "random":
        return rng.randbytes(size)
    if kind == "text":
        out = bytearray()
        while len(out) < size:
            out += (word_text(rng, 200) + "\n").encode()
        return bytes(out[:size])
    block = rng.randbytes(rng.randint(1, 5000))  # long matches at every distance up to 32 KB and past it
    out = bytearray((block * (size // len(block) + 1))[:size])
    for _ in range(size // 1000):
        if out:
            out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


text_or_bytes = st.one_of(st.text(max_size=3000), st.binary(max_size=3000))


# ------------------------------------------------------------------------------------------------
# compressed sizes
# ------------------------------------------------------------------------------------------------
@given(texts=st.lists(text_or_bytes, max_size=12), level=st.integers(0, 9))
def test_compressed_size_equals_gzip(texts, level):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", N.Level0Warning)
        out = N.compressed_size(texts, level)
    assert out.dtype == np.int64 and out.shape == (len(texts),)
    data = [as_bytes(t) for t in texts]
    for size in size_fns():
        assert out.tolist() == [size(d, level) for d in data], size.__name__


@settings(max_examples=8)
@given(
    kind=st.sampled_from(["random", "text", "repeat"]),
    size=st.sampled_from([32767, 32768, 32769, 65536 + 7, 258 * 1000, 1 << 20]),
    level=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_compressed_size_large(kind, size, level, seed):
    """A few large inputs (window and block boundaries, up to 1 MiB): same lengths as the oracle and host."""
    data = big_input(kind, size, seed)
    out = N.compressed_size([data, data[: size // 3]], level)
    for fn in size_fns():
        assert out.tolist() == [fn(data, level), fn(data[: size // 3], level)], fn.__name__


@pytest.mark.parametrize("level", range(10))
def test_edge_texts_every_level(level):
    texts = ["", b"", "a", b"\x00", "é" * 1000, b"\xff\xfe" * 2000, "ab" * 40000, bytes(range(256)) * 300]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", N.Level0Warning)
        out = N.compressed_size(texts, level)
    for fn in size_fns():
        assert out.tolist() == [fn(as_bytes(t), level) for t in texts]
    # gzip of nothing: 10-byte header, an empty block (2 bytes; stored at level 0: 5), 8-byte trailer
    assert out[0] == out[1] == (23 if level == 0 else 20)


@needs_stock_host
@given(data=st.binary(max_size=5000), level=st.integers(0, 9))
def test_oracle_is_host_gzip(data, level):
    """The bundled oracle itself agrees with the host's stock zlib (so it is stock zlib too)."""
    assert _core.zlib_gzip_size(data, level) == gzip_size(data, level)


def test_zlib_version_is_stock():
    v = _core.zlib_version()
    assert v.startswith("1.") and "ng" not in v.lower(), v


def test_bytes_like_inputs():
    b = b"hello hello world" * 10
    out = N.compressed_size([b, bytearray(b), memoryview(b), b.decode()])
    assert len(set(out.tolist())) == 1


# ------------------------------------------------------------------------------------------------
# NCD, alignment, selection: bit-identical to the reference
# ------------------------------------------------------------------------------------------------
def corpus(seed: int, n: int, max_words: int = 120, empty_every: int = 0) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if empty_every and i % empty_every == 0:
            out.append("" if i % 2 else b"")
            continue
        t = word_text(rng, rng.randint(0, max_words))
        out.append(t if rng.random() < 0.5 else t.encode())
    return out


@given(
    seed=st.integers(0, 2**32 - 1),
    n_src=st.sampled_from([0, 1, 2, 7, 13]),
    n_tgt=st.sampled_from([1, 2, 5, 11]),
    level=st.integers(0, 9),
)
def test_ncd_matrix_and_alignment_bit_identical(seed, n_src, n_tgt, level):
    xs = corpus(seed, n_src, empty_every=5)
    ys = corpus(seed + 1, n_tgt, empty_every=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", N.Level0Warning)  # level 0: exact too, though content-blind
        m = N.ncd_matrix(xs, ys, level)
        a = N.zipfit_scores(xs, ys, level)
    assert m.shape == (n_src, n_tgt) and m.dtype == np.float64
    assert a.shape == (n_src,) and a.dtype == np.float64
    for fn in size_fns():
        assert_bit_identical(m, ncd_matrix_ref(xs, ys, level, fn) if n_src else np.empty((0, n_tgt)), f"ncd {fn.__name__}")
        assert_bit_identical(a, alignments_ref(xs, ys, level, fn), f"alignment {fn.__name__}")


@given(x=text_or_bytes, y=text_or_bytes, level=st.sampled_from(LEVELS))
def test_ncd_pair_arbitrary_text(x, y, level):
    """Arbitrary unicode / bytes pairs (not only text-like ones), x first."""
    for fn in size_fns():
        assert N.ncd(x, y, level) == ncd_ref(x, y, level, fn)
        assert N.ncd(y, x, level) == ncd_ref(y, x, level, fn)


@settings(max_examples=6)
@given(
    kinds=st.tuples(st.sampled_from(["random", "text", "repeat"]), st.sampled_from(["random", "text", "repeat"])),
    sizes=st.tuples(st.sampled_from([1, 1000, 32767, 32769, 100_000]), st.sampled_from([0, 1000, 32768, 70_000])),
    level=st.sampled_from(LEVELS),
    seed=st.integers(0, 2**32 - 1),
)
def test_ncd_large_pairs(kinds, sizes, level, seed):
    """Concatenations that cross the 32 KB window and deflate's block boundaries: priming with x
    must give exactly the length of compressing x ⊕ y."""
    x = big_input(kinds[0], sizes[0], seed)
    y = big_input(kinds[1], sizes[1], seed + 1)
    xs, ys = [x, y, x[: sizes[0] // 2]], [y, x]
    m = N.ncd_matrix(xs, ys, level)
    for fn in size_fns():
        assert_bit_identical(m, ncd_matrix_ref(xs, ys, level, fn), fn.__name__)


@given(seed=st.integers(0, 2**32 - 1), n_src=st.integers(0, 25), k=st.integers(0, 30), level=st.sampled_from([1, 6, 9]))
def test_select_matches_reference_with_ties(seed, n_src, k, level):
    rng = random.Random(seed)
    base = corpus(seed, max(1, n_src // 2))
    # duplicates give exactly equal scores: ties must stay in source order
    xs = [rng.choice(base) for _ in range(n_src)]
    ys = corpus(seed + 7, 3)
    sel = N.zipfit_select(xs, ys, k, level)
    scores = alignments_ref(xs, ys, level, oracle_size)
    assert sel.dtype == np.int64
    assert sel.tolist() == select_ref(scores, k)
    assert len(sel) == min(k, n_src)


def test_ties_keep_source_order():
    xs = ["same text here", "other words entirely", "same text here", "same text here"]
    ys = ["same text", "text here"]
    sel = N.zipfit_select(xs, ys, 4).tolist()
    s = N.zipfit_scores(xs, ys)
    assert s[0] == s[2] == s[3]
    assert [i for i in sel if i in (0, 2, 3)] == [0, 2, 3]


def test_scorer_batches_equal_one_shot():
    xs, ys = corpus(1, 40, empty_every=9), corpus(2, 6)
    sc = N.Scorer(ys, 9)
    assert sc.n_targets == 6 and sc.level == 9
    assert sc.target_sizes().tolist() == [oracle_size(as_bytes(y), 9) for y in ys]
    whole = sc.alignment(xs)
    parts = np.concatenate([sc.alignment(xs[i:i + 7]) for i in range(0, 40, 7)])
    assert_bit_identical(parts, whole)
    assert_bit_identical(sc.ncd(xs[:5]), N.ncd_matrix(xs[:5], ys))


def test_calls_in_parts_equal_one_call(monkeypatch, num_threads):
    """Scorer splits big inputs into several Rust calls (Ctrl-C is seen between them): same bits."""
    lmkern.set_num_threads(2)  # the calls hold at least 16 sources a thread
    xs, ys = corpus(5, 150), corpus(6, 7)
    whole_m, whole_a = N.ncd_matrix(xs, ys), N.zipfit_scores(xs, ys)
    monkeypatch.setattr(N, "_CALL_BYTES", 1)
    sc = N.Scorer(ys)
    calls = list(sc._calls(N.encode_texts(xs)))
    assert len(calls) > 2 and calls[0][0] == 0 and calls[-1][1] == 150
    assert all(b - a >= 16 * lmkern.get_num_threads() or b == 150 for a, b in calls)
    assert_bit_identical(sc.ncd(xs), whole_m)
    assert_bit_identical(sc.alignment(xs), whole_a)


def test_ctrl_c_interrupts_a_long_scoring(monkeypatch, num_threads, sigint_raises):
    """SIGINT during a scoring raises KeyboardInterrupt after the Rust call running then, not after
    the whole input (one GIL-free call could not be interrupted at all). ~0.3 s of work in ~30 calls."""
    import signal
    import threading
    import time

    lmkern.set_num_threads(2)  # the calls hold at least 16 sources a thread
    monkeypatch.setattr(N, "_CALL_BYTES", 1 << 20)
    xs, ys = corpus(7, 3000, max_words=300), corpus(8, 10, max_words=300)
    sc = N.Scorer(ys)
    calls = []
    real = sc._core

    class Counting:  # counts the Rust calls that ran
        def __getattr__(self, name):
            return getattr(real, name)

        def alignment_into(self, data, ptr):
            calls.append(len(data))
            real.alignment_into(data, ptr)

    sc._core = Counting()
    total = len(list(sc._calls(N.encode_texts(xs))))
    assert total >= 20, total
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        timer.start()
        sc.alignment(xs)
        time.sleep(10)  # the whole input scored before the signal came: wait for it here instead
    timer.join()
    assert len(calls) < total, f"all {total} calls ran before the interrupt ({time.perf_counter() - t0:.2f} s)"


def test_independent_of_thread_count(num_threads):
    xs, ys = corpus(3, 33), corpus(4, 9)
    lmkern.set_num_threads(1)
    one_m, one_a = N.ncd_matrix(xs, ys), N.zipfit_scores(xs, ys)
    lmkern.set_num_threads(2)
    assert_bit_identical(N.ncd_matrix(xs, ys), one_m)
    assert_bit_identical(N.zipfit_scores(xs, ys), one_a)


def test_values_make_sense():
    """Sanity, independent of the reference: a text is closer to itself than to unrelated bytes."""
    t = word_text(random.Random(5), 300)
    noise = random.Random(6).randbytes(len(t))
    assert N.ncd(t, t) < 0.2 < 0.9 < N.ncd(t, noise)
    s = N.zipfit_scores([t, noise], [t])
    assert s[0] > s[1]


# ------------------------------------------------------------------------------------------------
# level 0 and bad input
# ------------------------------------------------------------------------------------------------
def test_level0_warns_and_is_content_blind():
    a = "abababababababab" * 10
    b = ("the quick brown fox jumps over the lazy dog " * 5)[: len(a)]  # same length, other content
    assert len(a) == len(b)
    with pytest.warns(N.Level0Warning, match="without compressing"):
        s = N.zipfit_scores([a, b], ["abababab"], level=0)
    assert s[0] == s[1]
    with pytest.warns(N.Level0Warning) as rec:
        N.compressed_size(["x"], 0)
    assert rec[0].filename == __file__  # attributed to the caller, not to lmkern


@pytest.mark.parametrize("level, exc", [(10, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError), ("9", TypeError)])
def test_bad_level(level, exc):
    with pytest.raises(exc, match="level"):
        N.compressed_size(["x"], level)
    with pytest.raises(exc, match="level"):
        N.zipfit_scores(["x"], ["y"], level)


def test_lone_surrogate_is_a_clear_error():
    with pytest.raises(ValueError, match=r"source\[1\].*UTF-8"):
        N.zipfit_scores(["ok", "bad \ud800 text"], ["t"])
    with pytest.raises(ValueError, match=r"target\[0\].*UTF-8"):
        N.ncd_matrix(["x"], ["\udfff"])
    # the same text as bytes (surrogatepass) is accepted: bytes are taken as they are
    assert N.compressed_size(["bad \ud800".encode("utf-8", "surrogatepass")])[0] > 20


def test_ncd_pair_bad_input():
    with pytest.raises(TypeError, match="x: expected str or bytes; got list"):
        N.ncd(["a"], "b")
    with pytest.raises(ValueError, match="y: a str with no UTF-8 form"):
        N.ncd("a", "\ud83d")


def test_undecodable_bytes_are_fine():
    """bytes need no decoding: invalid UTF-8 is compressed as it is."""
    b = b"\xff\xfe\x80 not utf-8 \xc3"
    assert N.compressed_size([b])[0] == oracle_size(b, 9)
    assert N.ncd(b, b) == ncd_ref(b, b, 9, oracle_size)


@pytest.mark.parametrize("bad, exc, match", [
    ("a single str", TypeError, r"texts: .*single str"),
    (b"single bytes", TypeError, r"texts: .*single bytes"),
    (["ok", 3], TypeError, r"texts\[1\]: expected str or bytes; got int"),
    ([None], TypeError, r"texts\[0\]"),
    (42, TypeError, r"texts: expected a sequence"),
])
def test_bad_texts(bad, exc, match):
    with pytest.raises(exc, match=match):
        N.compressed_size(bad)


def test_empty_sets():
    assert N.zipfit_scores([], ["t"]).shape == (0,)
    assert N.zipfit_select([], ["t"], 5).shape == (0,)
    assert N.ncd_matrix([], ["t"]).shape == (0, 1)
    assert N.ncd_matrix(["s", "t"], []).shape == (2, 0)
    assert N.compressed_size([]).shape == (0,)
    with pytest.raises(ValueError, match="target: expected at least one target"):
        N.zipfit_scores(["s"], [])
    with pytest.raises(ValueError, match="target: expected at least one target"):
        N.zipfit_select(["s"], [], 1)


def test_k():
    xs, ys = ["a b", "c d", "a b c"], ["a b"]
    assert N.zipfit_select(xs, ys, 10).tolist() == select_ref(alignments_ref(xs, ys, 9, oracle_size), 3)
    assert N.zipfit_select(xs, ys, 0).tolist() == []
    with pytest.raises(ValueError, match="k: expected a non-negative int; got -1"):
        N.zipfit_select(xs, ys, -1)
    with pytest.raises(TypeError, match="k: "):
        N.zipfit_select(xs, ys, 2.0)
    assert N.top_k([0.5, 0.9, 0.5], 2).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"scores: expected one score per source \(1-D\); got shape \(2, 2\)"):
        N.top_k([[0.1, 0.2], [0.3, 0.4]], 1)  # an NCD matrix is not a score vector
    with pytest.raises(TypeError, match="scores: expected real numbers, one per source; got list"):
        N.top_k(["a", "b"], 1)  # the texts, not their scores


def test_public_api():
    assert lmkern.ncd is N
    for name in ("compressed_size", "ncd", "ncd_matrix", "zipfit_scores", "zipfit_select"):
        assert callable(getattr(N, name))


# ------------------------------------------------------------------------------------------------
# `lmkern bench` entries: checked against the formula, and able to fail
# ------------------------------------------------------------------------------------------------
def test_bench_entries(tmp_path):
    import json

    from lmkern import cli

    path = tmp_path / "b.json"
    assert cli.main(["bench", "--quick", "--device", "cpu", "--op", "ncd", "--no-progress", "--json", str(path)]) == 0
    res = json.loads(path.read_text())["results"]
    assert {r["op"] for r in res} == {"ncd zipfit_scores", "ncd ncd_matrix"}
    assert all(r["ok"] and r["rel_error"] == 0.0 and r["peer_rel_error"] == 0.0 for r in res)


def test_bench_fails_on_a_wrong_score(monkeypatch, tmp_path):
    import json

    from lmkern import cli

    real = N.zipfit_scores
    monkeypatch.setattr(N, "zipfit_scores", lambda *a, **k: real(*a, **k) * (1 + 1e-9))
    path = tmp_path / "b.json"
    assert cli.main(["bench", "--quick", "--device", "cpu", "--op", "zipfit", "--no-progress", "--json", str(path)]) == 1
    assert not json.loads(path.read_text())["results"][0]["ok"]


def test_benchmark_corpus_and_peer():
    """The benchmark's real-text corpus is deterministic ~1 KB pieces; its Python peer (the published
    method and the cached variant) gives the reference's scores, and so lmkern's."""
    from lmkern.data import baseline, corpus

    src, tgt = corpus.sources_and_targets(12, 3, seed=5)
    assert (src, tgt) == corpus.sources_and_targets(12, 3, seed=5)
    assert all(500 <= len(t.encode()) <= 1100 for t in src + tgt)
    assert len(set(src + tgt)) == 15
    ref = alignments_ref(src, tgt, 6, gzip_size)
    assert baseline.published_scores(src, tgt, 6).tolist() == ref
    assert baseline.cached_scores(src, tgt, 6).tolist() == ref
    # The raw-deflate floor: its total is the sum of each pair's raw deflate (wbits -15); the Python
    # 3.10 form (zlib.compress takes no wbits there) gives the same bytes.
    pairs = [(x + y).encode() for x in src for y in tgt]
    assert baseline.raw_zlib_pairs(src, tgt, 6) == sum(len(baseline._raw_deflate_310(p, 6, -15)) for p in pairs)
    if sys.version_info >= (3, 11):
        assert all(baseline._raw_deflate_310(p, 6, -15) == zlib.compress(p, 6, -15) for p in pairs[:4])
    if HOST_STOCK:
        assert_bit_identical(N.zipfit_scores(src, tgt, 6), ref)


def test_import_lmkern_gives_lmkern_data():
    """`import lmkern` alone makes lmkern.data usable as the README writes it, without loading
    pyarrow or Ray; every name in lmkern.__all__ exists (a fresh interpreter: this one has imported
    lmkern.data already)."""
    code = (
        "import sys, lmkern\n"
        "assert callable(lmkern.data.select_local) and callable(lmkern.data.read_texts)\n"
        "assert all(hasattr(lmkern, n) for n in lmkern.__all__), [n for n in lmkern.__all__ if not hasattr(lmkern, n)]\n"
        "assert 'pyarrow' not in sys.modules and 'ray' not in sys.modules, sorted(m for m in sys.modules if 'arrow' in m or m == 'ray')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)

# ------------------------------------------------------------------------------------------------
# Found by a mutation-testing audit of the Python layer (stop 26): each test was seen failing with
# a deliberate bug in the code it covers (a check dropped, an argument not passed on, ...).
# ------------------------------------------------------------------------------------------------


def test_ncd_puts_x_first():
    """The hypothesis test draws short texts, whose two concatenation orders mostly compress to the
    same length: NCD(x, y) == NCD(y, x) there, so swapping x and y passed it."""
    x, y = b"the quick brown fox jumps over the lazy dog " * 20, bytes(range(256))
    oracle = _core.zlib_gzip_size
    assert N.ncd(x, y) == ncd_ref(x, y, 9, oracle) != ncd_ref(y, x, 9, oracle)
    assert N.ncd(y, x) == ncd_ref(y, x, 9, oracle)
