"""Pre-LN → Pre-RMSNorm → Pre-CRMSNorm conversion (lmkern.convert) of GPT-2, GPT-NeoX and lmkern's own
Transformer: the converted model is the same function as the original.

Reference: the original Pre-LN model itself, run in float64 (it never calls lmkern), and for lmkern's
own model also tests/reference/convert.py (the decoder and the recipe written from the formulas).
Error metric: max |Δ| / max |ref| over the logits (last_hidden_state for base models); float64 ≤ 1e-9,
float32 ≤ 1e-4. Every parameter, LayerNorm gains and biases included, is drawn at random (the models'
own initializations leave LayerNorms at γ=1, β=0, which would leave the folding untested).
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import lmkern
from lmkern import cli, convert
from lmkern.models import Transformer, TransformerConfig

from reference import convert as ref

try:
    import transformers as tf
except ImportError:  # e.g. the offline GPU machine: the Hugging Face tests skip, lmkern's own model still runs
    tf = None


def _hf():
    """transformers, or skip the calling test when it is not installed (the test extra installs it)."""
    if tf is None:
        pytest.skip("transformers is not installed (the test extra installs it)")
    return tf

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-9, F32: 1e-4}
VOCAB = 61
TARGETS = {"rms": convert.to_pre_rmsnorm, "crms": convert.to_pre_crmsnorm}
NORM_CLASS = {"rms": lmkern.nn.RMSNorm, "crms": lmkern.nn.CRMSNorm}


def gpt2_config(**kw):
    base = dict(vocab_size=VOCAB, n_positions=40, n_embd=24, n_layer=2, n_head=3, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return _hf().GPT2Config(**{**base, **kw})


def neox_config(**kw):
    base = dict(vocab_size=VOCAB, max_position_embeddings=40, hidden_size=24, num_hidden_layers=2,
                num_attention_heads=3, intermediate_size=40, hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return _hf().GPTNeoXConfig(**{**base, **kw})


# (id, class, config): several small configurations of each family.
HF_CASES = [
    ("gpt2-lm-tied", "GPT2LMHeadModel", lambda: gpt2_config()),
    ("gpt2-lm-ninner-odd", "GPT2LMHeadModel", lambda: gpt2_config(n_embd=15, n_head=5, n_inner=37, n_layer=3)),
    ("gpt2-lm-untied-scaled", "GPT2LMHeadModel",
     lambda: gpt2_config(tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True, activation_function="relu")),
    ("gpt2-base", "GPT2Model", lambda: gpt2_config(n_inner=20)),
    ("neox-lm-parallel-rot25", "GPTNeoXForCausalLM", lambda: neox_config(use_parallel_residual=True, rotary_pct=0.25)),
    ("neox-lm-sequential-rot50", "GPTNeoXForCausalLM", lambda: neox_config(use_parallel_residual=False, rotary_pct=0.5)),
    ("neox-lm-tied-nobias", "GPTNeoXForCausalLM",
     lambda: neox_config(tie_word_embeddings=True, attention_bias=False, rotary_pct=1.0, hidden_size=18, num_attention_heads=3)),
    ("neox-base-sequential", "GPTNeoXModel", lambda: neox_config(use_parallel_residual=False)),
    ("neox-base-parallel", "GPTNeoXModel", lambda: neox_config(use_parallel_residual=True, rotary_pct=0.5)),
]


def randomize_(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Every parameter redrawn: weights N(0, scale²); LayerNorm γ around 1 and β around 0, both random."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype)
            if p.dim() == 1 and name.endswith("weight"):  # a norm gain
                p.copy_(1.0 + 0.5 * noise)
            else:
                p.copy_(scale * noise)
    return model


def make_hf(cls_name: str, config, dtype=F64, seed: int = 0):
    model = getattr(_hf(), cls_name)(config)
    return randomize_(model.to(dtype), seed).eval()


def make_own(dtype=F64, seed: int = 0, **kw):
    cfg = TransformerConfig(**{**dict(vocab_size=VOCAB, d_model=24, n_layers=2, n_heads=3, max_len=40), **kw})
    return randomize_(Transformer(cfg).to(dtype), seed).eval()


def out_of(model, ids):
    with torch.no_grad():
        out = model(ids)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def rel_max(out, ref_out) -> float:
    out, ref_out = out.detach().to(F64), ref_out.detach().to(F64)
    assert out.shape == ref_out.shape
    return ((out - ref_out).abs().max() / ref_out.abs().max()).item()


def tokens(batch=2, length=13, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def stream_width(model) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.tok_emb
    return emb.weight.shape[1]


def check_structure(model, kind: str, d: int):
    """No LayerNorm left; every norm lmkern's of the target kind and width; the stream d (rms) or d−1 wide."""
    width = d - 1 if kind == "crms" else d
    mods = list(model.modules())
    assert not any(isinstance(m, nn.LayerNorm) for m in mods)
    norms = [m for m in mods if isinstance(m, (lmkern.nn.RMSNorm, lmkern.nn.CRMSNorm))]
    assert norms and all(type(m) is NORM_CLASS[kind] and m.normalized_shape == (width,) for m in norms)
    assert stream_width(model) == width


# ------------------------------------------------------------------------------------------------
# Hugging Face models: equivalence, generate, structure
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TARGETS))
@pytest.mark.parametrize("case", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_hf_float64_equivalent(case, kind):
    _, cls_name, config = case
    model = make_hf(cls_name, config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tokens()
    expected = out_of(model, ids)
    new = TARGETS[kind](model)
    assert type(new) is type(model)
    d = model.config.hidden_size
    check_structure(new, kind, d)
    assert new.config.lmkern_norm == kind and new.config.hidden_size == d
    assert rel_max(out_of(new, ids), expected) <= TOL[F64]
    # Batch of one and a length-1 sequence too.
    assert rel_max(out_of(new, ids[:1, :1]), out_of(model, ids[:1, :1])) <= TOL[F64]
    with torch.no_grad():  # the tuple form of the outputs (return_dict=False) as well
        assert rel_max(new(ids, return_dict=False)[0], model(ids, return_dict=False)[0]) <= TOL[F64]
    # The original is left as it was (a deep copy was converted).
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert getattr(model.config, "lmkern_norm", None) is None
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())


@pytest.mark.parametrize("kind", list(TARGETS))
@pytest.mark.parametrize("case", [c for c in HF_CASES if "lm" in c[0]], ids=[c[0] for c in HF_CASES if "lm" in c[0]])
def test_hf_float32_equivalent_and_generate(case, kind):
    _, cls_name, config = case
    model = make_hf(cls_name, config(), dtype=F32, seed=3)
    ids = tokens(seed=4)
    new = TARGETS[kind](model)
    assert next(new.parameters()).dtype == F32
    assert rel_max(out_of(new, ids), out_of(model, ids)) <= TOL[F32]
    # Greedy generation (uses the KV cache) gives the same tokens; float64 to rule out argmax ties.
    m64, n64 = make_hf(cls_name, config(), seed=3), None
    n64 = TARGETS[kind](m64)
    mask = torch.ones_like(ids)
    g_ref = m64.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    g_new = n64.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert g_ref.shape == (ids.shape[0], ids.shape[1] + 6)
    assert torch.equal(g_ref, g_new)


def test_gpt2_tied_head_is_untied():
    model = make_hf("GPT2LMHeadModel", gpt2_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    new = convert.to_pre_rmsnorm(model)
    assert new.lm_head.weight is not new.transformer.wte.weight
    assert new.config.tie_word_embeddings is False
    # wte is a writer (re-centered rows), lm_head a reader (ln_f folded in, with a bias).
    wte = new.transformer.wte.weight.detach()
    assert wte.mean(1).abs().max() < 1e-12 * wte.abs().max()
    assert new.lm_head.bias is not None


def test_inplace_converts_the_given_model():
    model = make_hf("GPTNeoXForCausalLM", neox_config())
    ids = tokens()
    expected = out_of(model, ids)
    new = convert.to_pre_crmsnorm(model, inplace=True)
    assert new is model
    assert rel_max(out_of(model, ids), expected) <= TOL[F64]


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TARGETS))
@pytest.mark.parametrize("cls_name,config", [
    ("GPT2LMHeadModel", lambda: gpt2_config(n_inner=30)), ("GPT2Model", gpt2_config),
    ("GPTNeoXForCausalLM", lambda: neox_config(attention_bias=False)), ("GPTNeoXModel", neox_config),
])
def test_hf_save_load(tmp_path, cls_name, config, kind):
    model = make_hf(cls_name, config())
    ids = tokens()
    expected = out_of(model, ids)
    new = TARGETS[kind](model)
    new.save_pretrained(tmp_path)
    loaded = convert.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert loaded.dtype == F64
    check_structure(loaded, kind, model.config.hidden_size)
    assert rel_max(out_of(loaded, ids), expected) <= TOL[F64]
    # Same weights; not bit-equal (GEMM rounding may depend on the buffers' alignment).
    assert rel_max(out_of(loaded, ids), out_of(new, ids)) <= 1e-13
    if hasattr(loaded, "lm_head"):
        assert loaded.lm_head.weight is not loaded.get_input_embeddings().weight
    # Saved again from the loaded model, and loaded again: still the same model.
    loaded.save_pretrained(tmp_path / "again")
    assert rel_max(out_of(convert.from_pretrained(tmp_path / "again"), ids), out_of(new, ids)) <= 1e-13


def test_from_pretrained_refuses_an_unconverted_dir(tmp_path):
    make_hf("GPT2LMHeadModel", gpt2_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds no lmkern-converted model"):
        convert.from_pretrained(tmp_path)


def test_plain_transformers_load_of_crms_dir_fails_loudly(tmp_path):
    convert.to_pre_crmsnorm(make_hf("GPT2LMHeadModel", gpt2_config())).save_pretrained(tmp_path)
    with pytest.raises(Exception, match="(?i)size|shape"):
        _hf().GPT2LMHeadModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------
# unsupported models and options
# ------------------------------------------------------------------------------------------------


def test_cross_attention_is_refused():
    model = make_hf("GPT2LMHeadModel", gpt2_config(add_cross_attention=True))
    for fn in TARGETS.values():
        with pytest.raises(convert.UnsupportedModelError, match="crossattention"):
            fn(model)


def test_unknown_class_and_unknown_module_are_named():
    model = _hf().GPT2ForSequenceClassification(gpt2_config(num_labels=3))
    with pytest.raises(convert.UnsupportedModelError, match="GPT2ForSequenceClassification"):
        convert.to_pre_rmsnorm(model)
    with pytest.raises(convert.UnsupportedModelError, match="unsupported model class"):
        convert.to_pre_crmsnorm(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))

    class Probe(_hf().GPT2LMHeadModel):  # a subclass with a module the converter does not know
        def __init__(self, config):
            super().__init__(config)
            self.extra_head = nn.Linear(config.n_embd, 2)

    with pytest.raises(convert.UnsupportedModelError, match="'extra_head' \\(Linear\\)"):
        convert.to_pre_rmsnorm(Probe(gpt2_config()))
    m = make_hf("GPTNeoXForCausalLM", neox_config())
    m.gpt_neox.layers[1].mlp.gate = nn.Linear(24, 24)
    with pytest.raises(convert.UnsupportedModelError, match="gpt_neox.layers.1.mlp.gate"):
        convert.to_pre_crmsnorm(m)
    with pytest.raises(TypeError, match="model"):
        convert.to_pre_rmsnorm("gpt2")


def test_converting_twice_is_refused():
    new = convert.to_pre_rmsnorm(make_hf("GPT2LMHeadModel", gpt2_config()))
    with pytest.raises(convert.UnsupportedModelError, match="converted already"):
        convert.to_pre_crmsnorm(new)


@pytest.mark.parametrize("kind", list(TARGETS))
def test_stream_dropout_in_train_mode_is_refused(kind):
    ids = tokens()
    for model in (make_hf("GPT2LMHeadModel", gpt2_config(resid_pdrop=0.1, embd_pdrop=0.1)),
                  make_hf("GPTNeoXForCausalLM", neox_config(hidden_dropout=0.1))):
        new = TARGETS[kind](model)
        assert rel_max(out_of(new, ids), out_of(model, ids)) <= TOL[F64]  # eval: dropout is off
        new.train()
        with pytest.raises(RuntimeError, match="dropout p=0.1 in the residual stream"):
            new(ids)
    # Attention-probability dropout stays inside a branch: training is allowed.
    new = TARGETS[kind](make_hf("GPT2LMHeadModel", gpt2_config(attn_pdrop=0.1))).train()
    assert torch.isfinite(new(ids).logits).all()


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


def _train(model, steps=4, seed=5):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = torch.randint(1, VOCAB, (2, 12), generator=gen)
        logits = out_of_train(model, ids)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def out_of_train(model, ids):
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("make", [lambda: make_hf("GPT2LMHeadModel", gpt2_config()),
                                  lambda: make_hf("GPTNeoXForCausalLM", neox_config()),
                                  lambda: make_own()], ids=["gpt2", "neox", "own"])
def test_recenter_writers_keeps_the_stream_zero_mean(make):
    ids = tokens()
    kept = _train(convert.to_pre_rmsnorm(make(), recenter_writers=True))
    assert convert.stream_mean(kept, ids) < 1e-12
    # The control: without the option the same steps move the stream off zero mean.
    drifted = _train(convert.to_pre_rmsnorm(make()))
    assert convert.stream_mean(drifted, ids) > 1e-4
    # recenter_ bakes the centering into the weights: the hooks then change nothing.
    before = out_of(kept, ids)
    convert.recenter_(kept)
    plain = copy.deepcopy(kept)
    for m in plain.modules():
        m._forward_hooks.clear()
    assert convert.stream_mean(plain, ids) < 1e-12
    assert rel_max(out_of(plain, ids), before) <= 1e-12


def test_recenter_writers_survives_save_load(tmp_path):
    model = convert.to_pre_rmsnorm(make_hf("GPT2LMHeadModel", gpt2_config()), recenter_writers=True)
    _train(model, steps=2)
    model.save_pretrained(tmp_path)
    loaded = convert.from_pretrained(tmp_path)
    assert loaded.config.lmkern_recenter is True
    ids = tokens()
    assert rel_max(out_of(loaded, ids), out_of(model, ids)) <= 1e-13
    assert convert.stream_mean(_train(loaded, steps=2), ids) < 1e-12


def test_crms_training_stays_a_zero_mean_model():
    """A trained CRMS model is still a Pre-RMSNorm model: expanding every writer to d rows (the dropped
    row is minus the sum of the others) and every reader to d columns (a zero last column) gives an
    RMS model of lmkern's own form with a zero-mean stream and the same logits."""
    crms = _train(convert.to_pre_crmsnorm(make_own()))
    s = {k: v.detach() for k, v in crms.state_dict().items()}
    cfg = crms.config
    full = {}
    for k, v in s.items():
        mod, _, what = k.rpartition(".")
        if mod in ("tok_emb", "pos_emb"):
            full[k] = torch.cat([v, -v.sum(1, keepdim=True)], 1)
        elif mod.endswith(("attn.proj", "mlp.fc2")):
            full[k] = torch.cat([v, -v.sum(0, keepdim=True)], 0)
        elif mod.endswith(("attn.qkv", "mlp.fc1")) or mod == "head":
            full[k] = torch.cat([v, torch.zeros_like(v[:, :1])], 1) if what == "weight" else v
        else:
            full[k] = v
    rms = Transformer(cfg.converted("rms")).to(F64).eval()
    rms.load_state_dict(full, strict=True)
    ids = tokens()
    assert convert.stream_mean(rms, ids) < 1e-12
    assert rel_max(out_of(crms, ids), out_of(rms, ids)) <= TOL[F64]


# ------------------------------------------------------------------------------------------------
# lmkern's own model
# ------------------------------------------------------------------------------------------------


@settings(max_examples=12)
@given(
    d=st.sampled_from([2, 3, 8, 17, 24]), heads_pick=st.integers(0, 3), layers=st.integers(1, 3),
    parallel=st.booleans(), tie=st.booleans(), d_ff=st.sampled_from([None, 1, 7]),
    batch=st.integers(1, 3), length=st.integers(1, 20), seed=st.integers(0, 2**16),
)
def test_own_model_equivalent_hypothesis(d, heads_pick, layers, parallel, tie, d_ff, batch, length, seed):
    heads = [h for h in range(1, d + 1) if d % h == 0][heads_pick % len([h for h in range(1, d + 1) if d % h == 0])]
    model = make_own(seed=seed, d_model=d, n_heads=heads, n_layers=layers, parallel_residual=parallel,
                     tie_embeddings=tie, d_ff=d_ff)
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    expected = out_of(model, ids)
    # The Pre-LN model itself against the decoder written from the formulas.
    assert rel_max(expected, ref.forward(model.state_dict(), model.config, ids, "layer")) <= 1e-12
    for kind, fn in TARGETS.items():
        new = fn(model)
        check_structure(new, kind, d)
        assert new.config.norm == kind and not new.config.tie_embeddings
        assert rel_max(out_of(new, ids), expected) <= TOL[F64]
        # The converted weights are the recipe's, and the converted model computes the paper's norms.
        want = ref.fold_reference(model.state_dict(), model.config, kind)
        got = new.state_dict()
        assert set(got) == set(want)
        assert all(rel_max(got[k], want[k]) <= 1e-12 for k in want if want[k].abs().max() > 0)
        assert rel_max(out_of(new, ids), ref.forward(got, new.config, ids, kind)) <= 1e-12


@pytest.mark.parametrize("kind", list(TARGETS))
def test_own_model_float32_generate_save_load(tmp_path, kind):
    model = make_own(dtype=F32, seed=7, parallel_residual=True)
    ids = tokens()
    new = TARGETS[kind](model)
    assert rel_max(out_of(new, ids), out_of(model, ids)) <= TOL[F32]
    m64 = make_own(seed=7, parallel_residual=True)
    assert torch.equal(m64.generate(ids, 5), TARGETS[kind](m64).generate(ids, 5))
    new.save_pretrained(tmp_path)
    loaded = convert.from_pretrained(tmp_path)
    assert type(loaded) is Transformer and loaded.config == new.config
    assert rel_max(out_of(loaded, ids), out_of(new, ids)) <= 1e-6


@pytest.mark.parametrize("kind", list(TARGETS))
def test_own_model_keeps_frozen_parameters(kind):
    """lmkern's Transformer is rebuilt by the conversion: frozen parameters stay frozen, and a bias
    the conversion adds follows its layer's weight."""
    for tie in (False, True):  # a tied head is untied by the conversion: it keeps the embedding's flag
        model = make_own(F32, 3, tie_embeddings=tie)
        frozen = [name for i, (name, _) in enumerate(model.named_parameters()) if i % 2 == 0]
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        new = TARGETS[kind](model)
        old = dict(model.named_parameters(remove_duplicate=False))
        for name, p in new.named_parameters():
            like = name if name in old else name[:-5] + ".weight"  # a bias the conversion added
            assert p.requires_grad == old[like].requires_grad, (tie, name)


def test_own_model_bad_input():
    with pytest.raises(ValueError, match="d_model"):
        TransformerConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="norm"):
        TransformerConfig(norm="batch")
    with pytest.raises(ValueError, match="recenter"):
        TransformerConfig(norm="crms", tie_embeddings=False, recenter=True)
    model = make_own()
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 41, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(TARGETS))
def test_cli_convert(tmp_path, kind):
    from lmkern import cli

    model = make_hf("GPTNeoXForCausalLM", neox_config(use_parallel_residual=False), dtype=F32)
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    rc = cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", kind])
    assert rc == 0
    assert (tmp_path / "dst" / "tokenizer_config.json").exists()
    loaded = convert.from_pretrained(tmp_path / "dst")
    assert type(loaded) is _hf().GPTNeoXForCausalLM and loaded.config.lmkern_norm == kind
    ids = tokens()
    assert rel_max(out_of(loaded, ids), out_of(model, ids)) <= TOL[F32]
    # lmkern's own model directory converts too.
    make_own(dtype=F32).save_pretrained(tmp_path / "own")
    assert cli.main(["convert", str(tmp_path / "own"), str(tmp_path / "own-out"), "--to", kind]) == 0
    assert convert.from_pretrained(tmp_path / "own-out").config.norm == kind


def test_cli_convert_errors(tmp_path, capsys, monkeypatch):
    from lmkern import cli

    _hf().GPT2LMHeadModel(gpt2_config(add_cross_attention=True)).save_pretrained(tmp_path / "x")
    assert cli.main(["convert", str(tmp_path / "x"), str(tmp_path / "y"), "--to", "rms"]) == 2
    assert "crossattention" in capsys.readouterr().err
    # A conversion that went wrong is caught by the check.
    make_own(dtype=F32).save_pretrained(tmp_path / "own")
    real = convert._fold_state_dict

    def broken(*args):
        state = real(*args)
        state["head.bias"] = state["head.bias"] + 1.0
        return state

    monkeypatch.setattr(convert, "_fold_state_dict", broken)
    assert cli.main(["convert", str(tmp_path / "own"), str(tmp_path / "bad"), "--to", "crms"]) == 1
    assert "differ" in capsys.readouterr().err and not (tmp_path / "bad").exists()  # nothing written
    monkeypatch.undo()
    # SRC not a directory, DST the same directory as SRC (it would overwrite the original), DST
    # not writable: one line, exit 2, SRC untouched.
    (tmp_path / "afile").write_text("")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "own").iterdir())
    for src, dst, match in [(tmp_path / "missing", tmp_path / "z", "no such directory"),
                            (tmp_path / "own", tmp_path / "own", "is SRC"),
                            (tmp_path / "own", tmp_path / "." / "own", "is SRC"),
                            (tmp_path / "own", tmp_path / "afile" / "out", "cannot write"),
                            (tmp_path / "own", tmp_path / "afile", "is a file")]:
        assert cli.main(["convert", str(src), str(dst), "--to", "rms"]) == 2, (src, dst)
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "own").iterdir()) == before


# ------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("kind", list(TARGETS))
@pytest.mark.parametrize("case", [HF_CASES[0], HF_CASES[4], HF_CASES[5]], ids=[HF_CASES[i][0] for i in (0, 4, 5)])
def test_cuda_equivalent(cuda_device, case, kind):
    _, cls_name, config = case
    model = make_hf(cls_name, config(), dtype=F32).to(cuda_device)
    ids = tokens().to(cuda_device)
    new = TARGETS[kind](model)  # the fold runs in float64 on the GPU
    assert next(new.parameters()).device.type == "cuda"
    assert rel_max(out_of(new, ids), out_of(model, ids)) <= TOL[F32]
    mask = torch.ones_like(ids)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False),
                       new.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False))


@pytest.mark.cuda
@pytest.mark.parametrize("kind", list(TARGETS))
def test_cuda_own_model(cuda_device, kind):
    model = make_own(dtype=F32).to(cuda_device)
    ids = tokens().to(cuda_device)
    assert rel_max(out_of(TARGETS[kind](model), ids), out_of(model, ids)) <= TOL[F32]


@pytest.mark.cuda
def test_cuda_bench_entries(cuda_device, tmp_path):
    """`lmkern bench --device cuda --op convert`: the float64 CPU reference meets the CUDA output."""
    from lmkern import cli

    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--device", "cuda", "--op", "convert", "--no-progress",
                     "--json", str(path)]) == 0
    assert path.read_text().count("convert") >= 2

# ------------------------------------------------------------------------------------------------
# Found by a mutation-testing audit of the Python layer (stop 26): each test was seen failing with
# a deliberate bug in the code it covers (a check dropped, an argument not passed on, ...).
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, error", [(F64, 1e-6), (F32, 1e-2)])
def test_convert_check_uses_the_dtypes_tolerance(tmp_path, capsys, monkeypatch, dtype, error):
    """A conversion off by `error` (relative) is over the dtype's tolerance (float64 1e-9, float32
    1e-4) but under the next looser one: the check must fail it."""
    make_own(dtype=dtype).save_pretrained(tmp_path / "own")
    real = convert._fold_state_dict

    def slightly_wrong(*args):
        state = real(*args)
        for key in ("head.weight", "head.bias"):  # the logits scaled by 1 + error
            state[key] = state[key] * (1 + error)
        return state

    monkeypatch.setattr(convert, "_fold_state_dict", slightly_wrong)
    assert cli.main(["convert", str(tmp_path / "own"), str(tmp_path / "bad"), "--to", "rms"]) == 1
    assert "differ" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_cli_convert_dtype_of_a_hf_model(tmp_path):
    from safetensors.torch import load_file

    make_hf("GPTNeoXForCausalLM", neox_config(use_parallel_residual=False), dtype=F32).save_pretrained(tmp_path / "src")
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "rms", "--dtype", "float64"]) == 0
    state = load_file(str(tmp_path / "dst" / "model.safetensors"))
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float64}


def test_cli_convert_dtype_of_an_own_model(tmp_path):
    make_own(dtype=F32).save_pretrained(tmp_path / "own")
    assert cli.main(["convert", str(tmp_path / "own"), str(tmp_path / "dst"), "--to", "crms", "--dtype", "float64"]) == 0
    state = torch.load(tmp_path / "dst" / "model.pt", weights_only=True)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float64}


def test_own_model_loads_in_its_saved_dtype(tmp_path):
    for dtype in (F64, torch.bfloat16):
        make_own(dtype=dtype).save_pretrained(tmp_path / str(dtype))
        assert {p.dtype for p in Transformer.from_pretrained(tmp_path / str(dtype)).parameters()} == {dtype}


def test_cli_convert_does_not_copy_the_original_weights(tmp_path):
    """Side files (tokenizer, ...) travel along; weight files of the original must not (a stale
    unconverted checkpoint next to the converted one)."""
    make_own(dtype=F32).save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    (tmp_path / "src" / "flax_model.msgpack").write_bytes(b"original weights")
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(b"original weights")
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "rms"]) == 0
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["lmkern_model.json", "model.pt", "tokenizer.json"]


def test_generate_past_max_len_reads_the_last_window():
    m = make_own(dtype=F32)  # max_len 40
    ids = torch.randint(0, 61, (1, 38), generator=torch.Generator().manual_seed(0))
    out = m.generate(ids, 5)
    assert out.shape == (1, 43) and torch.equal(out[:, :38], ids)
    assert torch.equal(out[:, 42], m(out[:, 2:42])[:, -1].argmax(-1))


def test_cli_refuses_recenter_writers_with_crms(tmp_path, capsys):
    make_own(dtype=F32).save_pretrained(tmp_path / "own")
    rc = cli.main(["convert", str(tmp_path / "own"), str(tmp_path / "dst"), "--to", "crms", "--recenter-writers"])
    assert rc == 2 and "--recenter-writers is for --to rms" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_own_model_converts_in_its_train_mode():
    assert convert.to_pre_rmsnorm(make_own(dtype=F32).eval()).training is False
    assert convert.to_pre_crmsnorm(make_own(dtype=F32).eval()).training is False


# A valid small TransformerConfig: the config checks below change one field of it.
SMALL_CONFIG = {"vocab_size": 61, "d_model": 16, "n_layers": 2, "n_heads": 2, "max_len": 40}


@pytest.mark.parametrize("field, value", [("vocab_size", 0), ("d_model", -1), ("n_layers", 0), ("n_heads", 2.0),
                                          ("max_len", True), ("d_ff", 0), ("d_ff", True), ("norm", "batch")])
def test_config_refuses_bad_fields(field, value):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        TransformerConfig(**{**SMALL_CONFIG, field: value})


def test_module_nested_inside_a_known_leaf_is_refused():
    # A module hung under a Linear that the per-block child checks never look inside: only the
    # whole-model named_modules() walk can see it, and converting past it would silently drop it.
    model = make_hf("GPT2LMHeadModel", gpt2_config())
    model.transformer.h[0].mlp.c_fc.adapter = nn.Linear(4, 4)
    with pytest.raises(convert.UnsupportedModelError, match=r"transformer\.h\.0\.mlp\.c_fc\.adapter"):
        convert.to_pre_rmsnorm(model)


def test_a_non_layernorm_at_a_norm_site_is_refused():
    # An RMSNorm has a weight and normalized_shape like a LayerNorm but no centering or bias:
    # folding it as if it were one would give a different function, so it must be refused.
    model = make_hf("GPT2LMHeadModel", gpt2_config())
    d = model.config.n_embd
    model.transformer.h[1].ln_2 = nn.RMSNorm(d, dtype=torch.float64)
    with pytest.raises(convert.UnsupportedModelError, match=r"'transformer\.h\.1\.ln_2' is a RMSNorm, not a LayerNorm"):
        convert.to_pre_rmsnorm(model)


def test_a_layernorm_over_the_wrong_shape_is_refused():
    model = make_hf("GPT2LMHeadModel", gpt2_config())
    d = model.config.n_embd
    model.transformer.h[0].ln_1 = nn.LayerNorm((1, d), dtype=torch.float64)
    with pytest.raises(convert.UnsupportedModelError, match=rf"'transformer\.h\.0\.ln_1' normalizes \(1, {d}\), expected \({d},\)"):
        convert.to_pre_rmsnorm(model)


@pytest.mark.parametrize("kw, match", [(dict(norm="crms", d_model=1, n_heads=1), "d_model: a Pre-CRMSNorm stream"),
                                       (dict(norm="layer", recenter=True), "recenter: only a Pre-RMSNorm"),
                                       (dict(norm="rms", tie_embeddings=True), "tie_embeddings: a converted model")])
def test_config_refuses_inconsistent_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**{**SMALL_CONFIG, "tie_embeddings": False, **kw})
