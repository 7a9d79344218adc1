"""Soups (uniform, greedy, interpolation, optional alignment) and ensembles (logits, probs, features)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mergelab
from mergelab.evaluation import evaluate
from mergelab.merge.average import average
from mergelab.merge.ensemble import Ensemble, combine_outputs, greedy_ensemble
from mergelab.merge.registry import get_method
from mergelab.merge.soup import (
    AlignmentUnavailable,
    align_models,
    greedy_soup,
    greedy_soup_result,
    interpolate_weights,
    uniform_soup,
)
from mergelab.models import build_model

SHAPE = (1, 8, 8)


def mlp(seed: int, width: int = 16, depth: int = 2, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", SHAPE, classes, width=width, depth=depth).eval()


def heldout(seed: int = 0, n: int = 64, classes: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g)
    y = (x.flatten(1)[:, :classes].argmax(1)).long()  # learnable labels so accuracies differ between models
    return [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]


# -- soups ---------------------------------------------------------------------------------------------------


def test_uniform_soup_of_identical_models_is_the_model() -> None:
    m = mlp(0)
    x = torch.randn(5, *SHAPE)
    for soup in (average([m, copy.deepcopy(m), copy.deepcopy(m)]), uniform_soup([m, copy.deepcopy(m)])):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(soup.state_dict()[k], v)
        torch.testing.assert_close(soup(x), m(x))


def test_interpolate_weights_endpoints_and_midpoint() -> None:
    a, b = mlp(0), mlp(1)
    x = torch.randn(3, *SHAPE)
    torch.testing.assert_close(interpolate_weights(a, b, 0.0)(x), a(x))
    torch.testing.assert_close(interpolate_weights(a, b, 1.0)(x), b(x))
    mid = interpolate_weights(a, b, 0.5)
    torch.testing.assert_close(mid.head.weight, (a.head.weight + b.head.weight) / 2)
    assert a.head.weight.data_ptr() != mid.head.weight.data_ptr()  # a new model, inputs untouched


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_greedy_soup_never_below_best_single_member_on_heldout(seed: int) -> None:
    models = [mlp(10 * seed + i) for i in range(4)]
    data = heldout(seed)
    res = greedy_soup_result(models, data)
    best_single = max(evaluate(m, data).accuracy for m in models)
    assert res.heldout_accuracy >= best_single
    assert evaluate(res.model, data).accuracy == pytest.approx(res.heldout_accuracy)
    assert res.members[0] == res.order[0] and sorted(res.members) == sorted(set(res.members))
    assert res.member_accuracies[res.order[0]] == best_single


def test_greedy_soup_keeps_every_identical_member() -> None:
    m = mlp(0)
    res = greedy_soup_result([m, copy.deepcopy(m), copy.deepcopy(m)], heldout())
    assert sorted(res.members) == [0, 1, 2]


def test_greedy_soup_is_registered_and_needs_data() -> None:
    info = get_method("greedy_soup")
    assert info.needs_data
    models = [mlp(0), mlp(1)]
    with pytest.raises(ValueError, match="needs data"):
        mergelab.merge(models, method="greedy_soup")
    merged = mergelab.merge(models, method="greedy_soup", data=heldout())
    assert isinstance(merged, nn.Module)
    torch.testing.assert_close(merged(heldout()[0][0]), greedy_soup(models, data=heldout())(heldout()[0][0]))


def test_soups_reject_models_of_different_architectures() -> None:
    with pytest.raises(ValueError, match="layers.0.weight"):
        greedy_soup([mlp(0, width=16), mlp(1, width=8)], data=heldout())
    with pytest.raises(ValueError, match="interpolate_weights"):
        interpolate_weights(mlp(0, width=16), mlp(1, width=8), 0.5)
    with pytest.raises(ValueError, match="missing|unexpected"):
        uniform_soup([mlp(0, depth=1), mlp(1, depth=2)])


def _permuted_copy(m: nn.Module, seed: int) -> nn.Module:
    """The same function with the hidden units of both layers shuffled."""
    out = copy.deepcopy(m)
    sd = out.state_dict()
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randperm(sd["layers.0.weight"].shape[0], generator=g)
    p1 = torch.randperm(sd["layers.2.weight"].shape[0], generator=g)
    sd["layers.0.weight"], sd["layers.0.bias"] = sd["layers.0.weight"][p0], sd["layers.0.bias"][p0]
    sd["layers.2.weight"] = sd["layers.2.weight"][p1][:, p0]
    sd["layers.2.bias"] = sd["layers.2.bias"][p1]
    sd["head.weight"] = sd["head.weight"][:, p1]
    out.load_state_dict(sd)
    return out


def test_alignment_recovers_a_permuted_copy_or_says_clearly_why_not() -> None:
    m = mlp(0)
    p = _permuted_copy(m, 1)
    x = torch.randn(6, *SHAPE)
    torch.testing.assert_close(p(x), m(x))  # same function, different unit order
    data = heldout()
    try:
        aligned = align_models([m, p], data=data)
    except AlignmentUnavailable as err:
        assert "weight_matching" in str(err)
        # uniform_soup falls back to the unaligned average instead of failing.
        soup = uniform_soup([m, p], align="weight_matching", data=data)
        torch.testing.assert_close(soup.head.weight, average([m, p]).head.weight)
        return
    torch.testing.assert_close(aligned[1](x), m(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aligned[1].layers[0].weight, m.layers[0].weight)
    torch.testing.assert_close(
        uniform_soup([m, p], align="weight_matching", data=data)(x), m(x), atol=1e-5, rtol=1e-5
    )


def test_align_models_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(AlignmentUnavailable, match="no_such_method"):
        align_models([mlp(0), mlp(1)], method="no_such_method")


# -- ensembles -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "head"),
    [("logits", "first"), ("probs", "first"), ("features", "first"), ("features", "average")],
)
def test_ensemble_of_one_model_equals_the_model(mode: str, head: str) -> None:
    m = mlp(0)
    x = torch.randn(7, *SHAPE)
    out = Ensemble([m], mode, head=head).eval()(x)
    expected = F.log_softmax(m(x), -1) if mode == "probs" else m(x)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out.argmax(-1), m(x).argmax(-1))


def test_ensemble_modes_average_what_they_should() -> None:
    a, b = mlp(0), mlp(1)
    x = torch.randn(5, *SHAPE)
    torch.testing.assert_close(Ensemble([a, b], "logits")(x), (a(x) + b(x)) / 2)
    probs = (F.softmax(a(x), -1) + F.softmax(b(x), -1)) / 2
    torch.testing.assert_close(Ensemble([a, b], "probs")(x).exp(), probs)
    feats = (a.features(x) + b.features(x)) / 2
    torch.testing.assert_close(Ensemble([a, b], "features", head="first")(x), a.head(feats))
    avg_head = average([a, b]).head
    torch.testing.assert_close(Ensemble([a, b], "features", head="average")(x), avg_head(feats))
    w = Ensemble([a, b], "logits", weights=[3.0, 1.0])(x)
    torch.testing.assert_close(w, 0.75 * a(x) + 0.25 * b(x))


def test_probability_ensemble_gives_meaningful_nll() -> None:
    a, b = mlp(0), mlp(1)
    x, y = heldout()[0]
    out = Ensemble([a, b], "probs")(x)
    nll = F.cross_entropy(out, y)  # log_softmax of log-probabilities is the identity
    manual = -torch.log(((F.softmax(a(x), -1) + F.softmax(b(x), -1)) / 2)[torch.arange(len(y)), y]).mean()
    torch.testing.assert_close(nll, manual)


def test_ensemble_does_not_touch_its_inputs() -> None:
    a, b = mlp(0), mlp(1)
    a.train()
    ens = Ensemble([a, b], "logits")
    ens.eval()
    assert a.training
    with torch.no_grad():
        ens.members[0].head.weight.zero_()
    assert a.head.weight.abs().sum() > 0


def test_ensemble_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="features"):
        Ensemble([mlp(0, width=16), mlp(1, width=8)], "features")
    with pytest.raises(ValueError, match="unknown mode"):
        Ensemble([mlp(0)], "median")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="features"):
        Ensemble([nn.Linear(64, 4)], "features")
    with pytest.raises(ValueError, match="head.weight"):
        Ensemble([mlp(0, classes=4), mlp(1, classes=3)], "features", head="average")
    x = torch.randn(2, *SHAPE)
    with pytest.raises(ValueError, match="member 1"):
        Ensemble([mlp(0, classes=4), mlp(1, classes=3)], "logits")(x)


@pytest.mark.parametrize("mode", ["logits", "probs", "features"])
def test_greedy_ensemble_never_below_best_single_member(mode: str) -> None:
    models = [mlp(i) for i in range(4)]
    data = heldout(3)
    ens = greedy_ensemble(models, data, mode=mode)  # type: ignore[arg-type]
    best = max(evaluate(m, data).accuracy for m in models)
    assert ens.heldout_accuracy >= best
    assert evaluate(ens, data).accuracy == pytest.approx(ens.heldout_accuracy)
    assert ens.member_accuracies[ens.selected[0]] == best


def test_ensemble_is_reachable_from_the_merge_package() -> None:
    # ``mergelab.merge`` the attribute is the merge function; the subpackage is reached by import.
    from mergelab.merge import ensemble as ens_mod

    assert ens_mod.Ensemble is Ensemble
    assert "ensemble" not in mergelab.list_methods()  # an ensemble is not a weight-space merge


@pytest.mark.parametrize(
    ("mode", "head"),
    [("logits", "first"), ("probs", "first"), ("features", "first"), ("features", "average")],
)
def test_combine_outputs_matches_the_ensemble(mode: str, head: str) -> None:
    models = [mlp(i) for i in range(3)]
    x = torch.randn(6, *SHAPE)
    outs = [m.features(x) if mode == "features" else m(x) for m in models]
    heads = [m.head for m in models]
    expected = Ensemble(models, mode, head=head)(x)  # type: ignore[arg-type]
    torch.testing.assert_close(combine_outputs(outs, mode, heads=heads, head=head), expected)  # type: ignore[arg-type]
