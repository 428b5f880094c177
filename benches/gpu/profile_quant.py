"""A few eager calls of power_quant_linear (bf16 activations, 4-bit g128 codes, a = 0.7), for Nsight
Compute to profile one of them (benches/gpu/quant_tokens.sh):

  ncu --kernel-name regex:quant_lin --launch-skip 3 --launch-count 1 --set full \\
      python benches/gpu/profile_quant.py --out 4096 --in 4096 --tokens 1
"""
from __future__ import annotations

import argparse

import torch

import lmkern  # noqa: F401
from lmkern.quant import power_quantize


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=int, default=4096)
    ap.add_argument("--in", dest="in_f", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--calls", type=int, default=6)
    args = ap.parse_args()
    torch.manual_seed(0)
    w = torch.randn(args.out, args.in_f, device="cuda") * 0.02
    q = power_quantize(w, 0.7, 4, 128)
    table = torch.ops.lmkern.power_codebook(q.exponent, 4)
    x = torch.randn(args.tokens, args.in_f, device="cuda").to(torch.bfloat16)
    for _ in range(args.calls):
        torch.ops.lmkern.power_quant_linear(x, q.codes, q.scales, table, None, 4, 128, args.in_f)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
