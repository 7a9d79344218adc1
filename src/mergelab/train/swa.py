"""Stochastic Weight Averaging (Izmailov et al., UAI 2018, https://arxiv.org/abs/1803.05407) as a trainer callback.

SWA averages the weights visited at the end of every epoch from ``start_epoch`` on, then recomputes the
BatchNorm running statistics of the average on the training data (the averaged weights never saw the
statistics of the individual iterates). The average lives in a ``torch.optim.swa_utils.AveragedModel`` and is
handed out as a plain model (``callback.model``) of the same architecture, so it saves, loads and merges like
any other model. With ``swa_lr`` the learning rate is annealed to that constant value from ``start_epoch`` on
(``SWALR``), the usual SWA recipe; without it the trainer's own schedule keeps running.

The callback composes with late-phase weights (:mod:`mergelab.train.late_phase`): put it *after* the
late-phase callback, whose ``on_epoch_end`` writes the averaged late-phase weights into the model, so SWA
averages the collapsed late-phase model over epochs (as in von Oswald et al., 2021, Table 1 "+ SWA").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel
from torch.utils.data import DataLoader, Dataset

from mergelab.batchnorm import has_batchnorm, update_batchnorm
from mergelab.train.trainer import BaseCallback, History, TrainConfig, TrainState, train

log = logging.getLogger(__name__)

__all__ = ["SWACallback", "SWAResult", "default_swa_start", "train_swa"]


def default_swa_start(epochs: int) -> int:
    """The usual SWA start: after 75 % of the epochs (Izmailov et al.), at least epoch 0, at most the last."""
    return min(max(0, int(0.75 * epochs)), epochs - 1)


def as_loader(data: Dataset | DataLoader | Iterable, batch_size: int = 256) -> Iterable:
    """A ``Dataset`` becomes an unshuffled loader; loaders and other iterables pass through."""
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return data


def base_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The real optimizer behind a stand-in (late-phase training wraps the trainer's optimizer)."""
    return getattr(optimizer, "base_optimizer", optimizer)  # type: ignore[return-value]


class SWACallback(BaseCallback):
    """Average the weights at the end of every epoch from ``start_epoch`` on (0-based), then fix BatchNorm.

    Args:
        start_epoch: first epoch (0-based) whose final weights enter the average; ``0 <= start_epoch < epochs``.
        bn_data: data (``Dataset``, loader of ``x`` or ``(x, y)``) for recomputing BatchNorm statistics at the
            end; required when the model has BatchNorm.
        swa_lr: if given, anneal the learning rate to this constant from ``start_epoch`` on (``SWALR``,
            cosine over ``anneal_epochs``), replacing the trainer's schedule.
        anneal_epochs: epochs of the annealing to ``swa_lr``.
        batch_size: batch size for ``bn_data`` when it is a ``Dataset``.

    After training, ``model`` is the averaged plain model (a deep copy; the trained model is left as it is)
    and ``n_averaged`` the number of epochs averaged.

    Example:
        >>> import torch, mergelab
        >>> from torch.utils.data import TensorDataset
        >>> from mergelab.train import TrainConfig, train
        >>> ds = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
        >>> m = mergelab.build_model("mlp", (1, 8, 8), 10, width=16, depth=1)
        >>> swa = SWACallback(start_epoch=1)
        >>> _ = train(m, ds, TrainConfig(epochs=3, progress=False), callbacks=[swa])
        >>> swa.n_averaged
        2

    Note:
        Place it after a late-phase callback in ``callbacks`` so it averages the collapsed late-phase model.
    """

    def __init__(
        self,
        start_epoch: int,
        *,
        bn_data: Dataset | DataLoader | Iterable | None = None,
        swa_lr: float | None = None,
        anneal_epochs: int = 1,
        batch_size: int = 256,
    ) -> None:
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"SWA: start_epoch must be an int >= 0, got {start_epoch!r}")
        if swa_lr is not None and not swa_lr > 0:
            raise ValueError(f"SWA: swa_lr must be positive, got {swa_lr!r}")
        if anneal_epochs < 0:
            raise ValueError(f"SWA: anneal_epochs must be >= 0, got {anneal_epochs!r}")
        self.start_epoch = start_epoch
        self.bn_data = bn_data
        self.swa_lr = swa_lr
        self.anneal_epochs = anneal_epochs
        self.batch_size = batch_size
        self.averaged: AveragedModel | None = None
        self.model: nn.Module | None = None

    @property
    def n_averaged(self) -> int:
        return 0 if self.averaged is None else int(self.averaged.n_averaged.item())

    def on_train_begin(self, state: TrainState) -> None:
        if self.start_epoch >= state.config.epochs:
            raise ValueError(
                f"SWA: start_epoch={self.start_epoch} must be < epochs={state.config.epochs} (0-based epoch)"
            )
        if self.bn_data is None and has_batchnorm(state.model):
            raise ValueError(
                f"SWA: {type(state.model).__name__} has BatchNorm layers; pass bn_data (the training data) "
                "so the averaged model's running statistics can be recomputed"
            )
        self.averaged, self.model = None, None

    def on_epoch_begin(self, state: TrainState) -> None:
        if self.swa_lr is not None and state.epoch == self.start_epoch:
            # The trainer steps its scheduler every batch, so the annealing is counted in batches.
            state.scheduler = SWALR(
                base_optimizer(state.optimizer),
                swa_lr=self.swa_lr,
                anneal_epochs=max(1, self.anneal_epochs * state.steps_per_epoch),
                anneal_strategy="cos",
            )

    def on_epoch_end(self, state: TrainState) -> None:
        if state.epoch < self.start_epoch:
            return
        if self.averaged is None:
            # Created lazily: between epochs the model is plain (late-phase hooks are off), so the copy is too.
            self.averaged = AveragedModel(state.model)
        self.averaged.update_parameters(state.model)

    def on_train_end(self, state: TrainState) -> None:
        if self.averaged is None:  # unreachable after the start_epoch check, kept as a guard
            raise ValueError("SWA: no epoch was averaged")
        model = self.averaged.module
        if has_batchnorm(model):
            update_batchnorm(model, as_loader(self.bn_data, self.batch_size))
        model.eval()
        self.model = model
        log.info("SWA: averaged %d epochs from epoch %d", self.n_averaged, self.start_epoch)


@dataclass
class SWAResult:
    """``model``: the SWA average (BatchNorm recomputed); ``final``: the last iterate; ``history``: its curves."""

    model: nn.Module
    final: nn.Module
    history: History
    n_averaged: int


def train_swa(
    model: nn.Module,
    train_data: Dataset | DataLoader,
    config: TrainConfig | None = None,
    *,
    swa_start: int | None = None,
    swa_lr: float | None = None,
    anneal_epochs: int = 1,
    test_data: Dataset | DataLoader | None = None,
    bn_data: Dataset | DataLoader | None = None,
) -> SWAResult:
    """Train ``model`` in place with SWA and return the averaged model next to the last iterate.

    Args:
        model: any classifier; trained in place (it ends as the last iterate, ``result.final``).
        train_data: training ``Dataset`` or ``DataLoader`` (see :func:`mergelab.train.train`).
        config: hyper-parameters of the run.
        swa_start: first averaged epoch (0-based); default :func:`default_swa_start` (75 % of the epochs).
        swa_lr: constant learning rate from ``swa_start`` on (``SWALR``); ``None`` keeps the trainer's schedule.
        anneal_epochs: epochs of annealing to ``swa_lr``.
        test_data: evaluated after every epoch (curves of the running iterate, not of the average).
        bn_data: data for the BatchNorm statistics of the average; default ``train_data``.

    Returns:
        :class:`SWAResult`.

    Example:
        >>> import torch, mergelab
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
        >>> m = mergelab.build_model("vgg", (1, 8, 8), 10, width=0.125, norm="batchnorm")
        >>> r = train_swa(m, ds, mergelab.TrainConfig(epochs=2, progress=False), swa_start=0)
        >>> r.n_averaged
        2
    """
    cfg = config or TrainConfig()
    start = default_swa_start(cfg.epochs) if swa_start is None else swa_start
    cb = SWACallback(
        start,
        bn_data=train_data if bn_data is None else bn_data,
        swa_lr=swa_lr,
        anneal_epochs=anneal_epochs,
        batch_size=max(cfg.batch_size, 256),
    )
    history = train(model, train_data, cfg, test_data=test_data, callbacks=[cb])
    if cb.model is None:  # unreachable: on_train_end always sets it
        raise RuntimeError("train_swa: SWA produced no model")
    return SWAResult(model=cb.model, final=model, history=history, n_averaged=cb.n_averaged)
