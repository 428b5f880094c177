"""GPU timings of lmkern's norm kernels against torch, with achieved bandwidth (run by check.sh).

  python benches/gpu/timings.py [--reps 50] [--budget 200]

1. Device copy bandwidth: dst.copy_(src) and src.clone() of a 1 GiB buffer (read + write counted).
2. For each case (bf16 and float32 [32768, 4096]; bf16 with n = 1024, 8192, 16384 and the odd 4095,
   about 2^27 elements each, far larger than L2), each form:
     fwd       lmkern.rms_norm(x, w)                  vs F.rms_norm, torch.compile(F.rms_norm)
     bwd       torch.ops.lmkern.rms_norm_backward      vs the autograd backward of F.rms_norm (eager,
               (the backward op alone)                    compiled), timed alone (retain_graph)
     fwd+bwd   lmkern.rms_norm + autograd.grad         vs the same with F.rms_norm (eager, compiled)
     residual  lmkern.rms_norm(x, w, residual=r)       vs h = x + r; F.rms_norm(h) (eager, compiled)
     inplace   lmkern.rms_norm_(x, w, residual=r)      vs r += x; F.rms_norm(r) (eager, compiled): the
               (h over r, y over x; nothing allocated)    fused add-norm of vLLM; each side updates its
                                                          own copies call after call (r grows, harmless)
     crms      lmkern.crms_norm(x, w)                  vs the CRMS formula as torch ops (eager, compiled)
   Time: CUDA events around each call, calls interleaved between implementations, after warm-up;
   median of --reps (>= 50). Bandwidth from the bytes the op must move:
     fwd, crms  read x, w; write y (+ rstd when saved for backward)
     residual, inplace  read x, r, w; write y, h
     bwd        read dy, x, w, rstd; write dx, dw, and write + read the float32 dw partials
     fwd+bwd    the sum of the two (forward saving rstd)
   and % of the measured copy bandwidth. Error: ||out - ref|| / ||ref|| against the float64
   formula (lmkern.bench's references), lmkern's and eager torch's. Inputs: torch.randn, never zeros.
3. Power quantization (cuda/quant.cu; skip with --no-quant, alone with --quant-only), bf16, a
   4096x4096 weight (rows of 4096, g = 128, a = 0.7 per row):
     linear b<T>  torch.ops.lmkern.power_quant_linear, 4-bit, T = 1, 4, 8 tokens (the fused GEMV) and
                  16 (dequantize through the codebooks + cuBLAS); 3-bit T = 1; 4-bit 4096 -> 14336 T = 1
                  vs F.linear with the dense bf16 weight (target at T = 1, 4096 -> 4096: >= 2.5x)
                  bytes: codes + scales + codebooks + x + y (the dense peer moves 16 bits per weight)
     quantize     lmkern.quant.power_quantize (codes + scales; one sync for its checks)
                  vs the formula as torch ops (fake quantize without packing: a lower bound)
     dequantize   lmkern.quant.power_dequantize vs unpack + table gather as torch ops
     fake         lmkern.quant.power_fake_quantize (forward) vs the formula as torch ops
   Error: ||out - ref||/||ref|| against the float64 formula of the same codes (tests/reference/quant.py
   formulas, inlined).
4. A compact table on stdout; JSON to $OUT/gpu_timings.json when OUT is set, else
   benches/results/gpu_timings.json (gpu_timings_peers.json with --impls torch,compiled).

Compiles (dynamic=False, one per case and form) are the slow part: past --budget seconds the
compiled peers are skipped, past 1.5x the remaining cases too. Exit status 1 when an lmkern
output exceeds its tolerance or lmkern's CUDA path fails, else 0.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import lmkern
from lmkern import bench as lb

EPS = 1e-6
B16, F32 = torch.bfloat16, torch.float32
FORMS = ("fwd", "bwd", "fwd+bwd", "residual", "inplace", "crms")


# ---- timing --------------------------------------------------------------------------------------


def time_interleaved(fns: dict, reps: int, warmup: int, cuda: bool) -> dict[str, list[float]]:
    """Microseconds per call of each function: `warmup` calls each, then `reps` rounds in which every
    function runs once (order alternating), each call between its own pair of CUDA events; one
    synchronize at the end. On CPU (smoke tests only) perf_counter around each call."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    if cuda:
        torch.cuda.synchronize()
    names = list(fns)
    if cuda:
        events = {k: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)] for k in names}
        for i in range(reps):
            for k in (names if i % 2 == 0 else names[::-1]):
                start, end = events[k][i]
                start.record()
                fns[k]()
                end.record()
        torch.cuda.synchronize()
        return {k: [s.elapsed_time(e) * 1e3 for s, e in events[k]] for k in names}
    out = {k: [] for k in names}
    for i in range(reps):
        for k in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            out[k].append((time.perf_counter() - t0) * 1e6)
    return out


def copy_bandwidth(device, cuda: bool, reps: int, nbytes: int) -> dict:
    """GB/s of dst.copy_(src) and src.clone() (2 × nbytes moved per call), medians."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_interleaved({"copy_": lambda: dst.copy_(src), "clone": src.clone}, reps, 3, cuda)
    med = {k: statistics.median(v) for k, v in t.items()}
    del src, dst
    return {
        "bytes": nbytes,
        "copy_us": med["copy_"], "clone_us": med["clone"],
        "copy_GBps": 2 * nbytes / med["copy_"] / 1e3, "clone_GBps": 2 * nbytes / med["clone"] / 1e3,
    }


# ---- cases ---------------------------------------------------------------------------------------


def cases(smoke: bool) -> list[tuple[torch.dtype, int, int]]:
    """(dtype, rows, n), most important first: the cutoff of --budget drops the tail."""
    if smoke:
        return [(B16, 64, 256), (F32, 64, 256), (B16, 32, 255)]
    total = 1 << 27  # elements: 256 MiB in bf16, far beyond L2
    out = [(B16, 32768, 4096), (F32, 32768, 4096)]
    out += [(B16, total // n, n) for n in (1024, 8192, 16384)]
    out += [(B16, 32768, 4095)]
    return out


def fwd_bytes(rows, n, e, rstd=False):
    return 2 * rows * n * e + n * e + (4 * rows if rstd else 0)


def bwd_bytes(rows, n, e):
    parts = lmkern._core.norm_dw_parts(rows, n)
    return 3 * rows * n * e + n * e + 4 * rows + 2 * parts * n * 4 + n * e


def residual_bytes(rows, n, e):
    return 4 * rows * n * e + n * e


def composite_residual(x, r, w):
    h = x + r
    return F.rms_norm(h, (h.shape[-1],), w, EPS), h


def composite_inplace(x, r, w):
    h = r.add_(x)
    return F.rms_norm(h, (h.shape[-1],), w, EPS), h


def rms(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


class Compiled:
    """torch.compile(fn, dynamic=False) wrappers, made on first use; None when compiling is off or failed."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.cache = {}
        self.failures = {}

    def get(self, name, fn):
        if not self.enabled:
            return None
        if name not in self.cache:
            self.cache[name] = torch.compile(fn, dynamic=False)
        return self.cache[name]


def run_case(dtype, rows, n, device, cuda, reps, compiled: Compiled, forms, copy_gbps, use=("lmkern", "torch")):
    """Every form of one case: a list of row dicts. `use`: which of lmkern and torch (eager) to run;
    the compiled peer runs while `compiled` is enabled. Stops early when the CUDA context breaks."""
    gen = torch.Generator(device=device).manual_seed(rows * 131 + n)
    rnd = lambda *s: torch.randn(s, device=device, generator=gen, dtype=F32).to(dtype)  # noqa: E731
    x, w, r, dy = rnd(rows, n), rnd(n), rnd(rows, n), rnd(rows, n)
    e = x.element_size()
    tag = f"{str(dtype).replace('torch.', '')} {rows}x{n}"
    out = []

    def grads(fn):
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        y = fn(xr, wr)
        return xr, wr, y

    for form in forms:
        row = {"case": tag, "dtype": str(dtype).replace("torch.", ""), "rows": rows, "n": n, "form": form}
        impls, check, ref, nbytes = {}, {}, None, 0
        try:
            if form == "fwd":
                nbytes = fwd_bytes(rows, n, e)
                impls["lmkern"] = lambda: lmkern.rms_norm(x, w, EPS)
                impls["torch"] = lambda: rms(x, w)
                c = compiled.get(f"fwd {tag}", rms)
                if c is not None:
                    impls["compiled"] = lambda: c(x, w)
                check = {"lmkern": lambda: (lmkern.rms_norm(x, w, EPS),), "torch": lambda: (rms(x, w),)}
                ref = lambda: (lb.ref_norm(x.double(), w.double(), EPS),)  # noqa: E731
            elif form == "crms":
                nbytes = fwd_bytes(rows, n, e)
                impls["lmkern"] = lambda: lmkern.crms_norm(x, w, EPS)
                impls["torch"] = lambda: lb.torch_crms_norm(x, w, EPS)
                c = compiled.get(f"crms {tag}", lb.torch_crms_norm)
                if c is not None:
                    impls["compiled"] = lambda: c(x, w, EPS)
                check = {"lmkern": lambda: (lmkern.crms_norm(x, w, EPS),), "torch": lambda: (lb.torch_crms_norm(x, w, EPS),)}
                ref = lambda: (lb.ref_norm(x.double(), w.double(), EPS, crms=True),)  # noqa: E731
            elif form == "residual":
                nbytes = residual_bytes(rows, n, e)
                impls["lmkern"] = lambda: lmkern.rms_norm(x, w, EPS, residual=r)
                impls["torch"] = lambda: composite_residual(x, r, w)
                c = compiled.get(f"residual {tag}", composite_residual)
                if c is not None:
                    impls["compiled"] = lambda: c(x, r, w)
                check = {"lmkern": impls["lmkern"], "torch": impls["torch"]}
                ref = lambda: lb.ref_residual(x, r, w, EPS)  # noqa: E731
            elif form == "inplace":
                nbytes = residual_bytes(rows, n, e)
                lx, lr, px, pr, cx, cr = (t.clone() for t in (x, r, x, r, x, r))
                impls["lmkern"] = lambda: lmkern.rms_norm_(lx, w, EPS, residual=lr)
                impls["torch"] = lambda: composite_inplace(px, pr, w)
                c = compiled.get(f"inplace {tag}", composite_inplace)
                if c is not None:
                    impls["compiled"] = lambda: c(cx, cr, w)
                # The check runs on fresh copies: the timed ones drift call after call.
                check = {"lmkern": lambda: lmkern.rms_norm_(x.clone(), w, EPS, residual=r.clone()),
                         "torch": lambda: composite_inplace(x.clone(), r.clone(), w)}
                ref = lambda: lb.ref_residual(x, r, w, EPS)  # noqa: E731
            elif form == "bwd":
                nbytes = bwd_bytes(rows, n, e)
                try:
                    rstd = torch.ops.lmkern.rms_norm(x, w, EPS, 0.0, 1.0)[1]
                    bwd_op = torch.ops.lmkern.rms_norm_backward
                    impls["lmkern"] = lambda: bwd_op(dy, x, w, rstd, None, 0.0, 1.0, True)
                except Exception as ex:  # the peers are still timed
                    row["lmkern_failure"] = lb.one_line(ex)
                xt, wt, yt = grads(rms)
                impls["torch"] = lambda: torch.autograd.grad(yt, (xt, wt), dy, retain_graph=True)
                c = compiled.get(f"grad {tag}", rms)
                if c is not None:
                    xc, wc, yc = grads(c)
                    impls["compiled"] = lambda: torch.autograd.grad(yc, (xc, wc), dy, retain_graph=True)
                check = {k: impls[k] for k in ("lmkern", "torch") if k in impls}
                ref = lambda: lb.ref_fwd_bwd(x, w, dy, EPS)[1:]  # noqa: E731
            elif form == "fwd+bwd":
                nbytes = fwd_bytes(rows, n, e, rstd=True) + bwd_bytes(rows, n, e)

                def fb(fn):
                    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()

                    def run():
                        y = fn(xr, wr)
                        dx, dw = torch.autograd.grad(y, (xr, wr), dy)
                        return y.detach(), dx, dw

                    return run

                impls["lmkern"] = fb(lambda a, b: lmkern.rms_norm(a, b, EPS))
                impls["torch"] = fb(rms)
                c = compiled.get(f"grad {tag}", rms)
                if c is not None:
                    impls["compiled"] = fb(c)
                check = {"lmkern": impls["lmkern"], "torch": impls["torch"]}
                ref = lambda: lb.ref_fwd_bwd(x, w, dy, EPS)  # noqa: E731
            for k in ("lmkern", "torch"):
                if k not in use:
                    impls.pop(k, None)
                    check.pop(k, None)
            # error first (also the first call: compiles happen here, outside the timings)
            refs = ref()
            for k, f in check.items():
                try:
                    row[f"{k}_err"] = lb.max_rel_error(f(), refs)
                    if cuda:
                        torch.cuda.synchronize()  # a faulting kernel is reported here
                except Exception as ex:  # e.g. lmkern's CUDA path missing: the peers are still timed
                    row[f"{k}_failure"] = lb.one_line(ex)
                    impls.pop(k, None)
            del refs
            for k in [k for k in impls if k not in check]:
                t0 = time.perf_counter()
                try:
                    impls[k]()
                    if cuda:
                        torch.cuda.synchronize()
                    row[f"{k}_first_call_s"] = time.perf_counter() - t0
                except Exception as ex:  # a compile failure loses that peer only
                    row[f"{k}_failure"] = lb.one_line(ex)
                    del impls[k]
            t = time_interleaved(impls, reps, 3, cuda)
            for k, v in t.items():
                us = statistics.median(v)
                row[f"{k}_us"] = us
                row[f"{k}_GBps"] = nbytes / us / 1e3
                row[f"{k}_pct_copy"] = 100 * nbytes / us / 1e3 / copy_gbps if copy_gbps else math.nan
            row["bytes"] = nbytes
            for k in ("torch", "compiled"):
                if f"{k}_us" in row and "lmkern_us" in row:
                    row[f"speedup_vs_{k}"] = row[f"{k}_us"] / row["lmkern_us"]
            row["tolerance"] = lb.TOLERANCE[dtype]
            row["ok"] = "lmkern" not in use or row.get("lmkern_err", math.inf) <= lb.TOLERANCE[dtype]
            if "lmkern_failure" in row:
                print(f"{tag} {form}: lmkern failed: {row['lmkern_failure']}", flush=True)
        except Exception as ex:
            row["failure"] = lb.one_line(ex)
            row["ok"] = False
            traceback.print_exc(limit=3)
        out.append(row)
        impls = check = ref = None
        gc.collect()
        if cuda and lb.cuda_broken():
            row["cuda_context_broken"] = True
            break
        if cuda:
            torch.cuda.empty_cache()
    return out


# ---- power quantization --------------------------------------------------------------------------


def _quant_inputs(device, rows, n, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(rows, n, device=device, generator=gen) * 0.02
    a = torch.full((rows,), 0.7, device=device)
    return w, a


def _deq64(q):
    """x̂ of a PowerQuantized in float64 (codes unpacked with torch ops; the documented formula)."""
    from lmkern.quant import unpack_codes
    codes = unpack_codes(q.codes, q.bits, q.n).to(torch.float64)
    qm = 2 ** (q.bits - 1) - 1
    m = q.scales.to(torch.float64).repeat_interleave(q.group_size, dim=1)
    inv_a = (1.0 / q.exponent.to(torch.float64)).unsqueeze(1)
    return m * torch.sign(codes) * (codes.abs() / qm) ** inv_a


def torch_fake_quant(x, a, bits, g):
    """The quantizer as torch ops (float32 math, round-half-even): the peer of quantize / fake."""
    rows, n = x.shape
    qm = 2 ** (bits - 1) - 1
    X = x.float().view(rows, n // g, g)
    m = X.abs().amax(-1, keepdim=True)
    u = X.abs() / m.clamp_min(1e-30)
    A = a.view(rows, 1, 1)
    q = torch.round(qm * u ** A).clamp(max=qm)
    return (m * torch.sign(X) * (q / qm) ** (1.0 / A)).to(x.dtype).view(rows, n)


def torch_dequant4(codes, scales, a, g, dtype):
    """4-bit packed codes to values as torch ops: nibbles, sign extension, per-row table gather."""
    rows = codes.shape[0]
    f = torch.stack([codes & 0xF, codes >> 4], dim=-1).view(rows, -1).long()
    q = torch.where(f >= 8, f - 16, f).float()
    lut = (q.abs() / 7) ** (1.0 / a.view(rows, 1))
    m = scales.repeat_interleave(g, dim=1)
    return (m * torch.sign(q) * lut).to(dtype)


def graph_calls(fns: list, cuda: bool):
    """One callable running every fn of `fns` once, in order: a CUDA graph of the calls on CUDA (so
    the timing is GPU time, not Python's launch overhead, as in a graph-captured decoder), the plain
    loop on CPU. Returns (callable, number of calls)."""
    def loop():
        for f in fns:
            f()
    if not cuda:
        return loop, len(fns)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        loop()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        loop()
    return g.replay, len(fns)


# Weight bytes cycled through per timed linear call: well past the 50 MB L2 of an H100/H200, so
# each call reads its weight from HBM as a decoder layer would.
LINEAR_ROTATION_BYTES = 256 << 20


def run_quant(device, cuda, reps, copy_gbps):
    from lmkern.quant import power_dequantize, power_fake_quantize, power_quantize
    rows_out = []
    g, n = 128, 4096

    def row(case, form, fns, nbytes, lm_out, ref64, peer_out=None, tol=1e-2):
        t = time_interleaved(fns, reps, 5, cuda)
        med = {k: statistics.median(v) for k, v in t.items()}
        r = {"case": case, "form": form, "lmkern_us": med["lmkern"], "bytes": nbytes,
             "lmkern_GBps": nbytes / med["lmkern"] / 1e3}
        r["lmkern_pct_copy"] = 100 * r["lmkern_GBps"] / copy_gbps
        r["lmkern_err"] = lb.rel_error(lm_out, ref64)
        if "torch" in med:
            r["torch_us"] = med["torch"]
            r["speedup_vs_torch"] = med["torch"] / med["lmkern"]
            if peer_out is not None:
                r["torch_err"] = lb.rel_error(peer_out, ref64)
        r["ok"] = r["lmkern_err"] <= tol
        return r

    specs = [(4, n, n, 1), (4, n, n, 4), (4, n, n, 8), (4, n, n, 16), (3, n, n, 1), (4, 14336, n, 1)]
    for bits, out_f, in_f, tokens in specs:
        case = f"bf16 W{out_f}x{in_f} {bits}b g{g}"
        try:
            w, a = _quant_inputs(device, out_f, in_f, out_f + bits)
            q = power_quantize(w, a, bits, g)
            w_dense = q.dequantize().to(B16)  # the peer's weight: the same values, dense bf16
            x = torch.randn(tokens, in_f, device=device).to(B16)
            op = torch.ops.lmkern.power_quant_linear
            table = torch.ops.lmkern.power_codebook(q.exponent, bits)  # the rows' codebooks (host-built)
            lm = lambda: op(x, q.codes, q.scales, table, None, bits, g, in_f)  # noqa: E731
            ref = x.double() @ _deq64(q).T
            nbytes = q.codes.numel() + 4 * (q.scales.numel() + table.numel()) + 2 * tokens * (in_f + out_f)
            # Copies of both weights, cycled so that every call reads from HBM (see graph_calls).
            nq = max(2, LINEAR_ROTATION_BYTES // nbytes) if cuda else 2
            nd = max(2, LINEAR_ROTATION_BYTES // (2 * out_f * in_f)) if cuda else 2
            qs = [(q.codes.clone(), q.scales.clone(), table.clone()) for _ in range(nq)]
            ds = [w_dense.clone() for _ in range(nd)]
            lm_run, lm_calls = graph_calls(
                [lambda c=c: op(x, c[0], c[1], c[2], None, bits, g, in_f) for c in qs], cuda)
            pt_run, pt_calls = graph_calls([lambda d=d: F.linear(x, d) for d in ds], cuda)
            r = row(case, f"linear b{tokens}", {"lmkern": lm_run, "torch": pt_run}, nbytes * lm_calls, lm(), ref,
                    F.linear(x, w_dense))
            # Per call: the timed callables ran lm_calls / pt_calls linears.
            r["lmkern_us"] /= lm_calls
            r["torch_us"] /= pt_calls
            r["speedup_vs_torch"] = r["torch_us"] / r["lmkern_us"]
            r["bytes"] = nbytes
            r["timing"] = f"{'CUDA graph of ' if cuda else ''}{lm_calls} / {pt_calls} calls on rotating weight copies"
            eager = time_interleaved({"lmkern": lm, "torch": lambda: F.linear(x, w_dense)}, reps, 5, cuda)
            r["lmkern_eager_us"] = statistics.median(eager["lmkern"])
            r["torch_eager_us"] = statistics.median(eager["torch"])
            rows_out.append(r)
            del w_dense, qs, ds, lm_run, pt_run
        except Exception as e:  # noqa: BLE001
            rows_out.append({"case": case, "form": f"linear b{tokens}", "failure": lb.one_line(e)})
            traceback.print_exc()
            if cuda and lb.cuda_broken():
                rows_out[-1]["cuda_context_broken"] = True
                return rows_out

    case = f"bf16 {n}x{n} 4b g{g}"
    try:
        w, a = _quant_inputs(device, n, n, 7)
        x = w.to(B16)
        q = power_quantize(x, a, 4, g)
        ref = _deq64(q)
        e = 2 * n * n
        rows_out.append(row(case, "quantize", {"lmkern": lambda: power_quantize(x, a, 4, g),
                                               "torch": lambda: torch_fake_quant(x, a, 4, g)},
                            e + n * n // 2 + 4 * n * n // g, power_quantize(x, a, 4, g).dequantize(), ref,
                            torch_fake_quant(x, a, 4, g)))
        rows_out.append(row(case, "dequantize", {"lmkern": lambda: power_dequantize(q),
                                                 "torch": lambda: torch_dequant4(q.codes, q.scales, a, g, B16)},
                            n * n // 2 + 4 * n * n // g + e, power_dequantize(q), ref,
                            torch_dequant4(q.codes, q.scales, a, g, B16)))
        rows_out.append(row(case, "fake", {"lmkern": lambda: power_fake_quantize(x, a, 4, g),
                                           "torch": lambda: torch_fake_quant(x, a, 4, g)},
                            2 * e + 4 * n * n // g, power_fake_quantize(x, a, 4, g), ref, torch_fake_quant(x, a, 4, g)))
    except Exception as e:  # noqa: BLE001
        rows_out.append({"case": case, "form": "quant", "failure": lb.one_line(e)})
        traceback.print_exc()
        if cuda and lb.cuda_broken():
            rows_out[-1]["cuda_context_broken"] = True
    return rows_out


# ---- output --------------------------------------------------------------------------------------


def _f(v, fmt):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def table(rows) -> str:
    head = ["case", "form", "lmkern us", "GB/s", "%copy", "err", "torch err", "torch us", "x torch",
            "compiled us", "x compiled"]
    lines = [head]
    for r in rows:
        if "failure" in r:
            lines.append([r["case"], r["form"], "FAILED: " + r["failure"][:90]] + [""] * 8)
            continue
        lines.append([
            r["case"], r["form"], _f(r.get("lmkern_us"), ".1f"), _f(r.get("lmkern_GBps"), ".0f"),
            _f(r.get("lmkern_pct_copy"), ".0f"),
            "FAIL" if "lmkern_failure" in r else _f(r.get("lmkern_err"), ".1e") + ("" if r.get("ok") else " !"),
            _f(r.get("torch_err"), ".1e"), _f(r.get("torch_us"), ".1f"), _f(r.get("speedup_vs_torch"), ".2f"),
            _f(r.get("compiled_us"), ".1f"), _f(r.get("speedup_vs_compiled"), ".2f"),
        ])
    widths = [max(len(l[i]) for l in lines if len(l) > i and not l[2].startswith("FAILED")) for i in range(len(head))]
    text = []
    for j, l in enumerate(lines):
        if l[2].startswith("FAILED"):
            text.append(f"{l[0].ljust(widths[0])}  {l[1].ljust(widths[1])}  {l[2]}")
        else:
            text.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(l, widths))))
        if j == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=50, help="timed rounds per form (median); at least 50 on GPU")
    p.add_argument("--budget", type=float, default=200.0,
                   help="seconds: past it compiled peers are skipped, past 1.5x the remaining cases")
    p.add_argument("--impls", default="lmkern,torch,compiled",
                   help="comma-separated subset of lmkern,torch,compiled (e.g. torch,compiled: the peers and "
                        "the copy bandwidth alone, when lmkern's CUDA path is broken)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers (= no 'compiled' in --impls)")
    p.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated subset of {','.join(FORMS)}")
    p.add_argument("--no-quant", action="store_true", help="skip the power-quantization cases")
    p.add_argument("--quant-only", action="store_true", help="only the power-quantization cases")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke test of this script only
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny cases, few reps
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("timings: torch sees no CUDA device", file=sys.stderr)
        return 2
    reps = args.reps if args.smoke or not cuda else max(50, args.reps)
    forms = [f for f in args.forms.split(",") if f]
    bad = [f for f in forms if f not in FORMS]
    if bad:
        p.error(f"--forms: unknown {bad}; choose from {FORMS}")
    use = [i for i in args.impls.split(",") if i]
    if any(i not in ("lmkern", "torch", "compiled") for i in use):
        p.error(f"--impls: unknown {use}; choose from lmkern,torch,compiled")
    if args.no_compile and "compiled" in use:
        use.remove("compiled")

    for name in ("recompile_limit", "cache_size_limit"):  # one compile per case and form: stay compiled
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)

    status = lmkern.cuda_status() if cuda else None
    info = {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "lmkern": lmkern.__version__,
        "lmkern_cuda_status": status, "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "reps": reps,
    }
    print(f"device {info['device']}; torch {info['torch']} (CUDA {info['cuda']}); lmkern {info['lmkern']}; "
          f"lmkern.cuda_status(): {'n/a (cpu smoke test)' if not cuda else 'available' if status is None else status}",
          flush=True)

    copy = copy_bandwidth(device, cuda, reps, (1 << 30) if not args.smoke else (1 << 24))
    info["copy"] = copy
    print(f"copy bandwidth ({copy['bytes'] >> 20} MiB, read + write): copy_ {copy['copy_GBps']:.0f} GB/s "
          f"({copy['copy_us']:.1f} us), clone {copy['clone_GBps']:.0f} GB/s ({copy['clone_us']:.1f} us)", flush=True)

    compiled = Compiled("compiled" in use)
    rows = []
    broken = False
    if "lmkern" in use and not args.no_quant and not args.smoke:
        qrows = run_quant(device, cuda, reps, copy["copy_GBps"])
        rows += qrows
        print(table(qrows).split("\n", 2)[2] if qrows else "", flush=True)
        for r in qrows:
            if "lmkern_eager_us" in r:
                print(f"  {r['case']} {r['form']}: {r['timing']}; eager calls (Python overhead included): "
                      f"lmkern {r['lmkern_eager_us']:.1f} us, torch {r['torch_eager_us']:.1f} us", flush=True)
        broken = any(r.get("cuda_context_broken") for r in qrows)
    for dtype, nrows, n in ([] if args.quant_only else cases(args.smoke)):
        if broken:
            break
        elapsed = time.perf_counter() - t_start
        if elapsed > 1.5 * args.budget:
            print(f"(skipping {dtype} {nrows}x{n}: past 1.5x the budget)", flush=True)
            rows.append({"case": f"{str(dtype).replace('torch.', '')} {nrows}x{n}", "form": "-", "skipped": True})
            continue
        if compiled.enabled and elapsed > args.budget:
            print(f"(budget of {args.budget:.0f} s spent: compiled peers skipped from here)", flush=True)
            compiled.enabled = False
        case_rows = run_case(dtype, nrows, n, device, cuda, reps, compiled, forms, copy["copy_GBps"], use)
        rows += case_rows
        print(table(case_rows).split("\n", 2)[2] if case_rows else "", flush=True)
        if any(r.get("cuda_context_broken") for r in case_rows):
            broken = True
            print("the CUDA context is broken (a kernel faulted: every later CUDA call fails); the remaining "
                  "cases are not run. Rerun with --impls torch,compiled for the peers alone.", flush=True)

    timed = [r for r in rows if not r.get("skipped")]
    print()
    print(f"lmkern vs torch on {info['device']}: us = median of {reps} CUDA-event timings; GB/s from the bytes "
          f"the op must move; %copy of copy_ {copy['copy_GBps']:.0f} GB/s; err = ||out-ref||/||ref|| vs float64; "
          "x = peer time / lmkern time")
    print(table(timed))
    failed = [r for r in timed if not r.get("ok")]
    print(f"{len(timed) - len(failed)}/{len(timed)} forms ok; {time.perf_counter() - t_start:.0f} s")

    info["impls"], info["cuda_context_broken"] = use, broken
    if os.environ.get("OUT"):
        out_dir = Path(os.environ["OUT"])
    elif cuda:
        out_dir = Path(__file__).resolve().parents[1] / "results"
    else:  # smoke tests of the script itself stay out of the repository
        out_dir = Path(tempfile.gettempdir()) / "lmkern-timings"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu_timings" if cuda else f"timings_{device.type}_smoke"
    path = out_dir / (f"{name}.json" if "lmkern" in use else f"{name}_peers.json")
    with open(path, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1, default=str)
    print(f"wrote {path}")
    if broken:
        return 3
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
