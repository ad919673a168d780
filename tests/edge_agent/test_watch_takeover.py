"""A watch stream another agent with the same device id took over does not reset the backoff.

QA: two agents sharing a device id (a cloned device image) replaced each other's
WatchAssignments stream ~3 times a second for good, each logging "reconnect attempt 1":
every session had received a desired set, which reset the backoff. Here a second client
(the clone) takes the real agent's stream, again and again, from the real controller.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc

from protos import fleet_pb2, fleet_pb2_grpc
from tests.edge_agent.test_sync import DEVICE, HEARTBEAT_S, running_agent
from tests.support.controller import WAIT_TIMEOUT_S, Controller, running_controller
from tests.support.proxy import FaultProxy

APPLIED = "desired state revision"  # the agent took a desired set from its stream (DEBUG)
RECONNECT = "reconnect attempt"


class SyncLog(logging.Handler):
    """Every message of edge_agent.sync, DEBUG included, for the duration of a test."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger("edge_agent.sync")
        self.messages: list[str] = []
        self.changed = asyncio.Event()
        self._level = self.logger.level

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.changed.set()

    def __enter__(self) -> SyncLog:
        self.logger.addHandler(self)
        self.logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)

    def with_(self, fragment: str) -> list[str]:
        return [m for m in self.messages if fragment in m]

    async def until(self, fragment: str, count: int) -> None:
        """Until ``count`` messages containing ``fragment`` were logged (a safety limit)."""
        async with asyncio.timeout(WAIT_TIMEOUT_S):
            while len(self.with_(fragment)) < count:
                self.changed.clear()
                await self.changed.wait()


def test_a_stream_taken_over_by_a_clone_keeps_the_backoff_growing(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_controller(
            tmp_path / "controller", heartbeat_seconds=HEARTBEAT_S
        ) as controller:
            await takeovers(controller, tmp_path / "agent")

    asyncio.run(main())


async def takeovers(controller: Controller, state: Path) -> None:
    with FaultProxy(controller.port) as proxy, SyncLog() as log:
        async with (
            running_agent(state, proxy.address, backoff_initial_s=0.05, backoff_max_s=5.0),
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            clone: Any = fleet_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
            applied = 0
            for takeover in range(1, 4):
                # the agent's current stream worked: it delivered a desired set
                await log.until(APPLIED, applied + 1)
                call = clone.WatchAssignments(fleet_pb2.WatchAssignmentsRequest(device_id=DEVICE))
                await log.until(RECONNECT, takeover)  # its stream was taken over
                applied = len(log.with_(APPLIED))  # later ones come from the next session
                call.cancel()
            # a session that worked and then broke otherwise starts the backoff over
            await log.until(APPLIED, applied + 1)
            proxy.cut_all()
            await log.until(RECONNECT, 4)
    attempts = log.with_(RECONNECT)
    for number, message in enumerate(attempts[:3], start=1):
        assert f"{RECONNECT} {number} " in message, attempts
        assert "CANCELLED" in message and "replaced" in message, message
    assert f"{RECONNECT} 1 " in attempts[3] and "CANCELLED" not in attempts[3], attempts
    (told,) = log.with_("took over the stream")  # once, not at every takeover
    assert f"another agent with device id {DEVICE} took over the stream" in told
    assert "two agents share this id?" in told
