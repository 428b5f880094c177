"""Kernel-only timings of the CUDA norm kernels under one launch-shape setting, for tuning.

  LMKERN_CUDA_NORM_TUNE="fwd_vpt=2,bwd_vpt=1,fwd_block=256,bwd_block=256" python benches/gpu/tune_norm.py [--profile]
  LMKERN_CUDA_NORM_TUNE="split=0" python benches/gpu/tune_norm.py   (odd rows element-wise, to compare)

Times torch.ops.lmkern.rms_norm (forward, rstd saved) and rms_norm_backward (dx and dw) called
directly, CUDA events around each call, median of 100 after warm-up, and prints achieved GB/s from
the bytes each must move (forward: x, w in, y, rstd out; backward: dy, x, w, rstd in, dx, dw out plus
the float32 dw partials written and read). --profile adds a cProfile of the host side of
forward + backward through autograd on a [1, 64] tensor (where host overhead is all there is).
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

import lmkern  # noqa: F401  (registers torch.ops.lmkern)
from lmkern import _core


def time_us(fn, reps=100, warmup=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        ts.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) * 1e3 for a, b in ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    tune = os.environ.get("LMKERN_CUDA_NORM_TUNE") or "default"
    dev = "cuda"
    for dtype, rows, n in [
        (torch.bfloat16, 32768, 4096),
        (torch.bfloat16, 32768, 1024),
        (torch.bfloat16, 16384, 8192),
        (torch.bfloat16, 8192, 16384),
        (torch.float32, 32768, 4096),
        (torch.bfloat16, 32768, 4095),  # cut rows (_s16); split=0 times them element-wise
    ]:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(rows, n, device=dev, dtype=dtype, generator=g)
        w = torch.randn(n, device=dev, dtype=dtype, generator=g)
        dy = torch.randn(rows, n, device=dev, dtype=dtype, generator=g)
        y, rstd = torch.ops.lmkern.rms_norm(x, w, 1e-6, 0.0, 1.0)
        es = x.element_size()
        parts = _core.norm_dw_parts(rows, n)
        t_f = time_us(lambda: torch.ops.lmkern.rms_norm(x, w, 1e-6, 0.0, 1.0))
        t_b = time_us(lambda: torch.ops.lmkern.rms_norm_backward(dy, x, w, rstd, None, 0.0, 1.0, True))
        t_bx = time_us(lambda: torch.ops.lmkern.rms_norm_backward(dy, x, w, rstd, None, 0.0, 1.0, False))
        t_c = time_us(lambda: x.clone())
        fwd_bytes = 2 * rows * n * es + n * es + rows * 4
        bwd_bytes = 3 * rows * n * es + n * es + rows * 4 + 2 * parts * n * 4 + n * es
        bwdx_bytes = 3 * rows * n * es + n * es + rows * 4
        print(
            f"tune={tune:45s} {str(dtype)[6:]:8s} [{rows},{n}]  clone {t_c:7.1f} us {2 * rows * n * es / t_c / 1e3:6.0f} GB/s | "
            f"fwd {t_f:7.1f} us {fwd_bytes / t_f / 1e3:6.0f} GB/s | bwd {t_b:7.1f} us {bwd_bytes / t_b / 1e3:6.0f} GB/s | "
            f"bwd no dw {t_bx:7.1f} us {bwdx_bytes / t_bx / 1e3:6.0f} GB/s",
            flush=True,
        )
        del x, w, dy, y, rstd
    if args.profile:
        import cProfile
        import pstats

        x = torch.randn(1, 64, device=dev, requires_grad=True)
        w = torch.randn(64, device=dev, requires_grad=True)
        for _ in range(20):
            lmkern.rms_norm(x, w).sum().backward()
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(300):
            lmkern.rms_norm(x, w).sum().backward()
        torch.cuda.synchronize()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
