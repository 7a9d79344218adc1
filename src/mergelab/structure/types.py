"""The data that describes a network's permutation symmetries.

A *group* is a set of tensor axes that share one hidden-unit basis: permuting the units of a group (the same
permutation on every axis in it) leaves the network's function unchanged. Merging methods find, per group, a
correspondence between the units of several models and average the weights in that shared basis.

Each axis says on which side of the unit it sits:

* ``role="out"``: the tensor *produces* (or is indexed by) the units — a weight's output rows, a bias, a norm's
  affine parameters and running statistics. A merge matrix ``M`` (k × n) acts here.
* ``role="in"``: the tensor *reads* the units — a weight's input columns. An unmerge matrix ``U`` (n × k) acts
  here.

Two details cover the cases a plain ``(param, dim)`` cannot:

* ``inner``: after a flatten, a Linear reads ``C*H*W`` inputs; unit ``c`` owns the contiguous slice
  ``[c*inner, (c+1)*inner)`` of that axis (``inner = H*W``).
* ``start``: packed parameters (``nn.MultiheadAttention.in_proj_weight`` holds q, k and v) expose several groups
  on one axis; the group's slice begins at ``start`` and spans ``size*inner`` entries.

``probes`` say where the group's units can be *observed*: fx node names (in the graph of
``mergelab.structure.trace(model)``) whose output carries the group's units along ``dim``. Activation statistics
for matching pool the samples of every probe of a group (e.g. each point of a residual stream).

``blocks`` > 1 means the units come in equal contiguous blocks that may only move as whole blocks (attention
heads, GroupNorm groups); inside a block any permutation is allowed. Groups listed together in
``Structure.ties`` must move their blocks identically (the query/key and value/output groups of one attention
layer share the head permutation).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["in", "out"]


@dataclass(frozen=True)
class Axis:
    """One tensor axis touched by a group.

    Args:
        param: the ``state_dict`` key (parameters and buffers alike), e.g. ``"layers.0.weight"``.
        dim: which dimension of that tensor.
        role: ``"out"`` if the tensor produces the units, ``"in"`` if it reads them.
        inner: consecutive entries per unit along ``dim`` (``H*W`` after a flatten of a conv map).
        start: offset of the group's slice along ``dim`` (packed parameters).
    """

    param: str
    dim: int
    role: Role
    inner: int = 1
    start: int = 0

    def __str__(self) -> str:
        extra = ""
        if self.inner != 1:
            extra += f", inner={self.inner}"
        if self.start:
            extra += f", start={self.start}"
        return f"{self.param}[{self.dim}] ({self.role}{extra})"


@dataclass(frozen=True)
class Probe:
    """A place where a group's units appear in the traced graph: node ``node``'s output, units along ``dim``."""

    node: str
    dim: int


@dataclass(frozen=True)
class Group:
    """Axes that share one unit basis of ``size`` units.

    Args:
        name: a readable, unique name (usually the module that produces the units).
        size: number of units.
        axes: every tensor axis that must be permuted together.
        blocks: number of equal blocks that only move as wholes (1 = free permutation).
        probes: where the units can be observed in the traced forward pass (for activation statistics).
    """

    name: str
    size: int
    axes: tuple[Axis, ...]
    blocks: int = 1
    probes: tuple[Probe, ...] = ()

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"Group {self.name!r}: size must be positive, got {self.size}")
        if self.blocks < 1 or self.size % self.blocks:
            raise ValueError(f"Group {self.name!r}: {self.blocks} blocks do not divide {self.size} units")

    @property
    def block_size(self) -> int:
        return self.size // self.blocks

    def params(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(a.param for a in self.axes))


@dataclass(frozen=True)
class Structure:
    """All permutation groups of a network, in forward (topological) order.

    ``ties`` holds tuples of group names whose *block* permutations must be equal.
    """

    groups: tuple[Group, ...]
    ties: tuple[tuple[str, ...], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"Structure: duplicate group names in {names}")
        for tie in self.ties:
            for n in tie:
                if n not in names:
                    raise ValueError(f"Structure: tie {tie} names unknown group {n!r}")
            blocks = {self[n].blocks for n in tie}
            if len(blocks) != 1:
                raise ValueError(f"Structure: tied groups {tie} have different block counts {blocks}")

    def __getitem__(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"Structure has no group {name!r}; groups: {[g.name for g in self.groups]}")

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def tie_of(self, name: str) -> tuple[str, ...]:
        """The tie that contains ``name`` (just ``(name,)`` if untied)."""
        for tie in self.ties:
            if name in tie:
                return tie
        return (name,)

    def tie_sets(self) -> list[tuple[str, ...]]:
        """Every tie once, in forward order (an untied group is a tie of one): the units solvers visit."""
        seen: set[str] = set()
        out: list[tuple[str, ...]] = []
        for g in self.groups:
            if g.name not in seen:
                tie = self.tie_of(g.name)
                seen.update(tie)
                out.append(tie)
        return out

    def axes_of(self, param: str) -> list[tuple[Group, Axis]]:
        """Every (group, axis) that touches ``param``."""
        return [(g, a) for g in self.groups for a in g.axes if a.param == param]

    def __str__(self) -> str:
        lines = [f"Structure: {len(self.groups)} groups"]
        for g in self.groups:
            blk = f", {g.blocks} blocks" if g.blocks > 1 else ""
            lines.append(f"  {g.name}  ({g.size} units{blk})")
            for a in g.axes:
                lines.append(f"    {a}")
        for tie in self.ties:
            lines.append(f"  tied blocks: {' = '.join(tie)}")
        return "\n".join(lines)
