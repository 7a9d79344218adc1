"""The one aligned-merge path: match context → solver → Alignment → merged model → statistics correction.

Every aligned method — weight and activation matching (Git Re-Basin), ZipIt!, MuDSC, their partial and
multi-head variants, with BatchNorm reset or REPAIR — is a configuration of :func:`merge_aligned`:

1. a :class:`~mergelab.match.context.MatchContext` (structure discovered once, activation statistics streamed
   once and cached; pass ``context=`` to share them between methods);
2. a solver of :data:`~mergelab.match.registry.SOLVERS` maps it to an
   :class:`~mergelab.structure.alignment.Alignment` (``select=`` tries several option values and keeps the one whose
   merged model scores best on held-out labelled data — MuDSC's choice of ``alpha``);
3. the merged model: the plain architecture, or a multi-head model (``heads="concat"``: one head per model;
   ``partial=L``: only the first ``L`` groups merged, see :mod:`mergelab.merge.partial`);
4. ``repair="reset"`` recomputes BatchNorm statistics, ``repair="repair"`` runs REPAIR (permutations only).

:func:`align` (and :func:`align_to`) stop after step 2: the one way every analysis aligns models.

``data`` is read several times (tracing, statistics, repair): pass a ``DataLoader`` or a list, not a one-shot
iterator. Permutations follow :mod:`mergelab.structure.transform`: merged unit ``j`` is model ``i``'s unit
``alignment.perms[i][g][j]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mergelab.match.context import MatchContext, example_input_for, match_context
from mergelab.match.lap import LapMethod
from mergelab.match.registry import get_solver
from mergelab.match.similarity import SimilarityKind
from mergelab.match.weight_matching import DEFAULT_TOL, StartKind
from mergelab.merge.partial import build_multihead, merged_groups
from mergelab.merge.registry import MergeResult, register_method
from mergelab.merge.repair import repair as repair_stats
from mergelab.merge.repair import reset_batchnorm
from mergelab.merge.selection import Candidates, select_options
from mergelab.structure.alignment import Alignment, apply_alignment, to_basis
from mergelab.structure.types import Structure

__all__ = [
    "activation_matching",
    "align",
    "align_to",
    "build_merged",
    "endpoint_alignment",
    "example_input_for",
    "head_params",
    "merge_aligned",
    "weight_matching",
]

logger = logging.getLogger(__name__)

RepairKind = Literal["reset", "repair"]
Heads = Literal["merge", "concat"]
_REBASIN = "https://arxiv.org/abs/2209.04836"

# Merge-method names accepted wherever a solver is named (``align(models, "weight_matching")``).
METHOD_SOLVERS: dict[str, str] = {
    "weight_matching": "weight",
    "activation_matching": "activation",
    "zipit": "zip",
    "mudsc": "dual",
}


# --------------------------------------------------------------------------------------------------- building


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
    """The merged model of an alignment: the plain architecture, or a multi-head model.

    Args:
        models: the source models, in the alignment's order.
        alignment: any alignment (zip or permutation) with merged width = model width.
        heads: ``"merge"`` (average the heads: one output space) or ``"concat"`` (every model keeps its head,
            reading the merged features through its ``U_i``; outputs concatenated).
        partial: merge only these groups (see :func:`~mergelab.merge.partial.merged_groups`); ``None`` = all.

    Returns:
        A new module: the models' architecture, or a :class:`~mergelab.merge.partial.MultiHeadModel`.
    """
    if heads not in ("merge", "concat"):
        raise ValueError(f"heads={heads!r}; choose 'merge' (average heads) or 'concat' (one head per model)")
    names = merged_groups(alignment.structure, partial)
    if heads == "merge" and len(names) == len(alignment.structure):
        return apply_alignment(models, alignment)
    return build_multihead(models, alignment, names, combine="mean" if heads == "merge" else "concat")


def endpoint_alignment(alignment: Alignment, model: int) -> Alignment:
    """Model ``model`` alone, written in ``alignment``'s merged basis: ``M_i = U_iᵀ``, every other ``M_j = 0``.

    Applying it (:func:`~mergelab.structure.alignment.apply_alignment` or :func:`build_merged`) gives the endpoint as
    a point of the merged parameter space. For a permutation alignment that is exactly the model, permuted (same
    function; :func:`align_to` is the fast route for the plain architecture); for a zip it sums the model's units
    that share a merged unit, an approximation.

    Args:
        alignment: the reference alignment.
        model: index of the endpoint.

    Returns:
        A new :class:`~mergelab.structure.alignment.Alignment` with one-hot coefficients.
    """
    n = alignment.num_models
    if not 0 <= model < n:
        raise ValueError(f"endpoint_alignment: model {model} out of range for {n} models")
    merges = {}
    for g in alignment.structure:
        us = alignment.unmerges[g.name]
        merges[g.name] = tuple(
            us[i].T.contiguous() if i == model else torch.zeros(us[i].shape[1], us[i].shape[0])
            for i in range(n)
        )
    coefs = tuple(1.0 if i == model else 0.0 for i in range(n))
    info = {"method": "endpoint", "model": model}
    return Alignment(alignment.structure, merges, dict(alignment.unmerges), coefs, None, info)


def _correct_statistics(
    merged: nn.Module,
    models: Sequence[nn.Module],
    alignment: Alignment,
    repair: RepairKind | None,
    data: Iterable | None,
    max_batches: int | None,
    op: str,
) -> nn.Module:
    """``repair="reset"``: BatchNorm statistics recomputed; ``"repair"``: REPAIR towards the aligned endpoints."""
    if repair is None:
        return merged
    assert data is not None
    if repair == "reset":
        return reset_batchnorm(merged, data, max_batches=max_batches)
    if alignment.perms is None:
        raise ValueError(
            f"{op}: repair='repair' needs a permutation alignment (endpoints in the merged basis); "
            "use repair='reset' for zips"
        )
    endpoints = [to_basis(m, alignment.structure, p) for m, p in zip(models, alignment.perms, strict=True)]
    return repair_stats(merged, endpoints, data, alignment.coefficients, max_batches=max_batches)


def _check_options(
    ctx: MatchContext, heads: str, partial: object, repair: str | None, data: Iterable | None, op: str
) -> None:
    if heads not in ("merge", "concat"):
        raise ValueError(
            f"{op}: heads={heads!r}; choose 'merge' (average heads) or 'concat' (one head per model)"
        )
    if repair not in (None, "reset", "repair"):
        raise ValueError(f"{op}: repair={repair!r}; choose None, 'reset' or 'repair'")
    if repair is not None and data is None:
        raise ValueError(f"{op}: repair={repair!r} needs data= to measure statistics on")
    if repair == "repair" and (heads != "merge" or partial is not None):
        raise ValueError(
            f"{op}: repair='repair' corrects the plain merged model; use heads='merge', partial=None"
        )
    if heads == "merge":
        sds = [m.state_dict() for m in ctx.models]
        for k in sorted(head_params(ctx.structure, ctx.models[0])):
            if len({tuple(sd[k].shape) for sd in sds}) > 1:
                raise ValueError(
                    f"{op}: heads='merge' averages heads, but {k!r} differs in shape; use heads='concat'"
                )


# --------------------------------------------------------------------------------------------------- the path


def _context(
    models: Sequence[nn.Module],
    data: Iterable | None,
    context: MatchContext | None,
    structure: Structure | None,
    example_input: Tensor | None,
    max_batches: int | None,
    op: str,
) -> MatchContext:
    if context is None:
        return match_context(
            models, data, structure=structure, example_input=example_input, max_batches=max_batches, op=op
        )
    context.check_models(models, op)
    return context


def merge_aligned(
    models: Sequence[nn.Module],
    *,
    solver: str,
    data: Iterable | None = None,
    context: MatchContext | None = None,
    heads: Heads = "merge",
    partial: int | str | None = None,
    repair: RepairKind | None = None,
    coefficients: Sequence[float] | None = None,
    select: Candidates | None = None,
    selection_data: Iterable | None = None,
    tasks: Sequence[Sequence[int]] | None = None,
    structure: Structure | None = None,
    example_input: Tensor | None = None,
    max_batches: int | None = None,
    op: str | None = None,
    **solver_options: Any,
) -> MergeResult:
    """Merge ``models`` in the shared basis a solver finds: the one path of every aligned method.

    Args:
        models: two or more models of one architecture (with ``heads="concat"`` their heads may differ).
        solver: a name of :data:`~mergelab.match.registry.SOLVERS` (``weight``, ``activation``, ``zip``, ``dual``,
            ``identity``, …).
        data: batches ``x`` or ``(x, y)``: statistics for data-driven solvers, ``repair``, and tracing (default:
            the context's data).
        context: a :func:`~mergelab.match.context.match_context` of exactly ``models`` (structure and statistics
            reused); built here when omitted.
        heads: ``"merge"`` (average the heads) or ``"concat"`` (one head per model).
        partial: merge only the first groups (an int, or a group / module name): partial zipping.
        repair: ``None``, ``"reset"`` (BatchNorm statistics) or ``"repair"`` (REPAIR; permutations only).
        coefficients: averaging weights (uniform by default).
        select: candidate solver options to choose from on held-out labelled data — ``{"alpha": [0.1, 0.5]}``
            (every combination of the listed values) or a list of option dicts; the most accurate merged model
            wins, ties to the first candidate.
        selection_data: labelled batches ``(x, y)`` for ``select`` (default ``data``).
        tasks: class groups (global ids) for ``select`` with concatenated heads: scored by joint accuracy.
        structure, example_input, max_batches: for the context when it is built here.
        op: the operation named in errors (default ``merge_aligned(<solver>)``).
        **solver_options: the solver's own options (e.g. ``alpha``, ``merge_many``, ``seed``).

    Returns:
        A :class:`~mergelab.merge.registry.MergeResult`: the model, the solver's ``info`` plus ``heads``,
        ``partial``, ``repair``, ``seconds`` per step (and ``selection`` with ``select``), and the alignment.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> a, b = (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(2))
        >>> res = merge_aligned([a, b], solver="weight", example_input=torch.zeros(2, 4))
        >>> res.info["solver"], type(res.model).__name__
        ('weight', 'Sequential')
    """
    op = op or f"merge_aligned({solver})"
    models = list(models)
    entry = get_solver(solver)
    t0 = time.perf_counter()
    ctx = _context(models, data, context, structure, example_input, max_batches, op)
    data = ctx.data if data is None else data
    _check_options(ctx, heads, partial, repair, data, op)
    t1 = time.perf_counter()
    if coefficients is not None:
        solver_options["coefficients"] = coefficients
    selection: list[dict[str, Any]] = []
    if select is not None:

        def build(al: Alignment) -> nn.Module:
            return build_merged(models, al, heads=heads, partial=partial)

        held = selection_data if selection_data is not None else data
        if held is None:
            raise ValueError(
                f"{op}: select= needs labelled selection_data= (or data=) to score candidates on"
            )
        alignment, selection = select_options(
            lambda opts: entry(ctx, **solver_options, **opts), build, select, held, tasks=tasks, op=op
        )
    else:
        alignment = entry(ctx, **solver_options)
    t2 = time.perf_counter()
    merged = build_merged(models, alignment, heads=heads, partial=partial)
    t3 = time.perf_counter()
    merged = _correct_statistics(merged, models, alignment, repair, data, ctx.max_batches, op)
    t4 = time.perf_counter()
    info: dict[str, Any] = {
        **alignment.info,
        "heads": heads,
        "partial": partial,
        "repair": repair,
        "fixed": [
            {"name": f.name, "units": f.size, "reason": f.reason} for f in ctx.structure.fixed if f.hidden
        ],
        "seconds": {"context": t1 - t0, "solve": t2 - t1, "build": t3 - t2, "repair": t4 - t3},
    }
    if select is not None:
        info["selection"] = selection
    return MergeResult(merged, info, alignment)


def align(
    models: Sequence[nn.Module],
    method: str = "weight_matching",
    data: Iterable | None = None,
    *,
    context: MatchContext | None = None,
    structure: Structure | None = None,
    example_input: Tensor | None = None,
    max_batches: int | None = None,
    **options: Any,
) -> Alignment:
    """Find the alignment of ``models`` without merging (for interpolation and analyses): the one way to align.

    Args:
        models: two or more models of one architecture.
        method: a solver (``"weight"``, ``"activation"``, ``"zip"``, ``"dual"``, …) or an aligned merge method
            naming one (``"weight_matching"``, ``"activation_matching"``, ``"zipit"``, ``"mudsc"``).
        data: batches ``x`` or ``(x, y)`` (data-driven solvers; tracing).
        context: a :func:`~mergelab.match.context.match_context` of exactly ``models`` (built when omitted).
        structure: the groups (discovered when omitted).
        example_input: input used for tracing (default: a batch of ``data`` or zeros of the model's spec).
        max_batches: limit on batches for activation statistics.
        **options: the solver's options (``coefficients``, ``reference``, ``merge_many``, ``max_iter``, ``seed``…).

    Returns:
        An :class:`~mergelab.structure.alignment.Alignment`; for permutations,
        ``to_basis(models[i], al.structure, al.perms[i])`` brings model ``i`` into the merged basis.
    """
    solver = METHOD_SOLVERS.get(method, method)
    entry = get_solver(solver)
    ctx = _context(models, data, context, structure, example_input, max_batches, f"align({method})")
    return entry(ctx, **options)


def align_to(
    a: nn.Module,
    b: nn.Module,
    *,
    method: str = "weight_matching",
    data: Iterable | None = None,
    context: MatchContext | None = None,
    structure: Structure | None = None,
    example_input: Tensor | None = None,
    max_batches: int | None = None,
    **options: Any,
) -> nn.Module:
    """``b`` re-expressed in ``a``'s unit basis (same function as ``b``), e.g. before interpolating ``a → b``.

    Args:
        a: the reference.
        b: the model to permute.
        method, data, context, structure, example_input, max_batches: as in :func:`align` (a permutation solver).
        **options: the solver's options (``max_iter``, ``seed``, …).

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
        context=context,
        structure=structure,
        example_input=example_input,
        max_batches=max_batches,
        **options,
    )
    if al.perms is None:
        raise ValueError(f"align_to: method {method!r} gave no permutation; use a permutation solver")
    return to_basis(b, al.structure, al.perms[1])


# --------------------------------------------------------------------------------------------------- methods


@register_method("weight_matching", paper=_REBASIN)
def weight_matching(
    models: Sequence[nn.Module],
    *,
    data: Iterable | None = None,
    context: MatchContext | None = None,
    coefficients: Sequence[float] | None = None,
    repair: RepairKind | None = None,
    reference: int = 0,
    merge_many: bool = False,
    heads: Heads = "merge",
    partial: int | str | None = None,
    max_iter: int = 100,
    seed: int = 0,
    tol: float = DEFAULT_TOL,
    lap: LapMethod = "auto",
    start: StartKind = "best",
    example_input: Tensor | None = None,
    structure: Structure | None = None,
) -> MergeResult:
    """Git Re-Basin weight matching: permute every model's units onto the reference's, then average.

    Args:
        models: two or more models of one architecture.
        data: batches ``x`` or ``(x, y)``; only needed for ``repair`` (and to trace, without ``example_input``).
        context: a shared :func:`~mergelab.match.context.match_context` of these models.
        coefficients: averaging weights (uniform by default).
        repair: ``None``, ``"reset"`` (recompute BatchNorm statistics) or ``"repair"`` (REPAIR).
        reference: the model whose basis is kept.
        merge_many: Re-Basin's MergeMany (align each model to the mean of the others, repeatedly).
        heads: ``"merge"`` (average heads) or ``"concat"`` (one head per model).
        partial: merge only the first groups (an int, or a group / module name).
        max_iter: iterations of coordinate descent (and MergeMany rounds).
        seed: seed of the visiting order.
        tol: relative-gain stopping tolerance (0: stop only when an iteration changes nothing).
        lap: LAP solver: ``"auto"``, ``"dense"`` or ``"sparse"``.
        start: where descent starts: ``"best"``, ``"identity"`` or ``"propagate"``.
        example_input: input for structure discovery.
        structure: a hand-written structure, for models discovery cannot handle.

    Returns:
        The merged model and its diagnostics (``objective``, ``iterations`` per model, ...).
    """
    return merge_aligned(
        models, solver="weight", data=data, context=context, heads=heads, partial=partial, repair=repair,
        coefficients=coefficients, structure=structure, example_input=example_input, op="weight_matching",
        reference=reference, merge_many=merge_many, max_iter=max_iter, seed=seed, tol=tol, lap=lap, start=start,
    )  # fmt: skip


@register_method("activation_matching", needs_data=True, paper=_REBASIN)
def activation_matching(
    models: Sequence[nn.Module],
    *,
    data: Iterable | None = None,
    context: MatchContext | None = None,
    coefficients: Sequence[float] | None = None,
    repair: RepairKind | None = None,
    reference: int = 0,
    merge_many: bool = False,
    similarity: SimilarityKind = "correlation",
    heads: Heads = "merge",
    partial: int | str | None = None,
    max_iter: int = 100,
    seed: int = 0,
    max_batches: int | None = None,
    example_input: Tensor | None = None,
    structure: Structure | None = None,
) -> MergeResult:
    """Activation matching: permute units to maximise activation correlation with the reference, then average.

    Args:
        models: two or more models of one architecture.
        data: batches ``x`` or ``(x, y)`` (required).
        context: a shared :func:`~mergelab.match.context.match_context` of these models.
        coefficients: averaging weights (uniform by default).
        repair: ``None``, ``"reset"`` (recompute BatchNorm statistics) or ``"repair"`` (REPAIR).
        reference: the model whose basis is kept.
        merge_many: MergeMany on activations (re-align each model to the mean of the others, repeatedly).
        similarity: ``"correlation"`` or ``"covariance"``.
        heads: ``"merge"`` (average heads) or ``"concat"`` (one head per model).
        partial: merge only the first groups (an int, or a group / module name).
        max_iter: rounds of MergeMany.
        seed: seed of the MergeMany order.
        max_batches: limit on batches for activation statistics.
        example_input: input for structure discovery.
        structure: a hand-written structure, for models discovery cannot handle.

    Returns:
        The merged model and its diagnostics (``matched_similarity`` per group, ...).
    """
    return merge_aligned(
        models, solver="activation", data=data, context=context, heads=heads, partial=partial, repair=repair,
        coefficients=coefficients, structure=structure, example_input=example_input, max_batches=max_batches,
        op="activation_matching", reference=reference, merge_many=merge_many, similarity=similarity,
        max_iter=max_iter, seed=seed,
    )  # fmt: skip
