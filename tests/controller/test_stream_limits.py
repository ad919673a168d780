"""Streams cannot hold the controller's call slots: downloads, uploads, watches, health.

Each test holds streams open the way a stalled or hostile client does (reads one chunk
and stops, sends a header and goes quiet, opens stream after stream) and checks that the
controller still answers, ends what went quiet, and refuses what is over its caps.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.config import ConfigError, ControllerConfig
from protos import fleet_pb2 as pb
from protos import fleet_pb2_grpc
from tests.controller.helpers import (
    CHANNEL_OPTIONS,
    TEST_TIMEOUT,
    Harness,
    eventually,
    expect_status,
    onnx_model,
    run,
    running_controller,
)

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
SERVING = health_pb2.HealthCheckResponse.SERVING
CHUNK = 64 * 1024
# Without BDP probing a client's flow-control window stays small, so a download of a few
# MiB cannot be buffered by the client: a reader that stops stalls the server's writes.
STALLING_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.http2.bdp_probe", 0)]


@functools.cache
def big_model() -> bytes:
    return onnx_model(weights=2_000_000)  # 8 MB: many times any flow-control window


async def deployed(c: Harness, *devices: str) -> pb.Artifact:
    """The big model's home-hub artifact, assigned to the class, and ``devices`` registered."""
    await c.add_model("big", big_model())
    art = await c.artifact("big", "home-hub")
    for device in devices:
        await c.register(device)
    await c.admin.Assign(pb.AssignRequest(artifact_id=art.id, device_class="home-hub"), timeout=10)
    return art


def agent_stub(channel: grpc.aio.Channel) -> Any:
    return fleet_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]


def fetch(channel: grpc.aio.Channel, art: pb.Artifact, device_id: str) -> Any:
    request = pb.FetchArtifactRequest(
        device_id=device_id, target_sha256=art.sha256, chunk_bytes=CHUNK
    )
    return agent_stub(channel).FetchArtifact(request, timeout=TEST_TIMEOUT)


async def stalled_fetch(channel: grpc.aio.Channel, art: pb.Artifact, device_id: str) -> Any:
    """A download whose client reads its first chunk, then nothing more."""
    call = fetch(channel, art, device_id)
    first = await call.read()
    assert first.offset == 0 and len(first.data) == CHUNK
    return call


async def read_to_the_end(call: Any) -> None:
    while isinstance(await call.read(), pb.ArtifactChunk):  # else grpc.aio.EOF
        pass


async def quiet_after(*messages: Any) -> AsyncIterator[Any]:
    """A client stream that sends ``messages`` and then nothing, until it is cancelled."""
    for message in messages:
        yield message
    await asyncio.Event().wait()


def stalling_channel(c: Harness) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(c.server.address, options=STALLING_OPTIONS)


# ------------------------------------------------------------------- downloads (S3)


def test_stalled_downloads_leave_short_calls_and_health_checks_alone(tmp_path: Path) -> None:
    """More stalled downloads than short-call slots: registering, listing and health
    checks still answer, because downloads hold slots of their own pool."""

    async def body() -> None:
        async with running_controller(tmp_path, max_concurrent_rpcs=1) as c:
            art = await deployed(c, "hub-1", "hub-2")
            async with stalling_channel(c) as channel:
                stalled = [
                    await stalled_fetch(channel, art, "hub-1"),
                    await stalled_fetch(channel, art, "hub-2"),
                ]
                assert (await c.register("hub-3")).device_id == "hub-3"
                devices = await c.admin.ListDevices(pb.ListDevicesRequest(), timeout=10)
                assert len(devices.devices) == 3
                health = health_pb2_grpc.HealthStub(c.channel)
                check = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert check.status == SERVING
                for call in stalled:
                    call.cancel()

    run(body())


def test_a_download_whose_client_stops_reading_ends_after_the_write_timeout(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with running_controller(
            tmp_path, fetch_write_timeout_seconds=1.0, max_fetch_streams=1
        ) as c:
            art = await deployed(c, "hub-1", "hub-2")
            async with stalling_channel(c) as channel:
                stalled = await stalled_fetch(channel, art, "hub-1")
                # the pool's one slot is taken while the stalled download lasts...
                await expect_status(
                    fetch(c.channel, art, "hub-2").read(), EXHAUSTED, "max_fetch_streams"
                )

                # ...and freed when its write times out (the attempt is recorded as cut short)
                async def recorded() -> bool:
                    events = await c.events("artifact.fetch")
                    return any(not json.loads(e.detail_json)["completed"] for e in events)

                await eventually(recorded)
                other = fetch(c.channel, art, "hub-2")
                await read_to_the_end(other)
                assert await other.code() == grpc.StatusCode.OK

                # the stalled client, reading again, gets what was on its way, then the reason
                await expect_status(
                    read_to_the_end(stalled), DEADLINE, "fetch_write_timeout_seconds"
                )

    run(body())


def test_downloads_are_capped_per_device_until_the_stalled_ones_are_gone(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with running_controller(
            tmp_path, max_fetches_per_device=2, fetch_write_timeout_seconds=1.0
        ) as c:
            art = await deployed(c, "hub-1", "hub-2")
            async with stalling_channel(c) as channel:
                stalled = [await stalled_fetch(channel, art, "hub-1") for _ in range(2)]
                third = fetch(c.channel, art, "hub-1")
                await expect_status(third.read(), EXHAUSTED, "max_fetches_per_device", "hub-1")
                await stalled_fetch(channel, art, "hub-2")  # another device is not held back

                # a timed-out stream still counts for its device while gRPC holds its chunk...
                async def recorded() -> bool:
                    events = await c.events("artifact.fetch")
                    cut = [e for e in events if not json.loads(e.detail_json)["completed"]]
                    return len(cut) == 3

                await eventually(recorded)
                again = fetch(c.channel, art, "hub-1")
                await expect_status(again.read(), EXHAUSTED, "max_fetches_per_device")

                # ...and no longer once its client cancels it
                for call in stalled:
                    call.cancel()

                async def accepted() -> bool:
                    call = fetch(c.channel, art, "hub-1")
                    try:
                        await call.read()
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == EXHAUSTED, exc
                        return False
                    call.cancel()
                    return True

                await eventually(accepted)

    run(body())


# ------------------------------------------------------------------- uploads (S4)


def test_an_upload_that_goes_quiet_is_ended_and_stores_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(
            tmp_path, upload_idle_timeout_seconds=1.0, max_concurrent_rpcs=1
        ) as c:
            before = c.snapshot()
            header = pb.AddModelHeader(name="idle", size_bytes=3 * CHUNK)
            uploads = (
                quiet_after(),  # not even a header
                quiet_after(pb.AddModelChunk(header=header)),
                quiet_after(pb.AddModelChunk(header=header), pb.AddModelChunk(data=b"x" * CHUNK)),
            )
            for messages in uploads:
                await expect_status(
                    c.admin.AddModel(messages, timeout=TEST_TIMEOUT),
                    DEADLINE,
                    "AddModel",
                    "upload_idle_timeout_seconds",
                    "nothing was stored",
                )
            await expect_status(
                c.admin.StartCompression(quiet_after(), timeout=TEST_TIMEOUT),
                DEADLINE,
                "StartCompression",
                "upload_idle_timeout_seconds",
            )
            assert c.snapshot() == before
            jobs = await c.admin.ListCompressionJobs(pb.ListCompressionJobsRequest(), timeout=10)
            assert list(jobs.jobs) == []
            # the one short-call slot is free again
            assert (await c.register("hub-1")).device_id == "hub-1"

    run(body())


# ------------------------------------------------------------------- health (S5, S6)


def test_health_check_answers_while_every_short_call_slot_is_busy(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, max_concurrent_rpcs=1) as c:
            header = pb.AddModelHeader(name="slow", size_bytes=CHUNK)
            upload = c.admin.AddModel(
                quiet_after(pb.AddModelChunk(header=header)), timeout=TEST_TIMEOUT
            )
            # the upload holds the one slot: a short call now waits behind it (past its
            # deadline)...
            register = pb.RegisterRequest(device_id="hub-1", device_class="home-hub")
            await expect_status(c.agent.Register(register, timeout=1), DEADLINE)
            # ...a health probe does not
            health = health_pb2_grpc.HealthStub(c.channel)
            check = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert check.status == SERVING
            upload.cancel()

    run(body())


def test_health_accepts_only_the_services_it_serves(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            health = health_pb2_grpc.HealthStub(c.channel)
            for service in ("", "homefleet.v1.AgentService", "homefleet.v1.AdminService"):
                request = health_pb2.HealthCheckRequest(service=service)
                assert (await health.Check(request, timeout=10)).status == SERVING
            long_name = health_pb2.HealthCheckRequest(service="s" * 201)
            unknown = health_pb2.HealthCheckRequest(service="nope")
            invalid = grpc.StatusCode.INVALID_ARGUMENT
            await expect_status(health.Check(long_name, timeout=10), invalid, "201 characters")
            await expect_status(health.Watch(long_name).read(), invalid, "at most 200")
            not_found = grpc.StatusCode.NOT_FOUND
            await expect_status(health.Check(unknown, timeout=10), not_found, "'nope'")
            await expect_status(health.Watch(unknown).read(), not_found, "'nope'")

    run(body())


def test_health_watch_streams_are_capped_per_client(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, max_health_watches_per_peer=2) as c:
            health = health_pb2_grpc.HealthStub(c.channel)
            request = health_pb2.HealthCheckRequest()
            watches = [health.Watch(request) for _ in range(2)]
            for watch in watches:
                assert (await watch.read()).status == SERVING
            await expect_status(
                health.Watch(request).read(), EXHAUSTED, "max_health_watches_per_peer"
            )
            # assignment streams are not health streams: the cap leaves them alone
            await c.register("hub-1")
            agent = c.agent.WatchAssignments(pb.WatchAssignmentsRequest(device_id="hub-1"))
            await agent.read()
            agent.cancel()
            watches[0].cancel()

            async def accepted() -> bool:
                watch = health.Watch(request)
                try:
                    await watch.read()
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == EXHAUSTED, exc
                    return False
                watch.cancel()
                return True

            await eventually(accepted)
            watches[1].cancel()

    run(body())


# ------------------------------------------------------------------- assignment watches (S6)


def test_a_new_watch_stream_for_a_device_replaces_the_old_one(tmp_path: Path) -> None:
    """An agent that reconnects takes over at once; one device never holds more than one
    stream, so it cannot take every watch slot."""

    async def body() -> None:
        async with running_controller(tmp_path, max_watch_streams=2) as c:
            await c.register("hub-1")
            request = pb.WatchAssignmentsRequest(device_id="hub-1")
            current = c.agent.WatchAssignments(request)
            await current.read()
            for _ in range(5):  # more than the two watch slots
                newer = c.agent.WatchAssignments(request)
                await newer.read()
                await expect_status(current.read(), grpc.StatusCode.CANCELLED, "replaced", "hub-1")
                current = newer
            # the device stays online through the handovers, and its stream keeps working
            assert (await c.device("hub-1")).status == pb.DEVICE_STATUS_ONLINE
            await c.register("hub-2")
            other = c.agent.WatchAssignments(pb.WatchAssignmentsRequest(device_id="hub-2"))
            await other.read()
            await c.add_model("m", onnx_model())
            art = await c.artifact("m", "home-hub")
            await c.admin.Assign(
                pb.AssignRequest(artifact_id=art.id, device_id="hub-1"), timeout=10
            )
            update = await current.read()
            assert [a.artifact_sha256 for a in update.assignments] == [art.sha256]
            current.cancel()
            other.cancel()

    run(body())


# ------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_fetch_streams", 0),
        ("max_fetches_per_device", 0),
        ("fetch_write_timeout_seconds", 0),
        ("fetch_write_timeout_seconds", float("nan")),
        ("upload_idle_timeout_seconds", -1.0),
        ("upload_idle_timeout_seconds", True),
        ("max_health_watches_per_peer", 0),
    ],
)
def test_stream_limits_are_checked_when_the_config_is_built(
    tmp_path: Path, field: str, value: object
) -> None:
    with pytest.raises(ConfigError, match=field):
        ControllerConfig(data_dir=tmp_path, **{field: value})  # type: ignore[arg-type]


def test_downloads_cancelled_mid_write_end_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that cancels is no controller failure: no ERROR, no INTERNAL, each attempt
    recorded as cut short, and every download slot back."""

    async def body() -> None:
        async with running_controller(tmp_path, max_fetch_streams=8) as c:
            art = await deployed(c, "hub-1", "hub-2")
            async with stalling_channel(c) as channel:
                for _ in range(4):
                    calls = [
                        await stalled_fetch(channel, art, device)
                        for device in ("hub-1", "hub-2")
                        for _ in range(4)
                    ]
                    for call in calls:
                        call.cancel()

                    async def all_free() -> bool:
                        call = fetch(c.channel, art, "hub-1")
                        try:
                            await call.read()
                        except grpc.aio.AioRpcError as exc:
                            assert exc.code() == EXHAUSTED, exc
                            return False
                        call.cancel()
                        return True

                    await eventually(all_free)

            async def recorded() -> bool:
                events = await c.events("artifact.fetch")
                return len(events) == 4 * 8 + 4 and not any(
                    json.loads(e.detail_json)["completed"] for e in events
                )

            await eventually(recorded)

    with caplog.at_level(logging.ERROR, logger="controller"):
        run(body())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
