"""Structure discovery on Hugging Face transformers models built from tiny configs (random init, no downloads).

Each model: discover from its ``torch.export`` graph, permute every group at random, and the outputs stay the
same (float64, tight tolerance; every norm affine and bias randomised so a wrongly permuted one shows). The
groups must cover the hidden axes we expect and move attention heads as blocks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mergelab.structure import Structure, discover_structure, permute, random_permutations

transformers = pytest.importorskip("transformers")
import _hf_tiny  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB, TOKENS = _hf_tiny.VOCAB, _hf_tiny.TOKENS


def _randomize_vectors(model: nn.Module, seed: int = 0) -> None:
    """Non-constant norm affines and biases: a permutation that misses one of them changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + 1.0)


def _logits(out: object) -> torch.Tensor:
    return (
        out
        if isinstance(out, torch.Tensor)
        else out.logits
        if getattr(out, "logits", None) is not None
        else out[0]
    )


def _check(model: nn.Module, inputs: dict[str, torch.Tensor], seed: int = 0, tol: float = 1e-9) -> Structure:
    model = model.double().eval()
    _randomize_vectors(model, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = discover_structure(model, inputs)
        twin = permute(model, s, random_permutations(s, seed + 1))
        with torch.no_grad():
            y, y2 = _logits(model(**inputs)), _logits(twin(**inputs))
    torch.testing.assert_close(y2, y, rtol=tol, atol=tol / 10)
    assert len(s) > 0
    return s


def _ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, TOKENS), generator=torch.Generator().manual_seed(0))


def _covered(s: Structure) -> set[tuple[str, int]]:
    return {(a.param, a.dim) for g in s for a in g.axes}


def _heads(s: Structure, param: str) -> tuple[str, str]:
    """The tie holding the (first) group with ``param``'s output axis: (query/key, value/output)."""
    g = next(g for g in s if any(a.param == param and a.role == "out" for a in g.axes))
    return s.tie_of(g.name)


def test_gpt2_lm_head_tied_embeddings_conv1d() -> None:
    s = _check(_hf_tiny.gpt2(), {"input_ids": _ids()})
    assert s.coverage() == 1.0
    stream = s["transformer.wte"]
    params = {(a.param, a.dim) for a in stream.axes}
    # the residual stream: tied embedding/lm_head, position embedding, every LayerNorm, Conv1D (in, out) weights
    assert {
        ("transformer.wte.weight", 1),
        ("lm_head.weight", 1),
        ("transformer.wpe.weight", 1),
        ("transformer.ln_f.weight", 0),
        ("transformer.h.1.attn.c_attn.weight", 0),
        ("transformer.h.1.mlp.c_proj.weight", 1),
    } <= params
    for i in range(2):
        qk, vo = _heads(s, f"transformer.h.{i}.attn.c_attn.weight")
        assert s[qk].blocks == s[vo].blocks == 2 and s[qk].size == s[vo].size == 16
        # q and k are two slices of c_attn's output axis in one group; v is the third
        assert sorted(a.start for a in s[qk].axes if a.param == f"transformer.h.{i}.attn.c_attn.weight") == [
            0,
            16,
        ]
        assert (f"transformer.h.{i}.mlp.c_fc.weight", 1) in _covered(s)


def test_bert_sequence_classification() -> None:
    mask = torch.ones(2, TOKENS, dtype=torch.long)
    mask[1, -2:] = 0
    s = _check(_hf_tiny.bert(), {"input_ids": _ids(), "attention_mask": mask})
    assert s.coverage() == 1.0
    qk, vo = _heads(s, "bert.encoder.layer.0.attention.self.query.weight")
    assert s[qk].blocks == s[vo].blocks == 4
    assert ("bert.encoder.layer.0.attention.self.key.weight", 0) in {(a.param, a.dim) for a in s[qk].axes}
    assert {
        ("bert.embeddings.word_embeddings.weight", 1),
        ("bert.embeddings.position_embeddings.weight", 1),
        ("bert.embeddings.token_type_embeddings.weight", 1),
        ("bert.pooler.dense.weight", 0),
        ("bert.encoder.layer.1.intermediate.dense.weight", 0),
    } <= _covered(s)


def test_llama_grouped_query_attention_rotary_swiglu() -> None:
    heads, kv_heads, dim = 4, 2, 32
    # LlamaRMSNorm computes its statistics in float32 whatever the model dtype: round-off ~1e-7
    s = _check(_hf_tiny.llama_gqa(heads, kv_heads, dim), {"input_ids": _ids()}, tol=1e-6)
    assert s.coverage() == 1.0
    head_dim = dim // heads
    for i in range(2):
        a = f"model.layers.{i}.self_attn"
        # rotary embeddings rotate pairs of q/k dims by position: only whole heads move. With GQA, a key/value
        # head moves together with its group of query heads.
        (g,) = [g for g in s if any(x.param == f"{a}.k_proj.weight" and x.role == "out" for x in g.axes)]
        assert g.size == kv_heads
        inner = {(x.param, x.dim): x.inner for x in g.axes}
        assert inner[(f"{a}.k_proj.weight", 0)] == head_dim
        assert inner[(f"{a}.v_proj.weight", 0)] == head_dim
        assert inner[(f"{a}.q_proj.weight", 0)] == head_dim * heads // kv_heads
        assert inner[(f"{a}.o_proj.weight", 1)] == head_dim * heads // kv_heads
        # SwiGLU: gate and up projections share their units
        gate = f"model.layers.{i}.mlp.gate_proj.weight"
        (mlp,) = [g for g in s if any(x.param == gate and x.role == "out" for x in g.axes)]
        assert (f"model.layers.{i}.mlp.up_proj.weight", 0) in {(x.param, x.dim) for x in mlp.axes}
    assert ("model.norm.weight", 0) in _covered(s) and ("lm_head.weight", 1) in _covered(s)


def test_t5_encoder_relative_position_bias_follows_heads() -> None:
    model = _hf_tiny.t5_encoder()
    s = _check(model, {"input_ids": _ids()})
    # the encoder returns its hidden states, so the residual stream is the output and stays in place
    assert all(not f.hidden for f in s.fixed)
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    (table,) = [g for g in s if any(a.param == bias for a in g.axes)]
    assert table.size == table.blocks == 4
    # layer 0's bias table is shared by every layer, so one head permutation runs through all of them
    tie = s.tie_of(table.name)
    assert any("block.0." in n and n.endswith(".q") for n in tie) and any("block.1." in n for n in tie)


def test_vit_image_classification() -> None:
    model = _hf_tiny.vit()
    model.eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = _check(model, {"pixel_values": x})
    assert s.coverage() == 1.0
    assert {
        ("vit.embeddings.cls_token", 2),
        ("vit.embeddings.position_embeddings", 2),
        ("vit.embeddings.patch_embeddings.projection.weight", 0),
        ("classifier.weight", 1),
    } <= _covered(s)
    names = [n for g in s for n in s.tie_of(g.name) if len(s.tie_of(g.name)) == 2]
    assert len(set(names)) == 4  # two layers, each a (query/key, value/output) tie


def test_activation_statistics_on_gpt2() -> None:
    """Probes are module hooks, so activation matching runs on the eager transformers model."""
    from mergelab.match.activation_matching import match_activations

    torch.manual_seed(0)
    model = _hf_tiny.gpt2(n_layer=1).eval()
    ids = torch.randint(0, VOCAB, (16, TOKENS), generator=torch.Generator().manual_seed(1))
    s = discover_structure(model, (ids[:2],))
    perms = random_permutations(s, 0)
    twin = permute(model, s, perms)
    al = match_activations(s, [model, twin], [ids[:8], ids[8:]])
    for g in s:
        assert torch.equal(al.perms[1][g.name][perms[g.name]], torch.arange(g.size)), g.name
