"""PowerQuantLinear: a linear layer over power-quantized frozen weights (PowerQuant / NUPES)."""
from __future__ import annotations

import numbers
import sys

import torch
from torch import nn

from .._lib import eager_ok, func_transformed, not_a_tensor, tracing
from ..ops import quant as _ops
from ..quant import PowerQuantized, _exponents, power_quantize, search_exponent


def _refresh_after_load(module: "PowerQuantLinear", _incompatible_keys) -> None:
    # A module-level function, not a lambda: the hook is part of the module's pickled state
    # (torch.save(model)).
    module.refresh_codebook()


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version  # inference tensors keep no version counter


def _quantized(codes, scales, exponent, bits: int, group_size: int, in_features: int) -> PowerQuantized:
    """The layer's float32 [out, in] weight as the PowerQuantized its buffers hold."""
    return PowerQuantized(codes, scales, bits, group_size, torch.Size((codes.shape[0], in_features)), torch.float32,
                          exponent)


def _quant_linear_forward(x, codes, scales, codebook, exponent, bias, bits: int, group_size: int, in_features: int):
    if not isinstance(x, torch.Tensor):
        raise not_a_tensor("x", x)
    if torch._C._is_any_autocast_enabled():  # (one test first: the device's own costs ~25 us out of cache)
        dev = x.device.type
        if (x.dtype in (torch.float32, torch.bfloat16, torch.float16) and torch.amp.is_autocast_available(dev)
                and torch.is_autocast_enabled(dev)):
            x = x.to(torch.get_autocast_dtype(dev))  # as nn.Linear under autocast (custom ops get no autocast rule)
    if x.is_cpu and eager_ok(x, codes, scales, codebook, exponent, bias):
        # The common eager CPU call: eager_ok rules out the transforms below too (one round of checks
        # instead of two: ~40 us of a 1-token call when their code is out of cache, as after the
        # dense work between two layers).
        return _ops.quant_linear_eager(x, codes, scales, codebook, bias, bits, group_size, in_features)
    if func_transformed(x, codes, scales, exponent, bias):
        # torch.func transforms and forward-mode AD: the same product through torch ops (the
        # custom op's autograd supports neither), the weight dequantized whole.
        if x.shape[-1] != in_features:
            raise ValueError(f"x: expected a last dimension of {in_features} (in_features); got shape {tuple(x.shape)}")
        w = _quantized(codes, scales, exponent, bits, group_size, in_features).dequantize()
        return nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return _ops.quant_linear(x, codes, scales, codebook, bias, bits, group_size, in_features)


# A leaf of torch.fx.symbolic_trace: its dtype and autocast checks cannot run on fx's symbolic values.
torch.fx.wrap("_quant_linear_forward")


class PowerQuantLinear(nn.Module):
    """``y = x @ Ŵᵀ + b`` with Ŵ the power-dequantized weight, computed without forming Ŵ: each
    output row's 2^bits-entry table times its group scales meets x directly (a fused lookup-table
    dequantize-matmul; AVX-512 or AVX2 for 4 bits). The backward gives dx = dy @ Ŵ through the same
    tables; the weight (codes, scales, exponents) is frozen, and the bias takes a gradient only when
    made to require one (``layer.bias.requires_grad_()``: dy summed over the tokens, in float32).
    Both are buffers, so ``state_dict`` carries them and a fresh module built with the same configuration loads it (its ``bits`` and
    ``group_size`` ride in the state dict's metadata: a checkpoint saved by ``torch.save`` from a
    module of other ones is refused, even where the codes' shapes coincide, in_features <= 6).

    Buffers: ``codes`` uint8 [out, ceil(in·bits/8)], ``scales`` float32 [out, in/group_size],
    ``exponent`` float32 [out], ``bias`` float32 [out] (when bias=True), and, not saved in the state
    dict, ``codebook`` float32 [out, 2^bits], the rows' tables computed from ``exponent`` when the
    module is built or loaded, and again by an eager forward that finds ``exponent`` replaced or
    changed in place since (a checkpoint written into it in place, ``torch.func.functional_call``
    with other exponents; not inside torch.compile, nor for exponents that are inference tensors,
    which keep no version: call :meth:`refresh_codebook` there); layout as in
    :mod:`lmkern.quant`. Activations: float32, bfloat16, float16 on CPU (float64 is accepted and
    computed in float32); accumulation in float32; the output has the activations' dtype. CUDA
    (``.to("cuda")`` of a module built on CPU works): float32, bfloat16, float16 activations; up to 8
    tokens (32 where the tensor-core GEMV fits: bfloat16/float16, 4 bits, in_features and group_size
    multiples of 128) a fused lookup-table GEMV that reads the 4-bit stream and the scales once (the
    4-bit weight moves ~4.25 bits per weight instead of 16 for bf16), beyond that the weight
    dequantized through the codebooks into a scratch and cuBLAS; the backward is dy @ Ŵ with Ŵ
    dequantized in dy's dtype. The codebook of CUDA exponents is built on the host (an exponent
    outside (0, 1] raises there); the GEMV reads ``codebook`` as it is (no check, no
    synchronization). Dtype conversions of the module (``model.to(torch.bfloat16)``, ``.half()``)
    leave these buffers float32: the activations' dtype alone sets the compute and output dtype
    (under ``torch.autocast``, as for ``nn.Linear``, the autocast dtype).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 4,
                 group_size: int | None = 128, device=None):
        super().__init__()
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(size, bool) or not isinstance(size, numbers.Integral):
                raise TypeError(f"{name}: expected an int; got {type(size).__name__} {size!r}")
            if size < 0:
                raise ValueError(f"{name}: expected a size >= 0; got {size}")
            if size > sys.maxsize:  # (torch.empty's own message names no argument)
                raise ValueError(f"{name}: expected a size below 2^63; got {size}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits = _ops.check_bits(bits)
        self.group_size = _ops.check_group(group_size, self.in_features, "in_features")
        nb = _ops.row_bytes(self.in_features, self.bits)
        self.register_buffer("codes", torch.empty((self.out_features, nb), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty((self.out_features, self.in_features // self.group_size),
                                                   dtype=torch.float32, device=device))
        self.register_buffer("exponent", torch.empty((self.out_features,), dtype=torch.float32, device=device))
        self.register_buffer("codebook", torch.empty((self.out_features, 2 ** self.bits), dtype=torch.float32,
                                                     device=device), persistent=False)
        self._book_of = (None, -1)  # the exponent tensor and its version that `codebook` was built from
        self.register_load_state_dict_post_hook(_refresh_after_load)
        if bias:
            self.register_buffer("bias", torch.empty((self.out_features,), dtype=torch.float32, device=device))
        else:
            self.bias = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The state of a new module: codes and scales 0 (Ŵ = 0), exponents 1, bias 0. Called on
        construction; as torch's layers, for models built on meta then ``to_empty``."""
        self.codes.zero_()
        self.scales.zero_()
        self.exponent.fill_(1.0)
        if self.bias is not None:
            self.bias.zero_()
        self.refresh_codebook()

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = 128, a=None, *,
                    x: torch.Tensor | None = None, clip: float = 1.0) -> "PowerQuantLinear":
        """Quantize ``linear.weight`` per output row, groups of ``group_size`` inputs (None: whole rows).
        ``a``: a float, or a tensor of one exponent per output row; None searches it per row
        (:func:`lmkern.quant.search_exponent`, on the weight error, or on the output error over
        calibration activations ``x`` when given)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear; got {type(linear).__name__}")
        w = linear.weight.detach()
        if w.is_meta:
            raise ValueError("linear: its weight is on the meta device, with no values to quantize; build the layer "
                             "there instead (PowerQuantLinear(..., device='meta'), or quantize_linears on the model) "
                             "and load a quantized checkpoint")
        if not torch.isfinite(w).all():
            raise ValueError("linear.weight: expected finite values (NaN or inf found)")
        gs = _ops.check_group(group_size, w.shape[1], "in_features")
        if a is None:
            a = search_exponent(w, bits, gs, x=x, per_row=True, clip=clip)
        mod = cls(w.shape[1], w.shape[0], bias=linear.bias is not None, bits=bits, group_size=gs, device=w.device)
        q = power_quantize(w, a, bits, gs, clip)
        mod.load_quantized(q)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().to(torch.float32))
        return mod

    def load_quantized(self, q: PowerQuantized) -> None:
        """Take the codes, scales and exponents of a quantized [out, in] weight."""
        if not isinstance(q, PowerQuantized):
            raise not_a_tensor("q", q, "a PowerQuantized (lmkern.quant.power_quantize)")
        if tuple(q.shape) != (self.out_features, self.in_features) or q.bits != self.bits or q.group_size != self.group_size:
            raise ValueError(
                f"q: expected a [{self.out_features}, {self.in_features}] weight with bits={self.bits}, "
                f"group_size={self.group_size}; got {list(q.shape)}, bits={q.bits}, group_size={q.group_size}"
            )
        exponent = _exponents(q.exponent, self.out_features, q.exponent)
        # What power_dequantize(q) checks (copy_ below would broadcast and cast what does not fit).
        _ops._check_packed(q.codes, q.scales, exponent, self.bits, self.group_size, self.out_features, self.in_features)
        book = torch.ops.lmkern.power_codebook(exponent, self.bits)  # raises on a bad exponent before anything changes
        _ops.check_scales("q.scales", q.scales)
        self.codes.copy_(q.codes)
        self.scales.copy_(q.scales)
        self.exponent.copy_(exponent)
        self._take_codebook(book)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # bits and group_size ride in the state dict's metadata (torch's per-module versioning
        # record, kept by torch.save), not as keys: for in_features <= 6 the codes of two bit
        # widths have the same shape, so only this tells a checkpoint of other bits apart.
        meta = getattr(destination, "_metadata", None)
        if meta is not None and prefix[:-1] in meta:
            meta[prefix[:-1]].update(lmkern_bits=self.bits, lmkern_group_size=self.group_size)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # Checked before torch copies anything: a bad exponent raises with the module unchanged
        # (after the copy, codes and exponents would be new and the codebooks old). The float
        # buffers stay float32 when a checkpoint of another dtype is assigned (assign=True).
        for name in ("bits", "group_size"):
            saved, own = local_metadata.get("lmkern_" + name), getattr(self, name)
            if saved is not None and saved != own:
                raise ValueError(
                    f"{prefix or 'state dict'}: the checkpoint was saved from a PowerQuantLinear with "
                    f"{name}={saved}; this module has {name}={own}"
                )
        # Tensors of another kind would be cast into the buffers without a word.
        for name in ("codes", "scales", "exponent", "bias"):
            t = state_dict.get(prefix + name)
            if not isinstance(t, torch.Tensor):
                continue
            if name == "codes" and t.dtype != torch.uint8:
                raise ValueError(f"{prefix}codes (state dict): expected uint8 packed codes; got {t.dtype}")
            if name != "codes" and not t.is_floating_point():
                raise ValueError(f"{prefix}{name} (state dict): expected a floating dtype; got {t.dtype}")
        key = prefix + "exponent"
        if isinstance(state_dict.get(key), torch.Tensor) and not state_dict[key].is_meta:
            try:
                torch.ops.lmkern.power_codebook(state_dict[key].to(torch.float32), self.bits)
            except ValueError as e:
                raise ValueError(f"{key} (state dict): {e}") from None
        key = prefix + "scales"
        if isinstance(state_dict.get(key), torch.Tensor) and not state_dict[key].is_meta:
            # (as float32, what is loaded: a float64 scale beyond float32's range becomes inf)
            _ops.check_scales(f"{key} (state dict)", state_dict[key].to(torch.float32))
        given = {}  # the entries cast for the load, put back after it: the caller's dict is theirs
        for name in ("scales", "exponent", "bias"):
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32:
                given[prefix + name] = t
                state_dict[prefix + name] = t.to(torch.float32)
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)
        finally:
            state_dict.update(given)

    @torch.no_grad()
    def refresh_codebook(self) -> None:
        """Recompute ``codebook`` from ``exponent`` (done on construction, load_quantized and load_state_dict)."""
        e = self._buffers["exponent"]
        if not e.is_meta:
            # The version before the build: exponents written meanwhile (another thread's load) leave
            # a book marked older than them, rebuilt by the next forward, not one marked theirs.
            source = (e, _version(e))
            self._take_codebook(torch.ops.lmkern.power_codebook(e, self.bits), source)

    def _take_codebook(self, book: torch.Tensor, source=None) -> None:
        if self.codebook.device == book.device:
            self.codebook.copy_(book)  # in place: a captured CUDA graph keeps reading the right tables
        else:  # built on meta and loaded with assign=True: the codebook was never materialized
            self.codebook = book.to(self.exponent.device)
        self._mark_book_current(source)

    def _mark_book_current(self, source=None) -> None:
        """Record that `codebook` holds the tables of the exponent tensor as it is now (or as it was
        at `source`: the tensor and its version then)."""
        e = self._buffers["exponent"]
        self._book_of = source if source is not None else (e, _version(e))

    def _book_current(self) -> bool:
        # (getattr: a module pickled before _book_of existed has none; its codebook is rebuilt once)
        e, (source, version) = self._buffers["exponent"], getattr(self, "_book_of", (None, -1))
        return e is source and (version < 0 or e._version == version)

    @property
    def quantized(self) -> PowerQuantized:
        return _quantized(self.codes, self.scales, self.exponent, self.bits, self.group_size, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The dense float32 Ŵ (for inspection; forward never forms it)."""
        return self.quantized.dequantize()

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16), .half(), .double() convert every floating buffer; the quantized
        # weight's scales, exponents, codebooks and bias stay float32 (the kernels read them so, and a
        # round trip through bfloat16 would lose their precision): the cast results are dropped and
        # the originals only moved to where fn put them. Device moves apply as usual.
        before, current = dict(self._buffers), self._book_current()
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        if current:  # moved with its exponents: still theirs
            self._mark_book_current()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buf = self._buffers  # one read: each buffer by attribute costs ~0.5 us in nn.Module.__getattr__
        if not tracing() and not self._book_current():
            if not buf["exponent"].is_meta:
                self.refresh_codebook()
            elif not buf["codes"].is_meta:  # (the old codebook would be used silently)
                raise RuntimeError(f"exponent: on meta while the codes are on {buf['codes'].device}: load the "
                                   "exponents (load_state_dict, load_quantized) before calling the layer")
        return _quant_linear_forward(x, buf["codes"], buf["scales"], buf["codebook"], buf["exponent"], buf.get("bias"),
                                     self.bits, self.group_size, self.in_features)

    def __prepare_scriptable__(self):
        raise RuntimeError("lmkern.nn.PowerQuantLinear cannot be scripted (torch.jit.script); use torch.compile, "
                           "torch.export or torch.jit.trace")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}")


# torch modules that read their nn.Linear children's weights themselves (MultiheadAttention's
# out_proj; TransformerEncoderLayer's fast path in eval mode reads linear1/linear2.weight): left alone.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and its kind): ``y = x @ W + b`` with W [in, out]."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def _as_linear(m: nn.Module) -> nn.Linear:
    """An nn.Linear, or an nn.Linear of a Conv1D's transposed weight (a view: nothing is copied)."""
    if not _is_conv1d(m):
        return m
    lin = nn.Linear(m.nx, m.nf, bias=m.bias is not None, device="meta")
    lin.weight = nn.Parameter(m.weight.detach().t(), requires_grad=False)
    if m.bias is not None:
        lin.bias = nn.Parameter(m.bias.detach(), requires_grad=False)
    return lin


def _skipped(skip, name: str, module: nn.Module) -> bool:
    if callable(skip):
        return bool(skip(name, module))
    return name in skip or name.rsplit(".", 1)[-1] in skip


@torch.no_grad()
def quantize_linears(model: nn.Module, bits: int = 4, group_size: int | None = 128, a=None, *, clip: float = 1.0,
                     skip=("lm_head",), calibrate=None, max_tokens: int = 512) -> nn.Module:
    """Replace the ``torch.nn.Linear`` layers of ``model``, in place, by
    :meth:`PowerQuantLinear.from_linear` of them; returns ``model``.

    Only modules of type exactly ``nn.Linear`` (a subclass may behave otherwise) and transformers'
    ``Conv1D`` (GPT-2's; its weight is [in, out]: quantized as the linear it computes), and not the
    children of torch modules that read their weights themselves (``nn.MultiheadAttention``'s
    ``out_proj``, ``nn.TransformerEncoderLayer``'s ``linear1``/``linear2``). ``skip``: names to
    leave alone, each a module's qualified name or its last component (default ``("lm_head",)``:
    an output head is often tied to the embedding and sensitive), or a callable ``(name, linear) ->
    bool``. A layer reached under two names is quantized once and stays shared (skipped if either
    name is). ``a``: a float for
    every layer, or None to search the exponents per row (on the weight error); ``calibrate``, a
    callable run once with no arguments (e.g. ``lambda: model(sample_ids)``), then makes the search
    minimize each layer's output error on the first ``max_tokens`` input rows that layer saw, as the
    float model computes them (held in float32 on the CPU until the search: max_tokens ·
    in_features · 4 bytes a layer; a layer the calibration did not reach is searched on its weight
    error). Every layer is checked (group_size must divide its in_features) and built before any is
    replaced: an error (or Ctrl-C) on the way leaves the model as it was.
    Layers on the meta device become empty PowerQuantLinear of the same configuration: the model
    built on meta, converted, then ``load_state_dict(quantized_state, assign=True)`` loads a
    quantized checkpoint without materializing the float weights.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module; got {type(model).__name__}")
    if not (callable(skip) or (isinstance(skip, (list, tuple, set, frozenset)) and all(isinstance(s, str) for s in skip))):
        raise TypeError(f"skip: expected names (a list, tuple or set of str) or a callable (name, linear) -> bool; got {skip!r}")
    if calibrate is not None and a is not None:
        raise ValueError("calibrate: the exponents are given (a), so there is nothing to search; pass one of them")
    if calibrate is not None and not callable(calibrate):
        raise TypeError(f"calibrate: expected a callable run with no arguments; got {type(calibrate).__name__}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 1:
        raise ValueError(f"max_tokens: expected an int >= 1; got {max_tokens!r}")
    bits = _ops.check_bits(bits)
    # Where each layer sits: (parent, attribute) pairs under every name reaching it.
    sites: dict[int, tuple[nn.Linear, dict[tuple[int, str], nn.Module], str]] = {}
    left: set[int] = set()  # layers skipped under some name: left under all (a shared layer stays shared)
    # Every name, one per path (named_children() would list a layer that one parent holds under two
    # names once); the model itself, if a linear, has no parent to replace it in.
    for name, child in model.named_modules(remove_duplicate=False):
        if not name or (type(child) is not nn.Linear and not _is_conv1d(child)):
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(parent, _READS_CHILD_WEIGHTS) or _skipped(skip, name, child):
            left.add(id(child))
        else:
            sites.setdefault(id(child), (child, {}, name))[1][(id(parent), child_name)] = parent
    for key in left:
        sites.pop(key, None)
    if a is not None and (isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0.0 < float(a) <= 1.0):
        raise ValueError(f"a: expected None (searched) or one exponent in (0, 1] for every layer; got {a!r}")
    originals = {key: m for key, (m, _, _) in sites.items()}  # the model's modules (hooked for calibration)
    sites = {key: (_as_linear(m), places, name) for key, (m, places, name) in sites.items()}
    for linear, _, name in sites.values():  # what from_linear would refuse, before anything changes
        try:
            _ops.check_group(group_size, linear.in_features, "in_features")
        except ValueError as e:
            raise ValueError(f"{name}: {e} (nothing was replaced; skip it or choose another group_size)") from None
        if not linear.weight.is_meta and not torch.isfinite(linear.weight).all():
            raise ValueError(f"{name}.weight: expected finite values (NaN or inf found); nothing was replaced")
    inputs: dict[int, list[torch.Tensor]] = {}
    if calibrate is not None:
        def record(module, args, kwargs):
            rows = inputs.setdefault(id(module), [])
            have = sum(r.shape[0] for r in rows)
            if have < max_tokens:
                x = args[0] if args else next(iter(kwargs.values()))  # called as linear(input=x): the one argument
                x = x.detach().reshape(-1, x.shape[-1])
                # A copy: a view would keep the whole input alive, and see the model's in-place writes.
                rows.append(x[: max_tokens - have].to(device="cpu", dtype=torch.float32, copy=True))

        hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in originals.values()]
        try:
            calibrate()
        finally:
            for h in hooks:
                h.remove()
        for key, rows in inputs.items():
            if not all(torch.isfinite(r).all() for r in rows):
                raise ValueError(f"calibrate: the inputs of {sites[key][2]} hold NaN or inf; nothing was replaced")
    # Every layer built first, then all put in place: an error or Ctrl-C during the searches leaves
    # the model as it was.
    built = {}
    for key, (linear, _, _) in sites.items():
        if linear.weight.is_meta:
            new = PowerQuantLinear(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size,
                                   device="meta")
        else:
            x = torch.cat(inputs.pop(key)).to(linear.weight.device) if inputs.get(key) else None
            new = PowerQuantLinear.from_linear(linear, bits, group_size, a, x=x, clip=clip)
        built[key] = new.train(originals[key].training)
    for key, (_, places, _) in sites.items():
        for (_, child_name), parent in places.items():
            setattr(parent, child_name, built[key])
    return model
