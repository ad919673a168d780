"""The demo's closing table quotes the p95 the controller's decisions quote."""

from __future__ import annotations

import itertools
import math

from artifact import histogram
from demo.budget_loop import _p95_ms


def test_the_p95_from_metrics_buckets_is_the_controllers_interpolated_one() -> None:
    counts = histogram.histogram([0.0237] * 90 + [0.0268] * 10)  # in one 23.7..31.6 ms bucket
    bounds = [*histogram.UPPER_BOUNDS, math.inf]
    cumulative = list(zip(bounds, map(float, itertools.accumulate(counts)), strict=True))
    p95 = _p95_ms(cumulative, sum(counts))
    expected = histogram.percentile(counts, 0.95)
    assert expected is not None and p95 == expected * 1000
    assert p95 < 31.6  # inside its bucket, not the upper bound 10 ** 1.5 ms
    assert _p95_ms(cumulative, 0) is None
