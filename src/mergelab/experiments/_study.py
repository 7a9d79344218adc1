"""What every study shares besides the runner: the ``device`` and ``preset`` options and local-data checks.

Each study config carries ``device`` (``"auto"``: CUDA when present, else CPU) and ``preset`` (``"default"``:
the CPU-sized settings; ``"paper"``: the paper's setting, e.g. CIFAR-10 ResNet-20×w from a local folder). The
CLI's ``mergelab run STUDY --device cuda --preset paper`` maps onto these two fields, so a study file or
``--set`` can give them too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import TensorDataset

C = TypeVar("C")

# Datasets read from a local folder (mergelab never downloads); their loaders take ``root=``.
LOCAL_DATASETS = ("mnist", "cifar10", "cifar100")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; an explicit ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"study: device={name!r} but torch sees no CUDA GPU; use --device cpu or auto")
    return dev


def apply_preset(cfg: C, presets: Mapping[str, Mapping[str, Any]], study: str) -> C:
    """The config with its ``preset``'s values filled in (``"default"`` leaves it as it is).

    A preset only sets the options the user left at their defaults, so ``--preset paper --set seed_pairs=2``
    keeps the user's 2.
    """
    name = getattr(cfg, "preset", "default")
    if name == "default":
        return cfg
    if name not in presets:
        raise ValueError(f"{study}: unknown preset {name!r}; choose one of {['default', *sorted(presets)]}")
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    changes = {k: v for k, v in presets[name].items() if getattr(cfg, k) == defaults[k]}
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def check_data_root(study: str, datasets: tuple[str, ...], root: str) -> None:
    """Fail early, with one line, when a local dataset's folder is missing (instead of inside a job)."""
    local = [d for d in datasets if d in LOCAL_DATASETS]
    if not local:
        return
    if not root:
        raise ValueError(f"{study}: dataset(s) {local} are read from a local folder; set data_root=PATH")
    if not Path(root).expanduser().is_dir():
        raise FileNotFoundError(
            f"{study}: data_root {root!r} does not exist; put the {local[0]} files there (mergelab never downloads)"
        )


def load_study_data(name: str, root: str = "", **kwargs: Any) -> Any:
    """``load_dataset`` with ``root`` passed to the local-folder datasets only."""
    from mergelab.data import load_dataset

    if name in LOCAL_DATASETS:
        return load_dataset(name, root=root)
    return load_dataset(name, **kwargs)


def to_device(ds: TensorDataset, device: torch.device) -> TensorDataset:
    """The dataset with its tensors on ``device`` (in-memory datasets: batches are then built on the GPU)."""
    if device.type == "cpu":
        return ds
    return TensorDataset(*(t.to(device) for t in ds.tensors))
