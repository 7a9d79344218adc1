"""Checkpoints round-trip bit-exactly and fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import mergelab
from mergelab.io import CheckpointError, load, prepare_run_dir, read_config, save
from mergelab.models import build_model, list_models

SHAPES = [(1, 8, 8), (1, 40)]


def _tiny(arch: str, shape: tuple[int, ...]) -> nn.Module:
    kwargs = {
        "mlp": {"width": 8, "depth": 1},
        "vit": {"dim": 8, "depth": 1, "heads": 2},
        "cnn": {"width": 4, "depth": 2},
        "resnet": {"width": 1, "depth": 8},
    }.get(arch, {"width": 0.25})
    torch.manual_seed(0)
    return build_model(arch, shape, 3, **kwargs)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "1d"])
@pytest.mark.parametrize("arch", list_models())
def test_every_zoo_model_round_trips_bit_exactly(arch: str, shape: tuple[int, ...], tmp_path: Path) -> None:
    model = _tiny(arch, shape)
    # make the BatchNorm buffers non-trivial so they are checked too
    model.train()
    model(torch.randn(4, *shape))
    path = save(model, tmp_path / "ckpt", metadata={"seed": 0})
    loaded = load(path)
    assert type(loaded) is type(model)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    x = torch.randn(5, *shape)
    model.eval()
    assert torch.equal(model(x), loaded(x))
    assert read_config(path)["metadata"]["seed"] == 0


def test_existing_folder_is_not_overwritten(tmp_path: Path) -> None:
    model = _tiny("mlp", (1, 8, 8))
    save(model, tmp_path / "c")
    with pytest.raises(FileExistsError, match="--force"):
        save(model, tmp_path / "c")
    save(model, tmp_path / "c", force=True)
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        prepare_run_dir(tmp_path / "user")
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"


def test_missing_and_corrupt_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")
    path = save(_tiny("mlp", (1, 8, 8)), tmp_path / "c")
    (path / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        load(path)
    path2 = save(_tiny("mlp", (1, 8, 8)), tmp_path / "d")
    (path2 / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load(path2)


def test_mismatched_model_is_refused(tmp_path: Path) -> None:
    path = save(_tiny("mlp", (1, 8, 8)), tmp_path / "c")
    other = build_model("mlp", (1, 8, 8), 3, width=16, depth=1)
    with pytest.raises(CheckpointError, match="shape"):
        load(path, model=other)
    with pytest.raises(CheckpointError, match="missing"):
        load(path, model=nn.Linear(3, 3))


def test_plain_module_needs_a_template(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    path = mergelab.save(net, tmp_path / "plain")
    with pytest.raises(CheckpointError, match="model="):
        mergelab.load(path)
    copy = mergelab.load(path, model=nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert torch.equal(copy[0].weight, net[0].weight)
