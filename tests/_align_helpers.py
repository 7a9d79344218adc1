"""Tiny models with hand-written Structures, for the alignment tests (until structure discovery is wired in)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.models.attention import MultiHeadSelfAttention
from mergelab.structure.types import Axis, Group, Probe, Structure


class MLP(nn.Module):
    def __init__(self, d_in: int = 8, hidden: tuple[int, int] = (16, 12), classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.head = nn.Linear(hidden[1], classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        return F.relu(self.fc2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def mlp_structure(model: MLP, probes: bool = False) -> Structure:
    h1, h2 = model.fc1.out_features, model.fc2.out_features
    g1 = Group(
        "fc1",
        h1,
        (Axis("fc1.weight", 0, "out"), Axis("fc1.bias", 0, "out"), Axis("fc2.weight", 1, "in")),
        probes=(Probe("relu", 1),) if probes else (),
    )
    g2 = Group(
        "fc2",
        h2,
        (Axis("fc2.weight", 0, "out"), Axis("fc2.bias", 0, "out"), Axis("head.weight", 1, "in")),
        probes=(Probe("relu_1", 1),) if probes else (),
    )
    return Structure((g1, g2))


class CNN(nn.Module):
    """conv-BN-ReLU ×2, then flatten into the head: exercises BN buffers and ``inner``."""

    def __init__(self, c: tuple[int, int] = (6, 8), classes: int = 3, side: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c[0], 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c[0])
        self.conv2 = nn.Conv2d(c[0], c[1], 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(c[1])
        self.head = nn.Linear(c[1] * (side // 2) ** 2, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _bn(name: str) -> tuple[Axis, ...]:
    return tuple(Axis(f"{name}.{p}", 0, "out") for p in ("weight", "bias", "running_mean", "running_var"))


def cnn_structure(model: CNN, side: int = 8) -> Structure:
    c1, c2 = model.conv1.out_channels, model.conv2.out_channels
    inner = (side // 2) ** 2
    g1 = Group(
        "conv1",
        c1,
        (
            Axis("conv1.weight", 0, "out"),
            Axis("conv1.bias", 0, "out"),
            *_bn("bn1"),
            Axis("conv2.weight", 1, "in"),
        ),
    )
    g2 = Group(
        "conv2",
        c2,
        (
            Axis("conv2.weight", 0, "out"),
            Axis("conv2.bias", 0, "out"),
            *_bn("bn2"),
            Axis("head.weight", 1, "in", inner),
        ),
    )
    return Structure((g1, g2))


class TinyAttention(nn.Module):
    """Token embedding + one residual self-attention block + mean pooling: blocks and ties."""

    def __init__(self, d_tok: int = 5, dim: int = 8, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d_tok, dim)
        self.attn = MultiHeadSelfAttention(dim, heads)
        self.head = nn.Linear(dim, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h)
        return h.mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def attention_structure(model: TinyAttention, probes: bool = True) -> Structure:
    d, inner, heads = model.attn.dim, model.attn.heads * model.attn.head_dim, model.attn.heads
    res = Group(
        "res",
        d,
        (
            Axis("embed.weight", 0, "out"),
            Axis("embed.bias", 0, "out"),
            Axis("attn.q.weight", 1, "in"),
            Axis("attn.k.weight", 1, "in"),
            Axis("attn.v.weight", 1, "in"),
            Axis("attn.out.weight", 0, "out"),
            Axis("attn.out.bias", 0, "out"),
            Axis("head.weight", 1, "in"),
        ),
        probes=(Probe("add", 2),) if probes else (),
    )
    qk = Group(
        "qk",
        inner,
        (
            Axis("attn.q.weight", 0, "out"),
            Axis("attn.q.bias", 0, "out"),
            Axis("attn.k.weight", 0, "out"),
            Axis("attn.k.bias", 0, "out"),
        ),
        blocks=heads,
    )
    vo = Group(
        "vo",
        inner,
        (Axis("attn.v.weight", 0, "out"), Axis("attn.v.bias", 0, "out"), Axis("attn.out.weight", 1, "in")),
        blocks=heads,
    )
    return Structure((res, qk, vo), ties=(("qk", "vo"),))


def random_perms(structure: Structure, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One random permutation per group, moving blocks as wholes; tied groups share the block permutation."""
    out: dict[str, torch.Tensor] = {}
    block_perm: dict[tuple[str, ...], torch.Tensor] = {}
    for g in structure:
        tie = structure.tie_of(g.name)
        if tie not in block_perm:
            block_perm[tie] = torch.randperm(g.blocks, generator=generator)
        bs = g.block_size
        within = torch.stack([torch.randperm(bs, generator=generator) for _ in range(g.blocks)])
        out[g.name] = (block_perm[tie].view(-1, 1) * bs + within).flatten()
    return out


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300, lr: float = 1e-2
) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model


def loader(x: torch.Tensor, y: torch.Tensor | None = None, batch: int = 64) -> list:
    """A deterministic list of batches (x, y) or x."""
    out = []
    for i in range(0, len(x), batch):
        out.append((x[i : i + batch], y[i : i + batch]) if y is not None else x[i : i + batch])
    return out
