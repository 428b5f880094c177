"""Tests of lmkern's RMSNorm / CRMSNorm family against the float64 references in tests/reference/norm.py.

Error metric: ‖out − ref‖ / ‖ref‖ in float64 (the absolute ‖out − ref‖ where ref is all zeros);
float64 ≤ 1e-12 (1e-11 for gradients), float32 ≤ 1e-5, bfloat16/float16 ≤ 1e-2. For dx the
denominator is max(‖dx_ref‖, ‖r·g‖): dx is a difference of two terms of size ‖r·g‖ that cancel when n
is small and eps ≪ mean(x²) (see dx_floor). Inputs are fresh random values from a hypothesis-drawn
seed; outputs are poisoned with NaN before a kernel writes them.

CUDA tests carry the `cuda` marker (conftest skips them unless lmkern.cuda_available()).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import lmkern
from lmkern import _core
from lmkern.ops import norm as norm_ops

from reference.norm import crms_norm_ref, norm_grads_ref, norm_rstd_ref, rms_norm_ref

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
CPU_DTYPES = [F32, F64, BF16, F16]
CUDA_DTYPES = [F32, BF16, F16]
FWD_TOL = {F64: 1e-12, F32: 1e-5, BF16: 1e-2, F16: 1e-2}
GRAD_TOL = {F64: 1e-11, F32: 1e-5, BF16: 1e-2, F16: 1e-2}
# dtype codes of lmkern._core (rust/core/src/tensor.rs DType::from_code).
CODES = {F32: 0, F64: 1, F16: 2, BF16: 3}

NORMS = {False: (lmkern.rms_norm, rms_norm_ref), True: (lmkern.crms_norm, crms_norm_ref)}
KINDS = pytest.mark.parametrize("crms", [False, True], ids=["rms", "crms"])


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def acc_dtype(dtype):
    return F64 if dtype == F64 else F32


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖/‖ref‖ in float64; the absolute error when ref is all zeros; inf if out is not finite."""
    assert tuple(out.shape) == tuple(ref.shape), f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o = out.detach().to(device="cpu", dtype=F64)
    r = ref.detach().to(device="cpu", dtype=F64)
    if not torch.isfinite(o).all():
        return math.inf
    diff = (o - r).norm().item()
    denom = r.norm().item()
    return diff if denom == 0 else diff / denom


def check(out, ref, tol, what, floor=0.0):
    """Assert rel_err(out, ref) <= tol; with `floor`, the error is relative to max(‖ref‖, floor)."""
    err = rel_err(out, ref)
    if floor and math.isfinite(err):
        denom = max(ref.detach().to(device="cpu", dtype=F64).norm().item(), floor)
        err = (out.detach().to(device="cpu", dtype=F64) - ref.detach().to(device="cpu", dtype=F64)).norm().item() / denom
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def dx_floor(h, w, eps, offset, scale, dy, crms, dh=None):
    """‖r·g‖ (+ ‖dh‖) in float64, g = dy·(offset + w)·scale: the size of the terms whose difference is dx.

    dx = r·g − (r³/d)·c·(...) cancels when eps is small next to the mean square and n is small (n = 1:
    dx ∝ eps), so float32 cannot do better than ~u·‖r·g‖ there (torch's own float32 RMSNorm neither);
    the error of dx is measured relative to max(‖dx_ref‖, this)."""
    r = norm_rstd_ref(h, eps, None, crms).to(dy.device)
    g = dy.detach().to(F64) * scale
    if w is not None:
        g = g * (offset + w.detach().to(F64))
    out = (r.unsqueeze(-1) * g).norm().item()
    return out + (0.0 if dh is None else dh.detach().to(F64).norm().item())


def randn(shape, dtype, seed, mag=1.0, mean=0.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=F64) * mag + mean * mag
    return t.to(dtype).to(device)


def core_forward(crms, x, residual, weight, eps, offset, scale, guard=16, rstd_out=True):
    """lmkern._core.norm_forward into NaN-poisoned outputs with NaN guard regions on both sides.

    Returns (y, h, rstd, guards_intact)."""
    dtype = x.dtype
    n = x.shape[-1]
    rows = x.numel() // n if n else 0

    def poisoned(shape, dt):
        numel = math.prod(shape)
        buf = torch.full((numel + 2 * guard,), math.nan, dtype=dt)
        return buf, buf[guard : guard + numel].view(shape)

    ybuf, y = poisoned(x.shape, dtype)
    hbuf, h = poisoned(x.shape, dtype) if residual is not None else (None, None)
    rbuf, rstd = poisoned(x.shape[:-1], acc_dtype(dtype)) if rstd_out else (None, None)
    _core.norm_forward(
        crms, CODES[dtype], -1, 0, rows, n, eps, offset, scale,
        x.data_ptr(), 0 if residual is None else residual.data_ptr(), 0 if weight is None else weight.data_ptr(),
        y.data_ptr(), 0 if h is None else h.data_ptr(), 0 if rstd is None else rstd.data_ptr(),
    )
    bufs = [b for b in (ybuf, hbuf, rbuf) if b is not None]
    intact = all(torch.isnan(b[:guard]).all() and torch.isnan(b[-guard:]).all() for b in bufs)
    return y, h, rstd, intact


def core_backward(crms, dy, h, weight, rstd, dh, offset, scale, weight_grad, guard=16):
    """lmkern._core.norm_backward into NaN-poisoned dx, dw_partial and dw (with guard regions)."""
    dtype = h.dtype
    n = h.shape[-1]
    rows = h.numel() // n
    dxbuf = torch.full((h.numel() + 2 * guard,), math.nan, dtype=dtype)
    dx = dxbuf[guard : guard + h.numel()].view(h.shape)
    bufs = [dxbuf]
    if weight_grad:
        parts = _core.norm_dw_parts(rows, n)
        pbuf = torch.full((parts * n + 2 * guard,), math.nan, dtype=acc_dtype(dtype))
        partial = pbuf[guard : guard + parts * n].view(parts, n)
        dwbuf = torch.full((n + 2 * guard,), math.nan, dtype=dtype)
        dw = dwbuf[guard : guard + n]
        bufs += [pbuf, dwbuf]
    else:
        parts, partial, dw = 0, None, None
    _core.norm_backward(
        crms, CODES[dtype], -1, 0, rows, n, offset, scale,
        dy.data_ptr(), h.data_ptr(), 0 if weight is None else weight.data_ptr(), rstd.data_ptr(),
        0 if dh is None else dh.data_ptr(), dx.data_ptr(),
        0 if partial is None else partial.data_ptr(), 0 if dw is None else dw.data_ptr(), parts,
    )
    intact = all(torch.isnan(b[:guard]).all() and torch.isnan(b[-guard:]).all() for b in bufs)
    return dx, dw, intact


def make_case(shape, dtype, seed, *, weight=True, residual=False, mag=1.0, mean=0.0, requires_grad=True):
    """Random x, weight, residual, dy, dh (independent seeds derived from `seed`)."""
    n = shape[-1]
    x = randn(shape, dtype, seed, mag, mean)
    w = randn((n,), dtype, seed + 1) if weight else None
    r = randn(shape, dtype, seed + 2, mag) if residual else None
    dy = randn(shape, dtype, seed + 3)
    dh = randn(shape, dtype, seed + 4) if residual else None
    if requires_grad:
        for t in (x, w, r):
            if t is not None:
                t.requires_grad_(True)
    return x, w, r, dy, dh


def run_and_check(crms, x, w, r, dy, dh, eps, offset, scale, *, check_grads=True):
    """Forward and backward through the public API, each output against the float64 reference."""
    fn, ref = NORMS[crms]
    dtype = x.dtype
    out = fn(x, w, eps, residual=r, offset=offset, scale=scale)
    ref_out = ref(x, w, eps, r, offset, scale)
    if r is None:
        y, y_ref = out, ref_out
        assert isinstance(y, torch.Tensor)
    else:
        (y, h), (y_ref, _) = out, ref_out
        assert h.dtype == dtype and h.shape == x.shape
        # h is x + residual rounded to x's dtype, exactly as torch computes it.
        assert torch.equal(h, x.detach() + r.detach()), "h differs from x + residual"
    assert y.dtype == dtype and y.shape == x.shape
    check(y, y_ref, FWD_TOL[dtype], "y")
    # Without autograd the public functions skip the dispatcher: the same kernel, the same bits.
    with torch.no_grad():
        out_ng = fn(x, w, eps, residual=r, offset=offset, scale=scale)
    for a, b, what in zip(out_ng if r is not None else (out_ng,), out if r is not None else (out,), ("y", "h")):
        assert torch.equal(a, b), f"{what} without grad differs from {what} with grad"
    if not check_grads:
        return
    loss = (y * dy).sum() if r is None else (y * dy).sum() + (h * dh).sum()
    leaves = [t for t in (x, w, r) if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = norm_grads_ref(x, w, eps, r, offset, scale, dy=dy, dh=dh, crms=crms)
    h_in = x.detach() if r is None else (x.detach() + r.detach())
    floor = dx_floor(h_in, w, eps, offset, scale, dy, crms, dh)
    for name, g in zip(["x", "weight", "residual"] if w is not None else ["x", "residual"], grads):
        leaf = {"x": x, "weight": w, "residual": r}[name]
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        check(g, ref_grads[name], GRAD_TOL[dtype], f"d{name}", floor=0.0 if name == "weight" else floor)


# ------------------------------------------------------------------------------------------------
# hypothesis: shapes, dtypes and options against the reference
# ------------------------------------------------------------------------------------------------
SPECIAL_N = [1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 257, 509, 511, 1021,
             1024, 1031, 2039, 2048, 2053, 4093, 4096]


@st.composite
def norm_cases(draw, max_elems=120_000):
    dtype = draw(st.sampled_from(CPU_DTYPES))
    n = draw(st.one_of(st.integers(1, 48), st.sampled_from(SPECIAL_N), st.integers(1, 4100)))
    k = draw(st.integers(0, 3))
    cap = max(1, min(8, int((max_elems / n) ** (1.0 / k)))) if k else 1
    lead = tuple(draw(st.lists(st.integers(0, cap), min_size=k, max_size=k)))
    offset = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(-2.0, 2.0)))
    scale = draw(st.one_of(st.just(1.0), st.floats(0.1, 3.0).flatmap(lambda v: st.sampled_from([v, -v]))))
    eps = draw(st.one_of(st.sampled_from([1e-6, 1e-5]), st.floats(0.0, 1e-2)))
    return dict(
        shape=lead + (n,),
        dtype=dtype,
        seed=draw(st.integers(0, 2**31 - 1)),
        mag=draw(st.sampled_from([1e-2, 1.0, 30.0])),
        mean=draw(st.sampled_from([0.0, 0.0, 1.0])),
        weight=draw(st.booleans()),
        residual=draw(st.booleans()),
        offset=offset,
        scale=scale,
        eps=eps,
    )


@KINDS
@given(case=norm_cases())
def test_matches_reference(crms, case):
    x, w, r, dy, dh = make_case(
        case["shape"], case["dtype"], case["seed"], weight=case["weight"], residual=case["residual"],
        mag=case["mag"], mean=case["mean"],
    )
    run_and_check(crms, x, w, r, dy, dh, case["eps"], case["offset"], case["scale"])


@KINDS
@pytest.mark.parametrize(
    "shape,dtype,residual",
    [
        ((2, 262144), F32, False),  # huge rows
        ((2, 262144), BF16, True),
        ((1, 262147), F16, False),  # huge odd row
        ((520, 4096), F32, True),  # y and h ≥ 8 MiB: the streaming-store path
        ((100_003, 3), F32, True),  # many tiny rows: 512 weight-gradient parts
    ],
    ids=["f32-2x262144", "bf16-2x262144-res", "f16-1x262147", "f32-520x4096-res-stream", "f32-100003x3-res"],
)
def test_large_matches_reference(crms, shape, dtype, residual):
    x, w, r, dy, dh = make_case(shape, dtype, 1234, weight=True, residual=residual, mean=0.3)
    run_and_check(crms, x, w, r, dy, dh, 1e-5, 0.25, 0.75)


@KINDS
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,), (2, 0, 4), (0, 0)])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "res"])
def test_empty(crms, shape, residual):
    fn, _ = NORMS[crms]
    x, w, r, dy, dh = make_case(shape, F32, 7, weight=True, residual=residual)
    out = fn(x, w, 1e-5, residual=r)
    y = out if r is None else out[0]
    assert y.shape == x.shape and y.dtype == x.dtype
    loss = y.sum() if r is None else y.sum() + out[1].sum()
    loss.backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert torch.equal(w.grad, torch.zeros_like(w))  # no rows: dw is a sum over nothing


@KINDS
@pytest.mark.parametrize("shape", [(3, 0), (0,)])
def test_empty_row_rstd(crms, shape):
    """rstd of an empty row: mean taken as 0, so eps^-1/2 (the op's documented convention)."""
    op = torch.ops.lmkern.crms_norm if crms else torch.ops.lmkern.rms_norm
    y, rstd = op(torch.randn(shape), None, 0.25, 0.0, 1.0)
    assert rstd.shape == shape[:-1] and torch.equal(rstd, torch.full(shape[:-1], 2.0))


# ------------------------------------------------------------------------------------------------
# poisoning: every output element is written (and nothing around it)
# ------------------------------------------------------------------------------------------------
POISON_SHAPES = [(1, 1), (7, 33), (3, 4099), (40, 1024), (33, 2048)]


@KINDS
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", POISON_SHAPES, ids=str)
def test_core_writes_every_output(crms, dtype, shape):
    x, w, r, dy, dh = make_case(shape, dtype, 99, weight=True, residual=True, requires_grad=False)
    eps, offset, scale = 1e-5, 0.5, 1.5
    _, ref = NORMS[crms]
    for res in (None, r):
        y, h, rstd, intact = core_forward(crms, x, res, w, eps, offset, scale)
        assert intact, "forward wrote outside its outputs"
        assert torch.isfinite(y).all() and torch.isfinite(rstd).all()
        hin = x if res is None else h
        if res is not None:
            assert torch.isfinite(h).all() and torch.equal(h, x + res)
        check(y, ref(hin, w, eps, None, offset, scale), FWD_TOL[dtype], "y")
        check(rstd, norm_rstd_ref(x, eps, res, crms), FWD_TOL[dtype] if dtype in (F32, F64) else 1e-5, "rstd")
        # rstd is optional (inference): the same y and h without it
        y0, h0, _, intact = core_forward(crms, x, res, w, eps, offset, scale, rstd_out=False)
        assert intact and torch.equal(y0, y) and (res is None or torch.equal(h0, h))
        for weight_grad in (True, False):
            dx, dw, intact = core_backward(crms, dy, hin, w, rstd, dh if res is not None else None, offset, scale,
                                           weight_grad)
            assert intact, "backward wrote outside its outputs"
            assert torch.isfinite(dx).all()
            g = norm_grads_ref(hin, w, eps, None, offset, scale, dy=dy, crms=crms)
            exp_dx = g["x"] + (dh.to(F64) if res is not None else 0)
            floor = dx_floor(hin, w, eps, offset, scale, dy, crms, dh if res is not None else None)
            check(dx, exp_dx, GRAD_TOL[dtype], "dx", floor=floor)
            if weight_grad:
                assert torch.isfinite(dw).all()
                check(dw, g["weight"], GRAD_TOL[dtype], "dw")


@KINDS
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_core_streaming_path_writes_every_output(crms, dtype):
    # [520, 4096] float32 (8.5 MB per output) and [1040, 4096] bfloat16: past the 8 MiB streaming threshold.
    shape = (520, 4096) if dtype == F32 else (1040, 4096)
    x, w, r, _, _ = make_case(shape, dtype, 5, weight=True, residual=True, requires_grad=False)
    _, ref = NORMS[crms]
    for res in (None, r):
        y, h, rstd, intact = core_forward(crms, x, res, w, 1e-6, 0.0, 1.0)
        assert intact
        y0, h0, _, intact0 = core_forward(crms, x, res, w, 1e-6, 0.0, 1.0, rstd_out=False)
        assert intact0 and torch.equal(y0, y) and (res is None or torch.equal(h0, h))
        assert torch.isfinite(y).all() and torch.isfinite(rstd).all()
        if res is not None:
            assert torch.equal(h, x + res)
        check(y, ref(x, w, 1e-6, res, 0.0, 1.0)[0] if res is not None else ref(x, w, 1e-6), FWD_TOL[dtype], "y")


@KINDS
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_public_api_writes_every_output(crms, dtype, monkeypatch):
    """The full path (custom op or direct call, torch allocation, kernel) with every torch allocator the
    Python layer may use returning NaN-filled memory."""
    x, w, r, dy, dh = make_case((9, 77), dtype, 3, weight=True, residual=True)
    poisoned = []

    def poisoning(real):
        def alloc(*args, **kwargs):
            t = real(*args, **kwargs)
            if t.is_floating_point() and t.numel():
                t.fill_(math.nan)
                poisoned.append(t.numel())
            return t

        return alloc

    fn, ref = NORMS[crms]
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", poisoning(torch.empty))
        m.setattr(torch, "empty_like", poisoning(torch.empty_like))
        m.setattr(torch.Tensor, "new_empty", poisoning(torch.Tensor.new_empty))
        y, h = fn(x, w, 1e-5, residual=r, offset=0.5, scale=2.0)
        gx, gw, gr = torch.autograd.grad((y * dy).sum() + (h * dh).sum(), [x, w, r])
        y2 = fn(x, w, 1e-5, offset=0.5, scale=2.0)
        gx2, gw2 = torch.autograd.grad((y2 * dy).sum(), [x, w])
        n_grad = len(poisoned)
        with torch.no_grad():
            y3, h3 = fn(x, w, 1e-5, residual=r, offset=0.5, scale=2.0)
            y4 = fn(x, w, 1e-5, offset=0.5, scale=2.0)
        n_nograd = len(poisoned) - n_grad
    # the outputs came from poisoned allocations (else this test would check nothing)
    assert n_grad >= 8 and n_nograd >= 3, f"only {n_grad} + {n_nograd} allocations were poisoned"
    check(y, ref(x, w, 1e-5, r, 0.5, 2.0)[0], FWD_TOL[dtype], "y")
    check(y2, ref(x, w, 1e-5, None, 0.5, 2.0), FWD_TOL[dtype], "y (no residual)")
    assert torch.equal(h, x.detach() + r.detach())
    for a, b in ((y3, y), (h3, h), (y4, y2)):
        assert torch.equal(a, b), "no-grad (direct) path differs"
    g = norm_grads_ref(x, w, 1e-5, r, 0.5, 2.0, dy=dy, dh=dh, crms=crms)
    for got, name in ((gx, "x"), (gw, "weight"), (gr, "residual")):
        check(got, g[name], GRAD_TOL[dtype], f"d{name}")
    g2 = norm_grads_ref(x, w, 1e-5, None, 0.5, 2.0, dy=dy, crms=crms)
    check(gx2, g2["x"], GRAD_TOL[dtype], "dx (no residual)")
    check(gw2, g2["weight"], GRAD_TOL[dtype], "dw (no residual)")


def _assert_same_bits(got, want, what):
    nan_g, nan_w = torch.isnan(got), torch.isnan(want)
    assert torch.equal(nan_g, nan_w), f"{what}: NaN positions differ"
    gi, wi = got[~nan_g].view(torch.int16), want[~nan_w].view(torch.int16)
    bad = (gi != wi).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} values differ from torch, e.g. {got[~nan_g][bad[:4]].tolist()} "
        f"instead of {want[~nan_w][bad[:4]].tolist()}"
    )


def _all_half_values(dtype):
    """Every 16-bit pattern of dtype, as 4 tensors of [64, 256] (each small enough for the caller's thread)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    return bits.view(dtype).reshape(4, 64, 256)


@KINDS
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_half_loads_and_stores_are_exact(crms, dtype):
    """h = x + residual over every 16-bit pattern of x equals torch's x + residual bit for bit
    (exercises the kernels' float16/bfloat16 → float32 loads and round-to-nearest-even stores)."""
    fn, _ = NORMS[crms]
    for i, x in enumerate(_all_half_values(dtype)):
        for r in (torch.zeros_like(x), randn(x.shape, dtype, i, mag=1e-3), randn(x.shape, dtype, i + 9, mag=300.0)):
            _, h = fn(x, None, 1e-5, residual=r)
            _assert_same_bits(h, x + r, f"h = x + residual, {dtype}")


@KINDS
def test_float16_subnormals_survive_flush_denormal(crms):
    """torch.set_flush_denormal(True) sets FTZ/DAZ on the calling thread. float16 subnormals are normal
    float32 values, so torch keeps them (x + 0 == x); lmkern's float16 kernels must too."""
    fn, ref = NORMS[crms]
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        for x in _all_half_values(F16):
            _, h = fn(x, None, 1e-5, residual=torch.zeros_like(x))
            _assert_same_bits(h, x + torch.zeros_like(x), "h = x + 0 under flush_denormal")
        xs = torch.tensor([[1e-6, 3e-5, 2e-5, 5e-5]], dtype=F16)  # a row of float16 subnormals
        y = fn(xs, None, 0.0)
    finally:
        torch.set_flush_denormal(False)
    check(y, ref(xs, None, 0.0), 1e-2, "y of a subnormal row under flush_denormal")


@KINDS
def test_rstd_output_matches_reference(crms):
    op = torch.ops.lmkern.crms_norm if crms else torch.ops.lmkern.rms_norm
    op_r = torch.ops.lmkern.crms_norm_residual if crms else torch.ops.lmkern.rms_norm_residual
    for dtype in CPU_DTYPES:
        x, w, r, _, _ = make_case((5, 3, 67), dtype, 11, residual=True, requires_grad=False, mean=0.5)
        _, rstd = op(x, w, 1e-5, 0.0, 1.0)
        assert rstd.dtype == acc_dtype(dtype) and rstd.shape == x.shape[:-1]
        check(rstd, norm_rstd_ref(x, 1e-5, None, crms), 1e-12 if dtype == F64 else 1e-6, f"rstd {dtype}")
        _, h, rstd = op_r(x, r, w, 1e-5, 0.0, 1.0)
        check(rstd, norm_rstd_ref(x, 1e-5, r, crms), 1e-12 if dtype == F64 else 1e-6, f"rstd residual {dtype}")


# ------------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------------
def _layouts(rows, n, dtype, seed):
    """(name, non-contiguous x) pairs, each a view of fresh random data."""
    a = randn((n, rows), dtype, seed).t()  # transposed
    b = randn((rows, 2 * n + 1), dtype, seed + 1)[:, 1::2]  # sliced with a step and an offset
    c = randn((2, rows, n), dtype, seed + 2).permute(1, 0, 2)  # permuted leading dims
    d = randn((rows, n + 3), dtype, seed + 3)[:, 2 : n + 2]  # row stride ≠ n, misaligned start
    return [("transposed", a), ("step", b), ("permuted", c), ("offset", d)]


@KINDS
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_non_contiguous_inputs(crms, dtype):
    fn, _ = NORMS[crms]
    rows, n = 6, 37
    for name, xv in _layouts(rows, n, dtype, 21):
        shape = tuple(xv.shape)
        rev = list(reversed(range(len(shape))))
        wv = randn((2 * shape[-1],), dtype, 5)[::2]  # strided weight
        rv = randn(tuple(reversed(shape)), dtype, 6).permute(*rev)  # reversed strides
        dyv = randn(tuple(reversed(shape)), dtype, 7).permute(*rev)
        dhv = randn(shape, dtype, 8)
        for t in (xv, wv, rv, dyv):
            assert not t.is_contiguous(), name
        results = []
        for xx, ww, rr, dy in ((xv, wv, rv, dyv), (xv.contiguous(), wv.contiguous(), rv.contiguous(), dyv.contiguous())):
            xx, ww, rr = (t.detach().requires_grad_(True) for t in (xx, ww, rr))
            y1 = fn(xx, ww, 1e-5, offset=0.5, scale=1.5)
            y2, h2 = fn(xx, ww, 1e-5, residual=rr, offset=0.5, scale=1.5)
            grads = torch.autograd.grad((y1 * dy).sum() + (y2 * dy).sum() + (h2 * dhv).sum(), [xx, ww, rr])
            results.append((y1, y2, h2) + tuple(grads))
        for got, want, what in zip(results[0], results[1], ["y", "y_res", "h", "dx", "dw", "dres"]):
            assert torch.equal(got, want), f"{name}: {what} differs from the contiguous computation"


@KINDS
def test_expanded_residual_and_broadcast_dy(crms):
    fn, ref = NORMS[crms]
    rows, n = 5, 41
    x = randn((rows, n), F32, 1).requires_grad_(True)
    w = randn((n,), F32, 2).requires_grad_(True)
    r_row = randn((n,), F32, 3).requires_grad_(True)
    r = r_row.expand(rows, n)
    assert r.stride() == (0, 1)
    y, h = fn(x, w, 1e-5, residual=r, offset=1.0, scale=0.5)
    r_full = r.detach().contiguous()
    y_ref, _ = ref(x, w, 1e-5, r_full, 1.0, 0.5)
    check(y, y_ref, FWD_TOL[F32], "y")
    assert torch.equal(h, x.detach() + r_full)
    # y.sum() hands the backward an expanded (stride-0) dy.
    (y.sum() + h.sum()).backward()
    g = norm_grads_ref(x, w, 1e-5, r_full, 1.0, 0.5, dy=torch.ones(rows, n), dh=torch.ones(rows, n), crms=crms)
    check(x.grad, g["x"], GRAD_TOL[F32], "dx")
    check(w.grad, g["weight"], GRAD_TOL[F32], "dw")
    check(r_row.grad, g["residual"].sum(0), GRAD_TOL[F32], "d residual row")


# ------------------------------------------------------------------------------------------------
# determinism across thread counts
# ------------------------------------------------------------------------------------------------
@KINDS
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("shape", [(300, 1000), (1000, 97), (3, 70000)], ids=str)
def test_deterministic_across_threads(crms, dtype, shape, num_threads):
    fn, _ = NORMS[crms]
    x, w, r, dy, dh = make_case(shape, dtype, 17, weight=True, residual=True)

    w64 = w.detach().to(F64).requires_grad_(True)  # a weight of another dtype: its dw summed by torch

    def run():
        y, h = fn(x, w, 1e-5, residual=r, offset=0.25, scale=1.25)
        y1 = fn(x, w, 1e-5)
        y2 = fn(x, w64, 1e-5, scale=0.5)
        loss = (y * dy).sum() + (h * dh).sum() + (y1 * dy).sum() + (y2 * dy).sum()
        grads = torch.autograd.grad(loss, [x, w, r, w64])
        return (y, h, y1) + tuple(grads)

    outs = {}
    torch_threads = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 1):
            lmkern.set_num_threads(threads)
            torch.set_num_threads(threads)
            assert lmkern.get_num_threads() == threads
            outs.setdefault(threads, []).append(run())
    finally:
        torch.set_num_threads(torch_threads)
    base = outs[1][0]
    for threads, runs in outs.items():
        for res in runs:
            for got, want, what in zip(res, base, ["y", "h", "y_plain", "dx", "dw", "dres", "dw (float64 weight)"]):
                assert torch.equal(got, want), f"{what} with {threads} threads differs from 1 thread"


@KINDS
def test_concurrent_python_threads(crms, num_threads):
    """Calls from several Python threads at once (the GIL is released in the kernels) give the serial results."""
    from concurrent.futures import ThreadPoolExecutor

    fn, _ = NORMS[crms]
    cases = [make_case((64 + 7 * i, 515), F32, 100 + i, residual=True) for i in range(6)]

    def run(case):
        x, w, r, dy, dh = case
        y, h = fn(x, w, 1e-5, residual=r, offset=0.5)
        return (y, h) + torch.autograd.grad((y * dy).sum() + (h * dh).sum(), [x, w, r])

    lmkern.set_num_threads(2)
    serial = [run(c) for c in cases]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(run, cases * 2))
    for i, res in enumerate(parallel):
        for got, want in zip(res, serial[i % len(cases)]):
            assert torch.equal(got, want), f"case {i % len(cases)} differs when run concurrently"


@KINDS
def test_inference_mode_and_no_grad(crms):
    fn, ref = NORMS[crms]
    x, w, r, _, _ = make_case((3, 20), F32, 4, residual=True, requires_grad=False)
    for ctx in (torch.inference_mode, torch.no_grad):
        with ctx():
            y, h = fn(x, w, 1e-5, residual=r)
        check(y, ref(x, w, 1e-5, r)[0], 1e-5, f"y under {ctx.__name__}")


@KINDS
def test_inplace_refuses_inference_tensors_outside_inference_mode(crms):
    """As torch's own in-place ops: an inference tensor may be updated in place only under
    inference_mode (it has no version counter to tell autograd)."""
    inplace = lmkern.crms_norm_ if crms else lmkern.rms_norm_
    with torch.inference_mode():
        x, r = torch.randn(3, 16), torch.randn(3, 16)
    before = x.clone()
    with pytest.raises(RuntimeError, match="x is an inference tensor"):
        inplace(x)
    with pytest.raises(RuntimeError, match="residual is an inference tensor"):
        inplace(torch.randn(3, 16), residual=r)
    assert torch.equal(x, before)
    with torch.inference_mode():
        inplace(x, residual=r)
    assert not torch.equal(x, before)


def test_set_num_threads_rejects_bad_counts(num_threads):
    for bad in (0, -3, lmkern.MAX_THREADS + 1, 2**31):  # the pool would start them all: 100,000 hung
        with pytest.raises(ValueError, match=f"threads: expected a count from 1 to {lmkern.MAX_THREADS}; got {bad}"):
            lmkern.set_num_threads(bad)
    for bad in (1.5, True, "2"):
        with pytest.raises(TypeError, match="threads: expected an int"):
            lmkern.set_num_threads(bad)
    assert lmkern.get_num_threads() == num_threads


# ------------------------------------------------------------------------------------------------
# in place (rms_norm_ / crms_norm_): inference-only fused add-norm writing into x and residual
# ------------------------------------------------------------------------------------------------
INPLACE = {False: lmkern.rms_norm_, True: lmkern.crms_norm_}


@KINDS
@given(case=norm_cases(max_elems=40_000))
def test_inplace_matches_reference_and_out_of_place(crms, case):
    x, w, r, _, _ = make_case(
        case["shape"], case["dtype"], case["seed"], weight=case["weight"], residual=case["residual"],
        mag=case["mag"], mean=case["mean"], requires_grad=False,
    )
    fn, ref = NORMS[crms]
    eps, offset, scale = case["eps"], case["offset"], case["scale"]
    want = fn(x, w, eps, residual=r, offset=offset, scale=scale)
    y_ref = ref(x, w, eps, r, offset, scale)
    xi, ri = x.clone(), None if r is None else r.clone()
    out = INPLACE[crms](xi, w, eps, residual=ri, offset=offset, scale=scale)
    if r is None:
        assert out is xi
        _assert_same_bits(xi, want, "y")
        check(xi, y_ref, FWD_TOL[x.dtype], "y")
    else:
        assert out[0] is xi and out[1] is ri
        _assert_same_bits(xi, want[0], "y")
        _assert_same_bits(ri, want[1], "h")
        assert torch.equal(ri, x + r)
        check(xi, y_ref[0], FWD_TOL[x.dtype], "y")


@KINDS
def test_inplace_large_streaming_rows(crms):
    # Large enough that the out-of-place kernel streams its outputs; in place must give the same bits.
    x, w, r, _, _ = make_case((600, 4096), F32, 77, residual=True, requires_grad=False)
    fn, _ = NORMS[crms]
    y, h = fn(x, w, residual=r)
    xi, ri = x.clone(), r.clone()
    INPLACE[crms](xi, w, residual=ri)
    _assert_same_bits(xi, y, "y")
    _assert_same_bits(ri, h, "h")


def _inplace_weight_inside(crms, device, dtype):
    """A weight that is a row of x or of residual (a view into what the in-place norm overwrites)
    gives the out-of-place values, computed from the weight as it was before the call."""
    fn = NORMS[crms][0]
    x, _, r, _, _ = make_case((37, 256), dtype, 52, residual=True, requires_grad=False)
    x, r = x.to(device), r.to(device)
    for where in ("x", "residual"):
        for residual in (True, False):
            if where == "residual" and not residual:
                continue
            xi, ri = x.clone(), r.clone()
            w = (xi if where == "x" else ri)[5]
            want = fn(x, w.clone(), 1e-5, residual=r if residual else None, offset=0.5)
            INPLACE[crms](xi, w, 1e-5, residual=ri if residual else None, offset=0.5)
            if residual:
                _assert_same_bits(xi, want[0], f"y, weight in {where}")
                _assert_same_bits(ri, want[1], f"h, weight in {where}")
            else:
                _assert_same_bits(xi, want, f"y, weight in {where}")


@KINDS
def test_inplace_weight_inside_x_or_residual(crms):
    _inplace_weight_inside(crms, "cpu", F32)


@KINDS
def test_inplace_refuses_grad_noncontiguous_and_overlap(crms):
    fn = INPLACE[crms]
    x = randn((4, 8), F32, 1).requires_grad_(True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        fn(x)
    with torch.no_grad():
        fn(x.detach().clone())  # fine without grad mode
    with pytest.raises(ValueError, match="x: .*contiguous"):
        fn(randn((8, 4), F32, 2).t())
    with pytest.raises(ValueError, match="residual: .*contiguous"):
        fn(randn((4, 8), F32, 2), residual=randn((8, 4), F32, 3).t())
    buf = randn((2, 4, 8), F32, 4)
    with pytest.raises(ValueError, match="overlap"):
        fn(buf[0], residual=buf[0])
    with pytest.raises(ValueError, match="residual: expected shape"):
        fn(randn((4, 8), F32, 2), residual=randn((4, 9), F32, 3))
    with pytest.raises(TypeError, match="residual"):
        fn(randn((4, 8), F32, 2), residual=[1.0])


@KINDS
def test_inplace_bumps_version_so_saved_tensors_are_checked(crms):
    # x saved by another op for its backward, then overwritten in place: autograd must notice.
    w = torch.randn(8, requires_grad=True)
    x = torch.randn(4, 8)
    loss = (x * w).sum()
    INPLACE[crms](x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@KINDS
def test_inplace_ops_called_directly_act_as_torch_inplace_ops(crms):
    """torch.ops.lmkern.*_inplace (what rms_norm_ calls under compile and modes): inputs that require
    grad are refused while grad mode is on (the op has no derivative), and the written tensors'
    version counters move, so a graph that saved them refuses to run backward."""
    name = "crms_norm" if crms else "rms_norm"
    op = getattr(torch.ops.lmkern, f"{name}_inplace")
    op_res = getattr(torch.ops.lmkern, f"{name}_residual_inplace")
    leaf = randn((4, 8), F32, 1).requires_grad_(True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        op(leaf * 1, None, 1e-6, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="not differentiable"):
        op_res(randn((4, 8), F32, 2), leaf, None, 1e-6, 0.0, 1.0)
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="not differentiable"):
        op(randn((4, 8), F32, 3), leaf[0], 1e-6, 0.0, 1.0)  # a weight that requires grad too
    assert torch.equal(leaf.detach(), before)
    with torch.no_grad():
        op(leaf.detach().clone(), None, 1e-6, 0.0, 1.0)  # fine without grad mode
    for through_mode in (False, True):
        w = torch.randn(8, requires_grad=True)
        x, r = randn((4, 8), F32, 4), randn((4, 8), F32, 5)
        loss = (x * w).sum() + (r * w).sum()
        v = (x._version, r._version)
        if through_mode:  # a function mode sends the public function through the op
            with torch.device("cpu"):
                INPLACE[crms](x, residual=r)
        else:
            op_res(x, r, None, 1e-6, 0.0, 1.0)
        assert x._version > v[0] and r._version > v[1]
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("which", ["x", "weight", "residual"])
@KINDS
def test_negative_bit_views_are_read_as_their_values(crms, which):
    """A lazily negated view (torch._neg_view; what `t.conj().imag` gives) keeps the un-negated
    values in memory: the kernels must see the values the view stands for, as torch's ops do."""
    x, w, r, _, _ = make_case((3, 17), F32, 12, residual=True, requires_grad=False)
    args = {"x": x, "weight": w, "residual": r}
    args[which] = torch._neg_view(-args[which])
    assert args[which].is_neg() and args[which].is_contiguous()
    fn = NORMS[crms][0]
    got, want = fn(args["x"], args["weight"], 1e-5, residual=args["residual"]), fn(x, w, 1e-5, residual=r)
    _assert_same_bits(got[0], want[0], "y")
    _assert_same_bits(got[1], want[1], "h")
    if which != "residual":
        _assert_same_bits(fn(args["x"], args["weight"], 1e-5), fn(x, w, 1e-5), "y without residual")


@KINDS
def test_inplace_op_through_dispatcher(crms):
    name = "crms_norm" if crms else "rms_norm"
    op = getattr(torch.ops.lmkern, f"{name}_inplace")
    op_res = getattr(torch.ops.lmkern, f"{name}_residual_inplace")
    x, w, r, _, _ = make_case((5, 33), F32, 9, residual=True, requires_grad=False)
    y, h = NORMS[crms][0](x, w, 1e-5, residual=r)
    xi, ri = x.clone(), r.clone()
    op_res(xi, ri, w, 1e-5, 0.0, 1.0)
    _assert_same_bits(xi, y, "y")
    _assert_same_bits(ri, h, "h")
    y1 = NORMS[crms][0](x, w, 1e-5)
    xi = x.clone()
    op(xi, w, 1e-5, 0.0, 1.0)
    _assert_same_bits(xi, y1, "y without residual")
    samples = [
        (op_res, (randn((4, 33), F32, 1), randn((4, 33), F32, 2), randn((33,), F32, 3), 1e-5, 0.0, 1.0)),
        (op, (randn((2, 3, 17), BF16, 4), None, 1e-6, 1.0, 0.5)),
        (op, (randn((4, 33), F32, 5), randn((33,), F32, 6), 1e-5, 0.0, 1.0)),
    ]
    for o, args in samples:
        result = torch.library.opcheck(o.default, args)
        assert all(v == "SUCCESS" for v in result.values()), result

    def f(x, r):
        x2, r2 = x * 2, r + 1
        op_res(x2, r2, None, 1e-6, 0.0, 1.0)
        op(r2, None, 1e-5, 0.5, 1.0)
        return x2, r2

    xa, ra = randn((4, 33), F32, 5), randn((4, 33), F32, 6)
    got = torch.compile(f, fullgraph=True)(xa, ra)
    want = f(xa, ra)
    _assert_same_bits(got[0], want[0], "y")
    _assert_same_bits(got[1], want[1], "h")


@KINDS
def test_inplace_under_allow_mutation_on_saved_tensors(crms):
    """torch's allow_mutation_on_saved_tensors clones every mutable argument of an op (it used to
    fail on the optional residual when none was given): both forms work and give the eager bits."""
    inplace = INPLACE[crms]
    x, w, r, _, _ = make_case((5, 33), F32, 11, residual=True, requires_grad=False)
    want1 = inplace(x.clone(), w, 1e-5)
    want2 = inplace(x.clone(), w, 1e-5, residual=r.clone())
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        got1 = inplace(x.clone(), w, 1e-5)
        got2 = inplace(x.clone(), w, 1e-5, residual=r.clone())
    _assert_same_bits(got1, want1, "x without residual")
    _assert_same_bits(got2[0], want2[0], "x")
    _assert_same_bits(got2[1], want2[1], "residual")


@KINDS
def test_inplace_public_function_under_compile_fullgraph(crms):
    """The public rms_norm_ / crms_norm_ (not only their ops) compile in one graph: their
    inference-tensor checks are skipped while compiling. Same bits as eager."""
    inplace = INPLACE[crms]

    def f(x, r, w):
        x2, r2 = x * 2, r + 1
        inplace(x2, w, 1e-5, residual=r2, offset=0.5)
        inplace(r2, None, 1e-6)
        return x2, r2

    x, w, r, _, _ = make_case((4, 33), F32, 7, residual=True, requires_grad=False)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, r, w)
    want = f(x, r, w)
    _assert_same_bits(got[0], want[0], "x")
    _assert_same_bits(got[1], want[1], "residual")


# ------------------------------------------------------------------------------------------------
# torch.library.opcheck, gradcheck, torch.compile
# ------------------------------------------------------------------------------------------------
def _fwd_samples():
    out = []
    for dtype in (F32, BF16):
        x = randn((4, 33), dtype, 1).requires_grad_(True)
        w = randn((33,), dtype, 2).requires_grad_(True)
        x3 = randn((2, 3, 17), dtype, 3).requires_grad_(True)
        out.append((x, w, 1e-5, 0.0, 1.0))
        out.append((x3, None, 1e-6, 1.0, 0.5))
        out.append((x.detach(), w.detach(), 1e-5, 0.5, 2.0))  # nothing requires grad
    # bfloat16 x with a float32 (master) weight
    out.append((randn((4, 33), BF16, 7).requires_grad_(True), randn((33,), F32, 8).requires_grad_(True), 1e-5, 0.5, 1.5))
    return out


def _residual_samples():
    out = []
    for dtype in (F32, BF16):
        x = randn((4, 33), dtype, 1).requires_grad_(True)
        r = randn((4, 33), dtype, 4).requires_grad_(True)
        w = randn((33,), dtype, 2).requires_grad_(True)
        out.append((x, r, w, 1e-5, 0.0, 1.0))
        out.append((x, r.detach(), None, 1e-6, 1.0, 0.5))
        out.append((randn((2, 3, 17), dtype, 5), randn((2, 3, 17), dtype, 6).requires_grad_(True), None, 1e-5, 0.0, 1.0))
    return out


def _backward_samples(crms):
    op = torch.ops.lmkern.crms_norm if crms else torch.ops.lmkern.rms_norm
    out = []
    for dtype in (F32, BF16):
        x = randn((4, 33), dtype, 1)
        w = randn((33,), dtype, 2)
        dy = randn((4, 33), dtype, 3)
        dh = randn((4, 33), dtype, 4)
        _, rstd = op(x, w, 1e-5, 0.5, 1.5)
        out.append((dy, x, w, rstd, None, 0.5, 1.5, True))
        out.append((dy, x, w, rstd, dh, 0.5, 1.5, True))
        out.append((dy, x, w, rstd, None, 0.0, 1.0, False))
        _, rstd = op(x, None, 1e-5, 0.0, 1.0)
        out.append((dy, x, None, rstd, dh, 0.0, 1.0, False))
    x, dy, w32 = randn((4, 33), BF16, 1), randn((4, 33), BF16, 3), randn((33,), F32, 2)
    _, rstd = op(x, w32, 1e-5, 0.5, 1.5)
    out.append((dy, x, w32, rstd, None, 0.5, 1.5, True))  # its dw float32
    return out


@KINDS
@pytest.mark.parametrize("form", ["plain", "residual", "backward"])
def test_opcheck(crms, form):
    name = "crms_norm" if crms else "rms_norm"
    if form == "plain":
        op, samples = getattr(torch.ops.lmkern, name), _fwd_samples()
    elif form == "residual":
        op, samples = getattr(torch.ops.lmkern, f"{name}_residual"), _residual_samples()
    else:
        op, samples = getattr(torch.ops.lmkern, f"{name}_backward"), _backward_samples(crms)
    for args in samples:
        result = torch.library.opcheck(op.default, args)
        assert all(v == "SUCCESS" for v in result.values()), result


@pytest.fixture(params=["eager", "op"])
def autograd_path(request, monkeypatch):
    """Run a gradient test through both autograd paths of the public functions: the eager
    torch.autograd.Function and the custom ops' registered autograd (forced by declaring every call
    not eager-safe, as under torch.compile or a dispatch mode)."""
    if request.param == "op":
        monkeypatch.setattr(norm_ops, "_eager_ok", lambda *args: False)
    return request.param


@KINDS
def test_gradcheck(crms, autograd_path):
    fn, _ = NORMS[crms]
    x = randn((3, 7), F64, 1).requires_grad_(True)
    w = randn((7,), F64, 2).requires_grad_(True)
    r = randn((3, 7), F64, 3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, r: fn(x, w, 1e-3, residual=r, offset=0.5, scale=0.7), (x, w, r))
    assert torch.autograd.gradcheck(lambda x, w: fn(x, w, 1e-3, offset=-0.3, scale=1.3), (x, w))
    assert torch.autograd.gradcheck(lambda x: fn(x, None, 0.0, scale=-0.5), (x,))
    x4 = randn((2, 2, 1, 5), F64, 4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, r: fn(x, None, 1e-5, residual=r), (x4, randn((2, 2, 1, 5), F64, 5).requires_grad_(True)))


@KINDS
def test_grad_of_one_input_only(crms, autograd_path):
    """needs_input_grad paths: only the weight, only x, only the residual."""
    fn, _ = NORMS[crms]
    x, w, r, dy, dh = make_case((6, 19), F32, 8, weight=True, residual=True, requires_grad=False)
    g = norm_grads_ref(x, w, 1e-5, r, 0.5, 1.0, dy=dy, dh=dh, crms=crms)
    g_plain = norm_grads_ref(x, w, 1e-5, None, 0.5, 1.0, dy=dy, crms=crms)
    for leaf_name in ("x", "weight", "residual"):
        xx, ww, rr = x.clone(), w.clone(), r.clone()
        leaf = {"x": xx, "weight": ww, "residual": rr}[leaf_name].requires_grad_(True)
        y, h = fn(xx, ww, 1e-5, residual=rr, offset=0.5)
        (got,) = torch.autograd.grad((y * dy).sum() + (h * dh).sum(), [leaf])
        check(got, g[leaf_name], GRAD_TOL[F32], leaf_name)
        if leaf_name != "residual":
            y = fn(xx, ww, 1e-5, offset=0.5)
            (got,) = torch.autograd.grad((y * dy).sum(), [leaf])
            check(got, g_plain[leaf_name], GRAD_TOL[F32], leaf_name + " (no residual)")


@KINDS
def test_residual_same_leaf_twice(crms, autograd_path):
    """x and residual the same leaf tensor: its gradient is the sum of both paths."""
    fn, _ = NORMS[crms]
    x = randn((4, 23), F64, 1).requires_grad_(True)
    w = randn((23,), F64, 2)
    dy, dh = randn((4, 23), F64, 3), randn((4, 23), F64, 4)
    y, h = fn(x, w, 1e-5, residual=x)
    (got,) = torch.autograd.grad((y * dy).sum() + (h * dh).sum(), [x])
    g = norm_grads_ref(x, w, 1e-5, x, dy=dy, dh=dh, crms=crms)
    check(got, g["x"] + g["residual"], GRAD_TOL[F64], "dx")


@KINDS
def test_residual_leaf_grads_do_not_alias(crms, autograd_path):
    """x.grad and residual.grad are equal in value but must not share storage."""
    fn, _ = NORMS[crms]
    x, w, r, _, _ = make_case((3, 10), F32, 2, residual=True)
    y, h = fn(x, w, residual=r)
    (y.sum() + h.sum()).backward()
    assert torch.equal(x.grad, r.grad)
    assert x.grad.data_ptr() != r.grad.data_ptr()
    x.grad.add_(1.0)
    assert not torch.equal(x.grad, r.grad)


@KINDS
def test_double_backward_is_refused(crms, autograd_path):
    """A second derivative raises (never silently wrong), on both autograd paths; a first derivative
    taken with create_graph=True is still right."""
    fn, _ = NORMS[crms]
    x = randn((3, 6), F64, 1).requires_grad_(True)
    w = randn((6,), F64, 2)
    v = randn((3, 6), F64, 3)

    def ref_fn(x):  # the formula in float64 with x tracked by autograd (tests/reference detaches its inputs)
        n = x.shape[-1]
        ms = ((x * x).sum(-1) + x.sum(-1) ** 2) / (n + 1) if crms else (x * x).sum(-1) / n
        return x * (ms + 1e-5).rsqrt().unsqueeze(-1) * w

    def penalized(fn, x):  # a gradient penalty: the output itself reaches the loss too
        y = fn(x)
        (g,) = torch.autograd.grad((y * v).sum(), [x], create_graph=True)
        return g, (y * w).sum() + g.pow(2).sum()

    g_ref, _ = penalized(ref_fn, x)
    g, loss = penalized(lambda x: fn(x, w, 1e-5), x)
    check(g, g_ref, 1e-11, "first derivative (create_graph=True)")
    # Not implemented, so it must raise (it gave the first-order part alone, silently).
    with pytest.raises((RuntimeError, NotImplementedError), match="second derivatives are not implemented"):
        torch.autograd.grad(loss, [x])


def _ref_fn(crms, w, offset=0.0, scale=1.0):
    """The formula in float64, (x, residual or None) -> y, its inputs tracked by every autograd mode."""
    def f(x, r=None):
        h = x if r is None else x + r
        n = h.shape[-1]
        sq = (h * h).sum(-1, keepdim=True)
        ms = (sq + h.sum(-1, keepdim=True) ** 2) / (n + 1) if crms else sq / n
        return h * (ms + 1e-5).rsqrt() * (offset + w) * scale
    return f


@KINDS
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("transform", ["grad", "jacrev", "jvp", "jacfwd", "vmap", "forward_ad"])
def test_func_transforms_match_the_formula(crms, residual, transform):
    """torch.func transforms and forward-mode AD through the public functions equal the same
    transforms of the float64 formula (custom ops alone give zero tangents or raise under them)."""
    fn, _ = NORMS[crms]
    x, t = randn((3, 7), F64, 1), randn((3, 7), F64, 2)
    w, r = randn((7,), F64, 3), (randn((3, 7), F64, 4) if residual else None)

    def ours(x, r):
        y = fn(x, w, 1e-5, residual=r, offset=0.5, scale=0.7)
        return y if r is None else y[0]

    ref = _ref_fn(crms, w, offset=0.5, scale=0.7)

    def run(f):
        if transform == "grad":
            return torch.func.grad(lambda x: f(x, r).pow(2).sum())(x)
        if transform in ("jacrev", "jacfwd"):
            return getattr(torch.func, transform)(lambda x: f(x, r))(x)
        if transform == "jvp":
            return torch.func.jvp(lambda x: f(x, r), (x,), (t,))[1]
        if transform == "vmap":  # one row at a time, 1-D
            return torch.func.vmap(f, in_dims=(0, None if r is None else 0))(x, r)
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            return fwAD.unpack_dual(f(fwAD.make_dual(x, t), r)).tangent

    got = run(ours)
    assert got is not None, "no tangent"
    check(got, run(ref), 1e-11, transform)


@KINDS
def test_func_transform_values_match_the_kernels(crms):
    """The torch-ops form used under torch.func reads a float32 weight in x's dtype as the kernels
    do: bfloat16 x gives the kernels' outputs, up to one bfloat16 rounding of the same float32 value."""
    fn, _ = NORMS[crms]
    x, w32 = randn((64, 256), BF16, 1), randn((256,), F32, 2)
    kernel = fn(x, w32, 1e-5, offset=0.5, scale=0.7)
    composite = torch.func.vmap(lambda r: fn(r, w32, 1e-5, offset=0.5, scale=0.7))(x)
    ulps = ((composite.float() - kernel.float()).abs() / kernel.float().abs().clamp_min(1e-30)) * 2**8
    assert ulps.max() <= 1.01 and (ulps > 0).float().mean() < 0.05, (ulps.max().item(), (ulps > 0).float().mean().item())


@KINDS
def test_batched_gradients(crms, autograd_path):
    """is_grads_batched (and gradcheck's batched check) hand the backward batched tensors without
    storage: the eager backward gives them to the op, which loops over them."""
    fn, _ = NORMS[crms]
    x = randn((3, 8), F64, 1).requires_grad_(True)
    w = randn((8,), F64, 2).requires_grad_(True)
    y = fn(x, w, 1e-5)
    eye = torch.eye(24, dtype=F64).view(24, 3, 8)
    jx, jw = torch.autograd.grad(y, (x, w), eye, is_grads_batched=True)
    jx_ref = torch.autograd.functional.jacobian(_ref_fn(crms, w.detach()), x.detach()).view(24, 3, 8)
    check(jx, jx_ref, 1e-11, "batched dx")
    jw_ref = torch.autograd.functional.jacobian(lambda w: _ref_fn(crms, w)(x.detach()), w.detach()).view(24, 8)
    check(jw, jw_ref, 1e-11, "batched dw")


class _Block(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.norm1 = lmkern.nn.RMSNorm(n, eps=1e-5)
        self.lin = torch.nn.Linear(n, n)
        self.norm2 = lmkern.nn.CRMSNorm(n, eps=1e-6, offset=1.0, scale=0.5)
        with torch.no_grad():
            self.norm1.weight.copy_(randn((n,), F32, 40))
            self.norm2.weight.copy_(randn((n,), F32, 41) * 0.1)

    def forward(self, x, res):
        z = self.lin(self.norm1(x))
        y, h = self.norm2(z, res)
        return y * 2.0 + h


def test_compile_fullgraph_module():
    torch.manual_seed(0)
    n = 48
    eager = _Block(n)
    compiled_mod = _Block(n)
    compiled_mod.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_mod, fullgraph=True)
    x = randn((5, n), F32, 1)
    res = randn((5, n), F32, 2)
    dy = randn((5, n), F32, 3)
    outs = []
    for mod, call in ((eager, eager), (compiled_mod, compiled)):
        xx, rr = x.clone().requires_grad_(True), res.clone().requires_grad_(True)
        out = call(xx, rr)
        params = [mod.norm1.weight, mod.lin.weight, mod.lin.bias, mod.norm2.weight]
        grads = torch.autograd.grad((out * dy).sum(), [xx, rr] + params)
        outs.append((out,) + grads)
    for got, want, what in zip(outs[1], outs[0], ["out", "dx", "dres", "dw1", "dlin_w", "dlin_b", "dw2"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"compiled {what} differs from eager")


def test_compile_dynamic_functional():
    """Dynamic shapes through the fake kernels: two row counts, one compiled graph, bfloat16 too."""
    torch._dynamo.reset()

    def f(x, w, r):
        y, h = lmkern.rms_norm(x, w, 1e-5, residual=r, offset=0.5)
        return lmkern.crms_norm(y, w, 1e-5) + h

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for rows, dtype in ((3, F32), (7, F32), (5, BF16)):
        x, w, r, dy, _ = make_case((rows, 24), dtype, rows, residual=True)
        outs = []
        for fun in (f, cf):
            out = fun(x, w, r)
            outs.append((out,) + torch.autograd.grad((out * dy).sum(), [x, w, r]))
        for got, want in zip(outs[1], outs[0]):
            assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------------
# nn modules
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [1e-5, None])
def test_rmsnorm_module_loads_torch_state_dict(eps):
    n = 64
    tmod = torch.nn.RMSNorm(n, eps=eps)
    with torch.no_grad():
        tmod.weight.copy_(randn((n,), F32, 1))
    lmod = lmkern.nn.RMSNorm(n, eps=eps)
    lmod.load_state_dict(tmod.state_dict())
    x = randn((3, 5, n), F32, 2)
    torch.testing.assert_close(lmod(x), tmod(x), rtol=1e-5, atol=1e-6)
    check(lmod(x), rms_norm_ref(x, tmod.weight, torch.finfo(F32).eps if eps is None else eps), 1e-5, "y")
    # and gradients
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    dy = randn((3, 5, n), F32, 3)
    ga = torch.autograd.grad((lmod(xa) * dy).sum(), [xa, lmod.weight])
    gb = torch.autograd.grad((tmod(xb) * dy).sum(), [xb, tmod.weight])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [F32, BF16, F16, torch.float64], ids=str)
def test_eps_none_is_torchs_default(dtype):
    """eps=None (modules and functions) is torch's: the machine epsilon of the computation dtype,
    float32's for bfloat16 and float16 inputs (not theirs, 7.8e-3 and 9.8e-4), float64's for float64.
    Rows of |x| ~ 1e-4 (mean(x²) ~ 1e-8) show any other eps."""
    n = 24
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else F32).eps
    x = (randn((5, n), F32, 1) * 1e-4).to(dtype)
    tol = {F32: 1e-5, BF16: 2e-2, F16: 2e-3, torch.float64: 1e-12}[dtype]
    for crms in (False, True):
        fn, ref = NORMS[crms]
        want = ref(x, None, eps)
        module = (lmkern.nn.CRMSNorm if crms else lmkern.nn.RMSNorm)(n, eps=None, dtype=dtype)
        for got, how in ((fn(x, None, None), "function"), (module(x), "module")):
            check(got, want, tol, f"{'crms' if crms else 'rms'} {how}")
    torch.testing.assert_close(lmkern.nn.RMSNorm(n, eps=None, dtype=dtype)(x), torch.nn.RMSNorm(n, eps=None, dtype=dtype)(x))
    y, h = lmkern.rms_norm(x, None, None, residual=x)
    check(y, rms_norm_ref(x + x, None, eps), tol, "residual")


@pytest.mark.parametrize("cls", [lmkern.nn.RMSNorm, lmkern.nn.CRMSNorm])
def test_module_reset_parameters_after_to_empty(cls):
    """Built on meta, materialized with to_empty (garbage), reset_parameters (as torch's norms, what
    FSDP's meta initialization calls) sets (offset + weight) back to 1."""
    for offset in (0.0, 1.0):
        with torch.device("meta"):
            mod = cls(40, offset=offset)
        mod.to_empty(device="cpu")
        mod.reset_parameters()
        assert torch.equal(mod.weight.detach(), torch.full((40,), 1.0 - offset))
    cls(8, elementwise_affine=False).reset_parameters()  # nothing to reset


@pytest.mark.parametrize("cls", [lmkern.nn.RMSNorm, lmkern.nn.CRMSNorm])
def test_module_weight_parametrized_and_swapped(cls):
    """The module reads its weight past nn.Module.__getattr__ (faster), yet sees a parametrized
    weight (torch.nn.utils.parametrize) and one swapped in by torch.func.functional_call."""
    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    mod = cls(24)
    with torch.no_grad():
        mod.weight.copy_(randn((24,), F32, 1))
    x, w = randn((3, 24), F32, 2), mod.weight.detach().clone()
    fn = NORMS[cls is lmkern.nn.CRMSNorm][0]
    assert torch.equal(torch.func.functional_call(mod, {"weight": 3 * w}, (x,)), fn(x, 3 * w, 1e-6))
    torch.nn.utils.parametrize.register_parametrization(mod, "weight", Doubled())
    assert torch.equal(mod(x), fn(x, 2 * w, 1e-6))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # deprecated since torch 2.10: still used
@pytest.mark.parametrize("cls", [lmkern.nn.RMSNorm, lmkern.nn.CRMSNorm])
def test_module_fx_trace_and_jit(cls):
    """torch.fx.symbolic_trace keeps the module's call as one leaf (its shape check cannot run on
    symbolic values); jit.trace gives no TracerWarning; jit.script says what to use instead."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), cls(24, offset=0.5), torch.nn.Linear(24, 24), cls(24))
    x = randn((3, 16), F32, 1)
    gm = torch.fx.symbolic_trace(model)
    assert sum(node.target.__name__ == "_norm_module_forward" for node in gm.graph.nodes
               if node.op == "call_function") == 2
    assert torch.equal(gm(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (x,))
    x2 = randn((5, 16), F32, 2)
    assert torch.equal(traced(x2), model(x2))
    with pytest.raises(RuntimeError, match="cannot be scripted"):
        torch.jit.script(model)


def test_functions_fx_trace_as_leaves():
    """A module that calls the functions as lmkern.rms_norm(...) traces with torch.fx.symbolic_trace,
    each call one node (their checks cannot run on fx's symbolic values); a function imported by name
    before tracing is not patched by fx, and the error says how to trace it."""
    from lmkern import rms_norm as imported_rms_norm

    class Block(torch.nn.Module):
        def forward(self, x, r):
            y, h = lmkern.rms_norm(x, None, residual=r)
            return lmkern.crms_norm(y, torch.ones(16)) + h

    class Imported(torch.nn.Module):
        def forward(self, x):
            return imported_rms_norm(x, None)

    block = Block()
    gm = torch.fx.symbolic_trace(block)
    targets = [node.target for node in gm.graph.nodes if node.op == "call_function"]
    assert targets.count(lmkern.rms_norm) == 1 and targets.count(lmkern.crms_norm) == 1
    x, r = randn((3, 16), F32, 1), randn((3, 16), F32, 2)
    assert torch.equal(gm(x, r), block(x, r))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor; got Proxy .under torch.fx.symbolic_trace"):
        torch.fx.symbolic_trace(Imported())


def test_rmsnorm_module_no_affine_matches_torch():
    n = 31
    tmod = torch.nn.RMSNorm(n, eps=1e-6, elementwise_affine=False)
    lmod = lmkern.nn.RMSNorm(n, eps=1e-6, elementwise_affine=False)
    assert lmod.weight is None and list(lmod.parameters()) == []
    lmod.load_state_dict(tmod.state_dict())
    x = randn((4, n), F32, 5)
    torch.testing.assert_close(lmod(x), tmod(x), rtol=1e-5, atol=1e-6)
    check(lmod(x), rms_norm_ref(x, None, 1e-6), 1e-5, "y")


@pytest.mark.parametrize("cls,crms", [(lmkern.nn.RMSNorm, False), (lmkern.nn.CRMSNorm, True)], ids=["rms", "crms"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_module_matches_reference(cls, crms, offset):
    n = 50
    _, ref = NORMS[crms]
    mod = cls(n, eps=1e-5, offset=offset, scale=0.75)
    # (offset + weight) starts at 1: weight 1 for offset 0, 0 for offset 1.
    assert torch.equal(mod.weight.detach(), torch.full((n,), 1.0 - offset))
    x, res = randn((2, 3, n), F32, 1), randn((2, 3, n), F32, 2)
    check(mod(x), ref(x, None, 1e-5, None, 0.0, 0.75), 1e-5, "y at init (factor 1)")
    with torch.no_grad():
        mod.weight.copy_(randn((n,), F32, 3))
    check(mod(x), ref(x, mod.weight, 1e-5, None, offset, 0.75), 1e-5, "y")
    y, h = mod(x, res)
    y_ref, _ = ref(x, mod.weight, 1e-5, res, offset, 0.75)
    check(y, y_ref, 1e-5, "y residual")
    assert torch.equal(h, x + res)
    plain = cls(n, eps=1e-5, elementwise_affine=False)
    assert plain.weight is None
    check(plain(x), ref(x, None, 1e-5), 1e-5, "y no affine")
    assert "eps=1e-05" in repr(mod) and (("offset=1.0" in repr(mod)) == (offset == 1.0))


@pytest.mark.parametrize("cls", [lmkern.nn.RMSNorm, lmkern.nn.CRMSNorm])
def test_module_dtype_and_bad_shape(cls):
    mod = cls((16,), dtype=BF16)
    assert mod.weight.dtype == BF16 and mod.normalized_shape == (16,)
    x = randn((3, 16), BF16, 1)
    assert mod(x).dtype == BF16
    with pytest.raises(ValueError, match="normalized_shape"):
        cls((4, 16))
    with pytest.raises(ValueError, match="normalized_shape"):
        cls(-1)
    for bad, what in ((8.5, "an int or a sequence of one int; got float"), (None, "got NoneType"), ("12", "got str"),
                      ([8.7], "an int size; got float 8.7")):
        with pytest.raises(TypeError, match=f"normalized_shape: expected .*{what}"):
            cls(bad)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor; got NoneType"):
        mod(None)
    for kw, what in (({"eps": "1e-6"}, "eps"), ({"eps": True}, "eps"), ({"offset": "1"}, "offset"), ({"scale": b"2"}, "scale")):
        with pytest.raises(TypeError, match=f"{what}: expected a real number"):  # at construction, not at the first call
            cls(16, **kw)
    assert cls(16, eps=1).eps == 1.0 and cls(16, eps=None).eps is None
    for m in (mod, cls(16, elementwise_affine=False)):  # with a weight to check against and without
        with pytest.raises(ValueError, match=r"last dimension of 16 \(normalized_shape\); got shape \(3, 15\)"):
            m(randn((3, 15), BF16, 2))


def _master_weight_case(crms, dtype, device="cpu"):
    fn, ref = NORMS[crms]
    x = randn((300, 40), dtype, 1, device=device).requires_grad_(True)  # 300 rows: several row ranges of partials
    w32 = randn((40,), F32, 2, device=device).requires_grad_(True)
    y = fn(x, w32, 1e-5, offset=0.5, scale=0.7)
    assert y.dtype == dtype
    check(y, ref(x, w32.detach().to(dtype), 1e-5, offset=0.5, scale=0.7), 1e-2, "y")
    dy = randn((300, 40), dtype, 3, device=device)
    gx, gw = torch.autograd.grad((y * dy).sum(), [x, w32])
    assert gx.dtype == dtype and gw.dtype == F32
    g = norm_grads_ref(x, w32.detach().to(dtype), 1e-5, offset=0.5, scale=0.7, dy=dy, crms=crms)
    check(gx, g["x"], 1e-2, "dx")
    check(gw, g["weight"], 2e-6, "dw")


@KINDS
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_float32_master_weight(crms, dtype, autograd_path):
    """Half-precision activations with a float32 weight (mixed-precision training's master weights):
    y in x's dtype with the weight read in x's dtype; the weight's gradient float32, reduced from the
    float32 partials to float32 accuracy (through x's dtype it kept 8 bits)."""
    _master_weight_case(crms, dtype)


@KINDS
def test_residual_of_another_dtype_is_promoted(crms, autograd_path):
    """A bfloat16 branch output into a float32 residual stream (autocast): promoted as x + residual
    is, the outputs and the residual's gradient float32, x's gradient bfloat16."""
    fn, ref = NORMS[crms]
    x = randn((5, 24), BF16, 1).requires_grad_(True)
    r = randn((5, 24), F32, 2).requires_grad_(True)
    w = randn((24,), F32, 3)
    y, h = fn(x, w, 1e-5, residual=r)
    assert y.dtype == h.dtype == F32
    assert torch.equal(h, x.detach().float() + r.detach())
    y_ref, _ = ref(x.detach().float(), w, 1e-5, r.detach())
    check(y, y_ref, FWD_TOL[F32], "y")
    dy, dh = randn((5, 24), F32, 4), randn((5, 24), F32, 5)
    gx, gr = torch.autograd.grad((y * dy).sum() + (h * dh).sum(), [x, r])
    g = norm_grads_ref(x.detach().float(), w, 1e-5, r.detach(), dy=dy, dh=dh, crms=crms)
    assert gx.dtype == BF16 and gr.dtype == F32
    check(gx, g["x"], 1e-2, "dx")
    check(gr, g["residual"], GRAD_TOL[F32], "dresidual")


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@KINDS
def test_bad_input(crms):
    fn, _ = NORMS[crms]
    inplace = lmkern.crms_norm_ if crms else lmkern.rms_norm_
    x = torch.randn(4, 8)
    cases = [
        (lambda: fn(x, torch.randn(7)), ValueError, "weight"),
        (lambda: fn(x, torch.randn(1, 8)), ValueError, "weight"),
        (lambda: fn(x, torch.randn(8), residual=torch.randn(4, 7)), ValueError, "residual"),
        (lambda: fn(x, torch.randn(8), residual=torch.randn(8)), ValueError, "residual"),
        (lambda: fn(x, residual=torch.randn(4, 8, dtype=torch.complex64)), TypeError, "residual"),
        (lambda: inplace(x.clone(), residual=torch.randn(4, 8, dtype=BF16)), TypeError, "residual"),
        (lambda: fn(torch.arange(8).view(2, 4)), TypeError, "x"),
        (lambda: fn(torch.randn(2, 4, dtype=torch.complex64)), TypeError, "x"),
        (lambda: fn(x, torch.arange(8)), TypeError, "weight"),
        (lambda: fn(x, torch.randn(8, dtype=torch.complex64)), TypeError, "weight"),
        (lambda: fn(torch.tensor(1.0)), ValueError, "x"),
        (lambda: fn(x.numpy()), TypeError, "x"),
        (lambda: fn(x, torch.randn(8, device="meta")), ValueError, "weight"),
        (lambda: fn(x, residual=torch.randn(4, 8, device="meta")), ValueError, "residual"),
        (lambda: fn(x, eps=-1.0), ValueError, "eps"),
        (lambda: fn(x, eps=math.nan), ValueError, "eps"),
        (lambda: fn(x, eps=math.inf), ValueError, "eps"),
        (lambda: fn(x, offset=math.inf), ValueError, "offset"),
        (lambda: fn(x, scale=math.nan), ValueError, "scale"),
        (lambda: fn(x.to_sparse()), TypeError, "x: expected a dense tensor"),
        (lambda: fn(x, torch.randn(8).to_sparse()), TypeError, "weight: expected a dense tensor"),
        (lambda: fn(x, offset=torch.tensor(0.5, requires_grad=True)), TypeError, "offset: expected a number"),
        (lambda: fn(x, scale=torch.tensor(2.0, requires_grad=True)), TypeError, "scale: expected a number"),
        # float() would take these: "1e-6" as 1e-6, True as 1.0
        (lambda: fn(x, eps="1e-6"), TypeError, "eps: expected a real number; got str"),
        (lambda: fn(x, eps=True), TypeError, "eps: expected a real number; got bool"),
        (lambda: fn(x, offset="1"), TypeError, "offset: expected a real number; got str"),
        (lambda: fn(x, scale=False), TypeError, "scale: expected a real number; got bool"),
        (lambda: inplace(x.clone(), eps=b"1"), TypeError, "eps: expected a real number; got bytes"),
        (lambda: fn(x, eps=1 + 2j), TypeError, "eps: expected a real number; got complex"),
        (lambda: fn(x, eps=2 ** 2000), ValueError, "eps: expected a real number; got int beyond float64's range"),
        (lambda: fn(x, offset=-(2 ** 1100)), ValueError, "offset: expected a real number; got int beyond"),
        (lambda: fn(x, eps=torch.ones(2)), TypeError, "eps: expected a real number; got Tensor"),
    ]
    for i, (call, exc, word) in enumerate(cases):
        with pytest.raises(exc) as info:
            call()
        assert word in str(info.value), f"case {i}: message {str(info.value)!r} does not name {word!r}"


@KINDS
def test_non_tensor_arguments(crms):
    """A weight or residual that is not a tensor: a clear exception that names the argument."""
    fn, _ = NORMS[crms]
    x = torch.randn(4, 8)
    # the public function rejects it by name (TypeError); the op's schema check would too (RuntimeError)
    with pytest.raises((TypeError, RuntimeError), match="residual"):
        fn(x, residual=[[1.0] * 8] * 4)
    for weight in ([1.0] * 8, torch.ones(8).numpy()):
        with pytest.raises(TypeError, match="weight"):
            fn(x, weight)


@KINDS
def test_bad_backward_input(crms):
    name = "crms_norm" if crms else "rms_norm"
    bwd = getattr(torch.ops.lmkern, f"{name}_backward")
    x, w = torch.randn(4, 8), torch.randn(8)
    _, rstd = getattr(torch.ops.lmkern, name)(x, w, 1e-5, 0.0, 1.0)
    dy = torch.randn(4, 8)
    cases = [
        (lambda: bwd(dy, x, w, rstd[:3], None, 0.0, 1.0, True), ValueError, "rstd"),
        (lambda: bwd(dy, x, w, rstd.double(), None, 0.0, 1.0, True), ValueError, "rstd"),
        (lambda: bwd(dy[:, :7], x, w, rstd, None, 0.0, 1.0, True), ValueError, "dy"),
        (lambda: bwd(dy.double(), x, w, rstd, None, 0.0, 1.0, True), TypeError, "dy"),
        (lambda: bwd(dy, x, w, rstd, torch.randn(4, 7), 0.0, 1.0, True), ValueError, "dh"),
        (lambda: bwd(dy, x, None, rstd, None, 0.0, 1.0, True), ValueError, "weight"),
        (lambda: bwd(dy, x, w[:7], rstd, None, 0.0, 1.0, True), ValueError, "weight"),
    ]
    for i, (call, exc, word) in enumerate(cases):
        with pytest.raises(exc) as info:
            call()
        assert word in str(info.value), f"case {i}: message {str(info.value)!r} does not name {word!r}"


@KINDS
def test_nan_inf_propagate_to_their_row_only(crms):
    fn, _ = NORMS[crms]
    n = 24
    x = randn((6, n), F32, 1)
    x[1, 3] = math.nan
    x[2, 0] = math.inf
    x[3, 5] = -math.inf
    x[4, 7] = 3e38  # finite, but its square overflows float32
    w = randn((n,), F32, 2)
    y = fn(x, w, 1e-5)
    finite_rows = [0, 5]
    assert torch.isfinite(y[finite_rows]).all()
    if not crms:
        t = F.rms_norm(x, (n,), w, 1e-5)
        assert torch.equal(torch.isnan(y), torch.isnan(t)), "NaN positions differ from F.rms_norm"
        assert torch.equal(torch.isinf(y), torch.isinf(t)), "inf positions differ from F.rms_norm"
        torch.testing.assert_close(y[finite_rows], t[finite_rows])
    else:
        assert torch.isnan(y[1]).all()  # a NaN spoils its whole row (Σx is NaN)
        assert torch.isnan(y[2, 0]) and torch.isnan(y[3, 5])
    # backward: the gradient of the finite rows stays finite
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad((fn(xg, w, 1e-5) * randn((6, n), F32, 3)).sum(), [xg])
    assert torch.isfinite(gx[finite_rows]).all()
    check(gx[finite_rows], norm_grads_ref(x[finite_rows], w, 1e-5, dy=randn((6, n), F32, 3)[finite_rows],
                                          crms=crms)["x"], 1e-5, "dx of finite rows")


@KINDS
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("mag, eps", [(1e-13, 0.0), (1e13, 1e-6), (1e14, 1e-6), (1e17, 1e-6)], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_extreme_row_magnitudes(crms, dtype, mag, eps, residual):
    """Rows of RMS 1e-13 (eps = 0) to 1e17, where float32 still holds the forward's sums: the
    backward must hold too (its r³·c/d was formed r·r·r first, which left float32: dx was off by
    2e-3 (RMSNorm) and 2e-2 (CRMSNorm) at RMS 1e14, 0.3 at 1e16, inf at 1e-13)."""
    x, w, r, dy, dh = make_case((3, 64), dtype, 5, mag=mag, residual=residual)
    run_and_check(crms, x, w, r, dy, dh, eps, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------
# CUDA (marker `cuda`: skipped unless lmkern's CUDA path works here)
# ------------------------------------------------------------------------------------------------
# Odd rows of >= 32 16-byte packs (1023, 257, 4095: CRMSNorm's d - 1) are cut at 16-byte boundaries
# (the _s16 kernels), shorter ones (7) go one element at a time.
CUDA_SHAPES = [(1, 1), (3, 7), (5, 1023), (4, 1024), (8, 4096), (2, 8192), (3, 16384 + 8), (2, 65536), (2, 262144),
               (1000, 257), (2048, 2048), (33, 4095)]


def _cuda_case(shape, dtype, seed, **kw):
    return tuple(None if t is None else t.detach().to("cuda").requires_grad_(t.requires_grad)
                 for t in make_case(shape, dtype, seed, **kw))


@pytest.mark.cuda
@KINDS
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("mag, eps", [(1e-13, 0.0), (1e14, 1e-6), (1e16, 1e-6)], ids=str)
@pytest.mark.parametrize("n", [64, 40000], ids=["registers", "loop"])  # 40000: beyond both dtypes' register rows
def test_cuda_extreme_row_magnitudes(crms, dtype, mag, eps, n):
    """The CPU test of the same name on the CUDA kernels (row in registers and the looped kernel):
    their backward formed r³·c/d as r·r·r first too."""
    x, w, r, dy, dh = _cuda_case((3, n), dtype, 5, mag=mag, residual=True)
    run_and_check(crms, x, w, r, dy, dh, eps, 0.0, 1.0)
    x, w, _, dy, _ = _cuda_case((3, n), dtype, 6, mag=mag)
    run_and_check(crms, x, w, None, dy, None, eps, 0.0, 1.0)


@pytest.mark.cuda
@KINDS
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_cuda_matches_reference(crms, dtype, shape):
    for residual in (False, True):
        x, w, r, dy, dh = _cuda_case(shape, dtype, 31, weight=True, residual=residual, mean=0.2)
        run_and_check(crms, x, w, r, dy, dh, 1e-5, 0.5, 1.25)
    x, _, _, dy, _ = _cuda_case(shape, dtype, 32, weight=False)
    run_and_check(crms, x, None, None, dy, None, 1e-6, 0.0, 1.0)


@pytest.mark.cuda
@KINDS
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("n", [8, 64, 1000, 1024, 4096, 20000], ids=str)
def test_cuda_misaligned_inputs(crms, dtype, n):
    """Inputs that start one element past a 16-byte boundary (contiguous storage-offset views)."""
    fn, ref = NORMS[crms]
    rows = 5
    op_bwd = getattr(torch.ops.lmkern, ("crms_norm" if crms else "rms_norm") + "_backward")

    def shifted(shape, seed):
        flat = randn((math.prod(shape) + 1,), dtype, seed, device="cuda")
        v = flat[1:].view(shape)
        assert v.is_contiguous() and v.data_ptr() % 16 != 0
        return v

    x, r, w, dy, dh = shifted((rows, n), 1), shifted((rows, n), 2), shifted((n,), 3), shifted((rows, n), 4), shifted((rows, n), 5)
    y, h = fn(x, w, 1e-5, residual=r, offset=0.5)
    y_ref, _ = ref(x, w, 1e-5, r, 0.5, 1.0)
    check(y, y_ref, FWD_TOL[dtype], "y")
    assert torch.equal(h, x + r)
    # the aligned computation gives the same values (up to rounding)
    y_al, h_al = fn(x.clone(), w.clone(), 1e-5, residual=r.clone(), offset=0.5)
    assert torch.equal(h_al, h)
    check(y, y_al, FWD_TOL[dtype], "y vs aligned")
    # backward with misaligned dy, x, weight and dh
    _, rstd = (torch.ops.lmkern.crms_norm if crms else torch.ops.lmkern.rms_norm)(x, w, 1e-5, 0.5, 1.0)
    dx, dw = op_bwd(dy, x, w, rstd, dh, 0.5, 1.0, True)
    g = norm_grads_ref(x, w, 1e-5, None, 0.5, 1.0, dy=dy, crms=crms)
    check(dx, g["x"] + dh.to(F64), GRAD_TOL[dtype], "dx", floor=dx_floor(x, w, 1e-5, 0.5, 1.0, dy, crms, dh))
    check(dw, g["weight"], GRAD_TOL[dtype], "dw")


@pytest.mark.cuda
@KINDS
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_cuda_deterministic(crms, dtype):
    fn, _ = NORMS[crms]
    x, w, r, dy, dh = _cuda_case((3000, 1536), dtype, 41, weight=True, residual=True)

    def run():
        y, h = fn(x, w, 1e-5, residual=r, offset=0.1)
        return (y, h) + torch.autograd.grad((y * dy).sum() + (h * dh).sum(), [x, w, r])

    first = run()
    for _ in range(3):
        for got, want, what in zip(run(), first, ["y", "h", "dx", "dw", "dres"]):
            assert torch.equal(got, want), f"{what} differs between runs"


@pytest.mark.cuda
@KINDS
def test_cuda_empty(crms):
    fn, _ = NORMS[crms]
    for shape in [(0, 64), (3, 0), (0,), (2, 0, 5)]:
        x, w, r, _, _ = _cuda_case(shape, F32, 1, weight=True, residual=True)
        y, h = fn(x, w, 1e-5, residual=r)
        assert y.shape == x.shape and y.device.type == "cuda"
        (y.sum() + h.sum()).backward()
        assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
    torch.cuda.synchronize()


@pytest.mark.cuda
@KINDS
def test_cuda_graph_capture(crms):
    fn, ref = NORMS[crms]
    x = randn((64, 1024), BF16, 1, device="cuda")
    w = randn((1024,), BF16, 2, device="cuda")
    r = randn((64, 1024), BF16, 3, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture
        for _ in range(2):
            fn(x, w, 1e-5, residual=r)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_static, h_static = fn(x, w, 1e-5, residual=r, offset=0.5)
    for seed in (10, 20):
        x.copy_(randn((64, 1024), BF16, seed, device="cuda"))
        r.copy_(randn((64, 1024), BF16, seed + 1, device="cuda"))
        y_static.fill_(math.nan)
        g.replay()
        torch.cuda.synchronize()
        y_ref, _ = ref(x, w, 1e-5, r, 0.5, 1.0)
        check(y_static, y_ref, 1e-2, "replayed y")
        assert torch.equal(h_static, x + r)


@pytest.mark.cuda
@KINDS
def test_cuda_non_default_stream(crms):
    fn, ref = NORMS[crms]
    n = 4096
    w = randn((n,), F32, 2, device="cuda")
    dy = randn((256, n), F32, 3, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        # a slow producer on s: a kernel launched on another stream would read x before it is written.
        a = torch.randn(4096, 4096, device="cuda")
        for _ in range(4):
            a = torch.tanh(a @ a * 0.01)
        x = (a[:256, :n] * 3.0).requires_grad_(True)
        y = fn(x, w, 1e-5, offset=0.25)
        (gx,) = torch.autograd.grad((y * dy).sum(), [x])
        with torch.no_grad():  # the direct (dispatcher-free) path, on s as well
            x2 = (a[256:512, :n] * 3.0).contiguous()
            y2 = fn(x2, w, 1e-5, offset=0.25)
        y_copy, gx_copy, y2_copy = y.clone(), gx.clone(), y2.clone()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    check(y_copy, ref(x, w, 1e-5, None, 0.25, 1.0), 1e-5, "y on a side stream")
    check(y2_copy, ref(x2, w, 1e-5, None, 0.25, 1.0), 1e-5, "y on a side stream (no grad)")
    g = norm_grads_ref(x, w, 1e-5, None, 0.25, 1.0, dy=dy, crms=crms)
    check(gx_copy, g["x"], 1e-5, "dx on a side stream")


@pytest.mark.cuda
@KINDS
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_cuda_float32_master_weight(crms, dtype, autograd_path):
    _master_weight_case(crms, dtype, "cuda")


@pytest.mark.cuda
@KINDS
def test_cuda_bad_input(crms):
    fn, _ = NORMS[crms]
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(TypeError, match="float64"):
        fn(x.double())
    with pytest.raises(TypeError, match="float64"):
        fn(x.double(), torch.randn(8, device="cuda", dtype=F64))
    with pytest.raises(ValueError, match="weight"):
        fn(x, torch.randn(8))
    with pytest.raises(ValueError, match="residual"):
        fn(x, residual=torch.randn(4, 8))


@pytest.mark.cuda
@KINDS
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
# Row in registers (101: one element per pack; 1031: cut at 16-byte boundaries, _s16); the looped
# kernel with 1-element packs (40961: more packs than the cut rows hold in registers) and with
# 16-byte packs (40960), whose second pass must read h back, residual being h by then. 256: 16-byte
# packs, several rows per block.
@pytest.mark.parametrize("n", [256, 101, 1031, 40961, 40960], ids=["registers-v16", "registers", "registers-s16", "loop", "loop-v16"])
def test_cuda_inplace_equals_out_of_place(crms, dtype, n):
    fn, ref = NORMS[crms]
    x, w, r, _, _ = _cuda_case((37, n), dtype, 51, weight=True, residual=True)
    x, w, r = x.detach(), w.detach(), r.detach()
    y, h = fn(x, w, 1e-5, residual=r, offset=0.5)
    xi, ri = x.clone(), r.clone()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = INPLACE[crms](xi, w, 1e-5, residual=ri, offset=0.5)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() == before, "the in-place norm allocated a buffer"
    assert out[0] is xi and out[1] is ri
    assert torch.equal(xi, y) and torch.equal(ri, h)
    xi = x.clone()
    INPLACE[crms](xi, w, 1e-5, offset=0.5)
    assert torch.equal(xi, fn(x, w, 1e-5, offset=0.5))
    check(xi, ref(x, w, 1e-5, None, 0.5, 1.0), FWD_TOL[dtype], "y in place")


@pytest.mark.cuda
@KINDS
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_cuda_inplace_weight_inside_x_or_residual(crms, dtype):
    # On CUDA other blocks would read the weight row while one block overwrites it.
    _inplace_weight_inside(crms, "cuda", dtype)

# ------------------------------------------------------------------------------------------------
# Found by a mutation-testing audit of the Python layer (stop 26): each test was seen failing with
# a deliberate bug in the code it covers (a check dropped, an argument not passed on, ...).
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [lmkern.ops.norm.rms_norm, lmkern.ops.norm.crms_norm,
                                lmkern.ops.norm.rms_norm_, lmkern.ops.norm.crms_norm_])
def test_x_none_is_a_type_error(fn):
    with pytest.raises(TypeError, match="x: expected a torch.Tensor; got NoneType"):
        fn(None)


@pytest.mark.parametrize("op", ["rms_norm", "crms_norm"])
def test_empty_rows_rstd_with_eps_zero_is_inf(op):
    _, rstd = getattr(torch.ops.lmkern, op)(torch.empty(3, 0), None, 0.0, 0.0, 1.0)
    assert rstd.shape == (3,) and torch.isinf(rstd).all()


def test_tensor_subclasses_go_through_the_op():
    """Only plain tensors may skip torch's dispatcher: a subclass with __torch_function__ sees the op."""
    class Traced(torch.Tensor):
        seen: list = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.seen.append(str(func))
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(4, 8).as_subclass(Traced)
    y = lmkern.ops.norm.rms_norm(x)
    assert any("rms_norm" in f for f in Traced.seen), Traced.seen
    torch.testing.assert_close(y.as_subclass(torch.Tensor), lmkern.ops.norm.rms_norm(x.as_subclass(torch.Tensor)))


@pytest.mark.parametrize("op", ["rms_norm", "crms_norm"])
def test_ops_run_on_meta_tensors(op):
    y, rstd = getattr(torch.ops.lmkern, op)(torch.empty(2, 8, device="meta"), None, 1e-6, 0.0, 1.0)
    assert y.is_meta and y.shape == (2, 8) and rstd.shape == (2,)


@KINDS
def test_inplace_accepts_adjacent_halves_of_one_buffer(crms):
    # x and residual as the two back-to-back halves of one allocation touch but do not overlap:
    # the in-place norm must run (and give the out-of-place result), not report an overlap.
    fn, inplace = NORMS[crms][0], INPLACE[crms]
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(2, 4, 8, generator=g)
    w = torch.randn(8, generator=g)
    y, h = fn(buf[0].clone(), w, residual=buf[1].clone())
    out = inplace(buf[0], w, residual=buf[1])
    assert out[0].data_ptr() == buf[0].data_ptr()
    assert torch.equal(buf[0], y) and torch.equal(buf[1], h)


@pytest.mark.parametrize("name", ["rms_norm", "crms_norm"])
def test_backward_op_refuses_a_weight_gradient_without_a_weight(name):
    x, dy = torch.randn(3, 8), torch.randn(3, 8)
    _, rstd = getattr(torch.ops.lmkern, name)(x, None, 1e-6, 0.0, 1.0)
    bwd = getattr(torch.ops.lmkern, f"{name}_backward")
    dx, dw = bwd(dy, x, None, rstd, None, 0.0, 1.0, False)
    assert dx.shape == x.shape and dw.numel() == 0
    with pytest.raises(ValueError, match="weight_grad: a weight gradient was asked for without a weight"):
        bwd(dy, x, None, rstd, None, 0.0, 1.0, True)


def test_forward_ad_in_another_thread_changes_nothing_here():
    """torch keeps forward AD's level in a process-wide global: while another thread has a
    dual_level open, calls here on tensors without tangents still run the kernels (bit for bit),
    and power_fake_quantize does not take them for forward-mode AD."""
    import threading
    import torch.autograd.forward_ad as fwAD

    x, w, _, _, _ = make_case((6, 40), BF16, 3, requires_grad=False)
    want = lmkern.rms_norm(x, w, 1e-5)
    want_q = lmkern.quant.power_fake_quantize(x.float(), 0.6, 4, 8)
    inside, release = threading.Event(), threading.Event()

    def other():
        with fwAD.dual_level():
            inside.set()
            release.wait(60)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert inside.wait(60)
        _assert_same_bits(lmkern.rms_norm(x, w, 1e-5), want, "y")
        _assert_same_bits(lmkern.quant.power_fake_quantize(x.float(), 0.6, 4, 8), want_q, "fake-quantized")
    finally:
        release.set()
        t.join()
