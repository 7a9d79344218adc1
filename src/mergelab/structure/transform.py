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

from mergelab.structure.types import Axis, Structure

__all__ = [
    "check_permutations",
    "identity_permutations",
    "invert_permutation",
    "permute",
    "permute_state_dict",
    "random_permutations",
]

Perms = Mapping[str, Tensor | Sequence[int]]


def _as_index(name: str, perm: Tensor | Sequence[int]) -> Tensor:
    t = torch.as_tensor(perm)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"permutation for group {name!r}: expected integer indices, got dtype {t.dtype}")
    return t.to(torch.long)


def check_permutations(structure: Structure, perms: Perms) -> None:
    """Check that ``perms`` is a valid set of permutations for ``structure``.

    Groups missing from ``perms`` count as the identity.

    Raises:
        ValueError: an unknown group name, a wrong size, indices that are not a permutation, a permutation that
            breaks a group's blocks, or tied groups whose block permutations differ.
    """
    names = {g.name for g in structure}
    unknown = sorted(set(perms) - names)
    if unknown:
        raise ValueError(f"permutations for unknown groups {unknown}; groups: {sorted(names)}")
    block_perms: dict[str, Tensor] = {}
    for g in structure:
        if g.name not in perms:
            block_perms[g.name] = torch.arange(g.blocks)
            continue
        p = _as_index(g.name, perms[g.name])
        if p.shape != (g.size,):
            raise ValueError(
                f"permutation for group {g.name!r}: shape {tuple(p.shape)}, expected ({g.size},)"
            )
        if not torch.equal(torch.sort(p.cpu()).values, torch.arange(g.size)):
            raise ValueError(
                f"permutation for group {g.name!r} is not a permutation of 0..{g.size - 1}: {p.tolist()}"
            )
        blk = p.cpu().reshape(g.blocks, g.block_size) // g.block_size
        if not bool((blk == blk[:, :1]).all()):
            raise ValueError(
                f"permutation for group {g.name!r} moves units between its {g.blocks} blocks of {g.block_size}"
            )
        block_perms[g.name] = blk[:, 0]
    for tie in structure.ties:
        first = block_perms[tie[0]]
        for other in tie[1:]:
            if not torch.equal(block_perms[other], first):
                raise ValueError(
                    f"tied groups {tie[0]!r} and {other!r} permute their blocks differently: "
                    f"{first.tolist()} vs {block_perms[other].tolist()}"
                )


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


def _axis_index(axis: Axis, size: int, length: int, perm: Tensor, device: torch.device) -> Tensor:
    """Full index along a tensor axis of ``length`` entries that applies ``perm`` to the axis' slice."""
    idx = torch.arange(length, device=device)
    units = perm.to(device)[:, None] * axis.inner + torch.arange(axis.inner, device=device)  # (size, inner)
    idx[axis.start : axis.start + size * axis.inner] = axis.start + units.reshape(-1)
    return idx


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
        ValueError: invalid permutations (see :func:`check_permutations`) or an axis naming a missing tensor.
    """
    check_permutations(structure, perms)
    out = dict(state_dict)
    for g in structure:
        if g.name not in perms:
            continue
        p = _as_index(g.name, perms[g.name])
        for a in g.axes:
            if a.param not in out:
                raise ValueError(
                    f"permute_state_dict: group {g.name!r} names {a.param!r}, not in the state_dict"
                )
            t = out[a.param]
            if a.dim >= t.dim() or a.start + g.size * a.inner > t.shape[a.dim]:
                raise ValueError(
                    f"permute_state_dict: group {g.name!r} axis {a} does not fit {a.param!r} {tuple(t.shape)}"
                )
            out[a.param] = t.index_select(a.dim, _axis_index(a, g.size, t.shape[a.dim], p, t.device))
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
