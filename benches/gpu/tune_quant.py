"""Kernel timings of PowerQuantLinear's CUDA GEMV under one launch-shape variant, for tuning.

  LMKERN_CUDA_QUANT_TUNE="[variant=<k>][,pdl=0|1][,mma=0|1][,blocks_per_sm=<b>]" python benches/gpu/tune_quant.py [--peer] [--tokens 1,2] [--cases 4096x4096x32,...] [--direct]

bf16 activations, 4-bit g128 codes, a = 0.7. Per case: torch.ops.lmkern.power_quant_linear in a
CUDA graph of calls over rotating copies of the codes (256 MiB in all, so every call reads its
weight from HBM, as timings.py times it), median of 30 replays divided by the calls per replay;
with --peer, F.linear on the dense bf16 weight the same way, and cuBLAS on the bytes of the codes:
F.linear over the rotating codes viewed as a bf16 weight of in·bits/16 columns, the dense GEMV that
moves what the quantized one must read (bar its scales and codebooks), with no lookups.
--tokens keeps the cases of those token counts; --cases replaces the cases (out x in x tokens).
--direct calls the fused GEMV (lmkern.ops.quant._fused_gemv) at every token count, where the op
would take the dequantize + cuBLAS path past lmkern._core.quant_cuda_gemv_max_tokens. The variants
(rust/core/src/quant/cuda.rs, TILE_VARIANTS) replace the default kernel only for their own token
tile and shapes; the others run the default.
Also checks every output against the float64 product (relative error printed; > 1e-2 is FAIL).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from timings import LINEAR_ROTATION_BYTES, _deq64, _quant_inputs, graph_calls  # noqa: E402
from tune_norm import time_us  # noqa: E402

import lmkern  # noqa: E402,F401
from lmkern.ops.quant import _fused_gemv  # noqa: E402
from lmkern.quant import power_quantize  # noqa: E402

CASES = [(4096, 4096, 1), (4096, 4096, 2), (4096, 4096, 4), (4096, 4096, 8), (14336, 4096, 1), (4096, 14336, 1), (4096, 4096, 16)]


def graph_us(fns):
    """(µs per call, replay, calls) of a CUDA graph running every fn of `fns` once."""
    run, calls = graph_calls(fns, True)
    return time_us(run, reps=30, warmup=3) / calls, run, calls


def kernel_us(run, calls):
    """Mean device time of the quant_* kernels per call (CUPTI through torch.profiler): the kernel
    alone, without the gaps between a graph's kernels; and their names (which kernel the tuning
    picked)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            run()
        torch.cuda.synchronize()
    total, names = 0.0, []
    for ev in prof.key_averages():
        if ev.key.startswith("quant_"):
            total += getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
            names.append(ev.key)
    return total / (3 * calls), names


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", action="store_true")
    ap.add_argument("--tokens", default="", help="comma-separated token counts: only these cases")
    ap.add_argument("--cases", default="", help="comma-separated OUTxINxTOKENS: these cases instead")
    ap.add_argument("--direct", action="store_true", help="the fused GEMV at every token count")
    args = ap.parse_args()
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",") if c.strip()] or CASES
    keep = {int(t) for t in args.tokens.split(",") if t.strip()}
    tune = os.environ.get("LMKERN_CUDA_QUANT_TUNE") or "default"
    dev, g, bits = "cuda", 128, 4
    op = _fused_gemv if args.direct else torch.ops.lmkern.power_quant_linear
    for out_f, in_f, tokens in cases:
        if keep and tokens not in keep:
            continue
        w, a = _quant_inputs(dev, out_f, in_f, 3)
        q = power_quantize(w, a, bits, g)
        table = torch.ops.lmkern.power_codebook(q.exponent, bits)
        x = torch.randn(tokens, in_f, device=dev).to(torch.bfloat16)
        y = op(x, q.codes, q.scales, table, None, bits, g, in_f)
        ref = x.double() @ _deq64(q).T
        err = ((y.double() - ref).norm() / ref.norm()).item()
        nbytes = q.codes.numel() + 4 * (q.scales.numel() + table.numel())
        copies = [(q.codes.clone(), q.scales.clone(), table.clone()) for _ in range(max(2, LINEAR_ROTATION_BYTES // nbytes))]
        us, run, calls = graph_us([lambda c=c: op(x, c[0], c[1], c[2], None, bits, g, in_f) for c in copies])
        floor = ""
        if args.peer:
            xb = torch.randn(tokens, in_f * bits // 16, device=dev).to(torch.bfloat16)
            fus = graph_us([lambda c=c: F.linear(xb, c[0].view(torch.bfloat16)) for c in copies])[0]
            floor = f"  (cuBLAS, same bytes {fus:6.2f} us)"
        try:
            t, names = kernel_us(run, calls)
            kus = f"{t:6.2f}; {','.join(sorted(names)) or '?'}"
        except Exception as e:  # noqa: BLE001  (the profiler is a nice-to-have here)
            kus = f"? ({type(e).__name__})"
        line = (f"{tune:12s} W{out_f}x{in_f} b{tokens:<2d}  lmkern {us:7.2f} us (kernel {kus})  {nbytes / us / 1e3:6.0f} GB/s"
                f"  err {err:.1e}{'' if err <= 1e-2 else '  FAIL'}{floor}")
        del copies, run
        if args.peer:
            wd = _deq64(q).to(torch.bfloat16)
            dense = [wd.clone() for _ in range(max(2, LINEAR_ROTATION_BYTES // (2 * out_f * in_f)))]
            pus = graph_us([lambda d=d: F.linear(x, d) for d in dense])[0]
            line += f"  | dense bf16 {pus:7.2f} us  x{pus / us:5.2f}"
            del dense
        print(line, flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
