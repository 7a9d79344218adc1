"""Study ``features``: do the units of a permutation-aligned merge look like the units they were averaged from?

After Zou, Nanfack, Horoi, Belilovsky, "Understanding Permutation Based Model Merging with Feature
Visualizations" (2024). Per dataset and architecture, two models are trained from different seeds (one job
each), B is aligned to A by weight matching (Git Re-Basin), and unit ``i`` of one hidden layer is visualised in
A, in the aligned B', in their average ("merged"), in the unaligned B and in the naive average A+B. Two pictures
per unit: activation maximisation (an optimised input) and the mean of the top-k training inputs. Pictures are
compared by Pearson correlation (:func:`mergelab.analysis.feature_vis.similarity_rows`); matched units are also
compared by the correlation of their activations on test data.

Expected: aligned merging keeps each unit's picture close to both endpoints' (and to their blend), naive
averaging much less so — the merged unit is then an average of two unrelated detectors, read through a layer
below that is itself scrambled.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.experiments._study import (
    apply_preset,
    check_data_root,
    load_study_data,
    resolve_device,
    to_device,
)
from mergelab.experiments.runner import Executor, register_study
from mergelab.report import Report

log = logging.getLogger(__name__)

__all__ = ["FeaturesConfig", "features"]

# Per-architecture sizes that train in seconds on one CPU core.
DEFAULT_MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "mlp": {"width": 128, "depth": 2},
    "cnn": {"width": 32, "depth": 3},
}
# The second hidden layer's pre-activation (the Linear / conv module): deep enough that its units are not
# just first-layer weight templates, and a pre-activation never has a dead gradient (ReLU is monotone, so it
# finds the same pattern as the post-ReLU unit).
DEFAULT_LAYERS: dict[str, str] = {"mlp": "layers.2", "cnn": "blocks.2"}
COLUMNS = ("A", "B'", "merged", "B", "naive")


@dataclass(frozen=True)
class FeaturesConfig:
    """Settings of the ``features`` study; the defaults run in about a minute on 2 CPU cores."""

    datasets: tuple[str, ...] = ("digits",)  # add "mnist1d" for 1-D inputs (curves)
    archs: tuple[str, ...] = ("mlp", "cnn")
    seeds: tuple[int, ...] = (0, 1)  # A and B
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per arch, over the defaults
    layers: dict[str, str] = field(default_factory=dict)  # per arch: module (or group) to visualise
    epochs: int = 20
    lr: float = 3e-3
    batch_size: int = 128
    method: str = "weight_matching"  # or "activation_matching"
    scored_units: int = 32  # units 0..n-1 enter the table (the unit order is arbitrary: an unbiased sample)
    drawn_units: int = 6  # the first ones are drawn
    steps: int = 200  # act-max Adam steps
    actmax_lr: float = 0.05
    l2: float = 2.0  # strong enough that images are graded, not saturated at the range's ends
    tv: float = 0.5
    jitter: int = 1
    fourier: bool = True
    clamp_to_data: bool = True  # act-max images stay inside the data's value range (sigmoid parameterisation)
    top_k: int = 16
    actmax_seed: int = 0
    mnist1d_samples: int = 4000
    torch_threads: int = 1  # per job
    preset: str = "default"  # "paper": CIFAR-10 CNNs (needs data_root)
    device: str = "auto"  # training runs here ("auto" = CUDA when present); alignment and act-max run on CPU
    data_root: str = ""  # folder of a local dataset (cifar10 / cifar100 / mnist)

    def __post_init__(self) -> None:
        if len(self.seeds) != 2:
            raise ValueError(f"FeaturesConfig: seeds must name two models (A, B), got {self.seeds}")
        bad = [a for a in self.archs if a not in DEFAULT_LAYERS and a not in self.layers]
        if bad:
            raise ValueError(
                f"FeaturesConfig: no layer to visualise for archs {bad}; set layers={{arch: module}}"
            )
        if self.method not in ("weight_matching", "activation_matching"):
            raise ValueError(
                f"FeaturesConfig: method {self.method!r}; choose weight_matching or activation_matching"
            )
        if self.scored_units < 1 or self.drawn_units < 1:
            raise ValueError("FeaturesConfig: scored_units and drawn_units must be >= 1")

    def arch_kwargs(self, arch: str) -> dict[str, Any]:
        return {**DEFAULT_MODEL_KWARGS.get(arch, {}), **dict(self.model_kwargs.get(arch, {}))}

    def layer(self, arch: str) -> str:
        return self.layers.get(arch, DEFAULT_LAYERS.get(arch, ""))


# Zou et al. visualise units of CIFAR-10 CNNs: a wider 4-block CNN trained longer.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "datasets": ("cifar10",),
        "archs": ("cnn",),
        "model_kwargs": {"cnn": {"width": 64, "depth": 4}},
        "epochs": 60,
    }
}


def _load(dataset: str, samples: int, root: str = "") -> Any:
    return load_study_data(dataset, root, **({"num_samples": samples} if dataset == "mnist1d" else {}))


def train_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one model (top-level so Ray can ship it); returns its state dict."""
    from mergelab.models import build_model
    from mergelab.train import TrainConfig, train

    torch.set_num_threads(job["threads"])
    device = resolve_device(job["device"])
    data = _load(job["dataset"], job["samples"], job["data_root"])
    torch.manual_seed(job["seed"])
    model = build_model(job["arch"], data.input_shape, data.num_classes, **job["kwargs"]).to(device)
    cfg = TrainConfig(
        epochs=job["epochs"],
        lr=job["lr"],
        batch_size=job["batch_size"],
        data_seed=job["seed"],
        progress=False,
    )
    train(model, to_device(data.train, device), cfg)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    return {k: job[k] for k in ("dataset", "arch", "seed")} | {"state_dict": state}


def analysis_job(job: dict[str, Any]) -> dict[str, Any]:
    """Align, merge, visualise and score one (dataset, arch) pair of models (top-level for Ray)."""
    from torch.utils.data import DataLoader

    from mergelab.analysis.feature_vis import (
        ActMaxConfig,
        compare_units,
        endpoint_models,
        select_units,
        similarity_rows,
        unit_correlation,
    )
    from mergelab.evaluation import evaluate
    from mergelab.models import build_model

    torch.set_num_threads(job["threads"])
    start = time.perf_counter()
    data = _load(job["dataset"], job["samples"], job["data_root"])
    a, b = (build_model(job["arch"], data.input_shape, data.num_classes, **job["kwargs"]) for _ in range(2))
    a.load_state_dict(job["states"][0])
    b.load_state_dict(job["states"][1])
    train_loader = DataLoader(data.train, batch_size=256)
    test_loader = DataLoader(data.test, batch_size=512)
    models = endpoint_models(
        a,
        b,
        method=job["method"],
        data=train_loader,
        example_input=data.train.tensors[0][:2],
    )
    accuracy = {name: evaluate(m, test_loader).accuracy for name, m in models.items()}
    x = data.train.tensors[0]
    cfg = ActMaxConfig(
        steps=job["steps"],
        lr=job["actmax_lr"],
        l2=job["l2"],
        tv=job["tv"],
        jitter=job["jitter"],
        fourier=job["fourier"],
        value_range=(float(x.min()), float(x.max())) if job["clamp_to_data"] else None,
        seed=job["actmax_seed"],
    )
    size = select_units(a, job["layer"], input_shape=data.input_shape).size
    units = list(range(min(job["scored_units"], size)))
    comparison = compare_units(
        {k: models[k] for k in COLUMNS}, job["layer"], units, data=train_loader, config=cfg, k=job["top_k"]
    )
    sel = {n: select_units(m, job["layer"], units, input_shape=data.input_shape) for n, m in models.items()}
    act_corr = {}
    for merge, bname, mname in (("aligned", "B'", "merged"), ("naive", "B", "naive")):
        act_corr[merge] = {
            "A↔merge": unit_correlation(a, sel["A"], models[mname], sel[mname], test_loader).mean().item(),
            "B↔merge": unit_correlation(models[bname], sel[bname], models[mname], sel[mname], test_loader)
            .mean()
            .item(),
            "A↔B": unit_correlation(a, sel["A"], models[bname], sel[bname], test_loader).mean().item(),
        }
    gain = {n: (r.activations - r.initial_activations).mean().item() for n, r in comparison.actmax.items()}
    return {
        "dataset": job["dataset"],
        "arch": job["arch"],
        "layer": comparison.module,
        "layer_size": size,
        "accuracy": accuracy,
        "rows": similarity_rows(comparison),
        "activation_correlation": act_corr,
        "actmax_gain": gain,
        "comparison": comparison,
        "seconds": time.perf_counter() - start,
    }


@register_study("features", FeaturesConfig)
def features(cfg: FeaturesConfig, out: Path, executor: Executor) -> Report:
    """Feature visualization of endpoint vs merged units (act-max and top-k), aligned vs naive merging."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mergelab.analysis.feature_vis import plot_comparison

    cfg = apply_preset(cfg, PRESETS, "features")
    check_data_root("features", cfg.datasets, cfg.data_root)
    resolve_device(cfg.device)
    t0 = time.perf_counter()
    report = Report(out, "Feature visualization: endpoint vs merged units", config=dataclasses.asdict(cfg))
    common = {"samples": cfg.mnist1d_samples, "threads": cfg.torch_threads, "device": cfg.device,
              "data_root": cfg.data_root}  # fmt: skip
    train_jobs = [
        common
        | {
            "dataset": d,
            "arch": a,
            "seed": s,
            "kwargs": cfg.arch_kwargs(a),
            "epochs": cfg.epochs,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
        }
        for d in cfg.datasets
        for a in cfg.archs
        for s in cfg.seeds
    ]
    trained = executor.map(train_job, train_jobs, desc="train")
    states = {(r["dataset"], r["arch"], r["seed"]): r["state_dict"] for r in trained}
    analysis_jobs = [
        common
        | {
            "dataset": d,
            "arch": a,
            "kwargs": cfg.arch_kwargs(a),
            "states": [states[(d, a, s)] for s in cfg.seeds],
            "layer": cfg.layer(a),
            "method": cfg.method,
            "scored_units": cfg.scored_units,
            "steps": cfg.steps,
            "actmax_lr": cfg.actmax_lr,
            "l2": cfg.l2,
            "tv": cfg.tv,
            "jitter": cfg.jitter,
            "fourier": cfg.fourier,
            "clamp_to_data": cfg.clamp_to_data,
            "top_k": cfg.top_k,
            "actmax_seed": cfg.actmax_seed,
        }
        for d in cfg.datasets
        for a in cfg.archs
    ]
    results = executor.map(analysis_job, analysis_jobs, desc="visualise")

    report.text(
        "Two networks of one architecture are trained from different seeds (A and B). B is re-expressed in A's "
        f"unit basis by **{cfg.method}** (Git Re-Basin), giving B', which computes exactly the same function "
        "as B. **merged** is the average of A and B' (the aligned merge); **naive** is the average of A and B "
        "without alignment (the control). Unit *i* of one hidden layer is then visualised in all five models.\n\n"
        "Two pictures per unit. **Activation maximisation**: an input optimised with Adam (from the same seeded "
        "noise for every model) to make the unit's activation as large as possible, regularised by an L2 and a "
        "total-variation penalty, random jitter and a 1/f Fourier parameterisation, and kept in the data's "
        "value range. **Top-k mean**: the mean of the training inputs that activate the unit most. Pictures "
        "are compared by Pearson correlation (top-k means after subtracting the mean training input, so "
        "that the shared 'average digit' does not count as similarity).\n\n"
        "How to read the table: **A↔merge** and **B↔merge** say how much the merged unit still looks like each "
        "endpoint's unit (B' for the aligned merge, B for the naive one); **mix↔merge** compares it with the "
        "blend of the two endpoint pictures — the paper's question is whether a merged unit looks like such a "
        "mix; **A↔B** is how similar the two units averaged into it already were (high after alignment, near "
        "the floor without); **A↔A (other unit)** is that floor: two different units of A. Values are means "
        f"over units 0–{cfg.scored_units - 1} of the layer (the unit order of A is arbitrary, so this is an "
        "unbiased sample)."
    )

    report.heading("Accuracy of the models compared")
    report.table(
        [
            {"dataset": r["dataset"], "arch": r["arch"], "layer": f"{r['layer']} ({r['layer_size']} units)"}
            | {f"acc {k}": r["accuracy"][k] for k in COLUMNS}
            for r in results
        ],
        digits=3,
    )

    report.heading("Visual similarity (mean over units)")
    rows = [{"dataset": r["dataset"], "arch": r["arch"]} | row for r in results for row in r["rows"]]
    report.table(rows, digits=3)

    report.heading("Activation correlation on test data (mean over units)")
    report.text(
        "The same comparison without pictures: Pearson correlation, over the test set, between the activation "
        "of unit *i* in one model and unit *i* in the other."
    )
    act_rows = [
        {"dataset": r["dataset"], "arch": r["arch"], "merge": merge} | vals
        for r in results
        for merge, vals in r["activation_correlation"].items()
    ]
    report.table(act_rows, digits=3)

    report.heading("Pictures")
    report.text(
        f"Rows are units 0–{cfg.drawn_units - 1}; columns are A, the aligned B', their average (merged), the "
        "unaligned B and the naive average. Under each panel, its Pearson correlation with the pictures it "
        "derives from (B' and B with A; merged with A and B'; naive with A and B). In the aligned columns the "
        "same unit index shows the same feature in A, B' and the merge; in the naive columns B's unit *i* is "
        "an unrelated feature and the naive merge resembles neither endpoint clearly. Images for 8×8 digits "
        "(grey scale, each panel scaled on its own), curves for MNIST-1D."
    )
    for r in results:
        tag = f"{r['dataset']}-{r['arch']}"
        for view, what in (
            ("actmax", "activation maximisation"),
            ("topk", f"mean of the top-{cfg.top_k} inputs"),
        ):
            path = plot_comparison(
                r["comparison"],
                out / f"{view}-{tag}.png",
                view=view,
                columns=COLUMNS,
                max_units=cfg.drawn_units,
                title=f"{r['arch']} on {r['dataset']}, {r['layer']}: {what}",
            )
            report.figure(path, f"{r['arch']} on {r['dataset']}, `{r['layer']}`: {what}")
    _summary_plot(report, rows, out, plt)

    report.heading("Run")
    report.text(
        f"{len(train_jobs)} training jobs and {len(analysis_jobs)} analysis jobs on the `{executor.backend}` "
        f"backend; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
        f"wall time {time.perf_counter() - t0:.0f} s."
    )
    report.metrics["rows"] = rows
    report.metrics["activation_correlation"] = act_rows
    report.metrics["results"] = [
        {k: v for k, v in r.items() if k != "comparison"}
        | {
            "similarity_per_unit": {
                view: {
                    f"{x}↔{y}": r["comparison"].similarity(x, y, view).tolist()
                    for x, y in (
                        ("A", "merged"),
                        ("B'", "merged"),
                        ("A", "B'"),
                        ("A", "naive"),
                        ("B", "naive"),
                    )
                }
                for view in ("actmax", "topk")
            }
        }
        for r in results
    ]
    return report


def _summary_plot(report: Report, rows: list[dict[str, Any]], out: Path, plt: Any) -> None:
    """Bars of A↔merge and B↔merge for the aligned and the naive merge, per model and view."""
    keys = list(dict.fromkeys((r["dataset"], r["arch"], r["view"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(keys) + 1), 3.2))
    width = 0.2
    series = [
        ("aligned", "A↔merge", "tab:blue"),
        ("aligned", "B↔merge", "lightsteelblue"),
        ("naive", "A↔merge", "tab:red"),
        ("naive", "B↔merge", "lightsalmon"),
    ]
    for j, (merge, col, colour) in enumerate(series):
        ys = [
            next(
                (r[col] for r in rows if (r["dataset"], r["arch"], r["view"]) == k and r["merge"] == merge),
                0.0,
            )
            for k in keys
        ]
        ax.bar(
            [i + (j - 1.5) * width for i in range(len(keys))], ys, width, color=colour, label=f"{merge} {col}"
        )
    floors = [
        next(r["A↔A (other unit)"] for r in rows if (r["dataset"], r["arch"], r["view"]) == k) for k in keys
    ]
    ax.scatter(range(len(keys)), floors, marker="_", s=400, color="k", label="floor (other unit)", zorder=3)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{a}/{d}\n{v}" for d, a, v in keys], fontsize=7)
    ax.set_ylabel("visual similarity (Pearson r)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = out / "similarity-summary.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    report.figure(path, "Similarity of merged units to the endpoints' units: aligned (blue) vs naive (red)")
