"""Tiny Hugging Face transformers models (random init, no downloads) shared by the real-architecture tests."""

from __future__ import annotations

import torch
import transformers
from torch import nn

VOCAB, TOKENS = 40, 7


def ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, TOKENS), generator=torch.Generator().manual_seed(0))


def gpt2(n_layer: int = 2) -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=n_layer, n_head=2, use_cache=False
    )
    return transformers.GPT2LMHeadModel(cfg)


def bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg)


def llama_gqa(heads: int = 4, kv_heads: int = 2, dim: int = 32) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=dim,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=40,
        max_position_embeddings=16,
        use_cache=False,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def t5_encoder() -> nn.Module:
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4)
    return transformers.T5EncoderModel(cfg)


def vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=3,
    )
    return transformers.ViTForImageClassification(cfg)
