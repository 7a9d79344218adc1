"""mergelab: weight-space model merging, and the science of why merging works.

The public API is small; everything is imported lazily so ``import mergelab`` stays fast.

Example:
    >>> import mergelab
    >>> from torch import nn
    >>> merged = mergelab.merge([nn.Linear(4, 2), nn.Linear(4, 2)], method="average")
"""

from __future__ import annotations

import importlib
from typing import Any

from mergelab._version import __version__ as __version__

# `merge` is imported eagerly: it shares its name with the `mergelab.merge` subpackage, and importing that
# subpackage later would otherwise rebind `mergelab.merge` to the module.
from mergelab.merge.registry import list_methods as list_methods  # noqa: E402
from mergelab.merge.registry import merge as merge  # noqa: E402

# Same for `train` and the `mergelab.train` subpackage.
from mergelab.train.trainer import TrainConfig as TrainConfig  # noqa: E402
from mergelab.train.trainer import train as train  # noqa: E402

_EXPORTS: dict[str, str] = {
    "build_model": "mergelab.models",
    "list_models": "mergelab.models",
    "load_dataset": "mergelab.data",
    "split_classes": "mergelab.data",
    "save": "mergelab.io",
    "load": "mergelab.io",
    "open_checkpoint": "mergelab.io",
    "merge_checkpoints": "mergelab.merge.streamed",
    "MergeResult": "mergelab.merge.registry",
    "align": "mergelab.merge.aligned",
    "match_context": "mergelab.match.context",
    "discover_structure": "mergelab.structure",
    "permute": "mergelab.structure",
    "interpolate": "mergelab.analysis.interpolate",
    "Structure": "mergelab.structure.types",
}

__all__ = sorted([*_EXPORTS, "merge", "list_methods", "train", "TrainConfig"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mergelab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
