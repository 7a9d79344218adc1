"""Language-model merging: perplexity barriers between GPT-2-style models trained from different seeds.

Several tiny ``transformers`` ``GPT2LMHeadModel`` s are trained from different initialisations (and data orders)
on the byte-level standard-library corpus (:mod:`mergelab.data.text`); every pair is merged with ``average``,
``weight_matching`` and ``activation_matching`` through :func:`mergelab.merge`, and evaluated along the straight
line from model A to model B (naive) or to B with its units permuted onto A's (aligned).

Expected shape of the results (Verma & Elbayad 2024, "Merging Text Transformer Models from Different
Initializations", arXiv 2403.00986): for BERT trained with masked-language modelling, aligned merges have
consistently lower loss barriers than plain averaging, but not zero. Each model is one training job and each pair
one evaluation job, so the study spreads over Ray.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from mergelab.experiments._training import DataSpec, ModelSpec, TrainJob, TrainResult, run_train_job
from mergelab.experiments.runner import Executor, register_study
from mergelab.report import Report, mean_std
from mergelab.train import TrainConfig

log = logging.getLogger(__name__)

_METHODS = ("average", "weight_matching", "activation_matching")


@dataclass(frozen=True)
class LMConfig:
    """Settings of the language-model merging study (defaults: a few CPU minutes on 2 cores)."""

    models: int = 3  # seeds 0..models-1, trained independently; every pair is merged (3 models → 3 pairs)
    methods: tuple[str, ...] = _METHODS
    # GPT2Config: vocabulary = 256 bytes; context = block_size
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    block_size: int = 128
    # corpus (see mergelab.data.text.load_stdlib_corpus)
    train_bytes: int = 1_200_000
    val_bytes: int = 200_000
    # training: AdamW, warm-up then cosine decay, dropout off (the runs are short and the data is not repeated)
    epochs: int = 1
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    # evaluation: λ points on each path; a fixed random subset of blocks of each split per point
    steps: int = 9
    eval_blocks: int = 256
    eval_batch_size: int = 64
    stat_batches: int = 8  # batches of eval_batch_size training blocks for activation statistics

    def __post_init__(self) -> None:
        if self.models < 2:
            raise ValueError(f"LMConfig: models must be >= 2 (one pair), got {self.models}")
        unknown = sorted(set(self.methods) - set(_METHODS))
        if unknown:
            raise ValueError(f"LMConfig: unknown method(s) {unknown}; choose from {list(_METHODS)}")
        if "average" not in self.methods:
            raise ValueError(
                "LMConfig: methods must include 'average' (the naive path every row is compared to)"
            )
        if self.n_embd % self.n_head:
            raise ValueError(f"LMConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")


def _gpt2_config(cfg: LMConfig) -> dict[str, Any]:
    from mergelab.data.text import VOCAB_SIZE

    return {
        "vocab_size": VOCAB_SIZE,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "use_cache": False,  # no key/value cache: export-based structure discovery needs plain tensor outputs
        "bos_token_id": None,  # GPT-2's 50256 lies outside a 256-byte vocabulary
        "eos_token_id": None,
    }


def build_gpt2(cfg: LMConfig) -> nn.Module:
    """A randomly initialised byte-level ``GPT2LMHeadModel`` of the study's size (seed it before calling)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(**_gpt2_config(cfg)))


def _train_job(cfg: LMConfig, out: Path, seed: int) -> TrainJob:
    """Seed ``seed``'s model: initialisation and data order."""
    text = {"block_size": cfg.block_size, "max_train_bytes": cfg.train_bytes, "max_val_bytes": cfg.val_bytes}
    train = TrainConfig(
        epochs=cfg.epochs, batch_size=cfg.batch_size, optimizer="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_fraction=cfg.warmup_fraction, data_seed=seed, progress=False,
    )  # fmt: skip
    return TrainJob(
        name=f"seed-{seed}",
        data=DataSpec("stdlib-text", options=text),
        model=ModelSpec("gpt2", _gpt2_config(cfg)),
        train=train,
        init_seed=seed,
        device="cpu",
    ).at(out)


@dataclass(frozen=True)
class PairJob:
    """Merge one pair of seeds' models with every method and evaluate the naive and aligned paths."""

    config: LMConfig
    models: tuple[TrainJob, TrainJob]
    seeds: tuple[int, int]


def _corpus(cfg: LMConfig) -> Any:
    from mergelab.data.text import load_stdlib_corpus

    return load_stdlib_corpus(
        block_size=cfg.block_size, max_train_bytes=cfg.train_bytes, max_val_bytes=cfg.val_bytes
    )


def _subset(ds: TensorDataset, n: int, seed: int) -> Subset:
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(ds, idx.sort().values.tolist())


def lm_pair_job(job: PairJob) -> dict[str, Any]:
    """Merge one pair with every method and evaluate the naive and aligned paths (top-level for Ray)."""
    import mergelab
    from mergelab.analysis.interpolate import interpolate
    from mergelab.evaluation import evaluate
    from mergelab.merge.aligned import align_to

    torch.set_num_threads(1)
    cfg = job.config
    corpus = _corpus(cfg)
    a, b = (m.load("cpu") for m in job.models)
    bs = cfg.eval_batch_size
    train_eval = DataLoader(_subset(corpus.train, cfg.eval_blocks, 0), batch_size=bs)
    val_eval = DataLoader(_subset(corpus.val, cfg.eval_blocks, 0), batch_size=bs)
    # activation statistics on training blocks the curves are not scored on
    stats = list(DataLoader(_subset(corpus.train, cfg.stat_batches * bs, 1), batch_size=bs))
    t0 = time.perf_counter()
    paths: dict[str, dict[str, Any]] = {}
    ctx: Any = None  # one match context per pair: structure and statistics shared by the aligned methods
    discover_seconds = 0.0
    for method in cfg.methods:
        try:
            start = time.perf_counter()
            if method == "average":
                b_path = b
                merged = mergelab.merge([a, b], method="average")
            else:
                if ctx is None:
                    ctx = mergelab.match_context([a, b], stats, example_input=stats[0][0][:2])
                    discover_seconds = time.perf_counter() - start
                    start = time.perf_counter()
                b_path = align_to(a, b, method=method, context=ctx)
                merged = mergelab.merge([a, b], method=method, context=ctx)
            align_seconds = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 — an unsupported model is a result of the study, not a crash
            log.warning("lm study: %s failed on seeds %s: %s", method, job.seeds, e)
            paths[method] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:400]}
            continue
        curve = interpolate(a, b_path, train_eval, steps=cfg.steps, test_data=val_eval)
        merged_val = evaluate(merged, val_eval)
        val_ppl = [math.exp(v) for v in curve.test_loss or ()]
        paths[method] = curve.to_dict() | {
            "val_perplexity": val_ppl,
            "val_loss_barrier": curve.test_loss_barrier,
            "val_perplexity_barrier": _barrier(val_ppl, curve.lambdas),
            "merged_val_loss": merged_val.loss,
            "merged_val_perplexity": math.exp(merged_val.loss),
            "merge_seconds": align_seconds,
        }
    return {
        "seeds": job.seeds,
        "paths": paths,
        "discover_seconds": discover_seconds,
        "structure": None if ctx is None else _describe(ctx.structure),
        "seconds": time.perf_counter() - t0,
    }


def _describe(structure: Any) -> str:
    explain = getattr(structure, "explain", None)
    return explain() if callable(explain) else repr(structure)


def _barrier(values: list[float], lambdas: tuple[float, ...]) -> float:
    from mergelab.analysis.interpolate import barrier

    return barrier(values, lambdas, "loss")


def _label(method: str) -> str:
    return "naive (average)" if method == "average" else f"aligned: {method}"


@register_study("lm", LMConfig)
def lm(cfg: LMConfig, out: Path, executor: Executor) -> Report:
    """Perplexity barriers between GPT-2-style byte-level LMs from different seeds, naive vs aligned."""
    report = Report(out, "Language-model merging: naive vs aligned perplexity barriers", config=asdict(cfg))
    corpus = _corpus(cfg)
    train_jobs = [_train_job(cfg, out, s) for s in range(cfg.models)]
    trained = _trained_rows(cfg, train_jobs, executor.map(run_train_job, train_jobs, desc="train seeds"))
    _save_hf(train_jobs, out / "hf")
    pairs = [(i, j) for i in range(cfg.models) for j in range(i + 1, cfg.models)]
    jobs = [PairJob(cfg, (train_jobs[i], train_jobs[j]), (i, j)) for i, j in pairs]
    results = executor.map(lm_pair_job, jobs, desc="seed pairs")

    report.text(
        f"{cfg.models} GPT-2-style models (`transformers.GPT2LMHeadModel`: {cfg.n_layer} layers, width "
        f"{cfg.n_embd}, {cfg.n_head} heads, context {cfg.block_size}, tied input/output embeddings, 256-byte "
        "vocabulary) are trained from seeds 0, 1, … (initialisation and data order) on the Python standard "
        "library's own `.py` files read as bytes. Every pair (A, B) is evaluated on the straight line "
        "`θ(λ) = (1−λ)·θ_A + λ·θ_B'` where `B'` is B itself (**naive**, whose midpoint is the `average` merge) "
        "or B with its units permuted onto A's (**aligned**: weight matching = Git Re-Basin coordinate descent "
        "on weights; activation matching = assignment on activation correlations), whose midpoint is the "
        "`mergelab.merge(..., method=...)` result. The **loss barrier** is the largest rise of the validation "
        "loss (nats per byte) above the straight line between the endpoints; the **perplexity barrier** the "
        "same on `exp(loss)`. Values are mean ± std over seed pairs (pairs share models, so they are not "
        "independent)."
    )
    report.heading("Corpus and models")
    trained_rows = [
        {
            "seed": t["seed"],
            "train steps": t["steps"],
            "train loss (last epoch mean)": t["train_loss"],
            "val loss": t["val_loss"],
            "val ppl": t["val_perplexity"],
            "train seconds": t["seconds"],
        }
        for t in trained
    ]
    report.table(trained_rows, digits=3)
    m = corpus.meta
    report.text(
        f"Corpus: Python {m['python_version']} stdlib, {m['train_files']} train files ({m['train_bytes']:,} bytes, "
        f"{m['train_blocks']:,} blocks) and {m['val_files']} validation files ({m['val_bytes']:,} bytes); "
        f"file-list SHA-256 `{m['stdlib_file_list_sha256'][:16]}…`, train bytes `{m['train_bytes_sha256'][:16]}…`. "
        f"Curves use {cfg.eval_blocks} random blocks of each split per point."
    )

    rows, errors = _rows(cfg, results)
    report.heading("Barriers")
    if rows:
        report.table(rows, digits=3)
    for method, err in errors.items():
        report.text(f"**{method} not available**: {err}")
    import transformers

    report.metrics.update(
        transformers=transformers.__version__,
        rows=rows,
        errors=errors,
        corpus=corpus.meta,
        models=trained,
        results=results,
    )
    described = next((r["structure"] for r in results if r["structure"]), None)
    if described:
        seconds = mean_std([r["discover_seconds"] for r in results])
        report.heading("Discovered structure")
        report.text(
            f"`mergelab.match_context` discovers it on model A once per pair ({seconds[0]:.1f} s each); the aligned "
            "methods share it and its activation statistics:\n\n```\n" + described.rstrip() + "\n```"
        )
    report.heading("Curves")
    fig_path = _plot(cfg, results, out)
    report.figure(
        fig_path, "Validation perplexity along the interpolation path (mean over pairs, band = min–max)"
    )
    return report


def _rows(cfg: LMConfig, results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    rows, errors = [], {}
    naive = [r["paths"]["average"]["val_loss_barrier"] for r in results]
    for method in cfg.methods:
        ok = [r["paths"][method] for r in results if "error" not in r["paths"][method]]
        failed = [r["paths"][method]["error"] for r in results if "error" in r["paths"][method]]
        if failed:
            errors[method] = failed[0]
        if not ok:
            continue
        reduction = [
            n - r["paths"][method]["val_loss_barrier"]
            for n, r in zip(naive, results, strict=True)
            if "error" not in r["paths"][method]
        ]
        rows.append(
            {
                "path": _label(method),
                "pairs": len(ok),
                "val loss barrier": mean_std([p["val_loss_barrier"] for p in ok]),
                "per pair": " / ".join(f"{p['val_loss_barrier']:.3f}" for p in ok),
                "val ppl barrier": mean_std([p["val_perplexity_barrier"] for p in ok]),
                "train loss barrier": mean_std([p["loss_barrier"] for p in ok]),
                "endpoint val ppl": mean_std(
                    [x for p in ok for x in (p["val_perplexity"][0], p["val_perplexity"][-1])]
                ),
                "merged val ppl": mean_std([p["merged_val_perplexity"] for p in ok]),
                "barrier cut vs naive": mean_std(reduction),
                "align + merge s": mean_std([p["merge_seconds"] for p in ok]),
            }
        )
    return rows, errors


def _trained_rows(cfg: LMConfig, jobs: list[TrainJob], results: list[TrainResult]) -> list[dict[str, Any]]:
    """Per seed: training steps, last-epoch train loss, validation loss / perplexity, checkpoint."""
    from mergelab.evaluation import evaluate

    corpus = _corpus(cfg)
    val_blocks = DataLoader(_subset(corpus.val, cfg.eval_blocks, 0), batch_size=cfg.eval_batch_size)
    rows = []
    for seed, (job, r) in enumerate(zip(jobs, results, strict=True)):
        val = evaluate(job.load("cpu"), val_blocks)
        rows.append({
            "seed": seed, "train_loss": r.train_loss[-1], "val_loss": val.loss, "val_perplexity": math.exp(val.loss),
            "steps": len(r.train_loss) * math.ceil(len(corpus.train) / cfg.batch_size), "seconds": r.seconds,
            "checkpoint": r.checkpoint,
        })  # fmt: skip
    return rows


def _save_hf(jobs: list[TrainJob], folder: Path) -> None:
    """Each endpoint also as a Hugging Face folder (``hf/seed-K``: ``from_pretrained`` reads it)."""
    for job in jobs:
        job.load("cpu").save_pretrained(folder / job.name)


def _plot(cfg: LMConfig, results: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    try:
        for method in cfg.methods:
            curves = [r["paths"][method] for r in results if "error" not in r["paths"][method]]
            x = list(cfg.methods).index(method)
            if not curves:
                axes[1].text(x, 0, "not available", ha="center", va="bottom", fontsize=7, rotation=90)
                continue
            lam = np.asarray(curves[0]["lambdas"])
            ppl = np.asarray([c["val_perplexity"] for c in curves])
            (line,) = axes[0].plot(lam, ppl.mean(0), marker="o", label=_label(method))
            axes[0].fill_between(lam, ppl.min(0), ppl.max(0), color=line.get_color(), alpha=0.15)
            bars = [c["val_loss_barrier"] for c in curves]
            axes[1].bar(x, float(np.mean(bars)), color=line.get_color(), alpha=0.6)
            axes[1].scatter([x] * len(bars), bars, color="k", s=12, zorder=3)
        axes[0].set(xlabel="λ (weight of model B)", ylabel="validation perplexity (bytes)")
        axes[0].grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        axes[1].set_xticks(range(len(cfg.methods)), [_label(m) for m in cfg.methods], fontsize=7, rotation=10)
        axes[1].set(ylabel="val loss barrier (nats/byte)", title="barrier per seed pair (dots)")
        fig.suptitle(
            f"GPT-2 {cfg.n_layer}×{cfg.n_embd} byte LM on the Python stdlib: {len(results)} seed pair(s)",
            fontsize=10,
        )
        fig.tight_layout()
        path = out / "lm-perplexity-path.png"
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
