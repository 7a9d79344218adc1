"""A streaming safetensors writer that shards its output the way Hugging Face does.

Every tensor's name, dtype and shape are known before the first one is computed (a merge checks its inputs
first), so each shard's header can be written up front and each tensor's bytes appended as soon as it exists:
the writer never holds more than the tensor it is given. Shards are named ``model-0000i-of-0000n.safetensors``
with a ``model.safetensors.index.json``, or ``model.safetensors`` when one shard suffices, so
``transformers``' ``from_pretrained``, ``safetensors`` and mergelab's own readers load the result. A sha256 of
every file is computed while writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.io.checkpoint import WEIGHTS
from mergelab.io.sources import INDEX, safetensors_dtype

__all__ = ["ShardedWriter", "TensorPlan", "parse_size"]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str | None) -> int | None:
    """Bytes from ``5GB`` / ``500MB`` / ``2GiB`` / ``123`` (decimal units as Hugging Face uses); ``None`` = no limit."""
    if size is None or isinstance(size, int):
        if isinstance(size, int) and size <= 0:
            raise ValueError(f"shard size must be positive, got {size!r}")
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"shard size {size!r} is not a size like 5GB, 500MB, 2GiB or a number of bytes")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return n


@dataclass(frozen=True)
class TensorPlan:
    """A tensor the writer will receive: name, dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ShardedWriter:
    """Write tensors, in the planned order, into one or more safetensors shards under ``folder``.

    Args:
        folder: an existing folder to write into.
        plan: every tensor to be written, in order.
        max_shard_size: bytes (or ``"5GB"``-like) of tensor data per shard; ``None`` writes a single file. A
            tensor bigger than the limit gets a shard of its own.
        metadata: string pairs stored in every shard's ``__metadata__`` (``format: pt`` is always set, as
            ``transformers`` requires).

    Example:
        >>> import tempfile, torch
        >>> d = Path(tempfile.mkdtemp())
        >>> w = ShardedWriter(d, [TensorPlan("a", torch.float32, (2,)), TensorPlan("b", torch.int64, ())])
        >>> w.write("a", torch.ones(2)); w.write("b", torch.tensor(3))
        >>> sorted(w.close())
        ['model.safetensors']
    """

    def __init__(
        self,
        folder: str | Path,
        plan: Sequence[TensorPlan],
        *,
        max_shard_size: int | str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        limit = parse_size(max_shard_size)
        self._meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
        shards: list[list[TensorPlan]] = [[]]
        used = 0
        seen: set[str] = set()
        for t in plan:
            if t.name in seen:
                raise ValueError(f"ShardedWriter: tensor {t.name!r} is planned twice")
            seen.add(t.name)
            safetensors_dtype(t.dtype)  # fail now on an unstorable dtype
            if limit is not None and shards[-1] and used + t.nbytes > limit:
                shards.append([])
                used = 0
            shards[-1].append(t)
            used += t.nbytes
        n = len(shards)
        names = [WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shards = list(zip(names, shards, strict=True))
        self._order = [(i, t) for i, (_, ts) in enumerate(self._shards) for t in ts]
        self._next = 0
        self._file: Any = None
        self._hash: Any = None
        self._open_shard = -1
        self.sha256: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-writer")
        self._pending: Future[None] | None = None

    @property
    def files(self) -> list[str]:
        return [name for name, _ in self._shards]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for _, t in self._order)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (its name, dtype and shape must be the planned ones)."""
        if self._next >= len(self._order):
            raise ValueError(f"ShardedWriter: {name!r} was not planned (every planned tensor is written)")
        shard, t = self._order[self._next]
        if name != t.name or tensor.dtype != t.dtype or tuple(tensor.shape) != t.shape:
            raise ValueError(
                f"ShardedWriter: got {name!r} {tensor.dtype}{list(tensor.shape)}, "
                f"planned {t.name!r} {t.dtype}{list(t.shape)} next"
            )
        if shard != self._open_shard:
            self._finish_shard()
            self._start_shard(shard)
        data = tensor.detach().cpu().contiguous().reshape(-1)
        self._wait()
        if data.numel():
            # Writing and hashing release the GIL: done on a helper thread, overlapping the next tensor's
            # computation. At most one tensor is in flight, so memory stays bounded.
            self._pending = self._pool.submit(self._append, self._file, self._hash, data)
        self._next += 1

    @staticmethod
    def _append(file: Any, digest: Any, data: torch.Tensor) -> None:
        buf = memoryview(data.view(torch.uint8).numpy())
        file.write(buf)
        digest.update(buf)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises a failed write here

    def close(self) -> dict[str, str]:
        """Finish the last shard and write the index (when sharded); return file name → sha256."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            self.abort()
            raise ValueError(
                f"ShardedWriter: closed before {missing!r} and the tensors after it were written"
            )
        if self._open_shard < 0:  # nothing planned: still write one (empty) file
            self._start_shard(0)
        self._finish_shard()
        self._pool.shutdown()
        if len(self._shards) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {t.name: name for name, ts in self._shards for t in ts},
            }
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return dict(self.sha256)

    def abort(self) -> None:
        """Close any open file without completing it (the caller discards the folder)."""
        with contextlib.suppress(Exception):  # the write is being abandoned anyway
            self._wait()
        self._pool.shutdown()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _start_shard(self, i: int) -> None:
        name, tensors = self._shards[i]
        header: dict[str, Any] = {"__metadata__": self._meta}
        offset = 0
        for t in tensors:
            header[t.name] = {
                "dtype": safetensors_dtype(t.dtype),
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
        self._file = open(self.folder / name, "wb")  # noqa: SIM115 - closed in _finish_shard
        self._hash = hashlib.sha256()
        for chunk in (len(raw).to_bytes(8, "little"), raw):
            self._file.write(chunk)
            self._hash.update(chunk)
        self._open_shard = i

    def _finish_shard(self) -> None:
        self._wait()
        if self._file is None:
            return
        self._file.close()
        self._file = None
        self.sha256[self._shards[self._open_shard][0]] = self._hash.hexdigest()
