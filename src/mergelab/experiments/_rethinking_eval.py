"""The ``rethinking`` study's analysis jobs: soups vs ensembles on one pool, stability under scaling, and the
weight-pattern figures."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from mergelab.experiments._rethinking_config import METHOD_COLUMNS, RethinkingConfig, parse_perturbation
from mergelab.experiments._training import TrainJob, TrainResult, tensor_batches

log = logging.getLogger(__name__)

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PoolJob:
    """Evaluate the soups and ensembles of one pool (the first ``n`` members, for each ``n`` in ``ns``)."""

    key: tuple[str, str, int, str]  # dataset, arch, seed, pool
    members: tuple[TrainJob, ...]
    held_accs: tuple[float, ...]  # members' held-out accuracies (greedy order, best individual)
    ns: tuple[int, ...]
    align: bool  # add an aligned soup (weight matching)
    threads: int = 1


@dataclass(frozen=True)
class StabilityJob:
    """Stability curves of one pool's systems under scaling or noise, and their figure."""

    key: tuple[str, str, int]  # dataset, arch, seed
    members: tuple[TrainJob, ...]
    perturbations: tuple[str, ...]
    scale_factors: tuple[float, ...]
    noise_levels: tuple[float, ...]
    path: str
    title: str
    threads: int = 1


def analysis_job(job: PoolJob | StabilityJob) -> dict[str, Any]:
    """Evaluate one pool or run its stability curves (top-level, so worker processes and Ray can run it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        first = job.members[0]
        _, held, test = first.data.splits(first.device)
        members = [m.load(first.device) for m in job.members]
        if isinstance(job, StabilityJob):
            curves, path = _stability(members, held, test, job)
            return {"kind": "stability", "key": job.key, "curves": curves, "path": str(path)}
        status: dict[str, str] = {}
        results = _evaluate_pool(
            members,
            list(job.held_accs),
            tensor_batches(held),
            tensor_batches(test),
            job.ns,
            job.align,
            status,
        )
        return {"kind": "evaluate", "key": job.key, "results": results, "align_status": status}
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
    members: list[nn.Module], held: TensorDataset, test: TensorDataset, job: StabilityJob
) -> tuple[dict[str, list[dict[str, Any]]], Path]:
    from mergelab.analysis.stability import plot_stability, stability_curve

    held_loader, test_loader = tensor_batches(held), tensor_batches(test)
    systems = _systems(held_loader)
    curves: dict[str, list[dict[str, Any]]] = {}
    for spec in job.perturbations:
        kind, who, layers = parse_perturbation(spec)
        levels = job.scale_factors if kind == "scale" else job.noise_levels
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
    res = plot_stability(curves, Path(job.path), title=job.title)
    return curves, res.path


# -- weight patterns -----------------------------------------------------------------------------------------


def patterns(
    cfg: RethinkingConfig, out: Path, jobs: dict[Any, TrainJob], trained: dict[Any, TrainResult]
) -> tuple[dict[str, Any], list[tuple[str, Path, str]]]:
    """Class templates of linear classifiers, their mixes, and first-layer units of two members per pool."""
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
        data = jobs[("lin", d, 0)].data.load()
        models = {f"linear {i}": jobs[("lin", d, i)].load("cpu") for i in range(cfg.pattern_models)}
        entry: dict[str, Any] = {
            "linear_test_accuracy": [trained[("lin", d, i)].test_accuracy for i in range(cfg.pattern_models)]
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
                ms = [jobs[(d, arch, s, pool, i)].load("cpu") for i in (0, 1)]
                # One figure per dataset and arch (independent pool: where matching matters); numbers for all.
                if pool == "independent" or (pool == cfg.pools[0] and "independent" not in cfg.pools):
                    path = out / f"patterns_units_{d}_{arch}_{pool}.png"
                    res = unit_template_figure(ms, path, names=["member 0", "member 1"])
                    figs.append((f"{d}: first-layer units of two {pool} {arch} members", res.path, "units"))
                units[f"{arch}/{pool}"] = unit_template_stats(ms)
        entry["first_layer_units"] = units
        numbers[d] = entry
    return numbers, figs
