"""ZipIt!'s many-to-one matching ("zip") of one group's joint similarity, and the ``zip`` solver.

**Zip** (Stoica et al., ZipIt!, ICLR 2024, https://arxiv.org/abs/2305.03053): repeatedly merge the most similar
pair of features — across models *or within one model* — until ``k`` merged features remain. A merged feature's
similarity to every other is the minimum over its two parts times ``alpha``, so ``alpha`` says how readily an
already merged feature merges again; with ``alpha <= 0`` a merged feature never merges with anything that shares a
model with it. ``beta`` is a budget: each model may take part in at most ``floor(beta · (O - k) / N)`` merges that
put two of its units into one feature. Differences from the reference code (``matching_functions.py``), chosen so
the knobs mean what they say: ``beta = 0`` allows *no* within-model merge (the reference lets one through before
its budget check), and "within-model" means the two merged features share a model (the reference compares the
models of their lowest-index units).

Matches are :class:`~mergelab.match.group_match.GroupMatch` es on the joint matrix of all models' units (see
:mod:`mergelab.match.group_match`). Groups with ``blocks > 1`` (attention heads) are matched block-wise: blocks
are assigned to the reference's blocks as wholes (tied groups share that assignment), then units are zipped inside
each matched set of blocks, so every merged head is made of matched heads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from mergelab.match.activation_matching import match_activations
from mergelab.match.context import MatchContext, match_context
from mergelab.match.features import FeatureStats
from mergelab.match.group_match import (
    GroupMatch,
    alignment_from_matches,
    check_similarity,
    cross_block,
    group_sizes,
    joint_activation_similarity,
    offsets,
)
from mergelab.match.lap import solve_block_lap
from mergelab.match.registry import register_solver
from mergelab.structure.alignment import Alignment
from mergelab.structure.types import Structure

__all__ = ["zip_alignment", "zip_match", "zip_solver", "zip_tie"]

logger = logging.getLogger(__name__)


def _owners(sizes: Sequence[int]) -> Tensor:
    return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])


def _greedy_zip(
    sim: Tensor, owner: Tensor, n_models: int, k: int, alpha: float, beta: float
) -> tuple[Tensor, float]:
    """The greedy merge on one joint matrix; returns (clusters numbered by smallest member, mean merge value).

    Clusters are kept in place: cluster ``r`` lives in row/column ``r`` (its smallest member), a merged-away
    cluster's row and column are disabled. Per-row maxima are cached and only recomputed for rows whose best
    column changed, so a merge costs O(O) instead of a full O(O²) arg-max. NumPy, not torch: the loop makes
    thousands of tiny operations, where torch's per-call overhead dominates.
    """
    o = sim.shape[0]
    val = sim.numpy().astype(np.float64, copy=True)  # linkage values between live clusters
    own = owner.numpy()
    members = np.zeros((o, n_models), dtype=np.int64)  # members[c, m] = units of model m in cluster c
    members[np.arange(o), own] = 1
    alive = np.ones(o, dtype=bool)
    parent = np.arange(o)
    budget = np.full(n_models, int(beta * (o - k) / n_models + 1e-9), dtype=np.int64)
    allowed = ~np.eye(o, dtype=bool)

    def forbid_within(m: int) -> None:
        rows = members[:, m] > 0
        allowed[np.ix_(rows, rows)] = False

    def row_maxima(rows: np.ndarray | slice) -> tuple[np.ndarray, np.ndarray]:
        sub = np.where(allowed[rows], val[rows], -np.inf)
        arg = sub.argmax(1)
        return sub[np.arange(len(arg)), arg], arg

    for m in range(n_models):
        if budget[m] <= 0:
            forbid_within(m)
    row_max, row_arg = row_maxima(slice(None))
    values: list[float] = []
    for _ in range(o - k):
        best = int(row_max.argmax())
        v = float(row_max[best])
        if v == -np.inf:
            # Every remaining pair is forbidden by alpha/beta: lift the constraints rather than fail, and say so.
            logger.warning(
                "zip: alpha/beta forbid every remaining merge; merging the most similar pair anyway"
            )
            allowed = alive[:, None] & alive[None, :] & ~np.eye(o, dtype=bool)
            row_max, row_arg = row_maxima(slice(None))
            best = int(row_max.argmax())
            v = float(row_max[best])
        i, j = sorted((best, int(row_arg[best])))
        values.append(v)
        shared = (members[i] > 0) & (members[j] > 0)
        members[i] += members[j]
        members[j] = 0
        alive[j] = False
        parent[j] = i
        # Linkage of the merged feature: the worse of its parts, damped by alpha.
        new = np.minimum(val[i], val[j])
        if alpha > 0:
            new *= alpha
        val[i, :] = new
        val[:, i] = new
        allowed[j, :] = False
        allowed[:, j] = False
        exhausted = []
        if shared.any():
            budget[shared] -= 1
            exhausted = [m for m in np.flatnonzero(shared) if budget[m] <= 0]
        row_i = alive.copy()
        row_i[i] = False
        if alpha <= 0:  # an already merged feature never meets a model it contains again
            row_i &= ~(members[:, members[i] > 0] > 0).any(1)
        dead = np.flatnonzero(budget <= 0)
        if len(dead):
            row_i &= ~((members[:, dead] > 0) & (members[i, dead] > 0)).any(1)
        allowed[i, :] = row_i
        allowed[:, i] = row_i
        if exhausted:
            for m in exhausted:
                forbid_within(int(m))
            row_max, row_arg = row_maxima(slice(None))
            continue
        # Only columns i and j changed in other rows: refresh the cached maxima cheaply.
        col = np.where(allowed[:, i], val[:, i], -np.inf)
        stale = (row_arg == i) | (row_arg == j)
        stale[[i, j]] = True
        better = (col > row_max) & ~stale
        row_max[better] = col[better]
        row_arg[better] = i
        idx = np.flatnonzero(stale)
        row_max[idx], row_arg[idx] = row_maxima(idx)
    # Representatives are the smallest member and parents always point down: one pass resolves them.
    for x in range(o):
        parent[x] = parent[parent[x]]
    reps = np.unique(parent)
    ids = np.empty(o, dtype=np.int64)
    ids[reps] = np.arange(len(reps))
    mean = sum(values) / len(values) if values else 0.0
    return torch.from_numpy(ids[parent]), mean


def _check_zip_args(alpha: float, beta: float, k: int, o: int, n_models: int, op: str) -> None:
    if beta < 0.0:
        raise ValueError(f"{op}: beta={beta} must be >= 0")
    if alpha > 1.0:
        raise ValueError(f"{op}: alpha={alpha} must be <= 1 (a merged feature never gets more similar)")
    if not 1 <= k <= o:
        raise ValueError(f"{op}: k={k} merged units is not in [1, {o}]")
    if n_models < 1:
        raise ValueError(f"{op}: no models")


def zip_match(
    similarity: Tensor,
    sizes: Sequence[int],
    *,
    alpha: float = 0.5,
    beta: float = 1.0,
    k: int | None = None,
    blocks: int = 1,
) -> GroupMatch:
    """ZipIt!'s greedy matching of one group's joint similarity (see the module docstring).

    Args:
        similarity: (O × O) joint similarity of all models' units (within-model blocks included), O = Σ sizes.
        sizes: units of each model, in the order of the joint matrix.
        alpha: how readily an already merged feature merges again (its similarities are damped by ``alpha``);
            ``<= 0`` forbids a merged feature from merging with anything sharing a model with it.
        beta: budget of within-model merges, as a fraction of ``(O - k) / N`` per model; 0 forbids them.
        k: merged width (default: ``sizes[0]``, so the merged model has the original architecture).
        blocks: units come in this many equal blocks (attention heads) that must stay together; blocks are first
            assigned to the reference's (model 0) blocks, then units are zipped inside each matched set.

    Returns:
        A :class:`GroupMatch`.

    Example:
        >>> import torch
        >>> c = torch.tensor([[1.0, 0.1, 0.9, 0.0], [0.1, 1.0, 0.0, 0.8], [0.9, 0.0, 1.0, 0.2], [0.0, 0.8, 0.2, 1.0]])
        >>> zip_match(c, [2, 2], alpha=0.0, beta=0.0).clusters
        tensor([0, 1, 0, 1])
    """
    sizes = tuple(int(n) for n in sizes)
    s = check_similarity(similarity, sizes, "zip_match")
    k = sizes[0] if k is None else int(k)
    _check_zip_args(alpha, beta, k, sum(sizes), len(sizes), "zip_match")
    if blocks > 1:
        return _blockwise(
            s, sizes, blocks, k, lambda sub, sz, kk: zip_match(sub, sz, alpha=alpha, beta=beta, k=kk)
        )
    clusters, value = _greedy_zip(s, _owners(sizes), len(sizes), k, alpha, beta)
    return GroupMatch(clusters, sizes, k, value)


def _block_assignment(sims: Sequence[Tensor], sizes: Sequence[int], blocks: int) -> list[list[int]]:
    """For every model, the block matched to each reference block (``out[i][a]``), shared by tied groups."""
    n_models = len(sizes)
    out = [list(range(blocks))]
    for i in range(1, n_models):
        crosses = []
        for s in sims:
            n = s.shape[0] // n_models
            crosses.append(cross_block(s, [n] * n_models, 0, i))
        perms = solve_block_lap(crosses, blocks)
        bs = crosses[0].shape[0] // blocks
        out.append([int(perms[0][a * bs]) // bs for a in range(blocks)])
    return out


def _blockwise(
    s: Tensor,
    sizes: tuple[int, ...],
    blocks: int,
    k: int,
    solve: Callable[[Tensor, Sequence[int], int], GroupMatch],
    assignment: list[list[int]] | None = None,
) -> GroupMatch:
    """Assign blocks to the reference's blocks, then run ``solve(sub_similarity, sub_sizes, k_block)`` inside each."""
    if len(set(sizes)) != 1:
        raise ValueError(f"block matching needs equal widths, got {list(sizes)}")
    n = sizes[0]
    if n % blocks or k % blocks:
        raise ValueError(f"block matching: {blocks} blocks do not divide width {n} / merged width {k}")
    bs, kb = n // blocks, k // blocks
    if assignment is None:
        assignment = _block_assignment([s], sizes, blocks)
    off = offsets(sizes)
    clusters = torch.empty(sum(sizes), dtype=torch.long)
    values = []
    for a in range(blocks):
        idx = torch.cat([off[i] + assignment[i][a] * bs + torch.arange(bs) for i in range(len(sizes))])
        sub = solve(s[idx][:, idx], [bs] * len(sizes), kb)
        clusters[idx] = a * kb + sub.clusters
        values.append(sub.value)
    return GroupMatch(clusters, sizes, k, sum(values) / len(values))


def zip_tie(
    structure: Structure,
    tie: Sequence[str],
    similarities: Mapping[str, Tensor],
    sizes: Mapping[str, tuple[int, ...]],
    alpha: float,
    beta: float,
) -> dict[str, GroupMatch]:
    """Zip the groups of one tie: a shared assignment of head blocks, then :func:`zip_match` inside blocks."""
    groups = [structure[g] for g in tie]
    blocks = groups[0].blocks

    def solve_one(s: Tensor, sz: Sequence[int], k: int | None = None) -> GroupMatch:
        return zip_match(s, sz, alpha=alpha, beta=beta, k=k)

    if blocks == 1:
        return {g.name: solve_one(similarities[g.name], sizes[g.name]) for g in groups}
    mats = [check_similarity(similarities[g.name], sizes[g.name], "block matching") for g in groups]
    assignment = _block_assignment(mats, sizes[groups[0].name], blocks)
    return {
        g.name: _blockwise(m, sizes[g.name], blocks, g.size, solve_one, assignment)
        for g, m in zip(groups, mats, strict=True)
    }


def zip_alignment(
    structure: Structure,
    models: Sequence[nn.Module],
    data: Iterable | None = None,
    *,
    solver: Literal["zip", "permute"] = "zip",
    alpha: float = 0.5,
    beta: float = 1.0,
    coefficients: Sequence[float] | None = None,
    stats: FeatureStats | None = None,
    max_batches: int | None = None,
) -> Alignment:
    """ZipIt!: zip every group of ``N`` models on the joint correlation of their activations (all at once).

    Args:
        structure: the models' groups (probes say where units are observed).
        models: two or more models of one architecture (heads may differ in size).
        data: batches ``x`` or ``(x, y)``; with models of different tasks, use data of *all* tasks.
        solver: ``"zip"`` (ZipIt!) or ``"permute"`` (ZipIt's baseline: activation matching to model 0,
            :func:`~mergelab.match.activation_matching.match_activations`).
        alpha, beta: ZipIt's knobs (see :func:`zip_match`).
        coefficients: averaging weights λ (uniform by default).
        stats: precomputed :func:`~mergelab.match.features.collect_features` of ``models``.
        max_batches: limit on batches streamed.

    Returns:
        An :class:`Alignment` whose merged width equals the model width in every group.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mergelab.structure import discover_structure
        >>> a, b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> s = discover_structure(a, torch.zeros(2, 4))
        >>> zip_alignment(s, [a, b], [torch.randn(64, 4)]).width("0")
        8
    """
    if solver not in ("zip", "permute"):
        raise ValueError(f"zip_alignment: unknown solver {solver!r}; choose 'zip' or 'permute'")
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"zip_alignment: need at least 2 models, got {len(models)}")
    ctx = match_context(
        models, data, structure=structure, max_batches=max_batches, stats=stats, op="zip_alignment"
    )
    if solver == "permute":
        return match_activations(structure, models, stats=ctx.stats(), coefficients=coefficients)
    sizes = group_sizes(structure, len(models))
    sims = {g.name: joint_activation_similarity(ctx.stats(), g.name) for g in structure}
    matches: dict[str, GroupMatch] = {}
    for tie in structure.tie_sets():
        matches.update(zip_tie(structure, tie, sims, sizes, alpha, beta))
    info = {
        "method": "zipit",
        "alpha": alpha,
        "beta": beta,
        "merge_value": {g: m.value for g, m in matches.items()},
    }
    logger.info("zip_alignment: mean merge similarity per group %s", info["merge_value"])
    return alignment_from_matches(structure, matches, coefficients, info)


@register_solver("zip", needs_data=True)
def zip_solver(
    ctx: MatchContext,
    *,
    alpha: float = 0.5,
    beta: float = 1.0,
    coefficients: Sequence[float] | None = None,
) -> Alignment:
    """ZipIt!: zip units within and across models on their activation correlation.

    Args:
        alpha: how readily an already merged feature merges again (ZipIt's α; ``<= 0`` never).
        beta: budget of within-model merges (ZipIt's β; 0 forbids them, which with ``alpha=0`` is a permutation).
        coefficients: averaging weights (uniform by default).
    """
    return zip_alignment(
        ctx.structure, ctx.models, stats=ctx.stats(), alpha=alpha, beta=beta, coefficients=coefficients
    )
