"""Measure every inference and aggregate the samples into windows per (model, artifact).

Each Predict is timed in the worker thread that runs it: wall latency, the thread's CPU
time (``time.thread_time`` around ``session.run``, so other requests' work is not
counted), its share of the energy meter's increase (``EnergyShares``: concurrent
inferences split it), and the process's resident memory after the call. Samples go
into the open window of their (model, artifact); every ``window_s`` the windows are
closed and handed to the on-disk queue (telemetry_queue), which gives them their
sequence numbers. A window still open when the agent crashes is lost (at most
one window); a graceful stop closes it first.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import psutil

from artifact import histogram
from artifact.energy_sources import format_energy_source
from edge_agent.convert import Array
from edge_agent.errors import AgentError
from edge_agent.meters import EnergyMeter
from edge_agent.runtime import ModelSlot
from protos import fleet_pb2

log = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 10.0


@dataclass(frozen=True)
class Sample:
    """One inference as measured."""

    model_name: str
    artifact_sha256: str
    wall_s: float
    cpu_s: float
    joules: float
    rss_bytes: int
    ok: bool


@dataclass
class Window:
    """The aggregate of one (model, artifact) over [start, end); seq comes from the queue."""

    model_name: str
    artifact_sha256: str
    start_unix_ms: int
    end_unix_ms: int
    energy_source: str
    count: int = 0
    errors: int = 0
    latency_bucket_counts: list[int] = field(default_factory=histogram.empty)
    cpu_seconds: float = 0.0
    joules: float = 0.0
    peak_memory_bytes: int = 0

    def add(self, sample: Sample) -> None:
        self.count += 1
        self.errors += 0 if sample.ok else 1
        self.latency_bucket_counts[histogram.bucket_index(sample.wall_s)] += 1
        self.cpu_seconds += sample.cpu_s
        self.joules += sample.joules
        self.peak_memory_bytes = max(self.peak_memory_bytes, sample.rss_bytes)

    def to_proto(self, seq: int) -> fleet_pb2.TelemetryWindow:
        return fleet_pb2.TelemetryWindow(
            seq=seq,
            model_name=self.model_name,
            artifact_sha256=self.artifact_sha256,
            start_unix_ms=self.start_unix_ms,
            end_unix_ms=self.end_unix_ms,
            count=self.count,
            errors=self.errors,
            latency_bucket_counts=self.latency_bucket_counts,
            cpu_seconds=self.cpu_seconds,
            joules=self.joules,
            energy_source=self.energy_source,
            peak_memory_bytes=self.peak_memory_bytes,
        )

    @staticmethod
    def from_proto(msg: fleet_pb2.TelemetryWindow) -> Window:
        return Window(
            model_name=msg.model_name,
            artifact_sha256=msg.artifact_sha256,
            start_unix_ms=msg.start_unix_ms,
            end_unix_ms=msg.end_unix_ms,
            energy_source=msg.energy_source,
            count=msg.count,
            errors=msg.errors,
            latency_bucket_counts=list(msg.latency_bucket_counts),
            cpu_seconds=msg.cpu_seconds,
            joules=msg.joules,
            peak_memory_bytes=msg.peak_memory_bytes,
        )


def merge_windows(windows: list[Window]) -> Window:
    """One window summarising ``windows`` of one (model, artifact, source): exact sums."""
    first = windows[0]
    key = (first.model_name, first.artifact_sha256, first.energy_source)
    if any((w.model_name, w.artifact_sha256, w.energy_source) != key for w in windows):
        raise ValueError("only windows of one model, artifact and energy source merge")
    return Window(
        model_name=first.model_name,
        artifact_sha256=first.artifact_sha256,
        start_unix_ms=min(w.start_unix_ms for w in windows),
        end_unix_ms=max(w.end_unix_ms for w in windows),
        energy_source=first.energy_source,
        count=sum(w.count for w in windows),
        errors=sum(w.errors for w in windows),
        latency_bucket_counts=histogram.merge(*(w.latency_bucket_counts for w in windows)),
        cpu_seconds=sum(w.cpu_seconds for w in windows),
        joules=sum(w.joules for w in windows),
        peak_memory_bytes=max(w.peak_memory_bytes for w in windows),
    )


class EnergyShares:
    """Splits a device-wide meter among the inferences running at the same time.

    A meter (RAPL, hwmon, the estimate) counts the whole device: an inference charged the
    meter's increase over its own run would also be charged every concurrent inference's
    energy, and their sum would exceed what the meter counted. Here the increase between
    two events (an inference starting or ending) is shared equally by the inferences in
    flight, so the shares always add up to the meter's increase while any ran.
    """

    def __init__(self, read: Callable[[], float]) -> None:
        self._read = read
        self._lock = threading.Lock()
        self._last: float | None = None
        self._tallies: dict[int, float] = {}
        self._next = 0

    def start(self) -> int:
        """An inference begins; the token it gets back is what ``stop`` takes."""
        with self._lock:
            self._advance()
            token = self._next
            self._next += 1
            self._tallies[token] = 0.0
            return token

    def stop(self, token: int) -> float:
        """The inference ``token`` ends: its share of the meter's joules."""
        with self._lock:
            self._advance()
            return self._tallies.pop(token)

    def _advance(self) -> None:
        now = self._read()
        if self._last is not None and self._tallies:
            share = max(0.0, now - self._last) / len(self._tallies)
            for token in self._tallies:
                self._tallies[token] += share
        self._last = now


class SampleObserver(Protocol):
    """Something else that wants every sample (the Prometheus metrics)."""

    def observe(self, sample: Sample, energy_source: str) -> None: ...


class WindowSink(Protocol):
    """Where closed windows go: the on-disk queue. Blocking; called from a worker thread."""

    def append(self, windows: list[Window]) -> list[int]: ...


def _unix_ms(clock: Callable[[], float]) -> int:
    return int(clock() * 1000)


class Telemetry:
    """The open windows; ``measured_run`` is called from worker threads, so all is locked."""

    def __init__(
        self,
        meter: EnergyMeter,
        *,
        observer: SampleObserver | None = None,
        clock: Callable[[], float] = time.time,
        slowdown: float = 1.0,
        wall_clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.meter = meter
        # Emulation for demos and tests (--emulate-slowdown): latency, CPU time and energy
        # are reported ``slowdown`` times what was measured, as a slower device at the
        # same power would see them; the source says so ("rapl*3"). Real devices: 1.
        # artifact.energy_sources refuses (ValueError) what the controller would refuse
        self.source = format_energy_source(meter.source, slowdown)
        self.slowdown = slowdown
        self._wall = wall_clock
        self._cpu = cpu_clock
        self._observer = observer
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], Window] = {}
        self._process = psutil.Process()
        self._last_joules = 0.0
        self._shares = EnergyShares(self._joules)
        self._meter_failed = False

    def _joules(self) -> float:
        """The meter's reading; a meter that stops answering must not fail inferences."""
        try:
            self._last_joules = self.meter.read()
        except (OSError, ValueError) as exc:
            if not self._meter_failed:
                log.error(
                    "energy meter %s failed (%s); energy is undercounted", self.meter.source, exc
                )
                self._meter_failed = True
        return self._last_joules

    def measured_run(self, slot: ModelSlot, feeds: Mapping[str, Array]) -> dict[str, Array]:
        """``slot.run(feeds)`` with its sample recorded; an error is counted and re-raised."""
        share = self._shares.start()
        cpu0 = self._cpu()
        wall0 = self._wall()
        ok = False
        try:
            outputs = slot.run(feeds)
            ok = True
            return outputs
        finally:
            wall = self._wall() - wall0
            cpu = self._cpu() - cpu0
            sample = Sample(
                model_name=slot.model_name,
                artifact_sha256=slot.sha256,
                wall_s=wall * self.slowdown,
                cpu_s=cpu * self.slowdown,
                joules=self._shares.stop(share) * self.slowdown,
                rss_bytes=self._process.memory_info().rss,
                ok=ok,
            )
            self.record(sample)

    def record(self, sample: Sample) -> None:
        with self._lock:
            key = (sample.model_name, sample.artifact_sha256)
            window = self._open.get(key)
            if window is None:
                now = _unix_ms(self._clock)
                window = Window(sample.model_name, sample.artifact_sha256, now, now, "")
                window.energy_source = self.source
                self._open[key] = window
            window.add(sample)
        if self._observer is not None:
            self._observer.observe(sample, self.source)

    def close_windows(self) -> list[Window]:
        """Close every open window now; the next sample opens a new one."""
        self._joules()  # keeps wrap-around detection current while the agent is idle
        with self._lock:
            closed, self._open = list(self._open.values()), {}
        end = _unix_ms(self._clock)
        for window in closed:
            window.end_unix_ms = max(end, window.start_unix_ms)
        return closed


async def close_windows_forever(telemetry: Telemetry, sink: WindowSink, window_s: float) -> None:
    """Every ``window_s``, persist the closed windows; on cancellation persist the last ones."""
    try:
        while True:
            await asyncio.sleep(window_s)
            await persist(telemetry, sink)
    except asyncio.CancelledError:
        await asyncio.shield(persist(telemetry, sink))
        raise


async def persist(telemetry: Telemetry, sink: WindowSink) -> None:
    closed = telemetry.close_windows()
    if closed:
        try:
            await asyncio.to_thread(sink.append, closed)
        except (OSError, sqlite3.Error, AgentError) as exc:  # a full disk must not stop inference
            log.error("could not persist %d telemetry windows: %s", len(closed), exc)
