"""Study ``features``: do the units of a permutation-aligned merge look like the units they were averaged from?

After Zou, Nanfack, Horoi, Belilovsky, "Understanding Permutation Based Model Merging with Feature
Visualizations" (2024). Per dataset and architecture, several seed pairs of models are trained (one job per
model); in each pair B is aligned to A by weight matching (Git Re-Basin), and units of several hidden layers are
visualised in A, in the aligned B', in their average ("merged"), in the unaligned B and in the naive average
A+B. Two pictures per unit (activation maximisation, mean of the top-k training inputs) plus the unit's
activations on test data.

The claims are tested per seed pair and summarised by a seed-level interval (:mod:`mergelab.analysis.verdict`):

* the merged unit resembles its *matched* parents more than a null of unmatched parent units (all j ≠ i);
* it resembles *both* parents (the less similar parent is still above that null);
* per unit, resemblance grows with the matching correlation of the unit pair;
* the share of merged units *dominated* by one parent (activation correlation with one parent exceeds that with
  the other by at least ``dominance_margin``) is higher among weakly matched pairs.
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

import numpy as np
import torch

from mergelab.analysis.verdict import Claim, claim, paired_interval
from mergelab.experiments._study import apply_preset, check_data_root, resolve_device
from mergelab.experiments._training import DataSpec, ModelSpec, TrainJob, run_train_job
from mergelab.experiments.runner import Executor, register_study
from mergelab.report import Report
from mergelab.train import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["FeaturesConfig", "features"]

# Per-architecture sizes that train in seconds on one CPU core.
DEFAULT_MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "mlp": {"width": 128, "depth": 2},
    "cnn": {"width": 32, "depth": 3},
}
# Every hidden layer's pre-activation (the Linear / conv modules): a pre-activation never has a dead gradient
# (ReLU is monotone, so it finds the same pattern as the post-ReLU unit). The first layer is a weight template
# and its merged pre-activation is exactly the mean of the parents' (linear in the weights); deeper layers are not.
DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    "mlp": ("layers.0", "layers.2"),
    "cnn": ("blocks.0", "blocks.2", "blocks.4"),
}
COLUMNS = ("A", "B'", "merged", "B", "naive")


@dataclass(frozen=True)
class FeaturesConfig:
    """Settings of the ``features`` study; see docs/feature_vis.md for the default run's CPU time."""

    datasets: tuple[str, ...] = ("digits",)  # add "mnist1d" for 1-D inputs (curves)
    archs: tuple[str, ...] = ("mlp", "cnn")
    seeds: tuple[int, ...] = tuple(range(10))  # consecutive pairs (A, B): (0, 1), (2, 3), …, (8, 9)
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per arch, over the defaults
    layers: dict[str, Any] = field(
        default_factory=dict
    )  # per arch: module (or group) name, or a list of them
    epochs: int = 20
    lr: float = 3e-3
    batch_size: int = 128
    method: str = "weight_matching"  # or "activation_matching"
    scored_units: int = 32  # units 0..n-1 enter the table (the unit order is arbitrary: an unbiased sample)
    drawn_units: int = 6  # the first ones are drawn (first seed pair only)
    dominance_margin: float = 0.2  # a merged unit is dominated when r(M, P1) − r(M, P2) ≥ this (activations)
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
        if len(self.seeds) < 2 or len(self.seeds) % 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(
                f"FeaturesConfig: seeds must be distinct and of even length (pairs A, B), got {self.seeds}"
            )
        bad = [a for a in self.archs if a not in DEFAULT_LAYERS and a not in self.layers]
        if bad:
            raise ValueError(
                f"FeaturesConfig: no layer to visualise for archs {bad}; set layers={{arch: module}}"
            )
        if self.method not in ("weight_matching", "activation_matching"):
            raise ValueError(
                f"FeaturesConfig: method {self.method!r}; choose weight_matching or activation_matching"
            )
        if self.scored_units < 3 or self.drawn_units < 1:
            raise ValueError("FeaturesConfig: scored_units must be >= 3 (for the null) and drawn_units >= 1")

    def arch_kwargs(self, arch: str) -> dict[str, Any]:
        return {**DEFAULT_MODEL_KWARGS.get(arch, {}), **dict(self.model_kwargs.get(arch, {}))}

    def layer_names(self, arch: str) -> tuple[str, ...]:
        given = self.layers.get(arch, DEFAULT_LAYERS.get(arch, ()))
        return (given,) if isinstance(given, str) else tuple(given)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [(self.seeds[i], self.seeds[i + 1]) for i in range(0, len(self.seeds), 2)]


# Zou et al. visualise units of CIFAR-10 CNNs: a wider 4-block CNN trained longer.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "datasets": ("cifar10",),
        "archs": ("cnn",),
        "model_kwargs": {"cnn": {"width": 64, "depth": 4}},
        "epochs": 60,
    }
}


@dataclass(frozen=True)
class PairJob:
    """One seed pair of one (dataset, arch): align, merge, visualise and score its layers."""

    models: tuple[TrainJob, TrainJob]  # A, B
    dataset: str
    arch: str
    pair: tuple[int, int]
    layers: tuple[str, ...]
    method: str
    scored_units: int
    actmax: dict[str, Any]  # ActMaxConfig options except value_range (from the data when clamp_to_data)
    clamp_to_data: bool
    top_k: int
    dominance_margin: float
    keep_pictures: bool  # the first pair's comparisons come back for the figures
    threads: int = 1


def _train_jobs(cfg: FeaturesConfig, out: Path) -> dict[tuple[str, str, int], TrainJob]:
    """One :class:`TrainJob` per (dataset, arch, seed)."""
    train = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, progress=False)
    return {
        (d, a, s): TrainJob(
            name=f"{d}-{a}/seed-{s}",
            data=DataSpec(d, cfg.data_root, {"num_samples": cfg.mnist1d_samples} if d == "mnist1d" else {}),
            model=ModelSpec(a, cfg.arch_kwargs(a)),
            train=dataclasses.replace(train, data_seed=s),
            init_seed=s,
            device=cfg.device,
            threads=cfg.torch_threads,
        ).at(out)
        for d in cfg.datasets
        for a in cfg.archs
        for s in cfg.seeds
    }


def _corr_matrix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of every row of ``x`` with every row of ``y`` (rows: units, columns: samples or
    pixels) → ``(U, U)``; entry ``[i, j]`` compares unit i of x with unit j of y."""
    a = x - x.mean(1, keepdims=True)
    b = y - y.mean(1, keepdims=True)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy import stats

    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(stats.spearmanr(x, y).statistic)


def unit_stats(merged: np.ndarray, parent_a: np.ndarray, parent_b: np.ndarray) -> dict[str, np.ndarray]:
    """Per-unit similarity of merged units to their matched parents, and the unmatched null.

    Args:
        merged, parent_a, parent_b: ``(U, D)`` — one row per unit (a flattened picture, or activations over
            the same test inputs); row i of the three are the merged unit and its two matched parents.

    Returns:
        ``match_a``/``match_b``: r(merged_i, A_i), r(merged_i, B_i); ``null_a``/``null_b``: the mean over j ≠ i of
        r(merged_i, A_j) (B_j), the similarity a merged unit has to a *random, unmatched* parent unit;
        ``excess``: mean of the two matched minus the mean of the two null values; ``min_excess``: the smaller
        of the two parents' excess (> 0 means both parents are recognisable in the merged unit). All ``(U,)``.
    """
    n = merged.shape[0]
    if n < 2:
        raise ValueError(f"unit_stats: need at least 2 units for the unmatched null, got {n}")
    out: dict[str, np.ndarray] = {}
    for side, parent in (("a", parent_a), ("b", parent_b)):
        c = _corr_matrix(merged.astype(np.float64), parent.astype(np.float64))
        diag = np.diag(c).copy()
        out[f"match_{side}"] = diag
        out[f"null_{side}"] = (c.sum(1) - diag) / (n - 1)
    ex_a, ex_b = out["match_a"] - out["null_a"], out["match_b"] - out["null_b"]
    out["excess"] = (ex_a + ex_b) / 2
    out["min_excess"] = np.minimum(ex_a, ex_b)
    return out


def dominance(match_a: np.ndarray, match_b: np.ndarray, margin: float) -> np.ndarray:
    """Boolean ``(U,)``: merged unit i is *dominated by one parent* when its activation correlation with one
    parent exceeds that with the other by at least ``margin`` (|r(M_i, A_i) − r(M_i, B_i)| ≥ margin)."""
    return np.abs(match_a - match_b) >= margin


def analysis_job(job: PairJob) -> dict[str, Any]:
    """Align, merge, visualise and score one seed pair of one (dataset, arch), over its layers (top-level for
    Ray)."""
    from torch.utils.data import DataLoader

    from mergelab.analysis.feature_vis import (
        ActMaxConfig,
        compare_units,
        endpoint_models,
        select_units,
        similarity_rows,
        unit_activations,
    )
    from mergelab.evaluation import evaluate

    torch.set_num_threads(job.threads)
    start, cpu0 = time.perf_counter(), time.process_time()
    data = job.models[0].data.load()
    a, b = (m.load("cpu") for m in job.models)
    a.train(), b.train()  # as built: endpoint_models decides the modes
    train_loader = DataLoader(data.train, batch_size=256)
    test_loader = DataLoader(data.test, batch_size=512)
    models = endpoint_models(
        a,
        b,
        method=job.method,
        data=train_loader,
        example_input=data.train.tensors[0][:2],
    )
    for m in models.values():
        m.eval()
    accuracy = {name: evaluate(m, test_loader).accuracy for name, m in models.items()}
    x = data.train.tensors[0]
    x_test = data.test.tensors[0]
    cfg = ActMaxConfig(
        **job.actmax, value_range=(float(x.min()), float(x.max())) if job.clamp_to_data else None
    )
    layers = []
    for layer in job.layers:
        size = select_units(a, layer, input_shape=data.input_shape).size
        units = list(range(min(job.scored_units, size)))
        comparison = compare_units(
            {k: models[k] for k in COLUMNS}, layer, units, data=train_loader, config=cfg, k=job.top_k
        )
        rows = [{k: v for k, v in r.items() if k != "mix↔merge"} for r in similarity_rows(comparison)]
        with torch.no_grad():
            acts = {
                n: unit_activations(m, select_units(m, layer, units, input_shape=data.input_shape), x_test)
                .T.double()
                .numpy()
                for n, m in models.items()
            }  # name → (U, N_test)
        views: dict[str, dict[str, np.ndarray]] = {
            "actmax": {k: v.flatten(1).double().numpy() for k, v in comparison.pictures("actmax").items()},
            "topk": {
                k: v.flatten(1).double().numpy()
                for k, v in comparison.pictures("topk", centered=True).items()
            },
            "activation": acts,
        }
        # The matching correlation of each unit pair: activations of A_i and B'_i on test data.
        r_match = np.diag(_corr_matrix(acts["A"], acts["B'"]))
        stats: dict[str, dict[str, dict[str, list[float]]]] = {}
        for view, pics in views.items():
            stats[view] = {}
            for merge, bname, mname in (("aligned", "B'", "merged"), ("naive", "B", "naive")):
                st = unit_stats(pics[mname], pics["A"], pics[bname])
                stats[view][merge] = {k: v.tolist() for k, v in st.items()}
        dom = dominance(
            np.asarray(stats["activation"]["aligned"]["match_a"]),
            np.asarray(stats["activation"]["aligned"]["match_b"]),
            job.dominance_margin,
        )
        weak = r_match < np.median(r_match)
        layers.append(
            {
                "layer": comparison.module,
                "layer_size": size,
                "rows": rows,
                "r_match": r_match.tolist(),
                "stats": stats,
                "dominated": dom.tolist(),
                "dominated_share": float(dom.mean()),
                "dominated_weak_minus_strong": float(dom[weak].mean() - dom[~weak].mean())
                if weak.any() and (~weak).any()
                else 0.0,
                "spearman": {
                    view: _spearman(
                        r_match,
                        (
                            np.asarray(stats[view]["aligned"]["match_a"])
                            + np.asarray(stats[view]["aligned"]["match_b"])
                        )
                        / 2,
                    )
                    for view in ("actmax", "topk")
                },
                "comparison": comparison if job.keep_pictures else None,
            }
        )
    return {
        "dataset": job.dataset,
        "arch": job.arch,
        "pair": list(job.pair),
        "accuracy": accuracy,
        "layers": layers,
        "seconds": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu0,
    }


def _pair_mean(r: dict[str, Any], view: str, merge: str, key: str) -> float:
    """One seed pair's value: the mean over units, then over layers (each layer weighs the same)."""
    return float(np.mean([np.mean(lay["stats"][view][merge][key]) for lay in r["layers"]]))


@register_study("features", FeaturesConfig)
def features(cfg: FeaturesConfig, out: Path, executor: Executor) -> Report:
    """Feature visualization of endpoint vs merged units over layers and seed pairs, with claims tested
    against an unmatched-unit null."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mergelab.analysis.feature_vis import plot_comparison

    cfg = apply_preset(cfg, PRESETS, "features")
    check_data_root("features", cfg.datasets, cfg.data_root)
    resolve_device(cfg.device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    report = Report(out, "Feature visualization: endpoint vs merged units", config=dataclasses.asdict(cfg))
    jobs = _train_jobs(cfg, out)
    trained = [
        {"dataset": d, "arch": a, "seed": s, "cpu_s": r.cpu_seconds, "checkpoint": r.checkpoint}
        for (d, a, s), r in zip(
            jobs, executor.map(run_train_job, list(jobs.values()), desc="train"), strict=True
        )
    ]
    actmax = {"steps": cfg.steps, "lr": cfg.actmax_lr, "l2": cfg.l2, "tv": cfg.tv, "jitter": cfg.jitter,
              "fourier": cfg.fourier, "seed": cfg.actmax_seed}  # fmt: skip
    analysis_jobs = [
        PairJob(
            models=(jobs[(d, a, pair[0])], jobs[(d, a, pair[1])]),
            dataset=d,
            arch=a,
            pair=pair,
            layers=cfg.layer_names(a),
            method=cfg.method,
            scored_units=cfg.scored_units,
            actmax=actmax,
            clamp_to_data=cfg.clamp_to_data,
            top_k=cfg.top_k,
            dominance_margin=cfg.dominance_margin,
            keep_pictures=k == 0,
            threads=cfg.torch_threads,
        )
        for d in cfg.datasets
        for a in cfg.archs
        for k, pair in enumerate(cfg.pairs)
    ]
    results = executor.map(analysis_job, analysis_jobs, desc="visualise")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["arch"]), []).append(r)
    for rs in groups.values():
        rs.sort(key=lambda r: r["pair"])
    n_pairs = len(cfg.pairs)

    report.claims(
        _claims(groups, cfg),
        "One value per seed pair (the mean over the scored units of every visualised layer), and a 95 % "
        f"Student-t interval over the {n_pairs} pairs; *supported* means the whole interval lies on the claimed "
        "side. The **null** is the similarity of a merged unit to *unmatched* parent units: for merged unit i, the "
        "mean over j ≠ i of r(merged_i, A_j) (and of B′_j) — what any unit of the parent layer reaches. Unlike a "
        "comparison with the blend of the parents (fixed by the other correlations: r(x, a+b) = (r_xa + r_xb) / "
        "√(2(1 + r_ab))), this comparison can fail. Zou et al. report their findings qualitatively (pictures), "
        "so the paper column has no numbers.",
    )
    report.text(
        "Two networks of one architecture are trained from different seeds (A and B), for each of "
        f"{n_pairs} seed pairs. B is re-expressed in A's unit basis by **{cfg.method}** (Git Re-Basin), giving "
        "B', which computes exactly the same function as B. **merged** is the average of A and B' (the aligned "
        "merge); **naive** is the average of A and B without alignment (the control). Units "
        f"0–{cfg.scored_units - 1} of every listed layer (the unit order of A is arbitrary, so this is an "
        "unbiased sample) are then compared in three views: **act-max** (an input optimised from the same seeded "
        "noise for every model, L2 + total-variation penalties, jitter, 1/f Fourier parameterisation, kept in "
        "the data's range), **top-k** (the mean of the training inputs that excite the unit most, minus the mean "
        "training input) and **activation** (the unit's activations on the test set). Similarity is Pearson r.\n\n"
        "The **matching correlation** of unit pair i is r(A_i, B′_i) of activations on test data. A merged unit "
        f"is **dominated by one parent** when |r(M_i, A_i) − r(M_i, B′_i)| ≥ {cfg.dominance_margin} for "
        "activations on test data (one parent explains it clearly better than the other)."
    )

    report.heading("Per layer: matched vs unmatched (null) similarity")
    layer_rows = _layer_rows(groups)
    report.table(layer_rows, digits=3)

    report.heading("Accuracy of the models compared (mean over seed pairs)")
    report.table(
        [
            {"dataset": d, "arch": a, "pairs": len(rs)}
            | {f"acc {k}": float(np.mean([r["accuracy"][k] for r in rs])) for k in COLUMNS}
            for (d, a), rs in groups.items()
        ],
        digits=3,
    )

    report.heading("Visual similarity (first seed pair, mean over units)")
    report.text(
        "**A↔merge** / **B↔merge**: the merged unit vs each endpoint's unit (B' for the aligned merge, B for the "
        "naive one); **A↔B**: the two units averaged into it; **A↔A (other unit)**: unit i vs unit i−1 of A."
    )
    rows = [
        {"dataset": r["dataset"], "arch": r["arch"], "layer": lay["layer"]} | row
        for rs in groups.values()
        for r in rs[:1]
        for lay in r["layers"]
        for row in lay["rows"]
    ]
    report.table(rows, digits=3)

    report.heading("Pictures (first seed pair)")
    report.text(
        f"Rows are units 0–{cfg.drawn_units - 1}; columns are A, the aligned B', their average (merged), the "
        "unaligned B and the naive average. Under each panel, its Pearson correlation with the pictures it "
        "derives from (B' and B with A; merged with A and B'; naive with A and B). Images for 8×8 digits "
        "(grey scale, each panel scaled on its own), curves for MNIST-1D."
    )
    for rs in groups.values():
        r = rs[0]
        for lay in r["layers"]:
            tag = f"{r['dataset']}-{r['arch']}-{lay['layer']}"
            for view, what in (
                ("actmax", "activation maximisation"),
                ("topk", f"mean of the top-{cfg.top_k} inputs"),
            ):
                path = plot_comparison(
                    lay["comparison"],
                    out / f"{view}-{tag}.png",
                    view=view,
                    columns=COLUMNS,
                    max_units=cfg.drawn_units,
                    title=f"{r['arch']} on {r['dataset']}, {lay['layer']}: {what}",
                )
                report.figure(path, f"{r['arch']} on {r['dataset']}, `{lay['layer']}`: {what}")
    _summary_plot(report, groups, plt)

    cpu_train = sum(r["cpu_s"] for r in trained)
    cpu_analysis = sum(r["cpu_s"] for r in results)
    cpu_main = time.process_time() - cpu0
    report.heading("Run")
    report.text(
        f"{len(jobs)} training jobs and {len(analysis_jobs)} analysis jobs on the `{executor.backend}` "
        f"backend; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
        f"wall time {time.perf_counter() - t0:.0f} s. CPU time {cpu_main + cpu_train + cpu_analysis:.0f} s "
        f"(training jobs {cpu_train:.0f} s, analysis jobs {cpu_analysis:.0f} s, this process {cpu_main:.0f} s; "
        "job times are each job's own process CPU time, so they also count when the jobs run in workers)."
    )
    report.metrics["cpu_s"] = {"train": cpu_train, "analysis": cpu_analysis, "main": cpu_main}
    report.metrics["rows"] = rows
    report.metrics["layer_rows"] = layer_rows
    report.metrics["results"] = [
        r | {"layers": [{k: v for k, v in lay.items() if k != "comparison"} for lay in r["layers"]]}
        for r in results
    ]
    return report


def _claims(groups: dict[tuple[str, str], list[dict[str, Any]]], cfg: FeaturesConfig) -> list[Claim]:
    """The study's claims per (dataset, arch), each with a verdict computed from the seed-pair interval."""
    out: list[Claim] = []
    paper = "Zou et al.: qualitative (pictures), no number"
    for (d, a), rs in groups.items():
        setting = f"{d}, {a}, layers {', '.join(lay['layer'] for lay in rs[0]['layers'])}"
        for view, name in (("actmax", "act-max"), ("activation", "activations")):
            out.append(claim(
                f"Aligned merged units resemble their matched parents more than unmatched units ({name})",
                f"r(merged_i, parents_i) − null ({name})",
                [_pair_mean(r, view, "aligned", "excess") for r in rs], setting=setting, paper=paper,
            ))  # fmt: skip
        out.append(claim(
            "Aligned merged units resemble *both* parents (the less similar one is still above the null)",
            "min over parents of (matched − null), act-max",
            [_pair_mean(r, "actmax", "aligned", "min_excess") for r in rs], setting=setting, paper=paper,
        ))  # fmt: skip
        out.append(claim(
            "Alignment keeps merged units closer to their parents than naive averaging",
            "(matched − null): aligned − naive, act-max",
            [_pair_mean(r, "actmax", "aligned", "excess") for r in rs],
            [_pair_mean(r, "actmax", "naive", "excess") for r in rs], setting=setting, paper=paper,
        ))  # fmt: skip
        out.append(claim(
            "The better matched a unit pair, the more the merged unit resembles its parents",
            "Spearman ρ over units: matching r(A_i, B′_i) vs act-max r(merged_i, parents_i)",
            [float(np.mean([lay["spearman"]["actmax"] for lay in r["layers"]])) for r in rs],
            setting=setting, paper=paper,
        ))  # fmt: skip
        out.append(claim(
            f"Most aligned merged units are not dominated by one parent (share dominated < 0.5, "
            f"margin {cfg.dominance_margin})",
            "share of merged units dominated by one parent (activations)",
            [float(np.mean([lay["dominated_share"] for lay in r["layers"]])) for r in rs],
            direction="less", margin=0.5, setting=setting, paper=paper,
        ))  # fmt: skip
        out.append(claim(
            "Weakly matched unit pairs are more often dominated by one parent",
            "share dominated: pairs below − above the median matching r",
            [float(np.mean([lay["dominated_weak_minus_strong"] for lay in r["layers"]])) for r in rs],
            setting=setting, paper=paper,
        ))  # fmt: skip
    return out


def _layer_rows(groups: dict[tuple[str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (dataset, arch, layer): seed-pair means with 95 % intervals."""
    rows = []
    for (d, a), rs in groups.items():
        for li, lay0 in enumerate(rs[0]["layers"]):
            lays = [r["layers"][li] for r in rs]

            def iv(values: list[float]) -> str:
                return paired_interval(values).format(3)

            def per(view: str, merge: str, key: str, lays: list[dict[str, Any]] = lays) -> list[float]:
                return [float(np.mean(lay["stats"][view][merge][key])) for lay in lays]

            def matched(view: str, merge: str) -> list[float]:
                return list((np.array(per(view, merge, "match_a")) + per(view, merge, "match_b")) / 2)

            def null(view: str, merge: str) -> list[float]:
                return list((np.array(per(view, merge, "null_a")) + per(view, merge, "null_b")) / 2)

            rows.append(
                {
                    "dataset": d,
                    "arch": a,
                    "layer": f"{lay0['layer']} ({lay0['layer_size']})",
                    "matching r(A,B′)": iv([float(np.mean(lay["r_match"])) for lay in lays]),
                    "act-max matched (aligned)": iv(matched("actmax", "aligned")),
                    "act-max null (aligned)": iv(null("actmax", "aligned")),
                    "act-max matched (naive)": iv(matched("actmax", "naive")),
                    "activation matched (aligned)": iv(matched("activation", "aligned")),
                    "activation null (aligned)": iv(null("activation", "aligned")),
                    "ρ(matching, act-max sim.)": iv([lay["spearman"]["actmax"] for lay in lays]),
                    "dominated share": iv([lay["dominated_share"] for lay in lays]),
                }
            )
    return rows


def _summary_plot(report: Report, groups: dict[tuple[str, str], list[dict[str, Any]]], plt: Any) -> None:
    """Per layer: act-max similarity of merged units to matched parents vs the unmatched null, aligned and
    naive; one dot per seed pair (the spread), bar = mean."""
    keys = [
        (d, a, li, lay["layer"]) for (d, a), rs in groups.items() for li, lay in enumerate(rs[0]["layers"])
    ]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(keys) + 1), 3.4))
    width = 0.2
    series = [
        ("aligned", "match", "tab:blue", "aligned: matched"),
        ("aligned", "null", "lightsteelblue", "aligned: null"),
        ("naive", "match", "tab:red", "naive: matched"),
        ("naive", "null", "lightsalmon", "naive: null"),
    ]
    for j, (merge, kind, colour, label) in enumerate(series):
        xs, ys, pts = [], [], []
        for i, (d, a, li, _) in enumerate(keys):
            vals = [
                (np.mean(r["layers"][li]["stats"]["actmax"][merge][f"{kind}_a"])
                 + np.mean(r["layers"][li]["stats"]["actmax"][merge][f"{kind}_b"])) / 2
                for r in groups[(d, a)]
            ]  # fmt: skip
            x = i + (j - 1.5) * width
            xs.append(x)
            ys.append(float(np.mean(vals)))
            pts.extend((x, float(v)) for v in vals)
        ax.bar(xs, ys, width, color=colour, label=label)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=6, color="k", zorder=3)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{a}/{d}\n{layer}" for d, a, _, layer in keys], fontsize=7)
    ax.set_ylabel("act-max similarity (Pearson r)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=6, ncol=2)
    report.plot(
        fig,
        "similarity-summary.png",
        "Act-max similarity of merged units to their matched parents vs the unmatched null, per layer: aligned "
        "(blue) vs naive (red); dots are seed pairs",
    )
