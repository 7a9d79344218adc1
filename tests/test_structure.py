"""Structure discovery and permutation transforms.

The central property: discover a model's structure, permute its units at random, and the permuted copy computes
the same function. If discovery misses an axis or invents a symmetry that is not there, outputs change.
"""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from _zoo_tiny import ZOO_TINY
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mergelab.models.attention import MultiHeadSelfAttention
from mergelab.structure import (
    Axis,
    Probe,
    Structure,
    attention_axes,
    build_structure,
    check_permutations,
    conv_axes,
    discover_structure,
    identity_permutations,
    invert_permutation,
    linear_axes,
    norm_axes,
    param_axis,
    permute,
    permute_state_dict,
    random_permutations,
)

torch.set_default_dtype(torch.float32)


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _randomize_buffers(model: nn.Module, seed: int = 0) -> None:
    """Give BatchNorm non-trivial running statistics so eval-mode tests see them."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if (
            isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))
            and m.weight is not None
        ):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))


def assert_permutation_invariant(
    model: nn.Module, x: Tensor, *, seed: int = 0, train: bool = False, min_groups: int = 1
) -> Structure:
    """Discover, permute at random, and check the permuted copy computes the same outputs."""
    if x.is_floating_point():
        x = x.double()
    model = model.double()
    _randomize_buffers(model, seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = discover_structure(model, x)
    assert len(structure) >= min_groups, str(structure)
    perms = random_permutations(structure, seed)
    twin = permute(model, structure, perms)
    # the input model is never modified
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    model.train(train)
    twin.train(train)
    with torch.no_grad():
        y, y2 = model(x), twin(x)
    torch.testing.assert_close(y2, y, rtol=1e-9, atol=1e-10)
    # no group may touch the model's output: the logits' producer keeps its output axis
    return structure


def _axes(structure: Structure) -> set[tuple[str, int]]:
    return {(a.param, a.dim) for g in structure for a in g.axes}


# --------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------


def mlp(norm: str | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = 5
    for i, w in enumerate((7, 6)):
        layers.append(nn.Linear(width if i == 0 else 7, w))
        if norm == "layer":
            layers.append(nn.LayerNorm(w))
        elif norm == "batch":
            layers.append(nn.BatchNorm1d(w))
        layers.append(nn.ReLU() if i == 0 else nn.Tanh())
    layers.append(nn.Linear(6, 3))
    return nn.Sequential(*layers)


class CNN1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(4)
        self.pool = nn.MaxPool1d(2)
        self.c2 = nn.Conv1d(4, 5, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(5)
        self.head = nn.Linear(5 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, 2, 12)
        x = self.pool(F.relu(self.bn1(self.c1(x))))  # (N, 4, 6)
        x = F.gelu(self.bn2(self.c2(x)))  # (N, 5, 3)
        return self.head(x.flatten(1))  # reads 5 channels x 3 positions


class CNN2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.SiLU(),
            nn.MaxPool2d(2),
        )
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6 * 2 * 2, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, 3, 8, 8)
        return self.head(F.relu(self.fc(self.flat(self.features(x)))))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.layer1 = nn.Sequential(Block(4, 4, 1), Block(4, 4, 1))
        self.layer2 = nn.Sequential(Block(4, 6, 2), Block(6, 6, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.pool(self.layer2(self.layer1(self.stem(x)))), 1))


class GroupNormNet(nn.Module):
    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(groups, 8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.gn2 = nn.GroupNorm(1, 6)  # behaves like LayerNorm: no block constraint
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


class ConcatNet(nn.Module):
    """Two branches concatenated along channels, read by a conv, a residual add, and a flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(1, 5, 1)
        self.bn = nn.BatchNorm2d(8)
        self.mix = nn.Conv2d(8, 8, 1)  # its output is added to the concat: splits its basis 3 + 5
        self.gn = nn.GroupNorm(4, 8)  # groups of 2 entries: cut the 3-piece and the 5-piece further
        self.head = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, 4, 4)
        y = torch.cat([F.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)  # (N, 8, 4, 4)
        y = self.bn(y)
        z = F.relu(self.gn(self.mix(y) + y))
        return self.head(torch.flatten(z, 1))


class SimpleConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(4, 3)
        self.right = nn.Linear(4, 2)
        self.fc = nn.Linear(5, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([F.relu(self.left(x)), torch.sigmoid(self.right(x))], dim=-1)
        return self.head(F.relu(self.fc(h)))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, torch_mha: bool) -> None:
        super().__init__()
        self.torch_mha = torch_mha
        self.ln1 = nn.LayerNorm(dim)
        if torch_mha:
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        else:
            self.attn = MultiHeadSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        a = self.attn(h, h, h, need_weights=False)[0] if self.torch_mha else self.attn(h)
        x = x + a
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    def __init__(
        self, torch_mha: bool = False, cls_token: bool = False, dim: int = 8, heads: int = 2
    ) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim)) if cls_token else None
        self.embed = nn.Conv2d(1, dim, 2, stride=2)
        self.pos = nn.Parameter(torch.randn(1, 4, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, torch_mha) for _ in range(2)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:  # (N, 1, 4, 4)
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (N, 4, dim)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x))
        feats = x[:, 0] if self.cls_token is not None else x.mean(1)
        return self.head(feats)


class FunctionalNet(nn.Module):
    """Raw parameters, F.linear, matmul, a hand-written LayerNorm, a softmax gate, chunk and GLU."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4))
        self.b1 = nn.Parameter(torch.randn(6))
        self.gain = nn.Parameter(torch.randn(6))
        self.w2 = nn.Parameter(torch.randn(6, 8))  # used as x @ w2
        self.proj = nn.Linear(4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.w1, self.b1)  # (N, 6)
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, keepdim=True, unbiased=False) + 1e-5)
        h = h * self.gain
        h = h * torch.softmax(h, dim=-1)  # softmax over units is permutation-equivariant
        g = F.glu(h @ self.w2, dim=-1)  # (N, 4): halves of w2's output share units
        a, b = g.chunk(2, dim=-1)
        u = torch.cat([b, a], dim=-1) + g  # forces the two halves to share their units
        return self.head(F.relu(self.proj(u)))


class Recurrent(nn.Module):
    """One Linear applied twice: its input and output share a basis."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.cell = nn.Linear(5, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.cell(h))
        h = torch.tanh(self.cell(h))
        return self.head(h)


class TiedLM(nn.Module):
    """Embedding and output layer share one weight registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.ff = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 6))
        self.head = nn.Linear(6, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.emb(tokens)
        h = h + self.ff(h)
        return self.head(h)


# --------------------------------------------------------------------------------------------------------------
# the property on hand-made models
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [None, "layer", "batch"])
def test_mlp_invariant(norm: str | None) -> None:
    s = assert_permutation_invariant(mlp(norm), torch.randn(6, 5), min_groups=2)
    assert [g.name for g in s] == ["0", "3" if norm else "2"]
    # input axis of the first layer and output axis of the head are never permuted
    assert ("0.weight", 1) not in _axes(s)
    head = f"{len(mlp(norm)) - 1}"
    assert (f"{head}.weight", 0) not in _axes(s) and (f"{head}.bias", 0) not in _axes(s)


def test_batchnorm_train_mode_same_batch() -> None:
    assert_permutation_invariant(mlp("batch"), torch.randn(6, 5), train=True)
    assert_permutation_invariant(CNN2d(), torch.randn(4, 3, 8, 8), train=True)


def test_conv1d_flatten_into_linear() -> None:
    s = assert_permutation_invariant(CNN1d(), torch.randn(3, 2, 12), min_groups=2)
    (head_in,) = [a for g in s for a in g.axes if a.param == "head.weight"]
    assert head_in.dim == 1 and head_in.inner == 3 and s["c2"].size == 5
    assert {a.param for a in s["c1"].axes} >= {"bn1.running_mean", "bn1.running_var", "c2.weight"}


def test_conv2d_pooling_flatten() -> None:
    s = assert_permutation_invariant(CNN2d(), torch.randn(2, 3, 8, 8), min_groups=3)
    assert [g.name for g in s] == ["features.0", "features.4", "fc"]
    (fc_in,) = [a for a in s["features.4"].axes if a.param == "fc.weight"]
    assert fc_in.inner == 4


def test_resnet_residual_streams() -> None:
    s = assert_permutation_invariant(TinyResNet(), torch.randn(2, 1, 8, 8))
    # stage 1 stream: stem + both blocks' conv2; stage 2 stream starts at the projection shortcut
    stream1 = s["stem.0"]
    params = {a.param for a in stream1.axes if a.role == "out"}
    assert {"layer1.0.conv2.weight", "layer1.1.conv2.weight", "layer1.1.bn2.weight"} <= params
    names = [g.name for g in s]
    assert names == [
        "stem.0",
        "layer1.0.conv1",
        "layer1.1.conv1",
        "layer2.0.conv1",
        "layer2.0.conv2",
        "layer2.1.conv1",
    ]
    stream2 = {a.param for a in s["layer2.0.conv2"].axes}
    assert {"layer2.0.shortcut.0.weight", "layer2.1.conv2.weight", "head.weight"} <= stream2


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_groupnorm_blocks(groups: int) -> None:
    s = assert_permutation_invariant(GroupNormNet(groups), torch.randn(2, 1, 4, 4))
    assert s["conv1"].blocks == (groups if groups < 8 else 1)
    assert s["conv2"].blocks == 1


def test_groupnorm_blocks_really_constrain() -> None:
    """A permutation that breaks GroupNorm's groups changes the output: the block constraint is real."""
    model = GroupNormNet(2).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    s = discover_structure(model, x)
    bad = {"conv1": torch.tensor([0, 1, 2, 4, 3, 5, 6, 7])}  # swaps a unit across the two groups
    with pytest.raises(ValueError, match="blocks"):
        check_permutations(s, bad)
    unchecked = s.__class__(tuple(g if g.name != "conv1" else g.__class__(g.name, g.size, g.axes) for g in s))
    twin = permute(model, unchecked, bad)
    assert not torch.allclose(model(x), twin(x))


def test_concat_pieces_and_split() -> None:
    s = assert_permutation_invariant(ConcatNet(), torch.randn(2, 1, 4, 4))
    # mix(y) + y splits mix's basis into the two branches; GroupNorm(4, 8) (groups of 2) splits them further:
    # a = [0:2] one whole group + [2:3] sharing a group with b's first unit; b[1:5] = two whole groups.
    # Parts of one unit are not groups (nothing to permute).
    assert [(g.name, g.size, g.blocks) for g in s] == [("a[0:2]", 2, 1), ("b[1:5]", 4, 2)]
    # the consumer of the concat reads each piece at its offset
    assert [a.start for g in s for a in g.axes if a.param == "mix.weight" and a.role == "in"] == [0, 4]
    assert [a.start for g in s for a in g.axes if a.param == "mix.weight" and a.role == "out"] == [0, 4]
    # flatten after the concat: inner = 4*4 and offsets scaled accordingly
    assert [(a.start, a.inner) for g in s for a in g.axes if a.param == "head.weight"] == [(0, 16), (64, 16)]


def test_simple_concat_offsets() -> None:
    s = assert_permutation_invariant(SimpleConcat(), torch.randn(4, 4), min_groups=3)
    assert Axis("fc.weight", 1, "in", 1, 0) in s["left"].axes
    assert Axis("fc.weight", 1, "in", 1, 3) in s["right"].axes


@pytest.mark.parametrize("cls_token", [False, True])
def test_transformer_multiheadselfattention(cls_token: bool) -> None:
    s = assert_permutation_invariant(TinyViT(cls_token=cls_token), torch.randn(3, 1, 4, 4))
    stream = s["embed"]
    params = {a.param for a in stream.axes}
    assert {
        "pos",
        "blocks.0.attn.out.weight",
        "blocks.1.mlp.2.weight",
        "norm.weight",
        "head.weight",
    } <= params
    assert ("cls_token" in params) == cls_token
    qk, vo = s["blocks.0.attn.q"], s["blocks.0.attn.v"]
    assert qk.blocks == vo.blocks == 2
    assert ("blocks.0.attn.q", "blocks.0.attn.v") in s.ties
    assert {(a.param, a.dim) for a in qk.axes} == {
        ("blocks.0.attn.q.weight", 0),
        ("blocks.0.attn.q.bias", 0),
        ("blocks.0.attn.k.weight", 0),
        ("blocks.0.attn.k.bias", 0),
    }


def test_transformer_torch_multiheadattention() -> None:
    s = assert_permutation_invariant(TinyViT(torch_mha=True), torch.randn(3, 1, 4, 4))
    q, v = "blocks.0.attn.in_proj_weight[0:8]", "blocks.0.attn.in_proj_weight[16:24]"
    qk, vo = s[q], s[v]
    assert qk.blocks == vo.blocks == 2
    assert {a.start for a in qk.axes if a.param == "blocks.0.attn.in_proj_weight" and a.dim == 0} == {0, 8}
    assert [a.start for a in vo.axes if a.param == "blocks.0.attn.in_proj_weight" and a.dim == 0] == [16]
    assert Axis("blocks.0.attn.out_proj.weight", 1, "in") in vo.axes
    assert (q, v) in s.ties
    assert Axis("blocks.0.attn.in_proj_weight", 1, "in") in s["embed"].axes


def test_functional_ops() -> None:
    s = assert_permutation_invariant(FunctionalNet(), torch.randn(5, 4))
    assert Axis("gain", 0, "out") in s["w1"].axes
    # glu ties the two halves of w2's output; the chunk/cat swap ties the two halves of the glu output
    (w2,) = [g for g in s if any(a.param == "w2" and a.role == "out" for a in g.axes)]
    assert w2.size == 2 and sorted(a.start for a in w2.axes if a.param == "w2") == [0, 2, 4, 6]


def test_weight_sharing_and_aliases() -> None:
    s = assert_permutation_invariant(Recurrent(), torch.randn(4, 3))
    assert len(s) == 1 and {(a.param, a.dim) for a in s["inp"].axes} >= {
        ("cell.weight", 0),
        ("cell.weight", 1),
    }
    s = assert_permutation_invariant(TiedLM(), torch.randint(0, 7, (2, 5)))
    stream = {(a.param, a.dim) for a in s["emb"].axes}
    assert {("emb.weight", 1), ("head.weight", 1)} <= stream


class CrossAttention(nn.Module):
    """nn.MultiheadAttention with kdim/vdim != embed_dim, bias_kv, sequence-first tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(3, 8)
        self.kv = nn.Linear(3, 6)
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, add_bias_kv=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:  # (T, N, 3)
        q, kv = self.q(x), torch.relu(self.kv(x))
        out, _ = self.attn(q, kv, kv)
        return self.head(out + q).mean(0)


class ConvZoo(nn.Module):
    """Depthwise (channel multiplier 2), grouped (kept fixed), transposed conv, InstanceNorm, PReLU, resize."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 6, 1)
        self.grouped = nn.Conv2d(6, 4, 1, groups=2)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.inorm = nn.InstanceNorm2d(3, affine=True)
        self.act = nn.PReLU(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.dw(torch.relu(self.c1(x))))
        h = self.grouped(torch.relu(self.pw(h)))
        h = self.act(self.inorm(self.up(torch.relu(h))))
        h = F.interpolate(h, scale_factor=0.5)
        return self.head(h.amax(dim=(2, 3)))


class Mixer(nn.Module):
    """MLP-Mixer block: units on two axes at once (token-mixing hidden units and channels)."""

    def __init__(self, tokens: int = 4, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.ln = nn.LayerNorm(dim)
        self.tok1, self.tok2 = nn.Linear(tokens, 5), nn.Linear(5, tokens)
        self.ch1, self.ch2 = nn.Linear(dim, 7), nn.Linear(7, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, 3)
        h = self.embed(x)
        y = self.tok2(F.gelu(self.tok1(self.ln(h).transpose(1, 2)))).transpose(1, 2)
        h = h + y
        h = h + self.ch2(F.gelu(self.ch1(h)))
        return self.head(h.mean(1))


class SliceStack(nn.Module):
    """Slices of a unit axis, a self-attention module called twice, stack, where, a left matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.attn = MultiHeadSelfAttention(6, 2)
        self.b, self.c = nn.Linear(3, 2), nn.Linear(3, 2)
        self.w = nn.Parameter(torch.randn(5, 3))
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, 4)
        h = torch.relu(self.a(x))
        h = h + self.attn(h) + self.attn(h * 0.5)
        left, right = h[..., :3], h[..., 3:]
        st = torch.stack([self.b(left), self.c(right)], dim=0).sum(0)  # b and c share their units
        m = torch.where(st > 0, st, torch.zeros_like(st))
        z = torch.cat([m, left[..., : h.size(-1) // 6]], -1)  # (N, T, 3)
        z = (self.w @ z.transpose(1, 2)).transpose(1, 2)  # W (5, 3) reads z's units
        return self.head(torch.tanh(z)).mean(1)


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (CrossAttention, (5, 2, 3)),
        (ConvZoo, (2, 2, 6, 6)),
        (Mixer, (2, 4, 3)),
        (SliceStack, (2, 5, 4)),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_more_ops_invariant(model: type[nn.Module], shape: tuple[int, ...]) -> None:
    s = assert_permutation_invariant(model(), torch.randn(*shape))
    if model is ConvZoo:  # the grouped conv moves its groups as blocks; the depthwise conv joins c1
        assert [g.name for g in s] == ["c1", "pw", "grouped", "up"]
        assert Axis("dw.weight", 0, "out", 2) in s["c1"].axes
        assert s["grouped"].blocks == 2 and ("pw", "grouped") in s.ties
        assert Axis("pw.weight", 0, "out", 3) in s["pw"].axes  # pw's units are whole groups of 3 channels
    if model is Mixer:
        assert [g.name for g in s] == ["embed", "tok1", "ch1"]
    if model is CrossAttention:
        q, v = "attn.q_proj_weight", "attn.v_proj_weight"
        assert (q, v) in s.ties and Axis("attn.bias_k", 2, "out") in s[q].axes


def test_probes_are_module_inputs_and_outputs() -> None:
    model = TinyViT()
    s = discover_structure(model, torch.randn(2, 1, 4, 4))
    # the residual stream is sampled where each block reads it (once per tensor) and at the final norm (the
    # head reads its token mean, computed in the model's forward)
    assert [(p.node, p.site) for p in s["embed"].probes] == [
        ("blocks.0.attn.q", "input"),
        ("blocks.0.mlp.0", "input"),
        ("blocks.1.attn.q", "input"),
        ("blocks.1.mlp.0", "input"),
        ("norm", "output"),
    ]
    # query/key units are read by no module: observed where q and k produce them
    assert [(p.node, p.site) for p in s["blocks.0.attn.q"].probes] == [
        ("blocks.0.attn.q", "output"),
        ("blocks.0.attn.k", "output"),
    ]
    modules = dict(model.named_modules())
    assert all(p.node in modules for g in s for p in g.probes)
    s = discover_structure(CNN1d(), torch.randn(2, 2, 12))
    assert s["c2"].probes == (Probe("head", 1, "input", 0, 3),)  # flattened: 3 positions per channel


class TwoGroupNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 1)
        self.gn1, self.gn2 = nn.GroupNorm(2, 8), nn.GroupNorm(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.gn2(self.gn1(self.conv(x))).mean((2, 3)))


def test_incompatible_blocks_raise() -> None:
    with pytest.raises(ValueError, match="both 2 and 4 blocks"):
        discover_structure(TwoGroupNorms(), torch.randn(2, 1, 2, 2))


# --------------------------------------------------------------------------------------------------------------
# fixed axes, errors, readable output
# --------------------------------------------------------------------------------------------------------------


class InputResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(4, 4)
        self.g = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.g(x + self.f(x))))


def test_basis_meeting_the_input_is_fixed() -> None:
    s = assert_permutation_invariant(InputResidual(), torch.randn(3, 4))
    assert [g.name for g in s] == ["g"]
    assert not any(a.param.startswith("f.") for g in s for a in g.axes)


class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([CumsumBlock()])
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks[0](x))


class CumsumBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cumsum(torch.relu(self.fc(x)), dim=1)


def test_order_dependent_op_keeps_units_fixed() -> None:
    s = assert_permutation_invariant(Unsupported(), torch.randn(2, 3), min_groups=0)
    assert len(s) == 0 and s.coverage() == 0.0
    (fixed,) = [f for f in s.fixed if f.hidden]
    assert fixed.name == "blocks.0.fc" and "aten.cumsum" in fixed.reason and "'blocks.0'" in fixed.reason
    assert "aten.cumsum" in s.explain() and "kept fixed" in str(s)


class ShuffleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Conv2d(2, 8, 1)])
        self.head = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.pixel_shuffle(self.blocks[0](x), 2).mean((2, 3)))


def test_unsupported_op_is_named() -> None:
    with pytest.raises(ValueError) as info:
        discover_structure(ShuffleBlock(), torch.randn(2, 2, 3, 3))
    msg = str(info.value)
    assert "no rule for aten.pixel_shuffle" in msg and "node 'pixel_shuffle'" in msg and "own forward" in msg


class TokenCumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, 3): cumsum over tokens keeps units apart
        return self.head(torch.cumsum(self.fc(x), dim=1).mean(1))


def test_cumsum_over_tokens_is_fine() -> None:
    assert_permutation_invariant(TokenCumsum(), torch.randn(2, 5, 3))


class Gram(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        return h @ h.transpose(1, 2)


def test_product_of_two_activations_contracts_units() -> None:
    s = assert_permutation_invariant(Gram(), torch.randn(2, 5, 3))  # h hᵀ is invariant to h's unit order
    assert [g.name for g in s] == ["fc"]


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


def test_untraceable_model_suggests_hand_written_structure() -> None:
    with pytest.raises(ValueError, match="exporting Branchy.*failed.*by hand"):
        discover_structure(Branchy(), torch.randn(2, 3))


def test_bad_example_input() -> None:
    with pytest.raises(ValueError, match="example input"):
        discover_structure(mlp(), torch.randn(2, 9))


def test_str_is_readable() -> None:
    s = discover_structure(TinyViT(), torch.randn(2, 1, 4, 4))
    text = str(s)
    assert text.startswith(f"Structure: {len(s)} groups")
    assert "blocks.0.attn.q  (8 units, 2 blocks)" in text
    assert "pos[2] (out)" in text and "head.weight[1] (in)" in text
    assert "tied blocks: blocks.0.attn.q = blocks.0.attn.v" in text
    flat = str(discover_structure(CNN1d(), torch.randn(2, 2, 12)))
    assert "head.weight[1] (in, inner=3)" in flat


def test_discovery_restores_train_mode() -> None:
    model = mlp("batch").train()
    discover_structure(model, torch.randn(1, 5))  # batch of one works: shapes are propagated in eval mode
    assert all(m.training for m in model.modules())


# --------------------------------------------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------------------------------------------


def test_nontrivial_permutation_changes_weights_and_not_the_input() -> None:
    model = mlp("layer")
    s = discover_structure(model, torch.randn(2, 5))
    perms = random_permutations(s, 3)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    new = permute_state_dict(model.state_dict(), s, perms)
    assert not torch.equal(new["0.weight"], sd["0.weight"])
    assert torch.equal(new["0.weight"], sd["0.weight"][perms["0"]])
    assert torch.equal(new["3.weight"][:, :], sd["3.weight"][perms["3"]][:, perms["0"]])
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])
    back = permute_state_dict(new, s, {k: invert_permutation(p) for k, p in perms.items()})
    for k in sd:
        assert torch.equal(back[k], sd[k])


def test_identity_permutation_is_identity() -> None:
    model = CNN2d()
    s = discover_structure(model, torch.randn(2, 3, 8, 8))
    new = permute_state_dict(model.state_dict(), s, identity_permutations(s))
    for k, v in model.state_dict().items():
        assert torch.equal(new[k], v)


def test_random_permutations_respect_blocks_and_ties() -> None:
    s = discover_structure(TinyViT(dim=12, heads=3), torch.randn(2, 1, 4, 4))
    differ_inside = False
    for seed in range(20):
        perms = random_permutations(s, seed)
        check_permutations(s, perms)
        for tie in s.ties:
            blocks = [perms[n].view(s[n].blocks, -1) for n in tie]
            heads = [b[:, 0] // s[n].block_size for b, n in zip(blocks, tie, strict=True)]
            assert torch.equal(heads[0], heads[1])
            differ_inside |= not torch.equal(
                blocks[0] % s[tie[0]].block_size, blocks[1] % s[tie[1]].block_size
            )
    assert differ_inside  # within-head permutations are independent between tied groups


def test_random_permutations_are_reproducible() -> None:
    s = discover_structure(mlp(), torch.randn(2, 5))
    a, b = random_permutations(s, 7), random_permutations(s, torch.Generator().manual_seed(7))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_check_permutations_errors() -> None:
    s = discover_structure(TinyViT(), torch.randn(2, 1, 4, 4))
    ok = identity_permutations(s)
    with pytest.raises(ValueError, match="unknown groups"):
        check_permutations(s, {**ok, "nope": torch.arange(3)})
    with pytest.raises(ValueError, match=r"shape \(7,\), expected \(8,\)"):
        check_permutations(s, {**ok, "embed": torch.arange(7)})
    with pytest.raises(ValueError, match="not a permutation"):
        check_permutations(s, {**ok, "embed": torch.zeros(8, dtype=torch.long)})
    with pytest.raises(ValueError, match="integer"):
        check_permutations(s, {**ok, "embed": torch.arange(8.0)})
    with pytest.raises(ValueError, match="between its 2 blocks"):
        check_permutations(s, {**ok, "blocks.0.attn.q": torch.tensor([0, 1, 2, 4, 3, 5, 6, 7])})
    swap_heads = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="tied groups"):
        check_permutations(s, {**ok, "blocks.0.attn.q": swap_heads})
    check_permutations(s, {**ok, "blocks.0.attn.q": swap_heads, "blocks.0.attn.v": swap_heads})
    with pytest.raises(ValueError, match="not a permutation"):
        permute(TinyViT(), s, {"embed": torch.ones(8, dtype=torch.long)})


# --------------------------------------------------------------------------------------------------------------
# hand-written structures
# --------------------------------------------------------------------------------------------------------------


def test_hand_written_structure_matches_discovery() -> None:
    model = mlp("batch")
    hand = build_structure(
        model,
        linear_axes("0", None, "h1"),
        norm_axes("1", "h1", running_stats=True),
        linear_axes("3", "h1", "h2"),
        norm_axes("4", "h2", running_stats=True),
        linear_axes("6", "h2", None),
    )
    found = discover_structure(model, torch.randn(2, 5))
    assert [set(g.axes) for g in hand] == [set(g.axes) for g in found]


def test_hand_written_attention_and_conv() -> None:
    model = TinyViT()
    parts = [conv_axes("embed", None, "s"), param_axis("pos", "s", 2)]
    for i in range(2):
        b = f"blocks.{i}"
        parts += [
            norm_axes(f"{b}.ln1", "s"),
            attention_axes(f"{b}.attn", "s", "s", f"qk{i}", f"vo{i}"),
            norm_axes(f"{b}.ln2", "s"),
            linear_axes(f"{b}.mlp.0", "s", f"mlp{i}"),
            linear_axes(f"{b}.mlp.2", f"mlp{i}", "s"),
        ]
    parts += [norm_axes("norm", "s"), linear_axes("head", "s", None)]
    hand = build_structure(
        model,
        *parts,
        blocks={"qk0": 2, "vo0": 2, "qk1": 2, "vo1": 2},
        ties=[("qk0", "vo0"), ("qk1", "vo1")],
    )
    found = discover_structure(model, torch.randn(2, 1, 4, 4))
    assert sorted(sorted(map(str, g.axes)) for g in hand) == sorted(sorted(map(str, g.axes)) for g in found)
    x = torch.randn(3, 1, 4, 4)
    twin = permute(model, hand, random_permutations(hand, 1))
    torch.testing.assert_close(twin(x), model(x))


def test_hand_written_structure_is_checked() -> None:
    with pytest.raises(ValueError, match="names no tensor"):
        build_structure(mlp(), linear_axes("9", None, "h"))
    with pytest.raises(ValueError, match="needs entries"):
        build_structure(mlp(), linear_axes("0", None, "h"), param_axis("2.weight", "h", 1, "in", start=3))
    with pytest.raises(ValueError, match="both permute"):
        build_structure(mlp(), linear_axes("0", None, "h"), linear_axes("0", None, "g"))


# --------------------------------------------------------------------------------------------------------------
# random compositions
# --------------------------------------------------------------------------------------------------------------


class Composed(nn.Module):
    """A small random network: per layer a producer (or two concatenated), an optional norm, an activation,
    and an optional residual add; then global pooling or a flatten into the head."""

    def __init__(
        self, kind: str, widths: list[int], norm: str, act: str, residual: bool, concat: bool, flatten: bool
    ) -> None:
        super().__init__()
        self.kind, self.residual, self.flatten = kind, residual, flatten
        self.widths = widths
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid()}[act]
        cin = 3 if kind != "linear" else 5
        self.branches = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.adds: list[bool] = []  # decided here: a traced forward cannot branch on shapes
        for w in widths:
            parts = [w // 2, w - w // 2] if concat and w >= 2 else [w]
            self.branches.append(nn.ModuleList(self._producer(cin, p) for p in parts))
            self.norms.append(self._norm(norm, w))
            self.adds.append(residual and cin == w)
            cin = w
        spatial = {"linear": 1, "conv1d": 4, "conv2d": 9}[kind]
        self.head = nn.Linear(cin * (spatial if flatten else 1), 2)

    def _producer(self, cin: int, cout: int) -> nn.Module:
        if self.kind == "linear":
            return nn.Linear(cin, cout)
        conv = nn.Conv1d if self.kind == "conv1d" else nn.Conv2d
        return conv(cin, cout, 3, padding=1)

    def _norm(self, norm: str, w: int) -> nn.Module:
        if norm == "none":
            return nn.Identity()
        if norm == "batch":
            return {"linear": nn.BatchNorm1d, "conv1d": nn.BatchNorm1d, "conv2d": nn.BatchNorm2d}[self.kind](
                w
            )
        if norm == "layer":
            return nn.LayerNorm(w) if self.kind == "linear" else nn.GroupNorm(1, w)
        groups = next(g for g in (3, 2, 1) if w % g == 0)
        return nn.GroupNorm(groups, w) if self.kind != "linear" else nn.LayerNorm(w)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for i in range(len(self.widths)):
            outs = [b(h) for b in self.branches[i]]
            y = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
            y = self.act(self.norms[i](y))
            h = h + y if self.adds[i] else y
        if self.kind == "linear" or self.flatten:
            return self.head(torch.flatten(h, 1))
        return self.head(h.mean(dim=(2,) if self.kind == "conv1d" else (2, 3)))


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["linear", "conv1d", "conv2d"]),
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    norm=st.sampled_from(["none", "batch", "layer", "group"]),
    act=st.sampled_from(["relu", "gelu", "tanh", "sigmoid"]),
    residual=st.booleans(),
    concat=st.booleans(),
    flatten=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_compositions_are_permutation_invariant(
    kind: str, widths: list[int], norm: str, act: str, residual: bool, concat: bool, flatten: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    model = Composed(kind, widths, norm, act, residual, concat, flatten)
    shape = {"linear": (5,), "conv1d": (3, 4), "conv2d": (3, 3, 3)}[kind]
    assert_permutation_invariant(model, torch.randn(3, *shape), seed=seed, min_groups=0)
    if norm == "batch":  # batch statistics: same batch, same output in train mode too
        assert_permutation_invariant(model, torch.randn(3, *shape), seed=seed, train=True, min_groups=0)


# --------------------------------------------------------------------------------------------------------------
# the model zoo
# --------------------------------------------------------------------------------------------------------------

_ZOO_NAMES = ["mlp", "vgg", "cnn", "resnet", "vit"]


def _zoo():  # noqa: ANN202 - returns the module or None
    try:
        models = importlib.import_module("mergelab.models")
    except ImportError:
        return None
    return models if hasattr(models, "build_model") and hasattr(models, "list_models") else None


_ZOO = _zoo()
_NAMES = sorted(set(_ZOO_NAMES) | set(_ZOO.list_models() if _ZOO else []))


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 40)], ids=["digits", "mnist1d"])
@pytest.mark.parametrize("name", _NAMES)
def test_zoo_models_are_permutation_invariant(name: str, shape: tuple[int, ...]) -> None:
    if _ZOO is None:
        pytest.skip("model zoo (mergelab.models.build_model) not available yet")
    if name not in _ZOO.list_models():
        pytest.skip(f"{name!r} not registered in the zoo")
    torch.manual_seed(0)
    model = _ZOO.build_model(name, shape, 3, **ZOO_TINY.get(name, {}))
    s = assert_permutation_invariant(model, torch.randn(4, *shape))
    assert all(not (a.param.startswith("head.") and a.role == "out") for g in s for a in g.axes)
    first = next(k for k, v in model.state_dict().items() if v.dim() >= 2)
    assert (first, 1) not in _axes(s)


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("mlp", {"norm": "batchnorm"}),
        ("mlp", {"norm": "layernorm"}),
        ("cnn", {"norm": "groupnorm"}),
        ("cnn", {"norm": "batchnorm"}),
        ("vgg", {"norm": "layernorm"}),
        ("resnet", {"norm": "groupnorm"}),
        ("resnet", {"norm": None}),
        ("resnet", {"norm": "layernorm"}),
    ],
)
def test_zoo_variants(name: str, kw: dict) -> None:
    if _ZOO is None or name not in _ZOO.list_models():
        pytest.skip("model zoo not available yet")
    torch.manual_seed(0)
    model = _ZOO.build_model(name, (1, 8, 8), 3, **{**ZOO_TINY[name], **kw})
    assert_permutation_invariant(model, torch.randn(4, 1, 8, 8))
    assert_permutation_invariant(model, torch.randn(4, 1, 8, 8), train=True)


def test_permute_copies_module_state() -> None:
    model = TinyResNet()
    s = discover_structure(model, torch.randn(2, 1, 8, 8))
    twin = permute(model, s, random_permutations(s, 0))
    assert twin is not model and twin.stem[0].weight is not model.stem[0].weight
    assert copy.deepcopy(s) == s and math.isfinite(float(twin.stem[0].weight.detach().sum()))


def test_param_axes_is_one_cached_index_of_every_axis() -> None:
    s = discover_structure(TinyViT(), torch.randn(2, 1, 4, 4))
    expected: dict[str, list] = {}
    for g in s:
        for a in g.axes:
            expected.setdefault(a.param, []).append((g, a))
    assert s.param_axes is s.param_axes  # built once
    assert {k: list(v) for k, v in s.param_axes.items()} == expected
    assert all(s.axes_of(k) == v for k, v in expected.items()) and s.axes_of("nope") == []


def test_one_validator_for_permute_and_alignments() -> None:
    """permute, to_basis and Alignment.from_permutations reject the same bad permutation the same way."""
    from mergelab.structure import Alignment, to_basis

    s = discover_structure(TinyViT(), torch.randn(2, 1, 4, 4))
    bad = {"blocks.0.attn.q": torch.tensor([0, 1, 2, 4, 3, 5, 6, 7])}
    for call in (
        lambda: permute(TinyViT(), s, bad),
        lambda: to_basis(TinyViT(), s, bad),
        lambda: Alignment.from_permutations(s, [{}, bad]),
    ):
        with pytest.raises(ValueError, match="splits a block: it moves units between its 2 blocks"):
            call()


def test_trace_keeps_modules_marked_fx_leaf_whole() -> None:
    """Discovery knows attention leaves by a class attribute, not by importing the zoo."""
    from mergelab.structure import trace

    class Leaf(nn.Module):
        fx_leaf = True

        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x) * 2

    graph = trace(nn.Sequential(nn.Linear(4, 4), Leaf(), MultiHeadSelfAttention(4, 2))).graph
    called = [n.target for n in graph.nodes if n.op == "call_module"]
    assert called == ["0", "1", "2"]
