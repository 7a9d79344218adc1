"""The LMC study runs end to end and shows alignment lowering the barrier."""

from __future__ import annotations

import json
from pathlib import Path

from mergelab.experiments import run_study


def test_lmc_study_tiny(tmp_path: Path) -> None:
    report = run_study(
        "lmc",
        tmp_path / "lmc",
        overrides=[
            'datasets=["digits"]',
            'archs=["mlp"]',
            "widths=[1, 2]",
            "seed_pairs=1",
            "epochs=4",
            "steps=5",
        ],
        progress=False,
    )
    text = report.read_text()
    assert "weight_matching + repair" in text and "barrier-vs-width.png" in text
    rows = json.loads((tmp_path / "lmc" / "metrics.json").read_text())["metrics"]["rows"]
    barrier = {(r["width ×"], r["path"]): r["loss barrier"][0] for r in rows}
    for w in (1, 2):
        assert barrier[(w, "weight_matching")] < barrier[(w, "naive")]
        assert barrier[(w, "activation_matching")] < barrier[(w, "naive")]
    assert len(list((tmp_path / "lmc").glob("*.png"))) == 3
