"""Linear mode connectivity study: barriers naive vs weight matching vs activation matching (± reset / REPAIR).

What the papers claim and what this study checks, per (dataset, architecture, width), over independent seed
pairs (every claim's interval is over seed pairs, see :mod:`mergelab.analysis.verdict`):

* Git Re-Basin (Ainsworth et al., ICLR 2023): permutation alignment removes most of the loss barrier between
  independently trained networks (MLPs on MNIST: ≈ 0), and the aligned barrier shrinks as the width grows.
* REPAIR (Jordan et al., ICLR 2023): aligned interpolations of normalisation-free nets suffer variance collapse
  that REPAIR fixes (VGG11: 67.3 → 84.9 % midpoint accuracy); for BatchNorm nets resetting the statistics does
  most of it (ResNet-50 ImageNet midpoint: 0.28 % none, 53.4 % reset, 56.5 % REPAIR).

Each (dataset, architecture, width, seed pair) is one job, so the study spreads over any executor.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mergelab.analysis.verdict import Claim, claim
from mergelab.experiments._study import apply_preset, check_data_root, resolve_device
from mergelab.experiments._training import DataSpec, ModelSpec, TrainJob
from mergelab.experiments.runner import Executor, register_study
from mergelab.report import Report, mean_std
from mergelab.train import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMCConfig:
    """Settings of the ``lmc`` study; the defaults (30 jobs) used 565 CPU-s (about 5 minutes on 2 free cores)."""

    datasets: tuple[str, ...] = ("digits",)
    archs: tuple[str, ...] = ("mlp", "cnn", "resnet")
    # width multipliers relative to each architecture's base width (mlp 128, cnn 16, resnet ×1)
    widths: tuple[int, ...] = (1, 4)
    # ResNet's own widths: its ×4 cell alone took 3/4 of the default run's CPU time (conv cost grows as width²)
    resnet_widths: tuple[int, ...] = (1, 2)
    seed_pairs: int = 5
    epochs: int = 12
    lr: float = 3e-3
    batch_size: int = 128
    steps: int = 7  # λ grid; odd so the midpoint is on it
    mnist1d_samples: int = 5000
    max_batches: int = 4  # batches of 256 for activation statistics / REPAIR / evaluation per pass
    resnet_depth: int = 8
    all_paths: bool = False  # also weight matching + reset / + REPAIR (no claim uses them: ~15 % more time)
    preset: str = (
        "default"  # "paper": REPAIR / Git Re-Basin's CIFAR-10 ResNet-20 widths 1–8 (needs data_root)
    )
    device: str = "auto"  # "auto" = CUDA when present
    data_root: str = ""  # folder of a local dataset (cifar10 / cifar100 / mnist)


# The papers' setting: CIFAR-10, ResNet-20 (BatchNorm) at growing widths and a plain VGG, SGD-length training.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "datasets": ("cifar10",),
        "archs": ("resnet", "vgg"),
        "widths": (1, 2, 4, 8),
        "resnet_widths": (1, 2, 4, 8),
        "epochs": 100,
        "batch_size": 256,
        "steps": 11,
        "max_batches": 20,
        "resnet_depth": 20,
    }
}

_BASE_KWARGS: dict[str, Any] = {
    "mlp": lambda w, d: {"width": 128 * w, "depth": 3},
    "cnn": lambda w, d: {"width": 16 * w},
    "vgg": lambda w, d: {"width": 0.5 * w, "norm": None},
    "resnet": lambda w, d: {"width": w, "depth": d, "norm": "batchnorm"},
}


def _model_kwargs(arch: str, width: int, depth: int = 8) -> dict[str, Any]:
    if arch not in _BASE_KWARGS:
        raise ValueError(f"lmc study: no width rule for arch {arch!r}; choose from {sorted(_BASE_KWARGS)}")
    return _BASE_KWARGS[arch](width, depth)


@dataclass(frozen=True)
class PairJob:
    """One seed pair of one (dataset, architecture, width): train both, then measure the interpolation paths."""

    models: tuple[TrainJob, TrainJob]
    dataset: str
    arch: str
    width: int
    seeds: tuple[int, int]
    steps: int
    max_batches: int
    all_paths: bool = False


def lmc_job(job: PairJob) -> dict[str, Any]:
    """Train a seed pair (or load its checkpoints), then measure the interpolation curves between them (top-level
    for Ray)."""
    from mergelab.analysis.interpolate import interpolate
    from mergelab.merge.aligned import align_to

    torch.set_num_threads(1)
    spec = job.models[0]
    device = resolve_device(spec.device)
    train_ds, _, test_ds = spec.data.splits(device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for m in job.models:
        m.run()  # trains and saves the checkpoint (or finds it from an earlier run)
    a, b = (m.load(device) for m in job.models)
    t1 = time.perf_counter()
    train_loader = DataLoader(train_ds, batch_size=256)
    test_loader = DataLoader(test_ds, batch_size=512)
    has_bn = any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in a.modules())
    variants: dict[str, tuple[torch.nn.Module, str | None]] = {"naive": (b, None)}
    for method in ("weight_matching", "activation_matching"):
        aligned = align_to(a, b, method=method, data=train_loader, max_batches=job.max_batches)
        variants[method] = (aligned, None)
        # The claims compare reset and REPAIR on activation-matched pairs (REPAIR's own protocol); the same
        # corrections of weight-matched pairs are extra curves (``all_paths``).
        if method == "weight_matching" and not job.all_paths:
            continue
        if has_bn:
            variants[f"{method} + reset"] = (aligned, "reset")
        if method == "activation_matching" or not has_bn:
            variants[f"{method} + repair"] = (aligned, "repair")
    t2 = time.perf_counter()
    curves = {}
    for name, (bb, fix) in variants.items():
        c = interpolate(
            a, bb, train_loader, steps=job.steps, test_data=test_loader, repair=fix,
            max_batches=job.max_batches,
        )  # fmt: skip
        curves[name] = c.to_dict() | {"midpoint_test_accuracy": _midpoint(list(c.test_accuracy or ()))}
    t3 = time.perf_counter()
    timing = {
        "train_s": t1 - t0,
        "align_s": t2 - t1,
        "interpolate_s": t3 - t2,
        "cpu_s": time.process_time() - cpu0,
    }
    where = {"dataset": job.dataset, "arch": job.arch, "width": job.width, "seeds": job.seeds}
    return where | {"curves": curves, "timing": timing}


def _jobs(cfg: LMCConfig, out: Path) -> list[PairJob]:
    train = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, progress=False)
    jobs = []
    for d in cfg.datasets:
        data = DataSpec(d, cfg.data_root, {"num_samples": cfg.mnist1d_samples} if d == "mnist1d" else {})
        for a in cfg.archs:
            for w in cfg.resnet_widths if a == "resnet" else cfg.widths:
                model = ModelSpec(a, _model_kwargs(a, w, cfg.resnet_depth))
                for p in range(cfg.seed_pairs):
                    seeds = (2 * p, 2 * p + 1)
                    models = tuple(
                        TrainJob(
                            name=f"{d}-{a}-w{w}/seed-{s}", data=data, model=model,
                            train=dataclasses.replace(train, data_seed=s), init_seed=s, device=cfg.device,
                        ).at(out)
                        for s in seeds
                    )  # fmt: skip
                    jobs.append(PairJob(models, d, a, w, seeds, cfg.steps, cfg.max_batches, cfg.all_paths))  # type: ignore[arg-type]
    return jobs


@register_study("lmc", LMCConfig)
def lmc(cfg: LMCConfig, out: Path, executor: Executor) -> Report:
    """Loss/accuracy barriers between independently trained models, before and after alignment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = apply_preset(cfg, PRESETS, "lmc")
    check_data_root("lmc", cfg.datasets, cfg.data_root)
    resolve_device(cfg.device)  # fail before any job if CUDA was asked for and is absent
    report = Report(out, "Linear mode connectivity: naive vs aligned interpolation", config=vars(cfg))
    start = time.perf_counter()
    results = executor.map(lmc_job, _jobs(cfg, out), desc="seed pairs")
    report.metrics["wall_s"] = time.perf_counter() - start
    report.text(
        "Two networks of the same architecture are trained from different seeds. We evaluate the models on the "
        "straight line between them in weight space, `θ(λ) = (1−λ)·θ_A + λ·θ_B'`, where `B'` is B itself "
        "(*naive*) or B with its hidden units permuted to line up with A's (weight matching: Git Re-Basin's "
        "coordinate descent on weight similarity; activation matching: one assignment per layer on activation "
        "correlations). *+ reset* recomputes BatchNorm statistics at each interior point, *+ repair* rescales "
        "every channel to the interpolated endpoints' mean and std (REPAIR). The **loss barrier** is the largest "
        "rise of the train loss above the straight line between the endpoint losses; the **accuracy barrier** "
        "the largest drop of *test* accuracy below the line. Tables give mean ± std over "
        f"{cfg.seed_pairs} independent seed pairs; the claims above give 95 % t-intervals over the same pairs."
    )
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["arch"], r["width"]), []).append(r)
    rows = []
    for (d, a, w), rs in groups.items():
        for name in rs[0]["curves"]:
            rows.append(
                {
                    "dataset": d,
                    "arch": a,
                    "width ×": w,
                    "path": name,
                    "loss barrier": mean_std([r["curves"][name]["loss_barrier"] for r in rs]),
                    "test acc. barrier": mean_std([r["curves"][name]["test_accuracy_barrier"] for r in rs]),
                    "midpoint test acc": mean_std([r["curves"][name]["midpoint_test_accuracy"] for r in rs]),
                }
            )
    claims = _claims(groups)
    report.claims(
        claims,
        "Every verdict is computed from a 95 % Student-t interval over independent seed pairs (the difference "
        "is taken within each pair, so both arms see the same two networks); *supported* means the whole "
        "interval lies on the claimed side. The papers' settings are far larger (CIFAR-10 / ImageNet), so their "
        "numbers are for orientation, not for equality.",
    )
    report.heading("Barriers")
    report.table(rows, digits=3)
    report.metrics["rows"] = rows
    report.metrics["results"] = results

    report.heading("Curves")
    for (d, a, w), rs in groups.items():
        path = _curve_plot(rs, out / f"curve-{d}-{a}-w{w}.png", f"{a} ×{w} on {d}", plt)
        report.figure(path, f"{a} ×{w} on {d}: interpolation curves, mean (line) and min–max (band) over "
                            f"{len(rs)} seed pairs")  # fmt: skip
    caption = _width_plot(report, groups, plt)
    if caption:
        report.text(caption)
    timing = {k: float(np.sum([r["timing"][k] for r in results])) for k in results[0]["timing"]}
    report.text(
        f"Wall time {report.metrics['wall_s']:.0f} s ({executor.backend} executor); summed over jobs: "
        + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timing.items())
        + " (cpu = process CPU time, what an unloaded core would need when jobs run one at a time)."
    )
    return report


def _values(rs: list[dict[str, Any]], path: str, key: str) -> list[float]:
    return [float(r["curves"][path][key]) for r in rs]


def _claims(groups: dict[tuple[str, str, int], list[dict[str, Any]]]) -> list[Claim]:
    """The study's claims, each with a verdict computed from the seed-pair interval."""
    out: list[Claim] = []
    keys = sorted(groups)
    for d, a, w in keys:
        rs = sorted(groups[(d, a, w)], key=lambda r: r["seeds"])
        setting = f"{d}, {a} ×{w}"
        paths = rs[0]["curves"]
        out.append(claim(
            "Weight matching lowers the loss barrier", "loss barrier: naive − weight matching",
            _values(rs, "naive", "loss_barrier"), _values(rs, "weight_matching", "loss_barrier"),
            direction="greater", setting=setting,
            paper="Git Re-Basin: MNIST MLP naive ≫ 0 → aligned ≈ 0",
        ))  # fmt: skip
        if a == "mlp":
            out.append(claim(
                "Weight-matched MLPs are linearly connected (loss barrier < 0.05)", "loss barrier, weight matching",
                _values(rs, "weight_matching", "loss_barrier"), direction="less", margin=0.05, setting=setting,
                paper="Git Re-Basin: ≈ 0 for wide MNIST MLPs",
            ))  # fmt: skip
        if "activation_matching + reset" in paths:  # a net with BatchNorm: reset and REPAIR both apply
            out.append(claim(
                "BatchNorm reset lowers the aligned accuracy barrier", "test acc. barrier: aligned − aligned+reset",
                _values(rs, "activation_matching", "test_accuracy_barrier"),
                _values(rs, "activation_matching + reset", "test_accuracy_barrier"), direction="greater",
                setting=setting, scale=100, unit="pts",
                paper="REPAIR, ResNet-50 ImageNet midpoint acc.: 0.28 % → 53.4 % with reset",
            ))  # fmt: skip
            out.append(claim(
                "REPAIR beats BatchNorm reset", "test acc. barrier: aligned+reset − aligned+REPAIR",
                _values(rs, "activation_matching + reset", "test_accuracy_barrier"),
                _values(rs, "activation_matching + repair", "test_accuracy_barrier"), direction="greater",
                setting=setting, scale=100, unit="pts",
                paper="REPAIR, ResNet-50 ImageNet midpoint acc.: 53.4 % (reset) → 56.5 % (REPAIR)",
            ))  # fmt: skip
        else:
            out.append(claim(
                "REPAIR lowers the aligned accuracy barrier (no normalisation layers)",
                "test acc. barrier: aligned − aligned+REPAIR",
                _values(rs, "activation_matching", "test_accuracy_barrier"),
                _values(rs, "activation_matching + repair", "test_accuracy_barrier"), direction="greater",
                setting=setting, scale=100, unit="pts",
                paper="REPAIR, VGG11 CIFAR-10 midpoint acc.: 67.3 % → 84.9 %",
            ))  # fmt: skip
    # Width: the same seeds at the narrowest and widest width (seed-index paired).
    for d, a in sorted({(d, a) for d, a, _ in keys}):
        ws = sorted(w for dd, aa, w in keys if (dd, aa) == (d, a))
        if len(ws) < 2:
            continue
        lo_rs = sorted(groups[(d, a, ws[0])], key=lambda r: r["seeds"])
        hi_rs = sorted(groups[(d, a, ws[-1])], key=lambda r: r["seeds"])
        out.append(claim(
            "Wider nets: the weight-matched barrier shrinks", f"loss barrier, weight matching: ×{ws[0]} − ×{ws[-1]}",
            _values(lo_rs, "weight_matching", "loss_barrier"), _values(hi_rs, "weight_matching", "loss_barrier"),
            direction="greater", setting=f"{d}, {a}",
            paper="Git Re-Basin / REPAIR: barrier falls with width (ResNet-20 ×1→×32 after REPAIR: 26.0 → 1.0 pts)",
        ))  # fmt: skip
    return out


def _midpoint(values: list[float]) -> float:
    return float(values[len(values) // 2]) if values else float("nan")


def _colors(paths: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {p: cmap(i % 10) for i, p in enumerate(paths)}


def _curve_plot(rs: list[dict[str, Any]], path: Path, title: str, plt: Any) -> Path:
    names = list(rs[0]["curves"])
    colors = _colors(names)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in names:
        lam = rs[0]["curves"][name]["lambdas"]
        for ax, key in ((axes[0], "train_loss"), (axes[1], "test_accuracy")):
            ys = np.array([r["curves"][name][key] for r in rs])  # (pairs, steps)
            ax.plot(lam, ys.mean(0), marker=".", color=colors[name], label=name)
            ax.fill_between(lam, ys.min(0), ys.max(0), color=colors[name], alpha=0.15)
    axes[0].set(xlabel="λ", ylabel="train loss", title=title)
    axes[1].set(xlabel="λ", ylabel="test accuracy")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _width_plot(report: Report, groups: dict[tuple[str, str, int], list[dict[str, Any]]], plt: Any) -> str:
    """Loss barrier against width, one panel per (dataset, arch), each with its own legend; returns a caption
    sentence computed from the plotted means."""
    keys = sorted({(d, a) for d, a, _ in groups})
    widths = sorted({w for _, _, w in groups})
    if len(widths) < 2:
        return ""
    all_paths = list(dict.fromkeys(p for rs in groups.values() for p in rs[0]["curves"]))
    colors = _colors(all_paths)  # one colour per path in every panel
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    sentences = []
    for ax, (d, a) in zip(axes[0], keys, strict=True):
        ws = [w for w in widths if (d, a, w) in groups]
        paths = list(groups[(d, a, ws[0])][0]["curves"])
        for p in paths:
            stats = [mean_std(_values(groups[(d, a, w)], p, "loss_barrier")) for w in ws]
            ax.errorbar(ws, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                        color=colors[p], label=p)  # fmt: skip
        ax.set(xlabel="width ×", ylabel="loss barrier", title=f"{a} / {d}", xscale="log")
        ax.set_xticks(ws, [f"×{w}" for w in ws], minor=False)
        ax.minorticks_off()
        ax.legend(fontsize=6)
        naive = [mean_std(_values(groups[(d, a, w)], "naive", "loss_barrier"))[0] for w in ws]
        wm = [mean_std(_values(groups[(d, a, w)], "weight_matching", "loss_barrier"))[0] for w in ws]
        sentences.append(
            f"{a}/{d}: naive {naive[0]:.3f} → {naive[-1]:.3f}, weight matching {wm[0]:.3f} → {wm[-1]:.3f} "
            f"(×{ws[0]} → ×{ws[-1]})"
        )
    report.plot(
        fig,
        "barrier-vs-width.png",
        "Loss barrier against width, mean ± std over seed pairs (each panel has its own legend)",
    )
    return "Measured mean loss barriers from the narrowest to the widest net: " + "; ".join(sentences) + "."
