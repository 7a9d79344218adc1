"""Prediction stability under parameter scaling: how soups and ensembles react when members' weights grow.

Wang et al. (2024) multiply all tensors of some members by 100 and compare what happens to a weight average
(the scaled members dominate the average, but the average of a few large and many small weights is still one
network) with an ensemble (the scaled members' outputs dominate the vote). Scaling is not harmless even for a
single network: in a ReLU net with biases, multiplying every tensor by ``c`` multiplies layer ``l``'s
activations by ``c^l`` but its bias only by ``c``, so biases fade and predictions change; normalisation layers
undo part of the scaling. Only bias-free ReLU nets (and linear models) keep their argmax exactly.

* :func:`scale_model` / :func:`noise_model` / :func:`perturb` — one perturbed copy of a model;
* :func:`perturb_members` — perturb one, some or all members of a pool;
* :func:`prediction_metrics` — accuracy, NLL, agreement with the unperturbed predictions, and flip rate;
* :func:`stability_curve` — those metrics for several "systems" (single model, soup, greedy soup, ensembles)
  built from a pool whose members are perturbed more and more;
* :func:`plot_stability` — the curves as one PNG.

Paper: Wang et al., "Rethinking Weight-Averaged Model-merging", 2024, https://arxiv.org/abs/2411.09263.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.analysis.weight_patterns import FigureResult
from mergelab.evaluation import batches, predict_logits

__all__ = [
    "METRICS",
    "PERTURBATIONS",
    "SystemFn",
    "noise_model",
    "perturb",
    "perturb_members",
    "plot_stability",
    "prediction_metrics",
    "resolve_layers",
    "scale_model",
    "select_members",
    "stability_curve",
]

SystemFn = Callable[[list[nn.Module]], nn.Module]
Kind = Literal["scale", "noise"]
PERTURBATIONS: tuple[str, ...] = ("scale", "noise")
METRICS: tuple[str, ...] = ("accuracy", "nll", "agreement", "flip_rate")


def resolve_layers(model: nn.Module, layers: str | Sequence[str] | None) -> list[str] | None:
    """Tensor-name prefixes for ``layers``: ``None`` (all), ``"head"``, ``"first"`` or explicit prefixes.

    ``"first"`` is the first module holding a ``weight`` in module order (e.g. ``layers.0`` of an MLP).
    """
    if layers is None:
        return None
    if layers == "head":
        if not isinstance(getattr(model, "head", None), nn.Module):
            raise ValueError(f"resolve_layers: {type(model).__name__} has no 'head' module")
        return ["head."]
    if layers == "first":
        for name, m in model.named_modules():
            if name and isinstance(getattr(m, "weight", None), torch.Tensor):
                return [name + "."]
        raise ValueError(f"resolve_layers: {type(model).__name__} has no module with a weight")
    prefixes = [layers] if isinstance(layers, str) else list(layers)
    names = list(model.state_dict())
    for p in prefixes:
        if not any(n.startswith(p) for n in names):
            raise ValueError(f"resolve_layers: no tensor of {type(model).__name__} starts with {p!r}")
    return prefixes


def _selected(name: str, prefixes: list[str] | None) -> bool:
    return prefixes is None or any(name.startswith(p) for p in prefixes)


def scale_model(
    model: nn.Module,
    factor: float,
    *,
    layers: str | Sequence[str] | None = None,
    include_buffers: bool = True,
) -> nn.Module:
    """A copy of ``model`` with every floating-point tensor (or those of ``layers``) multiplied by ``factor``.

    Args:
        model: the model (untouched).
        factor: the multiplier (any float; 1 changes nothing).
        layers: ``None`` = all tensors, ``"head"``, ``"first"`` or tensor-name prefixes (see
            :func:`resolve_layers`).
        include_buffers: also scale floating buffers (BatchNorm running statistics), as the paper's code does
            by scaling the whole ``state_dict``; integer buffers are never scaled.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Linear(3, 2)
        >>> torch.allclose(scale_model(m, 10.0).weight, 10 * m.weight)
        True
    """
    prefixes = resolve_layers(model, layers)
    params = {n for n, _ in model.named_parameters()}
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        scale = v.is_floating_point() and _selected(k, prefixes) and (include_buffers or k in params)
        out[k] = v * factor if scale else v.clone()
    new = copy.deepcopy(model)
    new.load_state_dict(out)
    return new


def noise_model(
    model: nn.Module,
    sigma: float,
    *,
    seed: int = 0,
    layers: str | Sequence[str] | None = None,
) -> nn.Module:
    """A copy of ``model`` whose parameters are multiplied by ``1 + sigma * N(0, 1)`` noise, entry by entry.

    Multiplicative noise keeps each tensor's scale, so ``sigma`` is comparable across layers. Buffers are
    left alone. The noise is drawn from a private generator seeded with ``seed``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Linear(3, 2)
        >>> torch.equal(noise_model(m, 0.0).weight, m.weight)
        True
    """
    if sigma < 0:
        raise ValueError(f"noise_model: sigma must be >= 0, got {sigma}")
    prefixes = resolve_layers(model, layers)
    gen = torch.Generator().manual_seed(int(seed))
    new = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in new.named_parameters():
            if p.is_floating_point() and _selected(name, prefixes):
                eps = torch.randn(p.shape, generator=gen, dtype=p.dtype)
                p.mul_(1.0 + sigma * eps)
    return new


def perturb(
    model: nn.Module, kind: Kind, level: float, *, layers: str | Sequence[str] | None = None, seed: int = 0
) -> nn.Module:
    """``scale_model(model, level)`` for ``kind="scale"``, ``noise_model(model, level)`` for ``"noise"``."""
    if kind == "scale":
        return scale_model(model, level, layers=layers)
    if kind == "noise":
        return noise_model(model, level, seed=seed, layers=layers)
    raise ValueError(f"perturb: unknown kind {kind!r}; use one of {list(PERTURBATIONS)}")


def select_members(n: int, members: str | Sequence[int]) -> list[int]:
    """Indices of the members to perturb.

    ``"all"``, ``"one"`` (member 0), ``"all_but_one"`` (all but the last), ``"none"``, or explicit indices.

    Example:
        >>> select_members(4, "all_but_one")
        [0, 1, 2]
    """
    if isinstance(members, str):
        if members == "all":
            return list(range(n))
        if members == "one":
            return [0]
        if members == "all_but_one":
            return list(range(n - 1))
        if members == "none":
            return []
        raise ValueError(
            f"select_members: unknown selection {members!r}; use all, one, all_but_one, none or indices"
        )
    idx = [int(i) for i in members]
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ValueError(f"select_members: indices {bad} out of range for {n} members")
    return idx


def perturb_members(
    models: Sequence[nn.Module],
    kind: Kind,
    level: float,
    *,
    members: str | Sequence[int] = "all",
    layers: str | Sequence[str] | None = None,
    seed: int = 0,
) -> list[nn.Module]:
    """The pool with the selected members perturbed (new copies) and the others as given.

    Noise uses seed ``seed + i`` for member ``i`` so members get different noise.
    """
    chosen = set(select_members(len(models), members))
    return [
        perturb(m, kind, level, layers=layers, seed=seed + i) if i in chosen else m
        for i, m in enumerate(models)
    ]


def prediction_metrics(
    logits: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor
) -> dict[str, float]:
    """Accuracy, NLL, agreement and flip rate of ``logits`` against the labels and a reference prediction.

    Args:
        logits: ``(N, C)`` outputs (log-probabilities work too: NLL is computed after ``log_softmax``).
        labels: ``(N,)`` true classes.
        reference: ``(N, C)`` outputs of the unperturbed system.

    Returns:
        ``accuracy``; ``nll`` (mean cross-entropy, in float64 so large logits stay finite; NaN when the logits
        are not finite); ``agreement`` (share of samples whose argmax equals the reference's); ``flip_rate``
        (share of samples the reference got right and this gets wrong — "negative flips").

    Example:
        >>> import torch
        >>> z = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> prediction_metrics(z, torch.tensor([0, 1]), z)["agreement"]
        1.0
    """
    if logits.shape != reference.shape or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"prediction_metrics: logits {tuple(logits.shape)}, reference {tuple(reference.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    pred, ref = logits.argmax(-1), reference.argmax(-1)
    correct, ref_correct = pred == labels, ref == labels
    z = logits.double()
    nll = F.cross_entropy(z, labels).item() if torch.isfinite(z).all() else math.nan
    return {
        "accuracy": correct.double().mean().item(),
        "nll": nll,
        "agreement": (pred == ref).double().mean().item(),
        "flip_rate": (ref_correct & ~correct).double().mean().item(),
    }


def stability_curve(
    systems: Mapping[str, SystemFn],
    models: Sequence[nn.Module],
    data: Iterable,
    levels: Sequence[float],
    *,
    kind: Kind = "scale",
    members: str | Sequence[int] = "all",
    layers: str | Sequence[str] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Metrics of several systems built from a pool whose selected members are perturbed at each level.

    Args:
        systems: name → function building a model from the (perturbed) pool, e.g. ``lambda ms: ms[0]``
            (single model), ``lambda ms: merge(ms)`` (uniform soup), ``lambda ms: Ensemble(ms)``.
        models: the pool.
        data: test loader of ``(x, y)`` batches.
        levels: scale factors (``kind="scale"``) or noise sizes (``kind="noise"``).
        kind: ``"scale"`` or ``"noise"``.
        members: which members are perturbed (see :func:`select_members`).
        layers: which tensors (see :func:`resolve_layers`).
        seed: noise seed.

    Returns:
        One row per (system, level): ``system``, ``level``, ``kind``, ``members`` and :data:`METRICS`,
        compared with the same system built from the unperturbed pool.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> data = [(torch.randn(16, 3), torch.randint(0, 2, (16,)))]
        >>> rows = stability_curve({"single": lambda ms: ms[0]}, [nn.Linear(3, 2)], data, [1.0, 10.0])
        >>> [r["agreement"] for r in rows]
        [1.0, 1.0]
    """
    models = list(models)
    labels = torch.cat([_labels(y) for _, y in batches(data)])
    label = members if isinstance(members, str) else ",".join(map(str, members))
    references = {name: predict_logits(build(models), data) for name, build in systems.items()}
    rows: list[dict[str, Any]] = []
    for level in levels:
        # One perturbed pool per level, shared by every system, so they are compared on the same weights.
        pool = perturb_members(models, kind, float(level), members=members, layers=layers, seed=seed)
        for name, build in systems.items():
            logits = predict_logits(build(pool), data)
            rows.append(
                {
                    "system": name,
                    "kind": kind,
                    "members": label,
                    "level": float(level),
                    **prediction_metrics(logits, labels, references[name]),
                }
            )
    order = {name: i for i, name in enumerate(systems)}
    rows.sort(key=lambda r: order[r["system"]])  # stable: grouped by system, levels in the given order
    return rows


def plot_stability(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    metrics: Sequence[str] = ("accuracy", "nll", "agreement"),
    title: str | None = None,
) -> FigureResult:
    """One row of panels per perturbation (``curves`` key), one column per metric, one line per system.

    Scale curves use a log x-axis; NLL a log y-axis when it spans more than a factor 20. Ensembles are drawn
    dashed. Missing (NaN) points are simply not drawn.

    Returns:
        :class:`FigureResult` with ``n_panels = len(curves) * len(metrics)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("plot_stability: no curves")
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"plot_stability: unknown metric {m!r}; choose from {list(METRICS)}")
    n_rows, n_cols = len(curves), len(metrics)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.0 * n_cols, 2.8 * n_rows + 0.6), squeeze=False)
    handles: dict[str, Any] = {}
    for r, (label, rows) in enumerate(curves.items()):
        systems = list(dict.fromkeys(row["system"] for row in rows))
        kind = rows[0]["kind"] if rows else "scale"
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            for s in systems:
                pts = sorted((row["level"], row[metric]) for row in rows if row["system"] == s)
                xs = [p[0] for p in pts]
                ys = [p[1] for p in pts]
                style = "--" if "ens" in s else "-"  # ensembles dashed, single models and soups solid
                (h,) = ax.plot(xs, ys, marker="o", ms=3, lw=1.4, label=s, linestyle=style)
                handles.setdefault(s, h)
            if kind == "scale":
                ax.set_xscale("log")
            finite = [r["nll"] for r in rows if isinstance(r["nll"], float) and math.isfinite(r["nll"])]
            if metric == "nll" and finite and min(finite) > 0 and max(finite) / min(finite) > 20:
                ax.set_yscale("log")
            if metric in ("accuracy", "agreement", "flip_rate"):
                ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("scale factor" if kind == "scale" else "noise size σ", fontsize=8)
            ax.set_title(f"{label}: {metric}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=min(len(handles), 5),
        fontsize=8,
        frameon=False,
    )
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(handles) > 5), 1, 0.97 if title else 1))
    n_panels = len(fig.axes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return FigureResult(path, n_panels)


def _labels(y: torch.Tensor | None) -> torch.Tensor:
    if y is None:
        raise ValueError("stability_curve: the loader yields no labels; it must yield (x, y)")
    return y
