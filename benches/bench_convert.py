"""GPT-2 small (124M, random weights) as Pre-LN vs converted Pre-RMSNorm vs Pre-CRMSNorm (lmkern.convert).

The three models compute the same function (checked here on the benchmark's own input); what differs
is the norm: torch's LayerNorm, lmkern's RMSNorm, lmkern's CRMSNorm on a 767-wide stream. Timed:

  forward     batch 1 × 512 tokens, no_grad, use_cache=False (logits for every position)
  train_step  the same batch: forward with labels, backward, AdamW step, zero_grad

float32 on CPU (and CUDA where lmkern's CUDA path works). Stream dropout is 0 in all three (a converted
model refuses stream dropout in train mode). The three run interleaved in one process, medians.

asv:     asv run --python=same --quick --show-stderr --bench bench_convert
script:  python benches/bench_convert.py [--quick] [--tokens 512] [--device cpu] [--no-profile] [--json PATH]
         prints the table, the speedups vs Pre-LN, and (torch.profiler) the norms' share of the time.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time

import torch

import lmkern
from lmkern import bench as lb
from lmkern import convert

try:
    from asv_runner.benchmarks.mark import skip_for_params
except ImportError:  # asv_runner absent: the decorator only informs asv
    def skip_for_params(_params):
        return lambda f: f

NAMES = ("pre-ln", "pre-rms", "pre-crms")
TOKENS = 512  # the target: batch 1 × 512 tokens
DEVICES = ["cpu"] + (["cuda"] if lmkern.cuda_available() else [])
_NO_PEAKMEM = [(d, p) for d in DEVICES if d == "cuda" for p in ("forward", "train_step")]


def gpt2_small(device="cpu", seed: int = 0):
    """GPT-2 small (n_embd 768, 12 layers, 12 heads, vocab 50257), random weights, no dropout, float32."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = tf.GPT2LMHeadModel(cfg).to(device).eval()
    with torch.no_grad():  # random LayerNorm affine: the folding is not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
    return model


def build(device="cpu"):
    """{name: model} for the three forms, on `device`."""
    ln = gpt2_small(device)
    return {"pre-ln": ln, "pre-rms": convert.to_pre_rmsnorm(ln), "pre-crms": convert.to_pre_crmsnorm(ln)}


def tokens(n: int, device="cpu"):
    return torch.randint(0, 50257, (1, n), generator=torch.Generator().manual_seed(1)).to(device)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def forward_fn(model, ids):
    model.eval()

    def run():
        with torch.no_grad():
            return model(ids, use_cache=False).logits

    return run


def train_fn(model, ids):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def run():
        model.train()
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return run


PHASES = {"forward": forward_fn, "train_step": train_fn}

# ---- what the norms cost, from torch.profiler ------------------------------------------------------

# Top-level profiler events of the norms (each is counted with its children, never twice).
_NORM_EVENTS = (
    "aten::layer_norm",  # torch LayerNorm forward
    "autograd::engine::evaluate_function: NativeLayerNormBackward0",
    "lmkern.norm",  # lmkern norm forward: a record_function range put around each norm module
    "autograd::engine::evaluate_function: _NormFunctionBackward",
)


def _mark_norms(model):
    """record_function ranges around lmkern norm modules: their eager fast path calls the kernel
    directly, so the profiler would not see them otherwise."""
    handles = []

    def pre(module, args):
        module._lmkern_range = torch.ops.profiler._record_function_enter_new("lmkern.norm", None)

    def post(module, args, out):
        torch.ops.profiler._record_function_exit._RecordFunction(module._lmkern_range)

    for m in model.modules():
        if isinstance(m, (lmkern.nn.RMSNorm, lmkern.nn.CRMSNorm)):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    return handles


def top_ops(fn, model, device="cpu", n: int = 8) -> list[tuple[str, float, int]]:
    """(op, self CPU seconds per call, calls) of the n ops with the most self time in one profiled call."""
    from torch.profiler import ProfilerActivity, profile

    handles = _mark_norms(model)
    try:
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
            _sync(device)
    finally:
        for h in handles:
            h.remove()
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]
    return [(e.key, e.self_cpu_time_total * 1e-6, e.count) for e in ev]


def norm_share(fn, model, device="cpu", repeats: int = 2) -> dict:
    """Profile `repeats` calls of fn: {'total_s', 'norm_s', 'share'} per call (CPU time of the norm
    events over the wall time of the call)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    handles = _mark_norms(model)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    try:
        fn()
        _sync(device)
        with profile(activities=acts) as prof:
            for _ in range(repeats):
                with record_function("lmkern.step"):
                    fn()
                    _sync(device)
    finally:
        for h in handles:
            h.remove()
    avg = {e.key: e for e in prof.key_averages()}
    total = avg["lmkern.step"].cpu_time_total * 1e-6 / repeats
    norm = sum(avg[k].cpu_time_total for k in _NORM_EVENTS if k in avg) * 1e-6 / repeats
    return {"total_s": total, "norm_s": norm, "share": norm / total if total else math.nan}


def norm_micro(tokens_: int = 512, d: int = 768, device="cpu", budget_s: float = 10.0) -> dict:
    """The norms alone at GPT-2 small's shape, interleaved: torch LayerNorm (with γ, β) vs lmkern
    RMSNorm (d) vs lmkern CRMSNorm (d−1), forward (no grad) and forward+backward. Seconds per call."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens_, d, generator=gen).to(device)
    xc = x[:, :-1].contiguous()
    ln = torch.nn.LayerNorm(d).to(device)
    rms = lmkern.nn.RMSNorm(d, eps=1e-5, elementwise_affine=False)
    crms = lmkern.nn.CRMSNorm(d - 1, eps=1e-5, elementwise_affine=False)
    dy, dyc = torch.randn_like(x), torch.randn_like(xc)

    def fwd(m, t):
        def run():
            with torch.no_grad():
                return m(t)
        return run

    def fwd_bwd(m, t, g):
        t = t.clone().requires_grad_(True)

        def run():
            m(t).backward(g)
            t.grad = None
            for p_ in m.parameters():
                p_.grad = None
        return run

    out = {}
    for phase, fns in (("forward", {"layer_norm": fwd(ln, x), "rms_norm": fwd(rms, x), "crms_norm": fwd(crms, xc)}),
                       ("fwd+bwd", {"layer_norm": fwd_bwd(ln, x, dy), "rms_norm": fwd_bwd(rms, x, dy),
                                    "crms_norm": fwd_bwd(crms, xc, dyc)})):
        t = lb.interleaved(fns, device, min_rounds=20, budget_s=budget_s, warmup=3)
        out[phase] = {k: v.median for k, v in t.items()}
    return out


def gemm_micro(tokens_: int = 512, d: int = 768, ff: int = 3072, device="cpu", budget_s: float = 3.0) -> dict:
    """The MLP's GEMMs at stream width d (Pre-LN, Pre-RMSNorm) and d−1 (Pre-CRMSNorm), interleaved:
    {gemm: (seconds at d, seconds at d−1)}. The d−1 stream changes the GEMMs' shapes, not only the norm."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, shapes in (("x @ W_fc      [t,d]x[d,ff]", ((tokens_, None), (None, ff))),
                         ("h @ W_proj    [t,ff]x[ff,d]", ((tokens_, ff), (ff, None))),
                         ("dW_proj = hᵀg [ff,t]x[t,d]", ((ff, tokens_), (tokens_, None))),
                         ("dx = g W_fcᵀ  [t,ff]x[ff,d]", ((tokens_, ff), (ff, None)))):
        fns = {}
        for width in (d, d - 1):
            a = torch.randn(*[width if v is None else v for v in shapes[0]], generator=gen).to(device)
            b = torch.randn(*[width if v is None else v for v in shapes[1]], generator=gen).to(device)
            fns[width] = (lambda a=a, b=b: a @ b)
        t = lb.interleaved(fns, device, min_rounds=10, budget_s=budget_s, warmup=2)
        out[name] = (t[d].median, t[d - 1].median)
    return out


# ---- asv ------------------------------------------------------------------------------------------


class GPT2Small:
    """GPT-2 small, batch 1 × 512 tokens, float32: time_/peakmem_ of each form, track_ speedups over
    Pre-LN (interleaved medians in one process) and the norms' profiled share of the time."""

    params = [DEVICES, list(PHASES)]
    param_names = ["device", "phase"]
    number = 1
    repeat = (3, 7, 120.0)
    warmup_time = 0
    timeout = 1200

    def setup(self, device, phase):
        if importlib.util.find_spec("transformers") is None:  # asv reports NotImplementedError as skipped
            raise NotImplementedError("GPT2Small needs transformers: pip install 'lmkern[bench]'")
        self.models = build(device)
        self.ids = tokens(TOKENS, device)
        self.device = device
        self.fns = {k: PHASES[phase](m, self.ids) for k, m in self.models.items()}
        for f in self.fns.values():  # first-call costs (allocator, AdamW state) stay out of time_*
            f()
        _sync(device)

    def _run(self, name):
        self.fns[name]()
        _sync(self.device)

    def time_pre_ln(self, device, phase):
        self._run("pre-ln")

    def time_pre_rms(self, device, phase):
        self._run("pre-rms")

    def time_pre_crms(self, device, phase):
        self._run("pre-crms")

    @skip_for_params(_NO_PEAKMEM)
    def peakmem_pre_ln(self, device, phase):
        self._run("pre-ln")

    @skip_for_params(_NO_PEAKMEM)
    def peakmem_pre_crms(self, device, phase):
        self._run("pre-crms")

    def _speedups(self):
        t = lb.interleaved(self.fns, self.device, min_rounds=3, budget_s=20.0, warmup=0)
        return {k: t["pre-ln"].median / t[k].median for k in t}

    def track_speedup_rms(self, device, phase):
        """Pre-LN time / Pre-RMSNorm time."""
        return round(self._speedups()["pre-rms"], 3)

    def track_speedup_crms(self, device, phase):
        """Pre-LN time / Pre-CRMSNorm time."""
        return round(self._speedups()["pre-crms"], 3)

    def track_norm_share_ln(self, device, phase):
        """Share (%) of the Pre-LN model's time spent in LayerNorm (torch.profiler)."""
        return round(100 * norm_share(self.fns["pre-ln"], self.models["pre-ln"], device)["share"], 3)

    def track_norm_share_crms(self, device, phase):
        """Share (%) of the Pre-CRMSNorm model's time spent in lmkern's CRMSNorm (torch.profiler)."""
        return round(100 * norm_share(self.fns["pre-crms"], self.models["pre-crms"], device)["share"], 3)

    track_speedup_rms.unit = track_speedup_crms.unit = "x"
    track_norm_share_ln.unit = track_norm_share_crms.unit = "%"


# ---- script mode ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--phase", choices=list(PHASES), action="append", help="default: both")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch and lmkern")
    p.add_argument("--norms-only", action="store_true", help="only the norms and GEMMs alone (fast)")
    p.add_argument("--top", type=int, default=0, metavar="N", help="also print the N ops with the most self time")
    args = p.parse_args(argv)
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
        lmkern.set_num_threads(args.threads)
    micro = norm_micro(args.tokens, 768, dev, budget_s=3.0 if args.quick else 10.0)
    for phase, t in micro.items():
        print(f"norms alone [{args.tokens}, 768], {phase:<8}: " + ", ".join(
            f"{k} {lb.fmt_time(v)} ({t['layer_norm'] / v:.2f}x LN)" for k, v in t.items())
            + f"; 25 norms per model call: LN {lb.fmt_time(25 * t['layer_norm'])}", flush=True)
    gemm = gemm_micro(args.tokens, 768, 3072, dev, budget_s=2.0 if args.quick else 5.0)
    for k, (a, b) in gemm.items():
        print(f"gemm {k}: width 768 {lb.fmt_time(a)}, width 767 {lb.fmt_time(b)} ({b / a:.2f}x)", flush=True)
    if args.norms_only:
        return 0
    t0 = time.perf_counter()
    models = build(dev)
    ids = tokens(args.tokens, dev)
    print(f"lmkern {lmkern.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads torch {torch.get_num_threads()} / lmkern {lmkern.get_num_threads()}, device {dev}, "
          f"GPT-2 small float32, batch 1 x {args.tokens} (built in {time.perf_counter() - t0:.0f} s)", flush=True)
    with torch.no_grad():
        ref = models["pre-ln"](ids, use_cache=False).logits.double()
        for k in ("pre-rms", "pre-crms"):
            out = models[k](ids, use_cache=False).logits.double()
            print(f"check {k}: max |Δlogits| / max |logits| = {((out - ref).abs().max() / ref.abs().max()).item():.1e}")
    results = []
    for phase in args.phase or list(PHASES):
        fns = {k: PHASES[phase](m, ids) for k, m in models.items()}
        for f in fns.values():
            f()
        t = lb.interleaved(fns, dev, min_rounds=3 if args.quick else 7, budget_s=10.0 if args.quick else 60.0, warmup=0)
        for k in NAMES:
            row = {"phase": phase, "model": k, "median_s": t[k].median, "iqr_s": t[k].iqr,
                   "rounds": len(t[k].samples), "speedup_vs_ln": t["pre-ln"].median / t[k].median}
            if not args.no_profile:
                row.update({f"profile_{a}": b for a, b in norm_share(fns[k], models[k], dev).items()})
            if args.top:
                row["top_ops"] = top_ops(fns[k], models[k], dev, args.top)
            results.append(row)
            share = f"{100 * row['profile_share']:.2f} % ({lb.fmt_time(row['profile_norm_s'])} of {lb.fmt_time(row['profile_total_s'])})" \
                if "profile_share" in row else "-"
            print(f"{phase:<10}  {k:<8}  median {lb.fmt_time(row['median_s']):>9}  IQR {lb.fmt_time(row['iqr_s'][0])}–"
                  f"{lb.fmt_time(row['iqr_s'][1])}  n={row['rounds']:<3}  vs pre-ln {row['speedup_vs_ln']:.3f}x  "
                  f"norm share {share}", flush=True)
            for op, sec, calls in row.get("top_ops", []):
                print(f"    {op:<60} {lb.fmt_time(sec):>9}  ({calls} calls)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"lmkern": lmkern.__version__, "torch": torch.__version__, "tokens": args.tokens,
                       "device": dev, "norms_alone": micro, "gemm_768_vs_767": gemm, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
