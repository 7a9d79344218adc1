"""The language-model merging study, and the per-position evaluation it relies on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergelab.evaluation import evaluate, scores_and_targets
from mergelab.experiments import run_study

# A 1-layer, 16-wide GPT-2 on 16-byte blocks, trained for 2 steps: seconds, not minutes.
_TINY = [
    "models=2",
    "n_layer=1",
    "n_embd=16",
    "n_head=2",
    "block_size=16",
    "train_bytes=1040",  # 64 blocks of 16 → 2 steps of 32
    "val_bytes=600",
    "steps=3",
    "eval_blocks=16",
    "eval_batch_size=16",
    "stat_batches=1",
]


class _Output:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class _TokenModel(nn.Module):
    """Per-position scores ``(N, T, C)``, returned inside an output object as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 7)

    def forward(self, x: torch.Tensor) -> _Output:
        return _Output(self.emb(x))


def test_evaluate_counts_every_position_of_sequence_targets() -> None:
    torch.manual_seed(0)
    model = _TokenModel()
    x, y = torch.randint(0, 7, (5, 4)), torch.randint(0, 7, (5, 4))
    met = evaluate(model, [(x[:3], y[:3]), (x[3:], y[3:])])
    logits = model.emb(x)  # (N, T, C)
    assert met.count == 20
    assert math.isclose(met.loss, F.cross_entropy(logits.reshape(-1, 7), y.reshape(-1)).item(), rel_tol=1e-6)
    assert math.isclose(met.accuracy, (logits.argmax(-1) == y).float().mean().item(), rel_tol=1e-6)
    # per-sample targets pass through unchanged
    flat = torch.randn(3, 4)
    out, target = scores_and_targets(flat, torch.tensor([0, 1, 2]))
    assert out is flat and target.tolist() == [0, 1, 2]


def test_lm_study_smoke(tmp_path: Path) -> None:
    report = run_study(
        "lm", tmp_path / "lm", overrides=[*_TINY, 'methods=["average", "weight_matching"]'], progress=False
    )
    text = report.read_text()
    assert "naive (average)" in text and "lm-perplexity-path.png" in text
    metrics = json.loads((tmp_path / "lm" / "metrics.json").read_text())["metrics"]
    assert metrics["corpus"]["python_version"] and metrics["corpus"]["train_blocks"] == 64
    path = metrics["results"][0]["paths"]["average"]
    assert len(path["val_perplexity"]) == 3 and path["val_loss_barrier"] >= 0
    # the `average` merge is the naive path's midpoint
    assert math.isclose(path["merged_val_loss"], path["test_loss"][1], rel_tol=1e-5)
    # the aligned merge is the aligned path's midpoint, and permuting B did not change its function
    wm = metrics["results"][0]["paths"]["weight_matching"]
    assert "error" not in wm, wm.get("error")
    assert math.isclose(wm["merged_val_loss"], wm["test_loss"][1], rel_tol=1e-5)
    assert math.isclose(wm["test_loss"][-1], path["test_loss"][-1], rel_tol=1e-5)
    assert "aligned: weight_matching" in text and "Discovered structure" in text
    from transformers import GPT2LMHeadModel

    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "lm" / "hf" / "seed-1")  # a Hugging Face folder
    assert reloaded.config.n_embd == 16
    assert (
        tmp_path / "lm" / "models" / "seed-1" / "model.safetensors"
    ).is_file()  # the training job's checkpoint


@pytest.mark.slow
def test_lm_study_default_alignment_lowers_the_barrier(tmp_path: Path) -> None:
    run_study("lm", tmp_path / "lm", progress=False)
    rows = json.loads((tmp_path / "lm" / "metrics.json").read_text())["metrics"]["rows"]
    barrier = {r["path"]: r["val loss barrier"][0] for r in rows}
    naive = barrier.pop("naive (average)")
    assert naive > 0
    for aligned in barrier.values():
        assert aligned < naive
