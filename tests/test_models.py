"""Contract tests for the model zoo: one set of properties checked on every registered architecture."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx
from torch import nn

from mergelab.models import ARCHITECTURES, build_from_spec, build_model, list_models, register_model
from mergelab.models.attention import MultiHeadSelfAttention

DIGITS = (1, 8, 8)
MNIST1D = (1, 40)
SHAPES = {"digits": DIGITS, "mnist1d": MNIST1D}

# Tiny settings so the whole file runs in seconds; architectures without an entry use their defaults.
TINY: dict[str, dict] = {
    "mlp": {"width": 8, "depth": 2},
    "cnn": {"width": 4},
    "vgg": {"width": 0.125},
    "resnet": {"depth": 8, "width": 0.25},
    "vit": {"dim": 8, "depth": 1, "heads": 2},
}
CASES = [(arch, kind) for arch in list_models() for kind in SHAPES]
IDS = [f"{a}-{k}" for a, k in CASES]


def _tiny(arch: str, shape: tuple[int, ...], num_classes: int = 3, **kw: object) -> nn.Module:
    return build_model(arch, shape, num_classes, **{**TINY.get(arch, {}), **kw})


def _x(shape: tuple[int, ...], n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- contract: every registered model x both input kinds --------------------------------------------------


def test_registry_lists_the_zoo() -> None:
    assert {"mlp", "cnn", "vgg", "resnet", "vit"} <= set(list_models())
    assert list_models() == sorted(ARCHITECTURES)
    assert list_models("v*") == ["vgg", "vit"]
    assert list_models("nothing*") == []


@pytest.mark.parametrize(("arch", "kind"), CASES, ids=IDS)
def test_forward_shape_and_head(arch: str, kind: str) -> None:
    shape = SHAPES[kind]
    model = _tiny(arch, shape, num_classes=5)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 5
    x = _x(shape)
    model.train()
    assert model(x).shape == (4, 5)  # train mode runs (BatchNorm uses batch statistics)
    model.eval()
    with torch.no_grad():
        out = model(x)
        feats = model.features(x)
    assert out.shape == (4, 5)
    assert feats.shape == (4, model.head.in_features)
    torch.testing.assert_close(model.head(feats), out)


@pytest.mark.parametrize(("arch", "kind"), CASES, ids=IDS)
def test_fx_trace_matches(arch: str, kind: str) -> None:
    shape = SHAPES[kind]
    model = _tiny(arch, shape).eval()
    traced = torch.fx.symbolic_trace(model)
    x = _x(shape, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    # The trace reads parameters through modules, so merging code can map graph nodes to state_dict keys.
    assert any(n.op == "call_module" and n.target == "head" for n in traced.graph.nodes)


@pytest.mark.parametrize(("arch", "kind"), CASES, ids=IDS)
def test_spec_is_json_and_rebuilds(arch: str, kind: str) -> None:
    shape = SHAPES[kind]
    model = _tiny(arch, shape)
    spec = model.mergelab_spec
    assert spec["arch"] == arch and spec["input_shape"] == list(shape) and spec["num_classes"] == 3
    text = json.dumps(spec)
    assert json.loads(text) == spec
    rebuilt = build_from_spec(json.loads(text))
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    assert _shapes(rebuilt) == _shapes(model)
    assert rebuilt.mergelab_spec == spec
    # Loading the weights into the rebuild gives the same function.
    rebuilt.load_state_dict(model.state_dict())
    x = _x(shape)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))


@pytest.mark.parametrize(("arch", "kind"), CASES, ids=IDS)
def test_seed_determines_weights(arch: str, kind: str) -> None:
    shape = SHAPES[kind]
    torch.manual_seed(7)
    a = _tiny(arch, shape)
    torch.manual_seed(7)
    b = _tiny(arch, shape)
    torch.manual_seed(8)
    c = _tiny(arch, shape)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize(("arch", "kind"), CASES, ids=IDS)
def test_layers_match_input_kind(arch: str, kind: str) -> None:
    model = _tiny(arch, SHAPES[kind])
    types = {type(m) for m in model.modules()}
    wrong = {nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d} if kind == "mnist1d" else {nn.Conv1d, nn.BatchNorm1d}
    assert not types & wrong


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("arch", ["mlp", "cnn", "vgg", "resnet", "vit"])
def test_defaults_build_for_both_kinds(arch: str, kind: str) -> None:
    shape = SHAPES[kind]
    model = build_model(arch, shape, 10).eval()
    with torch.no_grad():
        assert model(_x(shape, n=2)).shape == (2, 10)


# --- norms and options ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize(
    ("arch", "norm"),
    [
        ("mlp", "layernorm"),
        ("mlp", "batchnorm"),
        ("cnn", "batchnorm"),
        ("vgg", "batchnorm"),
        ("vgg", "layernorm"),
        ("resnet", None),
        ("resnet", "layernorm"),
        ("resnet", "groupnorm"),
    ],
)
def test_norm_variants_trace(arch: str, norm: str | None, kind: str) -> None:
    shape = SHAPES[kind]
    model = _tiny(arch, shape, norm=norm).eval()
    x = _x(shape)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))
    norms = [
        m
        for m in model.modules()
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm))
    ]
    assert bool(norms) == (norm is not None)
    if norm == "layernorm" and arch != "mlp":
        assert all(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in norms)
    if norm == "groupnorm":
        assert all(isinstance(m, nn.GroupNorm) and m.num_groups > 1 for m in norms)


def test_mlp_layout_and_linear_model() -> None:
    model = build_model("mlp", DIGITS, 10, width=16, depth=3)
    linears = [m for m in model.layers if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and linears[0].in_features == 64
    assert "layers.0.weight" in model.state_dict()
    linear = build_model("mlp", MNIST1D, 10, depth=0)
    assert list(linear.state_dict()) == ["head.weight", "head.bias"]
    assert linear.head.in_features == 40


def test_vgg_pools_only_where_size_allows() -> None:
    def pools(shape: tuple[int, ...]) -> int:
        model = build_model("vgg", shape, 2, width=0.125, cfg="vgg11")
        return sum(isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) for m in model.modules())

    assert pools((1, 8, 8)) == 3  # 8 -> 4 -> 2 -> 1, then no more
    assert pools((1, 40)) == 5  # 40 -> 20 -> 10 -> 5 -> 2 -> 1
    assert pools((1, 2, 2)) == 1
    assert pools((1, 1)) == 0
    assert build_model("vgg", (3, 1, 1), 2, width=0.125)(torch.zeros(2, 3, 1, 1)).shape == (2, 2)


def test_cnn_flattens_its_last_map() -> None:
    model = build_model("cnn", MNIST1D, 10, width=8, kernel=5)
    assert model.feature_shape == (8, 5)  # 40 -> 20 -> 10 -> 5
    assert model.head.in_features == 40
    assert build_model("cnn", DIGITS, 10, width=8).feature_shape == (8, 1, 1)


def test_resnet_blocks_and_shortcuts() -> None:
    model = build_model("resnet", DIGITS, 10, depth=20, width=2)
    blocks = [b for stage in model.stages for b in stage]
    assert len(blocks) == 9
    projections = [b for b in blocks if len(b.shortcut) > 0]
    assert len(projections) == 2  # only at the two stage transitions
    assert model.head.in_features == 128
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)][0] == 32


def test_vit_tokens_and_attention() -> None:
    assert build_model("vit", DIGITS, 10).num_tokens == 16  # patch 2 on 8x8
    assert build_model("vit", MNIST1D, 10).num_tokens == 10  # patch 4 on length 40
    model = build_model("vit", DIGITS, 10, dim=8, depth=2, heads=2, patch=4)
    assert model.num_tokens == 4 and model.pos_embed.shape == (1, 4, 8)
    assert isinstance(model.pos_embed, nn.Parameter)
    assert sum(isinstance(m, MultiHeadSelfAttention) for m in model.modules()) == 2


# --- errors -----------------------------------------------------------------------------------------------


def test_unknown_architecture_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet18'.*'mlp'"):
        build_model("resnet18", DIGITS, 10)


def test_unknown_option_is_named() -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['widht'\].*valid options"):
        build_model("mlp", DIGITS, 10, widht=32)


@pytest.mark.parametrize("shape", [(64,), (1, 1, 8, 8), (), (1, 0, 8), (1, 8.0, 8)])
def test_bad_input_shape(shape: tuple) -> None:
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mlp", shape, 10)


@pytest.mark.parametrize(
    ("arch", "kw", "pattern"),
    [
        ("mlp", {"norm": "groupnorm"}, "unknown norm 'groupnorm'"),
        ("mlp", {"act": "swish"}, "unknown act 'swish'"),
        ("vgg", {"cfg": "huge"}, "unknown cfg 'huge'"),
        ("vgg", {"width": 0}, "width"),
        ("resnet", {"depth": 18}, "depth must be 6n"),
        ("resnet", {"norm": "instance"}, "unknown norm 'instance'"),
        ("vit", {"dim": 10, "heads": 4}, "heads=4 does not divide dim=10"),
        ("vit", {"patch": 16}, "patch=16"),
    ],
)
def test_bad_options(arch: str, kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        build_model(arch, DIGITS, 10, **kw)


def test_bad_num_classes_and_spec() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", DIGITS, 0)
    with pytest.raises(ValueError, match="lacks"):
        build_from_spec({"arch": "mlp"})


def test_register_model_rejects_duplicates_and_bad_signatures() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register_model("mlp")(ARCHITECTURES["mlp"])
    with pytest.raises(TypeError, match="input_shape, num_classes"):
        register_model("_test_bad")(lambda num_classes: nn.Linear(1, num_classes))
    assert "_test_bad" not in ARCHITECTURES


def test_register_model_adds_a_buildable_arch() -> None:
    def tiny_linear(input_shape: tuple[int, ...], num_classes: int, *, bias: bool = True) -> nn.Module:
        return build_model("mlp", input_shape, num_classes, depth=0)

    try:
        register_model("_test_linear")(tiny_linear)
        model = build_model("_test_linear", MNIST1D, 4)
        assert model.mergelab_spec == {
            "arch": "_test_linear",
            "input_shape": [1, 40],
            "num_classes": 4,
            "kwargs": {"bias": True},
        }
        with pytest.raises(TypeError, match="not JSON-serialisable"):
            build_model("_test_linear", MNIST1D, 4, bias=object())
    finally:
        ARCHITECTURES.pop("_test_linear", None)


@pytest.mark.parametrize("module", ["registry", "mlp", "vgg", "resnet", "vit"])
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"mergelab.models.{module}"))
    assert result.failed == 0 and result.attempted > 0
