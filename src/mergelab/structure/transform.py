"""Apply, draw and check unit permutations of a :class:`~mergelab.structure.types.Structure`.

Convention: ``perms[group]`` is an index vector ``p`` of length ``group.size``; unit ``j`` of the permuted
model is unit ``p[j]`` of the original. Every axis of the group, ``"out"`` and ``"in"`` alike, is re-indexed
with the same ``p`` (``W'[j] = W[p[j]]`` on an out axis, ``W'[:, j] = W[:, p[j]]`` on an in axis), so the
permuted model computes the same function. Axes with ``inner`` move ``inner``-entry slices per unit;
axes with ``start`` touch only their slice of a packed tensor.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from mergelab.structure import discover_structure
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> s = discover_structure(net, torch.zeros(2, 4))
    >>> twin = permute(net, s, random_permutations(s, 0))
    >>> x = torch.randn(5, 4)
    >>> torch.allclose(net(x), twin(x), atol=1e-6)
    True
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mergelab.structure.build import check_structure
from mergelab.structure.types import Axis, Group, Structure

__all__ = [
    "check_permutations",
    "identity_permutations",
    "invert_permutation",
    "permute",
    "permute_state_dict",
    "permute_tensor",
    "random_permutations",
    "validate_permutation",
]

Perms = Mapping[str, Tensor | Sequence[int]]


def _as_index(name: str, perm: Tensor | Sequence[int], where: str = "") -> Tensor:
    t = torch.as_tensor(perm)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(
            f"permutation for group {name!r}{where}: expected integer indices, got dtype {t.dtype}"
        )
    return t.to(torch.long)


def validate_permutation(group: Group, perm: Tensor | Sequence[int], where: str = "") -> Tensor:
    """Check that ``perm`` permutes ``group``'s units and moves its blocks only as wholes.

    The one check of a single group's permutation (:func:`check_permutations` adds names and ties, an
    :class:`~mergelab.structure.alignment.Alignment` uses it for every model).

    Args:
        group: the group the permutation acts on.
        perm: integer index vector of length ``group.size``.
        where: context for the error message (e.g. ``"model 1"``).

    Returns:
        ``perm`` as an int64 CPU tensor.

    Raises:
        ValueError: non-integer indices, a wrong length, indices that are not a permutation, or a permutation
            that splits one of the group's blocks.
    """
    ctx = f" ({where})" if where else ""
    p = _as_index(group.name, perm, ctx).cpu()
    if p.shape != (group.size,):
        raise ValueError(
            f"permutation for group {group.name!r}{ctx}: shape {tuple(p.shape)}, expected ({group.size},) "
            f"for its {group.size} units"
        )
    if not torch.equal(torch.sort(p).values, torch.arange(group.size)):
        raise ValueError(
            f"permutation for group {group.name!r}{ctx}: {p.tolist()[:8]}... is not a permutation of "
            f"0..{group.size - 1}"
        )
    if group.blocks > 1:
        blk = (p // group.block_size).view(group.blocks, group.block_size)
        if not bool((blk == blk[:, :1]).all()):
            raise ValueError(
                f"permutation for group {group.name!r}{ctx} splits a block: it moves units between its "
                f"{group.blocks} blocks of {group.block_size}"
            )
    return p


def check_permutations(structure: Structure, perms: Perms, where: str = "") -> dict[str, Tensor]:
    """Check that ``perms`` is a valid set of permutations for ``structure``.

    Groups missing from ``perms`` count as the identity.

    Args:
        structure: the groups.
        perms: ``{group: index vector}``.
        where: context for the error message (e.g. ``"model 1"``).

    Returns:
        The given permutations as int64 CPU tensors (see :func:`validate_permutation`).

    Raises:
        ValueError: an unknown group name, a wrong size, indices that are not a permutation, a permutation that
            breaks a group's blocks, or tied groups whose block permutations differ.
    """
    ctx = f" ({where})" if where else ""
    names = {g.name for g in structure}
    unknown = sorted(set(perms) - names)
    if unknown:
        raise ValueError(f"permutations{ctx} for unknown groups {unknown}; groups: {sorted(names)}")
    checked = {g.name: validate_permutation(g, perms[g.name], where) for g in structure if g.name in perms}
    for tie in structure.ties:
        blocks = [
            checked[n][:: structure[n].block_size] // structure[n].block_size
            if n in checked
            else torch.arange(structure[n].blocks)
            for n in tie
        ]
        for other, blk in zip(tie[1:], blocks[1:], strict=True):
            if not torch.equal(blk, blocks[0]):
                raise ValueError(
                    f"tied groups {tie[0]!r} and {other!r}{ctx} permute their blocks differently: "
                    f"{blocks[0].tolist()} vs {blk.tolist()}"
                )
    return checked


def identity_permutations(structure: Structure) -> dict[str, Tensor]:
    """``arange(size)`` for every group."""
    return {g.name: torch.arange(g.size) for g in structure}


def random_permutations(
    structure: Structure, generator: torch.Generator | int | None = None
) -> dict[str, Tensor]:
    """Draw a uniformly random valid permutation per group.

    Blocks are permuted as wholes, then each block independently inside; tied groups share the block
    permutation while their within-block permutations stay independent.

    Args:
        structure: the groups to permute.
        generator: a ``torch.Generator``, an int seed, or ``None`` (global RNG).

    Returns:
        ``{group name: LongTensor index vector}``.
    """
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    block_perm: dict[str, Tensor] = {}
    for g in structure:
        if g.name in block_perm:
            continue
        sigma = torch.randperm(g.blocks, generator=generator)
        for name in structure.tie_of(g.name):
            block_perm[name] = sigma
    out: dict[str, Tensor] = {}
    for g in structure:
        bs = g.block_size
        inside = torch.stack(
            [torch.randperm(bs, generator=generator) for _ in range(g.blocks)]
        )  # (blocks, bs)
        out[g.name] = (block_perm[g.name][:, None] * bs + inside).reshape(-1)
    return out


def invert_permutation(perm: Tensor) -> Tensor:
    """The index vector ``q`` with ``q[perm[j]] = j`` (undoes ``perm``)."""
    perm = _as_index("inverse", perm)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def _axis_index(dim_size: int, axis: Axis, perm: Tensor) -> Tensor:
    """Index vector along ``axis.dim`` that reorders the group's slice by ``perm`` (inner entries move along)."""
    idx = torch.arange(dim_size)
    n = perm.numel()
    sub = (perm.view(n, 1) * axis.inner + torch.arange(axis.inner).view(1, -1)).flatten()  # (n * inner,)
    idx[axis.start : axis.start + n * axis.inner] = axis.start + sub
    return idx


def permute_tensor(w: Tensor, ops: Sequence[tuple[Axis, Tensor]]) -> Tensor:
    """Reorder each axis's units: entry ``j`` of the result is unit ``perm[j]`` of ``w`` (one gather per dim).

    The one permutation kernel: :func:`permute_state_dict`, the similarity of weight matching and the
    permutation fast path of :func:`~mergelab.structure.alignment.merge_tensor` all use it. Several axes may
    share a dimension (packed parameters with different ``start``); each reorders only its own slice.

    Args:
        w: the tensor.
        ops: pairs ``(axis, perm)``; the permutations are not checked (see :func:`validate_permutation`).

    Returns:
        A new tensor (``w`` itself when ``ops`` is empty).
    """
    index: dict[int, Tensor] = {}
    for axis, perm in ops:
        if axis.dim not in index:
            index[axis.dim] = torch.arange(w.shape[axis.dim])
        cur = index[axis.dim]
        sub = _axis_index(w.shape[axis.dim], axis, perm.cpu())
        lo, hi = axis.start, axis.start + perm.numel() * axis.inner
        cur[lo:hi] = sub[lo:hi]
    for dim, idx in index.items():
        w = w.index_select(dim, idx.to(w.device))
    return w


def permute_state_dict(
    state_dict: Mapping[str, Tensor], structure: Structure, perms: Perms
) -> dict[str, Tensor]:
    """Permute the units of a ``state_dict`` (a pure function: the input is not modified).

    Args:
        state_dict: name -> tensor (parameters and buffers).
        structure: the groups and their axes.
        perms: ``{group: index vector}``; missing groups stay as they are.

    Returns:
        A new dict; permuted tensors are new, untouched ones are the same tensor objects as in the input.

    Raises:
        ValueError: invalid permutations (see :func:`check_permutations`) or an axis that names a missing
            tensor or does not fit it (see :func:`~mergelab.structure.build.check_structure`).
    """
    checked = check_permutations(structure, perms)
    check_structure(structure, state_dict)
    out = dict(state_dict)
    for key, items in structure.param_axes.items():
        ops = [(a, checked[g.name]) for g, a in items if g.name in checked]
        if ops:
            out[key] = permute_tensor(out[key], ops)
    return out


def permute(model: nn.Module, structure: Structure, perms: Perms) -> nn.Module:
    """A permuted copy of ``model`` (same function, reordered units); ``model`` itself is untouched.

    Args:
        model: the network.
        structure: its groups, e.g. from :func:`~mergelab.structure.discover_structure`.
        perms: ``{group: index vector}`` (missing groups: identity).

    Returns:
        A deep copy with permuted parameters and buffers.
    """
    new_sd = permute_state_dict(model.state_dict(), structure, perms)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.load_state_dict(new_sd)
    return twin
