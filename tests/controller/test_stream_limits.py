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
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from artifact.tls import TlsBundle
from controller.config import ConfigError, ControllerConfig
from controller.db import make_engine
from controller.sql_store import SqlStore
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
from tests.support.pki import make_pki

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


async def download_calls(c: Harness) -> tuple[int, int]:
    """(FetchArtifact calls, updates completed) in the controller's download sums: every
    call is counted there as it ends, though most get no artifact.fetch event of their own
    (one per device and payload per interval: AgentHandlers._fetch_events)."""

    def read() -> tuple[int, int]:
        engine = make_engine(c.config.database_url)
        try:
            totals = SqlStore(engine).download_totals()
        finally:
            engine.dispose()
        return sum(t.calls for t in totals), sum(t.completed for t in totals)

    return await asyncio.to_thread(read)


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
                    return await download_calls(c) == (3, 0)  # all three cut short

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


def quiet_upload(admin: Any, rpc_name: str) -> Any:
    """An upload that is accepted and then sends nothing (AddModel after its header)."""
    if rpc_name == "AddModel":
        header = pb.AddModelHeader(name="idle", size_bytes=3 * CHUNK)
        return admin.AddModel(quiet_after(pb.AddModelChunk(header=header)), timeout=TEST_TIMEOUT)
    return admin.StartCompression(quiet_after(), timeout=TEST_TIMEOUT)


class Held:
    """A quiet upload kept open: one a probe beat to the last slot is opened again."""

    def __init__(self, admin: Any, rpc_name: str) -> None:
        self.admin, self.rpc_name = admin, rpc_name
        self.call = quiet_upload(admin, rpc_name)

    def reopened(self) -> bool:
        if not self.call.done():
            return False
        self.call = quiet_upload(self.admin, self.rpc_name)
        return True


async def until_uploads_are_refused(admin: Any, limit: str, held: Sequence[Held]) -> None:
    """Wait until an upload from ``admin``'s client is refused for ``limit`` while every
    ``held`` upload is open: they have all taken their slots."""

    async def refused() -> bool:
        if any([h.reopened() for h in held]):
            return False
        try:
            await admin.AddModel(iter([]), timeout=10)  # taken: INVALID_ARGUMENT at once
        except grpc.aio.AioRpcError as exc:
            if exc.code() == EXHAUSTED:
                assert limit in (exc.details() or ""), exc
                return True  # every slot is a held upload's: none can be refused now
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
            return False
        raise AssertionError("an AddModel without a header cannot succeed")

    await eventually(refused)


async def nothing_stored(c: Harness) -> None:
    """No model, artifact or compression job, and no file under blobs/ (temporaries
    included: a cancelled upload removes its own once its handler has ended)."""
    jobs = await c.admin.ListCompressionJobs(pb.ListCompressionJobsRequest(), timeout=10)
    assert list(jobs.jobs) == []

    async def clean() -> bool:
        counts = c.counts()
        return counts["models"] == counts["artifacts"] == 0 and c.blob_files() == []

    await eventually(clean)


async def short_calls_answer(c: Harness, device_id: str) -> None:
    assert (await c.register(device_id)).device_id == device_id
    devices = await c.admin.ListDevices(pb.ListDevicesRequest(), timeout=10)
    assert device_id in [d.device_id for d in devices.devices]
    events = await c.admin.ListEvents(pb.ListEventsRequest(limit=10), timeout=10)
    assert "device.registered" in [e.kind for e in events.events], events


def test_uploads_held_open_take_no_short_call_slot(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, max_concurrent_rpcs=1, max_upload_streams=2) as c:
            held = [Held(c.admin, "AddModel"), Held(c.admin, "StartCompression")]
            await until_uploads_are_refused(c.admin, "max_upload_streams", held)
            # both uploads are open, and the controller's one short-call slot is not theirs
            await short_calls_answer(c, "hub-1")
            assert not any(h.call.done() for h in held)
            for h in held:
                h.call.cancel()
            await nothing_stored(c)

    run(body())


def test_64_idle_uploads_leave_register_and_listings_answering(tmp_path: Path) -> None:
    """As many uploads that send a header (or nothing) and then stop as there are
    short-call slots: the few the upload pool takes stay open, the rest are refused at
    once, and agents and operators are answered meanwhile."""

    async def body() -> None:
        async with running_controller(tmp_path) as c:
            assert c.config.max_concurrent_rpcs == 64
            calls = [
                quiet_upload(c.admin, "AddModel" if i % 2 else "StartCompression")
                for i in range(64)
            ]
            taken = c.config.max_uploads_per_peer  # every call comes from 127.0.0.1

            async def the_rest_refused() -> bool:
                ended = sum(bool(call.done()) for call in calls)
                return ended == len(calls) - taken

            await eventually(the_rest_refused)
            held = [call for call in calls if not call.done()]
            for call in calls:
                if call.done():
                    await expect_status(call, EXHAUSTED, "max_uploads_per_peer", "127.0.0.1")
            await short_calls_answer(c, "hub-1")
            assert not any(call.done() for call in held)
            for call in held:
                call.cancel()
            await nothing_stored(c)

            # their slots come back once they are gone
            async def added() -> bool:
                try:
                    await c.add_model("m", onnx_model())
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == EXHAUSTED, exc
                    return False
                return True

            await eventually(added)

    run(body())


def test_uploads_are_capped_per_client_certificate(tmp_path: Path) -> None:
    """Under mutual TLS the per-client cap counts each certificate apart: one admin's
    stalled uploads do not hold back another's, up to the pool's total."""
    pki = make_pki(tmp_path / "pki")

    def admin_stub(channel: grpc.aio.Channel) -> Any:
        return fleet_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]

    async def body() -> None:
        async with running_controller(
            tmp_path, tls_dir=pki.controller(), max_upload_streams=3, max_uploads_per_peer=2
        ) as c:
            channels = [
                grpc.aio.secure_channel(
                    c.server.address,
                    TlsBundle.load(pki.admin(name)).channel_credentials(),
                    options=CHANNEL_OPTIONS,
                )
                for name in ("alice", "bob")
            ]
            alice, bob = (admin_stub(channel) for channel in channels)
            alices = [Held(alice, "AddModel"), Held(alice, "StartCompression")]
            await until_uploads_are_refused(alice, "max_uploads_per_peer", alices)
            bobs = Held(bob, "AddModel")  # another certificate: still accepted...
            await until_uploads_are_refused(bob, "max_upload_streams", [bobs])  # ...to the total
            assert not any(h.call.done() for h in [*alices, bobs])
            alices[0].call.cancel()

            async def bob_adds_a_model() -> bool:
                data = onnx_model()
                header = pb.AddModelHeader(name="m", size_bytes=len(data))
                messages = [pb.AddModelChunk(header=header), pb.AddModelChunk(data=data)]
                try:
                    await bob.AddModel(iter(messages), timeout=30)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == EXHAUSTED, exc
                    return False
                return True

            await eventually(bob_adds_a_model)
            for h in (alices[1], bobs):
                h.call.cancel()

            async def only_bobs_model() -> bool:  # and no temporary of the stalled uploads
                return c.counts()["models"] == 1 and len(c.blob_files()) == 1

            await eventually(only_bobs_model)
            for channel in channels:
                await channel.close(None)

    run(body())


def test_an_upload_that_trickles_is_ended_and_stores_nothing(tmp_path: Path) -> None:
    """A byte now and then passes the idle check for ever; the rate bound ends it."""

    async def trickle() -> AsyncIterator[pb.AddModelChunk]:
        yield pb.AddModelChunk(header=pb.AddModelHeader(name="slow", size_bytes=CHUNK))
        while True:  # well inside upload_idle_timeout_seconds (60) each time
            await asyncio.sleep(0.05)
            yield pb.AddModelChunk(data=b"x")

    async def body() -> None:
        async with running_controller(tmp_path, upload_rate_grace_seconds=1.0) as c:
            before = c.snapshot()
            await expect_status(
                c.admin.AddModel(trickle(), timeout=TEST_TIMEOUT),
                DEADLINE,
                "AddModel",
                "upload_min_bytes_per_second",
                "nothing was stored",
            )
            # a compression upload that never sends its header is ended by the same bound
            # (not by the 60 s idle timeout)
            await expect_status(
                c.admin.StartCompression(quiet_after(), timeout=TEST_TIMEOUT),
                DEADLINE,
                "StartCompression",
                "upload_min_bytes_per_second",
            )
            assert c.snapshot() == before
            await nothing_stored(c)

    run(body())


# ------------------------------------------------------------------- health (S5, S6)


def test_health_check_answers_while_every_short_call_slot_is_busy(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, max_concurrent_rpcs=1) as c:
            # no client can hold a short-call slot for long any more (uploads have a pool
            # of their own): the test holds the controller's one slot itself
            assert c.server._health is not None
            async with c.server._health.limits.slot():
                # a short call now waits behind it (past its deadline)...
                register = pb.RegisterRequest(device_id="hub-1", device_class="home-hub")
                await expect_status(c.agent.Register(register, timeout=1), DEADLINE)
                # ...a health probe does not
                health = health_pb2_grpc.HealthStub(c.channel)
                check = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert check.status == SERVING

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
        ("max_upload_streams", 0),
        ("max_uploads_per_peer", 0),
        ("upload_min_bytes_per_second", 0),
        ("upload_min_bytes_per_second", 1.5),
        ("upload_rate_grace_seconds", 0),
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
                    # every slot, again each round: a cancelled download's slot comes back
                    # once its handler has ended, which the next round may not wait for
                    calls: list[Any] = []
                    for device in ("hub-1", "hub-2"):
                        for _ in range(4):

                            async def opened(device: str = device, into: list[Any] = calls) -> bool:
                                try:
                                    into.append(await stalled_fetch(channel, art, device))
                                except grpc.aio.AioRpcError as exc:
                                    assert exc.code() == EXHAUSTED, exc
                                    return False
                                return True

                            await eventually(opened)
                    for call in calls:
                        call.cancel()

            async def recorded() -> bool:
                return await download_calls(c) == (4 * 8, 0)  # every call, all cut short

            await eventually(recorded)
            # one event per device (and payload) says it; the rest are summed up later
            events = await c.events("artifact.fetch")
            assert sorted(json.loads(e.detail_json)["device_id"] for e in events) == [
                "hub-1",
                "hub-2",
            ]

    with caplog.at_level(logging.ERROR, logger="controller"):
        run(body())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
