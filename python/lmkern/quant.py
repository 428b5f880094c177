"""Power-exponent quantization: PowerQuant (Yvinec et al., ICLR 2023) and NUPES (Yvinec et al.).

The operator, for b bits (b ∈ {2, 3, 4, 8}), ``qmax = 2^(b−1) − 1`` and an exponent ``0 < a ≤ 1``::

    m = clip · max|x|                    per group of g contiguous elements of the last dimension
    q = clamp(round(qmax · sign(x) · (|x|/m)^a), −qmax, qmax)        round half away from zero
    x̂ = m · sign(q) · (|q|/qmax)^(1/a)                               (m = 0 gives x̂ = 0)

a = 1 is plain symmetric absmax integer quantization. The kernels never exponentiate per element:
the boundary between codes k and k+1 is the fixed threshold ``t_k = ((k + 0.5)/qmax)^(1/a)`` of
|x|/m, so the quantizer compares |x| with ``t_k·m`` (computed in float64, rounded up to float32 —
float64 for float64 input — which makes the comparison exact up to that float64 product), and the
dequantizer is a table of 2^b values per row.

Packed layout (shared with the rotation quantizer to come; also documented in rust/core/src/quant/mod.rs)
---------------------------------------------------------------------------------------------------
For x of shape [..., n], ``rows`` = product of the leading dims (a weight [out, in] has one row per
output channel), groups are ``g`` contiguous elements of a row (g divides n; ``group_size=None``
means g = n):

* ``codes``: torch.uint8 ``[rows, ceil(n·b/8)]``. Element j of a row is stored as the b-bit
  two's-complement field of its q (``q & (2^b − 1)``). A row's fields form a little-endian bit
  stream, LSB first: field j occupies stream bits ``[j·b, (j+1)·b)``, stream bit i being bit
  ``i % 8`` of byte ``i // 8`` of the row. Hence 8-bit codes are plain int8 (``codes.view(torch.int8)``);
  4-bit codes are two per byte, element 2i in the low nibble of byte i and 2i+1 in the high nibble;
  2-bit codes four per byte, element 4i+s in bits 2s..2s+1 of byte i; 3-bit codes eight per three
  bytes, forming a 24-bit little-endian word with element 8i+s in bits 3s..3s+2 (a field may straddle
  two bytes). Every row starts on a byte boundary; unused high bits of a row's last byte are 0.
* A field f (0..2^b−1) stands for ``q = f − 2^b if f ≥ 2^(b−1) else f``. The most negative field
  (−2^(b−1)) never occurs in codes made here (|q| ≤ qmax); if present it dequantizes by the same
  formula with |q| = 2^(b−1).
* ``scales``: torch.float32 ``[rows, n/g]``, m of each group (group i covers elements
  ``[i·g, (i+1)·g)``), rounded to float32 from ``clip·max|x|``; codes are made against this stored
  value. ``exponent``: torch.float32 ``[rows]``, one a per row (a scalar a is stored expanded).
* Dequantize element j of row r: ``x̂ = scales[r, j // g] · lut_r[field(r, j)]`` with the table
  ``lut_r[f] = sign(q_f)·(|q_f|/qmax)^(1/a_r)`` (computed in float64, applied in float32; in
  float64 for float64 output).

Gradients of :func:`power_fake_quantize` (NUPES; straight-through round, m held constant, no
gradient through the absmax): with ``u = |x|/m``, ``r = |q|/qmax``, ``lu = ln(u + 1e-12)``:
``∂x̂/∂x = r^(1/a−1)·exp((a−1)·lu)`` and
``∂x̂/∂a = −(m/a²)·sign(x)·r^(1/a)·ln r + (m/a)·sign(x)·r^(1/a−1)·exp(a·lu)·lu``, with
``r^(1/a−1)`` taken as 1 for q = 0 when a = 1 (0 when a < 1) and the first term 0 for q = 0; both are
0 where x = 0, m = 0 or |x| > m (clamped). They are finite for every x and every a in (0, 1]
(x = 0, a → 0, all-zero groups) wherever their value is within float32's range: ∂x̂/∂a grows like
m·ln(u)/a² and overflows to ±inf only for extreme pairs (m ~ 1 with a < ~1e-38, or m ~ 1e36 with
a ~ 0.01).

Scales are float32: a float64 group whose clip·max|x| is below float32's normal range (~1.2e-38)
keeps fewer significant bits in its scale, and one below ~1.4e-45 gets scale 0 (the group dequantizes
to 0); one above float32's range raises.

Devices: CPU (float32, float64, bfloat16, float16) and CUDA (float32, bfloat16, float16; float64
raises TypeError); the CUDA codes are the CPU's bit for bit. On CUDA, quantize and fake quantize
synchronize once to check the exponents and the scales' finiteness (same errors as on CPU), and
:func:`search_exponent` runs on the CPU (w and x are copied to the host, the result back). See
:mod:`lmkern.ops.quant` for the details.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

from ._lib import check_device, differentiating_transform, not_a_tensor, plain_number
from .ops import quant as _ops

__all__ = [
    "QuantizedTensor", "PowerQuantized", "power_quantize", "power_dequantize", "power_fake_quantize",
    "search_exponent", "SEARCH_LO", "SEARCH_GRID", "SEARCH_REFINE",
]

# Leaves of torch.fx.symbolic_trace, as lmkern's norms (lmkern/__init__.py): a call spelled
# lmkern.quant.power_fake_quantize(...) in traced code is recorded as one call.
for _name in ("power_quantize", "power_dequantize", "power_fake_quantize", "search_exponent"):
    torch.fx.wrap(_name)

#: Exponents are searched in [SEARCH_LO, 1].
SEARCH_LO = _ops.SEARCH_LO
#: The search's default coarse grid and refinement (search_exponent's ``grid`` and ``refine``).
SEARCH_GRID = _ops.SEARCH_GRID
SEARCH_REFINE = _ops.SEARCH_REFINE


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Packed symmetric codes of a tensor, in the layout of this module's docstring.

    codes: uint8 [rows, ceil(n·bits/8)]; scales: float32 [rows, n/group_size]; shape/dtype: those of
    the original tensor (rows = product of shape[:-1], n = shape[-1]). Subclasses say how a code and
    a scale become a value (:class:`PowerQuantized`: the power table; a = 1 is plain integer codes).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def n(self) -> int:
        return self.shape[-1]

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def int_codes(self) -> torch.Tensor:
        """The signed codes q as int8 [rows, n] (unpacked with torch ops; for inspection and tests)."""
        return unpack_codes(self.codes, self.bits, self.n)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """The same quantized tensor with every tensor field on ``device`` (copies where they move;
        ``self`` where nothing moves). The original dtype is kept: this moves, it never casts."""
        if not isinstance(device, (torch.device, str, int)) or isinstance(device, bool):
            raise TypeError(f"device: expected a torch.device, a device string or index; got {type(device).__name__}")
        device = torch.device(device)
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        if all(v is getattr(self, k) for k, v in moved.items()):
            return self
        return dataclasses.replace(self, **moved)


@dataclass(frozen=True, eq=False)
class PowerQuantized(QuantizedTensor):
    """A power-quantized tensor: :class:`QuantizedTensor` plus the float32 exponents [rows]."""

    exponent: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return power_dequantize(self)


# torch.load's weights_only=True (its default) may rebuild these: their fields are tensors, ints, a
# torch.Size and a torch.dtype, and the ops check every field before reading the codes.
torch.serialization.add_safe_globals([QuantizedTensor, PowerQuantized])


def unpack_codes(codes: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Signed int8 codes [rows, n] from packed ``codes`` (the documented bit stream), in torch ops."""
    bits, codes = _ops.check_bits(bits), _as_tensor("codes", codes)
    n = plain_number(n)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n: expected a row length >= 0; got {n!r}")
    if codes.dim() != 2 or codes.shape[1] != _ops.row_bytes(n, bits):
        raise ValueError(f"codes: expected [rows, {_ops.row_bytes(n, bits)}] (rows of {n} {bits}-bit codes); "
                         f"got shape {tuple(codes.shape)}")
    f = _ops.unpack_fields(codes, bits, n)
    return torch.where(f >= 2 ** (bits - 1), f - 2 ** bits, f).to(torch.int8)


def _as_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise not_a_tensor(name, x)
    return x


def _exponents(a, rows: int, x: torch.Tensor) -> torch.Tensor:
    """a (a float, a 0-d tensor or a 1-D tensor of `rows` exponents) as float32 [rows] on x's device;
    differentiable (a scalar tensor is expanded, so its gradient is the sum over rows)."""
    if isinstance(a, torch.Tensor):
        if not a.is_floating_point():
            raise TypeError(f"a: expected a floating tensor or a float; got dtype {a.dtype}")
        if a.dim() == 0:
            # Expanded in float64, so that autograd sums the per-row float32 gradients in float64:
            # rows whose terms cancel would lose the sum's low digits in a float32 sum.
            a = a.to(torch.float64).reshape(1).expand(rows)
        elif a.dim() != 1 or a.shape[0] != rows:
            raise ValueError(f"a: expected a float, a 0-d tensor or a 1-D tensor of {rows} exponents (one per row); got shape {tuple(a.shape)}")
        if a.device != x.device:
            raise ValueError(f"a: expected a tensor on {x.device} (the device of x); got {a.device}")
        return a.to(torch.float32)
    a = plain_number(a)
    if isinstance(a, bool) or not isinstance(a, numbers.Real):
        raise TypeError(f"a: expected a float or a tensor; got {type(a).__name__}")
    try:
        a = float(a)
    except OverflowError:
        raise ValueError(f"a: expected an exponent in (0, 1]; got {type(a).__name__} beyond float64's range") from None
    if not (0.0 < a <= 1.0):
        raise ValueError(f"a: expected an exponent in (0, 1]; got {a}")
    if a <= 2.0 ** -150:  # rounds to 0 as the float32 the kernels take
        raise ValueError(f"a: expected an exponent in (0, 1]; got {a}, which is 0 in float32")
    return torch.full((rows,), a, dtype=torch.float32, device=x.device)


def _clip(clip) -> float:
    clip = plain_number(clip)
    try:
        ok = not isinstance(clip, bool) and isinstance(clip, numbers.Real) and 0.0 < float(clip) < math.inf
    except OverflowError:  # an int beyond float64
        ok = False
    if not ok:
        raise ValueError(f"clip: expected a finite number > 0; got {clip!r:.40}")
    return float(clip)


def _prepare(x, a, bits, group_size, clip):
    x = _as_tensor("x", x)
    _ops._check_x("x", x)
    bits = _ops.check_bits(bits)
    rows, n = math.prod(x.shape[:-1]), x.shape[-1]
    g = _ops.check_group(group_size, n)
    return x, _exponents(a, rows, x), bits, g, _clip(clip)


def power_quantize(x, a, bits: int = 4, group_size: int | None = None, clip: float = 1.0) -> PowerQuantized:
    """Quantize x ([..., n]; float32, float64, bfloat16 or float16 on CPU; not float64 on CUDA) with exponent(s) a.

    ``a``: a float, a 0-d tensor, or a 1-D tensor with one exponent per row (rows = product of the
    leading dims), each in (0, 1]. ``group_size``: contiguous elements per scale along the last dim
    (None: one group per row). ``m = clip·max|x|`` per group. Returns a :class:`PowerQuantized`
    (layout in this module's docstring). Raises ValueError on NaN/inf in x.
    """
    x, a32, bits, g, clip = _prepare(x, a, bits, group_size, clip)
    # A copy: the caller's exponent tensor (a learned one, stepped in place) must not change q.
    a32 = a32.detach().clone(memory_format=torch.contiguous_format)
    codes, scales = torch.ops.lmkern.power_quantize(x.detach(), a32, bits, g, clip)
    return PowerQuantized(codes, scales, bits, g, x.shape, x.dtype, a32)


def power_dequantize(q: PowerQuantized) -> torch.Tensor:
    """``x̂ = m·sign(q)·(|q|/qmax)^(1/a)`` with the original shape and dtype of the quantized tensor."""
    if not isinstance(q, PowerQuantized):
        raise not_a_tensor("q", q, "a PowerQuantized")
    if _as_tensor("q.codes", q.codes).dim() != 2 or q.codes.shape[0] != q.rows:
        raise ValueError(f"q: its codes {tuple(q.codes.shape)} do not hold the rows of its shape {q.shape}")
    out = torch.ops.lmkern.power_dequantize(q.codes, q.scales, q.exponent, q.bits, q.group_size, q.n, q.dtype)
    return out.reshape(q.shape)


def power_fake_quantize(x, a, bits: int = 4, group_size: int | None = None, clip: float = 1.0) -> torch.Tensor:
    """``power_dequantize(power_quantize(x, a, ...))`` in one pass, differentiable in x and in a
    (when a is a tensor that requires grad): straight-through round, m held constant; the gradient
    formulas are in this module's docstring. Same dtypes and arguments as :func:`power_quantize`."""
    if differentiating_transform(x, a):
        raise NotImplementedError(
            "lmkern.quant.power_fake_quantize: torch.func's grad/vjp/jacrev/jvp/jacfwd and forward-mode AD are not "
            "supported (torch's autograd for custom ops has neither); use torch.autograd.grad or .backward()"
        )
    x, a32, bits, g, clip = _prepare(x, a, bits, group_size, clip)
    y, _scales = torch.ops.lmkern.power_fake_quantize(x, a32, bits, g, clip)
    return y


def search_exponent(w, bits: int = 4, group_size: int | None = None, x=None, per_row: bool = True,
                    clip: float = 1.0, *, grid: int = SEARCH_GRID, refine: int = SEARCH_REFINE) -> torch.Tensor:
    """The exponent(s) a in [SEARCH_LO, 1] minimizing the quantization error of the weight w
    ([..., n], one row per output channel): ``‖w − ŵ_a‖²`` per row, or with calibration activations
    ``x`` ([..., n]) the layer-output error ``‖x·(w − ŵ_a)ᵀ‖²``. A coarse grid of ``grid`` (1024)
    exponents, then ``refine`` (16) finer points around each of the 4 best coarse local minima, for
    every row at once, in Rust; the time grows with both (short rows with 8-bit codes, whose error
    jumps between nearby exponents, gain from a finer grid). Each evaluation is qmax short counts in
    the row's sorted |w|/m (the error is piecewise smooth in a, with narrow dips: hence the fine
    grid); with x, a row first costs min(T, n)·n (prefix sums of x's columns in that order), then
    each evaluation qmax·min(T, n).

    Returns float32 [rows] (``per_row``) or a 0-d float32 tensor (one exponent for the whole tensor,
    minimizing the summed error). With x of T > n tokens, x is first reduced to the n×n factor R of
    its QR decomposition (``‖x e‖ = ‖R e‖``), so the cost above holds with min(T, n). Ctrl-C stops
    a long search on the main thread within a group of rows (KeyboardInterrupt).
    """
    w = _as_tensor("w", w)
    _ops._check_x("w", w)
    bits = _ops.check_bits(bits)
    n = w.shape[-1]
    g = _ops.check_group(group_size, n)
    clip = _clip(clip)
    grid, refine = _ops.check_search_points(grid, refine)
    per_row = plain_number(per_row)
    if not isinstance(per_row, bool):
        raise TypeError(f"per_row: expected a bool; got {type(per_row).__name__}")
    # Rows from the leading dimensions (reshape(-1, 0) cannot infer them for empty rows).
    w32 = w.detach().reshape(_ops._rows(w)[0], n).to(torch.float32)
    z = None
    if x is not None:
        x = _as_tensor("x", x)
        _ops._check_x("x", x)
        if x.shape[-1] != n:
            raise ValueError(f"x: expected calibration activations with last dimension {n}; got shape {tuple(x.shape)}")
        check_device("x", x, w, "w")
        z = x.detach().reshape(_ops._rows(x)[0], n).to(torch.float64)
        # Any positive multiple of x has the same best exponents: at max|x| = 1 neither the QR
        # factor nor the kernel's float32 copy can overflow (x near float32's limit did).
        # (torch.where, not an if on the value: torch.compile(fullgraph=True) traces it.)
        top = z.abs().amax() if z.numel() else z.new_zeros(())
        z = z / torch.where((top > 0) & torch.isfinite(top), top, torch.ones_like(top))
        if z.shape[0] > n:
            z = torch.linalg.qr(z, mode="r")[1]
        z = z.to(torch.float32)
    out = torch.ops.lmkern.power_search_exponent(w32, z, bits, g, clip, per_row, grid, refine)
    return out if per_row else out.reshape(())
