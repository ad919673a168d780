"""The agent's own Prometheus ``/metrics``, off unless ``--metrics-listen`` is given.

Per model only (a device serves a handful): the latency histogram in seconds with
sub-millisecond buckets (every other bound of the shared telemetry histogram), the
inferences and joules counters, the telemetry queue's depth and what it had to summarise
or drop, and which artifact each model runs. A registry of its own, never the global
one, so several agents (tests) live in one process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from artifact import histogram
from edge_agent.errors import AgentError, ErrorCode
from edge_agent.fetch import FetchResult
from edge_agent.runtime import ModelRuntime
from edge_agent.telemetry import Sample
from edge_agent.telemetry_queue import TelemetryQueue
from protos import fleet_pb2

log = logging.getLogger(__name__)

PREFIX = "homefleet_agent"
LATENCY_BUCKETS = histogram.UPPER_BOUNDS[::2]  # 10 µs .. 100 s, 4 per decade


class _StateCollector(Collector):
    """Read at scrape time: the queue's counters and the model each name serves."""

    def __init__(self, runtime: ModelRuntime, queue: TelemetryQueue | None) -> None:
        self._runtime = runtime
        self._queue = queue

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            f"{PREFIX}_model_info",
            "The artifact each model is served from (value 1).",
            labels=["model", "artifact_sha256"],
        )
        for name in self._runtime.model_names():
            slot = self._runtime.active(name)
            if slot is not None:
                info.add_metric([name, slot.sha256], 1.0)
        yield info
        if self._queue is None:
            return
        stats = self._queue.stats()
        yield GaugeMetricFamily(
            f"{PREFIX}_telemetry_queue_windows",
            "Telemetry windows stored on disk and not yet acknowledged by the controller.",
            value=stats.depth,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_telemetry_summarised_windows",
            "Windows merged into summary windows because the queue was over its bound.",
            value=stats.summarised_windows,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_telemetry_rejected_windows",
            "Windows the controller refused as invalid and the agent dropped.",
            value=stats.rejected_windows,
        )


class AgentMetrics:
    """Observes every telemetry sample; the registry is what ``/metrics`` serves."""

    def __init__(self, runtime: ModelRuntime, queue: TelemetryQueue | None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._latency = Histogram(
            f"{PREFIX}_inference_latency_seconds",
            "Wall time of one Predict's inference.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._inferences = Counter(
            f"{PREFIX}_inferences",
            "Inferences run, by outcome (ok or error).",
            ["model", "outcome"],
            registry=self.registry,
        )
        self._joules = Counter(
            f"{PREFIX}_energy_joules",
            "Energy measured over inferences, by meter source.",
            ["model", "source"],
            registry=self.registry,
        )
        self._updates = Counter(
            f"{PREFIX}_updates",
            "Artifacts downloaded, by how they arrived (encoding full or delta).",
            ["model", "encoding"],
            registry=self.registry,
        )
        self._update_bytes = Counter(
            f"{PREFIX}_update_bytes_received",
            "Bytes downloads took on the wire, a discarded delta's included (by the "
            "encoding the artifact finally arrived in).",
            ["model", "encoding"],
            registry=self.registry,
        )
        self._discarded = Counter(
            f"{PREFIX}_deltas_discarded",
            "Deltas that did not rebuild the artifact, so the full artifact was fetched.",
            ["model"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(runtime, queue))

    def observe_update(self, model: str, result: FetchResult) -> None:
        """A finished download: what it cost, and whether a delta was thrown away."""
        encoding = "delta" if result.encoding == fleet_pb2.PAYLOAD_ENCODING_DELTA else "full"
        self._updates.labels(model, encoding).inc()
        self._update_bytes.labels(model, encoding).inc(result.bytes_received)
        if result.discarded_delta is not None:
            self._discarded.labels(model).inc()

    def observe(self, sample: Sample, energy_source: str) -> None:
        self._latency.labels(sample.model_name).observe(sample.wall_s)
        outcome = "ok" if sample.ok else "error"
        self._inferences.labels(sample.model_name, outcome).inc()
        self._joules.labels(sample.model_name, energy_source).inc(sample.joules)


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def serve_metrics(metrics: AgentMetrics, listen: str) -> MetricsServer:
    """Serve ``/metrics`` on ``HOST:PORT`` (port 0: any) in a thread of its own."""
    host, _, port = listen.rpartition(":")
    try:
        server, thread = start_http_server(int(port), host.strip("[]"), metrics.registry)
    except OSError as exc:
        raise AgentError(
            ErrorCode.LISTEN_FAILED, f"--metrics-listen: cannot listen on {listen}: {exc}"
        ) from exc
    result = MetricsServer(server, thread)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, result.port)
    return result
