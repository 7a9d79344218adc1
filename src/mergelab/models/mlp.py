"""Fully connected classifier: the workhorse of the permutation-alignment and merging studies."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mergelab.models.registry import activation, check_input_shape, register_model

MLP_NORMS = (None, "layernorm", "batchnorm")


@register_model("mlp")
class MLP(nn.Module):
    """Flatten, then ``depth`` hidden ``Linear(width) [-> norm] -> act`` layers, then a ``Linear`` head.

    Mirrors the MNIST MLPs of Git Re-Basin (3 x 512, where aligned interpolation reaches ~zero barrier), the
    3 x 512 MLP of the MuDSC / ZipIt digit-split prototypes, the MLP of the MNIST-1D paper (~68 % there) and
    the MLP pool of "Rethinking Weight-Averaged Model-merging". ``depth=0`` gives a linear classifier, whose
    ``head.weight`` rows reshaped to ``input_shape`` are the class templates that paper visualises.

    Hidden layers live in ``self.layers`` (an ``nn.Sequential``: ``layers.0`` is the first ``Linear``).

    Args:
        input_shape: ``(C, L)`` or ``(C, H, W)``; the input is flattened, so both work alike.
        num_classes: outputs of ``head``.
        width: units per hidden layer.
        depth: number of hidden layers (0 = linear model).
        norm: ``None``, ``"layernorm"`` or ``"batchnorm"`` after each hidden ``Linear``.
        act: ``"relu"``, ``"gelu"`` or ``"tanh"``.

    Example:
        >>> import torch
        >>> m = MLP((1, 40), 10, width=16, depth=2)
        >>> m(torch.zeros(3, 1, 40)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        width: int = 512,
        depth: int = 3,
        norm: str | None = None,
        act: str = "relu",
    ) -> None:
        super().__init__()
        self.input_shape = check_input_shape(input_shape, who="mlp")
        if width < 1 or depth < 0:
            raise ValueError(f"mlp: need width >= 1 and depth >= 0, got width={width}, depth={depth}")
        if norm not in MLP_NORMS:
            raise ValueError(f"mlp: unknown norm {norm!r}; choose one of {list(MLP_NORMS)}")
        fan_in = 1
        for s in self.input_shape:
            fan_in *= s
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers.append(nn.Linear(fan_in, width))
            if norm == "layernorm":
                layers.append(nn.LayerNorm(width))
            elif norm == "batchnorm":
                layers.append(nn.BatchNorm1d(width))
            layers.append(activation(act, who="mlp"))
            fan_in = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(fan_in, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, width)`` (the flattened input when ``depth=0``)."""
        return self.layers(torch.flatten(x, 1))  # (N, C*L) or (N, C*H*W) -> (N, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
