"""The dataset contract (:class:`DataSplits`), the builder registry and class splits for multi-task merging.

Every dataset is materialised as two in-memory ``TensorDataset`` s of float32 inputs (channel-first, no batch)
and int64 labels. The datasets mergelab uses are small (digits, MNIST-1D) or fit in memory on any machine that
trains on them (MNIST, CIFAR), and a tensor-backed dataset keeps loaders deterministic and picklable (Ray).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import TensorDataset

logger = logging.getLogger(__name__)

__all__ = ["DATASETS", "DataSplits", "list_datasets", "load_dataset", "register_dataset", "split_classes"]


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field-wise is ambiguous
class DataSplits:
    """A dataset's train and test splits plus the metadata models need to be built for it.

    Attributes:
        name: registry name (plus a class-group suffix after :meth:`split_classes`).
        train: ``TensorDataset(x, y)`` with x float32 ``(N, *input_shape)`` and y int64 ``(N,)``.
        test: same layout as ``train``.
        num_classes: number of output classes of a model trained on it (labels lie in ``0..num_classes-1``).
        input_shape: channel-first shape of one input without the batch axis, e.g. ``(1, 8, 8)``.
        class_names: human-readable names, one per class, or ``None``.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        where = f"DataSplits({self.name!r})"
        for split in ("train", "test"):
            ds = getattr(self, split)
            if not isinstance(ds, TensorDataset) or len(ds.tensors) < 2:
                raise TypeError(f"{where}.{split}: expected TensorDataset(x, y), got {ds!r}")
            x, y = ds.tensors[0], ds.tensors[1]
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"{where}.{split}: x has shape {tuple(x.shape)}, "
                    f"expected (N, {', '.join(map(str, self.input_shape))})"
                )
            if y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(f"{where}.{split}: y has shape {tuple(y.shape)}, expected ({x.shape[0]},)")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{where}: {len(self.class_names)} class_names for {self.num_classes} classes")

    def split_classes(self, groups: Sequence[Sequence[int]], relabel: bool = True) -> list[DataSplits]:
        """Split train and test by class group; see :func:`split_classes`.

        Returns:
            One ``DataSplits`` per group, named ``"<name>[c0,c1,...]"``. With ``relabel`` its
            ``num_classes`` is the group size and ``class_names`` the group's names; otherwise both are kept.

        Example:
            >>> import mergelab
            >>> task_a, task_b = mergelab.load_dataset("digits").split_classes([range(5), range(5, 10)])
            >>> task_b.num_classes, task_b.class_names
            (5, ('5', '6', '7', '8', '9'))
        """
        group_lists = [[int(c) for c in g] for g in groups]  # materialise iterables (e.g. range) once
        for group in group_lists:
            if group and max(group) >= self.num_classes:
                raise ValueError(
                    f"DataSplits({self.name!r}).split_classes: class {max(group)} out of range "
                    f"for {self.num_classes} classes"
                )
        trains = split_classes(self.train, group_lists, relabel=relabel)
        tests = split_classes(self.test, group_lists, relabel=relabel)
        out = []
        for group, train, test in zip(group_lists, trains, tests, strict=True):
            names = self.class_names
            num_classes = self.num_classes
            if relabel:
                num_classes = len(group)
                names = tuple(self.class_names[c] for c in group) if self.class_names is not None else None
            suffix = ",".join(map(str, group))
            out.append(
                replace(self, name=f"{self.name}[{suffix}]", train=train, test=test,
                        num_classes=num_classes, class_names=names)
            )  # fmt: skip
        return out


Builder = Callable[..., DataSplits]

DATASETS: dict[str, Builder] = {}
"""Registry: dataset name -> builder function returning :class:`DataSplits`. Fill it with
:func:`register_dataset`."""


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    """Register a builder under ``name`` (a decorator). Builders take keyword arguments only."""

    def deco(fn: Builder) -> Builder:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(DATASETS)


def load_dataset(name: str, **kwargs: object) -> DataSplits:
    """Build a registered dataset by name.

    Args:
        name: one of :func:`list_datasets`: ``"digits"``, ``"mnist1d"`` (embedded, no files needed),
            ``"mnist"``, ``"cifar10"``, ``"cifar100"`` (local folders; need ``root=``).
        **kwargs: arguments of that dataset's builder (e.g. ``seed``, ``root``); unknown ones raise
            ``TypeError``.

    Returns:
        A :class:`DataSplits`.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names).
        TypeError: an argument the builder does not take, or a required one (``root``) missing.

    Example:
        >>> import mergelab
        >>> d = mergelab.load_dataset("digits", seed=0)
        >>> d.input_shape, d.num_classes, d.train.tensors[0].dtype
        ((1, 8, 8), 10, torch.float32)
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list_datasets()}")
    builder = DATASETS[key]
    sig = inspect.signature(builder)
    try:
        sig.bind(**kwargs)
    except TypeError as err:
        params = ", ".join(sig.parameters) or "(none)"
        raise TypeError(f"load_dataset({key!r}): {err}; its arguments are: {params}") from None
    return builder(**kwargs)


def split_classes(
    dataset: TensorDataset, groups: Sequence[Sequence[int]], relabel: bool = True
) -> list[TensorDataset]:
    """One dataset per class group, e.g. digits 0-4 and 5-9 for two "tasks" to be merged.

    Args:
        dataset: ``TensorDataset(x, y, ...)`` with integer labels ``y`` as its second tensor; extra tensors
            are subset alongside.
        groups: disjoint collections of class ids (any iterables of ints, e.g. ``range(5)``).
        relabel: map the labels of group ``g`` to ``0..len(g)-1`` in the group's order (so each task can have
            its own ``len(g)``-way head); ``False`` keeps the original labels.

    Returns:
        A list of ``TensorDataset`` s, one per group, in the order of ``groups``; each keeps the samples'
        original order.

    Raises:
        ValueError: groups overlap, a group is empty, repeats a class or holds a negative id.
        TypeError: ``dataset`` is not a ``TensorDataset`` with integer labels.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.randn(6, 2), torch.tensor([0, 1, 2, 3, 2, 1]))
        >>> a, b = split_classes(ds, [[0, 1], [3, 2]])
        >>> b.tensors[1].tolist()
        [1, 0, 1]
    """
    if not isinstance(dataset, TensorDataset) or len(dataset.tensors) < 2:
        raise TypeError(f"split_classes: expected a TensorDataset(x, y), got {type(dataset).__name__}")
    y = dataset.tensors[1]
    if y.dtype.is_floating_point or y.dtype.is_complex or y.ndim != 1:
        raise TypeError(f"split_classes: labels must be a 1-D integer tensor, got {y.dtype} {tuple(y.shape)}")
    groups_list = [[int(c) for c in g] for g in groups]
    seen: dict[int, int] = {}
    for gi, group in enumerate(groups_list):
        if not group:
            raise ValueError(f"split_classes: group {gi} is empty")
        if len(set(group)) != len(group):
            raise ValueError(f"split_classes: group {gi} {group} repeats a class")
        for c in group:
            if c < 0:
                raise ValueError(f"split_classes: group {gi} holds negative class {c}")
            if c in seen:
                raise ValueError(f"split_classes: class {c} is in both group {seen[c]} and group {gi}")
            seen[c] = gi
    present = set(torch.unique(y).tolist())
    out = []
    for group in groups_list:
        missing = sorted(set(group) - present)
        if missing:
            logger.warning("split_classes: classes %s of group %s have no samples", missing, group)
        classes = torch.tensor(group, dtype=y.dtype)
        mask = torch.isin(y, classes)
        tensors = [t[mask] for t in dataset.tensors]
        if relabel:
            lut = torch.full((max(group) + 1,), -1, dtype=torch.int64)
            lut[classes.long()] = torch.arange(len(group))
            tensors[1] = lut[tensors[1].long()].to(y.dtype)
        out.append(TensorDataset(*tensors))
    return out


# -- helpers shared by the builders ------------------------------------------------------------------------


def standardize(
    train: np.ndarray, test: np.ndarray, axes: tuple[int, ...] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scale both splits with the *train* mean/std so no test statistics leak into training.

    ``axes=None`` uses one global mean/std; e.g. ``axes=(0, 2, 3)`` gives per-channel statistics for images.
    Returns float32 arrays.
    """
    train = train.astype(np.float64, copy=False)
    mean = train.mean(axis=axes, keepdims=axes is not None)
    std = train.std(axis=axes, keepdims=axes is not None)
    std = np.where(std > 0, std, 1.0)
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def to_splits(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> DataSplits:
    """Wrap numpy arrays (x already float32, channel-first) as a :class:`DataSplits`."""
    train = TensorDataset(torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
                          torch.from_numpy(np.asarray(y_train, dtype=np.int64)))  # fmt: skip
    test = TensorDataset(torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
                         torch.from_numpy(np.asarray(y_test, dtype=np.int64)))  # fmt: skip
    return DataSplits(
        name=name,
        train=train,
        test=test,
        num_classes=int(num_classes),
        input_shape=tuple(int(s) for s in x_train.shape[1:]),
        class_names=tuple(class_names) if class_names is not None else None,
    )
