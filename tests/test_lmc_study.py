"""The LMC study runs end to end, shows alignment lowering the barrier, and opens with computed verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergelab.experiments import run_study


def test_lmc_study_tiny(tmp_path: Path) -> None:
    report = run_study(
        "lmc",
        tmp_path / "lmc",
        overrides=[
            'datasets=["digits"]',
            'archs=["mlp"]',
            "widths=[1, 2]",
            "seed_pairs=2",
            "epochs=3",
            "steps=3",
            "max_batches=2",
        ],
        progress=False,
    )
    text = report.read_text()
    assert (
        "activation_matching + repair" in text
        and "weight_matching + repair" not in text
        and "barrier-vs-width.png" in text
    )
    assert text.index("Claims and verdicts") < text.index("## Barriers")
    metrics = json.loads((tmp_path / "lmc" / "metrics.json").read_text())["metrics"]
    barrier = {(r["width ×"], r["path"]): r["loss barrier"][0] for r in metrics["rows"]}
    for w in (1, 2):
        assert barrier[(w, "weight_matching")] < barrier[(w, "naive")]
        assert barrier[(w, "activation_matching")] < barrier[(w, "naive")]
    claims = metrics["claims"]
    assert claims and all(c["verdict"] in ("supported", "not supported", "inconclusive") for c in claims)
    assert all(c["interval"]["n"] == 2 for c in claims)
    assert len(list((tmp_path / "lmc").glob("*.png"))) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_lmc_cuda_without_gpu_fails_early(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no CUDA"):
        run_study("lmc", tmp_path / "d", overrides=["device=cuda"], progress=False)
