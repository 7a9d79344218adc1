"""Properties of the task-vector merges (task arithmetic, TIES, DARE) on tiny MLPs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mergelab
from mergelab.merge import METHODS, list_methods, merge
from mergelab.merge.task_vectors import (
    TaskVectorConfig,
    combine_task_vectors,
    dare,
    merge_task_vectors,
    task_arithmetic,
    ties,
)

TV_METHODS = ["task_arithmetic", "ties", "dare"]


def mlp(seed: int = 0, hidden: int = 8, bn: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, hidden)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(), nn.Linear(hidden, 3)]
    return nn.Sequential(*layers)


def fine_tune(base: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """A stand-in fine-tune: the base plus a random task vector (and shifted BN statistics)."""
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        for name, buf in model.named_buffers():
            if "running" in name:
                buf.add_(torch.rand(buf.shape, generator=g))
    return model


def with_deltas(base: nn.Module, deltas: dict[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(base)
    sd = model.state_dict()
    model.load_state_dict({k: sd[k] + deltas[k] if k in deltas else sd[k] for k in sd})
    return model


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_params_close(model: nn.Module, expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    got = params(model)
    assert set(got) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, atol=atol, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def task_vector(model: nn.Module, base: nn.Module) -> dict[str, torch.Tensor]:
    b = params(base)
    return {k: v - b[k] for k, v in params(model).items()}


@pytest.fixture
def base() -> nn.Module:
    return mlp(0)


@pytest.fixture
def fine_tunes(base: nn.Module) -> list[nn.Module]:
    return [fine_tune(base, seed) for seed in (1, 2, 3)]


# --- task arithmetic ---


def test_task_arithmetic_one_model_scaling_one_gives_it_back(base: nn.Module) -> None:
    ft = fine_tune(base, 1)
    for merged in (task_arithmetic([ft], base=base, scaling=1.0), task_arithmetic([ft], base=base)):
        assert_params_close(merged, params(ft))


def test_task_arithmetic_identical_fine_tunes_add_n_times(base: nn.Module) -> None:
    ft = fine_tune(base, 1)
    tau = task_vector(ft, base)
    n, lam = 3, 0.3
    merged = task_arithmetic([copy.deepcopy(ft) for _ in range(n)], base=base, scaling=lam)
    b = params(base)
    assert_params_close(merged, {k: b[k] + lam * n * tau[k] for k in b})


def test_task_arithmetic_default_scaling_is_the_uniform_average(base: nn.Module, fine_tunes: list) -> None:
    merged = task_arithmetic(fine_tunes, base=base)
    ps = [params(m) for m in fine_tunes]
    assert_params_close(merged, {k: sum(p[k] for p in ps) / len(ps) for k in ps[0]})


# --- TIES ---


def test_ties_full_density_agreeing_signs_is_scaled_mean(base: nn.Module) -> None:
    g = torch.Generator().manual_seed(7)
    signs = {k: torch.randint(0, 2, v.shape, generator=g) * 2.0 - 1 for k, v in params(base).items()}
    taus = [
        {k: s * (0.05 + torch.rand(s.shape, generator=g)) for k, s in signs.items()}  # same signs, |τ| > 0
        for _ in range(3)
    ]
    models = [with_deltas(base, t) for t in taus]
    lam = 0.7
    merged = ties(models, base=base, scaling=lam, density=1.0)
    b = params(base)
    assert_params_close(merged, {k: b[k] + lam * sum(t[k] for t in taus) / 3 for k in b})


def test_ties_elects_sign_by_mass_and_takes_disjoint_mean() -> None:
    base = nn.Linear(2, 1, bias=False)
    w = base.weight.detach().clone()  # (1, 2)
    # entry 0: +3, -1, -1 -> mass elects "+" (a head count would elect "-"); disjoint mean = 3
    # entry 1: +1, +2, -4 -> mass elects "-"; disjoint mean = -4
    taus = [torch.tensor([[3.0, 1.0]]), torch.tensor([[-1.0, 2.0]]), torch.tensor([[-1.0, -4.0]])]
    models = [with_deltas(base, {"weight": t}) for t in taus]
    merged = ties(models, base=base, density=1.0)
    torch.testing.assert_close(merged.weight.detach(), w + torch.tensor([[3.0, -4.0]]))


def test_ties_trims_to_largest_magnitudes() -> None:
    base = nn.Linear(4, 1, bias=False)
    w = base.weight.detach().clone()
    tau = torch.tensor([[1.0, -4.0, 2.0, 0.5]])
    merged = ties([with_deltas(base, {"weight": tau})], base=base, density=0.5)
    torch.testing.assert_close(merged.weight.detach(), w + torch.tensor([[0.0, -4.0, 2.0, 0.0]]))


# --- DARE ---


@pytest.mark.parametrize("combine", ["sum", "mean"])
def test_dare_without_drops_is_task_arithmetic(base: nn.Module, fine_tunes: list, combine: str) -> None:
    lam = 0.8
    got = dare(fine_tunes, base=base, scaling=lam, drop_rate=0.0, combine=combine)
    ta_scaling = lam if combine == "sum" else lam / len(fine_tunes)
    assert_params_close(got, params(task_arithmetic(fine_tunes, base=base, scaling=ta_scaling)))


def test_dare_ties_without_drops_is_ties_without_trim(base: nn.Module, fine_tunes: list) -> None:
    got = dare(fine_tunes, base=base, drop_rate=0.0, sign_election=True, scaling=0.9)
    assert_params_close(got, params(ties(fine_tunes, base=base, density=1.0, scaling=0.9)))


@pytest.mark.parametrize("sign_election", [False, True])
def test_dare_is_seeded(base: nn.Module, fine_tunes: list, sign_election: bool) -> None:
    def run(seed: int) -> dict[str, torch.Tensor]:
        return params(dare(fine_tunes, base=base, drop_rate=0.5, sign_election=sign_election, seed=seed))

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_dare_is_unbiased_on_a_big_tensor(p: float) -> None:
    torch.manual_seed(0)
    base = nn.Linear(200, 200, bias=False)  # 40,000 entries
    tau = 0.1 * torch.randn(200, 200)
    ft = with_deltas(base, {"weight": tau})
    merged = dare([ft], base=base, drop_rate=p, combine="sum", seed=3)
    got = merged.weight.detach() - base.weight.detach()  # the DARE'd task vector
    dropped = got == 0
    assert abs(dropped.float().mean().item() - p) < 0.02
    torch.testing.assert_close(got[~dropped], tau[~dropped] / (1 - p))  # survivors rescaled exactly
    # E[dare(τ)] = τ: the least-squares scale of the DARE'd vector on τ is ≈ 1 (std ≈ 0.03 at p = 0.9)
    assert abs((got * tau).sum().item() / (tau * tau).sum().item() - 1.0) < 0.15


# --- shared contract ---


@pytest.mark.parametrize("method", TV_METHODS)
def test_missing_base_is_a_clear_error(fine_tunes: list, method: str) -> None:
    with pytest.raises(ValueError, match="base="):
        merge(fine_tunes, method=method)
    with pytest.raises(TypeError, match="base must be an nn.Module"):
        merge(fine_tunes, method=method, base="not a model")


@pytest.mark.parametrize("method", TV_METHODS)
def test_mismatched_shapes_name_the_tensor(base: nn.Module, fine_tunes: list, method: str) -> None:
    wider = mlp(0, hidden=9)
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        merge([*fine_tunes, wider], method=method, base=base)
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        merge(fine_tunes, method=method, base=wider)


def test_mismatched_keys_are_an_error(base: nn.Module, fine_tunes: list) -> None:
    with pytest.raises(ValueError, match="does not share"):
        merge([*fine_tunes, mlp(0, bn=True)], method="ties", base=base)


@pytest.mark.parametrize("method", TV_METHODS)
def test_inputs_are_never_modified(method: str) -> None:
    base = mlp(0, bn=True)
    models = [fine_tune(base, s) for s in (1, 2)]
    before = [copy.deepcopy(m.state_dict()) for m in (base, *models)]
    merged = merge(models, method=method, base=base)
    for m, sd in zip((base, *models), before, strict=True):
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
    with torch.no_grad():  # the result shares no storage with the inputs
        for p in merged.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[0][k]) for k, v in base.state_dict().items())


@pytest.mark.parametrize("method", TV_METHODS)
def test_batchnorm_statistics_are_averaged_and_counters_come_from_base(method: str) -> None:
    base = mlp(0, bn=True)
    base[1].num_batches_tracked.fill_(5)
    models = [fine_tune(base, s) for s in (1, 2, 3)]
    for i, m in enumerate(models):
        m[1].num_batches_tracked.fill_(100 + i)
    merged = merge(models, method=method, base=base, scaling=2.0)
    for stat in ("running_mean", "running_var"):
        expected = torch.stack([getattr(m[1], stat) for m in models]).mean(dim=0)
        torch.testing.assert_close(getattr(merged[1], stat), expected)
    assert merged[1].num_batches_tracked.item() == 5


def test_ties_smoke_through_public_merge(base: nn.Module, fine_tunes: list) -> None:
    merged = mergelab.merge(fine_tunes, method="ties", base=base)
    assert isinstance(merged, nn.Sequential) and merged is not base
    out = merged(torch.randn(5, 6))
    assert out.shape == (5, 3) and torch.isfinite(out).all()


def test_ties_smoke_through_registry_merge(base: nn.Module, fine_tunes: list) -> None:
    merged = merge(fine_tunes, method="ties", base=base)
    assert isinstance(merged, nn.Sequential) and merged is not base
    out = merged(torch.randn(5, 6))
    assert out.shape == (5, 3) and torch.isfinite(out).all()


def test_methods_are_registered_with_papers() -> None:
    assert set(TV_METHODS) <= set(list_methods())
    for name in TV_METHODS:
        assert METHODS[name].paper.startswith("https://arxiv.org/abs/")
        assert not METHODS[name].needs_data and METHODS[name].summary


def test_unknown_option_is_a_type_error(base: nn.Module, fine_tunes: list) -> None:
    with pytest.raises(TypeError):
        merge(fine_tunes, method="ties", base=base, desnity=0.5)


@pytest.mark.parametrize(
    "kwargs",
    [{"density": 0.0}, {"density": 1.5}, {"drop_rate": 1.0}, {"drop_rate": -0.1}, {"combine": "max"}],
)
def test_bad_config_values_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        TaskVectorConfig(**kwargs)


def test_combine_keeps_dtype_and_shape() -> None:
    deltas = torch.randn(4, 3, 5, dtype=torch.float64)
    out = combine_task_vectors(deltas, TaskVectorConfig(density=0.4, drop_rate=0.2, sign_election=True))
    assert out.shape == (3, 5) and out.dtype == torch.float64


def test_low_precision_models_merge_in_float32() -> None:
    base = mlp(0).to(torch.bfloat16)
    ft = fine_tune(mlp(0), 1).to(torch.bfloat16)
    merged = merge_task_vectors([ft], base, TaskVectorConfig())
    assert merged[0].weight.dtype == torch.bfloat16
    torch.testing.assert_close(merged[0].weight, ft[0].weight, atol=1e-2, rtol=1e-2)
