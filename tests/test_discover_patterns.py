"""Structure discovery on hand-written modules that reproduce torchvision/timm/LLM patterns.

No torchvision or timm dependency: each module below is a small copy of the pattern as those libraries write
it. Every test permutes every discovered group at random (float64, norm affines and running statistics set to
non-constant values) and checks the outputs do not move, then checks the symmetry each pattern really has.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergelab.structure import Structure, discover_structure, permute, random_permutations


def _randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + 1.0)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def check(model: nn.Module, x: Tensor, seeds: tuple[int, ...] = (0, 1)) -> Structure:
    """Discover, permute every group at random, and require identical outputs."""
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x
    _randomize(model)
    s = discover_structure(model, x)
    assert len(s) > 0, s.explain()
    with torch.no_grad():
        y = model(x)
        for seed in seeds:
            y2 = permute(model, s, random_permutations(s, seed))(x)
            torch.testing.assert_close(y2, y, rtol=1e-9, atol=1e-10)
    return s


def _group(s: Structure, param: str, dim: int = 0, role: str = "out") -> str:
    (name,) = {g.name for g in s for a in g.axes if (a.param, a.dim, a.role) == (param, dim, role)}
    return name


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth as timm/torchvision write it: the identity at inference."""
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), dtype=x.dtype) > p
    return x * keep / (1 - p)


# ---------------------------------------------------------------------------------------------- transformers


class PackedAttention(nn.Module):
    """timm ``Attention``: one ``qkv`` Linear, reshaped to (3, heads, head_dim), ``unbind(0)``, hand-written core."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (b, h, n, d)
        attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class ChunkAttention(nn.Module):
    """A packed projection split with ``chunk`` and the fused ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    """Pre-norm block with layer scale and stochastic depth (timm ``Block`` with ``init_values``)."""

    def __init__(self, dim: int, heads: int, attn: type[nn.Module]) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attn(dim, heads)
        self.ls1 = nn.Parameter(torch.rand(dim) + 0.5)
        self.ls2 = nn.Parameter(torch.rand(dim) + 0.5)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + drop_path(self.ls1 * self.attn(self.norm1(x)), 0.1, self.training)
        return x + drop_path(self.ls2 * self.mlp(self.norm2(x)), 0.1, self.training)


class TimmViT(nn.Module):
    def __init__(self, attn: type[nn.Module], dim: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.patch = nn.Conv2d(2, dim, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 5, dim))
        self.blocks = nn.Sequential(ViTBlock(dim, heads, attn), ViTBlock(dim, heads, attn))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def _assert_heads(s: Structure, qkv: str, proj: str, heads: int) -> None:
    """q/k share one group, v/o another; both move ``heads`` blocks and are tied."""
    qk = _group(s, qkv, 0) if len({g.name for g in s for a in g.axes if a.param == qkv}) == 1 else None
    groups = [g for g in s if any(a.param == qkv and a.role == "out" for a in g.axes)]
    assert qk is None and len(groups) == 2, [g.name for g in groups]
    first, second = groups
    assert sorted(a.start for a in first.axes if a.param == qkv) == [0, first.size]  # q and k
    assert first.blocks == second.blocks == heads
    assert {first.name, second.name} <= set(s.tie_of(first.name))
    assert any(a.param == proj and a.role == "in" for a in second.axes)


def test_timm_packed_qkv_attention_with_layer_scale_and_drop_path() -> None:
    s = check(TimmViT(PackedAttention), torch.randn(2, 2, 4, 4))
    for i in range(2):
        _assert_heads(s, f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.proj.weight", 3)
    stream = {(a.param, a.dim) for a in s["patch"].axes}
    assert {("cls", 2), ("pos", 2), ("blocks.0.ls1", 0), ("blocks.1.ls2", 0), ("norm.weight", 0)} <= stream
    assert s.coverage() == 1.0


def test_chunked_qkv_with_fused_attention() -> None:
    s = check(TimmViT(ChunkAttention), torch.randn(2, 2, 4, 4))
    for i in range(2):
        _assert_heads(s, f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.out.weight", 3)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    """RMSNorm written out as LLM code does: ``pow``/``mean``/``rsqrt``/``mul``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class GQARotaryAttention(nn.Module):
    """Grouped-query attention with rotary embeddings and ``repeat_interleave`` for the shared kv heads."""

    def __init__(self, dim: int, heads: int, kv_heads: int, tokens: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        inv = 1.0 / (10000 ** (torch.arange(0, self.d, 2).double() / self.d))
        ang = torch.outer(torch.arange(tokens).double(), inv)
        ang = torch.cat([ang, ang], dim=-1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, self.d).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv_heads, self.d).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv_heads, self.d).transpose(1, 2)
        q = q * self.cos + rotate_half(q) * self.sin
        k = k * self.cos + rotate_half(k) * self.sin
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-1, -2) / math.sqrt(self.d)).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, c))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class TinyLM(nn.Module):
    """Token and learned position embeddings, RMSNorm, GQA + rotary, SwiGLU, an LM head tied to the embedding."""

    def __init__(
        self, vocab: int = 11, dim: int = 16, heads: int = 4, kv_heads: int = 2, tokens: int = 6
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(tokens, dim)
        self.n1, self.n2, self.nf = RMSNorm(dim), RMSNorm(dim), RMSNorm(dim)
        self.attn = GQARotaryAttention(dim, heads, kv_heads, tokens)
        self.mlp = SwiGLU(dim, 24)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        x = x + self.attn(self.n1(x))
        x = x + self.mlp(self.n2(x))
        return self.lm_head(self.nf(x))


def test_rmsnorm_gqa_rotary_swiglu_tied_head() -> None:
    ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))
    s = check(TinyLM(), ids)
    stream = {(a.param, a.dim) for a in s["emb"].axes}
    assert {
        ("emb.weight", 1),
        ("lm_head.weight", 1),
        ("pos.weight", 1),
        ("n1.weight", 0),
        ("nf.weight", 0),
    } <= stream
    # rotary fixes the q/k dims inside a head; with GQA a kv head moves with its two query heads
    heads = s[_group(s, "attn.k.weight")]
    assert heads.size == 2
    inner = {a.param: a.inner for a in heads.axes}
    assert inner == {"attn.q.weight": 8, "attn.k.weight": 4, "attn.v.weight": 4, "attn.o.weight": 8}
    assert _group(s, "mlp.gate.weight") == _group(s, "mlp.up.weight")


def test_rotary_fixes_qk_dims_but_not_heads_or_value_dims() -> None:
    ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))
    s = check(TinyLM(heads=4, kv_heads=4), ids)
    qk, vo = s[_group(s, "attn.q.weight")], s[_group(s, "attn.v.weight")]
    # q/k: whole heads (4 dims each) move, tied to the value heads; v/o dims move freely inside each head
    assert (qk.size, qk.blocks, {a.inner for a in qk.axes}) == (4, 4, {4})
    assert (vo.size, vo.blocks, {a.inner for a in vo.axes}) == (16, 4, {1})
    assert s.tie_of(qk.name) == (qk.name, vo.name)


class WindowAttention(nn.Module):
    """Swin window attention: windows by view/permute, a relative position bias table indexed by a buffer."""

    def __init__(self, dim: int = 8, heads: int = 2, window: int = 2) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads))
        coords = torch.stack(
            torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        ).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("index", rel[..., 0] * (2 * window - 1) + rel[..., 1])

    def forward(self, x: Tensor) -> Tensor:  # (b, h, w, c)
        b, hh, ww, c = x.shape
        s = self.window
        x = x.view(b, hh // s, s, ww // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)
        n = x.shape[1]
        qkv = self.qkv(x).reshape(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        attn = (attn + bias.unsqueeze(0)).softmax(-1)
        x = (attn @ v).transpose(1, 2).reshape(-1, n, c)
        x = self.proj(x).view(b, hh // s, ww // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, c)
        return x


class SwinLike(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Conv2d(2, dim, 1)
        self.norm = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x).permute(0, 2, 3, 1)
        h = h + self.attn(self.norm(h))
        return self.head(h.mean((1, 2)))


def test_window_attention_relative_position_bias_follows_heads() -> None:
    s = check(SwinLike(), torch.randn(2, 2, 4, 4))
    table = s[_group(s, "attn.table", 1)]
    assert table.size == table.blocks == 2
    tie = s.tie_of(table.name)
    assert len(tie) == 3  # the bias table's heads, query/key heads, value/output heads
    _assert_heads(s, "attn.qkv.weight", "attn.proj.weight", 2)


# ---------------------------------------------------------------------------------------------------- CNNs


class SqueezeExcite(nn.Module):
    def __init__(self, ch: int, hidden: int, gate: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.fc1, self.fc2, self.gate = nn.Conv2d(ch, hidden, 1), nn.Conv2d(hidden, ch, 1), gate()

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """MobileNetV3: expand, depthwise, squeeze-excite (hard sigmoid), project, residual."""

    def __init__(self, ch: int = 4, expand: int = 8) -> None:
        super().__init__()
        self.expand = nn.Sequential(
            nn.Conv2d(ch, expand, 1, bias=False), nn.BatchNorm2d(expand), nn.Hardswish()
        )
        self.dw = nn.Sequential(
            nn.Conv2d(expand, expand, 3, padding=1, groups=expand, bias=False),
            nn.BatchNorm2d(expand),
            nn.Hardswish(),
        )
        self.se = SqueezeExcite(expand, 3, nn.Hardsigmoid)
        self.project = nn.Sequential(nn.Conv2d(expand, ch, 1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x: Tensor) -> Tensor:
        return x + drop_path(self.project(self.se(self.dw(self.expand(x)))), 0.2, self.training)


class MobileNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(), InvertedResidual())
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def test_depthwise_squeeze_excite_stochastic_depth() -> None:
    s = check(MobileNetLike(), torch.randn(2, 2, 5, 5))
    assert s.coverage() == 1.0
    for i in range(2):
        # the depthwise conv, its norm and the SE gate's output all live in the expansion's units
        e = _group(s, f"blocks.{i}.expand.0.weight")
        assert e == _group(s, f"blocks.{i}.dw.0.weight") == _group(s, f"blocks.{i}.se.fc2.weight")
        assert _group(s, f"blocks.{i}.se.fc1.weight") != e
    assert _group(s, "stem.0.weight") == _group(s, "blocks.1.project.0.weight")  # the residual stream


class RegNetBlock(nn.Module):
    """RegNet/ResNeXt bottleneck: 1x1, 3x3 grouped conv, squeeze-excite, 1x1, residual."""

    def __init__(self, ch: int = 6, width: int = 8, groups: int = 2) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(ch, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.b = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.se = SqueezeExcite(width, 2)
        self.c = nn.Sequential(nn.Conv2d(width, ch, 1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.c(self.se(self.b(self.a(x)))))


class RegNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.blocks = nn.Sequential(RegNetBlock(), RegNetBlock())
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_grouped_convolution_moves_groups_as_blocks() -> None:
    s = check(RegNetLike(), torch.randn(2, 2, 4, 4))
    assert s.coverage() == 1.0
    for i in range(2):
        inp = s[_group(s, f"blocks.{i}.a.0.weight")]
        out = s[_group(s, f"blocks.{i}.b.0.weight")]
        # the grouped conv's input units are whole groups (4 channels), its output 2 blocks of 4, tied
        assert inp.size == 2 and {a.inner for a in inp.axes if a.param == f"blocks.{i}.a.0.weight"} == {4}
        assert out.size == 8 and out.blocks == 2 and s.tie_of(out.name) == (inp.name, out.name)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, channels-last LayerNorm and MLP, layer scale, stochastic depth."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1, self.pw2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = (self.gamma * self.pw2(F.gelu(self.pw1(y)))).permute(0, 3, 1, 2)
        return x + drop_path(y, 0.1, self.training)


class ConvNeXtLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 2, stride=2)
        self.blocks = nn.Sequential(ConvNeXtBlock(), ConvNeXtBlock())
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_convnext_block() -> None:
    s = check(ConvNeXtLike(), torch.randn(2, 2, 6, 6))
    assert s.coverage() == 1.0
    stream = {(a.param, a.dim) for a in s["stem"].axes}
    assert {("blocks.0.dw.weight", 0), ("blocks.0.norm.weight", 0), ("blocks.1.gamma", 0)} <= stream


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split channels in two, transform one half, concatenate, shuffle."""

    def __init__(self, ch: int = 8) -> None:
        super().__init__()
        half = ch // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half),
            nn.BatchNorm2d(half),
        )

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([a, self.branch(b)], dim=1), 2)


class ShuffleNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 8, 1)
        self.units = nn.Sequential(ShuffleUnit(), ShuffleUnit())
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.units(self.stem(x)).mean((2, 3)))


def test_channel_shuffle_keeps_its_symmetry() -> None:
    s = check(ShuffleNetLike(), torch.randn(2, 2, 3, 3))
    # the shuffle interleaves the two halves: they keep their symmetry by sharing one permutation (the first
    # unit); where the halves' units differ in width (the second unit), they stay fixed, with the reason said
    assert s.coverage() >= 0.5
    assert {f.reason.split(":")[0] for f in s.fixed if f.hidden} == {
        "aten.view.default at node 'view_2' (module 'units.1')"
    }
    first = s[_group(s, "units.0.branch.0.weight", 1, "in")]
    assert any(a.param == "stem.weight" for a in first.axes)
