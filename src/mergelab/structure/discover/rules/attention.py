"""Fused attention: ``scaled_dot_product_attention`` is ``softmax(q @ kᵀ + mask) @ v``.

The rule composes the matrix-product rules, so fused and hand-written attention discover the same symmetry:
query and key share a basis with heads as blocks, value/output heads are tied to it, a mask or position bias
with a head axis (T5, Swin) follows the heads, and grouped-query attention (``enable_gqa``) repeats each
key/value head over its query heads exactly like ``repeat_kv`` does.
"""

from __future__ import annotations

from typing import Any

from mergelab.structure.discover.rules import rule
from mergelab.structure.discover.values import Act, Param
from mergelab.structure.discover.walk import Walk, arg, c


def _repeat_heads(w: Walk, x: Act, n_rep: int) -> Act:
    """``x`` (…, heads, tokens, dim) with each head repeated ``n_rep`` times (``repeat_kv``)."""
    nd = len(x.shape)
    h = nd - 3

    def new(a: int) -> int:
        return a if a <= h else a + 1

    expanded = Act(
        (*x.shape[: h + 1], n_rep, *x.shape[h + 1 :]),
        {new(a): lay for a, lay in x.axes.items()},
        {new(d): (tuple(new(k) for k in hs), lay) for d, (hs, lay) in x.pairs.items()},
    )
    return w.reshape(expanded, (*x.shape[:h], x.shape[h] * n_rep, *x.shape[h + 1 :]))


@rule("scaled_dot_product_attention")
def sdpa(w: Walk, args: list[Any], kwargs: dict[str, Any]) -> Any:
    q, k, v = args[0], args[1], args[2]
    if not all(isinstance(t, (Act, Param)) for t in (q, k, v)):
        return NotImplemented
    q, k, v = (Act(t.shape) if isinstance(t, Param) else t for t in (q, k, v))
    mask = arg(args, kwargs, 3, "attn_mask")
    if bool(c(kwargs.get("enable_gqa", args[7] if len(args) > 7 else False))) and k.shape[-3] != q.shape[-3]:
        n_rep = q.shape[-3] // k.shape[-3]
        k, v = _repeat_heads(w, k, n_rep), _repeat_heads(w, v, n_rep)
    nd = len(k.shape)
    swap = list(range(nd))
    swap[-1], swap[-2] = swap[-2], swap[-1]
    kt = w.permuted(k, swap, tuple(k.shape[i] for i in swap))
    scores_shape = (*q.shape[:-1], k.shape[-2])
    scores = w.matmul(q, kt, scores_shape)
    if isinstance(mask, (Act, Param)):
        scores = w.elementwise(
            [scores, mask],
            tuple(
                max(a, b) for a, b in zip(scores_shape, _padded(mask.shape, len(scores_shape)), strict=True)
            ),
        )
    return w.matmul(scores, v, w.out_shape())


def _padded(shape: tuple[int, ...], n: int) -> tuple[int, ...]:
    return (1,) * (n - len(shape)) + tuple(shape)
