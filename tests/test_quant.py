"""Tests of lmkern's power-exponent quantization against the float64 references in tests/reference/quant.py.

Codes must equal the reference's except at elements the reference flags as lying within float
rounding of a code boundary (``near_boundary``: qmax·u^a within a relative 1e-9 of a half-integer);
those are few and checked to differ by at most one step. Dequantized values are compared with the
reference dequantization of the kernel's own codes element by element (float32 rounding), and
against the reference codes in the ‖out − ref‖/‖ref‖ metric. Inputs are fresh random values from a
hypothesis-drawn seed.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, strategies as st

import lmkern
from lmkern import _core
from lmkern.nn import PowerQuantLinear
from lmkern.quant import PowerQuantized, power_dequantize, power_fake_quantize, power_quantize, search_exponent, unpack_codes

from reference.quant import (
    absmax_int_ref, brute_force_errors, dequantize_ref, errors_ref, fake_quantize_grads_ref, linear_ref, pack_ref,
    quantize_ref, unpack_ref,
)

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, F64, BF16, F16]
# Element-wise bound of |x̂ − ref| / |ref| for a dequantized value stored in each dtype: the output
# rounding plus float32's m·table product (float64 for float64).
DEQ_RTOL = {F32: 3e-7, F64: 1e-15, BF16: 2 ** -8 + 3e-7, F16: 2 ** -11 + 3e-7}
# plus half of float16's subnormal spacing (outputs below 2^-14 lose relative precision).
DEQ_ATOL = {F32: 1e-300, F64: 1e-300, BF16: 1e-300, F16: 2 ** -25}
TOL = {F32: 1e-5, F64: 1e-12, BF16: 1e-2, F16: 1e-2}
CODES = {F32: 0, F64: 1, F16: 2, BF16: 3}


def randn(shape, dtype, seed, mag=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * mag).to(dtype)


def rel_err(out, ref) -> float:
    o, r = out.detach().to(F64), ref.detach().to(F64)
    assert o.shape == r.shape, f"{tuple(o.shape)} vs {tuple(r.shape)}"
    if not torch.isfinite(o).all():
        return math.inf
    d, n = (o - r).norm().item(), r.norm().item()
    return d if n == 0 else d / n


def rel_err_floor(out, ref, floor: float) -> float:
    """‖out − ref‖ / max(‖ref‖, floor) in float64; inf if out is not finite."""
    o, r = out.detach().to(F64), ref.detach().to(F64)
    if not torch.isfinite(o).all():
        return math.inf
    d = max(r.norm().item(), floor)
    return (o - r).norm().item() / d if d > 0 else (o - r).norm().item()


def check_codes(q: PowerQuantized, x, a, bits, g, clip=1.0, max_near_frac=None):
    """Kernel codes and scales against the reference; returns the reference (q, m, near)."""
    q_ref, m_ref, near = quantize_ref(x, a, bits, g, clip)
    rows, n = q_ref.shape
    assert q.codes.dtype == torch.uint8 and tuple(q.codes.shape) == (rows, (n * bits + 7) // 8)
    assert q.scales.dtype == F32 and tuple(q.scales.shape) == (rows, n // g if n else 0)
    assert torch.equal(q.scales, m_ref), "scales differ from float32(clip·max|x|)"
    got = unpack_ref(q.codes, bits, n)
    assert got.abs().max().item() <= 2 ** (bits - 1) - 1 if got.numel() else True
    diff = got != q_ref
    assert not (diff & ~near).any(), (
        f"{int((diff & ~near).sum())} codes differ away from a boundary, e.g. got "
        f"{got[diff & ~near][:5].tolist()} want {q_ref[diff & ~near][:5].tolist()}"
    )
    assert ((got - q_ref).abs() <= 1).all()
    if max_near_frac is not None and near.numel():  # the exemption must not hollow the check out
        assert near.float().mean().item() <= max_near_frac
    # Unused bits of a row's last byte are zero: the bytes are exactly the reference packing.
    assert torch.equal(q.codes, pack_ref(got, bits))
    return got, m_ref, near


# ------------------------------------------------------------------------------------------------
# quantize / dequantize against the reference
# ------------------------------------------------------------------------------------------------


@st.composite
def quant_cases(draw, max_elems=20_000):
    dtype = draw(st.sampled_from(DTYPES))
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    n = draw(st.one_of(st.integers(1, 40), st.sampled_from([64, 96, 127, 128, 256, 384, 1000, 4096])))
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    g = draw(st.one_of(st.none(), st.sampled_from(divisors)))
    lead = draw(st.sampled_from([(), (1,), (3,), (2, 3), (0,), (5, 1)]))
    if math.prod(lead) * n > max_elems:
        lead = (max(1, max_elems // n),)
    rows = math.prod(lead) if lead else 1
    per_row = draw(st.booleans()) and rows > 0
    if per_row:
        a = torch.tensor(draw(st.lists(st.floats(0.05, 1.0), min_size=rows, max_size=rows)), dtype=F32)
    else:
        a = draw(st.one_of(st.just(1.0), st.floats(0.05, 1.0)))
    clip = draw(st.sampled_from([1.0, 1.0, 0.9, 0.5, 1.5]))
    mag = draw(st.sampled_from([1.0, 1e-3, 50.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, bits, lead + (n,), g, a, clip, mag, seed


@given(quant_cases())
def test_quantize_dequantize_match_reference(case):
    dtype, bits, shape, g, a, clip, mag, seed = case
    x = randn(shape, dtype, seed, mag)
    if x.numel() > 4:  # exact zeros and an all-zero group too
        x.view(-1)[seed % x.numel()] = 0
    n = shape[-1]
    gs = n if g is None else g
    q = power_quantize(x, a, bits, g, clip)
    assert isinstance(q, PowerQuantized) and q.bits == bits and q.group_size == gs
    assert q.shape == x.shape and q.dtype == dtype
    assert q.exponent.dtype == F32 and tuple(q.exponent.shape) == (math.prod(shape[:-1]),)
    codes, m, near = check_codes(q, x, a, bits, gs, clip)
    xh = power_dequantize(q)
    assert xh.dtype == dtype and xh.shape == x.shape
    # Element-wise: the kernel's codes dequantized by the formula, within float rounding.
    ref_own = dequantize_ref(codes, m, q.exponent.to(F64), bits, gs).reshape(shape)
    err = (xh.to(F64) - ref_own).abs()
    assert (err <= DEQ_RTOL[dtype] * ref_own.abs() + DEQ_ATOL[dtype]).all(), f"max element error {err.max().item():.3e}"
    # Against the reference codes (differing only at flagged boundary elements).
    q_ref, _, _ = quantize_ref(x, a, bits, gs, clip)
    ref = dequantize_ref(q_ref, m, q.exponent.to(F64), bits, gs).reshape(shape)
    if not near.any():
        assert rel_err(xh, ref) <= TOL[dtype]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_large_rows_match_reference(bits, dtype):
    x = randn((64, 4096), dtype, bits)
    a = torch.linspace(0.2, 1.0, 64)
    q = power_quantize(x, a, bits, 128)
    codes, m, near = check_codes(q, x, a, bits, 128, max_near_frac=1e-4 if dtype == F32 else 0.05)
    ref = dequantize_ref(codes, m, a, bits, 128)
    assert rel_err(power_dequantize(q).reshape(64, 4096), ref) <= TOL[dtype]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_equal_one_is_absmax_integer_quantization(bits, dtype):
    x = randn((6, 96), dtype, 11)
    q = power_quantize(x, 1.0, bits, 32)
    q_int, xh_int = absmax_int_ref(x, bits, 32)
    t = x.to(F64).reshape(6, 3, 32)
    tie = ((t / t.abs().amax(-1, keepdim=True) * (2 ** (bits - 1) - 1)).abs() % 1 - 0.5).abs() < 1e-9
    got = unpack_ref(q.codes, bits, 96)
    ok = ~tie.reshape(6, 96)  # exact ties k + 0.5 may go either way (within rounding of a boundary)
    assert torch.equal(got[ok], q_int[ok])
    assert rel_err(power_dequantize(q)[ok], xh_int.reshape(6, 96)[ok]) <= TOL[dtype]
    # 8-bit codes are plain int8.
    if bits == 8:
        assert torch.equal(q.codes.view(torch.int8).to(torch.int64), got)


def test_boundaries_are_exact_on_constructed_ties():
    """Values placed exactly on and one float32 step around the boundaries t_k·m: the kernel's code
    changes where the float64 formula's does (half away from zero at the boundary itself is a tie,
    which the reference flags; the neighbours are not)."""
    bits, a = 4, 0.5
    qm = 7
    ks = torch.arange(qm, dtype=F64)
    t = ((ks + 0.5) / qm) ** (1 / a)  # boundaries of u, with m = 1 (x holds 1.0 as its max)
    vals = []
    for tv in t.tolist():
        f = torch.tensor(tv, dtype=F32)
        vals += [torch.nextafter(f, torch.tensor(0.0)).item(), torch.nextafter(f, torch.tensor(2.0)).item()]
    x = torch.tensor([1.0] + vals + [-v for v in vals], dtype=F32).reshape(1, -1)
    q = power_quantize(x, a, bits)
    check_codes(q, x, a, bits, x.shape[1])
    got = unpack_ref(q.codes, bits, x.shape[1])[0, 1:1 + len(vals)]
    # below boundary k: code k; above it: k + 1.
    assert got.tolist() == [v for k in range(qm) for v in (k, k + 1)]


def test_all_zero_groups_and_exact_zeros():
    x = torch.zeros(3, 16)
    x[1, 8:] = torch.arange(8) - 3.0
    for a in (1.0, 0.3):
        q = power_quantize(x, a, 4, 8)
        assert q.scales[0].tolist() == [0.0, 0.0] and q.scales[1, 0].item() == 0.0
        xh = power_dequantize(q)
        assert torch.isfinite(xh).all() and (xh[0] == 0).all() and (xh[1, :8] == 0).all()
        assert xh[1, 11].item() == 0.0  # x = 0 inside a non-zero group
        codes, _, _ = check_codes(q, x, a, 4, 8)
        assert codes[1, 11].item() == 0 and codes[1, 15].item() == 7 and codes[1, 8].item() < 0


def test_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(3)
    for bits in (2, 3, 4, 8):
        qm = 2 ** (bits - 1) - 1
        for n in (1, 2, 3, 5, 8, 9, 17, 64, 100):
            q = torch.randint(-qm, qm + 1, (4, n), generator=g)
            packed = pack_ref(q, bits)
            assert torch.equal(unpack_ref(packed, bits, n), q)
            assert torch.equal(unpack_codes(packed, bits, n).to(torch.int64), q)
            # and lmkern's own packing of these codes (a = 1, m = qmax: x = q quantizes to q exactly)
            x = q.to(F32)
            x[:, 0] = qm  # every row's max is qmax, so m = qmax and u·qmax = |q|
            qq = power_quantize(x, 1.0, bits)
            assert torch.equal(qq.codes, pack_ref(x.to(torch.int64), bits))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_through_codebooks(bits):
    # The weight power_quant_linear multiplies by, formed for many tokens: dtype(m·table[field]) with
    # the product in float32 (float64 for float64), for any table (read as given, NaN included);
    # through the rows' own codebooks it is power_dequantize, bit for bit (float64: within float32).
    from lmkern.ops import quant as quant_ops

    shapes = ((5, 96, 32, 0), (3, 40, 8, 1), (1, 7, 7, 2), (4, 0, 1, 3), (0, 64, 32, 4), (67, 4096, 128, 5),
              (9, 160, 160, 6), (2, 64, 64, 7))
    for rows, n, gs, seed in shapes:
        x = randn((rows, n), F32, seed)
        if rows and n:
            x[0, : min(gs, n)] = 0.0  # an all-zero group
        gen = torch.Generator().manual_seed(seed)
        a = torch.rand(rows, generator=gen) * 0.9 + 0.1
        q = power_quantize(x, a, bits, gs)
        codebook = torch.ops.lmkern.power_codebook(q.exponent, bits)
        other = torch.randn((rows, 2 ** bits), generator=gen) * 3
        if rows:
            other[0, 1] = float("nan")
        fields = unpack_ref(q.codes, bits, n) % (2 ** bits)  # the raw b-bit fields
        for dtype in DTYPES:
            want = torch.ops.lmkern.power_dequantize(q.codes, q.scales, q.exponent, bits, gs, n, dtype)
            got = quant_ops._dequantize_codebooks(q.codes, q.scales, codebook, bits, gs, n, dtype)
            assert got.dtype == dtype and got.shape == (rows, n), (bits, rows, n, gs, dtype)
            if dtype == F64:  # power_dequantize's float64 table is not rounded to float32
                torch.testing.assert_close(got, want, rtol=1e-7, atol=0)
            else:
                assert torch.equal(got, want), (bits, rows, n, gs, dtype)
            prod_dtype = F64 if dtype == F64 else F32
            m = q.scales.to(prod_dtype).repeat_interleave(gs, dim=1) if n else torch.zeros((rows, 0), dtype=prod_dtype)
            ref = (m * torch.gather(other.to(prod_dtype), 1, fields)).to(dtype)
            got = quant_ops._dequantize_codebooks(q.codes, q.scales, other, bits, gs, n, dtype)
            assert torch.equal(got.isnan(), ref.isnan()), (bits, rows, n, gs, dtype)
            assert torch.equal(got.nan_to_num(), ref.nan_to_num()), (bits, rows, n, gs, dtype)


@given(st.sampled_from([2, 3, 4, 8]), st.integers(0, 9), st.sampled_from([1, 7, 32, 96, 160, 1024]),
       st.sampled_from([F32, BF16, F16, F64]), st.integers(0, 2**31 - 1))
def test_dequantize_through_codebooks_any_shape(bits, rows, n, dtype, seed):
    """Drawn shapes, group sizes (every divisor kind: 1, odd, multiples of 32 for the AVX2 rows) and
    tables: the kernel equals dtype(m·table[field]) computed with torch from the unpacked fields."""
    from lmkern.ops import quant as quant_ops

    gen = torch.Generator().manual_seed(seed)
    divisors = [d for d in (1, 7, 32, 96, 160, n) if d <= n and n % d == 0]
    g = divisors[seed % len(divisors)] if n else 1
    x = torch.randn((rows, n), generator=gen) * torch.rand((rows, 1), generator=gen) * 10
    q = power_quantize(x, torch.rand(rows, generator=gen) * 0.9 + 0.1, bits, g)
    table = torch.randn((rows, 2 ** bits), generator=gen)
    got = quant_ops._dequantize_codebooks(q.codes, q.scales, table, bits, g, n, dtype)
    prod = F64 if dtype == F64 else F32
    fields = unpack_ref(q.codes, bits, n) % (2 ** bits)
    m = q.scales.to(prod).repeat_interleave(g, dim=1) if n else torch.zeros((rows, 0), dtype=prod)
    assert torch.equal(got, (m * torch.gather(table.to(prod), 1, fields)).to(dtype))


def test_documented_bit_layout():
    # 4-bit: low nibble first; q = -1 is 0xF. 3-bit: eight codes in a 24-bit little-endian word.
    q = power_quantize(torch.tensor([[-1.0, 3.0, 7.0]]), 1.0, 4)
    assert q.codes.tolist() == [[0x3F, 0x07]]  # q = (-1, 3, 7): 0xF | 3 << 4, then 7 in the low nibble
    q3 = power_quantize(torch.tensor([[1.0, -1.0, 2.0, -3.0, 0.0, 3.0, -2.0, 1.0]]), 1.0, 3)
    word = sum(((c & 7) << (3 * i)) for i, c in enumerate([1, -1, 2, -3, 0, 3, -2, 1]))
    assert q3.codes.tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]
    q2 = power_quantize(torch.tensor([[1.0, -1.0, 0.0, 1.0, 1.0]]), 1.0, 2)
    assert q2.codes.tolist() == [[0b01_00_11_01, 0b01]]


def test_kernel_writes_every_byte():
    """The same call into outputs poisoned two ways gives the same bytes: nothing left unwritten."""
    x = randn((7, 96), F32, 5)
    a = torch.full((7,), 0.6)
    outs = []
    for fill in (0x00, 0xFF):
        codes = torch.full((7, 48), fill, dtype=torch.uint8)
        scales = torch.full((7, 3), math.nan)
        _core.quant_quantize(0, -1, 0, 4, 7, 96, 32, 1.0, x.data_ptr(), a.data_ptr(), codes.data_ptr(), scales.data_ptr())
        outs.append((codes, scales))
        out = torch.full((7, 96), math.nan)
        _core.quant_dequantize(0, -1, 0, 4, 7, 96, 32, codes.data_ptr(), scales.data_ptr(), a.data_ptr(), out.data_ptr())
        assert torch.isfinite(out).all()
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_empty_and_non_contiguous():
    for shape in ((0, 16), (3, 0), (0,), (2, 0, 8)):
        x = torch.randn(shape)
        q = power_quantize(x, 0.5, 4, None)
        xh = power_dequantize(q)
        assert xh.shape == x.shape
    x = randn((16, 32), F32, 1).t()  # non-contiguous [32, 16]
    q = power_quantize(x, 0.7, 4, 8)
    check_codes(q, x.contiguous(), 0.7, 4, 8)


def test_deterministic_across_threads(num_threads):
    x = randn((300, 512), F32, 2)
    a = torch.rand(300) * 0.9 + 0.1
    res = []
    for t in (1, 2, 3):
        lmkern.set_num_threads(t)
        q = power_quantize(x, a, 4, 64)
        res.append((q.codes, q.scales, power_dequantize(q), power_fake_quantize(x, a, 4, 64)))
    for r in res[1:]:
        for u, v in zip(r, res[0]):
            assert torch.equal(u, v)


# ------------------------------------------------------------------------------------------------
# fake quantization and its straight-through gradients
# ------------------------------------------------------------------------------------------------


@st.composite
def fake_cases(draw):
    dtype = draw(st.sampled_from([F64, F32, BF16, F16]))
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    n = draw(st.sampled_from([1, 5, 16, 48, 128, 300]))
    g = draw(st.sampled_from([d for d in (1, 4, 8, 16, 64, n) if n % d == 0]))
    rows = draw(st.integers(1, 6))
    per_row = draw(st.booleans())
    clip = draw(st.sampled_from([1.0, 0.8]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, bits, rows, n, g, per_row, clip, seed


@given(fake_cases())
def test_fake_quantize_forward_and_grads_match_reference(case):
    dtype, bits, rows, n, g, per_row, clip, seed = case
    x = randn((rows, n), dtype, seed)
    x.view(-1)[seed % x.numel()] = 0
    gen = torch.Generator().manual_seed(seed + 1)
    a0 = (torch.rand(rows if per_row else (), generator=gen) * 0.9 + 0.1).to(F32)
    a = a0.clone().requires_grad_(True)
    xx = x.clone().requires_grad_(True)
    y = power_fake_quantize(xx, a, bits, g, clip)
    # Forward: bit for bit the dequantized quantization.
    assert torch.equal(y.detach(), power_dequantize(power_quantize(x, a0, bits, g, clip)))
    _, _, near = quantize_ref(x, a0.to(F64), bits, g, clip)
    dy = randn((rows, n), dtype, seed + 2)
    dy[near] = 0  # elements on a code boundary may take the other code: leave them out of the check
    dx, da = torch.autograd.grad(y, (xx, a), dy)
    _, dx_ref, da_ref = fake_quantize_grads_ref(x, a0.to(F64), dy, bits, g, clip)
    assert dx.dtype == dtype and da.shape == a.shape and da.dtype == F32
    assert rel_err(dx, dx_ref) <= TOL[dtype]
    da_ref = da_ref if per_row else da_ref.sum()
    # da is summed in float64 from float64 per-element terms and stored as float32.
    assert rel_err(da, da_ref) <= (1e-5 if dtype == F64 else TOL[dtype]) or (da - da_ref).abs().max().item() < 1e-6 * dy.to(F64).abs().sum().item()


def test_fake_quantize_one_exponent_gradient_sums_rows_in_float64():
    # One (0-d) exponent over many rows: its gradient is the sum of the per-row gradients. Rows in
    # pairs whose gradients nearly cancel leave a total ~50x smaller than its terms, so a float32 sum
    # of 2048 per-row terms misses the float64 reference by ~3e-5; a float64 sum is within 1e-5.
    g = torch.Generator().manual_seed(0)
    half = torch.randn(1024, 64, generator=g) * 1e6
    x = torch.cat([half, half])
    d = torch.randn(1024, 64, generator=g)
    dy = torch.cat([d, -(d * 1.02)])
    _, _, near = quantize_ref(x, torch.tensor(0.6).to(F64), 4, 64)
    dy[near] = 0
    for dtype in (F32, F64, BF16):
        a = torch.tensor(0.6, dtype=dtype, requires_grad=True)
        (da,) = torch.autograd.grad(power_fake_quantize(x, a, 4, None), a, dy)
        _, _, rows_ref = fake_quantize_grads_ref(x, a.detach().to(F32).to(F64), dy, 4, 64)
        ref = rows_ref.sum().item()
        assert da.dtype == dtype and da.shape == ()
        tol = 8e-3 if dtype == BF16 else 1e-5  # a bfloat16 exponent gets its gradient rounded to bfloat16
        assert abs(da.item() - ref) <= tol * abs(ref), (dtype, da.item(), ref)


def test_fake_quantize_grads_finite_at_zero_small_a_and_zero_groups():
    x = torch.zeros(4, 32)
    x[1] = torch.linspace(-1, 1, 32)  # contains ±1 (u = 1) and values near 0
    x[2, :16] = torch.randn(16)       # second group of row 2 all zero
    x[3] = torch.randn(32) * 1e-30    # tiny values
    for a_val in (1.0, 0.5, 1e-2, 1e-4):
        a = torch.full((4,), a_val, requires_grad=True)
        xx = x.clone().requires_grad_(True)
        y = power_fake_quantize(xx, a, 4, 16)
        dx, da = torch.autograd.grad(y, (xx, a), torch.randn(4, 32))
        assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(da).all(), a_val
        assert (dx[0] == 0).all() and (dx[2, 16:] == 0).all()  # all-zero groups
        assert dx[1, 15:17].abs().sum() >= 0  # values near 0: finite (checked above)
    # a = 1: plain straight-through estimator: dx = dy where not clamped.
    xx = x.clone().requires_grad_(True)
    dy = torch.randn(4, 32)
    (dx,) = torch.autograd.grad(power_fake_quantize(xx, 1.0, 4, 16), xx, dy)
    nz = x != 0
    assert torch.equal(dx[nz], dy[nz])


def test_fake_quantize_clipped_elements_get_no_gradient():
    x = torch.tensor([[0.1, -0.5, 0.95, -1.0, 0.3, 2.0]])
    a = torch.tensor(0.7, requires_grad=True)
    xx = x.clone().requires_grad_(True)
    y = power_fake_quantize(xx, a, 4, None, clip=0.5)  # m = 1.0: |x| > 1 is clamped
    dx, da = torch.autograd.grad(y, (xx, a), torch.ones_like(x))
    assert dx[0, 5].item() == 0.0 and dx[0, 2].item() != 0.0
    _, dx_ref, da_ref = fake_quantize_grads_ref(x, 0.7, torch.ones_like(x), 4, 6, clip=0.5)
    assert rel_err(dx, dx_ref) <= 1e-5 and abs(da.item() - da_ref.sum().item()) <= 1e-5 * abs(da_ref.sum().item())


# ------------------------------------------------------------------------------------------------
# exponent search
# ------------------------------------------------------------------------------------------------

FINE = torch.linspace(lmkern.quant.SEARCH_LO, 1.0, 951, dtype=F64)
COARSE = torch.linspace(lmkern.quant.SEARCH_LO, 1.0, lmkern.quant.SEARCH_GRID, dtype=F64)  # the first stage of the search


@pytest.mark.parametrize("bits,g,dist", [(4, 128, "normal"), (3, 64, "laplace"), (4, None, "t"), (2, 32, "normal"), (8, 128, "t")])
def test_search_exponent_within_one_percent_of_brute_force(bits, g, dist):
    gen = torch.Generator().manual_seed(bits)
    rows, n = 12, 256
    if dist == "normal":
        w = torch.randn(rows, n, generator=gen)
    elif dist == "laplace":
        w = torch.distributions.Laplace(0.0, 1.0).sample((rows, n))
    else:
        w = torch.distributions.StudentT(3.0).sample((rows, n))
    gs = n if g is None else g
    a = search_exponent(w, bits, g)
    assert a.dtype == F32 and a.shape == (rows,) and ((a >= lmkern.quant.SEARCH_LO) & (a <= 1)).all()
    ours = errors_ref(w, a.to(F64), bits, gs)
    brute = brute_force_errors(w, bits, gs, FINE)
    # the broadcast brute force is the reference formula
    assert torch.allclose(brute[::190], torch.stack([errors_ref(w, float(v), bits, gs) for v in FINE[::190]]), rtol=1e-9)
    best = brute.min(0).values
    assert (ours <= best * 1.01 + 1e-12).all(), f"worst ratio {(ours / best).max().item():.4f}"
    # one exponent for the whole tensor
    a1 = search_exponent(w, bits, g, per_row=False)
    assert a1.shape == () and a1.dtype == F32
    tot = brute.sum(1)
    assert errors_ref(w, float(a1), bits, gs).sum() <= tot.min() * 1.01


@pytest.mark.parametrize("tokens", [16, 400])
def test_search_exponent_on_output_error(tokens):
    gen = torch.Generator().manual_seed(tokens)
    rows, n = 6, 128
    w = torch.randn(rows, n, generator=gen)
    x = torch.randn(tokens, n, generator=gen) * torch.linspace(0.1, 3.0, n)  # anisotropic activations
    a = search_exponent(w, 4, 32, x=x)
    ours = errors_ref(w, a.to(F64), 4, 32, x=x)
    brute = brute_force_errors(w, 4, 32, FINE, x=x)
    assert torch.allclose(brute[::300], torch.stack([errors_ref(w, float(v), 4, 32, x=x) for v in FINE[::300]]), rtol=1e-9)
    best = brute.min(0).values
    assert (ours <= best * 1.01 + 1e-9).all(), f"worst ratio {(ours / best).max().item():.4f}"
    assert search_exponent(w, 4, 32, x=x.reshape(2, tokens // 2, n)).allclose(a)
    # Any scale of x (near float32's limits too: the QR factor of such x overflowed) asks for the
    # same exponents.
    for c in (3e38 / x.abs().max().item(), 1e-30):
        assert torch.isfinite(x * c).all()
        assert search_exponent(w, 4, 32, x=x * c).allclose(a, atol=1e-6)
    # one exponent for the whole tensor, on the summed output error
    a1 = search_exponent(w, 4, 32, x=x, per_row=False)
    assert a1.shape == () and errors_ref(w, float(a1), 4, 32, x=x).sum() <= brute.sum(1).min() * 1.01


@given(st.sampled_from([2, 3, 4, 8]), st.integers(1, 4), st.sampled_from([1, 3, 17, 96]), st.sampled_from([1, 2, 70]),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_search_exponent_on_output_error_any_shape(bits, rows, n, tokens, whole_rows, seed):
    """Drawn shapes for the calibrated search: one column, one token, more tokens than columns (the
    QR path) and than the Rust side's block of 16 rows of x, a group of one row or of a few columns.
    Against the brute force over the search's own coarse grid: short rows with 8-bit codes have an
    output error that moves by tens of percent between exponents 0.001 apart, so neither grid's
    best is within 1% of the other's by design; the fixed-shape tests above hold it to FINE."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=gen)
    x = torch.randn(tokens, n, generator=gen)
    g = None if whole_rows or n == 1 else (n if n % 2 else n // 2)
    gs = n if g is None else g
    a = search_exponent(w, bits, g, x=x)
    assert a.shape == (rows,) and ((a >= lmkern.quant.SEARCH_LO) & (a <= 1)).all()
    ours = errors_ref(w, a.to(F64), bits, gs, x=x)
    best = brute_force_errors(w, bits, gs, COARSE, x=x).min(0).values
    assert (ours <= best * 1.01 + 1e-9 * (x.norm() * w.norm()) ** 2).all(), f"worst ratio {(ours / best).max().item():.4f}"


def test_search_exponent_zero_rows_and_bad_input():
    w = torch.zeros(3, 64)
    w[1] = torch.randn(64)
    a = search_exponent(w, 4, 32)
    assert a[0].item() == 1.0 and a[2].item() == 1.0 and 0 < a[1].item() <= 1
    # Empty rows have no error either (a = 1), with or without x; no rows, no exponents.
    for x in (None, torch.randn(5, 0)):
        assert torch.equal(search_exponent(torch.randn(3, 0), 4, x=x), torch.ones(3))
        assert search_exponent(torch.randn(3, 0), 4, x=x, per_row=False).item() == 1.0
    assert search_exponent(torch.randn(0, 4), 4, x=torch.randn(2, 4)).shape == (0,)
    w[1, 3] = math.nan
    with pytest.raises(ValueError, match="finite"):
        search_exponent(w, 4, 32)
    with pytest.raises(ValueError, match="last dimension"):
        search_exponent(torch.randn(3, 64), 4, 32, x=torch.randn(5, 63))
    for bad in (math.nan, math.inf):
        for tokens in (5, 70):  # 70 > 64 columns: through the QR of x first
            x = torch.randn(tokens, 64)
            x[tokens // 2, 7] = bad
            with pytest.raises(ValueError, match="x: expected finite"):
                search_exponent(torch.randn(3, 64), 4, 32, x=x)
    for kw in ({"grid": 1}, {"grid": True}, {"grid": 2.0}, {"grid": 2**17}, {"refine": -1}, {"refine": 2**13}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))}: expected an integer"):
            search_exponent(torch.randn(3, 64), 4, 32, **kw)


@pytest.mark.parametrize("tokens", [20, 70])
def test_search_exponent_rows_in_groups(tokens):
    """37 rows: the Rust side searches 16 at a time (each block of x read once for all of them), so
    two full groups and a partial one. Each row's exponent is the one it gets searched alone (the
    rows of a group share no sums), within 1% of the brute force; 20 tokens: a full block of 16
    and a partial one; 70 > 64 columns: through the QR of x."""
    gen = torch.Generator().manual_seed(tokens)
    w = torch.randn(37, 64, generator=gen) * torch.linspace(0.2, 2.0, 37)[:, None]
    w[5] = w[5] ** 3  # heavy-tailed rows prefer other exponents than their neighbours
    w[30] = w[30] ** 3
    x = torch.randn(tokens, 64, generator=gen)
    a = search_exponent(w, 4, 32, x=x)
    alone = torch.stack([search_exponent(w[i:i + 1], 4, 32, x=x)[0] for i in range(37)])
    assert torch.equal(a, alone)
    best = brute_force_errors(w, 4, 32, FINE, x=x).min(0).values
    ours = errors_ref(w, a.to(F64), 4, 32, x=x)
    assert (ours <= best * 1.01 + 1e-9).all(), f"worst ratio {(ours / best).max().item():.4f}"
    w[33, 1] = math.inf  # in the last group: the whole call raises
    with pytest.raises(ValueError, match="finite"):
        search_exponent(w, 4, 32, x=x)


@pytest.mark.parametrize("with_x", [False, True])
def test_search_exponent_per_tensor_over_many_rows(with_x):
    """One exponent for 300 rows (more than the Rust side's block of 256 rows whose errors it holds
    at once): within 1% of the brute force's best summed error, and the same on a second call. The
    first 256 rows are normal, the last 44 heavy-tailed: the best exponent of either part alone
    costs the whole 4-6% more, so a block left out of the sum fails."""
    gen = torch.Generator().manual_seed(300)
    w = torch.cat([torch.randn(256, 64, generator=gen), torch.randn(44, 64, generator=gen) ** 3 * 0.6])
    x = torch.randn(20, 64, generator=gen) if with_x else None
    a = search_exponent(w, 4, 32, x=x, per_row=False)
    assert a.shape == () and torch.equal(a, search_exponent(w, 4, 32, x=x, per_row=False))
    best = brute_force_errors(w, 4, 32, FINE, x=x).sum(1).min()
    assert errors_ref(w, float(a), 4, 32, x=x).sum() <= best * 1.01


def test_search_exponent_grid_and_refine():
    """refine=0 returns a point of the coarse grid itself; a finer grid (one holding the default's
    points) finds an error at most the default grid's best, on a short 8-bit row whose output error
    jumps between nearby exponents."""
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(1, 96, generator=gen), torch.randn(70, 96, generator=gen)
    a = search_exponent(w, 8, None, x=x, grid=2, refine=0)
    assert a.item() in (1.0, torch.tensor(lmkern.quant.SEARCH_LO, dtype=F32).item())
    a = search_exponent(w, 8, None, x=x, refine=0)
    assert (COARSE.to(F32) == a).any(), "refine=0 returned a point off the coarse grid"
    fine = search_exponent(w, 8, None, x=x, grid=8 * (lmkern.quant.SEARCH_GRID - 1) + 1)
    best = brute_force_errors(w, 8, 96, COARSE, x=x).min(0).values
    assert errors_ref(w, fine.to(F64), 8, 96, x=x) <= best * 1.001


# ------------------------------------------------------------------------------------------------
# PowerQuantLinear
# ------------------------------------------------------------------------------------------------


def _linear(in_f, out_f, bias, seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f, bias=bias)


@st.composite
def linear_cases(draw):
    dtype = draw(st.sampled_from([F32, BF16, F16, F64]))
    bits = draw(st.sampled_from([4, 4, 2, 3, 8]))
    in_f = draw(st.sampled_from([16, 32, 48, 128, 256, 7, 100, 40]))
    # Groups of 8 and 24 (multiples of 8, not of 16): the AVX2 2-/3-/8-bit kernels even on AVX-512.
    g = draw(st.sampled_from([d for d in (8, 16, 24, 32, 128, in_f) if in_f % d == 0]))
    out_f = draw(st.sampled_from([1, 5, 16, 33]))
    # 41 tokens: 8-token tiles + 1 (GEMV); 7 and 2 × 4 = 8: the input gradient's row tasks in tiles
    # of 4 (AVX-512, groups of multiples of 128); 3 × 17 = 51: Ŵ in chunks where the GEMV stops below.
    lead = draw(st.sampled_from([(1,), (2,), (3,), (4,), (5,), (2, 3), (7,), (2, 4), (0,), (), (41,), (3, 17)]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, bits, in_f, g, out_f, lead, bias, seed


@given(linear_cases())
def test_power_quant_linear_matches_dequantized_matmul(case):
    dtype, bits, in_f, g, out_f, lead, bias, seed = case
    lin = _linear(in_f, out_f, bias, seed % 1000)
    a = torch.rand(out_f, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.2
    mod = PowerQuantLinear.from_linear(lin, bits, g, a)
    w_hat = power_dequantize(mod.quantized).to(F64)
    x = randn(lead + (in_f,), dtype, seed).requires_grad_(True)
    y = mod(x)
    assert y.dtype == dtype and y.shape == lead + (out_f,)
    ref = linear_ref(x, w_hat, lin.bias)
    # Accumulation is float32 (float64 activations too): a dot product's rounding error scales with
    # Σ|x·w|, so the error is measured relative to max(‖ref‖, ‖|x|·|Ŵ|ᵀ‖) (cancelling sums).
    tol = 1e-5 if dtype == F64 else TOL[dtype]
    x64 = x.detach().to(F64)
    assert rel_err_floor(y, ref, (x64.abs() @ w_hat.abs().T).norm().item()) <= tol
    dy = randn(y.shape, dtype, seed + 1)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert dx.dtype == dtype and dx.shape == x.shape
    dy64 = dy.to(F64)
    assert rel_err_floor(dx, dy64 @ w_hat, (dy64.abs() @ w_hat.abs()).norm().item()) <= tol


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 7, 8, 13, 15, 40, 64])
def test_power_quant_linear_fast_path_large(tokens):
    """The AVX2 4-bit path (in and group multiples of 32) at a realistic width, every token tile
    (8, 4, 2, 1 and their mixes: 13 = 8 + 4 + 1, 15 = 8 + 4 + 2 + 1), and 64 tokens (dequantize +
    matmul)."""
    lin = _linear(1024, 96, True, 0)
    mod = PowerQuantLinear.from_linear(lin, 4, 128)
    w_hat = mod.dequantized_weight().to(F64)
    x = randn((tokens, 1024), F32, tokens)
    assert rel_err(mod(x), linear_ref(x, w_hat, lin.bias)) <= 1e-5
    assert rel_err(mod(x.to(BF16)), linear_ref(x.to(BF16), w_hat, lin.bias)) <= 1e-2


@pytest.mark.parametrize("tokens", [1, 3, 4, 9])
@pytest.mark.parametrize("bits, in_f, g", [(8, 1024, 128), (8, 48, 16), (8, 4096, 4096), (3, 1024, 128), (3, 24, 8),
                                           (3, 4096, 4096), (2, 1024, 128), (2, 40, 8), (2, 16, 16)])
def test_power_quant_linear_8bit_and_small_fast_paths(bits, in_f, g, tokens):
    """The AVX2 8-bit GEMV (group multiple of 16) and 2-/3-bit GEMV (group multiple of 8): token
    tiles of 4 and 1, one group per row, rows whose last unit is assembled byte by byte."""
    lin = _linear(in_f, 37, True, tokens)
    mod = PowerQuantLinear.from_linear(lin, bits, g, a=torch.linspace(0.3, 1.0, 37))
    w_hat = mod.dequantized_weight().to(F64)
    x = randn((tokens, in_f), F32, tokens + in_f)
    with torch.no_grad():
        assert rel_err(mod(x), linear_ref(x, w_hat, lin.bias)) <= 1e-5
        assert rel_err(mod(x.to(BF16)), linear_ref(x.to(BF16), w_hat, lin.bias)) <= 1e-2


@pytest.mark.parametrize("in_f, g, out_f, tokens", [
    (32, 32, 1, 1), (64, 32, 17, 3), (256, 64, 33, 5), (4096, 128, 19, 2), (384, 384, 16, 1), (160, 32, 31, 4),
    (64, 64, 3, 12), (4096, 128, 17, 9), (384, 384, 5, 8),
])
def test_power_quant_linear_fast_path_edges(in_f, g, out_f, tokens):
    """The AVX2 kernel at its edges: one block per group, 64- and 384-wide groups (two and six
    prefetched lines), rows not a multiple of the 16-row tile (the prefetches run past the buffers),
    token tiles of 8, 4, 2 and 1 (and a single last token); float32 and bfloat16 activations."""
    lin = _linear(in_f, out_f, True, in_f + out_f)
    a = torch.rand(out_f, generator=torch.Generator().manual_seed(out_f)) * 0.8 + 0.2
    mod = PowerQuantLinear.from_linear(lin, 4, g, a)
    w_hat = mod.dequantized_weight().to(F64)
    x = randn((tokens, in_f), F32, in_f + tokens)
    with torch.no_grad():
        assert rel_err(mod(x), linear_ref(x, w_hat, lin.bias)) <= 1e-5
        assert rel_err(mod(x.to(BF16)), linear_ref(x.to(BF16), w_hat, lin.bias)) <= 1e-2


@pytest.mark.parametrize("in_f, out_f, bits", [(8, 0, 4), (0, 3, 4), (16, 0, 8), (0, 3, 8)])
@pytest.mark.parametrize("lead", [(0,), (1,), (2, 5), (100,)])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_power_quant_linear_empty_weight(in_f, out_f, bits, lead):
    """A layer with no outputs or no inputs: y is empty, or the bias alone; dx has x's shape (zeros
    without outputs), at every token count (100: past the fused kernels' token limit; 8-bit with
    16 inputs: the input gradient's row tasks at 1 token, none of them here)."""
    mod = PowerQuantLinear.from_linear(_linear(in_f, out_f, True, 3), bits, None)
    x = torch.randn(*lead, in_f, requires_grad=True)
    y = mod(x)
    assert y.shape == (*lead, out_f)
    assert torch.equal(y.detach(), mod.bias.detach().expand(*lead, out_f))
    (y * 2).sum().backward()
    assert x.grad.shape == x.shape and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [F32, BF16, F64])
@pytest.mark.parametrize("in_f, g, out_f, bits", [(256, 64, 37, 4), (96, 32, 10, 3), (40, 8, 9, 8), (48, 16, 7, 2)])
def test_power_quant_linear_many_tokens_in_chunks(monkeypatch, dtype, in_f, g, out_f, bits):
    """Past cpu_gemv_max_tokens tokens (the backward: cpu_bwd_gemv_max_tokens, 0 for shapes
    without its SIMD kernels) Ŵ is formed a chunk of rows at a time: with chunks of 4 rows (a
    short last one), y and dx match the float64 reference on both sides of each threshold, and the
    forward agrees with the GEMV."""
    from lmkern.ops import quant as quant_ops

    four_rows = 4 * in_f * (8 if dtype == F64 else 4)
    monkeypatch.setattr(quant_ops, "CPU_CHUNK_BYTES", four_rows)
    monkeypatch.setattr(quant_ops, "CPU_CHUNK_MAX_BYTES", four_rows)
    lin = _linear(in_f, out_f, True, in_f)
    a = torch.rand(out_f, generator=torch.Generator().manual_seed(out_f)) * 0.8 + 0.2
    mod = PowerQuantLinear.from_linear(lin, bits, g, a)
    w_hat = mod.dequantized_weight().to(F64)
    tol = 1e-5 if dtype == F64 else TOL[dtype]
    limit, bwd_limit = quant_ops.cpu_gemv_max_tokens(bits, in_f, g), quant_ops.cpu_bwd_gemv_max_tokens(bits, in_f, g)
    for tokens in sorted({bwd_limit, bwd_limit + 1, limit, limit + 1, 300}):
        x = randn((tokens, in_f), dtype, tokens).requires_grad_(True)
        y = mod(x)
        x64 = x.detach().to(F64)
        assert y.dtype == dtype
        assert rel_err_floor(y, linear_ref(x, w_hat, lin.bias), (x64.abs() @ w_hat.abs().T).norm().item()) <= tol
        dy = randn(y.shape, dtype, tokens + 1)
        (dx,) = torch.autograd.grad(y, x, dy)
        dy64 = dy.to(F64)
        assert dx.dtype == dtype
        assert rel_err_floor(dx, dy64 @ w_hat, (dy64.abs() @ w_hat.abs()).norm().item()) <= tol
    # Both forward paths on the same tokens.
    x = randn((limit + 1, in_f), dtype, 7)
    with torch.no_grad():
        y_mm = mod(x)
        y_gemv = torch.cat([mod(x[:limit]), mod(x[limit:])])
    assert rel_err(y_mm.to(F64), y_gemv.to(F64)) <= tol


@pytest.mark.parametrize("dtype", [F32, F64])
def test_weight_chunks_as_large_as_the_activations(monkeypatch, dtype):
    """A chunk of Ŵ is as many bytes as the activations it multiplies, within CPU_CHUNK_BYTES and
    CPU_CHUNK_MAX_BYTES, and the chunks are Ŵ's rows in order, each equal to the whole's."""
    from lmkern.ops import quant as quant_ops

    in_f, out_f, g = 64, 37, 16
    row = in_f * dtype.itemsize
    monkeypatch.setattr(quant_ops, "CPU_CHUNK_BYTES", 2 * row)
    monkeypatch.setattr(quant_ops, "CPU_CHUNK_MAX_BYTES", 10 * row)
    mod = PowerQuantLinear.from_linear(_linear(in_f, out_f, False, 1), 4, g)
    w_hat = quant_ops._dequantize_codebooks(mod.codes, mod.scales, mod.codebook, 4, g, in_f, dtype)
    for act_rows, step in [(0, 2), (1, 2), (2, 2), (7, 7), (10, 10), (11, 10), (500, 10)]:
        acts = torch.empty(act_rows, in_f, dtype=dtype)
        got = [(o0, o1, w.clone()) for o0, o1, w in quant_ops._weight_chunks(
            mod.codes, mod.scales, mod.codebook, 4, g, in_f, dtype, acts)]
        assert [(o0, o1) for o0, o1, _ in got] == [(o, min(out_f, o + step)) for o in range(0, out_f, step)]
        for o0, o1, w in got:
            assert torch.equal(w, w_hat[o0:o1])


@pytest.mark.parametrize("bits, in_f, g", [(4, 256, 64), (3, 96, 32)])
def test_power_quant_linear_nan_codebook_row_propagates_on_every_path(bits, in_f, g):
    """The layer reads its codebooks unchecked: a NaN codebook row gives NaN in that output column
    and, in the input gradient, NaN everywhere (NaN·0 is NaN), whichever path the token count takes
    (GEMV or chunks forward; transposed GEMV or chunks backward)."""
    from lmkern.ops import quant as quant_ops

    mod = PowerQuantLinear.from_linear(_linear(in_f, 12, False, bits), bits, g, a=0.7)
    table = mod.codebook.clone()
    table[5] = math.nan
    for tokens in (2, quant_ops.cpu_bwd_gemv_max_tokens(bits, in_f, g) + 1, quant_ops.cpu_gemv_max_tokens(bits, in_f, g) + 1):
        x = randn((tokens, in_f), F32, tokens)
        y = quant_ops.quant_linear(x, mod.codes, mod.scales, table, None, bits, g, in_f)
        assert y[:, 5].isnan().all() and not y[:, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]].isnan().any(), tokens
        dy = torch.zeros((tokens, 12))
        dy[:, 0] = 1.0
        dx = torch.ops.lmkern.power_quant_linear_backward(dy, mod.codes, mod.scales, table, bits, g, in_f)
        assert dx.isnan().all(), tokens


def test_power_quant_linear_eager_path_matches_op(monkeypatch):
    """Eager calls on CPU skip the dispatcher (lmkern.ops.quant.quant_linear; with a gradient wanted
    through _LinearFunction, whose backward runs _linear_bwd): they must give the op's exact
    results and gradients, and every other call (a transform, tracing) must still go through the op."""
    from lmkern.ops import quant as quant_ops

    lin = _linear(256, 40, True, 5)
    mod = PowerQuantLinear.from_linear(lin, 4, 64, a=0.6)
    calls, bwd_calls = [], []
    direct, direct_bwd = quant_ops._linear, quant_ops._linear_bwd

    def spy(*args):
        calls.append(args[0].shape)
        return direct(*args)

    def spy_bwd(*args):
        bwd_calls.append(args[0].shape)
        return direct_bwd(*args)

    # The op keeps the implementations it registered.
    monkeypatch.setattr(quant_ops, "_linear", spy)
    monkeypatch.setattr(quant_ops, "_linear_bwd", spy_bwd)
    for x in (randn((3, 256), F32, 0), randn((2, 3, 256), BF16, 1), randn((256, 3), F16, 2).t(), randn((1, 256), F64, 3)):
        want = torch.ops.lmkern.power_quant_linear(x, mod.codes, mod.scales, mod.codebook, mod.bias, 4, 64, 256)
        calls.clear()
        with torch.no_grad():
            got = mod(x)
        assert calls == [x.shape], "an eager no-grad call should skip the dispatcher"
        assert got.dtype == x.dtype and torch.equal(got, want)
    # With a gradient: the same output, dx and bias gradient as the op's autograd.
    xg = randn((2, 256), F32, 4).requires_grad_(True)
    bias = mod.bias.clone().requires_grad_(True)
    dy = randn((2, 40), F32, 5)
    args = (mod.codes, mod.scales, mod.codebook, bias, 4, 64, 256)
    want = torch.ops.lmkern.power_quant_linear(xg, *args)
    want_dx, want_db = torch.autograd.grad(want, (xg, bias), dy, retain_graph=True)
    calls.clear()
    y = quant_ops.quant_linear(xg, *args)
    assert calls == [xg.shape] and type(y.grad_fn).__name__ == "_LinearFunctionBackward"
    dx, db = torch.autograd.grad(y, (xg, bias), dy)
    assert bwd_calls == [dy.shape] and torch.equal(y, want) and torch.equal(dx, want_dx) and torch.equal(db, want_db)
    # Batched gradients (no storage) through the backward op, one at a time (vmap's fallback, which
    # warns that it is slow).
    dys = randn((3, 2, 40), F32, 6)
    bwd_calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        (dxs,) = torch.autograd.grad(quant_ops.quant_linear(xg, *args), xg, dys, is_grads_batched=True)
    assert bwd_calls == [] and torch.allclose(dxs[1], torch.autograd.grad(want, xg, dys[1], retain_graph=True)[0])
    # A second derivative raises (the backward is not differentiable), as through the op.
    (dx,) = torch.autograd.grad(quant_ops.quant_linear(xg, *args).square().sum(), xg, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        dx.sum().backward()
    # Under a transform the op runs (torch.func.vmap of the op's implementation, not this path).
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.func.vmap(lambda r: quant_ops.quant_linear(r, *args[:3], None, 4, 64, 256))(xg.detach())
    assert calls == []
    calls.clear()
    with torch.inference_mode():
        assert torch.equal(mod(xg.detach()), mod(xg).detach()) and calls == [xg.shape] * 2
    # The quantized weight refuses a gradient.
    with pytest.raises(NotImplementedError, match="frozen"):
        quant_ops.quant_linear(xg.detach(), mod.codes, mod.scales.clone().requires_grad_(True), mod.codebook, None,
                               4, 64, 256).sum().backward()
    # A non-contiguous x and bad input take the full checks on the eager path too.
    with pytest.raises(ValueError, match="in_features"):
        with torch.no_grad():
            mod(torch.randn(2, 255))
    with pytest.raises(ValueError, match="scales"):
        with torch.no_grad():
            quant_ops.quant_linear(xg.detach(), mod.codes, mod.scales[:, :2], mod.codebook, None, 4, 64, 256)
    # The layer's own call: with a gradient wanted through _LinearFunction; under a dispatch or a
    # function mode the mode sees the op (the eager path, spied, is not taken).
    calls.clear()
    assert type(mod(xg).grad_fn).__name__ == "_LinearFunctionBackward" and calls == [xg.shape]
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class SeenFn(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    for mode in (Seen, SeenFn):
        seen = []
        calls.clear()
        with torch.no_grad(), mode():
            got = mod(xg.detach())
        assert any("power_quant_linear" in f for f in seen) and calls == [], (mode, seen)
        assert torch.equal(got, want.detach())


def _avx512_half_width():
    """This CPU runs AVX-512 at half width (AMD family 19h, Zen 4), read from /proc/cpuinfo."""
    with open("/proc/cpuinfo") as f:
        info = f.read()
    vendor = re.search(r"^vendor_id\s*:\s*(\S+)", info, re.M).group(1)
    family = int(re.search(r"^cpu family\s*:\s*(\d+)", info, re.M).group(1))
    return vendor == "AuthenticAMD" and family == 0x19


def test_cpu_gemv_token_limit_follows_the_avx512_shape():
    """power_quant_linear on CPU: the fused GEMV where the AVX-512 4-bit kernel runs (4 bits,
    in_features and the group size multiples of 32, an AVX-512 CPU) up to 1024 tokens on a CPU
    with half-width AVX-512, 64 on a full-width one; elsewhere up to 48, 32 on a full-width AVX-512
    CPU; on a full-width one the row-blocked kernel of 2-4-bit codes in groups of multiples of 128
    (3 bits: with AVX512-VBMI) up to 96 tokens (4-bit) and 64; its backward likewise (the rules
    live in lmkern-core)."""
    from lmkern.ops import quant as quant_ops

    limit = _core.quant_cpu_gemv_max_tokens
    avx512 = lmkern.cpu_isa() == "avx512"
    half = avx512 and _avx512_half_width()
    rows = avx512 and not half  # the row-blocked kernel's limits apply
    vbmi = False
    if rows:  # (an AVX-512 CPU: Linux's /proc/cpuinfo, as _avx512_half_width reads)
        with open("/proc/cpuinfo") as f:
            vbmi = " avx512vbmi " in f.read().replace("\n", " ")
    wide = (1024 if half else 64) if avx512 else 48
    other = 32 if avx512 and not half else 48
    assert limit(4, 4096, 128) == (96 if rows else wide) and limit(4, 4096, 32) == wide
    assert limit(4, 4096, 4096) == (96 if rows else wide) and limit(4, 4096, 64) == wide
    assert limit(4, 4112, 16) == other and limit(4, 48, 16) == other
    assert limit(2, 4096, 128) == (64 if rows else other) and limit(2, 4096, 64) == other
    assert limit(3, 4096, 256) == (64 if rows and vbmi else other) and limit(3, 4096, 64) == other
    assert limit(8, 4096, 128) == other
    assert quant_ops.cpu_gemv_max_tokens(4, 4096, 128) == limit(4, 4096, 128)
    # The input gradient's transposed GEMV: 4 bits with AVX-512 512 at half width, 64 at full
    # width, 24 otherwise; 2, 3 and 8 bits with AVX-512 (in_features and the group size multiples of
    # 16) 48 at half width, 32 at full width, 16 with AVX2 (of 8); 0 for other shapes.
    bwd = _core.quant_cpu_bwd_gemv_max_tokens
    assert bwd(4, 4096, 128) == ((512 if half else 64) if avx512 else 24) and bwd(4, 4096, 32) == bwd(4, 4096, 128)
    assert bwd(4, 4112, 16) == 0
    avx2 = lmkern.cpu_isa() in ("avx2", "avx512")
    for bits in (2, 3, 8):
        assert bwd(bits, 4096, 128) == ((48 if half else 32) if avx512 else 16 if avx2 else 0) and bwd(bits, 4112, 16) == bwd(bits, 4096, 128)
        assert bwd(bits, 40, 8) == (16 if avx2 else 0) and bwd(bits, 4104, 24) == bwd(bits, 40, 8)
        assert bwd(bits, 36, 12) == 0
    assert quant_ops.cpu_bwd_gemv_max_tokens(4, 4096, 128) == bwd(4, 4096, 128)


def test_cuda_gemv_token_limit_follows_the_tensor_core_shape():
    """power_quant_linear on CUDA: the fused GEMV up to 32 tokens where the tensor-core kernel fits
    (bfloat16/float16, 4 bits, in_features and the group size multiples of 128), up to 8 elsewhere
    (the rule lives in lmkern-core; the CUDA tests check the kernels it picks)."""
    codes = lmkern._lib.DTYPE_CODES
    limit = _core.quant_cuda_gemv_max_tokens
    for dtype in (torch.bfloat16, torch.float16):
        assert limit(codes[dtype], 4, 4096, 128) == 32
        assert limit(codes[dtype], 4, 4096, 4096) == 32
        assert limit(codes[dtype], 4, 4096, 64) == 8
        assert limit(codes[dtype], 4, 4160, 4160) == 8
        assert limit(codes[dtype], 8, 4096, 128) == 8
        assert limit(codes[dtype], 3, 4096, 128) == 8
    assert limit(codes[torch.float32], 4, 4096, 128) == 8


def test_quantized_tensor_to_device():
    """PowerQuantized.to moves every tensor field (here to the meta device, which any machine has)
    and nothing else; to its own device it is the same object. tests/test_quant_cuda.py checks the
    round trip through a GPU."""
    q = power_quantize(torch.randn(6, 64), torch.full((6,), 0.6), 4, 32)
    assert q.device == torch.device("cpu") and q.to("cpu") is q
    m = q.to("meta")
    assert type(m) is type(q) and m.device.type == "meta"
    assert all(t.is_meta for t in (m.codes, m.scales, m.exponent))
    assert (m.shape, m.dtype, m.bits, m.group_size) == (q.shape, q.dtype, q.bits, q.group_size)
    assert m.codes.shape == q.codes.shape and m.codes.dtype == torch.uint8 and m.exponent.dtype == torch.float32
    # Not a device: a clear error, never a cast of the codes.
    with pytest.raises(TypeError, match="device: expected"):
        q.to(torch.float16)
    with pytest.raises(RuntimeError):
        q.to("nonsense")


def test_quantized_tensor_loads_with_weights_only():
    """torch.save / torch.load of a PowerQuantized with torch's safe loader (weights_only=True, its
    default): the type is allow-listed, the values identical; a rebuilt value whose fields disagree
    is refused with a clear error before any kernel reads it."""
    q = power_quantize(torch.randn(3, 5, 64, dtype=torch.bfloat16), torch.rand(15) * 0.5 + 0.4, 3, 16)
    buf = io.BytesIO()
    torch.save({"layer.q": q}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)["layer.q"]
    assert type(back) is PowerQuantized
    assert (back.shape, back.dtype, back.bits, back.group_size) == (q.shape, q.dtype, q.bits, q.group_size)
    assert all(torch.equal(getattr(back, f), getattr(q, f)) for f in ("codes", "scales", "exponent"))
    assert torch.equal(power_dequantize(back), power_dequantize(q))
    with pytest.raises(ValueError, match=r"q: its codes \(15, 24\) do not hold the rows of its shape"):
        power_dequantize(dataclasses.replace(q, shape=torch.Size([3, 4, 64])))
    with pytest.raises(TypeError, match="q.codes: expected a torch.Tensor; got int"):
        power_dequantize(dataclasses.replace(q, codes=7))


def test_power_quant_linear_state_dict_round_trip():
    lin = _linear(256, 40, True, 1)
    mod = PowerQuantLinear.from_linear(lin, 4, 64)  # exponents searched
    assert not torch.all(mod.exponent == 1.0)
    sd = mod.state_dict()
    assert set(sd) == {"codes", "scales", "exponent", "bias"}
    fresh = PowerQuantLinear(256, 40, bias=True, bits=4, group_size=64)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 256)
    assert torch.equal(fresh(x), mod(x))
    assert "bits=4" in repr(fresh) and list(mod.parameters()) == []
    assert torch.equal(fresh.codebook, mod.codebook)
    # The whole module pickled (torch.save(model)) and deep-copied.
    buf = io.BytesIO()
    torch.save(mod, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(mod)):
        assert torch.equal(other(x), mod(x))
        # Its load hook survived the copy: new exponents give new codebooks.
        other.load_state_dict({**sd, "exponent": torch.full_like(mod.exponent, 0.5)})
        assert torch.equal(other.codebook, torch.ops.lmkern.power_codebook(torch.full_like(mod.exponent, 0.5), 4))


@pytest.mark.parametrize("in_features", [1, 2, 3, 4, 5, 6])
def test_power_quant_linear_refuses_a_checkpoint_of_other_bits(in_features):
    """For in_features <= 6 the codes of two bit widths can have one shape, so the shapes cannot
    tell: the bits and group size saved in the state dict's metadata (kept by torch.save) refuse
    the load, in a nested module too, before anything is copied."""
    from lmkern.ops.quant import row_bytes

    nn = torch.nn
    src_bits, dst_bits = next((a, b) for a in (2, 3, 4) for b in (3, 4, 8)
                              if a < b and row_bytes(in_features, a) == row_bytes(in_features, b))
    src = nn.Sequential(PowerQuantLinear(in_features, 3, bits=src_bits, group_size=None))
    with torch.no_grad():
        src[0].codes.random_(0, 256)
        src[0].scales.uniform_(0.5, 1.0)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    dst = nn.Sequential(PowerQuantLinear(in_features, 3, bits=dst_bits, group_size=None))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=rf"0\.: the checkpoint was saved from a PowerQuantLinear with bits={src_bits}; "
                                         rf"this module has bits={dst_bits}"):
        dst.load_state_dict(sd)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k
    same = nn.Sequential(PowerQuantLinear(in_features, 3, bits=src_bits, group_size=None))
    same.load_state_dict(sd)
    assert torch.equal(same[0].codes, src[0].codes)
    if in_features in (4, 6):  # a group size of another checkpoint: said as plainly
        grouped = PowerQuantLinear(in_features, 3, bits=src_bits, group_size=2).state_dict()
        with pytest.raises(ValueError, match=rf"group_size=2; this module has group_size={in_features}"):
            PowerQuantLinear(in_features, 3, bits=src_bits, group_size=None).load_state_dict(grouped)


def test_power_quant_linear_codebook_follows_its_exponents():
    """The cached codebook is rebuilt when the exponents are written without load_state_dict: into
    the state-dict tensors in place (torch.distributed.checkpoint.load does so), swapped by
    torch.func.functional_call, assigned. Moving the module keeps it (no rebuild)."""
    x = torch.randn(3, 64)

    def expected(mod):  # a copy whose codebook is rebuilt explicitly
        ref = copy.deepcopy(mod)
        ref.refresh_codebook()
        return ref(x)

    src = PowerQuantLinear.from_linear(_linear(64, 8, True, 11), 4, 16, a=0.55)
    dst = PowerQuantLinear.from_linear(_linear(64, 8, True, 12), 4, 16, a=0.9)
    want, own = src(x), dst(x)
    # functional_call with the other module's state, then the module's own again
    assert torch.equal(torch.func.functional_call(dst, src.state_dict(), (x,)), want)
    assert torch.equal(dst(x), own)
    # in place into the state dict's tensors
    with torch.no_grad():
        for name, t in dst.state_dict().items():
            t.copy_(src.state_dict()[name])
    assert torch.equal(dst(x), want)
    # in place into the exponents alone, and an assigned tensor
    with torch.no_grad():
        dst.exponent.fill_(0.7)
    assert torch.equal(dst(x), expected(dst))
    assert torch.equal(dst.codebook, torch.ops.lmkern.power_codebook(torch.full((8,), 0.7), 4))
    dst.exponent = torch.full((8,), 0.6)
    assert torch.equal(dst(x), expected(dst))
    with torch.no_grad():
        dst.exponent[3] = 2.0
    with pytest.raises(ValueError, match=r"expected exponents in \(0, 1\]"):
        dst(x)
    with torch.no_grad():
        dst.exponent[3] = 0.6
    torch.testing.assert_close(dst(x), torch.nn.functional.linear(x, dst.dequantized_weight(), dst.bias))
    # a module pickled before the codebook was tracked (no _book_of) rebuilds it once, and works
    old = copy.deepcopy(dst)
    del old.__dict__["_book_of"]
    buf = io.BytesIO()
    torch.save(old, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False).to("cpu")(x), dst(x))
    # a move keeps the codebook current: no rebuild (a rebuild would replace this marker)
    with torch.no_grad():
        dst.codebook[0, 0] = 123.0
    moved = dst.to(torch.float16)
    assert moved.codebook[0, 0] == 123.0 and moved._book_current()


def test_power_quant_linear_reset_parameters_after_to_empty():
    """As torch's layers: built on meta, to_empty (garbage), reset_parameters gives the new module's
    state (Ŵ = 0, exponents 1, bias 0) with a codebook of those exponents."""
    with torch.device("meta"):
        mod = PowerQuantLinear(64, 8, bits=3, group_size=16)
    mod.to_empty(device="cpu")
    mod.reset_parameters()
    fresh = PowerQuantLinear(64, 8, bits=3, group_size=16)
    for name, t in fresh.state_dict().items():
        assert torch.equal(mod.state_dict()[name], t), name
    assert torch.equal(mod.codebook, fresh.codebook)
    assert torch.equal(mod(torch.randn(2, 64)), torch.zeros(2, 8))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # deprecated since torch 2.10: still used
def test_power_quant_linear_fx_trace_and_script():
    """torch.fx.symbolic_trace keeps the layer's call as one leaf (its dtype and autocast checks
    cannot run on symbolic values); jit.script says what to use instead."""
    model = torch.nn.Sequential(PowerQuantLinear.from_linear(_linear(64, 32, True, 1), 4, 16, a=0.6), torch.nn.ReLU(),
                                PowerQuantLinear.from_linear(_linear(32, 8, False, 2), 3, 32, a=0.8))
    gm = torch.fx.symbolic_trace(model)
    assert sum(node.op == "call_function" and node.target.__name__ == "_quant_linear_forward"
               for node in gm.graph.nodes) == 2
    x = torch.randn(5, 64)
    assert torch.equal(gm(x), model(x))
    with pytest.raises(RuntimeError, match="cannot be scripted"):
        torch.jit.script(model)


def test_search_exponent_compiles_in_one_graph():
    """search_exponent with calibration activations traces under torch.compile(fullgraph=True)
    (x's scaling is a torch.where, not a branch on a value); same exponents as eager."""
    w, x = torch.randn(16, 64), torch.randn(40, 64)
    f = lambda w, x: search_exponent(w, 4, 16, x=x)  # noqa: E731
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(cf(w, x), f(w, x))
    zeros = torch.zeros(40, 64)  # max|x| = 0: the torch.where keeps x as it is
    assert torch.equal(cf(w, zeros), f(w, zeros)) and torch.isfinite(f(w, zeros)).all()


def test_compile_dynamic_row_length_is_one_graph():
    """Under torch.compile(dynamic=True) a new row length compiles nothing new (group_size, n and
    in_features are SymInts in the op schemas: as ints they fixed the width, a graph per width), and
    the compiled values and gradients are eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def fake_quant(x):
        return power_fake_quantize(x, 0.6, 4, None)

    def fake_quant_grouped(x):
        return power_fake_quantize(x, torch.full((x.shape[0],), 0.7), 3, 16)

    def round_trip(x):
        return power_dequantize(power_quantize(x, 0.6, 4, 32))

    for f in (fake_quant, fake_quant_grouped, round_trip):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        cf = torch.compile(f, backend=counter, dynamic=True, fullgraph=True)
        for n in (64, 96, 160):
            x = torch.randn(5, n, requires_grad=f is not round_trip)
            want, got = f(x), cf(x)
            assert torch.equal(got, want), (f.__name__, n)
            if x.requires_grad:
                dy = torch.randn_like(want)
                assert torch.equal(torch.autograd.grad(got, x, dy)[0], torch.autograd.grad(want, x, dy)[0])
            if n == 64:
                compiled = counter.frame_count  # the first call's graphs (the fake quantizer's backward: 2)
        assert counter.frame_count == compiled, (f.__name__, compiled, counter.frame_count)


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")  # the graph breaks at the numpy ints
def test_numpy_scalars_under_compile():
    """numpy scalars from a config inside torch.compile: Dynamo hands them to the checks as 0-d
    arrays, which numbers.Integral/Real do not include (valid bits were called invalid)."""
    import numpy as np

    cfg = {"a": np.float64(0.6), "bits": np.int64(4), "group": np.int32(16), "clip": np.float32(0.9)}
    x = torch.randn(4, 32)
    for f in (lambda x: power_fake_quantize(x, cfg["a"], cfg["bits"], cfg["group"], cfg["clip"]),
              lambda x: power_dequantize(power_quantize(x, cfg["a"], cfg["bits"], cfg["group"], cfg["clip"])),
              lambda x: search_exponent(x, cfg["bits"], cfg["group"])):
        torch._dynamo.reset()
        assert torch.equal(torch.compile(f, backend="aot_eager")(x), f(x))


def test_functions_fx_trace_as_leaves():
    """A module calling lmkern.quant's functions by their module traces with torch.fx.symbolic_trace,
    each call one node (their checks cannot run on fx's symbolic values)."""

    class QAT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(24, 64))
            self.a = torch.nn.Parameter(torch.full((24,), 0.7))

        def forward(self, x):
            q = lmkern.quant.power_quantize(self.w, 0.6, 4, 32)
            w = lmkern.quant.power_fake_quantize(self.w, self.a, 4, 32) + lmkern.quant.power_dequantize(q)
            return x @ w.t() * lmkern.quant.search_exponent(self.w, 4, 32).mean()

    model = QAT()
    gm = torch.fx.symbolic_trace(model)
    targets = [node.target for node in gm.graph.nodes if node.op == "call_function"]
    for fn in (power_quantize, power_dequantize, power_fake_quantize, search_exponent):
        assert targets.count(fn) == 1, fn.__name__
    x = torch.randn(3, 64)
    assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_power_quant_linear_bias_gradient(dtype):
    """A bias made to require a gradient (bias-only tuning of a quantized model) gets dy summed over
    every token (float64 reference), eager and compiled alike, with or without x's gradient; the
    quantized weight still takes none."""
    layer = PowerQuantLinear.from_linear(_linear(64, 24, True, 7), 4, 32, a=0.7)
    layer.bias.requires_grad_(True)
    for x_grad in (False, True):
        x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=x_grad)
        dy = torch.randn(3, 5, 24, dtype=dtype)
        grads = []
        for fn in (layer, torch.compile(layer, backend="aot_eager")):
            layer.bias.grad = None
            fn(x).backward(dy)
            grads.append(layer.bias.grad)
            assert layer.bias.grad.dtype == F32 and layer.codes.grad is None and layer.scales.grad is None
        torch.testing.assert_close(grads[0], dy.double().sum((0, 1)).float(), rtol=1e-6, atol=1e-6)
        assert torch.equal(grads[1], grads[0])


def test_power_quant_linear_loads_built_on_meta_and_of_other_dtypes():
    """The low-memory route (built on meta, load_state_dict(assign=True)) gives a working layer: the
    codebook, not in the state dict, is made on the exponents' device; a float16 checkpoint assigned
    keeps the float buffers float32."""
    mod = PowerQuantLinear.from_linear(_linear(64, 8, True, 5), 4, 16, a=0.6)
    x = torch.randn(3, 64)
    with torch.device("meta"):
        lazy = PowerQuantLinear(64, 8, bits=4, group_size=16)
        assert lazy(torch.randn(3, 64)).shape == (3, 8)  # shapes on meta, as before loading
    lazy.load_state_dict(mod.state_dict(), assign=True)
    assert all(not b.is_meta for b in lazy.buffers())
    assert torch.equal(lazy(x), mod(x))
    half = {k: v.half() if v.is_floating_point() else v for k, v in mod.state_dict().items()}
    other = PowerQuantLinear(64, 8, bits=4, group_size=16)
    given = dict(half)  # a loader calling the module's own hook keeps its dict as it was
    other._load_from_state_dict(given, "", {}, True, [], [], [])
    assert all(given[k] is v for k, v in half.items())
    other.load_state_dict(half, assign=True)
    assert {b.dtype for n, b in other.named_buffers() if n != "codes"} == {torch.float32}
    assert torch.equal(other.exponent, mod.exponent.half().float())


def test_power_quant_linear_rejected_load_changes_nothing():
    """A bad exponent or scale raises before codes, scales or exponents are overwritten (the layer
    keeps giving the same outputs), through load_state_dict and load_quantized."""
    mod = PowerQuantLinear.from_linear(_linear(64, 8, True, 6), 4, 16, a=0.5)
    x = torch.randn(2, 64)
    y0, sd0 = mod(x), {k: v.clone() for k, v in mod.state_dict().items()}
    bad = {k: v.clone() for k, v in sd0.items()}
    bad["exponent"][3] = 2.0
    bad["codes"].random_(0, 256, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"exponent \(state dict\): .*\(0, 1\]; got 2 \(row 3\)"):
        mod.load_state_dict(bad)
    q = power_quantize(torch.randn(8, 64), 0.5, 4, 16)
    with pytest.raises(ValueError, match=r"\(0, 1\]; got 1.5"):
        mod.load_quantized(dataclasses.replace(q, exponent=torch.full((8,), 1.5)))
    # Scales negative (would flip their groups' signs) or not finite: refused as well.
    for v in (-0.5, math.nan, math.inf):
        bad = {k: t.clone() for k, t in sd0.items()}
        bad["scales"][2, 1] = v
        with pytest.raises(ValueError, match=rf"scales \(state dict\): expected finite scales >= 0 .*; got {v}"):
            mod.load_state_dict(bad)
    big = {k: t.double() if k == "scales" else t for k, t in sd0.items()}  # float64: fine, until cast to float32
    big["scales"][0, 0] = 1e39
    with pytest.raises(ValueError, match=r"scales \(state dict\): expected finite scales >= 0 .*; got inf"):
        mod.load_state_dict(big)
    for v in (-0.5, math.nan, math.inf):
        scales = q.scales.clone()
        scales[5, 0] = v
        with pytest.raises(ValueError, match=rf"q.scales: expected finite scales >= 0 .*; got {v}"):
            mod.load_quantized(dataclasses.replace(q, scales=scales))
        with pytest.raises(ValueError, match=rf"scales: expected finite scales >= 0 .*; got (?i:{v})"):  # NaN from Rust
            power_dequantize(dataclasses.replace(q, scales=scales))
    for k, v in mod.state_dict().items():
        assert torch.equal(v, sd0[k]), k
    assert torch.equal(mod(x), y0)


def test_power_quant_linear_bad_construction():
    with pytest.raises(TypeError, match="in_features: expected an int; got float 16.7"):
        PowerQuantLinear(16.7, 4)
    with pytest.raises(ValueError, match="out_features: expected a size >= 0; got -1"):
        PowerQuantLinear(64, -1, group_size=None)
    lin = _linear(32, 4, False, 7)
    with torch.no_grad():
        lin.weight[2, 5] = float("nan")
    with pytest.raises(ValueError, match="linear.weight: expected finite values"):
        PowerQuantLinear.from_linear(lin, 4, 16, a=0.5)


def test_power_quant_linear_keeps_float32_state_under_dtype_conversion():
    """model.to(torch.bfloat16) / .half() / .double() must not cast the quantized weight's float32
    buffers (the kernels need float32, and bfloat16 would round the scales): the module then runs
    on activations of the new dtype and gives what the float32 module gives on them."""
    lin = _linear(256, 24, True, 6)
    ref = PowerQuantLinear.from_linear(lin, 4, 64, a=0.7)
    for convert, dtype in ((lambda m: m.to(torch.bfloat16), BF16), (lambda m: m.half(), F16),
                           (lambda m: m.to(dtype=F64), F64), (lambda m: m.to("cpu", BF16), BF16)):
        mod = PowerQuantLinear.from_linear(lin, 4, 64, a=0.7)
        assert convert(mod) is mod
        for name, buf in mod.named_buffers():
            want = getattr(ref, name)
            assert buf.dtype == want.dtype and torch.equal(buf, want), (name, dtype)
        x = randn((3, 256), dtype, 7)
        with torch.no_grad():
            got = torch.nn.Sequential(mod)(x)
            want = ref(x)
        assert got.dtype == dtype and torch.equal(got, want)
    # A module inside a model converted as a whole.
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), PowerQuantLinear.from_linear(lin, 4, 64, a=0.7)).to(BF16)
    assert model[0].weight.dtype == BF16 and model[1].scales.dtype == F32 and model[1].bias.dtype == F32
    with torch.no_grad():
        assert model(randn((2, 256), BF16, 8)).dtype == BF16


ISA_LEVELS = ("baseline", "avx2", "avx512")


def test_cpu_isa_reports_the_cap():
    """lmkern.cpu_isa() names a level, no wider than LMKERN_CPU_ISA when that is set (the capped
    runs below set it), and exactly the cap where the CPU has it."""
    isa = lmkern.cpu_isa()
    assert isa in ISA_LEVELS
    cap = os.environ.get("LMKERN_CPU_ISA")
    if cap in ISA_LEVELS:
        assert ISA_LEVELS.index(isa) <= ISA_LEVELS.index(cap)
        if cap != "avx512":
            assert isa == cap or isa == "baseline"


def test_ctrl_c_interrupts_a_long_search(sigint_raises):
    """SIGINT during a search of seconds raises KeyboardInterrupt within ~a group of rows, not after
    the whole search (the GIL-free call polls Python's signal handlers on the main thread every
    50 ms); the next search runs as before."""
    import signal
    import threading
    import time

    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(2048, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    t0 = time.perf_counter()
    want = search_exponent(w[:128], 4, 128, x=x)
    whole = (time.perf_counter() - t0) * 16  # the 2048 rows' time, about
    if whole < 1.0:  # a fast machine: the signal must come well inside the search
        w = w.repeat(int(2.0 / whole) + 1, 1)
        whole *= int(2.0 / whole) + 1
    returned = False
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        timer.start()
        search_exponent(w, 4, 128, x=x)
        returned = True
        time.sleep(30)  # the signal comes here instead: the test fails on `returned` below
    took = time.perf_counter() - t0
    timer.join()
    assert not returned, f"the search ran to its end ({took:.2f} s) before the interrupt"
    assert took < 0.3 + whole / 3, f"interrupted after {took:.2f} s of a ~{whole:.2f} s search"
    assert torch.equal(search_exponent(w[:128], 4, 128, x=x), want)


def test_search_off_the_main_thread_gives_the_same_exponents():
    """Off the main thread no handler can run, so the search does not poll (it would take the GIL
    every 50 ms for nothing): it runs to its end with the main thread's answer."""
    import threading

    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(256, 512, generator=g), torch.randn(64, 512, generator=g)
    want, got = search_exponent(w, 4, 64, x=x), []
    t = threading.Thread(target=lambda: got.append(search_exponent(w, 4, 64, x=x)))
    t.start()
    t.join()
    assert torch.equal(got[0], want)


def test_unknown_cpu_isa_cap_warns():
    """A LMKERN_CPU_ISA the core does not know caps nothing: import says so (a RuntimeWarning
    naming the value); a known one, in any case and with spaces around, imports quietly and takes
    effect. (Each value is a fresh process that imports torch: two, not more.)"""
    code = "import warnings; warnings.simplefilter('error'); import lmkern; print(lmkern.cpu_isa())"
    for value, warns in (("avx-2", True), (" BaseLine ", False)):
        run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LMKERN_CPU_ISA": value},
                             capture_output=True, text=True, timeout=300)
        if warns:
            assert run.returncode != 0 and f"RuntimeWarning: LMKERN_CPU_ISA={value!r} is not one of" in run.stderr, run.stderr
        else:
            assert run.returncode == 0, run.stderr[-2000:]
            assert run.stdout.strip() == "baseline", run.stdout  # the cap took effect as written


@pytest.mark.parametrize("cap", ["avx2", "baseline"])
def test_narrower_cpu_kernels(cap):
    """The linear-layer and dequantizer tests of this file again in a fresh process with the CPU
    kernels capped at `cap` (LMKERN_CPU_ISA): the rest of the run takes the widest kernels this CPU
    has, so the narrower ones (the AVX2 GEMV on an AVX-512 machine, the portable one on any) would
    otherwise go untested here."""
    if ISA_LEVELS.index(cap) >= ISA_LEVELS.index(lmkern.cpu_isa()):
        pytest.skip(f"this CPU's widest level is {lmkern.cpu_isa()}: the main run covers {cap}")
    env = {**os.environ, "LMKERN_CPU_ISA": cap}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                          "-k", "(linear or dequant or cpu_isa_reports) and not narrower"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=os.path.dirname(__file__))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def test_codebook_matches_formula():
    for bits in (2, 3, 4, 8):
        a = torch.tensor([1.0, 0.5, 0.13, 0.77])
        cb = torch.ops.lmkern.power_codebook(a, bits)
        qm = 2 ** (bits - 1) - 1
        f = torch.arange(2 ** bits)
        q = torch.where(f >= 2 ** (bits - 1), f - 2 ** bits, f).to(F64)
        ref = torch.sign(q) * (q.abs() / qm) ** (1 / a.to(F64).unsqueeze(1))
        assert (cb.to(F64) - ref).abs().max() <= 2 ** -24 * ref.abs().max()
    with pytest.raises(ValueError, match="a: expected exponents in"):
        torch.ops.lmkern.power_codebook(torch.tensor([0.5, 0.0]), 4)


def test_power_quant_linear_from_linear_options():
    lin = _linear(128, 8, False, 2)
    x_cal = torch.randn(32, 128)
    mod = PowerQuantLinear.from_linear(lin, 3, None, x=x_cal)
    assert mod.group_size == 128 and mod.bias is None
    assert torch.allclose(mod.exponent, search_exponent(lin.weight, 3, None, x=x_cal))
    mod2 = PowerQuantLinear.from_linear(lin, 8, 32, a=0.8)
    assert (mod2.exponent == 0.8).all()
    with pytest.raises(ValueError, match="group_size"):
        PowerQuantLinear.from_linear(lin, 4, 100)
    with pytest.raises(TypeError, match="nn.Linear"):
        PowerQuantLinear.from_linear(torch.nn.Conv1d(2, 2, 1))


def test_power_quant_linear_deterministic_and_inference_mode(num_threads):
    lin = _linear(512, 300, True, 3)
    mod = PowerQuantLinear.from_linear(lin, 4, 128, a=0.6)
    x = torch.randn(5, 512)
    outs = []
    for t in (1, 2, 3):
        lmkern.set_num_threads(t)
        with torch.inference_mode():
            outs.append(mod(x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("bits,tokens", [(8, 3), (8, 7), (4, 3)])
def test_power_quant_linear_input_gradient_deterministic(num_threads, bits, tokens):
    """dx is the same bits whatever the thread count: 300 rows are five of the 8-bit row tasks
    (1-4 tokens, partials summed in task order) or the column blocks (7 tokens, 4-bit)."""
    lin = _linear(512, 300, False, 4)
    mod = PowerQuantLinear.from_linear(lin, bits, 128, a=0.6)
    grads = []
    for t in (1, 2, 3):
        lmkern.set_num_threads(t)
        x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        mod(x).pow(2).sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    assert grads[0].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# custom ops: opcheck, compile
# ------------------------------------------------------------------------------------------------


def _opcheck_cases():
    x = randn((3, 32), F32, 0)
    a = torch.full((3,), 0.6)
    q = power_quantize(x, a, 4, 16)
    lin = PowerQuantLinear.from_linear(_linear(32, 5, True, 0), 4, 16, a=0.7)
    xg = randn((2, 32), F32, 1).requires_grad_(True)
    return [
        (torch.ops.lmkern.power_quantize, (x, a, 4, 16, 1.0)),
        (torch.ops.lmkern.power_quantize, (randn((2, 3, 24), BF16, 1), torch.full((6,), 0.5), 3, 8, 0.9)),
        (torch.ops.lmkern.power_dequantize, (q.codes, q.scales, q.exponent, 4, 16, 32, torch.bfloat16)),
        (torch.ops.lmkern.power_fake_quantize, (x.clone().requires_grad_(True), a.clone().requires_grad_(True), 4, 16, 1.0)),
        (torch.ops.lmkern.power_fake_quantize_backward, (torch.randn(3, 32), x, q.scales, a, 4, 16, True)),
        (torch.ops.lmkern.power_quant_linear, (xg, lin.codes, lin.scales, lin.codebook, lin.bias, 4, 16, 32)),
        (torch.ops.lmkern.power_quant_linear, (randn((2, 2, 32), BF16, 2), lin.codes, lin.scales, lin.codebook, None, 4, 16, 32)),
        (torch.ops.lmkern.power_quant_linear_backward, (torch.randn(2, 5), lin.codes, lin.scales, lin.codebook, 4, 16, 32)),
        (torch.ops.lmkern.power_codebook, (torch.rand(7) * 0.9 + 0.1, 3)),
        (torch.ops.lmkern.power_search_exponent, (torch.randn(4, 32), None, 4, 16, 1.0, True)),
        (torch.ops.lmkern.power_search_exponent, (torch.randn(4, 32), torch.randn(8, 32), 4, 16, 1.0, False)),
        (torch.ops.lmkern.power_search_exponent, (torch.randn(4, 32), torch.randn(8, 32), 8, 32, 1.0, True, 100, 0)),
    ]


@pytest.mark.parametrize("i", range(12))
def test_opcheck(i):
    op, args = _opcheck_cases()[i]
    torch.library.opcheck(op, args)


def test_compile_fullgraph():
    torch._dynamo.reset()
    lin = PowerQuantLinear.from_linear(_linear(64, 24, True, 4), 4, 32, a=0.75)

    def f(x, a):
        return lin(power_fake_quantize(x, a, 4, 16)).sum(-1)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for rows in (3, 5):
        x = torch.randn(rows, 64, requires_grad=True)
        a = torch.tensor(0.6, requires_grad=True)
        outs = []
        for fun in (f, cf):
            y = fun(x, a)
            outs.append((y,) + torch.autograd.grad(y.sum(), (x, a)))
        for got, want in zip(outs[1], outs[0]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_bad_input():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="bits"):
        power_quantize(x, 0.5, 5)
    with pytest.raises(ValueError, match="bits"):
        power_quantize(x, 0.5, True)
    for a in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="a: expected"):
            power_quantize(x, a)
    for a in (torch.tensor([0.5, 0.5, 0.0, 0.5]), torch.tensor([0.5, math.nan, 0.5, 0.5]), torch.tensor(1.01)):
        with pytest.raises(ValueError, match="a: expected exponents in"):
            power_quantize(x, a)
        with pytest.raises(ValueError, match="a: expected exponents in"):
            power_fake_quantize(x, a)
    with pytest.raises(ValueError, match="one per row"):
        power_quantize(x, torch.full((3,), 0.5))
    with pytest.raises(TypeError, match="floating"):
        power_quantize(x, torch.tensor([1, 1, 1, 1]))
    with pytest.raises(ValueError, match="group_size: expected a positive divisor of the last dimension 32, or None"):
        power_quantize(x, 0.5, 4, 5)
    # The layer's default group_size (128) and a row it does not divide: the message names in_features.
    with pytest.raises(ValueError, match=r"group_size: expected a positive divisor of in_features 100, or None .*got 128"):
        PowerQuantLinear(100, 4)
    with pytest.raises(ValueError, match=r"group_size: expected a positive divisor of in_features 100, or None .*got 128"):
        PowerQuantLinear.from_linear(torch.nn.Linear(100, 4))
    with pytest.raises(ValueError, match="group_size"):
        power_quantize(x, 0.5, 4, 0)
    with pytest.raises(TypeError, match="x: expected dtype"):
        power_quantize(torch.ones(4, 32, dtype=torch.int32), 0.5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        power_quantize([1.0, 2.0], 0.5)
    with pytest.raises(ValueError, match="scalar"):
        power_quantize(torch.tensor(1.0), 0.5)
    with pytest.raises(ValueError, match="clip"):
        power_quantize(x, 0.5, clip=0.0)
    for bad in (math.inf, math.nan):
        y = x.clone()
        y[2, 3] = bad
        with pytest.raises(ValueError, match="finite"):
            power_quantize(y, 0.5)
        with pytest.raises(ValueError, match="finite"):
            power_fake_quantize(y, 0.5)
    with pytest.raises(TypeError, match="PowerQuantized"):
        power_dequantize(x)
    mod = PowerQuantLinear(32, 4, group_size=16)
    with pytest.raises(ValueError, match="in_features"):
        mod(torch.randn(2, 31))
    with pytest.raises(TypeError, match="dtype"):
        mod(torch.ones(2, 32, dtype=torch.int64))


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jvp", "jacfwd", "vmap", "forward_ad"])
def test_torch_func_transforms(transform):
    """PowerQuantLinear under torch.func transforms and forward-mode AD equals the same transform
    of x @ Ŵᵀ + b in float64; the fake quantizer refuses the differentiating ones (custom ops give
    zero tangents there) and runs under vmap."""
    import torch.autograd.forward_ad as fwAD

    mod = PowerQuantLinear.from_linear(_linear(32, 6, True, 8), 4, 16, a=0.6)
    w64, b64 = mod.dequantized_weight().double(), mod.bias.double()
    x, t = torch.randn(3, 32, dtype=F64), torch.randn(3, 32, dtype=F64)

    def run(f):
        if transform == "grad":
            return torch.func.grad(lambda x: f(x).pow(2).sum())(x)
        if transform in ("jacrev", "jacfwd"):
            return getattr(torch.func, transform)(f)(x)
        if transform == "jvp":
            return torch.func.jvp(f, (x,), (t,))[1]
        if transform == "vmap":
            return torch.func.vmap(f)(x)
        with fwAD.dual_level():
            return fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent

    got = run(mod)
    assert got is not None and got.dtype == F64
    assert torch.allclose(got, run(lambda x: x @ w64.T + b64), rtol=1e-12, atol=1e-12)
    fake = lambda x: power_fake_quantize(x, 0.6, 4, 16)
    if transform == "vmap":
        assert torch.equal(run(fake), fake(x))
    else:
        with pytest.raises(NotImplementedError, match="power_fake_quantize: torch.func"):
            run(fake)


def test_vmap_of_fake_quantize_is_one_call():
    """torch.vmap of power_fake_quantize takes lmkern's batching rule (the batch as more rows of one
    call; torch's fallback warned and called once per sample): per-sample results and gradients
    equal a loop's, for any batch dim, exponents batched or shared, and vmap nested in vmap."""
    import warnings

    x = torch.randn(5, 3, 64)
    a = torch.rand(5, 3) * 0.9 + 0.1
    fq = lambda r, e=0.6: power_fake_quantize(r, e, 4, 16)
    want = torch.stack([fq(x[i]) for i in range(5)])
    want_a = torch.stack([fq(x[i], a[i]) for i in range(5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback's "performance drop" warning
        for bdim in (0, 1, 2):
            assert torch.equal(torch.vmap(fq, in_dims=bdim)(x.movedim(0, bdim)), want), bdim
        assert torch.equal(torch.vmap(fq)(x, a), want_a)
        assert torch.equal(torch.vmap(lambda r: fq(r, a[0]))(x), torch.stack([fq(x[i], a[0]) for i in range(5)]))
        nested = torch.vmap(torch.vmap(lambda r, e: fq(r.unsqueeze(0), e.unsqueeze(0))[0]))(x, a)
        assert torch.equal(nested, want_a)
        xg, ag = x.clone().requires_grad_(), a.clone().requires_grad_()
        torch.vmap(fq)(xg, ag).pow(2).sum().backward()
    xr, ar = x.clone().requires_grad_(), a.clone().requires_grad_()
    torch.stack([fq(xr[i], ar[i]) for i in range(5)]).pow(2).sum().backward()
    assert torch.equal(xg.grad, xr.grad) and torch.allclose(ag.grad, ar.grad, rtol=1e-6, atol=0)


class _TinyLM(torch.nn.Module):
    """Linear layers in the places a model has them: nested blocks in a ModuleList, one layer
    shared by two blocks, attention's out_proj, and a head."""

    def __init__(self, d=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        nn = torch.nn
        shared = nn.Linear(d, d)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), shared)
                                     for _ in range(2)])
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.lm_head = nn.Linear(d, 10, bias=False)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.lm_head(x)


def test_quantize_linears_replaces_each_layer_as_from_linear_would():
    """Each nn.Linear becomes PowerQuantLinear.from_linear of it (same buffers, so the model's output
    is the composition of the layers'); the head and attention's out_proj stay as they were, a
    shared layer stays shared, and with calibrate each layer's exponents are searched on the inputs
    the float model gave it (its first max_tokens rows)."""
    from lmkern.nn import quantize_linears

    x = torch.randn(3, 5, 64)
    ref = _TinyLM()
    originals = {n: m for n, m in ref.named_modules() if type(m) is torch.nn.Linear}
    model = quantize_linears(_TinyLM(), bits=4, group_size=32)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n in originals}
    assert kinds == {**{n: "PowerQuantLinear" for n in originals}, "lm_head": "Linear"}, kinds
    assert type(model.attn.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    assert model.blocks[0][3] is model.blocks[1][3]
    for name, lin in originals.items():
        if name != "lm_head":
            want = PowerQuantLinear.from_linear(lin, 4, 32)
            got = model.get_submodule(name)
            for buf in ("codes", "scales", "exponent", "bias"):
                assert torch.equal(getattr(got, buf), getattr(want, buf)), (name, buf)
    assert model(x).shape == (3, 5, 10)
    # Calibrated: each layer's exponents from its own inputs in the float model (15 rows, max 8 kept).
    seen = {}

    def keep(name):
        def hook(m, args):  # (returns None: the input unchanged)
            seen.setdefault(name, args[0].reshape(-1, m.in_features)[:8].clone())
        return hook

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in ref.named_modules() if n in originals]
    ref(x)
    for h in hooks:
        h.remove()
    cal = quantize_linears(_TinyLM(), 4, 32, calibrate=lambda m=None: None, max_tokens=8)  # ran nothing: weight error
    assert torch.equal(cal.blocks[0][0].exponent, model.blocks[0][0].exponent)
    fresh = _TinyLM()
    cal = quantize_linears(fresh, 4, 32, calibrate=lambda: fresh(x), max_tokens=8)
    for name in ("blocks.0.0", "blocks.1.2", "blocks.0.3"):
        want = search_exponent(originals[name].weight, 4, 32, x=seen[name])
        assert torch.equal(cal.get_submodule(name).exponent, want), name
    assert not torch.equal(cal.blocks[0][0].exponent, model.blocks[0][0].exponent)
    # A shared layer is searched once, on the rows of its first calls (block 0's, then block 1's).
    assert cal.blocks[0][3] is cal.blocks[1][3]


def test_quantize_linears_leaves_what_torch_reads_itself_and_copies_its_calibration_rows(monkeypatch):
    """torch's TransformerEncoderLayer reads linear1/linear2.weight in its eval fast path: left
    alone (it ran before, and runs after, in eval mode). Calibration rows are copies: the model
    writing a layer's input in place afterwards does not change them. A layer shared with a
    skipped name stays a shared nn.Linear. An error during the searches (here Ctrl-C on the third
    layer) leaves the model as it was."""
    from lmkern.nn import quantize_linears

    nn = torch.nn
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2, enable_nested_tensor=False)
    model = nn.Sequential(nn.Linear(64, 64), enc).eval()
    x = torch.randn(2, 5, 64)
    quantize_linears(model, 4, 32)
    assert isinstance(model[0], PowerQuantLinear) and type(model[1].layers[0].linear1) is nn.Linear
    with torch.no_grad():
        assert model(x).shape == (2, 5, 64)

    class InPlace(nn.Module):  # writes the first layer's input after the layer read it
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            y = self.a(x)
            x.mul_(3.0)
            return self.b(y)

    m = InPlace()
    w_a, x0 = m.a.weight.detach().clone(), torch.randn(6, 64)
    quantize_linears(m, 4, 32, calibrate=lambda: m(x0.clone()), max_tokens=4)
    assert torch.equal(m.a.exponent, search_exponent(w_a, 4, 32, x=x0[:4]))

    shared = nn.Linear(64, 10)
    two = nn.ModuleDict({"lm_head": shared, "proj": shared, "other": nn.Linear(64, 64)})
    quantize_linears(two, 4, 32)
    assert type(two["proj"]) is nn.Linear and two["proj"] is two["lm_head"] and isinstance(two["other"], PowerQuantLinear)

    tiny = _TinyLM()
    before = [type(m) for m in tiny.modules()]
    real, calls = PowerQuantLinear.from_linear.__func__, []

    def interrupted(cls, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(PowerQuantLinear, "from_linear", classmethod(interrupted))
    with pytest.raises(KeyboardInterrupt):
        quantize_linears(tiny, 4, 32)
    assert [type(m) for m in tiny.modules()] == before


def test_quantize_linears_of_gpt2_conv1d():
    """GPT-2's layers are transformers' Conv1D (y = x @ W + b, W [in, out]): quantized as the linear
    they compute (W transposed), calibrated on their inputs too; the tied head is left alone."""
    tf = pytest.importorskip("transformers")
    from lmkern.nn import quantize_linears

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    ref = tf.GPT2LMHeadModel(cfg).eval()
    model = tf.GPT2LMHeadModel(cfg).eval()
    model.load_state_dict(ref.state_dict())
    c_fc = ref.transformer.h[0].mlp.c_fc
    ids = torch.randint(0, 97, (2, 16))
    seen = []
    c_fc.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, 64).clone()) and None)
    with torch.no_grad():
        want_logits = ref(ids).logits
    quantize_linears(model, 8, 32, calibrate=lambda: model(ids), max_tokens=20)
    names = {n for n, m in model.named_modules() if isinstance(m, PowerQuantLinear)}
    assert names == {f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    got = model.transformer.h[0].mlp.c_fc
    assert (got.in_features, got.out_features) == (64, 256)
    assert torch.equal(got.exponent, search_exponent(c_fc.weight.detach().t(), 8, 32, x=seen[0][:20]))
    assert torch.equal(got.dequantized_weight(), PowerQuantLinear.from_linear(_as_linear_of(c_fc), 8, 32, a=got.exponent).dequantized_weight())
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - want_logits).norm() / want_logits.norm() < 0.02  # 8 bits


def _as_linear_of(conv1d):
    lin = torch.nn.Linear(conv1d.nx, conv1d.nf)
    with torch.no_grad():
        lin.weight.copy_(conv1d.weight.t())
        lin.bias.copy_(conv1d.bias)
    return lin


def test_quantize_linears_on_meta_then_load_a_quantized_checkpoint():
    """The low-memory load of a quantized model: built on meta, converted (empty layers of the same
    configuration), then load_state_dict(assign=True) of a quantized model's state: same outputs."""
    from lmkern.nn import quantize_linears

    src = quantize_linears(_TinyLM(seed=4), 4, 32)
    with torch.device("meta"):
        lazy = _TinyLM()
    quantize_linears(lazy, 4, 32)
    assert isinstance(lazy.blocks[0][0], PowerQuantLinear) and lazy.blocks[0][0].codes.is_meta
    lazy.load_state_dict(src.state_dict(), assign=True)
    x = torch.randn(2, 3, 64)
    assert torch.equal(lazy(x), src(x))
    with pytest.raises(ValueError, match="bits=4; this module has bits=8"):  # the metadata check holds here too
        quantize_linears(_TinyLM(), 8, 32).load_state_dict(src.state_dict())


def test_quantize_linears_checks_everything_before_changing_anything():
    from lmkern.nn import quantize_linears

    model = _TinyLM()
    model.blocks[1][2] = torch.nn.Linear(96, 64)  # 96: group 64 does not divide it
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"blocks\.1\.2: group_size: expected a positive divisor of in_features 96.*nothing was replaced"):
        quantize_linears(model, 4, 64)
    with torch.no_grad():
        model.blocks[1][0].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"blocks\.1\.0\.weight: expected finite values"):
        quantize_linears(model, 4, 32)
    m2 = _TinyLM()
    with pytest.raises(ValueError, match=r"calibrate: the inputs of blocks\.0\.0 hold NaN or inf; nothing was replaced"):
        quantize_linears(m2, 4, 32, calibrate=lambda: m2(torch.full((1, 2, 64), math.inf)))
    assert type(m2.blocks[0][0]) is torch.nn.Linear
    for bad, exc, match in (
        (dict(a=1.5), ValueError, r"a: expected None \(searched\) or one exponent"),
        (dict(a=torch.ones(3)), ValueError, "a: expected None"),
        (dict(a=0.5, calibrate=lambda: None), ValueError, "calibrate: the exponents are given"),
        (dict(calibrate=3), TypeError, "calibrate: expected a callable"),
        (dict(skip="lm_head"), TypeError, "skip: expected names"),
        (dict(max_tokens=0), ValueError, "max_tokens"),
        (dict(bits=5), ValueError, "bits"),
    ):
        with pytest.raises(exc, match=match):
            quantize_linears(model, **{"group_size": 32, **bad})
    assert {n: type(m) for n, m in model.named_modules()} == before
    # skip by name (last component or qualified) or by a callable
    m = quantize_linears(_TinyLM(), 4, 32, skip=("0", "blocks.1.2"))  # the head is no longer skipped
    assert [n for n, x in m.named_modules() if type(x) is torch.nn.Linear] == ["blocks.0.0", "blocks.1.0", "blocks.1.2"]
    assert isinstance(m.lm_head, PowerQuantLinear)
    m = quantize_linears(_TinyLM(), 4, 32, skip=lambda name, lin: lin.out_features != 64)
    quantized = {n for n, x in m.named_modules(remove_duplicate=False) if isinstance(x, PowerQuantLinear)}
    assert quantized == {"blocks.0.2", "blocks.0.3", "blocks.1.2", "blocks.1.3"}


def test_quantized_keeps_its_own_exponents():
    """q.exponent is a copy: stepping the caller's (learned) exponent tensor leaves q as it was."""
    w = torch.randn(3, 32)
    a = torch.full((3,), 0.7)
    q = power_quantize(w, a, 4, 16)
    w_hat = power_dequantize(q)
    a.fill_(0.3)
    assert torch.equal(q.exponent, torch.full((3,), 0.7)) and torch.equal(power_dequantize(q), w_hat)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_power_quant_linear_follows_autocast(dtype):
    """Under torch.autocast the layer computes and returns the autocast dtype, as nn.Linear does."""
    lin = _linear(64, 8, True, 9)
    mod = PowerQuantLinear.from_linear(lin, 4, 16, a=0.6)
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=dtype):
        y, y_lin = mod(x), lin(x)
    assert y.dtype == y_lin.dtype == dtype
    assert torch.equal(y, mod(x.to(dtype)))


def test_numpy_scalars_are_numbers_and_equality_is_identity():
    """bits, group_size, a and clip given as numpy scalars (as they come out of a config or an
    array) act as the Python numbers; PowerQuantized compares by identity (its fields are tensors)."""
    import numpy as np

    x = torch.randn(4, 32)
    q = power_quantize(x, np.float32(0.75), np.int64(4), np.int32(8), np.float64(0.9))
    ref = power_quantize(x, 0.75, 4, 8, 0.9)
    assert type(q.bits) is int and type(q.group_size) is int
    assert torch.equal(q.codes, ref.codes) and torch.equal(q.scales, ref.scales)
    assert torch.equal(power_fake_quantize(x, 0.75, np.int8(4), np.int64(8)), power_fake_quantize(x, 0.75, 4, 8))
    with pytest.raises(ValueError, match="bits: expected one of 2, 3, 4, 8; got (np.int64.)?5"):
        power_quantize(x, 0.5, np.int64(5))
    assert q == q and q != copy.deepcopy(q) and len({q, ref}) == 2


def test_cuda_refusals_come_before_any_buffer_is_touched():
    """float64 is refused for CUDA devices before any launch (no GPU needed; the CUDA tests
    themselves are in test_quant_cuda.py)."""
    x = torch.randn(2, 8, dtype=F64)
    a = torch.full((2,), 0.5)
    codes, scales = torch.empty(2, 4, dtype=torch.uint8), torch.empty(2, 1)
    with pytest.raises(TypeError, match="float64 is supported on CPU only"):
        _core.quant_quantize(1, 0, 0, 4, 2, 8, 8, 1.0, x.data_ptr(), a.data_ptr(), codes.data_ptr(), scales.data_ptr())
    with pytest.raises(TypeError, match="float64 is supported on CPU only"):
        _core.quant_dequantize_codebooks(1, 0, 0, 4, 2, 8, 8, codes.data_ptr(), scales.data_ptr(), a.data_ptr(),
                                         x.data_ptr())

# ------------------------------------------------------------------------------------------------
# Found by a mutation-testing audit of the Python layer (stop 26): each test was seen failing with
# a deliberate bug in the code it covers (a check dropped, an argument not passed on, ...).
# ------------------------------------------------------------------------------------------------


def test_dequantize_refuses_scales_of_the_wrong_shape():
    q = power_quantize(torch.randn(4, 64), 0.8, bits=4, group_size=16)
    for bad in (q.scales[:, :2].contiguous(), q.scales[:2].contiguous()):
        with pytest.raises(ValueError, match="scales: expected float32 of shape"):
            power_dequantize(dataclasses.replace(q, scales=bad))


def _layer(in_f=64, out_f=8, bits=4, g=32):
    return PowerQuantLinear.from_linear(_linear(in_f, out_f, True, 0), bits=bits, group_size=g, a=0.7)


def test_non_contiguous_activations_on_the_fused_path():
    mod = _layer()
    x = torch.randn(64, 3).t()  # [3, 64], a transposed view: not contiguous
    assert not x.is_contiguous()
    want = x.contiguous() @ mod.dequantized_weight().t() + mod.bias
    torch.testing.assert_close(mod(x), want, rtol=1e-4, atol=1e-4)


def test_calibration_rows_are_copies():
    """The calibration keeps copies of the rows it saw: a model that overwrites its input afterwards
    (not a rescaling, which the search cannot tell apart) does not change the search."""
    from lmkern.nn import quantize_linears

    nn = torch.nn

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            y = self.a(x)
            x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))  # not a rescaling
            return self.b(y)

    torch.manual_seed(0)
    m = InPlace()
    w_a, x0 = m.a.weight.detach().clone(), torch.randn(6, 64)
    quantize_linears(m, 4, 32, calibrate=lambda: m(x0.clone()), max_tokens=4)
    assert torch.equal(m.a.exponent, search_exponent(w_a, 4, 32, x=x0[:4]))


def test_input_gradient_op_keeps_dy_dtype_on_the_chunked_path():
    """Beyond the transposed GEMV's token limit (<= 512 on CPU) dx is summed in float32 chunks; the
    op must still return dy's dtype, as its fake (meta) implementation says."""
    mod = _layer()
    dy = torch.randn(600, 8, dtype=torch.bfloat16)
    dx = torch.ops.lmkern.power_quant_linear_backward(dy, mod.codes, mod.scales, mod.codebook, 4, 32, 64)
    assert dx.dtype == torch.bfloat16 and dx.shape == (600, 64)


@pytest.mark.parametrize("clip", [0.0, -1.0, float("inf"), float("nan"), True])
def test_search_exponent_refuses_a_bad_clip(clip):
    with pytest.raises(ValueError, match="clip"):
        search_exponent(torch.randn(4, 32), clip=clip)


def test_linear_refuses_a_codebook_of_the_wrong_shape():
    mod = _layer()
    x = torch.randn(2, 64)
    for table in (mod.codebook[:, :8].contiguous(), mod.codebook[:4].contiguous()):
        for fn in (torch.ops.lmkern.power_quant_linear, lmkern.ops.quant.quant_linear):
            with pytest.raises(ValueError, match="table: expected float32 of shape"):
                fn(x, mod.codes, mod.scales, table, mod.bias, 4, 32, 64)


def test_from_linear_searches_the_exponents_with_its_clip():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    mod = PowerQuantLinear.from_linear(lin, 4, 32, clip=0.8)
    assert torch.equal(mod.exponent, search_exponent(lin.weight, 4, 32, clip=0.8))
    assert not torch.equal(mod.exponent, search_exponent(lin.weight, 4, 32))


def test_from_linear_quantizes_with_its_clip():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    mod = PowerQuantLinear.from_linear(lin, 4, 32, a=0.7, clip=0.8)
    q = power_quantize(lin.weight, 0.7, 4, 32, clip=0.8)
    assert torch.equal(mod.scales, q.scales) and torch.equal(mod.codes, q.codes)


def test_shared_layer_skipped_under_one_name_stays_shared():
    """A layer shared by two parents and skipped under one of its names stays itself under both."""
    from lmkern.nn import quantize_linears

    nn = torch.nn
    shared = nn.Linear(64, 10)
    model = nn.ModuleDict({"a": nn.ModuleDict({"lm_head": shared}), "b": nn.ModuleDict({"proj": shared}),
                           "c": nn.Linear(64, 64)})
    quantize_linears(model, 4, 32)
    assert model["a"]["lm_head"] is shared and model["b"]["proj"] is shared
    assert isinstance(model["c"], PowerQuantLinear)


def test_dequantize_refuses_codes_of_another_dtype():
    q = power_quantize(torch.randn(4, 64), 0.8)
    with pytest.raises(ValueError, match="codes: expected uint8"):
        power_dequantize(dataclasses.replace(q, codes=q.codes.to(torch.int16)))


def test_quantize_linears_layer_held_twice_by_one_parent_stays_shared():
    """One parent holding a layer under two names (named_children() lists it once): replaced under
    both, and a skip naming either leaves both."""
    from lmkern.nn import quantize_linears

    nn = torch.nn
    shared = nn.Linear(64, 10)
    two = nn.ModuleDict({"x": shared, "y": shared})
    quantize_linears(two, 4, 32, skip=())
    assert isinstance(two["x"], PowerQuantLinear) and two["x"] is two["y"]
    for skip in (("x",), ("y",)):
        two = nn.ModuleDict({"x": shared, "y": shared})
        quantize_linears(two, 4, 32, skip=skip)
        assert two["x"] is shared and two["y"] is shared


def test_fake_quantize_backward_refuses_scales_of_the_wrong_shape():
    x, a = torch.randn(4, 64), torch.full((4,), 0.7)
    _, scales = torch.ops.lmkern.power_fake_quantize(x, a, 4, 16, 1.0)
    for bad in (scales[:, :2].contiguous(), scales[:2].contiguous()):
        with pytest.raises(ValueError, match="scales: expected float32 of shape"):
            torch.ops.lmkern.power_fake_quantize_backward(torch.ones_like(x), x, bad, a, 4, 16, True)


def test_quantize_linears_keeps_train_mode_and_leaves_linear_subclasses():
    from lmkern.nn import quantize_linears

    nn = torch.nn

    class Doubled(nn.Linear):  # a subclass may compute something else: left alone (documented)
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(Doubled(64, 64), nn.Linear(64, 64)).eval()
    quantize_linears(model, 4, 32)
    assert type(model[0]) is Doubled and isinstance(model[1], PowerQuantLinear)
    assert not model[1].training


def test_linear_refuses_a_bias_of_the_wrong_shape():
    mod = _layer()
    x = torch.randn(2, 64)
    for bias in (mod.bias[:4].contiguous(), torch.zeros(1, 8)):
        for fn in (torch.ops.lmkern.power_quant_linear, lmkern.ops.quant.quant_linear):
            with pytest.raises(ValueError, match="bias: expected float32 of shape"):
                fn(x, mod.codes, mod.scales, mod.codebook, bias, 4, 32, 64)


def test_search_exponent_and_from_linear_take_other_dtypes():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8).to(torch.bfloat16)
    w = lin.weight.detach()
    want = search_exponent(w.float(), 4, 32)
    assert torch.equal(search_exponent(w, 4, 32), want)
    assert torch.equal(search_exponent(w.double(), 4, 32), want)
    assert torch.equal(PowerQuantLinear.from_linear(lin, 4, 32).exponent, want)


def test_load_quantized_refuses_another_group_size_and_changes_nothing():
    mod = PowerQuantLinear(64, 8, group_size=32)
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    q = power_quantize(torch.randn(8, 64), 0.7, 4, 16)
    with pytest.raises(ValueError, match="group_size=32"):
        mod.load_quantized(q)
    assert all(torch.equal(v, before[k]) for k, v in mod.state_dict().items())


def test_int_codes_of_the_most_negative_field():
    assert unpack_codes(torch.tensor([[0x08]], dtype=torch.uint8), 4, 1).tolist() == [[-8]]
    assert unpack_codes(torch.tensor([[0x02]], dtype=torch.uint8), 2, 1).tolist() == [[-2]]


@pytest.mark.parametrize("in_f", [1, 2, 64])
def test_load_quantized_refuses_other_bits(in_f):
    """For in_features <= 6 the codes of 4 and 8 bits have one shape: only the bits check stops
    8-bit codes being read as 4-bit ones."""
    mod = PowerQuantLinear(in_f, 4, bits=4, group_size=None)
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    with pytest.raises(ValueError, match="bits=4"):
        mod.load_quantized(power_quantize(torch.randn(4, in_f), 0.7, bits=8))
    assert all(torch.equal(v, before[k]) for k, v in mod.state_dict().items())


def test_search_op_refuses_activations_of_another_width():
    with pytest.raises(ValueError, match=r"x: expected float32 of shape \(T, 32\)"):
        torch.ops.lmkern.power_search_exponent(torch.randn(4, 32), torch.randn(10, 16), 4, 32, 1.0, True)


def test_quantize_op_refuses_float64_exponents():
    with pytest.raises(ValueError, match=r"a: expected float32 of shape \(4,\)"):
        torch.ops.lmkern.power_quantize(torch.randn(4, 32), torch.full((4,), 0.5, dtype=torch.float64), 4, 32, 1.0)


def test_new_layer_has_exponents_one():
    mod = PowerQuantLinear(16, 4, group_size=None)
    assert (mod.exponent == 1).all() and (mod.codebook == torch.ops.lmkern.power_codebook(mod.exponent, 4)).all()


def test_bool_exponent_is_refused():
    # True is an int subclass (float(True) == 1.0): a flag passed in a's place must not quantize at a = 1.
    x = torch.randn(4, 32)
    for fn in (power_quantize, power_fake_quantize):
        with pytest.raises(TypeError, match="a: expected a float or a tensor; got bool"):
            fn(x, True)


@pytest.mark.parametrize("bits, qmax", [(2, 1), (3, 3), (4, 7), (8, 127)])
def test_qmax_is_the_largest_code(bits, qmax):
    x = torch.tensor([[1.0, -0.5, 0.25, -1.0]])
    q = power_quantize(x, 1.0, bits)
    assert q.qmax == qmax
    assert q.int_codes().abs().max().item() == qmax  # |x| = max|x| lands on the largest code


def test_power_quant_linear_refuses_bool_sizes():
    for args in ((True, 4), (4, False)):
        with pytest.raises(TypeError, match="expected an int; got bool"):
            PowerQuantLinear(*args, group_size=None)


def test_zero_scales_load():
    """An all-zero group has scale 0 (m = clip·max|x|): valid in load_quantized and load_state_dict,
    which refuse only negative or non-finite scales."""
    lin = _linear(64, 8, True, 5)
    with torch.no_grad():
        lin.weight[3] = 0.0
    mod = PowerQuantLinear.from_linear(lin, 4, 32, a=0.7)
    assert (mod.scales[3] == 0).all()
    again = PowerQuantLinear(64, 8, True, 4, 32)
    again.load_state_dict(mod.state_dict())
    again.load_quantized(power_quantize(lin.weight.detach(), 0.7, 4, 32))
    x = torch.randn(2, 64)
    assert torch.equal(again(x), mod(x)) and (again(x)[:, 3] == mod.bias[3]).all()


def test_a_meta_tensor_among_cpu_tensors_is_refused():
    """A meta tensor among cpu ones sends a call to the ops' fake kernels (meta wins the dispatch):
    they refuse mixed devices as the real kernels do, instead of returning uninitialized memory."""
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match="x: expected a tensor on cpu .*got meta"):
        search_exponent(w, bits=4, group_size=8, x=torch.randn(3, 16, device="meta"))
    q = power_quantize(w, 0.5, bits=4, group_size=8)
    with pytest.raises(ValueError, match="scales: expected a tensor on cpu .*got meta"):
        power_dequantize(dataclasses.replace(q, scales=q.scales.to("meta")))
    with pytest.raises(ValueError, match="a: expected a tensor on cpu .*got meta"):
        power_dequantize(dataclasses.replace(q, exponent=q.exponent.to("meta")))
    m = PowerQuantLinear.from_linear(torch.nn.Linear(16, 4), group_size=8)
    with pytest.raises(ValueError, match="table: expected a tensor on cpu .*got meta"):
        torch.ops.lmkern.power_quant_linear_backward(torch.randn(2, 4), m.codes, m.scales, m.codebook.to("meta"), 4, 8, 16)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="rstd: expected a tensor on cpu .*got meta"):
        torch.ops.lmkern.rms_norm_backward(x, x, None, torch.ones(4, device="meta"), None, 0.0, 1.0, False)
    # All on meta: shapes only, as before.
    assert power_quantize(torch.randn(3, 8, device="meta"), 0.5, bits=4).codes.shape == (3, 4)


def test_search_exponent_per_row_must_be_a_bool():
    w = torch.randn(4, 16)
    with pytest.raises(TypeError, match="per_row: expected a bool; got str"):
        search_exponent(w, per_row="no")
    assert search_exponent(w, per_row=False).shape == ()


def test_load_quantized_refuses_codes_and_scales_that_do_not_fit_and_changes_nothing():
    mod = PowerQuantLinear.from_linear(torch.nn.Linear(16, 4), bits=4, group_size=8)
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    q = power_quantize(torch.randn(4, 16), 0.5, bits=4, group_size=8)
    for bad, match in (
        (dataclasses.replace(q, codes=q.codes[:, :1]), r"codes: expected uint8 of shape \(4, 8\)"),
        (dataclasses.replace(q, codes=q.codes.float()), r"codes: expected uint8"),
        (dataclasses.replace(q, scales=q.scales[:1]), r"scales: expected float32 of shape \(4, 2\)"),
        (dataclasses.replace(q, scales=-q.scales), r"q.scales: expected finite scales >= 0"),
    ):
        with pytest.raises(ValueError, match=match):
            mod.load_quantized(bad)
        assert all(torch.equal(v, before[k]) for k, v in mod.state_dict().items())
    mod.load_quantized(q)
    assert torch.equal(mod.codes, q.codes) and torch.equal(mod.scales, q.scales)


def test_state_dict_of_integer_scales_or_other_codes_is_refused():
    src = PowerQuantLinear.from_linear(torch.nn.Linear(16, 4), bits=4, group_size=8)
    sd = src.state_dict()
    for key, value, match in (
        ("scales", torch.full((4, 2), -3, dtype=torch.int64), "scales .*expected a floating dtype; got torch.int64"),
        ("exponent", torch.ones(4, dtype=torch.int32), "exponent .*expected a floating dtype"),
        ("codes", sd["codes"].long(), "codes .*expected uint8 packed codes; got torch.int64"),
    ):
        mod = PowerQuantLinear(16, 4, group_size=8)
        before = {k: v.clone() for k, v in mod.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            mod.load_state_dict({**sd, key: value})
        assert all(torch.equal(v, before[k]) for k, v in mod.state_dict().items())


def test_meta_exponent_with_real_codes_is_an_error_not_a_stale_codebook():
    src = PowerQuantLinear.from_linear(torch.nn.Linear(16, 4), bits=4, group_size=8)
    sd = {**src.state_dict(), "exponent": src.exponent.to("meta")}
    mod = PowerQuantLinear(16, 4, group_size=8)
    mod.load_state_dict(sd, assign=True)
    with pytest.raises(RuntimeError, match="exponent: on meta while the codes are on cpu"):
        mod(torch.randn(2, 16))
    mod.load_state_dict(src.state_dict(), assign=True)  # real exponents: the layer works again
    x = torch.randn(2, 16)
    assert torch.equal(mod(x), src(x))


def test_power_quant_linear_reads_a_negative_bit_view_as_its_values():
    mod = PowerQuantLinear.from_linear(torch.nn.Linear(16, 4), bits=4, group_size=8)
    x = torch.randn(3, 16)
    nx = torch._neg_view(-x)
    assert nx.is_neg()
    assert torch.equal(mod(nx), mod(x))


def test_exponent_and_clip_beyond_float_or_float32_are_refused_by_name():
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match="a: expected an exponent in .*int beyond float64's range"):
        power_quantize(w, 2 ** 2000)
    with pytest.raises(ValueError, match="a: expected an exponent in .*got 1e-46, which is 0 in float32"):
        power_quantize(w, 1e-46)
    with pytest.raises(ValueError, match="clip: expected a finite number > 0"):
        power_quantize(w, 0.5, clip=2 ** 2000)
    # The smallest float32 exponent still works: codes of the formula's limit, all ±qmax or 0.
    q = power_quantize(w, 2.0 ** -149)
    assert set(q.int_codes().unique().tolist()) <= {-7, 0, 7}


def test_quantize_linears_calibrates_layers_called_by_keyword():
    from lmkern.nn import quantize_linears
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    xs = torch.randn(5, 16)
    got = quantize_linears(m := copy.deepcopy(model), group_size=8, calibrate=lambda: m[0](input=xs))
    want = quantize_linears(m2 := copy.deepcopy(model), group_size=8, calibrate=lambda: m2[0](xs))
    assert torch.equal(got[0].exponent, want[0].exponent)


def test_power_quant_linear_arguments_of_the_wrong_kind_name_themselves():
    mod = PowerQuantLinear(16, 4, group_size=8)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor; got NoneType"):
        mod(None)
    with pytest.raises(TypeError, match="q: expected a PowerQuantized .*got Tensor"):
        mod.load_quantized(torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"in_features: expected a size below 2\^63; got 1180591620717411303424"):
        PowerQuantLinear(2 ** 70, 4, group_size=None)
    with pytest.raises(ValueError, match="linear: its weight is on the meta device"):
        PowerQuantLinear.from_linear(torch.nn.Linear(16, 4, device="meta"), group_size=8)
    q = power_quantize(torch.randn(4, 16), 0.5, bits=4)
    with pytest.raises(ValueError, match=r"codes: expected \[rows, 6\] \(rows of 16 3-bit codes\); got shape \(4, 8\)"):
        dataclasses.replace(q, bits=3).int_codes()
    with pytest.raises(ValueError, match="n: expected a row length >= 0"):
        unpack_codes(q.codes, 4, -1)


def test_exponents_written_while_the_codebook_is_built_are_not_missed():
    """A forward rebuilds the codebooks when the exponents changed; exponents written during that
    build (another thread's load_state_dict) must leave the book marked stale, so that the next
    forward rebuilds it, not marked as theirs (which kept the old tables for good). The write is
    made from inside the build by a dispatch mode, deterministically."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 8)
    layer = PowerQuantLinear.from_linear(lin, bits=4, group_size=16, a=0.5)
    want = PowerQuantLinear.from_linear(lin, bits=4, group_size=16, a=0.5)
    want.load_state_dict({**want.state_dict(), "exponent": torch.full((8,), 0.9)})
    x = torch.randn(3, 32)

    class WriteDuringBuild(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.lmkern.power_codebook.default:
                layer.exponent.fill_(0.9)  # lands after the book was built from the old values
                # (in here, below autograd, fill_ leaves the version; another thread's write moves it)
                torch.autograd.graph.increment_version(layer.exponent)
            return out

    with torch.no_grad():
        layer.exponent.fill_(0.7)  # the next forward rebuilds
        with WriteDuringBuild():
            layer(x)
        assert torch.equal(layer(x), want(x))


def test_a_compile_in_another_thread_changes_nothing_here(monkeypatch):
    """torch.compiler.is_compiling() is a process-wide flag, true in every thread while any thread
    compiles. With it set (as another thread's compile sets it), eager calls here still refresh the
    codebook of changed exponents and still give torch.func transforms their composite form."""
    monkeypatch.setattr(torch.compiler, "_is_compiling_flag", True)
    assert torch.compiler.is_compiling()
    torch.manual_seed(0)
    layer = PowerQuantLinear.from_linear(torch.nn.Linear(32, 8), bits=4, group_size=16, a=0.5)
    x = torch.randn(2, 32)
    with torch.no_grad():
        layer.exponent.fill_(0.9)
        want = PowerQuantLinear(32, 8, group_size=16)
        want.load_state_dict(layer.state_dict())
        assert torch.equal(layer(x), want(x))
    xn, wn, tn = torch.randn(4, 16), torch.randn(16), torch.randn(4, 16)
    _, tangent = torch.func.jvp(lambda t: lmkern.rms_norm(t, wn), (xn,), (tn,))
    _, want_t = torch.func.jvp(lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * wn, (xn,), (tn,))
    torch.testing.assert_close(tangent, want_t, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.jvp(lambda t: power_fake_quantize(t, 0.5), (xn,), (tn,))
