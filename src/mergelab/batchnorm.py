"""Recomputing BatchNorm running statistics: the one implementation SWA, late-phase training and merging use.

Averaged or merged weights never produced the running mean/variance their BatchNorm layers hold (those belong to
the endpoints), so the statistics are recomputed on data. The pass is ``torch.optim.swa_utils.update_bn``
(Izmailov et al., UAI 2018, https://arxiv.org/abs/1803.05407): it resets every BatchNorm's statistics, sets
``momentum=None`` (a cumulative average in which every batch counts the same) and runs the model in train mode
without autograd. Around it we add what ``update_bn`` leaves out: loaders of ``x`` or ``(x, y)`` with
``max_batches``, inputs moved to the model's device, every submodule's own train/eval mode and every momentum put
back in a ``finally``, and an error on empty data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn

from mergelab.evaluation import batches, eval_mode

__all__ = ["batchnorm_layers", "has_batchnorm", "update_batchnorm"]


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
