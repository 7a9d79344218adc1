"""Loss and accuracy of a model on a loader: the one evaluation every layer uses.

It also holds the two helpers every loop over data uses: :func:`batches` (``x``/``(x, y)`` batches, at most
``max_batches``, on a device) and :func:`eval_mode` (a mode for the duration, every submodule's own mode back
after).

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


@dataclass(frozen=True)
class Metrics:
    loss: float
    accuracy: float
    count: int

    def to_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "accuracy": self.accuracy, "count": self.count}


def split_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A user loader yields ``x`` or ``(x, y)`` (tuple or list); return ``(x, y or None)``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    raise TypeError(f"a batch must be a Tensor x or a tuple (x, y), got {type(batch).__name__}")


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
