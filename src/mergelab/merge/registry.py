"""One registry of merge methods, and the public ``merge`` entry point.

Every method is a plain function ``fn(models, *, data, **options) -> nn.Module`` registered under a short name.
Its docstring and paper URL are kept next to it so ``mergelab merge --help`` and errors can list them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

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
        return fn

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
    if info.needs_data and data is None:
        raise ValueError(f"merge method {method!r} needs data= (a DataLoader yielding x or (x, y))")
    return info.fn(models, data=data, **options)


def _load_builtin_methods() -> None:
    # Importing the method modules fills METHODS; done lazily to keep `import mergelab` light and acyclic.
    import importlib
    import pkgutil

    # not `import mergelab.merge as pkg`: that name is the `merge` function on the top-level package
    pkg = importlib.import_module("mergelab.merge")
    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name != "registry":
            importlib.import_module(f"mergelab.merge.{mod.name}")
