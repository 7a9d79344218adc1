"""ZipIt!'s many-to-one matching ("zip"), permutation matching, and MuDSC's dual-space search — as M/U matrices.

All solvers work on one group's *joint* similarity matrix: the units of all ``N`` models concatenated (model 0's
``n_0`` units, then model 1's, …), an ``O × O`` matrix with ``O = Σ n_i`` — within-model blocks included. A solver
returns a :class:`GroupMatch`: which merged unit each joint unit goes to. From it come the merge matrices
``M_i`` (k × n_i) and unmerge matrices ``U_i`` (n_i × k) of the :class:`~mergelab.structure.alignment.Alignment`
contract, so one ``apply`` handles permutations and zips alike:

* ``U_i[u, c] = 1`` when model ``i``'s unit ``u`` is in merged unit ``c`` (the merged feature is read back into
  every unit that went into it);
* ``M_i[c, u] = λ_i U_i[u, c] / Σ_j λ_j |c ∩ model j|`` — merged unit ``c`` is the (λ-weighted) mean of its
  members, so ``Σ_i M_i 1 = 1``. A permutation is the special case of one member per model: ``M_i = λ_i P_i``.

**Zip** (Stoica et al., ZipIt!, ICLR 2024, https://arxiv.org/abs/2305.03053): repeatedly merge the most similar
pair of features — across models *or within one model* — until ``k`` merged features remain. A merged feature's
similarity to every other is the minimum over its two parts times ``alpha``, so ``alpha`` says how readily an
already merged feature merges again; with ``alpha <= 0`` a merged feature never merges with anything that shares a
model with it. ``beta`` is a budget: each model may take part in at most ``floor(beta · (O - k) / N)`` merges that
put two of its units into one feature. Differences from the reference code (``matching_functions.py``), chosen so
the knobs mean what they say: ``beta = 0`` allows *no* within-model merge (the reference lets one through before
its budget check), and "within-model" means the two merged features share a model (the reference compares the
models of their lowest-index units).

**Permutation**: one linear assignment of every model's units to the reference's (Git Re-Basin's activation
matching), block-aware for attention heads.

**MuDSC** (Xu et al., CVPR 2024, https://arxiv.org/abs/2403.01753): the similarity of a group is
``alpha·C_weight + (1 - alpha)·C_activation``. ``C_weight`` is the Pearson correlation between units' weight
vectors — every slice of every tensor the group touches (incoming rows, biases, norms *and* outgoing columns),
with the other groups' axes brought into the merged basis by their current solution (``U_i``, a 0/1 assignment,
on both "in" and "out" axes). Starting from activation-only matching, coordinate descent visits the groups in a
random order and re-solves each with the blended similarity until a full pass changes nothing.

Groups with ``blocks > 1`` (attention heads) are matched block-wise: blocks are assigned to the reference's blocks
as wholes (tied groups share that assignment), then units are zipped / permuted inside each matched set of
blocks, so every merged head is made of matched heads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from mergelab.match.features import FeatureStats, collect_features
from mergelab.match.similarity import float_parameters, unit_matrix
from mergelab.match.solvers import solve_block_lap, solve_lap
from mergelab.structure.alignment import Alignment
from mergelab.structure.checks import normalize_coefficients
from mergelab.structure.types import Axis, Structure

__all__ = [
    "GroupMatch",
    "alignment_from_matches",
    "dual_similarity",
    "joint_activation_similarity",
    "mudsc_alignment",
    "permutation_match",
    "weight_vector_similarity",
    "zip_alignment",
    "zip_match",
]

logger = logging.getLogger(__name__)

Solver = Literal["zip", "permute"]


# --------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class GroupMatch:
    """One group's correspondence between ``N`` models.

    Attributes:
        clusters: (O,) int64, the merged unit of every joint unit (model ``i``'s unit ``u`` is entry
            ``sum(sizes[:i]) + u``); values ``0..k-1``, each used at least once.
        sizes: units per model.
        k: number of merged units.
        value: mean similarity of the merges made (zip) or of the matched pairs (permutation) — the quantity
            MuDSC compares between passes.
    """

    clusters: Tensor
    sizes: tuple[int, ...]
    k: int
    value: float

    def unmerges(self) -> tuple[Tensor, ...]:
        """``U_i`` (n_i × k): 1 where model ``i``'s unit goes into the merged unit."""
        out = []
        start = 0
        for n in self.sizes:
            u = torch.zeros(n, self.k)
            u[torch.arange(n), self.clusters[start : start + n]] = 1.0
            out.append(u)
            start += n
        return tuple(out)

    def merges(self, coefficients: Sequence[float] | None = None) -> tuple[Tensor, ...]:
        """``M_i`` (k × n_i): each merged unit is the λ-weighted mean of its members (``Σ_i M_i 1 = 1``)."""
        coefs = normalize_coefficients(coefficients, len(self.sizes), "GroupMatch.merges")
        us = self.unmerges()
        weight = sum(c * u.sum(0) for c, u in zip(coefs, us, strict=True))  # (k,) Σ_j λ_j |c ∩ model j|
        return tuple((c * u / weight).T.contiguous() for c, u in zip(coefs, us, strict=True))

    def permutations(self) -> list[Tensor] | None:
        """Per model, ``perm[j]`` = the unit in merged unit ``j`` — if every merged unit has exactly one member per
        model (a permutation alignment), else ``None``."""
        perms = []
        start = 0
        for n in self.sizes:
            c = self.clusters[start : start + n]
            if n != self.k or not torch.equal(torch.sort(c).values, torch.arange(self.k)):
                return None
            perm = torch.empty(n, dtype=torch.long)
            perm[c] = torch.arange(n)
            perms.append(perm)
            start += n
        return perms


def _owners(sizes: Sequence[int]) -> Tensor:
    return torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])


def _check_similarity(similarity: Tensor, sizes: Sequence[int], op: str) -> Tensor:
    o = sum(sizes)
    if similarity.dim() != 2 or similarity.shape != (o, o):
        raise ValueError(
            f"{op}: similarity {tuple(similarity.shape)} is not ({o} × {o}) for model sizes {list(sizes)}"
        )
    s = similarity.detach().double().cpu()
    if torch.isnan(s).any():
        raise ValueError(f"{op}: similarity contains NaN")
    return s


# --------------------------------------------------------------------------------------------------- zip


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
    s = _check_similarity(similarity, sizes, "zip_match")
    k = sizes[0] if k is None else int(k)
    _check_zip_args(alpha, beta, k, sum(sizes), len(sizes), "zip_match")
    if blocks > 1:
        return _blockwise(
            s, sizes, blocks, k, lambda sub, sz, kk: zip_match(sub, sz, alpha=alpha, beta=beta, k=kk)
        )
    clusters, value = _greedy_zip(s, _owners(sizes), len(sizes), k, alpha, beta)
    return GroupMatch(clusters, sizes, k, value)


# --------------------------------------------------------------------------------------------------- permutation


def _offsets(sizes: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for n in sizes:
        out.append(acc)
        acc += n
    return out


def _cross(s: Tensor, sizes: Sequence[int], a: int, b: int) -> Tensor:
    off = _offsets(sizes)
    return s[off[a] : off[a] + sizes[a], off[b] : off[b] + sizes[b]]


def permutation_match(
    similarity: Tensor, sizes: Sequence[int], *, reference: int = 0, blocks: int = 1
) -> GroupMatch:
    """Match every model's units one-to-one to the reference's (a linear assignment per model), as a GroupMatch.

    Merged unit ``j`` is the reference's unit ``j``; this is activation matching (Git Re-Basin) when the
    similarity is the activation correlation, and ZipIt's "permute" baseline.

    Args:
        similarity: (O × O) joint similarity; only the blocks between the reference and each model are used.
        sizes: units of each model (all equal).
        reference: whose units define the merged basis.
        blocks: attention heads: blocks map onto blocks as wholes.

    Returns:
        A :class:`GroupMatch` whose :meth:`GroupMatch.permutations` is not ``None``.
    """
    sizes = tuple(int(n) for n in sizes)
    s = _check_similarity(similarity, sizes, "permutation_match")
    if len(set(sizes)) != 1:
        raise ValueError(f"permutation_match: models have different widths {list(sizes)}")
    if not 0 <= reference < len(sizes):
        raise ValueError(f"permutation_match: reference={reference} out of range for {len(sizes)} models")
    n = sizes[0]
    clusters = torch.empty(sum(sizes), dtype=torch.long)
    off = _offsets(sizes)
    vals = []
    for i in range(len(sizes)):
        if i == reference:
            clusters[off[i] : off[i] + n] = torch.arange(n)
            continue
        cross = _cross(s, sizes, reference, i)
        # the reference's unit j is matched to model i's unit perm[j]
        perm = solve_block_lap([cross], blocks)[0] if blocks > 1 else solve_lap(cross)
        clusters[off[i] + perm] = torch.arange(n)
        vals.append(float(cross[torch.arange(n), perm].mean()))
    value = sum(vals) / len(vals) if vals else 0.0
    return GroupMatch(clusters, sizes, n, value)


# --------------------------------------------------------------------------------------------------- blocks


def _block_assignment(sims: Sequence[Tensor], sizes: Sequence[int], blocks: int) -> list[list[int]]:
    """For every model, the block matched to each reference block (``out[i][a]``), shared by tied groups."""
    n_models = len(sizes)
    out = [list(range(blocks))]
    for i in range(1, n_models):
        crosses = []
        for s in sims:
            n = s.shape[0] // n_models
            crosses.append(_cross(s, [n] * n_models, 0, i))
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
    off = _offsets(sizes)
    clusters = torch.empty(sum(sizes), dtype=torch.long)
    values = []
    for a in range(blocks):
        idx = torch.cat([off[i] + assignment[i][a] * bs + torch.arange(bs) for i in range(len(sizes))])
        sub = solve(s[idx][:, idx], [bs] * len(sizes), kb)
        clusters[idx] = a * kb + sub.clusters
        values.append(sub.value)
    return GroupMatch(clusters, sizes, k, sum(values) / len(values))


def _solve_tie(
    structure: Structure,
    tie: Sequence[str],
    sims: Mapping[str, Tensor],
    sizes: Mapping[str, tuple[int, ...]],
    solver: Solver,
    alpha: float,
    beta: float,
) -> dict[str, GroupMatch]:
    """Solve the groups of one tie: shared block assignment, then zip / permute per group inside blocks."""
    groups = [structure[g] for g in tie]
    blocks = groups[0].blocks

    if solver not in ("zip", "permute"):
        raise ValueError(f"unknown solver {solver!r}; choose 'zip' or 'permute'")

    def solve_one(s: Tensor, sz: Sequence[int], k: int | None = None) -> GroupMatch:
        if solver == "zip":
            return zip_match(s, sz, alpha=alpha, beta=beta, k=k)
        return permutation_match(s, sz)

    if blocks == 1:
        return {g.name: solve_one(sims[g.name], sizes[g.name]) for g in groups}
    mats = [_check_similarity(sims[g.name], sizes[g.name], "block matching") for g in groups]
    assignment = _block_assignment(mats, sizes[groups[0].name], blocks)
    return {
        g.name: _blockwise(m, sizes[g.name], blocks, g.size, solve_one, assignment)
        for g, m in zip(groups, mats, strict=True)
    }


# --------------------------------------------------------------------------------------------------- alignment


def alignment_from_matches(
    structure: Structure,
    matches: Mapping[str, GroupMatch],
    coefficients: Sequence[float] | None = None,
    info: Mapping[str, object] | None = None,
) -> Alignment:
    """Turn per-group matches into an :class:`Alignment` (a permutation alignment when every match is one).

    Args:
        structure: the groups; every group needs a match.
        matches: group name → :class:`GroupMatch`.
        coefficients: averaging weights λ (uniform by default).
        info: diagnostics stored in the alignment.

    Returns:
        The alignment: ``Alignment.from_permutations`` (fast path) if all matches are permutations.
    """
    missing = [g.name for g in structure if g.name not in matches]
    if missing:
        raise ValueError(f"alignment_from_matches: no match for groups {missing}")
    n_models = {len(m.sizes) for m in matches.values()}
    if len(n_models) != 1:
        raise ValueError(
            f"alignment_from_matches: matches disagree on the number of models {sorted(n_models)}"
        )
    n = n_models.pop()
    coefs = normalize_coefficients(coefficients, n, "alignment_from_matches")
    perms = {g.name: matches[g.name].permutations() for g in structure}
    if all(p is not None for p in perms.values()):
        per_model = [{g: p[i] for g, p in perms.items() if p is not None} for i in range(n)]
        return Alignment.from_permutations(structure, per_model, coefs, info)
    merges = {g.name: matches[g.name].merges(coefs) for g in structure}
    unmerges = {g.name: matches[g.name].unmerges() for g in structure}
    return Alignment(structure, merges, unmerges, tuple(coefs), None, dict(info or {}))


def joint_activation_similarity(stats: FeatureStats, group: str) -> Tensor:
    """The (N·n × N·n) correlation of all models' units of ``group`` (dead units correlate 0)."""
    return stats.corr(group)


def _group_sizes(structure: Structure, n_models: int) -> dict[str, tuple[int, ...]]:
    return {g.name: (g.size,) * n_models for g in structure}


def _stats(
    models: Sequence[nn.Module],
    structure: Structure,
    data: Iterable | None,
    stats: FeatureStats | None,
    max_batches: int | None,
    op: str,
) -> FeatureStats:
    if stats is not None:
        if stats.num_models != len(models):
            raise ValueError(f"{op}: stats were collected for {stats.num_models} models, got {len(models)}")
        return stats
    if data is None:
        raise ValueError(f"{op}: needs data= (a loader yielding x or (x, y)) or stats=")
    return collect_features(models, structure, data, max_batches=max_batches)


def zip_alignment(
    structure: Structure,
    models: Sequence[nn.Module],
    data: Iterable | None = None,
    *,
    solver: Solver = "zip",
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
        solver: ``"zip"`` (ZipIt!) or ``"permute"`` (one-to-one matching to model 0, as M/U).
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
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"zip_alignment: need at least 2 models, got {len(models)}")
    st = _stats(models, structure, data, stats, max_batches, "zip_alignment")
    sizes = _group_sizes(structure, len(models))
    sims = {g.name: joint_activation_similarity(st, g.name) for g in structure}
    matches: dict[str, GroupMatch] = {}
    for tie in structure.tie_sets():
        matches.update(_solve_tie(structure, tie, sims, sizes, solver, alpha, beta))
    info = {
        "method": "zipit" if solver == "zip" else "permute",
        "alpha": alpha,
        "beta": beta,
        "merge_value": {g: m.value for g, m in matches.items()},
    }
    logger.info("zip_alignment (%s): mean merge similarity per group %s", solver, info["merge_value"])
    return alignment_from_matches(structure, matches, coefficients, info)


# --------------------------------------------------------------------------------------------------- MuDSC


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
    solver: Solver = "zip" if mode == "zip" else "permute"
    st = _stats(models, structure, data, stats, max_batches, "mudsc_alignment")
    sizes = _group_sizes(structure, len(models))
    act = {g.name: joint_activation_similarity(st, g.name) for g in structure}
    ties = structure.tie_sets()
    matches: dict[str, GroupMatch] = {}
    for tie in ties:
        matches.update(_solve_tie(structure, tie, act, sizes, solver, zip_alpha, zip_beta))
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
            new = _solve_tie(structure, tie, sims, sizes, solver, zip_alpha, zip_beta)
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
