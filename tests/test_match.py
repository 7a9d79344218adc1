"""Matching: feature statistics, similarities, LAP solvers, weight and activation matching."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from _align_helpers import (
    CNN,
    MLP,
    TinyAttention,
    attention_structure,
    cnn_structure,
    loader,
    mlp_structure,
    random_perms,
)

from mergelab.match import (
    collect_features,
    match_activations,
    match_weights,
    match_weights_many,
    solve_block_lap,
    solve_lap,
    weight_objective,
    weight_similarity,
)
from mergelab.match.similarity import float_parameters
from mergelab.merge.alignment import apply_alignment, to_basis
from mergelab.structure.types import Probe, Structure

CASES = {
    "mlp": (lambda: MLP(), lambda m: mlp_structure(m), (64, 8)),
    "mlp_probes": (lambda: MLP(), lambda m: mlp_structure(m, probes=True), (64, 8)),
    "cnn": (lambda: CNN(), cnn_structure, (64, 1, 8, 8)),
    "attention": (lambda: TinyAttention(), attention_structure, (64, 4, 5)),
    "attention_noprobes": (
        lambda: TinyAttention(),
        lambda m: attention_structure(m, probes=False),
        (64, 4, 5),
    ),
}


def _setup(case: str, seed: int = 0):
    make, struct, shape = CASES[case]
    torch.manual_seed(seed)
    model = make().eval()
    if isinstance(model, CNN):  # non-trivial BN statistics
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn2.running_var.uniform_(0.5, 2.0)
    s = struct(model)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, s, x


@pytest.mark.parametrize("case", sorted(CASES))
def test_to_basis_preserves_function(case: str) -> None:
    model, s, x = _setup(case)
    perm = random_perms(s, torch.Generator().manual_seed(3))
    permuted = to_basis(model, s, perm)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), permuted.state_dict().values(), strict=True)
    )
    torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=1e-5)


def test_to_basis_moves_rows_and_columns() -> None:
    model, s, _ = _setup("mlp")
    p = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    out = to_basis(model, s, {"fc1": p})
    assert torch.equal(out.fc1.weight, model.fc1.weight[p])
    assert torch.equal(out.fc1.bias, model.fc1.bias[p])
    assert torch.equal(out.fc2.weight, model.fc2.weight[:, p])
    assert torch.equal(out.head.weight, model.head.weight)


@pytest.mark.parametrize("case", sorted(CASES))
def test_weight_matching_recovers_permutation(case: str) -> None:
    model, s, x = _setup(case)
    perm = random_perms(s, torch.Generator().manual_seed(5))
    permuted = to_basis(model, s, perm)
    al = match_weights(s, model, permuted, seed=1)
    for g in s:
        # permuted unit j is model unit perm[j], so merged unit j (model's j) is permuted unit argsort(perm)[j]
        assert torch.equal(al.perms[1][g.name], torch.argsort(perm[g.name])), g.name
        assert torch.equal(al.perms[0][g.name], torch.arange(g.size))
    merged = apply_alignment([model, permuted], al)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, msg=k)
    torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)
    objective = al.info["objective"]
    assert all(b >= a - 1e-4 * abs(a) for a, b in itertools.pairwise(objective))
    assert al.info["converged"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_activation_matching_recovers_permutation(case: str) -> None:
    model, s, x = _setup(case)
    perm = random_perms(s, torch.Generator().manual_seed(7))
    permuted = to_basis(model, s, perm)
    al = match_activations(s, [model, permuted], loader(x, torch.zeros(len(x), dtype=torch.long), batch=16))
    for g in s:
        assert torch.equal(al.perms[1][g.name], torch.argsort(perm[g.name])), g.name
        assert al.info["matched_similarity"][g.name] > 0.999
    merged = apply_alignment([model, permuted], al)
    torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)


def test_matching_identical_models_is_identity() -> None:
    model, s, x = _setup("cnn")
    for al in (match_weights(s, model, model), match_activations(s, [model, model], [x])):
        for g in s:
            assert torch.equal(al.perms[1][g.name], torch.arange(g.size))
        merged = apply_alignment([model, model], al)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(merged.state_dict()[k], v)


@pytest.mark.parametrize("merge_many", [False, True])
def test_many_models_weights_and_activations(merge_many: bool) -> None:
    model, s, x = _setup("mlp")
    copies = [model] + [to_basis(model, s, random_perms(s, torch.Generator().manual_seed(i))) for i in (1, 2)]
    for al in (
        match_weights_many(s, copies, reference=1, merge_many=merge_many),
        match_activations(s, copies, [x], reference=1, merge_many=merge_many),
    ):
        aligned = [to_basis(m, s, al.perms[i]) for i, m in enumerate(copies)]
        for m in aligned[1:]:
            for k, v in aligned[0].state_dict().items():
                torch.testing.assert_close(m.state_dict()[k], v, msg=k)
        if not merge_many:
            assert all(torch.equal(p, torch.arange(len(p))) for p in al.perms[1].values())
        merged = apply_alignment(copies, al)
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)


def test_merge_many_converges_on_different_models() -> None:
    models = [MLP() for _ in range(3)]
    s = mlp_structure(models[0])
    al = match_weights_many(s, models, merge_many=True, seed=0)
    assert al.info["converged"] and al.info["rounds"] >= 1
    x = torch.randn(32, 8)
    al_act = match_activations(s, models, [x], merge_many=True)
    assert al_act.info["converged"]


def test_weight_similarity_is_the_rebasin_sum() -> None:
    torch.manual_seed(0)
    a, b = MLP(), MLP()
    s = mlp_structure(a)
    pa, pb = float_parameters(a), float_parameters(b)
    p1 = torch.randperm(16)
    sim = weight_similarity(s, pa, pb, "fc2", {"fc1": p1, "fc2": torch.randperm(12)})
    # fc2 units: rows of fc2.weight (inputs permuted by fc1's perm), fc2.bias, and columns of head.weight
    wb = b.fc2.weight[:, p1]
    expected = a.fc2.weight @ wb.T + torch.outer(a.fc2.bias, b.fc2.bias) + a.head.weight.T @ b.head.weight
    torch.testing.assert_close(sim, expected.detach())


def test_weight_similarity_cached_update_matches_fresh() -> None:
    from mergelab.match.similarity import WeightSimilarity

    torch.manual_seed(0)
    a, b = MLP(hidden=(40, 40)), MLP(hidden=(40, 40))
    s = mlp_structure(a)
    ws = WeightSimilarity(s, float_parameters(a), float_parameters(b))
    p = torch.arange(40)
    first = ws("fc2", {"fc1": p, "fc2": p})
    q = p.clone()
    q[[3, 7]] = q[[7, 3]]  # a small change: exercises the low-rank update
    updated = ws("fc2", {"fc1": q, "fc2": p})
    fresh = weight_similarity(s, float_parameters(a), float_parameters(b), "fc2", {"fc1": q})
    torch.testing.assert_close(updated, fresh, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, fresh)


def test_weight_objective_at_true_permutation_is_norm() -> None:
    model, s, _ = _setup("cnn")
    perm = random_perms(s, torch.Generator().manual_seed(2))
    permuted = to_basis(model, s, perm)
    params = float_parameters(model)
    inv = {k: torch.argsort(v) for k, v in perm.items()}
    total = weight_objective(s, params, float_parameters(permuted), inv)
    assert total == pytest.approx(sum(float((v.double() ** 2).sum()) for v in params.values()), rel=1e-6)


def test_solve_lap_is_optimal() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        sim = torch.randn(5, 5, generator=gen)
        perm = solve_lap(sim)
        best = max(itertools.permutations(range(5)), key=lambda p: float(sim[torch.arange(5), list(p)].sum()))
        assert float(sim[torch.arange(5), perm].sum()) == pytest.approx(
            float(sim[torch.arange(5), list(best)].sum())
        )
    with pytest.raises(ValueError, match="square"):
        solve_lap(torch.randn(3, 4))


def _block_perms(blocks: int, bs: int):
    for bp in itertools.permutations(range(blocks)):
        for inner in itertools.product(itertools.permutations(range(bs)), repeat=blocks):
            yield torch.tensor([bp[a] * bs + inner[a][r] for a in range(blocks) for r in range(bs)])


def test_block_lap_respects_blocks_and_is_optimal() -> None:
    gen = torch.Generator().manual_seed(1)
    blocks, bs = 3, 2
    sim = torch.randn(6, 6, generator=gen)
    (perm,) = solve_block_lap([sim], blocks)
    assert torch.equal((perm // bs).view(blocks, bs), (perm // bs).view(blocks, bs)[:, :1].expand(blocks, bs))
    best = max(float(sim[torch.arange(6), p].sum()) for p in _block_perms(blocks, bs))
    assert float(sim[torch.arange(6), perm].sum()) == pytest.approx(best)
    # a free LAP would do better here than any block-respecting assignment
    assert float(sim[torch.arange(6), solve_lap(sim)].sum()) >= best


def test_tied_block_lap_shares_block_assignment() -> None:
    gen = torch.Generator().manual_seed(2)
    blocks = 2
    s1, s2 = torch.randn(4, 4, generator=gen), torch.randn(6, 6, generator=gen)
    # make the two groups prefer opposite block assignments, with s2 much stronger
    s1[:2, :2] += 1.0
    s1[2:, 2:] += 1.0
    s2[:3, 3:] += 5.0
    s2[3:, :3] += 5.0
    p1, p2 = solve_block_lap([s1, s2], blocks)
    assert torch.equal(p1 // 2, torch.tensor([1, 1, 0, 0]))
    assert torch.equal(p2 // 3, torch.tensor([1, 1, 1, 0, 0, 0]))


def _all_at_once(models, s, x):
    """Reference statistics from all activations at once (fallback modules = last producers)."""
    feats = {g.name: [] for g in s}
    for m in models:
        with torch.no_grad():
            h1 = m.bn1(m.conv1(x))
            h2 = m.bn2(m.conv2(torch.relu(h1)))
        feats["conv1"].append(h1.movedim(1, -1).reshape(-1, h1.shape[1]).double())
        feats["conv2"].append(h2.movedim(1, -1).reshape(-1, h2.shape[1]).double())
    return {k: torch.cat(v, 1) for k, v in feats.items()}


def test_feature_stats_streamed_equals_all_at_once() -> None:
    torch.manual_seed(0)
    models = [CNN().eval(), CNN().eval()]
    s = cnn_structure(models[0])
    x = torch.randn(40, 1, 8, 8)
    stats = collect_features(models, s, loader(x, torch.zeros(40, dtype=torch.long), batch=7))
    ref = _all_at_once(models, s, x)
    for g, f in ref.items():
        assert stats.counts[g] == f.shape[0] == 40 * (64 if g == "conv1" else 16)
        torch.testing.assert_close(stats.mean(g), f.mean(0))
        cov = torch.cov(f.T, correction=0)
        torch.testing.assert_close(stats.cov(g), cov)
        torch.testing.assert_close(stats.corr(g), torch.corrcoef(f.T))
        torch.testing.assert_close(stats.cov(g, 0, 1), cov[: s[g].size, s[g].size :])
        torch.testing.assert_close(stats.mean(g, 1), f.mean(0)[s[g].size :])
    few = collect_features(models, s, loader(x, batch=7), max_batches=2)
    assert few.counts["conv1"] == 14 * 64


def test_feature_stats_dead_units_and_modes() -> None:
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[0] = 0.0
        model.fc1.bias[0] = -1.0  # unit 0 is dead after the ReLU
        model.fc1.weight[1] = 0.0
        model.fc1.bias[1] = 3.0  # unit 1 is a non-zero constant
    model.train()
    s = mlp_structure(model, probes=True)
    stats = collect_features([model, model], s, [torch.randn(50, 8)])
    corr = stats.corr("fc1")
    assert not torch.isnan(corr).any()
    assert torch.all(corr[[0, 1, 16, 17]] == 0) and torch.all(corr[:, [0, 1, 16, 17]] == 0)
    assert stats.corr("fc1", 0, 1)[2, 2] == pytest.approx(1.0)
    assert model.training and model.fc1.training  # modes restored


def test_errors_for_mismatched_models() -> None:
    a, b = MLP(hidden=(16, 12)), MLP(hidden=(16, 10))
    s = mlp_structure(a)
    with pytest.raises(ValueError, match="fc2.weight"):
        match_weights(s, a, b)
    with pytest.raises(ValueError, match="fc2"):
        match_activations(s, [a, b], [torch.randn(4, 8)])
    with pytest.raises(ValueError, match="at least 2"):
        match_activations(s, [a], [torch.randn(4, 8)])
    with pytest.raises(ValueError, match="data"):
        match_activations(s, [a, a])
    good = mlp_structure(a, probes=True)
    bad = Structure((good.groups[0], replace(good.groups[1], probes=(Probe("nope", 1),))))
    with pytest.raises(ValueError, match="nope"):
        collect_features([a], bad, [torch.randn(4, 8)])
