"""The planner's verdict: paired counts on the same samples, and recipes that cannot fit skipped.

Real ONNX files, real onnxruntime quantization and timing (OnnxSource, measure_onnx).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from controller.compression.budgets import Verdict, paired_drop
from controller.compression.errors import CompressionError
from controller.compression.executor import OnnxSource
from controller.compression.measure import measure_onnx
from controller.compression.planner import Plan, Timing, Trial, plan, size_floor
from controller.compression.recipe import Distill, Quantize, Recipe
from controller.device_classes import DeviceClass, load_device_class
from tests.compression.test_training import TinyCNN, onnx_outputs, synthetic_split

ROOT = Path(__file__).resolve().parents[2]
CAMERA = ROOT / "deploy" / "device-classes" / "camera.yaml"
QUANTIZE_ONLY = (Quantize(mode="static"), Quantize(mode="dynamic"), Quantize(mode="fp16"))


def test_paired_drop_counts_what_the_candidate_lost_and_gained() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    source = np.array([0, 1, 2, 0, 2, 2, 1])  # 5 right
    candidate = np.array([0, 1, 0, 1, 1, 2, 1])  # lost samples 2 and 3, gained sample 4
    paired = paired_drop(labels, source, candidate)
    assert (paired.samples, paired.lost, paired.gained) == (7, 2, 1)
    accuracies = [float((p == labels).mean()) for p in (source, candidate)]
    assert paired.drop == pytest.approx(accuracies[0] - accuracies[1])
    assert paired.resolution == pytest.approx(1 / 7)


def test_a_budget_finer_than_one_sample_allows_no_net_loss() -> None:
    """PLAID's val split: 109 samples, so 0.5 points allows 0 samples and 2 points 2."""
    labels = np.zeros(109, dtype=np.int64)
    source = labels.copy()
    one_lost_one_gained = labels.copy()
    one_lost_one_gained[0] = 1
    source[1] = 1
    paired = paired_drop(labels, source, one_lost_one_gained)
    assert (paired.lost, paired.gained) == (1, 1)
    assert paired.allowed_net_loss(0.005) == 0 and paired.meets(0.005)
    one_lost = paired_drop(labels, labels, one_lost_one_gained)
    assert not one_lost.meets(0.005)
    assert one_lost.allowed_net_loss(0.02) == 2 and one_lost.meets(0.02)
    with pytest.raises(CompressionError, match="as many predictions as labels"):
        paired_drop(labels, labels[:5], labels)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    data = synthetic_split(n=32)
    torch.manual_seed(0)
    model = TinyCNN(width=32)
    directory = tmp_path_factory.mktemp("planner")
    onnx_outputs(model, data.inputs["x"][:2].astype(np.float32), directory)
    return directory / "model.onnx", data.inputs


def _measure(samples: dict[str, np.ndarray]) -> Callable[[Path, DeviceClass], Timing]:
    def measure(path: Path, device_class: DeviceClass) -> Timing:
        m = measure_onnx(path, device_class, samples, runs=3, warmup=1)
        return Timing(
            m.predicted_p50_ms, m.predicted_p95_ms, m.predicted_single_thread_p50_ms, m.energy_mj
        )

    return measure


def test_quantization_only_recipes_that_cannot_fit_are_recorded_unbuilt(
    tiny_onnx: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    source, inputs = tiny_onnx
    size = source.stat().st_size
    builder = OnnxSource(source, inputs, min_fidelity=0.5)
    tight = load_device_class(CAMERA).with_budgets(max_artifact_bytes=size // 10)
    recipes = [Recipe(steps=(step,)) for step in QUANTIZE_ONLY]
    result = plan(recipes, builder, _measure(inputs), tight, tmp_path / "tight")
    skipped = result.trials[1:]
    assert len(skipped) == 3 and not result.met
    for trial in skipped:
        assert trial.onnx_path is None and trial.seconds == 0.0
        assert "cannot meet max_artifact_bytes" in trial.error
    assert not any((tmp_path / "tight").glob("trial-00[1-3]"))  # nothing was built
    # Within reach of int8, the same recipe is built and judged.
    loose = load_device_class(CAMERA).with_budgets(max_artifact_bytes=size // 2)
    built = plan(recipes[:1], builder, _measure(inputs), loose, tmp_path / "loose").trials[1]
    assert not built.error and built.onnx_path is not None and built.artifact_bytes < size


def test_each_built_trial_is_announced_before_it_is_built(
    tiny_onnx: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """`compress` shows what it is building while it builds (it can take minutes), so
    ``on_start`` comes before that trial's ``on_trial``; a skipped recipe is not built."""
    source, inputs = tiny_onnx
    size = source.stat().st_size
    builder = OnnxSource(source, inputs, min_fidelity=0.5)
    dc = load_device_class(CAMERA).with_budgets(max_artifact_bytes=size * 3 // 10)
    events: list[tuple[str, int]] = []
    recipes = [Recipe(steps=(Quantize(mode="fp16"),)), Recipe(steps=(Quantize(mode="static"),))]
    plan(
        recipes,
        builder,
        _measure(inputs),
        dc,
        tmp_path / "announced",
        on_start=lambda index, recipe: events.append(("start", index)),
        on_trial=lambda trial: events.append(("done", trial.index)),
    )
    # fp16 cannot get under 30 % of the source: skipped, not announced
    assert events == [("start", 0), ("done", 0), ("done", 1), ("start", 2), ("done", 2)]


def test_a_recipe_that_crashes_a_library_is_a_failed_trial_and_the_search_goes_on(
    tiny_onnx: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """onnxruntime's dynamic quantizer writes a graph its own runtime refuses for an fp16
    model (DynamicQuantizeLinear takes float32 only): that recipe fails, not the job."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    source, inputs = tiny_onnx
    half = tmp_path / "fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=False), str(half))
    half_inputs = {k: v.astype(np.float16) for k, v in inputs.items()}
    builder = OnnxSource(half, half_inputs, min_fidelity=0.5)
    dc = load_device_class(CAMERA).with_budgets(max_artifact_bytes=half.stat().st_size - 1)
    recipes = [Recipe(steps=(Quantize(mode="dynamic"),)), Recipe(steps=(Quantize(mode="static"),))]
    result = plan(recipes, builder, _measure(half_inputs), dc, tmp_path / "half")
    crashed, after = result.trials[1:]
    assert crashed.error.startswith("failed unexpectedly (InvalidGraph: ")
    assert "DynamicQuantizeLinear" in crashed.error and "[ONNXRuntimeError]" not in crashed.error
    assert not after.error and after.onnx_path is not None  # the next recipe still ran


def test_only_quantization_only_recipes_have_a_size_floor() -> None:
    assert size_floor(Recipe(steps=(Quantize(mode="static"),)), 1000) == 200
    assert size_floor(Recipe(steps=(Quantize(mode="fp16"),)), 1000) == 400
    assert size_floor(Recipe(), 1000) is None
    distilled = Recipe(steps=(Distill(student="ds-cnn1d"), Quantize(mode="static")))
    assert size_floor(distilled, 1000) is None


def test_with_no_trial_within_budget_the_best_is_within_size_and_accuracy_if_any() -> None:
    """A size or accuracy miss is certain; a predicted latency miss a canary may refute,
    so a rollout can still try it (and never ships the other)."""

    def trial(index: int, *missed: tuple[str, float]) -> Trial:
        verdicts = (
            *(Verdict(budget, 1.0, 1.0 + gap, False, gap) for budget, gap in missed),
            Verdict("min_fidelity", 0.9, 0.95, True, 0.0),
        )
        return Trial(index, Recipe(steps=()), None, 1000 + index, None, None, verdicts, 0.1)

    hub = load_device_class(ROOT / "deploy" / "device-classes" / "home-hub.yaml")
    over_size = trial(1, ("max_artifact_bytes", 0.05))  # the nearest by total shortfall
    slow = trial(2, ("p95_latency_ms", 0.5), ("energy_per_inference_mj", 0.2))
    slower = trial(3, ("p95_latency_ms", 0.9))
    baseline = trial(0, ("p95_latency_ms", 2.0))
    assert Plan(hub, baseline, [over_size, slower, slow]).best is slow
    assert Plan(hub, baseline, [over_size]).best is over_size  # nothing better to offer
    # all over size: the one that also loses accuracy is not "closer" for being smaller
    tiny_but_worse = trial(4, ("max_artifact_bytes", 10.0), ("max_accuracy_drop", 0.5))
    big_but_exact = trial(5, ("max_artifact_bytes", 22.0))
    assert Plan(hub, baseline, [tiny_but_worse, big_but_exact]).best is big_but_exact
