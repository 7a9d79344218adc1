"""Turn the bases of a finished walk into a :class:`Structure`: groups, ties, fixed units and probes."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torch import fx, nn

from mergelab.structure.discover.bases import Piece
from mergelab.structure.discover.values import Act
from mergelab.structure.types import Axis, Fixed, Group, Probe, Structure

if TYPE_CHECKING:
    from mergelab.structure.discover.walk import Walk

__all__ = ["assemble"]


def assemble(w: Walk) -> Structure:
    u = w.u
    # 1. an axis claimed by several bases (weight sharing, a packed weight read twice) unifies them
    changed = True
    while changed:
        changed = False
        claims: dict[tuple[str, int, int], tuple[int, Axis]] = {}
        for r in u.roots():
            for a in u.b[r].axes:
                key = (a.param, a.dim, a.start)
                if key not in claims:
                    claims[key] = (r, a)
                    continue
                r0, a0 = claims[key]
                r0 = u.find(r0)
                if r0 == u.find(r):
                    continue
                if a0.inner != a.inner or u.b[r0].size != u.b[r].size:
                    reason = f"{a.param}[{a.dim}] is laid out two ways"
                    u.fix_basis(r0, reason)
                    u.fix_basis(r, reason)
                    continue
                u.unify(
                    (Piece(r0, u.b[r0].size),), (Piece(r, u.b[r].size),), f"shared tensor {a.param}[{a.dim}]"
                )
                changed = True
                break
            if changed:
                break
    # 2. overlapping claims on one tensor axis (partial views of a parameter) are kept fixed
    spans: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
    for r in u.roots():
        for a in {(a.param, a.dim, a.start, a.inner): a for a in u.b[r].axes}.values():
            spans.setdefault((a.param, a.dim), []).append((a.start, a.start + u.b[r].size * a.inner, r))
    for (param, dim), lst in spans.items():
        lst.sort()
        for (_, e0, r0), (s1, _, r1) in zip(lst, lst[1:], strict=False):
            if s1 < e0 and r0 != r1:
                reason = f"{param}[{dim}] is laid out two ways"
                u.fix_basis(r0, reason)
                u.fix_basis(r1, reason)
    # 3. pinned parameters fix every basis touching them; fixed tie members fix their ties
    for r in u.roots():
        for a in u.b[r].axes:
            reason = w.pinned.get((a.param, None)) or w.pinned.get((a.param, a.dim))
            if reason:
                u.fix_basis(r, f"{a.param} {reason}")
                break
    ties: list[set[int]] = []
    for a, c in u.ties:
        members = {u.find(a), u.find(c)}
        members = {m for m in members if not u.b[m].children}
        for other in [t for t in ties if t & members]:
            members |= other
            ties.remove(other)
        ties.append(members)
    again = True
    while again:
        again = False
        for members in ties:
            fixed = [u.b[m].fixed for m in members if u.b[m].fixed]
            blocks = {u.b[m].blocks for m in members}
            if fixed or len(blocks) > 1:
                reason = fixed[0] if fixed else f"tied heads with different block counts {sorted(blocks)}"
                for m in members:
                    if u.b[m].fixed is None:
                        u.fix_basis(m, f"tied to a fixed attention basis ({reason})")
                        again = True
    # 4. groups in forward order
    live = sorted(
        (r for r in u.roots() if u.b[r].fixed is None and u.b[r].axes and u.b[r].size > 1),
        key=lambda r: u.b[r].order,
    )
    probes = _probes(w, set(live))
    names: dict[int, str] = {}
    used: set[str] = set()
    groups: list[Group] = []

    def unique_name(base: str) -> str:
        name, k = base, 2
        while name in used:
            name, k = f"{base}#{k}", k + 1
        used.add(name)
        return name

    def axes_of(r: int) -> tuple[Axis, ...]:
        unique: dict[tuple[str, int, int], Axis] = {}
        for a in u.b[r].axes:
            unique.setdefault((a.param, a.dim, a.start), a)
        return tuple(replace(a, param=alias) for a in unique.values() for alias in w.aliases[a.param])

    tied = {m for t in ties for m in t if len(t) > 1}
    for r in live:
        b = u.b[r]
        names[r] = unique_name(b.name)
        blocks = b.blocks if (b.blocks < b.size or r in tied) else 1
        groups.append(Group(names[r], b.size, axes_of(r), blocks, tuple(probes.get(r, ()))))
    tie_names = [tuple(names[m] for m in sorted(t, key=lambda m: u.b[m].order) if m in names) for t in ties]
    fixed = []
    for r in sorted((r for r in u.roots() if u.b[r].fixed and u.b[r].axes), key=lambda r: u.b[r].order):
        b = u.b[r]
        fixed.append(Fixed(b.name, b.size, axes_of(r), str(b.fixed), b.hidden))
    seen: set[tuple[str, ...]] = set()
    out_ties = []
    for t in tie_names:
        if len(t) > 1 and t not in seen:
            seen.add(t)
            out_ties.append(t)
    return Structure(tuple(groups), tuple(out_ties), tuple(fixed))


def _innermost(node: fx.Node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    key, (path, _) = list(stack.items())[-1]
    return key, path


def _leaf(w: Walk, path: str) -> nn.Module | None:
    mod = w.modules.get(path)
    if mod is None or next(mod.children(), None) is not None:
        return None
    return mod


def _where_units(w: Walk, value: object, r: int) -> list[tuple[int, int, int]]:
    """``(dim, start, inner)`` for every whole occurrence of basis ``r`` on a plain layout of ``value``."""
    if not isinstance(value, Act):
        return []
    out = []
    for dim, lay in value.axes.items():
        off = 0
        for p in w.u.leaves(lay):
            q = w.u.inner(p)
            if w.u.find(p.basis) == r and q.denominator == 1:
                out.append((dim, off, int(q)))
            off += p.entries
    return out


def _output_of(w: Walk, x: fx.Node) -> str:
    """The leaf module whose output ``x`` is (``""`` when ``x`` is computed outside leaf modules)."""
    inner = _innermost(x)
    if inner is None or _leaf(w, inner[1]) is None:
        return ""
    users = [u for u in x.users if (_innermost(u) or ("", ""))[0] == inner[0]]
    return "" if users else inner[1]


def _unflattened(w: Walk, x: fx.Node, r: int) -> Probe | None:
    """Walk back from a flattened tensor to the nearest leaf-module output holding ``r`` one entry per unit."""
    node = x
    for _ in range(8):
        prev = [a for a in node.all_input_nodes if isinstance(w.env.get(a), Act)]
        if len(prev) != 1:
            return None
        node = prev[0]
        found = [u for u in _where_units(w, w.env.get(node), r) if u[2] == 1]
        if found:
            src = _output_of(w, node)
            dim, start, _ = found[0]
            return Probe(src, dim, "output", start) if src else None
    return None


def _probes(w: Walk, live: set[int]) -> dict[int, list[Probe]]:
    """Where each live group can be observed on the eager model (module forward hooks).

    First choice: the input of every leaf module that reads the group (a ``Linear``/conv/``Conv1D`` whose weight
    has an ``"in"`` axis on it), so a residual stream is sampled at each reader, as with fx probes. Groups read
    by no module are observed at the output of the leaf modules that produce them.
    """
    out: dict[int, list[Probe]] = {}
    seen: set[tuple[int, fx.Node]] = set()  # one probe per (group, tensor): q/k/v read the same input
    for node, src, weight in w.reads:
        inner = _innermost(node)
        if inner is None:
            continue
        key, path = inner
        if _leaf(w, path) is None or not weight.startswith(f"{path}."):
            continue
        x = src
        while (x.meta.get("nn_module_stack") or {}).get(key) is not None:  # walk out of the module's forward
            prev = [a for a in x.all_input_nodes if "val" in a.meta]
            if len(prev) != 1:
                break
            x = prev[0]
        if (x.meta.get("nn_module_stack") or {}).get(key) is not None:
            continue
        value = w.env.get(x)
        for r in live:
            if (r, x) in seen:
                continue
            for dim, start, k in _where_units(w, value, r):
                seen.add((r, x))
                p = Probe(path, dim, "input", start, k, _output_of(w, x))
                if k > 1 or not p.source:  # a flattened map: prefer the map where a module outputs it
                    p = _unflattened(w, x, r) or p
                if p not in out.setdefault(r, []):
                    out[r].append(p)
    nodes = list(w.ep.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    for node, b in w.made:
        r = w.u.find(b)
        inner = _innermost(node)
        if inner is None:
            continue
        key, path = inner
        if _leaf(w, path) is None:
            continue
        i = index[node]
        while i + 1 < len(nodes) and (_innermost(nodes[i + 1]) or ("", ""))[0] == key:
            i += 1
        value = w.env.get(nodes[i])
        for rr in live:
            if out.get(rr) and any(p.site == "input" for p in out[rr]):
                continue
            for dim, start, k in _where_units(w, value, rr):
                p = Probe(path, dim, "output", start, k)
                if p not in out.setdefault(rr, []):
                    out[rr].append(p)
    return {r: ps for r, ps in out.items() if ps}
