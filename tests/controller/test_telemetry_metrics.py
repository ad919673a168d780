"""Fleet telemetry out of the controller: /metrics per class, model and artifact, and the
sliding-window summary a budget is checked against. Real controller, real gRPC, real
HTTP scrape parsed by prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from artifact import histogram
from controller.clock import unix_ms
from controller.config import ConfigError, ControllerConfig
from controller.db import make_engine
from controller.sql_store import SqlStore
from protos import fleet_pb2 as pb
from tests.controller.helpers import Harness, onnx_model, run, running_controller

MODEL = "motions"
HUB_A = histogram.histogram([0.00004] * 50 + [0.0004] * 45 + [0.003] * 5)
HUB_B = histogram.histogram([0.0008] * 30 + [0.02] * 10)
CAM = histogram.histogram([0.05] * 8 + [150.0] * 2)  # 150 s: the overflow bucket


# windows ``end_ms`` after a day ago: the controller refuses windows from 1970
BASE_MS = unix_ms() - 24 * 3600 * 1000


def window(
    seq: int,
    sha: str,
    counts: list[int],
    *,
    end_ms: int = 10_000,
    errors: int = 0,
    cpu: float = 0.25,
    joules: float = 1.5,
    source: str = "estimate",
    model: str = MODEL,
) -> pb.TelemetryWindow:
    return pb.TelemetryWindow(
        seq=seq,
        model_name=model,
        artifact_sha256=sha,
        start_unix_ms=BASE_MS + end_ms - 10_000,
        end_unix_ms=BASE_MS + end_ms,
        count=sum(counts),
        errors=errors,
        latency_bucket_counts=counts,
        cpu_seconds=cpu,
        joules=joules,
        energy_source=source,
    )


async def report(c: Harness, device_id: str, *windows: pb.TelemetryWindow) -> int:
    ack = await c.agent.ReportTelemetry(
        pb.TelemetryBatch(device_id=device_id, windows=list(windows)), timeout=10
    )
    return int(ack.highest_seq)


async def fleet(c: Harness) -> tuple[str, dict[str, list[pb.TelemetryWindow]]]:
    """Two hubs (one artifact, two meters) and a camera running the hubs' artifact (by a
    device assignment): its series carry the class it runs in and that artifact's id."""
    await c.add_model(MODEL, onnx_model())
    art = await c.artifact(MODEL, "home-hub")
    for device_id, device_class in (("hub-1", "home-hub"), ("hub-2", "home-hub")):
        await c.register(device_id, device_class)
    await c.register("cam-1", "camera")
    batches = {
        "hub-1": [
            window(1, art.sha256, HUB_A, end_ms=10_000, errors=1),
            window(2, art.sha256, HUB_A, end_ms=20_000, cpu=0.5, joules=2.0),
        ],
        "hub-2": [window(1, art.sha256, HUB_B, end_ms=30_000, joules=4.25, source="rapl")],
        "cam-1": [window(7, art.sha256, CAM, errors=3, cpu=1.0, joules=8.0, source="hwmon")],
    }
    for device_id, windows in batches.items():
        assert await report(c, device_id, *windows) == windows[-1].seq
    return art.id, batches


def scrape(address: str) -> dict[str, list[Sample]]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {f.name: list(f.samples) for f in text_string_to_metric_families(text)}


async def scrape_controller(c: Harness) -> dict[str, list[Sample]]:
    address = json.loads(c.config.info_path.read_text())["metrics_address"]
    host, _, port = address.rpartition(":")
    assert host == "127.0.0.1" and int(port) not in (0, c.server.port)
    return await asyncio.to_thread(scrape, address)


def values(samples: list[Sample], name: str, **labels: str) -> dict[tuple[str, ...], float]:
    """Samples called ``name`` matching ``labels``: (remaining label values) -> value."""
    found = {}
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            rest = tuple(v for k, v in sorted(s.labels.items()) if k not in labels)
            found[rest] = s.value
    return found


def test_metrics_are_per_class_model_and_artifact_and_idempotent(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, metrics_port=0) as c:
            artifact_id, batches = await fleet(c)
            metrics = await scrape_controller(c)

            hub = {"device_class": "home-hub", "model": MODEL, "artifact_id": artifact_id}
            cam = {"device_class": "camera", "model": MODEL, "artifact_id": artifact_id}
            latency = metrics["homefleet_inference_latency_seconds"]
            for labels, counts in (
                (hub, histogram.merge(HUB_A, HUB_A, HUB_B)),
                (cam, CAM),
            ):
                buckets = values(latency, "homefleet_inference_latency_seconds_bucket", **labels)
                by_le = sorted((float(le), v) for (le,), v in buckets.items())
                assert [le for le, _ in by_le] == [*histogram.UPPER_BOUNDS, math.inf]
                assert [v for _, v in by_le] == list(itertools.accumulate(counts))
                count = values(latency, "homefleet_inference_latency_seconds_count", **labels)
                assert count == {(): sum(counts)}
            # Sub-millisecond buckets: the hubs' 40 µs and 400 µs inferences are told apart.
            hub_buckets = values(latency, "homefleet_inference_latency_seconds_bucket", **hub)
            assert hub_buckets[("0.0001",)] == 100  # 2 x 50 at 40 µs
            assert hub_buckets[("0.001",)] == 2 * 95 + 30

            def one(name: str, labels: dict[str, str]) -> float:
                found = values(metrics[name.removesuffix("_total")], name, **labels)
                assert len(found) == 1, found
                return next(iter(found.values()))

            assert one("homefleet_inferences_total", hub) == 2 * 100 + 40
            assert one("homefleet_inferences_total", cam) == 10
            assert one("homefleet_inference_errors_total", hub) == 1
            assert one("homefleet_inference_errors_total", cam) == 3
            assert one("homefleet_cpu_seconds_total", hub) == pytest.approx(0.25 + 0.5 + 0.25)
            assert one("homefleet_telemetry_windows_total", hub) == 3
            energy = metrics["homefleet_energy_joules"]
            assert values(energy, "homefleet_energy_joules_total", **hub) == {
                ("estimate",): pytest.approx(1.5 + 2.0),
                ("rapl",): pytest.approx(4.25),
            }
            assert values(energy, "homefleet_energy_joules_total", **cam) == {
                ("hwmon",): pytest.approx(8.0)
            }
            assert one("homefleet_devices_reporting", hub) == 2
            assert one("homefleet_devices_reporting", cam) == 1

            # Never per device: no device label, and no label value naming a device.
            every = [s for samples in metrics.values() for s in samples]
            assert every and not any("device_id" in s.labels for s in every)
            assert not any(v in batches for s in every for v in s.labels.values())

            # A batch sent again (a lost ack) is stored once: the scrape does not move.
            for device_id, windows in batches.items():
                assert await report(c, device_id, *windows) == windows[-1].seq
            assert await scrape_controller(c) == metrics

    run(body())


def test_a_re_release_keeps_the_label_its_bytes_were_first_reported_under(
    tmp_path: Path,
) -> None:
    """A rollback re-signs old bytes as a new version: the series must not be renamed
    (a Prometheus counter that changes labels restarts, and rate() breaks)."""

    async def body() -> None:
        async with running_controller(tmp_path, metrics_port=0) as c:
            artifact_id, _ = await fleet(c)
            await c.add_model(MODEL, onnx_model(seed=1))
            newer = await c.artifact(MODEL, "home-hub")
            for target in (newer.id, artifact_id):  # forward, then back: a re-release
                await c.admin.Assign(
                    pb.AssignRequest(artifact_id=target, device_class="home-hub"), timeout=10
                )
            arts = await c.admin.ListArtifacts(pb.ListArtifactsRequest(), timeout=10)
            assert len({a.id for a in arts.artifacts}) == 3  # v1, v2, and v3 = v1's bytes
            metrics = await scrape_controller(c)
            inferences = values(
                metrics["homefleet_inferences"], "homefleet_inferences_total", model=MODEL
            )
            assert (artifact_id, "home-hub") in inferences
            assert not any("/v3" in key[0] for key in inferences)

    run(body())


def test_summary_merges_an_artifacts_windows_since_a_time(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            artifact_id, batches = await fleet(c)
            engine = make_engine(c.config.database_url)
            try:
                store = SqlStore(engine)
                everything = store.telemetry_summary("home-hub", MODEL, 0)
                recent = store.telemetry_summary("home-hub", MODEL, BASE_MS + 15_000)
                later = store.telemetry_summary("home-hub", MODEL, BASE_MS + 30_001)
                camera = store.telemetry_summary("camera", MODEL, 0)
                other_model = store.telemetry_summary("home-hub", "other", 0)
            finally:
                engine.dispose()

        assert [s.artifact_id for s in everything] == [artifact_id]
        (total,) = everything
        merged = histogram.merge(HUB_A, HUB_A, HUB_B)
        assert total.latency_bucket_counts == tuple(merged)
        assert total.p95_seconds == histogram.percentile(merged, 0.95)
        assert (total.count, total.errors, total.windows, total.devices) == (240, 1, 3, 2)
        assert total.joules_per_inference == pytest.approx((1.5 + 2.0 + 4.25) / 240)

        # Since 15 s: hub-1's first window (ended at 10 s) is out.
        (since,) = recent
        merged = histogram.merge(HUB_A, HUB_B)
        assert since.latency_bucket_counts == tuple(merged)
        assert since.p95_seconds == histogram.percentile(merged, 0.95)
        assert since.p95_seconds != total.p95_seconds
        assert (since.count, since.errors, since.windows, since.devices) == (140, 0, 2, 2)
        assert since.joules_per_inference == pytest.approx((2.0 + 4.25) / 140)
        assert later == [] and other_model == []

        (cam,) = camera
        assert (cam.artifact_id, cam.artifact_sha256) == (
            artifact_id,
            batches["cam-1"][0].artifact_sha256,
        )
        overflow = histogram.UPPER_BOUNDS[-1]  # 100 s: what a p95 in the overflow bucket is
        assert cam.p95_seconds == histogram.percentile(CAM, 0.95) == overflow
        assert cam.devices == 1 and cam.count == sum(CAM)

    run(body())


def test_metrics_are_off_unless_a_port_is_configured(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            info = json.loads(c.config.info_path.read_text())
            assert "metrics_address" not in info

    run(body())
    with pytest.raises(ConfigError, match="metrics_port"):
        ControllerConfig(data_dir=tmp_path, metrics_port=70_000)
