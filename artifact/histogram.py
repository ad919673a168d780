"""The latency histogram agents and controller share: fixed log-spaced buckets.

Every window carries counts over the same buckets, so windows from any device, model or
time range merge exactly by summing counts, and percentiles are computed from merged
counts rather than averaged (an average of p95s is not a p95).

Buckets: 8 per decade from 10 µs to 100 s. Bucket 0 holds (0, 10 µs], bucket ``i``
holds (``UPPER_BOUNDS[i-1]``, ``UPPER_BOUNDS[i]``] (Prometheus ``le`` semantics), and
the last bucket holds everything above 100 s (overflow): ``BUCKET_COUNT`` = 58 counts.
Neighbouring bounds differ by a factor of 10**(1/8) ≈ 1.33, which bounds the error of a
percentile computed from the counts.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

LOWEST_BOUND_S = 1e-5
DECADES = 7
PER_DECADE = 8
# Finite upper bounds, computed once from integers so every process gets the same floats.
UPPER_BOUNDS: tuple[float, ...] = tuple(
    LOWEST_BOUND_S * 10 ** (i / PER_DECADE) for i in range(DECADES * PER_DECADE + 1)
)
BUCKET_COUNT = len(UPPER_BOUNDS) + 1  # plus the overflow bucket
_STEP = 10 ** (1 / PER_DECADE)


class HistogramError(ValueError):
    """Counts that do not fit the shared buckets (wrong length or negative)."""


def empty() -> list[int]:
    return [0] * BUCKET_COUNT


def bucket_index(seconds: float) -> int:
    """The bucket a latency falls in; refuses NaN and negative durations."""
    if math.isnan(seconds) or seconds < 0:
        raise HistogramError(f"a latency must be a non-negative number of seconds, got {seconds}")
    return bisect.bisect_left(UPPER_BOUNDS, seconds)


def histogram(samples: Iterable[float]) -> list[int]:
    """The counts of ``samples`` (seconds) over the shared buckets."""
    counts = empty()
    for s in samples:
        counts[bucket_index(s)] += 1
    return counts


def check_counts(counts: Sequence[int], *, what: str = "latency_bucket_counts") -> None:
    if len(counts) != BUCKET_COUNT:
        raise HistogramError(
            f"{what} has {len(counts)} buckets; the shared histogram has {BUCKET_COUNT} "
            "(artifact.histogram): agent and controller disagree on the buckets"
        )
    if any(c < 0 for c in counts):
        raise HistogramError(f"{what} has a negative count")


def merge(*histograms: Sequence[int]) -> list[int]:
    """Elementwise sum: the histogram of all the samples behind ``histograms``."""
    total = empty()
    for counts in histograms:
        check_counts(counts)
        for i, c in enumerate(counts):
            total[i] += c
    return total


def bucket_bounds(index: int) -> tuple[float, float]:
    """(lower, upper] of a bucket; the overflow bucket's upper bound is infinity."""
    if not 0 <= index < BUCKET_COUNT:
        raise HistogramError(f"bucket index must be in 0..{BUCKET_COUNT - 1}, got {index}")
    upper = UPPER_BOUNDS[index] if index < len(UPPER_BOUNDS) else math.inf
    lower = UPPER_BOUNDS[index - 1] if index > 0 else LOWEST_BOUND_S / _STEP
    return lower, upper


def percentile(counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0 < q <= 1) in seconds, log-interpolated inside its bucket.

    Log-interpolation assumes samples spread evenly in log(latency) within the bucket; the
    result always lies inside the bucket that holds the quantile, so it is off by at most
    one bucket width (a factor of 1.33). Bucket 0 is treated as (7.5 µs, 10 µs]; a
    quantile in the overflow bucket is reported as its lower bound, 100 s. None when the
    histogram is empty.
    """
    if not 0 < q <= 1:
        raise HistogramError(f"a quantile must be in (0, 1], got {q}")
    check_counts(counts)
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    cumulative = 0
    for index, c in enumerate(counts):
        if c and cumulative + c >= rank:
            lower, upper = bucket_bounds(index)
            if math.isinf(upper):
                return lower
            fraction = (rank - cumulative) / c
            return lower * math.pow(upper / lower, fraction)
        cumulative += c
    raise AssertionError("unreachable: the cumulative count reaches the total")
