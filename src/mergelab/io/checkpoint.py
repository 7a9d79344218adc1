"""Checkpoints: a folder with ``model.safetensors`` (weights and buffers) and ``config.json``.

``config.json`` records what is needed to rebuild the exact model (the zoo spec: architecture, input shape,
classes, kwargs) plus free-form provenance (dataset, seed, metrics), so ``load(path)`` needs nothing else.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergelab._version import __version__
from mergelab.io.run_dir import RunDir

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model it should rebuild."""


def save(
    model: nn.Module,
    path: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Save ``model`` as a checkpoint folder.

    Args:
        model: a zoo model (it carries ``mergelab_spec``) or any module (then ``load`` needs ``model=``).
        path: the folder to write; an existing non-empty folder is refused unless ``force``.
        metadata: JSON-able provenance (dataset, seed, metrics, ...).
        force: overwrite an existing folder.

    Returns:
        The folder path.

    Example:
        >>> import tempfile, mergelab
        >>> m = mergelab.build_model("mlp", (1, 8, 8), 10, width=16, depth=1)
        >>> p = mergelab.save(m, tempfile.mkdtemp() + "/ckpt")
        >>> mergelab.load(p).head.weight.shape
        torch.Size([10, 16])
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    from mergelab.io.sources import file_sha256

    config = {
        "mergelab_version": __version__,
        "model": getattr(model, "mergelab_spec", None),
        "metadata": dict(metadata or {}),
    }
    with RunDir(path, force=force) as tmp:  # written aside, renamed into place when complete
        save_file(tensors, str(tmp / WEIGHTS))
        config["weights"] = {WEIGHTS: {"sha256": file_sha256(tmp / WEIGHTS)}}  # verified by load()
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=_json_default) + "\n")
    return Path(path)


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    cfg_file = path / CONFIG if path.is_dir() else path.with_name(CONFIG)
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {path}: {CONFIG} is missing")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: {CONFIG} is corrupt ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"checkpoint {path}: {CONFIG} is not a JSON object")
    return cfg


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved at ``path`` and load its weights bit-exactly.

    Args:
        path: a checkpoint folder, or one ``.safetensors`` file in it (then exactly that file's weights are
            loaded into the model the folder's ``config.json`` describes); a sharded folder is read too.
        model: a module to load into, for models not built by the zoo; its names and shapes must match.

    Raises:
        CheckpointError: missing or corrupt files, a weights file whose sha256 differs from the one recorded
            at save time, non-finite weights (naming the tensor), or weights that do not fit the model.
    """
    from mergelab.io.sources import open_checkpoint

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    folder = path if path.is_dir() else path.parent
    if model is None:
        cfg = read_config(folder)
        spec = cfg.get("model")
        if not spec:
            raise CheckpointError(
                f"checkpoint {folder}: config has no model spec (not a zoo model); pass model= to load into"
            )
        from mergelab.models import build_from_spec

        try:
            model = build_from_spec(
                spec
            )  # a zoo model, or a merged one (e.g. multi-head) built from zoo specs
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {folder}: cannot rebuild model from {spec}: {e}") from e
    if path.is_dir() and not any((folder / f).is_file() for f in (WEIGHTS, "model.safetensors.index.json")):
        raise CheckpointError(f"checkpoint {folder}: {WEIGHTS} is missing")
    with open_checkpoint(path) as src:
        src.verify_checksums()
        tensors = src.state_dict()
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"checkpoint {path}: tensor {k!r} has non-finite values (NaN or inf)")
    _check_fits(model, tensors, path)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return model


def _check_fits(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {where} does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for k, v in expected.items():
        if tuple(v.shape) != tuple(tensors[k].shape):
            raise CheckpointError(
                f"checkpoint {where}: {k!r} has shape {tuple(tensors[k].shape)}, the model expects {tuple(v.shape)}"
            )


def _json_default(o: object) -> object:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()  # numpy scalars
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
