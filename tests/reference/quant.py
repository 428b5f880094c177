"""float64 references of power-exponent quantization (PowerQuant, NUPES), PAPERS.md §2.

Written from the formulas in float64 torch ops, never calling lmkern. x is [rows, n] (leading dims
flattened), groups are g contiguous elements of a row, qmax = 2^(b−1) − 1:

    m  = clip · max|x|  per group, then rounded to float32 (the stored format: codes are made
                        against the stored scale, so the reference uses it too)
    u  = |x| / m        (0 where m = 0)
    q  = sign(x) · min(floor(qmax · u^a + 0.5), qmax)        round half away from zero, clamp
    x̂  = m · sign(q) · (|q|/qmax)^(1/a)

Boundary cases: lmkern compares |x| against thresholds instead of evaluating the power, so an
element whose ``qmax·u^a`` lies within rounding of a half-integer k + 0.5 may legitimately get the
other code. :func:`near_boundary` flags exactly those: |qmax·u^a − (k + 0.5)| ≤ 1e-9·(k + 0.5) for
the nearest k (a relative 1e-9 is far above the float64 error of either computation and far below
the spacing of any two float32 inputs' u^a near a boundary that are not both ties).

The fake-quantizer's gradients (NUPES): straight-through round — q = q_val + (q̃ − q̃.detach()) with
the stabilized ``q̃ = qmax·sign(x)·exp(a·ln(u + 1e-12))`` (PAPERS.md §2, our choice) — and the clamp
passing gradient only where u ≤ 1; m is held constant. Autograd of these float64 expressions gives
the reference gradients; x = 0, m = 0 and clamped elements get 0.
"""
from __future__ import annotations

import torch

F64 = torch.float64
EPS = 1e-12  # inside the logarithm of the fake-quantizer's stabilized power
BOUNDARY_RTOL = 1e-9


def qmax_of(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _grouped(x: torch.Tensor, g: int) -> torch.Tensor:
    rows, n = x.shape
    return x.reshape(rows, n // g, g)


def scales_ref(x: torch.Tensor, g: int, clip: float = 1.0) -> torch.Tensor:
    """m per group as stored: float32 of clip·max|x| (computed in float64). Shape [rows, n/g]."""
    x64 = _grouped(x.detach().to(F64).reshape(-1, x.shape[-1]), g)
    amax = x64.abs().amax(-1) if x64.shape[-1] else x64.new_zeros(x64.shape[:-1])
    return (clip * amax).to(torch.float32)


def _a_col(a, rows: int) -> torch.Tensor:
    # The exponent as the library stores it (float32, PowerQuantized.exponent): a Python float
    # rounded there moves v = qmax·u^a by up to ~1e-8 relative, more than BOUNDARY_RTOL allows.
    a = torch.as_tensor(a, dtype=F64).to(torch.float32).to(F64)
    return (a.reshape(1) if a.dim() == 0 else a).expand(rows).reshape(rows, 1, 1)


def quantize_ref(x, a, bits: int, g: int, clip: float = 1.0):
    """(q int64 [rows, n], m float32 [rows, n/g], near_boundary bool [rows, n]) of x [.., n]."""
    n = x.shape[-1]
    x64 = x.detach().to(F64).reshape(-1, n)
    rows = x64.shape[0]
    qm = qmax_of(bits)
    m32 = scales_ref(x, g, clip)
    m = m32.to(F64).unsqueeze(-1)
    X = _grouped(x64, g)
    u = torch.where(m > 0, X.abs() / torch.where(m > 0, m, 1.0), torch.zeros_like(X))
    v = qm * u ** _a_col(a, rows)
    k = torch.floor(v + 0.5).clamp(max=qm)
    q = torch.sign(X) * k
    nearest_half = torch.floor(v) + 0.5
    near = ((v - nearest_half).abs() <= BOUNDARY_RTOL * nearest_half) & (nearest_half < qm)
    return q.reshape(rows, n).to(torch.int64), m32, near.reshape(rows, n)


def dequantize_ref(q: torch.Tensor, m32: torch.Tensor, a, bits: int, g: int) -> torch.Tensor:
    """x̂ = m·sign(q)·(|q|/qmax)^(1/a) in float64, [rows, n]."""
    rows, n = q.shape
    qm = qmax_of(bits)
    Q = _grouped(q.to(F64), g)
    m = m32.to(F64).unsqueeze(-1)
    xh = m * torch.sign(Q) * (Q.abs() / qm) ** (1.0 / _a_col(a, rows))
    return xh.reshape(rows, n)


def fake_quantize_grads_ref(x, a, dy, bits: int, g: int, clip: float = 1.0):
    """(x̂, dx, da) in float64: ⟨dy, x̂⟩ differentiated through the straight-through fake quantizer.
    a: float or [rows] exponents; da has one entry per row."""
    n = x.shape[-1]
    x64 = x.detach().to(F64).reshape(-1, n).clone().requires_grad_(True)
    rows = x64.shape[0]
    a64 = torch.as_tensor(a, dtype=F64)
    a64 = (a64.reshape(1) if a64.dim() == 0 else a64).expand(rows).clone().requires_grad_(True)
    qm = qmax_of(bits)
    q_val, m32, _ = quantize_ref(x, a64.detach(), bits, g, clip)
    with torch.enable_grad():
        A = a64.reshape(rows, 1, 1)
        m = m32.to(F64).unsqueeze(-1)
        X = _grouped(x64, g)
        mpos = m > 0
        u = torch.where(mpos, X.abs() / torch.where(mpos, m, 1.0), torch.zeros_like(X))
        s = torch.sign(X)
        qt = qm * s * torch.exp(A * torch.log(u + EPS))
        passes = (u <= 1) & (X != 0) & mpos
        delta = torch.where(passes, qt - qt.detach(), torch.zeros_like(qt))
        Qv = _grouped(q_val.to(F64), g)
        sq = torch.where(Qv != 0, torch.sign(Qv), s)  # the side q leaves 0 towards, for q = 0
        base = (Qv.abs() + sq * delta) / qm
        xh = m * sq * base ** (1.0 / A)
        xh = xh.reshape(rows, n)
        dx, da = torch.autograd.grad(xh, (x64, a64), dy.detach().to(F64).reshape(rows, n))
    return xh.detach(), dx, da


def pack_ref(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed codes [rows, n] into the documented little-endian bit stream (Python ints)."""
    rows, n = q.shape
    nb = (n * bits + 7) // 8
    out = torch.zeros((rows, nb), dtype=torch.uint8)
    mask = (1 << bits) - 1
    for r in range(rows):
        stream = 0
        for j, v in enumerate(q[r].tolist()):
            stream |= (int(v) & mask) << (j * bits)
        out[r] = torch.tensor(list(stream.to_bytes(nb, "little")), dtype=torch.uint8) if nb else out[r]
    return out


def unpack_ref(codes: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Signed codes [rows, n] from the packed stream (Python ints)."""
    rows = codes.shape[0]
    out = torch.zeros((rows, n), dtype=torch.int64)
    mask = (1 << bits) - 1
    for r in range(rows):
        stream = int.from_bytes(bytes(codes[r].tolist()), "little")
        vals = [(stream >> (j * bits)) & mask for j in range(n)]
        out[r] = torch.tensor([v - (1 << bits) if v >= 1 << (bits - 1) else v for v in vals], dtype=torch.int64)
    return out


def errors_ref(w, a, bits: int, g: int, clip: float = 1.0, x=None) -> torch.Tensor:
    """Per-row quantization error with exponents a ([rows] or float): Σ(w − ŵ)², or ‖x·(w − ŵ)ᵀ‖²
    over the rows of x [T, n] when x is given. float64 [rows]."""
    n = w.shape[-1]
    w64 = w.detach().to(F64).reshape(-1, n)
    q, m32, _ = quantize_ref(w64, a, bits, g, clip)
    e = w64 - dequantize_ref(q, m32, a, bits, g)
    if x is None:
        return (e * e).sum(-1)
    z = x.detach().to(F64).reshape(-1, n)
    return ((z @ e.T) ** 2).sum(0)


def brute_force_errors(w, bits: int, g: int, grid, clip: float = 1.0, x=None, chunk: int = 64) -> torch.Tensor:
    """errors_ref for every exponent of `grid`: float64 [len(grid), rows] (the same formulas,
    evaluated for `chunk` exponents at a time by broadcasting)."""
    n = w.shape[-1]
    w64 = w.detach().to(F64).reshape(-1, n)
    rows = w64.shape[0]
    qm = qmax_of(bits)
    m = scales_ref(w64, g, clip).to(F64).unsqueeze(-1)  # [rows, G, 1]
    W = _grouped(w64, g)
    u = torch.where(m > 0, W.abs() / torch.where(m > 0, m, 1.0), torch.zeros_like(W))
    out = []
    for i in range(0, len(grid), chunk):
        # Each exponent as stored (float32), as _a_col takes it.
        a = torch.as_tensor(grid[i:i + chunk], dtype=F64).to(torch.float32).to(F64).reshape(-1, 1, 1, 1)
        k = torch.floor(qm * u ** a + 0.5).clamp(max=qm)
        e = (W.abs() - m * (k / qm) ** (1.0 / a)).reshape(len(a), rows, n)  # |w| − |ŵ|: same sign
        if x is None:
            out.append((e * e).sum(-1))
        else:
            z = x.detach().to(F64).reshape(-1, n)
            e = e * torch.sign(w64)
            out.append(((e @ z.T) ** 2).sum(-1))
    return torch.cat(out)


def absmax_int_ref(x, bits: int, g: int):
    """Plain symmetric absmax integer quantization (a = 1), written independently:
    q = round_half_away(x / m · qmax), x̂ = m · q / qmax."""
    n = x.shape[-1]
    x64 = x.detach().to(F64).reshape(-1, n)
    qm = qmax_of(bits)
    m = scales_ref(x64, g).to(F64).repeat_interleave(g, dim=1) if n else x64
    t = torch.where(m > 0, x64 / torch.where(m > 0, m, 1.0) * qm, torch.zeros_like(x64))
    q = torch.sign(t) * torch.floor(t.abs() + 0.5)
    return q.to(torch.int64), m * q / qm


def linear_ref(x, w_hat64, bias=None):
    """x @ Ŵᵀ + b in float64."""
    y = x.detach().to(F64) @ w_hat64.to(F64).T
    return y if bias is None else y + bias.detach().to(F64)
