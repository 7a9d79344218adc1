"""Plain convolutional nets without residuals: a VGG-style stack and the small strided CNN of MNIST-1D."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from mergelab.models.registry import conv_norm, register_model, scaled, spatial_ops

log = logging.getLogger(__name__)

# Channel plans; "M" is a 2x max-pool (skipped once the map is down to size 1 along some axis).
VGG_CONFIGS: dict[str, list[int | str]] = {
    "small": [32, "M", 64, "M", 128, "M"],
    "medium": [32, 32, "M", 64, 64, "M", 128, 128, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
}
PLAIN_NORMS = (None, "batchnorm", "layernorm", "groupnorm")


@register_model("vgg")
class VGG(nn.Module):
    """VGG-style CNN: ``conv3x3 [-> norm] -> ReLU`` blocks, max-pools, global average pool, ``Linear`` head.

    Mirrors the plain VGG11 of Git Re-Basin and REPAIR (no norm: merged 67 % -> 85 % after REPAIR on CIFAR-10)
    and the VGG of "Rethinking Weight-Averaged Model-merging", scaled down for 8x8 digits and length-40
    MNIST-1D. The pooling plan is fixed in ``__init__`` from ``input_shape``: a pool is kept only while every
    spatial size is at least 2, so the same config runs on 8x8 and on length 40.

    Args:
        input_shape: ``(C, L)`` (1-D convs) or ``(C, H, W)`` (2-D convs).
        num_classes: outputs of ``head``.
        width: multiplier on the config's channel counts (``small`` = 32, 64, 128).
        norm: ``None``, ``"batchnorm"``, ``"layernorm"`` (``GroupNorm(1, C)``) or ``"groupnorm"``.
        cfg: a key of :data:`VGG_CONFIGS` (``small``, ``medium``, ``vgg11``).

    Example:
        >>> import torch
        >>> m = VGG((1, 8, 8), 10, width=0.25)
        >>> m(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        width: float = 1.0,
        norm: str | None = None,
        cfg: str = "small",
    ) -> None:
        super().__init__()
        ops = spatial_ops(input_shape)
        self.input_shape = tuple(input_shape)
        if cfg not in VGG_CONFIGS:
            raise ValueError(f"vgg: unknown cfg {cfg!r}; choose one of {sorted(VGG_CONFIGS)}")
        if norm not in PLAIN_NORMS:
            raise ValueError(f"vgg: unknown norm {norm!r}; choose one of {list(PLAIN_NORMS)}")
        channels, size = self.input_shape[0], list(self.input_shape[1:])
        layers: list[nn.Module] = []
        for item in VGG_CONFIGS[cfg]:
            if item == "M":
                if min(size) >= 2:
                    layers.append(ops.maxpool(2))
                    size = [s // 2 for s in size]
                else:
                    log.debug("vgg: skipping a max-pool, spatial size is already %s", size)
                continue
            out = scaled(int(item), width)
            layers.append(ops.conv(channels, out, 3, padding=1, bias=norm is None))
            n = conv_norm(norm, out, ops.ndim, who="vgg")
            if n is not None:
                layers.append(n)
            layers.append(nn.ReLU())
            channels = out
        self.blocks = nn.Sequential(*layers)
        self.pool = ops.avgpool(1)
        self.head = nn.Linear(channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled last conv map, ``(N, channels)``."""
        return torch.flatten(self.pool(self.blocks(x)), 1)  # (N, C, *spatial) -> (N, C, 1..) -> (N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("cnn")
class CNN(nn.Module):
    """Small strided CNN: ``depth`` x ``conv(kernel, stride) [-> norm] -> ReLU``, flatten, ``Linear`` head.

    Mirrors the CNN of the MNIST-1D paper (three stride-2 convs, ~25 channels, flatten + linear; ~94 % test
    accuracy there vs ~68 % for the MLP) and the "CNN" pool of "Rethinking Weight-Averaged Model-merging".
    Unlike :class:`VGG` the head reads the *flattened* conv map, so merging must carry each channel's
    permutation through the flatten (``Axis.inner`` = remaining spatial size).

    Args:
        input_shape: ``(C, L)`` (1-D convs) or ``(C, H, W)`` (2-D convs).
        num_classes: outputs of ``head``.
        width: channels of every conv layer.
        depth: number of conv layers.
        kernel: kernel size (padding ``kernel // 2``).
        stride: stride of every conv (2 halves the map each layer: 40 -> 20 -> 10 -> 5, 8 -> 4 -> 2 -> 1).
        norm: ``None``, ``"batchnorm"``, ``"layernorm"`` (``GroupNorm(1, C)``) or ``"groupnorm"``.

    Example:
        >>> import torch
        >>> m = CNN((1, 40), 10, width=8)
        >>> m.features(torch.zeros(2, 1, 40)).shape
        torch.Size([2, 40])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        width: int = 32,
        depth: int = 3,
        kernel: int = 5,
        stride: int = 2,
        norm: str | None = None,
    ) -> None:
        super().__init__()
        ops = spatial_ops(input_shape)
        self.input_shape = tuple(input_shape)
        if width < 1 or depth < 1 or kernel < 1 or stride < 1:
            raise ValueError(
                f"cnn: width, depth, kernel and stride must be >= 1, got {width}, {depth}, {kernel}, {stride}"
            )
        if norm not in PLAIN_NORMS:
            raise ValueError(f"cnn: unknown norm {norm!r}; choose one of {list(PLAIN_NORMS)}")
        channels, size = self.input_shape[0], list(self.input_shape[1:])
        pad = kernel // 2
        layers: list[nn.Module] = []
        for i in range(depth):
            size = [(s + 2 * pad - kernel) // stride + 1 for s in size]
            if min(size) < 1:
                raise ValueError(
                    f"cnn: conv layer {i} shrinks input {self.input_shape} to spatial size {size}"
                )
            layers.append(ops.conv(channels, width, kernel, stride=stride, padding=pad, bias=norm is None))
            n = conv_norm(norm, width, ops.ndim, who="cnn")
            if n is not None:
                layers.append(n)
            layers.append(nn.ReLU())
            channels = width
        self.blocks = nn.Sequential(*layers)
        self.feature_shape = (channels, *size)  # conv map read by the head, without batch
        flat = channels
        for s in size:
            flat *= s
        self.head = nn.Linear(flat, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened last conv map, ``(N, width * prod(spatial))``."""
        return torch.flatten(self.blocks(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
