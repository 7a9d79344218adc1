"""Deterministic loaders, and the two helpers that let every other module accept user loaders.

User loaders yield either ``x`` or ``(x, y)`` (tuples or lists, sometimes with extra items); feature
collection needs only ``x`` and evaluation needs both, so they go through :func:`batch_xy` (also importable as
``mergelab.evaluation.split_batch``; every loop reads batches with ``mergelab.evaluation.batches``) instead of
unpacking batches themselves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["batch_inputs", "batch_xy", "make_loader"]


def make_loader(
    dataset: Dataset, batch_size: int = 128, shuffle: bool = False, seed: int = 0, *, drop_last: bool = False
) -> DataLoader:
    """A single-process ``DataLoader`` whose order depends only on ``seed``.

    Shuffling draws from a private ``torch.Generator`` seeded with ``seed``, so the global RNG state neither
    affects nor is affected by the data order; re-iterating a shuffled loader gives a new (but reproducible)
    epoch order.

    Args:
        dataset: any map-style dataset, typically ``DataSplits.train`` / ``.test``.
        batch_size: samples per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: reshuffle every epoch.
        seed: seed of the shuffling generator.
        drop_last: drop a final incomplete batch.

    Returns:
        A ``DataLoader`` with ``num_workers=0`` (the datasets are in-memory tensors; workers would only add
        start-up cost).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.arange(10.0).unsqueeze(1), torch.arange(10))
        >>> [y.tolist() for _, y in make_loader(ds, batch_size=4)]
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"make_loader: batch_size must be a positive int, got {batch_size!r}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=0,
    )


def batch_xy(batch: Any) -> tuple[Tensor, Tensor | None]:
    """Split a batch into ``(x, y)``; ``y`` is ``None`` when the batch holds inputs only.

    Accepts ``x``, ``(x,)``, ``(x, y)`` or ``(x, y, *extra)`` as tuples or lists; extras are ignored.

    Raises:
        TypeError: the batch (or its first item) is not a tensor, or ``y`` is neither a tensor nor ``None``.

    Example:
        >>> import torch
        >>> x, y = batch_xy([torch.zeros(2, 3), torch.tensor([0, 1])])
        >>> x.shape, y.tolist()
        (torch.Size([2, 3]), [0, 1])
        >>> batch_xy(torch.zeros(2, 3))[1] is None
        True
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        if not isinstance(x, Tensor):
            raise TypeError(f"batch_xy: first item of the batch must be a Tensor, got {type(x).__name__}")
        if y is not None and not isinstance(y, Tensor):
            raise TypeError(
                f"batch_xy: second item of the batch must be a Tensor or None, got {type(y).__name__}"
            )
        return x, y
    raise TypeError(
        f"batch_xy: expected a Tensor or a non-empty (x, y) tuple/list, got {type(batch).__name__}"
    )


def batch_inputs(batch: Any) -> Tensor:
    """The inputs ``x`` of a batch that is ``x`` or ``(x, y, ...)``; see :func:`batch_xy`.

    Example:
        >>> import torch
        >>> batch_inputs((torch.ones(2, 3), torch.tensor([0, 1]))).shape
        torch.Size([2, 3])
    """
    return batch_xy(batch)[0]
