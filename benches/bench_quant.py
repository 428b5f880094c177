"""asv suites of the power-quantization family (PowerQuant / NUPES), CPU.

Side by side with their peers, on the inputs of `lmkern bench` (lmkern.bench's registry):
- PowerQuantize: lmkern.quant.power_quantize of a [4096, 4096] weight, 4 bits, groups of 128, vs the
  same formula written in torch (abs, div, pow, round, clamp, nibble packing). Target ≥ 10×.
- PowerQuantLinearGEMV: lmkern.nn.PowerQuantLinear (4096 → 4096, 4-bit g128) at batch 1 vs the
  dense float32 torch.nn.functional.linear. Target ≥ 3×. Bytes that must move: 8.4 MB of codes and
  0.5 MB of scales (+ 256 KB of codebooks) instead of 64 MB of float32 weight.
- SearchExponent: lmkern.quant.search_exponent for every row of a [4096, 4096] weight (4- and 8-bit
  g128), alone and with 64 calibration tokens.
  Target ≤ 2 s; track_seconds reports the median of a few calls.
- FakeQuantize: lmkern.quant.power_fake_quantize forward + backward (x and a) vs the torch composite
  of the straight-through fake quantizer under autograd.
- PowerQuantLinearTokens: the same layer at 1, 8, 64, 512 and 2048 tokens, forward (no grad) and
  forward + backward (dx), vs dense float32 F.linear: the fused GEMV and its transposed twin up to the token
  limits of lmkern.ops.quant (cpu_gemv_max_tokens, cpu_bwd_gemv_max_tokens), beyond them Ŵ formed
  a chunk of rows at a time (as large as the activations, 8-32 MiB) for torch's matmul.
  PowerQuantLinearBits: the same with 2-, 3- and 8-bit codes at 1 and 8 tokens.

track_speedup = peer time / lmkern time, medians of interleaved rounds in one process.

  asv machine --yes && asv run --python=same --quick --show-stderr --bench quant

Script mode prints the PowerQuantLinearTokens table:  python benches/bench_quant.py [--tokens 1 8 64 512 2048]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

import lmkern
from lmkern import bench as lb


class _Entry:
    entry = ""
    params = [["4096x4096"]]
    param_names = ["shape"]
    rounds = 1
    repeat = (3, 10, 20.0)
    warmup_time = 0.2
    timeout = 600

    def setup(self, shape):
        self.op = next(e for e in lb.REGISTRY if e.name == self.entry)
        gen = torch.Generator().manual_seed(0)
        self.inputs = self.op.make(tuple(int(v) for v in shape.split("x")), torch.float32, torch.device("cpu"), gen)
        self.op.lmkern(self.inputs)
        self.op.peer(self.inputs)

    def time_lmkern(self, shape):
        self.op.lmkern(self.inputs)

    def peakmem_lmkern(self, shape):
        self.op.lmkern(self.inputs)

    def time_peer(self, shape):
        self.op.peer(self.inputs)

    def peakmem_peer(self, shape):
        self.op.peer(self.inputs)

    def track_speedup(self, shape):
        """peer time / lmkern time, medians of interleaved rounds in this process."""
        t = lb.interleaved({"lmkern": lambda: self.op.lmkern(self.inputs), "peer": lambda: self.op.peer(self.inputs)},
                           "cpu", min_rounds=5, budget_s=3.0, warmup=1)
        return round(t["peer"].median / t["lmkern"].median, 3)

    track_speedup.unit = "x"


class PowerQuantize(_Entry):
    """power_quantize (4-bit, g128) vs the torch composite of the same formula."""

    entry = "power_quantize 4bit g128"


class PowerQuantLinearGEMV(_Entry):
    """PowerQuantLinear (4-bit g128) at batch 1 vs dense float32 F.linear."""

    entry = "power_quant_linear 4bit g128"
    params = [["1x4096"]]


class SearchExponent:
    """search_exponent for every row of a [4096, 4096] float32 weight, groups of 128: on the weight
    error, and on the output error over 64 calibration tokens."""

    params = [[4, 8]]
    param_names = ["bits"]
    timeout = 600
    repeat = (1, 3, 60.0)
    number = 1

    def setup(self, bits):
        gen = torch.Generator().manual_seed(0)
        self.w = torch.randn(4096, 4096, generator=gen)
        self.x = torch.randn(64, 4096, generator=gen)

    def time_search_per_row(self, bits):
        lmkern.quant.search_exponent(self.w, bits, 128)

    def time_search_calibrated(self, bits):
        lmkern.quant.search_exponent(self.w, bits, 128, x=self.x)

    def track_seconds(self, bits):
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            lmkern.quant.search_exponent(self.w, bits, 128)
            ts.append(time.perf_counter() - t0)
        return round(statistics.median(ts), 3)

    track_seconds.unit = "s"


def torch_fake_quantize(x, a, bits=4, g=128, eps=1e-12):
    """The straight-through fake quantizer in torch ops (float32), m held constant."""
    rows, n = x.shape
    qm = 2 ** (bits - 1) - 1
    X = x.reshape(rows, n // g, g)
    m = X.detach().abs().amax(-1, keepdim=True)
    u = X.abs() / m
    qt = qm * torch.sign(X) * torch.exp(a * torch.log(u + eps))
    q = qt + (torch.clamp(torch.round(qt), -qm, qm) - qt).detach()
    return (m * torch.sign(q) * (q.abs() / qm) ** (1 / a)).reshape(rows, n)


class FakeQuantize:
    """power_fake_quantize forward + backward in x and a, vs the torch composite under autograd."""

    params = [["1024x4096"]]
    param_names = ["shape"]
    timeout = 600

    def setup(self, shape):
        rows, n = (int(v) for v in shape.split("x"))
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(rows, n, generator=gen).requires_grad_(True)
        self.a = torch.tensor(0.7, requires_grad=True)
        self.dy = torch.randn(rows, n, generator=gen)

    def _lmkern(self):
        y = lmkern.quant.power_fake_quantize(self.x, self.a, 4, 128)
        return torch.autograd.grad(y, (self.x, self.a), self.dy)

    def _torch(self):
        y = torch_fake_quantize(self.x, self.a)
        return torch.autograd.grad(y, (self.x, self.a), self.dy)

    def time_lmkern(self, shape):
        self._lmkern()

    def time_torch(self, shape):
        self._torch()

    def track_speedup(self, shape):
        t = lb.interleaved({"lmkern": self._lmkern, "peer": self._torch}, "cpu", min_rounds=5, budget_s=3.0, warmup=1)
        return round(t["peer"].median / t["lmkern"].median, 3)

    track_speedup.unit = "x"


class PowerQuantLinearTokens:
    """PowerQuantLinear (4096 → 4096, 4-bit g128) vs dense float32 F.linear by token count, forward
    (no grad) and forward + backward (dx)."""

    params = [[1, 8, 64, 512, 2048]]
    param_names = ["tokens"]
    timeout = 600

    def setup(self, tokens, bits=4):
        gen = torch.Generator().manual_seed(0)
        lin = torch.nn.Linear(4096, 4096, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn((4096, 4096), generator=gen) / math.sqrt(4096))
        self.mod = lmkern.nn.PowerQuantLinear.from_linear(lin, bits, 128, a=lb.QUANT_A)
        self.w = self.mod.dequantized_weight()
        self.x = torch.randn(tokens, 4096, generator=gen).requires_grad_(True)
        self.dy = torch.randn(tokens, 4096, generator=gen)

    def _fwd(self, f):
        with torch.no_grad():
            return f(self.x)

    def _fwd_bwd(self, f):
        return torch.autograd.grad(f(self.x), self.x, self.dy)

    def _lmkern(self, x):
        return self.mod(x)

    def _dense(self, x):
        return F.linear(x, self.w)

    # *params: (tokens,) here, (tokens, bits) in PowerQuantLinearBits.
    def time_forward_lmkern(self, *params):
        self._fwd(self._lmkern)

    def time_forward_dense(self, *params):
        self._fwd(self._dense)

    def time_forward_backward_lmkern(self, *params):
        self._fwd_bwd(self._lmkern)

    def time_forward_backward_dense(self, *params):
        self._fwd_bwd(self._dense)

    def _ratio(self, run):
        t = lb.interleaved({"lmkern": lambda: run(self._lmkern), "peer": lambda: run(self._dense)}, "cpu",
                           min_rounds=5, budget_s=3.0, warmup=1)
        return t["lmkern"].median, t["peer"].median

    def track_speedup_forward(self, *params):
        lm, peer = self._ratio(self._fwd)
        return round(peer / lm, 3)

    def track_speedup_forward_backward(self, *params):
        lm, peer = self._ratio(self._fwd_bwd)
        return round(peer / lm, 3)

    track_speedup_forward.unit = "x"
    track_speedup_forward_backward.unit = "x"


class PowerQuantLinearBits(PowerQuantLinearTokens):
    """The same with 2-, 3- and 8-bit codes (g128) at 1 and 8 tokens: their GEMVs and, with AVX-512,
    the transposed GEMVs of their input gradient."""

    params = [[1, 8], [2, 3, 8]]
    param_names = ["tokens", "bits"]


def main() -> None:
    ap = argparse.ArgumentParser(description=PowerQuantLinearTokens.__doc__)
    ap.add_argument("--tokens", type=int, nargs="+", default=PowerQuantLinearTokens.params[0])
    args = ap.parse_args()
    print(f"lmkern threads {lmkern.get_num_threads()}, torch threads {torch.get_num_threads()}; medians of "
          "interleaved rounds")
    print(f"{'tokens':>6}  {'fwd lmkern':>10}  {'fwd dense':>9}  {'ratio':>5}  {'f+b lmkern':>10}  {'f+b dense':>9}  {'ratio':>5}")
    for tokens in args.tokens:
        b = PowerQuantLinearTokens()
        b.setup(tokens)
        f_lm, f_d = b._ratio(b._fwd)
        fb_lm, fb_d = b._ratio(b._fwd_bwd)
        print(f"{tokens:>6}  {f_lm * 1e3:8.2f}ms  {f_d * 1e3:7.2f}ms  {f_d / f_lm:5.2f}  {fb_lm * 1e3:8.2f}ms  "
              f"{fb_d * 1e3:7.2f}ms  {fb_d / fb_lm:5.2f}", flush=True)


if __name__ == "__main__":
    main()
