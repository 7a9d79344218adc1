"""Reshapes in the walk: how units, heads and packed projections travel through ``view``/``reshape``.

Both shapes are refined to their common factors; each tracked axis (a layout of unit bases) and each
head/within-head pair is carried through the refined axes and merged back into the output axes. What a reshape
mixes or splits beyond that is fixed with the reason (see :class:`~mergelab.structure.discover.walk.Walk`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mergelab.structure.discover.bases import Layout, Piece, entries
from mergelab.structure.discover.values import Act, Pair, Param

if TYPE_CHECKING:
    from mergelab.structure.discover.walk import Walk

__all__ = ["reshape"]


def reshape(w: Walk, v: Any, shape: tuple[int, ...]) -> Any:
    """The abstract value of ``v`` viewed as ``shape``: refine both shapes to common factors, carry each tracked
    axis (and head/within-head pair) through them, and fix the units a reshape mixes or splits."""
    if isinstance(v, Param):
        return _reshape_param(w, v, shape)
    if not isinstance(v, Act):
        return NotImplemented
    if not v.tracked:
        return Act(shape)
    if tuple(v.shape) == tuple(shape):
        return v
    where = w.where()
    # axes of one entry carry nothing useful: drop them (a tracked one is a single unit: fix it)
    for a in [a for a in v.busy() if v.shape[a] == 1]:
        v = w.degrade_all(v, "a head axis of one entry")
        if a in v.axes:
            w.u.fix(v.axes[a], f"{where}: a single unit is reshaped")
            v = Act(v.shape, {k: lay for k, lay in v.axes.items() if k != a}, v.pairs)
    keep_in = [i for i, s in enumerate(v.shape) if s != 1]
    keep_out = [i for i, s in enumerate(shape) if s != 1]
    sin = [v.shape[i] for i in keep_in]
    sout = [shape[i] for i in keep_out]
    if math.prod(sin) != math.prod(sout):
        raise w.unsupported(f"reshape {v.shape} -> {shape}")
    bounds = sorted(set(_prefix(sin)) | set(_prefix(sout)))
    factors = [b // a for a, b in zip([1, *bounds[:-1]], bounds, strict=True)]
    # refined axes: each input axis is a run of factors
    runs_in = _runs(sin, factors)
    runs_out = _runs(sout, factors)
    mid_axes: dict[int, Layout] = {}
    mid_pairs: dict[int, Pair] = {}
    remap: dict[int, list[int]] = {}
    for i, a in enumerate(keep_in):
        remap[a] = runs_in[i]
    # head axes of pairs first (a split head axis becomes several joint head axes)
    for d, (hs, lay) in v.pairs.items():
        new_hs_l: list[int] = []
        for h in hs:
            rs = list(remap[h])
            if h == hs[0]:  # a leading batch factor of a (batch*heads) axis: peel off its copies
                while len(rs) > 1:
                    leaves = w.u.leaves(lay)
                    f = factors[rs[0]]
                    if not _periodic(leaves, entries(leaves) // f, f):
                        break
                    lay, rs = _take(leaves, entries(leaves) // f), rs[1:]
            new_hs_l.extend(rs)
        new_hs = tuple(new_hs_l)
        rd = remap[d]
        if len(rd) == 1:
            mid_pairs[rd[0]] = (new_hs, lay)
            continue
        # the within-head axis is split further: nest the heads when each head is a whole basis
        sizes = [factors[r] for r in rd]
        leaves = w.u.leaves(lay)
        if all(p.entries == 1 and w.u.b[w.u.find(p.basis)].blocks == 1 for p in leaves):
            try:
                outer = math.prod(sizes[:-1])
                for p in leaves:
                    w.u.combine_blocks(p.basis, outer, where)
                nested = tuple(Piece(p.basis, outer) for p in leaves)
                mid_pairs[rd[-1]] = ((*new_hs, *rd[:-1]), nested)
                continue
            except ValueError:
                pass
        tmp: dict[int, Layout] = {}
        w.unpair(tmp, d, hs, lay, v.shape, "the within-head axis is reshaped")
        for h, l2 in tmp.items():
            _split_axis(w, l2, [factors[r] for r in remap[h]], remap[h], mid_axes, mid_pairs, where)
    for a, lay in v.axes.items():
        rs = remap[a]
        if len(rs) == 1:
            mid_axes[rs[0]] = lay
        else:
            _split_axis(w, lay, [factors[r] for r in rs], rs, mid_axes, mid_pairs, where)
    # merge refined axes into output axes
    axes: dict[int, Layout] = {}
    pairs: dict[int, Pair] = {}
    owner = {r: j for j, rs in enumerate(runs_out) for r in rs}
    for d, (hs, lay) in mid_pairs.items():
        od, ohs = owner[d], [owner[h] for h in hs]
        run = runs_out[od]
        tail = [*hs, d]
        if all(o == od for o in ohs) and run[-len(tail) :] == tail:
            # heads and their units merge back into one unit axis (possibly after a plain batch axis)
            lead = math.prod(factors[r] for r in run[: len(run) - len(tail)])
            axes[keep_out[od]] = tuple(Piece(p.basis, p.entries * factors[d]) for p in lay) * lead
            continue
        leaves = w.u.leaves(lay)
        if len(hs) == 1 and run[-2:] == [d, hs[0]] and all(p.entries == 1 for p in leaves):
            # within-head axis before the head axis (a channel shuffle): entry (i, h) is unit i of head h,
            # so the heads can only keep their symmetry if they share one permutation: unify them
            sizes = {w.u.b[w.u.find(p.basis)].size for p in leaves}
            if len(sizes) == 1:
                for p in leaves[1:]:
                    w.u.union(leaves[0].basis, p.basis, where)
                lead = math.prod(factors[r] for r in run[:-2])
                axes[keep_out[od]] = (Piece(leaves[0].basis, factors[d] * factors[hs[0]]),) * lead
                continue
        if run == [d] and od not in ohs:
            if len(set(ohs)) == len(ohs) and all(runs_out[o] == [h] for o, h in zip(ohs, hs, strict=True)):
                pairs[keep_out[od]] = (tuple(keep_out[o] for o in ohs), lay)
                continue
            if len(set(ohs)) == 1 and runs_out[ohs[0]][-len(hs) :] == list(hs):
                o = ohs[0]
                lead = math.prod(factors[r] for r in runs_out[o][: len(runs_out[o]) - len(hs)])
                pairs[keep_out[od]] = ((keep_out[o],), lay * lead)
                continue
        tmp2: dict[int, Layout] = {}
        w.unpair(tmp2, d, hs, lay, factors, "heads are reshaped with other axes")
        mid_axes.update(tmp2)
    for j, run in enumerate(runs_out):
        tracked = [r for r in run if r in mid_axes]
        if not tracked:
            continue
        if len(tracked) > 1:
            for r in tracked:
                w.u.fix(mid_axes[r], f"{where}: reshape {v.shape} -> {shape} mixes two unit axes")
            continue
        r = tracked[0]
        lay = mid_axes[r]
        k = run.index(r)
        lead = math.prod(factors[x] for x in run[:k])
        trail = math.prod(factors[x] for x in run[k + 1 :])
        if trail > 1:
            for p in w.u.leaves(lay):
                w.u.make_integer(p, f"{where}: heads are merged with another axis")
            lay = tuple(Piece(p.basis, p.entries * trail) for p in w.u.leaves(lay))
        axes[keep_out[j]] = lay * lead
    return w.clean(Act(shape, axes, pairs))


def _split_axis(
    w: Walk,
    lay: Layout,
    sizes: list[int],
    rs: list[int],
    axes: dict[int, Layout],
    pairs: dict[int, Pair],
    where: str,
) -> None:
    """Split one tracked axis of layout ``lay`` into refined axes ``rs`` of the given sizes."""
    leaves = w.u.leaves(lay)
    rest = math.prod(sizes[1:])
    # 1. every unit owns whole runs of the trailing axes: units stay on the first axis
    whole = all(w.u.inner(p).denominator == 1 and int(w.u.inner(p)) % rest == 0 for p in leaves)
    if whole and all(off % rest == 0 for off in _offsets(leaves)):
        axes[rs[0]] = tuple(Piece(p.basis, p.entries // rest) for p in leaves)
        return
    # 2. the layout repeats along the first axis (a batch*heads axis): the rest carries one copy
    n0 = sizes[0]
    period = entries(leaves) // n0
    if n0 > 1 and _periodic(leaves, period, n0):
        one = _take(leaves, period)
        if len(sizes) == 2:
            axes[rs[1]] = one
        else:
            _split_axis(w, one, sizes[1:], rs[1:], axes, pairs, where)
        return
    # 3. fine units split into (heads, within-head): a pair; with three or more axes the first one
    #    separates packed projections (q, k, v) into bases of their own
    if all(w.u.inner(p) == 1 for p in leaves) and len(sizes) >= 2:
        m = rest
        if len(sizes) >= 3:
            parts: list[Piece] = []
            ok = True
            for i in range(n0):
                part = w.u.slice(lay, i * rest, (i + 1) * rest, where)
                if part is None or len(w.u.leaves(part)) != 1:
                    ok = False
                    break
                parts.extend(Piece(p.basis, 1) for p in w.u.leaves(part))
            if ok:
                try:
                    outer = math.prod(sizes[1:-1])
                    nested = []
                    for p in parts:
                        w.u.combine_blocks(p.basis, outer, where)
                        nested.append(Piece(p.basis, outer))
                    pairs[rs[-1]] = (tuple(rs[:-1]), tuple(nested))
                    return
                except ValueError:
                    pass
            w.u.fix(lay, f"{where}: a reshape splits packed units")
            return
        if all(p.entries % m == 0 for p in leaves) and all(o % m == 0 for o in _offsets(leaves)):
            try:
                for p in leaves:
                    w.u.combine_blocks(p.basis, p.entries // m, where)
                pairs[rs[1]] = ((rs[0],), tuple(Piece(p.basis, p.entries // m) for p in leaves))
                return
            except ValueError:
                pass
    w.u.fix(lay, f"{where}: a reshape splits units over several axes")


def _reshape_param(w: Walk, v: Param, shape: tuple[int, ...]) -> Any:
    dims: list[tuple[int, int] | None] = [None] * len(shape)
    for k, d in enumerate(v.dims):
        if d is None or v.shape[k] == 1:
            continue
        m = _map_axis(v.shape, k, shape)
        if m is None or dims[m] is not None:
            w.pin(v, f"reshaped by {w.where()}")
            return Act(shape)
        dims[m] = d
    return Param(shape, v.name, tuple(dims))


def _prefix(sizes: Sequence[int]) -> list[int]:
    out, acc = [], 1
    for s in sizes:
        acc *= s
        out.append(acc)
    return out


def _runs(sizes: Sequence[int], factors: Sequence[int]) -> list[list[int]]:
    runs, i = [], 0
    for s in sizes:
        run, acc = [], 1
        while acc < s:
            acc *= factors[i]
            run.append(i)
            i += 1
        runs.append(run)
    return runs


def _offsets(leaves: Sequence[Piece]) -> list[int]:
    out, off = [], 0
    for p in leaves:
        out.append(off)
        off += p.entries
    return out


def _periodic(leaves: Sequence[Piece], period: int, copies: int) -> bool:
    one = _take(leaves, period)
    if entries(one) != period:
        return False
    return list(leaves) == list(one) * copies


def _take(leaves: Sequence[Piece], n: int) -> Layout:
    out, acc = [], 0
    for p in leaves:
        if acc >= n:
            break
        out.append(p)
        acc += p.entries
    return tuple(out)


def _map_axis(in_shape: Sequence[int], d: int, out_shape: Sequence[int]) -> int | None:
    """The output axis holding input axis ``d`` unchanged (same extent, same position in row-major order)."""
    prefix = math.prod(in_shape[:d])
    acc = 1
    for j, f in enumerate(out_shape):
        if (
            acc == prefix
            and f == in_shape[d]
            and math.prod(out_shape[j + 1 :]) == math.prod(in_shape[d + 1 :])
        ):
            return j
        acc *= f
    return None
