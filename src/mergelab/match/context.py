"""The match context: what every solver reads, built once per set of models.

A :class:`MatchContext` holds the models, their :class:`~mergelab.structure.types.Structure`, the data and the
activation statistics (:class:`~mergelab.match.features.FeatureStats`), collected lazily on first use and
cached. Solvers map a context to an :class:`~mergelab.structure.alignment.Alignment`, so one context serves weight
matching, activation matching, ZipIt! and MuDSC alike — a study comparing methods discovers the structure and
streams the statistics once, and MuDSC's alpha search re-solves on the same statistics.

Example:
    >>> import torch
    >>> from torch import nn
    >>> a, b = (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(2))
    >>> ctx = match_context([a, b], [torch.randn(16, 4)])
    >>> [g.name for g in ctx.structure], ctx.stats().num_models
    (['0'], 2)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mergelab.evaluation import batches
from mergelab.match.features import FeatureStats, collect_features
from mergelab.structure.checks import check_same_architecture, normalize_coefficients
from mergelab.structure.types import Structure

__all__ = ["MatchContext", "check_compatible", "check_models", "example_input_for", "match_context"]


@dataclass(eq=False)
class MatchContext:
    """Models, their structure, data and (lazily) their activation statistics — the input of every solver.

    Build it with :func:`match_context`. The statistics are collected on the first :meth:`stats` call (one
    streamed pass over ``data``, at most ``max_batches`` batches) and reused by every later solver.

    Attributes:
        models: the models, in the order of the alignment (model 0 first).
        structure: their groups (discovered from ``models[0]`` or given).
        data: batches ``x`` or ``(x, y)``; ``None`` for data-free solvers (weight matching).
        max_batches: limit on batches streamed for the statistics.
        example_input: the input the structure was discovered with, if any.
    """

    models: tuple[nn.Module, ...]
    structure: Structure
    data: Iterable | None = None
    max_batches: int | None = None
    example_input: object | None = None
    _stats: FeatureStats | None = field(default=None, repr=False)

    @property
    def num_models(self) -> int:
        return len(self.models)

    @property
    def has_stats(self) -> bool:
        """Whether the statistics were collected (or given) already."""
        return self._stats is not None

    def stats(self) -> FeatureStats:
        """The activation statistics of every group, collected once (needs ``data``)."""
        if self._stats is None:
            if self.data is None:
                raise ValueError(
                    "match context: activation statistics need data= (a loader yielding x or (x, y))"
                )
            self._stats = collect_features(
                list(self.models), self.structure, self.data, max_batches=self.max_batches
            )
        return self._stats

    def check_models(self, models: Sequence[nn.Module], op: str = "merge") -> None:
        """Refuse models other than the context's (statistics and structure belong to those exact modules)."""
        models = list(models)
        if len(models) != len(self.models) or any(
            a is not b for a, b in zip(models, self.models, strict=False)
        ):
            raise ValueError(
                f"{op}: context= was built for {len(self.models)} other model objects; pass the context's own "
                f"models (context.models) or build a new context"
            )


def match_context(
    models: Sequence[nn.Module],
    data: Iterable | None = None,
    *,
    structure: Structure | None = None,
    example_input: object | None = None,
    max_batches: int | None = None,
    stats: FeatureStats | None = None,
    op: str = "match_context",
) -> MatchContext:
    """A :class:`MatchContext` for ``models``: discovers the structure when not given and checks the models.

    Args:
        models: two or more models of one architecture (classifier heads may differ in size).
        data: batches ``x`` or ``(x, y)`` for activation statistics (and an example input for discovery). Read
            more than once: pass a ``DataLoader`` or a list, not a one-shot iterator.
        structure: a hand-written structure, for models discovery cannot handle.
        example_input: input for discovery (default: 2 samples of ``data``, else zeros of the model's spec).
        max_batches: limit on batches streamed for the statistics.
        stats: precomputed statistics of ``models`` (same order), if any.
        op: the operation named in errors.

    Returns:
        The context; statistics are collected on first use.
    """
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"{op}: need at least 2 models, got {len(models)}")
    if structure is None:
        from mergelab.structure import discover_structure

        example_input = example_input_for(models[0], data, example_input, op)
        structure = discover_structure(models[0], example_input)
    check_compatible(models, structure, op)
    if stats is not None and stats.num_models != len(models):
        raise ValueError(f"{op}: stats were collected for {stats.num_models} models, got {len(models)}")
    return MatchContext(tuple(models), structure, data, max_batches, example_input, stats)


def example_input_for(
    model: nn.Module, data: Iterable | None = None, example_input: Tensor | None = None, op: str = "merge"
) -> Tensor:
    """An input to trace ``model`` with: the one given, else the first batch of ``data`` (2 samples), else zeros of
    ``model.mergelab_spec["input_shape"]``."""
    if example_input is not None:
        return example_input
    if data is not None:
        for x, _ in batches(data, max_batches=1):
            return x[:2]
    spec = getattr(model, "mergelab_spec", None)
    if isinstance(spec, dict) and "input_shape" in spec:
        return torch.zeros(2, *spec["input_shape"])
    raise ValueError(
        f"{op}: cannot trace {type(model).__name__} without an example input; pass example_input= or data="
    )


def check_compatible(models: Sequence[nn.Module], structure: Structure, op: str = "merge") -> None:
    """Raise ``ValueError`` (naming the tensor) unless the models can be merged along ``structure``.

    Required: the same class and tensor names; equal shapes for every tensor that produces units (has an
    ``"out"`` axis); every group axis present with the group's size in every model. Tensors that produce no units
    (classifier heads) may differ elsewhere, so models of tasks with different class counts are compatible.
    """
    cls = {type(m).__name__ for m in models}
    if len(cls) != 1:
        raise ValueError(f"{op}: models are of different classes {sorted(cls)}")
    sds = [m.state_dict() for m in models]
    for i, sd in enumerate(sds[1:], 1):
        if set(sd) != set(sds[0]):
            diff = sorted(set(sd) ^ set(sds[0]))[:5]
            raise ValueError(f"{op}: model {i} has different tensors than model 0, e.g. {diff}")
    axes = structure.param_axes
    for key in sds[0]:
        shapes = [tuple(sd[key].shape) for sd in sds]
        items = axes.get(key, [])
        if any(a.role == "out" for _, a in items) and len(set(shapes)) != 1:
            raise ValueError(f"{op}: {key!r} has shapes {shapes} across models; the models are incompatible")
        for g, a in items:
            need = a.start + g.size * a.inner
            for i, s in enumerate(shapes):
                if a.dim >= len(s) or s[a.dim] < need:
                    raise ValueError(
                        f"{op}: {key!r} {s} of model {i} has no {g.size} units of group {g.name!r} on dim {a.dim}; "
                        f"the models are incompatible"
                    )


def check_models(
    models: Sequence[nn.Module], reference: int, coefficients: Sequence[float] | None, op: str
) -> tuple[list[nn.Module], list[float]]:
    """The checks every N-model permutation matcher makes first: ≥ 2 models of one architecture, a valid
    reference; returns the models as a list and the normalised coefficients."""
    models = list(models)
    n = len(models)
    if n < 2:
        raise ValueError(f"{op}: need at least 2 models, got {n}")
    if not 0 <= reference < n:
        raise ValueError(f"{op}: reference={reference} out of range for {n} models")
    check_same_architecture(models, op)
    return models, normalize_coefficients(coefficients, n, op)
