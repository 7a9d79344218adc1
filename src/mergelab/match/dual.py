"""MuDSC: matching on weight- and activation-space similarity together, and the ``dual`` solver.

**MuDSC** (Xu et al., Training-Free Pretrained Model Merging, CVPR 2024, https://arxiv.org/abs/2403.01753): the
similarity of a group is ``alpha·C_weight + (1 - alpha)·C_activation``. ``C_weight`` is the Pearson correlation
between units' weight vectors — every slice of every tensor the group touches (incoming rows, biases, norms *and*
outgoing columns), with the other groups' axes brought into the merged basis by their current solution (``U_i``, a
0/1 assignment, on both "in" and "out" axes). Starting from activation-only matching, coordinate descent visits the
groups in a random order and re-solves each with the blended similarity until a full pass changes nothing. The
inner solver is ZipIt's zip (``mode="zip"``) or a permutation (``mode="align"``, whose start is activation
matching, :func:`~mergelab.match.activation_matching.match_activations`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mergelab.match.activation_matching import match_activations
from mergelab.match.context import MatchContext, match_context
from mergelab.match.features import FeatureStats
from mergelab.match.group_match import (
    GroupMatch,
    alignment_from_matches,
    group_sizes,
    joint_activation_similarity,
    permutation_tie,
)
from mergelab.match.registry import register_solver
from mergelab.match.similarity import float_parameters, unit_matrix
from mergelab.match.zip import zip_tie
from mergelab.structure.alignment import Alignment
from mergelab.structure.types import Axis, Structure

__all__ = ["dual_similarity", "dual_solver", "mudsc_alignment", "weight_vector_similarity"]

logger = logging.getLogger(__name__)


def weight_vector_similarity(
    structure: Structure,
    params: Sequence[Mapping[str, Tensor]],
    group: str,
    matches: Mapping[str, GroupMatch] | None = None,
    exclude: Iterable[str] = (),
) -> Tensor:
    """MuDSC's weight-space similarity: Pearson correlation of the units' weight vectors, joint over models.

    A unit's vector is the concatenation, over every axis of ``group`` (parameters only, not buffers), of the
    unit's slice — a row it produces (incoming weights, bias, norm scale) or a column it feeds (outgoing
    weights). The tensor's other group axes are first brought into the merged basis with the current
    solution's ``U_i`` (0/1 membership: a merged unit's entry is the sum of its members'; missing groups keep
    their basis), so vectors of different models are comparable entry by entry. Computed in float32.

    Args:
        structure: the groups.
        params: one name → tensor mapping per model (e.g. :func:`~mergelab.match.similarity.float_parameters`).
        group: the group to score.
        matches: current solutions of the other groups (group name → :class:`GroupMatch`).
        exclude: parameter names left out (e.g. classifier heads of models trained on different tasks, whose
            class dimensions do not correspond).

    Returns:
        (N·n × N·n) float64 correlation matrix.
    """
    g = structure[group]
    matches = dict(matches or {})
    skip = set(exclude)
    axes = structure.param_axes
    per_model: list[list[Tensor]] = [[] for _ in params]
    for axis in g.axes:
        if axis.param in skip or axis.param not in params[0]:
            continue
        others = [
            (h, a2)
            for h, a2 in axes[axis.param]
            if not (h.name == g.name and a2 == axis) and h.name in matches
        ]
        for i, p in enumerate(params):
            if axis.param not in p:
                raise ValueError(f"weight similarity: model {i} has no parameter {axis.param!r}")
            w = p[axis.param].float()
            for h, a2 in others:
                m = matches[h.name]
                start = sum(m.sizes[:i])
                w = _sum_members(w, a2, m.clusters[start : start + m.sizes[i]], m.k)
            per_model[i].append(unit_matrix(w, axis, g.size))
    if not per_model[0]:
        raise ValueError(f"weight similarity: group {group!r} touches no (non-excluded) parameter")
    try:
        vecs = torch.cat([torch.cat(v, dim=1) for v in per_model], dim=0)  # (N·n, D)
    except RuntimeError as e:
        shapes = [tuple(torch.cat(v, dim=1).shape) for v in per_model]
        raise ValueError(
            f"weight similarity: group {group!r} unit vectors differ across models {shapes}"
        ) from e
    vecs = vecs - vecs.mean(1, keepdim=True)
    norm = vecs.norm(dim=1, keepdim=True)
    vecs = torch.where(norm > 0, vecs / norm.clamp_min(1e-30), torch.zeros_like(vecs))
    return (vecs @ vecs.T).double().clamp_(-1.0, 1.0)


def _sum_members(w: Tensor, axis: Axis, clusters: Tensor, k: int) -> Tensor:
    """Along ``axis``, replace the group's units by ``k`` merged units, each the sum of its members' slices.

    The same as contracting the axis with ``U_iᵀ`` (0/1 membership) in :func:`transform_tensor`, without a dense
    (k × n) matmul.
    """
    x = w.movedim(axis.dim, 0)
    n = clusters.numel()
    end = axis.start + n * axis.inner
    mid = x[axis.start : end].reshape(n, axis.inner, *x.shape[1:])
    summed = torch.zeros(k, *mid.shape[1:], dtype=w.dtype).index_add_(0, clusters, mid)
    x = torch.cat([x[: axis.start], summed.reshape(k * axis.inner, *x.shape[1:]), x[end:]], dim=0)
    return x.movedim(0, axis.dim)


def dual_similarity(activation: Tensor, weight: Tensor, alpha: float) -> Tensor:
    """MuDSC's blend ``alpha·weight + (1 - alpha)·activation`` (``alpha`` in [0, 1]); exact at the ends."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"dual_similarity: alpha={alpha} must be in [0, 1]")
    if activation.shape != weight.shape:
        raise ValueError(
            f"dual_similarity: activation {tuple(activation.shape)} vs weight {tuple(weight.shape)}"
        )
    if alpha == 0.0:
        return activation.double().clone()
    if alpha == 1.0:
        return weight.double().clone()
    return alpha * weight.double() + (1.0 - alpha) * activation.double()


def mudsc_alignment(
    structure: Structure,
    models: Sequence[nn.Module],
    data: Iterable | None = None,
    *,
    alpha: float = 0.5,
    mode: Literal["zip", "align"] = "zip",
    zip_alpha: float = 0.5,
    zip_beta: float = 1.0,
    coefficients: Sequence[float] | None = None,
    stats: FeatureStats | None = None,
    exclude: Iterable[str] = (),
    max_iter: int = 20,
    patience: int = 2,
    seed: int = 0,
    max_batches: int | None = None,
) -> Alignment:
    """MuDSC: match units on ``alpha·C_weight + (1 - alpha)·C_activation``, by coordinate descent over groups.

    Starts from activation-only matching of every group, then visits the groups (ties) in a random order
    (``seed``), recomputing each one's weight similarity with its neighbours' current solutions and re-solving,
    until a full pass changes no group (``info["converged"]``; that fixed point is returned). The zip's greedy
    choices can make the passes cycle instead; as in MuDSC's reference code, the search then stops once the mean
    merge value has not beaten its best for ``patience`` passes (or after ``max_iter``) and returns the best
    pass, so an oscillation cannot end on a worse state.

    Args:
        structure: the models' groups.
        models: two or more models of one architecture.
        data: batches ``x`` or ``(x, y)`` for the activation similarity.
        alpha: weight of the weight-space similarity, in [0, 1] (0 = activation only, 1 = weight only after the
            activation-based start).
        mode: ``"zip"`` (inner solver ZipIt's zip with ``zip_alpha``/``zip_beta``) or ``"align"`` (permutation).
        zip_alpha, zip_beta: the zip solver's knobs (MuDSC uses 0.5 and 1).
        coefficients: averaging weights λ (uniform by default).
        stats: precomputed activation statistics of ``models``.
        exclude: parameter names left out of the weight similarity (heads of different tasks).
        max_iter: at most this many passes of coordinate descent.
        patience: stop after this many passes without a new best mean merge value.
        seed: seed of the visiting order.
        max_batches: limit on batches streamed.

    Returns:
        An :class:`Alignment`; ``info`` holds ``alpha``, ``passes``, ``converged`` and the value history.
    """
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"mudsc_alignment: need at least 2 models, got {len(models)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mudsc_alignment: alpha={alpha} must be in [0, 1]")
    if mode not in ("zip", "align"):
        raise ValueError(f"mudsc_alignment: mode={mode!r}; choose 'zip' or 'align'")
    if max_iter < 1 or patience < 1:
        raise ValueError(f"mudsc_alignment: max_iter={max_iter} and patience={patience} must be >= 1")
    st = match_context(
        models, data, structure=structure, max_batches=max_batches, stats=stats, op="mudsc_alignment"
    ).stats()
    sizes = group_sizes(structure, len(models))
    act = {g.name: joint_activation_similarity(st, g.name) for g in structure}
    ties = structure.tie_sets()

    def solve(tie: Sequence[str], sims: Mapping[str, Tensor]) -> dict[str, GroupMatch]:
        if mode == "zip":
            return zip_tie(structure, tie, sims, sizes, zip_alpha, zip_beta)
        return permutation_tie(structure, tie, sims, sizes)

    matches: dict[str, GroupMatch] = {}
    if mode == "zip":
        for tie in ties:
            matches.update(solve(tie, act))
    else:  # the start is activation matching itself
        am = match_activations(structure, models, stats=st)
        assert am.perms is not None
        for g in structure:
            perms = [p[g.name] for p in am.perms]
            matches[g.name] = GroupMatch.from_permutations(perms, act[g.name])
    info: dict = {"method": f"mudsc-{mode}", "alpha": alpha, "zip_alpha": zip_alpha, "zip_beta": zip_beta}
    if alpha == 0.0:  # the blend is the activation similarity: the start is already the answer
        info.update({"passes": 0, "converged": True, "values": []})
        return alignment_from_matches(structure, matches, coefficients, info)
    params = [{k: v for k, v in float_parameters(m).items()} for m in models]
    gen = torch.Generator().manual_seed(seed)
    history: list[float] = []
    best = (float("-inf"), dict(matches))
    converged, passes, stale = False, 0, 0
    for it in range(max_iter):
        passes = it + 1
        changed = False
        for ti in torch.randperm(len(ties), generator=gen).tolist():
            tie = ties[ti]
            sims = {
                g: dual_similarity(
                    act[g], weight_vector_similarity(structure, params, g, matches, exclude), alpha
                )
                for g in tie
            }
            new = solve(tie, sims)
            for g, m in new.items():
                if not torch.equal(m.clusters, matches[g].clusters):
                    changed = True
                matches[g] = m
        value = sum(m.value for m in matches.values()) / len(matches)
        history.append(value)
        logger.info(
            "mudsc (%s, alpha=%.2f): pass %d, mean merge value %.5f, changed=%s",
            mode,
            alpha,
            passes,
            value,
            changed,
        )
        if value > best[0]:
            best, stale = (value, dict(matches)), 0
        else:
            stale += 1
        if not changed:
            converged = True
            break
        if stale >= patience:
            break
    if not converged:
        logger.info("mudsc: passes cycle (no change-free pass after %d); keeping the best pass", passes)
        matches = best[1]
    info.update({"passes": passes, "converged": converged, "values": history})
    return alignment_from_matches(structure, matches, coefficients, info)


@register_solver("dual", needs_data=True)
def dual_solver(
    ctx: MatchContext,
    *,
    alpha: float = 0.5,
    mode: Literal["zip", "align"] = "zip",
    zip_alpha: float = 0.5,
    zip_beta: float = 1.0,
    coefficients: Sequence[float] | None = None,
    exclude: Iterable[str] = (),
    max_iter: int = 20,
    patience: int = 2,
    seed: int = 0,
) -> Alignment:
    """MuDSC: match units on a blend of weight- and activation-space similarity, by coordinate descent.

    Args:
        alpha: weight of the weight-space similarity, in [0, 1] (0 = activation only).
        mode: ``"zip"`` (ZipIt's zip inside) or ``"align"`` (permutations).
        zip_alpha: the zip's alpha (MuDSC: 0.5).
        zip_beta: the zip's beta (MuDSC: 1).
        coefficients: averaging weights (uniform by default).
        exclude: parameter names left out of the weight similarity (heads of different tasks).
        max_iter: at most this many passes of coordinate descent over groups.
        patience: stop after this many passes without a better mean merge value (the zip's passes can cycle).
        seed: seed of the visiting order.
    """
    return mudsc_alignment(
        ctx.structure, ctx.models, stats=ctx.stats(), alpha=alpha, mode=mode, zip_alpha=zip_alpha,
        zip_beta=zip_beta, coefficients=coefficients, exclude=exclude, max_iter=max_iter, patience=patience,
        seed=seed,
    )  # fmt: skip
