"""The shared latency histogram: windows merge exactly, percentiles land in the right bucket."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from artifact import histogram
from artifact.histogram import BUCKET_COUNT, UPPER_BOUNDS, HistogramError


def test_buckets_are_log_spaced_from_10_us_to_100_s_with_an_overflow_bucket() -> None:
    assert UPPER_BOUNDS[0] == pytest.approx(1e-5)
    assert UPPER_BOUNDS[-1] == pytest.approx(100.0)
    assert BUCKET_COUNT == len(UPPER_BOUNDS) + 1 == 58
    ratios = {round(b / a, 9) for a, b in itertools.pairwise(UPPER_BOUNDS)}
    assert ratios == {round(10 ** (1 / 8), 9)}
    assert sum(1 for b in UPPER_BOUNDS if b < 1e-3) >= 16  # sub-millisecond resolution


def test_bucket_index_follows_le_semantics_and_refuses_bad_latencies() -> None:
    assert histogram.bucket_index(0.0) == 0
    assert histogram.bucket_index(UPPER_BOUNDS[0]) == 0
    assert histogram.bucket_index(UPPER_BOUNDS[3]) == 3
    assert histogram.bucket_index(math.nextafter(UPPER_BOUNDS[3], 1.0)) == 4
    assert histogram.bucket_index(1e6) == BUCKET_COUNT - 1
    for bad in (-1e-9, math.nan):
        with pytest.raises(HistogramError):
            histogram.bucket_index(bad)


def test_merging_windows_equals_the_histogram_of_all_samples() -> None:
    rng = random.Random(5)
    samples = [rng.lognormvariate(math.log(3e-3), 1.5) for _ in range(5000)]
    samples += [0.0, 150.0, UPPER_BOUNDS[10]]
    cuts = sorted(rng.sample(range(1, len(samples)), 20))
    parts = [samples[a:b] for a, b in zip([0, *cuts], [*cuts, len(samples)], strict=True)]
    merged = histogram.merge(*(histogram.histogram(p) for p in parts))
    assert merged == histogram.histogram(samples)
    assert sum(merged) == len(samples)
    for q in (0.5, 0.95, 0.99):
        assert histogram.percentile(merged, q) == histogram.percentile(
            histogram.histogram(samples), q
        )


def test_merge_refuses_counts_over_other_buckets() -> None:
    with pytest.raises(HistogramError, match="58"):
        histogram.merge(histogram.empty(), [0] * 20)


@pytest.mark.parametrize("q", [0.5, 0.9, 0.95, 0.99])
def test_percentiles_of_known_distributions_are_within_one_bucket(q: float) -> None:
    rng = random.Random(11)
    for median in (5e-5, 2e-3, 0.4):
        samples = sorted(rng.lognormvariate(math.log(median), 0.8) for _ in range(20_000))
        exact = samples[math.ceil(q * len(samples)) - 1]
        estimate = histogram.percentile(histogram.histogram(samples), q)
        assert estimate is not None
        lower, upper = histogram.bucket_bounds(histogram.bucket_index(exact))
        assert lower <= estimate <= upper, (median, q, exact, estimate)
    # a constant latency is reported inside its own bucket
    constant = histogram.histogram([0.012] * 100)
    low, high = histogram.bucket_bounds(histogram.bucket_index(0.012))
    assert low < (histogram.percentile(constant, q) or 0) <= high


def test_percentile_of_nothing_and_of_the_overflow_bucket() -> None:
    assert histogram.percentile(histogram.empty(), 0.95) is None
    assert histogram.percentile(histogram.histogram([500.0]), 0.5) == UPPER_BOUNDS[-1]
    with pytest.raises(HistogramError):
        histogram.percentile(histogram.empty(), 0.0)
