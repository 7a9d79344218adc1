"""Merge methods ``zipit`` and ``mudsc``: training-free merging of models, also of models of different tasks.

* ``zipit`` (Stoica et al., ZipIt!, ICLR 2024): per group, zip the models' units on the joint correlation of
  their activations — matches within a model are allowed — and average in that basis
  (:func:`~mergelab.match.zip.zip_alignment`).
* ``mudsc`` (Xu et al., Training-Free Pretrained Model Merging, CVPR 2024): match on a blend of weight- and
  activation-space similarity, by coordinate descent over groups, with the zip (``mode="zip"``) or a permutation
  (``mode="align"``) inside (:func:`~mergelab.match.zip.mudsc_alignment`); the blend weight ``alpha`` is chosen
  on labelled held-out data from ``alphas`` when not given.

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

import logging
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mergelab.evaluation import batches, eval_mode
from mergelab.match.features import FeatureStats, collect_features
from mergelab.match.zip import mudsc_alignment, zip_alignment
from mergelab.merge.aligned import example_input_for
from mergelab.merge.partial import build_multihead, check_compatible, merged_groups
from mergelab.merge.registry import register_method
from mergelab.merge.repair import reset_batchnorm
from mergelab.structure.alignment import Alignment, apply_alignment
from mergelab.structure.types import Structure

__all__ = ["DEFAULT_ALPHAS", "build_merged", "head_params", "mudsc", "select_alpha", "zipit"]

logger = logging.getLogger(__name__)

ZIPIT_PAPER = "https://arxiv.org/abs/2305.03053"
MUDSC_PAPER = "https://arxiv.org/abs/2403.01753"
DEFAULT_ALPHAS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

Heads = Literal["merge", "concat"]


def head_params(structure: Structure, model: nn.Module) -> set[str]:
    """Floating-point tensors that produce no group's units: the classifier head (its outputs are classes)."""
    produce = {a.param for g in structure for a in g.axes if a.role == "out"}
    return {k for k, v in model.state_dict().items() if v.is_floating_point() and k not in produce}


def build_merged(
    models: Sequence[nn.Module],
    alignment: Alignment,
    *,
    heads: Heads = "merge",
    partial: int | str | None = None,
) -> nn.Module:
    """The merged model of an alignment: the plain architecture, or a multi-head model (see the module docstring).

    Args:
        models: the source models, in the alignment's order.
        alignment: any alignment (zip or permutation) with merged width = model width.
        heads: ``"merge"`` or ``"concat"``.
        partial: merge only these groups (see :func:`~mergelab.merge.partial.merged_groups`); ``None`` = all.

    Returns:
        A new module.
    """
    if heads not in ("merge", "concat"):
        raise ValueError(f"heads={heads!r}; choose 'merge' (average heads) or 'concat' (one head per model)")
    names = merged_groups(alignment.structure, partial)
    if heads == "merge" and len(names) == len(alignment.structure):
        return apply_alignment(models, alignment)
    return build_multihead(models, alignment, names, combine="mean" if heads == "merge" else "concat")


def _prepare(
    models: Sequence[nn.Module],
    data: Iterable | None,
    structure: Structure | None,
    example_input: Tensor | None,
    heads: str,
    repair: str | None,
    op: str,
) -> tuple[list[nn.Module], Structure]:
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"{op}: need at least 2 models, got {len(models)}")
    if data is None:
        raise ValueError(
            f"{op}: needs data= (a loader yielding x or (x, y); for different tasks, data of all tasks)"
        )
    if heads not in ("merge", "concat"):
        raise ValueError(
            f"{op}: heads={heads!r}; choose 'merge' (average heads) or 'concat' (one head per model)"
        )
    if repair not in (None, "reset"):
        raise ValueError(
            f"{op}: repair={repair!r}; choose None or 'reset' (REPAIR's per-unit rescaling needs a permutation)"
        )
    if structure is None:
        from mergelab.structure import discover_structure

        structure = discover_structure(models[0], example_input_for(models[0], data, example_input, op))
    check_compatible(models, structure, op)
    if heads == "merge":
        shapes = {
            k: {tuple(m.state_dict()[k].shape) for m in models} for k in head_params(structure, models[0])
        }
        bad = [k for k, s in shapes.items() if len(s) > 1]
        if bad:
            raise ValueError(
                f"{op}: heads='merge' averages heads, but {bad[0]!r} differs in shape; use heads='concat'"
            )
    return models, structure


def _finish(
    model: nn.Module, repair: str | None, data: Iterable, max_batches: int | None, info: dict
) -> nn.Module:
    if repair == "reset":
        model = reset_batchnorm(model, data, max_batches=max_batches)
    model.mergelab_merge_info = info  # type: ignore[assignment]
    return model


@register_method("zipit", needs_data=True, paper=ZIPIT_PAPER)
def zipit(
    models: Sequence[nn.Module],
    *,
    data: Iterable | None = None,
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
) -> nn.Module:
    """ZipIt!: zip units within and across models on their activation correlation, then average.

    Args:
        models: two or more models of one architecture (with ``heads="concat"`` their heads may differ in size).
        data: batches ``x`` or ``(x, y)`` — for models of different tasks, data of every task (required).
        alpha: how readily an already merged feature merges again (ZipIt's α; ``<= 0`` never).
        beta: budget of within-model merges (ZipIt's β; 0 forbids them, which with ``alpha=0`` is a permutation).
        solver: ``"zip"`` or ``"permute"`` (one-to-one activation matching, the "permute" baseline).
        partial: merge only the first groups (int, or a group / module name): partial zipping.
        heads: ``"merge"`` (average heads; same output space) or ``"concat"`` (one head per model).
        coefficients: averaging weights (uniform by default).
        repair: ``None`` or ``"reset"`` (recompute BatchNorm statistics of the merged model on ``data``).
        max_batches: limit on batches for the activation statistics.
        structure: a hand-written structure (default: discovered with ``torch.fx``).
        example_input: input for discovery (default: a batch of ``data``).

    Returns:
        The merged model (``info`` in ``model.mergelab_merge_info``).

    Example:
        >>> import torch, mergelab
        >>> a = mergelab.build_model("mlp", (1, 8, 8), 5, width=16, depth=2)
        >>> b = mergelab.build_model("mlp", (1, 8, 8), 5, width=16, depth=2)
        >>> m = mergelab.merge([a, b], method="zipit", data=[torch.randn(32, 1, 8, 8)], heads="concat")
        >>> m(torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """
    models, st = _prepare(models, data, structure, example_input, heads, repair, "zipit")
    assert data is not None
    al = zip_alignment(
        st,
        models,
        data,
        solver=solver,
        alpha=alpha,
        beta=beta,
        coefficients=coefficients,
        max_batches=max_batches,
    )
    merged = build_merged(models, al, heads=heads, partial=partial)
    return _finish(merged, repair, data, max_batches, {**al.info, "heads": heads, "partial": partial})


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


def _score(model: nn.Module, data: Iterable, output_classes: tuple[int, ...] | None) -> float:
    """Accuracy on labelled data; with ``output_classes``, labels are global classes and the prediction is the
    class of the arg-max output column (joint accuracy over the tasks)."""
    lookup = torch.tensor(output_classes) if output_classes is not None else None
    correct = total = 0
    with eval_mode(model), torch.no_grad():
        for x, y in batches(data):
            if y is None:
                raise ValueError(
                    "mudsc: choosing alpha needs labelled data (x, y); pass alpha= or selection_data="
                )
            out = model(x)
            if lookup is not None and out.shape[-1] != len(lookup):
                raise ValueError(
                    f"mudsc: the merged model has {out.shape[-1]} outputs for {len(lookup)} task classes"
                )
            if lookup is None and int(y.max()) >= out.shape[-1]:
                raise ValueError(
                    f"mudsc: label {int(y.max())} exceeds the merged model's {out.shape[-1]} outputs; pass "
                    f"tasks= (the class groups) or labels in the output space"
                )
            pred = out.argmax(-1)
            correct += int(((lookup[pred] if lookup is not None else pred) == y).sum())
            total += len(y)
    if total == 0:
        raise ValueError("mudsc: selection data is empty")
    return correct / total


def select_alpha(
    models: Sequence[nn.Module],
    structure: Structure,
    stats: FeatureStats,
    selection_data: Iterable,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    tasks: Sequence[Sequence[int]] | None = None,
    heads: Heads = "merge",
    partial: int | str | None = None,
    **mudsc_options: object,
) -> tuple[float, Alignment, dict[float, float]]:
    """MuDSC's choice of ``alpha``: the candidate whose merged model is most accurate on held-out labelled data.

    Args:
        models, structure, stats: as for :func:`~mergelab.match.zip.mudsc_alignment` (statistics are reused).
        selection_data: labelled batches ``(x, y)``; labels in the merged model's output space, or global labels
            with ``tasks``.
        alphas: candidates (MuDSC: 0.1 … 0.9).
        tasks: class groups (global ids); the score is then the joint accuracy over them (``heads="concat"``).
        heads, partial: how the merged model is built (see :func:`build_merged`).
        **mudsc_options: passed to :func:`~mergelab.match.zip.mudsc_alignment`.

    Returns:
        ``(best alpha, its alignment, {alpha: score})``; ties go to the smaller alpha.
    """
    if not alphas:
        raise ValueError("select_alpha: no candidate alphas")
    classes = _output_classes(tasks)
    scores: dict[float, float] = {}
    best: tuple[float, float, Alignment] | None = None
    for a in alphas:
        al = mudsc_alignment(structure, models, stats=stats, alpha=float(a), **mudsc_options)  # type: ignore[arg-type]
        score = _score(build_merged(models, al, heads=heads, partial=partial), selection_data, classes)
        scores[float(a)] = score
        logger.info("mudsc: alpha=%.2f selection accuracy %.4f", a, score)
        if best is None or score > best[0]:
            best = (score, float(a), al)
    assert best is not None
    return best[1], best[2], scores


@register_method("mudsc", needs_data=True, paper=MUDSC_PAPER)
def mudsc(
    models: Sequence[nn.Module],
    *,
    data: Iterable | None = None,
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
) -> nn.Module:
    """MuDSC: match units on weight- and activation-space similarity together (dual-space constraints), then merge.

    Args:
        models: two or more models of one architecture.
        data: batches ``x`` or ``(x, y)`` for the activation statistics (data of every task; required).
        alpha: weight of the weight-space similarity in [0, 1]; ``None`` chooses it from ``alphas`` on
            ``selection_data`` (MuDSC picks it on held-out training data).
        mode: ``"zip"`` (ZipIt's zip inside, ``zip_alpha``/``zip_beta``) or ``"align"`` (permutations).
        zip_alpha, zip_beta: the zip's knobs (MuDSC: 0.5 and 1).
        alphas: candidates when ``alpha`` is ``None``.
        selection_data: labelled batches for choosing ``alpha`` (default ``data``, which must then have labels).
        tasks: class groups (global ids, e.g. ``[[0,1,2,3,4],[5,6,7,8,9]]``) — with ``heads="concat"``, alpha is
            chosen by joint accuracy over them.
        partial, heads, coefficients, repair, max_batches, structure, example_input: as in :func:`zipit`.
        max_iter: at most this many passes of coordinate descent over groups.
        patience: stop after this many passes without a better mean merge value (the zip's passes can cycle).
        seed: seed of the visiting order.

    Returns:
        The merged model; ``model.mergelab_merge_info`` records the alpha used and, if chosen, every score.
    """
    models, st = _prepare(models, data, structure, example_input, heads, repair, "mudsc")
    assert data is not None
    stats = collect_features(models, st, data, max_batches=max_batches)
    options = {
        "mode": mode,
        "zip_alpha": zip_alpha,
        "zip_beta": zip_beta,
        "coefficients": coefficients,
        "exclude": head_params(st, models[0]) if heads == "concat" else (),
        "max_iter": max_iter,
        "patience": patience,
        "seed": seed,
    }
    scores: dict[float, float] = {}
    if alpha is None:
        chosen, al, scores = select_alpha(
            models, st, stats, selection_data if selection_data is not None else data, alphas=alphas,
            tasks=tasks, heads=heads, partial=partial, **options,
        )  # fmt: skip
        logger.info("mudsc: chose alpha=%.2f (scores %s)", chosen, scores)
    else:
        al = mudsc_alignment(st, models, stats=stats, alpha=float(alpha), **options)  # type: ignore[arg-type]
    merged = build_merged(models, al, heads=heads, partial=partial)
    info = {**al.info, "heads": heads, "partial": partial, "alpha_scores": scores}
    return _finish(merged, repair, data, max_batches, info)
