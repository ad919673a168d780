"""`RemoveDevice` / `homefleet devices remove`: a device that left the fleet is forgotten.

A real controller, and for an online device the agent's real SyncLoop
(tests.edge_agent.test_sync): an online device is refused unless forced, and a forced
one's agent registers again as a new device; an offline device goes with its own
assignments and telemetry windows while the per-class counters keep what it reported.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from artifact.histogram import BUCKET_COUNT
from protos import fleet_pb2 as pb
from tests.edge_agent.models import add_model
from tests.edge_agent.test_sync import (
    DEVICE,
    active_manifest,
    deploy,
    final_report_since,
    register_other,
    reports,
    running_agent,
    scenario,
    wait_active,
)
from tests.support.controller import CALL_TIMEOUT_S, Controller, eventually


def _window(seq: int, sha: str, end_ms: int) -> pb.TelemetryWindow:
    counts = [0] * BUCKET_COUNT
    counts[10] = 5
    return pb.TelemetryWindow(
        seq=seq,
        model_name="motions",
        artifact_sha256=sha,
        start_unix_ms=end_ms - 10_000,
        end_unix_ms=end_ms,
        count=5,
        latency_bucket_counts=counts,
        cpu_seconds=0.1,
        joules=0.5,
        energy_source="estimate",
    )


def _rolled_up_windows(controller: Controller) -> int:
    """What the per-class counters (/metrics, the dashboard) hold, read from the database."""
    with sqlite3.connect(controller.config.data_dir / "homefleet.db") as db:
        (total,) = db.execute("SELECT COALESCE(SUM(windows), 0) FROM telemetry_rollup").fetchone()
    return int(total)


def _stored_windows(controller: Controller, device_id: str) -> int:
    with sqlite3.connect(controller.config.data_dir / "homefleet.db") as db:
        (count,) = db.execute(
            "SELECT COUNT(*) FROM telemetry_windows WHERE device_id = ?", (device_id,)
        ).fetchone()
    return int(count)


async def _remove(
    controller: Controller, device_id: str, *, force: bool = False
) -> pb.RemoveDeviceResponse:
    reply: pb.RemoveDeviceResponse = await controller.admin.RemoveDevice(
        pb.RemoveDeviceRequest(device_id=device_id, force=force), timeout=CALL_TIMEOUT_S
    )
    return reply


def test_an_offline_device_goes_with_its_assignments_and_windows_and_the_counters_stay(
    tmp_path: Path,
) -> None:
    async def body(controller: Controller, state: Path) -> None:
        await register_other(controller, "hub-1")
        await register_other(controller, "hub-2")
        v1 = await controller.release("motions", add_model(1.0))
        v2 = await controller.release("motions", add_model(2.0))
        await controller.assign(v1.id, device_id="hub-1")  # its own, older than the class's
        end = int(time.time() * 1000) - 60_000  # a minute ago
        for device_id in ("hub-1", "hub-2"):
            ack = await controller.agent.ReportTelemetry(
                pb.TelemetryBatch(
                    device_id=device_id,
                    windows=[_window(seq, v1.sha256, end + seq * 10_000) for seq in (1, 2, 3)],
                ),
                timeout=CALL_TIMEOUT_S,
            )
            assert ack.highest_seq == 3
        counters = _rolled_up_windows(controller)
        assert counters == 6

        reply = await _remove(controller, "hub-1")
        assert (reply.device_id, reply.device_class) == ("hub-1", "home-hub")
        assert list(reply.own_assignments) == ["motions"]
        assert reply.telemetry_windows == 3
        assert await controller.device("hub-1") is None
        assert await controller.device("hub-2") is not None
        assert _stored_windows(controller, "hub-1") == 0
        assert _stored_windows(controller, "hub-2") == 3
        assert _rolled_up_windows(controller) == counters  # counters never go down
        (event,) = await controller.events("device.removed")
        assert event.id == reply.event_id
        assert "hub-1 (home-hub) removed" in event.message

        # the id is free again: the same machine registers afresh and follows its class
        await register_other(controller, "hub-1")
        again = await controller.device("hub-1")
        assert again is not None
        # it follows its class; its own older pin (v1 re-released as v3) went as
        # `unassign` takes it, so the class's v2 came back above it, as v4
        assert list(reply.rereleased) == [f"{v2.id} as motions/home-hub/v4"]
        assert [m.desired_artifact_id for m in again.models] == ["motions/home-hub/v4"]

        # an unknown device is NOT_FOUND and changes nothing
        events = len(await controller.events())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _remove(controller, "no-such-hub")
        assert refused.value.code() is grpc.StatusCode.NOT_FOUND
        assert "'no-such-hub' is not registered" in (refused.value.details() or "")
        assert len(await controller.events()) == events

    scenario(tmp_path, body)


def test_an_online_device_is_refused_unless_forced_and_its_agent_registers_again(
    tmp_path: Path,
) -> None:
    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(state, controller.address) as agent:
            served = await deploy(controller, agent, add_model(1.0))
            events = len(await controller.events())
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _remove(controller, DEVICE)
            assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            details = refused.value.details() or ""
            assert f"device {DEVICE} is online" in details, details
            assert f"`homefleet devices remove {DEVICE} --force`" in details, details
            assert await controller.device(DEVICE) is not None
            assert len(await controller.events()) == events  # nothing changed

            registered = len(await controller.events("device.registered"))
            await _remove(controller, DEVICE, force=True)

            # its watch ends; the agent connects again, registers as a new device and
            # reports what it serves (not an outcome unknown for good)
            async def back() -> pb.Device | None:
                if len(await controller.events("device.registered")) == registered:
                    return None
                device = await controller.device(DEVICE)
                if device is None or not device.models or not device.models[0].last_outcome:
                    return None
                return device

            device = await eventually("the agent to register again and report", back)
            assert [m.desired_artifact_id for m in device.models] == [served.id]
            (model,) = device.models
            assert model.last_outcome == pb.DEPLOYMENT_OUTCOME_ACTIVE
            assert model.serving_sha256 == served.sha256
            (latest,) = (await controller.events("device.registered"))[-1:]
            assert "re-registered" not in latest.message, latest.message
            assert agent.runtime.get("motions").sha256 == served.sha256  # it kept serving

    scenario(tmp_path, body)


def test_a_device_that_ran_its_own_newer_version_follows_its_class_after_coming_back(
    tmp_path: Path,
) -> None:
    """QA: removed while pinned to a re-release newer than its class's artifact, a device
    that came back refused the class's older manifest for good. Removal takes its own
    assignments as `unassign` does: the class's artifact is re-released above them."""

    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(state, controller.address) as agent:
            v1 = await deploy(controller, agent, add_model(1.0))
            v2 = await controller.release("motions", add_model(2.0))  # the class's now
            await wait_active(controller, v2.sha256)
            before = len(await reports(controller, v1.sha256))  # v1 was active once already
            pinned = await controller.assign(v1.id, device_id=DEVICE)  # a rollback: v3
            assert pinned.artifact_id == "motions/home-hub/v3", pinned
            report = await final_report_since(controller, v1.sha256, before)
            assert report["outcome"] == "active", report
            assert active_manifest(agent).version == 3  # the agent ran v3: its floor

        async def offline() -> bool:  # the controller saw its watch end
            device = await controller.device(DEVICE)
            return device is not None and device.status == pb.DEVICE_STATUS_OFFLINE

        await eventually("the stopped agent's device to be offline", offline)
        reply = await _remove(controller, DEVICE)
        assert list(reply.own_assignments) == ["motions"]
        assert list(reply.rereleased) == [f"{v2.id} as motions/home-hub/v4"]

        before = len(await reports(controller, v2.sha256))
        async with running_agent(state, controller.address) as agent:
            report = await final_report_since(controller, v2.sha256, before)
            assert report["outcome"] == "active", report
            assert agent.runtime.get("motions").sha256 == v2.sha256
            manifest = active_manifest(agent)
            assert (manifest.version, manifest.rereleases) == (4, v2.id)

    scenario(tmp_path, body)
