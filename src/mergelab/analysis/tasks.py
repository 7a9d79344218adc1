"""Multi-task metrics for models merged across tasks with disjoint classes (ZipIt!, MuDSC).

A :class:`TaskSet` lists each task's classes (global class ids, in the order of that task's head). A multi-task
model outputs the tasks' logits *concatenated* in task order (:class:`~mergelab.merge.partial.MultiHeadModel`
with ``combine="concat"``, or a class-embedding model over the union), so output column ``offset_t + j`` is task
``t``'s class ``classes[t][j]``. On data with global labels:

* **joint accuracy**: ``argmax`` over all outputs — the model must also tell which task a sample belongs to;
* **per-task accuracy**: on task ``t``'s samples, ``argmax`` restricted to task ``t``'s outputs (the task is known);
* **normalised accuracy**: per-task accuracy divided by the source model's accuracy on its own task (MuDSC's
  "scaled performance"); 1.0 means the merge lost nothing on that task.

Concatenated heads need disjoint tasks: a class in two tasks would own two output columns, so :class:`TaskSet`
refuses overlapping label sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mergelab.evaluation import batches, eval_mode

__all__ = ["MultitaskMetrics", "TaskSet", "evaluate_multitask", "multitask_metrics", "normalized_accuracy"]


@dataclass(frozen=True)
class TaskSet:
    """Disjoint tasks over one global label space.

    Args:
        classes: per task, its global class ids in the order of that task's outputs.
        names: optional task names (default ``"task0"``, ``"task1"``, …).

    Example:
        >>> t = TaskSet(((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)))
        >>> t.output_classes[:6], t.sizes
        ((0, 1, 2, 3, 4, 5), (5, 5))
    """

    classes: tuple[tuple[int, ...], ...]
    names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        classes = tuple(tuple(int(c) for c in t) for t in self.classes)
        object.__setattr__(self, "classes", classes)
        if not classes:
            raise ValueError("TaskSet: no tasks")
        owner: dict[int, int] = {}
        for t, cls in enumerate(classes):
            if not cls:
                raise ValueError(f"TaskSet: task {t} has no classes")
            for c in cls:
                if c < 0:
                    raise ValueError(f"TaskSet: task {t} has a negative class id {c}")
                if c in owner:
                    where = "twice in" if owner[c] == t else f"in task {owner[c]} and"
                    raise ValueError(
                        f"TaskSet: class {c} is {where} task {t}; concatenated heads need disjoint label sets "
                        f"(overlapping tasks must share one head, e.g. a class-embedding head)"
                    )
                owner[c] = t
        names = tuple(self.names) or tuple(f"task{t}" for t in range(len(classes)))
        if len(names) != len(classes):
            raise ValueError(f"TaskSet: {len(names)} names for {len(classes)} tasks")
        object.__setattr__(self, "names", names)

    @classmethod
    def from_groups(cls, groups: Iterable[Iterable[int]], names: Sequence[str] = ()) -> TaskSet:
        """From class groups as given to :func:`mergelab.data.split_classes` (e.g. ``[range(5), range(5, 10)]``)."""
        return cls(tuple(tuple(g) for g in groups), tuple(names))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.classes)

    @property
    def num_outputs(self) -> int:
        return sum(self.sizes)

    @property
    def output_classes(self) -> tuple[int, ...]:
        """The global class of every output column of the concatenated logits."""
        return tuple(c for cls in self.classes for c in cls)

    def slice(self, task: int) -> slice:
        """Output columns of ``task``."""
        start = sum(self.sizes[:task])
        return slice(start, start + self.sizes[task])

    def locate(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per global label: ``(task index, index within the task)``; ``ValueError`` for a label in no task."""
        top = max(self.output_classes) + 1
        task_of = torch.full((top,), -1, dtype=torch.long)
        local = torch.full((top,), -1, dtype=torch.long)
        for t, cls in enumerate(self.classes):
            task_of[list(cls)] = t
            local[list(cls)] = torch.arange(len(cls))
        labels = labels.long().cpu()
        bad = (labels < 0) | (labels >= top)
        bad |= task_of[labels.clamp(0, top - 1)] < 0
        if bool(bad.any()):
            raise ValueError(f"TaskSet: label {int(labels[bad][0])} belongs to no task {self.classes}")
        return task_of[labels], local[labels]


@dataclass(frozen=True)
class MultitaskMetrics:
    """Joint and per-task accuracy (and per-task loss) of one model on data of several tasks."""

    joint_accuracy: float
    task_accuracy: tuple[float, ...]
    task_loss: tuple[float, ...]
    counts: tuple[int, ...]

    @property
    def mean_task_accuracy(self) -> float:
        return sum(self.task_accuracy) / len(self.task_accuracy)

    def normalized(self, reference: Sequence[float]) -> tuple[float, ...]:
        """Per-task accuracy divided by ``reference`` (each source model's accuracy on its own task)."""
        return normalized_accuracy(self.task_accuracy, reference)

    def to_dict(self) -> dict[str, object]:
        return {
            "joint_accuracy": self.joint_accuracy,
            "task_accuracy": list(self.task_accuracy),
            "mean_task_accuracy": self.mean_task_accuracy,
            "task_loss": list(self.task_loss),
            "counts": list(self.counts),
        }


def normalized_accuracy(task_accuracy: Sequence[float], reference: Sequence[float]) -> tuple[float, ...]:
    """``task_accuracy[t] / reference[t]`` per task (MuDSC's scaled performance)."""
    if len(task_accuracy) != len(reference):
        raise ValueError(f"normalized_accuracy: {len(task_accuracy)} tasks vs {len(reference)} references")
    if any(r <= 0 for r in reference):
        raise ValueError(f"normalized_accuracy: reference accuracies must be positive, got {list(reference)}")
    return tuple(a / r for a, r in zip(task_accuracy, reference, strict=True))


class _Accumulator:
    def __init__(self, tasks: TaskSet) -> None:
        self.tasks = tasks
        self.output_classes = torch.tensor(tasks.output_classes)
        self.joint = 0
        self.total = 0
        n = len(tasks.classes)
        self.correct = [0] * n
        self.loss = [0.0] * n
        self.count = [0] * n

    def add(self, logits: Tensor, labels: Tensor) -> None:
        t = self.tasks
        if logits.dim() != 2 or logits.shape[1] != t.num_outputs:
            raise ValueError(
                f"multitask metrics: logits {tuple(logits.shape)} do not have the {t.num_outputs} outputs of tasks "
                f"{t.classes} (concatenated in task order)"
            )
        logits, labels = logits.detach().float().cpu(), labels.cpu()
        task_of, local = t.locate(labels)
        self.joint += int((self.output_classes[logits.argmax(1)] == labels).sum())
        self.total += len(labels)
        for i in range(len(t.classes)):
            mask = task_of == i
            if not bool(mask.any()):
                continue
            sub = logits[mask][:, t.slice(i)]
            self.correct[i] += int((sub.argmax(1) == local[mask]).sum())
            self.loss[i] += float(F.cross_entropy(sub, local[mask], reduction="sum"))
            self.count[i] += int(mask.sum())

    def result(self) -> MultitaskMetrics:
        if self.total == 0:
            raise ValueError("multitask metrics: no samples")
        missing = [self.tasks.names[i] for i, c in enumerate(self.count) if c == 0]
        if missing:
            raise ValueError(f"multitask metrics: no samples of tasks {missing}")
        return MultitaskMetrics(
            self.joint / self.total,
            tuple(c / n for c, n in zip(self.correct, self.count, strict=True)),
            tuple(s / n for s, n in zip(self.loss, self.count, strict=True)),
            tuple(self.count),
        )


def multitask_metrics(logits: Tensor, labels: Tensor, tasks: TaskSet) -> MultitaskMetrics:
    """Joint and per-task accuracy from concatenated logits ``(N, Σ task sizes)`` and global labels ``(N,)``.

    Example:
        >>> import torch
        >>> t = TaskSet(((0, 1), (2, 3)))
        >>> logits = torch.tensor([[5.0, 0, 0, 0], [0, 0, 1.0, 3.0], [0, 4.0, 2.0, 0]])
        >>> m = multitask_metrics(logits, torch.tensor([0, 3, 2]), t)
        >>> round(m.joint_accuracy, 3), m.task_accuracy
        (0.667, (1.0, 1.0))
    """
    acc = _Accumulator(tasks)
    acc.add(logits, labels)
    return acc.result()


@torch.no_grad()
def evaluate_multitask(
    model: nn.Module | Callable[[Tensor], Tensor], data: Iterable, tasks: TaskSet
) -> MultitaskMetrics:
    """Stream ``data`` (batches ``(x, y)`` with global labels) through ``model`` in eval mode.

    Args:
        model: outputs concatenated logits in task order.
        data: a loader yielding ``(x, y)``.
        tasks: the tasks.

    Returns:
        A :class:`MultitaskMetrics`.
    """
    acc = _Accumulator(tasks)
    with eval_mode(model):
        for x, y in batches(data):
            if y is None:
                raise ValueError("evaluate_multitask: the loader yields no labels; it must yield (x, y)")
            acc.add(model(x), y)
    return acc.result()
