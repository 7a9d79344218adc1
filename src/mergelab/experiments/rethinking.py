"""Study ``rethinking``: weight averaging vs feature averaging, weight patterns, and stability under scaling.

Reproduces, at CPU scale, the three analyses of Wang et al., "Rethinking Weight-Averaged Model-merging" (2024,
https://arxiv.org/abs/2411.09263), plus the model-soup family of Wortsman et al. (2022):

1. **Merging vs ensembling.** Pools of N members of one architecture; compare the members, the uniform soup
   (weight average), the greedy soup, and ensembles that average logits, probabilities or penultimate
   features (with the first member's head or the averaged head), and a greedy ensemble. Pools come in three
   kinds, because the kind decides whether weight averaging can work at all:

   * ``pretrained``: a backbone pretrained on a subset of the classes, then N fine-tuned copies (new head,
     different seeds, data order and learning rates) — the paper's setting;
   * ``shared``: N models trained from one shared random initialisation with different data orders;
   * ``independent``: N models with different initialisations (optionally aligned by weight matching).

2. **Weight patterns.** Linear classifiers' rows look like class templates; averaging averages templates;
   first-layer units of independent models need matching before their average keeps any pattern.

3. **Stability.** Multiply all tensors of one, some or all members by factors up to 100 (or add multiplicative
   noise) and watch accuracy, NLL, agreement with the unperturbed prediction and flip rate of every system.

Every member is trained by a job given to ``executor.map``, so the study runs sequentially or on Ray.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from mergelab.analysis.verdict import Claim, claim, paired_interval
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

__all__ = ["RethinkingConfig", "bootstrap_ci", "rethinking", "wilson_interval"]

POOL_KINDS = ("pretrained", "pretrained_random_head", "shared", "independent")

# Per-architecture sizes that train in seconds on one CPU core (8x8 digits, length-40 MNIST-1D). Keys are an
# arch or "dataset/arch" (applied after the arch's entry).
DEFAULT_MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "mlp": {"width": 128, "depth": 2},
    "cnn": {"width": 16, "depth": 3},
    # Three stride-2 convs shrink 8x8 to 1x1 (16 features): too narrow a bottleneck to fine-tune from a
    # 5-class backbone (fine-tuned copies reach ~0.4); two convs keep a 2x2 map.
    "digits/cnn": {"depth": 2},
    "vgg": {"width": 0.25},
    "resnet": {"depth": 8, "width": 0.5},
    "vit": {"dim": 32, "depth": 2, "heads": 2},
}

METHOD_COLUMNS = (
    "indiv. mean",
    "best indiv.",
    "soup",
    "greedy soup",
    "logit ens.",
    "prob. ens.",
    "feat. ens. (first head)",
    "feat. ens. (avg head)",
    "greedy ens.",
    "aligned soup",
)


@dataclass(frozen=True)
class RethinkingConfig:
    """Settings of the ``rethinking`` study; the defaults run in a few minutes on 2 CPU cores."""

    datasets: tuple[str, ...] = ("digits",)
    archs: tuple[str, ...] = ("mlp", "cnn", "resnet")
    seeds: tuple[int, ...] = (0, 1, 2)  # intervals and verdicts are over seeds (each seed: its own pools)
    # "pretrained_random_head" (each fine-tuned copy gets its own random head) is available but not default.
    pools: tuple[str, ...] = ("pretrained", "shared", "independent")
    n_members: tuple[int, ...] = (
        2,
        3,
        5,
        10,
    )  # the paper's N ∈ {2, 3, 5, 7, 10}; subsets of the first N members; max(n_members) are trained
    # Per arch or "dataset/arch", merged over DEFAULT_MODEL_KWARGS.
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    heldout_fraction: float = 0.15  # of the train split: greedy selection data, never trained on
    epochs: int = 10  # from-scratch training (shared / independent pools, and pretraining)
    lr: float = 3e-3
    batch_size: int = 128
    pretrain_classes: tuple[int, ...] = (0, 1, 2, 3, 4)  # the "upstream task" of the pretrained pool
    pretrain_epochs: int = 20  # on half the data, so about as many steps as `epochs` on all of it
    finetune_epochs: int = 10
    finetune_lrs: tuple[float, ...] = (2e-3, 3e-3, 1e-3)  # cycled over members: different hyper-parameters
    align_independent: bool = True  # add an aligned soup (weight matching) for independent pools if available
    # Stability under scaling: which archs, which pool, which perturbations ("kind:members").
    stability_archs: tuple[str, ...] = ("mlp", "resnet")
    stability_pool: str = "pretrained"
    stability_perturbations: tuple[str, ...] = ("scale:all", "scale:one", "scale:all_but_one", "noise:all")
    scale_factors: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0, 100.0)
    noise_levels: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
    # Weight patterns: linear classifiers (templates) and first-layer units.
    patterns: bool = True
    pattern_models: int = 2
    pattern_epochs: int = 30
    pattern_weight_decay: float = 1e-2  # a little decay gives cleaner templates (the paper uses 0.1 with SGD)
    pattern_pairs: tuple[tuple[int, int], ...] = ((1, 7), (3, 8), (4, 9))
    n_bootstrap: int = 1000  # unused since intervals are over seeds; kept so older study files still load
    torch_threads: int = 1  # per training job (jobs run in parallel on Ray)
    soup_margin: float = 0.02  # "soup ≈ ensemble" means |soup − logit ens.| < this (accuracy)
    preset: str = "default"  # "paper": CIFAR-10 VGG / ResNet-20 pools of N = 10 (needs data_root)
    device: str = "auto"  # "auto" = CUDA when present
    data_root: str = ""  # folder of a local dataset (cifar10 / cifar100 / mnist)

    def __post_init__(self) -> None:
        bad = sorted(set(self.pools) - set(POOL_KINDS))
        if bad:
            raise ValueError(f"RethinkingConfig: unknown pool kind(s) {bad}; choose from {list(POOL_KINDS)}")
        if not self.n_members or min(self.n_members) < 1:
            raise ValueError(f"RethinkingConfig: n_members must be positive, got {self.n_members}")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ValueError(
                f"RethinkingConfig: heldout_fraction must lie in (0, 0.5), got {self.heldout_fraction}"
            )
        if self.stability_pool not in POOL_KINDS:
            raise ValueError(f"RethinkingConfig: unknown stability_pool {self.stability_pool!r}")
        for p in self.stability_perturbations:
            _parse_perturbation(p)
        if not self.finetune_lrs:
            raise ValueError("RethinkingConfig: finetune_lrs is empty")

    def arch_kwargs(self, arch: str, dataset: str | None = None) -> dict[str, Any]:
        """Model options: defaults for ``arch``, then ``dataset/arch``; then both keys of ``model_kwargs``."""
        out: dict[str, Any] = {}
        for table in (DEFAULT_MODEL_KWARGS, self.model_kwargs):
            out.update(table.get(arch, {}))
            if dataset is not None:
                out.update(table.get(f"{dataset}/{arch}", {}))
        return out


# The paper's setting: CIFAR-10, pools of up to 10 fine-tuned copies of a pretrained backbone (here: pretrained on
# classes 0–4 of CIFAR-10 itself; the paper starts from ImageNet weights, which mergelab never downloads).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "datasets": ("cifar10",),
        "archs": ("vgg", "resnet"),
        "seeds": (0, 1, 2),
        "n_members": (2, 3, 5, 7, 10),
        "model_kwargs": {"vgg": {"width": 1.0}, "resnet": {"depth": 20, "width": 1}},
        "epochs": 60,
        "pretrain_epochs": 60,
        "finetune_epochs": 20,
        "stability_archs": ("resnet",),
        "patterns": False,
    }
}


# -- statistics ----------------------------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (better than ``p ± z·se`` near 0 or 1 and for small n).

    Example:
        >>> lo, hi = wilson_interval(430, 450)
        >>> round(lo, 3), round(hi, 3)
        (0.932, 0.971)
    """
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


def bootstrap_ci(
    per_sample: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``per_sample`` (resampling test examples).

    ``per_sample`` holds one value per test example — e.g. correctness averaged over seeds, or the difference
    of two methods' correctness (a paired interval).
    """
    x = np.asarray(per_sample, dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


# -- jobs (top-level, picklable) -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
@functools.lru_cache(maxsize=4)
def _dataset(name: str, root: str = "") -> Any:
    return load_study_data(name, root)


@functools.lru_cache(maxsize=16)
def _splits(
    name: str, fraction: float, seed: int, root: str = "", device: str = "cpu"
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train minus held-out, held-out, test) on ``device``; the held-out part depends only on ``seed``."""
    dev = resolve_device(device)
    d = _dataset(name, root)
    x, y = d.train.tensors[0], d.train.tensors[1]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(10_000 + seed))
    k = int(round(fraction * len(y)))
    held, rest = perm[:k], perm[k:]
    parts = TensorDataset(x[rest], y[rest]), TensorDataset(x[held], y[held]), d.test
    return tuple(to_device(p, dev) for p in parts)  # type: ignore[return-value]


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _batches(ds: TensorDataset, size: int = 512) -> Batches:
    """Evaluation batches as tensor slices (a DataLoader would index a TensorDataset sample by sample)."""
    x, y = ds.tensors[0], ds.tensors[1]
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def _build(
    arch: str, kwargs: dict[str, Any], name: str, init_seed: int, root: str = "", device: str = "cpu"
) -> nn.Module:
    from mergelab.models import build_model

    d = _dataset(name, root)
    torch.manual_seed(init_seed)
    return build_model(arch, d.input_shape, d.num_classes, **kwargs).to(resolve_device(device))


def _train_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one model as described by ``job`` and return its state_dict and accuracies (plain data)."""
    from mergelab.evaluation import evaluate
    from mergelab.train import TrainConfig, train

    threads = torch.get_num_threads()
    torch.set_num_threads(int(job.get("threads", 1)))
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        train_set, held, test = _splits(
            job["dataset"], job["heldout_fraction"], job["split_seed"], *_where(job)
        )
        model = _build(job["arch"], job["kwargs"], job["dataset"], job["init_seed"], *_where(job))
        if job.get("init_state") is not None:
            model.load_state_dict(job["init_state"])
        if (
            job.get("head_seed") is not None
        ):  # fine-tuning: a fresh head, as when a pretrained net meets a new task
            torch.manual_seed(job["head_seed"])
            model.head.reset_parameters()
        if job.get("classes") is not None:
            from mergelab.data import split_classes

            (train_set,) = split_classes(train_set, [job["classes"]], relabel=False)
        cfg = TrainConfig(
            epochs=job["epochs"],
            lr=job["lr"],
            batch_size=job["batch_size"],
            data_seed=job["data_seed"],
            weight_decay=job.get("weight_decay", 0.0),
            progress=False,
        )
        train(model, train_set, cfg)
        test_loader, held_loader = _batches(test), _batches(held)
        return {
            "key": job["key"],
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "test_accuracy": evaluate(model, test_loader).accuracy,
            "heldout_accuracy": evaluate(model, held_loader).accuracy,
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
        }
    finally:
        torch.set_num_threads(threads)


def _where(job: dict[str, Any]) -> tuple[str, str]:
    """(data root, device) of a job."""
    return job.get("data_root", ""), job.get("device", "cpu")


# -- the study -----------------------------------------------------------------------------------------------


@register_study("rethinking", RethinkingConfig)
def rethinking(config: RethinkingConfig, out: Path, executor: Executor) -> Report:
    """Weight averaging vs feature averaging, weight patterns, and prediction stability under scaling."""
    cfg = apply_preset(config, PRESETS, "rethinking")
    check_data_root("rethinking", cfg.datasets, cfg.data_root)
    resolve_device(cfg.device)
    t_start = time.perf_counter()
    report = Report(out, "Rethinking weight-averaged model merging (CPU scale)", dataclasses.asdict(cfg))
    n_max = max(cfg.n_members)
    settings = [(d, a, s) for d in cfg.datasets for a in cfg.archs for s in cfg.seeds]

    # 1. Pretrain one backbone per (dataset, arch, seed) for the "pretrained" pool.
    base_job = {
        "heldout_fraction": cfg.heldout_fraction,
        "batch_size": cfg.batch_size,
        "threads": cfg.torch_threads,
        "data_root": cfg.data_root,
        "device": cfg.device,
    }
    pretrained: dict[tuple[str, str, int], dict[str, torch.Tensor]] = {}
    pre_acc: dict[tuple[str, str, int], float] = {}
    if any(p.startswith("pretrained") for p in cfg.pools):
        jobs = [
            {
                **base_job,
                "key": ("pre", d, a, s),
                "dataset": d,
                "arch": a,
                "kwargs": cfg.arch_kwargs(a, d),
                "split_seed": s,
                "init_seed": 1000 + s,
                "data_seed": 1000 + s,
                "epochs": cfg.pretrain_epochs,
                "lr": cfg.lr,
                "classes": list(cfg.pretrain_classes),
            }
            for d, a, s in settings
        ]
        for r in executor.map(_train_job, jobs, desc="pretrain"):
            _, d, a, s = r["key"]
            pretrained[(d, a, s)] = r["state_dict"]
            pre_acc[(d, a, s)] = r["test_accuracy"]

    # 2. Train every pool's members.
    jobs = []
    for d, a, s in settings:
        for pool in cfg.pools:
            for i in range(n_max):
                job = {
                    **base_job,
                    "key": (d, a, s, pool, i),
                    "dataset": d,
                    "arch": a,
                    "kwargs": cfg.arch_kwargs(a, d),
                    "split_seed": s,
                    "data_seed": 100 * s + i,
                    "epochs": cfg.epochs,
                    "lr": cfg.lr,
                }
                if pool.startswith("pretrained"):
                    # Model-soup recipe: all copies start from one new head; the variant gives each its own.
                    head_seed = 5000 + 100 * s + (i if pool == "pretrained_random_head" else 0)
                    job.update(
                        init_seed=1000 + s,
                        init_state=pretrained[(d, a, s)],
                        head_seed=head_seed,
                        epochs=cfg.finetune_epochs,
                        lr=cfg.finetune_lrs[i % len(cfg.finetune_lrs)],
                    )
                elif pool == "shared":
                    job.update(init_seed=s)
                else:
                    job.update(init_seed=100 * s + i)
                jobs.append(job)
    if cfg.patterns:  # linear classifiers for the weight-pattern figures train alongside the members
        s0 = cfg.seeds[0]
        jobs += [
            {
                **base_job,
                "key": ("lin", d, i),
                "dataset": d,
                "arch": "mlp",
                "kwargs": {"depth": 0},
                "split_seed": s0,
                "init_seed": 7000 + i,
                "data_seed": 7000 + i,
                "epochs": cfg.pattern_epochs,
                "lr": cfg.lr,
                "weight_decay": cfg.pattern_weight_decay,
            }
            for d in cfg.datasets
            for i in range(cfg.pattern_models)
        ]
    trained = {r["key"]: r for r in executor.map(_train_job, jobs, desc="members")}
    log.info("rethinking: %d models trained after %.1fs", len(jobs), time.perf_counter() - t_start)
    train_seconds = sum(r["cpu_seconds"] for r in trained.values())

    # 3. Evaluate soups and ensembles per (dataset, arch, seed, pool) and N; 4. stability under scaling.
    analysis_jobs: list[dict[str, Any]] = []
    for d, a, s in settings:
        for pool in cfg.pools:
            analysis_jobs.append(
                {
                    "kind": "evaluate",
                    "key": (d, a, s, pool),
                    "dataset": d,
                    "arch": a,
                    "kwargs": cfg.arch_kwargs(a, d),
                    "split_seed": s,
                    "heldout_fraction": cfg.heldout_fraction,
                    "ns": list(cfg.n_members),
                    "align": cfg.align_independent and pool == "independent",
                    "threads": cfg.torch_threads,
                    "data_root": cfg.data_root,
                    "device": cfg.device,
                    "state_dicts": [trained[(d, a, s, pool, i)]["state_dict"] for i in range(n_max)],
                    "held_accs": [trained[(d, a, s, pool, i)]["heldout_accuracy"] for i in range(n_max)],
                }
            )
    if cfg.stability_pool in cfg.pools:
        for d, a, s in settings:
            if a in cfg.stability_archs:
                analysis_jobs.append(
                    {
                        "kind": "stability",
                        "key": (d, a, s),
                        "dataset": d,
                        "arch": a,
                        "kwargs": cfg.arch_kwargs(a, d),
                        "split_seed": s,
                        "heldout_fraction": cfg.heldout_fraction,
                        "config": cfg,
                        "threads": cfg.torch_threads,
                        "data_root": cfg.data_root,
                        "device": cfg.device,
                        "path": str(
                            out
                            / (
                                f"stability_{d}_{a}.png"
                                if s == cfg.seeds[0]
                                else f"stability_{d}_{a}_seed{s}.png"
                            )
                        ),
                        "title": f"{d} / {a} / {cfg.stability_pool} pool, N={n_max}, seed {s}",
                        "state_dicts": [
                            trained[(d, a, s, cfg.stability_pool, i)]["state_dict"] for i in range(n_max)
                        ],
                    }
                )
    results: dict[tuple[str, str, str, int], dict[str, list[np.ndarray]]] = {}
    kept: dict[tuple[str, str, str, int], dict[str, list[int]]] = {}
    align_status: dict[str, str] = {}
    stability: dict[str, Any] = {}  # "dataset/arch" -> curves of the first seed (figures, tables)
    stability_seeds: dict[
        str, dict[int, Any]
    ] = {}  # "dataset/arch" -> seed -> curves (the claims' intervals)
    stab_figs: list[tuple[str, Path]] = []
    for r in executor.map(_analysis_job, analysis_jobs, desc="analysis"):
        if r["kind"] == "stability":
            d, a, s = r["key"]
            stability_seeds.setdefault(f"{d}/{a}", {})[s] = r["curves"]
            if s == cfg.seeds[0]:
                stability[f"{d}/{a}"] = r["curves"]
                stab_figs.append((f"{d}/{a}", Path(r["path"])))
            else:
                Path(r["path"]).unlink(missing_ok=True)  # one figure per arch; other seeds feed the intervals
            continue
        d, a, s, pool = r["key"]
        for n, (correct, sel) in r["results"].items():
            for k, v in correct.items():
                results.setdefault((d, a, pool, n), {}).setdefault(k, []).append(v)
            for k, v in sel.items():
                kept.setdefault((d, a, pool, n), {}).setdefault(k, []).append(len(v))
        if r["align_status"].get("weight_matching") and align_status.get("weight_matching") != "unavailable":
            align_status.update(r["align_status"])
    log.info("rethinking: evaluation and stability done after %.1fs", time.perf_counter() - t_start)

    # 5. Weight patterns.
    patterns: dict[str, Any] = {}
    pattern_figs: list[tuple[str, Path, str]] = []
    if cfg.patterns:
        patterns, pattern_figs = _patterns(cfg, out, trained)

    # 6. Report.
    elapsed = time.perf_counter() - t_start
    _write_report(
        report,
        cfg,
        results,
        kept,
        pre_acc,
        stability,
        stab_figs,
        patterns,
        pattern_figs,
        align_status,
        elapsed,
        train_seconds,
        len(jobs) + len(pretrained),
        executor,
    )
    report.metrics["stability_per_seed"] = stability_seeds
    report.claims(
        _claims(cfg, results, stability_seeds),
        "Every interval is a 95 % Student-t interval over training seeds (each seed has its own pools, "
        "pretrained backbone and held-out split); within a seed the values are averaged over the "
        "architectures, and paired differences are taken within the seed. Test samples are never resampled: "
        "they are not independent replications of training.",
    )
    return report


# -- evaluation of one pool ----------------------------------------------------------------------------------


def _members(job: dict[str, Any]) -> list[nn.Module]:
    members = []
    for sd in job["state_dicts"]:
        m = _build(job["arch"], job["kwargs"], job["dataset"], 0, *_where(job))
        m.load_state_dict(sd)
        members.append(m.eval())
    return members


def _analysis_job(job: dict[str, Any]) -> dict[str, Any]:
    """Evaluate one pool (``kind="evaluate"``) or run its stability curves (``kind="stability"``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(job.get("threads", 1)))
    try:
        _, held, test = _splits(job["dataset"], job["heldout_fraction"], job["split_seed"], *_where(job))
        members = _members(job)
        if job["kind"] == "stability":
            curves, path = _stability(members, held, test, job["config"], Path(job["path"]), job["title"])
            return {"kind": "stability", "key": job["key"], "curves": curves, "path": str(path)}
        status: dict[str, str] = {}
        results = _evaluate_pool(
            members, job["held_accs"], _batches(held), _batches(test), job["ns"], job["align"], status
        )
        return {"kind": "evaluate", "key": job["key"], "results": results, "align_status": status}
    finally:
        torch.set_num_threads(threads)


def _evaluate_pool(
    members: list[nn.Module],
    held_accs: list[float],
    held: Batches,
    test: Batches,
    ns: Sequence[int],
    align: bool,
    align_status: dict[str, str],
) -> dict[int, tuple[dict[str, np.ndarray], dict[str, list[int]]]]:
    """Per-sample test correctness of every method on the first ``n`` members of a pool, for each ``n``.

    Members run once on the test set (features and logits are cached); ensembles are combined from the cache
    with :func:`~mergelab.merge.ensemble.combine_outputs`, exactly what :class:`Ensemble` would compute.
    """
    from mergelab.evaluation import predict_logits
    from mergelab.merge.average import average
    from mergelab.merge.ensemble import combine_outputs, greedy_ensemble
    from mergelab.merge.soup import AlignmentUnavailable, align_models, greedy_soup_result

    y = torch.cat([b[1] for b in test])
    with torch.no_grad():
        feats = [torch.cat([m.features(x) for x, _ in test]) for m in members]  # per member (N_test, D)
        logits = [m.head(f) for m, f in zip(members, feats, strict=True)]
    heads = [m.head for m in members]

    def correct(out: torch.Tensor) -> np.ndarray:
        return (out.argmax(-1) == y).numpy().astype(np.float64)

    per_member = [correct(z) for z in logits]
    results: dict[int, tuple[dict[str, np.ndarray], dict[str, list[int]]]] = {}
    for n in ns:
        ms = members[:n]
        best = int(np.argmax(held_accs[:n]))
        out = {"indiv. mean": np.mean(per_member[:n], axis=0), "best indiv.": per_member[best]}
        selected: dict[str, list[int]] = {}
        results[n] = (out, selected)
        if n == 1:
            for k in METHOD_COLUMNS[2:-1]:
                out[k] = per_member[0]
            continue
        out["soup"] = correct(predict_logits(average(ms), test))
        gs = greedy_soup_result(ms, held)
        out["greedy soup"] = correct(predict_logits(gs.model, test))
        selected["greedy soup"] = gs.members
        out["logit ens."] = correct(combine_outputs(logits[:n], "logits"))
        out["prob. ens."] = correct(combine_outputs(logits[:n], "probs"))
        out["feat. ens. (first head)"] = correct(combine_outputs(feats[:n], "features", heads=heads[:n]))
        out["feat. ens. (avg head)"] = correct(
            combine_outputs(feats[:n], "features", heads=heads[:n], head="average")
        )
        ge = greedy_ensemble(ms, held)
        out["greedy ens."] = correct(combine_outputs([logits[i] for i in ge.selected], "logits"))
        selected["greedy ens."] = ge.selected
        if align and align_status.get("weight_matching", "") != "unavailable":
            try:
                aligned = average(align_models(ms, reference=best, method="weight_matching", data=held))
                if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in aligned.modules()):
                    # Averaging aligned units shrinks activations; stale BN statistics then wreck the soup
                    # (REPAIR, Jordan et al. 2023). Recompute them on held-out data, as re-basin papers do.
                    from mergelab.merge.repair import reset_batchnorm

                    aligned = reset_batchnorm(aligned, held)
                out["aligned soup"] = correct(predict_logits(aligned, test))
                align_status["weight_matching"] = "used"
            except AlignmentUnavailable as err:
                log.warning("rethinking: %s; no aligned soup", err)
                align_status["weight_matching"] = "unavailable"
                align_status["reason"] = str(err)
    return results


# -- stability -----------------------------------------------------------------------------------------------


def _parse_perturbation(spec: str) -> tuple[str, str, str | None]:
    """``"scale:all"``, ``"noise:one"``, ``"scale_head:all"``, ``"scale_first:one"`` → (kind, who, layers)."""
    try:
        kind, members = spec.split(":")
    except ValueError:
        raise ValueError(
            f"stability perturbation {spec!r} must look like 'scale:all' or 'noise:one'"
        ) from None
    layers = None
    if kind.startswith("scale_"):
        kind, layers = "scale", kind.split("_", 1)[1]
        if layers not in ("head", "first"):
            raise ValueError(f"stability perturbation {spec!r}: layer must be 'head' or 'first'")
    if kind not in ("scale", "noise") or members not in ("all", "one", "all_but_one"):
        raise ValueError(
            f"stability perturbation {spec!r}: kind must be scale|scale_head|scale_first|noise and members "
            "all|one|all_but_one"
        )
    return kind, members, layers


def _systems(held: Batches) -> dict[str, Callable[[list[nn.Module]], nn.Module]]:
    from mergelab.merge.average import average
    from mergelab.merge.ensemble import Ensemble, greedy_ensemble
    from mergelab.merge.soup import greedy_soup

    return {
        "single (member 0)": lambda ms: ms[0],
        "soup": lambda ms: average(ms),
        "greedy soup": lambda ms: greedy_soup(ms, data=held),
        "logit ens.": lambda ms: Ensemble(ms, "logits", copy=False),
        "prob. ens.": lambda ms: Ensemble(ms, "probs", copy=False),
        "feat. ens. (first head)": lambda ms: Ensemble(ms, "features", head="first", copy=False),
        "feat. ens. (avg head)": lambda ms: Ensemble(ms, "features", head="average", copy=False),
        "greedy ens.": lambda ms: greedy_ensemble(ms, held),
    }


def _stability(
    members: list[nn.Module],
    held: TensorDataset,
    test: TensorDataset,
    cfg: RethinkingConfig,
    path: Path,
    title: str,
) -> tuple[dict[str, list[dict[str, Any]]], Path]:
    from mergelab.analysis.stability import plot_stability, stability_curve

    held_loader, test_loader = _batches(held), _batches(test)
    systems = _systems(held_loader)
    curves: dict[str, list[dict[str, Any]]] = {}
    for spec in cfg.stability_perturbations:
        kind, who, layers = _parse_perturbation(spec)
        levels = cfg.scale_factors if kind == "scale" else cfg.noise_levels
        curves[spec] = stability_curve(
            systems,
            members,
            test_loader,
            levels,
            kind=kind,  # type: ignore[arg-type]
            members=who,
            layers=layers,
            seed=0,
        )
    res = plot_stability(curves, path, title=title)
    return curves, res.path


# -- weight patterns -----------------------------------------------------------------------------------------


def _patterns(
    cfg: RethinkingConfig, out: Path, trained: dict[Any, dict[str, Any]]
) -> tuple[dict[str, Any], list[tuple[str, Path, str]]]:
    from mergelab.analysis.weight_patterns import (
        class_template_figure,
        template_mix_figure,
        unit_template_figure,
        unit_template_stats,
    )

    s = cfg.seeds[0]
    numbers: dict[str, Any] = {}
    figs: list[tuple[str, Path, str]] = []
    for d in cfg.datasets:
        data = _dataset(d, cfg.data_root)
        models = {}
        for i in range(cfg.pattern_models):
            m = _build("mlp", {"depth": 0}, d, 0, cfg.data_root)
            m.load_state_dict(trained[("lin", d, i)]["state_dict"])
            models[f"linear {i}"] = m.eval()
        entry: dict[str, Any] = {
            "linear_test_accuracy": [
                trained[("lin", d, i)]["test_accuracy"] for i in range(cfg.pattern_models)
            ]
        }
        if len(models) >= 1:
            res = class_template_figure(
                models,
                data.train,
                out / f"patterns_classes_{d}.png",
                num_classes=data.num_classes,
                class_names=data.class_names,
            )
            entry["class_templates"] = {
                k: {kk: vv for kk, vv in v.items() if kk != "corr"} for k, v in res.numbers.items()
            }
            figs.append((f"{d}: class templates", res.path, "classes"))
            pairs = [p for p in cfg.pattern_pairs if max(p) < data.num_classes]
            if pairs:
                res = template_mix_figure(
                    models["linear 0"],
                    data.train,
                    pairs,
                    out / f"patterns_mix_{d}.png",
                    num_classes=data.num_classes,
                )
                entry["template_mix"] = res.numbers
                figs.append((f"{d}: template mixes", res.path, "mix"))
        units: dict[str, Any] = {}
        for arch in ("mlp", "cnn"):
            if arch not in cfg.archs:
                continue
            for pool in cfg.pools:
                if max(cfg.n_members) < 2:
                    continue
                ms = _members(
                    {
                        "arch": arch,
                        "kwargs": cfg.arch_kwargs(arch, d),
                        "dataset": d,
                        "state_dicts": [trained[(d, arch, s, pool, i)]["state_dict"] for i in (0, 1)],
                    }
                )
                # One figure per dataset and arch (independent pool: where matching matters); numbers for all.
                if pool == "independent" or (pool == cfg.pools[0] and "independent" not in cfg.pools):
                    path = out / f"patterns_units_{d}_{arch}_{pool}.png"
                    res = unit_template_figure(ms, path, names=["member 0", "member 1"])
                    figs.append((f"{d}: first-layer units of two {pool} {arch} members", res.path, "units"))
                units[f"{arch}/{pool}"] = unit_template_stats(ms)
        entry["first_layer_units"] = units
        numbers[d] = entry
    return numbers, figs


# -- report --------------------------------------------------------------------------------------------------


def _fmt_ci(mean: float, lo: float, hi: float) -> str:
    if math.isnan(mean):
        return "—"
    if math.isnan(lo):
        return f"{mean:.3f}"
    return f"{mean:.3f} (±{(hi - lo) / 2:.3f})"


def _seed_differences(
    results: dict[tuple[str, str, str, int], dict[str, list[np.ndarray]]],
    cfg: RethinkingConfig,
    pool: str,
    n: int,
    x: str,
    y: str | None,
) -> list[float] | None:
    """Per seed: accuracy of ``x`` minus ``y`` (or ``x`` alone), averaged over datasets and architectures."""
    per_seed: list[list[float]] = [[] for _ in cfg.seeds]
    for d in cfg.datasets:
        for a in cfg.archs:
            r = results.get((d, a, pool, n))
            if not r or x not in r or (y is not None and y not in r):
                continue
            for i in range(len(cfg.seeds)):
                per_seed[i].append(float(r[x][i].mean()) - (float(r[y][i].mean()) if y is not None else 0.0))
    if not per_seed[0]:
        return None
    return [float(np.mean(v)) for v in per_seed]


def _claims(
    cfg: RethinkingConfig,
    results: dict[tuple[str, str, str, int], dict[str, list[np.ndarray]]],
    stability_seeds: dict[str, dict[int, Any]],
) -> list[Claim]:
    """The paper's claims per pool kind, with seed-level intervals and computed verdicts."""
    n = max(cfg.n_members)
    out: list[Claim] = []
    soup_paper = {
        "pretrained": "model soups, ViT-B/32: uniform soup 79.97 vs best individual 80.39; pilot shared-init soup 0.977",
        "shared": "pilot (digits MLP, N=5): shared-init soup 0.977 vs logit ens. 0.975",
        "independent": "pilot (digits MLP, N=5): independent soup 0.645 vs logit ens. 0.975",
    }  # fmt: skip
    for pool in cfg.pools:
        setting = f"{pool} pool, N={n}, {'/'.join(cfg.archs)}"
        d = _seed_differences(results, cfg, pool, n, "soup", "logit ens.")
        if d is None:
            continue
        if pool == "independent":
            out.append(claim("Without a shared start, the uniform soup breaks (trails the logit ensemble by > 0.1)",
                             "acc.: logit ens. − soup", [-v for v in d], direction="greater", margin=0.1,
                             setting=setting, paper=soup_paper[pool]))  # fmt: skip
        else:
            out.append(claim(f"The uniform soup matches the logit ensemble (abs. gap < {cfg.soup_margin})",
                             "acc.: soup − logit ens.", d, direction="within", margin=cfg.soup_margin,
                             setting=setting, paper=soup_paper.get(pool, "—")))  # fmt: skip
            f = _seed_differences(results, cfg, pool, n, "feat. ens. (avg head)", "soup")
            if f is not None:
                out.append(claim(f"Weight averaging behaves like feature averaging (abs. gap < {cfg.soup_margin})",
                                 "acc.: feat. ens. (avg head) − soup", f, direction="within",
                                 margin=cfg.soup_margin, setting=setting,
                                 paper="Rethinking: soup ≈ feature ensemble within one basin"))  # fmt: skip
            g = _seed_differences(results, cfg, pool, n, "greedy soup", "best indiv.")
            if g is not None:
                out.append(claim("The greedy soup beats the best individual", "acc.: greedy soup − best indiv.", g,
                                 direction="greater", setting=setting,
                                 paper="model soups, ViT-B/32: 81.03 vs 80.39"))  # fmt: skip
        if pool == "independent":
            al = _seed_differences(results, cfg, pool, n, "aligned soup", "soup")
            if al is not None:
                out.append(claim("Weight matching before averaging rescues the independent soup",
                                 "acc.: aligned soup − soup", al, direction="greater", setting=setting,
                                 paper="Git Re-Basin MergeMany: merged loss 0.0727 vs 0.11–0.15 inputs"))  # fmt: skip
        if len(cfg.n_members) > 1 and pool != "independent":
            lo_n = min(cfg.n_members)
            big = _seed_differences(results, cfg, pool, n, "soup", None)
            small = _seed_differences(results, cfg, pool, lo_n, "soup", None)
            if big is not None and small is not None:
                out.append(claim(f"Larger pools make better soups (N={n} vs N={lo_n})", f"soup acc.: N={n} − N={lo_n}",
                                 big, small, direction="greater", setting=setting,
                                 paper="Rethinking: N ∈ {2,3,5,7,10}; soups gain with N in one basin"))  # fmt: skip
    for label, by_seed in stability_seeds.items():
        seeds = sorted(by_seed)
        for spec in ("scale:one", "scale:all"):
            if not all(spec in by_seed[s] for s in seeds):
                continue
            vals: dict[str, list[float]] = {"soup": [], "logit ens.": []}
            for s in seeds:
                curve = by_seed[s][spec]
                top = max(r["level"] for r in curve)
                for system in vals:
                    vals[system].append(
                        next(r["agreement"] for r in curve if r["level"] == top and r["system"] == system)
                    )
            top = max(r["level"] for r in by_seed[seeds[0]][spec])
            out.append(claim(f"Under ×{top:g} scaling ({spec.split(':')[1]}), the soup's predictions are more stable "
                             "than the logit ensemble's", f"agreement with unperturbed: soup − logit ens. @×{top:g}",
                             vals["soup"], vals["logit ens."], direction="greater",
                             setting=f"{label}, {cfg.stability_pool} pool, N={n}",
                             paper="Rethinking: weight averaging stabilises predictions under ×100 scaling"))  # fmt: skip
    return out


def _write_report(
    report: Report,
    cfg: RethinkingConfig,
    results: dict[tuple[str, str, str, int], dict[str, list[np.ndarray]]],
    kept: dict[tuple[str, str, str, int], dict[str, list[int]]],
    pre_acc: dict[tuple[str, str, int], float],
    stability: dict[str, Any],
    stab_figs: list[tuple[str, Path]],
    patterns: dict[str, Any],
    pattern_figs: list[tuple[str, Path, str]],
    align_status: dict[str, str],
    elapsed: float,
    train_seconds: float,
    n_jobs: int,
    executor: Executor,
) -> None:
    n_max = max(cfg.n_members)
    report.text(
        "This study asks **when averaging the weights of several trained networks (a *model soup*) works as "
        "well as averaging what they compute (an *ensemble*)**, following Wang et al., *Rethinking "
        "Weight-Averaged Model-merging* (2024), at a scale that runs on a laptop CPU: scikit-learn's 8×8 "
        f"digits and MNIST-1D, small {', '.join(cfg.archs)} models, seeds {list(cfg.seeds)}, pools of up to "
        f"{n_max} members."
    )
    report.text(
        "Vocabulary. A **soup** is one network whose weights are the average of the members' weights "
        "(*uniform soup*); a **greedy soup** adds members best-first and keeps each only if accuracy on a "
        "held-out part of the training data does not drop. A **logit / probability ensemble** runs every "
        "member and averages their logits / softmax probabilities. A **feature ensemble** averages the "
        "members' penultimate features and classifies them with the first member's head or with the averaged "
        "head — the paper's claim is that weight averaging in one basin behaves like this feature averaging. "
        "A **greedy ensemble** selects members like the greedy soup. The **pool kind** says where the "
        "members come from: *pretrained* = one backbone pretrained on classes "
        f"{list(cfg.pretrain_classes)} only, then {n_max} copies fine-tuned on all classes, all starting "
        "from the same new head, each with its own data order "
        f"and a learning rate from {list(cfg.finetune_lrs)} (the paper's and the model-soup setting); "
        + (
            "*pretrained_random_head* = the same, but every copy starts from its own random head; "
            if "pretrained_random_head" in cfg.pools
            else ""
        )
        + "*shared* = trained from scratch from one shared random initialisation with different data orders; "
        "*independent* = trained from scratch from different random initialisations."
    )
    report.text(
        f"Setup: {cfg.epochs} epochs of Adam (lr {cfg.lr}, cosine schedule, batch {cfg.batch_size}) from "
        f"scratch, {cfg.pretrain_epochs} epochs of pretraining, {cfg.finetune_epochs} epochs of "
        f"fine-tuning; {cfg.heldout_fraction:.0%} of each training "
        "split is held out for the greedy selections and never trained on; accuracies are on the test split "
        "(digits: 450 images, MNIST-1D: 1000 series). Each cell is the mean over seeds; **(±h)** is the "
        f"half-width of a 95% Student-t interval over the {len(cfg.seeds)} seeds (each seed trains its own "
        "pool), i.e. how much the number could move with another training run. Model sizes: "
        + ", ".join(f"{d}/{a} {json.dumps(cfg.arch_kwargs(a, d))}" for d in cfg.datasets for a in cfg.archs)
        + f". Runtime {elapsed / 60:.1f} min ({n_jobs} training jobs, {train_seconds:.0f} CPU-s of training, "
        f"backend {executor.backend}) on {platform.machine()} with {os.cpu_count()} logical CPUs."
    )

    # Summary across datasets and archs.
    report.heading("Summary: does the pool kind decide?")
    report.text(
        f"Per pool kind at N={n_max}: each column is a paired difference in test accuracy (positive = the "
        "first method is better), averaged over datasets and architectures within each seed, then a 95% "
        f"Student-t interval over the {len(cfg.seeds)} seeds, printed as mean [low, high]. *Soup − logit ens.* "
        "near zero means weight averaging is as good as ensembling; strongly negative means the soup broke."
    )
    summary_rows = []
    summary_metrics: dict[str, Any] = {}
    for pool in cfg.pools:
        row: dict[str, object] = {"pool": pool}
        for label, (x, y) in _SUMMARY_PAIRS.items():
            diffs = _seed_differences(results, cfg, pool, n_max, x, y)
            if diffs is None:
                continue
            iv = paired_interval(diffs)
            row[label] = iv.format(3)
            summary_metrics.setdefault(pool, {})[label] = iv.to_dict() | {"per_seed": diffs}
        summary_rows.append(row)
    report.table(summary_rows)
    report.metrics["summary"] = summary_metrics

    # Per (dataset, arch) tables.
    report.heading("Merging vs ensembling, per dataset and architecture")
    report.text(
        "One table per dataset and architecture. Rows: pool kind and number of members N (the first N of the "
        "pool). Columns: *indiv. mean* = average test accuracy of the N members; *best indiv.* = the member "
        "with the best held-out accuracy; then the soups and ensembles defined above; *aligned soup* = "
        "uniform soup after weight matching every member to the best one (independent pools only, when "
        "available; for nets with BatchNorm its statistics are then recomputed on the held-out data). The "
        "greedy columns also give the mean number of members kept."
    )
    table_metrics: dict[str, Any] = {}
    for d in cfg.datasets:
        for a in cfg.archs:
            rows = []
            for pool in cfg.pools:
                for n in cfg.n_members:
                    r = results.get((d, a, pool, n))
                    if not r:
                        continue
                    row: dict[str, object] = {"pool": pool, "N": n}
                    for col in METHOD_COLUMNS:
                        if col not in r:
                            row[col] = "—"
                            continue
                        per_seed = [float(v.mean()) for v in r[col]]
                        iv = paired_interval(per_seed)
                        mean, lo, hi = iv.mean, iv.low, iv.high
                        cell = _fmt_ci(mean, lo, hi)
                        ks = kept.get((d, a, pool, n), {}).get(col)
                        if ks:
                            cell += f" [{np.mean(ks):.1f}/{n}]"
                        row[col] = cell
                        table_metrics.setdefault(f"{d}/{a}/{pool}/N={n}", {})[col] = {
                            "mean": mean,
                            "ci95": [lo, hi],
                            "per_seed": per_seed,
                        }
                    rows.append(row)
            if not rows:
                continue
            report.heading(f"{d} / {a}", level=3)
            pre = [pre_acc[(d, a, s)] for s in cfg.seeds if (d, a, s) in pre_acc]
            if pre:
                report.text(
                    f"Pretrained backbones ({len(cfg.pretrain_classes)}-class upstream task) reach "
                    f"{np.mean(pre):.3f} test accuracy on all 10 classes before fine-tuning (they never saw "
                    "the other classes)."
                )
            report.table(rows)
    report.metrics["tables"] = table_metrics
    if align_status:
        report.metrics["alignment"] = align_status
        if align_status.get("weight_matching") == "unavailable":
            report.text(
                f"*Aligned soup not computed: {align_status.get('reason', 'weight matching unavailable')}.*"
            )

    # Stability.
    report.heading("Stability under parameter scaling")
    report.text(
        "Each figure takes one pool and multiplies **all tensors** (weights, biases and normalisation "
        "statistics, as the paper's code scales the whole state dict) of some members by a factor (x-axis, "
        "log scale), or multiplies every parameter by "
        "1 + σ·noise. Rows: which members are perturbed — *all*, *one* (member 0) or *all but one* (all but "
        "the last); columns: test accuracy, NLL, and *agreement* = share of test examples whose prediction "
        "equals the unperturbed system's. The table after each figure gives the values at the largest factor "
        "(and largest noise), plus the *flip rate* = share of examples the unperturbed system got right and "
        "the perturbed one gets wrong. Note that even a single ReLU network changes under uniform scaling "
        "when it has biases: layer l's activations grow like c^l but its bias only like c."
    )
    report.metrics["stability"] = stability
    for label, fig in stab_figs:
        report.heading(label, level=3)
        report.figure(fig, f"Stability of soups and ensembles, {label}")
        rows = []
        for spec, curve in stability[label].items():
            top = max(r["level"] for r in curve)
            for r in curve:
                if r["level"] == top:
                    rows.append(
                        {
                            "perturbation": f"{spec} @ {top:g}",
                            "system": r["system"],
                            "accuracy": r["accuracy"],
                            "NLL": _fmt_nll(r["nll"]),
                            "agreement": r["agreement"],
                            "flip rate": r["flip_rate"],
                        }
                    )
        report.table(rows, digits=3)

    # Patterns.
    if patterns:
        report.heading("Weight patterns")
        report.text(
            "Top figure per dataset: the first row shows each class's mean training input, the second the "
            "same minus the mean over all classes (what a template should resemble); the next rows show the "
            "weights of linear classifiers (one row of weights per class, reshaped to the input), "
            "each trained with another seed, and the row of their weight average. *r* is the mean "
            "correlation of a class's template with its own class mean (both centred over classes, because a "
            "softmax classifier only identifies the templates' differences). For linear classifiers the "
            "classes fix the "
            "order of the units, so naive and aligned averages coincide. The *template mixes* figure "
            "averages two classes' templates and compares them with the average of the two class means. The "
            "*first-layer units* figure shows hidden units (MLP) or kernels (CNN) of two members of one pool "
            "after matching them to member 0 (Hungarian on first-layer weights), their naive average (unit j "
            "with unit j) and their matched average; |avg|/|w| is the norm of the averaged units relative to "
            "a member's — near 1 when units agree, lower when averaging cancels them."
        )
        rows = []
        for d, entry in patterns.items():
            for name, v in entry["class_templates"].items():
                rows.append(
                    {
                        "dataset": d,
                        "templates of": name,
                        "corr. with own class mean": v["diag_corr"],
                        "share matching own class best": v["own_class_best"],
                    }
                )
        report.table(rows, digits=3)
        rows = []
        for d, entry in patterns.items():
            for key, v in entry.get("first_layer_units", {}).items():
                rows.append(
                    {
                        "dataset": d,
                        "arch/pool": key,
                        "unit corr. naive": v["corr_naive"],
                        "unit corr. matched": v["corr_aligned"],
                        "|avg|/|w| naive": v["norm_ratio_naive"],
                        "|avg|/|w| matched": v["norm_ratio_aligned"],
                    }
                )
        if rows:
            report.text(
                "First-layer units of members 0 and 1 of every pool: mean correlation of matching units "
                "before (unit j with unit j) and after Hungarian matching, and the norm ratio of the "
                "averaged units."
            )
            report.table(rows, digits=3)
        rows = []
        for d, entry in patterns.items():
            for pair, v in entry.get("template_mix", {}).items():
                rows.append(
                    {
                        "dataset": d,
                        "pair": pair,
                        "corr(avg template, avg mean)": v["corr_mix"],
                        "p(a) on avg mean": v["p_a"],
                        "p(b) on avg mean": v["p_b"],
                    }
                )
        if rows:
            report.text(
                "Template mixes: the averaged template of classes a and b correlates with the averaged class "
                "mean, and the linear classifier splits its probability between a and b on that mixed input."
            )
            report.table(rows, digits=3)
        for label, fig, _ in pattern_figs:
            report.figure(fig, label)
        report.metrics["patterns"] = patterns

    report.heading("Findings at this scale")
    for line in _findings(cfg, results, summary_metrics, stability):
        report.text(f"- {line}")


_SUMMARY_PAIRS: dict[str, tuple[str, str]] = {
    "soup − logit ens.": ("soup", "logit ens."),
    "soup − indiv. mean": ("soup", "indiv. mean"),
    "greedy soup − best indiv.": ("greedy soup", "best indiv."),
    "feat. ens. (avg head) − logit ens.": ("feat. ens. (avg head)", "logit ens."),
    "aligned soup − soup": ("aligned soup", "soup"),
}


def _findings(
    cfg: RethinkingConfig,
    results: dict[tuple[str, str, str, int], dict[str, list[np.ndarray]]],
    summary: dict[str, Any],
    stability: dict[str, Any],
) -> list[str]:
    """Plain-language statements generated from the numbers (so they can never drift from them)."""
    lines = []
    for pool, m in summary.items():
        for label, g in m.items():
            lines.append(
                f"{pool} pool, {label}: {g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}] over {g['n']} seeds "
                f"at N={max(cfg.n_members)} (verdicts: the claims table at the top)."
            )
    for label, curves in stability.items():
        for spec, curve in curves.items():
            if not curve:
                continue
            top = max(r["level"] for r in curve)
            low = min(r["level"] for r in curve)
            acc = {r["system"]: r["accuracy"] for r in curve if r["level"] == top}
            base = {r["system"]: r["accuracy"] for r in curve if r["level"] == low}
            kept = [k for k, v in acc.items() if v >= base.get(k, math.inf) - 0.02]
            parts = ", ".join(f"{k} {base.get(k, math.nan):.3f}→{v:.3f}" for k, v in acc.items())
            lines.append(
                f"{label}, {spec} at {top:g}: {parts}. "
                f"Within 0.02 of unperturbed: {', '.join(kept) or 'none'}."
            )
    return lines


def _fmt_nll(x: float) -> str:
    return "—" if not math.isfinite(x) else (f"{x:.3f}" if x < 1e4 else f"{x:.1e}")
