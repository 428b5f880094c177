"""float64 references of RMSNorm and CRMSNorm (Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm Transformers").

Written from the formulas in PAPERS.md §1, in float64 torch ops, never calling lmkern:

    RMSNorm   r = (mean(h²) + eps)^(-1/2)                 over the last dimension (n wide)
    CRMSNorm  r = ((Σh² + (Σh)²) / (n + 1) + eps)^(-1/2)  (h: first n entries of a zero-mean vector)
    y = h · r · (offset + w) · scale                       (offset + w) is 1 without a weight

With a residual, ``h = x + residual`` is formed in x's dtype (rounded to it, as torch and lmkern
compute it) and then normalized in float64; without one, h = x.

Gradients come from torch.autograd applied to these float64 formulas. The rounding of h to x's dtype
is a straight-through step there (its derivative is taken as 1), which is the derivative lmkern
implements.
"""
from __future__ import annotations

import torch

F64 = torch.float64


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(F64)


def _residual_sum(x64: torch.Tensor, r64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """h = x + residual rounded to `dtype`, differentiable as if the rounding were the identity."""
    h = x64 + r64
    rounded = h.detach().to(dtype).to(F64)
    return h + (rounded - h.detach())


def rstd_ref(h64: torch.Tensor, eps: float, crms: bool) -> torch.Tensor:
    """r per row of h (float64), shape h.shape[:-1]."""
    n = h64.shape[-1]
    if crms:
        ms = ((h64 * h64).sum(-1) + h64.sum(-1) ** 2) / (n + 1)
    else:
        ms = (h64 * h64).sum(-1) / n if n else torch.zeros(h64.shape[:-1], dtype=F64, device=h64.device)
    return (ms + eps).rsqrt()


def _norm64(h64, w64, eps, offset, scale, crms):
    r = rstd_ref(h64, eps, crms)
    y = h64 * r.unsqueeze(-1)
    if w64 is not None:
        y = y * (offset + w64)
    return y * scale, r


def _forward64(x64, w64, eps, r64, offset, scale, crms, dtype):
    h64 = x64 if r64 is None else _residual_sum(x64, r64, dtype)
    y, r = _norm64(h64, w64, eps, offset, scale, crms)
    return y, h64, r


def _ref(x, weight, eps, residual, offset, scale, crms):
    y, h, _ = _forward64(_f64(x), _f64(weight), float(eps), _f64(residual), float(offset), float(scale), crms, x.dtype)
    return y if residual is None else (y, h)


def rms_norm_ref(x, weight=None, eps=1e-6, residual=None, offset=0.0, scale=1.0):
    """float64 RMSNorm of x: y, or (y, h) with a residual."""
    return _ref(x, weight, eps, residual, offset, scale, crms=False)


def crms_norm_ref(x, weight=None, eps=1e-6, residual=None, offset=0.0, scale=1.0):
    """float64 CRMSNorm of x: y, or (y, h) with a residual."""
    return _ref(x, weight, eps, residual, offset, scale, crms=True)


def norm_rstd_ref(x, eps=1e-6, residual=None, crms=False):
    """float64 r per row (what lmkern's ops return as rstd)."""
    h = _f64(x) if residual is None else _f64((x + residual))
    return rstd_ref(h, float(eps), crms)


def norm_grads_ref(x, weight=None, eps=1e-6, residual=None, offset=0.0, scale=1.0, *, dy, dh=None, crms=False):
    """float64 gradients of ⟨dy, y⟩ (+ ⟨dh, h⟩ with a residual) with respect to x, weight and residual.

    Returns a dict with keys "x", "weight" (when a weight is given) and "residual" (when one is given).
    """
    x64 = _f64(x).requires_grad_(True)
    w64 = None if weight is None else _f64(weight).requires_grad_(True)
    r64 = None if residual is None else _f64(residual).requires_grad_(True)
    y, h, _ = _forward64(x64, w64, float(eps), r64, float(offset), float(scale), crms, x.dtype)
    loss = (y * _f64(dy)).sum()
    if residual is not None and dh is not None:
        loss = loss + (h * _f64(dh)).sum()
    leaves = {"x": x64}
    if w64 is not None:
        leaves["weight"] = w64
    if r64 is not None:
        leaves["residual"] = r64
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    out = {}
    for (k, leaf), g in zip(leaves.items(), grads):
        out[k] = torch.zeros_like(leaf) if g is None else g
    return out
