"""Weight patterns: first-layer weights drawn as the inputs they respond to, next to per-class mean inputs.

The rows of a linear classifier, reshaped to the input shape, look like class "templates": roughly the mean
input of the class minus the mean of all classes. Wang et al. (2024) read weight averaging through this lens:
averaging two models averages their templates, which helps when the templates agree (same classes, same basis)
and blurs them when they do not (independently trained hidden units sit in different orders). This module
makes those pictures and the numbers behind them:

* :func:`class_means` and :func:`weight_templates` — the two things compared;
* :func:`template_correlation` — Pearson correlation between each template and each class mean;
* :func:`class_template_figure` — class means beside per-class templates of several models and their average;
* :func:`unit_template_figure` — first-layer units (hidden units or conv kernels) of two or more models, their
  naive average and their average after aligning every model to model 0 (:func:`mergelab.merge.aligned.align_to`,
  weight matching: the alignment a merge uses);
* :func:`template_mix_figure` — the average of two class templates beside the average of the two class means.

Every figure function returns a :class:`FigureResult` (PNG path, panel count, numbers). Digits give 8×8
images, MNIST-1D gives curves of length 40, conv kernels give small images or curves.

Paper: Wang et al., "Rethinking Weight-Averaged Model-merging", 2024, https://arxiv.org/abs/2411.09263.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from mergelab.evaluation import batches, eval_mode

__all__ = [
    "FigureResult",
    "class_means",
    "class_template_figure",
    "first_layer",
    "plot_pattern_rows",
    "template_correlation",
    "template_mix_figure",
    "unit_template_figure",
    "unit_template_stats",
    "weight_templates",
]

log = logging.getLogger(__name__)


@dataclass
class FigureResult:
    """A saved figure and what it shows.

    Attributes:
        path: the PNG file.
        n_panels: number of axes in the figure (counted before saving).
        numbers: the figure's numbers (correlations, accuracies, ...), JSON-able.
    """

    path: Path
    n_panels: int
    numbers: dict[str, Any] = field(default_factory=dict)


# -- the two things compared ---------------------------------------------------------------------------------


@torch.no_grad()
def class_means(data: Dataset | Iterable, num_classes: int | None = None) -> torch.Tensor:
    """Mean input of every class, ``(K, *input_shape)`` (zeros for a class with no samples).

    Args:
        data: a ``TensorDataset(x, y)`` or a loader of ``(x, y)`` batches.
        num_classes: ``K``; defaults to ``max(y) + 1``.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 0, 1]))
        >>> class_means(ds).squeeze(1).tolist()
        [2.0, 5.0]
    """
    loader: Iterable = [(data.tensors[0], data.tensors[1])] if isinstance(data, TensorDataset) else data
    sums: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    for x, y in batches(loader):
        if y is None:
            raise ValueError("class_means: the data yields no labels; it must yield (x, y)")
        k = int(num_classes) if num_classes is not None else int(y.max()) + 1
        if sums is None:
            sums = torch.zeros(k, *x.shape[1:], dtype=torch.float64)
            counts = torch.zeros(k, dtype=torch.float64)
        if int(y.max()) >= sums.shape[0]:
            raise ValueError(f"class_means: label {int(y.max())} >= num_classes {sums.shape[0]}")
        sums.index_add_(0, y, x.double())
        counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    if sums is None or counts is None:
        raise ValueError("class_means: the data is empty")
    shape = (-1,) + (1,) * (sums.ndim - 1)
    return (sums / counts.clamp_min(1).view(shape)).float()


def first_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The first ``nn.Linear`` or convolution in module order, with its name (e.g. ``"layers.0"``).

    For a zoo MLP with ``depth=0`` this is the ``head``: the linear classifier itself.
    """
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return name, m
    raise ValueError(f"first_layer: {type(model).__name__} has no nn.Linear or convolution")


def weight_templates(model: nn.Module, input_shape: Sequence[int] | None = None) -> torch.Tensor:
    """The first layer's weights, one entry per output unit, shaped like what the unit reads.

    A ``Linear`` first layer gives ``(units, *input_shape)`` (each row reshaped to the input); a convolution
    gives its kernels ``(out, in, *kernel)``.

    Args:
        model: any model; zoo models know their input shape (``model.input_shape``).
        input_shape: the input shape without batch, if the model does not record it.

    Example:
        >>> from mergelab.models import build_model
        >>> m = build_model("mlp", (1, 8, 8), 10, depth=0)
        >>> tuple(weight_templates(m).shape)
        (10, 1, 8, 8)
    """
    name, layer = first_layer(model)
    w = layer.weight.detach().clone()
    if isinstance(layer, nn.Linear):
        shape = _input_shape(model, input_shape)
        if math.prod(shape) != w.shape[1]:
            raise ValueError(
                f"weight_templates: {name!r}.weight {tuple(w.shape)} reads {w.shape[1]} inputs, "
                f"but input_shape {tuple(shape)} has {math.prod(shape)}"
            )
        return w.view(w.shape[0], *shape)  # (units, *input_shape)
    return w  # (out, in, *kernel)


def template_correlation(templates: torch.Tensor, means: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Pearson correlation between every template and every class mean, ``(U, K)``.

    With ``center`` (default), the mean over templates and the mean over classes are first subtracted: a
    softmax classifier is unchanged by adding one vector to every class's weights, so only the templates'
    differences are meaningful, and they should match the class means' differences.

    Example:
        >>> import torch
        >>> m = torch.randn(4, 1, 8, 8)
        >>> c = template_correlation(3 * m, m)
        >>> bool(torch.allclose(c.diagonal(), torch.ones(4), atol=1e-5))
        True
    """
    t = templates.reshape(templates.shape[0], -1).double()
    m = means.reshape(means.shape[0], -1).double()
    if t.shape[1] != m.shape[1]:
        raise ValueError(
            f"template_correlation: templates {tuple(templates.shape)} vs means {tuple(means.shape)}"
        )
    if center:
        t = t - t.mean(0, keepdim=True)
        m = m - m.mean(0, keepdim=True)
    t = t - t.mean(1, keepdim=True)
    m = m - m.mean(1, keepdim=True)
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (t @ m.T).float()


# -- figures -------------------------------------------------------------------------------------------------


def plot_pattern_rows(
    rows: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    col_titles: Sequence[str] | None = None,
    row_notes: Mapping[str, str] | None = None,
    title: str | None = None,
) -> FigureResult:
    """A grid with one row per entry of ``rows`` and one column per unit/class.

    Each entry is ``(U, *shape)``: ``(U, 1, H, W)`` or ``(U, H, W)`` are drawn as images (blue-white-red,
    symmetric around zero per panel), ``(U, C, L)`` or ``(U, L)`` as curves (one line per channel).
    Rows may have different numbers of columns.

    Returns:
        A :class:`FigureResult` whose ``n_panels`` counts the drawn panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("plot_pattern_rows: no rows to draw")
    n_rows = len(rows)
    n_cols = max(int(t.shape[0]) for t in rows.values())
    left, top = 1.6, 0.75 if title else 0.4  # inches for row labels and titles
    width, height = 1.2 * n_cols + left + 0.1, 1.3 * n_rows + top + 0.1
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, height), squeeze=False)
    # Fixed margins instead of tight_layout: as readable here and much faster with many small panels.
    fig.subplots_adjust(
        left=left / width,
        right=1 - 0.1 / width,
        bottom=0.1 / height,
        top=1 - top / height,
        wspace=0.15,
        hspace=0.35,
    )
    for r, (label, stack) in enumerate(rows.items()):
        stack = stack.detach().float().cpu()
        for c in range(n_cols):
            ax = axes[r][c]
            if c >= stack.shape[0]:
                fig.delaxes(ax)
                continue
            _draw_panel(ax, stack[c])
            if r == 0 and col_titles is not None and c < len(col_titles):
                ax.set_title(col_titles[c], fontsize=9)
        note = (row_notes or {}).get(label, "")
        axes[r][0].set_ylabel(
            label + (f"\n{note}" if note else ""), fontsize=8, rotation=0, ha="right", va="center", labelpad=4
        )
    if title:
        fig.suptitle(title, fontsize=10)
    n_panels = len(fig.axes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return FigureResult(path, n_panels)


def class_template_figure(
    models: Mapping[str, nn.Module],
    data: Dataset | Iterable,
    path: str | Path,
    *,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    average: bool = True,
) -> FigureResult:
    """Class means beside the per-class templates of linear classifiers and of their weight average.

    The models must have one first-layer unit per class (a linear classifier, e.g. a zoo MLP with
    ``depth=0``). For such models naive and aligned averages coincide: the classes fix the order of units.

    Args:
        models: name → linear classifier (same shapes).
        data: labelled data for the class means (e.g. the train split).
        path: PNG file to write.
        num_classes: number of classes ``K``.
        class_names: column titles (default ``0..K-1``).
        average: add a row with the templates of the uniform weight average of all models.

    Rows: raw class means, centred class means (what the templates should resemble), one row per model,
    and the weight average.

    Returns:
        :class:`FigureResult`; ``numbers`` holds, per row, ``diag_corr`` (mean correlation of each class's
        template with its own class mean, both centred), ``own_class_best`` (share of templates that correlate
        best with their own class) and the full correlation matrix.
    """
    means = class_means(data, num_classes)
    templates = {name: weight_templates(m) for name, m in models.items()}
    for name, t in templates.items():
        if t.shape[0] != num_classes:
            raise ValueError(
                f"class_template_figure: model {name!r} has {t.shape[0]} first-layer units, not one per "
                f"class ({num_classes}); use unit_template_figure for hidden units"
            )
    if average and len(templates) > 1:
        shapes = {tuple(t.shape) for t in templates.values()}
        if len(shapes) > 1:
            raise ValueError(f"class_template_figure: templates differ in shape {sorted(shapes)}")
        templates["weight average"] = torch.stack(list(templates.values())).mean(0)
    numbers: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for name, t in templates.items():
        corr = template_correlation(t, means)
        diag = corr.diagonal()
        numbers[name] = {
            "diag_corr": float(diag.mean()),
            "own_class_best": float((corr.argmax(1) == torch.arange(num_classes)).float().mean()),
            "corr": corr.tolist(),
        }
        notes[name] = f"r={float(diag.mean()):.2f}"
    # The templates should look like the centred means (a class's mean minus the mean over classes).
    rows = {
        "class mean": means,
        "class mean\n− mean of all": means - means.mean(0, keepdim=True),
        **templates,
    }
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    res = plot_pattern_rows(
        rows,
        path,
        col_titles=names,
        row_notes=notes,
        title="Class means vs linear-classifier templates (r: mean corr. with own class)",
    )
    res.numbers = numbers
    return res


def unit_template_stats(models: Sequence[nn.Module]) -> dict[str, Any]:
    """How much two or more models' first-layer units agree, before and after matching them to model 0's.

    Returns:
        ``corr_naive``/``corr_aligned``: mean correlation between model 0's units and the other models' units
        (unit ``j`` with unit ``j``, then after aligning to model 0); ``norm_ratio_naive``/
        ``norm_ratio_aligned``: norm of the averaged units over the mean norm of the members' units (close to
        1 when units agree, lower when averaging cancels them); ``units``: number of units.

    Example:
        >>> from mergelab.models import build_model
        >>> m = build_model("mlp", (1, 8, 8), 10, width=8, depth=1)
        >>> unit_template_stats([m, m])["norm_ratio_naive"]
        1.0
    """
    return _unit_stats(*_unit_templates(models))


def _unit_stats(temps: list[torch.Tensor], aligned: list[torch.Tensor]) -> dict[str, Any]:
    naive_avg = torch.stack(temps).mean(0)
    aligned_avg = torch.stack(aligned).mean(0)

    def mean_corr(ts: list[torch.Tensor]) -> float:
        vals = [template_correlation(ts[0], t, center=False).diagonal().mean() for t in ts[1:]]
        return float(torch.stack(vals).mean())

    def norm_ratio(avg: torch.Tensor) -> float:
        member = torch.stack([t.flatten(1).norm(dim=1) for t in temps]).mean()
        return round(float(avg.flatten(1).norm(dim=1).mean() / member.clamp_min(1e-12)), 6)

    return {
        "corr_naive": mean_corr(temps),
        "corr_aligned": mean_corr(aligned),
        "norm_ratio_naive": norm_ratio(naive_avg),
        "norm_ratio_aligned": norm_ratio(aligned_avg),
        "units": int(temps[0].shape[0]),
    }


def unit_template_figure(
    models: Sequence[nn.Module],
    path: str | Path,
    *,
    names: Sequence[str] | None = None,
    n_units: int = 10,
) -> FigureResult:
    """First-layer units of several models, their naive average, and their average after aligning the models.

    Unit ``j`` of the naive average averages unit ``j`` of every model; the matched average first re-expresses
    every model in model 0's unit basis (:func:`mergelab.merge.aligned.align_to`, weight matching over the
    whole network, as a merge does). Independently trained models order their hidden units arbitrarily, so the
    naive average blurs templates and the matched one keeps them; models from one initialisation or one
    pretrained base need no matching.

    Args:
        models: two or more models of one architecture.
        path: PNG file to write.
        names: row labels for the models.
        n_units: number of units drawn (the first ``n_units`` of model 0's order).

    Returns:
        :class:`FigureResult` with the numbers of :func:`unit_template_stats`; the models' rows are drawn
        after matching, so the columns line up.
    """
    models = list(models)
    temps, aligned = _unit_templates(models)
    numbers = _unit_stats(temps, aligned)
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    k = min(n_units, temps[0].shape[0])
    rows = {name: aligned[i][:k] for i, name in enumerate(names)}
    rows["naive average"] = torch.stack(temps).mean(0)[:k]
    rows["matched average"] = torch.stack(aligned).mean(0)[:k]
    notes = {
        "naive average": f"|avg|/|w|={numbers['norm_ratio_naive']:.2f}",
        "matched average": f"|avg|/|w|={numbers['norm_ratio_aligned']:.2f}",
    }
    res = plot_pattern_rows(
        rows,
        path,
        col_titles=[f"unit {j}" for j in range(k)],
        row_notes=notes,
        title="First-layer units (models shown after matching to model 0)",
    )
    res.numbers = numbers
    return res


def _unit_templates(models: Sequence[nn.Module]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    models = list(models)
    if len(models) < 2:
        raise ValueError("unit_template_figure: needs at least two models")
    temps = [weight_templates(m) for m in models]
    for i, t in enumerate(temps[1:], start=1):
        if t.shape != temps[0].shape:
            raise ValueError(
                f"unit_template_figure: first-layer weights {tuple(t.shape)} in model {i} vs "
                f"{tuple(temps[0].shape)} in model 0"
            )
    from mergelab.merge.aligned import align_to

    aligned = [temps[0]] + [weight_templates(align_to(models[0], m)) for m in models[1:]]
    return temps, aligned


@torch.no_grad()
def template_mix_figure(
    model: nn.Module,
    data: Dataset | Iterable,
    pairs: Sequence[tuple[int, int]],
    path: str | Path,
    *,
    num_classes: int,
) -> FigureResult:
    """For class pairs ``(a, b)``: templates a, b and their average beside class means a, b and their average.

    Templates and means are drawn centred (minus their mean over classes), the part a softmax classifier uses.

    Averaging two templates gives a template for "a or b", the way averaging inputs gives a mixup input. The
    numbers say how well the mixed template matches the mixed mean, and what the linear classifier predicts
    for the mixed mean input (probability on ``a`` and on ``b``).

    Returns:
        :class:`FigureResult` with one row per pair and, in ``numbers[f"{a}+{b}"]``: ``corr_mix`` (mixed
        template vs mixed mean), ``p_a``/``p_b`` (softmax of the model on the mixed mean input).
    """
    means = class_means(data, num_classes)
    temps = weight_templates(model)
    if temps.shape[0] != num_classes:
        raise ValueError(
            f"template_mix_figure: the model's first layer has {temps.shape[0]} units, not one per class "
            f"({num_classes}); use a linear classifier"
        )
    centred_t = temps - temps.mean(0, keepdim=True)
    centred_m = means - means.mean(0, keepdim=True)
    rows: dict[str, torch.Tensor] = {}
    numbers: dict[str, Any] = {}
    with eval_mode(model):
        for a, b in pairs:
            if not (0 <= a < num_classes and 0 <= b < num_classes):
                raise ValueError(
                    f"template_mix_figure: pair ({a}, {b}) out of range for {num_classes} classes"
                )
            mix_m = (means[a] + means[b]) / 2
            shown = [centred_t[a], centred_t[b], (centred_t[a] + centred_t[b]) / 2]
            shown += [centred_m[a], centred_m[b], (centred_m[a] + centred_m[b]) / 2]
            rows[f"{a}+{b}"] = torch.stack(shown)
            corr = template_correlation(
                ((centred_t[a] + centred_t[b]) / 2)[None],
                ((centred_m[a] + centred_m[b]) / 2)[None],
                center=False,
            )
            p = torch.softmax(model(mix_m[None]), dim=-1)[0]
            numbers[f"{a}+{b}"] = {"corr_mix": float(corr[0, 0]), "p_a": float(p[a]), "p_b": float(p[b])}
    cols = ["template a", "template b", "avg template", "mean a", "mean b", "avg mean"]  # all centred
    res = plot_pattern_rows(
        rows, path, col_titles=cols, title="Mixing two class templates vs mixing two classes"
    )
    res.numbers = numbers
    return res


# -- helpers -------------------------------------------------------------------------------------------------


def _input_shape(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    shape = getattr(model, "input_shape", None)
    if shape is None:
        spec = getattr(model, "mergelab_spec", None)
        shape = spec.get("input_shape") if isinstance(spec, dict) else None
    if shape is None:
        raise ValueError(
            f"weight_templates: {type(model).__name__} records no input_shape; pass input_shape="
        )
    return tuple(int(s) for s in shape)


def _draw_panel(ax: Any, item: torch.Tensor) -> None:
    arr = item.numpy()
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:  # several input channels: show their mean
        arr = arr.mean(0)
    if arr.ndim == 2 and min(arr.shape) > 1:
        lim = float(np.abs(arr).max()) or 1.0
        ax.imshow(arr, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    else:
        curves = arr.reshape(-1, arr.shape[-1])
        for curve in curves:
            ax.plot(curve, lw=1.0)
        ax.axhline(0.0, color="0.7", lw=0.5)
    ax.set_xticks([])
    ax.set_yticks([])
