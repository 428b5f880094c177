"""The `lmkern` command: info, and `bench` checking ops against float64 and failing when one is wrong."""
from __future__ import annotations

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
