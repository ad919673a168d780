"""The controller's Prometheus ``/metrics``: fleet telemetry per device class, model and
artifact — never per device, so the series count grows with what is deployed, not with
the fleet.

Every scrape reads the sums from the store (running sums per class, model, artifact and
meter that the ingest transaction keeps, so a scrape reads O(artifacts) rows however many
windows are stored), so the counters are cumulative since the controller's data began
and every replica over the same database exports the same numbers; nothing is kept in
process memory. Names follow
Prometheus conventions (and Kepler's for energy): ``_seconds`` histograms, ``_total``
counters, joules labelled with the meter ``source``. The latency histogram's ``le``
bounds are the shared telemetry buckets (``artifact.histogram``: 10 µs to 100 s, 8 per
decade), so the exported buckets are exactly the merged counts agents reported. Windows
carry bucket counts but no latency sum, so the histogram has ``_bucket`` and ``_count``
samples and no ``_sum``.

The HTTP port serving it (with the dashboard) is ``controller.dashboard.http``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from artifact import histogram
from controller.clock import unix_ms
from controller.device_classes import Budgets, DeviceClass
from controller.records import AppliedUpdateTotals, DownloadTotals, TelemetryTotals
from controller.store import Store

log = logging.getLogger(__name__)

PREFIX = "homefleet"
LABELS = ["device_class", "model", "artifact_id"]
# A device counts as reporting while its windows keep arriving: agents send every window
# (default 10 s) soon after it closes, so 5 minutes tolerates short outages.
REPORTING_WINDOW_MS = 5 * 60 * 1000


def cumulative_buckets(counts: Iterable[int]) -> list[tuple[str, float]]:
    """The shared histogram's counts as Prometheus ``le`` buckets (cumulative, +Inf last)."""
    bounds = [floatToGoString(b) for b in histogram.UPPER_BOUNDS]  # type: ignore[no-untyped-call]
    bounds.append("+Inf")
    buckets = []
    running = 0
    for le, c in zip(bounds, counts, strict=True):
        running += c
        buckets.append((le, float(running)))
    return buckets


class TelemetryCollector(Collector):
    """Yields the fleet's telemetry metrics, read from the store at scrape time."""

    def __init__(self, store: Store, clock: Callable[[], int] = unix_ms) -> None:
        self._store = store
        self._now = clock

    def collect(self) -> Iterable[Metric]:
        totals = self._store.telemetry_totals(self._now() - REPORTING_WINDOW_MS)
        yield _latency(totals)
        yield _counter(
            "inferences", "Inferences devices ran and reported.", totals, lambda t: t.count
        )
        yield _counter(
            "inference_errors", "Inferences that failed on the device.", totals, lambda t: t.errors
        )
        yield _counter(
            "cpu_seconds",
            "CPU time of the devices' inference threads.",
            totals,
            lambda t: t.cpu_seconds,
        )
        energy = CounterMetricFamily(
            f"{PREFIX}_energy_joules",
            "Energy the devices measured (or estimated) over inferences, by meter source.",
            labels=[*LABELS, "source"],
        )
        for t in totals:
            for source, joules in t.joules_by_source:
                energy.add_metric([*_labels(t), source], joules)
        yield energy
        yield _counter(
            "telemetry_windows", "Telemetry windows stored.", totals, lambda t: t.windows
        )
        reporting = GaugeMetricFamily(
            f"{PREFIX}_devices_reporting",
            f"Devices whose telemetry arrived in the last {REPORTING_WINDOW_MS // 60_000} minutes.",
            labels=LABELS,
        )
        for t in totals:
            reporting.add_metric(_labels(t), t.devices_reporting)
        yield reporting
        refused = CounterMetricFamily(
            f"{PREFIX}_telemetry_refusals",
            "ReportTelemetry calls refused as invalid, by reason (clock, overlap, bounds, "
            "energy_source, unknown_model, malformed); agents drop what is "
            "refused, one window per call once they retry window by window.",
            labels=["device_class", "reason"],
        )
        for r in self._store.refusal_totals():
            refused.add_metric([r.device_class, r.reason], float(r.calls))
        yield refused


DOWNLOAD_LABELS = [*LABELS, "encoding"]


class DownloadCollector(Collector):
    """What updates cost on the wire, per class, model, artifact and encoding (full or
    delta), read from the download sums the store keeps as each FetchArtifact call ends.

    ``homefleet_update_full_bytes_total`` is the artifact's size for each completed
    download: next to ``homefleet_update_bytes_sent_total`` it shows what deltas saved
    (``sum(full_bytes) - sum(bytes_sent)`` over ``encoding="delta"``), as the controller
    saw the calls; the ``homefleet_updates_applied_total`` family counts what devices
    reported applying, which a delta a device threw away cannot inflate."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        totals = self._store.download_totals()
        measures: list[tuple[str, str, Callable[[DownloadTotals], int]]] = [
            (
                "update_fetches",
                "FetchArtifact calls (a resumed download is one call per resumption).",
                lambda t: t.calls,
            ),
            (
                "updates_completed",
                "Downloads completed: calls that sent the last byte to a device this "
                "controller sent every earlier byte of the payload (in memory: a resume "
                "after a restart counts none).",
                lambda t: t.completed,
            ),
            (
                "update_bytes_sent",
                "Payload bytes sent to devices, interrupted downloads included.",
                lambda t: t.bytes_sent,
            ),
            (
                "update_full_bytes",
                "The artifact's size for each completed download: what it would have cost "
                "sent in full.",
                lambda t: t.full_bytes,
            ),
        ]
        yield from _update_counters(measures, totals)
        applied = self._store.applied_update_totals()
        by_devices: list[tuple[str, str, Callable[[AppliedUpdateTotals], int]]] = [
            (
                "updates_applied",
                "Updates devices applied (their first ACTIVE report after a download), by "
                "the encoding the artifact arrived in.",
                lambda t: t.updates,
            ),
            (
                "update_bytes_received",
                "Bytes those updates took on the wire, as the devices counted them (a "
                "discarded delta's included).",
                lambda t: t.bytes_received,
            ),
            (
                "update_applied_full_bytes",
                "The artifacts' size for each applied update: minus "
                "update_bytes_received, what deltas saved.",
                lambda t: t.full_bytes,
            ),
        ]
        yield from _update_counters(by_devices, applied)


_Sums = TypeVar("_Sums", DownloadTotals, AppliedUpdateTotals)


def _update_counters(
    measures: Iterable[tuple[str, str, Callable[[_Sums], int]]], rows: Iterable[_Sums]
) -> Iterator[Metric]:
    """One counter family per measure, a sample per (class, model, artifact, encoding)."""
    rows = list(rows)
    for name, documentation, value in measures:
        family = CounterMetricFamily(f"{PREFIX}_{name}", documentation, labels=DOWNLOAD_LABELS)
        for r in rows:
            labels = [r.device_class, r.model_name, r.artifact_id, r.encoding.value]
            family.add_metric(labels, float(value(r)))
        yield family


class BudgetCollector(Collector):
    """The declared device classes' budgets as gauges, so Grafana can draw each budget as
    a line next to what the class measures (the budget loop judges against the same
    numbers). Per class only: a budget holds for every model the class runs."""

    def __init__(self, classes: Mapping[str, DeviceClass]) -> None:
        self._classes = classes

    def collect(self) -> Iterable[Metric]:
        for name, documentation, value in _BUDGETS:
            family = GaugeMetricFamily(
                f"{PREFIX}_class_budget_{name}", documentation, labels=["device_class"]
            )
            for class_name, spec in sorted(self._classes.items()):
                budget = value(spec.budgets)
                if budget is not None:
                    family.add_metric([class_name], budget)
            yield family


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


_BUDGETS: list[tuple[str, str, Callable[[Budgets], float | None]]] = [
    (
        "p95_latency_seconds",
        "The class's p95 inference latency budget (device-class file p95_latency_ms).",
        lambda b: _scaled(b.p95_latency_ms, 1e-3),
    ),
    (
        "energy_per_inference_joules",
        "The class's energy budget per inference (device-class file energy_per_inference_mj).",
        lambda b: _scaled(b.energy_per_inference_mj, 1e-3),
    ),
    (
        "artifact_bytes",
        "The class's artifact size budget (device-class file max_artifact_bytes).",
        lambda b: None if b.max_artifact_bytes is None else float(b.max_artifact_bytes),
    ),
]


def _labels(t: TelemetryTotals) -> list[str]:
    return [t.device_class, t.model_name, t.artifact_id]


def _latency(totals: list[TelemetryTotals]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        f"{PREFIX}_inference_latency_seconds",
        "Wall time of one inference on the device (shared log-spaced buckets).",
        labels=LABELS,
    )
    for t in totals:
        labels = _labels(t)
        buckets = cumulative_buckets(t.latency_bucket_counts)
        family.add_metric(labels, buckets, sum_value=None)
        # add_metric writes _count only with a _sum, which windows do not carry; the
        # count is the +Inf bucket's, as Prometheus requires.
        family.samples.append(
            Sample(f"{family.name}_count", dict(zip(LABELS, labels, strict=True)), buckets[-1][1])
        )
    return family


def _counter(
    name: str,
    documentation: str,
    totals: list[TelemetryTotals],
    value: Callable[[TelemetryTotals], float],
) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{PREFIX}_{name}", documentation, labels=LABELS)
    for t in totals:
        family.add_metric(_labels(t), value(t))
    return family
