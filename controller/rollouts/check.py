"""Does a (device class, model, artifact) meet its budgets? Decided from telemetry slices.

The budget loop looks at the last K complete slices of ``window_seconds`` each. A slice
with fewer than ``min_samples`` inferences says nothing (too few to judge a p95); a slice
misses when its p95 latency or its energy per inference is over budget. Only K missed
slices in a row are a miss (hysteresis: one slow window triggers nothing), and only K met
slices in a row are a pass. Percentiles come from merged histogram counts, never from
averaged percentiles.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from artifact import histogram
from controller.device_classes import Budgets


class SliceVerdict(enum.Enum):
    MET = "met"
    MISSED = "missed"
    TOO_FEW = "too_few"  # fewer inferences than min_samples: no verdict


@dataclass(frozen=True)
class SliceStats:
    """Merged telemetry of one artifact over [start, end): every device of the class."""

    start_unix_ms: int
    end_unix_ms: int
    count: int
    errors: int
    latency_bucket_counts: tuple[int, ...]
    joules: float
    devices: int
    # Inferences with an energy reading (None: all of them). A device with no meter and
    # no power model reports 0 J (source "none"): its inferences count for latency, but
    # they would make any energy budget look met.
    metered: int | None = None

    @classmethod
    def empty(cls, start_unix_ms: int, end_unix_ms: int) -> SliceStats:
        return cls(start_unix_ms, end_unix_ms, 0, 0, tuple(histogram.empty()), 0.0, 0, 0)

    @property
    def metered_count(self) -> int:
        return self.count if self.metered is None else self.metered

    @property
    def p95_ms(self) -> float | None:
        p95 = histogram.percentile(self.latency_bucket_counts, 0.95)
        return None if p95 is None else p95 * 1000

    @property
    def energy_mj(self) -> float | None:
        """Millijoules per metered inference (None: none was metered)."""
        metered = self.metered_count
        return self.joules * 1000 / metered if metered else None

    def merged_with(self, other: SliceStats) -> SliceStats:
        return SliceStats(
            min(self.start_unix_ms, other.start_unix_ms),
            max(self.end_unix_ms, other.end_unix_ms),
            self.count + other.count,
            self.errors + other.errors,
            tuple(histogram.merge(self.latency_bucket_counts, other.latency_bucket_counts)),
            self.joules + other.joules,
            max(self.devices, other.devices),
            self.metered_count + other.metered_count,
        )


def slice_misses(budgets: Budgets, stats: SliceStats) -> list[str]:
    """What is over budget in one slice, as readable reasons (empty: within budget)."""
    misses = []
    p95, energy = stats.p95_ms, stats.energy_mj
    if budgets.p95_latency_ms is not None and p95 is not None and p95 > budgets.p95_latency_ms:
        misses.append(f"p95 {p95:.1f} ms > budget {budgets.p95_latency_ms:g} ms")
    limit = budgets.energy_per_inference_mj
    if limit is not None and energy is not None and energy > limit:
        misses.append(f"energy {energy:.2f} mJ/inference > budget {limit:g} mJ")
    return misses


def slice_verdict(budgets: Budgets, stats: SliceStats, min_samples: int) -> SliceVerdict:
    if stats.count < min_samples:
        return SliceVerdict.TOO_FEW
    return SliceVerdict.MISSED if slice_misses(budgets, stats) else SliceVerdict.MET


@dataclass(frozen=True)
class BudgetCheck:
    """The verdict over the last K slices, with the numbers a decision records."""

    slices: tuple[SliceStats, ...]
    verdicts: tuple[SliceVerdict, ...]
    merged: SliceStats
    reasons: tuple[str, ...]  # what the merged slices miss (empty when within budget)

    @property
    def missed(self) -> bool:
        """K slices in a row, each with enough samples, each over budget."""
        return bool(self.verdicts) and all(v is SliceVerdict.MISSED for v in self.verdicts)

    @property
    def met(self) -> bool:
        """K slices in a row, each with enough samples, each within budget."""
        return bool(self.verdicts) and all(v is SliceVerdict.MET for v in self.verdicts)

    @property
    def judged(self) -> bool:
        """Every slice had enough samples for a verdict."""
        return bool(self.verdicts) and SliceVerdict.TOO_FEW not in self.verdicts

    def summary(self) -> str:
        p95, energy = self.merged.p95_ms, self.merged.energy_mj
        energy_text = "no energy reading" if energy is None else f"{energy:.2f} mJ/inference"
        return (
            f"p95 {_fmt(p95, 'ms')}, {energy_text} over "
            f"{self.merged.count} inferences on {self.merged.devices} device(s), "
            f"{self.slice_counts()}"
        )

    def slice_counts(self) -> str:
        """'3 slices: 3 over budget', '3 slices: 2 within budget, 1 too few inferences'."""
        parts = [
            f"{count} {label}"
            for verdict, label in (
                (SliceVerdict.MISSED, "over budget"),
                (SliceVerdict.MET, "within budget"),
                (SliceVerdict.TOO_FEW, "too few inferences"),
            )
            if (count := sum(1 for v in self.verdicts if v is verdict))
        ]
        return f"{len(self.verdicts)} slices: {', '.join(parts) or 'none'}"


def check(budgets: Budgets, slices: Sequence[SliceStats], min_samples: int) -> BudgetCheck:
    """Judge ``slices`` (oldest first) against ``budgets``."""
    if not slices:
        raise ValueError("check needs at least one slice")
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}")
    merged = slices[0]
    for stats in slices[1:]:
        merged = merged.merged_with(stats)
    return BudgetCheck(
        slices=tuple(slices),
        verdicts=tuple(slice_verdict(budgets, s, min_samples) for s in slices),
        merged=merged,
        reasons=tuple(slice_misses(budgets, merged)),
    )


def slice_bounds(now_unix_ms: int, window_ms: int, count: int) -> list[tuple[int, int]]:
    """The last ``count`` complete slices before ``now``, aligned to ``window_ms``, oldest first.

    Aligned to the epoch, so every replica (and every tick) cuts the same slices.
    """
    end = now_unix_ms - now_unix_ms % window_ms
    return [
        (end - (count - i) * window_ms, end - (count - i - 1) * window_ms) for i in range(count)
    ]


def _fmt(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:.2f} {unit}"
