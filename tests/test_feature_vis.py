"""Feature visualization: unit selection, activation maximisation, Fourier parameterisation, streamed top-k,
endpoint-vs-merge comparison, and the ``features`` study end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mergelab.analysis.feature_vis import (
    ActMaxConfig,
    activation_maximization,
    compare_units,
    endpoint_models,
    fourier_scale,
    image_to_spectrum,
    plot_comparison,
    select_units,
    similarity_rows,
    spectrum_to_image,
    top_k_examples,
    unit_activations,
    unit_correlation,
    visual_similarity,
)
from mergelab.experiments.features import dominance, unit_stats
from mergelab.experiments.runner import run_study
from mergelab.models import build_model

FAST = ActMaxConfig(steps=30, lr=0.1)


def model(arch: str, seed: int, shape: tuple[int, ...] = (1, 8, 8), **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, shape, 4, **kw).eval()


def batches(shape: tuple[int, ...] = (1, 8, 8), n: int = 50, size: int = 16, seed: int = 0) -> list:
    """Uneven batches of (x, y): the stream must not depend on batch boundaries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


# -- selection -----------------------------------------------------------------------------------------------


def test_select_by_module_and_group() -> None:
    m = model("cnn", 0, width=6)
    sel = select_units(m, "blocks.2", [1, 4])
    assert (sel.module, sel.units, sel.size, sel.dim, sel.input_shape) == (
        "blocks.2",
        (1, 4),
        6,
        1,
        (1, 8, 8),
    )
    assert select_units(m, "blocks.2").units == tuple(range(6))
    # "blocks.4" is also a group; by="group" reads its probe, which sits after a flatten: the module before it.
    grp = select_units(m, "blocks.4", 2, by="group")
    assert grp.group == "blocks.4" and grp.module == "blocks.5" and grp.units == (0, 1)
    mlp = model("mlp", 0, width=8, depth=2)
    assert select_units(mlp, "layers.0", by="group").module == "layers.1"  # the ReLU after the Linear


def test_unit_activations_average_positions_and_tokens() -> None:
    m = model("cnn", 0, width=6)
    x = torch.randn(3, 1, 8, 8)
    sel = select_units(m, "blocks.0", [0, 5])
    assert torch.allclose(unit_activations(m, sel, x), m.blocks[0](x).mean((2, 3))[:, [0, 5]])
    vit = model("vit", 0, dim=8, depth=1, heads=2)
    blocks = [n for n, _ in vit.named_modules() if n.endswith("mlp") or n.endswith("norm")]
    tok = select_units(vit, blocks[0], [0, 7], dim=-1)
    assert tok.size == 8 and unit_activations(vit, tok, torch.randn(2, 1, 8, 8)).shape == (2, 2)


def test_unknown_module_and_bad_units_raise() -> None:
    m = model("mlp", 0, width=8, depth=2)
    with pytest.raises(ValueError, match="layers.9"):
        select_units(m, "layers.9", [0])
    with pytest.raises(ValueError, match="no module 'nope'"):
        select_units(m, "nope", [0], by="module")
    with pytest.raises(ValueError, match=r"unit index \[8\] out of range for module 'layers.2'"):
        select_units(m, "layers.2", [0, 8])
    with pytest.raises(ValueError, match="out of range"):
        select_units(m, "layers.2", [-1])
    with pytest.raises(ValueError, match="dim=0 is not a unit axis of module 'layers.2'"):
        select_units(m, "layers.2", [0], dim=0)
    with pytest.raises(ValueError, match="by="):
        select_units(m, "layers.2", [0], by="layer")  # type: ignore[arg-type]


# -- Fourier parameterisation --------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(40,), (7,), (8, 8), (5, 6)])
def test_fourier_round_trip(spatial: tuple[int, ...]) -> None:
    x = torch.randn(3, 2, *spatial)
    spec = image_to_spectrum(x, len(spatial), decay=1.0)
    assert spec.is_complex() and spec.shape[-1] == spatial[-1] // 2 + 1
    back = spectrum_to_image(spec, spatial, decay=1.0)
    assert back.shape == x.shape
    assert torch.allclose(back, x, atol=1e-5)
    # the real (…, 2) form used as a parameter gives the same image
    assert torch.allclose(spectrum_to_image(torch.view_as_real(spec), spatial), back, atol=1e-6)


def test_fourier_scale_is_pink_and_normalised() -> None:
    s = fourier_scale((16, 16), decay=1.0)
    assert s.shape == (16, 9)
    assert torch.isclose(s.pow(2).mean(), torch.tensor(1.0))
    assert s[0, 0] > s[0, 4] > s[8, 8]  # low frequencies get the larger steps
    assert torch.allclose(fourier_scale((10,), decay=0.0), torch.ones(6))


# -- activation maximisation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "shape", "layer", "fourier"),
    [
        ("mlp", (1, 8, 8), "layers.2", True),
        ("cnn", (1, 8, 8), "blocks.2", False),
        ("cnn", (1, 40), "blocks.0", True),
        ("mlp", (1, 40), "layers.0", False),
    ],
)
def test_actmax_increases_activation(arch: str, shape: tuple[int, ...], layer: str, fourier: bool) -> None:
    kw = {"width": 8, "depth": 2} if arch == "mlp" else {"width": 6}
    m = model(arch, 0, shape, **kw)
    sel = select_units(m, layer, [0, 1, 3])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = ActMaxConfig(steps=30, lr=0.1, l2=0.01, tv=0.01, init_std=1.0, fourier=fourier)
    res = activation_maximization(m, sel, cfg)
    assert res.images.shape == (3, *shape) and res.history.shape == (3, 30)
    gain = res.activations - res.initial_activations
    assert (gain > 0).all() and gain.mean() > 0.1, gain
    # the reported activation is the unit's activation on its own image
    assert torch.allclose(unit_activations(m, sel, res.images).diagonal(), res.activations, atol=1e-5)
    # the model is untouched: same weights, no gradients, eval mode kept
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in m.parameters())


def test_actmax_is_seeded_and_respects_value_range() -> None:
    m = model("cnn", 0, width=6)
    sel = select_units(m, "blocks.2", [0, 2])
    cfg = ActMaxConfig(steps=15, jitter=2, value_range=(-0.5, 1.5), seed=3)
    a, b = activation_maximization(m, sel, cfg), activation_maximization(m, sel, cfg)
    assert torch.equal(a.images, b.images) and torch.equal(a.history, b.history)
    other = activation_maximization(m, sel, ActMaxConfig(steps=15, jitter=2, value_range=(-0.5, 1.5), seed=4))
    assert not torch.equal(a.images, other.images)
    assert a.images.min() >= -0.5 and a.images.max() <= 1.5


def test_actmax_restores_train_mode() -> None:
    m = model("mlp", 0, width=8, depth=2, norm="batchnorm").train()
    activation_maximization(m, select_units(m, "layers.3", [0]), ActMaxConfig(steps=3))
    assert all(mod.training for mod in m.modules())


def test_actmax_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="value_range"):
        ActMaxConfig(value_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="non-negative"):
        ActMaxConfig(steps=-1)


# -- top-k ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 60])
def test_topk_streaming_equals_all_at_once(k: int) -> None:
    m = model("cnn", 0, width=6)
    sel = select_units(m, "blocks.2", [0, 3, 5])
    data = batches()
    tk = top_k_examples(m, sel, data, k=k)
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        acts = unit_activations(m, sel, x).T  # (U, N)
    vals, idx = torch.sort(acts, dim=1, descending=True, stable=True)
    kk = min(k, x.shape[0])
    assert torch.equal(tk.indices, idx[:, :kk])
    assert torch.allclose(tk.values, vals[:, :kk])
    assert torch.equal(tk.examples, x[idx[:, :kk]])
    assert torch.allclose(tk.mean, x[idx[:, :kk]].mean(1))
    # inputs-only batches give the same answer
    assert torch.equal(top_k_examples(m, sel, [b[0] for b in data], k=k).indices, tk.indices)


def test_topk_ties_prefer_earlier_samples_and_empty_data_raises() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.zero_()  # every sample ties
    sel = select_units(net, "1", input_shape=(1, 4))
    tk = top_k_examples(net, sel, batches((1, 4), n=10, size=3), k=4)
    assert tk.indices.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="empty"):
        top_k_examples(net, sel, [], k=2)


# -- comparison ----------------------------------------------------------------------------------------------


def test_visual_similarity_properties() -> None:
    a = torch.randn(4, 1, 6, 6)
    assert torch.allclose(visual_similarity(a, 3 * a - 1), torch.ones(4), atol=1e-5)
    assert torch.allclose(visual_similarity(a, -a), -torch.ones(4), atol=1e-5)
    assert torch.equal(visual_similarity(a, torch.zeros_like(a)), torch.zeros(4))
    shifted = torch.roll(a, 1, dims=3)
    assert (visual_similarity(a, shifted, max_shift=1) > 0.999).all()
    with pytest.raises(ValueError, match="shapes"):
        visual_similarity(a, a[:2])


def test_endpoint_models_merge_in_aligned_basis() -> None:
    a, b = model("mlp", 0, width=8, depth=2), model("mlp", 1, width=8, depth=2)
    ms = endpoint_models(a, b, example_input=torch.zeros(2, 1, 8, 8))
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(ms["B'"](x), b(x), atol=1e-5)  # B' is B, relabelled
    for k, v in ms["merged"].state_dict().items():
        assert torch.allclose(v, (a.state_dict()[k] + ms["B'"].state_dict()[k]) / 2)
    for k, v in ms["naive"].state_dict().items():
        assert torch.allclose(v, (a.state_dict()[k] + b.state_dict()[k]) / 2)
    # a model merged with itself: every picture of it equals the endpoint's
    same = endpoint_models(a, a, example_input=torch.zeros(2, 1, 8, 8))
    cmp = compare_units(same, "layers.2", [0, 1, 2], config=FAST)
    assert torch.allclose(cmp.similarity("A", "merged"), torch.ones(3), atol=1e-4)


def test_compare_units_rows_and_figure(tmp_path: Path) -> None:
    a, b = model("cnn", 0, (1, 40), width=6), model("cnn", 1, (1, 40), width=6)
    ms = endpoint_models(a, b, example_input=torch.zeros(2, 1, 40))
    data = batches((1, 40))
    cmp = compare_units(ms, "blocks.2", [0, 1, 2], data=data, config=FAST, k=4)
    assert set(cmp.actmax) == set(cmp.topk) == {"A", "B", "B'", "merged", "naive"}
    assert cmp.data_mean is not None and cmp.data_mean.shape == (1, 40)
    rows = similarity_rows(cmp)
    assert [(r["view"], r["merge"]) for r in rows] == [
        ("actmax", "aligned"),
        ("actmax", "naive"),
        ("topk", "aligned"),
        ("topk", "naive"),
    ]
    assert all(-1 <= r["A↔merge"] <= 1 for r in rows)
    corr = unit_correlation(
        a, select_units(a, "blocks.2", [0, 1, 2]), a, select_units(a, "blocks.2", [0, 1, 2]), data
    )
    assert torch.allclose(corr, torch.ones(3), atol=1e-5)
    for view in ("actmax", "topk"):
        path = plot_comparison(cmp, tmp_path / f"{view}.png", view=view, columns=["A", "B'", "merged"])
        assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown models"):
        plot_comparison(cmp, tmp_path / "x.png", columns=["A", "C"])


# -- study ---------------------------------------------------------------------------------------------------


def test_unit_stats_null_and_dominance() -> None:
    """Matched rows score above the unmatched null; a merged unit that copies one parent is dominated and has
    no excess on the other side; the null is the mean over j ≠ i."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 40)), rng.normal(size=(5, 40))
    mix = unit_stats((a + b) / 2, a, b)
    assert (mix["match_a"] > mix["null_a"]).all() and (mix["min_excess"] > 0).all()
    copy = unit_stats(a, a, b)
    np.testing.assert_allclose(copy["match_a"], 1.0)
    assert (copy["min_excess"] < 0.5).all() and dominance(copy["match_a"], copy["match_b"], 0.2).all()
    assert not dominance(mix["match_a"], mix["match_a"] - 0.1, 0.2).any()
    c = np.corrcoef(a, b)[:5, 5:]  # rows: merged = a, columns: parent b
    np.testing.assert_allclose(unit_stats(a, b, b)["null_a"], (c.sum(1) - np.diag(c)) / 4, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 units"):
        unit_stats(a[:1], a[:1], b[:1])


def test_features_study_tiny(tmp_path: Path) -> None:
    report = run_study(
        "features",
        tmp_path / "fv",
        overrides=[
            'archs=["mlp"]',
            'model_kwargs={"mlp": {"width": 16, "depth": 2}}',
            "seeds=[0, 1, 2, 3]",
            "epochs=2",
            "steps=10",
            "scored_units=6",
            "drawn_units=2",
            "top_k=4",
        ],
        progress=False,
    )
    text = report.read_text()
    body = text.split("## Claims and verdicts", 1)
    assert len(body) == 2 and "<details>" not in body[0], "the report must open with the claims table"
    assert "mix↔merge" not in text and "A↔merge" in text
    assert "actmax-digits-mlp-layers.2.png" in text and "topk-digits-mlp-layers.0.png" in text
    metrics = json.loads((tmp_path / "fv" / "metrics.json").read_text())["metrics"]
    claims = metrics["claims"]
    assert len(claims) == 7 and all(c["interval"]["n"] == 2 for c in claims)
    assert {c["verdict"] for c in claims} <= {"supported", "not supported", "inconclusive"}
    assert {(r["layer"], r["view"], r["merge"]) for r in metrics["rows"]} == {
        (layer, v, m)
        for layer in ("layers.0", "layers.2")
        for v in ("actmax", "topk")
        for m in ("aligned", "naive")
    }
    assert len(metrics["results"]) == 2 and len(metrics["layer_rows"]) == 2
    assert len(list((tmp_path / "fv").glob("*.png"))) == 5  # 2 layers × 2 views + summary


def test_features_config_rejects_odd_seeds() -> None:
    from mergelab.experiments.features import FeaturesConfig

    with pytest.raises(ValueError, match="even length"):
        FeaturesConfig(seeds=(0, 1, 2))
    assert FeaturesConfig(seeds=(4, 5, 6, 7)).pairs == [(4, 5), (6, 7)]


@pytest.mark.slow
def test_features_study_default(tmp_path: Path) -> None:
    """Defaults (digits, MLP and CNN, 5 seed pairs, every hidden layer): the claims table is computed, and
    aligned merged units resemble their matched parents above the unmatched null."""
    run_study("features", tmp_path / "fv", progress=False)
    metrics = json.loads((tmp_path / "fv" / "metrics.json").read_text())["metrics"]
    claims = metrics["claims"]
    assert all(c["interval"]["n"] == 5 for c in claims)
    first = [c for c in claims if c["claim"].startswith("Aligned merged units resemble their matched")]
    assert first and all(c["interval"]["mean"] > 0 for c in first)
