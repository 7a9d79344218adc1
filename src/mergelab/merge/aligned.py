"""Permutation-aligned merging: Git Re-Basin weight matching and activation matching, then averaging.

Each method discovers the models' :class:`~mergelab.structure.types.Structure` (``torch.fx``), finds one
permutation per group and model that brings every model into a shared unit basis, averages the weights in that
basis, and optionally corrects the merged statistics (BatchNorm reset or REPAIR).

``data`` is read several times (tracing, statistics, repair): pass a ``DataLoader`` or a list, not a one-shot
iterator. Permutations follow :mod:`mergelab.structure.transform`: merged unit ``j`` is model ``i``'s unit
``alignment.perms[i][g][j]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mergelab.evaluation import split_batch
from mergelab.match.solvers import match_activations, match_weights_many
from mergelab.merge.registry import register_method
from mergelab.merge.repair import repair as repair_stats
from mergelab.merge.repair import reset_batchnorm
from mergelab.structure.alignment import Alignment, apply_alignment, to_basis
from mergelab.structure.checks import check_same_architecture
from mergelab.structure.types import Structure

__all__ = [
    "activation_matching",
    "align",
    "align_to",
    "example_input_for",
    "finish_merge",
    "weight_matching",
]

logger = logging.getLogger(__name__)

RepairKind = Literal["reset", "repair"]
_REBASIN = "https://arxiv.org/abs/2209.04836"


def example_input_for(
    model: nn.Module, data: Iterable | None = None, example_input: Tensor | None = None, op: str = "merge"
) -> Tensor:
    """An input to trace ``model`` with: the one given, else the first batch of ``data`` (2 samples), else zeros of
    ``model.mergelab_spec["input_shape"]``."""
    if example_input is not None:
        return example_input
    if data is not None:
        for batch in data:
            x, _ = split_batch(batch)
            return x[:2]
    spec = getattr(model, "mergelab_spec", None)
    if isinstance(spec, dict) and "input_shape" in spec:
        return torch.zeros(2, *spec["input_shape"])
    raise ValueError(
        f"{op}: cannot trace {type(model).__name__} without an example input; pass example_input= or data="
    )


def _structure(
    models: Sequence[nn.Module],
    structure: Structure | None,
    data: Iterable | None,
    example_input: Tensor | None,
    op: str,
) -> Structure:
    if structure is not None:
        return structure
    from mergelab.structure import discover_structure

    return discover_structure(models[0], example_input_for(models[0], data, example_input, op))


def _check_repair(repair: str | None, data: Iterable | None, op: str) -> None:
    if repair not in (None, "reset", "repair"):
        raise ValueError(f"{op}: repair={repair!r}; choose None, 'reset' or 'repair'")
    if repair is not None and data is None:
        raise ValueError(f"{op}: repair={repair!r} needs data= to measure statistics on")


def align(
    models: Sequence[nn.Module],
    method: Literal["weight_matching", "activation_matching"] = "weight_matching",
    data: Iterable | None = None,
    *,
    structure: Structure | None = None,
    example_input: Tensor | None = None,
    coefficients: Sequence[float] | None = None,
    reference: int = 0,
    merge_many: bool = False,
    max_iter: int = 100,
    seed: int = 0,
    max_batches: int | None = None,
) -> Alignment:
    """Find the permutation alignment of ``models`` without merging (for interpolation and analyses).

    Args:
        models: two or more models of one architecture.
        method: ``"weight_matching"`` or ``"activation_matching"`` (needs ``data``).
        data: batches ``x`` or ``(x, y)``.
        structure: the groups (discovered with ``torch.fx`` when omitted).
        example_input: input used for tracing (default: a batch of ``data`` or zeros of the model's spec).
        coefficients, reference, merge_many, max_iter, seed: see :func:`weight_matching`.
        max_batches: limit on batches for activation statistics.

    Returns:
        An :class:`~mergelab.structure.alignment.Alignment`; ``to_basis(models[i], al.structure, al.perms[i])``
        brings model ``i`` into the merged basis.
    """
    models = list(models)
    check_same_architecture(models, method)
    st = _structure(models, structure, data, example_input, method)
    if method == "weight_matching":
        return match_weights_many(
            st,
            models,
            reference=reference,
            merge_many=merge_many,
            coefficients=coefficients,
            max_iter=max_iter,
            seed=seed,
        )
    if method == "activation_matching":
        if data is None:
            raise ValueError("activation_matching: needs data= (a loader yielding x or (x, y))")
        return match_activations(
            st,
            models,
            data,
            coefficients=coefficients,
            reference=reference,
            merge_many=merge_many,
            max_batches=max_batches,
            max_iter=max_iter,
            seed=seed,
        )
    raise ValueError(f"align: unknown method {method!r}; choose 'weight_matching' or 'activation_matching'")


def align_to(
    a: nn.Module,
    b: nn.Module,
    *,
    method: Literal["weight_matching", "activation_matching"] = "weight_matching",
    data: Iterable | None = None,
    structure: Structure | None = None,
    example_input: Tensor | None = None,
    max_iter: int = 100,
    seed: int = 0,
    max_batches: int | None = None,
) -> nn.Module:
    """``b`` re-expressed in ``a``'s unit basis (same function as ``b``), e.g. before interpolating ``a → b``.

    Args:
        a: the reference.
        b: the model to permute.
        method, data, structure, example_input, max_iter, seed, max_batches: as in :func:`align`.

    Returns:
        A permuted copy of ``b``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> a, b = (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(2))
        >>> b2 = align_to(a, b, example_input=torch.zeros(2, 4))
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(b2(x), b(x), atol=1e-6)
        True
    """
    al = align(
        [a, b],
        method,
        data,
        structure=structure,
        example_input=example_input,
        max_iter=max_iter,
        seed=seed,
        max_batches=max_batches,
    )
    assert al.perms is not None
    return to_basis(b, al.structure, al.perms[1])


def finish_merge(
    models: Sequence[nn.Module],
    alignment: Alignment,
    repair: RepairKind | None,
    data: Iterable | None,
    *,
    max_batches: int | None = None,
) -> nn.Module:
    """Apply ``alignment`` and the optional statistics correction (``"reset"`` BN stats or ``"repair"``)."""
    merged = apply_alignment(models, alignment)
    if repair is None:
        return merged
    if data is None:
        raise ValueError(f"repair={repair!r} needs data=")
    if repair == "reset":
        return reset_batchnorm(merged, data, max_batches=max_batches)
    if alignment.perms is None:
        raise ValueError("repair='repair' needs a permutation alignment (endpoints in the merged basis)")
    endpoints = [to_basis(m, alignment.structure, p) for m, p in zip(models, alignment.perms, strict=True)]
    return repair_stats(merged, endpoints, data, alignment.coefficients, max_batches=max_batches)


@register_method("weight_matching", paper=_REBASIN)
def weight_matching(
    models: Sequence[nn.Module],
    *,
    data: Iterable | None = None,
    coefficients: Sequence[float] | None = None,
    repair: RepairKind | None = None,
    reference: int = 0,
    merge_many: bool = False,
    example_input: Tensor | None = None,
    max_iter: int = 100,
    seed: int = 0,
    structure: Structure | None = None,
) -> nn.Module:
    """Git Re-Basin weight matching: permute every model's units onto the reference's, then average.

    Args:
        models: two or more models of one architecture.
        data: batches ``x`` or ``(x, y)``; only needed for ``repair`` (and to trace, without ``example_input``).
        coefficients: averaging weights (uniform by default).
        repair: ``None``, ``"reset"`` (recompute BatchNorm statistics) or ``"repair"`` (REPAIR).
        reference: the model whose basis is kept.
        merge_many: Re-Basin's MergeMany (align each model to the mean of the others, repeatedly).
        example_input: input for ``torch.fx`` structure discovery.
        max_iter: iterations of coordinate descent (and MergeMany rounds).
        seed: seed of the visiting order.
        structure: a hand-written structure, for models discovery cannot handle.

    Returns:
        The merged model (a new module).
    """
    models = list(models)
    _check_repair(repair, data, "weight_matching")
    al = align(
        models,
        "weight_matching",
        data,
        structure=structure,
        example_input=example_input,
        coefficients=coefficients,
        reference=reference,
        merge_many=merge_many,
        max_iter=max_iter,
        seed=seed,
    )
    return finish_merge(models, al, repair, data)


@register_method("activation_matching", needs_data=True, paper=_REBASIN)
def activation_matching(
    models: Sequence[nn.Module],
    *,
    data: Iterable | None = None,
    coefficients: Sequence[float] | None = None,
    repair: RepairKind | None = None,
    reference: int = 0,
    merge_many: bool = False,
    example_input: Tensor | None = None,
    max_iter: int = 100,
    seed: int = 0,
    max_batches: int | None = None,
    structure: Structure | None = None,
) -> nn.Module:
    """Activation matching: permute units to maximise activation correlation with the reference, then average.

    Args:
        models: two or more models of one architecture.
        data: batches ``x`` or ``(x, y)`` (required).
        coefficients, repair, reference, merge_many, example_input, max_iter, seed, structure: as in
            :func:`weight_matching`.
        max_batches: limit on batches for activation statistics.

    Returns:
        The merged model (a new module).
    """
    models = list(models)
    if data is None:
        raise ValueError("activation_matching: needs data= (a loader yielding x or (x, y))")
    _check_repair(repair, data, "activation_matching")
    al = align(
        models,
        "activation_matching",
        data,
        structure=structure,
        example_input=example_input,
        coefficients=coefficients,
        reference=reference,
        merge_many=merge_many,
        max_iter=max_iter,
        seed=seed,
        max_batches=max_batches,
    )
    return finish_merge(models, al, repair, data, max_batches=max_batches)
