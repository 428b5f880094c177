"""A daemon thread inside a long lmkern call (detached from the interpreter) when the interpreter
exits. On Python <= 3.13 a thread that re-attaches while the interpreter is finalizing is ended with
pthread_exit; before PyO3 0.29 (PyO3 #6084/#6085) the forced unwind reached PyO3's catch_unwind and
the process aborted ("FATAL: exception not rethrown", exit 134) instead of exiting 0.

The abort needs the call to return while the interpreter is finalizing (a call that outlives the
process never re-attaches), so the child holds finalization open, from a __del__ that runs when
__main__'s globals are cleared, until the search has surely returned."""
from __future__ import annotations

import os
import subprocess
import sys

import lmkern

CHILD = r"""
import functools, os, sys, threading, time
import torch, lmkern

assert lmkern.__file__ == sys.argv[1], f"imported {lmkern.__file__}, expected {sys.argv[1]}"
w = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0))
t0 = time.monotonic()
lmkern.quant.search_exponent(w, bits=4)
took = 8 * (time.monotonic() - t0)  # about (no less than) the search of 8x the rows below
w = w.repeat(8, 1)

# Detached from the interpreter for ~took seconds. (The target is no function of __main__: the thread's
# frames, never freed, would keep __main__'s globals, and so `hold` below, alive.)
t0 = time.monotonic()
threading.Thread(target=functools.partial(lmkern.quant.search_exponent, w, bits=4), daemon=True).start()
time.sleep(0.2)  # now inside the Rust call; main returns long before it does


class HoldFinalization:
    def __init__(self, until):
        self.until = until

    def __del__(self, sleep=time.sleep, now=time.monotonic, write=os.write, finalizing=sys.is_finalizing):
        while now() < self.until:  # the search returns (and tries to re-attach) meanwhile
            sleep(0.01)
        write(1, b"held, finalizing=%d\n" % finalizing())


hold = HoldFinalization(t0 + 2 * took + 0.5)
"""


def test_daemon_thread_in_a_detached_call_at_interpreter_exit(tmp_path):
    # PYTHONPATH passes through: the child imports this lmkern (it checks the file).
    run = subprocess.run([sys.executable, "-c", CHILD, lmkern.__file__], env=dict(os.environ), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"exit code {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    assert "held, finalizing=1" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
