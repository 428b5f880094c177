"""RMSNorm and CRMSNorm modules over lmkern's fused kernels."""
from __future__ import annotations

import numbers

import torch
from torch import nn

from ..ops.norm import crms_norm, rms_norm


class _Norm(nn.Module):
    _fn = None

    def __init__(self, normalized_shape, eps: float | None = 1e-6, elementwise_affine: bool = True,
                 offset: float = 0.0, scale: float = 1.0, device=None, dtype=None):
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            n = int(normalized_shape)
        elif len(tuple(normalized_shape)) == 1:
            n = int(tuple(normalized_shape)[0])
        else:
            raise ValueError(
                f"normalized_shape: lmkern norms normalize the last dimension only; got {tuple(normalized_shape)}"
            )
        if n < 0:
            raise ValueError(f"normalized_shape: expected a size >= 0; got {n}")
        self.normalized_shape = (n,)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.offset = float(offset)
        self.scale = float(scale)
        if elementwise_affine:
            # (offset + weight) starts at 1: weight = 1 for offset 0 (Llama), 0 for offset 1 (Gemma).
            self.weight = nn.Parameter(torch.full((n,), 1.0 - self.offset, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def _eps(self, x: torch.Tensor) -> float:
        # eps=None follows torch.nn.RMSNorm: the machine epsilon of the input's dtype.
        return torch.finfo(x.dtype).eps if self.eps is None else self.eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalize x; with ``residual`` return ``(norm(x + residual), x + residual)``."""
        if x.dim() and x.shape[-1] != self.normalized_shape[0]:  # the weight's check, when there is none
            raise ValueError(
                f"x: expected a last dimension of {self.normalized_shape[0]} (normalized_shape); got shape {tuple(x.shape)}"
            )
        return type(self)._fn(x, self.weight, self._eps(x), residual=residual, offset=self.offset, scale=self.scale)

    def extra_repr(self) -> str:
        extra = f"{self.normalized_shape[0]}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        if self.offset:
            extra += f", offset={self.offset}"
        if self.scale != 1.0:
            extra += f", scale={self.scale}"
        return extra


class RMSNorm(_Norm):
    """Fused RMSNorm, a drop-in for :class:`torch.nn.RMSNorm` (loads its state dict). Its default
    eps is 1e-6; ``eps=None`` is torch's default (the machine epsilon of the input's dtype).

    ``y = x · rsqrt(mean(x²) + eps) · (offset + weight) · scale`` over the last dimension.
    """

    _fn = staticmethod(rms_norm)


class CRMSNorm(_Norm):
    """Fused CRMSNorm (Pre-CRMSNorm Transformers): RMSNorm of the zero-mean vector of width n+1
    whose first n entries are x. ``y = x · rsqrt((Σx² + (Σx)²)/(n+1) + eps) · (offset + weight) · scale``.
    """

    _fn = staticmethod(crms_norm)
