"""lmkern's CPU pool in a forked child: DataLoader workers and multiprocessing's default start method
on Linux fork the process, copying none of the pool's threads (nor those of the OpenMP runtime the
parent's kernels may share with torch). Work sent to them waited forever; the child must build a
pool of its own, of the parent's size, and compute the same bits."""
from __future__ import annotations

import multiprocessing
import os
import random

import numpy as np
import pytest
import torch

import lmkern
from conftest import lmkern_pool_threads
from lmkern import ncd as N
from lmkern.nn import PowerQuantLinear

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform"
)


def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1031, generator=g, requires_grad=True)  # above the pool's serial size
    w = torch.randn(1031, generator=g, requires_grad=True)
    linear = torch.nn.Linear(512, 384)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(384, 512, generator=g))
        linear.bias.copy_(torch.randn(384, generator=g))
    tokens = torch.randn(5, 512, generator=g)
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "norm", "quant", "kernel", "token"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 400))) for _ in range(40)]
    return x, w, linear, tokens, texts


def work():
    """Norm forward and backward, a quantized linear layer, ZIP-FIT scores: each on the pool."""
    x, w, linear, tokens, texts = inputs()
    y = lmkern.rms_norm(x, w, 1e-5)
    dx, dw = torch.autograd.grad(y.square().sum(), [x, w])
    layer = PowerQuantLinear.from_linear(linear, bits=4, group_size=128, a=0.6)
    with torch.no_grad():
        out = layer(tokens)
    scores = N.zipfit_scores(texts[:30], texts[30:])
    own = lmkern.cpu_pool() == "lmkern"
    return lmkern.get_num_threads(), [t.detach() for t in (y, dx, dw, out)], scores, lmkern_pool_threads(30.0 if own else 0.0), lmkern.cpu_pool()


def child_start():
    torch.set_num_threads(1)  # as DataLoader workers do: torch's OpenMP pool is not fork-safe


def test_forked_child_uses_a_pool_of_its_own(num_threads):
    lmkern.set_num_threads(3)
    threads, tensors, scores, running, cpu_pool = work()  # starts the pool (or torch's OpenMP team) here
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2, initializer=child_start) as pool:
        jobs = [pool.apply_async(work) for _ in range(2)]
        try:
            results = [job.get(timeout=120) for job in jobs]
        except multiprocessing.TimeoutError:
            pytest.fail("lmkern work in a forked child did not finish in 120 s")
    for child_threads, child_tensors, child_scores, child_running, child_pool in results:
        assert child_threads == threads == 3
        # The parent's kernels run on torch's OpenMP threads where shared (then its own pool never
        # starts), the child's on a pool of its own: the runtime's threads are not copied either.
        assert child_pool == "lmkern"
        if running is not None:
            assert (running == 0) == cpu_pool.startswith("openmp:")
        # its own pool, started (lmkern_pool_threads waits for the first of its threads to name itself)
        assert child_running is None or child_running >= 1
        for got, want in zip(child_tensors, tensors):
            assert torch.equal(got, want)
        np.testing.assert_array_equal(child_scores, scores)
