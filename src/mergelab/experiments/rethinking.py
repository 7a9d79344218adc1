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
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from mergelab.experiments._rethinking_config import (
    DEFAULT_MODEL_KWARGS,
    METHOD_COLUMNS,
    POOL_KINDS,
    PRESETS,
    RethinkingConfig,
)
from mergelab.experiments._rethinking_eval import PoolJob, StabilityJob, analysis_job, patterns
from mergelab.experiments._rethinking_report import claims, write_report
from mergelab.experiments._study import apply_preset, check_data_root, resolve_device
from mergelab.experiments._training import DataSpec, ModelSpec, TrainJob, TrainResult, run_train_job
from mergelab.experiments.runner import Executor, register_study
from mergelab.report import Report
from mergelab.train import TrainConfig

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL_KWARGS",
    "METHOD_COLUMNS",
    "POOL_KINDS",
    "PRESETS",
    "RethinkingConfig",
    "rethinking",
]


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
    jobs = _train_jobs(cfg, out)
    pre_jobs = {k: j for k, j in jobs.items() if k[0] == "pre"}
    trained: dict[Any, TrainResult] = dict(
        zip(pre_jobs, executor.map(run_train_job, list(pre_jobs.values()), desc="pretrain"), strict=True)
    )
    pre_acc = {k[1:]: float(r.test_accuracy or 0.0) for k, r in trained.items()}

    # 2. Train every pool's members (fine-tuned copies start from their backbone's checkpoint).
    member_jobs = {k: j for k, j in jobs.items() if k[0] != "pre"}
    trained.update(
        zip(member_jobs, executor.map(run_train_job, list(member_jobs.values()), desc="members"), strict=True)
    )
    log.info("rethinking: %d models trained after %.1fs", len(jobs), time.perf_counter() - t_start)
    train_seconds = sum(r.cpu_seconds for r in trained.values())

    # 3. Evaluate soups and ensembles per (dataset, arch, seed, pool) and N; 4. stability under scaling.
    analysis_jobs: list[PoolJob | StabilityJob] = [
        PoolJob(
            key=(d, a, s, pool),
            members=tuple(jobs[(d, a, s, pool, i)] for i in range(n_max)),
            held_accs=tuple(float(trained[(d, a, s, pool, i)].heldout_accuracy or 0.0) for i in range(n_max)),
            ns=tuple(cfg.n_members),
            align=cfg.align_independent and pool == "independent",
            threads=cfg.torch_threads,
        )
        for d, a, s in settings
        for pool in cfg.pools
    ]
    if cfg.stability_pool in cfg.pools:
        analysis_jobs += [
            StabilityJob(
                key=(d, a, s),
                members=tuple(jobs[(d, a, s, cfg.stability_pool, i)] for i in range(n_max)),
                perturbations=tuple(cfg.stability_perturbations),
                scale_factors=tuple(cfg.scale_factors),
                noise_levels=tuple(cfg.noise_levels),
                path=str(
                    out
                    / (f"stability_{d}_{a}.png" if s == cfg.seeds[0] else f"stability_{d}_{a}_seed{s}.png")
                ),
                title=f"{d} / {a} / {cfg.stability_pool} pool, N={n_max}, seed {s}",
                threads=cfg.torch_threads,
            )
            for d, a, s in settings
            if a in cfg.stability_archs
        ]
    results: dict[tuple[str, str, str, int], dict[str, list[np.ndarray]]] = {}
    kept: dict[tuple[str, str, str, int], dict[str, list[int]]] = {}
    align_status: dict[str, str] = {}
    stability: dict[str, Any] = {}  # "dataset/arch" -> curves of the first seed (figures, tables)
    stability_seeds: dict[
        str, dict[int, Any]
    ] = {}  # "dataset/arch" -> seed -> curves (the claims' intervals)
    stab_figs: list[tuple[str, Path]] = []
    for r in executor.map(analysis_job, analysis_jobs, desc="analysis"):
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
    pattern_numbers: dict[str, Any] = {}
    pattern_figs: list[tuple[str, Path, str]] = []
    if cfg.patterns:
        pattern_numbers, pattern_figs = patterns(cfg, out, jobs, trained)

    # 6. Report.
    elapsed = time.perf_counter() - t_start
    write_report(
        report,
        cfg,
        results,
        kept,
        pre_acc,
        stability,
        stab_figs,
        pattern_numbers,
        pattern_figs,
        align_status,
        elapsed,
        train_seconds,
        len(jobs),
        executor,
    )
    report.metrics["stability_per_seed"] = stability_seeds
    report.claims(
        claims(cfg, results, stability_seeds),
        "Every interval is a 95 % Student-t interval over training seeds (each seed has its own pools, "
        "pretrained backbone and held-out split); within a seed the values are averaged over the "
        "architectures, and paired differences are taken within the seed. Test samples are never resampled: "
        "they are not independent replications of training.",
    )
    return report


def _train_jobs(cfg: RethinkingConfig, out: Path) -> dict[tuple[Any, ...], TrainJob]:
    """Every model the study trains, by key: ``("pre", d, a, s)`` backbones, ``(d, a, s, pool, i)`` pool
    members, ``("lin", d, i)`` linear classifiers for the weight patterns."""
    jobs: dict[tuple[Any, ...], TrainJob] = {}
    train = TrainConfig(lr=cfg.lr, batch_size=cfg.batch_size, progress=False)
    common = {"evaluate": True, "device": cfg.device, "threads": cfg.torch_threads}

    def data(d: str, s: int, **kw: Any) -> DataSpec:
        # the held-out slice (greedy selection data, never trained on) depends only on the seed
        return DataSpec(d, cfg.data_root, holdout=cfg.heldout_fraction, holdout_seed=10_000 + s, **kw)

    for d in cfg.datasets:
        for a in cfg.archs:
            model = ModelSpec(a, cfg.arch_kwargs(a, d))
            for s in cfg.seeds:
                pre = None
                if any(p.startswith("pretrained") for p in cfg.pools):
                    pre = TrainJob(
                        name=f"{d}-{a}/seed-{s}/pretrained", model=model, init_seed=1000 + s,
                        data=data(d, s, classes=tuple(cfg.pretrain_classes), relabel=False),
                        train=dataclasses.replace(train, epochs=cfg.pretrain_epochs, data_seed=1000 + s), **common,
                    ).at(out)  # fmt: skip
                    jobs[("pre", d, a, s)] = pre
                for pool in cfg.pools:
                    for i in range(max(cfg.n_members)):
                        name = f"{d}-{a}/seed-{s}/{pool}-{i}"
                        if pool.startswith("pretrained"):
                            # Model-soup recipe: all copies start from one new head; the variant gives each its own.
                            head_seed = 5000 + 100 * s + (i if pool == "pretrained_random_head" else 0)
                            lr = cfg.finetune_lrs[i % len(cfg.finetune_lrs)]
                            job = TrainJob(
                                name=name, data=data(d, s), model=model, init_seed=1000 + s, init=pre,
                                head_seed=head_seed, **common,
                                train=dataclasses.replace(train, epochs=cfg.finetune_epochs, lr=lr, data_seed=100 * s + i),
                            )  # fmt: skip
                        else:
                            job = TrainJob(
                                name=name, data=data(d, s), model=model, **common,
                                init_seed=s if pool == "shared" else 100 * s + i,
                                train=dataclasses.replace(train, epochs=cfg.epochs, data_seed=100 * s + i),
                            )  # fmt: skip
                        jobs[(d, a, s, pool, i)] = job.at(out)
        if cfg.patterns:  # linear classifiers for the weight-pattern figures train alongside the members
            for i in range(cfg.pattern_models):
                jobs[("lin", d, i)] = TrainJob(
                    name=f"{d}-linear/{i}", data=data(d, cfg.seeds[0]), model=ModelSpec("mlp", {"depth": 0}),
                    init_seed=7000 + i, **common,
                    train=dataclasses.replace(
                        train, epochs=cfg.pattern_epochs, data_seed=7000 + i, weight_decay=cfg.pattern_weight_decay
                    ),
                ).at(out)  # fmt: skip
    return jobs
