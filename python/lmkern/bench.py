"""Benchmarks of every lmkern op against its float64 reference and its peer (what `lmkern bench` runs).

A registry of :class:`BenchOp` entries, one per (op, form): how to make inputs for a case, the lmkern
call, the peer call (torch's own op or a torch composite of the same formula), and a float64
reference written straight from the paper's formula. :func:`run` checks each op's output against
the reference (‖out − ref‖ / ‖ref‖, computed in float64) and times it against its peer, interleaved in
one process (median of many rounds). A later kernel family adds its entries with :func:`register`.

The timer (:func:`interleaved`) and the references are public so the asv suites (benches/) and the
GPU timings (benches/gpu/timings.py) measure the same things the same way.
"""
from __future__ import annotations

import gc
import functools
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

import lmkern

F64 = torch.float64

#: Tolerances on ‖out − ref‖ / ‖ref‖ by dtype (DESIGN.md, "Tolerances").
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}

EPS = 1e-6

# --------------------------------------------------------------------------------------------------
# float64 references, written from PAPERS.md §1 (never calling lmkern)
# --------------------------------------------------------------------------------------------------


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(F64)


def ref_rstd(h64: torch.Tensor, eps: float, crms: bool) -> torch.Tensor:
    """r per row: RMSNorm (mean(h²) + eps)^-½; CRMSNorm ((Σh² + (Σh)²)/(n+1) + eps)^-½. float64 in, out."""
    n = h64.shape[-1]
    sq = (h64 * h64).sum(-1, keepdim=True)
    ms = (sq + h64.sum(-1, keepdim=True) ** 2) / (n + 1) if crms else sq / n
    return (ms + eps).rsqrt()


def ref_norm(h64, w64=None, eps: float = EPS, offset: float = 0.0, scale: float = 1.0, crms: bool = False):
    """y = h · r · (offset + w) · scale in float64 (differentiable: gradients by autograd)."""
    y = h64 * ref_rstd(h64, eps, crms)
    if w64 is not None:
        y = y * (offset + w64)
    return y * scale


def ref_residual(x, residual, w=None, eps: float = EPS, crms: bool = False):
    """(y, h) of the fused residual form: h = x + residual rounded to x's dtype (as torch's composite
    and lmkern form it), then normalized in float64."""
    h64 = (x + residual).to(F64) if x.dtype != F64 else x + residual
    return ref_norm(h64, _f64(w), eps, crms=crms), h64


def ref_fwd_bwd(x, w, dy, eps: float = EPS, crms: bool = False):
    """(y, dx, dw) in float64: the formula's forward and autograd's exact gradients of ⟨dy, y⟩."""
    with torch.enable_grad():
        x64 = _f64(x).requires_grad_(True)
        w64 = _f64(w).requires_grad_(True)
        y = ref_norm(x64, w64, eps, crms=crms)
        dx, dw = torch.autograd.grad(y, (x64, w64), _f64(dy))
    return y.detach(), dx, dw


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ (2-norms over all elements, in float64); NaN anywhere gives inf."""
    out64, ref64 = _f64(out), _f64(ref)
    if out64.shape != ref64.shape:
        raise ValueError(f"output shape {tuple(out64.shape)} differs from the reference's {tuple(ref64.shape)}")
    num = torch.linalg.vector_norm(out64 - ref64).item()
    den = torch.linalg.vector_norm(ref64).item()
    if not math.isfinite(num):
        return math.inf
    return num / den if den > 0 else num


def max_rel_error(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    return max(rel_error(o, r) for o, r in zip(outs, refs))


def chunked_errors(
    outputs: Sequence[Sequence[torch.Tensor]],
    reference: Callable[[slice], Sequence[torch.Tensor]],
    rows: int,
    reduced: int = 0,
    chunk_elems: int = 1 << 20,
    n: int = 1,
) -> list[float]:
    """max over outputs of ‖out − ref‖/‖ref‖ for each of several output sets (e.g. lmkern's and the
    peer's), with the float64 reference computed `chunk_elems` elements of rows at a time.

    The first outputs of each set are row-wise ([..., n], compared chunk by chunk); the last
    `reduced` are sums over rows: reference(rows) gives their partial sums, added up in float64
    and compared at the end. NaN anywhere gives inf."""
    chunk = max(1, chunk_elems // max(n, 1))
    k = None
    num = den = red = None
    for r0 in range(0, max(rows, 1), chunk):
        sl = slice(r0, min(rows, r0 + chunk))
        refs = [t.detach() for t in reference(sl)]
        if k is None:
            k = len(refs)
            num = [[0.0] * k for _ in outputs]
            den = [0.0] * k
            red = [None] * k
        for i, ref in enumerate(refs):
            if i >= k - reduced:
                red[i] = ref.clone() if red[i] is None else red[i] + ref
                continue
            den[i] += torch.linalg.vector_norm(ref).item() ** 2
            for j, outs in enumerate(outputs):
                if outs is None:
                    continue
                o = _f64(_rows_of(outs[i], sl))
                num[j][i] += torch.linalg.vector_norm(o - ref.reshape(o.shape)).item() ** 2
    result = []
    for j, outs in enumerate(outputs):
        if outs is None:
            result.append(math.nan)
            continue
        errs = []
        for i in range(k):
            if i >= k - reduced:
                errs.append(rel_error(outs[i], red[i]))
            elif not math.isfinite(num[j][i]):
                errs.append(math.inf)
            else:
                errs.append(math.sqrt(num[j][i]) / math.sqrt(den[i]) if den[i] > 0 else math.sqrt(num[j][i]))
        result.append(max(errs))
    return result


# --------------------------------------------------------------------------------------------------
# Peers: torch's own op, or a torch composite of the same formula
# --------------------------------------------------------------------------------------------------


def torch_rms_norm(x, w, eps: float = EPS):
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def torch_crms_norm(x, w, eps: float = EPS):
    """CRMSNorm written as torch ops (float32 accumulation, as a user would write it)."""
    n = x.shape[-1]
    xf = x.float()
    s = xf.sum(-1, keepdim=True)
    ms = (xf.square().sum(-1, keepdim=True) + s.square()) / (n + 1)
    y = xf * torch.rsqrt(ms + eps)
    if w is not None:
        y = y * w.float()
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds per call of one function: every sample, and their median."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def iqr(self) -> tuple[float, float]:
        if len(self.samples) < 4:
            return (min(self.samples, default=math.nan), max(self.samples, default=math.nan))
        q = statistics.quantiles(self.samples, n=4)
        return q[0], q[2]


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _time_once(f: Callable[[], Any], number: int, cuda: bool) -> float:
    """Seconds per call over `number` back-to-back calls (CUDA: between events, after a sync)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            f()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / number
    t0 = time.perf_counter()
    for _ in range(number):
        f()
    return (time.perf_counter() - t0) / number


def interleaved(
    fns: dict[str, Callable[[], Any]],
    device="cpu",
    *,
    min_rounds: int = 5,
    max_rounds: int = 10_000,
    budget_s: float = 1.0,
    warmup: int = 2,
    sample_s: float = 1e-3,
) -> dict[str, Timing]:
    """Time several functions side by side: in each round every function runs once (the order
    alternates between rounds), until `budget_s` has passed and at least `min_rounds` rounds ran.

    Each sample is one call, or for fast functions `number` back-to-back calls chosen (from the
    warm-up calls) so a sample lasts about `sample_s`; with warmup=0, one call per sample. The garbage
    collector is off while timing. Returns a :class:`Timing` (seconds per call) per name.
    """
    cuda = _is_cuda(device)
    names = list(fns)
    number = {k: 1 for k in names}
    for k in names:  # warm-up; also estimates how many calls make one sample (warmup=0: one call)
        t = math.inf
        for _ in range(warmup):
            t = min(t, _time_once(fns[k], 1, cuda))
        if warmup:
            number[k] = max(1, min(10_000, int(sample_s / max(t, 1e-9))))
    # One `number` for all so every function's sample covers the same span of calls.
    n = min(number.values()) if number else 1
    out = {k: Timing() for k in names}
    enabled = gc.isenabled()
    gc.disable()
    try:
        t_start = time.perf_counter()
        rounds = 0
        while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - t_start < budget_s):
            for k in names if rounds % 2 == 0 else reversed(names):
                out[k].samples.append(_time_once(fns[k], n, cuda))
            rounds += 1
    finally:
        if enabled:
            gc.enable()
    return out


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

Shape = tuple[int, ...]
Case = tuple[Shape, torch.dtype]


@dataclass(frozen=True)
class BenchOp:
    """One op in one form, with its peer and its float64 reference.

    make(shape, dtype, device, generator) -> inputs (a dict); lmkern(inputs) and peer(inputs) run
    the op and return the tensors to check (they are also what is timed). reference(inputs, rows)
    returns the float64 values of those outputs for the row range `rows` (a slice of the flattened
    leading dimensions): row-wise outputs for those rows, and each of the last `reduced` outputs
    (sums over rows, e.g. a weight gradient) as that range's partial sum. The check runs the
    reference over chunks of rows, so float64 temporaries stay small whatever the shape.
    cases(device, quick) lists the (shape, dtype) cases to run.
    """

    op: str
    form: str
    peer_name: str
    make: Callable[[Shape, torch.dtype, torch.device, torch.Generator], dict]
    lmkern: Callable[[dict], Sequence[torch.Tensor]]
    peer: Callable[[dict], Sequence[torch.Tensor]]
    reference: Callable[[dict, slice], Sequence[torch.Tensor]]
    cases: Callable[[str, bool], list[Case]]
    reduced: int = 0

    @property
    def name(self) -> str:
        return f"{self.op} {self.form}"


REGISTRY: list[BenchOp] = []


def register(entry: BenchOp) -> BenchOp:
    if any(e.name == entry.name for e in REGISTRY):
        raise ValueError(f"a benchmark named {entry.name!r} is already registered")
    REGISTRY.append(entry)
    return entry


def _randn(shape, dtype, device, gen, requires_grad=False):
    t = torch.randn(shape, dtype=torch.float32, device=device, generator=gen).to(dtype)
    return t.requires_grad_(requires_grad)


# ---- norm family ---------------------------------------------------------------------------------

B16 = torch.bfloat16
F32 = torch.float32


def norm_cases(device: str, quick: bool) -> list[Case]:
    """The target shape [8192, 4096] float32, the per-call overhead case [1, 64], bf16, an odd n."""
    if device == "cuda":
        if quick:
            return [((8192, 4096), B16), ((8192, 4096), F32), ((2048, 4095), B16), ((1, 64), F32)]
        return [((32768, 4096), B16), ((8192, 4096), F32), ((8192, 4095), B16), ((1, 64), F32)]
    if quick:
        return [((1024, 4096), F32), ((512, 4096), B16), ((1, 64), F32)]
    return [((8192, 4096), F32), ((1024, 4096), B16), ((1024, 4095), F32), ((1, 64), F32)]


def _make_fwd(shape, dtype, device, gen):
    return {"x": _randn(shape, dtype, device, gen), "w": _randn(shape[-1:], dtype, device, gen)}


def _make_residual(shape, dtype, device, gen):
    d = _make_fwd(shape, dtype, device, gen)
    d["r"] = _randn(shape, dtype, device, gen)
    return d


def _make_fwd_bwd(shape, dtype, device, gen):
    return {
        "x": _randn(shape, dtype, device, gen, requires_grad=True),
        "w": _randn(shape[-1:], dtype, device, gen, requires_grad=True),
        "dy": _randn(shape, dtype, device, gen),
    }


def _fwd(fn):
    return lambda d: (fn(d["x"], d["w"], EPS),)


def _fwd_bwd(fn):
    def run(d):
        y = fn(d["x"], d["w"], EPS)
        dx, dw = torch.autograd.grad(y, (d["x"], d["w"]), d["dy"])
        return y.detach(), dx, dw

    return run


def _lm_residual(fn):
    return lambda d: fn(d["x"], d["w"], EPS, residual=d["r"])


def _composite_residual(fn):
    def run(d):
        h = d["x"] + d["r"]
        return fn(h, d["w"], EPS), h

    return run


def _make_inplace(shape, dtype, device, gen):
    """Originals x, r (for the reference) and a working copy of each for lmkern ("lx", "lr") and for
    the peer ("px", "pr"): both sides update their own copies in place call after call (r grows by a
    unit-RMS row per call, harmless for timing); the check uses the first call, made on fresh copies."""
    d = _make_residual(shape, dtype, device, gen)
    for side in ("l", "p"):
        d[side + "x"], d[side + "r"] = d["x"].clone(), d["r"].clone()
    return d


def _lm_inplace(fn):
    return lambda d: fn(d["lx"], d["w"], EPS, residual=d["lr"])


def _composite_inplace(fn):
    """The peer's in-place residual form: r += x, then the norm of r into a fresh y."""
    def run(d):
        h = d["pr"].add_(d["px"])
        return fn(h, d["w"], EPS), h

    return run


def _rows_of(t: torch.Tensor, rows: slice) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1])[rows]


def _ref_fwd(crms):
    return lambda d, rows: (ref_norm(_f64(_rows_of(d["x"], rows)), _f64(d["w"]), EPS, crms=crms),)


def _ref_fwd_bwd(crms):
    return lambda d, rows: ref_fwd_bwd(_rows_of(d["x"], rows), d["w"], _rows_of(d["dy"], rows), EPS, crms=crms)


def _ref_residual(crms):
    return lambda d, rows: ref_residual(_rows_of(d["x"], rows), _rows_of(d["r"], rows), d["w"], EPS, crms=crms)


for _op, _lm, _lm_inplace_fn, _peer, _peer_name, _crms in (
    ("rms_norm", lmkern.rms_norm, lmkern.rms_norm_, torch_rms_norm, "F.rms_norm", False),
    ("crms_norm", lmkern.crms_norm, lmkern.crms_norm_, torch_crms_norm, "torch composite", True),
):
    register(BenchOp(_op, "fwd", _peer_name, _make_fwd, _fwd(_lm), _fwd(_peer), _ref_fwd(_crms), norm_cases))
    register(BenchOp(
        _op, "fwd+bwd", f"{_peer_name} (autograd)", _make_fwd_bwd, _fwd_bwd(_lm), _fwd_bwd(_peer),
        _ref_fwd_bwd(_crms), norm_cases, reduced=1,  # (y, dx, dw): dw sums over rows
    ))
    register(BenchOp(
        _op, "residual", f"x + r; {_peer_name}", _make_residual, _lm_residual(_lm), _composite_residual(_peer),
        _ref_residual(_crms), norm_cases,
    ))
    register(BenchOp(
        _op, "residual in place", f"r += x; {_peer_name}", _make_inplace, _lm_inplace(_lm_inplace_fn),
        _composite_inplace(_peer), _ref_residual(_crms), norm_cases,
    ))


# ---- model conversion (lmkern.convert): a converted model's forward vs its Pre-LN original ---------

from . import convert as _convert  # noqa: E402

for _entry in _convert.bench_entries(BenchOp):
    register(_entry)


# ---- power quantization (PowerQuant / NUPES) ------------------------------------------------------

QUANT_A = 0.7  # the exponent of the timed cases (any a in (0, 1] costs the same)


def quant_cases(device: str, quick: bool) -> list[Case]:
    """The target weight [4096, 4096] float32 (4-bit, groups of 128); CPU only for now."""
    if device != "cpu":
        return []
    return [((1024, 4096), F32)] if quick else [((4096, 4096), F32), ((1024, 4096), B16)]


def _make_quant(shape, dtype, device, gen):
    return {"x": _randn(shape, dtype, device, gen)}


def ref_power_quantize(x: torch.Tensor, a: float, bits: int = 4, g: int = 128):
    """(packed codes as float64, scales) of PAPERS.md §2 in float64: m = float32(max|x|) per group,
    q = sign(x)·min(floor(qmax·(|x|/m)^a + 0.5), qmax), 4-bit codes packed two per byte, low first."""
    rows, n = x.shape
    qm = 2 ** (bits - 1) - 1
    X = x.detach().to(F64).reshape(rows, n // g, g)
    m = X.abs().amax(-1, keepdim=True).to(torch.float32).to(F64)
    q = torch.sign(X) * torch.floor(qm * (X.abs() / m) ** a + 0.5).clamp(max=qm)
    f = torch.remainder(q.reshape(rows, n), 2 ** bits)  # two's-complement field
    return (f[:, 0::2] + 16 * f[:, 1::2]), m.reshape(rows, n // g)


def torch_power_quantize(x: torch.Tensor, a: float, bits: int = 4, g: int = 128):
    """The same formula as a user would write it in torch (abs, div, pow, round, clamp, nibble packing)."""
    rows, n = x.shape
    qm = 2 ** (bits - 1) - 1
    X = x.float().reshape(rows, n // g, g)
    m = X.abs().amax(-1, keepdim=True)
    q = torch.sign(X) * torch.clamp(torch.round(qm * (X.abs() / m).pow(a)), max=qm)
    q = q.to(torch.int8).reshape(rows, n)
    codes = ((q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4)).view(torch.uint8)
    return codes, m.reshape(rows, n // g)


def _lm_quantize(d):
    q = lmkern.quant.power_quantize(d["x"], QUANT_A, 4, 128)
    return q.codes, q.scales


def _peer_quantize(d):
    return torch_power_quantize(d["x"], QUANT_A)


def _ref_quantize(d, rows):
    return ref_power_quantize(_rows_of(d["x"], rows), QUANT_A)


register(BenchOp("power_quantize", "4bit g128", "torch composite", _make_quant, _lm_quantize, _peer_quantize,
                 _ref_quantize, quant_cases))


def quant_linear_cases(device: str, quick: bool) -> list[Case]:
    """GEMV (batch 1), a small batch (fused GEMV) and a prompt of 512 tokens (Ŵ formed in chunks
    for torch's matmul) through a 4096 → 4096 4-bit g128 layer."""
    if device != "cpu":
        return []
    return [((1, 4096), F32)] if quick else [((1, 4096), F32), ((1, 4096), B16), ((8, 4096), F32), ((512, 4096), F32)]


_QLINEAR: dict = {}


def _quant_layer(n: int, device, bits: int = 4) -> tuple:
    """(PowerQuantLinear, its dense float32 Ŵ) for an n → n layer of `bits`-bit codes (groups of
    128), built once per process."""
    key = (n, str(device), bits)
    if key not in _QLINEAR:
        gen = torch.Generator(device=device).manual_seed(1)
        lin = torch.nn.Linear(n, n, bias=False, device=device)
        with torch.no_grad():
            lin.weight.copy_(torch.randn((n, n), generator=gen, device=device) / math.sqrt(n))
        mod = lmkern.nn.PowerQuantLinear.from_linear(lin, bits, 128, a=QUANT_A)
        _QLINEAR[key] = (mod, mod.dequantized_weight())
    return _QLINEAR[key]


def _make_qlinear(shape, dtype, device, gen, bits=4):
    mod, w_hat = _quant_layer(shape[-1], device, bits)
    return {"x": _randn(shape, dtype, device, gen), "mod": mod, "w": w_hat.to(dtype)}


def _lm_qlinear(d):
    # No torch.no_grad() around each call: nothing here requires a gradient, the peer has none, and
    # its enter and exit, cold after the GEMV has streamed the codes through the caches, cost ~30 us
    # a call (a model's forward under no_grad pays them once).
    return (d["mod"](d["x"]),)


def _peer_qlinear(d):
    return (F.linear(d["x"], d["w"]),)


def _ref_qlinear(d, rows):
    w64 = d["mod"].dequantized_weight().to(F64)  # the codebook × scales, exactly as stored
    return (_f64(_rows_of(d["x"], rows)) @ w64.T,)


register(BenchOp("power_quant_linear", "4bit g128", "dense F.linear", _make_qlinear, _lm_qlinear, _peer_qlinear,
                 _ref_qlinear, quant_linear_cases))


def quant_linear_narrow_cases(device: str, quick: bool) -> list[Case]:
    """The GEMV (batch 1) and a small batch through the same layer with 2-, 3- or 8-bit codes."""
    if device != "cpu":
        return []
    return [((1, 4096), F32)] if quick else [((1, 4096), F32), ((8, 4096), F32)]


for _bits in (2, 3, 8):
    register(BenchOp("power_quant_linear", f"{_bits}bit g128", "dense F.linear",
                     functools.partial(_make_qlinear, bits=_bits), _lm_qlinear, _peer_qlinear, _ref_qlinear,
                     quant_linear_narrow_cases))


# ---- ncd family (gzip-NCD, ZIP-FIT; PAPERS.md §7) -----------------------------------------------
# Inputs are ~1 KB pieces of real text (lmkern.data.corpus); shape = (sources, targets), float64.
# Outputs are [sources, targets] NCDs or [sources, 1] alignments; the reference is the formula over
# host gzip.compress lengths in float64 (exact equality expected: error 0); the peer is ZIP-FIT's
# published method (three gzip.compress per pair) in this one process.


def ncd_cases(device: str, quick: bool) -> list[Case]:
    if device != "cpu":
        return []
    return [((32, 8), F64)] if quick else [((128, 16), F64)]


def _make_ncd(shape, dtype, device, gen):
    from lmkern.data.corpus import sources_and_targets

    src, tgt = sources_and_targets(shape[0], shape[1], seed=int(torch.randint(1 << 30, (1,), generator=gen)))
    return {"src": [t.encode() for t in src], "tgt": [t.encode() for t in tgt], "level": 9}


def ref_ncd_rows(d, rows: slice) -> torch.Tensor:
    """NCD(x, y) = (C(x ⊕ y) − min(C(x), C(y))) / max(C(x), C(y)), C = len(gzip.compress(·, level))."""
    import gzip

    lv = d["level"]
    cy = [len(gzip.compress(y, compresslevel=lv)) for y in d["tgt"]]
    out = []
    for x in d["src"][rows]:
        cx = len(gzip.compress(x, compresslevel=lv))
        out.append([(len(gzip.compress(x + y, compresslevel=lv)) - min(cx, c)) / max(cx, c) for y, c in zip(d["tgt"], cy)])
    return torch.tensor(out, dtype=F64).reshape(-1, len(d["tgt"]))


def ref_alignment_rows(d, rows: slice) -> torch.Tensor:
    """1 − mean_j NCD(x, y_j), the mean summed in target order."""
    out = []
    for r in ref_ncd_rows(d, rows).tolist():
        acc = 0.0
        for v in r:
            acc += v
        out.append(1 - acc / len(r))
    return torch.tensor(out, dtype=F64).reshape(-1, 1)


def _published(matrix: bool):
    def run(d):
        from lmkern.data import baseline

        lv = d["level"]
        if matrix:
            vals = [[baseline.published_ncd(x, y, lv) for y in d["tgt"]] for x in d["src"]]
            return (torch.tensor(vals, dtype=F64),)
        return (torch.tensor([baseline.published_alignment(x, d["tgt"], lv) for x in d["src"]], dtype=F64).reshape(-1, 1),)

    return run


register(BenchOp(
    "ncd", "zipfit_scores", "ZIP-FIT published, 1 process", _make_ncd,
    lambda d: (torch.from_numpy(lmkern.ncd.zipfit_scores(d["src"], d["tgt"], d["level"])).reshape(-1, 1),),
    _published(False), lambda d, rows: (ref_alignment_rows(d, rows),), ncd_cases,
))
register(BenchOp(
    "ncd", "ncd_matrix", "gzip.compress x3 per pair", _make_ncd,
    lambda d: (torch.from_numpy(lmkern.ncd.ncd_matrix(d["src"], d["tgt"], d["level"])),),
    _published(True), lambda d, rows: (ref_ncd_rows(d, rows),), ncd_cases,
))


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


@dataclass
class Result:
    op: str
    shape: Shape
    dtype: str
    device: str
    error: float  # lmkern's ‖out − ref‖/‖ref‖ (max over its outputs); inf when it failed
    tolerance: float
    peer_name: str
    peer_error: float
    time_s: float
    peer_time_s: float
    failure: str | None = None

    @property
    def speedup(self) -> float:
        return self.peer_time_s / self.time_s if self.time_s > 0 else math.nan

    @property
    def ok(self) -> bool:
        return self.failure is None and self.error <= self.tolerance

    def as_dict(self) -> dict:
        """The result as JSON values: a number that is not finite (a failed or untimed case) is null."""
        def num(v):
            return v if v is None or math.isfinite(v) else None

        return {
            "op": self.op, "shape": list(self.shape), "dtype": self.dtype, "device": self.device,
            "rel_error": num(self.error), "tolerance": self.tolerance, "ok": self.ok, "peer": self.peer_name,
            "peer_rel_error": num(self.peer_error), "time_s": num(self.time_s), "peer_time_s": num(self.peer_time_s),
            "speedup": num(self.speedup), "failure": self.failure,
        }


def run_case(entry: BenchOp, shape: Shape, dtype: torch.dtype, device: str, *, quick: bool, seed: int = 0) -> Result:
    """Check one case against its reference, then time it against its peer."""
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    name = str(dtype).replace("torch.", "")
    res = Result(entry.name, shape, name, device, math.inf, TOLERANCE[dtype], entry.peer_name, math.nan, math.nan, math.nan)
    try:
        inputs = entry.make(shape, dtype, dev, gen)
        out = entry.lmkern(inputs)
        if dev.type == "cuda":
            torch.cuda.synchronize()  # a faulting kernel is reported here, at its own case
    except Exception as e:  # a failing op is a reported failure, not a crash of the whole run
        res.failure = one_line(e)
        return res
    try:
        try:
            peer_out = entry.peer(inputs)
        except Exception:
            peer_out = None
        n = shape[-1] if shape else 1
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        res.error, res.peer_error = chunked_errors(
            [out, peer_out], lambda sl: entry.reference(inputs, sl), rows, entry.reduced, n=n
        )
        del out, peer_out
        gc.collect()
        big = math.prod(shape) >= (1 << 22)
        t = interleaved(
            {"lmkern": lambda: entry.lmkern(inputs), "peer": lambda: entry.peer(inputs)},
            device,
            min_rounds=3 if quick else (5 if big else 15),
            budget_s=0.25 if quick else 1.0,
            warmup=0 if big else 3,  # big: the check above already ran both once
        )
    except Exception as e:
        res.failure = one_line(e)
        return res
    res.time_s, res.peer_time_s = t["lmkern"].median, t["peer"].median
    return res


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def cuda_broken() -> bool:
    """Whether the CUDA context is unusable (a kernel faulted: every later CUDA call fails)."""
    try:
        torch.cuda.synchronize()
        return False
    except Exception:
        return True


def fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_shape(shape: Shape) -> str:
    return "x".join(map(str, shape))


COLUMNS = ("op", "shape", "dtype", "device", "max rel err", "tol", "peer err", "time", "peer", "peer time", "speedup")


def format_row(r: Result) -> list[str]:
    err = "FAILED" if r.failure else f"{r.error:.1e}" + ("" if r.ok else " !")
    peer_err = f"{r.peer_error:.1e}" if math.isfinite(r.peer_error) else "-"
    speed = f"{r.speedup:.2f}x" if math.isfinite(r.speedup) else "-"
    return [r.op, fmt_shape(r.shape), r.dtype, r.device, err, f"{r.tolerance:.0e}", peer_err,
            fmt_time(r.time_s), r.peer_name, fmt_time(r.peer_time_s), speed]


def format_table(rows: Iterable[list[str]], columns: Sequence[str] = COLUMNS) -> str:
    rows = [list(columns)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    right = {i for i, c in enumerate(columns) if c in ("max rel err", "tol", "peer err", "time", "peer time", "speedup")}
    lines = []
    for j, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(
    devices: Sequence[str] = ("cpu",),
    *,
    quick: bool = False,
    only: str | None = None,
    echo: Callable[[str], None] | None = print,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    """Run every registered op (whose name contains `only`, if given) on `devices`.
    `progress` gets a line per case as it completes; `echo` the table and verdict at the end."""
    results = []
    for device in devices:
        broken = False
        for entry in REGISTRY:
            if only and only not in entry.name:
                continue
            for shape, dtype in entry.cases(device, quick):
                if broken:
                    r = Result(entry.name, shape, str(dtype).replace("torch.", ""), device, math.inf,
                               TOLERANCE[dtype], entry.peer_name, math.nan, math.nan, math.nan,
                               failure="not run: the CUDA context broke in an earlier case")
                    results.append(r)
                    continue
                t0 = time.perf_counter()
                r = run_case(entry, shape, dtype, device, quick=quick)
                results.append(r)
                if r.failure and device != "cpu" and cuda_broken():
                    broken = True
                    if progress:
                        progress(f"the CUDA context is broken after {r.op} {fmt_shape(r.shape)} {r.dtype}: "
                                 "the remaining CUDA cases are not run")
                if progress:
                    c = format_row(r)
                    progress(f"{c[0]} {c[1]} {c[2]} {c[3]}: err {c[4]}, {c[7]} vs {c[9]} ({c[8]}), {c[10]}  [{time.perf_counter() - t0:.1f} s]")
                gc.collect()
    if echo:
        echo("")
        echo(format_table([format_row(r) for r in results]))
        bad = [r for r in results if not r.ok]
        for r in bad:
            what = r.failure or f"error {r.error:.2e} exceeds the tolerance {r.tolerance:.0e}"
            echo(f"FAIL  {r.op} {fmt_shape(r.shape)} {r.dtype} {r.device}: {what}")
        echo(f"{len(results) - len(bad)}/{len(results)} within tolerance")
    return results
