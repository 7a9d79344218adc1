"""The demo study: two independently trained models, merged several ways, measured and explained.

It trains ``seeds`` models (one job each, locally or on Ray), then compares each merge method on the test set
against the endpoints and their output ensemble, and draws the linear-interpolation curves between the
endpoints (naive and aligned). Everything lands in one run folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from mergelab.evaluation import evaluate
from mergelab.experiments._training import MODELS, DataSpec, ModelSpec, TrainJob, run_train_job
from mergelab.experiments.runner import Executor, register_study
from mergelab.report import Report
from mergelab.train import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    dataset: str = "digits"
    arch: str = "mlp"
    width: int = 256
    depth: int = 3
    epochs: int = 30
    lr: float = 1e-3
    seeds: tuple[int, ...] = (0, 1)
    # "METHOD+repair" / "METHOD+reset" add REPAIR / a BatchNorm reset after the merge
    methods: tuple[str, ...] = (
        "average",
        "weight_matching",
        "weight_matching+repair",
        "activation_matching",
        "zipit",
    )
    interpolation_steps: int = 11


@register_study("demo", DemoConfig)
def demo(cfg: DemoConfig, out: Path, executor: Executor) -> Report:
    """Train two seeds, merge them with each method, compare with the endpoints and their ensemble."""
    import matplotlib

    matplotlib.use("Agg")
    from mergelab.data import load_dataset
    from mergelab.io import save
    from mergelab.merge import merge

    report = Report(
        out, f"mergelab demo: merging {len(cfg.seeds)} {cfg.arch}s trained on {cfg.dataset}", config=vars(cfg)
    )
    data = load_dataset(cfg.dataset)
    model_kwargs: dict[str, Any] = {"width": cfg.width, "depth": cfg.depth} if cfg.arch == "mlp" else {}
    jobs = [
        TrainJob(
            name=f"seed{s}",
            data=DataSpec(cfg.dataset),
            model=ModelSpec(cfg.arch, model_kwargs),
            train=TrainConfig(epochs=cfg.epochs, lr=cfg.lr, data_seed=s, progress=False),
            init_seed=s,
            evaluate=True,
            device="cpu",
        ).at(out)
        for s in cfg.seeds
    ]
    executor.map(run_train_job, jobs, desc="train members")
    models = [job.load() for job in jobs]
    train_loader = DataLoader(data.train, batch_size=256)
    test_loader = DataLoader(data.test, batch_size=512)
    rows: list[dict[str, Any]] = []
    for s, m in zip(cfg.seeds, models, strict=True):
        t = evaluate(m, test_loader)
        rows.append({"model": f"seed {s}", "test accuracy": t.accuracy, "test loss": t.loss})
    ensemble = _OutputEnsemble(models)
    t = evaluate(ensemble, test_loader)
    rows.append(
        {"model": "output ensemble (probabilities)", "test accuracy": t.accuracy, "test loss": t.loss}
    )
    merged_models = {}
    for method in cfg.methods:
        name, _, fix = method.partition("+")
        options = {"repair": fix} if fix else {}
        try:
            merged = merge(models, method=name, data=train_loader, **options)
        except ValueError as e:
            log.warning("demo: method %s failed: %s", method, e)
            rows.append(
                {"model": f"merge: {method}", "test accuracy": float("nan"), "test loss": float("nan")}
            )
            continue
        merged_models[method] = merged
        t = evaluate(merged, test_loader)
        rows.append({"model": f"merge: {method}", "test accuracy": t.accuracy, "test loss": t.loss})
        save(merged, out / MODELS / f"merged-{method}", metadata={"method": method})

    report.heading("Endpoints, ensemble and merges")
    report.text(
        "Each row is one model evaluated on the held-out test split. The *output ensemble* averages the members' "
        "predicted probabilities (it needs every member at inference time); each *merge* is a single model of the "
        "original size. Independently trained networks hold their hidden units in different orders, so plain "
        "averaging mixes unrelated units; aligning the units first (weight or activation matching) is meant to "
        "fix that."
    )
    report.table(rows, ["model", "test accuracy", "test loss"])
    report.text(_merge_finding(rows))
    report.metrics["table"] = rows

    if len(models) >= 2:
        _interpolation_section(report, models[0], models[1], train_loader, test_loader, cfg, out)
    return report


def _interpolation_section(
    report: Report,
    a: Any,
    b: Any,
    train_loader: DataLoader,
    test_loader: DataLoader,
    cfg: DemoConfig,
    out: Path,
) -> None:
    try:
        from mergelab.analysis.interpolate import interpolate
        from mergelab.merge.aligned import align_to
    except ImportError as e:  # the alignment core is optional for the demo's first table
        log.warning("demo: interpolation skipped (%s)", e)
        return
    import matplotlib.pyplot as plt

    curves = {"naive": interpolate(a, b, train_loader, steps=cfg.interpolation_steps, test_data=test_loader)}
    for method in ("weight_matching", "activation_matching"):
        if method in cfg.methods or f"{method}+repair" in cfg.methods:
            curves[method] = interpolate(
                a,
                align_to(a, b, method=method, data=train_loader),
                train_loader,
                steps=cfg.interpolation_steps,
                test_data=test_loader,
            )
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in curves.items():
        axes[0].plot(c.lambdas, c.test_loss, marker="o", label=name)
        axes[1].plot(c.lambdas, c.test_accuracy, marker="o", label=name)
    axes[0].set(
        xlabel="λ (0 = model A, 1 = model B)", ylabel="test loss", title="Loss along the straight line"
    )
    axes[1].set(xlabel="λ", ylabel="test accuracy", title="Accuracy along the straight line")
    axes[0].legend()
    fig.tight_layout()
    path = out / "interpolation.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    report.heading("Linear mode connectivity")
    report.text(
        "The straight line between the two endpoints in weight space, evaluated at each λ. A bump in the loss is "
        "a *barrier*: the endpoints sit in different basins. Barrier = the largest gap between the curve and the "
        "straight line joining the endpoints' values (train loss). "
        + _barrier_finding({k: c.loss_barrier for k, c in curves.items()})
    )
    rows = [
        {"path": k, "loss barrier": c.loss_barrier, "accuracy barrier": c.accuracy_barrier}
        for k, c in curves.items()
    ]
    report.table(rows)
    report.figure(path, "Interpolation between the two endpoints, naive vs aligned")
    report.metrics["interpolation"] = {k: c.to_dict() for k, c in curves.items()}


def _merge_finding(rows: list[dict[str, Any]]) -> str:
    """One sentence read off the table: how each merge compares with plain averaging and the endpoints."""
    acc = {r["model"]: r["test accuracy"] for r in rows}
    ends = [v for k, v in acc.items() if k.startswith("seed ")]
    base = acc.get("merge: average")
    merges = {
        k.removeprefix("merge: "): v
        for k, v in acc.items()
        if k.startswith("merge: ") and k != "merge: average"
    }
    if base is None or not merges or not ends:
        return ""
    best = max(merges, key=merges.__getitem__)
    lo = min(ends)
    return (
        f"In this run plain averaging reaches {base:.3f} test accuracy against {lo:.3f}–{max(ends):.3f} for the "
        f"endpoints; the best merge, {best}, reaches {merges[best]:.3f} "
        f"({'above' if merges[best] > base else 'not above'} plain averaging, "
        f"{'within' if merges[best] >= lo - 0.01 else 'more than'} one point of the weaker endpoint). "
        "One seed pair: a demonstration, not an estimate (`mergelab run lmc` has intervals over seeds)."
    )


def _barrier_finding(barriers: dict[str, float]) -> str:
    """One sentence read off the barriers: does alignment lower the naive barrier, and by how much."""
    naive = barriers.get("naive")
    aligned = {k: v for k, v in barriers.items() if k != "naive"}
    if naive is None or not aligned:
        return ""
    parts = [
        f"{k} {'lowers' if v < naive else 'does not lower'} it to {v:.3f} ({v / naive:.0%} of naive)"
        if naive > 0
        else f"{k} {v:.3f}"
        for k, v in aligned.items()
    ]
    return f"Here the naive loss barrier is {naive:.3f}; " + "; ".join(parts) + "."


class _OutputEnsemble(torch.nn.Module):
    """Log of the mean predicted probability: the feature-free ensemble every merge is compared with."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(x).softmax(-1) for m in self.members]).mean(0)
        return probs.clamp_min(1e-12).log()
