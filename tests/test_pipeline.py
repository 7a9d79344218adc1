"""The one aligned path: a match context shared across methods, the solver registry, merge_aligned, MergeResult."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mergelab
from mergelab.match import context as context_module
from mergelab.match.context import MatchContext, match_context
from mergelab.match.registry import SOLVERS, get_solver, register_solver
from mergelab.merge.aligned import align, align_to, merge_aligned
from mergelab.merge.registry import MergeResult
from mergelab.models import build_model
from mergelab.structure import permute
from mergelab.structure.alignment import Alignment

SHAPE = (1, 4, 4)


def _mlp(seed: int, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", SHAPE, classes, width=8, depth=2).eval()


def _data(labels: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, *SHAPE, generator=gen)
    y = torch.randint(0, labels, (96,), generator=gen)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the streamed statistics passes a context makes."""
    calls: list[int] = []
    real = context_module.collect_features

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(context_module, "collect_features", counting)
    return calls


def test_a_context_shares_structure_and_statistics_across_methods(counted: list[int]) -> None:
    models, data = [_mlp(0), _mlp(1)], _data()
    ctx = match_context(models, data)
    assert isinstance(ctx, MatchContext) and not ctx.has_stats
    shared = {
        method: mergelab.merge(models, method=method, context=ctx, return_info=True)
        for method in ("activation_matching", "zipit", "weight_matching")
    }
    shared["mudsc"] = mergelab.merge(models, method="mudsc", context=ctx, alphas=(0.2, 0.8), return_info=True)
    assert len(counted) == 1  # one pass over the data for four methods and two MuDSC candidates
    for method, res in shared.items():  # the same models as without a context
        alone = mergelab.merge(
            models, method=method, data=data, **({"alphas": (0.2, 0.8)} if method == "mudsc" else {})
        )
        assert _same(res.model, alone), method
        assert res.info["seconds"]["total"] >= res.info["seconds"]["solve"] >= 0.0
    assert shared["mudsc"].info["alpha"] in (0.2, 0.8) and set(shared["mudsc"].info["alpha_scores"]) == {
        0.2,
        0.8,
    }
    assert mergelab.merge(models, method="average", context=ctx, return_info=True).info["method"] == "average"
    with pytest.raises(ValueError, match="context"):
        mergelab.merge([_mlp(0), _mlp(1)], method="zipit", context=ctx)  # other model objects


def test_merge_returns_a_result_only_when_asked() -> None:
    models, data = [_mlp(0), _mlp(1)], _data()
    plain = mergelab.merge(models, method="weight_matching", data=data)
    res = mergelab.merge(models, method="weight_matching", data=data, return_info=True)
    assert isinstance(plain, nn.Module) and not hasattr(plain, "mergelab_merge_info")
    assert isinstance(res, MergeResult) and _same(plain, res.model)
    assert res.info["method"] == "weight_matching" and res.info["solver"] == "weight"
    assert res.info["per_model"][1]["iterations"] >= 1 and res.info["fixed"] == []
    assert isinstance(res.alignment, Alignment) and res.alignment.perms is not None


def test_solver_registry_names_solvers_and_rejects_typos() -> None:
    assert {"identity", "weight", "activation", "zip", "dual"} <= set(SOLVERS)
    with pytest.raises(ValueError, match="'weight'"):
        get_solver("wieght")
    ctx = match_context([_mlp(0), _mlp(1)], _data())
    with pytest.raises(TypeError, match="alhpa"):
        SOLVERS["zip"](ctx, alhpa=0.1)
    with pytest.raises(ValueError, match="needs data"):
        SOLVERS["activation"](match_context([_mlp(0), _mlp(1)]))
    ident = SOLVERS["identity"](ctx)
    assert all(torch.equal(p, torch.arange(p.numel())) for perms in ident.perms for p in perms.values())


def test_a_new_solver_is_one_function_and_one_line() -> None:
    @register_solver("reverse_test")
    def reverse(ctx: MatchContext, *, coefficients: list[float] | None = None) -> Alignment:
        """Reverse every unit order of model 1 (a toy solver)."""
        perms = [{}, {g.name: torch.arange(g.size).flip(0) for g in ctx.structure}]
        return Alignment.from_permutations(ctx.structure, perms, coefficients, {"method": "reverse"})

    try:
        a = _mlp(0)
        ctx = match_context([a, a], _data())
        b = permute(a, ctx.structure, {g.name: torch.arange(g.size).flip(0) for g in ctx.structure})
        res = merge_aligned([a, b], solver="reverse_test", data=_data(), heads="concat")
        x = torch.randn(5, *SHAPE)
        assert torch.allclose(res.model(x), torch.cat([a(x), a(x)], -1), atol=1e-5)  # b un-reversed is a
        assert res.info["solver"] == "reverse_test" and res.info["heads"] == "concat"
    finally:
        del SOLVERS["reverse_test"]


def test_select_reuses_the_context_and_keeps_the_best_candidate(counted: list[int]) -> None:
    models, data = [_mlp(0), _mlp(1)], _data()
    res = merge_aligned(models, solver="zip", data=data, select={"alpha": [0.0, 0.5], "beta": [0.0, 1.0]})
    assert len(counted) == 1 and len(res.info["selection"]) == 4
    best = max(res.info["selection"], key=lambda c: c["score"])
    assert (res.info["alpha"], res.info["beta"]) == (best["alpha"], best["beta"])


def test_one_align_for_every_analysis() -> None:
    a, b, data = _mlp(0), _mlp(1), _data()
    ctx = match_context([a, b], data)
    wm = align([a, b], "weight_matching", context=ctx, seed=0)
    assert wm.info["solver"] == "weight" and torch.equal(
        wm.perms[1]["layers.0"], align([a, b], "weight", data, seed=0).perms[1]["layers.0"]
    )
    x = torch.randn(4, *SHAPE)
    b2 = align_to(a, b, method="activation", context=ctx)
    assert torch.allclose(b2(x), b(x), atol=1e-5)
    with pytest.raises(ValueError, match="permutation"):
        align_to(a, b, method="zipit", context=ctx)
