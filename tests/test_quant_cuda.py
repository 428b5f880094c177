"""CUDA power quantization (cuda/quant.cu) against the CPU ops and the float64 references.

Every test carries the `cuda` marker (conftest skips them unless lmkern's CUDA path works here).
Codes must be bit-identical to the CPU kernel's (the only allowed difference: elements the float64
reference flags as within 1e-9 relative of a code boundary, where CUDA's double pow and the host's
may round the boundary differently; their count is reported and bounded); dequantized and
fake-quantized values within float rounding; gradients and linear outputs within the tolerances of
DESIGN.md against the float64 references.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lmkern.nn import PowerQuantLinear
from lmkern.quant import power_dequantize, power_fake_quantize, power_quantize, search_exponent

from reference.quant import dequantize_ref, fake_quantize_grads_ref, linear_ref, quantize_ref, unpack_ref

pytestmark = pytest.mark.cuda

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16]
# |x̂ − ref| ≤ RTOL·|ref| + ATOL element-wise, for a value stored in each dtype (as test_quant.py).
DEQ_RTOL = {F32: 3e-7, BF16: 2 ** -8 + 3e-7, F16: 2 ** -11 + 3e-7}
DEQ_ATOL = {F32: 1e-300, BF16: 1e-300, F16: 2 ** -25}
TOL = {F32: 1e-5, BF16: 1e-2, F16: 1e-2}


def randn(shape, dtype, seed, mag=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * mag).to(dtype).to(device)


def rel_err(out, ref) -> float:
    o, r = out.detach().to("cpu", F64), ref.detach().to("cpu", F64)
    assert o.shape == r.shape, f"{tuple(o.shape)} vs {tuple(r.shape)}"
    if not torch.isfinite(o).all():
        return math.inf
    d, n = (o - r).norm().item(), r.norm().item()
    return d if n == 0 else d / n


def capture_graph(fn):
    """fn() captured in a CUDA graph after one warm-up call on a side stream, as torch asks:
    (the graph, what the captured call returned)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def same_codes(cuda_codes, cpu_codes, x, a, bits, g, clip=1.0):
    """Packed CUDA codes equal the CPU's byte for byte, or differ only at flagged boundary elements."""
    cuda_codes = cuda_codes.cpu()
    if torch.equal(cuda_codes, cpu_codes):
        return
    n = x.shape[-1]
    _, _, near = quantize_ref(x.cpu(), a.cpu() if isinstance(a, torch.Tensor) else a, bits, g, clip)
    got, want = unpack_ref(cuda_codes, bits, n), unpack_ref(cpu_codes, bits, n)
    diff = got != want
    assert not (diff & ~near).any(), f"{int((diff & ~near).sum())} codes differ from the CPU's away from a boundary"
    assert int(diff.sum()) <= max(2, diff.numel() // 10**6)


@st.composite
def cases(draw, max_elems=20_000):
    dtype = draw(st.sampled_from(DTYPES))
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    n = draw(st.one_of(st.integers(1, 40), st.sampled_from([64, 96, 127, 128, 256, 1000, 4096])))
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    g = draw(st.sampled_from(divisors))
    lead = draw(st.sampled_from([(1,), (3,), (2, 3), (0,), (9, 1), (17,)]))
    if math.prod(lead) * n > max_elems:
        lead = (max(1, max_elems // n),)
    rows = math.prod(lead)
    a = torch.tensor(draw(st.lists(st.floats(0.05, 1.0), min_size=rows, max_size=rows)), dtype=F32)
    if rows:
        a[0] = 1.0
    clip = draw(st.sampled_from([1.0, 0.9, 1.5]))
    mag = draw(st.sampled_from([1.0, 1e-3, 50.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dtype, bits, lead + (n,), g, a, clip, mag, seed


def make_x(shape, dtype, seed, mag):
    x = randn(shape, dtype, seed, mag)
    if x.numel() > 4:  # exact zeros and an all-zero group
        x.view(-1)[seed % x.numel()] = 0
        x.view(-1)[: min(3, x.shape[-1])] = 0
    return x


# ------------------------------------------------------------------------------------------------
# quantize / dequantize / fake quantize against the CPU ops
# ------------------------------------------------------------------------------------------------


@given(cases())
@settings(deadline=None, max_examples=30)  # the GPU check's time limit: CPU references dominate
def test_quantize_matches_cpu_bit_for_bit(case):
    dtype, bits, shape, g, a, clip, mag, seed = case
    x = make_x(shape, dtype, seed, mag)
    q_cpu = power_quantize(x, a, bits, g, clip)
    q = power_quantize(x.cuda(), a.cuda(), bits, g, clip)
    assert q.codes.is_cuda and q.scales.is_cuda and q.exponent.is_cuda
    assert q.codes.shape == q_cpu.codes.shape and q.scales.shape == q_cpu.scales.shape
    assert torch.equal(q.scales.cpu(), q_cpu.scales), "scales differ from the CPU's"
    same_codes(q.codes, q_cpu.codes, x, a, bits, g, clip)
    # Dequantize: the CPU's dequantization of the same codes, within float rounding.
    xh = power_dequantize(q)
    assert xh.is_cuda and xh.dtype == dtype and xh.shape == x.shape
    codes = unpack_ref(q.codes.cpu(), bits, shape[-1])
    ref = dequantize_ref(codes, q.scales.cpu(), a, bits, g).reshape(shape)
    err = (xh.cpu().to(F64) - ref).abs()
    assert (err <= DEQ_RTOL[dtype] * ref.abs() + DEQ_ATOL[dtype]).all(), f"max element error {err.max().item():.3e}"
    # Fake quantize: the same values and scales.
    y, scales = torch.ops.lmkern.power_fake_quantize(x.cuda(), a.cuda(), bits, g, clip)
    assert torch.equal(scales.cpu(), q_cpu.scales)
    assert torch.equal(y.cpu(), xh.cpu().reshape(y.shape)), "fake quantize differs from dequantize(quantize(x))"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_rows_match_cpu(bits, dtype):
    x = randn((256, 4096), dtype, bits)
    a = torch.linspace(0.2, 1.0, 256)
    q_cpu = power_quantize(x, a, bits, 128)
    q = power_quantize(x.cuda(), a.cuda(), bits, 128)
    assert torch.equal(q.scales.cpu(), q_cpu.scales)
    same_codes(q.codes, q_cpu.codes, x, a, bits, 128)
    assert rel_err(power_dequantize(q), power_dequantize(q_cpu)) <= 1e-6


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape, g", [((67, 4096), 128), ((5, 100), 25), ((3, 7), 7)])
def test_dequantize_through_codebooks_matches_cpu(bits, shape, g):
    """The dequantize_codebooks kernel (power_quant_linear's many-token and backward paths): any
    table, NaN included, bit for bit the CPU's dtype(m·table[field])."""
    from lmkern.ops import quant as quant_ops

    x = randn(shape, F32, bits)
    q = power_quantize(x, torch.linspace(0.3, 1.0, shape[0]), bits, g)
    table = torch.randn((shape[0], 2 ** bits), generator=torch.Generator().manual_seed(bits)) * 3
    table[0, 1] = math.nan
    for dtype in DTYPES:
        want = quant_ops._dequantize_codebooks(q.codes, q.scales, table, bits, g, shape[1], dtype)
        got = quant_ops._dequantize_codebooks(q.codes.cuda(), q.scales.cuda(), table.cuda(), bits, g, shape[1], dtype)
        assert got.is_cuda and got.dtype == dtype
        assert torch.equal(got.cpu().isnan(), want.isnan()) and torch.equal(got.cpu().nan_to_num(), want.nan_to_num())


@given(cases(max_elems=5000))
@settings(deadline=None, max_examples=30)
def test_fake_quantize_gradients_match_reference(case):
    dtype, bits, shape, g, a, clip, mag, seed = case
    x = make_x(shape, dtype, seed, mag)
    dy = randn(shape, dtype, seed + 1)
    _, _, near = quantize_ref(x, a, bits, g, clip)
    dy.view(-1, shape[-1])[near] = 0  # elements on a code boundary may take the other code: left out
    xc = x.cuda().requires_grad_(True)
    ac = a.cuda().requires_grad_(True)
    y = power_fake_quantize(xc, ac, bits, g, clip)
    dx, da = torch.autograd.grad(y, (xc, ac), dy.cuda())
    assert dx.is_cuda and dx.dtype == dtype and da.dtype == F32
    # Against the CPU op (same formulas in float64, different summation order of da).
    xp, ap = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
    dx_cpu, da_cpu = torch.autograd.grad(power_fake_quantize(xp, ap, bits, g, clip), (xp, ap), dy)
    assert rel_err(dx, dx_cpu) <= TOL[dtype] / 10
    assert rel_err(da, da_cpu) <= 1e-5 or (da.cpu() - da_cpu).abs().max().item() < 1e-6 * dy.to(F64).abs().sum().item()
    # And against the float64 reference (as test_quant.py checks the CPU op).
    _, dx_ref, da_ref = fake_quantize_grads_ref(x, a.to(F64), dy, bits, g, clip)
    assert rel_err(dx, dx_ref.reshape(shape)) <= TOL[dtype]
    assert rel_err(da, da_ref) <= TOL[dtype] or (da.cpu().to(F64) - da_ref).abs().max().item() < 1e-6 * dy.to(F64).abs().sum().item()


def test_fake_quantize_backward_is_deterministic():
    x = randn((300, 1536), BF16, 5, device="cuda")
    a = torch.linspace(0.3, 1.0, 300, device="cuda")
    dy = randn((300, 1536), BF16, 6, device="cuda")
    _, scales = torch.ops.lmkern.power_fake_quantize(x, a, 4, 64, 1.0)
    first = torch.ops.lmkern.power_fake_quantize_backward(dy, x, scales, a, 4, 64, True)
    for _ in range(3):
        again = torch.ops.lmkern.power_fake_quantize_backward(dy, x, scales, a, 4, 64, True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_fake_quantize_under_vmap_is_one_call():
    """lmkern's vmap rule on CUDA tensors: a loop's values and gradients, shared or batched exponents."""
    x = randn((5, 3, 64), BF16, 7, device="cuda")
    a = torch.linspace(0.2, 1.0, 15, device="cuda").reshape(5, 3)
    fq = lambda r, e: power_fake_quantize(r, e, 4, 16)
    assert torch.equal(torch.vmap(fq)(x, a), torch.stack([fq(x[i], a[i]) for i in range(5)]))
    assert torch.equal(torch.vmap(lambda r: fq(r, 0.6))(x), torch.stack([fq(x[i], 0.6) for i in range(5)]))
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.vmap(fq)(xg, a).float().pow(2).sum().backward()
    torch.stack([fq(xr[i], a[i]) for i in range(5)]).float().pow(2).sum().backward()
    assert torch.equal(xg.grad, xr.grad)


# ------------------------------------------------------------------------------------------------
# linear
# ------------------------------------------------------------------------------------------------


def _linear(in_f, out_f, bias, seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
# GEMV tiles 1, 2, 4, 8 (3 and 8: the tensor-core kernel where it fits, 4-bit bf16/f16 g128); 16
# and 32: the tensor-core kernel where it fits, else dequantize + cuBLAS; 33: dequantize + cuBLAS.
@pytest.mark.parametrize("tokens", [1, 2, 3, 8, 16, 32, 33])
# (in, out, group): the tiled kernel, one pass; the generic kernel (group 3); the tiled kernel with
# two passes of its threads over the row (4352 = 272 slices of 16, 544 of 8) and a partial row block.
@pytest.mark.parametrize("shape", [(256, 96, 32), (96, 37, 3), (512, 40, 128), (4352, 21, 64)])
def test_linear_matches_cpu_and_reference(shape, tokens, dtype, bits):
    in_f, out_f, g = shape
    mod = PowerQuantLinear.from_linear(_linear(in_f, out_f, True, tokens), bits, g, a=torch.linspace(0.4, 1.0, out_f))
    x = randn((tokens, in_f), dtype, tokens + bits)
    y_cpu = mod(x)
    cmod = mod.to("cuda")
    y = cmod(x.cuda())
    assert y.is_cuda and y.dtype == dtype and y.shape == (tokens, out_f)
    ref = linear_ref(x, cmod.dequantized_weight().cpu().to(F64), cmod.bias.cpu())
    assert rel_err(y, ref) <= TOL[dtype]
    assert rel_err(y, y_cpu) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_gradient(dtype):
    mod = PowerQuantLinear.from_linear(_linear(256, 48, True, 3), 4, 64, a=0.8).to("cuda")
    for tokens in (1, 5, 20):
        x = randn((2, tokens, 256), dtype, tokens, device="cuda").requires_grad_(True)
        dy = randn((2, tokens, 48), dtype, tokens + 1, device="cuda")
        (dx,) = torch.autograd.grad(mod(x), (x,), dy)
        assert dx.dtype == dtype and dx.shape == x.shape
        w = mod.dequantized_weight().cpu().to(F64)
        assert rel_err(dx, dy.cpu().to(F64) @ w) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_under_autocast_and_torch_func(dtype):
    """On CUDA too: autocast sets the dtype (as for nn.Linear); under torch.func the layer's
    torch-ops form gives x @ Ŵᵀ + b and its gradient; the checkpoint loads built on meta."""
    mod = PowerQuantLinear.from_linear(_linear(256, 48, True, 4), 4, 64, a=0.7).to("cuda")
    x = randn((5, 256), dtype, 7, device="cuda")
    w = mod.dequantized_weight().cpu().to(F64)
    ref = linear_ref(x.cpu(), w, mod.bias.cpu())
    if dtype != torch.float32:
        with torch.autocast("cuda", dtype=dtype):
            y = mod(x.float())
        assert y.dtype == dtype and rel_err(y, ref) <= TOL[dtype]
    y = torch.func.vmap(mod)(x)
    assert y.dtype == dtype and rel_err(y, ref) <= TOL[dtype]
    g = torch.func.grad(lambda x: (mod(x).float() ** 2).sum())(x)
    assert rel_err(g, (2 * ref) @ w) <= 2 * TOL[dtype]
    with torch.device("meta"):
        lazy = PowerQuantLinear(256, 48, bits=4, group_size=64)
    lazy.load_state_dict(mod.state_dict(), assign=True)
    assert lazy.codebook.is_cuda and torch.equal(lazy(x), mod(x))


def test_linear_gemv_target_shape_and_determinism():
    """Batch 1, 4096 → 4096, 4-bit g128 (the benchmark shape): the tiled kernel, deterministic."""
    w = randn((4096, 4096), F32, 1, 0.02)
    a = torch.full((4096,), 0.7)
    q = power_quantize(w.cuda(), a.cuda(), 4, 128)
    x = randn((1, 4096), BF16, 2, device="cuda")
    table = torch.ops.lmkern.power_codebook(q.exponent, 4)
    assert table.is_cuda and torch.equal(table.cpu(), torch.ops.lmkern.power_codebook(q.exponent.cpu(), 4))
    y = torch.ops.lmkern.power_quant_linear(x, q.codes, q.scales, table, None, 4, 128, 4096)
    ref = linear_ref(x.cpu(), power_dequantize(q).cpu().to(F64))
    assert rel_err(y, ref) <= TOL[BF16]
    for _ in range(3):
        assert torch.equal(y, torch.ops.lmkern.power_quant_linear(x, q.codes, q.scales, table, None, 4, 128, 4096))


TUNED_SCRIPT = r"""
import os, sys
import torch
from torch.profiler import ProfilerActivity, profile
from lmkern.nn import PowerQuantLinear

F64 = torch.float64
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}  # kernel names
bad = []
# "k,nt,n,g,bulk,mma_rows": the variant bf16 4-bit calls of token tile nt take (only with in_features
# n and groups of g, where n > 0: a variant specialized for that shape; bulk = 1: only where the
# groups per row are a multiple of 4 and at most 128, on sm_90+; mma_rows = 8 or 16: the tensor-core
# kernel of that many rows a block, quant_linmma<mma_rows>_bf16_*, in place of any kernel where the
# tensor-core one fits, at up to 8 tokens (nt = 8), past 8 (nt = 16) or at 1 with at most 16384
# columns (nt = 1))
variant = os.environ["WANT_VARIANT"]
k, nt, vn, vg, bulk, mma_rows = (int(v) for v in variant.split(",")) if variant else (0, 0, 0, 0, 0, 0)
sm90 = torch.cuda.get_device_capability()[0] >= 9
tune = os.environ["LMKERN_CUDA_QUANT_TUNE"].split(",")
mma = "mma=1" in tune  # the tensor-core kernel where it fits, at every token count
no_mma = "mma=0" in tune  # never the tensor-core kernel (by default: where it fits, from 3 tokens)
# A variant replaces the bf16 4-bit kernel of one token tile and the tensor-core kernel only 4-bit
# ones: the other calls take the default kernels, which the other tunings test.
every_bits, every_dtype = (2, 3, 4, 8), tuple(TOL)
bits_here = (4,) if k or mma else every_bits
dtypes_here = (torch.bfloat16,) if k else every_dtype
# (in, out, group): fewer slices than threads and partial row tiles; more slices than threads, the
# last pass partial (4352 = 256 + 16 slices of 16); one group per row (8448 = 528 slices; a group
# size no power of two, which TILE_UNIFORM divides by); more row tiles than a GPU has SMs (4500
# rows: blocks_per_sm=1 makes blocks take several, the last partial); groups of 128 (the
# tensor-core kernel's shapes; 8448 too) with a partial row tile; 4096 columns in groups of 128 (the
# shape variants 40-41 and 45-46 are specialized for), two full row tiles and a partial one; 14336
# columns in groups of 128 (variant 42's shape: 3.5 passes of the block's slices).
# One profile per layer: each call's kernel (which differs by dtype and token tile) must be among
# those it shows, and none of them the generic kernel (every shape here fits the tiled ones).
for in_f, out_f, g in [(256, 96, 32), (4352, 21, 64), (8448, 6, 8448), (256, 4500, 32), (384, 40, 128), (4096, 40, 128),
                       (14336, 20, 128)]:
    for bits in bits_here:
        torch.manual_seed(bits)
        lin = torch.nn.Linear(in_f, out_f)
        mod = PowerQuantLinear.from_linear(lin, bits, g, a=torch.linspace(0.4, 1.0, out_f)).to("cuda")
        w = mod.dequantized_weight().cpu().to(F64)
        wants = set()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for dtype in dtypes_here:
                for tokens in (1, 2, 5):
                    x = torch.randn(tokens, in_f, dtype=F64).to(dtype)
                    y = mod(x.cuda())
                    tile = 1 if tokens == 1 else 2 if tokens == 2 else 8
                    want = f"quant_lintile{bits}_{SUFFIX[dtype]}_n{tile}"
                    shape_here = (not vn or (in_f, g) == (vn, vg)) and (
                        not bulk or (sm90 and (in_f // g) % 4 == 0 and in_f // g <= 128))
                    if k and not mma_rows and bits == 4 and dtype == torch.bfloat16 and tile == nt and shape_here:
                        want += f"_v{k}"
                    mma_fits = bits == 4 and dtype != torch.float32 and in_f % 128 == 0 and g % 128 == 0
                    mma_here = mma or (tokens >= 3 and not no_mma)
                    if mma_here and mma_fits:
                        want = f"quant_linmma4_{SUFFIX[dtype]}_n8"
                    tokens_fit = tokens == 1 and in_f <= 16384 if nt == 1 else (tokens <= 8) == (nt == 8)
                    if mma_rows and mma_fits and dtype == torch.bfloat16 and tokens_fit:
                        want = f"quant_linmma{mma_rows}_bf16_n{nt}_v{k}"
                    wants.add(want)
                    ref = x.to(F64) @ w.T + mod.bias.detach().cpu().to(F64)
                    err = ((y.cpu().to(F64) - ref).norm() / ref.norm()).item()
                    if not err <= TOL[dtype]:
                        bad.append(f"{in_f}x{out_f} g{g} {bits}-bit {dtype} tokens={tokens}: rel err {err:.3g}")
            torch.cuda.synchronize()
        names = {e.key for e in prof.key_averages()}
        for want in sorted(wants - names):
            bad.append(f"{in_f}x{out_f} g{g} {bits}-bit: {want} not in {sorted(names)}")
        if any(name.startswith("quant_linear_") for name in names):
            bad.append(f"{in_f}x{out_f} g{g} {bits}-bit: the generic kernel ran ({sorted(names)})")
# Kernels that depend on the one before (with pdl=1 each may start before it ends): a chain of
# linears, each reading the previous one's output, eagerly and replayed from a CUDA graph; and a
# linear right after the quantization that writes its codes.
torch.manual_seed(7)
mods = [PowerQuantLinear.from_linear(torch.nn.Linear(512, 512), 4, 128, a=0.7).to("cuda") for _ in range(4)]
x0 = torch.randn(1, 512).to(torch.bfloat16).cuda()
def chain(x):
    for m in mods:
        x = m(x)
    return x
want = x0.cpu().to(F64)
for m in mods:
    want = (want @ m.dequantized_weight().cpu().to(F64).T + m.bias.detach().cpu().to(F64)).to(torch.bfloat16).to(F64)
from test_quant_cuda import capture_graph
for how in ("eager", "graph"):
    if how == "eager":
        got = chain(x0)
    else:
        graph, got = capture_graph(lambda: chain(x0))
        graph.replay()
    torch.cuda.synchronize()
    err = ((got.cpu().to(F64) - want).norm() / want.norm()).item()
    if not err <= 2e-2:
        bad.append(f"chain of 4 linears ({how}): rel err {err:.3g}")
from lmkern.quant import power_dequantize, power_quantize
for seed in range(3):
    w = torch.randn(384, 4096, device="cuda") * (seed + 1)
    q = power_quantize(w, 0.6, 4, 128)
    table = torch.ops.lmkern.power_codebook(q.exponent, 4)
    x = torch.randn(1, 4096, device="cuda").to(torch.bfloat16)
    y = torch.ops.lmkern.power_quant_linear(x, q.codes, q.scales, table, None, 4, 128, 4096)
    ref = x.cpu().to(F64) @ power_dequantize(q).cpu().to(F64).T
    err = ((y.cpu().to(F64) - ref).norm() / ref.norm()).item()
    if not err <= 1e-2:
        bad.append(f"linear right after quantize (seed {seed}): rel err {err:.3g}")
# Past _core.quant_cuda_gemv_max_tokens the op takes the dequantize + cuBLAS path; the kernels' own
# token tiles past it (the tensor-core kernel's second 16-token tile) are reached through _fused_gemv.
from lmkern.ops.quant import _fused_gemv
torch.manual_seed(11)
lin = torch.nn.Linear(512, 56)
mod = PowerQuantLinear.from_linear(lin, 4, 128, a=torch.linspace(0.5, 1.0, 56)).to("cuda")
w = mod.dequantized_weight().cpu().to(F64)
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for dtype in (torch.bfloat16, torch.float16):
        for tokens in (9, 16, 23, 40):
            x = torch.randn(tokens, 512, dtype=F64).to(dtype).cuda()
            y = _fused_gemv(x, mod.codes, mod.scales, mod.codebook, mod.bias, 4, 128, 512)
            ref = x.cpu().to(F64) @ w.T + mod.bias.detach().cpu().to(F64)
            err = ((y.cpu().to(F64) - ref).norm() / ref.norm()).item()
            if not err <= TOL[dtype]:
                bad.append(f"512x56 g128 {dtype} tokens={tokens} (direct): rel err {err:.3g}")
    torch.cuda.synchronize()
names = {e.key for e in prof.key_averages()}
if mma_rows and nt == 16 and f"quant_linmma{mma_rows}_bf16_n16_v{k}" not in names:
    bad.append(f"512x56 g128 9-40 tokens (direct): quant_linmma{mma_rows}_bf16_n16_v{k} not in {sorted(names)}")
print("\n".join(bad) or "ok")
sys.exit(1 if bad else 0)
"""


# Token tile of each tuning variant, and the (in_features, group size) it is specialized for (0, 0:
# any) (rust/core/src/quant/cuda.rs, TILE_VARIANTS).
VARIANTS = {
    24: (1, 0, 0), 25: (1, 0, 0), 40: (1, 4096, 128), 41: (2, 4096, 128), 42: (1, 14336, 128), 43: (1, 0, 0), 44: (2, 0, 0),
    45: (1, 4096, 128), 46: (2, 4096, 128), 47: (1, 0, 0), 48: (1, 0, 0), 49: (2, 0, 0), 50: (1, 0, 0),
    51: (8, 0, 0), 52: (8, 0, 0), 53: (16, 0, 0), 54: (8, 0, 0), 55: (8, 0, 0), 56: (8, 0, 0), 57: (16, 0, 0), 58: (1, 0, 0),
    59: (1, 0, 0),
}
# The variants whose row tiles come by bulk copies (sm_90+; rows of scales of whole 16 bytes, at
# most 128 groups: rust/core/src/quant/cuda.rs, bulk_fits): other calls take the default kernel.
BULK_VARIANTS = (48, 49, 50)
# The tensor-core kernels of 8 and 16 rows a block (linear_mma_lp): in place of any
# kernel where the tensor-core one fits (their token tile: up to 8 tokens, past 8, or 1); k: rows.
MMA_ROWS_OF_VARIANT = {51: 8, 52: 8, 53: 8, 54: 8, 55: 16, 56: 16, 57: 16, 58: 16, 59: 8}


TUNINGS = [
    "pdl=0", "pdl=1", "blocks_per_sm=1,pdl=1", "blocks_per_sm=1,pdl=0", "variant=25,blocks_per_sm=1,pdl=1", "mma=1",
    "mma=1,pdl=1", "mma=0",
] + [f"variant={k},pdl=1" for k in VARIANTS]


@pytest.fixture(scope="module")
def tuned_runs(request):
    """TUNED_SCRIPT in a subprocess per tuning selected for this session, all started at once (each
    is a process of its own: LMKERN_CUDA_QUANT_TUNE is read once per process), so that they run side
    by side on the GPU; any still running at the module's end are killed."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))  # for `from test_quant_cuda import capture_graph`
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    selected = [it.callspec.params["tune"] for it in request.session.items
                if getattr(it, "originalname", None) == "test_linear_tuned_launch"]
    procs = {}
    for tune in dict.fromkeys(selected):
        k = next((int(item[8:]) for item in tune.split(",") if item.startswith("variant=")), None)
        variant = ",".join(str(v) for v in (k, *VARIANTS[k], int(k in BULK_VARIANTS), MMA_ROWS_OF_VARIANT.get(k, 0))) if k else ""
        env = dict(os.environ, LMKERN_CUDA_QUANT_TUNE=tune, PYTHONPATH=path, WANT_VARIANT=variant)
        procs[tune] = subprocess.Popen([sys.executable, "-c", TUNED_SCRIPT], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("tune", TUNINGS)
def test_linear_tuned_launch(tune, tuned_runs):
    """The linears launched with programmatic dependent launch (pdl=1, the default on sm_90+ where
    it was measured to pay: each call may start before the one before it ends, and waits in
    griddepcontrol.wait before it reads) and without (pdl=0), the tiled kernel's tuning variants
    (variant=<k>), the tensor-core kernel at every token count (mma=1) and never (mma=0), and a grid
    of one block per SM (blocks_per_sm=1: each block takes several row tiles), set by
    LMKERN_CUDA_QUANT_TUNE (see tuned_runs). Every code width and dtype at 1, 2 and 5 tokens (those a variant or the tensor-core
    kernel takes, for those) takes the kernel planned (the profiler shows it) and matches the float64
    product; so do kernels that read what the one before them wrote (a chain of linears, eager and
    in a CUDA graph; a linear after a quantize)."""
    proc = tuned_runs[tune]
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:] + err[-4000:]


def test_linear_misaligned_inputs_use_the_generic_kernel():
    mod = PowerQuantLinear.from_linear(_linear(128, 16, False, 9), 4, 32, a=0.6).to("cuda")
    flat = randn((2 * 128 + 1,), BF16, 3, device="cuda")
    x = flat[1:].view(2, 128)  # 2-byte offset: not 16-byte aligned
    y = mod(x)
    ref = linear_ref(x.cpu(), mod.dequantized_weight().cpu().to(F64))
    assert rel_err(y, ref) <= TOL[BF16]


def test_linear_cuda_graph_capture():
    """The GEMV path never synchronizes: it can be captured in a CUDA graph."""
    mod = PowerQuantLinear.from_linear(_linear(512, 256, True, 1), 4, 128, a=0.75).to("cuda")
    x = randn((1, 512), BF16, 4, device="cuda")
    graph, y = capture_graph(lambda: mod(x))
    x.copy_(randn((1, 512), BF16, 5, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, mod(x))


# ------------------------------------------------------------------------------------------------
# search, module, empty shapes
# ------------------------------------------------------------------------------------------------


def test_search_exponent_runs_on_the_host_for_cuda_tensors():
    w = randn((6, 64), F32, 7)
    x = randn((10, 64), F32, 8)
    for per_row in (True, False):
        for calib in (None, x):
            got = search_exponent(w.cuda(), 4, 16, x=None if calib is None else calib.cuda(), per_row=per_row)
            assert got.is_cuda
            assert torch.equal(got.cpu(), search_exponent(w, 4, 16, x=calib, per_row=per_row))


def test_quantized_tensor_moves_between_devices():
    """PowerQuantized.to: quantized on the CPU, dequantized on the GPU (and back) gives the CPU's
    values; every tensor field moves, the original shape and dtype stay."""
    w = randn((37, 96), BF16, 11)
    q = power_quantize(w, torch.rand(37, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.2, 4, 32)
    qc = q.to("cuda")
    assert qc.device.type == "cuda" and all(t.is_cuda for t in (qc.codes, qc.scales, qc.exponent))
    assert (qc.shape, qc.dtype, qc.bits, qc.group_size) == (q.shape, q.dtype, q.bits, q.group_size)
    assert qc.to("cuda") is qc
    assert torch.equal(power_dequantize(qc).cpu(), power_dequantize(q))
    assert torch.equal(qc.to("cpu").codes, q.codes)


def test_power_quant_linear_moves_to_cuda_and_builds_there():
    lin = _linear(128, 24, True, 2)
    mod = PowerQuantLinear.from_linear(lin, 4, 32)
    cmod = PowerQuantLinear.from_linear(lin.to("cuda"), 4, 32)  # searched on the host, quantized on CUDA
    for name, buf in mod.state_dict().items():
        other = cmod.state_dict()[name]
        assert other.is_cuda
        if name == "codes":
            same_codes(other, buf, lin.weight.detach().cpu(), mod.exponent, 4, 32)
        else:
            assert torch.equal(other.cpu(), buf), name
    assert cmod.codebook.is_cuda and torch.equal(cmod.codebook.cpu(), mod.codebook)
    fresh = PowerQuantLinear(128, 24, bits=4, group_size=32, device="cuda")
    fresh.load_state_dict(mod.state_dict())
    assert fresh.codebook.is_cuda and torch.equal(fresh.codebook.cpu(), mod.codebook)
    x = randn((3, 128), F32, 1)
    assert rel_err(fresh(x.cuda()), mod(x)) <= TOL[F32]
    # Moved and converted at once: the quantized weight's buffers stay float32, now on the GPU.
    bmod = PowerQuantLinear.from_linear(lin, 4, 32).to("cuda", torch.bfloat16)
    for name, buf in bmod.named_buffers():
        assert buf.is_cuda and torch.equal(buf.cpu(), getattr(mod, name)), name
    xb = randn((3, 128), BF16, 2)
    assert rel_err(bmod(xb.cuda()), mod(xb)) <= TOL[BF16]


def test_empty_shapes():
    dev = "cuda"
    for shape in [(0, 16), (3, 0)]:
        x = torch.zeros(shape, device=dev)
        a = torch.full((shape[0],), 0.5, device=dev)
        q = power_quantize(x, a, 4, None)
        assert q.codes.shape == (shape[0], (shape[1] * 4 + 7) // 8) and power_dequantize(q).shape == shape
        y = power_fake_quantize(x.clone().requires_grad_(True), a, 4, None)
        assert y.shape == shape
    dy = torch.zeros(3, 0, device=dev)
    dx, da = torch.ops.lmkern.power_fake_quantize_backward(dy, dy, torch.zeros(3, 0, device=dev),
                                                           torch.full((3,), 0.5, device=dev), 4, 1, True)
    assert dx.shape == (3, 0) and torch.equal(da.cpu(), torch.zeros(3))
    mod = PowerQuantLinear(32, 8, bits=4, group_size=16, device=dev)
    assert mod(torch.zeros(0, 32, device=dev)).shape == (0, 8)
    mod0 = PowerQuantLinear(16, 0, bits=4, group_size=16, device=dev)
    assert mod0(torch.zeros(4, 16, device=dev)).shape == (4, 0)
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_bad_input_raises_clearly():
    x = randn((4, 32), F32, 1, device="cuda")
    a = torch.full((4,), 0.5, device="cuda")
    with pytest.raises(TypeError, match="float64 is supported on CPU only"):
        power_quantize(x.double(), 0.5)
    with pytest.raises(ValueError, match="a: expected a tensor on"):
        power_quantize(x, torch.full((4,), 0.5))  # exponents on the CPU
    with pytest.raises(ValueError, match=r"expected exponents in \(0, 1\]"):
        power_quantize(x, torch.tensor([0.5, 0.5, 1.5, 0.5], device="cuda"))
    with pytest.raises(ValueError, match=r"expected exponents in \(0, 1\]"):
        power_fake_quantize(x, torch.tensor([0.5, 0.0, 0.5, 0.5], device="cuda"))
    bad = x.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        power_quantize(bad, a)
    bad[2, 5] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        power_fake_quantize(bad, a)
    q = power_quantize(x, a, 4, 16)
    with pytest.raises(ValueError, match=r"expected exponents in \(0, 1\]"):
        torch.ops.lmkern.power_dequantize(q.codes, q.scales, torch.tensor([0.5, -1.0, 0.5, 0.5], device="cuda"),
                                          4, 16, 32, F32)
    with pytest.raises(TypeError, match="float64 is supported on CPU only"):
        torch.ops.lmkern.power_dequantize(q.codes, q.scales, q.exponent, 4, 16, 32, F64)
    for v in (-0.5, float("nan")):  # scales: checked on the device with the exponents
        scales = q.scales.clone()
        scales[1, 1] = v
        with pytest.raises(ValueError, match=r"scales: expected finite scales >= 0 .*; got (?i:nan|-0.5)"):
            torch.ops.lmkern.power_dequantize(q.codes, scales, q.exponent, 4, 16, 32, F32)
    with pytest.raises(ValueError, match="scales: expected a tensor on"):
        torch.ops.lmkern.power_dequantize(q.codes, q.scales.cpu(), q.exponent, 4, 16, 32, F32)
    mod = PowerQuantLinear.from_linear(_linear(32, 8, True, 0), 4, 16, a=0.7)
    with pytest.raises(ValueError, match="codes: expected a tensor on"):
        mod(x)  # module on the CPU, activations on CUDA
    cmod = mod.to("cuda")
    with pytest.raises(ValueError, match="codes: expected a tensor on cpu"):
        cmod(x.cpu())
    with pytest.raises(TypeError, match="float64 is supported on CPU only"):
        cmod(x.double())
    with pytest.raises(ValueError, match="table: expected a tensor on"):
        torch.ops.lmkern.power_quant_linear(x, cmod.codes, cmod.scales, cmod.codebook.cpu(), None, 4, 16, 32)
    with pytest.raises(ValueError, match="table: expected float32 of shape"):
        torch.ops.lmkern.power_quant_linear(x, cmod.codes, cmod.scales, cmod.codebook[:, :8], None, 4, 16, 32)
    # The codebooks are built on the host from the exponents: an exponent outside (0, 1] is refused there.
    before = cmod.exponent[3].item()
    cmod.exponent[3] = 2.0
    with pytest.raises(ValueError, match=r"expected exponents in \(0, 1\]"):
        cmod.refresh_codebook()
    with pytest.raises(ValueError, match=r"expected exponents in \(0, 1\]"):
        cmod(x)  # the forward rebuilds the codebook of exponents changed in place: refused the same way
    cmod.exponent[3] = before
    cmod(x)
    # The GEMV reads the codebooks unchecked (no synchronization): a NaN codebook row gives NaN outputs,
    # in the fused GEMV and in the dequantize + cuBLAS path alike.
    cmod.codebook[3] = float("nan")
    for xs in (x, randn((12, 32), F32, 2, device="cuda")):
        y = cmod(xs)
        assert torch.isnan(y[:, 3]).all() and torch.isfinite(y[:, :3]).all() and torch.isfinite(y[:, 4:]).all()


# ------------------------------------------------------------------------------------------------
# opcheck
# ------------------------------------------------------------------------------------------------


def _opcheck_cases():
    dev = "cuda"
    x = randn((3, 32), F32, 0, device=dev)
    a = torch.full((3,), 0.6, device=dev)
    q = power_quantize(x, a, 4, 16)
    lin = PowerQuantLinear.from_linear(_linear(32, 5, True, 0), 4, 16, a=0.7).to(dev)
    xg = randn((2, 32), F32, 1, device=dev).requires_grad_(True)
    return [
        (torch.ops.lmkern.power_quantize, (x, a, 4, 16, 1.0)),
        (torch.ops.lmkern.power_quantize, (randn((2, 3, 24), BF16, 1, device=dev), torch.full((6,), 0.5, device=dev), 3, 8, 0.9)),
        (torch.ops.lmkern.power_dequantize, (q.codes, q.scales, q.exponent, 4, 16, 32, torch.bfloat16)),
        (torch.ops.lmkern.power_fake_quantize, (x.clone().requires_grad_(True), a.clone().requires_grad_(True), 4, 16, 1.0)),
        (torch.ops.lmkern.power_fake_quantize_backward, (torch.randn(3, 32, device=dev), x, q.scales, a, 4, 16, True)),
        (torch.ops.lmkern.power_quant_linear, (xg, lin.codes, lin.scales, lin.codebook, lin.bias, 4, 16, 32)),
        (torch.ops.lmkern.power_quant_linear, (randn((2, 2, 32), F16, 2, device=dev), lin.codes, lin.scales, lin.codebook, None, 4, 16, 32)),
        (torch.ops.lmkern.power_quant_linear, (randn((12, 32), BF16, 2, device=dev), lin.codes, lin.scales, lin.codebook, lin.bias, 4, 16, 32)),
        (torch.ops.lmkern.power_quant_linear_backward, (torch.randn(2, 5, device=dev), lin.codes, lin.scales, lin.codebook, 4, 16, 32)),
        (torch.ops.lmkern.power_codebook, (torch.rand(7, device=dev) * 0.9 + 0.1, 3)),
        (torch.ops.lmkern.power_search_exponent, (torch.randn(4, 32, device=dev), None, 4, 16, 1.0, True)),
    ]


@pytest.mark.parametrize("i", range(11))
def test_opcheck(i):
    op, args = _opcheck_cases()[i]
    torch.library.opcheck(op, args)
