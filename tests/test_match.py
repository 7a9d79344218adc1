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
from mergelab.structure.alignment import apply_alignment, to_basis
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


# ---------------------------------------------------------------------------------------------------------------
# Sparse, warm-started LAP and the weight-matching stopping rule
# ---------------------------------------------------------------------------------------------------------------


def _lap_cases(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "gaussian": torch.randn(n, n, generator=g),
        "ties": torch.randint(0, 3, (n, n), generator=g).float(),  # many optimal assignments
        "low_rank": torch.randn(n, 3, generator=g) @ torch.randn(3, n, generator=g)
        + 1e-3 * torch.randn(n, n, generator=g),  # flat: optimal edges deep in each row
        "dead_units": _with_dead_units(
            torch.randn(n, n, generator=g)
        ),  # zero rows and columns: degenerate dual
    }


def _with_dead_units(sim: torch.Tensor) -> torch.Tensor:
    sim = sim.clone()
    sim[::4] = 0.0
    sim[:, 1::5] = 0.0
    return sim


def _lap_value(sim: torch.Tensor, perm: torch.Tensor) -> float:
    return float(sim.double()[torch.arange(sim.shape[0]), perm].sum())


@pytest.mark.parametrize("n", [1, 2, 7, 60, 200])
def test_sparse_lap_is_exact_and_warm_starts(n: int) -> None:
    from scipy.optimize import linear_sum_assignment

    from mergelab.match.solvers import solve_lap_warm

    for name, sim in _lap_cases(n, n).items():
        r, c = linear_sum_assignment(sim.double().numpy(), maximize=True)
        best = float(sim.double().numpy()[r, c].sum())
        perm, state = solve_lap_warm(sim, method="sparse")
        assert sorted(perm.tolist()) == list(range(n)), name
        assert _lap_value(sim, perm) == pytest.approx(best, rel=1e-9, abs=1e-9), name
        if state is None:  # solved without a LAP (every row's best column differs)
            continue
        # the returned prices are an LP certificate: no reduced cost of -sim is negative
        cost = -sim.double().numpy()
        u = cost[range(n), state.perm] - state.prices[state.perm]
        assert (cost - u[:, None] - state.prices[None, :]).min() >= -1e-9 * max(1.0, abs(cost).max())
        # a perturbed matrix, warm-started from those prices, is solved exactly too
        noisy = sim + 0.05 * torch.randn(n, n, generator=torch.Generator().manual_seed(1))
        r, c = linear_sum_assignment(noisy.double().numpy(), maximize=True)
        warm, _ = solve_lap_warm(noisy, state, method="sparse")
        assert _lap_value(noisy, warm) == pytest.approx(
            float(noisy.double().numpy()[r, c].sum()), rel=1e-9, abs=1e-9
        ), name
        # the same matrix again: the old assignment is certified without solving
        again, same_state = solve_lap_warm(sim, state, method="sparse")
        assert torch.equal(again, perm) and same_state is state


def test_auto_lap_uses_the_sparse_path_only_where_it_pays() -> None:
    from mergelab.match.lap import _SPARSE_MIN_SIZE, solve_lap_warm

    n = _SPARSE_MIN_SIZE
    sim = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    _, state = solve_lap_warm(sim)  # a large cold start: sparse, returns prices to warm-start from
    assert state is not None
    _, state = solve_lap_warm(_with_dead_units(sim))  # dead units: degenerate dual, solved densely
    assert state is None
    _, state = solve_lap_warm(sim[:100, :100])  # small: dense
    assert state is None


def test_solve_lap_methods_and_errors() -> None:
    from mergelab.match.solvers import solve_lap_warm

    sim = _lap_cases(30, 3)["gaussian"]
    assert _lap_value(sim, solve_lap(sim, method="dense")) == pytest.approx(
        _lap_value(sim, solve_lap(sim, method="sparse")), rel=1e-12
    )
    with pytest.raises(ValueError, match="method"):
        solve_lap(sim, method="hungarian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN"):
        solve_lap(torch.full((3, 3), float("nan")))
    # a state of another size is ignored, not an error
    _, state = solve_lap_warm(sim, method="sparse")
    perm, _ = solve_lap_warm(_lap_cases(12, 0)["gaussian"], state, method="sparse")
    assert sorted(perm.tolist()) == list(range(12))


def _trained_pair(hidden: tuple[int, int] = (48, 40)):
    from _align_helpers import train

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 0).long()) % 3
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(train(MLP(hidden=hidden), x, y, steps=150))
    return models


def test_weight_matching_stopping_rule_and_solvers_agree() -> None:
    a, b = _trained_pair()
    s = mlp_structure(a)
    exact = match_weights(s, a, b, tol=0.0, lap="dense")
    sparse = match_weights(s, a, b, tol=0.0, lap="sparse")
    # both LAP solvers are exact, so coordinate descent takes the same path
    assert sparse.info["objective"] == pytest.approx(exact.info["objective"], rel=1e-9)
    assert exact.info["stopped"] == "unchanged" and exact.info["converged"]
    hist = exact.info["objective"]
    assert all(y >= x - 1e-6 * abs(x) for x, y in itertools.pairwise(hist))
    # tol: stop at the first iteration whose relative gain is ≤ tol
    for tol in (1e-3, 1e-2):
        al = match_weights(s, a, b, tol=tol, lap="dense")
        h = al.info["objective"]
        gains = [(y - x) / abs(x) for x, y in itertools.pairwise(h)]
        assert al.info["stopped"] in ("tol", "unchanged")
        assert all(gn > tol for gn in gains[:-1])
        if al.info["stopped"] == "tol":
            assert gains[-1] <= tol
        assert len(h) <= len(hist)
    one = match_weights(s, a, b, tol=float("inf"))
    assert one.info["iterations"] == 1
    assert set(exact.info["seconds"]) == {"similarity", "lap"}
    with pytest.raises(ValueError, match="tol"):
        match_weights(s, a, b, tol=-1.0)


# ---------------------------------------------------------------------------------------------------------------
# Groups without probes: attention projections and parts of a split basis
# ---------------------------------------------------------------------------------------------------------------


class _TorchAttention(torch.nn.Module):
    """Token embedding + ``nn.MultiheadAttention`` (packed, or separate q/k/v weights when ``kdim`` is set)."""

    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(5, 8)
        self.ctx = torch.nn.Linear(5, kdim or 8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        c = self.ctx(x)
        a, _ = self.attn(h, c, c)
        return self.head((h + a).mean(1))


@pytest.mark.parametrize("kdim", [None, 6])
def test_activation_matching_torch_attention_without_probes(kdim: int | None) -> None:
    from mergelab.match.features import fallback_taps
    from mergelab.structure import discover_structure

    torch.manual_seed(0)
    model = _TorchAttention(kdim).eval()
    x = torch.randn(64, 4, 5, generator=torch.Generator().manual_seed(1))
    s = discover_structure(model, x[:2])
    q, v = s.ties[0]  # the query/key and value/output groups of the attention module
    assert not s[q].probes and not s[v].probes
    assert fallback_taps(model, s[v]).source == "value"  # not the module's (tuple) output
    perm = random_perms(s, torch.Generator().manual_seed(2))
    permuted = to_basis(model, s, perm)
    al = match_activations(s, [model, permuted], loader(x, batch=16))
    for g in s:
        assert torch.equal(al.perms[1][g.name], torch.argsort(perm[g.name])), g.name
        assert al.info["matched_similarity"][g.name] > 0.999, g.name
    torch.testing.assert_close(apply_alignment([model, permuted], al)(x), model(x), atol=1e-5, rtol=1e-5)


def test_split_basis_parts_without_probes_read_their_slice() -> None:
    from mergelab.structure.types import Axis, Group

    torch.manual_seed(0)
    model = MLP(hidden=(6, 5)).eval()
    # fc1's units split in two parts of 2 and 4 (as structure discovery names them "fc1[0:2]", "fc1[2:6]")
    parts = tuple(
        Group(
            f"fc1[{lo}:{hi}]",
            hi - lo,
            (
                Axis("fc1.weight", 0, "out", start=lo),
                Axis("fc1.bias", 0, "out", start=lo),
                Axis("fc2.weight", 1, "in", start=lo),
            ),
        )
        for lo, hi in ((0, 2), (2, 6))
    )
    s = Structure(parts)
    x = torch.randn(40, 8)
    stats = collect_features([model], s, [x])
    with torch.no_grad():
        h = model.fc1(x).double()
    torch.testing.assert_close(stats.mean("fc1[0:2]"), h[:, :2].mean(0))
    torch.testing.assert_close(stats.cov("fc1[2:6]"), torch.cov(h[:, 2:].T, correction=0))


def test_group_without_observable_units_names_the_group() -> None:
    from mergelab.structure.types import Axis, Group

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
            self.scale = torch.nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.scale

    model = Scaled()
    g = Group("gated", 3, (Axis("scale", 0, "out"),))
    with pytest.raises(ValueError, match="'gated'.*add probes"):
        collect_features([model], Structure((g,)), [torch.randn(4, 4)])
