"""``torch.fx`` tracing, kept for what needs a Python-level graph of module calls.

Discovery itself runs on ``torch.export`` graphs. The fx graph still serves three things the exported ATen
graph cannot: hand-written structures may name fx nodes as probes (``Probe(site="node")``), REPAIR orders its
correction sites by module calls, and :func:`mergelab.merge.partial.build_multihead` stitches branch graphs of
module calls together.
"""

from __future__ import annotations

from torch import fx, nn

__all__ = ["trace"]


def _is_fx_leaf(module: nn.Module) -> bool:
    """Whether :func:`trace` keeps ``module`` as one call instead of tracing into it.

    ``nn.MultiheadAttention`` and any module whose class sets ``fx_leaf = True`` (the zoo's
    ``MultiHeadSelfAttention``): attention modules whose symmetry is known as a whole. A class attribute, not
    an import of the zoo, so discovery stays below ``mergelab.models``.
    """
    return isinstance(module, nn.MultiheadAttention) or getattr(type(module), "fx_leaf", False) is True


class _Tracer(fx.Tracer):
    """``torch.fx`` tracer that keeps the attention modules with a known symmetry as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _is_fx_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` with the attention leaves mergelab understands.

    Raises:
        ValueError: if tracing fails (data-dependent control flow, unsupported Python); the message suggests
            writing the :class:`Structure` by hand.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx raises many exception types (TraceError, TypeError, RuntimeError, ...)
        raise ValueError(
            f"discover_structure: tracing {type(model).__name__} with torch.fx failed "
            f"({type(err).__name__}: {err}). Write its Structure by hand instead, e.g. with "
            "mergelab.structure.build_structure(model, linear_axes(...), conv_axes(...), norm_axes(...))"
        ) from err
    return fx.GraphModule(model, graph, class_name=type(model).__name__)
