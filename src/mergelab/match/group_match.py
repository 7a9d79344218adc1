"""One group's correspondence between N models (:class:`GroupMatch`), and turning matches into an Alignment.

Matchers on *joint* similarity matrices (ZipIt!, MuDSC) work per group on the units of all ``N`` models
concatenated (model 0's ``n_0`` units, then model 1's, …), an ``O × O`` matrix with ``O = Σ n_i`` — within-model
blocks included. A match says which merged unit each joint unit goes to; from it come the merge matrices ``M_i``
(k × n_i) and unmerge matrices ``U_i`` (n_i × k) of the :class:`~mergelab.structure.alignment.Alignment` contract, so
one ``apply`` handles permutations and zips alike:

* ``U_i[u, c] = 1`` when model ``i``'s unit ``u`` is in merged unit ``c`` (the merged feature is read back into
  every unit that went into it);
* ``M_i[c, u] = λ_i U_i[u, c] / Σ_j λ_j |c ∩ model j|`` — merged unit ``c`` is the (λ-weighted) mean of its
  members, so ``Σ_i M_i 1 = 1``. A permutation is the special case of one member per model: ``M_i = λ_i P_i``.

Permutations of a joint matrix (:func:`permutation_match`, :func:`permutation_tie`) are solved by the one tie
solver, :func:`~mergelab.match.lap.solve_tie`, on the blocks between the reference and each model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mergelab.match.features import FeatureStats
from mergelab.match.lap import solve_block_lap, solve_lap, solve_tie
from mergelab.structure.alignment import Alignment
from mergelab.structure.checks import normalize_coefficients
from mergelab.structure.types import Structure

__all__ = [
    "GroupMatch",
    "alignment_from_matches",
    "group_sizes",
    "joint_activation_similarity",
    "permutation_match",
    "permutation_tie",
]


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

    @classmethod
    def from_permutations(
        cls, perms: Sequence[Tensor], similarity: Tensor | None = None, reference: int = 0
    ) -> GroupMatch:
        """The match of one permutation per model (``perms[i][j]`` = model ``i``'s unit in merged unit ``j``);
        ``value`` is the mean joint ``similarity`` of the matched pairs to the reference (0 without one)."""
        sizes = tuple(int(p.numel()) for p in perms)
        off = offsets(sizes)
        clusters = torch.empty(sum(sizes), dtype=torch.long)
        vals = []
        for i, p in enumerate(perms):
            n = sizes[i]
            clusters[off[i] + p] = torch.arange(n)
            if similarity is not None and i != reference:
                vals.append(float(cross_block(similarity, sizes, reference, i)[torch.arange(n), p].mean()))
        return cls(clusters, sizes, sizes[reference], sum(vals) / len(vals) if vals else 0.0)

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


def check_similarity(similarity: Tensor, sizes: Sequence[int], op: str) -> Tensor:
    o = sum(sizes)
    if similarity.dim() != 2 or similarity.shape != (o, o):
        raise ValueError(
            f"{op}: similarity {tuple(similarity.shape)} is not ({o} × {o}) for model sizes {list(sizes)}"
        )
    s = similarity.detach().double().cpu()
    if torch.isnan(s).any():
        raise ValueError(f"{op}: similarity contains NaN")
    return s


def offsets(sizes: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for n in sizes:
        out.append(acc)
        acc += n
    return out


def cross_block(s: Tensor, sizes: Sequence[int], a: int, b: int) -> Tensor:
    off = offsets(sizes)
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
    s = check_similarity(similarity, sizes, "permutation_match")
    if len(set(sizes)) != 1:
        raise ValueError(f"permutation_match: models have different widths {list(sizes)}")
    if not 0 <= reference < len(sizes):
        raise ValueError(f"permutation_match: reference={reference} out of range for {len(sizes)} models")
    perms = []
    for i in range(len(sizes)):
        cross = cross_block(s, sizes, reference, i)
        # the reference's unit j is matched to model i's unit perm[j]
        if i == reference:
            perms.append(torch.arange(sizes[i]))
        else:
            perms.append(solve_block_lap([cross], blocks)[0] if blocks > 1 else solve_lap(cross))
    return GroupMatch.from_permutations(perms, s, reference)


def permutation_tie(
    structure: Structure,
    tie: Sequence[str],
    similarities: Mapping[str, Tensor],
    sizes: Mapping[str, Sequence[int]],
    reference: int = 0,
) -> dict[str, GroupMatch]:
    """Permute every model's units onto the reference's, for the groups of one tie together (shared head blocks).

    Args:
        structure: the groups.
        tie: the tied group names.
        similarities: group → (O × O) joint similarity; only the reference-to-model blocks are used.
        sizes: group → units of each model (all equal).
        reference: whose units define the merged basis.

    Returns:
        group → :class:`GroupMatch` (a permutation).
    """
    first = tuple(sizes[tie[0]])
    sims = {g: check_similarity(similarities[g], sizes[g], "permutation_tie") for g in tie}
    perms: dict[str, list[Tensor]] = {g: [] for g in tie}
    for i in range(len(first)):
        if i == reference:
            for g in tie:
                perms[g].append(torch.arange(structure[g].size))
            continue
        crosses = [cross_block(sims[g], sizes[g], reference, i) for g in tie]
        for g, p in zip(tie, solve_tie(structure, tie, crosses), strict=True):
            perms[g].append(p)
    return {g: GroupMatch.from_permutations(perms[g], sims[g], reference) for g in tie}


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


def group_sizes(structure: Structure, n_models: int) -> dict[str, tuple[int, ...]]:
    return {g.name: (g.size,) * n_models for g in structure}
