"""Unit bases: a union-find that can also split, coarsen and block its members.

A *basis* is a set of units that one permutation acts on. Tensor axes are described by *layouts*: a sequence of
pieces ``(basis, entries)`` — ``entries`` consecutive entries of the axis carry the whole basis, each unit owning
``entries / size`` of them. That ratio, the piece's *inner*, may be

* an integer ``k``: every unit owns ``k`` consecutive entries (a flattened conv map, an expanded head);
* a fraction ``1/m``: every entry is one *block* of ``m`` units (the head axis of ``(batch, heads, tokens,
  head_dim)``, where the units of a head lie on the ``head_dim`` axis).

Constraints found along the graph change bases, never the layouts that refer to them:

* ``union``: two bases are one (a residual ``+``); sizes must agree.
* ``split``: a basis becomes consecutive sub-bases (a slice, a ``split``, a concat meeting a single producer);
  each part must then stay in place, which is exactly the constraint.
* ``coarsen``: units are glued into runs of ``f`` (a reshape that splits a unit over two axes, heads whose
  inner dims must stay in place because of rotary embeddings). A permutation of the coarse units is a
  permutation of the fine ones, so coarsening is always sound.
* ``combine_blocks``: units come in blocks that only move as wholes (attention heads, GroupNorm groups).
* ``tie``: two bases' block permutations must agree (query/key heads and value/output heads).
* ``fix``: the basis is never permuted, with the reason recorded for the user.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import NamedTuple

from mergelab.structure.types import Axis, Role

__all__ = ["Bases", "Basis", "Layout", "Piece", "entries"]


def _split_name(name: str) -> tuple[str, int]:
    """``"conv[4:8]"`` -> ``("conv", 4)``: parts of parts are named by offsets into the original basis."""
    m = re.fullmatch(r"(.*)\[(\d+):\d+\]", name)
    return (m.group(1), int(m.group(2))) if m else (name, 0)


class Piece(NamedTuple):
    """``entries`` consecutive entries of a tensor axis that carry every unit of ``basis``."""

    basis: int
    entries: int


Layout = tuple[Piece, ...]


def entries(layout: Iterable[Piece]) -> int:
    return sum(p.entries for p in layout)


@dataclass
class Basis:
    size: int
    name: str
    order: tuple[int, ...]
    blocks: int = 1
    fixed: str | None = None
    axes: list[Axis] = field(default_factory=list)
    parent: int = -1
    children: tuple[int, ...] = ()
    shares: tuple[Fraction, ...] = ()  # per child: its fraction of the parent's entries
    hidden: bool = True  # False for bases that are the model's own inputs/outputs (not counted in coverage)


class Bases:
    """All bases of one discovery run."""

    def __init__(self) -> None:
        self.b: list[Basis] = []
        self.ties: list[tuple[int, int]] = []

    def new(
        self,
        size: int,
        name: str,
        order: tuple[int, ...],
        *,
        blocks: int = 1,
        fixed: str | None = None,
    ) -> int:
        i = len(self.b)
        self.b.append(Basis(size, name, order, blocks, fixed, [], i))
        return i

    def find(self, i: int) -> int:
        b = self.b
        while b[i].parent != i:
            b[i].parent = b[b[i].parent].parent
            i = b[i].parent
        return i

    def leaves(self, layout: Iterable[Piece]) -> list[Piece]:
        """The layout in terms of current (unsplit) root bases."""
        out: list[Piece] = []
        stack = list(reversed(list(layout)))
        while stack:
            p = stack.pop()
            r = self.find(p.basis)
            b = self.b[r]
            if b.children:
                kids = [Piece(c, int(p.entries * s)) for c, s in zip(b.children, b.shares, strict=True)]
                stack.extend(reversed(kids))
            else:
                out.append(Piece(r, p.entries))
        return out

    def inner(self, p: Piece) -> Fraction:
        return Fraction(p.entries, self.b[self.find(p.basis)].size)

    def roots(self) -> list[int]:
        return [i for i, b in enumerate(self.b) if b.parent == i and not b.children]

    # -- fixing ---------------------------------------------------------------------------------------------

    def fix_basis(self, r: int, reason: str) -> None:
        b = self.b[self.find(r)]
        if b.children:
            for c in b.children:
                self.fix_basis(c, reason)
        elif b.fixed is None:
            b.fixed = reason

    def fix(self, layout: Iterable[Piece], reason: str) -> None:
        for p in self.leaves(layout):
            self.fix_basis(p.basis, reason)

    # -- blocks and coarsening ----------------------------------------------------------------------------

    def combine_blocks(self, i: int, blocks: int, where: str) -> None:
        b = self.b[self.find(i)]
        if blocks == 1 or blocks == b.blocks:
            return
        if b.size % blocks:
            raise ValueError(f"discover_structure: {where}: {blocks} blocks do not divide {b.size} units")
        if b.blocks == 1:
            b.blocks = blocks
            return
        raise ValueError(
            f"discover_structure: {where}: basis {b.name!r} ({b.size} units) would need both {b.blocks} and "
            f"{blocks} blocks; block structures can only combine when equal or one of them is 1"
        )

    def coarsen(self, i: int, f: int, why: str) -> bool:
        """Glue units into runs of ``f``; returns False (and fixes the basis) when ``f`` does not divide it."""
        r = self.find(i)
        b = self.b[r]
        if f == 1:
            return True
        if b.children:
            return all([self.coarsen(c, f, why) for c in b.children])
        if b.size % f:
            self.fix_basis(r, f"{why}: units of {f} entries do not divide {b.size} units")
            return False
        bs = b.size // b.blocks
        if b.blocks > 1 and bs % f and f % bs:
            return self.coarsen(r, math.lcm(f, bs), why)
        b.size //= f
        if b.blocks > 1 and bs % f:  # each coarse unit holds whole blocks: it is a block of its own
            b.blocks = b.size
        b.axes = [replace(a, inner=a.inner * f) for a in b.axes]
        return True

    def make_integer(self, p: Piece, why: str) -> bool:
        """Coarsen ``p``'s basis until each unit owns a whole number of entries."""
        q = self.inner(p)
        if q.denominator == 1:
            return True
        return self.coarsen(p.basis, q.denominator, why)

    # -- union, split, tie ----------------------------------------------------------------------------------

    def union(self, i: int, j: int, where: str) -> None:
        a, c = self.find(i), self.find(j)
        if a == c:
            return
        A, C = self.b[a], self.b[c]
        if A.children or C.children or A.size != C.size:
            raise AssertionError(f"union of incompatible bases {A.name!r} and {C.name!r}")
        if C.order < A.order:
            a, c, A, C = c, a, C, A
        if C.blocks > 1:
            self.combine_blocks(a, C.blocks, where)
        A.fixed = A.fixed or C.fixed
        A.hidden = A.hidden and C.hidden
        A.axes.extend(C.axes)
        C.axes = []
        C.parent = a

    def tied(self, r: int) -> bool:
        r = self.find(r)
        return any(self.find(a) == r or self.find(c) == r for a, c in self.ties)

    def can_split(self, i: int, sizes: Sequence[int]) -> bool:
        b = self.b[self.find(i)]
        bs = b.size // b.blocks
        return b.blocks == 1 or all(s % bs == 0 for s in sizes)

    def split(self, i: int, sizes: Sequence[int], where: str) -> list[int]:
        """Refine basis ``i`` into consecutive sub-bases of the given unit counts."""
        r = self.find(i)
        b = self.b[r]
        sizes = [s for s in sizes if s]
        if sum(sizes) != b.size:
            raise AssertionError(f"split sizes {sizes} do not add up to {b.size}")
        if len(sizes) == 1:
            return [r]
        if not self.can_split(r, sizes):
            raise ValueError(
                f"discover_structure: {where}: splitting basis {b.name!r} into {sizes} units cuts through one "
                f"of its {b.blocks} blocks"
            )
        if self.tied(r):
            raise ValueError(
                f"discover_structure: {where}: cannot split the tied (attention) basis {b.name!r}"
            )
        bs = b.size // b.blocks
        base, first = _split_name(b.name)
        kids, off = [], 0
        for k, s in enumerate(sizes):
            name = f"{base}[{first + off}:{first + off + s}]"
            c = self.new(s, name, b.order + (k,), blocks=s // bs if b.blocks > 1 else 1, fixed=b.fixed)
            self.b[c].hidden = b.hidden
            self.b[c].axes = [replace(a, start=a.start + off * a.inner) for a in b.axes]
            kids.append(c)
            off += s
        b.children, b.axes = tuple(kids), []
        b.shares = tuple(Fraction(s, b.size) for s in sizes)
        return kids

    def tie(self, la: Layout, lb: Layout, where: str) -> None:
        """Make the block permutations of two layouts of one (head) axis agree, one block per entry."""
        if entries(la) != entries(lb):
            raise AssertionError(f"tie: {entries(la)} vs {entries(lb)} entries at {where}")
        qa, qb = deque(self.leaves(la)), deque(self.leaves(lb))
        while qa and qb:
            pa, pb = qa.popleft(), qb.popleft()
            if pa.entries != pb.entries:
                small, big, qbig = (pa, pb, qb) if pa.entries < pb.entries else (pb, pa, qa)
                parts = self._cut(big, small.entries, where)
                if parts is None:
                    self.fix([pa, pb], f"{where}: tied layouts do not line up")
                    self.fix(qa, f"{where}: tied layouts do not line up")
                    self.fix(qb, f"{where}: tied layouts do not line up")
                    return
                qbig.extendleft(reversed(parts))
                (qa if qbig is qb else qb).appendleft(small)
                continue
            e = pa.entries
            per = [self._entries_per_block(p) for p in (pa, pb)]
            if None in per:
                self.fix([pa, pb], f"{where}: units span several heads")
                continue
            k = max(per)  # type: ignore[type-var]
            ok = e % k == 0
            for p in (pa, pb):
                b = self.b[self.find(p.basis)]
                units_per_block = k / self.inner(p)
                ok = ok and units_per_block.denominator == 1 and b.size % int(units_per_block) == 0
                if ok:
                    try:
                        self.combine_blocks(p.basis, b.size // int(units_per_block), where)
                    except ValueError:  # the basis already has other blocks: keep both in place
                        ok = False
            if not ok:
                self.fix([pa, pb], f"{where}: head blocks do not line up")
                continue
            a, c = self.find(pa.basis), self.find(pb.basis)
            if a != c:
                self.ties.append((a, c))

    def _entries_per_block(self, p: Piece) -> int | None:
        b = self.b[self.find(p.basis)]
        q = self.inner(p)
        if q.denominator == 1:
            return int(q)
        bs = b.size // b.blocks
        per = Fraction(bs) * q  # entries per block
        if b.blocks == 1:
            per = Fraction(1)  # a fresh basis: make each entry one block
        return int(per) if per.denominator == 1 else None

    def _cut(self, p: Piece, at: int, where: str) -> list[Piece] | None:
        """Split the basis of piece ``p`` so that its first ``at`` entries are a piece of their own."""
        q = self.inner(p)
        units = Fraction(at) / q
        if units.denominator != 1:
            return None
        b = self.b[self.find(p.basis)]
        u0 = int(units)
        if not self.can_split(p.basis, [u0, b.size - u0]) or self.tied(p.basis):
            return None
        first, rest = self.split(p.basis, [u0, b.size - u0], where)
        return [Piece(first, at), Piece(rest, p.entries - at)]

    # -- layouts --------------------------------------------------------------------------------------------

    def unify(self, la: Layout, lb: Layout, where: str) -> None:
        """Two layouts of one tensor axis carry the same units: union piece by piece (splitting/coarsening)."""
        if entries(la) != entries(lb):
            raise AssertionError(f"unify: {entries(la)} vs {entries(lb)} entries at {where}")
        qa, qb = deque(self.leaves(la)), deque(self.leaves(lb))
        while qa and qb:
            pa, pb = qa.popleft(), qb.popleft()
            ra, rb = self.leaves([pa]), self.leaves([pb])
            if len(ra) > 1 or len(rb) > 1:  # split meanwhile: re-expand and retry
                qa.extendleft(reversed(ra))
                qb.extendleft(reversed(rb))
                continue
            pa, pb = ra[0], rb[0]
            if pa.entries != pb.entries:
                small, big = (pa, pb) if pa.entries < pb.entries else (pb, pa)
                parts = self._cut(big, small.entries, where)
                if parts is None:  # make both coarse enough that the cut falls on a unit boundary
                    self.fix([pa, pb], f"{where}: layouts do not line up")
                    self.fix(qa, f"{where}: layouts do not line up")
                    self.fix(qb, f"{where}: layouts do not line up")
                    return
                if big is pa:
                    qa.extendleft(reversed(parts))
                    qb.appendleft(pb)
                else:
                    qb.extendleft(reversed(parts))
                    qa.appendleft(pa)
                continue
            ia, ib = self.inner(pa), self.inner(pb)
            if ia == ib:
                self.union(pa.basis, pb.basis, where)
                continue
            if (ia < 1 and ib == 1) or (ib < 1 and ia == 1):
                self.tie([pa], [pb], where)  # heads (blocks) of one basis meet units of another
                continue
            ok = self.make_integer(pa, where) and self.make_integer(pb, where)
            ia, ib = self.inner(pa), self.inner(pb)
            if ok and ia != ib:
                lo, hi = (pa, pb) if ia < ib else (pb, pa)
                ratio = max(ia, ib) / min(ia, ib)
                ok = ratio.denominator == 1 and self.coarsen(lo.basis, int(ratio), where)
                if not ok:
                    g = math.gcd(self.b[self.find(pa.basis)].size, self.b[self.find(pb.basis)].size)
                    ok = self.coarsen(pa.basis, self.b[self.find(pa.basis)].size // g, where)
                    ok = ok and self.coarsen(pb.basis, self.b[self.find(pb.basis)].size // g, where)
            if ok and self.inner(pa) == self.inner(pb):
                self.union(pa.basis, pb.basis, where)
            else:
                self.fix([pa, pb], f"{where}: units of different widths meet")

    def attach(
        self, layout: Layout, param: str, dim: int, role: Role, start: int, order: tuple[int, ...]
    ) -> None:
        """Record that ``param``'s axis ``dim`` (from entry ``start``) is laid out like ``layout``."""
        off = start
        for p in self.leaves(layout):
            if self.inner(p) < 1 and role == "out" and self.b[self.find(p.basis)].fixed is None:
                # a parameter along a head axis (a relative position bias table): its own basis, tied by heads
                c = self.new(p.entries, param.removesuffix(".weight"), order)
                self.b[c].axes.append(Axis(param, dim, role, 1, off))
                self.tie([p], [Piece(c, p.entries)], f"{param}[{dim}]")
                off += p.entries
                continue
            if not self.make_integer(p, f"{param}[{dim}] reads units spread over several entries"):
                off += p.entries
                continue
            r = self.find(p.basis)
            self.b[r].axes.append(Axis(param, dim, role, int(self.inner(p)), off))
            off += p.entries

    def slice(self, layout: Layout, lo: int, hi: int, where: str) -> Layout | None:
        """The part of ``layout`` covering entries ``[lo, hi)``; ``None`` (bases fixed) if it cuts a unit."""
        while True:
            off, todo = 0, None
            for p in self.leaves(layout):
                a, z = max(lo, off), min(hi, off + p.entries)
                if a < z and (a, z) != (off, off + p.entries):
                    todo = (p, a - off, z - off)
                    break
                off += p.entries
            if todo is None:
                break
            p, a, z = todo
            q = self.inner(p)
            ua, uz = Fraction(a) / q, Fraction(z) / q
            size = self.b[self.find(p.basis)].size
            if ua.denominator != 1 or uz.denominator != 1:
                self.fix(layout, f"{where}: a slice [{lo}:{hi}] cuts through units")
                return None
            sizes = [int(ua), int(uz - ua), size - int(uz)]
            if not self.can_split(p.basis, sizes) or self.tied(p.basis):
                self.fix(layout, f"{where}: a slice [{lo}:{hi}] cuts through attention heads")
                return None
            self.split(p.basis, sizes, where)
        out, off = [], 0
        for p in self.leaves(layout):
            if lo <= off and off + p.entries <= hi:
                out.append(p)
            off += p.entries
        return tuple(out)

    def constrain_blocks(self, layout: Layout, block: int, where: str) -> None:
        """Units must respect contiguous groups of ``block`` entries (GroupNorm groups, grouped convs)."""
        while True:
            off, todo = 0, None
            for p in self.leaves(layout):
                e = p.entries
                b = self.b[self.find(p.basis)]
                q = self.inner(p)
                if b.fixed is not None:
                    off += e
                    continue
                if q.denominator != 1:
                    self.fix([p], f"{where}: groups of {block} channels meet head blocks")
                    off += e
                    continue
                r = int(q)
                if r % block == 0 and off % block == 0:
                    off += e
                    continue
                if off // block == (off + e - 1) // block:  # inside one group: any permutation is fine
                    off += e
                    continue
                if block % r or off % r:
                    self.fix([p], f"{where}: groups of {block} channels cut through units of {r}")
                    off += e
                    continue
                per = block // r  # units per group
                head = min(((-off) % block) // r, b.size)
                full = (b.size - head) // per
                tail = b.size - head - full * per
                if head or tail:
                    sizes = [head, full * per, tail]
                    if not self.can_split(p.basis, sizes) or self.tied(p.basis):
                        self.fix(
                            [p], f"{where}: groups of {block} channels conflict with the blocks of {b.name!r}"
                        )
                        off += e
                        continue
                    todo = (p, sizes)
                    break
                self.combine_blocks(p.basis, full, where)
                off += e
            if todo is None:
                return
            self.split(todo[0].basis, todo[1], where)
