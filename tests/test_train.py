"""The trainer learns, is deterministic, and checks its options."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from mergelab.models import build_model
from mergelab.train import BaseCallback, TrainConfig, TrainState, train


def _toy(n: int = 128) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.flatten(1)[:, :3].sum(1) > 0).long() + (x.flatten(1)[:, 3] > 1).long()
    return TensorDataset(x, y)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", (1, 8, 8), 3, width=16, depth=1)


def test_training_lowers_the_loss() -> None:
    ds = _toy()
    h = train(_model(), ds, TrainConfig(epochs=5, lr=1e-2, progress=False), test_data=ds)
    assert h.train_loss[-1] < h.train_loss[0]
    assert len(h.test_accuracy) == 5


@pytest.mark.parametrize(
    "optimizer,schedule", [("sgd", "onecycle"), ("adamw", "constant"), ("adam", "cosine")]
)
def test_same_seeds_give_identical_weights(optimizer: str, schedule: str) -> None:
    cfg = TrainConfig(
        epochs=2,
        optimizer=optimizer,
        schedule=schedule,
        lr=1e-2,
        progress=False,
        data_seed=3,
        label_smoothing=0.1,
    )
    a, b = _model(), _model()
    train(a, _toy(), cfg)
    train(b, _toy(), cfg)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    c = _model()
    train(
        c,
        _toy(),
        TrainConfig(
            epochs=2,
            optimizer=optimizer,
            schedule=schedule,
            lr=1e-2,
            progress=False,
            data_seed=4,
            label_smoothing=0.1,
        ),
    )
    assert not torch.equal(a.head.weight, c.head.weight)


def test_callbacks_see_every_step() -> None:
    class Count(BaseCallback):
        steps = 0
        epochs = 0

        def after_step(self, state: TrainState) -> None:
            self.steps += 1

        def on_epoch_end(self, state: TrainState) -> None:
            self.epochs += 1

    cb = Count()
    train(_model(), _toy(100), TrainConfig(epochs=2, batch_size=32, progress=False), callbacks=[cb])
    assert (cb.steps, cb.epochs) == (8, 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"optimizer": "rmsprop"}, "rmsprop"),
        ({"schedule": "step"}, "step"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
    ],
)
def test_bad_options_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_unlabelled_data_is_refused() -> None:
    with pytest.raises(ValueError, match="labels"):
        train(_model(), [torch.randn(4, 1, 8, 8)], TrainConfig(epochs=1, progress=False))
