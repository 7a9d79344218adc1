"""MNIST-1D, generated procedurally by our own implementation of the recipe of Greydanus & Kobak.

Paper: "Scaling Down Deep Learning with MNIST-1D", Greydanus & Kobak, ICML 2024, https://arxiv.org/abs/2011.14439
(reference generator: github.com/greydanus/mnist1d). MNIST-1D is a tiny (4000 train / 1000 test, length 40)
dataset that still separates architectures the way MNIST no longer does (reference test accuracy with the
default arguments: logistic regression ~32 %, MLP ~68 %, CNN ~94 %), so merging studies on it run on a CPU.

Recipe (one sample; the defaults are those of the reference generator, kept in :class:`MNIST1DConfig`):

1. Take the class's hand-designed template: 12 values tracing a 1-D "digit" shape. The templates are
   standardised row-wise, shifted so they start at 0, divided by 6, and a tiny ``eps`` is added so that
   signal can be told apart from padding below.
2. Pad with ``p ~ U{36..60}`` zeros on the right, then linearly interpolate the ``12 + p`` points onto
   ``12 + 60 = 72`` points: a short pad stretches the digit, a long one compresses it (random dilation).
3. Multiply by ``1 + 0.4 * (u - 0.5)``, ``u ~ U(0, 1)`` (random amplitude).
4. Roll circularly by ``k ~ U{0..47}`` positions (random translation).
5. Where the signal is exactly zero (the padding), put correlated noise: ``N(0, 0.25^2)`` white noise
   smoothed by a Gaussian filter with sigma 2 (reflecting borders, kernel truncated at 4 sigma).
6. Add i.i.d. ``N(0, 0.02^2)`` noise everywhere.
7. Shear: subtract ``c * linspace(-0.5, 0.5, 72)`` with ``c = 0.75 * (u - 0.5)`` (a random linear trend).
8. Linearly interpolate the 72 points down to 40.

The dataset has ``num_samples // 10`` samples per class, shuffled, split at ``int(N * train_split)``
(4000 / 1000 by default) and standardised to zero mean, unit variance.

Deviations from the reference generator (none changes the distribution of the samples, so the difficulty is
the same):

- Random numbers come from one ``numpy.random.Generator`` seeded with ``seed`` and are drawn in batches for
  all samples at once, not from the legacy global ``np.random`` state sample by sample; so ``seed=42`` gives
  a different (equally distributed) draw than the published ``mnist1d_data.pkl``, and the generator never
  touches global RNG state.
- The global mean/std used for standardisation is computed on the train split only (the reference uses
  train + test together); with 4000 i.i.d. train samples the two differ negligibly.
- Only the inputs and labels are produced (not the reference's interpolated time axis ``t`` or templates),
  and the interpolation and Gaussian filter are our own numpy code (no scipy).

Generated arrays are cached as ``.npz`` under ``cache_dir`` (default ``$MERGELAB_CACHE`` or
``~/.cache/mergelab``), one file per set of generation parameters; a cache file that cannot be read or does
not match its parameters is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .core import DataSplits, register_dataset, standardize, to_splits

logger = logging.getLogger(__name__)

__all__ = ["MNIST1DConfig", "default_cache_dir", "make_mnist1d", "mnist1d"]

GENERATOR_VERSION = 1  # bump whenever the generated arrays change, so stale caches are not reused
_EPS = 1e-8  # added to the templates so that signal is never exactly zero (step 1)

# The 10 hand-designed templates of the MNIST-1D paper (digits 0..9), 12 points each.
_RAW_TEMPLATES = np.array(
    [
        [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
        [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
        [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
        [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
        [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
        [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
        [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
        [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
    ]
)  # (10, 12)


@dataclass(frozen=True)
class MNIST1DConfig:
    """All parameters of the generator; the defaults reproduce the reference dataset's difficulty."""

    num_samples: int = 5000  # total; num_samples // 10 per class
    train_split: float = 0.8
    seed: int = 42
    padding: tuple[int, int] = (36, 60)  # zeros appended before dilation, drawn uniformly in [lo, hi]
    scale_coeff: float = 0.4
    max_translation: int = 48  # shift drawn uniformly in [0, max_translation)
    corr_noise_scale: float = 0.25
    iid_noise_scale: float = 0.02
    shear_scale: float = 0.75
    final_seq_length: int = 40
    shuffle_seq: bool = False  # permute the 40 positions (one permutation for all samples): destroys locality

    def __post_init__(self) -> None:
        if self.num_samples < 10:
            raise ValueError(
                f"MNIST1DConfig: num_samples must be >= 10 (one per class), got {self.num_samples}"
            )
        n = (self.num_samples // 10) * 10
        n_train = int(n * self.train_split)
        if not 0 < n_train < n:
            raise ValueError(
                f"MNIST1DConfig: train_split={self.train_split} leaves an empty split of {n} samples"
            )
        lo, hi = self.padding
        if not 0 <= lo <= hi:
            raise ValueError(f"MNIST1DConfig: padding must satisfy 0 <= lo <= hi, got {self.padding}")
        if self.max_translation < 1 or self.final_seq_length < 2:
            raise ValueError(
                f"MNIST1DConfig: max_translation ({self.max_translation}) must be >= 1 and "
                f"final_seq_length ({self.final_seq_length}) >= 2"
            )

    def cache_key(self) -> str:
        """A short hash of every parameter and the generator version (names the cache file)."""
        return hashlib.sha256(self._key_json().encode()).hexdigest()[:16]

    def _key_json(self) -> str:
        params = {**asdict(self), "padding": list(self.padding), "generator_version": GENERATOR_VERSION}
        return json.dumps(params, sort_keys=True)


def _templates() -> np.ndarray:
    x = _RAW_TEMPLATES - _RAW_TEMPLATES.mean(axis=1, keepdims=True)
    x = x / x.std(axis=1, keepdims=True)
    x = x - x[:, :1]  # every template starts (and ends) at 0
    return x / 6.0  # (10, 12)


def _resample(x: np.ndarray, lengths: np.ndarray, n_out: int) -> np.ndarray:
    """Linearly interpolate the first ``lengths[i]`` points of row ``i`` of ``x`` onto ``n_out`` points.

    Row ``i``'s sample ``j`` sits at index ``j * (lengths[i] - 1) / (n_out - 1)``, i.e. both ends are kept.
    """
    n = x.shape[0]
    pos = np.arange(n_out)[None, :] * ((lengths[:, None] - 1) / (n_out - 1))  # (N, n_out)
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, lengths[:, None] - 2)
    frac = pos - i0
    rows = np.arange(n)[:, None]
    return x[rows, i0] * (1.0 - frac) + x[rows, i0 + 1] * frac


def _gaussian_smooth(x: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Gaussian filter along the last axis with reflecting borders (``d c b a | a b c d``)."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(radius, radius)], mode="symmetric")
    length = x.shape[-1]
    out = np.zeros_like(x)
    for w, k in zip(kernel, range(2 * radius + 1), strict=True):
        out += w * padded[..., k : k + length]
    return out


def make_mnist1d(config: MNIST1DConfig = MNIST1DConfig()) -> dict[str, np.ndarray]:
    """Generate MNIST-1D (no caching, no standardisation); see the module docstring for the recipe.

    Args:
        config: generator parameters.

    Returns:
        ``{"x_train", "y_train", "x_test", "y_test"}``: x float64 ``(N, final_seq_length)``, y int64 ``(N,)``.

    Example:
        >>> arrays = make_mnist1d(MNIST1DConfig(num_samples=100, seed=0))
        >>> arrays["x_train"].shape, arrays["x_test"].shape
        ((80, 40), (20, 40))
    """
    rng = np.random.default_rng(config.seed)
    templates = _templates()
    n_classes, t_len = templates.shape
    per_class = config.num_samples // n_classes
    y = np.repeat(np.arange(n_classes), per_class)  # (N,)
    n = y.shape[0]
    lo, hi = config.padding
    width = t_len + hi  # length after dilation (72 by default)

    # 1-2. pad with p zeros, stretch the 12 + p points onto `width` points
    p = rng.integers(lo, hi + 1, size=n)
    x = np.zeros((n, width))
    x[:, :t_len] = templates[y] + _EPS
    x = _resample(x, t_len + p, width)  # (N, width)
    # 3. random amplitude
    x *= 1.0 + config.scale_coeff * (rng.random(n)[:, None] - 0.5)
    # 4. circular shift by k: out[j] = x[j - k]
    k = rng.integers(0, config.max_translation, size=n)
    x = x[np.arange(n)[:, None], (np.arange(width)[None, :] - k[:, None]) % width]
    # 5-6. correlated noise on the background, i.i.d. noise everywhere
    corr = _gaussian_smooth(config.corr_noise_scale * rng.standard_normal((n, width)), sigma=2.0)
    x = np.where(x != 0, x, corr)
    x += config.iid_noise_scale * rng.standard_normal((n, width))
    # 7. shear: a random linear trend
    x -= (config.shear_scale * (rng.random(n)[:, None] - 0.5)) * np.linspace(-0.5, 0.5, width)[None, :]
    # 8. subsample to the final length
    x = _resample(x, np.full(n, width), config.final_seq_length)  # (N, final_seq_length)

    order = rng.permutation(n)
    x, y = x[order], y[order]
    if config.shuffle_seq:
        x = x[:, rng.permutation(config.final_seq_length)]
    split = int(n * config.train_split)
    return {"x_train": x[:split], "y_train": y[:split], "x_test": x[split:], "y_test": y[split:]}


def default_cache_dir() -> Path:
    """``$MERGELAB_CACHE`` if set, else ``~/.cache/mergelab``."""
    env = os.environ.get("MERGELAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mergelab"


def _read_cache(path: Path, config: MNIST1DConfig) -> dict[str, np.ndarray] | None:
    """The cached arrays if ``path`` holds a complete, consistent build of ``config``; else ``None``."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != config._key_json():
                raise ValueError("parameters do not match")
            arrays = {name: f[name] for name in ("x_train", "y_train", "x_test", "y_test")}
        n = (config.num_samples // 10) * 10
        n_train = int(n * config.train_split)
        length = config.final_seq_length
        expected = {"x_train": (n_train, 1, length), "y_train": (n_train,),
                    "x_test": (n - n_train, 1, length), "y_test": (n - n_train,)}  # fmt: skip
        for name, shape in expected.items():
            a = arrays[name]
            if a.shape != shape:
                raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
            if a.dtype != (np.float32 if name.startswith("x") else np.int64):
                raise ValueError(f"{name} has dtype {a.dtype}")
        if not (np.isfinite(arrays["x_train"]).all() and np.isfinite(arrays["x_test"]).all()):
            raise ValueError("non-finite inputs")
        labels = np.concatenate([arrays["y_train"], arrays["y_test"]])
        if labels.min() < 0 or labels.max() > 9:
            raise ValueError("labels outside 0..9")
    except Exception as err:  # any unreadable/truncated/foreign file: rebuild rather than trust it
        logger.warning("mnist1d: ignoring cache file %s (%s: %s); rebuilding", path, type(err).__name__, err)
        return None
    return arrays


def _write_cache(path: Path, config: MNIST1DConfig, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file + rename) so a crash or a concurrent reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(config._key_json()), **arrays)
        os.replace(tmp, path)
    except OSError as err:
        logger.warning("mnist1d: could not write cache %s (%s); continuing without it", path, err)
        tmp.unlink(missing_ok=True)


@register_dataset("mnist1d")
def mnist1d(
    num_samples: int = 5000,
    train_split: float = 0.8,
    seed: int = 42,
    cache_dir: str | Path | None = None,
) -> DataSplits:
    """MNIST-1D as ``(N, 1, 40)`` float32 sequences, standardised with the train split's mean/std.

    Args:
        num_samples: total samples before the split (``num_samples // 10`` per class).
        train_split: share of the samples in the train split (default 4000 / 1000).
        seed: generator seed (same seed -> identical tensors).
        cache_dir: folder of the ``.npz`` cache; default ``$MERGELAB_CACHE`` or ``~/.cache/mergelab``.

    Returns:
        ``DataSplits`` named ``"mnist1d"`` with 10 classes ``"0".."9"`` and ``input_shape == (1, 40)``.

    Example:
        >>> d = mnist1d(num_samples=200, cache_dir="/tmp/mergelab-doctest")
        >>> d.input_shape, len(d.train), len(d.test)
        ((1, 40), 160, 40)
    """
    config = MNIST1DConfig(num_samples=int(num_samples), train_split=float(train_split), seed=int(seed))
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / f"mnist1d-{config.cache_key()}.npz"
    arrays = _read_cache(path, config)
    if arrays is None:
        raw = make_mnist1d(config)
        x_train, x_test = standardize(raw["x_train"], raw["x_test"])
        arrays = {
            "x_train": x_train[:, None, :],  # (N, 1, 40)
            "y_train": raw["y_train"].astype(np.int64),
            "x_test": x_test[:, None, :],
            "y_test": raw["y_test"].astype(np.int64),
        }
        _write_cache(path, config, arrays)
        logger.info("mnist1d: generated %s and cached it at %s", config, path)
    return to_splits(
        "mnist1d", arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], 10,
        [str(i) for i in range(10)],
    )  # fmt: skip
