"""ZIP-FIT over corpora (lmkern.data, `lmkern zipfit`): readers, the streaming local engine, the CLI.

Expected selections are computed independently: the files are parsed here with plain json/pyarrow/
str code, scored with the reference formula (tests/reference/ncd.py) on sizes from the bundled stock
zlib oracle, and ordered by the reference rule (score desc, then source order).
"""
from __future__ import annotations

import gzip
import json
import os
import random
import re
import sys

import numpy as np
import pytest

# The test extra installs pyarrow; a machine without it (the offline GPU box) skips this CPU module.
pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow (in the test extra)")
import pyarrow.parquet as pq  # noqa: E402
from hypothesis import given, strategies as st

from lmkern import _core, cli
from lmkern import data as D
from lmkern.data.local import TopK
from lmkern.data.readers import ROW_BITS

from reference.ncd import alignments_ref, select_ref

WORDS = ("proof lemma theorem induction the of and a is data model train loss def return class import "
         "self None for in range print λ ∀ 数据 naïve").split()


def oracle(data: bytes, level: int) -> int:
    return _core.zlib_gzip_size(data, level)


def text(rng: random.Random, lo=1, hi=60) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture
def corpus(tmp_path):
    """Sources in every format (and a nested directory), targets, and the texts in source order."""
    rng = random.Random(1234)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    texts: list[str] = []

    jl = [text(rng) for _ in range(23)] + ["proof lemma theorem"] * 2  # duplicates: exact ties
    with open(src / "a.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(jl):
            f.write(json.dumps({"id": i, "text": t, "meta": {"lang": "en"}}, ensure_ascii=i % 2 == 0) + "\n")
            if i == 3:
                f.write("\n   \n")  # blank lines are not records
    texts += jl

    pt = [text(rng) for _ in range(17)] + [""]  # an empty text is a record
    pq.write_table(pa.table({"text": pt, "n": list(range(len(pt)))}), src / "b.parquet", row_group_size=5)
    texts += pt

    tx = [text(rng) for _ in range(11)]
    with open(src / "sub" / "c.txt", "wb") as f:
        for i, t in enumerate(tx):
            f.write(t.encode() + (b"\r\n" if i % 3 == 0 else b"\n"))
            if i == 5:
                f.write(b"\n")
    texts += tx

    gz = [text(rng) for _ in range(6)]
    with gzip.open(src / "sub" / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in gz:
            f.write(json.dumps({"text": t}) + "\n")
    texts += gz
    (src / "sub" / "notes.md").write_text("not a corpus file: ignored inside a directory")

    targets = [text(rng, 20, 80) for _ in range(5)]
    tgt = tmp_path / "targets.jsonl"
    tgt.write_text("".join(json.dumps({"text": t}) + "\n" for t in targets), encoding="utf-8")
    files = [src / "a.jsonl", src / "b.parquet", src / "sub" / "c.txt", src / "sub" / "d.jsonl.gz"]
    return {"dir": src, "files": [str(f) for f in files], "texts": texts, "targets": targets, "target_file": str(tgt)}


def expected(texts, targets, k, level=9):
    scores = alignments_ref(texts, targets, level, oracle)
    order = select_ref(scores, k)
    return [texts[i] for i in order], [scores[i] for i in order]


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------
def test_directory_lists_supported_files_in_order(corpus):
    assert D.list_files(corpus["dir"]) == corpus["files"]
    recs = list(D.iter_records(corpus["dir"]))
    assert [r.text.decode() for r in recs] == corpus["texts"]
    keys = [r.key for r in recs]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert recs[0].data == {"id": 0, "text": corpus["texts"][0], "meta": {"lang": "en"}}
    assert recs[0].location.endswith("a.jsonl:1")
    assert recs[25].data == {"text": corpus["texts"][25], "n": 0} and recs[25].location.endswith("b.parquet:row 0")
    c = [r for r in recs if "c.txt" in r.location]
    assert c[0].location.endswith("c.txt:1") and c[6].location.endswith("c.txt:8")  # the blank line 7 is skipped


def test_json_array_file(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text(json.dumps([{"text": "a b"}, {"text": "c"}]))
    assert [r.text for r in D.iter_records(p)] == [b"a b", b"c"]


# ------------------------------------------------------------------------------------------------
# the local engine
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 7, 1000])
@pytest.mark.parametrize("batch_size", [1, 6, 1024])
def test_select_local_matches_reference(corpus, k, batch_size):
    sel = D.select_local(corpus["dir"], corpus["targets"], k, batch_size=batch_size)
    want_texts, want_scores = expected(corpus["texts"], corpus["targets"], k)
    assert [r.text.decode() for r in sel.records] == want_texts
    assert sel.scores.tolist() == want_scores  # float64 equality: bit-identical
    assert sel.keys.tolist() == [r.key for r in sel.records]
    assert sel.n_sources == len(corpus["texts"]) and sel.n_targets == 5
    assert len(sel.keys) == min(k, len(corpus["texts"]))


@pytest.mark.parametrize("level", [1, 6])
def test_select_local_levels(corpus, level):
    sel = D.select_local(corpus["files"], corpus["targets"], 9, level=level, batch_size=8)
    want_texts, want_scores = expected(corpus["texts"], corpus["targets"], 9, level)
    assert [r.text.decode() for r in sel.records] == want_texts and sel.scores.tolist() == want_scores


def test_select_local_interrupted_drops_the_queued_batch(corpus, monkeypatch, sigint_raises):
    """Ctrl-C while a batch is scored: KeyboardInterrupt comes at once and the batch queued behind it
    is never scored (leaving the executor's `with` waited for both: two batches' time)."""
    import signal
    import threading
    import time

    from lmkern import ncd as N

    calls = []
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))

    def slow_alignment(self, sources):  # the first batch: SIGINT 0.2 s into its 1 s
        calls.append(time.perf_counter())
        if len(calls) == 1:
            timer.start()
        time.sleep(1.0)
        return np.zeros(len(sources))

    monkeypatch.setattr(N.Scorer, "alignment", slow_alignment)
    with pytest.raises(KeyboardInterrupt):
        D.select_local(corpus["dir"], corpus["targets"], 3, batch_size=2)
    waited = time.perf_counter() - calls[0]
    timer.join()
    time.sleep(1.2)  # the batch being scored ends in the background; nothing starts after it
    assert len(calls) == 1 and waited < 0.8, (len(calls), waited)


def test_fetch_records_finds_the_same_records(corpus):
    sel = D.select_local(corpus["dir"], corpus["targets"], 12)
    again = D.fetch_records(sel.files, sel.keys.tolist())
    assert [r.data for r in again] == [r.data for r in sel.records]


@given(
    scores=st.lists(st.sampled_from([0.0, 0.25, 0.5, -0.0, 1.0, 0.125]), max_size=60),
    k=st.integers(0, 70),
    chunk=st.integers(1, 9),
)
def test_topk_is_the_sorted_prefix(scores, k, chunk):
    """The bounded heap (fed in chunks, as the engines do) keeps exactly the reference's top k."""
    top = TopK(k)
    for i in range(0, len(scores), chunk):
        top.push_many(np.array(scores[i:i + chunk]), list(range(i, min(i + chunk, len(scores)))))
    assert [key for _, key, _ in top.items()] == select_ref(scores, k)


def test_streaming_holds_only_a_bounded_set(tmp_path, monkeypatch):
    """Sources are never all in memory: at most a few batches of records exist at any time."""
    import weakref

    from lmkern.data import readers

    p = tmp_path / "big.txt"
    rng = random.Random(9)
    p.write_text("\n".join(text(rng, 1, 8) for _ in range(3000)) + "\n")
    live, peak = [0], [0]
    real = readers.Record

    def dead():
        live[0] -= 1

    def make(*a, **kw):
        r = real(*a, **kw)
        weakref.finalize(r, dead)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        return r

    monkeypatch.setattr(readers, "Record", make)
    sel = D.select_local(p, ["proof lemma"], 5, batch_size=100)
    assert sel.n_sources == 3000
    assert 100 <= peak[0] <= 4 * 100 + 5, peak[0]  # a batch is alive; never all 3000


# ------------------------------------------------------------------------------------------------
# the CLI end to end
# ------------------------------------------------------------------------------------------------
def read_out(path: str) -> list[dict]:
    if path.endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("src_name, out_name", [
    ("a.jsonl", "sel.jsonl"), ("b.parquet", "sel.parquet"), ("sub/c.txt", "sel.jsonl"),
    ("sub/d.jsonl.gz", "sel.out"), (".", "nested/dir/sel.parquet"),
])
def test_cli_each_format(corpus, tmp_path, capsys, src_name, out_name):
    src = os.path.normpath(os.path.join(corpus["dir"], src_name))
    out = str(tmp_path / out_name)
    texts = [r.text.decode() for r in D.iter_records(src)]
    rc = cli.main(["zipfit", "--source", src, "--target", corpus["target_file"], "-k", "4", "--out", out,
                   "--level", "9", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "4 of" in capsys.readouterr().out
    rows = read_out(out)
    want_texts, want_scores = expected(texts, corpus["targets"], 4)
    assert [r["text"] for r in rows] == want_texts
    assert [r["zipfit_score"] for r in rows] == want_scores
    assert [r["zipfit_rank"] for r in rows] == [1, 2, 3, 4]
    assert all(r["zipfit_source"] for r in rows)
    if src_name == "a.jsonl":
        assert all(r["meta"] == {"lang": "en"} and isinstance(r["id"], int) for r in rows)


def test_cli_progress_and_text_field(tmp_path, capsys):
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps({"body": f"item {i} proof"}) + "\n" for i in range(50)))
    tgt = tmp_path / "t.txt"
    tgt.write_text("proof\nitem 4 proof\n")
    out = tmp_path / "o.jsonl"
    rc = cli.main(["zipfit", "--source", str(src), "--target", str(tgt), "-k", "3", "--out", str(out),
                   "--text-field", "body", "--level", "1", "--batch-size", "7"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "pairs/s" in err and "50 sources x 2 targets = 100 pairs" in err
    rows = read_out(str(out))
    assert len(rows) == 3 and "body" in rows[0]
    # targets are read with the same text field: a .txt target is one target per line
    want_texts, _ = expected([f"item {i} proof" for i in range(50)], ["proof", "item 4 proof"], 3, 1)
    assert [r["body"] for r in rows] == want_texts


# ------------------------------------------------------------------------------------------------
# bad input: a clear error (exit 2, one line naming the file and line) or a documented result
# ------------------------------------------------------------------------------------------------
def run_cli(capsys, *args) -> tuple[int, str]:
    rc = cli.main(["zipfit", "--no-progress", *map(str, args)])
    return rc, capsys.readouterr().err


@pytest.fixture
def small(tmp_path):
    tgt = tmp_path / "t.jsonl"
    tgt.write_text(json.dumps({"text": "proof lemma"}) + "\n")
    return tmp_path, tgt


def test_parquet_without_pyarrow_says_how_to_get_it(small, capsys, monkeypatch):
    """Without pyarrow, Parquet input or output is an ImportError naming the file and the extra to
    install; the CLI says so before scoring anything (its source here does not even exist)."""
    tmp, tgt = small
    src = tmp / "s.jsonl"
    src.write_text(json.dumps({"text": "lemma"}) + "\n")
    pq.write_table(pa.table({"text": ["x"]}), tmp / "s.parquet")
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # import pyarrow raises ImportError
    hint = "Parquet files need pyarrow: pip install 'lmkern[data]'"
    rc, err = run_cli(capsys, "--source", tmp / "missing", "--target", tgt, "-k", 1, "--out", tmp / "o.parquet")
    assert rc == 2 and re_search(r"o\.parquet: " + re.escape(hint), err), err
    with pytest.raises(ImportError, match=r"s\.parquet: " + re.escape(hint)):
        D.read_texts(tmp / "s.parquet")
    with pytest.raises(ImportError, match=r"w\.parquet: " + re.escape(hint)):
        D.write_records(tmp / "w.parquet", [{"text": "a"}])
    assert sorted(p.name for p in tmp.iterdir()) == ["s.jsonl", "s.parquet", "t.jsonl"]  # no output, no temporary
    rc, _ = run_cli(capsys, "--source", src, "--target", tgt, "-k", 1, "--out", tmp / "o.jsonl")  # JSON Lines need none
    assert rc == 0


@pytest.mark.parametrize("content, match", [
    (b'{"text": "ok"}\n{"title": "no text"}\n', r"s\.jsonl:2: no field 'text' \(fields: 'title'\)"),
    (b'{"text": "ok"}\n{"text": 3}\n', r"s\.jsonl:2: field 'text' is int"),
    (b'{"text": null}\n', r"s\.jsonl:1: field 'text' is null"),
    (b'{"text": "bad \\ud800 surrogate"}\n', r"s\.jsonl:1: field 'text' holds a lone surrogate"),
    (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', r"s\.jsonl:2: not valid UTF-8"),
    (b'{"text": "ok"\n', r"s\.jsonl:1: invalid JSON"),
    (b'["a list"]\n', r"s\.jsonl:1: expected a JSON object; got list"),
])
def test_bad_jsonl_records(capsys, small, content, match):
    tmp, tgt = small
    src = tmp / "s.jsonl"
    src.write_bytes(content)
    rc, err = run_cli(capsys, "--source", src, "--target", tgt, "-k", 1, "--out", tmp / "o.jsonl")
    assert rc == 2
    assert err.startswith("lmkern zipfit: error: ") and err.count("\n") == 1
    import re

    assert re.search(match, err), err
    assert not (tmp / "o.jsonl").exists()


def test_text_file_byte_order_mark_is_not_text(capsys, small):
    tmp, tgt = small
    src = tmp / "s.txt"
    src.write_bytes(b"\xef\xbb\xbfproof one\nlemma two\n")
    rc, err = run_cli(capsys, "--source", src, "--target", tgt, "-k", 2, "--out", tmp / "o.jsonl")
    assert rc == 0, err
    assert sorted(r["text"] for r in read_out(str(tmp / "o.jsonl"))) == ["lemma two", "proof one"]


def test_bad_records_skip(capsys, small):
    tmp, tgt = small
    src = tmp / "s.txt"
    src.write_bytes(b"good proof\nbad \xff byte\nlemma\n")
    rc, err = run_cli(capsys, "--source", src, "--target", tgt, "-k", 5, "--out", tmp / "o.jsonl")
    assert rc == 2 and re_search(r"s\.txt:2: not valid UTF-8", err)
    rc = cli.main(["zipfit", "--no-progress", "--source", str(src), "--target", str(tgt), "-k", "5",
                   "--out", str(tmp / "o.jsonl"), "--bad-records", "skip"])
    out = capsys.readouterr().out
    assert rc == 0 and "1 bad source records skipped" in out
    assert sorted(r["text"] for r in read_out(str(tmp / "o.jsonl"))) == ["good proof", "lemma"]


def re_search(pattern, s):
    import re

    return re.search(pattern, s) is not None


def test_files_that_cannot_be_read(capsys, small):
    tmp, tgt = small
    out = tmp / "o.jsonl"
    (tmp / "broken.parquet").write_bytes(b"PAR1 not really")
    (tmp / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    corrupt = bytearray(gzip.compress(b'{"text": "proof"}\n' * 50))
    corrupt[12:40] = bytes(b ^ 0xFF for b in corrupt[12:40])  # a valid header, then deflate data zlib rejects
    (tmp / "corrupt.jsonl.gz").write_bytes(bytes(corrupt))
    (tmp / "data.csv").write_text("text\nx\n")
    (tmp / "empty").mkdir()
    pq.write_table(pa.table({"body": ["x"]}), tmp / "nocol.parquet")
    cases = [
        (tmp / "missing.jsonl", r"no such file or directory: .*missing\.jsonl"),
        (tmp / "broken.parquet", r"broken\.parquet: cannot read as Parquet"),
        (tmp / "broken.jsonl.gz", r"broken\.jsonl\.gz: cannot read"),
        (tmp / "corrupt.jsonl.gz", r"corrupt\.jsonl\.gz: cannot read: Error -3 while decompressing"),
        (tmp / "data.csv", r"data\.csv: unknown file kind"),
        (tmp / "empty", r"directory .*empty holds no"),
        (tmp / "nocol.parquet", r"nocol\.parquet: no column 'text' \(columns: 'body'\)"),
    ]
    for src, match in cases:
        rc, err = run_cli(capsys, "--source", src, "--target", tgt, "-k", 1, "--out", out)
        assert rc == 2 and re_search(match, err), (src, err)
    assert not out.exists()


def test_targets_and_k(capsys, small):
    tmp, tgt = small
    src = tmp / "s.txt"
    src.write_text("a\nb\nproof\n")
    empty = tmp / "none.txt"
    empty.write_text("\n\n")
    rc, err = run_cli(capsys, "--source", src, "--target", empty, "-k", 1, "--out", tmp / "o.jsonl")
    assert rc == 2 and "target: no records" in err
    rc, err = run_cli(capsys, "--source", src, "--target", tgt, "-k", -1, "--out", tmp / "o.jsonl")
    assert rc == 2 and "k: expected a non-negative int; got -1" in err
    # k larger than the source set: every record, best first (documented)
    rc, _ = run_cli(capsys, "--source", src, "--target", tgt, "-k", 10, "--out", tmp / "o.jsonl")
    assert rc == 0 and len(read_out(str(tmp / "o.jsonl"))) == 3
    # k = 0: an empty output file
    rc, _ = run_cli(capsys, "--source", src, "--target", tgt, "-k", 0, "--out", tmp / "z.parquet")
    assert rc == 0 and read_out(str(tmp / "z.parquet")) == []


def test_outputs_that_cannot_be_written(capsys, small):
    tmp, tgt = small
    src = tmp / "s.txt"
    src.write_text("a\nproof\n")
    (tmp / "outdir").mkdir()
    (tmp / "afile").write_text("")
    for out, match in [(tmp / "outdir", r"outdir: is a directory; the output is a file"),
                       (tmp / "afile" / "o.jsonl", r"afile/o\.jsonl: cannot write: ")]:
        rc, err = run_cli(capsys, "--source", src, "--target", tgt, "-k", 1, "--out", out)
        assert rc == 2 and re_search(match, err) and err.count("\n") == 1, (out, err)
    assert os.listdir(tmp / "outdir") == []  # no temporary file left behind


@pytest.mark.parametrize("flag", ["--threads", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_counts_below_one_are_usage_errors(capsys, small, flag, value):
    tmp, tgt = small
    with pytest.raises(SystemExit) as e:
        cli.main(["zipfit", "--source", str(tgt), "--target", str(tgt), "-k", "1", "--out", str(tmp / "o.jsonl"), flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: expected a whole number >= 1; got " in capsys.readouterr().err


def test_too_many_threads_is_a_usage_error(capsys, small):
    tmp, tgt = small
    with pytest.raises(SystemExit) as e:
        cli.main(["zipfit", "--source", str(tgt), "--target", str(tgt), "-k", "1", "--out", str(tmp / "o.jsonl"),
                  "--threads", "100000"])
    assert e.value.code == 2 and "argument --threads: expected at most 4096 threads; got 100000" in capsys.readouterr().err


def test_lone_surrogate_outside_the_text_field(capsys, small):
    """Only the text field must be valid Unicode; another field's lone surrogate is written back as
    the escape it came as (JSON Lines) or refused with the reason (Parquet cannot store it)."""
    tmp, tgt = small
    src = tmp / "s.jsonl"
    src.write_text('{"text": "proof", "title": "\\ud800 x"}\n')
    rc, err = run_cli(capsys, "--source", src, "--target", tgt, "-k", 1, "--out", tmp / "o.jsonl")
    assert rc == 0, err
    assert read_out(str(tmp / "o.jsonl"))[0]["title"] == "\ud800 x"
    rc, err = run_cli(capsys, "--source", src, "--target", tgt, "-k", 1, "--out", tmp / "o.parquet")
    assert rc == 2 and re_search(r"o\.parquet: a field holds text that is not valid Unicode .*write \.jsonl instead", err), err


def test_output_file_mode_follows_umask_or_the_file_replaced(capsys, small):
    """Not mkstemp's 0600: a new output gets 0666 less the umask, a replaced one keeps its mode."""
    tmp, tgt = small
    src = tmp / "s.txt"
    src.write_text("a\nproof\n")
    old = os.umask(0o022)
    try:
        for name in ("o.jsonl", "o.parquet"):
            assert run_cli(capsys, "--source", src, "--target", tgt, "-k", 1, "--out", tmp / name)[0] == 0
            assert os.stat(tmp / name).st_mode & 0o777 == 0o644, name
            os.chmod(tmp / name, 0o640)
            assert run_cli(capsys, "--source", src, "--target", tgt, "-k", 1, "--out", tmp / name)[0] == 0
            assert os.stat(tmp / name).st_mode & 0o777 == 0o640, name
    finally:
        os.umask(old)


def test_write_records_takes_an_iterator_and_refuses_what_parquet_cannot_hold(tmp_path):
    rows = [{"text": "a", "n": 1}, {"text": "b", "n": 2}]
    D.write_records(tmp_path / "g.parquet", (r for r in rows))  # read twice inside: 0 rows before
    assert read_out(str(tmp_path / "g.parquet")) == rows
    with pytest.raises(D.DataError, match=r"e\.parquet: these records cannot be written as Parquet .*write \.jsonl instead"):
        D.write_records(tmp_path / "e.parquet", [{"text": "a", "meta": {}}])  # an empty struct
    assert os.listdir(tmp_path) == ["g.parquet"]


def test_gzipped_json_array_and_unicode_blank_lines(capsys, small):
    tmp, tgt = small
    with gzip.open(tmp / "arr.json.gz", "wt") as f:
        json.dump([{"text": "proof one"}, {"text": "lemma two"}], f, indent=2)  # pretty-printed
    (tmp / "s.txt").write_text("proof\n\u00a0\u3000\nlemma\n", encoding="utf-8")
    rc, err = run_cli(capsys, "--source", tmp / "arr.json.gz", tmp / "s.txt", "--target", tgt, "-k", 9, "--out", tmp / "o.jsonl")
    assert rc == 0, err
    assert sorted(r["text"] for r in read_out(str(tmp / "o.jsonl"))) == ["lemma", "lemma two", "proof", "proof one"]


def test_skipped_target_records_are_reported(capsys, small):
    tmp, _ = small
    src, tgt = tmp / "s.txt", tmp / "t2.jsonl"
    src.write_text("proof\n")
    tgt.write_text('{"text": "proof"}\n{"title": "no text"}\n')
    rc = cli.main(["zipfit", "--no-progress", "--source", str(src), "--target", str(tgt), "-k", "1",
                   "--out", str(tmp / "o.jsonl"), "--bad-records", "skip"])
    out = capsys.readouterr().out
    assert rc == 0 and re_search(r"1 bad target records skipped \(first: .*t2\.jsonl:2: no field 'text'", out), out


def test_python_api_errors(corpus):
    with pytest.raises(ValueError, match="target: expected at least one target"):
        D.select_local(corpus["dir"], [], 3)
    with pytest.raises(ValueError, match="batch_size"):
        D.select_local(corpus["dir"], ["x"], 3, batch_size=0)
    with pytest.raises(ValueError, match="bad_records"):
        D.select_local(corpus["dir"], ["x"], 3, bad_records="ignore")
    with pytest.raises(ValueError, match="engine"):
        D.select(corpus["dir"], ["x"], 3, engine="spark")
    with pytest.raises(D.DataError, match="at least one file"):
        D.select_local([], ["x"], 3)


def test_write_records_formats(tmp_path):
    rows = [{"text": "a", "id": 1, "blob": b"\xff"}, {"text": "b", "extra": [1, 2]}]
    assert D.write_records(tmp_path / "o.jsonl", rows) == "jsonl"
    back = read_out(str(tmp_path / "o.jsonl"))
    assert back[0] == {"text": "a", "id": 1, "blob": "\ufffd"} and back[1] == {"text": "b", "extra": [1, 2]}
    assert D.write_records(tmp_path / "o.parquet", rows) == "parquet"
    assert pq.read_table(tmp_path / "o.parquet").column_names == ["text", "id", "blob", "extra"]
    # one column of two types has no Parquet schema: a clear error, and no partial file left behind
    with pytest.raises(D.DataError, match="do not fit one Parquet schema.*write .jsonl instead"):
        D.write_records(tmp_path / "bad.parquet", [{"id": 1}, {"id": "x"}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "o.parquet"]

# ------------------------------------------------------------------------------------------------
# Found by a mutation-testing audit of the Python layer (stop 26): each test was seen failing with
# a deliberate bug in the code it covers (a check dropped, an argument not passed on, ...).
# ------------------------------------------------------------------------------------------------


def _row_numbers(recs):
    return [r.key & ((1 << ROW_BITS) - 1) for r in recs]

def test_jsonl_skipped_record_keeps_its_row_number(tmp_path):
    src = tmp_path / "s.jsonl"
    src.write_text('{"text": "a"}\n{"title": "no text"}\n{"text": "b"}\n')
    recs = list(D.iter_records(src, bad_records="skip"))
    assert [r.text for r in recs] == [b"a", b"b"]
    assert _row_numbers(recs) == [0, 2]  # a bad record still counts as a row: keys do not shift after it


def test_json_array_with_byte_order_mark(tmp_path):
    p = tmp_path / "arr.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"text": "proof"}, {"text": "lemma"}]).encode())
    assert D.read_texts(p) == [b"proof", b"lemma"]


def test_hidden_directories_and_files_are_skipped(tmp_path):
    src = tmp_path / "src"
    (src / ".ipynb_checkpoints").mkdir(parents=True)
    (src / "a.txt").write_text("proof\n")
    (src / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("proof\n")
    (src / ".a.txt.swp.txt").write_text("proof\n")  # a hidden file (Y04)
    assert D.list_files(src) == [str(src / "a.txt")]


def test_parquet_skipped_row_keeps_its_row_number(tmp_path):
    import pyarrow as pa
    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "s.parquet")
    recs = list(D.iter_records(tmp_path / "s.parquet", bad_records="skip"))
    assert [r.text for r in recs] == [b"a", b"b"] and _row_numbers(recs) == [0, 2]


def test_text_skipped_line_keeps_its_row_number(tmp_path):
    (tmp_path / "s.txt").write_bytes(b"a\nbad \xff\nb\n")
    recs = list(D.iter_records(tmp_path / "s.txt", bad_records="skip"))
    assert [r.text for r in recs] == [b"a", b"b"] and _row_numbers(recs) == [0, 2]


def test_gzipped_parquet_is_not_a_corpus_file(tmp_path):
    (tmp_path / "a.txt").write_text("proof\n")
    (tmp_path / "b.parquet.gz").write_bytes(b"not read")
    assert D.list_files(tmp_path) == [str(tmp_path / "a.txt")]
    with pytest.raises(D.DataError, match="unknown file kind"):
        D.list_files(tmp_path / "b.parquet.gz")


def test_first_skipped_names_the_first_bad_record(tmp_path):
    from lmkern.data.readers import Reader

    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a"}\n{"title": 1}\n{"title": 2}\n')
    reader = Reader([str(path)], bad_records="skip")
    assert [r.text for r in reader] == [b"a"]
    assert reader.skipped == 2 and reader.first_skipped.startswith(f"{path}:2: ")


def test_parquet_binary_text_column(tmp_path):
    import pyarrow as pa
    pq.write_table(pa.table({"text": pa.array([b"proof", b"lemma"], pa.binary())}), tmp_path / "b.parquet")
    recs = list(D.iter_records(tmp_path / "b.parquet"))
    assert [r.text for r in recs] == [b"proof", b"lemma"] and recs[0].data["text"] == "proof"


def test_parquet_extension_is_case_insensitive(tmp_path):
    assert D.write_records(tmp_path / "O.PARQUET", [{"text": "a"}]) == "parquet"
    assert pq.read_table(tmp_path / "O.PARQUET").to_pylist() == [{"text": "a"}]


def test_gz_reader_closes_the_underlying_file(tmp_path):
    import gc
    import warnings

    p = tmp_path / "a.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write('{"text": "a"}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert D.read_texts(p) == [b"a"]
        gc.collect()
    # only this file's warning: an object another test left behind may be collected here too
    assert not [w for w in caught if issubclass(w.category, ResourceWarning) and str(p) in str(w.message)]


def test_upper_case_gz_is_decompressed(tmp_path):

    p = tmp_path / "A.JSONL.GZ"
    p.write_bytes(gzip.compress(b'{"text": "a"}\n'))
    assert D.read_texts(p) == [b"a"]


def test_topk_of_zero_keeps_nothing():
    t = TopK(0)
    t.push(1.0, 0)
    assert len(t) == 0 and t.items() == []


def test_write_failure_is_a_data_error(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(D.DataError, match="cannot write: .*No space left"):
        D.write_records(tmp_path / "o.jsonl", [{"text": "a"}])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("field", ["", None, 3])
def test_text_field_must_name_a_field(tmp_path, field):
    """An empty text field would find no text in any record: with bad_records="skip", every record
    dropped without an error."""
    (tmp_path / "s.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="text_field: expected a non-empty field name"):
        list(D.iter_records(tmp_path / "s.jsonl", text_field=field, bad_records="skip"))


def test_bad_arguments_name_themselves(tmp_path):
    """Arguments of the wrong kind raise naming the argument (they used to surface as numpy, os or
    heapq errors, or, for rows that are not dicts, to be written)."""
    f = tmp_path / "one.jsonl"
    f.write_text('{"text": "hello"}\n')
    with pytest.raises(TypeError, match="source: expected a path or a sequence of paths; got NoneType"):
        D.select_local(None, ["x"], 1)
    with pytest.raises(TypeError, match="source: expected paths .*got int"):
        D.list_files([str(f), 3])
    with pytest.raises(TypeError, match="progress: expected a bool, None or"):
        D.select_local(str(f), ["x"], 1, progress="yes")
    for k in ("3", 1.5, True):
        with pytest.raises(TypeError, match="k: expected a non-negative int"):
            TopK(k)
    with pytest.raises(TypeError, match="keys: expected int record keys .*got str 'x'"):
        D.fetch_records([str(f)], ["x"])
    with pytest.raises(TypeError, match="rows: expected dicts, one per record; got int at row 1"):
        D.write_records(tmp_path / "o.jsonl", [{"text": "a"}, 2])
    assert not (tmp_path / "o.jsonl").exists()
    # A single path, as a str, bytes or os.PathLike, is one file (not a sequence of characters).
    for one in (str(f), os.fsencode(str(f)), f):
        assert D.list_files(one) == [str(f)]
        assert [r.text for r in D.fetch_records(one, [0])] == [b"hello"]
