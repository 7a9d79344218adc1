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

``probes`` say where the group's units can be *observed* in the eager model: the input (``site="input"``) or the
output (``site="output"``) of a module, units along ``dim`` (from entry ``start``, ``inner`` entries per unit), or
— for hand-written structures — an fx node of ``mergelab.structure.trace(model)`` (``site="node"``). Activation
statistics for matching pool the samples of every probe of a group (e.g. each point of a residual stream).

``Structure.fixed`` lists what discovery kept in place and why (an axis read by an op whose symmetry the
vocabulary cannot express, a unit axis meeting the model input, the model output); ``coverage()`` and
``explain()`` summarise it.

``blocks`` > 1 means the units come in equal contiguous blocks that may only move as whole blocks (attention
heads, GroupNorm groups); inside a block any permutation is allowed. Groups listed together in
``Structure.ties`` must move their blocks identically (the query/key and value/output groups of one attention
layer share the head permutation).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
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


Site = Literal["node", "input", "output"]


@dataclass(frozen=True)
class Probe:
    """A place where a group's units can be observed.

    Args:
        node: the module path (``site="input"``/``"output"``) or fx node name (``site="node"``).
        dim: the tensor axis carrying the units.
        site: the module's first input, its output (first element of a tuple), or an fx node's output.
        start: first entry of the group's units along ``dim`` (packed outputs such as a fused ``qkv``).
        inner: consecutive entries per unit along ``dim`` (a flattened map, a whole attention head).
        source: for an input probe, the leaf module whose output is that same tensor ("" if it is computed in
            a forward function), e.g. the ReLU before a Linear (feature visualisation hooks module outputs).
    """

    node: str
    dim: int
    site: Site = "node"
    start: int = 0
    inner: int = 1
    source: str = ""


@dataclass(frozen=True)
class Fixed:
    """Units discovery keeps in place: ``size`` units over ``axes``, and the reason.

    ``hidden`` is False for the model's own outputs, which are never permuted and do not count in coverage.
    """

    name: str
    size: int
    axes: tuple[Axis, ...]
    reason: str
    hidden: bool = True

    @property
    def width(self) -> int:
        return self.size * min((a.inner for a in self.axes), default=1)


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

    @property
    def width(self) -> int:
        """Tensor entries the group spans (units × the smallest ``inner``): a whole head counts its dims."""
        return self.size * min((a.inner for a in self.axes), default=1)


@dataclass(frozen=True)
class Structure:
    """All permutation groups of a network, in forward (topological) order.

    ``ties`` holds tuples of group names whose *block* permutations must be equal. ``fixed`` records the units
    discovery kept in place, with the reason (see :class:`Fixed`).
    """

    groups: tuple[Group, ...]
    ties: tuple[tuple[str, ...], ...] = field(default_factory=tuple)
    fixed: tuple[Fixed, ...] = field(default_factory=tuple)

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

    @cached_property
    def param_axes(self) -> Mapping[str, tuple[tuple[Group, Axis], ...]]:
        """``state_dict`` key → every (group, axis) that touches it, in structure order.

        Built once per structure (the dataclass is frozen, so it cannot go stale); every merge, similarity and
        permutation walks tensors through it instead of re-scanning the groups.
        """
        out: dict[str, list[tuple[Group, Axis]]] = {}
        for g in self.groups:
            for a in g.axes:
                out.setdefault(a.param, []).append((g, a))
        return {k: tuple(v) for k, v in out.items()}

    def axes_of(self, param: str) -> list[tuple[Group, Axis]]:
        """Every (group, axis) that touches ``param``."""
        return list(self.param_axes.get(param, ()))

    def coverage(self) -> float:
        """Fraction of hidden entries (units × inner) that some group permutes; 1.0 when nothing hidden is fixed."""
        free = sum(g.width for g in self.groups)
        kept = sum(f.width for f in self.fixed if f.hidden)
        return free / (free + kept) if free + kept else 1.0

    def explain(self) -> str:
        """One line per group and per fixed set of units, with the reason it is kept in place."""
        lines = [
            f"{len(self.groups)} groups, {len([f for f in self.fixed if f.hidden])} hidden unit sets kept fixed; "
            f"coverage {self.coverage():.1%} of hidden entries"
        ]
        for g in self.groups:
            blk = f", {g.blocks} blocks" if g.blocks > 1 else ""
            lines.append(f"  permuted  {g.name} ({g.size} units{blk}, {len(g.axes)} axes)")
        for f in self.fixed:
            tag = "fixed    " if f.hidden else "output   "
            axes = ", ".join(str(a) for a in f.axes[:3]) + (", ..." if len(f.axes) > 3 else "")
            lines.append(f"  {tag} {f.name} ({f.size} units: {axes}): {f.reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        lines = [f"Structure: {len(self.groups)} groups"]
        for g in self.groups:
            blk = f", {g.blocks} blocks" if g.blocks > 1 else ""
            lines.append(f"  {g.name}  ({g.size} units{blk})")
            for a in g.axes:
                lines.append(f"    {a}")
        for tie in self.ties:
            lines.append(f"  tied blocks: {' = '.join(tie)}")
        hidden = [f for f in self.fixed if f.hidden]
        if hidden:
            lines.append(f"  kept fixed ({len(hidden)}; coverage {self.coverage():.1%}, see explain()):")
            for f in hidden:
                lines.append(f"    {f.name} ({f.size} units): {f.reason}")
        return "\n".join(lines)
