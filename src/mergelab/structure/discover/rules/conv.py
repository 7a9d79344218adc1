"""Convolutions (plain, grouped, depthwise, transposed) and ops over spatial axes (pooling, padding, resizing)."""

from __future__ import annotations

from typing import Any

from mergelab.structure.discover.bases import Piece
from mergelab.structure.discover.rules import rule
from mergelab.structure.discover.values import Act, Param, Seq
from mergelab.structure.discover.walk import Walk, arg, c
from mergelab.structure.types import Axis


def _conv(w: Walk, x: Any, weight: Any, bias: Any, groups: int, transposed: bool) -> Any:
    if not isinstance(x, Act):
        return NotImplemented
    shape = w.out_shape()
    if (
        not isinstance(weight, Param)
        or None in weight.dims
        or (
            bias is not None
            and not isinstance(bias, Param)
            and not (hasattr(bias, "value") and bias.value is None)
        )
    ):
        w.pin_all([weight, bias], f"a convolution weight discovery cannot follow at {w.where()}")
        return w.plain_from(x, "a convolution with a computed weight")
    k = len(weight.shape) - 2
    ch = len(x.shape) - k - 1
    x = w.degrade_all(x, "a convolution")
    for a in list(x.axes):
        if a > ch:
            w.u.fix(x.axes[a], f"{w.where()}: units on a spatial axis")
    axes = {a: lay for a, lay in x.axes.items() if a < ch}
    layout = x.axes.get(ch)
    name = weight.name
    (w0, s0), (w1, s1) = weight.dims[0], weight.dims[1]  # type: ignore[misc]
    in_dim, out_dim = (w0, w1) if transposed else (w1, w0)
    in_start, out_start = (s0, s1) if transposed else (s1, s0)
    out_ch = weight.shape[1] * groups if transposed else weight.shape[0]
    in_ch = x.shape[ch]
    b = bias if isinstance(bias, Param) else None
    if groups == 1:
        if layout is not None:
            w.read(layout, name, in_dim, in_start)
        basis, new = w.producer(f"{name}:{out_dim}:{out_start}", out_ch, name.removesuffix(".weight"))
        if new:
            w.u.b[basis].axes.append(Axis(name, out_dim, "out", 1, out_start))
            if b is not None and b.dims[0] is not None:
                w.u.b[basis].axes.append(Axis(b.name, b.dims[0][0], "out", 1, b.dims[0][1]))
        axes[ch] = (Piece(basis, out_ch),)
        return w.clean(Act(shape, axes))
    if transposed:
        if layout is not None:
            w.u.fix(layout, f"{w.where()}: a grouped transposed convolution")
        w.pin_all([weight, bias], f"a grouped transposed convolution at {w.where()}")
        return Act(shape, axes)
    if groups == in_ch and out_ch % in_ch == 0:
        # depthwise: output channel o reads input channel o // m, so it lives in the input's basis
        if layout is not None:
            m = out_ch // in_ch
            scaled = tuple(Piece(p.basis, p.entries * m) for p in w.u.leaves(layout))
            w.attach(scaled, name, weight.dims[0])
            if b is not None:
                w.attach(scaled, b.name, b.dims[0])
            axes[ch] = scaled
        else:
            w.pin_all([weight, bias], f"a depthwise convolution of channels in a fixed order at {w.where()}")
        return w.clean(Act(shape, axes))
    # grouped: groups move as blocks (input channels of a group glued together, the weight's per-group input
    # axis stays in place); inside a group the output channels are free
    per_in = in_ch // groups
    basis, new = w.producer(
        f"{name}:{out_dim}:{out_start}", out_ch, name.removesuffix(".weight"), blocks=groups
    )
    if new:
        w.u.b[basis].axes.append(Axis(name, out_dim, "out", 1, out_start))
        if b is not None and b.dims[0] is not None:
            w.u.b[basis].axes.append(Axis(b.name, b.dims[0][0], "out", 1, b.dims[0][1]))
    if layout is not None:
        w.u.constrain_blocks(layout, per_in, w.where())
        for p in w.u.leaves(layout):
            q = w.u.inner(p)
            if q.denominator == 1 and per_in % int(q) == 0:
                w.u.coarsen(p.basis, per_in // int(q), w.where())  # units become whole groups
        leaves = w.u.leaves(layout)
        if all(w.u.inner(p) == per_in and w.u.b[w.u.find(p.basis)].fixed is None for p in leaves):
            heads = tuple(Piece(p.basis, p.entries // per_in) for p in leaves)  # one entry per group
            w.u.tie(heads, (Piece(basis, groups),), w.where())
        else:
            w.u.fix(layout, f"{w.where()}: input channels of a grouped convolution do not form whole groups")
            w.u.fix(
                (Piece(basis, out_ch),), f"{w.where()}: grouped convolution reading channels in a fixed order"
            )
    else:
        w.u.fix(
            (Piece(basis, out_ch),), f"{w.where()}: grouped convolution reading channels in a fixed order"
        )
    axes[ch] = (Piece(basis, out_ch),)
    return w.clean(Act(shape, axes))


@rule("conv1d", "conv2d", "conv3d")
def conv(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    groups = int(c(arg(args, kwargs, 6, "groups", 1)))
    return _conv(w, args[0], args[1], arg(args, kwargs, 2, "bias"), groups, False)


@rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv_transpose(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    groups = int(c(arg(args, kwargs, 6, "groups", 1)))
    return _conv(w, args[0], args[1], arg(args, kwargs, 2, "bias"), groups, True)


@rule("convolution", "_convolution")
def convolution(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    transposed = bool(c(args[6]))
    groups = int(c(args[8]))
    return _conv(w, args[0], args[1], args[2], groups, transposed)


_SPATIAL = {
    **{
        f"{n}{k}d": k
        for n in (
            "max_pool",
            "avg_pool",
            "adaptive_avg_pool",
            "adaptive_max_pool",
            "lp_pool",
            "_adaptive_avg_pool",
        )
        for k in (1, 2, 3)
    },
    **{f"max_pool{k}d_with_indices": k for k in (1, 2, 3)},
    **{f"reflection_pad{k}d": k for k in (1, 2, 3)},
    **{f"replication_pad{k}d": k for k in (1, 2, 3)},
    **{
        f"upsample_{m}{k}d": k
        for m in ("nearest", "bilinear", "bicubic", "linear", "trilinear")
        for k in (1, 2, 3)
    },
    "upsample_nearest2d": 2,
    "upsample_bilinear2d": 2,
    "constant_pad_nd": None,
    "pad": None,
}


@rule(*_SPATIAL)
def spatial(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Pooling, padding and resizing act on the trailing spatial axes; batch and channels pass unchanged."""
    x = args[0]
    if not isinstance(x, Act):
        return NotImplemented
    assert w.node is not None
    name = w.node.target._opname  # type: ignore[union-attr]
    nd = len(x.shape)
    k = _SPATIAL.get(name)
    if name in ("constant_pad_nd", "pad"):
        k = len(c(args[1])) // 2
    elif k is None:
        k = nd - 2
    x = w.degrade_all(x, "a spatial op")
    for a in list(x.axes):
        if a >= nd - k:
            w.u.fix(x.axes[a], f"{w.where()}: units on an axis that is pooled, padded or resized")
    axes = {a: lay for a, lay in x.axes.items() if a < nd - k}
    desc = w.out()
    if isinstance(desc, tuple):
        return Seq(tuple(Act(d.shape, dict(axes)) for d in desc))
    return Act(desc.shape, axes)
