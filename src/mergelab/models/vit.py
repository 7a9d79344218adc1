"""A small pre-norm vision / sequence transformer for 8x8 images and length-40 signals."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mergelab.models.attention import MultiHeadSelfAttention
from mergelab.models.registry import register_model, spatial_ops


def default_patch(input_shape: Sequence[int]) -> int:
    """Patch size giving about 16 tokens for images (2 for 8x8) and 10 for sequences (4 for length 40)."""
    spatial = tuple(input_shape[1:])
    if len(spatial) == 1:
        return max(1, spatial[0] // 10)
    return max(1, min(spatial) // 4)


class Block(nn.Module):
    """Pre-norm transformer block: ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.ln1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))  # (N, T, dim)
        return x + self.mlp(self.ln2(x))


@register_model("vit")
class ViT(nn.Module):
    """Patch embedding, learned positions, pre-norm blocks, final LayerNorm, mean pool, ``Linear`` head.

    Mirrors the ViT of "Rethinking Weight-Averaged Model-merging" and the attention-head grouping of MuDSC,
    at a size that trains on CPU. The patch embedding is a conv with ``kernel = stride = patch`` (``Conv1d``
    for ``(C, L)``, ``Conv2d`` for ``(C, H, W)``); a remainder that does not fill a patch is dropped.
    There is **no class token**: features are the mean over tokens, which keeps the graph a plain chain for
    ``torch.fx`` and keeps every token position alike for merging. The residual stream (patch embedding,
    position embedding, each block's ``attn.out``/``mlp.2`` output, each LayerNorm) is one permutation group.

    Args:
        input_shape: ``(C, L)`` or ``(C, H, W)``.
        num_classes: outputs of ``head``.
        dim: residual stream width.
        depth: number of transformer blocks.
        heads: attention heads (must divide ``dim``).
        patch: patch size; ``None`` picks :func:`default_patch` (2 for 8x8, 4 for length 40).
        mlp_ratio: MLP hidden width over ``dim`` (2, not the usual 4: tiny data, half the compute).

    Example:
        >>> import torch
        >>> m = ViT((1, 40), 10, dim=16, depth=1, heads=2)
        >>> m.num_tokens
        10
        >>> m(torch.zeros(2, 1, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        patch: int | None = None,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        ops = spatial_ops(input_shape)
        self.input_shape = tuple(input_shape)
        if dim < 1 or depth < 0 or heads < 1:
            raise ValueError(f"vit: need dim >= 1, depth >= 0, heads >= 1; got {dim}, {depth}, {heads}")
        if dim % heads:
            raise ValueError(f"vit: heads={heads} does not divide dim={dim}")
        if not mlp_ratio > 0:
            raise ValueError(f"vit: mlp_ratio must be positive, got {mlp_ratio!r}")
        self.patch = default_patch(self.input_shape) if patch is None else patch
        spatial = self.input_shape[1:]
        if self.patch < 1 or self.patch > min(spatial):
            raise ValueError(
                f"vit: patch={self.patch} must be in [1, {min(spatial)}] for input {self.input_shape}"
            )
        self.num_tokens = 1
        for s in spatial:
            self.num_tokens *= s // self.patch

        self.patch_embed = ops.conv(self.input_shape[0], dim, self.patch, stride=self.patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over tokens of the final-normed residual stream, ``(N, dim)``."""
        x = self.patch_embed(x)  # (N, dim, *grid)
        x = torch.flatten(x, 2).transpose(1, 2)  # (N, T, dim)
        x = self.blocks(x + self.pos_embed)
        return self.norm(x).mean(dim=1)  # (N, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
