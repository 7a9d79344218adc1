"""Readers for MNIST and CIFAR-10/100 folders the user already has on disk (mergelab never downloads).

- MNIST: the four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), optionally gzipped; also found under ``raw`` or
  ``MNIST/raw`` (torchvision's layout) and with ``.`` instead of ``-`` before ``idx`` (a mirror spelling).
- CIFAR-10: the python pickle batches ``data_batch_1..5`` and ``test_batch`` (+ ``batches.meta`` for names),
  in ``root`` or ``root/cifar-10-batches-py``.
- CIFAR-100: ``train``, ``test`` and ``meta`` in ``root`` or ``root/cifar-100-python``.

CIFAR batches are pickles; they are read with an unpickler that only rebuilds numpy arrays, lists, dicts and
strings, so a tampered file cannot run code. Images are scaled to [0, 1] and standardised with train
statistics (one mean/std for MNIST, per channel for CIFAR).
"""

from __future__ import annotations

import codecs
import gzip
import importlib
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .core import DataSplits, register_dataset, standardize, to_splits

logger = logging.getLogger(__name__)

__all__ = ["cifar10", "cifar100", "mnist", "read_idx"]

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _check_root(root: str | Path, dataset: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{dataset}: data folder {str(path)!r} does not exist (mergelab never downloads)"
        )
    return path


def _open_maybe_gz(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped if its name ends with ``.gz``.

    The header is two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, then one
    big-endian int32 size per dimension; the data follow in C order.

    Raises:
        ValueError: a bad magic number, an unknown type code or a payload whose size does not match the
            header (the message names the file).
    """
    path = Path(path)
    try:
        raw = _open_maybe_gz(path)
    except (OSError, EOFError) as err:
        raise ValueError(f"read_idx: cannot read {str(path)!r}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"read_idx: {str(path)!r} is not an IDX file (bad magic number {raw[:4].hex()!r})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"read_idx: {str(path)!r} has unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"read_idx: {str(path)!r} is truncated inside its header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"read_idx: {str(path)!r} holds {len(raw) - header} data bytes, header {shape} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_file(
    root: Path, names: Sequence[str], dataset: str, subdirs: Sequence[str] = ("",), gz: bool = False
) -> Path:
    """First existing ``root/subdir/name`` (or ``name.gz`` if ``gz``); else ``FileNotFoundError``."""
    for sub in subdirs:
        for name in names:
            for candidate in (name, name + ".gz") if gz else (name,):
                path = root / sub / candidate
                if path.is_file():
                    return path
    raise FileNotFoundError(
        f"{dataset}: file {names[0]!r}{' (or .gz)' if gz else ''} not found in {str(root)!r}"
        + (f" or its subfolders {[s for s in subdirs if s]}" if any(subdirs) else "")
    )


@register_dataset("mnist")
def mnist(root: str | Path) -> DataSplits:
    """MNIST from the four IDX files in ``root`` as ``(N, 1, 28, 28)`` float32 images (60000 / 10000).

    Args:
        root: folder holding ``train-images-idx3-ubyte`` etc. (optionally ``.gz``, or under ``MNIST/raw``).

    Returns:
        ``DataSplits`` named ``"mnist"`` with 10 classes; pixels scaled to [0, 1] then standardised with the
        train split's global mean/std.

    Raises:
        FileNotFoundError: ``root`` or one of the four files is missing (named in the message).
        ValueError: a file is corrupt, or images and labels disagree in count / labels lie outside 0..9.

    Example:
        >>> d = mnist(root="~/data/mnist")  # doctest: +SKIP
    """
    folder = _check_root(root, "mnist")
    subdirs = ("", "raw", "MNIST/raw")
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for kind, idx in (("images", "idx3"), ("labels", "idx1")):
            names = [f"{prefix}-{kind}-{idx}-ubyte", f"{prefix}-{kind}.{idx}-ubyte"]
            path = _find_file(folder, names, "mnist", subdirs, gz=True)
            arrays[split, kind] = (read_idx(path), path)
    out = []
    for split in ("train", "test"):
        (x, xpath), (y, ypath) = arrays[split, "images"], arrays[split, "labels"]
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"mnist: {xpath.name} has shape {x.shape} but {ypath.name} has shape {y.shape}; "
                "expected (N, H, W) images and (N,) labels"
            )
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"mnist: {ypath.name} has labels outside 0..9")
        out.append((x[:, None].astype(np.float32) / 255.0, y.astype(np.int64)))
    (x_train, y_train), (x_test, y_test) = out
    x_train, x_test = standardize(x_train, x_test)
    return to_splits("mnist", x_train, y_train, x_test, y_test, 10, [str(i) for i in range(10)])


# -- CIFAR ---------------------------------------------------------------------------------------------------


# numpy globals a pickled array may reference -> the numpy submodule that defines them ("numpy.core" in
# numpy 1, "numpy._core" in numpy 2; files written by either must load under both)
_NUMPY_GLOBALS: dict[str, str] = {
    "_reconstruct": "multiarray",
    "scalar": "multiarray",
    "_frombuffer": "numeric",
}


def _numpy_attr(submodule: str, name: str) -> Any:
    for module in (f"numpy._core.{submodule}", f"numpy.core.{submodule}"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {submodule}.{name} to rebuild arrays with")


class _ArrayUnpickler(pickle.Unpickler):
    """Only resolves the globals that pickled numpy arrays (and Python-2 byte strings) need."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        sub = _NUMPY_GLOBALS.get(name)
        if sub is not None and module in (f"numpy.core.{sub}", f"numpy._core.{sub}"):
            return _numpy_attr(sub, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a dataset pickle")


def _load_pickle(path: Path, dataset: str) -> dict[str, Any]:
    """Load a CIFAR pickle as a dict with ``str`` keys (the originals, from Python 2, have bytes keys)."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as err:
        raise ValueError(f"{dataset}: cannot read {str(path)!r} as a CIFAR pickle: {err}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{dataset}: {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _get(d: dict[str, Any], key: str, path: Path, dataset: str) -> Any:
    if key not in d:
        raise ValueError(f"{dataset}: {str(path)!r} has no {key!r} entry (keys: {sorted(d)})")
    return d[key]


def _cifar_batch(path: Path, label_key: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 (N, 3, 32, 32), int64 (N,))."""
    d = _load_pickle(path, dataset)
    data = np.asarray(_get(d, "data", path, dataset))
    labels = np.asarray(_get(d, label_key, path, dataset))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise ValueError(
            f"{dataset}: {str(path)!r} has data {data.shape} and {label_key} {labels.shape}; "
            "expected (N, 3072) and (N,)"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)  # rows are R(1024) G(1024) B(1024)


def _names(meta: dict[str, Any] | None, key: str, n: int) -> list[str] | None:
    if meta is None or key not in meta:
        return None
    names = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in meta[key]]
    return names if len(names) == n else None


def _cifar_splits(
    name: str,
    train: list[tuple[np.ndarray, np.ndarray]],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    class_names: list[str] | None,
) -> DataSplits:
    x_train = np.concatenate([x for x, _ in train]).astype(np.float32) / 255.0
    y_train = np.concatenate([y for _, y in train])
    x_test, y_test = test[0].astype(np.float32) / 255.0, test[1]
    labels = np.concatenate([y_train, y_test])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name}: labels outside 0..{num_classes - 1}")
    x_train, x_test = standardize(x_train, x_test, axes=(0, 2, 3))  # per channel
    return to_splits(name, x_train, y_train, x_test, y_test, num_classes, class_names)


@register_dataset("cifar10")
def cifar10(root: str | Path) -> DataSplits:
    """CIFAR-10 from its python pickle batches as ``(N, 3, 32, 32)`` float32 images (50000 / 10000).

    Args:
        root: folder holding ``data_batch_1..5`` and ``test_batch`` (or its ``cifar-10-batches-py``
            subfolder); ``batches.meta`` is optional and supplies the class names.

    Returns:
        ``DataSplits`` named ``"cifar10"``; pixels scaled to [0, 1] then standardised per channel with train
        statistics.

    Raises:
        FileNotFoundError: ``root`` or a batch file is missing (named in the message).
        ValueError: a batch is corrupt or has the wrong layout (named in the message).

    Example:
        >>> d = cifar10(root="~/data/cifar10")  # doctest: +SKIP
    """
    folder = _check_root(root, "cifar10")
    subdirs = ("", "cifar-10-batches-py")
    train = [
        _cifar_batch(_find_file(folder, [f"data_batch_{i}"], "cifar10", subdirs), "labels", "cifar10")
        for i in range(1, 6)
    ]
    test = _cifar_batch(_find_file(folder, ["test_batch"], "cifar10", subdirs), "labels", "cifar10")
    meta = None
    try:
        meta = _load_pickle(_find_file(folder, ["batches.meta"], "cifar10", subdirs), "cifar10")
    except FileNotFoundError:
        logger.info("cifar10: no batches.meta in %s; class names left unset", folder)
    return _cifar_splits("cifar10", train, test, 10, _names(meta, "label_names", 10))


@register_dataset("cifar100")
def cifar100(root: str | Path, label: str = "fine") -> DataSplits:
    """CIFAR-100 from its python pickles as ``(N, 3, 32, 32)`` float32 images (50000 / 10000).

    Args:
        root: folder holding ``train``, ``test`` and ``meta`` (or its ``cifar-100-python`` subfolder).
        label: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).

    Returns:
        ``DataSplits`` named ``"cifar100"`` (``"cifar100-coarse"`` for coarse labels); standardised per
        channel with train statistics.

    Raises:
        FileNotFoundError: ``root`` or a file is missing (named in the message).
        ValueError: a bad ``label`` or a corrupt file (named in the message).

    Example:
        >>> d = cifar100(root="~/data/cifar100", label="coarse")  # doctest: +SKIP
    """
    if label not in ("fine", "coarse"):
        raise ValueError(f"cifar100: label must be 'fine' or 'coarse', got {label!r}")
    folder = _check_root(root, "cifar100")
    subdirs = ("", "cifar-100-python")
    key = f"{label}_labels"
    n = 100 if label == "fine" else 20
    train = _cifar_batch(_find_file(folder, ["train"], "cifar100", subdirs), key, "cifar100")
    test = _cifar_batch(_find_file(folder, ["test"], "cifar100", subdirs), key, "cifar100")
    meta = _load_pickle(_find_file(folder, ["meta"], "cifar100", subdirs), "cifar100")
    name = "cifar100" if label == "fine" else "cifar100-coarse"
    return _cifar_splits(name, [train], test, n, _names(meta, f"{label}_label_names", n))
