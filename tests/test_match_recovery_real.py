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
import _hf_tiny  # noqa: E402

Inputs = dict[str, torch.Tensor]


def _hf(make: Callable[[], nn.Module], inputs: Callable[[], Inputs]) -> Callable[[], tuple[nn.Module, Any]]:
    return lambda: (make(), inputs())


def _plain(
    make: Callable[[], nn.Module], x: Callable[[], torch.Tensor]
) -> Callable[[], tuple[nn.Module, Any]]:
    return lambda: (make(), x())


REAL_MODELS: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "hf-gpt2": _hf(_hf_tiny.gpt2, lambda: {"input_ids": _hf_tiny.ids()}),
    "hf-bert": _hf(
        _hf_tiny.bert,
        lambda: {
            "input_ids": _hf_tiny.ids(),
            "attention_mask": torch.ones(2, _hf_tiny.TOKENS, dtype=torch.long),
        },
    ),
    "hf-llama-gqa": _hf(_hf_tiny.llama_gqa, lambda: {"input_ids": _hf_tiny.ids()}),
    "hf-t5-encoder": _hf(_hf_tiny.t5_encoder, lambda: {"input_ids": _hf_tiny.ids()}),
    "hf-vit": _hf(
        _hf_tiny.vit,
        lambda: {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))},
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
