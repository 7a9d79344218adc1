"""Shape ops: views and reshapes, axis permutations, slicing, splitting, concatenation and indexing."""

from __future__ import annotations

from typing import Any

from mergelab.structure.discover.bases import Piece
from mergelab.structure.discover.rules import rule
from mergelab.structure.discover.values import Act, Other, Param, Seq, tensor_like
from mergelab.structure.discover.walk import INPUT_REASON, Walk, arg, broadcast_param, c, ndim


@rule(
    "view",
    "reshape",
    "_unsafe_view",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "reshape_as",
    "ravel",
)
def reshape(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Row-major reshapes: split and merge axes; units may end up split into (heads, within-head) axes."""
    return w.reshape(args[0], w.out_shape())


@rule("permute", "transpose", "t", "swapaxes", "swapdims", "movedim", "numpy_T", "mT")
def transpose(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    v = args[0]
    if not tensor_like(v):
        return NotImplemented
    assert w.node is not None
    nd = len(v.shape)
    name = w.node.target._opname  # type: ignore[union-attr]
    perm = list(range(nd))
    if name in ("transpose", "swapaxes", "swapdims"):
        a, b = ndim(c(args[1]), nd), ndim(c(args[2]), nd)
        perm[a], perm[b] = perm[b], perm[a]
    elif name in ("t", "numpy_T"):
        perm = perm[::-1]
    elif name == "mT":
        perm[-1], perm[-2] = perm[-2], perm[-1]
    elif name == "permute":
        perm = [ndim(int(d), nd) for d in c(args[1])]
    else:  # movedim
        src, dst = c(args[1]), c(args[2])
        src = [ndim(s, nd) for s in ([src] if isinstance(src, int) else src)]
        dst = [ndim(d, nd) for d in ([dst] if isinstance(dst, int) else dst)]
        rest = iter(i for i in range(nd) if i not in src)
        slots = [-1] * nd
        for s, d in zip(src, dst, strict=True):
            slots[d] = s
        perm = [p if p >= 0 else next(rest) for p in slots]
    return w.permuted(v, perm, w.out_shape())


@rule("expand", "expand_as", "broadcast_to")
def expand(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    v = args[0]
    if not tensor_like(v):
        return NotImplemented
    shape = w.out_shape()
    pad = len(shape) - len(v.shape)
    if isinstance(v, Param):
        return broadcast_param(v, shape)
    tiled = {k for k in range(len(v.shape)) if v.shape[k] != shape[k + pad]}
    for k in tiled:
        if k in v.busy():
            v = w.degrade_all(v, "an expanded head axis")
            if k in v.axes:
                w.u.fix(v.axes[k], f"{w.where()}: one unit broadcast over many")
    return Act(
        shape,
        {a + pad: lay for a, lay in v.axes.items() if a not in tiled},
        {d + pad: (tuple(h + pad for h in hs), lay) for d, (hs, lay) in v.pairs.items()},
    )


@rule("repeat", "tile")
def repeat(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Repeating a unit axis lays the same units several times, one copy after the other."""
    v = args[0]
    shape = w.out_shape()
    if isinstance(v, Param):
        pad = len(shape) - len(v.shape)
        if all(
            v.shape[k] == 1 or v.dims[k] is None or shape[k + pad] == v.shape[k] for k in range(len(v.shape))
        ):
            return broadcast_param(v, shape)  # tiled along axes of one entry: a broadcast
        w.pin(v, f"repeated by {w.where()}")
        return Act(shape)
    if not isinstance(v, Act):
        return NotImplemented
    v = w.degrade_all(v, "a repeated head axis")
    reps = [int(r) for r in c(args[1])]
    pad = len(shape) - len(v.shape)
    reps = [1] * (len(shape) - len(reps)) + reps
    axes = {a + pad: lay * reps[a + pad] for a, lay in v.axes.items()}
    return Act(shape, axes)


def _slice_axis(w: Walk, v: Act, d: int, lo: int, hi: int) -> Act:
    """``v`` restricted to entries ``[lo, hi)`` of axis ``d`` (a unit axis is split at the cut)."""
    shape = list(v.shape)
    shape[d] = hi - lo
    if (lo, hi) == (0, v.shape[d]):
        return Act(tuple(shape), dict(v.axes), dict(v.pairs))
    for dd in list(v.pairs):
        hs, _ = v.pairs[dd]
        if dd == d or d in hs:
            v = w.degrade(v, dd, "a slice of heads")
    axes = dict(v.axes)
    if d in axes:
        part = w.u.slice(axes[d], lo, hi, w.where())
        if part is None:
            del axes[d]
        else:
            axes[d] = part
    return Act(tuple(shape), axes, dict(v.pairs))


@rule("slice", "narrow")
def slice_(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    v = args[0]
    assert w.node is not None
    name = w.node.target._opname  # type: ignore[union-attr]
    if not tensor_like(v):
        return NotImplemented
    nd = len(v.shape)
    d = ndim(c(arg(args, kwargs, 1, "dim", 0)), nd)
    n = v.shape[d]
    if name == "narrow":
        lo = c(args[2])
        lo, hi, step = lo, lo + c(args[3]), 1
    else:
        start, end = c(arg(args, kwargs, 2, "start")), c(arg(args, kwargs, 3, "end"))
        step = c(arg(args, kwargs, 4, "step", 1)) or 1
        lo, hi, _ = slice(start, end, step).indices(n)
    if isinstance(v, Param):
        dims = list(v.dims)
        if dims[d] is not None and (lo, hi, step) != (0, n, 1):
            dims[d] = (dims[d][0], dims[d][1] + lo) if step == 1 else None
            if step != 1:
                w.pinned.setdefault((v.name, v.dims[d][0]), f"strided slice at {w.where()}")  # type: ignore[index]
        return Param(w.out_shape(), v.name, tuple(dims))
    if step != 1:
        if d in v.busy():
            v = w.degrade_all(v, "a strided slice")
            if d in v.axes:
                w.u.fix(v.axes[d], f"{w.where()}: a strided slice of units")
        return Act(w.out_shape(), {a: lay for a, lay in v.axes.items() if a != d}, dict(v.pairs))
    return _slice_axis(w, v, d, lo, hi)


def _select(w: Walk, v: Act, d: int, i: int, shape: tuple[int, ...]) -> Act:
    """``v`` indexed at position ``i`` of axis ``d`` (that axis disappears)."""

    def new(a: int) -> int:
        return a if a < d else a - 1

    for dd in list(v.pairs):
        hs, lay = v.pairs[dd]
        if d == dd:
            v = w.degrade(v, dd, "one within-head unit is picked")
        elif d in hs:
            # picking one head: that head's block becomes a basis of its own, laid on the within-head axis
            k = hs.index(d)
            inner = 1
            for h in hs[k + 1 :]:
                inner *= v.shape[h]
            outer = 1
            for h in hs[:k]:
                outer *= v.shape[h]
            if outer != 1:
                v = w.degrade(v, dd, "a head picked from a nested head axis")
                continue
            part = w.u.slice(lay, i * inner, (i + 1) * inner, w.where())
            pairs = {a: p for a, p in v.pairs.items() if a != dd}
            axes = dict(v.axes)
            if part is not None:
                rest = tuple(h for h in hs if h != d)
                if rest:
                    pairs[dd] = (rest, part)
                else:
                    axes[dd] = tuple(Piece(p.basis, p.entries * v.shape[dd]) for p in w.u.leaves(part))
            v = Act(v.shape, axes, pairs)
    if d in v.axes:
        part = w.u.slice(v.axes[d], i, i + 1, w.where())
        if part is not None:
            w.u.fix(part, f"{w.where()}: one position of the unit axis is picked")
    axes = {new(a): lay for a, lay in v.axes.items() if a != d}
    pairs = {new(dd): (tuple(new(h) for h in hs), lay) for dd, (hs, lay) in v.pairs.items()}
    return w.clean(Act(shape, axes, pairs))


@rule("select")
def select(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    v = args[0]
    if not tensor_like(v):
        return NotImplemented
    nd = len(v.shape)
    d = ndim(c(args[1]), nd)
    i = c(args[2])
    i = i + v.shape[d] if i < 0 else i
    if isinstance(v, Param):
        if v.dims[d] is not None and v.shape[d] != 1:
            w.pinned.setdefault((v.name, v.dims[d][0]), f"one position picked at {w.where()}")  # type: ignore[index]
        return Param(w.out_shape(), v.name, v.dims[:d] + v.dims[d + 1 :])
    return _select(w, v, d, i, w.out_shape())


@rule("unbind")
def unbind(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    v = args[0]
    if not isinstance(v, Act):
        return NotImplemented
    d = ndim(c(arg(args, kwargs, 1, "dim", 0)), len(v.shape))
    return Seq(tuple(_select(w, v, d, i, o.shape) for i, o in enumerate(w.out())))


@rule("split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split", "unsafe_chunk")
def split(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    v = args[0]
    if not tensor_like(v):
        return w.fresh()
    nd = len(v.shape)
    d = ndim(c(arg(args, kwargs, 2, "dim", 0)), nd)
    if isinstance(v, Param):  # views of a packed parameter (in_proj_bias.chunk(3))
        params, off = [], 0
        for o in w.out():
            dims = list(v.dims)
            if dims[d] is not None:
                dims[d] = (dims[d][0], dims[d][1] + off)  # type: ignore[index]
            params.append(Param(o.shape, v.name, tuple(dims)))
            off += o.shape[d]
        return Seq(tuple(params))
    outs, off = [], 0
    for o in w.out():
        n = o.shape[d]
        outs.append(_slice_axis(w, v, d, off, off + n))
        off += n
    return Seq(tuple(outs))


@rule("cat", "concat", "concatenate")
def cat(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Concatenation: along the axis, the pieces follow each other; elsewhere it behaves like ``+``."""
    items = [v for v in args[0]]
    shape = w.out_shape()
    nd = len(shape)
    d = ndim(c(arg(args, kwargs, 1, "dim", 0)), nd)
    items = [w.degrade_all(v, "concatenation") if isinstance(v, Act) else v for v in items]
    if not any(isinstance(v, Act) and v.tracked for v in items):
        for v in items:
            if isinstance(v, Param):
                w.pin(v, f"concatenated with a tensor in a fixed order at {w.where()}")
        return Act(shape)
    where = w.where()
    axes: dict[int, Any] = {}
    if any(isinstance(v, Act) and d in v.axes for v in items):
        pieces: list[Piece] = []
        for k, v in enumerate(items):
            n = v.shape[d]
            if isinstance(v, Act) and d in v.axes:
                pieces.extend(v.axes[d])
            elif isinstance(v, Param) and v.dims[d] is not None:
                i = w.u.new(n, v.name, w.order(k))
                w.attach((Piece(i, n),), v.name, v.dims[d])
                pieces.append(Piece(i, n))
            else:
                i = w.u.new(n, f"{w.node.name}.fixed", w.order(k), fixed=f"{where}: {INPUT_REASON}")  # type: ignore[union-attr]
                pieces.append(Piece(i, n))
        axes[d] = tuple(pieces)
    for j in range(nd):
        if j == d:
            continue
        layouts = [v.axes[j] for v in items if isinstance(v, Act) and j in v.axes]
        if not layouts:
            continue
        first = layouts[0]
        for other in layouts[1:]:
            w.u.unify(first, other, where)
        for v in items:
            if isinstance(v, Act) and j not in v.axes:
                w.u.fix(first, f"{where}: {INPUT_REASON}")
            elif isinstance(v, Param):
                w.attach(first, v.name, v.dims[j])
        axes[j] = first
    return Act(shape, axes)


@rule("stack")
def stack(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    items = list(args[0])
    shape = w.out_shape()
    d = ndim(c(arg(args, kwargs, 1, "dim", 0)), len(shape))
    res = w.elementwise(items, shape[:d] + shape[d + 1 :])
    if not isinstance(res, Act):
        return Act(shape)

    def new(a: int) -> int:
        return a if a < d else a + 1

    return Act(
        shape,
        {new(a): lay for a, lay in res.axes.items()},
        {new(dd): (tuple(new(h) for h in hs), lay) for dd, (hs, lay) in res.pairs.items()},
    )


@rule("index", "_unsafe_index")
def index(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Advanced indexing ``x[idx]``: indexed axes are gathered (their units must stay), the others pass."""
    v, indices = args[0], list(args[1])
    if any(isinstance(i, Act) and i.tracked for i in indices):
        raise w.unsupported("indices that carry units")
    if not tensor_like(v):
        return NotImplemented
    shape = w.out_shape()
    used = [
        k for k, i in enumerate(indices) if i is not None and not (isinstance(i, Other) and i.value is None)
    ]
    contiguous = used == list(range(used[0], used[-1] + 1)) if used else True
    if isinstance(v, Act):
        v = w.degrade_all(v, "indexing")
        for k in used:
            if k in v.axes:
                w.u.fix(v.axes[k], f"{w.where()}: units gathered by an index")
    if not used or not contiguous:
        if isinstance(v, Param):
            w.pin(v, f"indexed at {w.where()}")
            return Act(shape)
        return w.plain_from(v, "indexing")
    first, last = used[0], used[-1]
    nd_in = len(v.shape)
    n_idx = len(shape) - (nd_in - len(used))

    def new(a: int) -> int:
        return a if a < first else a - len(used) + n_idx

    if isinstance(v, Param):
        dims: list[Any] = list(v.dims[:first]) + [None] * n_idx + list(v.dims[last + 1 :])
        return Param(shape, v.name, tuple(dims))
    return Act(shape, {new(a): lay for a, lay in v.axes.items() if a not in used})


@rule(
    "index_select",
    "gather",
    "take_along_dim",
    "scatter",
    "scatter_add",
    "index_add",
    "index_copy",
    "index_put",
    "index_fill",
)
def gather(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Gathers and scatters along an axis: units there stay in place; other tracked axes are kept fixed too."""
    v = args[0]
    if isinstance(v, Param):
        w.pin(v, f"gathered at {w.where()}")
        return Act(w.out_shape())
    if not isinstance(v, Act):
        return NotImplemented
    for other in args[1:]:
        if isinstance(other, Act) and other.tracked:
            w.fix_act(other, f"{w.where()}: gather/scatter operand")
    return w.plain_from(v, "gather/scatter along an axis")


@rule("new_ones", "new_zeros", "new_full", "new_empty", "new_tensor", "scalar_tensor", "empty_like_strided")
def new_tensor(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Fresh constants that only borrow dtype/device from a tensor."""
    return w.fresh()


@rule("repeat_interleave")
def repeat_interleave(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``x.repeat_interleave(n, dim)``: each entry repeated ``n`` times in place (``repeat_kv`` written short)."""
    v = args[0]
    repeats, dim = c(arg(args, kwargs, 1, "repeats")), c(arg(args, kwargs, 2, "dim"))
    if not isinstance(v, Act) or not isinstance(repeats, int) or dim is None:
        if isinstance(v, Act) and v.tracked:
            return w.plain_from(v, "repeat_interleave without a fixed count and axis")
        return NotImplemented
    d = ndim(dim, len(v.shape))
    shape = w.out_shape()
    expanded = Act(
        (*v.shape[: d + 1], repeats, *v.shape[d + 1 :]),
        {a if a <= d else a + 1: lay for a, lay in v.axes.items()},
        {
            (dd if dd <= d else dd + 1): (tuple(h if h <= d else h + 1 for h in hs), lay)
            for dd, (hs, lay) in v.pairs.items()
        },
    )
    return w.reshape(expanded, shape)
