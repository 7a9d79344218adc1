"""One registry of matching solvers: each maps a :class:`~mergelab.match.context.MatchContext` to an Alignment.

A solver is a plain function ``fn(ctx, **options) -> Alignment`` registered under a short name with
:func:`register_solver`; :func:`~mergelab.merge.aligned.merge_aligned` turns any of them into a merge method
(build, multi-head / partial, BatchNorm reset or REPAIR). Built in: ``identity`` (plain averaging), ``weight``
(Git Re-Basin weight matching, also MergeMany), ``activation`` (activation matching), ``zip`` (ZipIt!) and
``dual`` (MuDSC); importing :mod:`mergelab.match` (which any ``mergelab.match.*`` import does first) registers
them. Adding one is a function and a decorator line (``docs/alignment.md`` shows an example).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from mergelab.match.context import match_context
    >>> a, b = (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(2))
    >>> ctx = match_context([a, b], example_input=torch.zeros(2, 4))
    >>> SOLVERS["weight"](ctx, seed=0).perms[0]["0"].tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergelab.match.context import MatchContext
    from mergelab.structure.alignment import Alignment

__all__ = ["SOLVERS", "SolverInfo", "get_solver", "list_solvers", "register_solver"]

SolverFn = Callable[..., "Alignment"]


@dataclass(frozen=True)
class SolverInfo:
    """A registered solver: its function, whether it reads activation statistics, and its one-line summary.

    Calling it (``SOLVERS["weight"](ctx, seed=1)``) checks the options and the data, runs the solver and records
    its name and time in ``alignment.info``.
    """

    name: str
    fn: SolverFn
    needs_data: bool
    summary: str

    @property
    def options(self) -> tuple[str, ...]:
        """The solver's option names (its keyword parameters after the context)."""
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return tuple(p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD)

    def __call__(self, ctx: MatchContext, **options: Any) -> Alignment:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(
                f"solver {self.name!r}: unknown option(s) {unknown}; valid options: {list(self.options)}"
            )
        if self.needs_data and ctx.data is None and not ctx.has_stats:
            raise ValueError(f"solver {self.name!r} needs data= (a loader yielding x or (x, y))")
        alignment = self.fn(ctx, **options)
        alignment.info.setdefault("solver", self.name)
        return alignment


SOLVERS: dict[str, SolverInfo] = {}


def register_solver(name: str, *, needs_data: bool = False) -> Callable[[SolverFn], SolverFn]:
    """Register ``fn(ctx, **options) -> Alignment`` as solver ``name`` (a decorator; ``fn`` is returned as is).

    Args:
        name: the solver's name in :data:`SOLVERS`.
        needs_data: whether it reads the context's activation statistics.
    """

    def deco(fn: SolverFn) -> SolverFn:
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is registered twice")
        summary = (inspect.getdoc(fn) or "").split("\n", 1)[0]
        SOLVERS[name] = SolverInfo(name, fn, needs_data, summary)
        return fn

    return deco


def get_solver(name: str) -> SolverInfo:
    """The registered solver ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None


def list_solvers() -> list[str]:
    return sorted(SOLVERS)


@register_solver("identity")
def identity_solver(ctx: MatchContext, *, coefficients: Sequence[float] | None = None) -> Alignment:
    """No matching: unit ``j`` of every model is merged unit ``j`` (plain weight averaging).

    Args:
        coefficients: averaging weights (uniform by default).
    """
    from mergelab.structure.alignment import identity_alignment

    return identity_alignment(ctx.structure, ctx.num_models, coefficients)
