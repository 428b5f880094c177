"""RMSNorm and CRMSNorm modules over lmkern's fused kernels."""
from __future__ import annotations

import numbers

import torch
from torch import nn

from .._lib import not_a_tensor, scalar_arg
from ..ops.norm import crms_norm, rms_norm


def _norm_module_forward(crms: bool, n: int, x, weight, eps, residual, offset: float, scale: float):
    if not isinstance(x, torch.Tensor):
        raise not_a_tensor("x", x)
    # The weight's check, when there is none (a traced size is a tensor: jit.trace would warn).
    if not torch.jit.is_tracing() and x.dim() and x.shape[-1] != n:
        raise ValueError(f"x: expected a last dimension of {n} (normalized_shape); got shape {tuple(x.shape)}")
    return (crms_norm if crms else rms_norm)(x, weight, eps, residual=residual, offset=offset, scale=scale)


_UNREGISTERED = object()

# A leaf of torch.fx.symbolic_trace: its check on x's shape cannot run on fx's symbolic values.
torch.fx.wrap("_norm_module_forward")


class _Norm(nn.Module):
    _crms = False

    def __init__(self, normalized_shape, eps: float | None = 1e-6, elementwise_affine: bool = True,
                 offset: float = 0.0, scale: float = 1.0, device=None, dtype=None):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else normalized_shape
        if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
            raise TypeError(f"normalized_shape: expected an int or a sequence of one int; got {type(shape).__name__}")
        shape = tuple(shape)
        if len(shape) != 1:
            raise ValueError(f"normalized_shape: lmkern norms normalize the last dimension only; got {shape}")
        if not isinstance(shape[0], numbers.Integral):  # (torch.Size's and numpy's ints are)
            raise TypeError(f"normalized_shape: expected an int size; got {type(shape[0]).__name__} {shape[0]!r}")
        n = int(shape[0])
        if n < 0:
            raise ValueError(f"normalized_shape: expected a size >= 0; got {n}")
        self.normalized_shape = (n,)
        self.eps = None if eps is None else scalar_arg("eps", eps)
        self.elementwise_affine = elementwise_affine
        self.offset = scalar_arg("offset", offset)
        self.scale = scalar_arg("scale", scale)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty((n,), device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(offset + weight) back to 1: weight = 1 for offset 0 (Llama), 0 for offset 1 (Gemma).
        Called on construction; as torch's norms, for models built on meta then ``to_empty``."""
        if self.weight is not None:
            with torch.no_grad():
                self.weight.fill_(1.0 - self.offset)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalize x; with ``residual`` return ``(norm(x + residual), x + residual)``. eps=None is
        resolved per call from x's dtype (``lmkern.ops.norm.default_eps``)."""
        # weight from _parameters (nn.Module.__getattr__ costs ~0.5 us), unless a parametrization
        # (torch.nn.utils.parametrize) made it a property
        weight = self._parameters.get("weight", _UNREGISTERED)
        if weight is _UNREGISTERED:
            weight = self.weight
        return _norm_module_forward(self._crms, self.normalized_shape[0], x, weight, self.eps, residual, self.offset,
                                    self.scale)

    def __prepare_scriptable__(self):
        raise RuntimeError(f"lmkern.nn.{type(self).__name__} cannot be scripted (torch.jit.script); use "
                           "torch.compile, torch.export or torch.jit.trace")

    def extra_repr(self) -> str:
        extra = f"{self.normalized_shape[0]}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        if self.offset:
            extra += f", offset={self.offset}"
        if self.scale != 1.0:
            extra += f", scale={self.scale}"
        return extra


class RMSNorm(_Norm):
    """Fused RMSNorm, a drop-in for :class:`torch.nn.RMSNorm` (loads its state dict). Its default
    eps is 1e-6; ``eps=None`` is torch's default (float32's machine epsilon, float64's for float64
    inputs).

    ``y = x · rsqrt(mean(x²) + eps) · (offset + weight) · scale`` over the last dimension.
    """


class CRMSNorm(_Norm):
    """Fused CRMSNorm (Pre-CRMSNorm Transformers): RMSNorm of the zero-mean vector of width n+1
    whose first n entries are x. ``y = x · rsqrt((Σx² + (Σx)²)/(n+1) + eps) · (offset + weight) · scale``.
    """

    _crms = True
