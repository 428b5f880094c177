"""Pre-LN → Pre-RMSNorm → Pre-CRMSNorm conversion of Transformer models (Jiang et al., NeurIPS 2023).

    model = lmkern.convert.to_pre_rmsnorm(model)     # every LayerNorm → lmkern.nn.RMSNorm
    model = lmkern.convert.to_pre_crmsnorm(model)    # every LayerNorm → lmkern.nn.CRMSNorm, stream d−1 wide

Supported: Hugging Face ``transformers`` GPT2Model, GPT2LMHeadModel, GPTNeoXModel, GPTNeoXForCausalLM
(Pythia), and lmkern's own :class:`lmkern.models.Transformer`. The converted model is of the same
class and its forward gives the same outputs, up to rounding (the algebra is done in float64):

1. each LayerNorm's gain γ and bias β are folded into the layers that read its output
   (``W ← W·diag(γ)``, ``b ← b + W·β``; a reader without a bias gets one), a tied LM head is untied;
2. every writer of the residual stream (token and position embeddings, each branch's output
   projection) is re-centered, so the stream is zero-mean and LayerNorm equals RMSNorm on it;
3. every LayerNorm becomes an RMSNorm without affine; for CRMS the last stream coordinate (always
   minus the sum of the others) is dropped from every writer and folded into every reader
   (``W' = W[:, :-1] − W[:, -1:]``), and every norm becomes a CRMSNorm of width d−1.

A base model (no LM head) has no layer to fold its final LayerNorm into: its final norm keeps γ and β
in a small :class:`OutputAffine` module (``lmkern_output``), applied to ``last_hidden_state``, which for
CRMS also restores the dropped coordinate, so the output stays d wide and equal to the original's.
Intermediate hidden states (``output_hidden_states``) are the converted stream, not the original.

Saving and loading: ``model.save_pretrained(dir)`` works as usual. The config keeps the original
hidden size (attention and MLP internals still use it) and records the conversion in
``config.lmkern_norm`` ("rms" or "crms"), ``config.lmkern_recenter`` and ``tie_word_embeddings=False``.
:func:`from_pretrained` reads it back: it builds the original class from the config, applies the same
module replacements and width changes (no arithmetic), then lets ``from_pretrained`` load the saved
weights into that structure. A plain ``GPT2LMHeadModel.from_pretrained(dir)`` cannot rebuild a
converted model (it would create LayerNorms of width d); use lmkern's.

Dropout: dropout in the residual stream (GPT-2's embd/resid dropout, GPT-NeoX's hidden dropout) does
not keep the stream zero-mean, so a converted model raises if it runs in train mode with such a
dropout p > 0; set those probabilities to 0 to train (attention-probability dropout is fine).

Training: with ``to_pre_rmsnorm(model, recenter_writers=True)`` every writer's output is re-centered on
every forward (the authors' ``LinearZeroMeanOutput``: gradients flow through the centering), so
optimizer steps keep the stream zero-mean. A CRMS model needs no such option: any d−1 vector is the
compressed form of a zero-mean vector, so its invariant holds whatever the weights.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .nn.norm import CRMSNorm, RMSNorm

__all__ = [
    "to_pre_rmsnorm", "to_pre_crmsnorm", "from_pretrained", "recenter_", "stream_mean",
    "UnsupportedModelError", "OutputAffine", "SUPPORTED",
]

#: The model classes the converter knows, by family.
SUPPORTED = ("GPT2Model", "GPT2LMHeadModel", "GPTNeoXModel", "GPTNeoXForCausalLM", "lmkern.models.Transformer")

KINDS = ("rms", "crms")


class UnsupportedModelError(ValueError):
    """The converter does not know this model, one of its modules, or one of its options."""


# --------------------------------------------------------------------------------------------------
# The map of a model's residual stream
# --------------------------------------------------------------------------------------------------


@dataclass
class Site:
    """One LayerNorm (module path) and the layers that read its output (empty: a base model's final norm)."""

    norm: str
    readers: list[str]


@dataclass
class StreamSpec:
    """Where a Pre-LN model writes to and reads from its residual stream of width ``d``."""

    d: int
    writers: list[str] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    dropouts: list[str] = field(default_factory=list)  # dropouts applied to what enters the stream
    known: list[str] = field(default_factory=list)  # every other module: containers, internals
    head: str | None = None  # the LM head (a reader), untied from the embedding
    output: str | None = None  # the base model's final norm, whose affine stays in OutputAffine


def _child_names(module: nn.Module) -> set[str]:
    return {n for n, _ in module.named_children()}


def _expect_children(path: str, module: nn.Module, expected: set[str], model: nn.Module) -> None:
    extra = _child_names(module) - expected
    if extra:
        name = sorted(extra)[0]
        full = f"{path}.{name}" if path else name
        sub = getattr(module, name)
        raise UnsupportedModelError(
            f"lmkern.convert: unsupported module '{full}' ({type(sub).__name__}) in {type(model).__name__}: "
            "the converter does not know how it touches the residual stream"
        )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _gpt2_spec(model) -> StreamSpec:
    from transformers import GPT2LMHeadModel

    cfg = model.config
    if getattr(cfg, "add_cross_attention", False):
        where = "transformer.h.0.crossattention" if isinstance(model, GPT2LMHeadModel) else "h.0.crossattention"
        raise UnsupportedModelError(
            f"lmkern.convert: unsupported module '{where}' (GPT2Attention with cross-attention, "
            "config.add_cross_attention=True): its encoder input does not live in the residual stream"
        )
    head = isinstance(model, GPT2LMHeadModel)
    p = "transformer" if head else ""
    base = model.transformer if head else model
    spec = StreamSpec(d=cfg.hidden_size)
    spec.known += ["", _join(p, "h")] + ([p] if p else [])
    if head:
        _expect_children("", model, {"transformer", "lm_head"}, model)
    _expect_children(p, base, {"wte", "wpe", "drop", "h", "ln_f"}, model)
    spec.writers += [_join(p, "wte"), _join(p, "wpe")]
    spec.dropouts.append(_join(p, "drop"))
    for i, block in enumerate(base.h):
        b = _join(p, f"h.{i}")
        _expect_children(b, block, {"ln_1", "attn", "ln_2", "mlp"}, model)
        _expect_children(f"{b}.attn", block.attn, {"c_attn", "c_proj", "attn_dropout", "resid_dropout"}, model)
        _expect_children(f"{b}.mlp", block.mlp, {"c_fc", "c_proj", "act", "dropout"}, model)
        spec.known += [b, f"{b}.attn", f"{b}.mlp", f"{b}.attn.attn_dropout", f"{b}.mlp.act"]
        spec.sites += [Site(f"{b}.ln_1", [f"{b}.attn.c_attn"]), Site(f"{b}.ln_2", [f"{b}.mlp.c_fc"])]
        spec.writers += [f"{b}.attn.c_proj", f"{b}.mlp.c_proj"]
        spec.dropouts += [f"{b}.attn.resid_dropout", f"{b}.mlp.dropout"]
    final = _join(p, "ln_f")
    if head:
        spec.sites.append(Site(final, ["lm_head"]))
        spec.head = "lm_head"
    else:
        spec.sites.append(Site(final, []))
        spec.output = final
    return spec


def _neox_spec(model) -> StreamSpec:
    from transformers import GPTNeoXForCausalLM

    cfg = model.config
    head = isinstance(model, GPTNeoXForCausalLM)
    p = "gpt_neox" if head else ""
    base = model.gpt_neox if head else model
    spec = StreamSpec(d=cfg.hidden_size)
    spec.known += ["", _join(p, "layers"), _join(p, "rotary_emb")] + ([p] if p else [])
    # transformers 5 names the head lm_head; 4.x named it embed_out.
    head_name = "embed_out" if head and hasattr(model, "embed_out") else "lm_head"
    if head:
        _expect_children("", model, {"gpt_neox", head_name}, model)
    _expect_children(p, base, {"embed_in", "emb_dropout", "layers", "final_layer_norm", "rotary_emb"}, model)
    spec.writers.append(_join(p, "embed_in"))
    spec.dropouts.append(_join(p, "emb_dropout"))
    for i, layer in enumerate(base.layers):
        b = _join(p, f"layers.{i}")
        _expect_children(b, layer, {"input_layernorm", "post_attention_layernorm", "post_attention_dropout",
                                    "post_mlp_dropout", "attention", "mlp"}, model)
        _expect_children(f"{b}.attention", layer.attention, {"query_key_value", "dense"}, model)
        _expect_children(f"{b}.mlp", layer.mlp, {"dense_h_to_4h", "dense_4h_to_h", "act"}, model)
        spec.known += [b, f"{b}.attention", f"{b}.mlp", f"{b}.mlp.act"]
        # With use_parallel_residual both norms read the same x; without, the second reads x + attn.
        # Either way each norm has one reader and each branch one writer: the fold is the same.
        spec.sites += [Site(f"{b}.input_layernorm", [f"{b}.attention.query_key_value"]),
                       Site(f"{b}.post_attention_layernorm", [f"{b}.mlp.dense_h_to_4h"])]
        spec.writers += [f"{b}.attention.dense", f"{b}.mlp.dense_4h_to_h"]
        spec.dropouts += [f"{b}.post_attention_dropout", f"{b}.post_mlp_dropout"]
    final = _join(p, "final_layer_norm")
    if head:
        spec.sites.append(Site(final, [head_name]))
        spec.head = head_name
    else:
        spec.sites.append(Site(final, []))
        spec.output = final
    return spec


def _own_spec(model) -> StreamSpec:
    return model.stream_spec()


def _family(model):
    """The spec builder for this model's class (its first known class in the MRO), or a clear error."""
    builders = {}
    try:
        import transformers as tf

        builders.update({tf.GPT2Model: _gpt2_spec, tf.GPT2LMHeadModel: _gpt2_spec,
                         tf.GPTNeoXModel: _neox_spec, tf.GPTNeoXForCausalLM: _neox_spec})
    except ImportError:  # transformers is optional: lmkern's own model converts without it
        pass
    from .models import Transformer

    builders[Transformer] = _own_spec
    for cls in type(model).__mro__:
        if cls in builders:
            return cls, builders[cls]
    raise UnsupportedModelError(
        f"lmkern.convert: unsupported model class {type(model).__name__}; supported: {', '.join(SUPPORTED)}"
    )


def stream_spec(model) -> StreamSpec:
    """The residual-stream map of a supported Pre-LN model, after checking that every module in it is
    known (else :class:`UnsupportedModelError` naming the first unknown module)."""
    _, build = _family(model)
    spec = build(model)
    known = set(spec.known) | set(spec.writers) | set(spec.dropouts) | {s.norm for s in spec.sites}
    known |= {r for s in spec.sites for r in s.readers}
    for name, module in model.named_modules():
        if name not in known:
            raise UnsupportedModelError(
                f"lmkern.convert: unsupported module '{name}' ({type(module).__name__}) in "
                f"{type(model).__name__}: the converter does not know how it touches the residual stream"
            )
    return spec


# --------------------------------------------------------------------------------------------------
# The algebra, in float64, on a state dict
# --------------------------------------------------------------------------------------------------


def _layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return "conv1d"  # transformers.pytorch_utils.Conv1D: weight is [in, out]
    raise UnsupportedModelError(f"lmkern.convert: unsupported layer type {type(module).__name__} in the stream")


def _get_w(sd, path, kind) -> torch.Tensor:
    """The weight as [out, in] in float64 (an embedding is a map from one-hot tokens: [d, vocab])."""
    w = sd[f"{path}.weight"].detach().to(torch.float64)
    return w if kind == "linear" else w.t()


def _put_w(w: torch.Tensor, kind) -> torch.Tensor:
    return w if kind == "linear" else w.t()


def _fold_state_dict(model: nn.Module, spec: StreamSpec, kind: str) -> dict[str, torch.Tensor]:
    """The converted model's state dict: the same keys, less the LayerNorms', plus reader biases and
    (base models) ``lmkern_output.*``; values computed in float64, cast back to each tensor's dtype."""
    sd = model.state_dict()
    out = {k: v.detach() for k, v in sd.items()}
    crms = kind == "crms"
    dtype = {k: v.dtype for k, v in sd.items()}
    modules = dict(model.named_modules())

    def store(path, w, b, like):
        k = _layer_kind(modules[path])
        out[f"{path}.weight"] = _put_w(w, k).to(dtype[like]).contiguous()
        if b is not None:
            out[f"{path}.bias"] = b.to(dtype[like]).contiguous()

    for site in spec.sites:
        ln = modules[site.norm]
        if not isinstance(ln, nn.LayerNorm):
            raise UnsupportedModelError(
                f"lmkern.convert: '{site.norm}' is a {type(ln).__name__}, not a LayerNorm "
                "(is this model converted already? convert the original Pre-LN model)"
            )
        if tuple(ln.normalized_shape) != (spec.d,):
            raise UnsupportedModelError(
                f"lmkern.convert: '{site.norm}' normalizes {tuple(ln.normalized_shape)}, expected ({spec.d},)"
            )
        g = sd[f"{site.norm}.weight"].detach().to(torch.float64) if ln.weight is not None else None
        beta = sd[f"{site.norm}.bias"].detach().to(torch.float64) if getattr(ln, "bias", None) is not None else None
        for key in ("weight", "bias"):
            out.pop(f"{site.norm}.{key}", None)
        if site.norm == spec.output:
            # The base model's final norm: its affine stays, after the norm (OutputAffine).
            like = f"{site.norm}.weight" if g is not None else None
            ref = sd[like] if like else next(iter(sd.values()))
            ones = torch.ones(spec.d, dtype=torch.float64, device=ref.device)
            out["lmkern_output.weight"] = (g if g is not None else ones).to(ref.dtype)
            out["lmkern_output.bias"] = (beta if beta is not None else ones * 0).to(ref.dtype)
        for r in site.readers:
            k = _layer_kind(modules[r])
            w = _get_w(sd, r, k)
            b = sd.get(f"{r}.bias")
            b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if b is None else b.detach().to(torch.float64)
            if beta is not None:
                b = b + w @ beta
            if g is not None:
                w = w * g
            if crms:
                w = w[:, :-1] - w[:, -1:]
            store(r, w, b, f"{r}.weight")
    for wr in spec.writers:
        k = _layer_kind(modules[wr])
        w = _get_w(sd, wr, k)
        b = sd.get(f"{wr}.bias")
        w = w - w.mean(0, keepdim=True)
        if b is not None:
            b = b.detach().to(torch.float64)
            b = b - b.mean()
        if crms:
            w = w[:-1]
            b = None if b is None else b[:-1]
        store(wr, w, b, f"{wr}.weight")
    return out


# --------------------------------------------------------------------------------------------------
# The structure: module replacements and width changes (shared by conversion and loading)
# --------------------------------------------------------------------------------------------------


class OutputAffine(nn.Module):
    """The affine of a base model's final LayerNorm, kept after its (C)RMSNorm: ``y·weight + bias``.
    For CRMS the input is d−1 wide and the dropped coordinate ``−Σy`` is appended first, so the output
    is the original d-wide hidden state."""

    def __init__(self, d: int, crms: bool, device=None, dtype=None):
        super().__init__()
        self.crms = crms
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.crms:
            y = torch.cat([y, -y.sum(-1, keepdim=True)], dim=-1)
        return torch.addcmul(self.bias, y, self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, crms={self.crms}"


def _apply_output_affine(module, args, output):
    """Forward hook of a converted base model: last_hidden_state ← lmkern_output(last_hidden_state)."""
    if isinstance(output, tuple):
        return (module.lmkern_output(output[0]),) + tuple(output[1:])
    output["last_hidden_state"] = module.lmkern_output(output["last_hidden_state"])
    return output


def _recenter_output(module, args, output):
    """Forward hook of a writer (training option): its output re-centered over the stream dimension,
    as if its weight and bias were (the authors' LinearZeroMeanOutput; gradients go through it)."""
    return output - output.mean(-1, keepdim=True)


def _refuse_stream_dropout(module, args):
    if module.training and module.p > 0:
        raise RuntimeError(
            f"lmkern.convert: dropout p={module.p} in the residual stream of a Pre-RMSNorm/CRMSNorm model "
            "does not keep the stream zero-mean; call model.eval(), or set the stream dropout "
            "probabilities to 0 (GPT-2: embd_pdrop, resid_pdrop; GPT-NeoX: hidden_dropout) to train"
        )


def _new_param(shape, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device), requires_grad=like.requires_grad)


def _resize(module: nn.Module, out_dim: int | None = None, in_dim: int | None = None, bias: bool = False) -> None:
    """Give a Linear / Conv1D / Embedding new (empty) parameters of [out_dim, in_dim] (None: unchanged),
    with a bias when `bias`. Values come afterwards from a state dict."""
    k = _layer_kind(module)
    w = module.weight
    out_old, in_old = (w.shape[0], w.shape[1]) if k == "linear" else (w.shape[1], w.shape[0])
    o = out_old if out_dim is None else out_dim
    i = in_old if in_dim is None else in_dim
    if (o, i) != (out_old, in_old):
        module.weight = _new_param((o, i) if k == "linear" else (i, o), w)
    if k == "linear":
        module.out_features, module.in_features = o, i
    elif k == "conv1d":
        module.nf, module.nx = o, i
    else:
        module.embedding_dim = o
    if k == "embedding":
        return
    if module.bias is None:
        if bias:
            module.bias = _new_param((o,), w)
    elif module.bias.shape[0] != o:
        module.bias = _new_param((o,), module.bias)


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _restructure(model: nn.Module, spec: StreamSpec, kind: str, recenter: bool) -> None:
    """Turn the Pre-LN structure described by `spec` into the Pre-(C)RMSNorm one, in place: norms
    replaced, widths changed, readers given biases, the head untied, hooks installed. Parameter values
    are left empty where shapes change; a state dict (converted or saved) fills them."""
    crms = kind == "crms"
    width = spec.d - 1 if crms else spec.d
    for site in spec.sites:
        ln = model.get_submodule(site.norm)
        ref = next(iter(model.parameters()))
        cls = CRMSNorm if crms else RMSNorm
        norm = cls(width, eps=float(ln.eps), elementwise_affine=False, device=ref.device, dtype=ref.dtype)
        _set(model, site.norm, norm)
        for r in site.readers:
            _resize(model.get_submodule(r), in_dim=width, bias=True)
    if spec.head is not None:
        head = model.get_submodule(spec.head)
        head.weight = _new_param(tuple(head.weight.shape), head.weight)  # untied from the embedding
    for wr in spec.writers:
        _resize(model.get_submodule(wr), out_dim=width)
    if spec.output is not None:
        ref = next(iter(model.parameters()))
        model.lmkern_output = OutputAffine(spec.d, crms, device=ref.device, dtype=ref.dtype)
        model.register_forward_hook(_apply_output_affine)
    _install_hooks(model, spec, recenter and not crms)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.lmkern_norm = kind
        cfg.lmkern_recenter = bool(recenter and not crms)
        if spec.head is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
            text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
            if text is not cfg and hasattr(text, "tie_word_embeddings"):
                text.tie_word_embeddings = False


def _install_hooks(model: nn.Module, spec: StreamSpec, recenter: bool) -> None:
    for d in spec.dropouts:
        model.get_submodule(d).register_forward_pre_hook(_refuse_stream_dropout)
    if recenter:
        for wr in spec.writers:
            model.get_submodule(wr).register_forward_hook(_recenter_output)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _convert(model: nn.Module, kind: str, recenter: bool, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module; got {type(model).__name__}")
    done = getattr(getattr(model, "config", None), "lmkern_norm", None)
    if done in KINDS:
        raise UnsupportedModelError(
            f"lmkern.convert: this {type(model).__name__} is converted already (lmkern_norm={done!r}); "
            "convert the original Pre-LN model"
        )
    spec = stream_spec(model)
    from .models import Transformer

    with torch.no_grad():
        state = _fold_state_dict(model, spec, kind)
        if isinstance(model, Transformer):
            new = type(model)(model.config.converted(kind, recenter)).to(
                device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
            new.load_state_dict(state, strict=True)
            new.train(model.training)
            # Frozen parameters stay frozen (a new bias follows its layer's weight). Hooks a user
            # put on the old modules are not carried over.
            # (remove_duplicate=False: a tied head is a name of its own there, untied here.)
            frozen = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
            for name, p in new.named_parameters():
                flag = frozen.get(name, frozen.get(name.rsplit(".", 1)[0] + ".weight"))
                if flag is not None:
                    p.requires_grad_(flag)
            return new
        if not inplace:
            model = copy.deepcopy(model)
        _restructure(model, spec, kind, recenter)
        model.load_state_dict(state, strict=True)
    return model


def to_pre_rmsnorm(model: nn.Module, *, recenter_writers: bool = False, inplace: bool = False) -> nn.Module:
    """Convert a Pre-LN model to Pre-RMSNorm: same class, same outputs (up to rounding).

    LayerNorm gains and biases are folded into the layers that read them (in float64, then cast back
    to each parameter's dtype), the stream writers re-centered, every LayerNorm replaced by an
    ``lmkern.nn.RMSNorm`` without affine. ``recenter_writers=True`` re-centers every writer's output on
    every forward, so training keeps the stream zero-mean (see the module docstring). ``inplace=True``
    converts the given Hugging Face model itself instead of a deep copy (lmkern's own Transformer is
    always rebuilt from its converted config: its parameters keep their requires_grad, hooks on its
    modules are not carried over). Costs to know: a tied LM head is untied (GPT-2 small:
    +38.6M parameters) and gets a bias (the final LayerNorm's β), see BENCHMARKS.md. Works for models on any
    device and of any floating dtype lmkern's norms take (float64 on CPU only).
    Raises :class:`UnsupportedModelError` (a ValueError) naming the module it does not know.
    """
    return _convert(model, "rms", recenter_writers, inplace)


def to_pre_crmsnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Convert a Pre-LN model to Pre-CRMSNorm: as :func:`to_pre_rmsnorm`, then the last stream
    coordinate is dropped from every writer and folded into every reader, every norm is an
    ``lmkern.nn.CRMSNorm`` and the residual stream is d−1 wide (the config's hidden size stays d: the
    attention and MLP internals keep their widths). Training needs no re-centering option."""
    return _convert(model, "crms", False, inplace)


def _skeleton_class(cls):
    """A subclass of `cls` whose __init__ builds the converted structure its config records, so
    ``from_pretrained`` loads the saved weights into the right shapes."""

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        _restructure(self, stream_spec(self), config.lmkern_norm, bool(getattr(config, "lmkern_recenter", False)))

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def from_pretrained(path: str | os.PathLike, model_class=None, **kwargs) -> nn.Module:
    """Load a model that a conversion saved with ``save_pretrained`` (or ``lmkern convert`` wrote).

    `model_class`: the transformers class to build (default: the config's ``architectures[0]``);
    other keyword arguments go to its ``from_pretrained`` (dtype, device_map, ...). A directory of
    lmkern's own model (:meth:`lmkern.models.Transformer.save_pretrained`) loads too. Returns a model of
    that class with lmkern norms, equal to the one saved."""
    from .models import Transformer

    path = os.fspath(path)
    if Transformer.is_saved_dir(path):
        return Transformer.from_pretrained(path, **kwargs)
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("lmkern.convert.from_pretrained needs `transformers` (pip install lmkern[hf])") from e
    config = transformers.AutoConfig.from_pretrained(path)
    kind = getattr(config, "lmkern_norm", None)
    if kind not in KINDS:
        raise ValueError(
            f"path: {path!r} holds no lmkern-converted model (its config has lmkern_norm={kind!r}); "
            "load it with transformers, or convert it with lmkern.convert / `lmkern convert`"
        )
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        if not archs or not hasattr(transformers, archs[0]):
            raise ValueError(f"path: cannot tell the model class of {path!r} (architectures={archs!r}); pass model_class")
        model_class = getattr(transformers, archs[0])
    skeleton = _skeleton_class(model_class)
    model = skeleton.from_pretrained(path, config=config, **kwargs)
    model.__class__ = model_class  # the skeleton adds no state: the loaded model is of the original class
    return model


def _writers(model: nn.Module) -> list[nn.Module]:
    from .models import Transformer

    if isinstance(model, Transformer):
        spec = model.stream_spec()
    else:
        kind = getattr(model.config, "lmkern_norm", None)
        if kind is None:
            raise ValueError("model: expected a model converted by lmkern.convert")
        cls, build = _family(model)
        spec = build(model)
    return [model.get_submodule(w) for w in spec.writers]


@torch.no_grad()
def recenter_(model: nn.Module) -> nn.Module:
    """Re-center every stream writer's weight (and bias) in place, so a Pre-RMSNorm model trained
    with ``recenter_writers=True`` computes the same without the hooks. Returns the model."""
    for m in _writers(model):
        k = _layer_kind(m)
        if k == "linear":
            m.weight.sub_(m.weight.mean(0, keepdim=True))
        else:
            m.weight.sub_(m.weight.mean(1, keepdim=True))
        if getattr(m, "bias", None) is not None:
            m.bias.sub_(m.bias.mean())
    return model


def stream_mean(model: nn.Module, *args, **kwargs) -> float:
    """Run ``model(*args, **kwargs)`` and return the largest |mean over the hidden dimension| /
    RMS of the residual stream seen at the input of any norm (0 for a zero-mean stream; for CRMS the
    implied full vector is zero-mean by construction, so this measures the stored d−1 entries'
    mean relative to their RMS and is not expected to be small)."""
    worst = 0.0

    def hook(module, args):
        nonlocal worst
        x = args[0].detach().to(torch.float64)
        rms = x.square().mean(-1).sqrt().clamp_min(1e-300)
        worst = max(worst, (x.mean(-1).abs() / rms).max().item() if x.numel() else 0.0)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, (RMSNorm, CRMSNorm, nn.LayerNorm))]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return worst


# --------------------------------------------------------------------------------------------------
# `lmkern convert`
# --------------------------------------------------------------------------------------------------

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")


def _load_original(src: str, dtype):
    from .models import Transformer

    if Transformer.is_saved_dir(src):
        return Transformer.from_pretrained(src, dtype=dtype)
    try:
        import transformers
    except ImportError as e:
        raise ImportError("`lmkern convert` of a Hugging Face model needs transformers (pip install lmkern[hf])") from e
    config = transformers.AutoConfig.from_pretrained(src)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise UnsupportedModelError(f"lmkern convert: cannot tell the model class of {src!r} (architectures={archs!r})")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return cls.from_pretrained(src, **kwargs)


def _logits(model, ids):
    out = model(ids)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def cli_main(args) -> int:
    """`lmkern convert SRC DST --to rms|crms`: 0 on success, 1 when the check fails (nothing written),
    2 when SRC cannot be read or converted or DST cannot be written."""
    import shutil
    import sys

    if not os.path.isdir(args.src):
        print(f"lmkern convert: SRC {args.src!r}: no such directory (a directory written by save_pretrained)", file=sys.stderr)
        return 2
    if os.path.exists(args.dst) and not os.path.isdir(args.dst):
        print(f"lmkern convert: DST {args.dst!r} is a file; the converted model is a directory", file=sys.stderr)
        return 2
    if os.path.exists(args.dst) and os.path.samefile(args.src, args.dst):
        print(f"lmkern convert: DST {args.dst!r} is SRC: write the converted model to another directory", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model = _load_original(args.src, dtype).eval()
        if args.to == "rms":
            new = to_pre_rmsnorm(model, recenter_writers=args.recenter_writers)
        else:
            if args.recenter_writers:
                print("lmkern convert: --recenter-writers is for --to rms (a CRMS stream needs none)", file=sys.stderr)
                return 2
            new = to_pre_crmsnorm(model)
    except (UnsupportedModelError, ValueError, OSError, ImportError) as e:
        print(f"lmkern convert: {e}", file=sys.stderr)
        return 2
    worst = None
    if not args.no_check:
        cfg = model.config
        vocab = getattr(cfg, "vocab_size", 2)
        length = min(16, getattr(cfg, "max_len", None) or getattr(cfg, "max_position_embeddings", None) or 16)
        ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))
        ids = ids.to(next(model.parameters()).device)
        with torch.no_grad():
            ref, out = _logits(model, ids).double(), _logits(new.eval(), ids).double()
        worst = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()
    kind = "Pre-RMSNorm" if args.to == "rms" else "Pre-CRMSNorm"
    if worst is not None:
        tol = {torch.float64: 1e-9}.get(next(new.parameters()).dtype, 1e-4 if next(new.parameters()).dtype == torch.float32 else 5e-2)
        print(f"check: max |Δ| / max |ref| of the outputs on random tokens = {worst:.2e} (tolerance {tol:.0e})")
        if not worst <= tol:
            print(f"lmkern convert: the converted model's outputs differ from the original's; {args.dst} not written"
                  " (--no-check writes it anyway)", file=sys.stderr)
            return 1
    try:
        new.save_pretrained(args.dst)
        # Tokenizer and other side files travel along; weights and configs were written anew.
        for name in sorted(os.listdir(args.src)):
            s, d = os.path.join(args.src, name), os.path.join(args.dst, name)
            if os.path.isfile(s) and not os.path.exists(d) and not name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(s, d)
    except OSError as e:
        print(f"lmkern convert: DST {args.dst!r}: cannot write: {e}", file=sys.stderr)
        return 2
    print(f"{type(new).__name__} → {kind}: written to {args.dst}")
    return 0


# --------------------------------------------------------------------------------------------------
# `lmkern bench` entries: a converted lmkern.models.Transformer against its Pre-LN original
# --------------------------------------------------------------------------------------------------


def bench_entries(BenchOp) -> list:
    """Registry entries for lmkern.bench: the forward of lmkern's own Transformer converted to
    Pre-RMSNorm / Pre-CRMSNorm (lmkern) vs the Pre-LN original (peer), checked against the original
    run in float64. A case's shape is (tokens, d_model); 2 layers, vocab 512, batch 1."""
    from .models import Transformer, TransformerConfig

    def cases(device, quick):
        return [((128, 128), torch.float32)] if quick else [((512, 256), torch.float32), ((512, 255), torch.float32)]

    def make_for(kind):
        def make(shape, dtype, device, gen):
            t, d = shape
            heads = next(h for h in (4, 3, 5, 1) if d % h == 0)
            cfg = TransformerConfig(vocab_size=512, d_model=d, n_layers=2, n_heads=heads, max_len=t)
            model = Transformer(cfg)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, p in model.named_parameters():  # random LayerNorm affine too
                    noise = torch.randn(p.shape, generator=g)
                    p.copy_(1 + 0.2 * noise if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")) else 0.05 * noise)
            model = model.to(device=device, dtype=dtype).eval()
            new = (to_pre_rmsnorm if kind == "rms" else to_pre_crmsnorm)(model).eval()
            ids = torch.randint(0, cfg.vocab_size, (1, t), generator=torch.Generator().manual_seed(0)).to(device)
            return {"model": model, "new": new, "ids": ids}

        return make

    def run(key):
        def f(d):
            with torch.no_grad():
                return (d[key](d["ids"])[0],)

        return f

    def reference(d, rows):
        if "ref" not in d:  # the Pre-LN original in float64 on the CPU, once
            m64 = copy.deepcopy(d["model"]).to(device="cpu", dtype=torch.float64)
            with torch.no_grad():
                d["ref"] = m64(d["ids"].cpu())[0].to(d["ids"].device)  # compared on the run's device
        return (d["ref"][rows],)

    return [BenchOp(f"convert {kind}", "fwd", "Pre-LN model", make_for(kind), run("new"), run("model"), reference, cases)
            for kind in KINDS]
