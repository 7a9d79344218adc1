"""One walk over an exported graph: abstract values per node, constraints on bases, then the Structure.

The rules (``mergelab.structure.discover.rules``) turn each ATen op into constraints; this module holds what they
share: the environment, parameter views, the broadcasting (elementwise) rule, axis permutations, matrix products,
and the final assembly of groups, fixed axes and probes. Reshapes live in
:mod:`~mergelab.structure.discover.reshape`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import fx, nn

from mergelab.structure.discover.bases import Bases, Layout, Piece, entries
from mergelab.structure.discover.reshape import reshape as _reshape
from mergelab.structure.discover.values import Act, Other, Pair, Param, Seq, T, flat, tensor_like
from mergelab.structure.types import Axis, Role, Structure

__all__ = ["Walk", "UnsupportedOp"]

Rule = Callable[["Walk", list[Any], dict[str, Any]], Any]
OUTPUT_REASON = "model output"
INPUT_REASON = "meets a tensor in a fixed order (the model input or a constant)"


class UnsupportedOp(ValueError):
    """A tracked tensor reached an op without a rule."""


def describe(val: Any) -> Any:
    """A light description of a node's ``meta['val']``: shapes for tensors, plain values otherwise."""
    if isinstance(val, torch.Tensor):
        return T(tuple(int(s) for s in val.shape))
    if isinstance(val, (list, tuple)):
        return tuple(describe(v) for v in val)
    if isinstance(val, torch.SymInt):
        return int(val)
    return val


def arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def c(x: Any) -> Any:
    """Concrete Python value (unwraps ``Other``)."""
    if isinstance(x, Other):
        return x.value
    if isinstance(x, (list, tuple)):
        return type(x)(c(v) for v in x)
    return x


def ndim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


class Walk:
    """Abstract interpretation of one exported program (see the package docstring)."""

    def __init__(self, model: nn.Module, ep: torch.export.ExportedProgram, rules: dict[str, Rule]) -> None:
        self.model, self.ep, self.rules = model, ep, rules
        self.u = Bases()
        self.env: dict[fx.Node, Any] = {}
        self.producers: dict[str, int] = {}
        self.pinned: dict[tuple[str, int | None], str] = {}
        self.reads: list[tuple[fx.Node, fx.Node, str]] = []  # (reading op, its input node, weight)
        self.made: list[tuple[fx.Node, int]] = []  # (producing op, basis)
        self.node: fx.Node | None = None
        self.index = 0
        sd = model.state_dict(keep_vars=True)
        by_id: dict[int, list[str]] = {}
        for k, v in sd.items():
            by_id.setdefault(id(v), []).append(k)
        self.canon = {k: ks[0] for ks in by_id.values() for k in ks}
        self.aliases = {ks[0]: ks for ks in by_id.values()}
        self.shapes = {k: tuple(v.shape) for k, v in sd.items()}
        sig = ep.graph_signature
        self.placeholder_params: dict[str, str] = {}
        for mapping in (sig.inputs_to_parameters, sig.inputs_to_buffers):
            for ph, fqn in mapping.items():
                if fqn in self.canon:
                    self.placeholder_params[ph] = self.canon[fqn]
        self.modules = dict(model.named_modules())

    # -- locations and errors -------------------------------------------------------------------------------

    def module_path(self, node: fx.Node | None = None) -> str:
        node = node or self.node
        stack = (node.meta.get("nn_module_stack") if node is not None else None) or {}
        return list(stack.values())[-1][0] if stack else ""

    def where(self, node: fx.Node | None = None) -> str:
        node = node or self.node
        assert node is not None
        path = self.module_path(node)
        loc = f"module {path!r}" if path else "the model's own forward"
        return f"{_op_name(node)} at node {node.name!r} ({loc})"

    def unsupported(self, reason: str = "") -> UnsupportedOp:
        msg = f"discover_structure: no rule for {self.where()}"
        return UnsupportedOp(msg + (f": {reason}" if reason else ""))

    def order(self, k: int = 0) -> tuple[int, ...]:
        return (self.index, k)

    def out(self) -> Any:
        assert self.node is not None
        return describe(self.node.meta.get("val"))

    def out_shape(self, i: int | None = None) -> tuple[int, ...]:
        d = self.out()
        if i is not None:
            d = d[i]
        if not isinstance(d, T):
            raise self.unsupported(f"expected a tensor output, got {d!r}")
        return d.shape

    def fresh(self, desc: Any = None) -> Any:
        desc = self.out() if desc is None else desc
        if isinstance(desc, T):
            return Act(desc.shape)
        if isinstance(desc, tuple):
            return Seq(tuple(self.fresh(d) for d in desc))
        return Other(desc)

    # -- the walk -------------------------------------------------------------------------------------------

    def run(self) -> Structure:
        for idx, node in enumerate(self.ep.graph.nodes):
            self.node, self.index = node, idx
            if node.op == "placeholder":
                self.env[node] = self.placeholder(node)
                continue
            args = fx.node.map_aggregate(node.args, lambda a: self.env[a] if isinstance(a, fx.Node) else a)
            kwargs = fx.node.map_aggregate(
                node.kwargs, lambda a: self.env[a] if isinstance(a, fx.Node) else a
            )
            if node.op == "output":
                self.output(args)
            elif node.op == "call_function":
                self.env[node] = self.call(node, list(args), dict(kwargs))
            else:
                self.env[node] = self.fresh()
        return self.finish()

    def placeholder(self, node: fx.Node) -> Any:
        desc = self.out()
        name = self.placeholder_params.get(node.name)
        if isinstance(desc, T) and name is not None:
            return Param(desc.shape, name, tuple((d, 0) for d in range(len(desc.shape))))
        return self.fresh(desc)

    def output(self, args: Any) -> None:
        for v in flat(args):
            if isinstance(v, Act):
                self.fix_act(v, OUTPUT_REASON, hidden=False)
            elif isinstance(v, Param):
                self.pin(v, OUTPUT_REASON)

    def call(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if node.target is operator.getitem:
            base, i = args[0], c(args[1])
            if isinstance(base, Seq):
                return base.items[i]
            return self.fresh()
        key = _op_key(node)
        rule = self.rules.get(key)
        args = [self.clean(a) if isinstance(a, Act) else a for a in args]
        if rule is not None:
            result = rule(self, args, kwargs)
            if result is not NotImplemented:
                return result
        values = flat([args, kwargs])
        if any(isinstance(v, Act) and v.tracked for v in values):
            raise self.unsupported()
        for v in values:
            if isinstance(v, Param):
                self.pin(v, f"used by {_op_name(node)}, which has no rule")
        return self.fresh()

    # -- parameters -----------------------------------------------------------------------------------------

    def pin(self, v: Any, reason: str, dim: int | None = None) -> None:
        if isinstance(v, Param):
            self.pinned.setdefault((v.name, dim), reason)

    def pin_all(self, values: Iterable[Any], reason: str) -> None:
        for v in flat(values):
            self.pin(v, reason)

    def attach(self, layout: Layout, name: str, d: tuple[int, int] | None, role: Role = "out") -> None:
        """Parameter ``name``'s dim ``d[0]`` from entry ``d[1]`` lies along ``layout`` (``None``: broadcast)."""
        if d is None:
            return
        pdim, off = d
        if off + entries(layout) > self.shapes[name][pdim]:
            self.pinned.setdefault((name, pdim), "a view of it does not fit its axis")
            self.u.fix(layout, f"{name}[{pdim}] is read in a way discovery cannot follow")
            return
        self.u.attach(layout, name, pdim, role, off, self.order())

    def read(self, layout: Layout, weight: str, dim: int, start: int = 0) -> None:
        """The current op reads ``layout`` through ``weight``'s input axis ``dim``."""
        self.u.attach(layout, weight, dim, "in", start, self.order())
        assert self.node is not None
        src = self.node.args[0] if _op_key(self.node) != "aten.addmm" else self.node.args[1]
        if isinstance(src, fx.Node):
            self.reads.append((self.node, src, weight))

    def producer(self, key: str, size: int, name: str, blocks: int = 1) -> tuple[int, bool]:
        if key in self.producers:
            return self.producers[key], False
        b = self.u.new(size, name, self.order(), blocks=blocks)
        self.producers[key] = b
        assert self.node is not None
        self.made.append((self.node, b))
        return b, True

    # -- tracked values -------------------------------------------------------------------------------------

    def clean(self, a: Act) -> Act:
        """Drop pairs whose head layout has been coarsened elsewhere (their head axis becomes a plain layout)."""
        if not a.pairs:
            return a
        axes, pairs = dict(a.axes), {}
        for d, (hs, lay) in a.pairs.items():
            m = a.shape[d]
            if all(self.u.inner(p) == Fraction(1, m) for p in self.u.leaves(lay)):
                pairs[d] = (hs, lay)
                continue
            self.unpair(axes, d, hs, lay, a.shape, "heads were coarsened")
        return Act(a.shape, axes, pairs)

    def unpair(
        self,
        axes: dict[int, Layout],
        d: int,
        hs: tuple[int, ...],
        lay: Layout,
        shape: Sequence[int],
        why: str,
    ) -> None:
        ok = all(self.u.make_integer(p, f"{self.where()}: {why}") for p in self.u.leaves(lay))
        if ok and len(hs) == 1:
            axes[hs[0]] = lay
        elif len(hs) == 1 and all(self.u.b[self.u.find(p.basis)].fixed for p in self.u.leaves(lay)):
            pass
        else:
            self.u.fix(lay, f"{self.where()}: {why}")

    def degrade(self, a: Act, d: int, why: str) -> Act:
        """Give up the within-head units of pair ``d``: heads become whole units on the head axis."""
        if d not in a.pairs:
            return a
        axes, pairs = dict(a.axes), dict(a.pairs)
        hs, lay = pairs.pop(d)
        self.unpair(axes, d, hs, lay, a.shape, why)
        return self.clean(Act(a.shape, axes, pairs))

    def degrade_all(self, a: Act, why: str) -> Act:
        for d in list(a.pairs):
            a = self.degrade(a, d, why)
        return a

    def fix_act(self, a: Act, reason: str, hidden: bool = True) -> None:
        for lay in a.axes.values():
            self._fix(lay, reason, hidden)
        for _, lay in a.pairs.values():
            self._fix(lay, reason, hidden)

    def _fix(self, lay: Layout, reason: str, hidden: bool) -> None:
        for p in self.u.leaves(lay):
            r = self.u.find(p.basis)
            if not hidden and self.u.b[r].fixed is None:
                self.u.b[r].hidden = False
            self.u.fix_basis(r, reason)

    def plain_from(self, a: Any, reason: str) -> Act:
        """Fix everything ``a`` carries and return a plain tensor of the op's output shape."""
        if isinstance(a, Act):
            self.fix_act(a, f"{self.where()}: {reason}")
        return Act(self.out_shape())

    # -- elementwise (broadcasting) -------------------------------------------------------------------------

    def elementwise(self, operands: list[Any], shape: tuple[int, ...] | None = None) -> Any:
        """A broadcasting op: unify tracked axes, attach parameters, fix units against plain full tensors."""
        if shape is None:
            desc = self.out()
            if not isinstance(desc, T):
                ops = [v for v in flat(operands) if isinstance(v, Act) and v.tracked]
                if ops:
                    raise self.unsupported("elementwise op without a tensor output")
                return self.fresh(desc)
            shape = desc.shape
        ops = [self.clean(v) if isinstance(v, Act) else v for v in flat(operands) if tensor_like(v)]
        nd = len(shape)
        if not any(isinstance(v, Act) and v.tracked for v in ops):
            params = [v for v in ops if isinstance(v, Param)]
            if len(params) == 1:
                p = params[0]
                pad = nd - len(p.shape)
                busy = [j + pad for j, d in enumerate(p.dims) if d is not None and p.shape[j] != 1]
                if all(_extent(v, j, nd) == 1 for v in ops if v is not p for j in busy):
                    return broadcast_param(p, shape)
            for p in params:
                self.pin(p, f"combined with a tensor in a fixed order at {self.where()}")
            return Act(shape)
        where = self.where()

        def out_axis(v: Any, k: int) -> int:
            return k + nd - len(v.shape)

        # within-head pairs survive only if every full operand on their axes has the same pair
        keys: dict[tuple[int, tuple[int, ...]], list[Layout]] = {}
        for v in ops:
            if isinstance(v, Act):
                for d, (hs, lay) in v.pairs.items():
                    keys.setdefault((out_axis(v, d), tuple(out_axis(v, h) for h in hs)), []).append(lay)
        keep: dict[int, Pair] = {}
        for (d, hs), lays in keys.items():
            ok = True
            for v in ops:
                have = isinstance(v, Act) and any(
                    (out_axis(v, dd), tuple(out_axis(v, h) for h in hh)) == (d, hs)
                    for dd, (hh, _) in v.pairs.items()
                )
                if not have and any(_extent(v, j, nd) != 1 for j in (d, *hs)):
                    ok = False
            if ok:
                for other in lays[1:]:
                    self.u.unify(lays[0], other, where)
                keep[d] = (hs, lays[0])
        ops = [
            self._drop_pairs_except(v, {k - (nd - len(v.shape)) for k in keep}) if isinstance(v, Act) else v
            for v in ops
        ]
        pair_axes = set(keep)
        for hs, _ in keep.values():
            pair_axes.update(hs)
        axes: dict[int, Layout] = {}
        for j in range(nd):
            if j in pair_axes:
                continue
            layouts: list[Layout] = []
            plain_full = False
            attach: list[tuple[str, tuple[int, int] | None]] = []
            for v in ops:
                k = j - (nd - len(v.shape))
                ext = v.shape[k] if k >= 0 else 1
                if isinstance(v, Act):
                    if k >= 0 and k in v.axes:
                        if ext == shape[j]:
                            layouts.append(v.axes[k])
                        else:
                            self.u.fix(v.axes[k], f"{where}: one unit broadcast over many")
                    elif ext != 1:
                        plain_full = True
                elif ext != 1:
                    attach.append((v.name, v.dims[k]))
            if not layouts:
                for name, d in attach:
                    if d is not None:
                        self.pinned.setdefault(
                            (name, d[0]), f"lies along an axis in a fixed order at {where}"
                        )
                continue
            first = layouts[0]
            for other in layouts[1:]:
                self.u.unify(first, other, where)
            if plain_full:
                self.u.fix(first, f"{where}: {INPUT_REASON}")
            for name, d in attach:
                self.attach(first, name, d)
            axes[j] = first
        return Act(shape, axes, keep)

    def _drop_pairs_except(self, v: Act, keep: set[int]) -> Act:
        for d in list(v.pairs):
            if d not in keep:
                v = self.degrade(v, d, "the within-head axis meets a tensor that does not follow the heads")
        return v

    # -- axis permutations and reshapes ---------------------------------------------------------------------

    def permuted(self, v: Any, perm: Sequence[int], shape: tuple[int, ...]) -> Any:
        """Output axis ``i`` is input axis ``perm[i]``."""
        if isinstance(v, Param):
            return Param(shape, v.name, tuple(v.dims[p] for p in perm))
        if not isinstance(v, Act):
            return NotImplemented
        inv = {p: i for i, p in enumerate(perm)}
        return Act(
            shape,
            {inv[a]: lay for a, lay in v.axes.items()},
            {inv[d]: (tuple(inv[h] for h in hs), lay) for d, (hs, lay) in v.pairs.items()},
        )

    def reshape(self, v: Any, shape: tuple[int, ...]) -> Any:
        """A ``view``/``reshape`` of ``v`` to ``shape`` (see :mod:`mergelab.structure.discover.reshape`)."""
        return _reshape(self, v, shape)

    # -- matrix products ------------------------------------------------------------------------------------

    def dense(
        self,
        x: Act,
        weight: str,
        out_dim: int,
        in_dim: int,
        bias: Param | None,
        out_features: int,
        shape: tuple[int, ...],
        starts: tuple[int, int] = (0, 0),
    ) -> Act:
        """``y = x Wᵀ + b`` along ``x``'s last axis; ``weight``'s ``out_dim``/``in_dim`` index out/in units."""
        last = len(x.shape) - 1
        x = self.degrade(x, last, "read by a dense layer")
        if last in x.axes:
            self.read(x.axes[last], weight, in_dim, starts[1])
        for hs, lay in x.pairs.values():
            if last in hs:
                self.u.fix(lay, f"{self.where()}: heads read by a dense layer")
        name = weight.removesuffix(".weight")
        basis, new = self.producer(f"{weight}:{out_dim}:{starts[0]}", out_features, name)
        if new:
            self.u.b[basis].axes.append(Axis(weight, out_dim, "out", 1, starts[0]))
            if bias is not None and bias.dims[0] is not None:
                self.u.b[basis].axes.append(Axis(bias.name, bias.dims[0][0], "out", 1, bias.dims[0][1]))
        n = len(shape)
        axes = {a + n - len(x.shape): lay for a, lay in x.axes.items() if a != last}
        axes[n - 1] = (Piece(basis, out_features),)
        pairs = {
            d + n - len(x.shape): (tuple(h + n - len(x.shape) for h in hs), lay)
            for d, (hs, lay) in x.pairs.items()
        }
        return self.clean(Act(shape, axes, pairs))

    def param_dense(self, x: Act, w: Any, b: Any, out_axis: int, in_axis: int, shape: tuple[int, ...]) -> Any:
        """``x @ w``-like product with a parameter weight (``w``'s tensor axes ``out_axis``/``in_axis``)."""
        ok = isinstance(w, Param) and len(w.shape) == 2 and None not in w.dims
        ok = ok and (
            b is None
            or isinstance(b, Other)
            or (isinstance(b, Param) and len(b.shape) == 1 and b.dims[0] is not None)
        )
        if not ok:
            if isinstance(w, Act) and w.tracked:
                return NotImplemented
            self.pin_all([w, b], f"used as a weight by {self.where()} in a way discovery cannot follow")
            last = len(x.shape) - 1
            x = self.degrade(x, last, "contracted with a fixed weight")
            if last in x.axes:
                self.u.fix(x.axes[last], f"{self.where()}: contracted with a weight in a fixed order")
            n = len(shape)
            return Act(shape, {a + n - len(x.shape): lay for a, lay in x.axes.items() if a != last})
        assert isinstance(w, Param)
        (wo, so), (wi, si) = w.dims[out_axis], w.dims[in_axis]  # type: ignore[misc]
        bias = b if isinstance(b, Param) else None
        return self.dense(x, w.name, wo, wi, bias, w.shape[out_axis], shape, (so, si))

    def matmul(self, a: Any, b: Any, shape: tuple[int, ...]) -> Any:
        """``a @ b`` for any operands (parameters become dense layers, two activations contract units)."""
        if isinstance(a, Act) and isinstance(b, Param) and len(b.shape) == 2 and len(a.shape) >= 2:
            return self.param_dense(a, b, None, 1, 0, shape)
        if isinstance(a, Param) and isinstance(b, Act) and len(a.shape) == 2 and len(b.shape) >= 2:
            nd = len(b.shape)
            sw = list(range(nd))
            sw[-1], sw[-2] = sw[-2], sw[-1]
            bt = self.permuted(b, sw, tuple(b.shape[i] for i in sw))
            n = len(shape)
            so = list(range(n))
            so[-1], so[-2] = so[-2], so[-1]
            res = self.param_dense(bt, a, None, 0, 1, tuple(shape[i] for i in so))
            return self.permuted(res, so, shape) if isinstance(res, Act) else res
        if isinstance(a, Param):
            self.pin(a, f"multiplied at {self.where()}")
            a = Act(a.shape)
        if isinstance(b, Param):
            self.pin(b, f"multiplied at {self.where()}")
            b = Act(b.shape)
        if not (isinstance(a, Act) and isinstance(b, Act)):
            return NotImplemented
        return self.act_matmul(self.clean(a), self.clean(b), shape)

    def act_matmul(self, a: Act, b: Act, shape: tuple[int, ...]) -> Act:
        """``a @ b`` of two activations: contracted units must match, batch axes broadcast like elementwise."""
        where = self.where()
        if len(a.shape) < 2 or len(b.shape) < 2:
            self.fix_act(a, f"{where}: a vector product")
            self.fix_act(b, f"{where}: a vector product")
            return Act(shape)
        n = len(shape)
        na, nb = len(a.shape), len(b.shape)
        ca, cb = na - 1, nb - 2

        def oa(k: int) -> int:
            return k + n - na

        def ob(k: int) -> int:
            return k + n - nb

        out_axes: dict[int, Layout] = {}
        out_pairs: dict[int, Pair] = {}
        head_done: set[int] = set()  # output batch axes already handled as head axes
        # 1. the contracted axis
        if ca in a.pairs and cb in b.pairs:
            hsa, la = a.pairs[ca]
            hsb, lb = b.pairs[cb]
            if [oa(h) for h in hsa] == [ob(h) for h in hsb] and len(hsa) == 1 and oa(hsa[0]) < n - 2:
                self.u.unify(la, lb, where)
                out_axes[oa(hsa[0])] = la  # scores: one entry per head
                head_done.add(oa(hsa[0]))
            else:
                a = self.degrade(a, ca, "heads do not line up in a product")
                b = self.degrade(b, cb, "heads do not line up in a product")
        else:
            a = self.degrade(a, ca, "contracted with a tensor that does not follow the heads")
            b = self.degrade(b, cb, "contracted with a tensor that does not follow the heads")
        if ca in a.axes and cb in b.axes:
            self.u.unify(a.axes[ca], b.axes[cb], where)
        elif ca in a.axes:
            self.u.fix(a.axes[ca], f"{where}: contracted with a tensor in a fixed order")
        elif cb in b.axes:
            self.u.fix(b.axes[cb], f"{where}: contracted with a tensor in a fixed order")
        # 2. pairs that survive on the free axes (v's within-head axis): their heads must be batch axes
        for v, off_fn, free in ((a, oa, na - 2), (b, ob, nb - 1)):
            for d, (hs, lay) in v.pairs.items():
                if d == free and all(off_fn(h) < n - 2 for h in hs) and len(hs) == 1:
                    out_pairs[off_fn(d)] = ((off_fn(hs[0]),), lay)
        # 3. batch axes: unify (or tie heads of scores with heads of values)
        for j in range(n - 2):
            lays: list[tuple[Layout, bool]] = []  # (layout, is a pair's head layout)
            plain_full = False
            for v in (a, b):
                k = j - (n - len(v.shape))
                if k < 0 or v.shape[k] == 1:
                    continue
                if k in v.axes:
                    lays.append((v.axes[k], False))
                elif any(k in hs for hs, _ in v.pairs.values()):
                    pl = next(lay for hs, lay in v.pairs.values() if k in hs)
                    if j in head_done:
                        continue
                    lays.append((pl, True))
                else:
                    plain_full = True
            if j in head_done:
                for lay, _ in lays:
                    self.u.tie(out_axes[j], lay, where)
                continue
            if not lays:
                continue
            first, first_pair = lays[0]
            for lay, is_pair in lays[1:]:
                if first_pair or is_pair:
                    self.u.tie(first, lay, where)
                else:
                    self.u.unify(first, lay, where)
            if plain_full:
                self.u.fix(first, f"{where}: {INPUT_REASON}")
            if not first_pair and not any(p for _, p in lays):
                out_axes[j] = first
            elif not any(j in hs for hs, _ in out_pairs.values()):
                self.u.fix(first, f"{where}: heads do not reach the output of a product")
        # 4. the free axes
        for k, lay in a.axes.items():
            if k == na - 2:
                out_axes[n - 2] = lay
        for k, lay in b.axes.items():
            if k == nb - 1:
                out_axes[n - 1] = lay
        return self.clean(Act(shape, out_axes, out_pairs))

    # -- the result -----------------------------------------------------------------------------------------

    def finish(self) -> Structure:
        from mergelab.structure.discover.finish import assemble

        return assemble(self)


def _op_key(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}"
    if isinstance(t, torch._ops.OpOverloadPacket):
        return f"{t._qualified_op_name.replace('::', '.')}"
    return getattr(t, "__name__", str(t))


def _op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}.{t._overloadname}"
    return _op_key(node)


def op_overload(node: fx.Node) -> str:
    t = node.target
    return t._overloadname if isinstance(t, torch._ops.OpOverload) else ""


def _extent(v: Any, j: int, nd: int) -> int:
    k = j - (nd - len(v.shape))
    return v.shape[k] if k >= 0 else 1


def broadcast_param(p: Param, shape: tuple[int, ...]) -> Param:
    pad = len(shape) - len(p.shape)
    dims = [None if p.shape[k] != shape[k + pad] else d for k, d in enumerate(p.dims)]
    return Param(shape, p.name, (None,) * pad + tuple(dims))
