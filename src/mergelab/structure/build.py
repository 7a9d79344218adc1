"""Write a :class:`Structure` by hand, for models ``torch.export`` cannot export (or to restrict one).

Each helper returns the ``(group name, Axis)`` pairs one layer contributes; :func:`build_structure` collects
them, infers group sizes from the weights and validates the result. A group name of ``None`` means "not
permuted" (the network input or the logits), so the helpers compose layer by layer like Git Re-Basin's
``PermutationSpec`` helpers do.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    >>> s = build_structure(
    ...     net,
    ...     linear_axes("0", None, "h"),
    ...     norm_axes("1", "h", running_stats=True),
    ...     linear_axes("3", "h", None),
    ... )
    >>> [(g.name, g.size, len(g.axes)) for g in s]
    [('h', 8, 7)]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor, nn

from mergelab.structure.types import Axis, Group, Role, Structure

__all__ = [
    "AxisPairs",
    "attention_axes",
    "build_structure",
    "check_structure",
    "conv_axes",
    "linear_axes",
    "norm_axes",
    "param_axis",
]

AxisPairs = list[tuple[str, Axis]]


def _key(name: str, attr: str) -> str:
    return f"{name}.{attr}" if name else attr


def linear_axes(
    name: str,
    in_group: str | None,
    out_group: str | None,
    *,
    bias: bool = True,
    in_inner: int = 1,
    in_start: int = 0,
) -> AxisPairs:
    """Axes of an ``nn.Linear`` (or a conv, whose weight has the same two leading axes).

    Args:
        name: the module's qualified name, e.g. ``"layers.0"``.
        in_group: group read by ``weight[:, i]`` (``None`` for the network input).
        out_group: group produced by ``weight[o]`` and ``bias[o]`` (``None`` for the logits).
        bias: whether the module has a bias.
        in_inner: entries per input unit (``H*W`` when the input is a flattened conv map).
        in_start: offset of ``in_group`` along the input axis (when reading one part of a concat).
    """
    pairs: AxisPairs = []
    if out_group is not None:
        pairs.append((out_group, Axis(_key(name, "weight"), 0, "out")))
        if bias:
            pairs.append((out_group, Axis(_key(name, "bias"), 0, "out")))
    if in_group is not None:
        pairs.append((in_group, Axis(_key(name, "weight"), 1, "in", in_inner, in_start)))
    return pairs


def conv_axes(
    name: str, in_group: str | None, out_group: str | None, *, bias: bool = True, transposed: bool = False
) -> AxisPairs:
    """Axes of an ``nn.Conv{1,2,3}d`` (``weight`` is ``(out, in, *kernel)``; transposed: ``(in, out, ...)``)."""
    if not transposed:
        return linear_axes(name, in_group, out_group, bias=bias)
    pairs: AxisPairs = []
    if out_group is not None:
        pairs.append((out_group, Axis(_key(name, "weight"), 1, "out")))
        if bias:
            pairs.append((out_group, Axis(_key(name, "bias"), 0, "out")))
    if in_group is not None:
        pairs.append((in_group, Axis(_key(name, "weight"), 0, "in")))
    return pairs


def norm_axes(
    name: str,
    group: str,
    *,
    weight: bool = True,
    bias: bool = True,
    running_stats: bool = False,
    dim: int = 0,
) -> AxisPairs:
    """Axes of a norm layer's affine parameters (and BatchNorm's running statistics: ``running_stats=True``).

    ``dim`` is the parameter axis carrying the units (0 for BatchNorm/GroupNorm/1-D LayerNorm).
    """
    attrs = [a for a, on in (("weight", weight), ("bias", bias)) if on]
    if running_stats:
        attrs += ["running_mean", "running_var"]
    return [(group, Axis(_key(name, a), dim, "out")) for a in attrs]


def param_axis(
    param: str, group: str, dim: int = 0, role: Role = "out", *, inner: int = 1, start: int = 0
) -> AxisPairs:
    """One axis of any tensor, e.g. a learned position embedding ``param_axis("pos_embed", "stream", 2)``."""
    return [(group, Axis(param, dim, role, inner, start))]


def attention_axes(
    name: str, in_group: str | None, out_group: str | None, qk_group: str, vo_group: str
) -> AxisPairs:
    """Axes of a :class:`~mergelab.models.attention.MultiHeadSelfAttention` (``q``/``k``/``v``/``out``).

    Pass ``blocks={qk_group: heads, vo_group: heads}`` and ``ties=[(qk_group, vo_group)]`` to
    :func:`build_structure` so heads move as wholes and query/key heads follow value/output heads.
    """
    pairs: AxisPairs = []
    pairs += linear_axes(f"{name}.q", in_group, qk_group)
    pairs += linear_axes(f"{name}.k", in_group, qk_group)
    pairs += linear_axes(f"{name}.v", in_group, vo_group)
    pairs += linear_axes(f"{name}.out", vo_group, out_group)
    return pairs


def _shapes(source: nn.Module | Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    sd = source.state_dict() if isinstance(source, nn.Module) else source
    return {k: tuple(v.shape) for k, v in sd.items()}


def build_structure(
    source: nn.Module | Mapping[str, Tensor],
    *parts: Iterable[tuple[str, Axis]],
    blocks: Mapping[str, int] | None = None,
    ties: Sequence[Sequence[str]] = (),
    sizes: Mapping[str, int] | None = None,
) -> Structure:
    """Assemble a :class:`Structure` from ``(group, Axis)`` pairs and check it against the model's tensors.

    Args:
        source: the model (or its ``state_dict``) whose tensors the axes name.
        *parts: outputs of :func:`linear_axes`, :func:`conv_axes`, :func:`norm_axes`, :func:`param_axis`, ...
            Groups appear in the order they are first mentioned.
        blocks: ``{group: number of blocks}`` for head/group structure (default 1).
        ties: tuples of groups whose block permutations must agree.
        sizes: ``{group: units}``; needed only when every axis of a group starts at an offset (packed
            parameters); otherwise a size is read from the first axis with ``start == 0``.

    Returns:
        The validated structure.

    Raises:
        ValueError: a tensor is missing, a size cannot be inferred, or an axis does not fit its tensor.
    """
    shapes = _shapes(source)
    axes: dict[str, list[Axis]] = {}
    for part in parts:
        for group, axis in part:
            if axis.param not in shapes:
                raise ValueError(
                    f"build_structure: group {group!r}: axis {axis} names no tensor of the model"
                )
            axes.setdefault(group, [])
            if axis not in axes[group]:
                axes[group].append(axis)
    groups = []
    for name, lst in axes.items():
        size = (sizes or {}).get(name)
        if size is None:
            for a in lst:
                if a.start == 0 and a.param in shapes and a.dim < len(shapes[a.param]):
                    size = shapes[a.param][a.dim] // a.inner
                    break
        if size is None:
            raise ValueError(
                f"build_structure: cannot infer the size of group {name!r} from {[str(a) for a in lst]}; "
                "pass sizes={...}"
            )
        groups.append(Group(name, size, tuple(lst), (blocks or {}).get(name, 1)))
    structure = Structure(tuple(groups), tuple(tuple(t) for t in ties))
    check_structure(structure, shapes, "build_structure")
    return structure


def check_structure(
    structure: Structure,
    source: nn.Module | Mapping[str, Tensor] | Mapping[str, tuple[int, ...]],
    op: str = "Structure",
) -> None:
    """Check that every axis names an existing tensor axis, fits inside it and overlaps no other axis.

    Args:
        structure: the groups.
        source: the model, its ``state_dict``, or key → shape.
        op: the operation named at the start of an error (``permute_state_dict``, ``merge_state_dicts`` …).

    Raises:
        ValueError: naming the group, the axis and the tensor's shape.
    """
    if isinstance(source, nn.Module):
        shapes = _shapes(source)
    else:
        shapes = {k: tuple(v.shape) if isinstance(v, Tensor) else tuple(v) for k, v in source.items()}
    spans: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
    for g in structure:
        for a in g.axes:
            if a.param not in shapes:
                raise ValueError(f"{op}: group {g.name!r}: axis {a} names no tensor of the model")
            shape = shapes[a.param]
            if not 0 <= a.dim < len(shape):
                raise ValueError(f"{op}: group {g.name!r}: axis {a} but {a.param!r} has shape {shape}")
            end = a.start + g.size * a.inner
            if a.inner < 1 or a.start < 0 or end > shape[a.dim]:
                raise ValueError(
                    f"{op}: group {g.name!r} ({g.size} units): axis {a} needs entries "
                    f"[{a.start}, {end}) of {a.param!r} {shape}"
                )
            spans.setdefault((a.param, a.dim), []).append((a.start, end, g.name))
    for (param, dim), lst in spans.items():
        lst.sort()
        for (_, e0, g0), (s1, _, g1) in zip(lst, lst[1:], strict=False):
            if s1 < e0:
                raise ValueError(
                    f"{op}: groups {g0!r} and {g1!r} both permute {param!r}[{dim}] at entry {s1}"
                )
