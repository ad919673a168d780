"""Two agents sharing one device id (a cloned device image) are told apart from a reconnect.

Each takes the device's one WatchAssignments stream from the other, over and over (QA:
~3 re-registrations a second, each a device.registered event and a controller WARNING).
The controller records one device.conflict event instead, and from then on neither their
re-registrations nor their takeovers add an event or a warning each.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller.agents import CONFLICT_REPLACEMENTS
from protos import fleet_pb2 as pb
from protos import fleet_pb2_grpc
from tests.controller.helpers import (
    CHANNEL_OPTIONS,
    TEST_TIMEOUT,
    Harness,
    eventually,
    expect_status,
    hardware,
    run,
    running_controller,
)

DEVICE = "cam-2"
LEASE_WARNING = "registered while another connection still holds its watch lease"


class Clone:
    """One copy of the cloned agent: its own connection, registering then watching."""

    def __init__(self, c: Harness) -> None:
        self.channel = grpc.aio.insecure_channel(c.server.address, options=CHANNEL_OPTIONS)
        self.stub: Any = fleet_pb2_grpc.AgentServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.stream: Any = None

    async def take_over(self, other: Clone) -> None:
        """Register and watch as the agent does; the other copy's stream ends CANCELLED."""
        request = pb.RegisterRequest(device_id=DEVICE, device_class="home-hub", hardware=hardware())
        await self.stub.Register(request, timeout=TEST_TIMEOUT)
        self.stream = self.stub.WatchAssignments(pb.WatchAssignmentsRequest(device_id=DEVICE))
        assert isinstance(await self.stream.read(), pb.AssignmentSet)  # it holds the stream
        if other.stream is not None:
            await expect_status(other.stream.read(), grpc.StatusCode.CANCELLED, "replaced")
            other.stream = None


async def registered(c: Harness) -> list[pb.Event]:
    return [e for e in await c.events("device.registered") if e.subject == DEVICE]


def test_two_agents_sharing_a_device_id_make_one_conflict_event_not_a_flood(
    tmp_path: Path, database_url: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="controller.agents")
    extra = {"db_url": database_url} if database_url else {}

    async def body() -> None:
        async with running_controller(tmp_path, **extra) as c:
            await c.register(DEVICE)
            first, second = Clone(c), Clone(c)
            clones = (first, second)
            turns = 0

            async def turn() -> None:
                nonlocal turns
                await clones[turns % 2].take_over(clones[(turns + 1) % 2])
                turns += 1

            # the first takeovers look like agents that restarted: each is recorded
            while turns <= CONFLICT_REPLACEMENTS:
                await turn()
            assert await c.events("device.conflict") == []
            await turn()  # one takeover more than a restart explains within a minute

            async def conflict() -> bool:
                return len(await c.events("device.conflict")) == 1

            await eventually(conflict)
            before = len(await registered(c))
            warnings = [r for r in caplog.records if LEASE_WARNING in r.getMessage()]
            assert before <= CONFLICT_REPLACEMENTS + 3  # the first registration, then turns

            for _ in range(4 * CONFLICT_REPLACEMENTS):  # they keep flapping
                await turn()
            assert len(await registered(c)) == before
            (event,) = await c.events("device.conflict")  # still one: at most one per 10 min
            assert event.subject == DEVICE
            assert "two agents share this device id" in event.message
            assert "--device-id" in event.message
            later = [r for r in caplog.records if LEASE_WARNING in r.getMessage()]
            assert later == warnings  # the conflict event said it; no warning per turn
            for clone in clones:
                if clone.stream is not None:
                    clone.stream.cancel()
                await clone.channel.close(None)

    run(body())
    messages = [r.getMessage() for r in caplog.records]
    assert not any("mutual TLS rules the second out" in m for m in messages)  # untrue for clones
    assert sum("two agents share this device id" in m for m in messages) == 1
