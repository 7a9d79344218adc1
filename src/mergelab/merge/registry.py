"""One registry of merge methods, the public ``merge`` entry point, and its result type.

Every method is a plain function ``fn(models, *, data, **options) -> nn.Module | MergeResult`` registered under a
short name. Its docstring, paper URL and declared options (from its signature and the docstring's ``Args:``) are
kept next to it, so ``mergelab list``, ``mergelab merge --help`` and errors can list them.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from mergelab.match.context import MatchContext
    from mergelab.structure.alignment import Alignment

MergeFn = Callable[..., "nn.Module | MergeResult"]

# Parameters every method shares or that only Python code can pass (models, loaders, modules, structures): not
# listed as CLI options.
_NOT_OPTIONS = {"models", "data", "context"}
_PYTHON_ONLY = ("Module", "Structure", "Tensor", "MatchContext", "Iterable", "DataLoader")


@dataclass
class MergeResult:
    """A merged model and what the method found on the way.

    Attributes:
        model: the merged ``nn.Module`` (a new module; the inputs are untouched).
        info: diagnostics, the same way for every method: ``method``, ``seconds`` (``total``, and per step for
            aligned methods: ``context``, ``solve``, ``build``, ``repair``) and, per method, e.g. ``objective``
            and ``iterations`` (weight matching), ``merge_value`` (ZipIt!), ``alpha`` and ``selection`` (MuDSC's
            held-out choice), ``fixed`` axes of the structure, ``heads`` / ``partial`` / ``repair``.
        alignment: the correspondence an aligned method merged in (``None`` for the others).
    """

    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)
    alignment: Alignment | None = None


@dataclass(frozen=True)
class MethodOption:
    """One declared option of a merge method: name, default (``inspect.Parameter.empty`` if required), type as
    written in the signature, and the one-line help from the docstring's ``Args:``."""

    name: str
    default: Any
    annotation: str
    help: str
    python_only: bool

    def describe(self) -> str:
        """``name=default`` (or ``name`` when required), e.g. ``alpha=0.5``."""
        return self.name if self.default is inspect.Parameter.empty else f"{self.name}={self.default!r}"


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: MergeFn
    needs_data: bool
    paper: str
    summary: str
    options: tuple[MethodOption, ...] = ()

    @property
    def takes_context(self) -> bool:
        """Whether the method can share a :class:`~mergelab.match.context.MatchContext` (aligned methods)."""
        return "context" in inspect.signature(self.fn).parameters


def _arg_help(doc: str) -> dict[str, str]:
    """``name → first sentence of its help`` from a Google-style ``Args:`` section (``a, b: help`` names several;
    continuation lines are joined; reST double backticks dropped)."""
    out: dict[str, str] = {}
    names: list[str] = []
    in_args = False
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:"):
            in_args = True
            continue
        if not in_args:
            continue
        if line and not line.startswith(" "):
            break
        m = re.match(r"^    ([\w, *]+):\s*(.*)$", line)
        if m:
            names = [n.strip().lstrip("*") for n in m.group(1).split(",")]
            for n in names:
                out[n] = m.group(2).strip()
        elif line.startswith("        ") and names:
            for n in names:
                out[n] = f"{out[n]} {line.strip()}"
    for n, text in out.items():
        text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text.replace("``", ""))
        end = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", text)
        out[n] = text[: end.start() + 1] if end else text
    return out


def declared_options(fn: Callable[..., Any]) -> tuple[MethodOption, ...]:
    """The options of a method: its keyword parameters with defaults and types, and their docstring help."""
    helps = _arg_help(inspect.getdoc(fn) or "")
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in _NOT_OPTIONS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        ann = "" if p.annotation is p.empty else str(ann)
        py_only = any(t in ann for t in _PYTHON_ONLY)
        out.append(MethodOption(p.name, p.default, ann, helps.get(p.name, ""), py_only))
    return tuple(out)


METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, *, needs_data: bool = False, paper: str = "") -> Callable[[MergeFn], MergeFn]:
    """Register ``fn`` as merge method ``name`` (a decorator)."""

    def deco(fn: MergeFn) -> MergeFn:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        METHODS[name] = MethodInfo(name, fn, needs_data, paper, summary, declared_options(fn))

        @functools.wraps(fn)
        def checked(models: Sequence[nn.Module], *args: object, **options: object) -> nn.Module:
            # Direct calls (``average(models, ...)``) are checked like ``merge(models, method=...)`` and return
            # the model, as they always did; ``merge(..., return_info=True)`` gives the MergeResult.
            models = list(models)
            check_inputs(models, {k: v for k, v in options.items() if k != "context"}, op=name)
            _require_data(METHODS[name], options.get("data"), options.get("context"))  # type: ignore[arg-type]
            out = fn(models, *args, **options)
            return out.model if isinstance(out, MergeResult) else out

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
    *,
    context: MatchContext | None = None,
    return_info: bool = False,
    **options: object,
) -> nn.Module | MergeResult:
    """Merge several models of one architecture into one.

    Args:
        models: two or more ``nn.Module`` s with the same architecture (same parameter names and shapes).
        method: one of :func:`list_methods` — ``average``, ``greedy_soup``, ``weight_matching``,
            ``activation_matching``, ``zipit``, ``mudsc``, ``task_arithmetic``, ``ties``, ``dare``.
        data: a ``DataLoader`` (or any iterable) yielding ``x`` or ``(x, y)``; needed by data-driven methods
            (default: the context's data).
        context: a :func:`~mergelab.match.context.match_context` of exactly these models: aligned methods reuse
            its structure and activation statistics, so several methods (or option values) on one set of models
            discover and stream once. Methods that match nothing ignore it.
        return_info: return a :class:`MergeResult` (model + ``info`` diagnostics) instead of the model.
        **options: method options (e.g. ``coefficients``, ``repair``); unknown ones raise ``TypeError``.
            ``mergelab list`` shows every method's options.

    Returns:
        A new ``nn.Module`` (or a :class:`MergeResult` with ``return_info=True``); the inputs are never modified.

    Example:
        >>> import torch, mergelab
        >>> from torch import nn
        >>> a, b = nn.Linear(4, 2), nn.Linear(4, 2)
        >>> m = mergelab.merge([a, b], method="average")
        >>> torch.allclose(m.weight, (a.weight + b.weight) / 2)
        True
        >>> mergelab.merge([a, b], method="average", return_info=True).info["method"]
        'average'
    """
    info = get_method(method)
    models = list(models)
    if not models:
        raise ValueError("merge: got no models")
    check_inputs(models, options, op=f"merge({method})")
    if context is not None:
        context.check_models(models, f"merge({method})")
        data = context.data if data is None else data
        if info.takes_context:
            options["context"] = context
    _require_data(info, data, context)
    t0 = time.perf_counter()
    out = info.fn(models, data=data, **options)
    result = out if isinstance(out, MergeResult) else MergeResult(out)
    result.info.setdefault("method", method)
    seconds = result.info.setdefault("seconds", {})
    if isinstance(seconds, dict):
        seconds["total"] = time.perf_counter() - t0
    return result if return_info else result.model


def _require_data(info: MethodInfo, data: object, context: MatchContext | None) -> None:
    """The one data check of a method (solvers check their own need for statistics)."""
    if info.needs_data and data is None and not (context is not None and context.has_stats):
        raise ValueError(f"merge method {info.name!r} needs data= (a DataLoader yielding x or (x, y))")


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
