"""The ``rethinking`` study's report: claims with seed-level intervals, tables, figures and findings."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from mergelab.analysis.verdict import Claim, claim, paired_interval
from mergelab.experiments._rethinking_config import METHOD_COLUMNS, RethinkingConfig
from mergelab.experiments.runner import Executor
from mergelab.report import Report


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


def claims(
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


def write_report(
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
