"""One rule per ATen op family, registered in :data:`RULES` (``"aten.linear"`` → rule).

A rule receives the walk, the op's abstract arguments and keyword arguments, and returns the abstract output
(or ``NotImplemented`` when it does not apply, which makes a tracked input an error naming the op). Supporting
a new op is one decorated function in the module of its family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["RULES", "rule"]

RULES: dict[str, Callable[..., Any]] = {}


def rule(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` for the ATen ops ``names`` (without namespace: ``rule("linear")`` is ``aten.linear``)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        for n in names:
            key = n if "." in n else f"aten.{n}"
            if key in RULES:
                raise ValueError(f"rule for {key!r} registered twice")
            RULES[key] = fn
        return fn

    return deco


from mergelab.structure.discover.rules import (  # noqa: E402,F401  (registration side effects)
    attention,
    conv,
    dense,
    elementwise,
    embedding,
    norm,
    shape,
)
