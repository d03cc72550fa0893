"""How far a perplexity, or the difference between two recipes, may move: a seeded bootstrap over
test windows and calibration seeds.

A perplexity result keeps each test window's mean next-token cross-entropy (its NLL), so a recipe
evaluated on W windows at S calibration seeds is a matrix ``nll[s, w]`` and

    ppl = exp( mean_{s,w} nll[s, w] ).

One bootstrap replicate draws S seeds and W windows with replacement (the same windows for every
seed, and for both recipes of a comparison, since all recipes score the same windows) and
recomputes the statistic; the interval is the replicates' central quantiles, widened for a small
number of windows n as Hesterberg's expanded percentile interval does (Hesterberg 2015, "What
teachers should know about the bootstrap", §5.1: the tail probability alpha/2 is replaced by
Phi(-sqrt(n / (n - 1)) t_{n-1, 1-alpha/2}), so that 8 or 24 windows do not give the plain percentile
interval's under-coverage). Two recipes a and b are compared by their
paired difference per window

    delta = mean_{s,w} (nll_a[s, w] - nll_b[s, w]) = log(ppl_a / ppl_b),

whose interval is far narrower than the two perplexities' intervals suggest: most of a window's
difficulty is shared by every recipe. With one seed the seed draw is a no-op; with two or more the
interval also carries the calibration draw's spread (crudely with 3 seeds: :func:`seed_agreement`
says where the seeds disagree). Everything is seeded (``BootstrapSettings.seed``) and therefore
deterministic: the same result files give the same intervals.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

from ptqrepro.errors import PtqError


@dataclass(frozen=True)
class BootstrapSettings:
    """``samples`` bootstrap replicates drawn by ``numpy.random.default_rng(seed)``; intervals at
    confidence ``level`` (two-sided percentile)."""

    samples: int = 2000
    seed: int = 0
    level: float = 0.95

    def __post_init__(self) -> None:
        if self.samples < 100:
            raise PtqError(f"bootstrap samples must be at least 100, got {self.samples}")
        if not 0.5 <= self.level < 1:
            raise PtqError(f"confidence level must be in [0.5, 1), got {self.level}")
        if self.seed < 0:
            raise PtqError(f"bootstrap seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval ``[low, high]``."""

    value: float
    low: float
    high: float

    def map(self, function) -> Interval:
        """The interval of a monotonically increasing function of the statistic."""
        return Interval(function(self.value), function(self.low), function(self.high))


def bootstrap_means(nll: np.ndarray, settings: BootstrapSettings) -> np.ndarray:
    """The mean of ``nll`` [seeds, windows] in each of ``settings.samples`` replicates, each
    drawing seeds and windows with replacement (windows shared by all seeds)."""
    nll = _matrix(nll)
    seeds, windows = nll.shape
    rng = np.random.default_rng(settings.seed)
    window_counts = _draw_counts(rng, settings.samples, windows)
    seed_counts = _draw_counts(rng, settings.samples, seeds) if seeds > 1 else np.ones((settings.samples, 1))
    # replicate b: sum_{s,w} seed_counts[b, s] * nll[s, w] * window_counts[b, w] / (S * W)
    return ((seed_counts @ nll) * window_counts).sum(axis=1) / (seeds * windows)


def mean_interval(nll: np.ndarray, settings: BootstrapSettings) -> Interval:
    """The mean of ``nll`` [seeds, windows] (or [windows]) and its bootstrap interval; all NaN
    where a loss is not finite (a diverged model has no interval)."""
    nll = _matrix(nll)
    if not np.isfinite(nll).all():
        return Interval(math.nan, math.nan, math.nan)
    replicates = bootstrap_means(nll, settings)
    tail = expanded_tail(settings.level, nll.shape[1])
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return Interval(float(nll.mean()), float(low), float(high))


def normal_quantile(level: float) -> float:
    """z such that a standard normal's central ``level`` lies within ±z (1.96 at 0.95): the
    half-width of a normal interval in standard errors."""
    return statistics.NormalDist().inv_cdf(0.5 + level / 2)


def expanded_tail(level: float, windows: int) -> float:
    """The replicates' tail probability of the expanded percentile interval at confidence ``level``
    over ``windows`` resampled units: Phi(-sqrt(n / (n - 1)) t_{n-1, (1 + level) / 2}); for large n
    it tends to the plain (1 - level) / 2."""
    from scipy.stats import norm, t

    if windows < 2:
        return (1 - level) / 2
    return float(norm.cdf(-math.sqrt(windows / (windows - 1)) * t.ppf((1 + level) / 2, windows - 1)))


def perplexity_interval(nll: np.ndarray, settings: BootstrapSettings) -> Interval:
    """``exp(mean nll)`` and its interval (the exponential of the mean's interval)."""
    return mean_interval(nll, settings).map(exp_or_inf)


def exp_or_inf(value: float) -> float:
    """``exp`` that gives inf instead of raising past float range (a diverged model's perplexity)."""
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def paired_difference(a: np.ndarray, b: np.ndarray, settings: BootstrapSettings) -> Interval:
    """``mean(a - b)`` over paired [seeds, windows] matrices (the log of the perplexity ratio
    ``ppl_a / ppl_b``) and its interval: both recipes resampled with the same windows and seeds."""
    a, b = _matrix(a), _matrix(b)
    if a.shape != b.shape:
        raise PtqError(f"paired difference of results of different shapes {a.shape} and {b.shape}")
    return mean_interval(a - b, settings)


def pair_by_seed(seeds_a: list, nll_a: np.ndarray, seeds_b: list, nll_b: np.ndarray,
                 what: str = "the two results") -> tuple[np.ndarray, np.ndarray]:
    """Two results' per-window losses [seeds, windows] as matrices paired row by row: by
    calibration seed (the seeds both ran at), except that a result without a seed (a recipe that
    reads no calibration data, such as RTN: ``seeds == [None]``) is set against every seed of the
    other."""
    if is_seedless(seeds_a) or is_seedless(seeds_b):
        count = max(len(seeds_a), len(seeds_b))
        return np.broadcast_to(nll_a, (count, nll_a.shape[1])), np.broadcast_to(nll_b, (count, nll_b.shape[1]))
    common = [seed for seed in seeds_a if seed in seeds_b]
    if not common:
        raise PtqError(f"{what} share no calibration seed (seeds {seeds_a} and {seeds_b})")
    return nll_a[[seeds_a.index(seed) for seed in common]], nll_b[[seeds_b.index(seed) for seed in common]]


def is_seedless(seeds: list) -> bool:
    """Whether results carry no calibration seed (None, or NaN as pandas reads an empty cell)."""
    return len(seeds) == 1 and (seeds[0] is None or (isinstance(seeds[0], float) and math.isnan(seeds[0])))


def seed_agreement(a: np.ndarray, b: np.ndarray, on_claimed_side) -> bool:
    """Whether every seed's own difference ``mean_w(a[s] - b[s])`` is on the same side of the claim
    (``on_claimed_side(delta) -> bool``): False marks a verdict that depends on the calibration draw."""
    per_seed = (_matrix(a) - _matrix(b)).mean(axis=1)
    sides = {bool(on_claimed_side(float(delta))) for delta in per_seed}
    return len(sides) == 1


def _matrix(nll: np.ndarray) -> np.ndarray:
    nll = np.asarray(nll, dtype=np.float64)
    if nll.ndim == 1:
        nll = nll[None, :]
    if nll.ndim != 2 or nll.size == 0:
        raise PtqError(f"expected per-window losses as [seeds, windows], got shape {nll.shape}")
    return nll


def _draw_counts(rng: np.random.Generator, samples: int, size: int) -> np.ndarray:
    """How often each of ``size`` items is drawn in each of ``samples`` draws of ``size`` items
    with replacement, as a [samples, size] float matrix."""
    drawn = rng.integers(0, size, size=(samples, size))
    counts = np.zeros((samples, size))
    np.add.at(counts, (np.arange(samples)[:, None], drawn), 1.0)
    return counts
