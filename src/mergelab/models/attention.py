"""Multi-head self-attention with separate q/k/v/out projections.

Kept as its own module so structure discovery can treat it as one leaf with a known symmetry (heads permute as
blocks; q and k share a permutation inside a head, v and out share another) instead of tracing reshapes.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn


class MultiHeadSelfAttention(nn.Module):
    """Self-attention over a sequence ``(batch, tokens, dim)``.

    Args:
        dim: model (residual stream) width.
        heads: number of heads; must divide ``dim`` unless ``head_dim`` is given.
        head_dim: width of one head (defaults to ``dim // heads``).
    """

    # mergelab.structure.trace keeps this module as one fx leaf (its head symmetry is known as a whole).
    fx_leaf: ClassVar[bool] = True

    def __init__(self, dim: int, heads: int, head_dim: int | None = None) -> None:
        super().__init__()
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"MultiHeadSelfAttention: heads={heads} does not divide dim={dim}")
            head_dim = dim // heads
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        inner = heads * head_dim
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h, d = self.heads, self.head_dim
        q = self.q(x).view(b, t, h, d).transpose(1, 2)  # (b, h, t, d)
        k = self.k(x).view(b, t, h, d).transpose(1, 2)
        v = self.v(x).view(b, t, h, d).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # (b, h, t, t)
        y = att.softmax(dim=-1) @ v  # (b, h, t, d)
        return self.out(y.transpose(1, 2).reshape(b, t, h * d))
