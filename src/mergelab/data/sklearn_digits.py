"""scikit-learn's 8x8 handwritten digits (1797 images, ships inside scikit-learn, nothing to download).

Small enough that an MLP trains in seconds on a CPU, so it is the default dataset of tests and pilots.
scikit-learn is imported inside the builder to keep ``import mergelab.data`` light.
"""

from __future__ import annotations

from .core import DataSplits, register_dataset, standardize, to_splits

__all__ = ["digits"]


@register_dataset("digits")
def digits(seed: int = 0, test_fraction: float = 0.25) -> DataSplits:
    """The UCI/scikit-learn digits as ``(N, 1, 8, 8)`` float32 images with a seeded stratified split.

    Pixels (0..16) are standardised with one global mean/std computed on the train split only.

    Args:
        seed: seed of the stratified train/test split (same seed -> identical tensors).
        test_fraction: share of the samples put in the test split, in (0, 1).

    Returns:
        ``DataSplits`` named ``"digits"`` with 10 classes ``"0".."9"``; 1347/450 samples by default.

    Example:
        >>> d = digits(seed=0)
        >>> len(d.train), len(d.test), d.input_shape
        (1347, 450, (1, 8, 8))
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"digits: test_fraction must lie in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.images.reshape(-1, 1, 8, 8)  # (1797, 1, 8, 8), values 0..16
    y = bunch.target
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=float(test_fraction), random_state=int(seed), stratify=y
    )
    x_train, x_test = standardize(x_train, x_test)
    return to_splits("digits", x_train, y_train, x_test, y_test, 10, [str(i) for i in range(10)])
