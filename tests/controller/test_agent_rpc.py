"""AgentService over real gRPC on loopback: register, watch, fetch, report, and bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from artifact import histogram
from artifact.delta import apply_delta_bytes
from artifact.delta.format import FORMAT_VERSION
from artifact.manifest import Manifest
from controller.clock import unix_ms
from protos import fleet_pb2 as pb
from tests.controller.helpers import (
    Harness,
    assert_nothing_stored,
    collect,
    eventually,
    expect_status,
    hardware,
    onnx_model,
    run,
    running_controller,
    sha256,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
CHUNK = 64 * 1024


async def deployed(c: Harness, *, weights: int = 0) -> tuple[bytes, pb.Artifact]:
    """A model, its home-hub artifact assigned to the class, and a registered hub-1."""
    data = onnx_model(weights=weights)
    await c.add_model("motions", data)
    art = await c.artifact("motions", "home-hub")
    await c.register("hub-1")
    await c.admin.Assign(pb.AssignRequest(artifact_id=art.id, device_class="home-hub"), timeout=10)
    return data, art


def test_register_and_reregister(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, heartbeat_seconds=7) as c:
            response = await c.register("hub-1", agent_version="0.1.0")
            assert response.device_id == "hub-1"
            assert response.heartbeat_seconds == 7
            assert response.max_chunk_bytes == 1024 * 1024
            held = [pb.HeldArtifact(model_name="motions", sha256=sha256(b"m"), active=True)]
            await c.register("hub-1", held=held)
            device = await c.device("hub-1")
            assert [(m.model_name, m.serving_sha256) for m in device.models] == [
                ("motions", sha256(b"m"))
            ]
            registered = await c.events("device.registered")
            assert [json.loads(e.detail_json)["re_registered"] for e in registered] == [False, True]

    run(body())


def test_registering_while_another_connection_watches_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two agents sharing a device id (plaintext) would fight over it: say so in the log."""

    async def body() -> None:
        async with running_controller(tmp_path) as c:
            await c.register("hub-1")
            assert "another connection" not in caplog.text  # a first registration
            watch = c.agent.WatchAssignments(pb.WatchAssignmentsRequest(device_id="hub-1"))
            await watch.read()
            await c.register("hub-1")
            watch.cancel()

    with caplog.at_level(logging.WARNING, logger="controller.agents"):
        run(body())
    [warning] = [r for r in caplog.records if "another connection" in r.getMessage()]
    assert "device hub-1 registered while another connection still holds" in warning.getMessage()


def test_register_bad_input_changes_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            await c.register("hub-1")
            before = c.snapshot()
            await expect_status(
                c.register("hub-1", hardware=hardware(memory_bytes=1 << 30)),
                grpc.StatusCode.ALREADY_EXISTS,
                "hub-1",
                "hardware.memory_bytes",
                "registered 4294967296, this request 1073741824",
            )
            await expect_status(
                c.register("hub-1", hardware=hardware(arch="aarch64", cpu_cores=8)),
                grpc.StatusCode.ALREADY_EXISTS,
                "hardware.arch",
                "hardware.cpu_cores",
            )
            await expect_status(
                c.register("hub-1", "speaker"),
                grpc.StatusCode.ALREADY_EXISTS,
                "device_class (registered 'home-hub', this request 'speaker')",
            )
            await expect_status(c.register("Hub One"), INVALID, "device_id")
            await expect_status(c.register("hub-2", "Home/Hub"), INVALID, "device_class")
            await expect_status(
                c.register("hub-2", hardware=pb.HardwareInfo()), INVALID, "hardware.arch"
            )
            await expect_status(
                c.register("hub-2", held=[pb.HeldArtifact(model_name="motions", sha256="../../x")]),
                INVALID,
                "held[0].sha256",
            )
            twice = [
                pb.HeldArtifact(model_name="m", sha256=sha256(b"a"), active=True),
                pb.HeldArtifact(model_name="m", sha256=sha256(b"b"), active=True),
            ]
            await expect_status(c.register("hub-2", held=twice), INVALID, "two artifacts")
            assert c.snapshot() == before
            assert (await c.device("hub-1")).hardware.memory_bytes == 4 << 30

    run(body())


def test_watch_pushes_the_whole_set_on_subscribe_and_after_assign(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            await c.add_model("motions", onnx_model())
            v1 = await c.artifact("motions", "home-hub")
            v2 = await c.artifact("motions", "home-hub")
            await c.register("hub-1")
            await c.register("hub-2")
            watch = c.agent.WatchAssignments(pb.WatchAssignmentsRequest(device_id="hub-1"))
            first = await watch.read()
            assert (list(first.assignments), first.revision) == ([], 0)
            assert (await c.device("hub-1")).status == pb.DEVICE_STATUS_ONLINE
            assert (await c.device("hub-2")).status == pb.DEVICE_STATUS_OFFLINE

            await c.admin.Assign(
                pb.AssignRequest(artifact_id=v1.id, device_class="home-hub"), timeout=10
            )
            second = await watch.read()
            assert second.revision > first.revision
            (assignment,) = second.assignments
            assert (assignment.model_name, assignment.artifact_sha256) == ("motions", v1.sha256)
            assert assignment.size_bytes == v1.size_bytes
            assert assignment.manifest == v1.manifest
            assert Manifest.from_json_bytes(assignment.manifest.manifest_json).version == 1

            # a device's own assignment wins over its class's
            await c.admin.Assign(pb.AssignRequest(artifact_id=v2.id, device_id="hub-1"), timeout=10)
            third = await watch.read()
            assert third.revision > second.revision
            assert (
                Manifest.from_json_bytes(third.assignments[0].manifest.manifest_json).version == 2
            )
            hub = await c.device("hub-1")
            assert hub.models[0].desired_artifact_id == v2.id

            watch.cancel()

            async def offline() -> bool:
                return (await c.device("hub-1")).status == pb.DEVICE_STATUS_OFFLINE

            await eventually(offline)

    run(body())


def test_watch_resends_the_set_as_a_keepalive(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, heartbeat_seconds=1) as c:
            await deployed(c)
            watch = c.agent.WatchAssignments(pb.WatchAssignmentsRequest(device_id="hub-1"))
            first = await watch.read()
            again = await watch.read()  # one heartbeat later, nothing changed
            assert again == first
            watch.cancel()

    run(body())


def test_watch_refuses_unknown_and_invalid_devices(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            await expect_status(
                collect(c.agent.WatchAssignments(pb.WatchAssignmentsRequest(device_id="ghost"))),
                NOT_FOUND,
                "register first",
            )
            await expect_status(
                collect(c.agent.WatchAssignments(pb.WatchAssignmentsRequest(device_id="../x"))),
                INVALID,
                "device_id",
            )

    run(body())


def test_watch_streams_end_cleanly_when_the_controller_stops(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            await deployed(c)
            watch = c.agent.WatchAssignments(pb.WatchAssignmentsRequest(device_id="hub-1"))
            await watch.read()
            await c.server.stop(grace=5.0)
            assert await watch.code() == grpc.StatusCode.OK

    run(body())


def fetch_request(art: pb.Artifact, **fields: object) -> pb.FetchArtifactRequest:
    values: dict[str, object] = {
        "device_id": "hub-1",
        "target_sha256": art.sha256,
        "chunk_bytes": CHUNK,
    }
    values.update(fields)
    return pb.FetchArtifactRequest(**values)  # type: ignore[arg-type]


def test_fetch_streams_chunks_and_resumes_from_an_offset(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            data, art = await deployed(c, weights=60_000)
            chunks = await collect(c.agent.FetchArtifact(fetch_request(art), timeout=10))
            assert len(chunks) == -(-len(data) // CHUNK) > 2
            assert b"".join(ch.data for ch in chunks) == data
            assert all(ch.encoding == pb.PAYLOAD_ENCODING_FULL for ch in chunks)
            assert {(ch.total_bytes, ch.payload_sha256, ch.base_sha256) for ch in chunks} == {
                (len(data), sha256(data), "")
            }
            assert [ch.offset for ch in chunks] == list(range(0, len(data), CHUNK))
            assert max(len(ch.data) for ch in chunks) == CHUNK

            offset = 100_001
            rest = await collect(
                c.agent.FetchArtifact(
                    fetch_request(
                        art,
                        offset=offset,
                        chunk_bytes=0,
                        base_sha256=sha256(b"old"),
                        encoding=pb.PAYLOAD_ENCODING_FULL,
                    ),
                    timeout=10,
                )
            )
            assert rest[0].offset == offset
            assert b"".join(ch.data for ch in rest) == data[offset:]

            (at_end,) = await collect(
                c.agent.FetchArtifact(fetch_request(art, offset=len(data)), timeout=10)
            )
            assert (at_end.data, at_end.offset, at_end.total_bytes) == (b"", len(data), len(data))

            events = await c.events("artifact.fetch")
            details = [json.loads(e.detail_json) for e in events]
            assert details[0] == {
                "device_id": "hub-1",
                "target_sha256": art.sha256,
                "artifact_id": art.id,
                "encoding": "full",
                "base_sha256": "",
                "payload_sha256": art.sha256,
                "artifact_bytes": len(data),
                "offset": 0,
                "bytes_sent": len(data),
                "total_bytes": len(data),
                "completed": True,
                "update_completed": True,
                "calls_summarised": 0,
                "bytes_summarised": 0,
                "updates_summarised": 0,
            }
            assert (details[1]["offset"], details[1]["bytes_sent"]) == (offset, len(data) - offset)
            # it sent the last byte, but not those before its offset: no update completed
            assert (details[1]["completed"], details[1]["update_completed"]) == (True, False)
            # the call at the end is the payload's second such call within the interval: in
            # the sums only, until an event of this device and payload sums it up
            assert len(details) == 2

    run(body())


def test_a_cancelled_fetch_is_recorded_as_incomplete(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            data, art = await deployed(c, weights=200_000)
            call = c.agent.FetchArtifact(fetch_request(art), timeout=10)
            first = await call.read()
            assert first.offset == 0 and len(first.data) == CHUNK
            call.cancel()

            async def recorded() -> bool:
                return bool(await c.events("artifact.fetch"))

            await eventually(recorded)
            (event,) = await c.events("artifact.fetch")
            detail = json.loads(event.detail_json)
            assert detail["completed"] is False
            assert CHUNK <= detail["bytes_sent"] < len(data)
            assert detail["total_bytes"] == len(data)

    run(body())


def test_fetch_bad_input_gets_the_right_status_and_records_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            data, art = await deployed(c)
            before = c.snapshot()

            async def refused(
                request: pb.FetchArtifactRequest, code: grpc.StatusCode, *text: str
            ) -> None:
                await expect_status(
                    collect(c.agent.FetchArtifact(request, timeout=10)), code, *text
                )

            await refused(
                fetch_request(art, target_sha256="../../etc/passwd"), INVALID, "target_sha256"
            )
            await refused(
                fetch_request(art, target_sha256=art.sha256.upper()), INVALID, "64 lowercase hex"
            )
            await refused(fetch_request(art, base_sha256="zz"), INVALID, "base_sha256")
            await refused(
                fetch_request(art, target_sha256=sha256(b"unknown")),
                NOT_FOUND,
                "no artifact with sha256",
            )
            await refused(fetch_request(art, device_id="ghost"), NOT_FOUND, "register first")
            await refused(
                fetch_request(art, offset=len(data) + 1),
                grpc.StatusCode.OUT_OF_RANGE,
                f"it has {len(data)} bytes",
            )
            await refused(
                fetch_request(art, chunk_bytes=1000), INVALID, "chunk_bytes", "65536..1048576"
            )
            await refused(fetch_request(art, chunk_bytes=2 << 20), INVALID, "chunk_bytes")
            await refused(
                fetch_request(art, encoding=pb.PAYLOAD_ENCODING_DELTA), INVALID, "base_sha256"
            )
            await refused(
                fetch_request(
                    art, encoding=pb.PAYLOAD_ENCODING_DELTA, base_sha256=sha256(b"never held")
                ),
                grpc.StatusCode.FAILED_PRECONDITION,
                "no longer holds base",
                "FULL",
            )
            await refused(
                fetch_request(art, offset=10, base_sha256=sha256(b"never held")),
                INVALID,
                "FULL or DELTA",
            )
            await refused(fetch_request(art, encoding=7), INVALID, "encoding")
            assert c.snapshot() == before

    run(body())


def status(art: pb.Artifact, **fields: object) -> pb.StatusReport:
    values: dict[str, object] = {
        "device_id": "hub-1",
        "model_name": "motions",
        "artifact_sha256": art.sha256,
        "outcome": pb.DEPLOYMENT_OUTCOME_FAILED,
        "reason": "signature does not verify",
        "bytes_received": 10,
        "encoding": pb.PAYLOAD_ENCODING_FULL,
    }
    values.update(fields)
    return pb.StatusReport(**values)  # type: ignore[arg-type]


def test_report_status_records_outcome_and_reason(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            _, art = await deployed(c)
            assert await c.agent.ReportStatus(status(art), timeout=10) == pb.StatusAck()
            (event,) = await c.events("device.status")
            assert "signature does not verify" in event.message and event.subject == "hub-1"
            state = (await c.device("hub-1")).models[0]
            assert state.last_outcome == pb.DEPLOYMENT_OUTCOME_FAILED
            assert (state.last_reason, state.serving_sha256) == ("signature does not verify", "")

            before = c.snapshot()
            await expect_status(
                c.agent.ReportStatus(status(art, reason=""), timeout=10),
                INVALID,
                "reason is required",
            )
            await expect_status(
                c.agent.ReportStatus(status(art, outcome=0), timeout=10), INVALID, "outcome"
            )
            await expect_status(
                c.agent.ReportStatus(status(art, outcome=42), timeout=10), INVALID, "outcome"
            )
            await expect_status(
                c.agent.ReportStatus(status(art, device_id="ghost"), timeout=10), NOT_FOUND, "ghost"
            )
            await expect_status(
                c.agent.ReportStatus(status(art, artifact_sha256="abc"), timeout=10),
                INVALID,
                "artifact_sha256",
            )
            await expect_status(
                c.agent.ReportStatus(status(art, reason="x" * 5000), timeout=10), INVALID, "reason"
            )
            # an escape sequence would restyle the operator's terminal or forge a line
            await expect_status(
                c.agent.ReportStatus(
                    status(art, reason="ok\n\x1b[31mFAKE LINE\x1b[0m"), timeout=10
                ),
                INVALID,
                "reason holds the control character U+001B at position 3",
            )
            # a row per model a device names: only registered ones (a device inventing
            # names made its ListDevices page too large to send)
            await expect_status(
                c.agent.ReportStatus(status(art, model_name="invented-1"), timeout=10),
                NOT_FOUND,
                "model 'invented-1' is not registered",
            )
            assert c.snapshot() == before

    run(body())


def test_report_telemetry_is_idempotent_and_acks_the_highest_seq(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            _, art = await deployed(c)

            def window(seq: int) -> pb.TelemetryWindow:
                return pb.TelemetryWindow(
                    seq=seq,
                    model_name="motions",
                    artifact_sha256=art.sha256,
                    start_unix_ms=unix_ms() - 20_000,
                    end_unix_ms=unix_ms() - 10_000,
                    count=100,
                    latency_bucket_counts=histogram.histogram([0.0004] * 90 + [0.002] * 10),
                    cpu_seconds=0.2,
                    joules=1.5,
                    energy_source="estimate",
                )

            async def send(*seqs: int, device_id: str = "hub-1") -> int:
                batch = pb.TelemetryBatch(device_id=device_id, windows=[window(s) for s in seqs])
                ack = await c.agent.ReportTelemetry(batch, timeout=10)
                return int(ack.highest_seq)

            assert await send(1, 2, 3) == 3
            assert await send(2, 3, 4) == 4  # a resend after a lost ack
            assert c.counts()["telemetry_windows"] == 4
            assert await send() == 4

            before = c.snapshot()
            await expect_status(send(5, device_id="ghost"), NOT_FOUND, "ghost")
            await expect_status(send(*range(10, 1011)), INVALID, "at most 1000")
            bad = pb.TelemetryBatch(
                device_id="hub-1", windows=[window(5), pb.TelemetryWindow(seq=6, model_name="M!")]
            )
            await expect_status(
                c.agent.ReportTelemetry(bad, timeout=10), INVALID, "windows[1].model_name"
            )
            backwards = window(7)
            backwards.end_unix_ms = 0
            await expect_status(
                c.agent.ReportTelemetry(
                    pb.TelemetryBatch(device_id="hub-1", windows=[backwards]), timeout=10
                ),
                INVALID,
                "windows[0].end_unix_ms",
            )
            other_buckets = window(8)
            del other_buckets.latency_bucket_counts[1:]
            await expect_status(
                c.agent.ReportTelemetry(
                    pb.TelemetryBatch(device_id="hub-1", windows=[other_buckets]), timeout=10
                ),
                INVALID,
                "the shared histogram has",
            )
            # what no real device can report: one device would outweigh its whole class
            future = window(9)
            future.start_unix_ms = unix_ms() + 3_600_000
            future.end_unix_ms = future.start_unix_ms + 10_000
            flood = window(10)
            flood.count = 10**15  # a million inferences a millisecond is the limit
            flood.latency_bucket_counts[0] += 10**15 - 100
            hidden = window(11)
            hidden.count = 200  # more than its histogram holds
            too_many_errors = window(12)
            too_many_errors.errors = 101
            epoch = window(13)  # a device without a real-time clock, booted in 1970
            epoch.start_unix_ms, epoch.end_unix_ms = 0, unix_ms()
            for bad_window, fragment in (
                (future, "is in the future"),
                (epoch, "more than 365 days before the controller's clock"),
                (flood, "windows[0].count"),
                (hidden, "count is 200"),
                (too_many_errors, "windows[0].errors"),
            ):
                await expect_status(
                    c.agent.ReportTelemetry(
                        pb.TelemetryBatch(device_id="hub-1", windows=[bad_window]), timeout=10
                    ),
                    INVALID,
                    fragment,
                )
            assert_nothing_stored(c, before)

    run(body())


def finetuned(data: bytes, fraction: float = 0.02, seed: int = 1) -> bytes:
    """``data`` with a small share of its weights ``w`` moved: what a fine-tune ships."""
    model = onnx.load_from_string(data)
    (init,) = [t for t in model.graph.initializer if t.name == "w"]
    w = onnx.numpy_helper.to_array(init).copy()
    rng = np.random.default_rng(seed)
    moved = rng.choice(w.size, int(w.size * fraction), replace=False)
    w[moved] += rng.standard_normal(moved.size).astype(np.float32) * 0.01
    init.CopyFrom(onnx.numpy_helper.from_array(w, "w"))
    return model.SerializeToString()


def test_fetch_with_a_base_sends_a_delta_computed_once_and_resumable(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            old_data, old_art = await deployed(c, weights=60_000)
            new_data = finetuned(old_data)
            await c.add_model("motions", new_data)
            new_art = await c.artifact("motions", "home-hub")
            await c.admin.Assign(
                pb.AssignRequest(artifact_id=new_art.id, device_class="home-hub"), timeout=10
            )

            request = fetch_request(new_art, base_sha256=old_art.sha256)
            chunks = await collect(c.agent.FetchArtifact(request, timeout=60))
            assert {ch.encoding for ch in chunks} == {pb.PAYLOAD_ENCODING_DELTA}
            assert {ch.base_sha256 for ch in chunks} == {old_art.sha256}
            ((total, digest),) = {(ch.total_bytes, ch.payload_sha256) for ch in chunks}
            payload = b"".join(ch.data for ch in chunks)
            assert len(payload) == total and sha256(payload) == digest
            assert total < len(new_data) / 5  # 2 % of the weights moved
            assert apply_delta_bytes(old_data, payload, new_art.sha256) == new_data

            record = (
                c.config.blob_dir
                / "deltas"
                / f"v{FORMAT_VERSION}"
                / old_art.sha256
                / f"{new_art.sha256}.json"
            )
            assert json.loads(record.read_text())["sha256"] == digest
            blobs_before, record_before = c.blob_files(), record.stat().st_mtime_ns

            half = total // 2
            rest = await collect(
                c.agent.FetchArtifact(
                    fetch_request(
                        new_art,
                        base_sha256=old_art.sha256,
                        offset=half,
                        encoding=pb.PAYLOAD_ENCODING_DELTA,
                    ),
                    timeout=60,
                )
            )
            assert b"".join(ch.data for ch in rest) == payload[half:]
            # computed once: the same payload blob, the record untouched
            assert c.blob_files() == blobs_before
            assert record.stat().st_mtime_ns == record_before

            # no base held by the controller: the full artifact
            unknown = fetch_request(new_art, base_sha256=sha256(b"a model we never had"))
            full = await collect(c.agent.FetchArtifact(unknown, timeout=60))
            assert {ch.encoding for ch in full} == {pb.PAYLOAD_ENCODING_FULL}
            assert b"".join(ch.data for ch in full) == new_data
            # a base that is another model's artifact (a blob the controller holds): the
            # same answer as an unknown one, and no delta computed from it
            other = await c.add_model("other", onnx_model(weights=60_000, seed=5))
            other_art = await c.artifact("other", "home-hub")
            assert other.sha256 != old_art.sha256
            foreign = fetch_request(new_art, base_sha256=other_art.sha256)
            deltas_before = sorted((c.config.blob_dir / "deltas").rglob("*"))
            full = await collect(c.agent.FetchArtifact(foreign, timeout=60))
            assert {ch.encoding for ch in full} == {pb.PAYLOAD_ENCODING_FULL}
            assert sorted((c.config.blob_dir / "deltas").rglob("*")) == deltas_before
            resume = fetch_request(
                new_art, base_sha256=other_art.sha256, offset=1, encoding=pb.PAYLOAD_ENCODING_DELTA
            )
            await expect_status(
                collect(c.agent.FetchArtifact(resume, timeout=60)),
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this controller no longer holds base {other_art.sha256}",
            )

            details = [json.loads(e.detail_json) for e in await c.events("artifact.fetch")]
            assert [(d["encoding"], d["base_sha256"], d["offset"]) for d in details][:3] == [
                ("delta", old_art.sha256, 0),
                ("delta", old_art.sha256, half),
                ("full", "", 0),
            ]
            assert details[0]["bytes_sent"] == total < details[0]["artifact_bytes"]

    run(body())


def test_a_device_fetches_only_what_is_assigned_to_it(tmp_path: Path) -> None:
    """Another class's artifact gets the same answer as one that does not exist."""

    async def body() -> None:
        async with running_controller(tmp_path) as c:
            _, hub_art = await deployed(c)
            await c.add_model("doorbell", onnx_model(weights=1_000))
            camera_art = await c.artifact("doorbell", "camera")
            await c.admin.Assign(
                pb.AssignRequest(artifact_id=camera_art.id, device_class="camera"), timeout=10
            )
            for target in (camera_art.sha256, sha256(b"no such artifact")):
                await expect_status(
                    collect(c.agent.FetchArtifact(fetch_request(camera_art, target_sha256=target))),
                    NOT_FOUND,
                    f"no artifact with sha256 {target} is assigned to device hub-1",
                )
            assert await c.events("artifact.fetch") == []  # nothing was sent
            chunks = await collect(c.agent.FetchArtifact(fetch_request(hub_art), timeout=10))
            assert chunks and chunks[-1].total_bytes == hub_art.size_bytes

    run(body())


def test_long_status_reasons_never_make_a_listing_too_large_to_send(tmp_path: Path) -> None:
    """1,100 devices report 4,000-character reasons: a page of 1,000 events or devices
    would pass gRPC's 8 MiB limit. Every listing still answers, in smaller pages."""

    async def body() -> None:
        async with running_controller(tmp_path) as c:
            _, art = await deployed(c)
            reason = "r" * 4000
            devices = [f"hub-{i:04d}" for i in range(1100)]
            for device in devices:
                await c.register(device)
            for device in devices:
                await c.agent.ReportStatus(status(art, device_id=device, reason=reason), timeout=30)
            events = await c.admin.ListEvents(
                pb.ListEventsRequest(kind_prefix="device.status", limit=1000), timeout=30
            )
            assert 0 < len(events.events) < 1000 and events.more
            newest = await c.admin.ListEvents(
                pb.ListEventsRequest(kind_prefix="device.status", limit=1000, newest=True),
                timeout=30,
            )
            assert newest.more and newest.events[-1].id > events.events[-1].id
            seen: list[str] = []
            token = ""
            while True:  # every device, in pages that fit
                page = await c.admin.ListDevices(
                    pb.ListDevicesRequest(page_size=1000, page_token=token), timeout=30
                )
                seen += [d.device_id for d in page.devices]
                token = page.next_page_token
                if not token:
                    break
            assert sorted(seen) == sorted(["hub-1", *devices])

    run(body())


def test_a_class_no_device_class_file_declares_is_registered_with_a_warning(
    tmp_path: Path,
) -> None:
    """A typo in an agent's --device-class would leave it without models and no word."""
    classes = Path(__file__).resolve().parents[2] / "deploy" / "device-classes"

    async def body() -> None:
        async with running_controller(tmp_path, device_classes_dir=classes) as c:
            known = await c.register("cam-1", "camera")
            assert known.warning == ""
            typo = await c.register("cam-2", "camrea")
            assert "device class 'camrea' is declared by no device-class file" in typo.warning
            assert "camera, home-hub, smart-speaker" in typo.warning
            assert (await c.device("cam-2")).device_class == "camrea"  # still registered

    run(body())
