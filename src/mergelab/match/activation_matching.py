"""Activation matching (Git Re-Basin): one LAP per tie on the correlation of each model's units to the reference's.

The one implementation of activation matching: the ``activation`` solver, ZipIt's ``"permute"`` baseline and
MuDSC's ``mode="align"`` start all come here.

Reference:
    Ainsworth, Hayase, Srinivasa. Git Re-Basin: Merging Models modulo Permutation Symmetries. ICLR 2023.
    https://arxiv.org/abs/2209.04836 (activation matching, MergeMany).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mergelab.match.context import MatchContext, check_models
from mergelab.match.features import FeatureStats, collect_features
from mergelab.match.lap import IMPROVEMENT_RTOL, Perms, assignment_value, identity_perms, solve_tie
from mergelab.match.registry import register_solver
from mergelab.match.similarity import SimilarityKind, activation_similarity
from mergelab.match.weight_matching import merge_many_rounds
from mergelab.structure.alignment import Alignment
from mergelab.structure.types import Structure

__all__ = ["activation_solver", "match_activations"]

logger = logging.getLogger(__name__)


def _mean_similarity(
    stats: FeatureStats,
    group: str,
    i: int,
    perms: Sequence[Tensor],
    weights: Mapping[int, float],
    kind: SimilarityKind,
) -> Tensor:
    """Similarity of the weighted mean of the other models' aligned units (rows) to model ``i``'s (columns).

    Exact from the joint moments: ``cov(Σ_j w_j x_j[p_j], x_i) = Σ_j w_j C_ji[p_j]`` and
    ``var(Σ_j w_j x_j[p_j]) = Σ_jk w_j w_k C_jk[p_j, p_k]`` on the diagonal.
    """
    cov = sum(w * stats.cov(group, j, i)[perms[j]] for j, w in weights.items())
    if kind == "covariance":
        return cov
    var = sum(
        wj * wk * stats.cov(group, j, k)[perms[j], perms[k]]
        for j, wj in weights.items()
        for k, wk in weights.items()
    )
    std_y = var.clamp_min(0).sqrt()
    std_i = stats.std(group, i)
    denom = torch.outer(std_y, std_i)
    safe = denom > 1e-12 * (denom.max() if denom.numel() else 1)
    return torch.where(safe, cov / torch.where(safe, denom, torch.ones_like(denom)), torch.zeros_like(cov))


def match_activations(
    structure: Structure,
    models: Sequence[nn.Module],
    data: Iterable | None = None,
    *,
    coefficients: Sequence[float] | None = None,
    reference: int = 0,
    merge_many: bool = False,
    similarity: SimilarityKind = "correlation",
    max_batches: int | None = None,
    max_iter: int = 100,
    seed: int = 0,
    stats: FeatureStats | None = None,
) -> Alignment:
    """Activation matching: one LAP per group (tie) on the correlation of each model's units to the reference's.

    Args:
        structure: the models' groups (probes say where units are observed).
        models: two or more models of one architecture.
        data: batches ``x`` or ``(x, y)``; not needed when ``stats`` is given.
        coefficients: averaging weights (uniform by default).
        reference: whose basis is the merged basis.
        merge_many: after aligning to the reference, repeatedly re-align each model (random order) to the
            weighted mean of the others' aligned activations, until a round changes nothing — MergeMany on
            activations, computed exactly from the joint moments.
        similarity: ``"correlation"`` or ``"covariance"``.
        max_batches: limit on batches streamed.
        max_iter: rounds of ``merge_many``.
        seed: seed of the ``merge_many`` order.
        stats: precomputed :func:`~mergelab.match.features.collect_features` of ``models`` (same order).

    Returns:
        A permutation :class:`Alignment`; ``info["matched_similarity"]`` holds, per group, the mean similarity of
        matched units to the reference.
    """
    models, coefs = check_models(models, reference, coefficients, "match_activations")
    n = len(models)
    if stats is None:
        if data is None:
            raise ValueError("match_activations: needs data= (a loader yielding x or (x, y)) or stats=")
        stats = collect_features(models, structure, data, max_batches=max_batches)
    elif stats.num_models != n:
        raise ValueError(f"match_activations: stats were collected for {stats.num_models} models, got {n}")

    perms: list[Perms] = [identity_perms(structure) for _ in models]
    ties = structure.tie_sets()
    for tie in ties:
        for i in range(n):
            if i == reference:
                continue
            sims = [activation_similarity(stats, g, reference, i, similarity) for g in tie]
            for g, p in zip(tie, solve_tie(structure, tie, sims), strict=True):
                perms[i][g] = p
    info: dict = {"method": "activation_matching", "similarity": similarity, "reference": reference}
    if merge_many:

        def rematch(i: int, _round: int) -> bool:
            weights = {j: coefs[j] / sum(coefs[k] for k in range(n) if k != i) for j in range(n) if j != i}
            changed = False
            for tie in ties:
                sims = [
                    _mean_similarity(stats, g, i, [perms[j][g] for j in range(n)], weights, similarity)
                    for g in tie
                ]
                new = solve_tie(structure, tie, sims)
                old_v, new_v = assignment_value(sims, [perms[i][g] for g in tie]), assignment_value(sims, new)
                if new_v > old_v + IMPROVEMENT_RTOL * max(1.0, abs(old_v)):
                    for g, p in zip(tie, new, strict=True):
                        perms[i][g] = p
                    changed = True
            return changed

        info.update(merge_many_rounds(n, max_iter, seed, rematch, "activation matching"))
    matched = {}
    for g in structure:
        vals = [
            float(
                activation_similarity(stats, g.name, reference, i, similarity)[
                    torch.arange(g.size), perms[i][g.name]
                ].mean()
            )
            for i in range(n)
            if i != reference
        ]
        matched[g.name] = sum(vals) / len(vals)
    info["matched_similarity"] = matched
    logger.info("activation matching: mean matched %s per group %s", similarity, matched)
    return Alignment.from_permutations(structure, perms, coefs, info)


@register_solver("activation", needs_data=True)
def activation_solver(
    ctx: MatchContext,
    *,
    coefficients: Sequence[float] | None = None,
    reference: int = 0,
    merge_many: bool = False,
    similarity: SimilarityKind = "correlation",
    max_iter: int = 100,
    seed: int = 0,
) -> Alignment:
    """Activation matching: permute units to maximise activation correlation with the reference.

    Args:
        coefficients: averaging weights (uniform by default).
        reference: the model whose basis is kept.
        merge_many: MergeMany on activations (re-align each model to the mean of the others, repeatedly).
        similarity: ``"correlation"`` or ``"covariance"``.
        max_iter: rounds of ``merge_many``.
        seed: seed of the ``merge_many`` order.
    """
    return match_activations(
        ctx.structure,
        ctx.models,
        stats=ctx.stats(),
        coefficients=coefficients,
        reference=reference,
        merge_many=merge_many,
        similarity=similarity,
        max_iter=max_iter,
        seed=seed,
    )
