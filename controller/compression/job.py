"""One compression job: a source model and a device class in, an output directory out.

``DIR`` receives ``model.onnx`` (the chosen artifact), ``source.onnx`` (the FP32 model
the budgets are measured against), ``manifest.json`` (recipe, metrics, a verdict per
budget) and ``trials.json`` (every trial). Everything is written to a temporary
directory beside ``DIR`` and renamed into place at the end: a failed or interrupted
job leaves nothing half-written. The CLI and the controller run this same code.

``previous``: the class's earlier static int8 artifact of this model. The first recipe
tried then reuses its quantization parameters (``RequantizeLike``), so a re-release
costs devices a small delta when the budget allows it. An artifact that cannot lend
its parameters (not ONNX, not static int8, another architecture) is refused before
any work, or, with ``previous_required=False`` (the controller found it on its own),
skipped with a log line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from artifact.digest import sha256_file
from controller.compression import candidates
from controller.compression.budgets import quality_budget_problem
from controller.compression.errors import CompressionError, check_out_dir
from controller.compression.executor import OnnxSource, TorchSource
from controller.compression.measure import measure_onnx
from controller.compression.planner import CandidateBuilder, Plan, Timing, Trial, plan
from controller.compression.recipe import Recipe
from controller.compression.requantize import check_previous
from controller.compression.training import TrainOptions
from controller.device_classes import DeviceClass
from controller.workloads.base import TaskKind, Workload

log = logging.getLogger(__name__)

MEASURE_SAMPLES = 16

# What the job is doing now, in a few words, before work that can take minutes (training
# the source on first use, building a trial): for a spinner or a log line.
ActivityCallback = Callable[[str], None]


def _trial_activity(index: int, recipe: Recipe) -> str:
    if index == 0:
        return "trial 0: scoring and timing the source model"
    return f"trial {index}: building {recipe.describe()}"


@dataclass(frozen=True)
class Outcome:
    out_dir: Path
    plan: Plan
    chosen: Trial
    met: bool
    manifest: dict[str, object]


def _prepare_out(out_dir: Path) -> Path:
    """Refuse an existing non-empty DIR; build in a temporary sibling."""
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))


def _publish(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        out_dir.rmdir()  # checked empty in _prepare_out
    os.replace(staging, out_dir)


def _measurer(samples: Mapping[str, NDArray[np.generic]]) -> Callable[[Path, DeviceClass], Timing]:
    def measure(path: Path, device_class: DeviceClass) -> Timing:
        m = measure_onnx(path, device_class, samples)
        return Timing(
            m.predicted_p50_ms, m.predicted_p95_ms, m.predicted_single_thread_p50_ms, m.energy_mj
        )

    return measure


def _apply_size_ratio(
    device_class: DeviceClass, source_bytes: int, ratio: float | None
) -> DeviceClass:
    if ratio is None:
        return device_class
    if not 0 < ratio <= 1:
        raise CompressionError(f"--max-size-ratio must be in (0, 1], got {ratio}")
    limit = int(source_bytes * ratio)
    current = device_class.budgets.max_artifact_bytes
    return device_class.with_budgets(
        max_artifact_bytes=limit if current is None else min(limit, current)
    )


def _previous_digest(previous: Path | None, source_onnx: Path, *, required: bool) -> str | None:
    """The sha256 of a previous artifact ``source_onnx`` can reuse; None without one."""
    if previous is None:
        return None
    try:
        check_previous(previous, source_onnx)
    except CompressionError as exc:
        if required:
            raise
        log.warning("not reusing the parameters of %s: %s", previous, exc)
        return None
    return sha256_file(previous)


def _check_quality_budget(device_class: DeviceClass, *, labelled: bool, source: str) -> None:
    """Refuse, before any work, a run whose chosen artifact's quality nobody would judge."""
    problem = quality_budget_problem(device_class.budgets, labelled=labelled, source=source)
    if problem is not None:
        raise CompressionError(f"{problem} (device class {device_class.name})")


def _ignore(_activity: str) -> None:
    """The activity callback when nobody listens."""


def _write_json(path: Path, document: object) -> None:
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def _run(
    name: str,
    builder: CandidateBuilder,
    source_onnx: Path,
    recipes: Iterable[Recipe],
    device_class: DeviceClass,
    samples: Mapping[str, NDArray[np.generic]],
    out_dir: Path,
    staging: Path,
    extra_metrics: Callable[[Path], dict[str, float]],
    on_trial: Callable[[Trial], None] | None,
    on_activity: ActivityCallback,
) -> Outcome:
    started = time.perf_counter()
    result = plan(
        recipes,
        builder,
        _measurer(samples),
        device_class,
        staging / "trials",
        on_trial=on_trial,
        on_start=lambda index, recipe: on_activity(_trial_activity(index, recipe)),
    )
    chosen = result.best
    if chosen.onnx_path is None:
        raise CompressionError("no trial produced a model")
    shutil.copyfile(chosen.onnx_path, staging / "model.onnx")
    shutil.copyfile(source_onnx, staging / "source.onnx")
    metrics: dict[str, float] = {
        "artifact_bytes": float(chosen.artifact_bytes),
        "source_bytes": float(result.baseline.artifact_bytes),
        "size_ratio": chosen.artifact_bytes / max(1, result.baseline.artifact_bytes),
    }
    if chosen.quality and result.baseline.quality:
        metrics[f"val_{chosen.quality.metric}"] = chosen.quality.value
        metrics[f"source_val_{chosen.quality.metric}"] = result.baseline.quality.value
    if chosen.timing and result.baseline.timing:
        metrics |= {
            "p50_ms": chosen.timing.p50_ms,
            "p95_ms": chosen.timing.p95_ms,
            "single_thread_p50_ms": chosen.timing.single_thread_p50_ms,
            "energy_mj": chosen.timing.energy_mj,
            "source_p95_ms": result.baseline.timing.p95_ms,
            "source_single_thread_p50_ms": result.baseline.timing.single_thread_p50_ms,
        }
    metrics |= extra_metrics(staging / "model.onnx")
    met = chosen.met
    manifest: dict[str, object] = {
        "model_name": name,
        "device_class": device_class.name,
        "sha256": sha256_file(staging / "model.onnx"),
        "size_bytes": chosen.artifact_bytes,
        "source_sha256": sha256_file(staging / "source.onnx"),
        "recipe": [s.model_dump(mode="json") for s in chosen.recipe.to_manifest()],
        "recipe_text": chosen.recipe.describe(),
        "metrics": metrics,
        "budgets": [v.__dict__ for v in chosen.verdicts],
        "met": met,
        "trials": len(result.trials),
        "seconds": round(time.perf_counter() - started, 1),
    }
    _write_json(staging / "manifest.json", manifest)
    _write_json(staging / "trials.json", [t.as_json() for t in result.trials])
    shutil.rmtree(staging / "trials", ignore_errors=True)
    _publish(staging, out_dir)
    return Outcome(out_dir, result, chosen, met, manifest)


def compress_workload(
    workload: Workload,
    device_class: DeviceClass,
    out_dir: Path,
    *,
    max_size_ratio: float | None = None,
    on_trial: Callable[[Trial], None] | None = None,
    previous: Path | None = None,
    previous_required: bool = True,
    on_activity: ActivityCallback | None = None,
    show_progress: bool = False,
) -> Outcome:
    """Compress a workload's PyTorch source model for ``device_class``.

    ``show_progress``: rich progress bars over the epochs of every training (the source
    on first use, fine-tunes, distillation), for a terminal."""
    labelled = workload.kind is TaskKind.CLASSIFICATION
    _check_quality_budget(device_class, labelled=labelled, source=f"workload {workload.name}")
    activity = on_activity or _ignore
    staging = _prepare_out(out_dir)
    try:
        activity(f"preparing the {workload.name} source model (trained on first use, then cached)")
        workload.show_progress = show_progress
        model = workload.source_model()
        (staging / "trials").mkdir()
        source_onnx = workload.export_onnx(model, staging / "trials" / "source.onnx")
        reuse = _previous_digest(previous, source_onnx, required=previous_required)
        device_class = _apply_size_ratio(device_class, source_onnx.stat().st_size, max_size_ratio)
        budgets = device_class.budgets
        builder = TorchSource(
            workload,
            model,
            max_accuracy_drop=budgets.max_accuracy_drop,
            options=TrainOptions(show_progress=show_progress),
            previous=previous if reuse else None,
        )
        if workload.kind is TaskKind.CLASSIFICATION:
            recipes: Iterable[Recipe] = candidates.torch_classifier_recipes()
        else:
            recipes = candidates.embedding_recipes()
            builder.max_accuracy_drop = (
                None if budgets.min_fidelity is None else 1.0 - budgets.min_fidelity
            )
        recipes = candidates.with_previous(recipes, reuse)
        samples = workload.data().test.take(MEASURE_SAMPLES).inputs

        def test_metrics(path: Path) -> dict[str, float]:
            activity("scoring the chosen model and the source on the test split")
            chosen = workload.score_onnx(path, split="test")
            source = workload.score_onnx(source_onnx, split="test")
            out = {
                f"test_{chosen.metric}": chosen.value,
                f"source_test_{source.metric}": source.value,
            }
            out |= {f"test_{k}": v for k, v in chosen.extra.items()}
            return out

        return _run(
            workload.name, builder, source_onnx, recipes, device_class, samples,
            out_dir, staging, test_metrics, on_trial, activity,
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def compress_onnx(
    source: Path,
    calibration: Mapping[str, NDArray[np.generic]],
    device_class: DeviceClass,
    out_dir: Path,
    *,
    name: str,
    max_size_ratio: float | None = None,
    on_trial: Callable[[Trial], None] | None = None,
    previous: Path | None = None,
    previous_required: bool = True,
    on_activity: ActivityCallback | None = None,
) -> Outcome:
    """Compress an ONNX file alone: post-training steps, judged by fidelity."""
    _check_quality_budget(device_class, labelled=False, source=f"the ONNX model {source.name}")
    activity = on_activity or _ignore
    staging = _prepare_out(out_dir)
    try:
        from controller.workloads.fidelity import check_self_contained

        check_self_contained(source)  # a weights file beside it would not follow it
        reuse = _previous_digest(previous, source, required=previous_required)
        device_class = _apply_size_ratio(device_class, source.stat().st_size, max_size_ratio)
        builder = OnnxSource(
            source,
            calibration,
            min_fidelity=device_class.budgets.min_fidelity,
            previous=previous if reuse else None,
        )
        samples = {k: v[:MEASURE_SAMPLES] for k, v in calibration.items()}
        recipes = candidates.with_previous(candidates.post_training_recipes(), reuse)
        split = {
            "calibration_samples": float(builder.split.fit_samples),
            "fidelity_samples": float(builder.split.judge_samples),  # held out, when it can be
        }
        return _run(
            name, builder, source, recipes, device_class, samples,
            out_dir, staging, lambda _path: split, on_trial, activity,
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
