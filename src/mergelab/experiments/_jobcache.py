"""Finished study jobs on disk, so an interrupted or repeated study recomputes only what is missing.

A job is identified by its function's name and a fingerprint of its options (nested dicts, lists, tuples,
numbers, strings, dataclasses, paths, tensors and arrays by content; a dataclass field marked
``metadata={"fingerprint": False}`` is left out). Its result is stored as ``NAME-KEY.json``
(structure, including mergelab's own dataclasses field by field) beside ``NAME-KEY.safetensors`` (tensors and
arrays); no pickle is written or read. The JSON file is
renamed into place last, so a result is either complete or absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


class Uncacheable(TypeError):
    """A job's options or result hold a value that cannot be fingerprinted or stored without pickle."""


class JobCache:
    """The ``jobs/`` folder of a run: ``key(fn, job)``, ``get(key)`` and ``put(key, result)``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def key(self, fn: Callable[..., Any], job: Any) -> str | None:
        """A file-name-safe key for ``fn(job)``, or None if the job cannot be fingerprinted (then never cached)."""
        h = hashlib.sha256(f"{fn.__module__}.{fn.__qualname__}".encode())
        try:
            _feed(h, job)
        except Uncacheable as e:
            log.warning("job of %s is not cached (it will rerun on resume): %s", fn.__qualname__, e)
            return None
        return f"{fn.__name__.strip('_')}-{h.hexdigest()[:20]}"

    def get(self, key: str) -> tuple[Any] | None:
        """``(result,)`` if the job finished before, else None (a damaged entry counts as missing)."""
        meta = self.folder / f"{key}.json"
        if not meta.is_file():
            return None
        try:
            tree = json.loads(meta.read_text())
            tensors: dict[str, torch.Tensor] = {}
            if tree.get("tensors"):
                from safetensors.torch import load_file

                tensors = load_file(str(self.folder / f"{key}.safetensors"))
            return (_decode(tree["result"], tensors),)
        except Exception as e:  # a damaged entry is recomputed, never trusted
            log.warning("ignoring damaged job result %s: %s", meta, e)
            return None

    def put(self, key: str, result: Any) -> None:
        tensors: dict[str, torch.Tensor] = {}
        try:
            tree = _encode(result, tensors)
        except Uncacheable as e:
            log.warning("result %s is not cached (it will rerun on resume): %s", key, e)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{key}.tmp-{os.getpid()}"
        if tensors:
            from safetensors.torch import save_file

            save_file(tensors, str(tmp))
            os.replace(tmp, self.folder / f"{key}.safetensors")
        tmp.write_text(json.dumps({"result": tree, "tensors": len(tensors)}))
        os.replace(tmp, self.folder / f"{key}.json")

    def count(self) -> int:
        """How many finished jobs are stored."""
        return len(list(self.folder.glob("*.json"))) if self.folder.is_dir() else 0


def _feed(h: Any, obj: Any) -> None:
    """Hash ``obj`` by value into ``h`` (type-tagged, so 1, 1.0, "1" and (1,) differ)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}[{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, dict):
        h.update(f"dict[{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray) and obj.dtype != object:
        h.update(f"ndarray:{obj.dtype}:{obj.shape};".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, np.generic):
        _feed(h, obj.item())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"dc:{type(obj).__qualname__}".encode())
        # a field marked ``metadata={"fingerprint": False}`` (e.g. where a job writes) is not part of its identity
        fields = [f for f in dataclasses.fields(obj) if f.metadata.get("fingerprint", True)]
        _feed(h, {f.name: getattr(obj, f.name) for f in fields})
    elif isinstance(obj, Path):
        h.update(f"path:{obj};".encode())
    else:
        raise Uncacheable(f"cannot fingerprint a {type(obj).__name__}")


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        name = str(len(tensors))
        tensors[name] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": name}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return {"__path__": str(obj)}
    if (
        dataclasses.is_dataclass(obj)
        and not isinstance(obj, type)
        and type(obj).__module__.startswith("mergelab.")
    ):
        cls = type(obj)
        fields = {f.name: _encode(getattr(obj, f.name), tensors) for f in dataclasses.fields(obj)}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    raise Uncacheable(f"cannot store a {type(obj).__name__}")


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tuple__" in tree:
        return tuple(_decode(v, tensors) for v in tree["__tuple__"])
    if "__dict__" in tree:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in tree["__dict__"]}
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return tensors[tree["__ndarray__"]].numpy()
    if "__path__" in tree:
        return Path(tree["__path__"])
    if "__dataclass__" in tree:
        return _dataclass(tree["__dataclass__"], {k: _decode(v, tensors) for k, v in tree["fields"].items()})
    raise ValueError(f"unknown entry {sorted(tree)}")


def _dataclass(path: str, fields: dict[str, Any]) -> Any:
    """Rebuild a mergelab dataclass field by field (only mergelab's own classes are ever imported)."""
    import importlib

    module, qualname = path.split(":")
    if not module.startswith("mergelab."):
        raise ValueError(f"refusing to rebuild {path}: not a mergelab class")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not dataclasses.is_dataclass(cls):
        raise ValueError(f"{path} is not a dataclass")
    obj = object.__new__(cls)
    for k, v in fields.items():
        object.__setattr__(obj, k, v)
    return obj


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, (list, tuple)) else k
