"""Loss and accuracy of a model on a loader: the one evaluation every layer uses.

Targets are one class per sample ``y: (N,)`` with outputs ``(N, C)``, or one class per position ``y: (N, T)``
with outputs ``(N, T, C)`` (a language model's next tokens): then every position counts as a sample, so the loss
is the mean per-token cross-entropy (``exp`` of it is the perplexity). A model may return its scores directly or
as the ``logits`` attribute of an output object (Hugging Face ``ModelOutput``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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


@torch.no_grad()
def predict_logits(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], data: Iterable) -> torch.Tensor:
    """Concatenated outputs over ``data`` in eval mode (restores the training flag)."""
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        return torch.cat([model(split_batch(b)[0]) for b in data])
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], data: Iterable) -> Metrics:
    """Mean cross-entropy and accuracy over a loader of ``(x, y)`` batches, in eval mode.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
        >>> evaluate(nn.Linear(3, 2), data).count
        4
    """
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for batch in data:
            x, y = split_batch(batch)
            if y is None:
                raise ValueError("evaluate: the loader yields no labels; it must yield (x, y) batches")
            out, y = scores_and_targets(model(x), y)
            total_loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(-1) == y).sum().item()
            count += len(y)
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: the loader is empty")
    return Metrics(total_loss / count, correct / count, count)
