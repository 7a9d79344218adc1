"""Weight matching undoes a hidden permutation exactly, on every architecture the tests build.

A model and a randomly permuted copy of itself are the easiest pair weight matching can get: the true
permutation reaches the objective's global maximum ``Σ ‖W‖²`` (Cauchy-Schwarz). Coordinate descent from the
identity still stalled far below it on depthwise + squeeze-excite nets (docs/alignment.md §5); these tests hold
every architecture to the exact answer.

To add an architecture, append a builder to ``RECOVERY_MODELS``: a function of a seed that returns the model (in
eval mode, with non-constant norm statistics so a wrong permutation of them shows) and an example input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _cnn_nets import CNN_NETS, randomize_norms, torchvision_init
from _zoo_tiny import ZOO_TINY
from torch import Tensor, nn

import mergelab
from mergelab.match import match_weights
from mergelab.match.similarity import float_parameters, weight_objective
from mergelab.models import build_model
from mergelab.structure import discover_structure, permute, random_permutations

Builder = Callable[[int], tuple[nn.Module, Tensor]]


def _zoo(name: str) -> Builder:
    def build(seed: int) -> tuple[nn.Module, Tensor]:
        torch.manual_seed(seed)
        model = build_model(name, (1, 8, 8), 3, **ZOO_TINY[name])
        randomize_norms(model, torch.Generator().manual_seed(seed + 1))
        return model.eval(), torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed + 2))

    return build


def _cnn(name: str, init: str) -> Builder:
    make, shape = CNN_NETS[name]

    def build(seed: int) -> tuple[nn.Module, Tensor]:
        torch.manual_seed(seed)
        model = make()
        if (
            init == "torchvision"
        ):  # small depthwise kernels, unit norms: the init that made coordinate descent stall
            torchvision_init(model)
        else:
            randomize_norms(model, torch.Generator().manual_seed(seed + 1))
        return model.eval(), torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 2))

    return build


RECOVERY_MODELS: dict[str, Builder] = {
    **{f"zoo-{name}": _zoo(name) for name in ZOO_TINY},
    **{f"{name}-{init}": _cnn(name, init) for name in CNN_NETS for init in ("default", "torchvision")},
}


def assert_recovers(model: nn.Module, x: Any) -> None:
    """Weight matching finds the permutation hidden in a permuted copy, and ``merge`` returns the model.

    ``x`` is the example input: a tensor, or a dict of keyword inputs (Hugging Face models).
    """
    s = discover_structure(model, x)
    assert len(s) > 0
    perm = random_permutations(s, 0)
    permuted = permute(model, s, perm)
    # the permutation itself: merged unit j (the model's unit j) is the permuted copy's unit argsort(perm)[j]
    al = match_weights(s, model, permuted, seed=1)
    wrong = [g.name for g in s if not torch.equal(al.perms[1][g.name], torch.argsort(perm[g.name]))]
    assert not wrong, f"{len(wrong)} of {len(s)} groups not recovered: {wrong[:5]}"
    truth = weight_objective(s, float_parameters(model), float_parameters(model), {})
    assert al.info["objective"][-1] == pytest.approx(truth, rel=1e-6)
    # the one-call front end returns the model
    merged = mergelab.merge([model, permuted], method="weight_matching", example_input=x, seed=1)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(_logits(merged, x), _logits(model, x), atol=1e-6, rtol=1e-5)


def _logits(model: nn.Module, x: Any) -> Tensor:
    out = model(**x) if isinstance(x, dict) else model(x)
    return out if isinstance(out, Tensor) else (out.logits if hasattr(out, "logits") else out[0])


@pytest.mark.parametrize("name", sorted(RECOVERY_MODELS))
def test_weight_matching_recovers_random_permutation(name: str) -> None:
    assert_recovers(*RECOVERY_MODELS[name](0))


def test_starts() -> None:
    """Git Re-Basin's identity start stalls on this net; ``"best"`` keeps the propagated start's higher optimum."""
    model, x = RECOVERY_MODELS["efficientnet_like-torchvision"](0)
    s = discover_structure(model, x)
    permuted = permute(model, s, random_permutations(s, 0))
    runs = {
        start: match_weights(s, model, permuted, seed=1, start=start)
        for start in ("identity", "propagate", "best")
    }
    truth = weight_objective(s, float_parameters(model), float_parameters(model), {})
    assert runs["identity"].info["objective"][-1] < 0.95 * truth  # the stall this start is known for
    assert runs["propagate"].info["objective"][-1] == pytest.approx(truth, rel=1e-6)
    best = runs["best"].info
    assert best["start"] == "propagate" and best["objective"][-1] == pytest.approx(truth, rel=1e-6)
    # the propagated start reaches the Cauchy-Schwarz bound: certified optimal, the identity run is skipped
    assert best["stopped"] == "optimal" and set(best["starts"]) == {"propagate"} and best["iterations"] == 0
    assert all(al.info["converged"] for al in runs.values())
    with pytest.raises(ValueError, match="start="):
        match_weights(s, model, permuted, start="random")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["zoo-mlp", "resnet_like-default"])
def test_best_start_keeps_the_higher_run(name: str) -> None:
    """Unrelated models (random inits 0 and 5): ``"best"`` returns exactly the run of the start that scores higher."""
    model, x = RECOVERY_MODELS[name](0)
    other, _ = RECOVERY_MODELS[name](5)
    s = discover_structure(model, x)
    best = match_weights(s, model, other, start="best")
    single = {start: match_weights(s, model, other, start=start) for start in ("identity", "propagate")}
    assert best.info["starts"]["identity"] == pytest.approx(single["identity"].info["objective"][-1])
    kept = single[best.info["start"]]
    assert best.info["objective"] == kept.info["objective"]
    assert all(torch.equal(best.perms[1][g.name], kept.perms[1][g.name]) for g in s)


def test_best_start_recovers_a_noisy_permuted_copy() -> None:
    """A permuted copy with noise (30 % of each tensor's std) is a related pair: the propagated start is kept."""
    model, x = RECOVERY_MODELS["efficientnet_like-torchvision"](0)
    s = discover_structure(model, x)
    perm = random_permutations(s, 0)
    noisy = permute(model, s, perm)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in noisy.parameters():
            if p.numel() > 1:
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    al = match_weights(s, model, noisy, seed=1)
    assert al.info["start"] == "propagate" and al.info["stopped"] != "optimal"
    assert all(torch.equal(al.perms[1][h.name], torch.argsort(perm[h.name])) for h in s)
