"""float64 references for the Pre-LN → Pre-RMSNorm → Pre-CRMSNorm conversion (PAPERS.md §1).

Written from the formulas in plain torch float64 ops, never calling lmkern:

    forward(state, cfg, ids, norm)   the decoder of lmkern.models.Transformer read from its state dict,
                                     with the norm of its form:
        layer  (x − mean x) / sqrt(var x + eps) · γ + β
        rms    x / sqrt(mean x² + eps)                           (no affine: folded)
        crms   x / sqrt((Σx² + (Σx)²) / (n + 1) + eps)           (x: the first n = d − 1 entries)
    fold_reference(state, cfg, kind) the conversion written out once more, layer by layer, from the
                                     recipe (fold γ, β into readers; center writers; drop/fold the
                                     last coordinate), for the state dict of a Pre-LN Transformer.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def _norm(x, state, prefix, eps, norm):
    if norm == "layer":
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * state[f"{prefix}.weight"] + state[f"{prefix}.bias"]
    if norm == "rms":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    n = x.shape[-1]
    return x / torch.sqrt(((x * x).sum(-1, keepdim=True) + x.sum(-1, keepdim=True) ** 2) / (n + 1) + eps)


def _linear(x, state, prefix):
    y = x @ state[f"{prefix}.weight"].T
    b = state.get(f"{prefix}.bias")
    return y if b is None else y + b


def _attention(x, state, prefix, n_heads):
    b, t, _ = x.shape
    qkv = _linear(x, state, f"{prefix}.qkv")
    d = qkv.shape[-1] // 3
    hd = d // n_heads
    q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, t, n_heads, hd).transpose(1, 2) for i in range(3))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    y = torch.softmax(scores, -1) @ v
    return _linear(y.transpose(1, 2).reshape(b, t, d), state, f"{prefix}.proj")


def _mlp(x, state, prefix):
    h = _linear(x, state, f"{prefix}.fc1")
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    return _linear(h, state, f"{prefix}.fc2")


def forward(state: dict, cfg, ids: torch.Tensor, norm: str) -> torch.Tensor:
    """Logits of lmkern.models.Transformer (state dict `state`, config `cfg`) in float64."""
    s = {k: v.detach().to(F64).cpu() for k, v in state.items()}
    ids = ids.cpu()
    t = ids.shape[1]
    x = s["tok_emb.weight"][ids] + s["pos_emb.weight"][torch.arange(t)]
    for i in range(cfg.n_layers):
        p = f"blocks.{i}"
        if cfg.parallel_residual:
            x = x + _attention(_norm(x, s, f"{p}.ln1", cfg.eps, norm), s, f"{p}.attn", cfg.n_heads) \
                + _mlp(_norm(x, s, f"{p}.ln2", cfg.eps, norm), s, f"{p}.mlp")
        else:
            x = x + _attention(_norm(x, s, f"{p}.ln1", cfg.eps, norm), s, f"{p}.attn", cfg.n_heads)
            x = x + _mlp(_norm(x, s, f"{p}.ln2", cfg.eps, norm), s, f"{p}.mlp")
    return _linear(_norm(x, s, "ln_f", cfg.eps, norm), s, "head")


def fold_reference(state: dict, cfg, kind: str) -> dict:
    """The converted state dict of a Pre-LN lmkern.models.Transformer, in float64, from the recipe."""
    s = {k: v.detach().to(F64).cpu().clone() for k, v in state.items()}
    out = {}
    readers = {"ln_f": "head"}
    for i in range(cfg.n_layers):
        readers[f"blocks.{i}.ln1"] = f"blocks.{i}.attn.qkv"
        readers[f"blocks.{i}.ln2"] = f"blocks.{i}.mlp.fc1"
    writers = ["tok_emb", "pos_emb"] + [f"blocks.{i}.{w}" for i in range(cfg.n_layers) for w in ("attn.proj", "mlp.fc2")]
    for k, v in s.items():
        if k.rsplit(".", 1)[0] not in readers:
            out[k] = v
    for ln, r in readers.items():
        g, beta = s[f"{ln}.weight"], s[f"{ln}.bias"]
        w = s[f"{r}.weight"]  # [out, d]
        b = s.get(f"{r}.bias", torch.zeros(w.shape[0], dtype=F64))
        b = b + w @ beta
        w = w * g[None, :]
        if kind == "crms":
            w = w[:, :-1] - w[:, -1:]
        out[f"{r}.weight"], out[f"{r}.bias"] = w, b
    for wr in writers:
        if wr.endswith("_emb"):
            e = s[f"{wr}.weight"]  # [rows, d]
            e = e - e.mean(1, keepdim=True)
            out[f"{wr}.weight"] = e[:, :-1] if kind == "crms" else e
        else:
            w, b = s[f"{wr}.weight"], s[f"{wr}.bias"]  # [d, in], [d]
            w, b = w - w.mean(0, keepdim=True), b - b.mean()
            out[f"{wr}.weight"], out[f"{wr}.bias"] = (w[:-1], b[:-1]) if kind == "crms" else (w, b)
    return out
