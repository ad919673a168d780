"""Budget verdicts: does a candidate artifact fit its device class, and by how much not.

Every budget gets a verdict with the observed value, the limit and the gap, so a plan
that cannot be met says exactly which budget failed and how far off it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from controller.compression.errors import CompressionError
from controller.device_classes import Budgets


@dataclass(frozen=True)
class Observed:
    """What a candidate measured, in the units the budgets use."""

    artifact_bytes: int
    p95_latency_ms: float
    energy_per_inference_mj: float
    accuracy_drop: float | None  # source accuracy minus candidate accuracy (labels known)
    fidelity: float | None  # agreement with the source (ONNX-only, or embeddings)


@dataclass(frozen=True)
class Verdict:
    budget: str
    limit: float
    observed: float
    met: bool
    gap: float  # how far over the limit (0 when met), in the budget's units

    def describe(self) -> str:
        state = "ok" if self.met else f"MISSED by {self.gap:.4g}"
        return f"{self.budget}: {self.observed:.4g} vs limit {self.limit:.4g} ({state})"


def _upper(budget: str, limit: float | None, observed: float) -> Verdict | None:
    if limit is None:
        return None
    gap = max(0.0, observed - limit)
    return Verdict(budget, float(limit), float(observed), observed <= limit, gap)


def _lower(budget: str, limit: float | None, observed: float) -> Verdict | None:
    if limit is None:
        return None
    gap = max(0.0, limit - observed)
    return Verdict(budget, float(limit), float(observed), observed >= limit, gap)


def quality_budget_problem(budgets: Budgets, *, labelled: bool, source: str) -> str | None:
    """Why a run on ``source`` would choose an artifact whose quality nobody judged, as
    a message that says what to set; None when its quality budget is there.

    A labelled classifier is judged by its accuracy drop, anything else (an ONNX file
    alone, an embedding encoder) by fidelity to the source; the other kind of budget
    does not apply, and without the right one the smallest candidate would win unseen.
    """
    if labelled and budgets.max_accuracy_drop is None:
        return (
            f"{source} is judged by its accuracy on labelled data, and no max_accuracy_drop "
            "budget is set: pass --max-accuracy-drop (a fraction: 0.01 = one point) or add "
            "budgets.max_accuracy_drop to the device-class file"
        )
    if not labelled and budgets.min_fidelity is None:
        return (
            f"{source} has no labels, so it is judged by fidelity to the source model's "
            "outputs, and no min_fidelity budget is set: pass --min-fidelity (e.g. 0.99) or "
            "add budgets.min_fidelity to the device-class file"
        )
    return None


def judge(budgets: Budgets, observed: Observed) -> tuple[Verdict, ...]:
    """One verdict per budget that applies to what was observed."""
    verdicts = [
        _upper("max_artifact_bytes", budgets.max_artifact_bytes, observed.artifact_bytes),
        _upper("p95_latency_ms", budgets.p95_latency_ms, observed.p95_latency_ms),
        _upper(
            "energy_per_inference_mj",
            budgets.energy_per_inference_mj,
            observed.energy_per_inference_mj,
        ),
    ]
    if observed.accuracy_drop is not None:
        verdicts.append(
            _upper("max_accuracy_drop", budgets.max_accuracy_drop, observed.accuracy_drop)
        )
    if observed.fidelity is not None:
        verdicts.append(_lower("min_fidelity", budgets.min_fidelity, observed.fidelity))
    return tuple(v for v in verdicts if v is not None)


def all_met(verdicts: tuple[Verdict, ...]) -> bool:
    return all(v.met for v in verdicts)


# Budgets a device measures (the planner only predicts them from its latency model and
# the class's power model); size, accuracy and fidelity are known before shipping.
MEASURED_ON_DEVICE = frozenset({"p95_latency_ms", "energy_per_inference_mj"})


def misses_a_known_budget(verdicts: tuple[Verdict, ...]) -> bool:
    """Over size, or short of accuracy or fidelity: what no device could prove wrong."""
    return any(not v.met and v.budget not in MEASURED_ON_DEVICE for v in verdicts)


def shortfall(verdicts: tuple[Verdict, ...]) -> float:
    """A scale-free measure of how far a candidate is from its budgets (0 = meets all).

    Used to pick the best trial when none meets every budget: each gap relative to its
    limit, summed.
    """
    return sum(v.gap / v.limit if v.limit else v.gap for v in verdicts if not v.met)


@dataclass(frozen=True)
class PairedDrop:
    """A candidate against its source on the same labelled samples (McNemar's counts).

    Only the samples the two disagree on move the drop: ``lost`` (source right,
    candidate wrong) and ``gained`` (the reverse). The drop is their net over the split,
    the same number as the difference of the two accuracies, now with its resolution.
    """

    samples: int
    lost: int
    gained: int

    @property
    def drop(self) -> float:
        return (self.lost - self.gained) / self.samples

    @property
    def resolution(self) -> float:
        """One sample, as a fraction of the split: the finest drop this split can show."""
        return 1 / self.samples

    def allowed_net_loss(self, max_drop: float) -> int:
        """Whole samples a budget lets the candidate lose net (0 when the budget is finer)."""
        return math.floor(max_drop * self.samples + 1e-9)

    def meets(self, max_drop: float) -> bool:
        return self.lost - self.gained <= self.allowed_net_loss(max_drop)


def paired_drop(
    labels: NDArray[np.integer], source: NDArray[np.integer], candidate: NDArray[np.integer]
) -> PairedDrop:
    """Count what ``candidate``'s predicted classes lost and gained against ``source``'s."""
    labels, source, candidate = (np.asarray(a).reshape(-1) for a in (labels, source, candidate))
    if not len(labels) == len(source) == len(candidate) or len(labels) == 0:
        raise CompressionError(
            f"paired_drop needs as many predictions as labels (> 0): got {len(labels)} labels, "
            f"{len(source)} source and {len(candidate)} candidate predictions"
        )
    source_right, candidate_right = source == labels, candidate == labels
    return PairedDrop(
        samples=len(labels),
        lost=int((source_right & ~candidate_right).sum()),
        gained=int((~source_right & candidate_right).sum()),
    )
