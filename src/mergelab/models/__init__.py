"""The model zoo: small MLP, CNN, VGG, ResNet and ViT classifiers for ``(C, L)`` and ``(C, H, W)`` inputs.

Every zoo model has its classifier as an ``nn.Linear`` named ``head``, a ``features(x)`` method returning the
penultimate features (``forward(x) == head(features(x))``), and a forward that ``torch.fx.symbolic_trace``
follows, so structure discovery works without per-model graphs. Build them by name:

Example:
    >>> import torch
    >>> from mergelab.models import build_model, list_models
    >>> list_models()
    ['cnn', 'mlp', 'resnet', 'vgg', 'vit']
    >>> m = build_model("vit", (1, 8, 8), 10, dim=16, depth=1, heads=2)
    >>> m(torch.zeros(4, 1, 8, 8)).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

from mergelab.models.attention import MultiHeadSelfAttention
from mergelab.models.mlp import MLP
from mergelab.models.registry import (
    ARCHITECTURES,
    build_from_spec,
    build_model,
    list_models,
    register_model,
)
from mergelab.models.resnet import ResNet
from mergelab.models.vgg import CNN, VGG
from mergelab.models.vit import ViT

__all__ = [
    "ARCHITECTURES",
    "CNN",
    "MLP",
    "MultiHeadSelfAttention",
    "ResNet",
    "VGG",
    "ViT",
    "build_from_spec",
    "build_model",
    "list_models",
    "register_model",
]
