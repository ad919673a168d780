"""Concurrency, limits, replicas and failures: the controller stays consistent and says why."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text

from controller.config import ControllerConfig
from controller.server import ControllerServer
from protos import fleet_pb2 as pb
from protos import fleet_pb2_grpc
from tests.controller.helpers import (
    expect_status,
    onnx_model,
    run,
    running_controller,
)


def test_concurrent_writers_get_distinct_versions(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            models = await asyncio.gather(
                *(c.add_model("motions", onnx_model(seed=i)) for i in range(6))
            )
            assert sorted(m.version for m in models) == [1, 2, 3, 4, 5, 6]
            # More writers than the store has retries: none may be turned away.
            artifacts = await asyncio.gather(*(c.artifact("motions") for _ in range(24)))
            assert sorted(a.version for a in artifacts) == list(range(1, 25))
            assert len({a.id for a in artifacts}) == 24

    run(body())


def test_an_oversize_message_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            before = c.snapshot()
            big = grpc.aio.insecure_channel(
                c.server.address, options=[("grpc.max_send_message_length", 64 << 20)]
            )
            admin = fleet_pb2_grpc.AdminServiceStub(big)  # type: ignore[no-untyped-call]
            payload = b"\0" * (9 << 20)
            messages = [
                pb.AddModelChunk(header=pb.AddModelHeader(name="big", size_bytes=len(payload))),
                pb.AddModelChunk(data=payload),
            ]
            await expect_status(
                admin.AddModel(iter(messages), timeout=30), grpc.StatusCode.RESOURCE_EXHAUSTED
            )
            await big.close(None)
            assert c.snapshot() == before

    run(body())


def test_watch_streams_beyond_the_limit_are_refused(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, max_watch_streams=1) as c:
            await c.register("hub-1")
            first = c.agent.WatchAssignments(pb.WatchAssignmentsRequest(device_id="hub-1"))
            await first.read()
            second = c.agent.WatchAssignments(pb.WatchAssignmentsRequest(device_id="hub-1"))
            await expect_status(second.read(), grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 1")
            first.cancel()

    run(body())


def test_health_watch_streams_share_the_watch_limit(tmp_path: Path) -> None:
    """A health Watch holds a watch slot like an assignment stream: they cannot pile up."""

    async def body() -> None:
        async with running_controller(tmp_path, max_watch_streams=1) as c:
            health = health_pb2_grpc.HealthStub(c.channel)
            first = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await first.read()).status == health_pb2.HealthCheckResponse.SERVING
            second = health.Watch(health_pb2.HealthCheckRequest(service="anything"))
            await expect_status(second.read(), grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 1")
            await c.register("hub-1")
            agent = c.agent.WatchAssignments(pb.WatchAssignmentsRequest(device_id="hub-1"))
            await expect_status(agent.read(), grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 1")
            first.cancel()
            # the slot is free again once the health stream ends (checks never took one)
            check = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            for _ in range(50):
                agent = c.agent.WatchAssignments(pb.WatchAssignmentsRequest(device_id="hub-1"))
                try:
                    await agent.read()
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)  # the cancelled stream's slot is released
            else:
                raise AssertionError("the health stream's slot was never released")
            agent.cancel()

    run(body())


def test_a_second_replica_on_the_same_database_reaches_watchers(tmp_path: Path) -> None:
    """Replica B assigns; a device watching replica A learns it at its next heartbeat."""

    async def body() -> None:
        async with running_controller(tmp_path, heartbeat_seconds=1) as a:
            config_b = ControllerConfig(
                data_dir=a.config.data_dir, port=0, heartbeat_seconds=1, grace_seconds=1.0
            )
            replica_b = ControllerServer(config_b)
            await replica_b.start()
            try:
                channel_b = grpc.aio.insecure_channel(replica_b.address)
                admin_b = fleet_pb2_grpc.AdminServiceStub(channel_b)  # type: ignore[no-untyped-call]
                await a.add_model("motions", onnx_model())
                await a.register("hub-1")
                art = await admin_b.CreateArtifact(
                    pb.CreateArtifactRequest(model_name="motions", device_class="home-hub"),
                    timeout=10,
                )
                watch = a.agent.WatchAssignments(pb.WatchAssignmentsRequest(device_id="hub-1"))
                assert list((await watch.read()).assignments) == []
                await admin_b.Assign(
                    pb.AssignRequest(artifact_id=art.id, device_class="home-hub"), timeout=10
                )
                while not (update := await watch.read()).assignments:
                    pass
                assert update.assignments[0].artifact_sha256 == art.sha256
                # replica B sees the device online through the shared lease
                devices = await admin_b.ListDevices(pb.ListDevicesRequest(), timeout=10)
                assert devices.devices[0].status == pb.DEVICE_STATUS_ONLINE
                watch.cancel()
                await channel_b.close(None)
            finally:
                await replica_b.stop(grace=0)

    run(body())


def test_an_unexpected_failure_is_internal_without_detail_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            engine = create_engine(c.config.database_url)
            with engine.begin() as conn:
                conn.execute(text("DROP TABLE events"))
            engine.dispose()
            error = await expect_status(
                c.admin.ListEvents(pb.ListEventsRequest(), timeout=10),
                grpc.StatusCode.INTERNAL,
                "internal controller error",
            )
            assert "events" not in (error.details() or "")

    with caplog.at_level(logging.ERROR, logger="controller.errors"):
        run(body())
    assert any("ListEvents failed unexpectedly" in r.getMessage() for r in caplog.records)
    assert any("no such table" in (r.exc_text or "") for r in caplog.records)


def test_controller_json_names_a_dialable_address(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, host="0.0.0.0", insecure=True) as c:
            info = json.loads(c.config.info_path.read_text())
            assert info["address"] == f"127.0.0.1:{c.server.port}"

    run(body())
