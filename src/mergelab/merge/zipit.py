"""Merge methods ``zipit`` and ``mudsc``: training-free merging of models, also of models of different tasks.

* ``zipit`` (Stoica et al., ZipIt!, ICLR 2024): per group, zip the models' units on the joint correlation of
  their activations — matches within a model are allowed — and average in that basis
  (the ``zip`` solver, :func:`~mergelab.match.zip.zip_alignment`).
* ``mudsc`` (Xu et al., Training-Free Pretrained Model Merging, CVPR 2024): match on a blend of weight- and
  activation-space similarity, by coordinate descent over groups, with the zip (``mode="zip"``) or a permutation
  (``mode="align"``) inside (the ``dual`` solver, :func:`~mergelab.match.dual.mudsc_alignment`); the blend
  weight ``alpha`` is chosen on labelled held-out data from ``alphas`` when not given, every candidate re-solved on
  the same activation statistics.

Both are configurations of :func:`~mergelab.merge.aligned.merge_aligned`.

Both take the same output options:

* ``heads="merge"`` (default): classifier heads are averaged like every other tensor — right when the models
  share an output space (the same task, or class-embedding heads). The result has the models' architecture.
* ``heads="concat"``: every model keeps its own head, reading the merged features through its ``U_i``; the
  result is a :class:`~mergelab.merge.partial.MultiHeadModel` returning the tasks' logits concatenated.
* ``partial=L`` (an int, or a group / module name): merge only the first ``L`` groups and keep the rest of every
  model as a separate branch (partial zipping); always a ``MultiHeadModel`` (outputs concatenated with
  ``heads="concat"``, averaged with ``heads="merge"``).

Options arrive as plain JSON values from the CLI (``alpha=0.5 partial=2 heads=concat``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from torch import Tensor, nn

from mergelab.match.context import MatchContext, match_context
from mergelab.merge.aligned import Heads, build_merged, head_params, merge_aligned
from mergelab.merge.registry import MergeResult, register_method
from mergelab.structure.types import Structure

__all__ = ["DEFAULT_ALPHAS", "build_merged", "head_params", "mudsc", "zipit"]

ZIPIT_PAPER = "https://arxiv.org/abs/2305.03053"
MUDSC_PAPER = "https://arxiv.org/abs/2403.01753"
DEFAULT_ALPHAS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@register_method("zipit", needs_data=True, paper=ZIPIT_PAPER)
def zipit(
    models: Sequence[nn.Module],
    *,
    data: Iterable | None = None,
    context: MatchContext | None = None,
    alpha: float = 0.5,
    beta: float = 1.0,
    solver: Literal["zip", "permute"] = "zip",
    partial: int | str | None = None,
    heads: Heads = "merge",
    coefficients: Sequence[float] | None = None,
    repair: Literal["reset"] | None = None,
    max_batches: int | None = None,
    structure: Structure | None = None,
    example_input: Tensor | None = None,
) -> MergeResult:
    """ZipIt!: zip units within and across models on their activation correlation, then average.

    Args:
        models: two or more models of one architecture (with ``heads="concat"`` their heads may differ in size).
        data: batches ``x`` or ``(x, y)`` — for models of different tasks, data of every task (required).
        context: a shared :func:`~mergelab.match.context.match_context` of these models.
        alpha: how readily an already merged feature merges again (ZipIt's α; ``<= 0`` never).
        beta: budget of within-model merges (ZipIt's β; 0 forbids them, which with ``alpha=0`` is a permutation).
        solver: ``"zip"`` or ``"permute"`` (one-to-one activation matching, the "permute" baseline).
        partial: merge only the first groups (int, or a group / module name): partial zipping.
        heads: ``"merge"`` (average heads; same output space) or ``"concat"`` (one head per model).
        coefficients: averaging weights (uniform by default).
        repair: ``None`` or ``"reset"`` (recompute BatchNorm statistics of the merged model on ``data``).
        max_batches: limit on batches for the activation statistics.
        structure: a hand-written structure (default: discovered).
        example_input: input for discovery (default: a batch of ``data``).

    Returns:
        The merged model and its diagnostics (``merge_value`` per group, ...).

    Example:
        >>> import torch, mergelab
        >>> a = mergelab.build_model("mlp", (1, 8, 8), 5, width=16, depth=2)
        >>> b = mergelab.build_model("mlp", (1, 8, 8), 5, width=16, depth=2)
        >>> m = mergelab.merge([a, b], method="zipit", data=[torch.randn(32, 1, 8, 8)], heads="concat")
        >>> m(torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """
    if solver not in ("zip", "permute"):
        raise ValueError(f"zipit: solver={solver!r}; choose 'zip' or 'permute'")
    if repair not in (None, "reset"):
        raise ValueError(
            f"zipit: repair={repair!r}; choose None or 'reset' (REPAIR's per-unit rescaling needs a permutation)"
        )
    options = {"alpha": alpha, "beta": beta} if solver == "zip" else {}
    result = merge_aligned(
        models, solver="zip" if solver == "zip" else "activation", data=data, context=context, heads=heads,
        partial=partial, repair=repair, coefficients=coefficients, structure=structure, example_input=example_input,
        max_batches=max_batches, op="zipit", **options,
    )  # fmt: skip
    if solver == "permute":
        result.info["method"] = "permute"
    return result


@register_method("mudsc", needs_data=True, paper=MUDSC_PAPER)
def mudsc(
    models: Sequence[nn.Module],
    *,
    data: Iterable | None = None,
    context: MatchContext | None = None,
    alpha: float | None = None,
    mode: Literal["zip", "align"] = "zip",
    zip_alpha: float = 0.5,
    zip_beta: float = 1.0,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    selection_data: Iterable | None = None,
    tasks: Sequence[Sequence[int]] | None = None,
    partial: int | str | None = None,
    heads: Heads = "merge",
    coefficients: Sequence[float] | None = None,
    repair: Literal["reset"] | None = None,
    max_iter: int = 20,
    patience: int = 2,
    seed: int = 0,
    max_batches: int | None = None,
    structure: Structure | None = None,
    example_input: Tensor | None = None,
) -> MergeResult:
    """MuDSC: match units on weight- and activation-space similarity together (dual-space constraints), then merge.

    Args:
        models: two or more models of one architecture.
        data: batches ``x`` or ``(x, y)`` for the activation statistics (data of every task; required).
        context: a shared :func:`~mergelab.match.context.match_context` of these models.
        alpha: weight of the weight-space similarity in [0, 1]; ``None`` chooses it from ``alphas`` on
            ``selection_data`` (MuDSC picks it on held-out training data).
        mode: ``"zip"`` (ZipIt's zip inside, ``zip_alpha``/``zip_beta``) or ``"align"`` (permutations).
        zip_alpha, zip_beta: the zip's knobs (MuDSC: 0.5 and 1).
        alphas: candidates when ``alpha`` is ``None``.
        selection_data: labelled batches for choosing ``alpha`` (default ``data``, which must then have labels).
        tasks: class groups (global ids, e.g. ``[[0,1,2,3,4],[5,6,7,8,9]]``) — with ``heads="concat"``, alpha is
            chosen by joint accuracy over them.
        partial: merge only the first groups (an int, or a group / module name): partial zipping.
        heads: ``"merge"`` (average heads; same output space) or ``"concat"`` (one head per model).
        coefficients: averaging weights (uniform by default).
        repair: ``None`` or ``"reset"`` (recompute BatchNorm statistics of the merged model on ``data``).
        max_batches: limit on batches for the activation statistics.
        structure: a hand-written structure (default: discovered).
        example_input: input for discovery (default: a batch of ``data``).
        max_iter: at most this many passes of coordinate descent over groups.
        patience: stop after this many passes without a better mean merge value (the zip's passes can cycle).
        seed: seed of the visiting order.

    Returns:
        The merged model; ``info`` records the alpha used and, if chosen, every score (``alpha_scores``).
    """
    if repair not in (None, "reset"):
        raise ValueError(
            f"mudsc: repair={repair!r}; choose None or 'reset' (REPAIR's per-unit rescaling needs a permutation)"
        )
    if context is None:
        context = match_context(
            models,
            data,
            structure=structure,
            example_input=example_input,
            max_batches=max_batches,
            op="mudsc",
        )
    options = {
        "mode": mode,
        "zip_alpha": zip_alpha,
        "zip_beta": zip_beta,
        "exclude": head_params(context.structure, context.models[0]) if heads == "concat" else (),
        "max_iter": max_iter,
        "patience": patience,
        "seed": seed,
    }
    if alpha is None:
        if not alphas:
            raise ValueError("mudsc: no candidate alphas")
        select = {"alpha": [float(a) for a in alphas]}
    else:
        select, options["alpha"] = None, float(alpha)
    result = merge_aligned(
        models, solver="dual", data=data, context=context, heads=heads, partial=partial, repair=repair,
        coefficients=coefficients, select=select, selection_data=selection_data, tasks=tasks, op="mudsc", **options,
    )  # fmt: skip
    result.info["alpha_scores"] = {c["alpha"]: c["score"] for c in result.info.get("selection", [])}
    return result
