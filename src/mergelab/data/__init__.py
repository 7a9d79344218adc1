"""Datasets: embedded (``digits``, ``mnist1d``: nothing to download) and local folders (MNIST, CIFAR-10/100).

Every dataset comes as a :class:`DataSplits` of in-memory ``TensorDataset`` s (float32 ``x``, int64 ``y``).
:func:`split_classes` cuts one into disjoint class groups ("tasks") for multi-task merging, and
:func:`batch_inputs` / :func:`batch_xy` let other modules accept loaders yielding ``x`` or ``(x, y)``.

Example:
    >>> from mergelab.data import load_dataset, make_loader
    >>> d = load_dataset("digits", seed=0)
    >>> x, y = next(iter(make_loader(d.train, batch_size=32)))
    >>> tuple(x.shape), y.dtype
    ((32, 1, 8, 8), torch.int64)
"""

from __future__ import annotations

from .core import DATASETS, DataSplits, list_datasets, load_dataset, register_dataset, split_classes
from .loaders import batch_inputs, batch_xy, make_loader
from .local import cifar10, cifar100, mnist, read_idx
from .mnist1d_data import MNIST1DConfig, make_mnist1d, mnist1d
from .sklearn_digits import digits  # importing a builder module registers it

__all__ = [
    "DATASETS",
    "DataSplits",
    "MNIST1DConfig",
    "batch_inputs",
    "batch_xy",
    "cifar10",
    "cifar100",
    "digits",
    "list_datasets",
    "load_dataset",
    "make_loader",
    "make_mnist1d",
    "mnist",
    "mnist1d",
    "read_idx",
    "register_dataset",
    "split_classes",
]
