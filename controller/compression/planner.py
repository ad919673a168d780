"""The planner: search recipes for one device class, cheapest first, until every budget holds.

It knows nothing about how a recipe is executed or scored: a ``CandidateBuilder``
(see ``executor.py``) turns a recipe into an ONNX file and scores it, and a
``Measurer`` times it as the device class would. Every trial is recorded — recipe,
bytes, quality, predicted p95 latency, energy, seconds spent — and when nothing meets
the budget the best trial comes back with the gap per budget, never a silent failure.

Verdict protocol for labelled workloads. The accuracy drop is the source's accuracy
minus the candidate's on the builder's selection split (val: never trained on; the
source picks its epoch on val loss, a candidate's fine-tuning never picks weights on
it, see ``TrainOptions.keep``; accuracy-aware quantization does choose which nodes stay
float on it). Both are counted on the same samples, so the drop is the net number of
samples the candidate lost, (source right & candidate wrong) - (source wrong &
candidate right), over n; ``budgets.paired_drop`` gives both counts for a report. A
budget finer than one sample is applied at the split's resolution: on PLAID's 109 val
samples (one = 0.92 points) a 0.5-point budget means "no net sample lost". That is a
point estimate on a small split, not a guarantee: the test split, never looked at by
the planner, gives the number to report (the job records it beside the verdict).

Recipes whose size cannot reach the byte budget are not built: quantization alone
shrinks a model at most 4x (int8) or 2x (fp16), so when the source is more than that
over budget those recipes are recorded as skipped; a builder may know more floors
(``CandidateBuilder.size_floor``: a distilled student's weights are known before it
trains), so an impossible byte budget ends the search in seconds, not an hour.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from controller.compression.budgets import (
    MEASURED_ON_DEVICE,
    Observed,
    Verdict,
    all_met,
    judge,
    misses_a_known_budget,
    shortfall,
)
from controller.compression.errors import CompressionError
from controller.compression.recipe import LearnedQuantize, Quantize, Recipe
from controller.device_classes import DeviceClass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Quality:
    """How good a candidate is: labelled accuracy, or fidelity to the source."""

    metric: str
    value: float
    labelled: bool  # True: value is accuracy, budgets use accuracy drop; else fidelity


@dataclass(frozen=True)
class Timing:
    p50_ms: float
    p95_ms: float
    single_thread_p50_ms: float
    energy_mj: float


@dataclass(frozen=True)
class SizeFloor:
    """Bytes a recipe's artifact surely stays above, and why (for the skipped trial)."""

    bytes: int
    why: str


class CandidateBuilder(Protocol):
    def build(self, recipe: Recipe, out_dir: Path) -> Path:
        """Execute ``recipe`` on the source model and write the ONNX artifact."""

    def quality(self, onnx_path: Path) -> Quality:
        """Score the artifact (accuracy on held-out data, or fidelity to the source)."""

    def size_floor(self, recipe: Recipe) -> SizeFloor | None:
        """A floor this builder knows without building (None: none known)."""


Measurer = Callable[[Path, DeviceClass], Timing]


@dataclass(frozen=True)
class Trial:
    index: int
    recipe: Recipe
    onnx_path: Path | None
    artifact_bytes: int
    quality: Quality | None
    timing: Timing | None
    verdicts: tuple[Verdict, ...]
    seconds: float
    error: str = ""

    @property
    def met(self) -> bool:
        return not self.error and bool(self.verdicts) and all_met(self.verdicts)

    def as_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "recipe": [s.model_dump(mode="json") for s in self.recipe.to_manifest()],
            "recipe_text": self.recipe.describe(),
            "artifact_bytes": self.artifact_bytes,
            "quality": None
            if self.quality is None
            else {"metric": self.quality.metric, "value": self.quality.value},
            "timing": None
            if self.timing is None
            else {
                "p50_ms": self.timing.p50_ms,
                "p95_ms": self.timing.p95_ms,
                "single_thread_p50_ms": self.timing.single_thread_p50_ms,
                "energy_mj": self.timing.energy_mj,
            },
            "verdicts": [v.__dict__ for v in self.verdicts],
            "met": self.met,
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }


@dataclass
class Plan:
    device_class: DeviceClass
    baseline: Trial
    trials: list[Trial] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return any(t.met for t in self.trials)

    @property
    def best(self) -> Trial:
        """The first trial that meets every budget, else the one closest to doing so,
        preferring one within size, accuracy and fidelity (its latency and energy are
        predictions a canary can still prove wrong, a size or accuracy miss is certain),
        then one that misses fewer of those, then the smallest total relative gap."""
        for trial in self.trials:
            if trial.met:
                return trial
        usable = [t for t in self.trials if not t.error] or [self.baseline]
        return min(
            usable,
            key=lambda t: (
                misses_a_known_budget(t.verdicts),
                sum(not v.met and v.budget not in MEASURED_ON_DEVICE for v in t.verdicts),
                shortfall(t.verdicts),
                t.artifact_bytes,
            ),
        )


TrialCallback = Callable[[Trial], None]
StartCallback = Callable[[int, Recipe], None]  # a trial's index and recipe, before it is built

# The least share of its source's bytes a model quantized in this mode can have: weights
# take 1 (int8) or 2 (fp16) bytes instead of 4, and scales, zero points and Q/DQ nodes
# only add. Below the exact 1/4 and 1/2 for margin: folding BatchNorm into convolutions
# removes a few weights first.
QUANTIZED_SIZE_FLOOR = {"static": 0.2, "dynamic": 0.2, "fp16": 0.4}
# Learned quantization (its only step): weights in 8 or 4 bits of 32, the same margin.
LEARNED_SIZE_FLOOR = {8: 0.2, 4: 0.1}


def size_floor(recipe: Recipe, source_bytes: int) -> int | None:
    """Bytes a quantization-only recipe surely stays above; None for any other recipe."""
    if len(recipe.steps) == 1 and isinstance(recipe.steps[0], LearnedQuantize):
        return int(source_bytes * LEARNED_SIZE_FLOOR[recipe.steps[0].weight_bits])
    if not recipe.steps or not all(isinstance(step, Quantize) for step in recipe.steps):
        return None
    return int(source_bytes * quantized_share(s for s in recipe.steps if isinstance(s, Quantize)))


def quantized_share(steps: Iterable[Quantize]) -> float:
    """The least share of its bytes a model keeps through these quantization steps."""
    return min((QUANTIZED_SIZE_FLOOR[step.mode] for step in steps), default=1.0)


def _floor(recipe: Recipe, source_bytes: int, builder: CandidateBuilder) -> SizeFloor | None:
    floor = size_floor(recipe, source_bytes)
    if floor is not None:
        return SizeFloor(
            floor,
            f"quantization alone leaves at least {floor} of the source's {source_bytes} bytes",
        )
    return builder.size_floor(recipe)


def run_trial(
    index: int,
    recipe: Recipe,
    builder: CandidateBuilder,
    measure: Measurer,
    device_class: DeviceClass,
    baseline_quality: Quality | None,
    work_dir: Path,
) -> Trial:
    """Build, score, time and judge one recipe; a recipe that fails is a recorded trial.

    Not only CompressionError: a library may fail on a model nobody tried it on (an
    onnxruntime kernel, a quantizer's assumption), and one recipe failing must not cost
    the job the others. The traceback goes to the log."""
    started = time.perf_counter()
    out_dir = work_dir / f"trial-{index:03d}"
    try:
        path = builder.build(recipe, out_dir)
        quality = builder.quality(path)
        timing = measure(path, device_class)
    except CompressionError as exc:
        log.info("trial %d (%s) could not run: %s", index, recipe.describe(), exc)
        return Trial(
            index, recipe, None, 0, None, None, (), time.perf_counter() - started, str(exc)
        )
    except Exception as exc:
        log.exception("trial %d (%s) failed unexpectedly", index, recipe.describe())
        reason = f"failed unexpectedly ({type(exc).__name__}: {_first_line(exc)})"
        return Trial(index, recipe, None, 0, None, None, (), time.perf_counter() - started, reason)
    size = path.stat().st_size
    if quality.labelled:
        reference = baseline_quality.value if baseline_quality else quality.value
        observed = Observed(size, timing.p95_ms, timing.energy_mj, reference - quality.value, None)
    else:
        observed = Observed(size, timing.p95_ms, timing.energy_mj, None, quality.value)
    verdicts = judge(device_class.budgets, observed)
    return Trial(
        index, recipe, path, size, quality, timing, verdicts, time.perf_counter() - started
    )


def _first_line(exc: BaseException) -> str:
    """An exception's message without onnxruntime's '[ONNXRuntimeError] : 2 : X :' prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text.rsplit("] : ", 1)[-1].split(" : ", 2)[-1] if "[ONNXRuntimeError]" in text else text


def plan(
    candidates: Iterable[Recipe],
    builder: CandidateBuilder,
    measure: Measurer,
    device_class: DeviceClass,
    work_dir: Path,
    *,
    on_trial: TrialCallback | None = None,
    on_start: StartCallback | None = None,
) -> Plan:
    """Try ``candidates`` in order (cheapest first) and stop at the first that fits.

    ``on_start`` hears of each trial before it is built (building can take minutes),
    ``on_trial`` of each when it is judged or skipped."""
    if on_start:
        on_start(0, Recipe())
    baseline = run_trial(0, Recipe(), builder, measure, device_class, None, work_dir)
    if baseline.error or baseline.quality is None:
        raise CompressionError(f"cannot score the source model (trial 0): {baseline.error}")
    result = Plan(device_class, baseline, [baseline])
    if on_trial:
        on_trial(baseline)
    if baseline.met:
        return result
    limit = device_class.budgets.max_artifact_bytes
    for index, recipe in enumerate(candidates, start=1):
        floor = None if limit is None else _floor(recipe, baseline.artifact_bytes, builder)
        if limit is not None and floor is not None and floor.bytes > limit:
            reason = f"cannot meet max_artifact_bytes {limit}: {floor.why}"
            trial = Trial(index, recipe, None, 0, None, None, (), 0.0, reason)
        else:
            if on_start:
                on_start(index, recipe)
            trial = run_trial(
                index, recipe, builder, measure, device_class, baseline.quality, work_dir
            )
        result.trials.append(trial)
        if on_trial:
            on_trial(trial)
        if trial.met:
            break
    return result
