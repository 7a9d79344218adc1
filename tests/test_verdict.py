"""Seed-level intervals and verdicts: coverage-shaped properties, pairing, and the verdict's three outcomes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.analysis.verdict import claim, judge, paired_interval
from mergelab.report import Report, claims_table

values = st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=12)


@settings(max_examples=40, deadline=None)
@given(values)
def test_interval_contains_mean(xs: list[float]) -> None:
    iv = paired_interval(xs)
    assert iv.low <= iv.mean + 1e-9 and iv.mean <= iv.high + 1e-9
    assert iv.n == len(xs)


@settings(max_examples=30, deadline=None)
@given(values, st.floats(-5, 5, allow_nan=False))
def test_paired_interval_is_the_interval_of_differences(xs: list[float], shift: float) -> None:
    ys = [x - shift for x in xs]  # a constant per-seed difference: the pairing removes all seed noise
    iv = paired_interval(xs, ys)
    assert iv.mean == pytest.approx(shift, abs=1e-6)
    assert iv.high - iv.low == pytest.approx(0.0, abs=1e-6)


def test_pairing_narrows_interval_when_seeds_share_noise() -> None:
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 1.0, 8)
    a = seed_effect + 0.3 + rng.normal(0, 0.05, 8)
    b = seed_effect + rng.normal(0, 0.05, 8)
    paired = paired_interval(a, b)
    assert paired.low > 0  # the shared seed effect cancels
    assert judge(paired, "greater") == "supported"


def test_t_interval_matches_textbook() -> None:
    iv = paired_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.3027
    assert iv.mean == 2.0
    assert iv.high - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)


def test_bootstrap_over_seeds_is_inside_range() -> None:
    xs = [0.1, 0.3, 0.2, 0.25, 0.15, 0.22]
    iv = paired_interval(xs, method="bootstrap", seed=1)
    assert min(xs) <= iv.low <= iv.mean <= iv.high <= max(xs)
    assert paired_interval(xs, method="bootstrap", seed=1) == iv  # seeded


def test_verdicts() -> None:
    pos = paired_interval([0.5, 0.6, 0.55, 0.52])
    neg = paired_interval([-0.5, -0.6, -0.55, -0.52])
    mixed = paired_interval([-0.5, 0.6, -0.2, 0.3])
    assert judge(pos, "greater") == "supported"
    assert judge(neg, "greater") == "not supported"
    assert judge(mixed, "greater") == "inconclusive"
    assert judge(neg, "less") == "supported" and judge(pos, "less") == "not supported"
    assert judge(pos, "greater", margin=1.0) == "not supported"
    small = paired_interval([0.01, -0.01, 0.0, 0.005])
    assert judge(small, "within", margin=0.05) == "supported"
    assert judge(pos, "within", margin=0.05) == "not supported"
    assert judge(paired_interval([0.4]), "greater") == "inconclusive"  # one seed: no interval, no verdict


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        paired_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="unknown method"):
        paired_interval([1.0, 2.0], method="z")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown direction"):
        judge(paired_interval([1.0, 2.0]), "up")  # type: ignore[arg-type]


def test_claims_table_opens_report(tmp_path) -> None:
    c = claim("A beats B", "acc A − B", [0.9, 0.91, 0.92], [0.8, 0.82, 0.81], paper="+10 pts", scale=100)
    assert c.verdict == "supported"
    table = claims_table([c])
    assert "A beats B" in table and "supported" in table and "+10 pts" in table
    r = Report(tmp_path, "t")
    r.text("body")
    r.claims([c])
    text = r.save().read_text()
    assert text.index("Claims and verdicts") < text.index("body")


def test_claims_table_escapes_pipes() -> None:
    c = claim("|gap| small", "a − b", [0.01, 0.0, -0.01], direction="within", margin=0.05)
    row = claims_table([c]).splitlines()[2]
    assert "\\|gap\\|" in row and row.count(" | ") == 5
