"""Choosing solver options on held-out labelled data: the candidate whose merged model is most accurate wins.

MuDSC picks its blend weight ``alpha`` this way (on held-out training data); ZipIt's ``alpha``/``beta`` can be
chosen the same way. Used by :func:`~mergelab.merge.aligned.merge_aligned` (``select=``): every candidate reuses
the match context, so the activation statistics are streamed once for all of them.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mergelab.evaluation import split_batch
from mergelab.structure.alignment import Alignment

__all__ = ["Candidates", "candidates", "select_options", "selection_score"]

logger = logging.getLogger(__name__)

# {"alpha": [0.1, 0.5]} (every combination of the listed values) or [{"alpha": 0.1, "beta": 1.0}, ...].
Candidates = Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]


def candidates(select: Candidates) -> list[dict[str, Any]]:
    """The option dicts to try, in order: a mapping of value lists is expanded to every combination."""
    if isinstance(select, Mapping):
        keys = list(select)
        return [
            dict(zip(keys, values, strict=True)) for values in itertools.product(*(select[k] for k in keys))
        ]
    return [dict(c) for c in select]


def _output_classes(tasks: Sequence[Sequence[int]] | None) -> tuple[int, ...] | None:
    """Global class of every output column when the tasks' logits are concatenated (disjoint tasks only)."""
    if tasks is None:
        return None
    classes = tuple(int(c) for t in tasks for c in t)
    if len(set(classes)) != len(classes):
        raise ValueError(
            f"tasks={[list(t) for t in tasks]} overlap; concatenated heads need disjoint classes"
        )
    return classes


def selection_score(
    model: nn.Module, data: Iterable, tasks: Sequence[Sequence[int]] | None = None, op: str = "select"
) -> float:
    """Accuracy on labelled data; with ``tasks``, labels are global classes and the prediction is the class of the
    arg-max output column (joint accuracy over the tasks)."""
    classes = _output_classes(tasks)
    lookup = torch.tensor(classes) if classes is not None else None
    correct = total = 0
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in data:
                x, y = split_batch(batch)
                if y is None:
                    raise ValueError(
                        f"{op}: choosing options needs labelled data (x, y); pass selection_data="
                    )
                out = model(x)
                if lookup is not None and out.shape[-1] != len(lookup):
                    raise ValueError(
                        f"{op}: the merged model has {out.shape[-1]} outputs for {len(lookup)} task classes"
                    )
                if lookup is None and int(y.max()) >= out.shape[-1]:
                    raise ValueError(
                        f"{op}: label {int(y.max())} exceeds the merged model's {out.shape[-1]} outputs; pass "
                        f"tasks= (the class groups) or labels in the output space"
                    )
                pred = out.argmax(-1)
                correct += int(((lookup[pred] if lookup is not None else pred) == y).sum())
                total += len(y)
    finally:
        model.train(was)
    if total == 0:
        raise ValueError(f"{op}: selection data is empty")
    return correct / total


def select_options(
    solve: Callable[[dict[str, Any]], Alignment],
    build: Callable[[Alignment], nn.Module],
    select: Candidates,
    data: Iterable,
    *,
    tasks: Sequence[Sequence[int]] | None = None,
    op: str = "select",
) -> tuple[Alignment, list[dict[str, Any]]]:
    """Solve and build every candidate, score it on ``data``, keep the best (ties: the first).

    Args:
        solve: candidate options → alignment.
        build: alignment → merged model.
        select: the candidates (see :data:`Candidates`).
        data: labelled held-out batches ``(x, y)``.
        tasks: class groups for concatenated heads (joint accuracy).
        op: the operation named in errors.

    Returns:
        ``(best alignment, [{**options, "score": accuracy} for every candidate])``.
    """
    tried = candidates(select)
    if not tried:
        raise ValueError(f"{op}: select= has no candidates")
    _output_classes(tasks)  # overlapping tasks fail before any solve
    scores: list[dict[str, Any]] = []
    best: tuple[float, Alignment] | None = None
    for options in tried:
        al = solve(options)
        score = selection_score(build(al), data, tasks, op)
        scores.append({**options, "score": score})
        logger.info("%s: %s held-out accuracy %.4f", op, options, score)
        if best is None or score > best[0]:
            best = (score, al)
    assert best is not None
    return best[1], scores
