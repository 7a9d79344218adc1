"""Typed ``key=value`` options: CLI strings and JSON values parsed against a field's type hint.

Study configs (``--set``, ``--config``), model options (``--model-arg``) and merge options (``--option``) share
one parser, so ``--set archs=mlp`` is the tuple ``("mlp",)`` (not split into characters), ``--set epochs=abc`` is
an error naming the key, the value and the expected type, and tuples come from JSON lists or comma lists.

Example:
    >>> parse_value("seeds", "1,2,3", tuple[int, ...])
    (1, 2, 3)
    >>> parse_value("epochs", "abc", int)
    Traceback (most recent call last):
    ...
    mergelab.options.OptionError: epochs='abc': expected an integer
"""

from __future__ import annotations

import inspect
import json
import math
import types
import typing
from collections import abc
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class OptionError(ValueError):
    """An option value that does not fit its type or range."""


def parse_value(key: str, value: Any, hint: Any) -> Any:
    """``value`` (a CLI string or a JSON value) converted to ``hint``; ``OptionError`` names key, value and type."""
    try:
        return _convert(value, hint)
    except _Bad as e:
        raise OptionError(f"{key}={value!r}: expected {e}") from None


def split_kv(items: Sequence[str], what: str = "option") -> dict[str, str]:
    """``["a=1", "b=x"]`` → ``{"a": "1", "b": "x"}`` (values left as strings for :func:`parse_value`)."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise OptionError(f"{what} {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def parse_for_callable(fn: Callable[..., Any], values: Mapping[str, Any], who: str) -> dict[str, Any]:
    """Values parsed against ``fn``'s annotated keyword parameters (unannotated ones: JSON if it parses)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: parse loosely
        hints = {}
    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out = {}
    for k, v in values.items():
        if k in ("models", "data", "model") or (k not in params and not accepts_any):
            valid = [
                n
                for n, p in params.items()
                if n not in ("models", "data", "model")
                and (p.kind is inspect.Parameter.KEYWORD_ONLY or p.default is not p.empty)
            ]
            raise OptionError(f"{who}: unknown option {k!r}; valid: {valid}")
        hint = hints.get(k)
        if (
            hint is None
            and params.get(k) is not None
            and params[k].default not in (None, inspect.Parameter.empty)
        ):
            hint = type(params[k].default)
        try:
            out[k] = parse_value(k, v, hint)
        except OptionError as e:
            raise OptionError(f"{who}: {e}") from None
    return out


class _Bad(Exception):
    """Internal: carries the readable expected type."""


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "a string"
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (tuple, list, abc.Sequence):
        inner = args[0] if args else Any
        return (
            f"a list of {_describe(inner).removeprefix('an ').removeprefix('a ')}s (JSON list or comma list)"
        )
    if origin is dict or hint is dict:
        return "a JSON object"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) if a is not type(None) else "none" for a in args)
    return getattr(hint, "__name__", str(hint))


def _convert(value: Any, hint: Any) -> Any:
    if hint is None or hint is Any or hint is inspect.Parameter.empty:
        return _loose(value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))
        ):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a)
            except _Bad:
                pass
        raise _Bad(_describe(hint))
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value.strip()):
                return choice
        raise _Bad(_describe(hint))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Bad(_describe(hint))
    if hint is int:
        if isinstance(value, bool):
            raise _Bad(_describe(hint))
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _Bad(_describe(hint))
    if hint is float:
        if isinstance(value, bool):
            raise _Bad(_describe(hint))
        try:
            x = (
                float(value.strip())
                if isinstance(value, str)
                else float(value)
                if isinstance(value, (int, float))
                else None
            )
        except ValueError:
            x = None
        if x is None or not math.isfinite(x):
            raise _Bad("a finite number")
        return x
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Bad(_describe(hint))
    if origin in (tuple, list, abc.Sequence) or hint in (tuple, list):
        items = _items(value)
        if items is None:
            raise _Bad(_describe(hint))
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise _Bad(f"{len(args)} values ({', '.join(_describe(a) for a in args)})")
            return tuple(_convert(v, a) for v, a in zip(items, args, strict=True))
        inner = args[0] if args else Any
        conv = []
        for v in items:
            try:
                conv.append(_convert(v, inner))
            except _Bad as e:
                raise _Bad(f"{_describe(hint)}; {v!r} is not {e}") from None
        return tuple(conv) if (origin or hint) is tuple else conv
    if origin is dict or hint is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise _Bad(_describe(hint)) from None
        if not isinstance(value, dict):
            raise _Bad(_describe(hint))
        return value
    return _loose(value)


def _items(value: Any) -> list[Any] | None:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                parsed = json.loads(s)
            except json.JSONDecodeError:
                return None
            return parsed if isinstance(parsed, list) else None
        return [p.strip() for p in s.split(",") if p.strip()] if s else []
    if isinstance(value, (int, float)):
        return [value]
    return None


def _loose(value: Any) -> Any:
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return tuple(parsed) if isinstance(parsed, list) else parsed
    return tuple(value) if isinstance(value, list) else value
