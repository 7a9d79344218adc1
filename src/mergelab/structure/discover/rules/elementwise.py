"""Elementwise ops, activations, dropout, softmax, reductions and ops that depend on the order along an axis."""

from __future__ import annotations

from typing import Any

from mergelab.structure.discover.rules import rule
from mergelab.structure.discover.values import Act, Param, Seq
from mergelab.structure.discover.walk import Walk, arg, c, ndim, op_overload

_UNARY_BINARY = [
    "add",
    "sub",
    "rsub",
    "mul",
    "div",
    "pow",
    "neg",
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
    "reciprocal",
    "square",
    "sign",
    "sgn",
    "sigmoid",
    "tanh",
    "relu",
    "relu6",
    "gelu",
    "silu",
    "mish",
    "hardswish",
    "hardsigmoid",
    "hardtanh",
    "elu",
    "selu",
    "celu",
    "leaky_relu",
    "softplus",
    "softshrink",
    "hardshrink",
    "logsigmoid",
    "sin",
    "cos",
    "tan",
    "atan",
    "sinh",
    "cosh",
    "asin",
    "acos",
    "erf",
    "erfc",
    "erfinv",
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
    "logical_xor",
    "bitwise_not",
    "bitwise_and",
    "bitwise_or",
    "bitwise_xor",
    "__and__",
    "__or__",
    "__xor__",
    "isnan",
    "isinf",
    "isfinite",
    "masked_fill",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "remainder",
    "fmod",
    "floor_divide",
    "true_divide",
    "threshold",
    "atan2",
    "hypot",
    "copysign",
    "dropout",
    "feature_dropout",
    "alpha_dropout",
    "feature_alpha_dropout",
    "to",
    "_to_copy",
    "type_as",
    "alias",
    "clone",
    "contiguous",
    "detach",
    "lift_fresh_copy",
    "fill",
    "zeros_like",
    "ones_like",
    "full_like",
    "empty_like",
    "rand_like",
    "randn_like",
    "positive",
]
_NO_INPLACE = {"to", "type_as", "alias", "contiguous", "detach", "lift_fresh_copy", "_to_copy"}
_INPLACE = [f"{n}_" for n in _UNARY_BINARY if n not in _NO_INPLACE and not n.endswith("_like")]
_REDUCTIONS = [
    "mean",
    "sum",
    "amax",
    "amin",
    "var",
    "std",
    "var_mean",
    "std_mean",
    "linalg_vector_norm",
    "norm",
    "logsumexp",
    "prod",
    "nansum",
    "nanmean",
    "all",
    "any",
    "count_nonzero",
]
_ORDERED = [
    "cumsum",
    "cumprod",
    "logcumsumexp",
    "flip",
    "roll",
    "sort",
    "argsort",
    "topk",
    "argmax",
    "argmin",
    "diff",
    "cummax",
    "cummin",
]
_METADATA = [
    "_assert_tensor_metadata",
    "sym_size",
    "sym_numel",
    "sym_stride",
    "_assert_async",
    "_assert_scalar",
    "sym_constrain_range_for_size",
]


@rule(*_UNARY_BINARY, *_INPLACE)
def elementwise(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Broadcasting ops (``x + y``, ``x * gate``, activations, casts): units line up axis by axis."""
    return w.elementwise([*args, *kwargs.values()])


@rule("native_dropout")
def native_dropout(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    out = w.elementwise([args[0]], w.out_shape(0))
    return Seq((out, Act(w.out_shape(1), dict(out.axes) if isinstance(out, Act) else {})))


@rule(*_METADATA)
def metadata(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Shape/dtype queries and assertions: values that do not depend on the order of units."""
    return w.fresh()


@rule("max", "min")
def maxmin(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``max(x, other)`` is elementwise; ``max(x, dim)`` reduces (its indices depend on the unit order)."""
    assert w.node is not None
    ov = op_overload(w.node)
    if ov in ("other", "binary_out"):
        return w.elementwise(list(args))
    x = args[0]
    if not isinstance(x, Act):
        return NotImplemented
    if ov == "default":
        return w.fresh()
    d = ndim(c(arg(args, kwargs, 1, "dim")), len(x.shape))
    if any(d in hs for hs, _ in x.pairs.values()):
        x = w.degrade_all(x, "a max over heads")
    if d in x.axes:
        w.u.fix(x.axes[d], f"{w.where()}: arg-max over units depends on their order")
    shape = w.out_shape(0)
    values = reduced(w, x, [d], len(shape) == len(x.shape), shape)
    return Seq((values, Act(w.out_shape(1), dict(values.axes), dict(values.pairs))))


def reduced(w: Walk, x: Act, dims: list[int], keep: bool, shape: tuple[int, ...]) -> Act:
    """``x`` with ``dims`` reduced: a reduction is invariant to any permutation along the reduced axes."""
    for d in list(x.pairs):
        hs, _ = x.pairs[d]
        if any(h in dims for h in hs) and d not in dims:
            x = w.degrade(x, d, "a reduction over heads")
    axes: dict[int, Any] = {}
    pairs: dict[int, Any] = {}

    def new(a: int) -> int:
        return a if keep else a - sum(d < a for d in dims)

    for a, lay in x.axes.items():
        if a not in dims:
            axes[new(a)] = lay
    for d, (hs, lay) in x.pairs.items():
        if d in dims:
            if not any(h in dims for h in hs) and len(hs) == 1:
                axes[new(hs[0])] = lay  # summed over each head's units: one entry per head
        else:
            pairs[new(d)] = (tuple(new(h) for h in hs), lay)
    return w.clean(Act(shape, axes, pairs))


@rule(*_REDUCTIONS)
def reduce(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    if not isinstance(x, Act):
        return NotImplemented
    assert w.node is not None
    nd = len(x.shape)
    name = w.node.target._opname  # type: ignore[union-attr]
    dim = (
        arg(args, kwargs, 2, "dim") if name in ("linalg_vector_norm", "norm") else arg(args, kwargs, 1, "dim")
    )
    dim = c(dim)
    if dim is None or isinstance(dim, bool) or dim == []:
        dims = list(range(nd))
    elif isinstance(dim, int):
        dims = [ndim(dim, nd)]
    else:
        dims = sorted(ndim(int(d), nd) for d in dim)
    desc = w.out()
    shape = desc[0].shape if isinstance(desc, tuple) else desc.shape
    res = reduced(w, x, dims, len(shape) == nd, shape)
    if isinstance(desc, tuple):
        return Seq(tuple(Act(d.shape, dict(res.axes), dict(res.pairs)) for d in desc))
    return res


@rule("softmax", "_softmax", "log_softmax", "_log_softmax", "special_softmax")
def softmax(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Softmax is equivariant along its axis: units keep their layout (unless it runs across heads)."""
    x = args[0]
    if not isinstance(x, Act):
        return NotImplemented
    d = ndim(c(arg(args, kwargs, 1, "dim")), len(x.shape))
    for dd, (hs, _) in list(x.pairs.items()):
        if d in hs:
            x = w.degrade(x, dd, "softmax across heads")
    return Act(w.out_shape(), dict(x.axes), dict(x.pairs))


@rule(*_ORDERED)
def ordered(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Ops that depend on the order along an axis: units on that axis must stay in place."""
    x = args[0]
    if not isinstance(x, Act) or not x.tracked:
        return NotImplemented
    assert w.node is not None
    nd = len(x.shape)
    name = w.node.target._opname  # type: ignore[union-attr]
    if name == "flip":
        dims = c(arg(args, kwargs, 1, "dims"))
    elif name == "roll":
        dims = c(arg(args, kwargs, 2, "dims"))
    elif name == "topk":
        dims = c(arg(args, kwargs, 2, "dim", -1))
    else:
        dims = c(arg(args, kwargs, 1, "dim", -1))
    if dims is None or dims == []:
        dims = list(range(nd))
    dims = [ndim(int(d), nd) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    reason = f"{w.where()} runs along the units"
    for d in list(x.pairs):
        hs, lay = x.pairs[d]
        if d in dims or any(h in dims for h in hs):
            w.u.fix(lay, reason)
            x = Act(x.shape, x.axes, {k: v for k, v in x.pairs.items() if k != d})
    for d in dims:
        if d in x.axes:
            w.u.fix(x.axes[d], reason)
    desc = w.out()
    same = {a: lay for a, lay in x.axes.items() if a not in dims}
    if isinstance(desc, tuple):
        return Seq(tuple(Act(dd.shape, dict(same) if len(dd.shape) == nd else {}) for dd in desc))
    if len(desc.shape) != nd:
        return w.plain_from(x, "an order-dependent op")
    return Act(desc.shape, same, dict(x.pairs))


@rule("glu")
def glu(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``glu(x, dim)``: the two halves of ``x`` along ``dim`` multiply unit by unit, so they share units."""
    x = args[0]
    if not isinstance(x, Act):
        return NotImplemented
    d = ndim(c(arg(args, kwargs, 1, "dim", -1)), len(x.shape))
    x = w.degrade_all(x, "glu")
    axes = dict(x.axes)
    if d in x.axes:
        half = x.shape[d] // 2
        a = w.u.slice(x.axes[d], 0, half, w.where())
        b = w.u.slice(x.axes[d], half, 2 * half, w.where())
        if a is None or b is None:
            del axes[d]
        else:
            w.u.unify(a, b, w.where())
            axes[d] = a
    return Act(w.out_shape(), axes)


@rule("prelu", "_prelu_kernel")
def prelu(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """PReLU's weight has one entry per channel (axis 1), or a single shared entry."""
    x, weight = args[0], args[1]
    if not isinstance(x, Act):
        return NotImplemented
    if isinstance(weight, Param) and weight.shape[0] > 1 and len(x.shape) >= 2:
        rest = len(x.shape) - 2
        view = Param((weight.shape[0],) + (1,) * rest, weight.name, (weight.dims[0],) + (None,) * rest)
        return w.elementwise([x, view])
    return w.elementwise([x])
