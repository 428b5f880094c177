"""Fused RMSNorm and CRMSNorm as torch custom ops (Jiang et al., "Pre-RMSNorm and Pre-CRMSNorm
Transformers", NeurIPS 2023).

Ops (torch.ops.lmkern.*), for <norm> in rms_norm, crms_norm:
  <norm>(x, weight?, eps, offset, scale) -> (y, rstd)
  <norm>_residual(x, residual, weight?, eps, offset, scale) -> (y, h, rstd)     h = x + residual
  <norm>_backward(dy, x, weight?, rstd, dh?, offset, scale, weight_grad) -> (dx, dw)
  <norm>_inplace(x!, weight?, eps, offset, scale) -> ()                  (inference; see rms_norm_)
  <norm>_residual_inplace(x!, residual!, weight?, eps, offset, scale) -> ()
The backward op is the gradient of both forward forms (for the residual form x is h and dh the
gradient of the returned h). rstd is float32 (float64 for float64 input), one per row.
"""
from __future__ import annotations

import torch

from .. import _core
from .._lib import (
    DTYPE_CODES, LIB, check_cpu_or_cuda, check_device, check_floating, device_args, eager_ok, first_order_backward, func_transformed,
    not_a_tensor, ptr, register_fake, scalar_arg, tracing,
)

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_x(x: torch.Tensor, name: str = "x") -> None:
    check_cpu_or_cuda(name, x)
    check_floating(name, x, _CUDA_DTYPES if x.is_cuda else _CPU_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{name}: expected a tensor with at least one dimension (the normalized one); got a scalar")


def _check_like(name: str, t: torch.Tensor, x: torch.Tensor, shape, x_name: str = "x") -> None:
    check_device(name, t, x, x_name)
    if t.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (the dtype of {x_name}); got {t.dtype}")
    if t.shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)}; got {tuple(t.shape)}")


def _check_weight(weight: torch.Tensor, x: torch.Tensor) -> None:
    """[n] on x's device, of any floating dtype (float64 on CUDA too): the kernels read it in x's
    dtype, and its gradient comes back in its own dtype (float32 master weights, bfloat16 x)."""
    check_device("weight", weight, x)
    check_floating("weight", weight, _CPU_DTYPES)
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight: expected shape {tuple(x.shape[-1:])}; got {tuple(weight.shape)}")


def _kernel_weight(weight, x):
    if weight is None:
        return None
    # .to() costs ~0.7 us even when it has nothing to do: only when the dtypes differ
    return (weight if weight.dtype == x.dtype else weight.to(x.dtype)).contiguous()


def _check_fwd(x, residual, weight) -> None:
    _check_x(x)
    if residual is not None:
        _check_like("residual", residual, x, x.shape)
    if weight is not None:
        _check_weight(weight, x)


def _rows(x: torch.Tensor) -> tuple[int, int]:
    n = x.shape[-1]
    return (x.numel() // n if n else 0), n


def _forward(crms, x, residual, weight, eps, offset, scale, save_rstd=True):
    """Run the forward kernel into fresh outputs: (y, h or None, rstd or None)."""
    _check_fwd(x, residual, weight)
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    weight = _kernel_weight(weight, x)
    rows, n = _rows(x)
    y = torch.empty_like(x)  # x is contiguous, so y is too (empty_like is the cheapest allocation)
    h = None if residual is None else torch.empty_like(x)
    rstd = None
    if save_rstd:
        rstd = x.new_empty(x.shape[:-1], dtype=_acc_dtype(x.dtype))
        if n == 0 and rstd.numel():
            rstd.fill_(eps**-0.5 if eps > 0 else float("inf"))  # mean of an empty row taken as 0
    dev, stream = device_args(x)
    _core.norm_forward(
        crms, DTYPE_CODES[x.dtype], dev, stream, rows, n, eps, offset, scale,
        ptr(x), ptr(residual), ptr(weight), ptr(y), ptr(h), ptr(rstd),
    )
    return y, h, rstd


def _overlap(a, b) -> bool:
    """Whether two contiguous tensors' bytes overlap (None and empty tensors overlap nothing)."""
    if a is None or b is None or not a.numel() or not b.numel():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _check_inplace(x, residual, weight, *, real: bool = True) -> None:
    _check_fwd(x, residual, weight)
    for name, t in (("x", x), ("residual", residual)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: the in-place norm writes into {name}, which must be contiguous; got strides {t.stride()}")
    if real and _overlap(x, residual):  # fake tensors have no addresses
        raise ValueError("residual: the in-place norm needs x and residual in separate memory; they overlap")


def _forward_inplace(crms, x, residual, weight, eps, offset, scale) -> None:
    """residual ← x + residual (if given), x ← norm(residual or x), written in place."""
    _check_inplace(x, residual, weight)
    weight = _kernel_weight(weight, x)
    if _overlap(weight, x) or _overlap(weight, residual):
        # A weight inside x or residual (say a row of it) would be overwritten while other rows
        # still read it (on CUDA, other blocks): normalize with a copy, as out of place.
        weight = weight.clone()
    rows, n = _rows(x)
    dev, stream = device_args(x)
    _core.norm_forward(
        crms, DTYPE_CODES[x.dtype], dev, stream, rows, n, eps, offset, scale,
        ptr(x), ptr(residual), ptr(weight), ptr(x), ptr(residual), 0,
    )


def _backward(crms, dy, x, weight, rstd, dh, offset, scale, weight_grad):
    _check_x(x)
    _check_like("dy", dy, x, x.shape)
    if dh is not None:
        _check_like("dh", dh, x, x.shape)
    if weight is not None:
        _check_weight(weight, x)
    check_device("rstd", rstd, x)
    if rstd.dtype != _acc_dtype(x.dtype) or tuple(rstd.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"rstd: expected {_acc_dtype(x.dtype)} of shape {tuple(x.shape[:-1])} as the forward returns; "
            f"got {rstd.dtype} of shape {tuple(rstd.shape)}"
        )
    if weight_grad and weight is None:
        raise ValueError("weight_grad: a weight gradient was asked for without a weight")
    dy, x, rstd = dy.contiguous(), x.contiguous(), rstd.contiguous()
    dh = None if dh is None else dh.contiguous()
    w_dtype = None if weight is None else weight.dtype
    weight = _kernel_weight(weight, x)
    rows, n = _rows(x)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if weight_grad:
        parts = _core.norm_dw_parts(rows, n)
        partial = torch.empty((parts, n), dtype=_acc_dtype(x.dtype), device=x.device)
        dw = torch.empty((n,), dtype=x.dtype, device=x.device)
    else:
        parts, partial, dw = 0, None, x.new_empty((0,))
    dev, stream = device_args(x)
    _core.norm_backward(
        crms, DTYPE_CODES[x.dtype], dev, stream, rows, n, offset, scale,
        ptr(dy), ptr(x), ptr(weight), ptr(rstd), ptr(dh), ptr(dx), ptr(partial),
        ptr(dw) if weight_grad else 0, parts,
    )
    if weight_grad and w_dtype != x.dtype:
        # A weight of another dtype gets its gradient from the float32 (float64) partials, not
        # through x's dtype: bfloat16 would keep 8 bits of a float32 master weight's gradient.
        dw = (partial.sum(0) * scale).to(w_dtype)  # the kernels' second stage: scale · Σ_parts partial
    return dx, dw


def _define(name: str, crms: bool) -> None:
    """Define <name>, <name>_residual and <name>_backward with impls, fakes and autograd."""
    LIB.define(f"{name}(Tensor x, Tensor? weight, float eps, float offset, float scale) -> (Tensor, Tensor)")
    LIB.define(
        f"{name}_residual(Tensor x, Tensor residual, Tensor? weight, float eps, float offset, float scale)"
        " -> (Tensor, Tensor, Tensor)"
    )
    LIB.define(
        f"{name}_backward(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, Tensor? dh, float offset,"
        " float scale, bool weight_grad) -> (Tensor, Tensor)"
    )
    # Two in-place ops rather than one with an optional mutable residual: torch's
    # allow_mutation_on_saved_tensors clones every mutable argument and fails on a None one.
    LIB.define(f"{name}_inplace(Tensor(a!) x, Tensor? weight, float eps, float offset, float scale) -> ()")
    LIB.define(
        f"{name}_residual_inplace(Tensor(a!) x, Tensor(b!) residual, Tensor? weight, float eps, float offset,"
        " float scale) -> ()"
    )

    def fwd(x, weight, eps, offset, scale):
        y, _, rstd = _forward(crms, x, None, weight, eps, offset, scale)
        return y, rstd

    def fwd_residual(x, residual, weight, eps, offset, scale):
        return _forward(crms, x, residual, weight, eps, offset, scale)

    def bwd(dy, x, weight, rstd, dh, offset, scale, weight_grad):
        return _backward(crms, dy, x, weight, rstd, dh, offset, scale, weight_grad)

    def fwd_inplace(x, weight, eps, offset, scale):
        _forward_inplace(crms, x, None, weight, eps, offset, scale)

    def fwd_residual_inplace(x, residual, weight, eps, offset, scale):
        _forward_inplace(crms, x, residual, weight, eps, offset, scale)

    for key in ("CPU", "CUDA"):
        LIB.impl(f"{name}_inplace", fwd_inplace, key)
        LIB.impl(f"{name}_residual_inplace", fwd_residual_inplace, key)
        LIB.impl(name, fwd, key)
        LIB.impl(f"{name}_residual", fwd_residual, key)
        LIB.impl(f"{name}_backward", bwd, key)

    def fwd_fake(x, weight, eps, offset, scale):
        _check_fwd(x, None, weight)
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(
            x.shape[:-1], dtype=_acc_dtype(x.dtype)
        )

    def fwd_residual_fake(x, residual, weight, eps, offset, scale):
        _check_fwd(x, residual, weight)
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        h = torch.empty_like(x, memory_format=torch.contiguous_format)
        return y, h, x.new_empty(x.shape[:-1], dtype=_acc_dtype(x.dtype))

    def bwd_fake(dy, x, weight, rstd, dh, offset, scale, weight_grad):
        _check_x(x)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        if weight_grad and weight is not None:
            return dx, x.new_empty((x.shape[-1],), dtype=weight.dtype)
        return dx, x.new_empty((x.shape[-1],) if weight_grad else (0,))

    register_fake(name, fwd_fake)
    register_fake(f"{name}_residual", fwd_residual_fake)
    register_fake(f"{name}_backward", bwd_fake)
    register_fake(f"{name}_inplace", lambda x, weight, eps, offset, scale: _check_inplace(x, None, weight, real=False))
    register_fake(
        f"{name}_residual_inplace",
        lambda x, residual, weight, eps, offset, scale: _check_inplace(x, residual, weight, real=False),
    )

    backward_op = getattr(torch.ops.lmkern, f"{name}_backward").default

    def setup(ctx, inputs, output):
        x, weight, _eps, offset, scale = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.offset, ctx.scale = offset, scale

    def grad(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        weight_grad = weight is not None and ctx.needs_input_grad[1]
        dx, dw = backward_op(dy, x, weight, rstd, None, ctx.offset, ctx.scale, weight_grad)
        return dx, (dw if weight_grad else None), None, None, None

    def setup_residual(ctx, inputs, output):
        x, residual, weight, _eps, offset, scale = inputs
        ctx.save_for_backward(output[1], weight, output[2])
        ctx.offset, ctx.scale = offset, scale
        # Two leaves given one gradient tensor would share .grad storage: copy in that case only.
        ctx.both_leaves = x.is_leaf and residual.is_leaf

    def grad_residual(ctx, dy, dh, _drstd):
        h, weight, rstd = ctx.saved_tensors
        weight_grad = weight is not None and ctx.needs_input_grad[2]
        dx, dw = backward_op(dy, h, weight, rstd, dh, ctx.offset, ctx.scale, weight_grad)
        dres = None
        if ctx.needs_input_grad[1]:
            dres = dx.clone() if (ctx.both_leaves and ctx.needs_input_grad[0]) else dx
        return dx, dres, (dw if weight_grad else None), None, None, None

    def no_double_backward(ctx, *grads):
        raise NotImplementedError(
            f"lmkern.{name}: second derivatives are not implemented (the backward is not differentiable)"
        )

    torch.library.register_autograd(f"lmkern::{name}", grad, setup_context=setup, lib=LIB)
    # Without this, autograd would treat the backward op as constant and give silently wrong
    # second derivatives; with it, asking for them raises.
    torch.library.register_autograd(
        f"lmkern::{name}_backward", no_double_backward, setup_context=lambda ctx, inputs, output: None, lib=LIB
    )
    torch.library.register_autograd(f"lmkern::{name}_residual", grad_residual, setup_context=setup_residual, lib=LIB)
    _register_inplace_guards(f"{name}_inplace", mutated=1)
    _register_inplace_guards(f"{name}_residual_inplace", mutated=2)


def _register_inplace_guards(op_name: str, mutated: int) -> None:
    """What torch's own in-place ops do, for an in-place op called through the dispatcher (directly,
    or by rms_norm_ under torch.compile or a mode): refuse inputs that require grad while grad mode
    is on (the op has no derivative; writing over them would give wrong gradients silently), and
    bump the version counters of the tensors it writes (its first `mutated` arguments), so that
    autograd refuses a graph that saved them."""
    op = getattr(torch.ops.lmkern, op_name).default

    def autograd(keyset, *args):
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
            raise RuntimeError(
                f"lmkern::{op_name}: writes in place and is not differentiable (an input requires grad); "
                "call it under torch.no_grad() or torch.inference_mode()"
            )
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    def inplace_or_view(keyset, *args):
        for t in args[:mutated]:
            torch.autograd.graph.increment_version(t)
        return op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)

    LIB.impl(op_name, autograd, "Autograd", with_keyset=True)
    LIB.impl(op_name, inplace_or_view, "ADInplaceOrView", with_keyset=True)


_define("rms_norm", crms=False)
_define("crms_norm", crms=True)
# [crms] -> the ops (forward, residual form, in place, residual form in place), looked up once: a
# torch.ops attribute read costs ~0.15 us on every eager call that named them.
_OPS = {
    crms: tuple(getattr(torch.ops.lmkern, name + suffix) for suffix in ("", "_residual", "_inplace", "_residual_inplace"))
    for crms, name in ((False, "rms_norm"), (True, "crms_norm"))
}


def _eager_ok(x, residual, weight) -> bool:
    """Eager calls on plain cpu/cuda tensors run the kernels directly (through _NormFunction when a
    gradient is wanted): for small tensors the dispatcher costs more than the kernel. Every other
    case goes through the custom op."""
    return eager_ok(x, residual, weight) and (x.is_cpu or x.is_cuda)


def _composite(crms, x, residual, weight, eps, offset, scale):
    """The norm written with torch ops (every autograd mode differentiates it), for torch.func
    transforms and forward-mode AD (see func_transformed): same formula, same accumulation dtype."""
    _check_fwd(x, residual, weight)
    h = x if residual is None else x + residual
    hf = h.to(_acc_dtype(x.dtype))
    sq = (hf * hf).sum(-1, keepdim=True)
    n = h.shape[-1]
    ms = (sq + hf.sum(-1, keepdim=True) ** 2) / (n + 1) if crms else sq / max(n, 1)
    y = hf * torch.rsqrt(ms + eps)
    if weight is not None:  # read in x's dtype, as the kernels do
        y = y * (offset + weight.to(x.dtype).to(hf.dtype))
    y = (y * scale).to(x.dtype)
    return y if residual is None else (y, h)


class _NormFunction(torch.autograd.Function):
    """Eager autograd over the same kernels as the custom ops (same _forward/_backward)."""

    @staticmethod
    def forward(ctx, crms, x, residual, weight, eps, offset, scale):
        y, h, rstd = _forward(crms, x, residual, weight, eps, offset, scale)
        ctx.save_for_backward(x if residual is None else h, weight, rstd)
        ctx.crms, ctx.offset, ctx.scale = crms, offset, scale
        ctx.has_residual = residual is not None
        # Two leaves given one gradient tensor would share .grad storage: copy in that case only.
        ctx.both_leaves = residual is not None and x.is_leaf and residual.is_leaf
        ctx.set_materialize_grads(False)
        if residual is None:
            return y
        return y, h

    @staticmethod
    @first_order_backward("lmkern.rms_norm / crms_norm")
    def backward(ctx, dy, dh=None):
        h, weight, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(h)
        weight_grad = weight is not None and ctx.needs_input_grad[3]
        if torch._C._has_storage(dy) and (dh is None or torch._C._has_storage(dh)):
            dx, dw = _backward(ctx.crms, dy, h, weight, rstd, dh, ctx.offset, ctx.scale, weight_grad)
        else:  # batched gradients (is_grads_batched, gradcheck's batched check: no storage): the op
            # runs them through vmap's fallback, one gradient at a time
            op = torch.ops.lmkern.crms_norm_backward if ctx.crms else torch.ops.lmkern.rms_norm_backward
            dx, dw = op(dy, h, weight, rstd, dh, ctx.offset, ctx.scale, weight_grad)
        dres = None
        if ctx.has_residual and ctx.needs_input_grad[2]:
            dres = dx.clone() if (ctx.both_leaves and ctx.needs_input_grad[1]) else dx
        return None, dx, dres, (dw if weight_grad else None), None, None, None


def _check_tensor_args(x, weight, residual) -> None:
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if not isinstance(t, torch.Tensor) and (t is not None or name == "x"):
            raise not_a_tensor(name, t, "a torch.Tensor" if name == "x" else "a torch.Tensor or None")


def _scalars(dtype: torch.dtype, eps, offset, scale) -> tuple[float, float, float]:
    """eps (None: torch's default for dtype), offset and scale as floats (not floats already: the
    usual case is checked by the callers inline)."""
    eps = default_eps(dtype) if eps is None else eps
    return scalar_arg("eps", eps), scalar_arg("offset", offset), scalar_arg("scale", scale)


def _public(crms, x, weight, eps, residual, offset, scale):
    _check_tensor_args(x, weight, residual)
    if (residual is not None and residual.dtype != x.dtype and residual.is_floating_point()
            and x.is_floating_point()):
        # x + residual promotes in torch (a bfloat16 branch into a float32 stream under autocast)
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    if not (type(eps) is type(offset) is type(scale) is float):  # floats, the usual case, need no check
        eps, offset, scale = _scalars(x.dtype, eps, offset, scale)
    if _eager_ok(x, residual, weight):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight)):
            return _NormFunction.apply(crms, x, residual, weight, eps, offset, scale)
        y, h, _ = _forward(crms, x, residual, weight, eps, offset, scale, save_rstd=False)
        return y if residual is None else (y, h)
    if func_transformed(x, residual, weight):
        return _composite(crms, x, residual, weight, eps, offset, scale)
    if residual is None:
        return _OPS[crms][0](x, weight, eps, offset, scale)[0]
    y, h, _ = _OPS[crms][1](x, residual, weight, eps, offset, scale)
    return y, h


def default_eps(dtype: torch.dtype) -> float:
    """eps=None, as torch.nn.RMSNorm and F.rms_norm: the machine epsilon of the computation dtype
    (float32's for float32, bfloat16 and float16 inputs; float64's for float64)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def rms_norm(x, weight=None, eps=1e-6, *, residual=None, offset=0.0, scale=1.0):
    """RMSNorm over the last dimension: ``y = x · rsqrt(mean(x²) + eps) · (offset + weight) · scale``.

    Without ``weight`` the factor ``(offset + weight)`` is 1. With ``residual`` it first forms
    ``h = x + residual`` and returns ``(rms_norm(h), h)``. Differentiable in x, weight and residual.
    ``eps=None`` is torch's default (:func:`default_eps`: float32's machine epsilon, float64's for
    float64 x).
    dtypes: float32, float64 (CPU), bfloat16, float16; accumulation in float32 (float64 for float64).
    A weight of another floating dtype is read in x's dtype and gets its gradient in its own dtype
    (reduced in float32); x and residual of two dtypes are promoted as ``x + residual`` is. NaN/inf in
    x propagate to that row. The float32 sums hold rows of RMS up to ~1e19/√n (beyond, Σx² is inf and
    the row normalizes to zeros, as torch's float32 RMSNorm does); forward and gradient keep float32
    accuracy from RMS ~1e-18 (eps = 0) up to there.
    """
    return _public(False, x, weight, eps, residual, offset, scale)


def crms_norm(x, weight=None, eps=1e-6, *, residual=None, offset=0.0, scale=1.0):
    """CRMSNorm over the last dimension (n wide, the compressed form of a zero-mean vector of width n+1):
    ``y = x · rsqrt((Σx² + (Σx)²)/(n+1) + eps) · (offset + weight) · scale``.

    Options, outputs, dtypes and gradients as :func:`rms_norm`.
    """
    return _public(True, x, weight, eps, residual, offset, scale)


def _public_inplace(crms, x, weight, eps, residual, offset, scale):
    fn = "crms_norm_" if crms else "rms_norm_"
    _check_tensor_args(x, weight, residual)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight)):
        raise RuntimeError(
            f"lmkern.{fn}: writes in place and is not differentiable (an input requires grad); "
            f"use lmkern.{fn[:-1]}, or call it under torch.no_grad() / torch.inference_mode()"
        )
    if not (type(eps) is type(offset) is type(scale) is float):  # floats, the usual case, need no check
        eps, offset, scale = _scalars(x.dtype, eps, offset, scale)
    # (Not while compiling: torch.compile cannot trace the inference checks, and its own
    # functionalization refuses what they refuse.)
    checked = () if tracing() or torch.is_inference_mode_enabled() else (("x", x), ("residual", residual))
    for name, t in checked:
        if t is not None and t.is_inference():
            raise RuntimeError(
                f"lmkern.{fn}: {name} is an inference tensor; torch allows updating it in place only "
                "under torch.inference_mode()"
            )
    if _eager_ok(x, residual, weight):
        _forward_inplace(crms, x, residual, weight, eps, offset, scale)
        # Tell autograd the tensors changed (a graph may have saved them), as torch's in-place ops do.
        for t in (x, residual):
            if t is not None and not t.is_inference():  # inference tensors have no version counter
                torch.autograd.graph.increment_version(t)
    elif residual is None:
        _OPS[crms][2](x, weight, eps, offset, scale)
    else:
        _OPS[crms][3](x, residual, weight, eps, offset, scale)
    return x if residual is None else (x, residual)


def rms_norm_(x, weight=None, eps=1e-6, *, residual=None, offset=0.0, scale=1.0):
    """In-place :func:`rms_norm` for inference (the fused add-norm of vLLM's ``fused_add_rms_norm``).

    With ``residual``: ``residual ← x + residual``, then ``x ← rms_norm(residual)``; returns
    ``(x, residual)``. Without: ``x ← rms_norm(x)``; returns ``x``. No output is allocated, so large
    calls skip the page faults of fresh buffers. x and residual must be contiguous and must not overlap
    (a weight inside either is copied first).
    Not differentiable: raises if grad mode is on and an input requires grad. One fused in-place
    kernel on CPU and CUDA, giving bit for bit the out-of-place values. dtypes as :func:`rms_norm`,
    except that x and residual must share one (nothing is promoted in place). Inference tensors
    are written only under ``torch.inference_mode()``, as torch's own in-place ops.
    """
    return _public_inplace(False, x, weight, eps, residual, offset, scale)


def crms_norm_(x, weight=None, eps=1e-6, *, residual=None, offset=0.0, scale=1.0):
    """In-place :func:`crms_norm` for inference; in every other respect as :func:`rms_norm_`."""
    return _public_inplace(True, x, weight, eps, residual, offset, scale)
