"""Abstract values that flow through the exported graph during discovery."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mergelab.structure.discover.bases import Layout

__all__ = ["Act", "Other", "Pair", "Param", "Seq", "flat", "tensor_like"]


@dataclass(frozen=True)
class T:
    """A tensor seen in the exported graph's metadata (only its shape is kept)."""

    shape: tuple[int, ...]


Pair = tuple[tuple[int, ...], Layout]  # (head axes, row-major flat head layout)


@dataclass(frozen=True)
class Act:
    """A tensor with units on some axes.

    ``axes`` maps a tensor axis to its layout. ``pairs`` maps a *within-head* axis ``d`` to ``(head axes,
    layout)``: the head axes jointly index blocks of the layout's bases (one block per entry, ``inner = 1/m``)
    and axis ``d`` (``m`` entries) indexes the units inside the block of that head — the shape of ``q`` in
    ``(batch, heads, tokens, head_dim)``. Untracked axes are in a fixed order.
    """

    shape: tuple[int, ...]
    axes: dict[int, Layout] = field(default_factory=dict)
    pairs: dict[int, Pair] = field(default_factory=dict)

    @property
    def tracked(self) -> bool:
        return bool(self.axes or self.pairs)

    def busy(self) -> set[int]:
        """Every axis that carries units (tracked, within-head or head axes)."""
        out = set(self.axes) | set(self.pairs)
        for hs, _ in self.pairs.values():
            out.update(hs)
        return out


@dataclass(frozen=True)
class Param:
    """A view of one parameter/buffer: per tensor axis, ``(param dim, offset)`` or ``None`` (broadcast/gathered)."""

    shape: tuple[int, ...]
    name: str
    dims: tuple[tuple[int, int] | None, ...]


@dataclass(frozen=True)
class Other:
    """A non-tensor value (an int, a dtype, ``None``, ...)."""

    value: Any


@dataclass(frozen=True)
class Seq:
    """A tuple output (``split``, ``unbind``, batch norm's statistics)."""

    items: tuple[Any, ...]


def tensor_like(v: Any) -> bool:
    return isinstance(v, (Act, Param))


def flat(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(flat(v))
        elif isinstance(v, dict):
            out.extend(flat(v.values()))
        elif isinstance(v, Seq):
            out.extend(flat(v.items))
        else:
            out.append(v)
    return out
