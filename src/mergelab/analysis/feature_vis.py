"""Feature visualization of hidden units: activation maximisation, top-k dataset examples, endpoint vs merge.

The question of Zou et al. is whether a unit of a permutation-aligned, averaged network still *looks like*
the units it was averaged from. This module answers it with the two standard pictures of a unit:

* **Activation maximisation** (:func:`activation_maximization`): optimise an input, starting from small noise,
  so that one unit's activation is as large as possible, with the usual regularisers — an L2 penalty and a
  total-variation penalty, random jitter (a circular shift of the input each step), and optionally a Fourier
  parameterisation with ``1/f`` scaling (:func:`spectrum_to_image`) so that Adam's steps favour low
  frequencies. Works for 1-D (``(C, L)``) and 2-D (``(C, H, W)``) inputs.
* **Data-driven view** (:func:`top_k_examples`): the ``k`` dataset inputs that activate a unit most, found in
  one streamed pass (a running top-k per unit; never all activations in memory), and their mean.

A *unit* is one channel (or hidden neuron) of one module's output, read with a forward hook; conv maps and
token sequences are averaged over positions (:func:`select_units`, :func:`unit_activations`). A layer can be
named by module (``"layers.2"``, ``"blocks.2"``) or by structure group (its first probe is used).

For merging (:func:`endpoint_models`, :func:`compare_units`, :func:`plot_comparison`): B is re-expressed in A's
unit basis (``align_to``), so unit ``i`` of A, of the aligned B' and of their average are "the same" unit; the
naive average of A and B (no alignment) is the control. :func:`visual_similarity` scores pairs of pictures by
Pearson correlation, :func:`unit_correlation` scores matched units by their activations on data.

Why pre-activations: for a ReLU layer, maximising the pre-activation finds the same pattern (ReLU is
monotone) but its gradient never vanishes, while a post-ReLU unit that is off for the starting noise gives a
zero gradient forever. Name the ``Linear``/conv module to visualise pre-activations, the activation module (or
the structure group, whose probe usually sits after the ReLU) for post-activations.

Paper: Zou, Nanfack, Horoi, Belilovsky, "Understanding Permutation Based Model Merging with Feature
Visualizations" (2024). Background: Olah et al., "Feature Visualization", Distill 2017 (regularisers,
jitter, decorrelated Fourier parameterisation).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> sel = select_units(net, "1", [0, 5], input_shape=(1, 4, 4))
    >>> res = activation_maximization(net, sel, ActMaxConfig(steps=20))
    >>> tuple(res.images.shape), bool((res.activations > res.initial_activations).all())
    ((2, 1, 4, 4), True)
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, fx, nn

from mergelab.evaluation import batches, eval_mode

__all__ = [
    "ActMaxConfig",
    "ActMaxResult",
    "TopK",
    "UnitComparison",
    "UnitSelection",
    "activation_maximization",
    "compare_units",
    "endpoint_models",
    "fourier_scale",
    "image_to_spectrum",
    "plot_comparison",
    "select_units",
    "similarity_rows",
    "spectrum_to_image",
    "top_k_examples",
    "unit_activations",
    "unit_correlation",
    "visual_similarity",
]

log = logging.getLogger(__name__)

_PAPER = "Zou, Nanfack, Horoi, Belilovsky, 'Understanding Permutation Based Model Merging with Feature Visualizations'"


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


# -- Fourier parameterisation --------------------------------------------------------------------------------


def fourier_scale(spatial: Sequence[int], decay: float = 1.0) -> Tensor:
    """Per-frequency scale ``1 / max(|f|, 1/max(spatial))**decay`` on the ``rfftn`` grid, RMS-normalised to 1.

    A spectrum of white noise times this scale is ``1/f`` ("pink") noise: natural-image statistics, so that
    optimising the spectrum favours smooth inputs. The RMS normalisation keeps the image's scale comparable
    with the pixel parameterisation.

    Args:
        spatial: the spatial sizes (``(L,)`` or ``(H, W)``; any number of axes works).
        decay: the exponent (0 = white, 1 = pink).

    Returns:
        A real tensor of shape ``(*spatial[:-1], spatial[-1] // 2 + 1)``.
    """
    if not spatial:
        raise ValueError("fourier_scale: need at least one spatial axis")
    freqs = [torch.fft.fftfreq(n) for n in spatial[:-1]] + [torch.fft.rfftfreq(spatial[-1])]
    grids = torch.meshgrid(*freqs, indexing="ij")
    radius = torch.sqrt(sum(g**2 for g in grids))  # type: ignore[arg-type]
    scale = radius.clamp_min(1.0 / max(spatial)) ** (-float(decay))
    return scale / scale.pow(2).mean().sqrt()


def spectrum_to_image(spectrum: Tensor, spatial: Sequence[int], decay: float = 1.0) -> Tensor:
    """Image from a scaled spectrum: ``irfftn(spectrum * fourier_scale)`` over the trailing spatial axes.

    Args:
        spectrum: complex ``(..., *spatial[:-1], spatial[-1] // 2 + 1)``, or real with a trailing axis of 2
            (real, imaginary) — the form kept as an optimisable parameter.
        spatial: output spatial sizes (needed: ``rfftn`` loses the parity of the last size).
        decay: as in :func:`fourier_scale`.

    Returns:
        The real image ``(..., *spatial)``.
    """
    if not spectrum.is_complex():
        if spectrum.shape[-1] != 2:
            raise ValueError(
                f"spectrum_to_image: real spectrum {tuple(spectrum.shape)} needs a last axis of 2"
            )
        spectrum = torch.view_as_complex(spectrum.contiguous())
    scale = fourier_scale(spatial, decay)
    if tuple(spectrum.shape[-len(spatial) :]) != tuple(scale.shape):
        raise ValueError(
            f"spectrum_to_image: spectrum {tuple(spectrum.shape)} does not fit spatial {tuple(spatial)} "
            f"(expected trailing {tuple(scale.shape)})"
        )
    dims = tuple(range(-len(spatial), 0))
    return torch.fft.irfftn(spectrum * scale, s=tuple(spatial), dim=dims, norm="ortho")


def image_to_spectrum(image: Tensor, spatial_dims: int, decay: float = 1.0) -> Tensor:
    """Inverse of :func:`spectrum_to_image`: the complex scaled spectrum of ``image``'s last ``spatial_dims`` axes.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 1, 7, 6)
        >>> torch.allclose(spectrum_to_image(image_to_spectrum(x, 2), (7, 6)), x, atol=1e-5)
        True
    """
    if not 1 <= spatial_dims <= image.ndim:
        raise ValueError(f"image_to_spectrum: spatial_dims={spatial_dims} for image {tuple(image.shape)}")
    spatial = tuple(image.shape[-spatial_dims:])
    dims = tuple(range(-spatial_dims, 0))
    return torch.fft.rfftn(image, dim=dims, norm="ortho") / fourier_scale(spatial, decay)


# -- activation maximisation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActMaxConfig:
    """Settings of :func:`activation_maximization`.

    Attributes:
        steps: Adam steps (a fixed number; no early stopping, so runs are comparable).
        lr: Adam learning rate on the parameterisation.
        l2: weight of the mean squared input (keeps the input in the data's range; inputs are standardised).
        tv: weight of the total variation (mean absolute difference of neighbours along each spatial axis).
        jitter: largest circular shift (positions) along each spatial axis, drawn anew each step.
        fourier: optimise a ``1/f``-scaled spectrum instead of the pixels.
        decay: exponent of the ``1/f`` scaling.
        init_std: standard deviation of the starting noise (in input units).
        value_range: if given, the image is ``lo + (hi - lo) * sigmoid(z)``: always inside the range.
        seed: seed of the starting noise and the jitter.
    """

    steps: int = 200
    lr: float = 0.05
    l2: float = 0.1
    tv: float = 0.1
    jitter: int = 1
    fourier: bool = True
    decay: float = 1.0
    init_std: float = 0.1
    value_range: tuple[float, float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if (
            self.steps < 0
            or self.lr <= 0
            or self.l2 < 0
            or self.tv < 0
            or self.jitter < 0
            or self.init_std < 0
        ):
            raise ValueError(
                f"ActMaxConfig: steps, lr, l2, tv, jitter, init_std must be non-negative (lr > 0): {self}"
            )
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise ValueError(f"ActMaxConfig: value_range {self.value_range} must be (lo, hi) with lo < hi")


@dataclass
class ActMaxResult:
    """Result of :func:`activation_maximization`.

    Attributes:
        images: the optimised inputs, ``(U, *input_shape)``, one per unit in ``units`` order.
        activations: each unit's activation on its own final image (no jitter), ``(U,)``.
        initial_activations: the same on the starting noise, ``(U,)``.
        history: each unit's (jittered) activation at every step, ``(U, steps)``.
        units: the unit indices.
        module: the module read.
    """

    images: Tensor
    activations: Tensor
    initial_activations: Tensor
    history: Tensor
    units: tuple[int, ...]
    module: str


def _tv(img: Tensor, spatial_dims: int) -> Tensor:
    """Anisotropic total variation per image: mean |neighbour difference|, summed over spatial axes → ``(U,)``."""
    total = img.new_zeros(img.shape[0])
    for d in range(img.ndim - spatial_dims, img.ndim):
        if img.shape[d] > 1:
            total = total + img.diff(dim=d).abs().flatten(1).mean(1)
    return total


def activation_maximization(
    model: nn.Module, selection: UnitSelection, config: ActMaxConfig = ActMaxConfig()
) -> ActMaxResult:
    """Optimise one input per selected unit to maximise that unit's activation (all units in one batch).

    Loss per unit ``u`` with image ``x_u``: ``-a_u(jitter(x_u)) + l2 * mean(x_u**2) + tv * TV(x_u)``. The model
    runs in eval mode and its parameters receive no gradient; nothing about it is changed.

    Args:
        model: the network.
        selection: from :func:`select_units` (gives the module, units and input shape).
        config: the regularisers and optimiser settings; same config (seed) → identical images.

    Returns:
        An :class:`ActMaxResult`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU())
        >>> sel = select_units(net, "0", input_shape=(1, 12))
        >>> r = activation_maximization(net, sel, ActMaxConfig(steps=10))
        >>> tuple(r.images.shape), tuple(r.history.shape)
        ((4, 1, 12), (4, 10))
    """
    cfg = config
    shape = selection.input_shape
    spatial = tuple(shape[1:])
    n = len(selection.units)
    if cfg.fourier and not spatial:
        raise ValueError(
            f"activation_maximization: fourier=True needs a spatial axis; input shape is {shape}"
        )
    gen = torch.Generator().manual_seed(int(cfg.seed))
    if cfg.fourier:
        freq_shape = (*spatial[:-1], spatial[-1] // 2 + 1)
        param = cfg.init_std * torch.randn(n, shape[0], *freq_shape, 2, generator=gen)
    else:
        param = cfg.init_std * torch.randn(n, *shape, generator=gen)
    param.requires_grad_(True)

    def to_image(p: Tensor) -> Tensor:
        z = spectrum_to_image(p, spatial, cfg.decay) if cfg.fourier else p  # (U, *shape)
        if cfg.value_range is None:
            return z
        lo, hi = cfg.value_range
        return lo + (hi - lo) * torch.sigmoid(z)

    rows = torch.arange(n)
    spatial_axes = tuple(range(2, 2 + len(spatial)))
    history = torch.zeros(n, cfg.steps)
    opt = torch.optim.Adam([param], lr=cfg.lr)
    with eval_mode(model):
        with torch.no_grad():
            initial = unit_activations(model, selection, to_image(param))[rows, rows].clone()
        for step in range(cfg.steps):
            img = to_image(param)
            x = img
            if cfg.jitter and spatial:
                shifts = torch.randint(-cfg.jitter, cfg.jitter + 1, (len(spatial),), generator=gen).tolist()
                x = torch.roll(img, shifts=shifts, dims=spatial_axes)
            act = unit_activations(model, selection, x)[rows, rows]  # unit u on image u, (U,)
            penalty = cfg.l2 * img.pow(2).flatten(1).mean(1)
            if cfg.tv and spatial:
                penalty = penalty + cfg.tv * _tv(img, len(spatial))
            loss = (penalty - act).sum()
            (grad,) = torch.autograd.grad(loss, [param])  # model parameters get no .grad
            param.grad = grad
            opt.step()
            history[:, step] = act.detach()
        with torch.no_grad():
            images = to_image(param).detach()
            final = unit_activations(model, selection, images)[rows, rows]
    return ActMaxResult(images, final, initial, history, selection.units, selection.module)


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


# -- comparing pictures --------------------------------------------------------------------------------------


def visual_similarity(x: Tensor, y: Tensor, max_shift: int = 0) -> Tensor:
    """Pearson correlation between matching visualisations: ``x[i]`` vs ``y[i]`` over all their entries → ``(U,)``.

    A constant picture correlates 0 with anything. With ``max_shift > 0`` the best correlation over circular
    shifts of ``y`` by up to ``max_shift`` positions along every spatial axis is taken (act-max pictures of a
    position-averaged channel are only defined up to a shift).

    Args:
        x, y: ``(U, C, *spatial)`` (or any ``(U, ...)``) of equal shape.
        max_shift: largest shift considered (0 = aligned pictures only).

    Example:
        >>> import torch
        >>> a = torch.randn(3, 1, 5, 5)
        >>> visual_similarity(a, 2 * a + 1).round(decimals=4).tolist()
        [1.0, 1.0, 1.0]
    """
    if x.shape != y.shape:
        raise ValueError(f"visual_similarity: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
    spatial_axes = tuple(range(2, x.ndim))
    if max_shift and spatial_axes:
        ranges = [range(-max_shift, max_shift + 1)] * len(spatial_axes)
        best = torch.full((x.shape[0],), -1.0)
        for shifts in _product(ranges):
            best = torch.maximum(best, visual_similarity(x, torch.roll(y, shifts, spatial_axes)))
        return best
    a = x.flatten(1).double()
    b = y.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return ((a * b).sum(1) / den).float()


def _product(ranges: Sequence[range]) -> Iterator[tuple[int, ...]]:
    if not ranges:
        yield ()
        return
    for v in ranges[0]:
        for rest in _product(ranges[1:]):
            yield (v, *rest)


# -- endpoints vs merge --------------------------------------------------------------------------------------


def endpoint_models(
    a: nn.Module,
    b: nn.Module,
    *,
    method: Literal["weight_matching", "activation_matching"] = "weight_matching",
    data: Iterable | None = None,
    example_input: Tensor | None = None,
    seed: int = 0,
) -> dict[str, nn.Module]:
    """The five models compared: ``A``, ``B``, ``B'`` (B in A's unit basis), their aligned and naive averages.

    Unit ``i`` of ``A``, ``B'`` and ``"merged"`` are the matched units; ``"naive"`` averages unit ``i`` of A with
    the unrelated unit ``i`` of B (the control).

    Args:
        a, b: two models of one architecture (not modified).
        method: alignment method of :func:`mergelab.merge.aligned.align_to`.
        data: batches, for activation matching (and tracing when ``example_input`` is missing).
        example_input: input for structure discovery.
        seed: seed of the alignment.

    Returns:
        ``{"A", "B", "B'", "merged", "naive"}`` → model.
    """
    from mergelab.merge.aligned import align_to
    from mergelab.merge.average import average_state_dicts

    b_aligned = align_to(a, b, method=method, data=data, example_input=example_input, seed=seed)

    def avg(x: nn.Module, y: nn.Module) -> nn.Module:
        m = copy.deepcopy(x)
        m.load_state_dict(average_state_dicts([x.state_dict(), y.state_dict()], [0.5, 0.5]))
        return m

    return {"A": a, "B": b, "B'": b_aligned, "merged": avg(a, b_aligned), "naive": avg(a, b)}


@dataclass
class UnitComparison:
    """Pictures of the same units in several models (plain tensors: picklable, no models inside).

    Attributes:
        units: unit indices.
        module: the module read (same name in every model).
        actmax: model name → :class:`ActMaxResult`.
        topk: model name → :class:`TopK` (empty without data).
        input_shape: the input shape without batch.
        data_mean: the mean input of the data (``None`` without data); top-k means are compared after
            subtracting it, otherwise every unit's top-k mean looks like the average input.
    """

    units: tuple[int, ...]
    module: str
    actmax: dict[str, ActMaxResult]
    topk: dict[str, TopK] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()
    data_mean: Tensor | None = None

    def pictures(self, view: Literal["actmax", "topk"], centered: bool = False) -> dict[str, Tensor]:
        """Model name → ``(U, *input_shape)``: act-max images or top-k means (minus ``data_mean`` if
        ``centered``)."""
        if view == "actmax":
            return {k: v.images for k, v in self.actmax.items()}
        if view == "topk":
            if not self.topk:
                raise ValueError("UnitComparison: no top-k view (compare_units was given no data)")
            shift = self.data_mean if centered and self.data_mean is not None else 0.0
            return {k: v.mean - shift for k, v in self.topk.items()}
        raise ValueError(f"UnitComparison: unknown view {view!r}; choose 'actmax' or 'topk'")

    def similarity(
        self, a: str, b: str, view: Literal["actmax", "topk"] = "actmax", max_shift: int = 0
    ) -> Tensor:
        """Per-unit :func:`visual_similarity` of model ``a``'s and model ``b``'s pictures, ``(U,)`` (top-k means
        centred by ``data_mean``)."""
        pics = self.pictures(view, centered=True)
        for name in (a, b):
            if name not in pics:
                raise ValueError(f"UnitComparison: unknown model {name!r}; models: {sorted(pics)}")
        return visual_similarity(pics[a], pics[b], max_shift)

    def mix_similarity(
        self, merged: str, a: str, b: str, view: Literal["actmax", "topk"] = "actmax", max_shift: int = 0
    ) -> Tensor:
        """Per-unit similarity of ``merged``'s pictures to the *mix* of ``a``'s and ``b``'s: the mean of the two
        pictures after standardising each (so neither dominates by scale), ``(U,)``."""
        pics = self.pictures(view, centered=True)
        for name in (merged, a, b):
            if name not in pics:
                raise ValueError(f"UnitComparison: unknown model {name!r}; models: {sorted(pics)}")
        return visual_similarity(pics[merged], (_standardize(pics[a]) + _standardize(pics[b])) / 2, max_shift)


def _standardize(x: Tensor) -> Tensor:
    flat = x.flatten(1)
    out = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-12)
    return out.view_as(x)


@torch.no_grad()
def _data_mean(data: Iterable, max_batches: int | None) -> Tensor:
    total: Tensor | None = None
    count = 0
    for x, _ in batches(data, max_batches=max_batches):
        total = x.double().sum(0) if total is None else total + x.double().sum(0)
        count += x.shape[0]
    if total is None:
        raise ValueError("compare_units: the data is empty")
    return (total / count).float()


def compare_units(
    models: Mapping[str, nn.Module],
    layer: str,
    units: Sequence[int] | int | None = None,
    *,
    data: Iterable | None = None,
    config: ActMaxConfig = ActMaxConfig(),
    k: int = 16,
    by: Literal["auto", "module", "group"] = "auto",
    dim: int | None = None,
    input_shape: Sequence[int] | None = None,
    max_batches: int | None = None,
) -> UnitComparison:
    """Act-max images (same seed, hence same starting noise, for every model) and top-k means of the same units.

    Args:
        models: name → model, all of one architecture (e.g. the output of :func:`endpoint_models`).
        layer, units, by, dim, input_shape: as in :func:`select_units`.
        data: batches for the top-k view (skipped when ``None``).
        config: act-max settings.
        k: examples per unit for the top-k view.
        max_batches: limit on batches for the top-k view.

    Returns:
        A :class:`UnitComparison`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> make = lambda s: (torch.manual_seed(s), nn.Sequential(nn.Flatten(), nn.Linear(9, 4), nn.ReLU()))[1]
        >>> ms = endpoint_models(make(0), make(1), example_input=torch.zeros(2, 1, 3, 3))
        >>> cmp = compare_units(ms, "1", [0, 1], config=ActMaxConfig(steps=5), input_shape=(1, 3, 3))
        >>> len(cmp.actmax), tuple(cmp.similarity("A", "merged").shape)
        (5, (2,))
    """
    if not models:
        raise ValueError("compare_units: no models")
    actmax: dict[str, ActMaxResult] = {}
    topk: dict[str, TopK] = {}
    sel: UnitSelection | None = None
    for name, model in models.items():
        sel = select_units(model, layer, units, by=by, dim=dim, input_shape=input_shape)
        actmax[name] = activation_maximization(model, sel, config)
        if data is not None:
            topk[name] = top_k_examples(model, sel, data, k, max_batches=max_batches)
        log.debug("compare_units: %s %s done", name, sel.module)
    assert sel is not None
    mean = _data_mean(data, max_batches) if data is not None else None
    return UnitComparison(sel.units, sel.module, actmax, topk, sel.input_shape, mean)


# Which pictures each model's pictures are compared with in tables and figure annotations.
DEFAULT_PARENTS: dict[str, tuple[str, ...]] = {
    "B'": ("A",),
    "merged": ("A", "B'"),
    "B": ("A",),
    "naive": ("A", "B"),
}


def similarity_rows(
    comparison: UnitComparison,
    views: Sequence[Literal["actmax", "topk"]] = ("actmax", "topk"),
    max_shift: int = 0,
) -> list[dict[str, Any]]:
    """Mean visual similarity of the aligned and the naive merge to their endpoints, one row per view and merge.

    Columns (each the mean over units of a per-unit Pearson correlation):

    * ``A↔merge``, ``B↔merge``: the merged unit vs each endpoint's unit (``B'`` for the aligned merge, ``B``
      for the naive one);
    * ``mix↔merge``: the merged unit vs the mean of the two (standardised) endpoint pictures. Not an independent
      test: r(x, a+b) = (r_xa + r_xb) / √(2(1 + r_ab)) fixes it from the other columns (the ``features`` study
      drops it and tests against an unmatched-unit null instead);
    * ``A↔B``: the two endpoint units averaged into the merged one (how much there was to preserve);
    * ``A↔A (other unit)``: unit ``i`` vs unit ``i-1`` of A, the floor that any two units of the layer reach.

    Needs models named as in :func:`endpoint_models`.
    """
    rows = []
    for view in views:
        if view == "topk" and not comparison.topk:
            continue
        pics = comparison.pictures(view, centered=True)
        a = pics["A"]
        floor = visual_similarity(a, a.roll(1, 0), max_shift).mean().item() if a.shape[0] > 1 else math.nan
        for merge, b, m in (("aligned", "B'", "merged"), ("naive", "B", "naive")):
            if m not in pics or b not in pics:
                continue
            rows.append(
                {
                    "view": view,
                    "merge": merge,
                    "A↔merge": comparison.similarity("A", m, view, max_shift).mean().item(),
                    "B↔merge": comparison.similarity(b, m, view, max_shift).mean().item(),
                    "mix↔merge": comparison.mix_similarity(m, "A", b, view, max_shift).mean().item(),
                    "A↔B": comparison.similarity("A", b, view, max_shift).mean().item(),
                    "A↔A (other unit)": floor,
                }
            )
    return rows


def _draw(ax: Any, pic: Tensor) -> None:
    """2-D input → image (channel mean, or RGB for 3 channels); 1-D input → one curve per channel."""
    if pic.ndim == 3:  # (C, H, W)
        if pic.shape[0] == 3:
            lo, hi = pic.min(), pic.max()
            ax.imshow(((pic - lo) / (hi - lo).clamp_min(1e-12)).permute(1, 2, 0).numpy())
        else:
            ax.imshow(pic.mean(0).numpy(), cmap="gray", interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
    elif pic.ndim == 2:  # (C, L)
        for c in range(pic.shape[0]):
            ax.plot(pic[c].numpy(), lw=1.2)
        ax.set_xticks([])
        ax.tick_params(labelsize=5)
    else:
        ax.plot(pic.flatten().numpy(), lw=1.2)
        ax.set_xticks([])


def plot_comparison(
    comparison: UnitComparison,
    path: str | Path,
    *,
    view: Literal["actmax", "topk"] = "actmax",
    columns: Sequence[str] | None = None,
    parents: Mapping[str, Sequence[str]] | None = None,
    max_units: int | None = None,
    title: str | None = None,
) -> Path:
    """One row per unit, one column per model; each panel notes its correlation with its parents' pictures.

    Args:
        comparison: from :func:`compare_units`.
        path: PNG file to write.
        view: ``"actmax"`` (optimised inputs) or ``"topk"`` (mean of the top-k dataset inputs).
        columns: model names in column order (default: all, in insertion order).
        parents: model → models it is compared with in the annotation (default :data:`DEFAULT_PARENTS`).
        max_units: draw only the first units.
        title: figure title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pics = comparison.pictures(view)
    cols = list(columns or pics)
    unknown = [c for c in cols if c not in pics]
    if unknown:
        raise ValueError(f"plot_comparison: unknown models {unknown}; models: {list(pics)}")
    parents = DEFAULT_PARENTS if parents is None else parents
    n_units = len(comparison.units) if max_units is None else min(max_units, len(comparison.units))
    sims = {(c, p): comparison.similarity(c, p, view) for c in cols for p in parents.get(c, ()) if p in pics}
    one_d = len(comparison.input_shape) == 2
    w, h = (1.9, 1.25) if one_d else (1.35, 1.5)
    fig, axes = plt.subplots(n_units, len(cols), figsize=(w * len(cols), h * n_units + 0.6), squeeze=False)
    for r in range(n_units):
        for j, c in enumerate(cols):
            ax = axes[r][j]
            _draw(ax, pics[c][r])
            notes = [f"{p}:{sims[(c, p)][r].item():+.2f}" for p in parents.get(c, ()) if (c, p) in sims]
            if notes:
                ax.set_xlabel("r " + " ".join(notes), fontsize=6, labelpad=1)
            if r == 0:
                ax.set_title(c, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"unit {comparison.units[r]}", fontsize=7)
    what = "activation maximisation" if view == "actmax" else "mean of top-k dataset inputs"
    fig.suptitle(title or f"{comparison.module}: {what}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
