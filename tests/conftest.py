"""Shared pytest setup: skip `cuda` tests without a working lmkern CUDA path, hypothesis profiles.

Hypothesis profiles (pick with HYPOTHESIS_PROFILE=<name>):
  default  deadline off, 50 examples per test: the whole suite in a few minutes on 2 slow cores
  ci       deadline off, 200 examples per test, prints a reproduction blob on failure
  dev      deadline off, 10 examples per test: a quick smoke run
"""
from __future__ import annotations

import os
import sys
import time

import pytest
from hypothesis import HealthCheck, settings

import lmkern

# tests/reference is imported as `reference` (tests/ has no __init__.py); make that work under any
# --import-mode, not only the default "prepend".
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("default", max_examples=50, **_COMMON)
settings.register_profile("ci", max_examples=200, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def lmkern_pool_threads(wait: float = 0.0) -> int | None:
    """lmkern's own pool threads in this process (a forked child has none until it builds its pool),
    or None where /proc cannot tell; with `wait`, up to that many seconds for the first (a thread
    names itself when the OS first runs it, which on a busy VM, torch's OpenMP threads spinning on
    the cores, can come after the call that started the pool has returned)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            names = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
        except OSError:
            return None
        n = sum(name.startswith("lmkern-") for name in names)
        if n or time.monotonic() >= deadline:
            return n
        time.sleep(0.01)


def cuda_skip_reason() -> str | None:
    """None when lmkern's CUDA kernels can run here, else why the `cuda` tests are skipped."""
    if lmkern.cuda_available():
        return None
    return f"lmkern CUDA path unavailable: {lmkern.cuda_status()}"


def pytest_collection_modifyitems(config, items):
    reason = cuda_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def cuda_device():
    """torch.device('cuda'); skips the test when lmkern cannot run CUDA kernels here."""
    reason = cuda_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    import torch

    return torch.device("cuda")


@pytest.fixture
def num_threads():
    """Restores lmkern's CPU thread count after the test, whatever it sets."""
    before = lmkern.get_num_threads()
    yield before
    lmkern.set_num_threads(before)


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt during the test, as in an interactive run: a shell starts a
    background job with SIGINT ignored, and Python then leaves it ignored (the Ctrl-C tests' own
    signal would be dropped). The previous handler comes back after."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
