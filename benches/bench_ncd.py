"""gzip-NCD / ZIP-FIT: lmkern's Rust scorer side by side with ZIP-FIT's published Python method.

Data: real text, ~1 KB pieces of Python's own documentation (lmkern.data.corpus: pydoc topics and
stdlib docstrings; deterministic, no network). Every method scores the same sources against the
same targets at the same gzip level:

  lmkern      lmkern.ncd.zipfit_scores (Rust, lmkern's threads: all cores)
  published   ZIP-FIT's method: gzip.compress for C(x), C(y) and C(x ⊕ y) per pair, a
              multiprocessing.Pool over all cores (lmkern.data.baseline)
  cached      the same with C(x), C(y) cached: one gzip.compress(x ⊕ y) per pair
  raw zlib    zlib.compress(x + y, level, -15) per pair, Pool over all cores: the floor of any
              method that compresses each pair from scratch with stock zlib

Bytes moved: each pair compresses len(x) + len(y) ≈ 2 KB; the naive methods compress x ⊕ y from
scratch (and published also x and y again), lmkern compresses x once per source and primes the
x ⊕ y stream with it (PAPERS.md §7), so its work per pair is ≈ the target's 1 KB plus tree building.

Script mode prints the table (sizes configurable; the defaults are the issue's 2000 × 100):

  python benches/bench_ncd.py [--sources 2000] [--targets 100] [--levels 9 1] [--processes 2]

asv (a smaller default: 200 sources × 20 targets): time_/peakmem_ of each method, track_ ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

import lmkern
from lmkern import ncd as N
from lmkern.data import baseline as B
from lmkern.data import corpus as C

# ------------------------------------------------------------------------------------------------
# asv suite
# ------------------------------------------------------------------------------------------------
ASV_SOURCES, ASV_TARGETS = 200, 20
PROCESSES = os.cpu_count() or 1


class ZipFitScores:
    """200 sources × 20 targets of ~1 KB real text, levels 1 and 9: lmkern vs the published method
    (3 gzip.compress per pair), the cached variant (1 per pair) and raw zlib, the Python ones on a
    Pool over all cores."""

    params = [[1, 9]]
    param_names = ["level"]
    timeout = 600
    repeat = (2, 5, 30.0)
    number = 1

    def setup(self, level):
        self.src, self.tgt = C.sources_and_targets(ASV_SOURCES, ASV_TARGETS)
        self.pool = B.Pool(self.tgt, level, PROCESSES)
        N.zipfit_scores(self.src[:2], self.tgt, level)  # warm-up (thread pool, first call)

    def teardown(self, level):
        self.pool.close()

    def time_lmkern(self, level):
        N.zipfit_scores(self.src, self.tgt, level)

    def peakmem_lmkern(self, level):
        N.zipfit_scores(self.src, self.tgt, level)

    def time_published(self, level):
        B.published_scores(self.src, self.tgt, level, pool=self.pool)

    def time_cached(self, level):
        B.cached_scores(self.src, self.tgt, level, pool=self.pool)

    def time_raw_zlib(self, level):
        B.raw_zlib_pairs(self.src, self.tgt, level, pool=self.pool)

    def track_lmkern_pairs_per_s_per_core(self, level):
        """lmkern's pairs per second per thread (median of 3 runs)."""
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            N.zipfit_scores(self.src, self.tgt, level)
            ts.append(time.perf_counter() - t0)
        return round(ASV_SOURCES * ASV_TARGETS / statistics.median(ts) / lmkern.get_num_threads())

    track_lmkern_pairs_per_s_per_core.unit = "pairs/s"

    def _ratio(self, level, peer) -> float:
        t_lm, t_peer = [], []
        for _ in range(3):  # interleaved
            t0 = time.perf_counter()
            N.zipfit_scores(self.src, self.tgt, level)
            t_lm.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            peer(self.src, self.tgt, level, pool=self.pool)
            t_peer.append(time.perf_counter() - t0)
        return round(statistics.median(t_peer) / statistics.median(t_lm), 2)

    def track_speedup_vs_published(self, level):
        """published time / lmkern time (goal ≥ 5×)."""
        return self._ratio(level, B.published_scores)

    track_speedup_vs_published.unit = "x"

    def track_speedup_vs_cached(self, level):
        return self._ratio(level, B.cached_scores)

    track_speedup_vs_cached.unit = "x"

    def track_speedup_vs_raw_zlib(self, level):
        """raw zlib time (x ⊕ y only, from scratch) / lmkern time: how far below the naive floor."""
        return self._ratio(level, B.raw_zlib_pairs)

    track_speedup_vs_raw_zlib.unit = "x"


class CompressedSize:
    """lmkern.ncd.compressed_size vs [len(gzip.compress(t)) for t in texts], 2000 ~1 KB texts, one process."""

    params = [[1, 9]]
    param_names = ["level"]

    def setup(self, level):
        self.texts, _ = C.sources_and_targets(2000, 0)
        self.data = [t.encode() for t in self.texts]

    def time_lmkern(self, level):
        N.compressed_size(self.data, level)

    def time_gzip(self, level):
        [B.gzip_size(d, level) for d in self.data]


# ------------------------------------------------------------------------------------------------
# script mode: the table of BENCHMARKS.md
# ------------------------------------------------------------------------------------------------
def _time(fn, repeat: int) -> tuple[float, object]:
    ts, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def run(n_sources: int, n_targets: int, levels, processes: int, repeat: int, peer_repeat: int, out=print) -> list[dict]:
    src, tgt = C.sources_and_targets(n_sources, n_targets)
    pairs = n_sources * n_targets
    mean_bytes = (sum(len(s.encode()) for s in src) / n_sources, sum(len(t.encode()) for t in tgt) / n_targets)
    threads = lmkern.get_num_threads()
    out(f"{n_sources} sources x {n_targets} targets = {pairs:,} pairs; mean bytes: source {mean_bytes[0]:.0f}, "
        f"target {mean_bytes[1]:.0f}; lmkern threads {threads}, Pool processes {processes}; "
        f"lmkern median of {repeat}, Python methods median of {peer_repeat}")
    rows = []
    for level in levels:
        N.zipfit_scores(src[:2], tgt, level)
        t_lm, s_lm = _time(lambda: N.zipfit_scores(src, tgt, level), repeat)
        with B.Pool(tgt, level, processes) as pool:
            t_pub, s_pub = _time(lambda: B.published_scores(src, tgt, level, pool=pool), peer_repeat)
            t_cac, s_cac = _time(lambda: B.cached_scores(src, tgt, level, pool=pool), peer_repeat)
            t_raw, _ = _time(lambda: B.raw_zlib_pairs(src, tgt, level, pool=pool), peer_repeat)
        # one core: the floor per core without Pool overheads
        with B.Pool(tgt, level, 1) as pool1:
            n1 = max(1, n_sources // 10)
            t_raw1, _ = _time(lambda: B.raw_zlib_pairs(src[:n1], tgt, level, pool=pool1), peer_repeat)
        same_pub = bool(np.array_equal(s_lm.view(np.uint64), s_pub.view(np.uint64)))
        same_cac = bool(np.array_equal(s_lm.view(np.uint64), s_cac.view(np.uint64)))
        for name, t, cores, same in (
            ("lmkern", t_lm, threads, None), ("published", t_pub, processes, same_pub),
            ("cached", t_cac, processes, same_cac), ("raw zlib", t_raw, processes, None),
            ("raw zlib, 1 process", t_raw1 * n_sources / n1, 1, None),
        ):
            rows.append({"level": level, "method": name, "seconds": t, "pairs_per_s": pairs / t,
                         "pairs_per_s_per_core": pairs / t / cores, "lmkern_speedup": t / t_lm,
                         "identical_scores": same})
    header = ("level", "method", "time", "pairs/s", "pairs/s/core", "lmkern speedup", "scores identical")
    table = [header]
    for r in rows:
        table.append((str(r["level"]), r["method"], f"{r['seconds']:.3f} s", f"{r['pairs_per_s']:,.0f}",
                      f"{r['pairs_per_s_per_core']:,.0f}", "-" if r["method"] == "lmkern" else f"{r['lmkern_speedup']:.2f}x",
                      "-" if r["identical_scores"] is None else ("yes" if r["identical_scores"] else "NO")))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for j, row in enumerate(table):
        out("| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |")
        if j == 0:
            out("| " + " | ".join("-" * w for w in widths) + " |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", type=int, default=2000)
    p.add_argument("--targets", type=int, default=100)
    p.add_argument("--levels", type=int, nargs="+", default=[9, 1])
    p.add_argument("--processes", type=int, default=PROCESSES, help="Pool size of the Python methods (default: all cores)")
    p.add_argument("--threads", type=int, help="lmkern threads (default: lmkern's)")
    p.add_argument("--repeat", type=int, default=5, help="runs of lmkern (median)")
    p.add_argument("--peer-repeat", type=int, default=1, help="runs of each Python method (median)")
    a = p.parse_args(argv)
    if a.threads:
        lmkern.set_num_threads(a.threads)
    rows = run(a.sources, a.targets, a.levels, a.processes, a.repeat, a.peer_repeat)
    return 0 if all(r["identical_scores"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
