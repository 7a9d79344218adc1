"""Embedding lookups: the table's second axis produces units (a tied ``lm_head`` later reads the same axis)."""

from __future__ import annotations

from typing import Any

from mergelab.structure.discover.bases import Piece
from mergelab.structure.discover.rules import rule
from mergelab.structure.discover.values import Act, Param
from mergelab.structure.discover.walk import Walk
from mergelab.structure.types import Axis


@rule("embedding")
def embedding(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """``embedding(weight, indices)``: rows are gathered by index, columns are the output units."""
    weight, idx = args[0], args[1]
    if isinstance(idx, Act) and idx.tracked:
        raise w.unsupported("embedding indices that carry units")
    shape = w.out_shape()
    if not isinstance(weight, Param) or len(weight.shape) != 2 or weight.dims[1] is None:
        if isinstance(weight, Act) and weight.tracked:
            last = len(weight.shape) - 1
            weight = w.degrade_all(weight, "an embedding table")
            if last in weight.axes:
                return Act(shape, {len(shape) - 1: weight.axes[last]})
        w.pin(weight, f"used as an embedding table at {w.where()}")
        return Act(shape)
    pdim, off = weight.dims[1]
    basis, new = w.producer(
        f"{weight.name}:{pdim}:{off}", weight.shape[1], weight.name.removesuffix(".weight")
    )
    if new:
        w.u.b[basis].axes.append(Axis(weight.name, pdim, "out", 1, off))
    return Act(shape, {len(shape) - 1: (Piece(basis, weight.shape[1]),)})
