"""Linear mode connectivity study: barriers naive vs weight matching vs activation matching (± REPAIR).

Expected shape of the results (Git Re-Basin; REPAIR): for MLPs the aligned barrier is near zero and shrinks
with width; the naive one stays large. For normalised nets, REPAIR / BatchNorm reset closes most of what
alignment leaves. Each (dataset, architecture, width, seed pair) is one job, so the study spreads over Ray.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mergelab.experiments.runner import Executor, register_study
from mergelab.report import Report, mean_std

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMCConfig:
    datasets: tuple[str, ...] = ("digits", "mnist1d")
    archs: tuple[str, ...] = ("mlp", "cnn", "resnet")
    # width multipliers relative to each architecture's base width (mlp 128, cnn 16, resnet ×1)
    widths: tuple[int, ...] = (1, 4)
    seed_pairs: int = 2
    epochs: int = 20
    lr: float = 3e-3
    steps: int = 11
    mnist1d_samples: int = 5000
    max_batches: int = 8  # batches of 256 for activation statistics / REPAIR per pass


_BASE_KWARGS: dict[str, Any] = {
    "mlp": lambda w: {"width": 128 * w, "depth": 3},
    "cnn": lambda w: {"width": 16 * w},
    "vgg": lambda w: {"width": 0.5 * w, "norm": "batchnorm"},
    "resnet": lambda w: {"width": w, "depth": 8, "norm": "batchnorm"},
}


def _model_kwargs(arch: str, width: int) -> dict[str, Any]:
    if arch not in _BASE_KWARGS:
        raise ValueError(f"lmc study: no width rule for arch {arch!r}; choose from {sorted(_BASE_KWARGS)}")
    return _BASE_KWARGS[arch](width)


def _load(dataset: str, samples: int) -> Any:
    from mergelab.data import load_dataset

    return load_dataset(dataset, num_samples=samples) if dataset == "mnist1d" else load_dataset(dataset)


def lmc_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train a seed pair, then measure the interpolation curves between them (top-level for Ray)."""
    from mergelab.analysis.interpolate import interpolate
    from mergelab.merge.aligned import align_to
    from mergelab.models import build_model
    from mergelab.train import TrainConfig, train

    torch.set_num_threads(1)
    data = _load(job["dataset"], job["samples"])
    kwargs = _model_kwargs(job["arch"], job["width"])
    models = []
    for seed in job["seeds"]:
        torch.manual_seed(seed)
        m = build_model(job["arch"], data.input_shape, data.num_classes, **kwargs)
        train(m, data.train, TrainConfig(epochs=job["epochs"], lr=job["lr"], data_seed=seed, progress=False))
        models.append(m)
    a, b = models
    train_loader = DataLoader(data.train, batch_size=256)
    test_loader = DataLoader(data.test, batch_size=512)
    has_bn = any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in a.modules())
    variants: dict[str, tuple[torch.nn.Module, str | None]] = {"naive": (b, None)}
    for method in ("weight_matching", "activation_matching"):
        aligned = align_to(a, b, method=method, data=train_loader, max_batches=job["max_batches"])
        variants[method] = (aligned, None)
        variants[f"{method} + {'reset' if has_bn else 'repair'}"] = (aligned, "reset" if has_bn else "repair")
        if has_bn:
            variants[f"{method} + repair"] = (aligned, "repair")
    curves = {}
    for name, (bb, fix) in variants.items():
        c = interpolate(
            a,
            bb,
            train_loader,
            steps=job["steps"],
            test_data=test_loader,
            repair=fix,
            max_batches=job["max_batches"] if fix else None,
        )
        curves[name] = c.to_dict() | {"loss_barrier": c.loss_barrier, "accuracy_barrier": c.accuracy_barrier}
    return {k: job[k] for k in ("dataset", "arch", "width", "seeds")} | {"curves": curves}


@register_study("lmc", LMCConfig)
def lmc(cfg: LMCConfig, out: Path, executor: Executor) -> Report:
    """Loss/accuracy barriers between independently trained models, before and after alignment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = Report(out, "Linear mode connectivity: naive vs aligned interpolation", config=vars(cfg))
    jobs = [
        dict(
            dataset=d,
            arch=a,
            width=w,
            seeds=(2 * p, 2 * p + 1),
            epochs=cfg.epochs,
            lr=cfg.lr,
            steps=cfg.steps,
            samples=cfg.mnist1d_samples,
            max_batches=cfg.max_batches,
        )
        for d in cfg.datasets
        for a in cfg.archs
        for w in cfg.widths
        for p in range(cfg.seed_pairs)
    ]
    results = executor.map(lmc_job, jobs, desc="seed pairs")
    report.text(
        "Two networks of the same architecture are trained from different seeds. We evaluate the models on the "
        "straight line between them in weight space, `θ(λ) = (1−λ)·θ_A + λ·θ_B'`, where `B'` is B itself "
        "(*naive*) or B with its hidden units permuted to line up with A's (weight matching: Git Re-Basin's "
        "coordinate descent on weight similarity; activation matching: one assignment per layer on activation "
        "correlations). *+ reset* recomputes BatchNorm statistics at each interior point, *+ repair* rescales "
        "every channel to the interpolated endpoints' mean and std (REPAIR). The **loss barrier** is the largest "
        "rise of the train loss above the straight line between the endpoint losses; the **accuracy barrier** "
        "the largest drop of train accuracy below the line. Values are mean ± std over seed pairs."
    )
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["arch"], r["width"]), []).append(r)
    rows = []
    for (d, a, w), rs in groups.items():
        for name in rs[0]["curves"]:
            lb = mean_std([r["curves"][name]["loss_barrier"] for r in rs])
            ab = mean_std([r["curves"][name]["accuracy_barrier"] for r in rs])
            mid = mean_std([_midpoint(r["curves"][name]["test_accuracy"]) for r in rs])
            rows.append(
                {
                    "dataset": d,
                    "arch": a,
                    "width ×": w,
                    "path": name,
                    "loss barrier": lb,
                    "accuracy barrier": ab,
                    "midpoint test acc": mid,
                }
            )
    report.heading("Barriers")
    report.table(rows, digits=3)
    report.metrics["rows"] = rows
    report.metrics["results"] = results

    report.heading("Curves")
    for (d, a, w), rs in groups.items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for name, c in rs[0]["curves"].items():
            axes[0].plot(c["lambdas"], c["train_loss"], marker=".", label=name)
            axes[1].plot(c["lambdas"], c["test_accuracy"], marker=".", label=name)
        axes[0].set(xlabel="λ", ylabel="train loss", title=f"{a} ×{w} on {d}")
        axes[1].set(xlabel="λ", ylabel="test accuracy")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"curve-{d}-{a}-w{w}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        report.figure(path, f"{a} ×{w} on {d}: interpolation curves (first seed pair)")
    _width_plot(report, rows, out, plt)
    return report


def _midpoint(values: list[float]) -> float:
    return float(values[len(values) // 2])


def _width_plot(report: Report, rows: list[dict[str, Any]], out: Path, plt: Any) -> None:
    keys = sorted({(r["dataset"], r["arch"]) for r in rows})
    widths = sorted({r["width ×"] for r in rows})
    if len(widths) < 2:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    for ax, (d, a) in zip(axes[0], keys, strict=True):
        paths = sorted({r["path"] for r in rows if r["dataset"] == d and r["arch"] == a})
        for p in paths:
            ys = [
                next(
                    r["loss barrier"][0]
                    for r in rows
                    if (r["dataset"], r["arch"], r["width ×"], r["path"]) == (d, a, w, p)
                )
                for w in widths
            ]
            ax.plot(widths, ys, marker="o", label=p)
        ax.set(xlabel="width ×", ylabel="loss barrier", title=f"{a} / {d}", xscale="log")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    path = out / "barrier-vs-width.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    report.figure(path, "Loss barrier against width: alignment closes the barrier, more so for wider nets")
