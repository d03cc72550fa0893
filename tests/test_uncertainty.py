"""The bootstrap behind every interval: seeded, deterministic, and as wide as the data say."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ptqrepro.errors import PtqError
from ptqrepro.report.uncertainty import (
    BootstrapSettings,
    bootstrap_means,
    expanded_tail,
    mean_interval,
    paired_difference,
    perplexity_interval,
    seed_agreement,
)

SETTINGS = BootstrapSettings(samples=1000, seed=0)


def test_the_bootstrap_is_seeded_and_deterministic():
    nll = np.random.default_rng(0).normal(3.0, 0.5, (3, 24))
    first, again = bootstrap_means(nll, SETTINGS), bootstrap_means(nll.copy(), SETTINGS)
    assert np.array_equal(first, again)
    assert mean_interval(nll, SETTINGS) == mean_interval(nll, SETTINGS)
    other = bootstrap_means(nll, BootstrapSettings(samples=1000, seed=1))
    assert not np.array_equal(first, other)


def test_perplexity_interval_is_the_exponential_of_the_mean_nll_interval():
    nll = np.random.default_rng(1).normal(3.0, 0.5, 24)
    mean, ppl = mean_interval(nll, SETTINGS), perplexity_interval(nll, SETTINGS)
    assert ppl.value == pytest.approx(math.exp(nll.mean()))
    assert (ppl.low, ppl.high) == pytest.approx((math.exp(mean.low), math.exp(mean.high)))
    assert ppl.low < ppl.value < ppl.high


def test_intervals_narrow_with_more_windows_like_one_over_root_n():
    rng = np.random.default_rng(2)
    widths = {}
    for windows in (16, 64, 256):
        interval = mean_interval(rng.normal(3.0, 0.5, windows), SETTINGS)
        widths[windows] = interval.high - interval.low
    assert widths[16] > widths[64] > widths[256]
    assert widths[16] / widths[256] == pytest.approx(4.0, rel=0.3)


def test_nominal_coverage_at_small_window_counts():
    rng = np.random.default_rng(3)
    settings = BootstrapSettings(samples=400)
    for windows in (8, 24):
        hits = 0
        for _ in range(200):
            interval = mean_interval(rng.normal(0.0, 1.0, windows), settings)
            hits += interval.low < 0.0 < interval.high
        assert hits >= 0.9 * 200, (windows, hits)  # the plain percentile interval covers about 87 % at 8
    assert expanded_tail(0.95, 8) < expanded_tail(0.95, 24) < expanded_tail(0.95, 10_000) == pytest.approx(0.025, abs=1e-4)


def test_paired_differences_are_tight_where_window_difficulty_is_shared():
    rng = np.random.default_rng(4)
    difficulty = rng.normal(3.0, 0.8, 24)
    a, b = difficulty + 0.02 + rng.normal(0, 0.005, 24), difficulty
    paired = paired_difference(a, b, SETTINGS)
    separate = mean_interval(a, SETTINGS), mean_interval(b, SETTINGS)
    assert paired.low > 0  # the 0.02 nat gap is resolved ...
    assert separate[0].low < separate[1].high  # ... though the two intervals overlap
    with pytest.raises(PtqError, match="different shapes"):
        paired_difference(a[:10], b, SETTINGS)


def test_calibration_seeds_widen_the_interval_and_their_signs_are_checked():
    rng = np.random.default_rng(5)
    difficulty = rng.normal(3.0, 0.8, 24)
    steady = np.stack([difficulty + 0.05] * 3)
    scattered = np.stack([difficulty - 0.05, difficulty + 0.05, difficulty + 0.15])
    base = np.stack([difficulty] * 3)
    narrow, wide = paired_difference(steady, base, SETTINGS), paired_difference(scattered, base, SETTINGS)
    assert narrow.value == pytest.approx(wide.value)
    assert wide.high - wide.low > 10 * (narrow.high - narrow.low)
    assert seed_agreement(steady, base, lambda delta: delta > 0)
    assert not seed_agreement(scattered, base, lambda delta: delta > 0)


def test_a_diverged_model_has_no_interval_and_bad_settings_are_refused():
    assert all(math.isnan(x) for x in (mean_interval(np.array([1.0, math.inf, 2.0]), SETTINGS).low,))
    with pytest.raises(PtqError, match="at least 100"):
        BootstrapSettings(samples=10)
    with pytest.raises(PtqError, match="confidence level"):
        BootstrapSettings(level=1.0)
