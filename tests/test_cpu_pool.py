"""Whose threads run lmkern's CPU kernels (`lmkern.cpu_pool()`): on Linux the OpenMP runtime torch's
CPU ops run on, shared (torch's threads spin for a while after each op, holding the cores a pool of
lmkern's own would wait for), else lmkern's own pool; LMKERN_CPU_POOL=own chooses the latter. The
same bits either way."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lmkern
from conftest import lmkern_pool_threads
from lmkern import _core
from lmkern.nn import PowerQuantLinear

HERE = os.path.dirname(os.path.abspath(__file__))
openmp_here = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
    reason="torch's OpenMP runtime is shared on Linux only")


def work() -> list[torch.Tensor]:
    """A norm, the quantized GEMV at one token and at three: each large enough to go parallel."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 1031, generator=g)
    w = torch.randn(1031, generator=g)
    linear = torch.nn.Linear(512, 384)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(384, 512, generator=g))
        linear.bias.copy_(torch.randn(384, generator=g))
    layer = PowerQuantLinear.from_linear(linear, bits=4, group_size=128, a=0.6)
    tokens = torch.randn(3, 512, generator=g)
    with torch.no_grad():
        return [lmkern.rms_norm(x, w, 1e-5), layer(tokens[:1]), layer(tokens)]


@openmp_here
def test_torchs_openmp_runtime_is_shared(num_threads):
    """At import lmkern finds the runtime torch loaded (pip wheels: torch/lib/libgomp.so.1) and runs
    its kernels there: its own pool is never started."""
    pool = lmkern.cpu_pool()
    assert pool.startswith("openmp:"), pool
    path = pool.removeprefix("openmp:")
    assert os.path.basename(path).startswith(("libgomp", "libiomp5", "libomp")), path
    with open("/proc/self/maps") as maps:
        assert any(line.rstrip().endswith(" " + path) for line in maps), f"{path} is not loaded"
    lmkern.set_num_threads(2)
    work()
    assert lmkern.get_num_threads() == 2
    assert lmkern_pool_threads() == 0


@openmp_here
def test_stop_and_share_again_same_bits(num_threads):
    """Back to lmkern's own pool and to the runtime again: the same results bit for bit; a library
    that is not loaded, or is not an OpenMP runtime, is refused and changes nothing."""
    path = lmkern.cpu_pool().removeprefix("openmp:")
    lmkern.set_num_threads(2)
    want = work()
    try:
        _core.stop_sharing_openmp()
        assert lmkern.cpu_pool() == "lmkern"
        got = work()
        assert lmkern_pool_threads(wait=30.0) >= 1  # started
    finally:
        _core.share_openmp_runtime(path)
    assert lmkern.cpu_pool() == f"openmp:{path}"
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    with pytest.raises(RuntimeError, match="not loaded in this process"):
        _core.share_openmp_runtime("/nonexistent/libgomp.so.1")
    with pytest.raises(RuntimeError, match="no GOMP_parallel"):
        _core.share_openmp_runtime(_core.__file__)
    assert lmkern.cpu_pool() == f"openmp:{path}"


@openmp_here
def test_environment_chooses_the_pool(tmp_path):
    """LMKERN_CPU_POOL=own (any case, spaces around) keeps lmkern's own pool, with the same bits; an
    unknown value says so at import and shares the runtime."""
    code = ("import sys, torch, lmkern; sys.path.insert(0, {here!r}); from test_cpu_pool import work; "
            "print(lmkern.cpu_pool()); torch.save(work(), {out!r})")
    out = str(tmp_path / "own.pt")
    run = subprocess.run([sys.executable, "-W", "error", "-c", code.format(here=HERE, out=out)],
                         env={**os.environ, "LMKERN_CPU_POOL": " Own "}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "lmkern"
    for g, w in zip(torch.load(out), work()):
        assert torch.equal(g, w)
    run = subprocess.run([sys.executable, "-c", "import lmkern; print(lmkern.cpu_pool())"],
                         env={**os.environ, "LMKERN_CPU_POOL": "omp"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "LMKERN_CPU_POOL='omp' is not 'openmp' or 'own'" in run.stderr
    assert run.stdout.strip().startswith("openmp:")
