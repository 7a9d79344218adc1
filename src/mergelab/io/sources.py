"""Checkpoint sources: one lazy reader over every form a checkpoint comes in.

* a mergelab run folder (``model.safetensors`` + ``config.json`` with the zoo spec and weight checksums);
* a single ``.safetensors`` file (only that file is read, never a sibling);
* a Hugging Face folder, as ``save_pretrained`` writes it: ``model.safetensors``, or shards
  ``model-0000i-of-0000n.safetensors`` listed in ``model.safetensors.index.json``.

Only the safetensors format is read, so no pickle is ever loaded (a folder holding only ``pytorch_model.bin``
is refused). Opening a source parses the headers (names, dtypes, shapes, byte ranges) and checks that every
byte range lies in its file; :meth:`CheckpointSource.read` then reads one tensor with a plain positioned read into
a fresh buffer. We parse the small header ourselves instead of going through ``safetensors.safe_open``: its
memory map leaves every page read resident in the process (counted in its RSS) until the file is closed, so
reading a whole model tensor by tensor would look like holding it all; a positioned read costs exactly the tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mergelab.io.checkpoint import CONFIG, WEIGHTS, CheckpointError

__all__ = [
    "INDEX",
    "PROVENANCE",
    "CheckpointSource",
    "TensorInfo",
    "file_sha256",
    "open_checkpoint",
    "safetensors_dtype",
]

INDEX = "model.safetensors.index.json"
PROVENANCE = "mergelab.json"  # merge provenance and checksums beside a Hugging Face config.json
Kind = Literal["mergelab", "huggingface", "file"]

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` → ``"F32"``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file and absolute byte range, plus dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class CheckpointSource:
    """A checkpoint opened for reading one tensor at a time (see the module docstring).

    Attributes:
        path: the path as given.
        folder: the folder holding the weights (and ``config.json``, if any).
        kind: ``"mergelab"`` (a run folder), ``"huggingface"`` (a folder without mergelab's config) or ``"file"``
            (one ``.safetensors`` file given by path).
        files: the weights files read.
        config: the parsed ``config.json`` next to the weights, or ``None``.

    Example:
        >>> import tempfile, mergelab
        >>> p = mergelab.save(mergelab.build_model("mlp", (1, 8, 8), 10, width=16, depth=1), tempfile.mkdtemp() + "/c")
        >>> with open_checkpoint(p) as src:
        ...     src.kind, src.info("head.weight").shape, src.read("head.weight").shape
        ('mergelab', (10, 16), torch.Size([10, 16]))
    """

    def __init__(self, path: str | Path) -> None:
        self._handles: dict[Path, Any] = {}
        self.path = Path(path)
        self.folder, self.kind, self.files = _locate(self.path)
        cfg_file = self.folder / CONFIG
        self.config: dict[str, Any] | None = _read_json(cfg_file) if cfg_file.is_file() else None
        if self.kind != "file" and isinstance(self.config, dict) and "mergelab_version" in self.config:
            self.kind = "mergelab"
        self._tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            for name, info in _read_header(f).items():
                if name in self._tensors:
                    raise CheckpointError(f"checkpoint {self.path}: tensor {name!r} is stored twice")
                self._tensors[name] = info
        if self.kind != "file" and len(self.files) > 1:
            _check_index(self.folder, self._tensors)

    # -------------------------------------------------------------------------------------------- listing
    def keys(self) -> list[str]:
        """Tensor names in storage order (file, then byte offset), the order that reads the files sequentially."""
        order = {f: i for i, f in enumerate(self.files)}
        return sorted(self._tensors, key=lambda k: (order[self._tensors[k].file], self._tensors[k].begin))

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"checkpoint {self.path} has no tensor {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (what reading every tensor once costs)."""
        return sum(t.nbytes for t in self._tensors.values())

    @property
    def model_spec(self) -> dict[str, Any] | None:
        """The zoo spec of a mergelab checkpoint (``config.json``'s ``"model"``), else ``None``."""
        if isinstance(self.config, dict) and "mergelab_version" in self.config:
            spec = self.config.get("model")
            return spec if isinstance(spec, dict) else None
        return None

    # -------------------------------------------------------------------------------------------- reading
    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into fresh memory (owned by the caller, writable), or into ``buffer`` (uint8, exactly
        the tensor's byte size; a streaming caller recycles buffers to avoid page faults on fresh memory)."""
        t = self.info(name)
        ok = buffer is not None and buffer.dtype == torch.uint8 and buffer.numel() == t.nbytes
        buf = buffer if ok and buffer is not None else torch.empty(t.nbytes, dtype=torch.uint8)
        if t.nbytes:
            fh = self._handle(t.file)
            view = memoryview(buf.numpy())
            got = 0
            while got < t.nbytes:
                n = os.preadv(fh.fileno(), [view[got:]], t.begin + got)
                if n <= 0:
                    raise CheckpointError(
                        f"checkpoint {self.path}: {t.file.name} ends inside tensor {name!r}"
                    )
                got += n
        return buf.view(t.dtype).reshape(t.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, read into memory (for models small enough to hold)."""
        return {k: self.read(k) for k in self.keys()}

    def verify_checksums(self) -> None:
        """Compare each weights file with the sha256 recorded in ``config.json`` (or ``mergelab.json``).

        Files without a recorded checksum (Hugging Face folders, older mergelab checkpoints) are not checked.
        """
        recorded = self.config.get("weights") if isinstance(self.config, dict) else None
        if not isinstance(recorded, dict) and (self.folder / PROVENANCE).is_file():
            recorded = _read_json(self.folder / PROVENANCE).get("weights")
        if not isinstance(recorded, dict):
            return
        for f in self.files:
            entry = recorded.get(f.name)
            if isinstance(entry, dict) and "sha256" in entry and file_sha256(f) != entry["sha256"]:
                raise CheckpointError(
                    f"checkpoint {self.folder}: {f.name} does not match the sha256 recorded in {CONFIG} "
                    "(the file was modified or corrupted)"
                )

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = open(file, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        return self._handles[file]

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def __enter__(self) -> CheckpointSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CheckpointSource({str(self.path)!r}, {self.kind}, {len(self)} tensors, {len(self.files)} files)"
        )


def open_checkpoint(path: str | Path) -> CheckpointSource:
    """Open a run folder, a ``.safetensors`` file or a Hugging Face folder (sharded or not) for lazy reading."""
    return CheckpointSource(path)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ internals
def _locate(path: Path) -> tuple[Path, Kind, tuple[Path, ...]]:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"checkpoint {path}: only .safetensors weights are read (pickle files such as .bin/.pt are refused)"
            )
        return path.parent, "file", (path,)
    index = path / INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"checkpoint {path}: {INDEX} has no weight_map")
        files = []
        for name in sorted(set(weight_map.values())):
            f = path / str(name)
            if Path(str(name)).name != str(name) or not f.is_file():
                raise CheckpointError(f"checkpoint {path}: shard {name!r} listed in {INDEX} is missing")
            files.append(f)
        return path, "huggingface", tuple(files)
    if (path / WEIGHTS).is_file():
        return path, "huggingface", (path / WEIGHTS,)
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = (
        f" (found {found[:3]}: pickle checkpoints are never loaded; convert them to safetensors)"
        if found
        else ""
    )
    raise CheckpointError(f"checkpoint {path}: no {WEIGHTS} or {INDEX}{hint}")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        obj = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {file.parent}: {file.name} is corrupt ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {file.parent}: {file.name} is not a JSON object")
    return obj


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header: known dtypes, byte ranges that match the shapes and lie in the file."""
    size = file.stat().st_size
    where = f"checkpoint {file}"
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{where} is corrupt (shorter than a safetensors header)")
        n = int.from_bytes(raw, "little")
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{where} is corrupt (header length {n} does not fit the file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{where} is corrupt (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{where} is corrupt (header is not a JSON object)")
    start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: tensor {name!r} has a corrupt header entry ({e})") from e
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0 or start + end > size or any(s < 0 for s in shape):
            raise CheckpointError(
                f"{where}: tensor {name!r} {meta['dtype']}{list(shape)} has byte range [{begin}, {end}), "
                f"which does not fit its shape or the file"
            )
        out[name] = TensorInfo(name, dtype, shape, file, start + begin, start + end)
    return out


def _check_index(folder: Path, tensors: dict[str, TensorInfo]) -> None:
    weight_map = _read_json(folder / INDEX)["weight_map"]
    for name, file in weight_map.items():
        t = tensors.get(name)
        if t is None or t.file.name != file:
            raise CheckpointError(
                f"checkpoint {folder}: {INDEX} lists {name!r} in {file}, which does not hold it"
            )
