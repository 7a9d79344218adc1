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

Layout: units (selection, reading, top-k, correlation) live in :mod:`mergelab.analysis.units`, activation
maximisation and the Fourier parameterisation in :mod:`mergelab.analysis.actmax`; this module holds the
endpoint-vs-merge comparison and re-exports the rest, so ``mergelab.analysis.feature_vis`` is the one import.

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
import itertools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mergelab.analysis.actmax import (
    ActMaxConfig,
    ActMaxResult,
    activation_maximization,
    fourier_scale,
    image_to_spectrum,
    spectrum_to_image,
)
from mergelab.analysis.units import (
    TopK,
    UnitSelection,
    select_units,
    top_k_examples,
    unit_activations,
    unit_correlation,
)
from mergelab.evaluation import batches

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
        for shifts in itertools.product(*ranges):
            best = torch.maximum(best, visual_similarity(x, torch.roll(y, shifts, spatial_axes)))
        return best
    a = x.flatten(1).double()
    b = y.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return ((a * b).sum(1) / den).float()


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
    config: ActMaxConfig = ActMaxConfig(),  # noqa: B008 (a frozen dataclass: immutable)
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
