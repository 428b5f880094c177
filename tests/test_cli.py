"""The `lmkern` command: info, and `bench` checking ops against float64 and failing when one is wrong."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import lmkern
from lmkern import cli
from lmkern.ops import norm as norm_ops


def test_version_and_info():
    out = subprocess.run([sys.executable, "-m", "lmkern.cli", "info"], capture_output=True, text=True, check=True)
    assert lmkern.__version__ in out.stdout and "cuda_status" in out.stdout
    out = subprocess.run([sys.executable, "-m", "lmkern.cli", "--version"], capture_output=True, text=True, check=True)
    assert lmkern.__version__ in out.stdout


def test_bench_checks_and_reports(tmp_path):
    path = tmp_path / "bench.json"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--op", "crms_norm fwd", "--no-progress", "--json", str(path)])
    assert rc == 0
    results = json.loads(path.read_text())["results"]
    assert results and all(r["op"].startswith("crms_norm fwd") for r in results)
    assert all(r["ok"] and r["rel_error"] < r["tolerance"] and r["time_s"] > 0 and r["peer_time_s"] > 0 for r in results)


def test_bench_fails_on_a_wrong_kernel(monkeypatch, tmp_path):
    real = norm_ops._forward

    def off_by_a_bit(*args, **kwargs):
        y, h, rstd = real(*args, **kwargs)
        return y * 1.01, h, rstd  # a 1% error: over every dtype's tolerance

    monkeypatch.setattr(norm_ops, "_forward", off_by_a_bit)
    path = tmp_path / "bench.json"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--op", "rms_norm fwd", "--no-progress", "--json", str(path)])
    assert rc == 1
    assert not any(r["ok"] for r in json.loads(path.read_text())["results"] if r["op"].startswith("rms_norm fwd"))


def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity (not JSON; jq and JavaScript reject them)."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_bench_failures_are_valid_json_and_bad_inputs_are_reported(monkeypatch, tmp_path):
    """A failing op (no error, no times) is written as null, not NaN; an entry whose inputs cannot
    be made is one failed case, not a crash of the run."""
    from lmkern import bench

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(norm_ops, "_forward", broken)
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--device", "cpu", "--op", "rms_norm fwd", "--no-progress", "--json", str(path)]) == 1
    results = _strict_json(path.read_text())["results"]
    assert results and all(r["ok"] is False and r["rel_error"] is None and r["time_s"] is None for r in results)
    assert all("kernel exploded" in r["failure"] for r in results)
    monkeypatch.undo()
    i = next(i for i, e in enumerate(bench.REGISTRY) if e.name.startswith("crms_norm fwd"))
    monkeypatch.setattr(bench, "REGISTRY", list(bench.REGISTRY))
    bench.REGISTRY[i] = dataclasses.replace(bench.REGISTRY[i], make=broken)
    assert cli.main(["bench", "--quick", "--device", "cpu", "--op", "crms_norm fwd", "--no-progress", "--json", str(path)]) == 1
    broken_results = [r for r in _strict_json(path.read_text())["results"] if r["op"] == bench.REGISTRY[i].name]
    assert broken_results and all("kernel exploded" in r["failure"] for r in broken_results)


def test_bench_json_path_errors(tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    assert cli.main(["bench", "--quick", "--device", "cpu", "--op", "no such op", "--json", str(tmp_path / "adir")]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert cli.main(["bench", "--quick", "--device", "cpu", "--op", "crms_norm fwd", "--no-progress",
                     "--json", str(tmp_path / "afile" / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot write --json" in err and err.count("\n") == 1

# ------------------------------------------------------------------------------------------------
# Found by a mutation-testing audit of the Python layer (stop 26): each test was seen failing with
# a deliberate bug in the code it covers (a check dropped, an argument not passed on, ...).
# ------------------------------------------------------------------------------------------------


def test_bench_device_cuda_without_cuda_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(lmkern, "cuda_status", lambda: "no CUDA here (test)")
    assert cli.main(["bench", "--quick", "--device", "cuda", "--no-progress"]) == 2
    assert "CUDA path is unavailable here: no CUDA here (test)" in capsys.readouterr().err


def test_bench_that_runs_nothing_fails(capsys):
    assert cli.main(["bench", "--quick", "--device", "cpu", "--op", "no such op", "--no-progress"]) == 1
    assert "nothing ran" in capsys.readouterr().err


def _zipfit_files(tmp_path):
    words = "proof lemma theorem induction data model train loss return class import self".split()
    rng = __import__("random").Random(0)
    src = tmp_path / "s.txt"
    src.write_text("".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 80))) + "\n" for _ in range(30)))
    tgt = tmp_path / "t.jsonl"
    tgt.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) + "\n" for _ in range(3)))
    return src, tgt


def test_zipfit_level_reaches_the_scores(tmp_path):
    import numpy as np

    from lmkern import data as D, ncd

    src, tgt = _zipfit_files(tmp_path)
    out = tmp_path / "o.jsonl"
    assert cli.main(["zipfit", "--no-progress", "--source", str(src), "--target", str(tgt), "-k", "30",
                     "--out", str(out), "--level", "1"]) == 0
    got = sorted(json.loads(line)["zipfit_score"] for line in out.read_text().splitlines())
    want = ncd.zipfit_scores(D.read_texts(src), D.read_texts(tgt), level=1)
    assert got == sorted(want.tolist())
    assert not np.array_equal(np.sort(want), np.sort(ncd.zipfit_scores(D.read_texts(src), D.read_texts(tgt), level=9)))


def test_zipfit_threads(tmp_path, num_threads):
    src, tgt = _zipfit_files(tmp_path)
    lmkern.set_num_threads(2)
    assert cli.main(["zipfit", "--no-progress", "--source", str(src), "--target", str(tgt), "-k", "1",
                     "--out", str(tmp_path / "o.jsonl"), "--threads", "1"]) == 0
    assert lmkern.get_num_threads() == 1
