"""Late-phase weights and SWA: members differ, collapse to one plain model, K=1 is ordinary training, SWA averages."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mergelab.io
from mergelab.evaluation import evaluate, update_batchnorm
from mergelab.models import build_model
from mergelab.train import BaseCallback, TrainConfig, TrainState, train
from mergelab.train.late_phase import (
    LatePhaseCallback,
    evaluate_ensemble,
    late_phase_norm_parameters,
    rank1_layers,
    train_late_phase,
)
from mergelab.train.swa import SWACallback, train_swa


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread pool's
    # spin-waiting makes them 10-20x slower; restore the setting for the other test modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _toy(n: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.flatten(1)[:, :4].sum(1) > 0).long() + (x.flatten(1)[:, 4] > 0.5).long()
    return TensorDataset(x, y)


def _vgg(seed: int = 0, norm: str | None = "batchnorm") -> nn.Module:
    torch.manual_seed(seed)
    return build_model("vgg", (1, 8, 8), 3, width=0.125, norm=norm)


def _cfg(epochs: int = 3, optimizer: str = "sgd", **kw: object) -> TrainConfig:
    lr = 0.05 if optimizer == "sgd" else 1e-2
    return TrainConfig(epochs=epochs, batch_size=16, optimizer=optimizer, lr=lr, weight_decay=5e-4,
                       progress=False, **kw)  # fmt: skip


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_k1_bn_is_exactly_ordinary_training(optimizer: str) -> None:
    cfg = _cfg(optimizer=optimizer, data_seed=2)
    plain, late = _vgg(), _vgg()
    h_plain = train(plain, _toy(), cfg, test_data=_toy(32, 1))
    r = train_late_phase(late, _toy(), cfg, variant="bn", k=1, t0=1, noise=0.0, test_data=_toy(32, 1))
    for (name, a), b in zip(plain.state_dict().items(), late.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert h_plain.to_dict() == r.history.to_dict()
    assert r.member_steps == [2 * 6]  # epochs 1..2 of 6 batches each


@pytest.mark.parametrize("schedule", ["cycle", "random"])
def test_bn_members_differ_then_collapse_to_their_average(schedule: str) -> None:
    model = _vgg()
    late_names = {n for n, _ in late_phase_norm_parameters(model)}
    r = train_late_phase(model, _toy(), _cfg(4), variant="bn", k=3, t0=1, noise=0.05, schedule=schedule)
    assert r.model is model and len(r.members) == 3 and sum(r.member_steps) == 3 * 6
    members = [_params(m) for m in r.members]
    avg = _params(model)
    for name in avg:
        if name in late_names:
            assert not torch.equal(members[0][name], members[1][name]), name  # members really differ
            mean = sum(m[name] for m in members) / 3
            torch.testing.assert_close(avg[name], mean, rtol=0, atol=1e-6)  # ... and collapse to their mean
        else:
            for m in members:
                assert torch.equal(m[name], avg[name]), name  # the shared weights are shared
    # BatchNorm statistics of the average were recomputed on the training data.
    fresh = update_batchnorm(copy.deepcopy(model), DataLoader(_toy(), batch_size=256))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_rank1_members_fold_into_plain_weights() -> None:
    model = _vgg()
    fresh_keys = list(_vgg().state_dict())
    layer_names = {f"{n}.weight" for n, _ in rank1_layers(model)}
    r = train_late_phase(model, _toy(), _cfg(3), variant="rank1", k=3, t0=1, noise=0.1)
    assert list(model.state_dict()) == fresh_keys  # same architecture and names
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # no hooks left
    members = [_params(m) for m in r.members]
    avg = _params(model)
    for name in avg:
        if name in layer_names:
            assert not torch.equal(members[0][name], members[1][name]), name
            torch.testing.assert_close(avg[name], sum(m[name] for m in members) / 3, rtol=0, atol=1e-6)
        else:
            assert all(torch.equal(m[name], avg[name]) for m in members), name


class _Probe(BaseCallback):
    """Placed before the late-phase callback: sees the hooked model at the end of the last epoch."""

    def __init__(self, late: LatePhaseCallback, x: torch.Tensor) -> None:
        self.late, self.x = late, x
        self.member: int | None = None
        self.out: torch.Tensor | None = None

    def on_epoch_end(self, state: TrainState) -> None:
        if state.epoch == state.config.epochs - 1:
            self.member = self.late.current_member
            state.model.eval()
            with torch.no_grad():
                self.out = state.model(self.x)
            state.model.train()


def test_rank1_member_model_computes_what_the_hooked_model_computed() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 3, width=16, depth=2)  # no BatchNorm: member stats stay as trained
    late = LatePhaseCallback("rank1", k=2, t0=1, noise=0.2)
    x = _toy(8, 3).tensors[0]
    probe = _Probe(late, x)
    train(model, _toy(), _cfg(2), callbacks=[probe, late])
    assert probe.member is not None and probe.out is not None
    with torch.no_grad():
        torch.testing.assert_close(late.members[probe.member](x), probe.out, rtol=1e-5, atol=1e-5)


def test_averaged_model_is_a_plain_zoo_model(tmp_path: Path) -> None:
    model = _vgg()
    r = train_late_phase(model, _toy(), _cfg(2), variant="rank1", k=2, t0=1)
    path = mergelab.io.save(r.model, tmp_path / "lp", metadata={"late_phase": "rank1"})
    loaded = mergelab.io.load(path)
    x = _toy(16, 4).tensors[0]
    r.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), r.model(x))
    assert mergelab.io.read_config(path)["model"]["arch"] == "vgg"


def test_layernorm_and_groupnorm_members() -> None:
    for norm in ("layernorm", "groupnorm"):
        model = _vgg(norm=norm)
        r = train_late_phase(model, _toy(), _cfg(2), variant="bn", k=2, t0=1, noise=0.1)
        name = next(n for n, _ in late_phase_norm_parameters(model))
        assert not torch.equal(dict(r.members[0].named_parameters())[name],
                               dict(r.members[1].named_parameters())[name])  # fmt: skip


def test_head_members_are_part_of_the_bn_variant() -> None:
    model = _vgg()
    r = train_late_phase(model, _toy(), _cfg(2), variant="bn", k=2, t0=1, head=True)
    a, b = (dict(m.named_parameters())["head.weight"] for m in r.members)
    assert not torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "k \\(number of members\\) must be an int >= 1"),
        ({"t0": 3}, "t0=3 must be < epochs=3"),
        ({"t0": -1}, "t0 .* must be an int >= 0"),
        ({"variant": "lora"}, "unknown variant 'lora'"),
        ({"schedule": "round-robin"}, "unknown schedule"),
        ({"shared_grad": "max"}, "unknown shared_grad 'max'"),
        ({"noise": -0.1}, "noise .* must be >= 0"),
        ({"swa": True, "swa_start": 3}, "swa_start=3 must be an epoch in \\[0, 3\\)"),
        ({"variant": "rank1", "head": True}, "head=True only applies to variant 'bn'"),
    ],
)
def test_wrong_options_raise_clear_errors(kwargs: dict, match: str) -> None:
    options = {"variant": "bn", "k": 2, "t0": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        train_late_phase(_vgg(), _toy(), _cfg(3), **options)


def test_bn_variant_needs_norm_layers() -> None:
    with pytest.raises(ValueError, match="late-phase 'bn': VGG has no norm layer"):
        train_late_phase(_vgg(norm=None), _toy(), _cfg(2), variant="bn", k=2, t0=1)


def test_callback_alone_needs_bn_data_for_batchnorm() -> None:
    with pytest.raises(ValueError, match="pass bn_data"):
        train(_vgg(), _toy(), _cfg(2), callbacks=[LatePhaseCallback("bn", k=2, t0=1)])
    with pytest.raises(ValueError, match="pass bn_data"):
        train(_vgg(), _toy(), _cfg(2), callbacks=[SWACallback(1)])


class _EpochEnds(BaseCallback):
    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, state: TrainState) -> None:
        self.params.append(_params(state.model))


def test_swa_averages_the_epoch_end_weights() -> None:
    rec = _EpochEnds()
    swa = SWACallback(1, bn_data=_toy(), swa_lr=0.01)
    model = _vgg()
    train(model, _toy(), _cfg(3), callbacks=[rec, swa])
    assert swa.n_averaged == 2 and swa.model is not None
    avg = _params(swa.model)
    for name, v in avg.items():
        torch.testing.assert_close(v, (rec.params[1][name] + rec.params[2][name]) / 2, msg=name)
    assert list(swa.model.state_dict()) == list(model.state_dict())


def test_swa_on_late_phase_averages_the_collapsed_model() -> None:
    rec = _EpochEnds()
    model = _vgg()
    r = train_late_phase(
        model, _toy(), _cfg(3), variant="bn", k=2, t0=1, swa=True, swa_start=1, callbacks=[rec]
    )
    assert r.swa_model is not None and r.model is r.swa_model and r.averaged is model
    for name, v in _params(r.swa_model).items():
        torch.testing.assert_close(v, (rec.params[1][name] + rec.params[2][name]) / 2, msg=name)
    metrics = r.evaluate(_toy(32, 1))
    assert set(metrics) == {"averaged", "ensemble", "member_0", "member_1", "swa"}


def test_train_swa_returns_average_and_final() -> None:
    model = _vgg()
    r = train_swa(model, _toy(), _cfg(3), swa_start=2)
    assert r.final is model and r.n_averaged == 1
    for name, v in _params(r.model).items():
        assert torch.equal(v, dict(model.named_parameters())[name]), name  # one epoch averaged = last iterate


def test_ensemble_of_identical_members_is_the_member() -> None:
    model = _vgg()
    model.eval()
    data = DataLoader(_toy(32, 1), batch_size=8)
    single, ens = evaluate(model, data), evaluate_ensemble([model, copy.deepcopy(model)], data)
    assert single.accuracy == ens.accuracy
    assert ens.loss == pytest.approx(single.loss, rel=1e-5)


class _SharedChanges(BaseCallback):
    """Records, after every step, whether a shared weight (the first conv) moved."""

    def __init__(self) -> None:
        self.before: torch.Tensor | None = None
        self.moved: list[bool] = []

    def before_step(self, state: TrainState) -> None:
        self.before = state.model.blocks[0].weight.detach().clone()

    def after_step(self, state: TrainState) -> None:
        assert self.before is not None
        self.moved.append(not torch.equal(self.before, state.model.blocks[0].weight))


@pytest.mark.parametrize("schedule", ["cycle", "random"])
def test_cycle_steps_the_shared_weights_once_per_cycle(schedule: str) -> None:
    probe = _SharedChanges()
    model = _vgg()
    train_late_phase(model, _toy(80), _cfg(2), variant="bn", k=2, t0=1, schedule=schedule, callbacks=[probe])
    late = probe.moved[5:]  # 5 batches per epoch; epoch 1 is the late phase
    if (
        schedule == "cycle"
    ):  # gradients of members 0 and 1 summed, one shared step per pair, the odd one at the end
        assert late == [False, True, False, True, True]
    else:
        assert all(late)
    assert all(probe.moved[:5])


def test_random_schedule_is_seeded() -> None:
    a = train_late_phase(_vgg(), _toy(), _cfg(3), variant="bn", k=3, t0=1, schedule="random", seed=5)
    b = train_late_phase(_vgg(), _toy(), _cfg(3), variant="bn", k=3, t0=1, schedule="random", seed=5)
    assert a.member_steps == b.member_steps and sum(a.member_steps) == 12
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_study_runs_end_to_end(tmp_path: Path) -> None:
    from mergelab.experiments.runner import run_study

    overrides = ['datasets=["digits"]', 'archs=["vgg"]', 'variants=["baseline", "bn+swa", "rank1"]', "seeds=[0]",
                 "epochs=2", "t0=1", "swa_start=1", "k=2", "vgg_width=0.125",
                 "t0_fractions=[0.0, 0.5]", 'sweep_schedules=["cycle"]']  # fmt: skip
    report = run_study("late-phase", tmp_path / "run", overrides=overrides, progress=False)
    text = report.read_text()
    assert "| digits | vgg | bn+swa |" in text and "96.46" in text
    assert text.index("Claims and verdicts") < text.index("## Setup")
    assert (
        "T0 = 0 hurts (cycle schedule)" in text and (tmp_path / "run" / "t0-sweep-digits-vgg.png").is_file()
    )
    assert (tmp_path / "run" / "curves-digits.png").is_file()
    assert (
        mergelab.io.load(tmp_path / "run" / "models" / "digits-vgg" / "bn-swa-seed0").mergelab_spec["arch"]
        == "vgg"
    )


@pytest.mark.slow
def test_study_with_both_datasets_archs_and_seeds(tmp_path: Path) -> None:
    from mergelab.experiments.runner import run_study

    overrides = ["seeds=[0, 1]", "epochs=3", "t0=1", "swa_start=2", "k=2", "resnet_width=0.25",
                 "vgg_width=0.125", "mnist1d_samples=600", 'datasets=["mnist1d", "digits"]', 'archs=["resnet", "vgg"]',
                 "t0_fractions=[]",
                 'variants=["baseline", "swa", "bn", "bn+swa", "rank1", "rank1+swa"]']  # fmt: skip
    report = run_study("late-phase", tmp_path / "run", overrides=overrides, progress=False)
    text = report.read_text()
    for row in ("| mnist1d | resnet | rank1+swa |", "| digits | vgg | baseline |"):
        assert row in text
    assert len(list((tmp_path / "run" / "models").glob("*/*"))) == 2 * 2 * 6 * 2
    loaded = mergelab.io.load(tmp_path / "run" / "models" / "digits-resnet" / "bn-swa-seed1")
    assert loaded.mergelab_spec["kwargs"]["norm"] == "batchnorm"
