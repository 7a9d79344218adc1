"""Permutation solvers: linear assignment (plain and block-aware), Git Re-Basin weight and activation matching.

Conventions: a solved permutation ``perm`` of model ``b`` says merged unit ``j`` (= the reference's unit ``j``)
is model ``b``'s unit ``perm[j]``; :class:`~mergelab.merge.alignment.Alignment` stores it as ``M = λ P`` with
``P[j, perm[j]] = 1``.

The *units of coordinate descent* are ties (``Structure.ties``): tied groups must move their blocks identically,
so they are solved together — their block-level scores are summed before the block assignment.

References:
    Ainsworth, Hayase, Srinivasa. Git Re-Basin: Merging Models modulo Permutation Symmetries. ICLR 2023.
    https://arxiv.org/abs/2209.04836 (weight matching, activation matching, MergeMany).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from mergelab.match.features import FeatureStats, collect_features
from mergelab.match.similarity import (
    SimilarityKind,
    WeightSimilarity,
    activation_similarity,
    float_parameters,
    weight_objective,
)
from mergelab.merge.alignment import Alignment, permute_tensor
from mergelab.merge.average import check_same_architecture, normalize_coefficients
from mergelab.structure.types import Structure

__all__ = [
    "match_activations",
    "match_weights",
    "match_weights_many",
    "solve_block_lap",
    "solve_lap",
    "solve_tie",
]

logger = logging.getLogger(__name__)

Perms = dict[str, Tensor]

# A new assignment replaces the current one only if it is better by more than this (relative) margin: float32
# similarity sums carry round-off of about this size, and accepting round-off "improvements" could cycle.
_REL_TOL = 1e-7


def solve_lap(similarity: Tensor) -> Tensor:
    """Maximum-similarity assignment of rows to columns (Hungarian / Jonker-Volgenant via scipy).

    Args:
        similarity: (n × n) scores; ``similarity[i, j]`` = how well row unit ``i`` matches column unit ``j``.

    Returns:
        int64 ``perm`` with ``perm[i]`` = the column matched to row ``i``.

    Example:
        >>> import torch
        >>> solve_lap(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        tensor([1, 0])
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"solve_lap: need a square matrix, got {tuple(similarity.shape)}")
    best = similarity.argmax(1)
    if torch.unique(best).numel() == best.numel() and bool(similarity.max().isfinite()):
        return best.cpu().long()  # every row gets its best column: optimal without solving
    cost = -similarity.detach().cpu().double().numpy()
    if not np.isfinite(cost).all():
        raise ValueError("solve_lap: similarity contains NaN or inf")
    # Subtracting row and column minima changes every assignment's cost by the same constant, so the optimum
    # is unchanged; scipy's solver needs noticeably fewer augmentation steps on the reduced matrix (~25%).
    cost -= cost.min(1, keepdims=True)
    cost -= cost.min(0, keepdims=True)
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def solve_block_lap(similarities: Sequence[Tensor], blocks: int) -> list[Tensor]:
    """Block-aware assignment: blocks go to blocks as wholes, then units inside each matched block pair.

    The score of pairing row block ``a`` with column block ``b`` is the value of the best unit assignment
    inside that pair; with several (tied) groups the scores are summed, so all of them get the same block
    assignment, while each keeps its own within-block assignment.

    Args:
        similarities: one (n_t × n_t) matrix per tied group; every ``n_t`` divisible by ``blocks``.
        blocks: number of blocks.

    Returns:
        One int64 permutation per input matrix (rows → columns), each mapping block ``a`` onto one block.
    """
    if not similarities:
        raise ValueError("solve_block_lap: no similarity matrices")
    if blocks == 1:
        return [solve_lap(s) for s in similarities]
    score = np.zeros((blocks, blocks))
    inner: list[dict[tuple[int, int], np.ndarray]] = []
    for s_t in similarities:
        n = s_t.shape[0]
        if s_t.shape != (n, n) or n % blocks:
            raise ValueError(f"solve_block_lap: {tuple(s_t.shape)} is not square with {blocks} equal blocks")
        bs = n // blocks
        sb = s_t.detach().cpu().double().numpy().reshape(blocks, bs, blocks, bs).transpose(0, 2, 1, 3)
        cols_t: dict[tuple[int, int], np.ndarray] = {}
        if bs == 1:
            score += sb[:, :, 0, 0]
            cols_t = {(a, b): np.zeros(1, dtype=np.int64) for a in range(blocks) for b in range(blocks)}
        else:
            for a in range(blocks):
                for b in range(blocks):
                    r, c = linear_sum_assignment(sb[a, b], maximize=True)
                    score[a, b] += sb[a, b][r, c].sum()
                    cols_t[(a, b)] = c
        inner.append(cols_t)
    _, block_perm = linear_sum_assignment(score, maximize=True)
    out = []
    for s_t, cols_t in zip(similarities, inner, strict=True):
        bs = s_t.shape[0] // blocks
        perm = np.concatenate([block_perm[a] * bs + cols_t[(a, int(block_perm[a]))] for a in range(blocks)])
        out.append(torch.from_numpy(perm.astype(np.int64)))
    return out


def solve_tie(structure: Structure, tie: Sequence[str], similarities: Sequence[Tensor]) -> list[Tensor]:
    """Solve the groups of one tie jointly (plain LAP for a lone free group, block-aware otherwise)."""
    groups = [structure[n] for n in tie]
    if len(groups) == 1 and groups[0].blocks == 1:
        return [solve_lap(similarities[0])]
    return solve_block_lap(similarities, groups[0].blocks)


def _ties(structure: Structure) -> list[tuple[str, ...]]:
    seen: set[str] = set()
    out = []
    for g in structure:
        if g.name not in seen:
            tie = structure.tie_of(g.name)
            seen.update(tie)
            out.append(tie)
    return out


def _value(sims: Sequence[Tensor], perms: Sequence[Tensor]) -> float:
    return float(sum(s[torch.arange(s.shape[0]), p].double().sum() for s, p in zip(sims, perms, strict=True)))


def _identity(structure: Structure) -> Perms:
    return {g.name: torch.arange(g.size) for g in structure}


def _weight_matching(
    structure: Structure,
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    *,
    max_iter: int,
    seed: int,
    init: Mapping[str, Tensor] | None = None,
) -> tuple[Perms, dict]:
    """Coordinate descent of LAPs over ties in random order until an iteration changes nothing."""
    if max_iter < 1:
        raise ValueError(f"weight matching: max_iter must be >= 1, got {max_iter}")
    perms = _identity(structure)
    if init:
        perms.update({k: torch.as_tensor(v, dtype=torch.long).clone() for k, v in init.items()})
    sim = WeightSimilarity(structure, params_a, params_b)
    ties = _ties(structure)
    deps = {t: set().union(*(sim.dependencies(g) for g in t)) for t in ties}
    snapshot: dict[tuple[str, ...], dict[str, Tensor]] = {}
    gen = torch.Generator().manual_seed(seed)
    # The objective changes by exactly the tie's gain when no tensor has two axes in one tie, so it is tracked
    # incrementally (one exact evaluation at each end); otherwise it is recomputed after every iteration.
    incremental = all(
        len([1 for h, _ in sim.axes[k] if structure.tie_of(h.name) == structure.tie_of(g.name)]) == 1
        for k in sim.axes
        for g, _ in sim.axes[k]
    )
    objective = weight_objective(structure, params_a, params_b, perms)
    history = [objective]
    converged = False
    iters = 0
    for it in range(max_iter):
        iters = it + 1
        progress = False
        for ti in torch.randperm(len(ties), generator=gen).tolist():
            tie = ties[ti]
            snap = snapshot.get(tie)
            if snap is not None and all(torch.equal(snap[h], perms[h]) for h in snap):
                continue  # nothing it depends on moved: its assignment is still optimal
            snapshot[tie] = {h: perms[h].clone() for h in deps[tie]}
            sims = [sim(g, perms) for g in tie]
            new = solve_tie(structure, tie, sims)
            old_v, new_v = _value(sims, [perms[g] for g in tie]), _value(sims, new)
            if new_v > old_v + _REL_TOL * max(1.0, abs(old_v)):
                for g, p in zip(tie, new, strict=True):
                    perms[g] = p
                progress = True
                objective += new_v - old_v
        if not incremental:
            objective = weight_objective(structure, params_a, params_b, perms)
        history.append(objective)
        logger.info("weight matching: iteration %d, objective %.6g", iters, history[-1])
        if not progress:
            converged = True
            break
    if not converged:
        logger.warning("weight matching: not converged after max_iter=%d iterations", max_iter)
    if incremental:
        history[-1] = weight_objective(structure, params_a, params_b, perms)
    info = {"objective": history, "iterations": iters, "converged": converged}
    return perms, info


def match_weights(
    structure: Structure,
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    max_iter: int = 100,
    seed: int = 0,
    coefficients: Sequence[float] | None = None,
    init: Mapping[str, Tensor] | None = None,
) -> Alignment:
    """Git Re-Basin weight matching: permute ``model_b``'s units to maximise ``Σ ⟨W_a, π(W_b)⟩``.

    Coordinate descent: each iteration visits the ties in a random order (``seed``) and solves one LAP per tie
    with every other permutation held fixed; it stops when an iteration improves nothing. The objective after
    each iteration is kept in ``info["objective"]``.

    Args:
        structure: the models' groups.
        model_a: the reference (its basis is the merged basis; its permutation is the identity).
        model_b: the model to align.
        max_iter: at most this many passes over the groups.
        seed: seed of the visiting order.
        coefficients: averaging weights of (a, b) stored in the alignment (default 0.5/0.5).
        init: starting permutations of ``model_b`` (default identity).

    Returns:
        A permutation :class:`Alignment` of the two models.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mergelab.structure.types import Axis, Group, Structure
        >>> a = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> s = Structure((Group("0", 3, (Axis("0.weight", 0, "out"), Axis("0.bias", 0, "out"),
        ...                                Axis("2.weight", 1, "in"))),))
        >>> match_weights(s, a, a).perms[1]["0"]
        tensor([0, 1, 2])
    """
    check_same_architecture([model_a, model_b], "match_weights")
    perms, info = _weight_matching(
        structure,
        float_parameters(model_a),
        float_parameters(model_b),
        max_iter=max_iter,
        seed=seed,
        init=init,
    )
    info = {"method": "weight_matching", **info}
    return Alignment.from_permutations(structure, [{}, perms], coefficients, info)


def _permuted_params(structure: Structure, params: Mapping[str, Tensor], perms: Mapping[str, Tensor]) -> dict:
    axes: dict[str, list] = {}
    for g in structure:
        for a in g.axes:
            axes.setdefault(a.param, []).append((a, perms[g.name]))
    return {k: permute_tensor(v, axes[k]) if k in axes else v for k, v in params.items()}


def match_weights_many(
    structure: Structure,
    models: Sequence[nn.Module],
    *,
    reference: int = 0,
    merge_many: bool = False,
    coefficients: Sequence[float] | None = None,
    max_iter: int = 100,
    seed: int = 0,
) -> Alignment:
    """Weight matching for N ≥ 2 models: each to a reference, or Re-Basin's MergeMany.

    Args:
        structure: the models' groups.
        models: the models.
        reference: with ``merge_many=False``, every model is matched to this one (whose basis is kept).
        merge_many: repeatedly match each model (random order) to the weighted mean of the others, already in
            the shared basis, until a full round changes no permutation (or ``max_iter`` rounds).
        coefficients: averaging weights (uniform by default).
        max_iter: passes of each inner weight matching, and rounds of MergeMany.
        seed: seed of all visiting orders.

    Returns:
        A permutation :class:`Alignment` of all models.
    """
    models = list(models)
    n = len(models)
    if n < 2:
        raise ValueError(f"match_weights_many: need at least 2 models, got {n}")
    if not 0 <= reference < n:
        raise ValueError(f"match_weights_many: reference={reference} out of range for {n} models")
    check_same_architecture(models, "match_weights_many")
    coefs = normalize_coefficients(coefficients, n, "match_weights_many")
    params = [float_parameters(m) for m in models]
    perms: list[Perms] = [_identity(structure) for _ in models]
    infos: list[dict] = [{} for _ in models]
    for i in range(n):
        if i != reference:
            perms[i], infos[i] = _weight_matching(
                structure, params[reference], params[i], max_iter=max_iter, seed=seed
            )
    info: dict = {"method": "weight_matching", "reference": reference, "per_model": infos}
    if merge_many:
        gen = torch.Generator().manual_seed(seed)
        rounds, converged = 0, False
        for r in range(max_iter):
            rounds = r + 1
            changed = False
            for i in torch.randperm(n, generator=gen).tolist():
                others = [j for j in range(n) if j != i]
                total = sum(coefs[j] for j in others)
                target = {k: torch.zeros_like(v) for k, v in params[i].items()}
                for j in others:
                    pj = _permuted_params(structure, params[j], perms[j])
                    for k in target:
                        target[k] += (coefs[j] / total) * pj[k]
                new, _ = _weight_matching(
                    structure, target, params[i], max_iter=max_iter, seed=seed + r, init=perms[i]
                )
                if any(not torch.equal(new[g], perms[i][g]) for g in new):
                    changed = True
                perms[i] = new
            logger.info("merge many: round %d, changed=%s", rounds, changed)
            if not changed:
                converged = True
                break
        info.update({"merge_many": True, "rounds": rounds, "converged": converged})
    return Alignment.from_permutations(structure, perms, coefs, info)


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
    models = list(models)
    n = len(models)
    if n < 2:
        raise ValueError(f"match_activations: need at least 2 models, got {n}")
    if not 0 <= reference < n:
        raise ValueError(f"match_activations: reference={reference} out of range for {n} models")
    check_same_architecture(models, "match_activations")
    coefs = normalize_coefficients(coefficients, n, "match_activations")
    if stats is None:
        if data is None:
            raise ValueError("match_activations: needs data= (a loader yielding x or (x, y)) or stats=")
        stats = collect_features(models, structure, data, max_batches=max_batches)
    elif stats.num_models != n:
        raise ValueError(f"match_activations: stats were collected for {stats.num_models} models, got {n}")

    perms: list[Perms] = [_identity(structure) for _ in models]
    ties = _ties(structure)
    for tie in ties:
        for i in range(n):
            if i == reference:
                continue
            sims = [activation_similarity(stats, g, reference, i, similarity) for g in tie]
            for g, p in zip(tie, solve_tie(structure, tie, sims), strict=True):
                perms[i][g] = p
    info: dict = {"method": "activation_matching", "similarity": similarity, "reference": reference}
    if merge_many:
        gen = torch.Generator().manual_seed(seed)
        rounds, converged = 0, False
        for r in range(max_iter):
            rounds = r + 1
            changed = False
            for i in torch.randperm(n, generator=gen).tolist():
                weights = {
                    j: coefs[j] / sum(coefs[k] for k in range(n) if k != i) for j in range(n) if j != i
                }
                for tie in ties:
                    sims = [
                        _mean_similarity(stats, g, i, [perms[j][g] for j in range(n)], weights, similarity)
                        for g in tie
                    ]
                    new = solve_tie(structure, tie, sims)
                    old_v, new_v = _value(sims, [perms[i][g] for g in tie]), _value(sims, new)
                    if new_v > old_v + _REL_TOL * max(1.0, abs(old_v)):
                        for g, p in zip(tie, new, strict=True):
                            perms[i][g] = p
                        changed = True
            logger.info("activation merge many: round %d, changed=%s", rounds, changed)
            if not changed:
                converged = True
                break
        info.update({"merge_many": True, "rounds": rounds, "converged": converged})
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
