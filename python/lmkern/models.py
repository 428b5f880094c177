"""A small decoder-only Transformer of lmkern's own, in its Pre-LN, Pre-RMSNorm and Pre-CRMSNorm forms.

    cfg = TransformerConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4)
    model = Transformer(cfg)                          # Pre-LN (nn.LayerNorm), tied embeddings
    rms = lmkern.convert.to_pre_rmsnorm(model)        # same outputs, lmkern.nn.RMSNorm
    crms = lmkern.convert.to_pre_crmsnorm(model)      # same outputs, lmkern.nn.CRMSNorm, stream d−1

GPT-2 shaped: token and learned position embeddings, blocks of causal self-attention and a GELU MLP
each behind a norm (sequential, or both reading the same x with ``parallel_residual``), a final norm
and an LM head (tied to the token embedding in the Pre-LN form). No dropout. ``config.norm`` says
which form a model is: "layer", "rms" (norms without affine, readers with biases, untied head) or
"crms" (as rms, with a residual stream of width d_model − 1). Used by examples, tests and benches.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .nn.norm import CRMSNorm, RMSNorm

__all__ = ["TransformerConfig", "Transformer"]

_CONFIG_FILE = "lmkern_model.json"
_WEIGHTS_FILE = "model.pt"


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int | None = None  # default 4·d_model
    max_len: int = 128
    eps: float = 1e-5
    tie_embeddings: bool = True
    parallel_residual: bool = False
    norm: str = "layer"  # "layer", "rms" or "crms"
    recenter: bool = False  # rms only: re-center every stream writer's output on every forward

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1; got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={self.n_heads}; got {self.d_model}")
        if self.d_ff is not None and (isinstance(self.d_ff, bool) or not isinstance(self.d_ff, int) or self.d_ff < 1):
            raise ValueError(f"d_ff: expected None or an int >= 1; got {self.d_ff!r}")
        if self.norm not in ("layer", "rms", "crms"):
            raise ValueError(f"norm: expected 'layer', 'rms' or 'crms'; got {self.norm!r}")
        if self.norm == "crms" and self.d_model < 2:
            raise ValueError(f"d_model: a Pre-CRMSNorm stream is d_model − 1 wide, so d_model >= 2; got {self.d_model}")
        if self.recenter and self.norm != "rms":
            raise ValueError(f"recenter: only a Pre-RMSNorm model re-centers its writers; norm is {self.norm!r}")
        if self.tie_embeddings and self.norm != "layer":
            raise ValueError("tie_embeddings: a converted model has an untied head (the final norm is folded into it)")

    @property
    def ff(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def width(self) -> int:
        """The residual stream's width: d_model, or d_model − 1 for Pre-CRMSNorm."""
        return self.d_model - 1 if self.norm == "crms" else self.d_model

    def converted(self, norm: str, recenter: bool = False) -> "TransformerConfig":
        return replace(self, norm=norm, recenter=bool(recenter and norm == "rms"), tie_embeddings=False)


def _norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "layer":
        return nn.LayerNorm(cfg.d_model, eps=cfg.eps)
    cls = CRMSNorm if cfg.norm == "crms" else RMSNorm
    return cls(cfg.width, eps=cfg.eps, elementwise_affine=False)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.ff, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.ln1, self.attn, self.ln2, self.mlp = _norm(cfg), Attention(cfg), _norm(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            return x + self.attn(self.ln1(x)) + self.mlp(self.ln2(x))
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Decoder-only Transformer: ``forward(input_ids [batch, seq]) -> logits [batch, seq, vocab]``.
    dtypes: float32, float64 (CPU), bfloat16, float16; CPU and CUDA (the norms are lmkern's once converted)."""

    def __init__(self, config: TransformerConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = TransformerConfig(**kwargs)
        elif kwargs:
            config = replace(config, **kwargs)
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.width)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = _norm(cfg)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=cfg.norm != "layer")
        with torch.no_grad():  # GPT-2's initialization: N(0, 0.02), zero biases, LayerNorm γ=1, β=0
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, 0.02)
                    if getattr(m, "bias", None) is not None:
                        m.bias.zero_()
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        if cfg.recenter:
            from .convert import _install_hooks

            _install_hooks(self, self.stream_spec(), recenter=True)

    def stream_spec(self):
        """Where this model writes to and reads from its residual stream (for lmkern.convert)."""
        from .convert import Site, StreamSpec

        spec = StreamSpec(d=self.config.d_model, writers=["tok_emb", "pos_emb"], head="head")
        spec.known += ["", "blocks"]
        for i in range(len(self.blocks)):
            b = f"blocks.{i}"
            spec.known += [b, f"{b}.attn", f"{b}.mlp", f"{b}.mlp.act"]
            spec.sites += [Site(f"{b}.ln1", [f"{b}.attn.qkv"]), Site(f"{b}.ln2", [f"{b}.mlp.fc1"])]
            spec.writers += [f"{b}.attn.proj", f"{b}.mlp.fc2"]
        spec.sites.append(Site("ln_f", ["head"]))
        return spec

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids: expected an int64/int32 tensor; got {getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [batch, seq]; got {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        if t > self.config.max_len:
            raise ValueError(f"input_ids: sequence length {t} exceeds max_len={self.config.max_len}")
        pos = torch.arange(t, device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding (full recomputation each step): the prompt followed by max_new_tokens tokens."""
        for _ in range(max_new_tokens):
            nxt = self(input_ids[:, -self.config.max_len:])[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, nxt], dim=1)
        return input_ids

    # ---- save / load ----------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the config (lmkern_model.json) and the weights (model.pt) into directory `path`."""
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, _CONFIG_FILE), "w") as f:
            json.dump({"class": "lmkern.models.Transformer", "config": asdict(self.config)}, f, indent=1)
        torch.save(self.state_dict(), os.path.join(path, _WEIGHTS_FILE))

    @staticmethod
    def is_saved_dir(path) -> bool:
        return os.path.isfile(os.path.join(path, _CONFIG_FILE))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location="cpu", dtype: torch.dtype | None = None) -> "Transformer":
        """Load a model written by :meth:`save_pretrained` (any of its forms)."""
        if not cls.is_saved_dir(path):
            raise ValueError(f"path: expected a directory written by Transformer.save_pretrained; no {_CONFIG_FILE} in {path!r}")
        with open(os.path.join(path, _CONFIG_FILE)) as f:
            meta = json.load(f)
        model = cls(TransformerConfig(**meta["config"]))
        state = torch.load(os.path.join(path, _WEIGHTS_FILE), map_location=map_location, weights_only=True)
        model.to(dtype=next(iter(state.values())).dtype)
        model.load_state_dict(state, strict=True)
        return model if dtype is None else model.to(dtype=dtype)
