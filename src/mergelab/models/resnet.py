"""CIFAR-style ResNet (He et al. 2016, ResNet-20 family) for 1-D and 2-D inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mergelab.models.registry import CONV_NORMS, SpatialOps, conv_norm, register_model, scaled, spatial_ops


class BasicBlock(nn.Module):
    """``relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))`` with 3x3 convs.

    ``shortcut`` is a 1x1 conv (+ norm) when the stride or channel count changes, else an empty
    ``nn.Sequential`` (the identity, which leaves no node in an fx graph). Missing norms are ``None``; the
    ``is not None`` checks depend only on the configuration, so the traced graph is fixed.
    """

    def __init__(self, ops: SpatialOps, cin: int, cout: int, stride: int, norm: str | None) -> None:
        super().__init__()
        bias = norm is None  # a norm right after a conv makes its bias redundant
        self.conv1 = ops.conv(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = conv_norm(norm, cout, ops.ndim, who="resnet")
        self.act1 = nn.ReLU()
        self.conv2 = ops.conv(cout, cout, 3, stride=1, padding=1, bias=bias)
        self.norm2 = conv_norm(norm, cout, ops.ndim, who="resnet")
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut.append(ops.conv(cin, cout, 1, stride=stride, bias=bias))
            n = conv_norm(norm, cout, ops.ndim, who="resnet")
            if n is not None:
                self.shortcut.append(n)
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if self.norm1 is not None:
            out = self.norm1(out)
        out = self.conv2(self.act1(out))
        if self.norm2 is not None:
            out = self.norm2(out)
        return self.act2(out + self.shortcut(x))


@register_model("resnet")
class ResNet(nn.Module):
    """ResNet-20 family: stem conv, 3 stages of ``(depth - 2) / 6`` basic blocks, global average pool, head.

    Mirrors the ResNet-20 (x width) of REPAIR (BatchNorm barrier 26 -> 1 points after REPAIR; LayerNorm
    variant built with ``GroupNorm(1, C)``), of ZipIt! (x4 / x8 on CIFAR splits) and of Git Re-Basin. Stage
    widths are 16, 32, 64 times ``width``; stages 2 and 3 halve the spatial size (8x8 -> 4x4 -> 2x2, 40 -> 20
    -> 10). The residual stream of a stage is one permutation group shared by every block's output and
    shortcut; projection shortcuts (1x1 conv + norm) start a new one.

    Args:
        input_shape: ``(C, L)`` (1-D convs) or ``(C, H, W)`` (2-D convs).
        num_classes: outputs of ``head``.
        depth: 6n + 2 (20, 32, 44, 56, ...; 8 gives one block per stage).
        width: multiplier on 16/32/64 channels.
        norm: ``"batchnorm"``, ``"layernorm"`` (``GroupNorm(1, C)``), ``"groupnorm"`` or ``None``.

    Example:
        >>> import torch
        >>> m = ResNet((1, 8, 8), 10, depth=8)
        >>> m(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        depth: int = 20,
        width: float = 1,
        norm: str | None = "batchnorm",
    ) -> None:
        super().__init__()
        ops = spatial_ops(input_shape)
        self.input_shape = tuple(input_shape)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"resnet: depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
        if norm not in CONV_NORMS:
            raise ValueError(f"resnet: unknown norm {norm!r}; choose one of {list(CONV_NORMS)}")
        n_blocks = (depth - 2) // 6
        widths = [scaled(c, width) for c in (16, 32, 64)]

        stem: list[nn.Module] = [ops.conv(self.input_shape[0], widths[0], 3, padding=1, bias=norm is None)]
        n = conv_norm(norm, widths[0], ops.ndim, who="resnet")
        if n is not None:
            stem.append(n)
        stem.append(nn.ReLU())
        self.stem = nn.Sequential(*stem)

        stages: list[nn.Module] = []
        cin = widths[0]
        for i, cout in enumerate(widths):
            blocks = [
                BasicBlock(ops, cin if b == 0 else cout, cout, 2 if (i > 0 and b == 0) else 1, norm)
                for b in range(n_blocks)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = ops.avgpool(1)
        self.head = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled output of the last stage, ``(N, 64 * width)``."""
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
