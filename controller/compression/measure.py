"""Latency, energy, size and memory of an ONNX model as a device class would see them.

The model runs here, in onnxruntime, configured the way the class will run it: as many
intra-op threads as the class has cores (capped at this machine's), one inter-op
thread, sequential execution, all graph optimisations, batch 1, one sample per call.

Scaling assumption: a class's ``relative_speed`` is its per-core speed relative to
this machine, and with the thread count matched, latency scales inversely with it:
``predicted = measured / relative_speed``. This ignores differences in memory
bandwidth, caches and int8/fp16 instructions (measure on the device's emulation where
those matter), and when the class has more cores than this machine the prediction is
pessimistic (it was measured with fewer threads).

Energy per inference comes from the class's PowerModel over the predicted mean
latency, with the threads used as busy cores: an estimate, labelled as one.

A busy machine inflates wall-clock latency (the same model measured 12x slower while a
test suite ran beside it), and the budget loop recalibrates on predictions. Single-thread
runs execute on the calling thread, so their wall time against that thread's CPU time
says how much of it was spent waiting for a core (``Latency.busy_ratio``): above
``BUSY_RATIO`` the timing is repeated (at most ``BUSY_RETRIES`` times, the least busy
kept), and if the machine stays busy a warning says the predictions may be too high.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnxruntime as ort
import psutil
from numpy.typing import NDArray

from artifact import runtime_hints
from controller.compression.calibration import check_calibration
from controller.compression.errors import CompressionError
from controller.compression.quant_graph import onnx_file_bytes
from controller.device_classes import DeviceClass

log = logging.getLogger(__name__)

DEFAULT_RUNS = 50
DEFAULT_WARMUP = 5
BUSY_RATIO = 1.5  # wall / CPU time of single-thread runs above which the machine was busy
BUSY_RETRIES = 2


@dataclass(frozen=True)
class Latency:
    """Wall-clock milliseconds per call over the timed runs."""

    threads: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    cpu_ms: float  # process CPU time per call (all threads)
    # single-thread runs: their wall time over the CPU time of the thread that ran them
    # (1.0: never kept from a core; 2.0: half the time waiting for one); None otherwise
    busy_ratio: float | None = None


@dataclass(frozen=True)
class Measurement:
    """One model on one device class: measured here, predicted there."""

    device_class: str
    model_bytes: int  # including external data files
    relative_speed: float
    runs: int
    warmup: int
    threads: int  # intra-op threads used for the class's multi-thread numbers
    measured: Latency  # with ``threads`` threads, on this machine
    single_thread: Latency  # intra_op=1, on this machine
    predicted_p50_ms: float
    predicted_p95_ms: float
    predicted_mean_ms: float
    predicted_single_thread_p50_ms: float
    predicted_single_thread_p95_ms: float
    energy_mj: float  # estimated per inference on the class, from its PowerModel
    energy_source: str
    memory_delta_bytes: int  # resident memory added by loading the session and warming up

    @property
    def measured_p50_ms(self) -> float:
        return self.measured.p50_ms

    @property
    def measured_p95_ms(self) -> float:
        return self.measured.p95_ms


def class_threads(device_class: DeviceClass) -> int:
    """Intra-op threads to measure a class with: its cores, at most this machine's."""
    return max(1, min(device_class.cores, os.cpu_count() or 1))


def session_options(threads: int, config: Mapping[str, str] | None = None) -> ort.SessionOptions:
    """The planner's session settings, plus those the artifact asks for (``config``:
    `artifact.runtime_hints`, applied by the edge agent as well)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return options


def measure_onnx(
    path: Path,
    device_class: DeviceClass,
    samples: Mapping[str, NDArray[np.generic]],
    *,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
) -> Measurement:
    """Time ``path`` for ``device_class``, feeding ``samples`` (by input name, samples on
    axis 0) one at a time, in rotation."""
    if runs < 1 or warmup < 0:
        raise CompressionError(
            f"runs must be >= 1 and warmup >= 0, got runs={runs} warmup={warmup}"
        )
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CompressionError(f"{path} is not a readable ONNX model: {exc}") from exc
    count = check_calibration(model, samples, label="samples")
    feeds = [{k: np.asarray(v)[i : i + 1] for k, v in samples.items()} for i in range(count)]
    del model

    threads = class_threads(device_class)
    _start_onnxruntime()
    rss_before = psutil.Process().memory_info().rss
    session = _session(path, threads)
    rss_loaded = psutil.Process().memory_info().rss
    measured = _time(session, feeds, threads, runs, warmup)
    rss_warm = psutil.Process().memory_info().rss
    single = measured if threads == 1 else _time(_session(path, 1), feeds, 1, runs, warmup)
    for _ in range(BUSY_RETRIES):
        if _busy(single) <= BUSY_RATIO:
            break
        again = _time(session, feeds, threads, runs, warmup)
        again_single = again if threads == 1 else _time(_session(path, 1), feeds, 1, runs, warmup)
        if _busy(again_single) < _busy(single):
            measured, single = again, again_single
    del session
    if _busy(single) > BUSY_RATIO:
        log.warning(
            "this machine was busy while %s was timed for class %s: single-thread calls took "
            "%.1fx their CPU time (other processes held the cores), so the latency and energy "
            "predicted for the class may be too high; measure again when it is quieter",
            path.name,
            device_class.name,
            _busy(single),
        )

    speed = device_class.relative_speed
    predicted_mean_s = measured.mean_ms / speed / 1000.0
    joules = device_class.power.joules(predicted_mean_s, threads, device_class.cores)
    return Measurement(
        device_class=device_class.name,
        model_bytes=onnx_file_bytes(path),
        relative_speed=speed,
        runs=runs,
        warmup=warmup,
        threads=threads,
        measured=measured,
        single_thread=single,
        predicted_p50_ms=measured.p50_ms / speed,
        predicted_p95_ms=measured.p95_ms / speed,
        predicted_mean_ms=measured.mean_ms / speed,
        predicted_single_thread_p50_ms=single.p50_ms / speed,
        predicted_single_thread_p95_ms=single.p95_ms / speed,
        energy_mj=joules * 1000.0,
        energy_source="estimate:power-model",
        memory_delta_bytes=max(0, max(rss_loaded, rss_warm) - rss_before),
    )


@functools.cache
def _start_onnxruntime() -> None:
    """Create onnxruntime's process-wide environment once, so the first model measured is
    not charged for it in ``memory_delta_bytes``."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "warm",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    session = ort.InferenceSession(
        model.SerializeToString(),
        sess_options=session_options(1),
        providers=["CPUExecutionProvider"],
    )
    session.run(None, {"x": np.zeros(1, dtype=np.float32)})


def _session(path: Path, threads: int) -> ort.InferenceSession:
    try:
        options = session_options(threads, runtime_hints.session_config_of_file(path))
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise CompressionError(f"onnxruntime cannot load {path.name}: {exc}") from exc


def _busy(latency: Latency) -> float:
    return latency.busy_ratio if latency.busy_ratio is not None else 1.0


def _time(
    session: ort.InferenceSession,
    feeds: list[dict[str, NDArray[np.generic]]],
    threads: int,
    runs: int,
    warmup: int,
) -> Latency:
    try:
        for i in range(warmup):
            session.run(None, feeds[i % len(feeds)])
        wall = np.empty(runs, dtype=np.float64)
        cpu_start = time.process_time()
        thread_start = time.thread_time()
        for i in range(runs):
            feed = feeds[i % len(feeds)]
            start = time.perf_counter()
            session.run(None, feed)
            wall[i] = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        on_thread = time.thread_time() - thread_start
    except Exception as exc:
        raise CompressionError(f"onnxruntime failed to run the model: {exc}") from exc
    ms = wall * 1000.0
    return Latency(
        threads=threads,
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        mean_ms=float(ms.mean()),
        cpu_ms=cpu * 1000.0 / runs,
        # with one intra-op thread onnxruntime runs on this thread: its CPU time is the
        # work, and the rest of the wall time was spent waiting for a core
        busy_ratio=float(wall.sum() / on_thread) if threads == 1 and on_thread > 0 else None,
    )
