"""Study ``late-phase``: late-phase weights (BatchNorm and rank-1) with and without SWA vs plain SGD and SWA.

von Oswald et al. (ICLR 2021) report that averaging K late-phase members into one model beats plain SGD
(CIFAR-10 WRN-28-10 96.16 → 96.46 %; with SWA 96.48 → 96.81 %; CIFAR-100 81.35 → 82.87 %), and that
starting the late phase at T0 = 0 hurts. This study repeats the comparison at our scale, on MNIST-1D and digits
with the zoo's ResNet and VGG (both with BatchNorm). There is one job per (dataset, arch, variant, seed), run
with ``executor.map``. For each variant it reports the test accuracy and NLL of the single model, and for the
late-phase variants also those of the K-member ensemble (mean of the softmax outputs).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergelab.experiments.runner import Executor, register_study
from mergelab.report import Report, mean_std

log = logging.getLogger(__name__)

VARIANTS = ("baseline", "swa", "bn", "bn+swa", "rank1", "rank1+swa")

# The paper's numbers (test accuracy %, mean of 5 seeds), for the side-by-side table.
PAPER_ROWS: list[dict[str, object]] = [
    {"setting": "CIFAR-10 WRN-28-10, SGD", "base": 96.16, "late-phase (BatchNorm)": 96.46},
    {"setting": "CIFAR-10 WRN-28-10, SWA", "base": 96.48, "late-phase (BatchNorm)": 96.81},
    {"setting": "CIFAR-100 WRN-28-10, SGD", "base": 81.35, "late-phase (BatchNorm)": 82.87},
]


@dataclass(frozen=True)
class LatePhaseStudyConfig:
    """Defaults run in a few minutes on 2 CPU cores. The paper's settings (CIFAR, WRN-28-10, 200 epochs,
    T0 = 120, K = 10, SWA from epoch 161) are scaled down proportionally."""

    datasets: tuple[str, ...] = ("mnist1d", "digits")
    archs: tuple[str, ...] = ("resnet", "vgg")
    variants: tuple[str, ...] = VARIANTS
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 20
    batch_size: int = 128  # the paper's
    lr: float = 0.1  # the paper's (SGD + Nesterov momentum 0.9); cosine schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4  # the paper's
    k: int = 10  # the paper's K
    t0: int = 12  # 60 % of the epochs, the paper's 120/200
    noise_bn: float = 0.0  # the authors' released configs
    noise_rank1: float = 0.1
    schedule: str = "cycle"  # the paper's member schedule
    shared_grad: str = "sum"  # the authors' code (gradients summed over a cycle of K minibatches)
    swa_start: int = 15  # 75 % of the epochs
    # Constant SWA learning rate (SWALR) from swa_start on: about the cosine's value there, so the learning
    # rate stops decaying. 0.05 (the paper's lr/2) makes late-phase + SWA diverge here: see docs/late_phase.md.
    swa_lr: float = 0.015
    resnet_depth: int = 8
    resnet_width: float = 0.5  # 8/16/32 channels
    vgg_width: float = 0.25  # 8/16/32 channels
    mnist1d_samples: int = 5000  # 4000 train / 1000 test
    save_checkpoints: bool = True

    def __post_init__(self) -> None:
        bad = sorted(set(self.variants) - set(VARIANTS))
        if bad:
            raise ValueError(f"late-phase study: unknown variant(s) {bad}; choose from {list(VARIANTS)}")
        if not 0 <= self.t0 < self.epochs:
            raise ValueError(f"late-phase study: t0={self.t0} must be in [0, epochs={self.epochs})")
        if not 0 <= self.swa_start < self.epochs:
            raise ValueError(
                f"late-phase study: swa_start={self.swa_start} must be in [0, epochs={self.epochs})"
            )


def _dataset_kwargs(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    return {"num_samples": cfg["mnist1d_samples"]} if name == "mnist1d" else {}


def _model_kwargs(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    if arch == "resnet":
        return {"depth": cfg["resnet_depth"], "width": cfg["resnet_width"], "norm": "batchnorm"}
    if arch == "vgg":
        return {"width": cfg["vgg_width"], "norm": "batchnorm"}
    raise ValueError(f"late-phase study: arch {arch!r} is not supported; use 'resnet' or 'vgg'")


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One (dataset, arch, variant, seed) run (top-level so Ray can ship it); returns plain metrics."""
    from mergelab.data import load_dataset
    from mergelab.evaluation import evaluate
    from mergelab.models import build_model
    from mergelab.train import TrainConfig
    from mergelab.train.late_phase import evaluate_ensemble, train_late_phase
    from mergelab.train.swa import train_swa

    torch.set_num_threads(1)
    cfg = job["config"]
    data = load_dataset(job["dataset"], **_dataset_kwargs(cfg, job["dataset"]))
    torch.manual_seed(job["seed"])
    model = build_model(job["arch"], data.input_shape, data.num_classes, **_model_kwargs(cfg, job["arch"]))
    train_cfg = TrainConfig(
        epochs=cfg["epochs"], batch_size=cfg["batch_size"], optimizer="sgd", lr=cfg["lr"],
        momentum=cfg["momentum"], weight_decay=cfg["weight_decay"], schedule="cosine", data_seed=job["seed"],
        progress=False,
    )  # fmt: skip
    test = torch.utils.data.DataLoader(data.test, batch_size=512)
    variant: str = job["variant"]
    late, swa = variant.split("+")[0], variant.endswith("+swa") or variant == "swa"
    start = time.perf_counter()
    out: dict[str, Any] = {k: job[k] for k in ("dataset", "arch", "variant", "seed")}
    if late in ("baseline", "swa"):
        if swa:
            r = train_swa(model, data.train, train_cfg, swa_start=cfg["swa_start"], swa_lr=cfg["swa_lr"],
                          test_data=data.test)  # fmt: skip
            final, history = r.model, r.history
        else:
            from mergelab.train import train

            history = train(model, data.train, train_cfg, test_data=data.test)
            final = model
    else:
        noise = cfg["noise_bn"] if late == "bn" else cfg["noise_rank1"]
        r = train_late_phase(
            model, data.train, train_cfg, variant=late, k=cfg["k"], t0=cfg["t0"], noise=noise, swa=swa,
            swa_start=cfg["swa_start"], swa_lr=cfg["swa_lr"] if swa else None, test_data=data.test,
            schedule=cfg["schedule"], shared_grad=cfg["shared_grad"], seed=job["seed"],
        )  # fmt: skip
        final, history = r.model, r.history
        ens = evaluate_ensemble(r.members, test)
        members = [evaluate(m, test) for m in r.members]
        averaged = evaluate(r.averaged, test)
        out.update(
            ensemble_accuracy=ens.accuracy, ensemble_nll=ens.loss,
            member_accuracy=float(np.mean([m.accuracy for m in members])),
            member_nll=float(np.mean([m.loss for m in members])),
            averaged_accuracy=averaged.accuracy, averaged_nll=averaged.loss,
        )  # fmt: skip
    metrics = evaluate(final, test)
    out.update(
        accuracy=metrics.accuracy, nll=metrics.loss, seconds=time.perf_counter() - start,
        history={"test_accuracy": history.test_accuracy, "test_loss": history.test_loss},
        state_dict={k: v.detach().clone() for k, v in final.state_dict().items()},
    )  # fmt: skip
    return out


@register_study("late-phase", LatePhaseStudyConfig)
def late_phase_study(cfg: LatePhaseStudyConfig, out: Path, executor: Executor) -> Report:
    """Late-phase weights (BatchNorm, rank-1; ± SWA) vs SGD and SWA: averaged model and K-member ensemble."""
    import matplotlib

    matplotlib.use("Agg")
    from mergelab.data import load_dataset
    from mergelab.io import save
    from mergelab.models import build_model

    report = Report(out, "Late-phase weights vs SGD and SWA", config=asdict(cfg))
    plain = asdict(cfg)
    jobs = [
        {"dataset": d, "arch": a, "variant": v, "seed": s, "config": plain}
        for d in cfg.datasets for a in cfg.archs for v in cfg.variants for s in cfg.seeds
    ]  # fmt: skip
    results = executor.map(run_job, jobs, desc="late-phase jobs")

    if cfg.save_checkpoints:
        shapes = {}
        for r in results:
            if r["dataset"] not in shapes:
                d = load_dataset(r["dataset"], **_dataset_kwargs(plain, r["dataset"]))
                shapes[r["dataset"]] = (d.input_shape, d.num_classes)
            shape, classes = shapes[r["dataset"]]
            m = build_model(r["arch"], shape, classes, **_model_kwargs(plain, r["arch"]))
            m.load_state_dict(r["state_dict"])
            name = f"{r['dataset']}-{r['arch']}-{r['variant'].replace('+', '-')}-seed{r['seed']}"
            save(m, out / "checkpoints" / name, metadata={k: r[k] for k in ("dataset", "arch", "variant", "seed",
                                                                               "accuracy", "nll")})  # fmt: skip

    rows = summary_rows(results, cfg)
    report.heading("Setup")
    report.text(
        f"SGD (Nesterov, momentum {cfg.momentum}, lr {cfg.lr}, weight decay {cfg.weight_decay}, cosine schedule), "
        f"{cfg.epochs} epochs, batch {cfg.batch_size}, seeds {list(cfg.seeds)} (initialisation and data order). "
        f"Late phase: K = {cfg.k} members from epoch T0 = {cfg.t0} (0-based), `{cfg.schedule}` member schedule "
        f"(each minibatch trains one member; with `cycle` the shared weights step once per cycle of K minibatches "
        f"with the {cfg.shared_grad} of their gradients), "
        f"init noise {cfg.noise_bn} (bn) / {cfg.noise_rank1} (rank1). At the end the members are averaged in "
        f"weight space and BatchNorm statistics are recomputed on the train data. SWA: average of the weights "
        f"at the end of each epoch from epoch {cfg.swa_start}, learning rate annealed to {cfg.swa_lr} (SWALR), "
        "BatchNorm recomputed. `+swa` = SWA on top of the averaged late-phase model."
    )
    report.heading("Results (test set, mean ± std over seeds)")
    report.text(
        "*single model* is the one model each variant deploys (averaged late-phase model, SWA model, or the last "
        "iterate). *ensemble* averages the K late-phase members' softmax outputs (K× the inference cost); "
        "*member* is the mean over the individual members. Δ = single-model accuracy minus the baseline's."
    )
    cols = ["dataset", "arch", "variant", "single-model acc", "single-model NLL", "Δ acc vs baseline",
            "ensemble acc", "ensemble NLL", "member acc"]  # fmt: skip
    report.table(rows, cols)
    report.metrics["summary"] = rows
    report.metrics["runs"] = [{k: v for k, v in r.items() if k != "state_dict"} for r in results]

    report.heading("The paper's numbers (for scale, not reproduced here)")
    report.text(
        "von Oswald et al., ICLR 2021, test accuracy (%) of WRN-28-10, BatchNorm late-phase weights, K = 10, "
        "T0 = 120 of 200 epochs. They also report that T0 = 0 hurts."
    )
    report.table(PAPER_ROWS)

    for dataset in cfg.datasets:
        path = _plot_curves(results, cfg, dataset, out)
        report.figure(path, f"{dataset}: test accuracy and NLL per epoch (mean over seeds). Late-phase curves show "
                            "the averaged model with running BatchNorm statistics; SWA curves show the running "
                            "iterate, not the average.")  # fmt: skip
    total = sum(r["seconds"] for r in results)
    report.text(f"{len(results)} jobs, {total:.0f} s of training in total ({executor.backend} executor).")
    return report


def summary_rows(results: list[dict[str, Any]], cfg: LatePhaseStudyConfig) -> list[dict[str, object]]:
    """One row per (dataset, arch, variant) with mean ± std over seeds."""
    rows: list[dict[str, object]] = []
    for d in cfg.datasets:
        for a in cfg.archs:
            base = [
                r["accuracy"]
                for r in results
                if (r["dataset"], r["arch"], r["variant"]) == (d, a, "baseline")
            ]
            for v in cfg.variants:
                rs = [r for r in results if (r["dataset"], r["arch"], r["variant"]) == (d, a, v)]
                if not rs:
                    continue
                acc = mean_std([r["accuracy"] for r in rs])
                row: dict[str, object] = {
                    "dataset": d, "arch": a, "variant": v, "single-model acc": acc,
                    "single-model NLL": mean_std([r["nll"] for r in rs]),
                    "Δ acc vs baseline": f"{acc[0] - float(np.mean(base)):+.4f}" if base else "—",
                    "ensemble acc": "—", "ensemble NLL": "—", "member acc": "—",
                }  # fmt: skip
                if "ensemble_accuracy" in rs[0]:
                    row["ensemble acc"] = mean_std([r["ensemble_accuracy"] for r in rs])
                    row["ensemble NLL"] = mean_std([r["ensemble_nll"] for r in rs])
                    row["member acc"] = mean_std([r["member_accuracy"] for r in rs])
                rows.append(row)
    return rows


def _plot_curves(results: list[dict[str, Any]], cfg: LatePhaseStudyConfig, dataset: str, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(cfg.archs), figsize=(5 * len(cfg.archs), 7), squeeze=False)
    for j, arch in enumerate(cfg.archs):
        accs = []
        for v in cfg.variants:
            rs = [r for r in results if (r["dataset"], r["arch"], r["variant"]) == (dataset, arch, v)]
            if not rs:
                continue
            acc = np.mean([r["history"]["test_accuracy"] for r in rs], axis=0)
            nll = np.mean([r["history"]["test_loss"] for r in rs], axis=0)
            epochs = np.arange(1, len(acc) + 1)
            style = "--" if v.endswith("swa") else "-"
            axes[0, j].plot(epochs, acc, style, label=v)
            axes[1, j].plot(epochs, nll, style, label=v)
            accs.append(acc)
        for ax in axes[:, j]:
            ax.axvline(cfg.t0 + 0.5, color="grey", lw=0.8, ls=":")  # the late phase starts after epoch t0
        axes[0, j].set(title=f"{dataset} / {arch}", ylabel="test accuracy")
        axes[1, j].set(xlabel="epoch", ylabel="test NLL")
        if accs:  # zoom on the second half, where the variants differ
            lo = min(float(a[len(a) // 2 :].min()) for a in accs)
            axes[0, j].set_ylim(max(0.0, lo - 0.02), None)
            axes[0, j].legend(fontsize=8)
    fig.tight_layout()
    path = out / f"curves-{dataset}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
