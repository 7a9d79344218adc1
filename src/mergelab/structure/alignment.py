"""Alignments: per-group merge/unmerge matrices, and building a merged model from them.

An :class:`Alignment` says, for every group of a :class:`~mergelab.structure.types.Structure` and every model
``i``, how model ``i``'s ``n_i`` units map onto ``k`` merged units:

* a merge matrix ``M_i`` (k × n_i) acts on every ``"out"`` axis (rows a layer produces, biases, norms);
* an unmerge matrix ``U_i`` (n_i × k) acts, transposed, on every ``"in"`` axis (columns a layer reads).

The merged tensor is ``Σ_i T_i(W_i)``, where ``T_i`` contracts the unit index of each of ``W``'s group axes with
``M_i`` (out) or ``U_iᵀ`` (in), honouring ``Axis.inner`` (a unit owns ``inner`` consecutive entries) and
``Axis.start`` (packed parameters). The ``M_i`` of one group carry the averaging weights: ``Σ_i M_i·1 = 1``. A
permutation average is ``M_i = λ_i P_i`` and ``U_i = P_iᵀ``, where ``P_i[j, perm_i[j]] = 1`` — merged unit ``j``
is model ``i``'s unit ``perm_i[j]``. Tensors with no ``"out"`` axis (the classifier weight, whose outputs are the
fixed classes, or tensors in no group) are ``Σ_i λ_i T_i(W_i)`` with the coefficients ``λ``. If a tensor has
``"out"`` axes of several groups, the first (in structure order) uses ``M_i`` and the others ``U_iᵀ``, so the
weights are applied once. Integer buffers (BatchNorm's ``num_batches_tracked``) come from model 0.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.structure.build import check_structure
from mergelab.structure.checks import check_same_architecture, normalize_coefficients
from mergelab.structure.transform import check_permutations, permute, permute_tensor
from mergelab.structure.types import Axis, Group, Structure

__all__ = [
    "Alignment",
    "apply_alignment",
    "identity_alignment",
    "merge_state_dicts",
    "merge_tensor",
    "tensor_ops",
    "to_basis",
    "transform_tensor",
]

logger = logging.getLogger(__name__)

Perms = Mapping[str, Tensor]


@dataclass(frozen=True)
class Alignment:
    """A correspondence between the units of several models, group by group.

    Args:
        structure: the groups the matrices refer to.
        merges: group name → one merge matrix ``M_i`` (k × n_i) per model.
        unmerges: group name → one unmerge matrix ``U_i`` (n_i × k) per model.
        coefficients: the averaging weights ``λ_i`` (sum to one), used for tensors with no ``"out"`` axis.
        perms: per model, group name → index vector (merged unit ``j`` = the model's unit ``perm[j]``), set when
            every transform is a weighted permutation (the fast path of :func:`apply_alignment`).
        info: free-form diagnostics (method, objective per iteration, convergence).
    """

    structure: Structure
    merges: Mapping[str, tuple[Tensor, ...]]
    unmerges: Mapping[str, tuple[Tensor, ...]]
    coefficients: tuple[float, ...]
    perms: tuple[Perms, ...] | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_models = len(self.coefficients)
        if self.perms is not None and len(self.perms) != n_models:
            raise ValueError(f"Alignment: {len(self.perms)} permutation sets for {n_models} models")
        if isinstance(self.merges, _PermMatrices):
            return  # built from validated permutations
        for g in self.structure:
            if g.name not in self.merges or g.name not in self.unmerges:
                raise ValueError(f"Alignment: no merge/unmerge matrices for group {g.name!r}")
            ms, us = self.merges[g.name], self.unmerges[g.name]
            if len(ms) != n_models or len(us) != n_models:
                raise ValueError(
                    f"Alignment: group {g.name!r} has {len(ms)} merge and {len(us)} unmerge matrices "
                    f"for {n_models} coefficients"
                )
            k = ms[0].shape[0]
            for i, (m, u) in enumerate(zip(ms, us, strict=True)):
                if (
                    m.dim() != 2
                    or u.dim() != 2
                    or m.shape[0] != k
                    or u.shape[1] != k
                    or m.shape[1] != u.shape[0]
                ):
                    raise ValueError(
                        f"Alignment: group {g.name!r} model {i}: merge {tuple(m.shape)} / unmerge "
                        f"{tuple(u.shape)} are not (k × n) / (n × k) with a common k={k}"
                    )

    @property
    def num_models(self) -> int:
        return len(self.coefficients)

    def width(self, group: str) -> int:
        """Merged width ``k`` of ``group``."""
        if self.perms is not None:
            return int(self.perms[0][group].numel())
        return int(self.merges[group][0].shape[0])

    @classmethod
    def from_permutations(
        cls,
        structure: Structure,
        perms_per_model: Sequence[Perms],
        coefficients: Sequence[float] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> Alignment:
        """A weighted permutation average: ``M_i = λ_i P_i``, ``U_i = P_iᵀ``.

        Args:
            structure: the network's groups.
            perms_per_model: one mapping group → index vector per model; a missing group means identity.
            coefficients: averaging weights (uniform by default; rescaled to sum to one).
            info: diagnostics to keep.

        Example:
            >>> import torch
            >>> from mergelab.structure.types import Axis, Group, Structure
            >>> s = Structure((Group("h", 3, (Axis("0.weight", 0, "out"), Axis("1.weight", 1, "in"))),))
            >>> al = Alignment.from_permutations(s, [{}, {"h": torch.tensor([2, 0, 1])}])
            >>> al.merges["h"][1]
            tensor([[0.0000, 0.0000, 0.5000],
                    [0.5000, 0.0000, 0.0000],
                    [0.0000, 0.5000, 0.0000]])
        """
        coefs = tuple(
            normalize_coefficients(coefficients, len(perms_per_model), "Alignment.from_permutations")
        )
        perms: list[dict[str, Tensor]] = []
        for i, pm in enumerate(perms_per_model):
            checked = check_permutations(structure, pm, f"Alignment.from_permutations, model {i}")
            perms.append({g.name: checked.get(g.name, torch.arange(g.size)) for g in structure})
        # Dense matrices are built on first access only: the merge itself uses the index vectors.
        merges = _PermMatrices(perms, coefs, transpose=False)
        unmerges = _PermMatrices(perms, coefs, transpose=True)
        return cls(structure, merges, unmerges, coefs, tuple(perms), dict(info or {}))

    def __repr__(self) -> str:
        kind = "permutation" if self.perms is not None else "general"
        widths = {g.name: self.width(g.name) for g in self.structure}
        return (
            f"Alignment({kind}, {self.num_models} models, widths={widths}, coefficients={self.coefficients})"
        )


class _PermMatrices(Mapping[str, tuple[Tensor, ...]]):
    """Group → per-model ``λ_i P_i`` (merge) or ``P_iᵀ`` (unmerge), built lazily and cached."""

    def __init__(
        self, perms: Sequence[Mapping[str, Tensor]], coefs: Sequence[float], transpose: bool
    ) -> None:
        self._perms, self._coefs, self._transpose = perms, coefs, transpose
        self._cache: dict[str, tuple[Tensor, ...]] = {}

    def __getitem__(self, group: str) -> tuple[Tensor, ...]:
        if group not in self._cache:
            mats = [_perm_matrix(p[group]) for p in self._perms]  # KeyError for unknown groups
            if self._transpose:
                self._cache[group] = tuple(m.T.contiguous() for m in mats)
            else:
                self._cache[group] = tuple(c * m for c, m in zip(self._coefs, mats, strict=True))
        return self._cache[group]

    def __iter__(self) -> Iterator[str]:
        return iter(self._perms[0])

    def __len__(self) -> int:
        return len(self._perms[0])


def identity_alignment(
    structure: Structure, n: int, coefficients: Sequence[float] | None = None
) -> Alignment:
    """The identity correspondence between ``n`` models: plain (weighted) weight averaging."""
    return Alignment.from_permutations(
        structure, [{} for _ in range(n)], coefficients, {"method": "identity"}
    )


def _perm_matrix(perm: Tensor) -> Tensor:
    n = perm.numel()
    m = torch.zeros(n, n)
    m[torch.arange(n), perm] = 1.0
    return m


# --------------------------------------------------------------------------------------------------- tensors


def transform_tensor(w: Tensor, ops: Sequence[tuple[Axis, Tensor]]) -> Tensor:
    """Contract the unit index of each axis with a (k × n) matrix: ``slice ← A @ slice`` on that axis.

    Several axes may share one dimension (packed parameters with different ``start``); each works on its own
    slice, and a slice whose width changes (k ≠ n) shifts the slices after it.

    Args:
        w: the tensor.
        ops: pairs ``(axis, A)`` with ``A`` of shape (k × n), ``n`` the group's size.

    Returns:
        A new tensor; along each touched dimension the slice of ``n*inner`` entries becomes ``k*inner``.
    """
    out = w
    by_dim: dict[int, list[tuple[Axis, Tensor]]] = {}
    for axis, a in ops:
        by_dim.setdefault(axis.dim, []).append((axis, a))
    for dim, items in by_dim.items():
        x = out.movedim(dim, 0)
        # Right to left, so a width change never moves a slice not yet processed.
        for axis, a in sorted(items, key=lambda t: -t[0].start):
            k, n = a.shape
            end = axis.start + n * axis.inner
            rest = x.shape[1:]
            mid = x[axis.start : end].reshape(n, -1)  # (n, inner*rest)
            mid = (a.to(mid.dtype) @ mid).reshape(k * axis.inner, *rest)
            x = torch.cat([x[: axis.start], mid, x[end:]], dim=0)
        out = x.movedim(0, dim)
    return out.contiguous()


def tensor_ops(
    items: Sequence[tuple[Group, Axis]], alignment: Alignment, i: int
) -> list[tuple[Axis, Tensor]]:
    """The matrices that bring model ``i``'s tensor into the merged basis: its first ``"out"`` axis through
    ``M_i`` (which carries the averaging weights), every other axis through ``U_iᵀ``."""
    ops: list[tuple[Axis, Tensor]] = []
    used_merge = False
    for g, a in items:
        if a.role == "out" and not used_merge:
            ops.append((a, alignment.merges[g.name][i]))
            used_merge = True
        else:
            ops.append((a, alignment.unmerges[g.name][i].T))
    return ops


def merge_state_dicts(state_dicts: Sequence[Mapping[str, Tensor]], alignment: Alignment) -> dict[str, Tensor]:
    """``Σ_i T_i(W_i)`` for every tensor (see the module docstring); the merged width may differ (k ≠ n).

    Args:
        state_dicts: one ``state_dict`` per model, same keys and shapes.
        alignment: the correspondence; its ``num_models`` must equal ``len(state_dicts)``.

    Returns:
        The merged state dict (new tensors).
    """
    if len(state_dicts) != alignment.num_models:
        raise ValueError(
            f"merge_state_dicts: {len(state_dicts)} state dicts for an alignment of {alignment.num_models} models"
        )
    check_structure(alignment.structure, state_dicts[0])
    axes = alignment.structure.param_axes
    return {
        key: merge_tensor([sd[key] for sd in state_dicts], axes.get(key, ()), alignment)
        for key in state_dicts[0]
    }


def merge_tensor(
    tensors: Sequence[Tensor], items: Sequence[tuple[Group, Axis]], alignment: Alignment
) -> Tensor:
    """One merged tensor ``Σ_i T_i(W_i)`` from the models' copies of it and the group axes it carries (the
    kernel of :func:`merge_state_dicts`, also used when streaming checkpoints tensor by tensor).

    Args:
        tensors: model ``i``'s tensor, for every model.
        items: ``(group, axis)`` pairs of the structure that touch this tensor (empty: plain weighted average).
        alignment: the correspondence.

    Returns:
        A new tensor in the first one's dtype; a non-floating tensor is copied from model 0.
    """
    v0 = tensors[0]
    if not v0.is_floating_point():
        return v0.clone()
    coefs = alignment.coefficients
    has_out = any(a.role == "out" for _, a in items)
    total: Tensor | None = None
    with torch.no_grad():
        for i, w in enumerate(tensors):
            if alignment.perms is not None:
                t = permute_tensor(w, [(a, alignment.perms[i][g.name]) for g, a in items]) * coefs[i]
            else:
                t = transform_tensor(w, tensor_ops(items, alignment, i))
                if not has_out:
                    t = t * coefs[i]
            total = t if total is None else total + t
    assert total is not None
    return total.to(v0.dtype)


def apply_alignment(models: Sequence[nn.Module], alignment: Alignment) -> nn.Module:
    """Build the merged model (a new module of model 0's class) from an alignment.

    Args:
        models: the models the alignment was computed for, in the same order.
        alignment: an :class:`Alignment` whose merged width equals the model width in every group.

    Returns:
        A deep copy of ``models[0]`` holding the merged weights; the inputs are untouched.

    Raises:
        ValueError: if the architectures differ, or a group's merged width ``k`` differs from its size (such a
            merge needs a model of another width; use :func:`merge_state_dicts` and build one).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mergelab.structure.types import Axis, Group, Structure
        >>> a = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> s = Structure((Group("0", 3, (Axis("0.weight", 0, "out"), Axis("0.bias", 0, "out"),
        ...                                Axis("2.weight", 1, "in"))),))
        >>> merged = apply_alignment([a, a], identity_alignment(s, 2))
        >>> torch.allclose(merged[0].weight, a[0].weight)
        True
    """
    models = list(models)
    check_same_architecture(models, "apply_alignment")
    for g in alignment.structure:
        k = alignment.width(g.name)
        if k != g.size:
            raise ValueError(
                f"apply_alignment: group {g.name!r} merges {g.size} units into k={k}; the merged width differs "
                f"from the model's, so it cannot be loaded into the same architecture"
            )
    sd = merge_state_dicts([m.state_dict() for m in models], alignment)
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(sd)
    return merged


def to_basis(model: nn.Module, structure: Structure, perm: Perms) -> nn.Module:
    """Re-express ``model`` in another unit basis: new unit ``j`` of group ``g`` is old unit ``perm[g][j]``.

    The function computed by the model does not change. Use it to bring an endpoint into the merged basis
    (``alignment.perms[i]``) before comparing activations or interpolating. It is
    :func:`~mergelab.structure.transform.permute` under the name that says why it is called.

    Args:
        model: the network (not modified).
        structure: its groups.
        perm: group name → index vector; missing groups keep their order.

    Returns:
        A permuted deep copy.
    """
    return permute(model, structure, perm)
