"""Options every study shares: ``preset`` and ``device`` (and the CLI flags that set them), failing early."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergelab.cli import main
from mergelab.experiments import run_study
from mergelab.experiments._study import apply_preset, resolve_device

STUDIES = ("lmc", "multitask", "rethinking", "late-phase", "features")


@pytest.mark.parametrize("study", STUDIES)
def test_paper_preset_without_data_folder_fails_with_one_line(study: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"{study}: .*data_root"):
        run_study(study, tmp_path / "run", overrides=["preset=paper"], progress=False)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        run_study(study, tmp_path / "run2", overrides=["preset=huge"], progress=False)


def test_cli_preset_and_device_flags_reach_the_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["run", "lmc", "--preset", "paper", "--out", str(tmp_path / "x"), "-q"])
    assert rc == 2 and "data_root" in capsys.readouterr().err
    rc = main(
        ["run", "lmc", "--preset", "paper", "--set", "data_root=/no/such/dir", "--out", str(tmp_path / "y")]
    )
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_preset_keeps_options_the_user_set() -> None:
    from mergelab.experiments.lmc import PRESETS, LMCConfig

    cfg = apply_preset(LMCConfig(preset="paper", seed_pairs=2), PRESETS, "lmc")
    assert cfg.seed_pairs == 2 and cfg.datasets == ("cifar10",) and cfg.resnet_depth == 20


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
