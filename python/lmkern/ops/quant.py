"""Power-exponent quantization (PowerQuant, NUPES) as torch custom ops. The public API, and the
packed layout these ops read and write, are in :mod:`lmkern.quant`.

Ops (torch.ops.lmkern.*); x is [..., n] with rows = the product of its leading dims, a is float32 [rows]:
  power_quantize(x, a, bits, group_size, clip) -> (codes uint8 [rows, ceil(n·bits/8)], scales f32 [rows, n/g])
  power_dequantize(codes, scales, a, bits, group_size, n, dtype) -> x̂ [rows, n] of dtype
  power_fake_quantize(x, a, bits, group_size, clip) -> (x̂ like x, scales)        differentiable in x and a
  power_fake_quantize_backward(dy, x, scales, a, bits, group_size, a_grad) -> (dx like x, da f32 [rows] or [0])
  power_codebook(a, bits) -> f32 [rows, 2^bits]: sign(q_f)·(|q_f|/qmax)^(1/a) for every field f
  power_quant_linear(x, codes, scales, table, bias?, bits, group_size, in_features) -> x @ Ŵᵀ + bias   differentiable in x
  power_quant_linear_backward(dy, codes, scales, table, bits, group_size, in_features) -> dy @ Ŵ
(table: the weight rows' codebooks, from power_codebook.)
  power_search_exponent(w, z?, bits, group_size, clip, per_row, grid, refine) -> f32 [rows] or [1]
CPU: float32, float64, bfloat16, float16. CUDA (cuda/quant.cu): float32, bfloat16, float16 (float64
raises TypeError), with these differences, all for the sake of never reading device memory inside
the kernels' launch path:
  - power_quantize / power_fake_quantize check the exponents and the finiteness of the scales on
    the device after the launch (one synchronization), power_dequantize and
    power_fake_quantize_backward the exponents before it: same errors as on CPU.
  - power_codebook runs on the CPU: a is copied to the host (and checked there), the table back.
  - power_quant_linear does not synchronize; the GEMV reads the codebooks in `table` as given. Up to
    _core.quant_cuda_gemv_max_tokens tokens (32 where the tensor-core kernel fits: bfloat16/float16,
    4 bits, in_features and the group size multiples of 128; else 8) it runs the fused lookup-table
    GEMV; beyond, it dequantizes W through the codebooks (the dequantize_codebooks kernel) into a
    scratch of the activations' dtype and calls cuBLAS (torch.addmm).
  - power_quant_linear_backward is dy @ Ŵ with Ŵ dequantized through the codebooks into dy's dtype
    and a cuBLAS matmul (torch), as the many-token forward does.
  - power_search_exponent runs on the CPU: w (and x) are copied to the host, the result back.
On CPU, power_quant_linear runs the fused GEMV up to _core.quant_cpu_gemv_max_tokens tokens (where
the AVX-512 4-bit kernel runs: 1024 on a CPU with half-width AVX-512 (Zen 4), 64 on a full-width
one; else 48, 32 on a full-width AVX-512 CPU; there, for codes in groups of multiples of 128, 96
tokens at 4 bits and 64 at 2 and 3), and power_quant_linear_backward its transposed twin
up to _core.quant_cpu_bwd_gemv_max_tokens (4 bits: with AVX-512 512 at half width, 64 at full
width, else 24; 2, 3 and 8 bits: with AVX-512 48 at half width, 32 at full width, 16 with AVX2;
the shapes of the SIMD kernels only; lmkern-core's quant::cpu_gemv_max_tokens says where each
number was measured); beyond, Ŵ is formed
a chunk of rows at a time (float32, float64 for float64; CPU_CHUNK_BYTES to CPU_CHUNK_MAX_BYTES, as
large as the activations) in a per-thread scratch and each chunk goes through torch's matmul: the
dense weight is never formed whole (unless it fits in one chunk).
"""
from __future__ import annotations

import functools
import math
import numbers
import threading

import torch

from .. import _core
from .._lib import (DTYPE_CODES, LIB, check_cpu_or_cuda, check_device, check_floating, device_args, eager_ok,
                   first_order_backward, plain_number, ptr, register_fake)

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
BITS = (2, 3, 4, 8)
#: The CPU many-token paths form Ŵ a chunk of rows at a time, in a buffer kept per thread and dtype
#: (held for the thread's life: a fresh buffer of a whole weight costs more in first-touch page
#: faults than the dequantization). A chunk is as many bytes as the activations it multiplies (x
#: forward, dy backward), within these bounds: each chunk's matmul packs all of the activations
#: again (8 MiB chunks cost ~10 % at 2048 tokens of a 4096x4096 layer, 32 MiB ones ~2 %), while a
#: small chunk is still in cache when its matmul reads it (8 MiB won at 128-512 tokens).
CPU_CHUNK_BYTES = 8 << 20
CPU_CHUNK_MAX_BYTES = 32 << 20

# Exponent search (rust/core/src/quant/mod.rs SearchArgs): a coarse grid of SEARCH_GRID exponents
# on [SEARCH_LO, 1], then SEARCH_REFINE points around each of the 4 best coarse local minima.
SEARCH_LO = 0.05
SEARCH_GRID = 1024
SEARCH_REFINE = 16
#: The largest grid and refinement accepted (each thread holds a row's errors and bucket ends at
#: every point: ~35 MB at 8 bits and 2^16 points, with x).
SEARCH_MAX_GRID = 1 << 16
SEARCH_MAX_REFINE = 1 << 12


def check_search_points(grid, refine) -> tuple[int, int]:
    """The search's coarse grid size (2 .. SEARCH_MAX_GRID) and refinement (0 .. SEARCH_MAX_REFINE)."""
    grid, refine = plain_number(grid), plain_number(refine)
    for name, v, lo, hi in (("grid", grid, 2, SEARCH_MAX_GRID), ("refine", refine, 0, SEARCH_MAX_REFINE)):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"{name}: expected an integer in [{lo}, {hi}]; got {v!r}")
    return grid, refine


def check_cpu(name: str, t: torch.Tensor) -> None:
    """A CPU or CUDA tensor (the name is historical: CUDA kernels came later)."""
    check_cpu_or_cuda(name, t)


def _no_cuda_f64(name: str, dtype: torch.dtype, t: torch.Tensor) -> None:
    if t.is_cuda and dtype == torch.float64:
        raise TypeError(f"{name}: float64 is supported on CPU only; use float32, bfloat16 or float16 on CUDA")


def _bad_exponents(a: torch.Tensor) -> torch.Tensor:
    """A device bool: some exponent outside (0, 1] (NaN included)."""
    return ~((a > 0) & (a <= 1)).all()


def _exponent_error(a: torch.Tensor) -> ValueError:
    bad = a[~((a > 0) & (a <= 1))]
    i = int(torch.nonzero(~((a > 0) & (a <= 1)))[0])
    return ValueError(f"a: expected exponents in (0, 1]; got {bad[0].item()} (row {i})")


def _cuda_check_exponents(a: torch.Tensor) -> None:
    """On CUDA, the CPU kernels' exponent check, on the device (one synchronization)."""
    if a.is_cuda and a.numel() and bool(_bad_exponents(a)):
        raise _exponent_error(a)


def _good_scales(scales: torch.Tensor) -> torch.Tensor:
    """Where scales are finite and >= 0 (power_quantize gives m = clip·max|x| >= 0)."""
    return torch.isfinite(scales) & (scales >= 0)


def check_scales(name: str, scales: torch.Tensor, a: torch.Tensor | None = None) -> None:
    """Scales of a quantized tensor from outside (a PowerQuantized built or loaded by hand, a
    checkpoint) must be finite and >= 0: a negative one would flip its group's signs silently. With
    exponents `a` on CUDA, their check too, in one synchronization."""
    if a is not None and a.is_cuda and a.numel():
        bad = torch.stack([_bad_exponents(a), ~_good_scales(scales).all()]).tolist()
        if bad[0]:
            raise _exponent_error(a)
    else:
        bad = [False, scales.numel() > 0 and not bool(_good_scales(scales).all())]
    if bad[1]:
        v = scales[~_good_scales(scales)][0].item()
        raise ValueError(f"{name}: expected finite scales >= 0 (m = clip·max|x| of each group); got {v}")


def _cuda_check_quantized(a: torch.Tensor, scales: torch.Tensor) -> None:
    """After a CUDA quantize: exponents in (0, 1] and finite scales (the kernels give a group with
    NaN/inf a NaN scale), both read back in one synchronization."""
    if not a.is_cuda or a.numel() == 0:
        return
    bad = torch.stack([_bad_exponents(a), ~torch.isfinite(scales).all()]).tolist()
    if bad[0]:
        raise _exponent_error(a)
    if bad[1]:
        raise ValueError("x: expected finite values (NaN or inf found, or clip·max|x| overflows float32)")


def check_bits(bits) -> int:
    bits = plain_number(bits)
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in BITS:
        raise ValueError(f"bits: expected one of 2, 3, 4, 8; got {bits!r}")
    return int(bits)


def check_group(group_size, n: int, of: str = "the last dimension") -> int:
    """group_size (None: one group per row) as an int dividing n (`of` names n in the message); in the
    fake impls under torch.compile(dynamic=True) n and the result may be SymInts."""
    if group_size is None:
        return max(n, 1)
    group_size = plain_number(group_size)
    if isinstance(group_size, torch.SymInt):  # the fake impls, where the row length is symbolic
        torch._check(group_size >= 1, lambda: f"group_size: expected a positive divisor of {of} {n}")
        torch._check(n % group_size == 0, lambda: f"group_size: expected a positive divisor of {of} {n}")
        return group_size
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"group_size: expected an int or None; got {type(group_size).__name__}")
    if group_size < 1 or (n % group_size) != 0:
        raise ValueError(
            f"group_size: expected a positive divisor of {of} {n}, or None for one group per row; got {group_size}"
        )
    return int(group_size)


def row_bytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def _rows(x: torch.Tensor) -> tuple[int, int]:
    n = x.shape[-1]
    return math.prod(x.shape[:-1]), n


def _check_x(name: str, x: torch.Tensor) -> None:
    check_cpu(name, x)
    check_floating(name, x, FLOAT_DTYPES)
    _no_cuda_f64(name, x.dtype, x)
    if x.dim() == 0:
        raise ValueError(f"{name}: expected a tensor with at least one dimension; got a scalar")


def _check_a(a: torch.Tensor, rows: int, ref: torch.Tensor) -> None:
    if a.dtype != torch.float32 or a.dim() != 1 or a.shape[0] != rows:
        raise ValueError(f"a: expected float32 of shape ({rows},) (one exponent per row); got {a.dtype} of shape {tuple(a.shape)}")
    if a.device != ref.device:
        raise ValueError(f"a: expected a tensor on {ref.device}; got {a.device}")


def _check_packed(codes, scales, a, bits, group_size, rows, n) -> None:
    for name, t in (("codes", codes), ("scales", scales), ("a", a)):
        check_cpu(name, t)
    check_device("scales", scales, codes, "codes")
    nb, ng = row_bytes(n, bits), (n // group_size if group_size else 0)
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (rows, nb):
        raise ValueError(f"codes: expected uint8 of shape ({rows}, {nb}); got {codes.dtype} of shape {tuple(codes.shape)}")
    if scales.dtype != torch.float32 or tuple(scales.shape) != (rows, ng):
        raise ValueError(f"scales: expected float32 of shape ({rows}, {ng}); got {scales.dtype} of shape {tuple(scales.shape)}")
    _check_a(a, rows, codes)


# ------------------------------------------------------------------------------------------------
# quantize / dequantize
# ------------------------------------------------------------------------------------------------

LIB.define("power_quantize(Tensor x, Tensor a, int bits, SymInt group_size, float clip) -> (Tensor, Tensor)")
LIB.define("power_dequantize(Tensor codes, Tensor scales, Tensor a, int bits, SymInt group_size, SymInt n, ScalarType dtype) -> Tensor")
LIB.define("power_fake_quantize(Tensor x, Tensor a, int bits, SymInt group_size, float clip) -> (Tensor, Tensor)")
LIB.define(
    "power_fake_quantize_backward(Tensor dy, Tensor x, Tensor scales, Tensor a, int bits, SymInt group_size, bool a_grad)"
    " -> (Tensor, Tensor)"
)
LIB.define("power_codebook(Tensor a, int bits) -> Tensor")
LIB.define(
    "power_quant_linear(Tensor x, Tensor codes, Tensor scales, Tensor table, Tensor? bias, int bits, SymInt group_size,"
    " SymInt in_features) -> Tensor"
)
LIB.define(
    "power_quant_linear_backward(Tensor dy, Tensor codes, Tensor scales, Tensor table, int bits, SymInt group_size,"
    " SymInt in_features) -> Tensor"
)
LIB.define(
    "power_search_exponent(Tensor w, Tensor? z, int bits, SymInt group_size, float clip, bool per_row,"
    f" int grid={SEARCH_GRID}, int refine={SEARCH_REFINE}) -> Tensor"
)


def _check_quantize(x, a, bits, group_size):
    _check_x("x", x)
    check_bits(bits)
    rows, n = _rows(x)
    check_group(group_size, n)
    _check_a(a, rows, x)
    return rows, n


def _quantize(x, a, bits, group_size, clip):
    rows, n = _check_quantize(x, a, bits, group_size)
    x, a = x.contiguous(), a.contiguous()
    codes = torch.empty((rows, row_bytes(n, bits)), dtype=torch.uint8, device=x.device)
    scales = torch.empty((rows, n // group_size), dtype=torch.float32, device=x.device)
    dev, stream = device_args(x)
    _core.quant_quantize(DTYPE_CODES[x.dtype], dev, stream, bits, rows, n, group_size, clip,
                         ptr(x), ptr(a), ptr(codes), ptr(scales))
    _cuda_check_quantized(a, scales)
    return codes, scales


def _quantize_fake(x, a, bits, group_size, clip):
    rows, n = _check_quantize(x, a, bits, group_size)
    return (x.new_empty((rows, row_bytes(n, bits)), dtype=torch.uint8),
            x.new_empty((rows, n // group_size), dtype=torch.float32))


def _dequantize(codes, scales, a, bits, group_size, n, dtype):
    check_bits(bits)
    check_group(group_size, n)
    rows = codes.shape[0]
    _check_packed(codes, scales, a, bits, group_size, rows, n)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float32, float64, bfloat16 or float16; got {dtype}")
    _no_cuda_f64("dtype", dtype, codes)
    if codes.is_cuda:  # (the CPU kernel checks exponents and scales itself)
        check_scales("scales", scales, a)
    return _dequantize_rows(_core.quant_dequantize, codes, scales, a, bits, group_size, n, dtype)


def _dequantize_rows(kernel, codes, scales, tables, bits, group_size, n, dtype, out=None):
    """The dequantizer's kernel call, checks done: `kernel` is _core.quant_dequantize (tables = the
    exponents a; on CUDA no exponent check, NaN rows) or _core.quant_dequantize_codebooks (tables =
    the rows' codebooks, read as given). `out`: a contiguous [rows, n] tensor of dtype to fill."""
    rows = codes.shape[0]
    codes, scales, tables = codes.contiguous(), scales.contiguous(), tables.contiguous()
    if out is None:
        out = torch.empty((rows, n), dtype=dtype, device=codes.device)
    dev, stream = device_args(codes)
    kernel(DTYPE_CODES[dtype], dev, stream, bits, rows, n, group_size, ptr(codes), ptr(scales), ptr(tables), ptr(out))
    return out


def _dequantize_fake(codes, scales, a, bits, group_size, n, dtype):
    check_bits(bits)
    check_group(group_size, n)
    return codes.new_empty((codes.shape[0], n), dtype=dtype)


def _fake(x, a, bits, group_size, clip):
    rows, n = _check_quantize(x, a, bits, group_size)
    x, a = x.contiguous(), a.contiguous()
    y = torch.empty_like(x)
    scales = torch.empty((rows, n // group_size), dtype=torch.float32, device=x.device)
    dev, stream = device_args(x)
    _core.quant_fake(DTYPE_CODES[x.dtype], dev, stream, bits, rows, n, group_size, clip,
                     ptr(x), ptr(a), ptr(y), ptr(scales))
    _cuda_check_quantized(a, scales)
    return y, scales


def _fake_fake(x, a, bits, group_size, clip):
    rows, n = _check_quantize(x, a, bits, group_size)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((rows, n // group_size), dtype=torch.float32)


def _fake_bwd(dy, x, scales, a, bits, group_size, a_grad):
    rows, n = _check_quantize(x, a, bits, group_size)
    if dy.shape != x.shape or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"dy: expected {x.dtype} of shape {tuple(x.shape)} on {x.device}; got {dy.dtype} {tuple(dy.shape)} on {dy.device}")
    if scales.dtype != torch.float32 or tuple(scales.shape) != (rows, n // group_size):
        raise ValueError(f"scales: expected float32 of shape ({rows}, {n // group_size}); got {scales.dtype} {tuple(scales.shape)}")
    check_device("scales", scales, x, "x")
    _cuda_check_exponents(a)
    dy, x, scales, a = dy.contiguous(), x.contiguous(), scales.contiguous(), a.contiguous()
    dx = torch.empty_like(x)
    da = torch.empty((rows if a_grad else 0,), dtype=torch.float32, device=x.device)
    dev, stream = device_args(x)
    _core.quant_fake_backward(DTYPE_CODES[x.dtype], dev, stream, bits, rows, n, group_size,
                              ptr(dy), ptr(x), ptr(scales), ptr(a), ptr(dx), ptr(da) if a_grad else 0)
    return dx, da


def _fake_bwd_fake(dy, x, scales, a, bits, group_size, a_grad):
    rows, _ = _check_quantize(x, a, bits, group_size)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((rows if a_grad else 0,), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# linear
# ------------------------------------------------------------------------------------------------


def _check_weight(codes, scales, table, bits, group_size, in_features):
    check_bits(bits)
    check_group(group_size, in_features)
    out_features = codes.shape[0] if codes.dim() == 2 else -1
    for name, t in (("codes", codes), ("scales", scales), ("table", table)):
        check_cpu(name, t)
    check_device("scales", scales, codes, "codes")
    check_device("table", table, codes, "codes")
    nb, ng = row_bytes(in_features, bits), in_features // group_size
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (out_features, nb):
        raise ValueError(f"codes: expected uint8 of shape (out_features, {nb}); got {codes.dtype} of shape {tuple(codes.shape)}")
    if scales.dtype != torch.float32 or tuple(scales.shape) != (out_features, ng):
        raise ValueError(f"scales: expected float32 of shape ({out_features}, {ng}); got {scales.dtype} of shape {tuple(scales.shape)}")
    if table.dtype != torch.float32 or tuple(table.shape) != (out_features, 2 ** bits):
        raise ValueError(f"table: expected float32 of shape ({out_features}, {2 ** bits}); got {table.dtype} of shape {tuple(table.shape)}")
    return out_features


def _codebook(a, bits):
    check_bits(bits)
    check_cpu("a", a)
    if a.dtype != torch.float32 or a.dim() != 1:
        raise ValueError(f"a: expected float32 of shape (rows,); got {a.dtype} of shape {tuple(a.shape)}")
    if a.is_cuda:  # a host kernel: the exponents go to the host (checked there), the codebooks back
        return _codebook(a.cpu(), bits).to(a.device)
    a = a.contiguous()
    out = torch.empty((a.shape[0], 2 ** bits), dtype=torch.float32, device=a.device)
    _core.quant_codebook(bits, a.shape[0], ptr(a), ptr(out))
    return out


def unpack_fields(codes, bits, n):
    """The raw b-bit fields (int32 [rows, n], 0 .. 2^bits − 1) of packed rows (the LSB-first bit
    stream of each row), in torch ops: one int32 per element (the CUDA fallbacks unpack whole
    weights with it)."""
    if bits == 8:
        return codes[:, :n].to(torch.int32)
    if n == 0:
        return torch.zeros((codes.shape[0], 0), dtype=torch.int32, device=codes.device)
    bitpos = torch.arange(n, device=codes.device) * bits
    byte, shift = bitpos // 8, bitpos % 8
    c = codes.to(torch.int32)
    f = c[:, byte]
    if 8 % bits:  # 3 bits: a field may straddle two bytes
        nxt = torch.clamp(byte + 1, max=codes.shape[1] - 1)
        f = f | torch.where(shift + bits > 8, c[:, nxt], 0) << 8
    return (f >> shift) & ((1 << bits) - 1)


def _dequantize_codebooks(codes, scales, table, bits, group_size, n, dtype, out=None):
    """Ŵ [out, n] of dtype through the rows' codebooks, dtype(m·table[field]) with the product in
    float32 (the caller has checked the weight): what power_quant_linear multiplies by, formed for
    matmuls with many tokens."""
    return _dequantize_rows(_core.quant_dequantize_codebooks, codes, scales, table, bits, group_size, n, dtype, out)


_scratch = threading.local()


def _weight_chunks(codes, scales, table, bits, group_size, n, dtype, activations):
    """(o0, o1, Ŵ[o0:o1]) for consecutive row chunks of about `activations`' size (in `dtype`),
    CPU_CHUNK_BYTES to CPU_CHUNK_MAX_BYTES, each formed in this thread's scratch buffer (valid
    until the next chunk)."""
    rows = codes.shape[0]
    chunk_bytes = min(max(activations.numel() * dtype.itemsize, CPU_CHUNK_BYTES), CPU_CHUNK_MAX_BYTES)
    step = max(1, chunk_bytes // max(1, n * dtype.itemsize))
    need = min(step, rows) * n
    buf = getattr(_scratch, "buf", {}).get(dtype)
    if buf is None or buf.numel() < need:
        buf = torch.empty(max(need, 1), dtype=dtype)
        _scratch.buf = {**getattr(_scratch, "buf", {}), dtype: buf}
    for o0 in range(0, rows, step):
        o1 = min(rows, o0 + step)
        w = buf[: (o1 - o0) * n].view(o1 - o0, n)
        yield o0, o1, _dequantize_codebooks(codes[o0:o1], scales[o0:o1], table[o0:o1], bits, group_size, n, dtype, w)


def _compute_dtype(dtype):
    """The CPU many-token paths' matmul dtype: float64 for float64, else float32 (as the GEMV)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _linear_many_tokens(x2, codes, scales, table, bias, bits, group_size, in_features):
    """y = x2 @ Ŵᵀ + bias for many tokens [tokens, in]: on CUDA Ŵ is formed whole in x's dtype for
    cuBLAS; on CPU a chunk of rows at a time, each chunk's columns of y by torch's matmul."""
    out_features = codes.shape[0]
    if x2.is_cuda:
        w = _dequantize_codebooks(codes, scales, table, bits, group_size, in_features, x2.dtype)
        return x2 @ w.t() if bias is None else torch.addmm(bias.to(x2.dtype), x2, w.t())
    cd = _compute_dtype(x2.dtype)
    xc = x2.to(cd)
    bc = None if bias is None else bias.to(cd)
    y = torch.empty((x2.shape[0], out_features), dtype=cd)
    for o0, o1, w in _weight_chunks(codes, scales, table, bits, group_size, in_features, cd, xc):
        if bc is None:
            torch.mm(xc, w.t(), out=y[:, o0:o1])
        else:  # (the bias in the matmul's own first pass over y: one pass less than y += bias)
            torch.addmm(bc[o0:o1], xc, w.t(), out=y[:, o0:o1])
    return y.to(x2.dtype)


def _codebook_fake(a, bits):
    check_bits(bits)
    return a.new_empty((a.shape[0], 2 ** bits), dtype=torch.float32)


def _check_linear(x, codes, scales, table, bias, bits, group_size, in_features, x_name="x"):
    _check_x(x_name, x)
    if x.shape[-1] != in_features:
        raise ValueError(f"{x_name}: expected last dimension {in_features} (in_features); got {tuple(x.shape)}")
    out_features = _check_weight(codes, scales, table, bits, group_size, in_features)
    check_device("codes", codes, x, x_name)
    if bias is not None:
        check_cpu("bias", bias)
        check_device("bias", bias, x, x_name)
        if bias.dtype != torch.float32 or tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias: expected float32 of shape ({out_features},); got {bias.dtype} {tuple(bias.shape)}")
    return out_features


def _cpu_ready(x, codes, scales, table, bias, bits, group_size, in_features, backward=False) -> bool:
    """The common CPU call in one test: contiguous CPU tensors of the dtypes and shapes the kernel
    reads (x: the layer's input, or with `backward` the output's gradient dy). After the dense work
    a GEMV sits next to, torch's and Python's code is out of cache and every step of the full
    checks (_check_linear, reshape, contiguous) costs ~10x its warm time: ~0.1 ms per call, 5-10 %
    of a 4096x4096 GEMV. Never true where _check_linear (_linear_bwd's checks) would raise."""
    if (type(bits) is not int or bits not in BITS or type(group_size) is not int or type(in_features) is not int
            or in_features < 1 or group_size < 1 or in_features % group_size or x.dim() < 1 or codes.dim() != 2):
        return False
    out = codes.shape[0]
    return (
        x.is_cpu and x.dtype in DTYPE_CODES and x.shape[-1] == (out if backward else in_features) and x.is_contiguous()
        and codes.is_cpu and codes.dtype == torch.uint8 and codes.shape[1] == row_bytes(in_features, bits)
        and codes.is_contiguous()
        and scales.is_cpu and scales.dtype == torch.float32 and scales.shape == (out, in_features // group_size)
        and scales.is_contiguous()
        and table.is_cpu and table.dtype == torch.float32 and table.shape == (out, 1 << bits) and table.is_contiguous()
        and (bias is None or (bias.is_cpu and bias.dtype == torch.float32 and bias.shape == (out,) and bias.is_contiguous()))
    )


@functools.lru_cache(maxsize=None)
def cpu_gemv_max_tokens(bits: int, in_features: int, group_size: int) -> int:
    """CPU: the most tokens the fused GEMV takes (lmkern-core's rule: the kernel's instruction set
    is fixed for the process); beyond, Ŵ in chunks for torch's matmul."""
    return _core.quant_cpu_gemv_max_tokens(bits, in_features, group_size)


@functools.lru_cache(maxsize=None)
def cpu_bwd_gemv_max_tokens(bits: int, in_features: int, group_size: int) -> int:
    """CPU: the most tokens the fused transposed GEMV of the input gradient takes (0 for shapes
    without its SIMD kernels); beyond, Ŵ in chunks for torch's matmul."""
    return _core.quant_cpu_bwd_gemv_max_tokens(bits, in_features, group_size)


def _linear(x, codes, scales, table, bias, bits, group_size, in_features):
    if (_cpu_ready(x, codes, scales, table, bias, bits, group_size, in_features)
            and x.numel() <= cpu_gemv_max_tokens(bits, in_features, group_size) * in_features):
        out_features = codes.shape[0]
        y = x.new_empty((*x.shape[:-1], out_features))
        _core.quant_linear(DTYPE_CODES[x.dtype], -1, 0, bits, out_features, in_features, group_size,
                           x.numel() // in_features, x.data_ptr(), codes.data_ptr(), scales.data_ptr(),
                           table.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr())
        return y
    out_features = _check_linear(x, codes, scales, table, bias, bits, group_size, in_features)
    x2 = x.reshape(_rows(x)[0], in_features).contiguous()  # (-1 cannot infer rows of length 0)
    tokens = x2.shape[0]
    if x.is_cuda:
        max_tokens = _core.quant_cuda_gemv_max_tokens(DTYPE_CODES[x.dtype], bits, in_features, group_size)
    else:
        max_tokens = cpu_gemv_max_tokens(bits, in_features, group_size)
    if tokens > max_tokens and out_features > 0:
        y = _linear_many_tokens(x2, codes, scales, table, bias, bits, group_size, in_features)
        return y.reshape(*x.shape[:-1], out_features)
    codes, scales, table = codes.contiguous(), scales.contiguous(), table.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = _fused_gemv(x2, codes, scales, table, bias, bits, group_size, in_features)
    return y.reshape(*x.shape[:-1], out_features)


def _fused_gemv(x2, codes, scales, table, bias, bits, group_size, in_features):
    """The fused lookup-table GEMV (lmkern._core) for x2 [tokens, in_features] at any token count,
    on x2's device and stream: y [tokens, out] in x2's dtype. The inputs are contiguous and checked
    (power_quant_linear does both and picks this or the many-token path; the GPU benches and tests
    call it directly to reach the kernels' own token tiles)."""
    out_features, tokens = codes.shape[0], x2.shape[0]
    y = torch.empty((tokens, out_features), dtype=x2.dtype, device=x2.device)
    dev, stream = device_args(x2)
    _core.quant_linear(DTYPE_CODES[x2.dtype], dev, stream, bits, out_features, in_features, group_size, tokens,
                       ptr(x2), ptr(codes), ptr(scales), ptr(table), ptr(bias), ptr(y))
    return y


def quant_linear(x, codes, scales, table, bias, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """torch.ops.lmkern.power_quant_linear; an eager call on CPU runs the op's implementations
    directly (quant_linear_eager); all else goes through the op."""
    if x.is_cpu and eager_ok(x, codes, scales, table, bias):
        return quant_linear_eager(x, codes, scales, table, bias, bits, group_size, in_features)
    return torch.ops.lmkern.power_quant_linear(x, codes, scales, table, bias, bits, group_size, in_features)


def quant_linear_eager(x, codes, scales, table, bias, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """power_quant_linear's implementations called directly, for an eager call on CPU tensors that
    eager_ok passed (the caller's test): through _LinearFunction when a gradient is wanted. The
    dispatcher and torch.library's autograd wrapper cost ~0.15 ms a forward when their code is out
    of cache, as it is after a large matmul, and ~0.3 ms a forward + backward."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)
                                    or codes.requires_grad or scales.requires_grad or table.requires_grad):
        return _LinearFunction.apply(x, codes, scales, table, bias, bits, group_size, in_features)
    return _linear(x, codes, scales, table, bias, bits, group_size, in_features)


def _linear_fake(x, codes, scales, table, bias, bits, group_size, in_features):
    out_features = _check_linear(x, codes, scales, table, bias, bits, group_size, in_features)
    return x.new_empty((*x.shape[:-1], out_features))


def _bwd_gemv(dy, codes, scales, table, bits, group_size, in_features):
    """dx = dy @ Ŵ by the CPU's fused transposed GEMV: dy [..., out] contiguous, the weight's
    tensors contiguous and checked; dx [..., in_features] of dy's dtype."""
    out_features = codes.shape[0]
    dx = dy.new_empty((*dy.shape[:-1], in_features))
    _core.quant_linear_backward(DTYPE_CODES[dy.dtype], -1, 0, bits, out_features, in_features, group_size,
                                _rows(dy)[0], ptr(dy), ptr(codes), ptr(scales), ptr(table), ptr(dx))
    return dx


def _linear_bwd(dy, codes, scales, table, bits, group_size, in_features):
    if (_cpu_ready(dy, codes, scales, table, None, bits, group_size, in_features, backward=True) and codes.shape[0]
            and dy.numel() <= cpu_bwd_gemv_max_tokens(bits, in_features, group_size) * codes.shape[0]):
        # The common call in one test, as _linear's (~60 us of a 1-token backward out of cache).
        return _bwd_gemv(dy, codes, scales, table, bits, group_size, in_features)
    out_features = codes.shape[0]
    _check_x("dy", dy)
    if dy.shape[-1] != out_features:
        raise ValueError(f"dy: expected last dimension {out_features} (out_features); got {tuple(dy.shape)}")
    _check_weight(codes, scales, table, bits, group_size, in_features)
    check_device("codes", codes, dy, "dy")
    dy2 = dy.reshape(_rows(dy)[0], out_features)
    if dy.is_cuda:
        # dy @ Ŵ by cuBLAS, Ŵ in dy's dtype (as the many-token forward forms it).
        dx = dy2 @ _dequantize_codebooks(codes, scales, table, bits, group_size, in_features, dy.dtype)
    elif dy2.shape[0] <= cpu_bwd_gemv_max_tokens(bits, in_features, group_size):
        dx = _bwd_gemv(dy2.contiguous(), codes.contiguous(), scales.contiguous(), table.contiguous(), bits, group_size,
                       in_features)
    else:
        # Σ over chunks of Ŵ's rows, in order.
        cd = _compute_dtype(dy.dtype)
        dyc = dy2.to(cd)
        dx = torch.zeros((dy2.shape[0], in_features), dtype=cd)
        for o0, o1, w in _weight_chunks(codes, scales, table, bits, group_size, in_features, cd, dyc):
            dx.addmm_(dyc[:, o0:o1], w)
    return dx.to(dy.dtype).reshape(*dy.shape[:-1], in_features)


def _linear_bwd_fake(dy, codes, scales, table, bits, group_size, in_features):
    return dy.new_empty((*dy.shape[:-1], in_features))


# ------------------------------------------------------------------------------------------------
# exponent search
# ------------------------------------------------------------------------------------------------


def _search(w, z, bits, group_size, clip, per_row, grid=SEARCH_GRID, refine=SEARCH_REFINE):
    check_cpu("w", w)
    if w.is_cuda:  # the search runs on the CPU (see the module doc)
        if z is not None:
            check_device("x", z, w, "w")
        out = _search(w.cpu(), None if z is None else z.cpu(), bits, group_size, clip, per_row, grid, refine)
        return out.to(w.device)
    check_bits(bits)
    check_search_points(grid, refine)
    if w.dtype != torch.float32 or w.dim() < 1:
        raise ValueError(f"w: expected float32 with at least one dimension; got {w.dtype} {tuple(w.shape)}")
    rows, n = _rows(w)
    check_group(group_size, n)
    if z is not None:
        check_cpu("x", z)
        if z.dtype != torch.float32 or z.dim() != 2 or z.shape[1] != n:
            raise ValueError(f"x: expected float32 of shape (T, {n}); got {z.dtype} {tuple(z.shape)}")
        z = z.contiguous()
    w = w.contiguous()
    out = torch.empty((rows if per_row else 1,), dtype=torch.float32, device=w.device)
    # Ctrl-C is looked for on the main thread only: Python runs signal handlers nowhere else.
    interruptible = threading.current_thread() is threading.main_thread()
    _core.quant_search(bits, rows, n, group_size, clip, per_row, 0 if z is None else z.shape[0],
                       SEARCH_LO, grid, refine, ptr(w), ptr(z), ptr(out), interruptible)
    return out


def _search_fake(w, z, bits, group_size, clip, per_row, grid=SEARCH_GRID, refine=SEARCH_REFINE):
    rows, _ = _rows(w)
    return w.new_empty((rows if per_row else 1,), dtype=torch.float32)


for _name, _impl, _fake_impl in (
    ("power_quantize", _quantize, _quantize_fake),
    ("power_dequantize", _dequantize, _dequantize_fake),
    ("power_fake_quantize", _fake, _fake_fake),
    ("power_fake_quantize_backward", _fake_bwd, _fake_bwd_fake),
    ("power_codebook", _codebook, _codebook_fake),
    ("power_quant_linear", _linear, _linear_fake),
    ("power_quant_linear_backward", _linear_bwd, _linear_bwd_fake),
    ("power_search_exponent", _search, _search_fake),
):
    for _key in ("CPU", "CUDA"):
        LIB.impl(_name, _impl, _key)
    register_fake(_name, _fake_impl)


def _fake_vmap(info, in_dims, x, a, bits, group_size, clip):
    """torch.vmap of power_fake_quantize: the batch is more rows of one call (the op flattens x's
    leading dims into rows, one exponent each), instead of torch's fallback of one call per sample."""
    bx, ba = in_dims[0], in_dims[1]
    batch = info.batch_size
    x = x.movedim(bx, 0) if bx is not None else x.expand(batch, *x.shape)
    rows = math.prod(x.shape[1:-1])
    a = a.movedim(ba, 0) if ba is not None else a.expand(batch, *a.shape)
    y, scales = torch.ops.lmkern.power_fake_quantize(x, a.reshape(batch * rows), bits, group_size, clip)
    return (y, scales.reshape(batch, rows, scales.shape[-1])), (0, 0)


torch.library.register_vmap("lmkern::power_fake_quantize", _fake_vmap, lib=LIB)


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------


def _fake_setup(ctx, inputs, output):
    x, a, bits, group_size, _clip = inputs
    ctx.save_for_backward(x, a, output[1])
    ctx.bits, ctx.group_size = bits, group_size


def _fake_grad(ctx, dy, _dscales):
    x, a, scales = ctx.saved_tensors
    a_grad = ctx.needs_input_grad[1]
    dx, da = torch.ops.lmkern.power_fake_quantize_backward(dy.contiguous(), x, scales, a, ctx.bits, ctx.group_size, a_grad)
    return (dx if ctx.needs_input_grad[0] else None), (da if a_grad else None), None, None, None


def _linear_setup(ctx, inputs, output):
    _x, codes, scales, table, bias, bits, group_size, in_features = inputs
    ctx.save_for_backward(codes, scales, table)
    ctx.bits, ctx.group_size, ctx.in_features = bits, group_size, in_features
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_grad(ctx, dy, input_grad=None):
    """The gradients of power_quant_linear; dx by `input_grad` (default: the backward op)."""
    codes, scales, table = ctx.saved_tensors
    dx = db = None
    if any(ctx.needs_input_grad[1:4]):
        raise NotImplementedError("power_quant_linear: the quantized weight (codes, scales, codebooks) is frozen (no gradient)")
    if ctx.needs_input_grad[0]:
        dx = (input_grad or torch.ops.lmkern.power_quant_linear_backward)(
            dy, codes, scales, table, ctx.bits, ctx.group_size, ctx.in_features)
    if ctx.needs_input_grad[4]:
        # The bias's gradient: dy summed over every token, in float32.
        db = dy.reshape(_rows(dy)[0], dy.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return dx, None, None, None, db, None, None, None


class _LinearFunction(torch.autograd.Function):
    """Eager autograd of power_quant_linear on the CPU over the op's own implementations (_linear,
    _linear_bwd); the same results as the op's autograd."""

    @staticmethod
    def forward(ctx, x, codes, scales, table, bias, bits, group_size, in_features):
        y = _linear(x, codes, scales, table, bias, bits, group_size, in_features)
        _linear_setup(ctx, (x, codes, scales, table, bias, bits, group_size, in_features), y)
        return y

    @staticmethod
    @first_order_backward("lmkern power_quant_linear")
    def backward(ctx, dy):
        # Batched gradients (is_grads_batched: no storage) go through the op, which vmap runs one
        # gradient at a time.
        return _linear_grad(ctx, dy, _linear_bwd if torch._C._has_storage(dy) else None)


def _no_double_backward(name):
    def grad(ctx, *grads):
        raise NotImplementedError(f"lmkern.{name}: second derivatives are not implemented")

    return grad


torch.library.register_autograd("lmkern::power_fake_quantize", _fake_grad, setup_context=_fake_setup, lib=LIB)
torch.library.register_autograd("lmkern::power_quant_linear", _linear_grad, setup_context=_linear_setup, lib=LIB)
for _name in ("power_fake_quantize_backward", "power_quant_linear_backward"):
    torch.library.register_autograd(
        f"lmkern::{_name}", _no_double_backward(_name), setup_context=lambda ctx, inputs, output: None, lib=LIB
    )
