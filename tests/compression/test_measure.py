"""Measurement gives sane numbers and predicts a class's latency by its relative speed.

No timing thresholds: only signs, orderings and the exact scaling relations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from controller.compression.errors import CalibrationMismatchError, CompressionError
from controller.compression.macs import count_macs
from controller.compression.measure import BUSY_RATIO, Measurement, class_threads, measure_onnx
from controller.compression.quantize import quantize_onnx
from controller.compression.recipe import Quantize
from controller.device_classes import DeviceClass, load_device_class
from tests.compression.test_quantize import cnn_inputs, cnn_model, mlp_inputs, mlp_model

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ROOT / "deploy" / "device-classes"


def device(cores: int, speed: float) -> DeviceClass:
    return DeviceClass.model_validate(
        {
            "name": "test-class",
            "arch": "aarch64",
            "cores": cores,
            "relative_speed": speed,
            "memory_bytes": 1 << 30,
            "model_storage_bytes": 1 << 28,
            "power": {"idle_watts": 1.0, "active_watts": 5.0},
            "budgets": {},
        }
    )


def check_consistent(m: Measurement, cls: DeviceClass, path: Path) -> None:
    speed = cls.relative_speed
    assert m.device_class == cls.name and m.relative_speed == speed
    assert m.model_bytes == path.stat().st_size
    assert m.threads == min(cls.cores, os.cpu_count() or 1) == class_threads(cls)
    assert m.single_thread.threads == 1
    for lat in (m.measured, m.single_thread):
        assert 0 < lat.p50_ms <= lat.p95_ms
        assert lat.mean_ms > 0 and lat.cpu_ms > 0
    assert m.predicted_p50_ms == pytest.approx(m.measured.p50_ms / speed)
    assert m.predicted_p95_ms == pytest.approx(m.measured.p95_ms / speed)
    assert m.predicted_mean_ms == pytest.approx(m.measured.mean_ms / speed)
    assert m.predicted_single_thread_p50_ms == pytest.approx(m.single_thread.p50_ms / speed)
    assert m.predicted_single_thread_p95_ms == pytest.approx(m.single_thread.p95_ms / speed)
    seconds = m.predicted_mean_ms / 1000
    assert m.energy_mj == pytest.approx(cls.power.joules(seconds, m.threads, cls.cores) * 1000)
    assert m.energy_mj > 0 and m.energy_source == "estimate:power-model"
    assert m.memory_delta_bytes >= 0


@pytest.mark.parametrize("name", ["home-hub", "smart-speaker", "camera"])
def test_measure_on_the_example_classes(tmp_path: Path, name: str) -> None:
    cls = load_device_class(CLASSES / f"{name}.yaml")
    path = cnn_model(tmp_path / "cnn.onnx")
    m = measure_onnx(path, cls, cnn_inputs(4), runs=10, warmup=2)
    check_consistent(m, cls, path)
    assert m.runs == 10 and m.warmup == 2
    # slower cores than this machine: predicted latency is above measured
    assert m.predicted_p95_ms > m.measured_p95_ms


def test_a_single_core_class_measures_single_thread_once(tmp_path: Path) -> None:
    cls = device(cores=1, speed=2.0)
    path = mlp_model(tmp_path / "mlp.onnx")
    m = measure_onnx(path, cls, mlp_inputs(3), runs=5, warmup=1)
    check_consistent(m, cls, path)
    assert m.threads == 1 and m.single_thread == m.measured
    assert m.predicted_p50_ms < m.measured_p50_ms  # a faster core than ours


def test_a_quantized_model_is_measured_the_same_way(tmp_path: Path) -> None:
    source = mlp_model(tmp_path / "mlp.onnx", hidden=256)
    out = tmp_path / "mlp.int8.onnx"
    quantize_onnx(source, out, Quantize(mode="dynamic"), calibration=None, progress=False)
    cls = device(cores=2, speed=0.5)
    before = measure_onnx(source, cls, mlp_inputs(4), runs=5, warmup=1)
    after = measure_onnx(out, cls, mlp_inputs(4), runs=5, warmup=1)
    check_consistent(after, cls, out)
    assert after.model_bytes < before.model_bytes


def test_samples_that_do_not_fit_the_model_are_refused(tmp_path: Path) -> None:
    path = cnn_model(tmp_path / "cnn.onnx")
    with pytest.raises(CalibrationMismatchError, match=r"samples\['x'\].*expects rank 4"):
        measure_onnx(path, device(2, 1.0), {"x": np.zeros((2, 3), np.float32)})


def test_bad_run_counts_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    path = cnn_model(tmp_path / "cnn.onnx")
    with pytest.raises(CompressionError, match="runs must be >= 1"):
        measure_onnx(path, device(2, 1.0), cnn_inputs(1), runs=0)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nope")
    with pytest.raises(CompressionError, match="not a readable ONNX model"):
        measure_onnx(bad, device(2, 1.0), cnn_inputs(1))


# ------------------------------------------------------------------ MACs and parameters


def test_macs_of_a_cnn_by_hand(tmp_path: Path) -> None:
    cost = count_macs(cnn_model(tmp_path / "cnn.onnx"))
    conv1 = (8 * 16 * 16) * (3 * 3 * 3)
    conv2 = (16 * 16 * 16) * (8 * 3 * 3)
    head = 10 * 16
    assert cost.macs == conv1 + conv2 + head
    assert dict(cost.macs_by_op) == {"Conv": conv1 + conv2, "Gemm": head}
    assert cost.params == (8 * 27 + 8) + (16 * 72 + 16) + (10 * 16 + 10)
    assert cost.unresolved_nodes == ()


def test_fewer_channels_give_fewer_macs_and_params(tmp_path: Path) -> None:
    full = count_macs(cnn_model(tmp_path / "full.onnx"))
    pruned = count_macs(cnn_model(tmp_path / "pruned.onnx", c1=4, c2=8))
    assert pruned.macs < full.macs and pruned.params < full.params


def test_symbolic_dims_scale_the_count(tmp_path: Path) -> None:
    path = mlp_model(tmp_path / "mlp.onnx")
    one = count_macs(path)
    eight = count_macs(path, dims={"N": 8})
    assert one.macs == 64 * 64 + 64 * 32
    assert eight.macs == 8 * one.macs


def test_quantization_keeps_the_mac_count(tmp_path: Path) -> None:
    source = mlp_model(tmp_path / "mlp.onnx")
    out = tmp_path / "q.onnx"
    quantize_onnx(source, out, Quantize(mode="dynamic"), calibration=None, progress=False)
    cost = count_macs(out)
    assert cost.macs == count_macs(source).macs
    assert dict(cost.macs_by_op) == {"MatMulInteger": 64 * 64 + 64 * 32}


BUSY_PROBE = """
import json, logging, os, subprocess, sys
from pathlib import Path
from controller.compression.measure import measure_onnx
from tests.compression.test_measure import device
from tests.compression.test_quantize import cnn_inputs, cnn_model

os.sched_setaffinity(0, {0})
spin = "import os\\nos.sched_setaffinity(0, {0})\\nprint('spinning', flush=True)\\nwhile True: pass"
hog = subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True)
assert hog.stdout.readline() == "spinning\\n"  # it holds the core from now on
warnings = []
handler = logging.Handler()
handler.emit = lambda record: warnings.append(record.getMessage())
logging.getLogger("controller.compression.measure").addHandler(handler)
try:
    path = cnn_model(Path(sys.argv[1]) / "cnn.onnx")
    # a few thousand calls: many of the scheduler's time slices, shared with the spinner
    m = measure_onnx(path, device(cores=1, speed=1.0), cnn_inputs(4), runs=3000, warmup=5)
finally:
    hog.kill()
print(json.dumps({"busy": m.single_thread.busy_ratio, "warnings": warnings}))
"""


def test_timing_on_a_core_another_process_holds_is_repeated_then_warned_about(
    tmp_path: Path,
) -> None:
    """A process spinning on the same core takes about half its time: the single-thread
    calls' wall time is about twice their CPU time, which the planner must notice (it
    feeds the budget loop's recalibration) and say, rather than report slow predictions
    as the model's."""
    done = subprocess.run(
        [sys.executable, "-c", BUSY_PROBE, str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["busy"] > BUSY_RATIO, report
    (warning,) = report["warnings"]
    assert "this machine was busy while cnn.onnx was timed for class test-class" in warning
    assert "may be too high" in warning


def test_single_thread_timings_say_how_busy_the_machine_was(tmp_path: Path) -> None:
    m = measure_onnx(mlp_model(tmp_path / "mlp.onnx"), device(2, 1.0), mlp_inputs(3), runs=20)
    assert m.single_thread.busy_ratio is not None and m.single_thread.busy_ratio > 0.5
    assert m.threads == 1 or m.measured.busy_ratio is None  # multi-thread: not measured
