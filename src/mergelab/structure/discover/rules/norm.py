"""Normalisation layers: statistics over unit axes are invariant, affine parameters follow the units.

LayerNorm and RMSNorm normalise the trailing axes (a residual stream), BatchNorm/InstanceNorm have per-channel
parameters and running statistics on axis 1, GroupNorm also needs its groups to move as blocks. A hand-written
RMSNorm (``x * rsqrt(mean(x²))`` then ``* weight``) needs no rule: reductions and elementwise ops cover it.
"""

from __future__ import annotations

from typing import Any

from mergelab.structure.discover.rules import rule
from mergelab.structure.discover.values import Act, Param, Seq
from mergelab.structure.discover.walk import Walk, arg, c


def _attach(w: Walk, layout: Any, params: list[Any]) -> None:
    for p in params:
        if isinstance(p, Param) and p.dims and p.dims[0] is not None:
            w.attach(layout, p.name, p.dims[0])


def _trailing(w: Walk, x: Act, n: int, params: list[Any]) -> Act:
    nd = len(x.shape)
    for d in list(x.pairs):
        hs, _ = x.pairs[d]
        if d >= nd - n or any(h >= nd - n for h in hs):
            x = w.degrade(x, d, "normalised over heads")
    for a, lay in x.axes.items():
        if a >= nd - n:
            for p in params:
                if isinstance(p, Param):
                    k = a - (nd - n)
                    w.attach(lay, p.name, p.dims[k] if k < len(p.dims) else None)
    return x


def _trailing_norm(w: Walk, args: list[Any], params: list[Any]) -> Any:
    """``layer_norm`` / ``rms_norm``: normalised over the trailing ``len(args[1])`` axes, affine params on them."""
    x = args[0]
    if not isinstance(x, Act):
        return NotImplemented
    x = _trailing(w, x, len(c(args[1])), params)
    return Act(w.out_shape(), dict(x.axes), dict(x.pairs))


@rule("layer_norm")
def layer_norm(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return _trailing_norm(w, args, [arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")])


@rule("rms_norm")
def rms_norm(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return _trailing_norm(w, args, [arg(args, kwargs, 2, "weight")])


@rule("native_layer_norm")
def native_layer_norm(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    if not isinstance(x, Act):
        return NotImplemented
    n = len(c(args[1]))
    x = _trailing(w, x, n, [args[2], args[3]])
    desc = w.out()
    return Seq((Act(desc[0].shape, dict(x.axes), dict(x.pairs)), Act(desc[1].shape), Act(desc[2].shape)))


def _channels(w: Walk, x: Act, params: list[Any], shape: tuple[int, ...]) -> Act:
    x = w.degrade_all(x, "a channel norm")
    ch = 1 if len(x.shape) >= 2 else 0
    if ch in x.axes:
        _attach(w, x.axes[ch], params)
    else:
        for p in params:
            w.pin(p, f"normalises channels in a fixed order at {w.where()}")
    return Act(shape, dict(x.axes))


@rule("batch_norm", "instance_norm")
def batch_norm(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    if not isinstance(x, Act):
        return NotImplemented
    return _channels(w, x, list(args[1:5]), w.out_shape())


@rule(
    "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit",
    "native_batch_norm",
    "_batch_norm_with_update",
    "_batch_norm_no_update",
    "_native_batch_norm_legit_functional",
)
def native_batch_norm(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    if not isinstance(x, Act):
        return NotImplemented
    desc = w.out()
    out = _channels(w, x, list(args[1:5]), desc[0].shape)
    ch = 1 if len(x.shape) >= 2 else 0
    rest = [
        Act(
            d.shape,
            {0: out.axes[ch]} if ch in out.axes and len(d.shape) == 1 and d.shape[0] == x.shape[ch] else {},
        )
        for d in desc[1:]
    ]
    return Seq((out, *rest))


def _group(w: Walk, x: Act, groups: int, params: list[Any], shape: tuple[int, ...]) -> Act:
    x = w.degrade_all(x, "a group norm")
    if 1 in x.axes:
        ch = x.shape[1]
        if 1 < groups < ch:
            w.u.constrain_blocks(x.axes[1], ch // groups, w.where())
        _attach(w, x.axes[1], params)
    return Act(shape, dict(x.axes))


@rule("group_norm")
def group_norm(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    if not isinstance(x, Act):
        return NotImplemented
    return _group(
        w, x, int(c(args[1])), [arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")], w.out_shape()
    )


@rule("native_group_norm")
def native_group_norm(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    if not isinstance(x, Act):
        return NotImplemented
    desc = w.out()
    out = _group(w, x, int(c(args[6])), [args[1], args[2]], desc[0].shape)
    return Seq((out, *(Act(d.shape) for d in desc[1:])))
