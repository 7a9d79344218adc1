"""Hidden units of a network: select them by module or structure group, read their activations, and find the
dataset inputs that drive them most (streamed).

A *unit* is one channel (or hidden neuron) of one module's output, read with a forward hook; conv maps and
token sequences are averaged over positions (:func:`select_units`, :func:`unit_activations`). A layer can be
named by module (``"layers.2"``, ``"blocks.2"``) or by structure group (its first probe is used).
:func:`top_k_examples` keeps a running top-k per unit (never all activations in memory);
:func:`unit_correlation` scores matched units of two models by their activations on data.

Part of the feature-visualization toolkit (:mod:`mergelab.analysis.feature_vis`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn

from mergelab.evaluation import batches, eval_mode

__all__ = ["TopK", "UnitSelection", "select_units", "top_k_examples", "unit_activations", "unit_correlation"]


# -- unit selection ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitSelection:
    """Which units to read, and where.

    Attributes:
        module: qualified name of the module whose forward output holds the units (``""`` is the model).
        units: unit indices along ``dim``.
        dim: the unit axis of that output (``1`` for ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``; ``-1`` for
            token sequences ``(N, T, D)``); every other non-batch axis is averaged.
        size: number of units along ``dim``.
        input_shape: the model's input shape without batch (what activation maximisation optimises).
        group: the structure group the layer was named by, if any.
    """

    module: str
    units: tuple[int, ...]
    dim: int
    size: int
    input_shape: tuple[int, ...]
    group: str | None = None


def _input_shape(
    model: nn.Module, input_shape: Sequence[int] | None, example_input: Tensor | None
) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    if example_input is not None:
        return tuple(example_input.shape[1:])
    spec = getattr(model, "mergelab_spec", None)
    if isinstance(spec, dict) and "input_shape" in spec:
        return tuple(int(s) for s in spec["input_shape"])
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, (tuple, list)) and all(isinstance(s, int) for s in shape):
        return tuple(shape)
    raise ValueError(
        f"feature_vis: cannot tell the input shape of {type(model).__name__}; pass input_shape= or example_input="
    )


class _Stop(Exception):
    """Raised by the capture hook: nothing after the observed module needs to run."""


def _layer_output(model: nn.Module, module: str, x: Tensor) -> Tensor:
    """The forward output of ``model.get_submodule(module)`` on ``x`` (the rest of the network is skipped)."""
    target = model.get_submodule(module)
    store: dict[str, Any] = {}

    def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
        store["out"] = out
        raise _Stop

    handle = target.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "out" not in store:
        raise ValueError(f"feature_vis: module {module!r} was not called in {type(model).__name__}.forward")
    out = store["out"]
    if isinstance(out, (tuple, list)):
        out = next((o for o in out if isinstance(o, Tensor)), None)
    if not isinstance(out, Tensor):
        raise TypeError(f"feature_vis: module {module!r} returned {type(out).__name__}, not a Tensor")
    return out


def _reduce(out: Tensor, dim: int, module: str) -> Tensor:
    """``(N, ..., units, ...)`` → ``(N, units)``: mean over every other non-batch axis (positions, tokens)."""
    if out.ndim < 2:
        raise ValueError(
            f"feature_vis: module {module!r} output has shape {tuple(out.shape)}; need (N, units, ...)"
        )
    d = dim % out.ndim
    if d == 0:
        raise ValueError(
            f"feature_vis: dim={dim} of module {module!r} output {tuple(out.shape)} is the batch axis"
        )
    moved = out.movedim(d, 1)  # (N, units, *rest)
    return moved.reshape(moved.shape[0], moved.shape[1], -1).mean(-1)


def _flatten_start(node: fx.Node) -> int | None:
    """``start_dim`` if ``node`` is ``torch.flatten(x, s)`` / ``x.flatten(s)`` (the units stay on axis ``s``)."""
    is_fn = node.op == "call_function" and node.target is torch.flatten
    is_method = node.op == "call_method" and node.target == "flatten"
    if not (is_fn or is_method):
        return None
    if len(node.args) > 1:
        return int(node.args[1])  # type: ignore[arg-type]
    return int(node.kwargs.get("start_dim", 0))  # type: ignore[arg-type]


def _probe_module(model: nn.Module, group: Any) -> tuple[str, int]:
    """A module whose output shows ``group``'s units: an output probe, the module feeding an input probe, or (fx
    probes of hand-written structures) a module call or one flatten before it."""
    for probe in group.probes:
        if probe.site == "output" and probe.inner == 1:
            return probe.node, probe.dim
        if probe.site == "input" and probe.source and probe.inner == 1:
            return probe.source, probe.dim
    from mergelab.structure import trace

    nodes = {n.name: n for n in trace(model).graph.nodes}
    for probe in group.probes:
        if probe.site != "node":
            continue
        node = nodes.get(probe.node)
        if node is not None and node.op != "call_module":
            start = _flatten_start(node)
            src = node.args[0] if node.args else None
            if start == probe.dim and isinstance(src, fx.Node):
                node = src  # flatten(conv_map, 1): channel c is still axis 1 of the map
        if node is not None and node.op == "call_module":
            return str(node.target), probe.dim
    raise ValueError(
        f"select_units: group {group.name!r} is observed at {[p.node for p in group.probes]}, none of "
        "which is a module output; name a module instead"
    )


def select_units(
    model: nn.Module,
    layer: str,
    units: Sequence[int] | int | None = None,
    *,
    by: Literal["auto", "module", "group"] = "auto",
    dim: int | None = None,
    input_shape: Sequence[int] | None = None,
    example_input: Tensor | None = None,
) -> UnitSelection:
    """Name the units to visualise: a module (or structure group) and unit indices, checked against the model.

    Args:
        model: the network.
        layer: a module name from ``model.named_modules()`` (e.g. ``"layers.2"``, ``"blocks.2"``) or a group
            name of ``discover_structure(model, ...)``.
        units: unit indices (an int means ``range(units)``); ``None`` means all units.
        by: ``"module"``, ``"group"``, or ``"auto"`` (a module if such a module exists, else a group).
        dim: the unit axis of the module output (default 1, channel-first; a group uses its probe's axis).
            Pass ``-1`` for token sequences ``(N, T, D)``.
        input_shape: the model's input shape without batch (default: ``model.mergelab_spec``/``input_shape``).
        example_input: a batch to run once instead of zeros of ``input_shape``.

    Returns:
        A :class:`UnitSelection`.

    Raises:
        ValueError: unknown module or group, a unit index out of range, a bad ``dim``.

    Example:
        >>> from mergelab.models import build_model
        >>> m = build_model("cnn", (1, 8, 8), 10, width=8)
        >>> s = select_units(m, "blocks.2", [0, 3])
        >>> s.module, s.units, s.size
        ('blocks.2', (0, 3), 8)
    """
    if by not in ("auto", "module", "group"):
        raise ValueError(f"select_units: by={by!r}; choose 'auto', 'module' or 'group'")
    shape = _input_shape(model, input_shape, example_input)
    x = example_input[:2] if example_input is not None else torch.zeros(2, *shape)
    modules = dict(model.named_modules())
    group_name: str | None = None
    if by == "module" or (by == "auto" and layer in modules):
        if layer not in modules:
            raise ValueError(
                f"select_units: {type(model).__name__} has no module {layer!r}; modules: {sorted(modules)[:40]}"
            )
        module, d = layer, 1 if dim is None else dim
    else:
        from mergelab.structure import discover_structure

        structure = discover_structure(model, x)
        names = [g.name for g in structure]
        if layer not in names:
            raise ValueError(
                f"select_units: {layer!r} is neither a module nor a structure group of {type(model).__name__}; "
                f"groups: {names}; modules: {sorted(modules)[:40]}"
            )
        module, d = _probe_module(model, structure[layer])
        d = d if dim is None else dim
        group_name = layer
    with eval_mode(model), torch.no_grad():
        out = _layer_output(model, module, x)
    if not -out.ndim <= d < out.ndim or d % out.ndim == 0:
        raise ValueError(
            f"select_units: dim={d} is not a unit axis of module {module!r} output {tuple(out.shape)}"
        )
    size = int(out.shape[d])
    if units is None:
        idx: tuple[int, ...] = tuple(range(size))
    elif isinstance(units, int):
        idx = tuple(range(units))
    else:
        idx = tuple(int(u) for u in units)
    if not idx:
        raise ValueError(f"select_units: no units selected in module {module!r}")
    bad = [u for u in idx if not 0 <= u < size]
    if bad:
        raise ValueError(
            f"select_units: unit index {bad} out of range for module {module!r}, which has {size} units "
            f"along dim {d} (output {tuple(out.shape)})"
        )
    return UnitSelection(module, idx, d, size, shape, group_name)


def unit_activations(model: nn.Module, selection: UnitSelection, x: Tensor) -> Tensor:
    """Activations ``(N, len(units))`` of the selected units on ``x`` (differentiable; caller picks the mode).

    Conv maps and token sequences are averaged over positions, so a channel is one number per input. A module
    called several times in one forward is read at its first call.
    """
    out = _reduce(_layer_output(model, selection.module, x), selection.dim, selection.module)  # (N, size)
    return out[:, list(selection.units)]


# -- data-driven view ----------------------------------------------------------------------------------------


@dataclass
class TopK:
    """The inputs that activate each unit most.

    Attributes:
        values: activations, ``(U, k)``, descending (ties: earlier sample first).
        indices: positions of the samples in the order ``data`` yielded them, ``(U, k)``.
        examples: the inputs, ``(U, k, *input_shape)``.
        units: the unit indices.
    """

    values: Tensor
    indices: Tensor
    examples: Tensor
    units: tuple[int, ...]

    @property
    def mean(self) -> Tensor:
        """Mean of each unit's top-k inputs, ``(U, *input_shape)``."""
        return self.examples.mean(1)


@torch.no_grad()
def top_k_examples(
    model: nn.Module,
    selection: UnitSelection,
    data: Iterable,
    k: int = 16,
    *,
    max_batches: int | None = None,
) -> TopK:
    """Stream ``data`` once and keep, per unit, the ``k`` inputs with the largest activation.

    Memory is ``O(U * k)`` inputs whatever the dataset size: each batch is ranked, its best ``k`` per unit are
    merged with the running best, and the rest is dropped. The order is a total one (value descending, then
    sample position ascending), so the result equals ranking all activations at once.

    Args:
        model: the network (run in eval mode).
        selection: from :func:`select_units`.
        data: batches ``x`` or ``(x, y)``.
        k: examples per unit (fewer if the data has fewer samples).
        max_batches: stop after this many batches.

    Returns:
        A :class:`TopK`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> sel = select_units(net, "0", input_shape=(3,))
        >>> tk = top_k_examples(net, sel, [torch.randn(5, 3), torch.randn(4, 3)], k=3)
        >>> tuple(tk.examples.shape), tuple(tk.mean.shape)
        ((2, 3, 3), (2, 3))
    """
    if k < 1:
        raise ValueError(f"top_k_examples: k must be >= 1, got {k}")
    best_v: Tensor | None = None  # (U, m)
    best_i: Tensor | None = None  # (U, m)
    best_x: Tensor | None = None  # (U, m, *input_shape)
    seen = 0
    with eval_mode(model):
        for x, _ in batches(data, max_batches=max_batches):
            act = unit_activations(model, selection, x).T.float()  # (U, B)
            pos = torch.arange(seen, seen + x.shape[0]).expand_as(act)
            seen += x.shape[0]
            vb, ob = torch.sort(
                act, dim=1, descending=True, stable=True
            )  # ties keep the earlier sample first
            vb, ob = vb[:, :k], ob[:, :k]
            cand_v, cand_i, cand_x = vb, pos.gather(1, ob), x[ob]  # x[ob]: (U, kb, *input_shape)
            if best_v is not None and best_i is not None and best_x is not None:
                cand_v = torch.cat([best_v, cand_v], 1)
                cand_i = torch.cat([best_i, cand_i], 1)
                cand_x = torch.cat([best_x, cand_x], 1)
            order = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, :k]
            best_v, best_i = cand_v.gather(1, order), cand_i.gather(1, order)
            best_x = cand_x[torch.arange(order.shape[0])[:, None], order]
    if best_v is None or best_i is None or best_x is None:
        raise ValueError("top_k_examples: the data is empty")
    return TopK(best_v, best_i, best_x, selection.units)


@torch.no_grad()
def unit_correlation(
    model_a: nn.Module,
    selection_a: UnitSelection,
    model_b: nn.Module,
    selection_b: UnitSelection,
    data: Iterable,
    *,
    max_batches: int | None = None,
) -> Tensor:
    """Pearson correlation over ``data`` between unit ``selection_a.units[i]`` of A and ``selection_b.units[i]``
    of B, streamed (running sums in float64) → ``(U,)``."""
    if len(selection_a.units) != len(selection_b.units):
        raise ValueError(
            f"unit_correlation: {len(selection_a.units)} units of {selection_a.module!r} vs "
            f"{len(selection_b.units)} of {selection_b.module!r}"
        )
    sums = torch.zeros(5, len(selection_a.units), dtype=torch.float64)  # Σa, Σb, Σa², Σb², Σab
    count = 0
    with eval_mode(model_a, model_b):
        for x, _ in batches(data, max_batches=max_batches):
            a = unit_activations(model_a, selection_a, x).double()
            c = unit_activations(model_b, selection_b, x).double()
            sums += torch.stack([a.sum(0), c.sum(0), (a * a).sum(0), (c * c).sum(0), (a * c).sum(0)])
            count += x.shape[0]
    if count < 2:
        raise ValueError("unit_correlation: need at least 2 samples")
    ma, mb = sums[0] / count, sums[1] / count
    cov = sums[4] / count - ma * mb
    va = (sums[2] / count - ma**2).clamp_min(0)
    vb = (sums[3] / count - mb**2).clamp_min(0)
    return (cov / (va * vb).sqrt().clamp_min(1e-12)).float()
