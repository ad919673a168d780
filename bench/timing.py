"""Latency of several ONNX models, measured interleaved so they share the machine's noise.

Timing A fully and then B lets a background burst land on one of them only; here each
round runs every model for a block of calls, in rotation, and the percentiles come
from all rounds together. Sessions use the same options as the planner's measurements
(`controller.compression.measure.session_options`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from artifact import runtime_hints
from controller.compression.measure import session_options

ROUNDS = 6
CALLS_PER_ROUND = 25
WARMUP = 5


@dataclass(frozen=True)
class Timing:
    threads: int
    p50_ms: float
    p95_ms: float
    calls: int


def interleaved(
    models: Mapping[str, Path],
    samples: Mapping[str, NDArray[np.generic]],
    *,
    threads: int,
    rounds: int = ROUNDS,
    calls_per_round: int = CALLS_PER_ROUND,
) -> dict[str, Timing]:
    """Per model name: p50/p95 wall milliseconds per single-sample call."""
    count = len(next(iter(samples.values())))
    feeds = [{k: np.asarray(v)[i : i + 1] for k, v in samples.items()} for i in range(count)]
    sessions = {
        name: ort.InferenceSession(
            str(path),
            sess_options=session_options(threads, runtime_hints.session_config_of_file(path)),
            providers=["CPUExecutionProvider"],
        )
        for name, path in models.items()
    }
    for session in sessions.values():
        for i in range(WARMUP):
            session.run(None, feeds[i % count])
    wall: dict[str, list[float]] = {name: [] for name in sessions}
    for round_index in range(rounds):
        order = list(sessions.items())
        if round_index % 2:
            order.reverse()  # neither model always goes first
        for name, session in order:
            for i in range(calls_per_round):
                feed = feeds[(round_index * calls_per_round + i) % count]
                start = time.perf_counter()
                session.run(None, feed)
                wall[name].append((time.perf_counter() - start) * 1000.0)
    return {
        name: Timing(
            threads=threads,
            p50_ms=float(np.percentile(ms, 50)),
            p95_ms=float(np.percentile(ms, 95)),
            calls=len(ms),
        )
        for name, ms in wall.items()
    }
