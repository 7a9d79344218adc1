"""Model soups: uniform and greedy weight averages, linear interpolation, and optional alignment first.

Weight averaging only works when the models lie in one basin — fine-tuned from one pretrained model, or
trained from one shared initialisation. Independently trained models first need their hidden units put in one
basis; :func:`align_models` does that with the one :func:`~mergelab.merge.aligned.align` and says clearly when
it cannot.

Papers: Wortsman et al., "Model soups", ICML 2022 (https://arxiv.org/abs/2203.05482) — greedy soup;
Wang et al., "Rethinking Weight-Averaged Model-merging", 2024 (https://arxiv.org/abs/2411.09263).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from mergelab.evaluation import evaluate
from mergelab.merge.average import average, average_state_dicts
from mergelab.merge.registry import MergeResult, register_method
from mergelab.structure.checks import check_same_architecture

__all__ = [
    "AlignmentUnavailable",
    "SoupResult",
    "align_models",
    "greedy_soup",
    "greedy_soup_result",
    "interpolate_weights",
    "uniform_soup",
]

log = logging.getLogger(__name__)


class AlignmentUnavailable(ValueError):
    """The requested alignment method is unknown, lacks its data, or cannot permute these models."""


def interpolate_weights(a: nn.Module, b: nn.Module, lam: float) -> nn.Module:
    """The model with weights ``(1 - lam) * a + lam * b`` (``lam=0`` is ``a``, ``lam=1`` is ``b``).

    ``lam`` outside ``[0, 1]`` extrapolates, which is allowed (useful for loss-landscape cuts). Integer
    buffers (BatchNorm's counter) come from ``a``.

    Args:
        a: first endpoint.
        b: second endpoint, same architecture as ``a``.
        lam: interpolation weight of ``b``.

    Returns:
        A new model (a deep copy of ``a`` holding the interpolated weights); ``a`` and ``b`` are untouched.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> a, b = nn.Linear(3, 2), nn.Linear(3, 2)
        >>> m = interpolate_weights(a, b, 0.25)
        >>> torch.allclose(m.weight, 0.75 * a.weight + 0.25 * b.weight)
        True
    """
    lam = float(lam)
    if lam != lam:  # NaN
        raise ValueError("interpolate_weights: lam is NaN")
    check_same_architecture([a, b], "interpolate_weights")
    out = copy.deepcopy(a)
    out.load_state_dict(average_state_dicts([a.state_dict(), b.state_dict()], [1.0 - lam, lam]))
    return out


def align_models(
    models: Sequence[nn.Module],
    *,
    reference: int = 0,
    method: str = "weight_matching",
    data: Iterable | None = None,
) -> list[nn.Module]:
    """Put every model's hidden units into the basis of ``models[reference]`` (re-basin), for averaging.

    One :func:`~mergelab.merge.aligned.align` of all models to the reference, then each model permuted into its
    basis (the same function, re-expressed).

    Args:
        models: models of one architecture.
        reference: index of the model whose basis the others are mapped into; it is returned unchanged.
        method: a permutation method or solver (``weight_matching``, ``activation_matching``, ...).
        data: loader for data-driven methods; also gives an example input to discover the structure with
            (without it, zoo models' recorded input shape is used).

    Returns:
        A new list; entry ``reference`` is the reference itself, the others are aligned copies.

    Raises:
        AlignmentUnavailable: the method is unknown, needs data that was not given, or gives no permutation.
            Other errors (a model the method cannot handle) propagate.

    Example:
        >>> import torch
        >>> from mergelab.models import build_model
        >>> a, b = (build_model("mlp", (1, 8, 8), 10, width=8, depth=1) for _ in range(2))
        >>> aligned = align_models([a, b])  # zoo models know their input shape, so no data is needed
        >>> aligned[0] is a, aligned[1] is b
        (True, False)
    """
    from mergelab.match.registry import get_solver
    from mergelab.merge.aligned import METHOD_SOLVERS, align
    from mergelab.structure.alignment import to_basis

    models = list(models)
    check_same_architecture(models, "align_models")
    if not 0 <= reference < len(models):
        raise ValueError(f"align_models: reference {reference} out of range for {len(models)} models")
    try:
        solver = get_solver(METHOD_SOLVERS.get(method, method))
    except ValueError as err:
        raise AlignmentUnavailable(
            f"align_models: alignment method {method!r} is not available ({err})"
        ) from None
    if solver.needs_data and data is None:
        raise AlignmentUnavailable(f"align_models: alignment method {method!r} needs data=")
    if len(models) == 1:
        return list(models)
    al = align(models, solver.name, data, reference=reference)
    if al.perms is None:
        raise AlignmentUnavailable(f"align_models: method {method!r} gave no permutation alignment")
    return [m if i == reference else to_basis(m, al.structure, al.perms[i]) for i, m in enumerate(models)]


def uniform_soup(
    models: Sequence[nn.Module], *, align: str | None = None, data: Iterable | None = None
) -> nn.Module:
    """Uniform weight average, optionally after aligning all models to the first one.

    ``align="weight_matching"`` puts every model into model 0's unit basis first (for independent models).

    If the alignment method is unavailable the soup is built from the unaligned weights and a warning says so.

    Example:
        >>> from torch import nn
        >>> soup = uniform_soup([nn.Linear(3, 2), nn.Linear(3, 2)])
    """
    models = list(models)
    if align is not None:
        models = _try_align(models, align, data, reference=0)
    return average(models)


@dataclass
class SoupResult:
    """What greedy soup selection found.

    Attributes:
        model: the soup (uniform average of the kept members).
        members: indices (into the input list) of the kept members, in the order they were added.
        order: all indices sorted by held-out accuracy, best first (the order members were tried in).
        member_accuracies: held-out accuracy of every input model (input order).
        heldout_accuracy: held-out accuracy of the final soup.
        trace: one entry per tried member: ``(index, candidate accuracy, kept)``.
        aligned: whether the members were aligned to the best model before averaging.
    """

    model: nn.Module
    members: list[int]
    order: list[int]
    member_accuracies: list[float]
    heldout_accuracy: float
    trace: list[tuple[int, float, bool]] = field(default_factory=list)
    aligned: bool = False


def greedy_soup_result(
    models: Sequence[nn.Module],
    data: Iterable,
    *,
    align: str | None = None,
    align_data: Iterable | None = None,
) -> SoupResult:
    """Greedy soup with its bookkeeping; see :func:`greedy_soup`.

    Args:
        models: candidate ingredients (one architecture).
        data: held-out loader of ``(x, y)`` batches — not the test set, or the selection leaks.
        align: optional alignment method applied first (every model into the best model's basis).
        align_data: loader for data-driven alignment methods (defaults to ``data``).

    Returns:
        A :class:`SoupResult`; its held-out accuracy is never below the best single member's.
    """
    models = list(models)
    check_same_architecture(models, "greedy_soup")
    accs = [evaluate(m, data).accuracy for m in models]
    # Stable sort: ties keep input order, so the result does not depend on float noise in sorting.
    order = sorted(range(len(models)), key=lambda i: -accs[i])
    aligned = False
    if align is not None and len(models) > 1:
        before = models
        models = _try_align(models, align, align_data if align_data is not None else data, reference=order[0])
        aligned = models is not before
    kept = [order[0]]
    best = accs[order[0]]
    soup = models[order[0]]
    trace: list[tuple[int, float, bool]] = [(order[0], best, True)]
    for i in order[1:]:
        candidate = average([models[j] for j in [*kept, i]])
        acc = evaluate(candidate, data).accuracy
        keep = acc >= best  # Wortsman et al.: add if held-out accuracy does not drop
        trace.append((i, acc, keep))
        if keep:
            kept.append(i)
            best, soup = acc, candidate
        log.debug("greedy_soup: member %d -> held-out %.4f (%s)", i, acc, "kept" if keep else "dropped")
    if len(kept) == 1:
        soup = copy.deepcopy(soup)
    return SoupResult(soup, kept, order, accs, best, trace, aligned)


@register_method("greedy_soup", needs_data=True, paper="https://arxiv.org/abs/2203.05482")
def greedy_soup(
    models: Sequence[nn.Module],
    *,
    data: Iterable,
    align: str | None = None,
) -> MergeResult:
    """Greedy soup: add members best-first, keeping each only if held-out accuracy does not drop.

    Members are sorted by held-out accuracy; the soup starts as the best one, and each next member is kept
    if the uniform average of the kept members plus it scores at least as well on the held-out data
    (Wortsman et al. 2022). So the soup is never worse on held-out data than the best single member.

    Args:
        models: candidate ingredients of one architecture.
        data: held-out loader of ``(x, y)`` batches (never the test set).
        align: ``None`` (models share a basin: same init or one pretrained base) or an alignment method such
            as ``"weight_matching"`` for independently trained models; falls back to no alignment with a
            warning when that method is unavailable.

    Returns:
        A new model (the inputs are untouched) and ``info``: the kept ``members``, every member's held-out
        accuracy, the soup's, and whether the members were ``aligned``.

    Example:
        >>> import torch, mergelab
        >>> from torch import nn
        >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        >>> soup = mergelab.merge([nn.Linear(3, 2), nn.Linear(3, 2)], method="greedy_soup", data=data)
    """
    res = greedy_soup_result(models, data, align=align)
    info = {
        "members": res.members,
        "member_accuracies": res.member_accuracies,
        "heldout_accuracy": res.heldout_accuracy,
        "aligned": res.aligned,
    }
    return MergeResult(res.model, info)


def _try_align(
    models: list[nn.Module], method: str, data: Iterable | None, reference: int
) -> list[nn.Module]:
    try:
        return align_models(models, reference=reference, method=method, data=data)
    except AlignmentUnavailable as err:
        log.warning("%s; averaging the unaligned weights instead", err)
        return models
