"""Alignments, aligned merge methods, BatchNorm reset and REPAIR."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _align_helpers import (
    CNN,
    MLP,
    TinyAttention,
    attention_structure,
    cnn_structure,
    loader,
    mlp_structure,
    random_perms,
    train,
)
from torch import nn

from mergelab.analysis import interpolate_weights
from mergelab.evaluation import evaluate
from mergelab.match import match_activations, match_weights
from mergelab.merge import merge
from mergelab.merge.average import average_state_dicts
from mergelab.merge.repair import channel_statistics, repair, repair_sites, reset_batchnorm
from mergelab.structure.alignment import (
    Alignment,
    apply_alignment,
    identity_alignment,
    merge_state_dicts,
    to_basis,
    transform_tensor,
)
from mergelab.structure.types import Axis, Group, Structure

# ----------------------------------------------------------------------------------------------- alignment


def test_from_permutations_matrices() -> None:
    s = mlp_structure(MLP())
    p = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    al = Alignment.from_permutations(s, [{}, {"fc1": p}], [1.0, 3.0])
    assert al.coefficients == (0.25, 0.75)
    m0, m1 = al.merges["fc1"]
    torch.testing.assert_close((m0 + m1).sum(1), torch.ones(16))  # Σ_i M_i·1 = 1
    torch.testing.assert_close(m1 / 0.75 @ al.unmerges["fc1"][1], torch.eye(16))
    assert m1[3, p[3]] == 0.75
    assert al.width("fc2") == 12 and al.num_models == 2


def test_invalid_permutations_are_rejected() -> None:
    s = attention_structure(TinyAttention())
    with pytest.raises(ValueError, match="not a permutation"):
        Alignment.from_permutations(s, [{}, {"res": torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])}])
    with pytest.raises(ValueError, match="splits a block"):
        Alignment.from_permutations(s, [{}, {"qk": torch.tensor([0, 1, 2, 4, 3, 5, 6, 7])}])
    with pytest.raises(ValueError, match="unknown groups"):
        Alignment.from_permutations(s, [{}, {"nope": torch.arange(3)}])
    with pytest.raises(ValueError, match="8 units"):
        to_basis(TinyAttention(), s, {"res": torch.arange(5)})


def test_identity_alignment_is_weight_averaging() -> None:
    models = [CNN() for _ in range(3)]
    s = cnn_structure(models[0])
    merged = apply_alignment(models, identity_alignment(s, 3, [1, 2, 3]))
    ref = average_state_dicts([m.state_dict() for m in models], [1 / 6, 2 / 6, 3 / 6])
    for k, v in ref.items():
        torch.testing.assert_close(merged.state_dict()[k], v, msg=k)
    assert merged.bn1.num_batches_tracked.dtype == torch.long


def test_general_matrices_equal_permutation_fast_path() -> None:
    torch.manual_seed(0)
    models = [TinyAttention(), TinyAttention()]
    s = attention_structure(models[0])
    al = Alignment.from_permutations(s, [{}, random_perms(s, torch.Generator().manual_seed(1))], [0.3, 0.7])
    dense = Alignment(s, al.merges, al.unmerges, al.coefficients)  # same matrices, no perms: general path
    fast, slow = merge_state_dicts([m.state_dict() for m in models], al), apply_alignment(models, dense)
    for k, v in fast.items():
        torch.testing.assert_close(slow.state_dict()[k], v, msg=k)


def test_transform_tensor_packed_and_inner() -> None:
    w = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    # group a: 2 units of inner 2 starting at 1; group b: 3 units at 6 (entries 6..8); entry 0 and 5, 9 untouched
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    cyc = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out = transform_tensor(
        w, [(Axis("w", 1, "out", inner=2, start=1), swap), (Axis("w", 1, "out", start=6), cyc)]
    )
    idx = torch.tensor([0, 3, 4, 1, 2, 5, 8, 6, 7, 9])
    torch.testing.assert_close(out, w[:, idx])
    # merging 2 units into 1 shrinks the slice and shifts what follows
    half = torch.tensor([[0.5, 0.5]])
    out = transform_tensor(
        w, [(Axis("w", 1, "out", inner=2, start=1), half), (Axis("w", 1, "out", start=6), cyc)]
    )
    assert out.shape == (2, 8, 3)
    torch.testing.assert_close(out[:, 1], (w[:, 1] + w[:, 3]) / 2)
    torch.testing.assert_close(out[:, 4:7], w[:, [8, 6, 7]])


def test_merged_width_must_match() -> None:
    s = mlp_structure(MLP())
    base = identity_alignment(s, 2)
    merges = dict(base.merges, fc1=(torch.ones(8, 16) / 32, torch.ones(8, 16) / 32))
    unmerges = dict(base.unmerges, fc1=(torch.ones(16, 8), torch.ones(16, 8)))
    zipped = Alignment(s, merges, unmerges, base.coefficients)
    with pytest.raises(ValueError, match="merged width differs"):
        apply_alignment([MLP(), MLP()], zipped)
    sd = merge_state_dicts([MLP().state_dict(), MLP().state_dict()], zipped)
    assert sd["fc1.weight"].shape == (8, 8) and sd["fc2.weight"].shape == (12, 8)
    with pytest.raises(ValueError, match="common k"):
        Alignment(s, dict(merges, fc1=(torch.ones(8, 16), torch.ones(7, 16))), unmerges, base.coefficients)


def test_structure_errors_name_the_tensor() -> None:
    bad = Structure((Group("g", 20, (Axis("fc1.weight", 0, "out"),)),))
    with pytest.raises(ValueError, match="fc1.weight"):
        apply_alignment([MLP(), MLP()], identity_alignment(bad, 2))
    with pytest.raises(ValueError, match="architecture|fc2"):
        apply_alignment([MLP(), MLP(hidden=(16, 10))], identity_alignment(mlp_structure(MLP()), 2))


# --------------------------------------------------------------------------------------- merge methods


def test_registered_methods_on_permuted_copies() -> None:
    torch.manual_seed(0)
    model = CNN().eval()
    s = cnn_structure(model)
    permuted = to_basis(model, s, random_perms(s, torch.Generator().manual_seed(4)))
    x = torch.randn(32, 1, 8, 8)
    data = loader(x, torch.zeros(32, dtype=torch.long), batch=16)
    for method in ("weight_matching", "activation_matching"):
        merged = merge([model, permuted], method, data=data, structure=s)
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)
        # the reference decides the basis: with reference=1 the merge equals the permuted copy
        merged1 = merge([model, permuted], method, data=data, structure=s, reference=1)
        for k, v in permuted.state_dict().items():
            torch.testing.assert_close(merged1.state_dict()[k], v, msg=k)
    assert merged is not model and model.training is False


def test_method_option_errors() -> None:
    a, b = MLP(), MLP(hidden=(16, 10))
    s = mlp_structure(a)
    with pytest.raises(ValueError, match="needs data"):
        merge([a, a], "activation_matching", structure=s)
    with pytest.raises(ValueError, match="repair"):
        merge([a, a], "weight_matching", structure=s, repair="repair")  # no data
    with pytest.raises(ValueError, match="'bogus'"):
        merge([a, a], "weight_matching", data=[torch.randn(4, 8)], structure=s, repair="bogus")
    with pytest.raises(ValueError, match="fc2"):
        merge([a, b], "weight_matching", structure=s)
    with pytest.raises(TypeError):
        merge([a, a], "weight_matching", structure=s, coeficients=[1, 1])  # typo: unknown option


def test_methods_with_discovered_structure() -> None:
    structure_mod = pytest.importorskip("mergelab.structure")
    if not hasattr(structure_mod, "discover_structure"):
        pytest.skip("mergelab.structure.discover_structure not available yet")
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(16, 8)
    s = structure_mod.discover_structure(model, x)
    permuted = to_basis(model, s, random_perms(s, torch.Generator().manual_seed(0)))
    for method in ("weight_matching", "activation_matching"):
        merged = merge([model, permuted], method, data=[x])
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ trained models: barriers, REPAIR


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    xs, ys = load_digits(return_X_y=True)
    x = torch.tensor(xs, dtype=torch.float32) / 16.0
    y = torch.tensor(ys, dtype=torch.long)
    return x, y


def _trained_mlp(x, y, seed: int, hidden=(32, 32)) -> MLP:
    torch.manual_seed(seed)
    return train(MLP(d_in=64, hidden=hidden, classes=10), x, y, steps=250)


@pytest.fixture(scope="module")
def trained_pair(digits):
    x, y = digits
    return _trained_mlp(x, y, 0), _trained_mlp(x, y, 1)


def test_aligned_midpoint_barrier_is_lower_than_naive(digits, trained_pair) -> None:
    x, y = digits
    a, b = trained_pair
    data = loader(x, y, batch=512)
    s = mlp_structure(a, probes=True)
    end_loss = (evaluate(a, data).loss + evaluate(b, data).loss) / 2

    def mid_barrier(b_aligned: nn.Module) -> float:
        return evaluate(interpolate_weights(a, b_aligned, 0.5), data).loss - end_loss

    naive = mid_barrier(b)
    wm = match_weights(s, a, b)
    am = match_activations(s, [a, b], data)
    wm_b = mid_barrier(to_basis(b, s, wm.perms[1]))
    am_b = mid_barrier(to_basis(b, s, am.perms[1]))
    assert wm_b < naive and am_b < naive
    assert max(wm_b, am_b) < 0.5 * naive


def test_repair_raises_accuracy_under_variance_collapse(digits) -> None:
    x, y = digits
    data = loader(x, y, batch=600)
    a, b = _trained_mlp(x, y, 8, hidden=(16, 16)), _trained_mlp(x, y, 9, hidden=(16, 16))
    s = mlp_structure(a)
    al = match_weights(s, a, b)
    merged = apply_alignment([a, b], al)
    endpoints = [a, to_basis(b, s, al.perms[1])]
    # variance collapse: the merged hidden units spread less than the endpoints' average
    sd_end = [channel_statistics(m, ["fc2"], data)["fc2"][1] for m in endpoints]
    sd_merged = channel_statistics(merged, ["fc2"], data)["fc2"][1]
    assert float(sd_merged.mean()) < 0.9 * float((sd_end[0] + sd_end[1]).mean() / 2)
    fixed = repair(merged, endpoints, data)
    acc_before, acc_after = evaluate(merged, data).accuracy, evaluate(fixed, data).accuracy
    assert acc_after > acc_before + 0.05
    # the method option does the same
    via_method = merge([a, b], "weight_matching", data=data, structure=s, repair="repair")
    torch.testing.assert_close(via_method(x), fixed(x))


def test_repair_matches_target_statistics() -> None:
    torch.manual_seed(0)
    x = torch.randn(96, 1, 8, 8)
    data = loader(x, batch=32)
    for make, struct in ((CNN, cnn_structure), (lambda: MLP(d_in=64), mlp_structure)):
        a, b = make().eval(), make().eval()
        if isinstance(a, CNN):
            a, b = reset_batchnorm(a, data), reset_batchnorm(b, data)
        s = struct(a)
        merged = apply_alignment([a, b], identity_alignment(s, 2, [0.3, 0.7]))
        fixed = repair(merged, [a, b], data, [0.3, 0.7])
        sites = repair_sites(fixed)
        names = [n for n, _ in sites]
        expected_kinds = ["bn", "bn"] if isinstance(a, CNN) else ["affine", "affine"]
        assert [k for _, k in sites] == expected_kinds
        ends = [channel_statistics(m, names, data) for m in (a, b)]
        got = channel_statistics(fixed, names, data)
        for n in names:
            torch.testing.assert_close(
                got[n][0], 0.3 * ends[0][n][0] + 0.7 * ends[1][n][0], atol=1e-4, rtol=1e-4
            )
            torch.testing.assert_close(
                got[n][1], 0.3 * ends[0][n][1] + 0.7 * ends[1][n][1], atol=1e-4, rtol=1e-4
            )
        assert type(fixed) is type(a) and fixed.state_dict().keys() == a.state_dict().keys()


def test_repair_of_identical_endpoints_keeps_the_function() -> None:
    torch.manual_seed(0)
    a = MLP(d_in=8).eval()
    x = torch.randn(64, 8)
    fixed = repair(a, [a, a], [x])
    torch.testing.assert_close(fixed(x), a(x), atol=1e-4, rtol=1e-4)


def test_reset_batchnorm_recomputes_statistics() -> None:
    torch.manual_seed(0)
    model = CNN()
    model.bn1.momentum = 0.3
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(50, 1, 8, 8)
    out = reset_batchnorm(model, [x])
    h = model.conv1(x)
    torch.testing.assert_close(out.bn1.running_mean, h.mean((0, 2, 3)).detach())
    torch.testing.assert_close(out.bn1.running_var, h.var((0, 2, 3), unbiased=True).detach())
    assert out.bn1.momentum == 0.3 and out.bn2.momentum == 0.1
    assert not out.training and not out.bn1.training
    for k, v in model.state_dict().items():  # the input is untouched
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="no batches"):
        reset_batchnorm(model, [])


def test_bn_reset_option_and_repair_keep_plain_architecture() -> None:
    torch.manual_seed(0)
    a, b = CNN(), CNN()
    s = cnn_structure(a)
    x = torch.randn(40, 1, 8, 8)
    data = loader(x, torch.zeros(40, dtype=torch.long), batch=20)
    for kind in ("reset", "repair"):
        m = merge([a, b], "weight_matching", data=data, structure=s, repair=kind)
        assert isinstance(m, CNN) and m.state_dict().keys() == a.state_dict().keys()
        assert torch.isfinite(m(x)).all()
    reset = merge([a, b], "activation_matching", data=data, structure=s, repair="reset")
    h = reset.conv1(x)
    torch.testing.assert_close(reset.bn1.running_mean, h.mean((0, 2, 3)).detach(), atol=1e-5, rtol=1e-5)


def test_no_norm_sites_skip_the_head() -> None:
    sites = repair_sites(MLP())
    assert sites == [("fc1", "affine"), ("fc2", "affine")]
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    assert repair_sites(net) == [("1", "bn")]


def test_toy_training_helper_learns(digits) -> None:
    x, y = digits
    model = _trained_mlp(x[:300], y[:300], 0, hidden=(16, 16))
    assert float((model(x[:300]).argmax(1) == y[:300]).float().mean()) > 0.9
    assert F.cross_entropy(model(x[:300]), y[:300]) < 0.5
