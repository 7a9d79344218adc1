"""Loss and accuracy of a model on a loader: the one evaluation every layer uses.

It also holds the helpers every loop over data uses: :func:`batches` (``x``/``(x, y)`` batches, at most
``max_batches``, on a device), :func:`eval_mode` (a mode for the duration, every submodule's own mode back
after) and :func:`update_batchnorm`, the one BatchNorm statistics reset (SWA, late-phase training, merging).

Targets are one class per sample ``y: (N,)`` with outputs ``(N, C)``, or one class per position ``y: (N, T)``
with outputs ``(N, T, C)`` (a language model's next tokens): then every position counts as a sample, so the loss
is the mean per-token cross-entropy (``exp`` of it is the perplexity). A model may return its scores directly or
as the ``logits`` attribute of an output object (Hugging Face ``ModelOutput``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

from mergelab.data.loaders import batch_xy as split_batch  # the one batch splitter; importable from here too


@dataclass(frozen=True)
class Metrics:
    loss: float
    accuracy: float
    count: int

    def to_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "accuracy": self.accuracy, "count": self.count}


def scores_and_targets(out: object, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A model output and its targets as ``(samples, C)`` scores and ``(samples,)`` classes.

    Unwraps ``out.logits`` (Hugging Face outputs) and flattens per-position targets ``(N, T)`` with scores
    ``(N, T, C)`` into ``N·T`` samples; per-sample ``(N, C)`` / ``(N,)`` pass through unchanged.
    """
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"the model returned {type(out).__name__}; expected a Tensor or an object with .logits"
        )
    if y.ndim >= 2 and logits.ndim == y.ndim + 1 and logits.shape[:-1] == y.shape:
        return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)  # (N·T, C), (N·T,)
    return logits, y


def batches(
    data: Iterable, *, max_batches: int | None = None, device: torch.device | str | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(x, y or None)`` of each batch of ``data``, stopping after ``max_batches``, moved to ``device``.

    Args:
        data: a loader (or any iterable) yielding ``x`` or ``(x, y)`` batches.
        max_batches: stop after this many batches (``None``: all); the batch after the last is never drawn.
        device: move ``x`` (and ``y``) there; ``None`` leaves them where they are.

    Example:
        >>> import torch
        >>> data = [(torch.zeros(2, 3), torch.ones(2))] * 5
        >>> [tuple(x.shape) for x, _ in batches(data, max_batches=2)]
        [(2, 3), (2, 3)]
    """
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"batches: max_batches must be >= 0 or None, got {max_batches}")
    for batch in data if max_batches is None else itertools.islice(data, max_batches):
        x, y = split_batch(batch)
        if device is not None:
            x = x.to(device)
            y = y.to(device) if y is not None else None
        yield x, y


@contextlib.contextmanager
def eval_mode(*models: object, training: bool = False) -> Iterator[None]:
    """Put ``models`` in eval mode (train mode with ``training=True``), then give every submodule back its *own*
    mode, also when the body raises.

    ``model.train(was)`` would set every submodule to the top-level flag and so flip, e.g., BatchNorm layers that
    were deliberately frozen in eval mode inside a training model. Anything that is not an ``nn.Module`` (a
    plain callable) passes through; a module given twice (or shared by two models) gets its first mode back.

    Example:
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
        >>> m[1].eval()  # doctest: +ELLIPSIS
        BatchNorm1d(...)
        >>> with eval_mode(m):
        ...     m.training, m[1].training
        (False, False)
        >>> m.training, m[1].training
        (True, False)
    """
    modules = [m for m in models if isinstance(m, nn.Module)]
    modes: dict[nn.Module, bool] = {}
    for model in modules:
        for m in model.modules():
            modes.setdefault(m, m.training)
    for model in modules:
        model.train(training)
    try:
        yield
    finally:
        for m, was in modes.items():
            m.training = was


@torch.no_grad()
def predict_logits(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], data: Iterable) -> torch.Tensor:
    """Concatenated outputs over ``data`` in eval mode (every submodule's mode is restored)."""
    with eval_mode(model):
        return torch.cat([model(x) for x, _ in batches(data)])


@torch.no_grad()
def evaluate(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], data: Iterable) -> Metrics:
    """Mean cross-entropy and accuracy over a loader of ``(x, y)`` batches, in eval mode.

    A model with one head per task whose outputs are concatenated (``combine == "concat"``) is refused: its
    arg-max is not a class of the data; use :func:`evaluate_tasks`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
        >>> evaluate(nn.Linear(3, 2), data).count
        4
    """
    if hasattr(model, "forward_tasks") and getattr(model, "combine", None) == "concat":
        raise ValueError(
            "evaluate: the model concatenates one head per task; score it with evaluate_tasks (per task and jointly)"
        )
    total_loss, correct, count = 0.0, 0, 0
    with eval_mode(model):
        for x, y in batches(data):
            if y is None:
                raise ValueError("evaluate: the loader yields no labels; it must yield (x, y) batches")
            out, y = scores_and_targets(_forward(model, x, first=count == 0), y)
            _check_labels(y, out.shape[-1])
            total_loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(-1) == y).sum().item()
            count += len(y)
    if count == 0:
        raise ValueError("evaluate: the loader is empty")
    return Metrics(total_loss / count, correct / count, count)


@torch.no_grad()
def evaluate_tasks(
    model: nn.Module, data: Iterable, tasks: Sequence[Sequence[int]] | None = None
) -> dict[str, Metrics]:
    """Per-task and joint metrics of a model with one output head per task (it has ``forward_tasks``).

    Args:
        model: e.g. a :class:`~mergelab.merge.partial.MultiHeadModel`.
        data: ``(x, y)`` batches with global class labels.
        tasks: the global class of each output column of each head (default: head ``i`` predicts ``0..n_i-1``).

    Returns:
        ``{"task0": ..., "task1": ..., "joint": ...}``. Task ``i`` is scored with head ``i`` alone on the samples
        whose label it predicts. The joint prediction is the class of the arg-max column over all heads; the joint
        loss uses the probability of a class summed over its columns (a softmax over all heads' logits).
    """
    heads: list[list[tuple[int, int]]] | None = None  # per head: (head, global class) of each output column
    sums: dict[str, list[float]] = {}
    with eval_mode(model):
        for x, y in batches(data):
            if y is None:
                raise ValueError("evaluate_tasks: the loader yields no labels; it must yield (x, y) batches")
            outs = tuple(model.forward_tasks(x))  # type: ignore[operator]
            if heads is None:
                classes = (
                    [list(range(o.shape[-1])) for o in outs] if tasks is None else [list(t) for t in tasks]
                )
                if len(classes) != len(outs) or any(
                    len(c) != o.shape[-1] for c, o in zip(classes, outs, strict=False)
                ):
                    raise ValueError(
                        f"evaluate_tasks: the model has heads of {[o.shape[-1] for o in outs]} outputs but "
                        f"tasks={classes}"
                    )
                heads = [[(i, c) for c in cl] for i, cl in enumerate(classes)]
                lookup = torch.tensor([c for cl in classes for c in cl])
                n_cls = int(lookup.max()) + 1
            for i, (o, cl) in enumerate(zip(outs, classes, strict=True)):
                local = torch.full((max(n_cls, int(y.max()) + 1),), -1, dtype=torch.long)
                local[torch.tensor(cl)] = torch.arange(len(cl))
                mine = local[y] >= 0
                if mine.any():
                    t = local[y[mine]]
                    acc = sums.setdefault(f"task{i}", [0.0, 0.0, 0.0])
                    acc[0] += F.cross_entropy(o[mine], t, reduction="sum").item()
                    acc[1] += (o[mine].argmax(-1) == t).sum().item()
                    acc[2] += int(mine.sum())
            logp = torch.cat(outs, dim=-1).log_softmax(-1)
            onehot = (lookup[None, :] == y[:, None]).to(logp.dtype)  # (batch, columns) of the true class
            joint_nll = -torch.logsumexp(logp.masked_fill(onehot == 0, float("-inf")), dim=-1)
            acc = sums.setdefault("joint", [0.0, 0.0, 0.0])
            acc[0] += joint_nll.sum().item()
            acc[1] += (lookup[logp.argmax(-1)] == y).sum().item()
            acc[2] += len(y)
    if not sums:
        raise ValueError("evaluate_tasks: the loader is empty")
    return {k: Metrics(v[0] / v[2], v[1] / v[2], int(v[2])) for k, v in sorted(sums.items())}


# -- BatchNorm statistics -------------------------------------------------------------------------------------
#
# Averaged or merged weights never produced the running mean/variance their BatchNorm layers hold (those belong
# to the endpoints), so the statistics are recomputed on data. The pass is ``torch.optim.swa_utils.update_bn``
# (Izmailov et al., UAI 2018, https://arxiv.org/abs/1803.05407): it resets every BatchNorm's statistics, sets
# ``momentum=None`` (a cumulative average in which every batch counts the same) and runs the model in train mode
# without autograd. Around it we add what ``update_bn`` leaves out: loaders of ``x`` or ``(x, y)`` with
# ``max_batches``, inputs moved to the model's device, every submodule's own train/eval mode and every momentum
# put back in a ``finally``, and an error on empty data.


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that track running statistics (the ones a reset changes)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers that track running statistics (those need recomputing)."""
    return bool(batchnorm_layers(model))


def update_batchnorm(model: nn.Module, data: Iterable, *, max_batches: int | None = None) -> nn.Module:
    """Reset and recompute, in place, every BatchNorm's running statistics with one pass over ``data``.

    Args:
        model: the network; its BatchNorm buffers change, nothing else. A model without BatchNorm is returned
            untouched (``data`` is not read).
        data: batches ``x`` or ``(x, y)`` (the training data, without augmentation).
        max_batches: use at most this many batches.

    Returns:
        ``model``.

    Raises:
        ValueError: ``data`` yielded no batch (the statistics are then reset, not recomputed).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
        >>> x = torch.randn(32, 3)
        >>> _ = update_batchnorm(m, [x[:16], x[16:]])
        >>> int(m[1].num_batches_tracked), m.training
        (2, False)
    """
    bns = batchnorm_layers(model)
    if not bns:
        return model
    seen = 0
    device = next((p.device for p in model.parameters()), None)

    def inputs() -> Iterator[torch.Tensor]:
        nonlocal seen
        for x, _ in batches(data, max_batches=max_batches, device=device):
            seen += 1
            yield x

    momenta = [(m, m.momentum) for m in bns]
    try:
        # update_bn restores only the top-level train flag (and nothing if the pass raises)
        with eval_mode(model, training=True):
            update_bn(inputs(), model)
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
    if seen == 0:
        raise ValueError("update_batchnorm: the data yielded no batches for the BatchNorm statistics")
    return model


def _forward(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, first: bool) -> torch.Tensor:
    if not first:
        return model(x)
    try:  # the first batch tells a model/data mismatch apart from a bug: name the shapes and dtypes
        return model(x)
    except RuntimeError as e:
        p = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
        got = f"inputs of shape {tuple(x.shape[1:])} ({x.dtype})"
        want = f" and weights of dtype {p.dtype}" if p is not None else ""
        raise ValueError(f"evaluate: the model cannot take {got}{want}: {str(e).splitlines()[0]}") from e


def _check_labels(y: torch.Tensor, n_out: int) -> None:
    if len(y) and (int(y.max()) >= n_out or int(y.min()) < 0):
        raise ValueError(
            f"evaluate: labels range over {int(y.min())}..{int(y.max())} but the model has {n_out} outputs "
            "(a model of another dataset?)"
        )
