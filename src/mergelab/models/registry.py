"""The model zoo's registry (one dict, filled by a decorator) and the layer helpers all zoo models share.

A builder is a callable ``fn(input_shape, num_classes, *, **options) -> nn.Module`` — in practice the model
class itself. :func:`build_model` checks the options against the builder's signature (typos raise
``TypeError`` instead of being swallowed) and stamps the result with ``mergelab_spec``, a JSON-able record
from which :func:`build_from_spec` rebuilds exactly the same architecture (checkpoints store it next to the
weights).

Input shapes are channel-first without the batch axis: ``(C, L)`` selects 1-D layers (``Conv1d``,
``BatchNorm1d``, ...), ``(C, H, W)`` selects 2-D layers. The choice is made once in ``__init__``, so every
``forward`` is a fixed graph that ``torch.fx.symbolic_trace`` can follow.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

ModelBuilder = Callable[..., nn.Module]
B = TypeVar("B", bound=ModelBuilder)

ARCHITECTURES: dict[str, ModelBuilder] = {}

# Arguments every builder takes positionally; everything else is a keyword option recorded in the spec.
_POSITIONAL = ("input_shape", "num_classes")


def register_model(name: str) -> Callable[[B], B]:
    """Register a model builder (usually an ``nn.Module`` class) under ``name`` (a decorator).

    The builder must accept ``(input_shape, num_classes, *, **options)``; its keyword options become the
    options :func:`build_model` accepts.

    Args:
        name: registry key, e.g. ``"mlp"``.

    Returns:
        The decorator; it returns the builder unchanged.
    """

    def deco(fn: B) -> B:
        if name in ARCHITECTURES:
            raise ValueError(f"register_model: architecture {name!r} is registered twice")
        params = list(inspect.signature(fn).parameters)
        if tuple(params[:2]) != _POSITIONAL:
            raise TypeError(
                f"register_model({name!r}): builder must take (input_shape, num_classes, ...) first, "
                f"got {params[:2]}"
            )
        ARCHITECTURES[name] = fn
        return fn

    return deco


def list_models(pattern: str = "*") -> list[str]:
    """Registered architecture names matching a shell-style ``pattern``, sorted.

    Example:
        >>> from mergelab.models import list_models
        >>> list_models("v*")
        ['vgg', 'vit']
    """
    return sorted(n for n in ARCHITECTURES if fnmatch.fnmatchcase(n, pattern))


def get_builder(name: str) -> ModelBuilder:
    """The builder registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown architecture {name!r}; choose one of {list_models()}") from None


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a zoo model and attach its rebuild recipe as ``model.mergelab_spec``.

    Args:
        name: an architecture from :func:`list_models` (``mlp``, ``cnn``, ``vgg``, ``resnet``, ``vit``).
        input_shape: one example's shape without batch: ``(C, L)`` for sequences, ``(C, H, W)`` for images.
        num_classes: width of the ``head`` classifier.
        **kwargs: the architecture's options (see its docstring); an unknown option raises ``TypeError``.

    Returns:
        The model, in train mode, with ``mergelab_spec = {"arch", "input_shape", "num_classes", "kwargs"}``;
        ``kwargs`` holds every option including defaults, so later default changes cannot alter a rebuild.

    Example:
        >>> import torch
        >>> from mergelab.models import build_model
        >>> m = build_model("mlp", (1, 8, 8), 10, width=32, depth=2)
        >>> m(torch.zeros(5, 1, 8, 8)).shape
        torch.Size([5, 10])
        >>> m.mergelab_spec["kwargs"]
        {'width': 32, 'depth': 2, 'norm': None, 'act': 'relu'}
    """
    builder = get_builder(name)
    shape = check_input_shape(input_shape, who=f"build_model({name!r})")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"build_model({name!r}): num_classes must be a positive int, got {num_classes!r}")
    sig = inspect.signature(builder)
    options = [p for p in sig.parameters if p not in _POSITIONAL]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise TypeError(f"build_model({name!r}): unknown option(s) {unknown}; valid options: {options}")
    bound = sig.bind(shape, num_classes, **kwargs)
    bound.apply_defaults()
    resolved = {k: v for k, v in bound.arguments.items() if k not in _POSITIONAL}
    try:
        # Round-trip so the stored spec equals what a checkpoint reader will get back (tuples become lists).
        resolved = json.loads(json.dumps(resolved))
    except (TypeError, ValueError) as err:
        bad = [k for k, v in resolved.items() if not _jsonable(v)]
        raise TypeError(f"build_model({name!r}): option(s) {bad} are not JSON-serialisable ({err})") from None
    model = builder(shape, num_classes, **kwargs)
    model.mergelab_spec = {
        "arch": name,
        "input_shape": list(shape),
        "num_classes": num_classes,
        "kwargs": resolved,
    }
    return model


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model from a ``mergelab_spec`` (e.g. read back from a checkpoint's ``config.json``).

    Example:
        >>> from mergelab.models import build_model, build_from_spec
        >>> a = build_model("resnet", (1, 40), 10, width=1)
        >>> b = build_from_spec(a.mergelab_spec)
        >>> [k for k in a.state_dict()] == [k for k in b.state_dict()]
        True
    """
    kind = spec.get("kind", "zoo")
    if kind != "zoo":
        # Merged models record how to rebuild themselves from their sources' specs; their builders live in the
        # merge layer, imported only when such a spec is read.
        import importlib

        try:
            module, fn = _SPEC_KINDS[kind].split(":")
        except KeyError:
            raise ValueError(
                f"build_from_spec: unknown model kind {kind!r}; known: {sorted(_SPEC_KINDS)}"
            ) from None
        return getattr(importlib.import_module(module), fn)(spec)
    missing = [k for k in ("arch", "input_shape", "num_classes") if k not in spec]
    if missing:
        raise ValueError(f"build_from_spec: spec lacks {missing}; got keys {sorted(spec)}")
    return build_model(spec["arch"], spec["input_shape"], spec["num_classes"], **dict(spec.get("kwargs", {})))


_SPEC_KINDS = {"multihead": "mergelab.merge.partial:multihead_from_spec"}


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# ----------------------------------------------------------------------------------------------------
# Layer helpers shared by the zoo: pick 1-D or 2-D layers from the input shape, build norms and activations.
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpatialOps:
    """The layer classes for one input kind: ``ndim`` = 1 for ``(C, L)``, 2 for ``(C, H, W)``."""

    ndim: int
    conv: type[nn.Module]
    batchnorm: type[nn.Module]
    maxpool: type[nn.Module]
    avgpool: type[nn.Module]  # adaptive: global average pooling with output size 1


_OPS = {
    1: SpatialOps(1, nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d),
    2: SpatialOps(2, nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d),
}


def check_input_shape(input_shape: Sequence[int], who: str = "model") -> tuple[int, ...]:
    """Validate a channel-first shape without batch: ``(C, L)`` or ``(C, H, W)`` of positive ints.

    Returns:
        The shape as a tuple of ints.
    """
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ValueError(f"{who}: input_shape must be (C, L) or (C, H, W), got {input_shape!r}") from None
    if len(shape) - 1 not in _OPS:
        raise ValueError(
            f"{who}: input_shape must be (C, L) for sequences or (C, H, W) for images (no batch axis), "
            f"got {shape!r} of rank {len(shape)}"
        )
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"{who}: input_shape entries must be positive ints, got {shape!r}")
    return shape


def spatial_ops(input_shape: Sequence[int]) -> SpatialOps:
    """The 1-D or 2-D layer classes matching ``input_shape`` (validated)."""
    return _OPS[len(check_input_shape(input_shape)) - 1]


def scaled(channels: int, width: float) -> int:
    """``channels`` times a width multiplier, at least 1."""
    if not width > 0:
        raise ValueError(f"width multiplier must be positive, got {width!r}")
    return max(1, round(channels * width))


CONV_NORMS = (None, "batchnorm", "layernorm", "groupnorm")


def conv_norm(kind: str | None, channels: int, ndim: int, who: str = "model") -> nn.Module | None:
    """A normalisation layer for a ``(N, channels, *spatial)`` map, or ``None`` for ``kind=None``.

    ``"layernorm"`` is ``GroupNorm(1, C)``: one mean/variance over channels and positions per example, as the
    LayerNorm variants of REPAIR's ResNets do. ``"groupnorm"`` uses :func:`group_count` groups.
    """
    if kind is None:
        return None
    if kind == "batchnorm":
        return _OPS[ndim].batchnorm(channels)
    if kind == "layernorm":
        return nn.GroupNorm(1, channels)
    if kind == "groupnorm":
        return nn.GroupNorm(group_count(channels), channels)
    raise ValueError(f"{who}: unknown norm {kind!r}; choose one of {list(CONV_NORMS)}")


def group_count(channels: int) -> int:
    """Groups for ``norm="groupnorm"``: the largest of 4, 2 dividing ``channels`` into groups of >= 2, else 1."""
    return next((g for g in (4, 2) if channels % g == 0 and channels // g >= 2), 1)


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def activation(name: str, who: str = "model") -> nn.Module:
    """A fresh activation module by name (``relu``, ``gelu``, ``tanh``)."""
    try:
        return ACTIVATIONS[name]()
    except (KeyError, TypeError):
        raise ValueError(f"{who}: unknown act {name!r}; choose one of {sorted(ACTIVATIONS)}") from None
