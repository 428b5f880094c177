"""The `lmkern` torch.library namespace and the small helpers every op module shares."""
from __future__ import annotations

import functools

import numpy as np
import torch

#: Every lmkern op is defined in this one library: torch.ops.lmkern.<name>.
LIB = torch.library.Library("lmkern", "DEF")

#: dtype codes understood by lmkern._core.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


# torch's current raw CUstream of a device, without building a torch.cuda.Stream object (a few
# microseconds per call); the public API is the fallback should the private helper go away.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream
)


def device_args(t: torch.Tensor) -> tuple[int, int]:
    """(device index, raw stream) for _core: (-1, 0) on CPU, torch's current stream on CUDA."""
    if not t.is_cuda:
        return -1, 0
    index = t.get_device()
    return index, _raw_stream(index)


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def check_floating(name: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name}: expected dtype {names}; got {str(t.dtype).replace('torch.', '')}")


def check_device(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str = "x") -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}); got {t.device}")
    _check_dense(name, t)


def register_fake(op_name: str, fake) -> None:
    """torch.library.register_fake for lmkern::<op_name>, after a check that every tensor argument is
    on one device. The real kernels check that themselves; the fake one must too, because a meta
    tensor among cpu or cuda ones sends the whole call to it (the meta key wins the dispatch), and
    its outputs, allocated on the other tensors' device, would be uninitialized memory."""
    names = [arg.name for arg in getattr(torch.ops.lmkern, op_name).default._schema.arguments]

    @functools.wraps(fake)
    def checked(*args, **kwargs):
        first = None
        for name, value in (*zip(names, args), *kwargs.items()):
            if isinstance(value, torch.Tensor):
                if first is None:
                    first = (name, value.device)
                elif value.device != first[1]:
                    raise ValueError(f"{name}: expected a tensor on {first[1]} (the device of {first[0]}); got {value.device}")
        return fake(*args, **kwargs)

    torch.library.register_fake(f"lmkern::{op_name}", checked, lib=LIB)


def check_cpu_or_cuda(name: str, t: torch.Tensor) -> None:
    if not (t.is_cpu or t.is_cuda or t.is_meta):
        raise ValueError(f"{name}: lmkern runs on cpu and cuda tensors; got a {t.device.type} tensor")
    _check_dense(name, t)


_STRIDED = torch.strided


def _check_dense(name: str, t: torch.Tensor) -> None:
    if t.layout is not _STRIDED:
        raise TypeError(f"{name}: expected a dense tensor; got layout {t.layout} (call .to_dense() first)")


def plain_number(value):
    """The Python number a numpy scalar (or 0-d array) holds; any other value as it is. Integer and
    real arguments go through this before their type checks: numbers.Integral and numbers.Real take
    numpy scalars, but under torch.compile Dynamo hands them over as 0-d arrays, which they do not."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.shape == ()):
        return value.item()
    return value


def not_a_tensor(name: str, value, expected: str = "a torch.Tensor") -> TypeError:
    """The error for an argument that is not a tensor; for an fx Proxy, says how to trace the call."""
    hint = ""
    if isinstance(value, torch.fx.Proxy):
        hint = (" (under torch.fx.symbolic_trace, call it through its module, e.g. lmkern.rms_norm(...) or "
                "lmkern.quant.power_fake_quantize(...), which fx records as one call; or pass it in "
                "torch.fx.Tracer(autowrap_functions=...))")
    return TypeError(f"{name}: expected {expected}; got {type(value).__name__}{hint}")


def scalar_arg(name: str, value) -> float:
    """A float argument of the norms (eps, offset, scale): a tensor that requires grad would silently
    lose its gradient in float(), so it is refused."""
    if type(value) is float:  # the usual case, first: this runs on every eager call with eps=None
        return value
    if isinstance(value, torch.Tensor) and value.requires_grad:
        raise TypeError(f"{name}: expected a number (lmkern does not differentiate it); got a tensor that requires grad")
    if isinstance(value, (str, bytes, bool)):  # float() would take "1e-6" and True (= 1.0)
        raise TypeError(f"{name}: expected a real number; got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name}: expected a real number; got {type(value).__name__} beyond float64's range") from None
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name}: expected a real number; got {type(value).__name__} ({e})") from None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def tracing() -> bool:
    """Whether this thread's call is being traced (torch.compile, torch.export), not run eagerly.
    Not torch.compiler.is_compiling() alone: that is a process-wide flag, true in every thread while
    any thread compiles. Dynamo folds is_dynamo_compiling() to True in the code it traces; export's
    non-strict tracing (the flag without Dynamo) runs under dispatch modes of the tracing thread."""
    return torch.compiler.is_dynamo_compiling() or (
        torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() > 0
    )


def eager_ok(*tensors) -> bool:
    """Whether an eager call may skip torch's dispatcher and run an op's implementation directly:
    plain tensors (or None), and nothing tracing or intercepting ops (torch.compile, jit tracing,
    dispatch or function modes, functorch transforms, forward-mode AD). The dispatcher and
    torch.library's autograd wrapper cost more than small kernels, and ~0.15 ms when their code is
    out of cache."""
    if (
        tracing()
        or torch._C._get_tracing_state()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
        or _forward_ad_active(tensors)
    ):
        return False
    # A lazily negated view (torch.Tensor.neg's bit, `t.conj().imag`) has the un-negated values in
    # memory: the dispatcher's fallback resolves it, a kernel reading data_ptr would not.
    return all(t is None or (type(t) in _PLAIN and not t.is_neg()) for t in tensors)


def func_transformed(*tensors) -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, jvp, jacfwd, vmap, ...) or forward-mode AD
    (torch.autograd.forward_ad, on one of the call's `tensors`) may be tracking this call, outside
    torch.compile. torch.library's autograd for custom ops supports neither: torch.func.grad raises
    about `setup_context`, and jvp or forward AD silently give zero tangents. Ops with a composite
    torch form take it then."""
    if tracing():
        return False
    return _forward_ad_active(tensors) or torch._C._are_functorch_transforms_active()


def differentiating_transform(*tensors) -> bool:
    """Like func_transformed, but only the transforms that differentiate (grad, vjp, jacrev, jvp,
    jacfwd) and forward-mode AD: vmap alone runs custom ops correctly (through a batching rule, or
    torch's fallback of one call per example)."""
    if not func_transformed(*tensors):
        return False
    if _forward_ad_active(tensors):
        return True
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # a torch without these (private) names: assume the worst
        return True
    return any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters())


_FORWARD_AD = torch.autograd.forward_ad if hasattr(torch.autograd.forward_ad, "_current_level") else None


def _forward_ad_active(tensors) -> bool:
    """Whether forward-mode AD tracks a call on `tensors`: a torch.autograd.forward_ad.dual_level is
    open and one of them has a tangent at it. torch keeps the level in a process-wide global: the
    level alone would send every other thread's calls down the composite paths (and make
    power_fake_quantize raise there). A torch without the global: assume it tracks (correct, only
    slower)."""
    if _FORWARD_AD is None:
        return True
    if _FORWARD_AD._current_level < 0:
        return False
    return any(isinstance(t, torch.Tensor) and _FORWARD_AD.unpack_dual(t).tangent is not None for t in tensors)


def first_order_backward(what: str):
    """Decorates an autograd.Function's backward that runs kernels (not differentiable torch ops).

    torch's ``once_differentiable`` makes the gradients it returns raise when differentiated only if
    an incoming gradient requires grad; but under ``create_graph=True`` they also depend on the
    inputs the forward saved, and differentiating them again would silently give 0 for that part
    (a gradient penalty would drop its second-order term). Here the gradients of a backward run
    with ``create_graph=True`` hang off a node that raises, naming `what`, whenever a later
    backward reaches it: it is linked to every incoming gradient and saved tensor that requires
    grad, so asking for the gradient of any of them passes through it."""
    message = f"{what}: second derivatives are not implemented (the backward is not differentiable)".encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():  # no create_graph: nothing will differentiate them
                return backward(ctx, *grads)
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            upstream = [t for t in (*grads, *ctx.saved_tensors) if t is not None and t.requires_grad]
            if not upstream:
                return outputs
            # The node once_differentiable uses: as many outputs as inputs, each raising in backward.
            raise_on_backward = torch._C._functions.DelayedError(message, len(outputs) + len(upstream))
            return raise_on_backward(*outputs, *upstream)[: len(outputs)]

        return wrapper

    return decorate
