"""Dense layers and matrix products: ``linear``, ``addmm`` (GPT-2's ``Conv1D``), ``matmul``/``mm``/``bmm``.

A product with a parameter is a layer: it reads the input's units through one weight axis and produces a new
basis on the other. A product of two activations contracts units that must therefore be the same (``q @ kᵀ``)
and keeps the heads of both operands in step (``scores @ v``).
"""

from __future__ import annotations

from typing import Any

from mergelab.structure.discover.rules import rule
from mergelab.structure.discover.values import Act, Other, Param
from mergelab.structure.discover.walk import Walk, arg


@rule("linear")
def linear(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``F.linear(x, W, b)``: ``W`` is ``(out, in)``."""
    x, weight, bias = args[0], arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if not isinstance(x, Act):
        return NotImplemented
    if isinstance(weight, Act):
        wt = (
            w.permuted(weight, [1, 0], (weight.shape[1], weight.shape[0]))
            if len(weight.shape) == 2
            else weight
        )
        res = w.matmul(x, wt, w.out_shape())
        return w.elementwise([res, bias]) if isinstance(bias, (Act, Param)) else res
    return w.param_dense(x, weight, bias, 0, 1, w.out_shape())


@rule("addmm")
def addmm(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``bias + x @ W`` with ``W`` laid ``(in, out)`` — GPT-2's ``Conv1D`` — or any other product plus a term."""
    bias, x, mat = args[0], args[1], args[2]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if (
        isinstance(x, Act)
        and isinstance(mat, Param)
        and isinstance(bias, (Param, Other))
        and beta == alpha == 1
    ):
        b = bias if isinstance(bias, Param) and len(bias.shape) == 1 else None
        if b is not None or isinstance(bias, Other):
            return w.param_dense(x, mat, b, 1, 0, w.out_shape())
    prod = w.matmul(x, mat, w.out_shape())
    if prod is NotImplemented:
        return prod
    return w.elementwise([prod, bias])


@rule("mm", "matmul", "bmm")
def matmul(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return w.matmul(args[0], args[1], w.out_shape())


@rule("baddbmm")
def baddbmm(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    prod = w.matmul(args[1], args[2], w.out_shape())
    if prod is NotImplemented:
        return prod
    return w.elementwise([args[0], prod])
