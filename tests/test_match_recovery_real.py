"""Weight matching undoes a hidden permutation on the real-architecture patterns discovery supports.

The companion of ``test_match_recovery.py`` for Hugging Face transformers configs (GPT-2, BERT, Llama with GQA and
rotary, T5 encoder, ViT) and the hand-written timm/torchvision patterns of ``test_discover_patterns.py``: a model
merged with a randomly permuted copy of itself by ``weight_matching`` is the model again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _cnn_nets import randomize_norms
from test_discover_patterns import (
    ChunkAttention,
    ConvNeXtLike,
    MobileNetLike,
    PackedAttention,
    RegNetLike,
    ShuffleNetLike,
    SwinLike,
    TimmViT,
    TinyLM,
)
from test_match_recovery import assert_recovers
from torch import nn

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 40
Inputs = dict[str, torch.Tensor]


def _ids(batch: int = 2, tokens: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(0))


def _hf(make: Callable[[], nn.Module], inputs: Callable[[], Inputs]) -> Callable[[], tuple[nn.Module, Any]]:
    return lambda: (make(), inputs())


def _plain(
    make: Callable[[], nn.Module], x: Callable[[], torch.Tensor]
) -> Callable[[], tuple[nn.Module, Any]]:
    return lambda: (make(), x())


_T = transformers
REAL_MODELS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "hf-gpt2": _hf(
        lambda: _T.GPT2LMHeadModel(
            _T.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, use_cache=False)
        ),
        lambda: {"input_ids": _ids()},
    ),
    "hf-bert": _hf(
        lambda: _T.BertForSequenceClassification(
            _T.BertConfig(
                vocab_size=VOCAB,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=24,
                max_position_embeddings=16,
                num_labels=3,
            )
        ),
        lambda: {"input_ids": _ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long)},
    ),
    "hf-llama-gqa": _hf(
        lambda: _T.LlamaForCausalLM(
            _T.LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=16,
                intermediate_size=24,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=16,
                use_cache=False,
            )
        ),
        lambda: {"input_ids": _ids()},
    ),
    "hf-t5-encoder": _hf(
        lambda: _T.T5EncoderModel(
            _T.T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4)
        ),
        lambda: {"input_ids": _ids()},
    ),
    "hf-vit": _hf(
        lambda: _T.ViTForImageClassification(
            _T.ViTConfig(
                image_size=8,
                patch_size=4,
                num_channels=1,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=24,
                num_labels=3,
            )
        ),
        lambda: {"pixel_values": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))},
    ),
    "timm-packed-qkv": _plain(lambda: TimmViT(PackedAttention), lambda: torch.randn(2, 2, 4, 4)),
    "chunked-qkv-sdpa": _plain(lambda: TimmViT(ChunkAttention), lambda: torch.randn(2, 2, 4, 4)),
    "rmsnorm-gqa-rotary-swiglu": _plain(
        TinyLM, lambda: torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))
    ),
    "swin-window-attention": _plain(SwinLike, lambda: torch.randn(2, 2, 4, 4)),
    "mobilenet-depthwise-se": _plain(MobileNetLike, lambda: torch.randn(2, 2, 5, 5)),
    "regnet-grouped-conv": _plain(RegNetLike, lambda: torch.randn(2, 2, 4, 4)),
    "convnext-layer-scale": _plain(ConvNeXtLike, lambda: torch.randn(2, 2, 6, 6)),
    "shufflenet-channel-shuffle": _plain(ShuffleNetLike, lambda: torch.randn(2, 2, 3, 3)),
}


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_weight_matching_recovers_random_permutation_on_real_patterns(name: str) -> None:
    torch.manual_seed(0)
    model, x = REAL_MODELS[name]()
    model = model.double().eval()  # float64: the merged model must equal the original to rounding
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        x = x.double()
    elif isinstance(x, dict):
        x = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    randomize_norms(model, torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_recovers(model, x)
