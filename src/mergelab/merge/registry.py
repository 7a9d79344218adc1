"""One registry of merge methods, and the public ``merge`` entry point.

Every method is a plain function ``fn(models, *, data, **options) -> nn.Module`` registered under a short name.
Its docstring and paper URL are kept next to it so ``mergelab merge --help`` and errors can list them.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

MergeFn = Callable[..., nn.Module]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: MergeFn
    needs_data: bool
    paper: str
    summary: str


METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, *, needs_data: bool = False, paper: str = "") -> Callable[[MergeFn], MergeFn]:
    """Register ``fn`` as merge method ``name`` (a decorator)."""

    def deco(fn: MergeFn) -> MergeFn:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        METHODS[name] = MethodInfo(name, fn, needs_data, paper, summary)

        @functools.wraps(fn)
        def checked(models: Sequence[nn.Module], *args: object, **options: object) -> nn.Module:
            # Direct calls (``average(models, ...)``) are checked like ``merge(models, method=...)``.
            models = list(models)
            check_inputs(models, options, op=name)
            return fn(models, *args, **options)

        return checked

    return deco


def get_method(name: str) -> MethodInfo:
    _load_builtin_methods()
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; choose one of {sorted(METHODS)}") from None


def list_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(METHODS)


def merge(
    models: Sequence[nn.Module],
    method: str = "average",
    data: DataLoader | Iterable | None = None,
    **options: object,
) -> nn.Module:
    """Merge several models of one architecture into one.

    Args:
        models: two or more ``nn.Module`` s with the same architecture (same parameter names and shapes).
        method: one of :func:`list_methods` — ``average``, ``greedy_soup``, ``weight_matching``,
            ``activation_matching``, ``zipit``, ``mudsc``, ``task_arithmetic``, ``ties``, ``dare``.
        data: a ``DataLoader`` (or any iterable) yielding ``x`` or ``(x, y)``; needed by data-driven methods.
        **options: method options (e.g. ``coefficients``, ``repair``); unknown ones raise ``TypeError``.

    Returns:
        A new ``nn.Module``; the inputs are never modified.

    Example:
        >>> import torch, mergelab
        >>> from torch import nn
        >>> a, b = nn.Linear(4, 2), nn.Linear(4, 2)
        >>> m = mergelab.merge([a, b], method="average")
        >>> torch.allclose(m.weight, (a.weight + b.weight) / 2)
        True
    """
    info = get_method(method)
    models = list(models)
    if not models:
        raise ValueError("merge: got no models")
    check_inputs(models, options, op=f"merge({method})")
    if info.needs_data and data is None:
        raise ValueError(f"merge method {method!r} needs data= (a DataLoader yielding x or (x, y))")
    return info.fn(models, data=data, **options)


def check_inputs(
    models: Sequence[nn.Module],
    options: dict[str, object] | None = None,
    *,
    names: Sequence[str] | None = None,
    op: str = "merge",
) -> None:
    """Refuse inputs that would silently give a wrong merge: non-finite weights, mixed dtypes, NaN options.

    Args:
        models: the models to merge.
        options: method options; numbers (also inside lists) must be finite, modules (e.g. ``base``) too.
        names: how to call each model in errors (e.g. its checkpoint path); default ``model 0``, ``model 1``...
        op: the operation named in errors.

    Raises:
        TypeError: an input is not an ``nn.Module``.
        ValueError: naming the model and tensor with NaN/inf, the tensor whose dtype differs, or the option.
    """
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    first: dict[str, torch.dtype] = {}
    for name, m in zip(names, models, strict=True):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{op}: {name} is a {type(m).__name__}, not an nn.Module")
        for key, t in m.state_dict().items():
            _check_finite(t, f"{op}: {name}", key)
            if t.is_floating_point():
                dtype = first.setdefault(key, t.dtype)
                if t.dtype != dtype:
                    raise ValueError(
                        f"{op}: {name} stores {key!r} as {t.dtype} but {names[0]} as {dtype}; "
                        "convert the models to one dtype first (e.g. model.float())"
                    )
    for key, value in (options or {}).items():
        if isinstance(value, nn.Module):
            for k, t in value.state_dict().items():
                _check_finite(t, f"{op}: option {key} (a model)", k)
        elif not _finite_numbers(value):
            raise ValueError(f"{op}: option {key}={value!r} contains NaN or infinity")


def _check_finite(t: torch.Tensor, who: str, key: str) -> None:
    if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{who} has non-finite weights (NaN/inf) in {key!r} ({bad} of {t.numel()} values)")


def _finite_numbers(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, torch.Tensor):
        return not (value.is_floating_point() or value.is_complex()) or bool(torch.isfinite(value).all())
    if isinstance(value, (list, tuple)):
        return all(_finite_numbers(v) for v in value)
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    return True


def _load_builtin_methods() -> None:
    # Importing the method modules fills METHODS; done lazily to keep `import mergelab` light and acyclic.
    import importlib
    import pkgutil

    # not `import mergelab.merge as pkg`: that name is the `merge` function on the top-level package
    pkg = importlib.import_module("mergelab.merge")
    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name != "registry":
            importlib.import_module(f"mergelab.merge.{mod.name}")
