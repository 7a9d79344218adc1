"""Seed-level confidence intervals and verdicts computed from them.

A study's claim ("alignment lowers the barrier", "MuDSC beats ZipIt") is about what happens when one trains
new networks, so the unit of replication is the *training seed* (or seed pair), never the test sample: test
samples of one network are not independent draws of the effect. Every claimed difference is therefore measured
once per seed pair (both arms on the same seeds, so the pairing removes the seed's own effect), and the interval
is over those per-seed differences: a Student-t interval (default, ``scipy.stats.t.interval``) or a percentile
bootstrap over seeds (``scipy.stats.bootstrap``).

The verdict is read off the interval, never written by hand:

* ``supported``: the whole interval lies on the claimed side of the margin;
* ``not supported``: the whole interval lies on the other side (the data contradict the claim);
* ``inconclusive``: the interval straddles the margin, or there are fewer than two seeds.

Example:
    >>> iv = paired_interval([0.30, 0.35, 0.28, 0.33, 0.31], [0.05, 0.04, 0.06, 0.05, 0.07])
    >>> round(iv.mean, 3), iv.n
    (0.26, 5)
    >>> judge(iv, "greater")
    'supported'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy import stats

__all__ = [
    "Claim",
    "Direction",
    "Interval",
    "IntervalMethod",
    "Verdict",
    "claim",
    "judge",
    "paired_interval",
]

IntervalMethod = Literal["t", "bootstrap"]
Direction = Literal["greater", "less", "within"]
Verdict = Literal["supported", "not supported", "inconclusive"]


@dataclass(frozen=True)
class Interval:
    """A confidence interval of a mean over ``n`` seeds (``low``/``high`` are NaN when ``n < 2``)."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95
    method: str = "t"

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)

    def format(self, digits: int = 3, scale: float = 1.0) -> str:
        """``mean [low, high]`` (e.g. ``0.120 [0.080, 0.160]``); ``scale=100`` prints points."""
        m = f"{self.mean * scale:+.{digits}f}"
        if math.isnan(self.low):
            return f"{m} (n={self.n}, no interval)"
        return f"{m} [{self.low * scale:+.{digits}f}, {self.high * scale:+.{digits}f}]"


def paired_interval(
    a: Sequence[float],
    b: Sequence[float] | None = None,
    *,
    level: float = 0.95,
    method: IntervalMethod = "t",
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Interval of the mean of ``a − b`` over seeds (``a`` alone when ``b`` is None).

    Args:
        a: one value per seed (pair) of the first arm.
        b: the second arm on the *same* seeds, in the same order (the pairing); None for a one-sample
            interval of ``a`` itself (e.g. "the aligned barrier is below 0.05").
        level: confidence level.
        method: ``"t"`` (Student-t over the per-seed differences) or ``"bootstrap"`` (``scipy.stats.bootstrap``,
            percentile, resampling seeds).
        n_resamples: bootstrap resamples.
        seed: the bootstrap's random seed.

    Returns:
        An :class:`Interval`; with fewer than two seeds ``low``/``high`` are NaN.

    Raises:
        ValueError: arms of different lengths, an empty arm, a level outside (0, 1) or an unknown method.
    """
    x = np.asarray(a, dtype=float)
    if b is not None:
        y = np.asarray(b, dtype=float)
        if x.shape != y.shape:
            raise ValueError(
                f"paired_interval: arms differ in length ({x.size} vs {y.size}); pair them by seed"
            )
        x = x - y
    if x.ndim != 1 or x.size == 0:
        raise ValueError(
            f"paired_interval: need a non-empty 1-D list of per-seed values, got shape {x.shape}"
        )
    if not 0.0 < level < 1.0:
        raise ValueError(f"paired_interval: level must be in (0, 1), got {level}")
    if method not in ("t", "bootstrap"):
        raise ValueError(f"paired_interval: unknown method {method!r}; use 't' or 'bootstrap'")
    mean, n = float(x.mean()), int(x.size)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n, level, method)
    if np.ptp(x) == 0.0:  # every seed gave the same difference: the interval is that point
        return Interval(mean, mean, mean, n, level, method)
    if method == "t":
        sem = float(stats.sem(x))
        if not sem > 0.0:  # spread below float resolution (sem underflows): scipy would return NaN
            return Interval(mean, mean, mean, n, level, method)
        low, high = stats.t.interval(level, n - 1, loc=mean, scale=sem)
        return Interval(mean, float(low), float(high), n, level, method)
    res = stats.bootstrap(
        (x,), np.mean, confidence_level=level, n_resamples=n_resamples, method="percentile",
        random_state=np.random.default_rng(seed),
    )  # fmt: skip
    ci = res.confidence_interval
    return Interval(mean, float(ci.low), float(ci.high), n, level, method)


def judge(interval: Interval, direction: Direction, margin: float = 0.0) -> Verdict:
    """The verdict on a claim about the interval's mean.

    Args:
        interval: from :func:`paired_interval`.
        direction: ``"greater"`` (claim: mean > margin), ``"less"`` (mean < margin) or ``"within"``
            (claim: |mean| < margin, an equivalence claim such as "averaging ≈ ensembling").
        margin: the threshold of the claim (0 for "a beats b").
    """
    lo, hi = interval.low, interval.high
    if interval.n < 2 or math.isnan(lo) or math.isnan(hi):
        return "inconclusive"
    if direction == "greater":
        return "supported" if lo > margin else "not supported" if hi <= margin else "inconclusive"
    if direction == "less":
        return "supported" if hi < margin else "not supported" if lo >= margin else "inconclusive"
    if direction == "within":
        if margin <= 0:
            raise ValueError(f"judge: an equivalence claim needs a positive margin, got {margin}")
        if -margin < lo and hi < margin:
            return "supported"
        return "not supported" if lo >= margin or hi <= -margin else "inconclusive"
    raise ValueError(f"judge: unknown direction {direction!r}; use 'greater', 'less' or 'within'")


@dataclass(frozen=True)
class Claim:
    """One row of a report's opening table: the claim, our interval and verdict, and the paper's figure."""

    claim: str
    measure: str  # what the interval is of, e.g. "loss barrier, naive − weight matching"
    interval: Interval
    verdict: Verdict
    paper: str  # the paper's number (text, with its setting), or "—"
    setting: str = ""  # our setting (dataset / arch / width)
    scale: float = 1.0  # printing scale of the interval (100 for accuracy points)
    unit: str = ""

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["interval"] = self.interval.to_dict()
        return d


def claim(
    text: str,
    measure: str,
    a: Sequence[float],
    b: Sequence[float] | None = None,
    *,
    direction: Direction = "greater",
    margin: float = 0.0,
    paper: str = "—",
    setting: str = "",
    scale: float = 1.0,
    unit: str = "",
    method: IntervalMethod = "t",
    level: float = 0.95,
) -> Claim:
    """A :class:`Claim` whose verdict is computed from the seed-paired interval of ``a − b`` (or of ``a``)."""
    iv = paired_interval(a, b, level=level, method=method)
    return Claim(text, measure, iv, judge(iv, direction, margin), paper, setting, scale, unit)
