"""Small hand-written CNNs with the patterns of torchvision/timm models (no torchvision/timm dependency).

* :class:`MobileNetV3Like`: inverted residuals (1×1 expand, depthwise k×k, squeeze-excite with reduce/expand
  1×1 convs and hardsigmoid gating, 1×1 project), BatchNorm, hardswish/ReLU, residuals, a two-layer head.
* :class:`EfficientNetLike`: MBConv blocks (SiLU, sigmoid SE gating on the expanded channels, SE reduce width
  from the block's *input*), BatchNorm, residuals.
* :class:`ResNetLike`: basic blocks, BatchNorm, projection shortcuts.
* :class:`DenseNetLike`: dense blocks (concatenated growth), BN-ReLU-conv, transitions.
* :class:`ConvNeXtLike`: depthwise 7×7 conv, channels-last LayerNorm, inverted MLP (Linear, GELU, Linear),
  layer scale, residuals.

:func:`randomize_norms` gives every norm non-constant affine parameters and running statistics, so that a wrong
permutation of them would show in the outputs. ``CNN_NETS`` maps a name to a builder (input shape included).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def _make_divisible(v: float, divisor: int = 4) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    """Global pool, 1×1 reduce, activation, 1×1 expand, gate (sigmoid or hardsigmoid), channel-wise scale."""

    def __init__(self, channels: int, reduced: int, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = act()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = gate()

    def forward(self, x: Tensor) -> Tensor:
        s = self.gate(self.expand(self.act(self.reduce(self.pool(x)))))
        return x * s


def _conv_bn_act(
    c_in: int, c_out: int, k: int, stride: int, groups: int, act: type[nn.Module] | None
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV3 / EfficientNet block: expand (1×1), depthwise (k×k), optional SE, project (1×1)."""

    def __init__(
        self,
        c_in: int,
        expanded: int,
        c_out: int,
        k: int,
        stride: int,
        act: type[nn.Module],
        se_reduced: int | None,
        se_act: type[nn.Module],
        gate: type[nn.Module],
    ) -> None:
        super().__init__()
        self.residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expanded != c_in:
            layers.append(_conv_bn_act(c_in, expanded, 1, 1, 1, act))
        layers.append(_conv_bn_act(expanded, expanded, k, stride, expanded, act))
        if se_reduced is not None:
            layers.append(SqueezeExcite(expanded, se_reduced, se_act, gate))
        layers.append(_conv_bn_act(expanded, c_out, 1, 1, 1, None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3Like(nn.Module):
    """A scaled-down mobilenet_v3_small: (k, expanded, out, SE, activation, stride) rows as in torchvision."""

    # kernel, expanded, out, se, hardswish, stride (mobilenet_v3_small's first rows, narrower)
    CONFIG = (
        (3, 16, 16, True, False, 2),
        (3, 48, 24, False, False, 2),
        (3, 64, 24, False, False, 1),
        (5, 64, 32, True, True, 2),
        (5, 96, 32, True, True, 1),
        (5, 80, 40, True, True, 1),
    )

    def __init__(self, num_classes: int = 10, stem: int = 16, last: int = 128, head: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_act(3, stem, 3, 2, 1, nn.Hardswish)]
        c = stem
        for k, exp, out, se, hs, stride in self.CONFIG:
            act = nn.Hardswish if hs else nn.ReLU
            reduced = _make_divisible(exp / 4) if se else None
            layers.append(InvertedResidual(c, exp, out, k, stride, act, reduced, nn.ReLU, nn.Hardsigmoid))
            c = out
        layers.append(_conv_bn_act(c, last, 1, 1, 1, nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last, head), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(head, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class EfficientNetLike(nn.Module):
    """A scaled-down efficientnet_b0: MBConv (expand ratio, kernel, stride, out, repeats) stages."""

    # expand ratio, kernel, stride, out channels, repeats (efficientnet_b0's first stages, narrower)
    CONFIG = ((1, 3, 1, 8, 1), (6, 3, 2, 12, 2), (6, 5, 2, 20, 2), (6, 3, 2, 40, 1))

    def __init__(self, num_classes: int = 10, stem: int = 16, last: int = 96) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_act(3, stem, 3, 2, 1, nn.SiLU)]
        c = stem
        for ratio, k, stride, out, repeats in self.CONFIG:
            for r in range(repeats):
                exp = c * ratio
                reduced = max(1, c // 4)  # EfficientNet's SE width follows the block's input channels
                s = stride if r == 0 else 1
                layers.append(InvertedResidual(c, exp, out, k, s, nn.SiLU, reduced, nn.SiLU, nn.Sigmoid))
                c = out
        layers.append(_conv_bn_act(c, last, 1, 1, 1, nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetLike(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 48)) -> None:
        super().__init__()
        self.stem = _conv_bn_act(3, widths[0], 3, 1, 1, nn.ReLU)
        blocks: list[nn.Module] = []
        c = widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(c, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int, bottleneck: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, bottleneck, 1, bias=False),
            nn.BatchNorm2d(bottleneck),
            nn.ReLU(),
            nn.Conv2d(bottleneck, growth, 3, 1, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.body(x)], 1)


class DenseNetLike(nn.Module):
    def __init__(
        self, num_classes: int = 10, stem: int = 16, growth: int = 8, layers: tuple[int, ...] = (3, 3)
    ):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, stem, 3, 1, 1, bias=False)]
        c = stem
        for i, n in enumerate(layers):
            for _ in range(n):
                mods.append(DenseLayer(c, growth, 4 * growth))
                c += growth
            if i < len(layers) - 1:  # transition: BN-ReLU-1×1 conv-pool, halving the channels
                mods += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        mods += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*mods)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7×7, LayerNorm over channels (channels-last), Linear 4×, GELU, Linear, layer scale, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ChannelsFirstLayerNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    def __init__(
        self, num_classes: int = 10, dims: tuple[int, ...] = (16, 32), depths: tuple[int, ...] = (2, 2)
    ):
        super().__init__()
        stages: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4), ChannelsFirstLayerNorm(dims[0])]
        for i, (d, n) in enumerate(zip(dims, depths, strict=True)):
            if i:
                stages += [ChannelsFirstLayerNorm(dims[i - 1]), nn.Conv2d(dims[i - 1], d, 2, 2)]
            stages += [ConvNeXtBlock(d) for _ in range(n)]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.stages(x).mean((-2, -1))))


@torch.no_grad()
def randomize_norms(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-constant norm affines, running statistics and layer scales (a wrong permutation of them must show)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase | nn.LayerNorm | nn.GroupNorm):
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            assert m.running_var is not None
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
        if isinstance(m, ConvNeXtBlock):
            m.gamma.copy_(torch.rand(m.gamma.shape, generator=generator) + 0.25)
    return model


NetBuilder = Callable[[], nn.Module]

# name -> (builder, example input shape with batch); every builder draws from the global RNG (seed it first)
CNN_NETS: dict[str, tuple[NetBuilder, tuple[int, ...]]] = {
    "mobilenet_v3_like": (MobileNetV3Like, (2, 3, 32, 32)),
    "efficientnet_like": (EfficientNetLike, (2, 3, 32, 32)),
    "resnet_like": (ResNetLike, (2, 3, 16, 16)),
    "densenet_like": (DenseNetLike, (2, 3, 16, 16)),
    "convnext_like": (ConvNeXtLike, (2, 3, 16, 16)),
}


@torch.no_grad()
def torchvision_init(model: nn.Module) -> nn.Module:
    """torchvision's MobileNetV3 initialisation: Kaiming-normal (fan-out) convs, unit/zero norms, zero biases,
    N(0, 0.01) Linear weights (its EfficientNet differs only in the Linear layers). Fan-out counts a depthwise kernel's ``C·k·k`` entries, so depthwise kernels
    come out small: most of a unit's signal lies in the tensors it shares with its neighbours."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return model
