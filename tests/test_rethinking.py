"""Stability under scaling, weight-pattern figures, and the ``rethinking`` study end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import mergelab
from mergelab.analysis.stability import (
    noise_model,
    perturb_members,
    plot_stability,
    prediction_metrics,
    scale_model,
    select_members,
    stability_curve,
)
from mergelab.analysis.weight_patterns import (
    class_means,
    class_template_figure,
    plot_pattern_rows,
    template_correlation,
    template_mix_figure,
    unit_template_figure,
    weight_templates,
)
from mergelab.experiments.rethinking import RethinkingConfig
from mergelab.experiments.runner import build_config, run_study
from mergelab.merge.average import average
from mergelab.merge.ensemble import Ensemble
from mergelab.models import build_model


def model(
    arch: str, seed: int, shape: tuple[int, ...] = (1, 8, 8), classes: int = 4, **kw: object
) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, shape, classes, **kw).eval()


def loader(seed: int = 0, n: int = 48, shape: tuple[int, ...] = (1, 8, 8), classes: int = 4) -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]


# -- stability -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mlp", "resnet", "vit"])
def test_scaling_by_one_changes_nothing(arch: str) -> None:
    kw = {
        "mlp": {"width": 8},
        "resnet": {"depth": 8, "width": 0.25},
        "vit": {"dim": 8, "depth": 1, "heads": 2},
    }
    m = model(arch, 0, **kw[arch])
    for scaled in (scale_model(m, 1.0), noise_model(m, 0.0), scale_model(m, 1.0, layers="head")):
        for k, v in m.state_dict().items():
            assert torch.equal(scaled.state_dict()[k], v), k
    data = loader()
    systems = {
        "single": lambda ms: ms[0],
        "soup": average,
        "ens": lambda ms: Ensemble(ms, "probs", copy=False),
    }
    rows = stability_curve(systems, [m, model(arch, 1, **kw[arch])], data, [1.0], members="all")
    for r in rows:
        assert r["agreement"] == 1.0 and r["flip_rate"] == 0.0


@pytest.mark.parametrize("c", [0.01, 0.5, 3.0, 100.0])
def test_linear_model_scaled_with_its_bias_keeps_argmax(c: float) -> None:
    m = model("mlp", 0, depth=0)
    x = torch.randn(32, 1, 8, 8)
    assert torch.equal(scale_model(m, c)(x).argmax(-1), m(x).argmax(-1))


@pytest.mark.parametrize("arch", ["mlp", "vgg"])
@pytest.mark.parametrize("c", [0.1, 7.0, 100.0])
def test_bias_free_relu_net_scaled_by_c_keeps_argmax(arch: str, c: float) -> None:
    # Positive homogeneity: without biases and normalisation, scaling every tensor multiplies the logits by
    # c^(layers). With biases it does not (layer l's activations grow like c^l, its bias like c).
    m = model(arch, 0, **({"width": 16, "depth": 2} if arch == "mlp" else {"width": 0.25}))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    x = torch.randn(32, 1, 8, 8)
    scaled = scale_model(m, c)
    assert torch.equal(scaled(x).argmax(-1), m(x).argmax(-1))
    assert not torch.allclose(scaled(x), m(x))


def test_scaling_only_the_head_keeps_argmax_of_any_net() -> None:
    m = model("resnet", 0, depth=8, width=0.25)  # with BatchNorm
    x = torch.randn(16, 1, 8, 8)
    assert torch.equal(scale_model(m, 50.0, layers="head")(x).argmax(-1), m(x).argmax(-1))


def test_scale_model_scales_the_selected_tensors_only() -> None:
    m = model("resnet", 0, depth=8, width=0.25)
    s = scale_model(m, 3.0, layers="head")
    torch.testing.assert_close(s.head.weight, 3 * m.head.weight)
    torch.testing.assert_close(s.head.bias, 3 * m.head.bias)
    assert torch.equal(s.stem[0].weight, m.stem[0].weight)
    full = scale_model(m, 2.0)
    for k, v in m.state_dict().items():
        expected = v * 2 if v.is_floating_point() else v
        assert torch.equal(full.state_dict()[k], expected), k
    with pytest.raises(ValueError, match="nope"):
        scale_model(m, 2.0, layers=["nope."])


def test_prediction_metrics_and_member_selection() -> None:
    ref = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    new = torch.tensor([[0.0, 2.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    m = prediction_metrics(new, y, ref)
    assert m["agreement"] == pytest.approx(2 / 3)
    assert m["flip_rate"] == pytest.approx(1 / 3)  # sample 0 was right and is now wrong
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert select_members(3, "one") == [0] and select_members(3, "all_but_one") == [0, 1]
    with pytest.raises(ValueError, match="out of range"):
        select_members(2, [5])
    pool = [model("mlp", i, width=8) for i in range(3)]
    pert = perturb_members(pool, "scale", 10.0, members="one")
    assert pert[1] is pool[1] and pert[0] is not pool[0]


def test_scaling_one_member_dominates_the_logit_ensemble() -> None:
    # The scaled member's logits outweigh the others', so the logit ensemble follows it.
    pool = [model("mlp", i, depth=0) for i in range(3)]
    x, _ = loader()[0]
    ens = Ensemble(perturb_members(pool, "scale", 1000.0, members="one"), "logits")
    assert torch.equal(ens(x).argmax(-1), pool[0](x).argmax(-1))


def test_plot_stability_has_one_panel_per_perturbation_and_metric(tmp_path: Path) -> None:
    pool = [model("mlp", i, width=8) for i in range(2)]
    data = loader()
    systems = {"single": lambda ms: ms[0], "soup": average}
    curves = {
        "scale:all": stability_curve(systems, pool, data, [1.0, 10.0], members="all"),
        "noise:one": stability_curve(systems, pool, data, [0.0, 0.5], kind="noise", members="one"),
    }
    res = plot_stability(curves, tmp_path / "s.png", metrics=("accuracy", "nll", "agreement"))
    assert res.n_panels == 6 and res.path.exists()


# -- weight patterns -----------------------------------------------------------------------------------------


def labelled(n: int = 80, classes: int = 4, shape: tuple[int, ...] = (1, 8, 8)) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = torch.randn(n, *shape, generator=g) + y.view(-1, *([1] * len(shape))).float()
    return TensorDataset(x, y)


def test_class_means_and_correlation() -> None:
    ds = labelled()
    means = class_means(ds, 4)
    x, y = ds.tensors
    torch.testing.assert_close(means[2], x[y == 2].mean(0))
    torch.testing.assert_close(class_means([(x[:40], y[:40]), (x[40:], y[40:])], 4), means)
    corr = template_correlation(2 * means + 1, means)
    torch.testing.assert_close(corr.diagonal(), torch.ones(4))


def test_weight_templates_shapes_and_errors() -> None:
    assert tuple(weight_templates(model("mlp", 0, depth=0)).shape) == (4, 1, 8, 8)
    assert tuple(weight_templates(model("mlp", 0, width=8, depth=1)).shape) == (8, 1, 8, 8)
    assert tuple(weight_templates(model("mlp", 0, (1, 40), width=8, depth=1)).shape) == (8, 1, 40)
    assert weight_templates(model("cnn", 0, width=6, kernel=3)).shape == (6, 1, 3, 3)
    with pytest.raises(ValueError, match="input_shape"):
        weight_templates(nn.Sequential(nn.Linear(64, 3)), input_shape=(1, 7, 7))


def test_class_template_figure_panels_and_numbers(tmp_path: Path) -> None:
    ds = labelled()
    models = {"a": model("mlp", 0, depth=0), "b": model("mlp", 1, depth=0)}
    res = class_template_figure(models, ds, tmp_path / "c.png", num_classes=4)
    assert res.n_panels == (2 + 2 + 1) * 4  # raw and centred class means, two models, their average
    assert set(res.numbers) == {"a", "b", "weight average"} and res.path.exists()
    with pytest.raises(ValueError, match="one per class"):
        class_template_figure({"h": model("mlp", 0, width=8, depth=1)}, ds, tmp_path / "x.png", num_classes=4)


@pytest.mark.parametrize(
    ("arch", "shape", "kw"),
    [
        ("mlp", (1, 8, 8), {"width": 12, "depth": 1}),
        ("mlp", (1, 40), {"width": 12, "depth": 1}),
        ("cnn", (1, 8, 8), {"width": 12}),
    ],
)
def test_unit_template_figure(tmp_path: Path, arch: str, shape: tuple[int, ...], kw: dict) -> None:
    a = model(arch, 0, shape, **kw)
    # A permuted copy (same function): aligning undoes the permutation, so the matched average is a's units.
    structure = mergelab.discover_structure(a, torch.zeros(2, *shape))
    g = torch.Generator().manual_seed(0)
    b = mergelab.permute(a, structure, {grp.name: torch.randperm(grp.size, generator=g) for grp in structure})
    res = unit_template_figure([a, b], tmp_path / "p.png", n_units=5)
    assert res.n_panels == (2 + 2) * 5
    assert res.numbers["corr_aligned"] == pytest.approx(1.0, abs=1e-5)
    assert res.numbers["norm_ratio_aligned"] == pytest.approx(1.0, abs=1e-5)
    assert res.numbers["norm_ratio_naive"] < 1.0
    with pytest.raises(ValueError, match="model 1"):
        unit_template_figure([a, model(arch, 1, shape, **{**kw, "width": 7})], tmp_path / "e.png")


def test_template_mix_figure(tmp_path: Path) -> None:
    res = template_mix_figure(
        model("mlp", 0, depth=0), labelled(), [(0, 1), (2, 3)], tmp_path / "m.png", num_classes=4
    )
    assert res.n_panels == 2 * 6
    assert set(res.numbers) == {"0+1", "2+3"}
    with pytest.raises(ValueError, match="out of range"):
        template_mix_figure(model("mlp", 0, depth=0), labelled(), [(0, 9)], tmp_path / "m.png", num_classes=4)


def test_plot_pattern_rows_counts_only_drawn_panels(tmp_path: Path) -> None:
    res = plot_pattern_rows({"a": torch.randn(3, 8, 8), "b": torch.randn(1, 1, 40)}, tmp_path / "r.png")
    assert res.n_panels == 4


# -- statistics and config -----------------------------------------------------------------------------------


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="pool kind"):
        RethinkingConfig(pools=("pretrained", "borrowed"))
    with pytest.raises(ValueError, match="perturbation"):
        RethinkingConfig(stability_perturbations=("shrink:all",))
    cfg = build_config(
        RethinkingConfig, overrides=['model_kwargs={"mlp": {"width": 8}}', "pattern_pairs=[[1, 2]]"]
    )
    assert cfg.arch_kwargs("mlp") == {"width": 8, "depth": 2}
    assert cfg.pattern_pairs == ((1, 2),)


# -- the study -----------------------------------------------------------------------------------------------

TINY = [
    'datasets=["digits"]',
    'archs=["mlp"]',
    "seeds=[0]",
    'pools=["pretrained", "pretrained_random_head", "shared", "independent"]',
    "n_members=[2]",
    "epochs=1",
    "finetune_epochs=1",
    'model_kwargs={"mlp": {"width": 16, "depth": 1}}',
    'stability_archs=["mlp"]',
    'stability_perturbations=["scale:one", "noise:all"]',
    "scale_factors=[1, 100]",
    "noise_levels=[0, 0.5]",
    "pattern_epochs=1",
]


def test_study_runs_end_to_end_tiny(tmp_path: Path) -> None:
    report = run_study("rethinking", tmp_path / "run", overrides=TINY, progress=False)
    text = report.read_text()
    metrics = json.loads((report.parent / "metrics.json").read_text())["metrics"]
    assert "digits / mlp" in text and "Findings at this scale" in text
    assert text.index("Claims and verdicts") < text.index("digits / mlp")
    # one seed: no interval, so no claim can be decided
    assert metrics["claims"] and all(c["verdict"] == "inconclusive" for c in metrics["claims"])
    for pool in ("pretrained", "pretrained_random_head", "shared", "independent"):
        assert f"digits/mlp/{pool}/N=2" in metrics["tables"]
    cell = metrics["tables"]["digits/mlp/shared/N=2"]
    assert {"soup", "greedy soup", "logit ens.", "feat. ens. (avg head)", "greedy ens."} <= set(cell)
    for png in (
        "stability_digits_mlp.png",
        "patterns_classes_digits.png",
        "patterns_mix_digits.png",
        "patterns_units_digits_mlp_independent.png",
    ):
        assert (report.parent / png).exists(), png
        assert f"]({png})" in text


@pytest.mark.slow
def test_study_two_datasets_two_archs(tmp_path: Path) -> None:
    overrides = [
        o for o in TINY if not o.startswith(("datasets", "archs", "model_kwargs", "stability_archs"))
    ]
    overrides += [
        'datasets=["digits", "mnist1d"]',
        'archs=["mlp", "cnn"]',
        'stability_archs=["cnn"]',
        'model_kwargs={"mlp": {"width": 16}, "cnn": {"width": 4}}',
        "n_members=[2, 3]",
        "seeds=[0, 1]",
    ]
    report = run_study("rethinking", tmp_path / "run", overrides=overrides, progress=False)
    metrics = json.loads((report.parent / "metrics.json").read_text())["metrics"]
    assert "mnist1d/cnn/independent/N=3" in metrics["tables"]
    assert (report.parent / "stability_mnist1d_cnn.png").exists()
    assert not (report.parent / "stability_mnist1d_cnn_seed1.png").exists()
    assert all(c["interval"]["n"] == 2 for c in metrics["claims"])
    assert (report.parent / "patterns_units_mnist1d_cnn_independent.png").exists()
