"""Uncertainty for every rate a user reads: Wilson score intervals for a proportion (one run), Student-t intervals
of per-seed means (several seeds) never narrower than the samples' own uncertainty, and the three-way verdict a
comparison can honestly give."""

from __future__ import annotations

import math
from typing import Literal

#: two-sided 95% normal quantile
Z95 = 1.959963984540054
#: two-sided 95% Student-t quantiles by degrees of freedom (df > 30: the normal quantile is within 4%)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        25: 2.060, 30: 2.042}  # fmt: skip

Verdict = Literal["holds", "fails", "inconclusive"]


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sound at 0/n and n/n, where the normal approximation collapses
    to a point (0 of 32 bounds the true rate below about 0.11, not at 0)."""
    if trials <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must lie in [0, {trials}], got {successes}")
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def t_quantile(df: int) -> float:
    if df <= 0:
        raise ValueError("a t-interval needs at least two values")
    if df in _T95:
        return _T95[df]
    below = max(k for k in _T95 if k < df) if df < 30 else None
    return _T95[below] if below is not None else Z95 * (1 + 1 / (4 * df))


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): a 95% t-interval of the mean of per-seed values; a single value gives (v, v, v)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return (mean, mean, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return (mean, mean - half, mean + half)


def seeds_sampling_interval(
    values: list[float], per_seed: list[tuple[float, float]] | list[list[float]]
) -> tuple[float, float]:
    """The sampling uncertainty of the mean of per-seed rates, from each seed's own 95% (Wilson) interval: each
    side's half-width averaged over the seeds and divided by sqrt(n seeds), about the interval of the pooled
    samples. With 2-3 seeds a t-interval alone collapses to a point when the seeds agree (0/128 three times would
    read [0.00, 0.00]); widened to at least this (`hull`), no interval claims more certainty than the samples hold."""
    n = len(values)
    if n == 0 or len(per_seed) != n:
        raise ValueError("one interval per seed is needed")
    mean = sum(values) / n
    below = sum(v - iv[0] for v, iv in zip(values, per_seed)) / (n * math.sqrt(n))
    above = sum(iv[1] - v for v, iv in zip(values, per_seed)) / (n * math.sqrt(n))
    return (mean - below, mean + above)


def hull(interval: tuple[float, float, float], floor: tuple[float, float]) -> tuple[float, float, float]:
    """(value, low, high) widened to contain `floor` (low, high)."""
    value, low, high = interval
    return (value, min(low, floor[0]), max(high, floor[1]))


def rate_over_seeds(
    values: list[float], per_seed: list[tuple[float, float]] | list[list[float]] | None = None
) -> tuple[float, float, float]:
    """(mean, low, high) of a rate over seeds: the t-interval of the per-seed values, widened to the samples' own
    uncertainty when every seed's interval is known, clipped to [0, 1]."""
    over_seeds = mean_interval(values)
    if per_seed is not None and len(values) > 1:
        over_seeds = hull(over_seeds, seeds_sampling_interval(values, per_seed))
    mean, low, high = over_seeds
    return (mean, max(0.0, low), min(1.0, high))


def difference_interval(
    a: float, a_interval: tuple[float, float], b: float, b_interval: tuple[float, float]
) -> tuple[float, float, float]:
    """(a - b, low, high): Newcombe's 95% interval of a difference of two independent proportions from their
    Wilson intervals (method 10); sound at 0 and 1, where a normal interval of the difference is not."""
    d = a - b
    low = d - math.sqrt((a - a_interval[0]) ** 2 + (b_interval[1] - b) ** 2)
    high = d + math.sqrt((a_interval[1] - a) ** 2 + (b - b_interval[0]) ** 2)
    return (d, low, high)


def paired_difference_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(mean difference, low, high): a 95% t-interval of per-seed differences a_s - b_s (seeds paired)."""
    if len(a) != len(b):
        raise ValueError("paired values need the same seeds")
    return mean_interval([x - y for x, y in zip(a, b, strict=True)])


def at_most(difference: tuple[float, float, float], margin: float) -> Verdict:
    """Is A at most B, given the interval of A - B? fails when A is confidently worse (the interval lies above 0);
    holds when A is at most `margin` worse at 95% confidence (the interval's top is at or below the margin, a
    non-inferiority test); inconclusive otherwise: the samples cannot tell."""
    _, low, high = difference
    if low > 0:
        return "fails"
    if high <= margin:
        return "holds"
    return "inconclusive"


def combine(verdicts: list[Verdict]) -> Verdict:
    """A claim made of several parts: fails if any part fails, holds if every part holds, else inconclusive."""
    if "fails" in verdicts:
        return "fails"
    return "holds" if all(v == "holds" for v in verdicts) else "inconclusive"


def format_rate(value: float | None, interval: tuple[float, float] | list[float] | None) -> str:
    """'0.00 [0.00, 0.03]': a rate with its 95% interval, as tables show it."""
    if value is None:
        return "-"
    if interval is None:
        return f"{value:.2f}"
    return f"{value:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"
