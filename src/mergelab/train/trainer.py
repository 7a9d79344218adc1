"""A small, deterministic supervised trainer.

Seeds are explicit and separate: the caller seeds the *initialisation* (``torch.manual_seed`` before building
the model); ``TrainConfig.data_seed`` fixes the data order and dropout. On CPU the same config and the same
initial weights give bit-identical results.

Extensions (late-phase weights, SWA) plug in as callbacks rather than subclasses.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mergelab.evaluation import Metrics, batches, evaluate, scores_and_targets

log = logging.getLogger(__name__)

Optimizer = Literal["sgd", "adam", "adamw"]
Schedule = Literal["cosine", "onecycle", "constant"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run.

    ``lr`` defaults suit Adam on the small zoo models; for SGD use ~0.05–0.1 with momentum 0.9.
    """

    epochs: int = 20
    batch_size: int = 64
    optimizer: Optimizer = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Schedule = "cosine"
    warmup_fraction: float = 0.0  # fraction of steps with linear warm-up (cosine only); onecycle has its own
    label_smoothing: float = 0.0
    data_seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"TrainConfig: epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"TrainConfig: batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig: lr must be positive, got {self.lr}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"TrainConfig: unknown optimizer {self.optimizer!r}; use sgd, adam or adamw")
        if self.schedule not in ("cosine", "onecycle", "constant"):
            raise ValueError(
                f"TrainConfig: unknown schedule {self.schedule!r}; use cosine, onecycle or constant"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"TrainConfig: label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class History:
    """Per-epoch learning curves (test entries are NaN when no test data was given)."""

    epoch: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[float]]:
        return asdict(self)

    @property
    def final(self) -> dict[str, float]:
        return {k: v[-1] for k, v in self.to_dict().items() if v}


@dataclass
class TrainState:
    """What callbacks see and may change (the optimizer gains param groups in late-phase training)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config: TrainConfig
    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    history: History = field(default_factory=History)
    generator: torch.Generator = field(default_factory=torch.Generator)


class Callback(Protocol):
    """Hooks into the loop; every method is optional (see :class:`BaseCallback`)."""

    def on_train_begin(self, state: TrainState) -> None: ...
    def on_epoch_begin(self, state: TrainState) -> None: ...
    def before_step(self, state: TrainState) -> None: ...
    def after_step(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...


class BaseCallback:
    """No-op implementations of every hook, to subclass."""

    def on_train_begin(self, state: TrainState) -> None:
        pass

    def on_epoch_begin(self, state: TrainState) -> None:
        pass

    def before_step(self, state: TrainState) -> None:
        pass

    def after_step(self, state: TrainState) -> None:
        pass

    def on_epoch_end(self, state: TrainState) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(total_steps, 2))
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    warmup = int(cfg.warmup_fraction * total_steps)

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def train(
    model: nn.Module,
    train_data: Dataset | DataLoader,
    config: TrainConfig | None = None,
    *,
    test_data: Dataset | DataLoader | None = None,
    callbacks: Sequence[Callback] = (),
) -> History:
    """Train ``model`` in place with cross-entropy and return its learning curves.

    Args:
        model: any classifier ``x -> logits`` (per sample, or per position with ``(N, T)`` targets such as a
            language model's next tokens; see :mod:`mergelab.evaluation`).
        train_data: a ``Dataset`` of ``(x, y)`` (shuffled with ``config.data_seed``) or a ready ``DataLoader``.
        config: hyper-parameters (defaults: Adam, cosine schedule, 20 epochs).
        test_data: evaluated after every epoch.
        callbacks: hooks such as late-phase weights or SWA.

    Example:
        >>> import torch, mergelab
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
        >>> m = mergelab.build_model("mlp", (1, 8, 8), 10, width=16, depth=1)
        >>> h = mergelab.train(m, ds, mergelab.TrainConfig(epochs=2, progress=False))
        >>> len(h.train_loss)
        2
    """
    cfg = config or TrainConfig()
    gen = torch.Generator().manual_seed(cfg.data_seed)
    loader = _as_loader(train_data, cfg.batch_size, shuffle=True, generator=gen)
    test_loader = _as_loader(test_data, 512, shuffle=False) if test_data is not None else None
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("train: the training data is empty")
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.epochs * steps_per_epoch)
    state = TrainState(model, optimizer, scheduler, cfg, steps_per_epoch=steps_per_epoch, generator=gen)
    # Dropout and any other in-model randomness follow the data seed, so a run is reproducible end to end.
    rng_state = torch.get_rng_state()
    torch.manual_seed(cfg.data_seed)
    try:
        _run(state, loader, test_loader, callbacks)
    finally:
        torch.set_rng_state(rng_state)
    return state.history


def _run(
    state: TrainState, loader: DataLoader, test_loader: DataLoader | None, callbacks: Sequence[Callback]
) -> None:
    cfg, model = state.config, state.model
    for cb in callbacks:
        cb.on_train_begin(state)
    bar = tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not cfg.progress, leave=False)
    for epoch in bar:
        state.epoch = epoch
        model.train()
        for cb in callbacks:
            cb.on_epoch_begin(state)
        total, correct, count = 0.0, 0, 0
        lr = state.optimizer.param_groups[0]["lr"]
        for x, y in batches(loader):
            if y is None:
                raise ValueError("train: the training data yields no labels; it must yield (x, y)")
            for cb in callbacks:
                cb.before_step(state)
            out, y = scores_and_targets(state.model(x), y)
            loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"train: loss became {loss.item()} at epoch {epoch}; lower the lr")
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            state.scheduler.step()
            state.step += 1
            for cb in callbacks:
                cb.after_step(state)
            total += loss.item() * len(y)
            correct += (out.argmax(-1) == y).sum().item()
            count += len(y)
        for cb in callbacks:
            cb.on_epoch_end(state)
        h = state.history
        h.epoch.append(epoch + 1)
        h.lr.append(lr)
        h.train_loss.append(total / count)
        h.train_accuracy.append(correct / count)
        test = (
            evaluate(state.model, test_loader) if test_loader is not None else Metrics(math.nan, math.nan, 0)
        )
        h.test_loss.append(test.loss)
        h.test_accuracy.append(test.accuracy)
        bar.set_postfix(
            loss=f"{total / count:.3f}", acc=f"{correct / count:.3f}", test_acc=f"{test.accuracy:.3f}"
        )
        log.info(
            "epoch %d: train loss %.4f acc %.4f, test acc %.4f",
            epoch + 1,
            total / count,
            correct / count,
            test.accuracy,
        )
    for cb in callbacks:
        cb.on_train_end(state)
    state.model.eval()


def _as_loader(
    data: Dataset | DataLoader, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)
