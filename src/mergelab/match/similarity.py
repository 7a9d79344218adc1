"""Similarity between the units of two models, per group: from activations or from weights.

* Activation similarity: the correlation (or covariance) between model ``a``'s and model ``b``'s units, read from
  :class:`~mergelab.match.features.FeatureStats`.
* Weight similarity (Git Re-Basin weight matching, Ainsworth et al. ICLR 2023): for group ``g``,
  ``S[i, j] = Σ_axes ⟨W_a along the axis at unit i, W_b along the axis at unit j⟩`` where ``W_b`` has the
  *other* axes' current permutations applied. Each axis contributes the unit's whole slice — every other
  dimension, and the ``inner`` entries a unit owns after a flatten; packed parameters contribute only the
  group's slice (``start``). Summing ``S[i, perm[i]]`` over a group's units gives the part of
  ``Σ_params ⟨W_a, π(W_b)⟩`` that depends on that group's permutation, so maximising it group by group is the
  Re-Basin coordinate descent.

Only *parameters* enter the weight similarity: BatchNorm running statistics are buffers describing the data, not
the function's weights, and their products would only add a positive bias to every pair.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from mergelab.match.features import FeatureStats
from mergelab.structure.transform import permute_tensor
from mergelab.structure.types import Axis, Group, Structure

__all__ = [
    "WeightSimilarity",
    "activation_similarity",
    "float_parameters",
    "unit_matrix",
    "weight_objective",
    "weight_similarity",
]

SimilarityKind = Literal["correlation", "covariance"]


def activation_similarity(
    stats: FeatureStats, group: str, a: int = 0, b: int = 1, kind: SimilarityKind = "correlation"
) -> Tensor:
    """(n × n) similarity between model ``a``'s units (rows) and model ``b``'s units (columns).

    Args:
        stats: statistics collected for (at least) models ``a`` and ``b``.
        group: the group name.
        a, b: model indices in ``stats``.
        kind: ``"correlation"`` (scale-free, the Re-Basin / REPAIR choice) or ``"covariance"``.

    Returns:
        A float64 tensor; dead units have correlation 0.
    """
    if kind == "correlation":
        return stats.corr(group, a, b)
    if kind == "covariance":
        return stats.cov(group, a, b)
    raise ValueError(f"activation_similarity: unknown kind {kind!r}; choose 'correlation' or 'covariance'")


def float_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The model's floating-point *parameters* (not buffers) under their ``state_dict`` names, detached."""
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    out = {}
    for k, v in model.state_dict().items():
        if k in names and v.is_floating_point():
            # half precision is matched in float32: CPU matmuls in fp16/bf16 are slow and lose the ordering
            out[k] = v.detach().float() if v.element_size() < 4 else v.detach()
    return out


def unit_matrix(w: Tensor, axis: Axis, n: int) -> Tensor:
    """One row per unit: the unit's ``inner`` entries along ``axis.dim`` and everything along the other dims."""
    x = w.movedim(axis.dim, 0)[axis.start : axis.start + n * axis.inner]
    return x.reshape(n, -1)  # (n, inner * rest)


class WeightSimilarity:
    """Weight-matching similarity of each group, with every per-axis term cached.

    A term ``A_axis @ B_axisᵀ`` depends only on the permutations of the *other* groups on that tensor, so it is
    recomputed only when one of those changed. This makes an iteration of coordinate descent over groups whose
    neighbours did not move almost free.

    Args:
        structure: the groups.
        params_a: the fixed model's parameters (name → tensor), e.g. :func:`float_parameters`.
        params_b: the model to permute; same names and shapes.
    """

    def __init__(self, structure: Structure, params_a: Mapping[str, Tensor], params_b: Mapping[str, Tensor]):
        self.structure = structure
        self.params_a = params_a
        self.params_b = params_b
        for k, v in params_a.items():
            if k not in params_b or params_b[k].shape != v.shape:
                got = tuple(params_b[k].shape) if k in params_b else "missing"
                raise ValueError(f"weight similarity: {k!r} {tuple(v.shape)} in model a vs {got} in model b")
        self.axes = {k: v for k, v in structure.param_axes.items() if k in params_a}
        # key → (other groups' permutations used, term). Only the (n × n) terms are kept: the B rows a term was
        # computed from are rebuilt from those permutations when needed, and A's rows are sliced on demand, so
        # the cache costs O(Σ n²), not two more copies of each model.
        self._terms: dict[tuple[str, int], tuple[list[tuple[Axis, Tensor]], Tensor]] = {}

    def dependencies(self, group: str) -> set[str]:
        """Groups whose permutation changes ``group``'s similarity (they share a tensor with it)."""
        g = self.structure[group]
        deps: set[str] = set()
        for axis in g.axes:
            for h, a2 in self.axes.get(axis.param, []):
                if not (h.name == g.name and a2 == axis):
                    deps.add(h.name)
        return deps

    def __call__(self, group: str, perms: Mapping[str, Tensor]) -> Tensor:
        """(n × n) similarity of ``group`` given the current permutations of model b's other groups."""
        total = self.partial(group, perms)
        if total is None:
            raise ValueError(f"weight similarity: group {group!r} touches no parameter (only buffers?)")
        return total

    def partial(
        self, group: str, perms: Mapping[str, Tensor], known: Collection[str] | None = None
    ) -> Tensor | None:
        """The similarity of ``group`` from only the tensors whose other permuted axes belong to ``known`` groups.

        A term ``A_axis @ B_axisᵀ`` measured against a neighbour whose permutation is still arbitrary (not yet
        solved) is noise, and a LAP fits noise: it finds an assignment that scores high on it. Leaving such terms
        out lets a first sweep propagate what is certain — the model's fixed input/output axes, per-unit
        parameters (biases, norm affines, depthwise kernels) and already solved neighbours — through the
        network. ``known=None`` counts every group as known (the full similarity). Returns ``None`` when no term
        qualifies.
        """
        g = self.structure[group]
        total: Tensor | None = None
        for i, axis in enumerate(g.axes):
            if axis.param not in self.params_a:
                continue
            if known is not None and any(
                h.name not in known
                for h, a2 in self.axes[axis.param]
                if not (h.name == g.name and a2 == axis)
            ):
                continue
            term = self._term(g, i, axis, perms)
            total = term if total is None else total + term
        return total

    def _term(self, g: Group, i: int, axis: Axis, perms: Mapping[str, Tensor]) -> Tensor:
        """``A @ Bᵀ`` for one axis; after a permutation change, only the changed columns are recomputed."""
        key = (g.name, i)
        others = [
            (a2, perms[h.name].clone())  # callers may reuse their tensors
            for h, a2 in self.axes[axis.param]
            if not (h.name == g.name and a2 == axis)
        ]
        cached = self._terms.get(key)
        if cached is not None and all(
            torch.equal(p, q) for (_, p), (_, q) in zip(others, cached[0], strict=True)
        ):
            return cached[1]  # no other permutation on this tensor moved
        w_b = self.params_b[axis.param]
        b_rows = unit_matrix(permute_tensor(w_b, others), axis, g.size)  # (n, R)
        a_rows = unit_matrix(self.params_a[axis.param], axis, g.size).contiguous()  # (n, R); a view on dim 0
        if not others:
            # No other group permutes this tensor (a bias, a norm's affine, the model's fixed input/output side):
            # the term never changes, and recomputing it gives the same bits as a cached copy, whose n² floats
            # would often outweigh the tensor itself.
            return a_rows @ b_rows.T
        if cached is not None:
            used, term = cached
            b_old = unit_matrix(permute_tensor(w_b, used), axis, g.size)  # the rows ``term`` was made from
            changed = (b_rows != b_old).any(0).nonzero().flatten()
            if changed.numel() == 0:
                self._terms[key] = (others, term)
                return term
            if changed.numel() < b_rows.shape[1] // 2:
                # Low-rank update: a permutation that moved few units changes few columns of B.
                delta = b_rows.index_select(1, changed) - b_old.index_select(1, changed)
                term = term + a_rows.index_select(1, changed) @ delta.T
                self._terms[key] = (others, term)
                return term
            del b_old
        term = a_rows @ b_rows.T  # (n, n)
        self._terms[key] = (others, term)
        return term


def weight_similarity(
    structure: Structure,
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    group: str,
    perms: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Git Re-Basin weight-matching similarity of one group (see the module docstring).

    Args:
        structure: the groups.
        params_a: reference parameters (name → tensor); buffers should be left out (:func:`float_parameters`).
        params_b: parameters of the model being aligned.
        group: the group to score.
        perms: current permutations of model b's groups (missing = identity); ``group``'s own is ignored on the
            axis being scored.

    Returns:
        (n × n) tensor; ``S[i, j]`` scores model a's unit ``i`` against model b's unit ``j``.
    """
    return WeightSimilarity(structure, params_a, params_b)(group, dict(perms or {}))


def weight_objective(
    structure: Structure,
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    perms: Mapping[str, Tensor],
) -> float:
    """``Σ_params ⟨W_a, π(W_b)⟩``: the quantity weight matching maximises (float64)."""
    axes = structure.param_axes
    total = 0.0
    for k, wa in params_a.items():
        ops = [(a, perms[g.name]) for g, a in axes.get(k, []) if g.name in perms]
        wb = permute_tensor(params_b[k], ops) if ops else params_b[k]
        total += float((wa * wb).sum(dtype=torch.float64))
    return total
