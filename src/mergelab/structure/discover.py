"""Discover a network's permutation symmetries by tracing it with ``torch.fx``.

:func:`discover_structure` turns an ``nn.Module`` into a :class:`~mergelab.structure.types.Structure`: the
groups of tensor axes that share one hidden-unit basis. Adding an architecture to mergelab means nothing more
than this discovery being right, so the rules below are conservative: a basis becomes a group only if every op
that touches it is one whose behaviour under a unit permutation we know.

Design choices
--------------
* **Abstract interpretation over the fx graph.** The model is traced with ``symbolic_trace`` (with
  :class:`~mergelab.models.attention.MultiHeadSelfAttention` and ``nn.MultiheadAttention`` kept as leaves) and
  run once on ``example_input`` through a ``ShapeProp`` subclass that records every node's output shape and
  every non-tensor value (ints computed from ``x.size()``, slices, ...). We then walk the nodes in order and
  give each one an abstract value: a tensor with a *layout* on some of its axes, a parameter seen directly
  (``get_attr``), or a plain Python value.
* **Tracked axes and layouts.** A tensor may carry units on any number of its axes (usually one: the channel
  axis of a conv map, the last axis of a token sequence). An axis' layout is a list of *pieces*
  ``(basis, units, inner)``: after a concat it holds one piece per branch, after a flatten each unit owns
  ``inner`` consecutive entries. Untracked axes (batch, positions, tokens, the network input) are in a fixed
  order.
* **Union-find over unit bases.** Producers (``Linear``, ``Conv``, ``ConvTranspose``, ``Embedding``, the
  projections of attention leaves, ``F.linear``/``@`` with a parameter) create a basis; elementwise ops,
  activations, dropout, pooling, softmax and shape ops pass layouts along; norms attach their affine
  parameters and running statistics (role ``"out"``); two tracked operands of one elementwise op (a residual
  ``+``, a gate ``*``) are *unified* piece by piece. When the pieces of the two sides do not line up (a concat
  added to a single conv output, a slice ``x[:, :k]``), the coarser basis is *split* into sub-bases
  (``name[lo:hi]``) — the permutation must then keep each part in place, which is exactly the constraint.
  A basis records its tensor axes as it goes; when bases merge or split their axes follow.
* **Fixed bases.** A basis is *fixed* (never a group) when it reaches the model output, meets an untracked
  tensor of full extent (the model input in a residual ``x + f(x)``, a buffer that is not in the
  ``state_dict``), is read by a weight we cannot permute, or lands in a known op whose constraint our
  ``Axis``/``blocks`` vocabulary cannot express (a grouped convolution, a GroupNorm group straddling a
  concat boundary, a reshape that splits a unit). Fixing is always sound: an unpermuted axis leaves the
  function unchanged. Such cases are logged with ``logging.warning``.
* **Unknown ops fail loudly.** A tracked tensor flowing into an op without a rule raises ``ValueError``
  naming the op, the node and the module. Ops applied only to untracked tensors are harmless and need no
  rule. A parameter used in an op without a rule is *pinned*: every group touching it becomes fixed (a
  parameter laid along an untracked axis, e.g. a position embedding's token axis, pins only that axis).
* **Beyond the minimum.** Some ops are handled because their behaviour is provable: reductions over a tracked
  axis (``x.mean(1)``, ``x.sum(-1)``, a hand-written LayerNorm) are invariant, so their output is untracked;
  ``softmax``/``log_softmax``/``F.normalize`` are equivariant along any axis; ``cumsum``/``flip``/``roll``
  are accepted along untracked axes and rejected along tracked ones; ``chunk``/``split``/slicing split
  layouts; ``cat``/``stack`` of parameters (class tokens) attach them to the stream.
* **Blocks and ties.** ``GroupNorm(G, C)`` with ``1 < G < C`` requires blocks of ``C/G`` entries (pieces are
  split at group boundaries first); attention leaves produce a query/key group and a value/output group with
  ``blocks = heads``, tied so their head permutations agree. Combining two block counts requires them to be
  equal or one of them 1; anything else raises.
* **Weight sharing and aliases.** A module called twice reuses its output basis; an axis claimed by two bases
  (a shared weight read from two places, a packed ``in_proj_weight`` read by query, key and value) unifies
  them. Parameters tied under several ``state_dict`` keys get identical axes under every key.
* **Order and names.** Groups are sorted by the position of their first producer in the graph and named after
  it (``"layers.0"``, ``"blocks.0.attn.q"``); a residual stream is named after the stem/patch embedding.
  Parts of a split basis are named ``"conv[0:3]"``.
* **Probes.** Each group lists the fx nodes (of :func:`trace`'s graph) where its units can be observed: for
  every layer that reads the group, the nearest tensor at or before its input that holds exactly the group's
  units along one axis (so a residual stream gets one probe per reader). Groups read only inside an
  attention leaf (query/key, value) or only as parts of a split basis have no probes.

Untraceable models (data-dependent control flow) get a ``ValueError`` pointing to the hand-written route:
:func:`mergelab.structure.build.build_structure` with ``linear_axes``/``conv_axes``/``norm_axes``/...

References: Git Re-Basin's ``PermutationSpec`` (Ainsworth et al., ICLR 2023, https://arxiv.org/abs/2209.04836)
writes the same information by hand per architecture; Torch-Pruning's dependency graph (Fang et al., CVPR 2023,
https://arxiv.org/abs/2301.12900) follows channel dependencies through residuals and concats.
"""

from __future__ import annotations

import builtins
import logging
import math
import operator
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.node import _get_qualified_name, map_aggregate
from torch.fx.passes.shape_prop import ShapeProp

from mergelab.models.attention import MultiHeadSelfAttention
from mergelab.structure.build import check_structure
from mergelab.structure.types import Axis, Group, Probe, Role, Structure

__all__ = ["discover_structure", "trace"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """``torch.fx`` tracer that keeps the attention modules with a known symmetry as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (MultiHeadSelfAttention, nn.MultiheadAttention)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` with the attention leaves mergelab understands.

    Raises:
        ValueError: if tracing fails (data-dependent control flow, unsupported Python); the message suggests
            writing the :class:`Structure` by hand.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many exception types (TraceError, TypeError, RuntimeError, ...)
        raise ValueError(
            f"discover_structure: tracing {type(model).__name__} with torch.fx failed "
            f"({type(err).__name__}: {err}). Write its Structure by hand instead, e.g. with "
            "mergelab.structure.build_structure(model, linear_axes(...), conv_axes(...), norm_axes(...))"
        ) from err
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def discover_structure(model: nn.Module, example_input: Tensor | Sequence[Tensor]) -> Structure:
    """Find the permutation symmetries of ``model`` by tracing it.

    Args:
        model: any ``torch.fx``-traceable module (every mergelab zoo model is). It is not modified; its train
            mode is restored afterwards.
        example_input: one input batch *with* the batch axis (e.g. ``torch.zeros(2, 1, 8, 8)``), or a tuple of
            inputs for a multi-input forward. It is run once (in eval mode, without gradients) to learn the
            shape of every intermediate tensor.

    Returns:
        The :class:`Structure`: groups in forward order, each named after the first module producing its units;
        network inputs and outputs never appear in a group.

    Raises:
        ValueError: tracing fails, the example input does not run, or a tracked tensor meets an op without a
            rule (the message names the op, the fx node and the module).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> s = discover_structure(net, torch.zeros(2, 4))
        >>> [(g.name, g.size) for g in s]
        [('0', 8)]
        >>> [str(a) for a in s["0"].axes]
        ['0.weight[0] (out)', '0.bias[0] (out)', '2.weight[1] (in)']
    """
    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    gm = trace(model)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        gm.eval()
        with torch.no_grad():
            gm(*inputs)  # fails cleanly on a bad input (ShapeProp would print a traceback first)
            _Propagate(gm).propagate(*inputs)
    except Exception as err:
        raise ValueError(
            f"discover_structure: running example_input {[tuple(t.shape) for t in inputs]} through "
            f"{type(model).__name__} failed ({type(err).__name__}: {err})"
        ) from err
    finally:
        for m, mode in modes.items():
            m.training = mode
    structure = _Discovery(model, gm).run()
    check_structure(structure, model)
    return structure


# ----------------------------------------------------------------------------------------------------------
# Shape propagation: remember shapes and non-tensor values of every node
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _T:
    """A tensor seen during shape propagation (only its shape is kept)."""

    shape: tuple[int, ...]


def _describe(x: Any) -> Any:
    if isinstance(x, Tensor):
        return _T(tuple(x.shape))
    if isinstance(x, (tuple, list)) and not isinstance(x, torch.Size):
        return (
            type(x)(_describe(v) for v in x) if type(x) in (tuple, list) else tuple(_describe(v) for v in x)
        )
    if isinstance(x, dict):
        return {k: _describe(v) for k, v in x.items()}
    if isinstance(x, torch.Size):
        return tuple(int(v) for v in x)
    return x


class _Propagate(ShapeProp):
    """``ShapeProp`` that also stores a light description of each node's output in ``meta["mergelab_out"]``."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["mergelab_out"] = _describe(result)
        return result


# ----------------------------------------------------------------------------------------------------------
# Unit bases: union-find with splitting
# ----------------------------------------------------------------------------------------------------------


class _Piece(NamedTuple):
    """A whole basis laid along a tensor axis: ``size`` units of ``inner`` consecutive entries each."""

    basis: int
    size: int
    inner: int


Layout = tuple[_Piece, ...]


def _entries(layout: Iterable[_Piece]) -> int:
    return sum(p.size * p.inner for p in layout)


@dataclass
class _Basis:
    size: int
    name: str
    order: tuple[int, ...]
    blocks: int = 1
    fixed: bool = False
    axes: list[Axis] = field(default_factory=list)
    parent: int = -1
    children: tuple[int, ...] = ()


class _Bases:
    """Unit bases: union-find (``union``), refinement (``split``) and layout helpers built on both."""

    def __init__(self) -> None:
        self.b: list[_Basis] = []
        self.ties: list[set[int]] = []

    def new(
        self, size: int, name: str, order: tuple[int, ...], *, blocks: int = 1, fixed: bool = False
    ) -> int:
        i = len(self.b)
        self.b.append(_Basis(size, name, order, blocks, fixed, [], i))
        return i

    def find(self, i: int) -> int:
        b = self.b
        while b[i].parent != i:
            b[i].parent = b[b[i].parent].parent
            i = b[i].parent
        return i

    def piece(self, i: int, inner: int = 1) -> _Piece:
        r = self.find(i)
        return _Piece(r, self.b[r].size, inner)

    def leaves(self, layout: Iterable[_Piece]) -> list[_Piece]:
        """The layout in terms of current unsplit root bases."""
        out: list[_Piece] = []
        stack = list(reversed(list(layout)))
        while stack:
            p = stack.pop()
            r = self.find(p.basis)
            kids = self.b[r].children
            if kids:
                stack.extend(reversed([_Piece(c, self.b[c].size, p.inner) for c in kids]))
            else:
                out.append(_Piece(r, self.b[r].size, p.inner))
        return out

    def roots(self) -> list[int]:
        return [i for i, b in enumerate(self.b) if b.parent == i and not b.children]

    # -- constraints --------------------------------------------------------------------------------------

    def combine_blocks(self, i: int, blocks: int, where: str) -> None:
        b = self.b[self.find(i)]
        if blocks == 1 or blocks == b.blocks:
            return
        if b.blocks == 1:
            if b.size % blocks:
                raise ValueError(f"discover_structure: {where}: {blocks} blocks do not divide {b.size} units")
            b.blocks = blocks
            return
        raise ValueError(
            f"discover_structure: {where}: basis {b.name!r} ({b.size} units) would need both {b.blocks} and "
            f"{blocks} blocks; block structures can only combine when equal or one of them is 1"
        )

    def union(self, i: int, j: int, where: str) -> None:
        a, c = self.find(i), self.find(j)
        if a == c:
            return
        A, C = self.b[a], self.b[c]
        if A.children or C.children or A.size != C.size:  # callers go through unify()
            raise AssertionError(f"union of incompatible bases {A.name!r} and {C.name!r}")
        if C.order < A.order:
            a, c, A, C = c, a, C, A
        self.combine_blocks(a, C.blocks, where)
        A.fixed |= C.fixed
        A.axes.extend(C.axes)
        C.axes = []
        C.parent = a

    def _in_tie(self, r: int) -> bool:
        return any(self.find(m) == r for tie in self.ties for m in tie)

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
        if self._in_tie(r):
            raise ValueError(
                f"discover_structure: {where}: cannot split the tied (attention) basis {b.name!r}"
            )
        bs = b.size // b.blocks
        kids, off = [], 0
        for k, s in enumerate(sizes):
            c = self.new(
                s,
                f"{b.name}[{off}:{off + s}]",
                b.order + (k,),
                blocks=s // bs if b.blocks > 1 else 1,
                fixed=b.fixed,
            )
            self.b[c].axes = [replace(a, start=a.start + off * a.inner) for a in b.axes]
            kids.append(c)
            off += s
        b.children, b.axes = tuple(kids), []
        return kids

    # -- layouts ------------------------------------------------------------------------------------------

    def fix(self, layout: Iterable[_Piece]) -> None:
        for p in self.leaves(layout):
            self.b[p.basis].fixed = True

    def unify(self, la: Layout, lb: Layout, where: str) -> None:
        """Make two layouts of one tensor axis share their units, splitting bases where pieces differ."""
        if _entries(la) != _entries(lb):
            raise AssertionError(f"unify: {_entries(la)} vs {_entries(lb)} entries at {where}")
        qa, qb = deque(self.leaves(la)), deque(self.leaves(lb))
        while qa and qb:
            pa, pb = qa.popleft(), qb.popleft()
            ra, rb = self.leaves([pa]), self.leaves([pb])
            if len(ra) > 1 or len(rb) > 1:  # split meanwhile: re-expand and retry
                qa.extendleft(reversed(ra))
                qb.extendleft(reversed(rb))
                continue
            pa, pb = ra[0], rb[0]
            if pa.inner != pb.inner:
                logger.warning(
                    "discover_structure: %s: combines units of %d and %d entries; keeping them fixed",
                    where,
                    pa.inner,
                    pb.inner,
                )
                self.fix(la)
                self.fix(lb)
                return
            if pa.size == pb.size:
                self.union(pa.basis, pb.basis, where)
            elif pa.size < pb.size:
                first, rest = self.split(pb.basis, [pa.size, pb.size - pa.size], where)
                self.union(pa.basis, first, where)
                qb.appendleft(_Piece(rest, pb.size - pa.size, pb.inner))
            else:
                first, rest = self.split(pa.basis, [pb.size, pa.size - pb.size], where)
                self.union(first, pb.basis, where)
                qa.appendleft(_Piece(rest, pa.size - pb.size, pa.inner))

    def attach(self, layout: Layout, param: str, dim: int, role: Role, start: int = 0) -> None:
        """Record that ``param``'s axis ``dim`` (from entry ``start``) is laid out like ``layout``."""
        off = start
        for p in self.leaves(layout):
            self.b[p.basis].axes.append(Axis(param, dim, role, p.inner, off))
            off += p.size * p.inner

    def slice(self, layout: Layout, lo: int, hi: int, where: str) -> Layout | None:
        """The part of ``layout`` covering entries ``[lo, hi)``; ``None`` (bases fixed) if it cuts a unit."""
        while True:
            off, todo = 0, None
            for p in self.leaves(layout):
                e = p.size * p.inner
                a, z = max(lo, off), min(hi, off + e)
                if a < z:
                    if (a - off) % p.inner or (z - off) % p.inner:
                        logger.warning(
                            "discover_structure: %s: slice [%d:%d] cuts through units; keeping them fixed",
                            where,
                            lo,
                            hi,
                        )
                        self.fix(layout)
                        return None
                    u0, u1 = (a - off) // p.inner, (z - off) // p.inner
                    if (u0, u1) != (0, p.size):
                        todo = (p, [u0, u1 - u0, p.size - u1])
                        break
                off += e
            if todo is None:
                break
            p, sizes = todo
            if not self.can_split(p.basis, sizes):
                self.fix(layout)
                return None
            self.split(p.basis, sizes, where)
        out, off = [], 0
        for p in self.leaves(layout):
            if lo <= off and off + p.size * p.inner <= hi:
                out.append(p)
            off += p.size * p.inner
        return tuple(out)

    def constrain_blocks(self, layout: Layout, block: int, where: str) -> None:
        """Units must respect contiguous blocks of ``block`` entries (GroupNorm groups)."""
        while True:
            off, todo = 0, None
            for p in self.leaves(layout):
                e, r = p.size * p.inner, p.inner
                b = self.b[p.basis]
                if b.fixed or (r % block == 0 and off % block == 0):
                    off += e
                    continue
                if block % r or off % r:
                    logger.warning(
                        "discover_structure: %s: groups of %d entries cut through units of %d; keeping them fixed",
                        where,
                        block,
                        r,
                    )
                    b.fixed = True
                    off += e
                    continue
                per = block // r  # units per block
                head = min(((-off) % block) // r, p.size)
                full = (p.size - head) // per
                tail = p.size - head - full * per
                if full == 0 or head or tail:
                    if off // block == (off + e - 1) // block:  # inside one block: any permutation is fine
                        off += e
                        continue
                    sizes = [head, full * per, tail]
                    if not self.can_split(p.basis, sizes):
                        logger.warning(
                            "discover_structure: %s: groups of %d entries conflict with the blocks of %r; "
                            "keeping it fixed",
                            where,
                            block,
                            b.name,
                        )
                        b.fixed = True
                        off += e
                        continue
                    todo = (p, sizes)
                    break
                self.combine_blocks(p.basis, full, where)
                off += e
            if todo is None:
                return
            self.split(todo[0].basis, todo[1], where)


# ----------------------------------------------------------------------------------------------------------
# Abstract values
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Act:
    """A tensor; ``axes`` maps tracked axes to layouts (empty: a plain tensor in a fixed order)."""

    shape: tuple[int, ...]
    axes: dict[int, Layout] = field(default_factory=dict)


@dataclass(frozen=True)
class _Param:
    """A tensor that is a view of one parameter/buffer: per axis, ``(param dim, offset)`` or ``None``."""

    shape: tuple[int, ...]
    name: str
    dims: tuple[tuple[int, int] | None, ...]


@dataclass(frozen=True)
class _Other:
    """A non-tensor value (an int from ``x.size(1)``, a dtype, ``None``, ...)."""

    value: Any


@dataclass(frozen=True)
class _Seq:
    """A tuple/list output (``chunk``, ``nn.MultiheadAttention``)."""

    items: tuple[Any, ...]


@dataclass(frozen=True)
class _Poison:
    """A value whose order depends on a permutation we cannot express (per-head attention weights)."""

    reason: str


_Tensorish = (_Act, _Param)
_NODE_OUTPUT = object()


def _c(x: Any) -> Any:
    """Concrete Python value of an argument (unwraps ``_Other`` inside containers and slices)."""
    if isinstance(x, _Other):
        return x.value
    if isinstance(x, slice):
        return slice(_c(x.start), _c(x.stop), _c(x.step))
    if isinstance(x, (list, tuple)):
        return type(x)(_c(v) for v in x)
    return x


def _get(args: Sequence[Any], kwargs: dict[str, Any], i: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def _dims_arg(d: Any, nd: int) -> list[int]:
    """Normalise an int / sequence / None ``dim`` argument (None means every axis)."""
    d = _c(d)
    if d is None:
        return list(range(nd))
    if isinstance(d, int):
        return [_norm_dim(d, nd)]
    return sorted(_norm_dim(int(v), nd) for v in d)


def _flat(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(_flat(v))
        elif isinstance(v, dict):
            out.extend(_flat(v.values()))
        elif isinstance(v, _Seq):
            out.extend(_flat(v.items))
        else:
            out.append(v)
    return out


def _spatial_suffix(cls: type) -> int | None:
    name = cls.__name__
    for k in (1, 2, 3):
        if name.endswith(f"{k}d"):
            return k
    return None


# ----------------------------------------------------------------------------------------------------------
# Op tables
# ----------------------------------------------------------------------------------------------------------


def _fns(*names: str, mod: Any = torch) -> list[Any]:
    return [getattr(mod, n) for n in names if hasattr(mod, n)]


_ELEMENTWISE_NAMES = [
    "add",
    "sub",
    "subtract",
    "mul",
    "multiply",
    "div",
    "divide",
    "true_divide",
    "floor_divide",
    "remainder",
    "fmod",
    "pow",
    "neg",
    "negative",
    "abs",
    "exp",
    "exp2",
    "expm1",
    "log",
    "log2",
    "log10",
    "log1p",
    "sqrt",
    "rsqrt",
    "square",
    "reciprocal",
    "sign",
    "sigmoid",
    "tanh",
    "relu",
    "sin",
    "cos",
    "tan",
    "atan",
    "sinh",
    "cosh",
    "erf",
    "erfc",
    "clamp",
    "clip",
    "clamp_min",
    "clamp_max",
    "where",
    "maximum",
    "minimum",
    "fmax",
    "fmin",
    "lerp",
    "addcmul",
    "addcdiv",
    "nan_to_num",
    "round",
    "floor",
    "ceil",
    "trunc",
    "frac",
    "logical_not",
    "logical_and",
    "logical_or",
    "isnan",
    "isfinite",
    "masked_fill",
    "hypot",
    "atan2",
    "lt",
    "gt",
    "le",
    "ge",
    "eq",
    "ne",
]
_F_ELEMENTWISE_NAMES = [
    "relu",
    "relu6",
    "elu",
    "selu",
    "celu",
    "gelu",
    "silu",
    "mish",
    "leaky_relu",
    "hardtanh",
    "hardswish",
    "hardsigmoid",
    "hardshrink",
    "softshrink",
    "tanhshrink",
    "softplus",
    "softsign",
    "logsigmoid",
    "sigmoid",
    "tanh",
    "threshold",
    "rrelu",
    "dropout",
    "alpha_dropout",
    "feature_alpha_dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
]
_ELEMENTWISE_FUNCS = set(
    _fns(*_ELEMENTWISE_NAMES)
    + _fns(*_F_ELEMENTWISE_NAMES, mod=F)
    + [
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        operator.floordiv,
        operator.mod,
        operator.pow,
        operator.neg,
        operator.pos,
        operator.abs,
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.invert,
        operator.and_,
        operator.or_,
        operator.xor,
        operator.lt,
        operator.gt,
        operator.le,
        operator.ge,
        operator.eq,
        operator.ne,
    ]
)
_ELEMENTWISE_METHODS = set(_ELEMENTWISE_NAMES) | {
    f"{n}_"
    for n in (
        [
            "add",
            "sub",
            "mul",
            "div",
            "pow",
            "neg",
            "abs",
            "exp",
            "sigmoid",
            "tanh",
            "relu",
            "clamp",
            "clip",
            "masked_fill",
            "sqrt",
        ]
    )
}
_IDENTITY_METHODS = {
    "contiguous",
    "clone",
    "detach",
    "to",
    "type",
    "type_as",
    "float",
    "double",
    "half",
    "bfloat16",
    "cpu",
    "cuda",
    "requires_grad_",
}
_LIKE_FUNCS = set(_fns("zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like"))
_EQUIVARIANT_FUNCS = set(
    _fns("softmax", "log_softmax") + _fns("softmax", "log_softmax", "softmin", "normalize", mod=F)
)
_EQUIVARIANT_METHODS = {"softmax", "log_softmax"}
_ORDERED_FUNCS = {f: n for n in ("cumsum", "cumprod", "logcumsumexp", "flip", "roll") for f in _fns(n)}
_ORDERED_METHODS = {"cumsum", "cumprod", "logcumsumexp", "flip", "roll"}
_REDUCE_NAMES = [
    "mean",
    "sum",
    "amax",
    "amin",
    "logsumexp",
    "norm",
    "var",
    "std",
    "prod",
    "nansum",
    "nanmean",
]
_REDUCE_FUNCS = {f: n for n in _REDUCE_NAMES for f in _fns(n)}
_MAXMIN_FUNCS = {f: n for n in ("max", "min") for f in _fns(n)}
_RESHAPE_FUNCS = set(_fns("flatten", "reshape", "squeeze", "unsqueeze", "unflatten", "ravel"))
_RESHAPE_METHODS = {
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
}
_TRANSPOSE_FUNCS = {
    f: n
    for n in ("transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t")
    for f in _fns(n)
}
_TRANSPOSE_METHODS = {"transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t"}
_EXPAND_METHODS = {"expand", "expand_as", "broadcast_to", "repeat"}
_EXPAND_FUNCS = set(_fns("broadcast_to"))
_CAT_FUNCS = set(_fns("cat", "concat", "concatenate"))
_STACK_FUNCS = set(_fns("stack"))
_SPLIT_FUNCS = {f: n for n in ("chunk", "split", "tensor_split", "unbind") for f in _fns(n)}
_SPLIT_METHODS = {"chunk", "split", "tensor_split", "unbind"}
_MATMUL_FUNCS = set(_fns("matmul", "mm", "bmm") + [operator.matmul])
_MATMUL_METHODS = {"matmul", "mm", "bmm"}
_POOL_FUNCS: dict[Any, int | None] = {}
for _n in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool"):
    for _k in (1, 2, 3):
        for _f in _fns(f"{_n}{_k}d", mod=F) + _fns(f"{_n}{_k}d"):
            _POOL_FUNCS[_f] = _k
for _f in _fns("interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "pad", mod=F):
    _POOL_FUNCS[_f] = None  # number of spatial axes read from the call
_METADATA_METHODS = {
    "size",
    "dim",
    "numel",
    "ndimension",
    "nelement",
    "is_contiguous",
    "is_floating_point",
    "get_device",
}
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, n)
    for n in [
        "ReLU",
        "ReLU6",
        "GELU",
        "SiLU",
        "Sigmoid",
        "Tanh",
        "LeakyReLU",
        "ELU",
        "SELU",
        "CELU",
        "Mish",
        "Hardtanh",
        "Hardswish",
        "Hardsigmoid",
        "Hardshrink",
        "Softshrink",
        "Softplus",
        "Softsign",
        "Tanhshrink",
        "LogSigmoid",
        "Threshold",
        "RReLU",
        "Identity",
        "Dropout",
        "Dropout1d",
        "Dropout2d",
        "Dropout3d",
        "AlphaDropout",
        "FeatureAlphaDropout",
        "Softmax",
        "LogSoftmax",
        "Softmin",
        "Softmax2d",
    ]
    if hasattr(nn, n)
)
_POOL_MODULES: tuple[type[nn.Module], ...] = tuple(
    getattr(nn, f"{n}{k}d")
    for n in [
        "MaxPool",
        "AvgPool",
        "AdaptiveAvgPool",
        "AdaptiveMaxPool",
        "LPPool",
        "ZeroPad",
        "ConstantPad",
        "ReflectionPad",
        "ReplicationPad",
        "CircularPad",
    ]
    for k in (1, 2, 3)
    if hasattr(nn, f"{n}{k}d")
)
_UPSAMPLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
)
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)
_INSTANCENORMS = (nn.modules.instancenorm._InstanceNorm,)
_LAYERNORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


# ----------------------------------------------------------------------------------------------------------
# The walk
# ----------------------------------------------------------------------------------------------------------


class _Discovery:
    """One walk over a traced graph: abstract values per node, bases in ``self.u``, then :meth:`finish`."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule) -> None:
        self.model, self.gm = model, gm
        self.u = _Bases()
        self.env: dict[fx.Node, Any] = {}
        self.producers: dict[str, tuple[int, ...]] = {}
        # (param, dim) that must stay in place (dim None: every dim), e.g. a parameter used in an unknown op
        self.pinned: set[tuple[str, int | None]] = set()
        self.reads: list[tuple[fx.Node, Layout]] = []  # (consumer node, layout of the input it reads)
        self.node_index = 0
        self.node: fx.Node | None = None
        # state_dict keys, with aliases for tensors registered under several names
        sd = model.state_dict(keep_vars=True)
        by_id: dict[int, list[str]] = {}
        for k, v in sd.items():
            by_id.setdefault(id(v), []).append(k)
        self.canon = {k: ks[0] for ks in by_id.values() for k in ks}
        self.shapes = {k: tuple(v.shape) for k, v in sd.items()}
        self.aliases = {ks[0]: ks for ks in by_id.values()}

    # -- helpers ------------------------------------------------------------------------------------------

    def where(self, node: fx.Node | None = None) -> str:
        node = node or self.node
        assert node is not None
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            return f"call_module {type(mod).__name__} at node {node.name!r} (module {node.target!r})"
        if node.op == "call_function":
            try:
                tname = _get_qualified_name(node.target).replace("_operator.", "operator.")
            except Exception:
                tname = getattr(node.target, "__name__", repr(node.target))
        elif node.op == "call_method":
            tname = f"Tensor.{node.target}"
        else:
            tname = str(node.target)
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        loc = f"(module {path!r})" if path else "(in the model's own forward)"
        return f"{node.op} {tname} at node {node.name!r} {loc}"

    def fail(self, reason: str = "") -> ValueError:
        msg = f"discover_structure: cannot follow channels through {self.where()}"
        return ValueError(msg + (f": {reason}" if reason else ""))

    def out_desc(self, node: fx.Node | None = None) -> Any:
        node = node or self.node
        assert node is not None
        if "mergelab_out" not in node.meta:
            raise AssertionError(f"no shape recorded for node {node.name!r}")
        return node.meta["mergelab_out"]

    def out_shape(self) -> tuple[int, ...]:
        d = self.out_desc()
        if not isinstance(d, _T):
            raise self.fail(f"expected a tensor output, got {type(d).__name__}")
        return d.shape

    def fresh(self, desc: Any = _NODE_OUTPUT) -> Any:
        """An untracked value matching a recorded output description (default: the current node's)."""
        desc = self.out_desc() if desc is _NODE_OUTPUT else desc
        if isinstance(desc, _T):
            return _Act(desc.shape)
        if isinstance(desc, (tuple, list)):
            return _Seq(tuple(self.fresh(d) for d in desc))
        return _Other(desc)

    def order(self, k: int = 0) -> tuple[int, ...]:
        return (self.node_index, k)

    def producer(self, key: str, specs: Sequence[tuple[int, str, int]]) -> tuple[tuple[int, ...], bool]:
        """Output bases of a producing op, created on its first call and reused afterwards.

        ``specs`` holds ``(size, name, blocks)`` per basis. Returns the basis ids and whether they are new.
        """
        if key in self.producers:
            return self.producers[key], False
        ids = tuple(self.u.new(s, n, self.order(k), blocks=b) for k, (s, n, b) in enumerate(specs))
        self.producers[key] = ids
        return ids, True

    def pname(self, module_path: str, attr: str) -> str | None:
        """Canonical state_dict key of ``module.attr`` (``None`` when absent, e.g. ``bias=False``)."""
        key = f"{module_path}.{attr}" if module_path else attr
        return self.canon.get(key)

    def attach_param(self, layout: Layout, val: Any, tensor_dim: int) -> None:
        """``val`` (a parameter view, a tensor or ``None``) lies along ``layout`` on its axis ``tensor_dim``."""
        if isinstance(val, _Param):
            if 0 <= tensor_dim < len(val.dims) and val.shape[tensor_dim] != 1:
                self.attach_view(layout, val.name, val.dims[tensor_dim])
        elif isinstance(val, _Act) and 0 <= tensor_dim < len(val.shape):
            if tensor_dim in val.axes:
                self.u.unify(layout, val.axes[tensor_dim], self.where())
            elif val.shape[tensor_dim] != 1:
                self.u.fix(layout)

    def attach_view(self, layout: Layout, name: str, d: tuple[int, int] | None) -> None:
        """Parameter ``name``'s dim ``d[0]`` from entry ``d[1]`` lies along ``layout`` (``None``: broadcast)."""
        if d is None:
            return  # the parameter is constant along this axis
        pdim, off = d
        if off + _entries(layout) > self.shapes[name][pdim]:
            self.pinned.add((name, pdim))
            self.u.fix(layout)
            return
        self.u.attach(layout, name, pdim, "out", off)

    def read(self, layout: Layout, param: str, dim: int, start: int = 0) -> None:
        """The current node reads ``layout`` through ``param``'s input axis ``dim`` (role ``"in"``)."""
        self.u.attach(layout, param, dim, "in", start)
        self.reads.append((self.node, layout))

    def pin(self, values: Iterable[Any]) -> None:
        """Parameters used in ways we do not follow keep every axis in place."""
        for v in _flat(values):
            if isinstance(v, _Param):
                self.pinned.add((v.name, None))

    def tracked(self, values: Iterable[Any]) -> bool:
        return any(isinstance(v, _Act) and v.axes for v in _flat(values))

    # -- main loop ----------------------------------------------------------------------------------------

    def run(self) -> Structure:
        for idx, node in enumerate(self.gm.graph.nodes):
            self.node, self.node_index = node, idx
            args = map_aggregate(node.args, lambda a: self.env[a] if isinstance(a, fx.Node) else a)
            kwargs = map_aggregate(node.kwargs, lambda a: self.env[a] if isinstance(a, fx.Node) else a)
            poison = [v for v in _flat([args, kwargs]) if isinstance(v, _Poison)]
            if poison:
                raise self.fail(poison[0].reason)
            if node.op == "placeholder":
                self.env[node] = self.fresh()
            elif node.op == "get_attr":
                self.env[node] = self.visit_get_attr(node)
            elif node.op == "output":
                self.visit_output(args)
            else:
                self.env[node] = self.visit_call(node, list(args), dict(kwargs))
        return self.finish()

    def visit_get_attr(self, node: fx.Node) -> Any:
        desc = self.out_desc()
        name = self.canon.get(str(node.target))
        if isinstance(desc, _T) and name is not None:
            return _Param(desc.shape, name, tuple((d, 0) for d in range(len(desc.shape))))
        return self.fresh(desc)  # a constant or non-persistent buffer: plain, in a fixed order

    def visit_output(self, args: Any) -> None:
        for v in _flat(args):
            if isinstance(v, _Act):
                for layout in v.axes.values():
                    self.u.fix(layout)
        self.pin(args)

    def visit_call(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            result = self.visit_module(str(node.target), mod, args, kwargs)
        elif node.op == "call_method":
            result = self.visit_method(str(node.target), args, kwargs)
        else:
            result = self.visit_function(node.target, args, kwargs)
        if result is not NotImplemented:
            return result
        # no rule: harmless only if no tracked tensor and no parameter is involved
        if self.tracked([args, kwargs]):
            raise self.fail()
        self.pin([args, kwargs])
        return self.fresh()

    # -- dispatch -----------------------------------------------------------------------------------------

    def visit_function(self, fn: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if fn is operator.getitem:
            return self.getitem(args[0], args[1])
        if fn is builtins.getattr:
            return self.getattr_(args[0], _c(args[1]))
        if fn is builtins.len:
            return self.fresh()
        if fn in _ELEMENTWISE_FUNCS:
            return self.elementwise([*args, *kwargs.values()])
        if fn in _MAXMIN_FUNCS:
            return self.maxmin(args, kwargs)
        if fn in _LIKE_FUNCS or fn in _EQUIVARIANT_FUNCS:
            return self.identity(args[0])
        if fn in _ORDERED_FUNCS:
            return self.ordered(_ORDERED_FUNCS[fn], args, kwargs)
        if fn in _REDUCE_FUNCS:
            return self.reduce(_REDUCE_FUNCS[fn], args, kwargs)
        if fn in _RESHAPE_FUNCS:
            return self.reshape(args[0])
        if fn in _TRANSPOSE_FUNCS:
            return self.transpose(_TRANSPOSE_FUNCS[fn], args, kwargs)
        if fn in _EXPAND_FUNCS:
            return self.expand("broadcast_to", args, kwargs)
        if fn in _CAT_FUNCS:
            return self.cat(_get(args, kwargs, 0, "tensors"), _c(_get(args, kwargs, 1, "dim", 0)))
        if fn in _STACK_FUNCS:
            return self.stack(_get(args, kwargs, 0, "tensors"), _c(_get(args, kwargs, 1, "dim", 0)))
        if fn in _SPLIT_FUNCS:
            return self.split(_SPLIT_FUNCS[fn], args, kwargs)
        if fn in _MATMUL_FUNCS:
            return self.matmul(args[0], args[1])
        if fn in _POOL_FUNCS:
            k = _POOL_FUNCS[fn]
            if fn is F.pad:
                k = len(_c(_get(args, kwargs, 1, "pad"))) // 2
            return self.pool(args[0], k)
        if fn is F.linear:
            return self.f_linear(args, kwargs)
        if fn in (F.conv1d, F.conv2d, F.conv3d):
            return self.f_conv(args, kwargs)
        if fn is F.layer_norm:
            return self.f_layer_norm(args, kwargs)
        if fn is F.glu:
            return self.glu(args[0], _c(_get(args, kwargs, 1, "dim", -1)))
        return NotImplemented

    def visit_method(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if name in _METADATA_METHODS:
            return self.fresh()
        if name in _IDENTITY_METHODS:
            return self.identity(args[0])
        if name in ("max", "min"):
            return self.maxmin(args, kwargs)
        if name in _ELEMENTWISE_METHODS:
            return self.elementwise([*args, *kwargs.values()])
        if name in _EQUIVARIANT_METHODS:
            return self.identity(args[0])
        if name in _ORDERED_METHODS:
            return self.ordered(name, args, kwargs)
        if name in _REDUCE_NAMES:
            return self.reduce(name, args, kwargs)
        if name in _RESHAPE_METHODS:
            return self.reshape(args[0])
        if name in _TRANSPOSE_METHODS:
            return self.transpose(name, args, kwargs)
        if name in _EXPAND_METHODS:
            return self.expand(name, args, kwargs)
        if name in _SPLIT_METHODS:
            return self.split(name, args, kwargs)
        if name in _MATMUL_METHODS:
            return self.matmul(args[0], args[1])
        return NotImplemented

    def visit_module(self, path: str, mod: nn.Module, args: list[Any], kwargs: dict[str, Any]) -> Any:
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(mod, nn.Linear):
            return self.dense(
                x, path, self.pname(path, "weight"), 0, 1, self.pname(path, "bias"), mod.out_features, path
            )
        if isinstance(mod, nn.modules.conv._ConvNd):
            return self.conv(x, mod, path)
        if isinstance(mod, nn.Embedding):
            return self.embedding(x, mod, path)
        if isinstance(mod, MultiHeadSelfAttention):
            return self.mhsa(x, mod, path)
        if isinstance(mod, nn.MultiheadAttention):
            return self.mha(mod, path, args, kwargs)
        if isinstance(mod, (*_BATCHNORMS, *_INSTANCENORMS)):
            return self.channel_norm(x, mod, path)
        if isinstance(mod, _LAYERNORMS):
            return self.layer_norm(x, mod, path)
        if isinstance(mod, nn.GroupNorm):
            return self.group_norm(x, mod, path)
        if isinstance(mod, nn.PReLU):
            return self.prelu(x, mod, path)
        if isinstance(mod, nn.GLU):
            return self.glu(x, mod.dim)
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return self.identity(x)
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return self.reshape(x)
        if isinstance(mod, _POOL_MODULES):
            return self.pool(x, _spatial_suffix(type(mod)))
        if isinstance(mod, _UPSAMPLE_MODULES):
            return self.pool(x, None)
        return NotImplemented

    # -- generic rules ------------------------------------------------------------------------------------

    def identity(self, v: Any) -> Any:
        desc = self.out_desc()
        if isinstance(v, _Act) and isinstance(desc, _T):
            if desc.shape != v.shape:  # e.g. to(other) broadcasting never happens; be strict
                raise self.fail(f"shape changed from {v.shape} to {desc.shape}")
            return _Act(desc.shape, dict(v.axes))
        if isinstance(v, _Param) and isinstance(desc, _T) and desc.shape == v.shape:
            return v
        if self.tracked([v]):
            raise self.fail()
        self.pin([v])
        return self.fresh()

    def elementwise(self, operands: list[Any], shape: tuple[int, ...] | None = None) -> Any:
        """Broadcasting op: unify tracked axes, attach parameters, fix against plain full-extent tensors."""
        desc = self.out_desc() if shape is None else _T(shape)
        ops = [v for v in _flat(operands) if isinstance(v, _Tensorish)]
        if not ops:
            return self.fresh(desc)
        if not isinstance(desc, _T):
            if self.tracked(ops):
                raise self.fail("elementwise op without a tensor output")
            self.pin(ops)
            return self.fresh(desc)
        shape, nd = desc.shape, len(desc.shape)
        if not self.tracked(ops):
            params = [v for v in ops if isinstance(v, _Param)]
            if len(params) == 1:
                p = params[0]
                pad = nd - len(p.shape)
                busy = [j + pad for j, d in enumerate(p.dims) if d is not None and p.shape[j] != 1]
                others = [v for v in ops if v is not p]
                if all(self._extent(v, j, nd) == 1 for v in others for j in busy):
                    return _broadcast_param(p, shape)
            self.pin(params)
            return _Act(shape)
        where = self.where()
        axes: dict[int, Layout] = {}
        for j in range(nd):
            layouts: list[Layout] = []
            plain_full = False
            attach: list[tuple[str, tuple[int, int] | None]] = []
            for v in ops:
                k = j - (nd - len(v.shape))
                ext = v.shape[k] if k >= 0 else 1
                if isinstance(v, _Act):
                    if k >= 0 and k in v.axes:
                        if ext == shape[j]:
                            layouts.append(v.axes[k])
                        else:  # a tracked axis of one unit broadcast: keep it fixed
                            self.u.fix(v.axes[k])
                    elif ext != 1:
                        plain_full = True
                elif ext != 1:
                    attach.append((v.name, v.dims[k]))
            if not layouts:  # untracked axis: whatever lies along it stays in place
                self.pinned.update((name, d[0]) for name, d in attach if d is not None)
                continue
            first = layouts[0]
            for other in layouts[1:]:
                self.u.unify(first, other, where)
            if plain_full:
                self.u.fix(first)
            for name, d in attach:
                self.attach_view(first, name, d)
            axes[j] = first
        return _Act(shape, axes)

    @staticmethod
    def _extent(v: Any, j: int, nd: int) -> int:
        k = j - (nd - len(v.shape))
        return v.shape[k] if k >= 0 else 1

    def ordered(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """cumsum/flip/roll: fine along untracked axes, impossible along tracked ones."""
        x = args[0]
        if not isinstance(x, _Act) or not x.axes:
            return NotImplemented
        nd = len(x.shape)
        if name == "flip":
            dims = _get(args, kwargs, 1, "dims")
            dims = _dims_arg(list(args[1:]) if len(args) > 2 else dims, nd)
        elif name == "roll":
            dims = _dims_arg(_get(args, kwargs, 2, "dims"), nd)
        else:
            dims = _dims_arg(_get(args, kwargs, 1, "dim"), nd)
        hit = [d for d in dims if d in x.axes]
        if hit:
            raise self.fail(f"it runs along the unit axis {hit[0]} of a {x.shape} tensor")
        return _Act(self.out_shape(), dict(x.axes))

    def reduce(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        x = args[0]
        if not isinstance(x, _Act):
            return NotImplemented
        nd = len(x.shape)
        if "dim" in kwargs or "axis" in kwargs:
            dim = kwargs.get("dim", kwargs.get("axis"))
        else:
            dim = _get(args, {}, 2 if name == "norm" else 1, "dim")
        if isinstance(_c(dim), (bool, str)):  # var(x, unbiased) / norm(x, "fro")
            dim = None
        dims = _dims_arg(dim, nd)
        shape = self.out_shape()
        keep = len(shape) == nd
        axes: dict[int, Layout] = {}
        for a, layout in x.axes.items():
            if a in dims:
                continue  # the reduction is invariant to a permutation of this axis
            axes[a if keep else a - sum(d < a for d in dims)] = layout
        return _Act(shape, axes)

    def maxmin(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        other = _get(args, kwargs, 1, "other")
        if isinstance(other, _Tensorish):
            return self.elementwise([args[0], other])
        x = args[0]
        if not isinstance(x, _Act):
            return NotImplemented
        dim = _c(_get(args, kwargs, 1, "dim"))
        desc = self.out_desc()
        if dim is None:
            return self.fresh(desc)
        nd = len(x.shape)
        d = _norm_dim(dim, nd)
        keep = bool(_c(_get(args, kwargs, 2, "keepdim", False)))
        axes = {(a if keep or a < d else a - 1): layout for a, layout in x.axes.items() if a != d}
        values = _Act(desc[0].shape, axes)
        indices: Any = _Act(desc[1].shape, dict(axes))
        if d in x.axes:
            indices = _Poison(f"arg-max/min over the unit axis {d} depends on the order of units")
        return _Seq((values, indices))

    def getattr_(self, v: Any, attr: str) -> Any:
        if attr in _METADATA_ATTRS:
            return self.fresh()
        if attr in ("T", "mT") and isinstance(v, _Tensorish):
            nd = len(v.shape)
            perm = list(range(nd))[::-1] if attr == "T" else [*range(nd - 2), nd - 1, nd - 2]
            return self.permuted(v, perm)
        if self.tracked([v]):
            raise self.fail(f"attribute {attr!r}")
        self.pin([v])
        return self.fresh()

    # -- shape ops ----------------------------------------------------------------------------------------

    def reshape(self, v: Any) -> Any:
        shape = self.out_shape()
        if isinstance(v, _Param):
            dims: list[tuple[int, int] | None] = [None] * len(shape)
            for k, d in enumerate(v.dims):
                if d is None or v.shape[k] == 1:
                    continue
                m = _map_reshape_axis(v.shape, k, shape)
                if m is None or m[1] != 1 or dims[m[0]] is not None:
                    self.pin([v])
                    return _Act(shape)
                dims[m[0]] = d
            return _Param(shape, v.name, tuple(dims))
        if not isinstance(v, _Act):
            return NotImplemented
        axes: dict[int, Layout] = {}
        for a, layout in v.axes.items():
            m = _map_reshape_axis(v.shape, a, shape)
            if m is None or m[0] in axes:
                logger.warning(
                    "discover_structure: %s: reshape %s -> %s mixes the unit axis %d with others; keeping it fixed",
                    self.where(),
                    v.shape,
                    shape,
                    a,
                )
                self.u.fix(layout)
                continue
            j, factor = m
            if factor >= 1:
                axes[j] = tuple(_Piece(p.basis, p.size, p.inner * factor) for p in self.u.leaves(layout))
            else:  # split: every unit's entries must divide evenly over the trailing axes
                s = -factor
                leaves = self.u.leaves(layout)
                off, ok = 0, True
                for p in leaves:
                    ok &= p.inner % s == 0 and off % s == 0
                    off += p.size * p.inner
                if not ok:
                    logger.warning(
                        "discover_structure: %s: reshape %s -> %s splits units; keeping them fixed",
                        self.where(),
                        v.shape,
                        shape,
                    )
                    self.u.fix(layout)
                    continue
                axes[j] = tuple(_Piece(p.basis, p.size, p.inner // s) for p in leaves)
        return _Act(shape, axes)

    def permuted(self, v: Any, perm: Sequence[int]) -> Any:
        """Output axis ``i`` is input axis ``perm[i]``."""
        shape = self.out_shape()
        if isinstance(v, _Param):
            return _Param(shape, v.name, tuple(v.dims[p] for p in perm))
        if not isinstance(v, _Act):
            return NotImplemented
        inv = {p: i for i, p in enumerate(perm)}
        return _Act(shape, {inv[a]: layout for a, layout in v.axes.items()})

    def transpose(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        v = args[0]
        if not isinstance(v, _Tensorish):
            return NotImplemented
        nd = len(v.shape)
        perm = list(range(nd))
        if name in ("transpose", "swapaxes", "swapdims"):
            a = _norm_dim(_c(_get(args, kwargs, 1, "dim0")), nd)
            b = _norm_dim(_c(_get(args, kwargs, 2, "dim1")), nd)
            perm[a], perm[b] = perm[b], perm[a]
        elif name == "t":
            perm = perm[::-1]
        elif name == "permute":
            dims = _c(_get(args, kwargs, 1, "dims"))
            if isinstance(dims, int):
                dims = [_c(a) for a in args[1:]]
            perm = [_norm_dim(int(d), nd) for d in dims]
        else:  # movedim
            src = _c(_get(args, kwargs, 1, "source"))
            dst = _c(_get(args, kwargs, 2, "destination"))
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src = [_norm_dim(s, nd) for s in src]
            dst = [_norm_dim(d, nd) for d in dst]
            rest = [i for i in range(nd) if i not in src]
            perm = [-1] * nd
            for s, d in zip(src, dst, strict=True):
                perm[d] = s
            it = iter(rest)
            perm = [p if p >= 0 else next(it) for p in perm]
        return self.permuted(v, perm)

    def expand(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        v = args[0]
        shape = self.out_shape()
        if not isinstance(v, _Tensorish):
            return NotImplemented
        pad = len(shape) - len(v.shape)
        if name == "repeat":
            reps = [_c(a) for a in args[1:]]
            if len(reps) == 1 and isinstance(reps[0], (list, tuple)):
                reps = list(reps[0])
            reps = [1] * (len(shape) - len(reps)) + reps
            tiled = {k + pad for k in range(len(v.shape)) if reps[k + pad] != 1}
        else:
            tiled = {k + pad for k in range(len(v.shape)) if v.shape[k] != shape[k + pad]}
        if isinstance(v, _Param):
            if any(v.dims[k - pad] is not None and v.shape[k - pad] != 1 for k in tiled):
                self.pin([v])  # tiled along one of its own axes: not a view we can follow
                return _Act(shape)
            return _broadcast_param(v, shape)
        axes: dict[int, Layout] = {}
        for a, layout in v.axes.items():
            if a + pad in tiled:
                raise self.fail(f"it repeats the unit axis {a}")
            axes[a + pad] = layout
        return _Act(shape, axes)

    def getitem(self, base: Any, idx: Any) -> Any:
        if isinstance(base, _Seq):
            i = _c(idx)
            return base.items[i] if isinstance(i, int) else _Seq(tuple(base.items[i]))
        if isinstance(base, _Other):
            return self.fresh()
        if not isinstance(base, _Tensorish):
            return NotImplemented
        shape = self.out_shape()
        idx = idx if isinstance(idx, tuple) else (idx,)
        idx = tuple(v if isinstance(v, _Tensorish) else _c(v) for v in idx)
        if any(isinstance(i, (_Act, _Param, list, Tensor)) for i in idx):  # advanced indexing
            if self.tracked([base, *idx]):
                raise self.fail("advanced (tensor) indexing of a tensor with unit axes")
            self.pin([base, *idx])
            return self.fresh()
        nd = len(base.shape)
        used = sum(1 for i in idx if i is not None and i is not Ellipsis)
        full: list[Any] = []
        for i in idx:
            if i is Ellipsis:
                full.extend([slice(None)] * (nd - used))
            else:
                full.append(i)
        full.extend([slice(None)] * (nd - sum(1 for i in full if i is not None)))
        src, dst = 0, 0
        axes: dict[int, Layout] = {}
        dims: list[tuple[int, int] | None] = []
        for i in full:
            if i is None:
                dims.append(None)
                dst += 1
                continue
            n = base.shape[src]
            if isinstance(i, int):
                if isinstance(base, _Act) and src in base.axes:
                    raise self.fail(f"integer index {i} picks one position of the unit axis {src}")
                if isinstance(base, _Param) and base.dims[src] is not None and n != 1:
                    self.pinned.add((base.name, base.dims[src][0]))  # one fixed position of that axis
                src += 1
                continue
            if not isinstance(i, slice):
                raise self.fail(f"index {i!r}")
            lo, hi, step = i.indices(n)
            whole = (lo, hi, step) == (0, n, 1)
            if isinstance(base, _Act) and src in base.axes:
                if whole:
                    axes[dst] = base.axes[src]
                elif step != 1:
                    raise self.fail(f"strided slice of the unit axis {src}")
                else:
                    part = self.u.slice(base.axes[src], lo, hi, self.where())
                    if part is not None:
                        axes[dst] = part
            if isinstance(base, _Param):
                d = base.dims[src]
                if d is not None and not whole:
                    if step != 1:
                        self.pinned.add((base.name, d[0]))
                    d = (d[0], d[1] + lo) if step == 1 else None
                dims.append(d)
            src += 1
            dst += 1
        if isinstance(base, _Param):
            return _Param(shape, base.name, tuple(dims))
        return _Act(shape, axes)

    def cat(self, tensors: Any, dim: int) -> Any:
        items = list(tensors)
        shape = self.out_shape()
        nd = len(shape)
        d = _norm_dim(dim, nd)
        if not self.tracked(items):
            if any(isinstance(t, _Param) for t in items):
                self.pin(items)
            return _Act(shape)
        where = self.where()
        # along the concat axis: pieces in order (plain parts become fixed filler bases)
        along = any(isinstance(t, _Act) and d in t.axes for t in items)
        axes: dict[int, Layout] = {}
        if along:
            pieces: list[_Piece] = []
            for k, t in enumerate(items):
                n = t.shape[d]
                if isinstance(t, _Act) and d in t.axes:
                    pieces.extend(t.axes[d])
                elif isinstance(t, _Param) and t.dims[d] is not None:
                    i = self.u.new(n, t.name, self.order(k))
                    pd, off = t.dims[d]
                    self.u.b[i].axes.append(Axis(t.name, pd, "out", 1, off))
                    pieces.append(self.u.piece(i))
                else:
                    pieces.append(
                        self.u.piece(self.u.new(n, f"{self.node.name}.fixed", self.order(k), fixed=True))
                    )
            axes[d] = tuple(pieces)
        # every other axis behaves like an elementwise op over the operands
        for j in range(nd):
            if j == d:
                continue
            layouts = [t.axes[j] for t in items if isinstance(t, _Act) and j in t.axes]
            if not layouts:
                continue
            first = layouts[0]
            for other in layouts[1:]:
                self.u.unify(first, other, where)
            for t in items:
                if isinstance(t, _Act) and j not in t.axes:
                    self.u.fix(first)
                elif isinstance(t, _Param):
                    self.attach_param(first, t, j)
            axes[j] = first
        return _Act(shape, axes)

    def stack(self, tensors: Any, dim: int) -> Any:
        items = list(tensors)
        shape = self.out_shape()
        d = _norm_dim(dim, len(shape))
        res = self.elementwise(items, shape[:d] + shape[d + 1 :])  # equal shapes: unify every axis
        if not isinstance(res, _Act):
            self.pin(items)
            return _Act(shape)
        return _Act(shape, {(a if a < d else a + 1): layout for a, layout in res.axes.items()})

    def split(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        x = args[0]
        desc = self.out_desc()
        if not isinstance(x, _Act):
            return NotImplemented
        nd = len(x.shape)
        if name == "unbind":
            d = _norm_dim(_c(_get(args, kwargs, 1, "dim", 0)), nd)
            if d in x.axes:
                raise self.fail(f"it unbinds the unit axis {d}")
            axes = {(a if a < d else a - 1): layout for a, layout in x.axes.items()}
            return _Seq(tuple(_Act(o.shape, dict(axes)) for o in desc))
        default = 0
        d = _norm_dim(_c(_get(args, kwargs, 2, "dim", default)), nd)
        outs: list[_Act] = []
        off = 0
        for o in desc:
            n = o.shape[d]
            axes = dict(x.axes)
            if d in x.axes:
                part = self.u.slice(x.axes[d], off, off + n, self.where())
                if part is None:
                    del axes[d]
                else:
                    axes[d] = part
            outs.append(_Act(o.shape, axes))
            off += n
        return _Seq(tuple(outs))

    def pool(self, x: Any, k: int | None) -> Any:
        """Ops over the trailing ``k`` (spatial) axes; the others (batch, channels) pass unchanged."""
        if not isinstance(x, _Act):
            return NotImplemented
        desc = self.out_desc()
        if not isinstance(desc, _T):
            if x.axes:
                raise self.fail("pooling that returns indices")
            return self.fresh(desc)
        nd = len(x.shape)
        k = nd - 2 if k is None else k
        hit = [a for a in x.axes if a >= nd - k]
        if hit:
            raise self.fail(f"it pools/pads/resizes along the unit axis {hit[0]} of a {x.shape} tensor")
        return _Act(desc.shape, dict(x.axes))

    def glu(self, x: Any, dim: int) -> Any:
        if not isinstance(x, _Act):
            return NotImplemented
        nd = len(x.shape)
        d = _norm_dim(dim, nd)
        shape = self.out_shape()
        axes = dict(x.axes)
        if d in x.axes:
            half = x.shape[d] // 2
            a = self.u.slice(x.axes[d], 0, half, self.where())
            b = self.u.slice(x.axes[d], half, 2 * half, self.where())
            if a is None or b is None:
                self.u.fix(x.axes[d])
                del axes[d]
            else:
                self.u.unify(a, b, self.where())
                axes[d] = a
        return _Act(shape, axes)

    # -- producers ----------------------------------------------------------------------------------------

    def dense(
        self,
        x: Any,
        key: str,
        weight: str | None,
        out_dim: int,
        in_dim: int,
        bias: str | None,
        out_features: int,
        name: str,
        weight_start: tuple[int, int] = (0, 0),
        bias_start: int = 0,
        shape: tuple[int, ...] | None = None,
    ) -> Any:
        """``y = x W^T + b`` along ``x``'s last axis; ``weight``'s ``out_dim``/``in_dim`` index out/in units."""
        if not isinstance(x, _Act) or weight is None:
            return NotImplemented
        shape = shape or self.out_shape()
        last = len(x.shape) - 1
        if last in x.axes:
            self.read(x.axes[last], weight, in_dim, weight_start[1])
        (basis,), new = self.producer(key, [(out_features, name, 1)])
        if new:
            self.u.b[basis].axes.append(Axis(weight, out_dim, "out", 1, weight_start[0]))
            if bias is not None:
                self.u.b[basis].axes.append(Axis(bias, 0, "out", 1, bias_start))
        axes = {a: layout for a, layout in x.axes.items() if a != last}
        axes[len(shape) - 1] = (self.u.piece(basis),)
        return _Act(shape, axes)

    def f_linear(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        x, w, b = args[0], _get(args, kwargs, 1, "weight"), _get(args, kwargs, 2, "bias")
        if not isinstance(x, _Act):
            return NotImplemented
        return self.param_dense(x, w, b, out_axis=0, in_axis=1)

    def param_dense(
        self, x: _Act, w: Any, b: Any, out_axis: int, in_axis: int, shape: tuple[int, ...] | None = None
    ) -> Any:
        """``x @ w.T``-like product with a weight given as a value (``w``'s tensor axes out_axis/in_axis)."""
        shape = shape or self.out_shape()
        last = len(x.shape) - 1
        ok = isinstance(w, _Param) and len(w.shape) == 2 and None not in w.dims
        ok &= (
            b is None
            or (isinstance(b, _Other) and b.value is None)
            or (isinstance(b, _Param) and len(b.shape) == 1 and b.dims[0] is not None)
        )
        if not ok:  # weights we cannot permute: their rows/columns stay in place
            if isinstance(w, _Act) and w.axes:
                raise self.fail("product of two tensors that both carry units")
            self.pin([w, b])
            if last in x.axes:
                self.u.fix(x.axes[last])
            axes = {a: layout for a, layout in x.axes.items() if a != last}
            return _Act(shape, axes)
        assert isinstance(w, _Param)
        (wo, so), (wi, si) = w.dims[out_axis], w.dims[in_axis]
        bname = b.name if isinstance(b, _Param) else None
        bstart = b.dims[0][1] if isinstance(b, _Param) else 0
        base = w.name.removesuffix(".weight")
        key = f"param:{w.name}:{wo}"
        return self.dense(x, key, w.name, wo, wi, bname, w.shape[out_axis], base, (so, si), bstart, shape)

    def matmul(self, a: Any, b: Any) -> Any:
        shape = self.out_shape()
        if isinstance(a, _Act) and isinstance(b, _Act):
            if a.axes and b.axes:
                raise self.fail("matrix product of two tensors that both carry units (use an attention leaf)")
            x, other, x_first = (a, b, True) if a.axes else (b, a, False)
            if not x.axes:
                return _Act(shape)
            return self.plain_matmul(x, other, x_first)
        if isinstance(a, _Act) and isinstance(b, _Param) and len(b.shape) == 2 and len(a.shape) >= 2:
            return self.param_dense(a, b, None, out_axis=1, in_axis=0)  # x @ W with W (in, out)
        if isinstance(a, _Param) and isinstance(b, _Act) and len(a.shape) == 2 and len(b.shape) >= 2:
            # W @ x with W (out, in) contracting x's axis -2: move that axis last and back
            nd = len(b.shape)
            axes = {
                (nd - 1 if k == nd - 2 else nd - 2 if k == nd - 1 else k): lay for k, lay in b.axes.items()
            }
            bt = _Act((*b.shape[:-2], b.shape[-1], b.shape[-2]), axes)
            res = self.param_dense(bt, a, None, 0, 1, shape=(*shape[:-2], shape[-1], shape[-2]))
            n = len(shape)
            return _Act(
                shape, {(n - 1 if k == n - 2 else n - 2 if k == n - 1 else k): v for k, v in res.axes.items()}
            )
        if isinstance(a, _Act) and isinstance(b, _Param):
            self.pin([b])
            return self.plain_matmul(a, _Act(b.shape), True)
        if isinstance(a, _Param) and isinstance(b, _Act):
            self.pin([a])
            return self.plain_matmul(b, _Act(a.shape), False)
        return NotImplemented

    def plain_matmul(self, x: _Act, other: _Act, x_first: bool) -> Any:
        """``x @ P`` or ``P @ x`` with ``P`` in a fixed order: the contracted axis of ``x`` must stay fixed."""
        shape = self.out_shape()
        nd, n = len(x.shape), len(shape)
        if nd < 2 or len(other.shape) < 1:
            raise self.fail("matrix product with a 1-D operand")
        contracted = nd - 1 if x_first else nd - 2
        axes: dict[int, Layout] = {}
        for k, layout in x.axes.items():
            if k == contracted:
                self.u.fix(layout)
            else:
                axes[k + (n - nd)] = layout
        return _Act(shape, axes)

    def conv(self, x: Any, mod: nn.modules.conv._ConvNd, path: str) -> Any:
        if not isinstance(x, _Act):
            return NotImplemented
        shape = self.out_shape()
        k = len(mod.kernel_size)
        nd = len(x.shape)
        ch = nd - k - 1
        hit = [a for a in x.axes if a > ch]
        if hit:
            raise self.fail(f"it convolves along the unit axis {hit[0]}")
        axes = {a: layout for a, layout in x.axes.items() if a != ch}
        layout = x.axes.get(ch)
        w, b = self.pname(path, "weight"), self.pname(path, "bias")
        assert w is not None
        in_dim, out_dim = (0, 1) if mod.transposed else (1, 0)
        if mod.groups == 1:
            if layout is not None:
                self.read(layout, w, in_dim)
            (basis,), new = self.producer(path, [(mod.out_channels, path, 1)])
            if new:
                self.u.b[basis].axes.append(Axis(w, out_dim, "out"))
                if b is not None:
                    self.u.b[basis].axes.append(Axis(b, 0, "out"))
            axes[ch] = (self.u.piece(basis),)
        elif not mod.transposed and mod.groups == mod.in_channels and mod.out_channels % mod.in_channels == 0:
            # depthwise: output channel o reads input channel o // m, so it lives in the input's basis
            if layout is not None:
                m = mod.out_channels // mod.in_channels
                scaled = tuple(_Piece(p.basis, p.size, p.inner * m) for p in self.u.leaves(layout))
                self.u.attach(scaled, w, 0, "out")
                if b is not None:
                    self.u.attach(scaled, b, 0, "out")
                axes[ch] = scaled
        else:
            logger.warning(
                "discover_structure: %s: grouped convolution (groups=%d); its input and output channels stay fixed",
                self.where(),
                mod.groups,
            )
            if layout is not None:
                self.u.fix(layout)
        return _Act(shape, axes)

    def f_conv(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        x, w = args[0], _get(args, kwargs, 1, "weight")
        b = _get(args, kwargs, 2, "bias")
        groups = _c(_get(args, kwargs, 6, "groups", 1))
        if not isinstance(x, _Act):
            return NotImplemented
        shape = self.out_shape()
        ch = len(x.shape) - (len(w.shape) - 2) - 1 if isinstance(w, _Tensorish) else 1
        if any(a > ch for a in x.axes):
            raise self.fail("it convolves along a unit axis")
        ident = isinstance(w, _Param) and all(d == (i, 0) for i, d in enumerate(w.dims))
        bias_ok = (
            b is None
            or (isinstance(b, _Other) and b.value is None)
            or (isinstance(b, _Param) and b.dims == ((0, 0),))
        )
        axes = {a: layout for a, layout in x.axes.items() if a != ch}
        if not (ident and bias_ok and groups == 1):
            self.pin([w, b])
            if ch in x.axes:
                self.u.fix(x.axes[ch])
            return _Act(shape, axes)
        assert isinstance(w, _Param)
        if ch in x.axes:
            self.read(x.axes[ch], w.name, 1)
        (basis,), new = self.producer(f"param:{w.name}:0", [(w.shape[0], w.name.removesuffix(".weight"), 1)])
        if new:
            self.u.b[basis].axes.append(Axis(w.name, 0, "out"))
            if isinstance(b, _Param):
                self.u.b[basis].axes.append(Axis(b.name, 0, "out"))
        axes[ch] = (self.u.piece(basis),)
        return _Act(shape, axes)

    def embedding(self, x: Any, mod: nn.Embedding, path: str) -> Any:
        if not isinstance(x, _Act):
            return NotImplemented
        if x.axes:
            raise self.fail("embedding lookup with indices that carry units")
        w = self.pname(path, "weight")
        assert w is not None
        shape = self.out_shape()
        (basis,), new = self.producer(path, [(mod.embedding_dim, path, 1)])
        if new:
            self.u.b[basis].axes.append(Axis(w, 1, "out"))
        return _Act(shape, {len(shape) - 1: (self.u.piece(basis),)})

    def mhsa(self, x: Any, mod: MultiHeadSelfAttention, path: str) -> Any:
        if not isinstance(x, _Act):
            return NotImplemented
        shape = self.out_shape()
        last = len(x.shape) - 1
        inner = mod.heads * mod.head_dim
        (qk, vo, out), new = self.producer(
            path,
            [(inner, f"{path}.q", mod.heads), (inner, f"{path}.v", mod.heads), (mod.dim, f"{path}.out", 1)],
        )
        p = lambda sub, attr: self.pname(f"{path}.{sub}", attr)  # noqa: E731
        if new:
            for sub, basis in (("q", qk), ("k", qk), ("v", vo), ("out", out)):
                self.u.b[basis].axes.append(Axis(p(sub, "weight"), 0, "out"))
                if p(sub, "bias") is not None:
                    self.u.b[basis].axes.append(Axis(p(sub, "bias"), 0, "out"))
            self.u.b[vo].axes.append(Axis(p("out", "weight"), 1, "in"))
            if mod.heads > 1:
                self.u.ties.append({qk, vo})
        if last in x.axes:
            for sub in ("q", "k", "v"):
                self.read(x.axes[last], p(sub, "weight"), 1)
        axes = {a: layout for a, layout in x.axes.items() if a != last}
        axes[last] = (self.u.piece(out),)
        return _Act(shape, axes)

    def mha(self, mod: nn.MultiheadAttention, path: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        q, k, v = (_get(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
        if not all(isinstance(t, _Act) for t in (q, k, v)):
            return NotImplemented
        for i, n in ((3, "key_padding_mask"), (5, "attn_mask")):
            if self.tracked([_get(args, kwargs, i, n)]):
                raise self.fail(f"{n} carries units")
        for t in (q, k, v):
            if any(a != len(t.shape) - 1 for a in t.axes):
                raise self.fail("only the embedding (last) axis of query/key/value may carry units")
        need_weights = _c(_get(args, kwargs, 4, "need_weights", True))
        average = _c(_get(args, kwargs, 6, "average_attn_weights", True))
        desc = self.out_desc()
        E, H = mod.embed_dim, mod.num_heads
        (qk, vo, out), new = self.producer(
            path, [(E, f"{path}.q", H), (E, f"{path}.v", H), (E, f"{path}.out_proj", 1)]
        )
        p = lambda attr: self.pname(path, attr)  # noqa: E731
        if new:
            if mod._qkv_same_embed_dim:
                w = p("in_proj_weight")
                for start, basis in ((0, qk), (E, qk), (2 * E, vo)):
                    self.u.b[basis].axes.append(Axis(w, 0, "out", 1, start))
            else:
                for attr, basis in (("q_proj_weight", qk), ("k_proj_weight", qk), ("v_proj_weight", vo)):
                    self.u.b[basis].axes.append(Axis(p(attr), 0, "out"))
            if p("in_proj_bias") is not None:
                for start, basis in ((0, qk), (E, qk), (2 * E, vo)):
                    self.u.b[basis].axes.append(Axis(p("in_proj_bias"), 0, "out", 1, start))
            if p("bias_k") is not None:
                self.u.b[qk].axes.append(Axis(p("bias_k"), 2, "out"))
                self.u.b[vo].axes.append(Axis(p("bias_v"), 2, "out"))
            self.u.b[vo].axes.append(Axis(p("out_proj.weight"), 1, "in"))
            self.u.b[out].axes.append(Axis(p("out_proj.weight"), 0, "out"))
            if p("out_proj.bias") is not None:
                self.u.b[out].axes.append(Axis(p("out_proj.bias"), 0, "out"))
            if H > 1:
                self.u.ties.append({qk, vo})
        if mod._qkv_same_embed_dim:
            reads = [(q, p("in_proj_weight")), (k, p("in_proj_weight")), (v, p("in_proj_weight"))]
        else:
            reads = [(q, p("q_proj_weight")), (k, p("k_proj_weight")), (v, p("v_proj_weight"))]
        for t, w in reads:
            last = len(t.shape) - 1
            if last in t.axes:
                self.read(t.axes[last], w, 1)
        out_shape = desc[0].shape
        attn = _Act(out_shape, {len(out_shape) - 1: (self.u.piece(out),)})
        weights: Any = self.fresh(desc[1])
        if need_weights and not average:
            weights = _Poison("per-head attention weights are ordered by the head permutation")
        return _Seq((attn, weights))

    # -- norms --------------------------------------------------------------------------------------------

    def channel_norm(self, x: Any, mod: nn.Module, path: str) -> Any:
        """BatchNorm / InstanceNorm: per-channel parameters and statistics on axis 1 (0 if unbatched)."""
        if not isinstance(x, _Act):
            return NotImplemented
        shape = self.out_shape()
        k = _spatial_suffix(type(mod)) or 1
        ch = 1 if len(x.shape) >= k + 2 or isinstance(mod, nn.BatchNorm1d) else 0
        layout = x.axes.get(ch)
        if layout is not None:
            for attr in ("weight", "bias", "running_mean", "running_var"):
                name = self.pname(path, attr)
                if name is not None:
                    self.u.attach(layout, name, 0, "out")
        return _Act(shape, dict(x.axes))

    def layer_norm(self, x: Any, mod: nn.Module, path: str) -> Any:
        if not isinstance(x, _Act):
            return NotImplemented
        shape = self.out_shape()
        ns = mod.normalized_shape
        n = len(ns) if isinstance(ns, (tuple, list, torch.Size)) else 1
        nd = len(x.shape)
        for a, layout in x.axes.items():
            if a >= nd - n:
                for attr in ("weight", "bias"):
                    name = self.pname(path, attr)
                    if name is not None:
                        self.u.attach(layout, name, a - (nd - n), "out")
        return _Act(shape, dict(x.axes))

    def f_layer_norm(self, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Statistics over the normalised (trailing) axes are invariant; the affine part is elementwise."""
        x = args[0]
        if not isinstance(x, _Act):
            return NotImplemented
        return self.elementwise([x, _get(args, kwargs, 2, "weight"), _get(args, kwargs, 3, "bias")])

    def group_norm(self, x: Any, mod: nn.GroupNorm, path: str) -> Any:
        if not isinstance(x, _Act):
            return NotImplemented
        shape = self.out_shape()
        layout = x.axes.get(1)
        if layout is not None:
            g, c = mod.num_groups, mod.num_channels
            if 1 < g < c:
                self.u.constrain_blocks(layout, c // g, self.where())
            for attr in ("weight", "bias"):
                name = self.pname(path, attr)
                if name is not None:
                    self.u.attach(layout, name, 0, "out")
        return _Act(shape, dict(x.axes))

    def prelu(self, x: Any, mod: nn.PReLU, path: str) -> Any:
        if not isinstance(x, _Act):
            return NotImplemented
        shape = self.out_shape()
        if mod.num_parameters > 1:
            ch = 1 if len(x.shape) >= 2 else 0
            w = self.pname(path, "weight")
            if ch in x.axes and w is not None:
                self.u.attach(x.axes[ch], w, 0, "out")
            elif w is not None:
                self.pinned.add((w, None))
        return _Act(shape, dict(x.axes))

    # -- result -------------------------------------------------------------------------------------------

    def finish(self) -> Structure:
        u = self.u
        where = "combining axes claimed twice"
        # 1. an axis claimed by several bases (weight sharing, packed q/k/v inputs) unifies them
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
                        u.b[r0].fixed = u.b[r].fixed = True
                        continue
                    u.unify((u.piece(r0),), (u.piece(r),), f"{where} ({a.param}[{a.dim}])")
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
                if s1 < e0:
                    logger.warning(
                        "discover_structure: %s[%d] is laid out two ways; keeping %r and %r fixed",
                        param,
                        dim,
                        u.b[r0].name,
                        u.b[r1].name,
                    )
                    u.b[r0].fixed = u.b[r1].fixed = True
        # 3. pinned parameters and fixed tie members fix everything tied to them
        for r in u.roots():
            if any({(a.param, None), (a.param, a.dim)} & self.pinned for a in u.b[r].axes):
                u.b[r].fixed = True
        ties: list[set[int]] = []
        for tie in u.ties:
            members = {u.find(m) for m in tie}
            for other in [t for t in ties if t & members]:
                members |= other
                ties.remove(other)
            ties.append(members)
        for members in ties:
            if any(u.b[m].fixed for m in members):
                for m in members:
                    u.b[m].fixed = True
        # 4. groups in forward order, with the places where their units can be observed
        live = sorted((r for r in u.roots() if not u.b[r].fixed and u.b[r].axes), key=lambda r: u.b[r].order)
        probes = self.probes(set(live))
        names: dict[int, str] = {}
        used: set[str] = set()
        groups: list[Group] = []
        for r in live:
            b = u.b[r]
            name, k = b.name, 2
            while name in used:
                name, k = f"{b.name}#{k}", k + 1
            used.add(name)
            names[r] = name
            # one axis per tensor axis (a tied weight may be both written and read: keep the first role), then
            # the same axis under every state_dict key of a tensor registered under several names
            unique: dict[tuple[str, int, int], Axis] = {}
            for a in b.axes:
                unique.setdefault((a.param, a.dim, a.start), a)
            axes = [replace(a, param=alias) for a in unique.values() for alias in self.aliases[a.param]]
            groups.append(Group(name, b.size, tuple(axes), b.blocks, tuple(probes.get(r, ()))))
        tie_names = [
            tuple(names[m] for m in sorted(t, key=lambda m: u.b[m].order) if m in names) for t in ties
        ]
        return Structure(tuple(groups), tuple(t for t in tie_names if len(t) > 1))

    def probes(self, live: set[int]) -> dict[int, list[Probe]]:
        """Per live basis, the nodes whose output shows its units as they are read by the next layers.

        For every consumer that reads a basis (a ``Linear``/conv/attention input axis), the nearest node at or
        before the consumer's input whose output holds exactly that basis, one entry per unit, along one axis
        (through a flatten or a concat this walks back to the unflattened branch). A residual stream thus gets
        one probe per reader (each block's input, the pooled features before the head).
        """
        u = self.u
        out: dict[int, list[Probe]] = {}

        def whole(node: fx.Node, r: int) -> int | None:
            v = self.env.get(node)
            if isinstance(v, _Act):
                for axis, layout in v.axes.items():
                    leaves = u.leaves(layout)
                    if len(leaves) == 1 and leaves[0].basis == r and leaves[0].inner == 1:
                        return axis
            return None

        def carries(node: fx.Node, r: int) -> bool:
            v = self.env.get(node)
            return isinstance(v, _Act) and any(p.basis == r for lay in v.axes.values() for p in u.leaves(lay))

        for reader, layout in self.reads:
            sources = [n for n in reader.all_input_nodes if isinstance(self.env.get(n), _Act)]
            sources = [n for n in sources if any(lay is layout for lay in self.env[n].axes.values())]
            for r in dict.fromkeys(p.basis for p in u.leaves(layout)):
                if r not in live:
                    continue
                queue, seen = deque(sources), set(sources)
                while queue:
                    node = queue.popleft()
                    axis = whole(node, r)
                    if axis is not None:
                        probe = Probe(node.name, axis)
                        if probe not in out.setdefault(r, []):
                            out[r].append(probe)
                        break
                    for prev in node.all_input_nodes:
                        if prev not in seen and carries(prev, r):
                            seen.add(prev)
                            queue.append(prev)
        return out


def _broadcast_param(p: _Param, shape: tuple[int, ...]) -> _Param:
    """``p`` broadcast to ``shape``: axes it is repeated along no longer map to a parameter axis."""
    pad = len(shape) - len(p.shape)
    dims = [None if p.shape[k] != shape[k + pad] else d for k, d in enumerate(p.dims)]
    return _Param(shape, p.name, (None,) * pad + tuple(dims))


def _map_reshape_axis(in_shape: Sequence[int], d: int, out_shape: Sequence[int]) -> tuple[int, int] | None:
    """Where axis ``d`` of ``in_shape`` goes in a reshape to ``out_shape``.

    Returns ``(j, factor)``: ``factor >= 1`` means each entry of axis ``d`` becomes ``factor`` consecutive
    entries of output axis ``j`` (merged with trailing axes); ``factor = -s`` means axis ``j`` holds every
    ``s``-th group of entries (the axis was split, its ``s`` innermost entries moved to trailing axes).
    ``None`` if the axis mixes with leading axes.
    """
    prefix = math.prod(in_shape[:d])
    e = in_shape[d]
    acc = 1
    best: tuple[int, int] | None = None
    for j, f in enumerate(out_shape):
        if acc == prefix:
            if f % e == 0 and (f > 1 or e == 1):
                return (j, f // e)
            if f > 1 and e % f == 0 and best is None:
                best = (j, -(e // f))
        acc *= f
        if acc > prefix:
            break
    return best
