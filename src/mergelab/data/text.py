"""A byte-level text corpus every machine already has: the Python standard library's own ``.py`` files.

Language-model studies need text, and nothing may be downloaded. The standard library's sources are on every
machine that runs mergelab, so they are the corpus: read as raw bytes (vocabulary 256, no tokenizer), files
ordered by a hash of their relative path (so the order does not depend on the file system or on which other
files exist), split into train and validation **by file** (no block of a validation file is ever trained on), and
cut into fixed-length blocks ``x = bytes[i : i+T]`` with next-byte targets ``y = bytes[i+1 : i+T+1]``.

The standard library differs between Python versions, so the corpus records the Python version, the number of
files and a SHA-256 of its file list and of its bytes (:attr:`TextCorpus.meta`): two runs used the same text iff
those hashes agree. Corpora are cached in memory per process, and on disk when ``cache_dir`` is given.

Example:
    >>> from mergelab.data.text import load_stdlib_corpus
    >>> c = load_stdlib_corpus(block_size=32, max_train_bytes=20_000, max_val_bytes=4_000)
    >>> x, y = c.train[0]
    >>> tuple(x.shape), bool((x[1:] == y[:-1]).all())
    ((32,), True)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

__all__ = ["VOCAB_SIZE", "TextCorpus", "load_stdlib_corpus", "stdlib_files"]

logger = logging.getLogger(__name__)

VOCAB_SIZE = 256  # one token per byte value

# Not the standard library's own code: third-party installs, and the interpreter's build artefacts.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors field-wise is ambiguous
class TextCorpus:
    """Train and validation blocks of a byte-level corpus.

    Attributes:
        train: ``TensorDataset(x, y)``, both int64 ``(N, block_size)``; ``y`` is ``x`` shifted by one byte.
        val: same layout, from files disjoint from the training files.
        block_size: tokens per block (the model's context must be at least this long).
        vocab_size: 256.
        meta: how the corpus was made (Python version, stdlib path, file counts, SHA-256 of the file lists and of
            the bytes of each split, bytes per split); JSON-able, for reports.
    """

    train: TensorDataset
    val: TensorDataset
    block_size: int
    vocab_size: int
    meta: dict[str, Any]


def stdlib_files(root: str | Path | None = None) -> list[str]:
    """Relative POSIX paths of the ``.py`` files under the standard library ``root``, in the corpus order.

    The order is by SHA-256 of the relative path: deterministic, spread over packages (a sorted list would put
    all of ``asyncio`` first), and stable when files are added or removed elsewhere.
    """
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"stdlib_files: {base} is not a directory")
    rels = []
    for folder, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]  # pruned, not filtered: site-packages is large
        rel_folder = Path(folder).relative_to(base)
        rels += [(rel_folder / f).as_posix() for f in files if f.endswith(".py")]
    if not rels:
        raise FileNotFoundError(f"stdlib_files: no .py files under {base}")
    return sorted(rels, key=lambda r: (_path_hash(r), r))


def _path_hash(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()


def _is_val(rel: str, val_fraction: float) -> bool:
    # A file's split depends only on its own path, so it never moves when other files come or go.
    return int(_path_hash("split:" + rel)[:8], 16) / 16**8 < val_fraction


def _take(base: Path, rels: Sequence[str], max_bytes: int) -> tuple[bytes, list[str]]:
    """Concatenate files in order until ``max_bytes`` (the last file is cut)."""
    chunks, used, total = [], [], 0
    for rel in rels:
        if total >= max_bytes:
            break
        data = (base / rel).read_bytes()[: max_bytes - total]
        if not data:
            continue
        chunks.append(data)
        used.append(rel)
        total += len(data)
    return b"".join(chunks), used


def _blocks(data: bytes, block_size: int, split: str) -> TensorDataset:
    n = (len(data) - 1) // block_size
    if n < 1:
        raise ValueError(
            f"load_stdlib_corpus: the {split} split has {len(data)} bytes, fewer than one block of "
            f"{block_size} + 1; raise max_{split}_bytes or lower block_size"
        )
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    x = tokens[: n * block_size].view(n, block_size)  # (N, T)
    y = tokens[1 : n * block_size + 1].view(n, block_size)  # (N, T), next byte of each x
    return TensorDataset(x.clone(), y.clone())


def _sha(parts: Sequence[str] | bytes) -> str:
    h = hashlib.sha256()
    if isinstance(parts, bytes):
        h.update(parts)
    else:
        for p in parts:
            h.update(p.encode() + b"\n")
    return h.hexdigest()


def load_stdlib_corpus(
    *,
    block_size: int = 128,
    max_train_bytes: int = 2_000_000,
    max_val_bytes: int = 200_000,
    val_fraction: float = 0.1,
    root: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> TextCorpus:
    """The standard library's ``.py`` files as a byte-level language-modelling corpus.

    Args:
        block_size: tokens per training example.
        max_train_bytes, max_val_bytes: how much text each split takes (files in the order of
            :func:`stdlib_files`; the stdlib has ~12–30 MB of ``.py``).
        val_fraction: the share of files (chosen by a hash of the path) reserved for validation.
        root: the library folder (default: this interpreter's ``sysconfig.get_paths()["stdlib"]``).
        cache_dir: if given, the blocks are saved there and reused when the same files and settings recur.

    Returns:
        A :class:`TextCorpus`.

    Raises:
        ValueError: on a bad setting, or a split too small for one block.
        FileNotFoundError: if ``root`` holds no ``.py`` files.
    """
    if block_size < 1:
        raise ValueError(f"load_stdlib_corpus: block_size must be >= 1, got {block_size}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"load_stdlib_corpus: val_fraction must be in (0, 1), got {val_fraction}")
    if max_train_bytes <= block_size or max_val_bytes <= block_size:
        raise ValueError(
            f"load_stdlib_corpus: max_train_bytes={max_train_bytes} and max_val_bytes={max_val_bytes} must "
            f"exceed block_size={block_size}"
        )
    base = str(Path(root if root is not None else sysconfig.get_paths()["stdlib"]).resolve())
    return _load_cached(
        base,
        block_size,
        max_train_bytes,
        max_val_bytes,
        val_fraction,
        None if cache_dir is None else str(cache_dir),
    )


@functools.lru_cache(maxsize=4)
def _load_cached(
    base: str, block_size: int, max_train: int, max_val: int, val_fraction: float, cache_dir: str | None
) -> TextCorpus:
    rels = stdlib_files(base)
    settings = {
        "block_size": block_size,
        "max_train_bytes": max_train,
        "max_val_bytes": max_val,
        "val_fraction": val_fraction,
    }
    key = _sha([*rels, json.dumps(settings, sort_keys=True), platform.python_version()])[:16]
    cached = Path(cache_dir) / f"stdlib-corpus-{key}.pt" if cache_dir else None
    if cached is not None and cached.is_file():
        blob = torch.load(cached, weights_only=True)
        logger.info("load_stdlib_corpus: cached blocks from %s", cached)
        return _corpus(blob, block_size)
    val_rels = [r for r in rels if _is_val(r, val_fraction)]
    train_rels = [r for r in rels if not _is_val(r, val_fraction)]
    path = Path(base)
    train_bytes, train_used = _take(path, train_rels, max_train)
    val_bytes, val_used = _take(path, val_rels, max_val)
    train, val = _blocks(train_bytes, block_size, "train"), _blocks(val_bytes, block_size, "val")
    meta = {
        "source": "python stdlib .py files, raw bytes",
        "python_version": platform.python_version(),
        "stdlib": base,
        "stdlib_py_files": len(rels),
        "stdlib_file_list_sha256": _sha(rels),
        **settings,
        "train_files": len(train_used),
        "val_files": len(val_used),
        "train_files_sha256": _sha(train_used),
        "val_files_sha256": _sha(val_used),
        "train_bytes": len(train_bytes),
        "val_bytes": len(val_bytes),
        "train_bytes_sha256": _sha(train_bytes),
        "val_bytes_sha256": _sha(val_bytes),
        "train_blocks": len(train),
        "val_blocks": len(val),
    }
    blob = {"train": train.tensors, "val": val.tensors, "meta": json.dumps(meta)}
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        torch.save(blob, tmp)
        tmp.replace(cached)  # atomic: a concurrent reader never sees half a file
    logger.info(
        "load_stdlib_corpus: %d train / %d val files, %d / %d blocks of %d bytes (python %s)",
        len(train_used),
        len(val_used),
        len(train),
        len(val),
        block_size,
        meta["python_version"],
    )
    return _corpus(blob, block_size)


def _corpus(blob: dict[str, Any], block_size: int) -> TextCorpus:
    return TextCorpus(
        train=TensorDataset(*blob["train"]),
        val=TensorDataset(*blob["val"]),
        block_size=block_size,
        vocab_size=VOCAB_SIZE,
        meta=json.loads(blob["meta"]),
    )
