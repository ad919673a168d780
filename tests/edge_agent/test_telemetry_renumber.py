"""An agent whose state directory was lost or restored from a backup, against the real
controller: the windows it numbers afresh under its device id are all stored.

With mutual TLS a device's certificate pins its id, so a device re-provisioned after its
SD card died reports under the old id with a new telemetry queue. That queue numbers from
unix ms x 1000 as it is made, about 0 on a clock still in 1970 (no RTC, before NTP):
the seqs may be ones the controller holds from the device's earlier life, and it skips
those as already stored. The sender asks for the controller's highest seq as a session
starts and the queue numbers above it.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import pytest

from edge_agent.hardware import collect
from edge_agent.telemetry_queue import TelemetryQueue
from edge_agent.telemetry_sender import SendPlan, send_forever
from protos import fleet_pb2
from tests.controller.helpers import catalogue
from tests.edge_agent.test_telemetry_delivery import (
    DEVICE,
    SHA,
    drained,
    stored,
    sync_loop,
    windows,
)
from tests.support.controller import Controller, eventually, running_controller

BOOT_SEQ = 12_000_000  # the first seq of a queue made 12 s after 1970 (unix ms x 1000)
PLAN = SendPlan(device_id=DEVICE, batch=3, poll_s=0.02, rpc_timeout_s=10)


def jump_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "edge_agent.telemetry_queue" and "which this agent never sent" in r.message
    ]


async def send_all(controller: Controller, queue: TelemetryQueue) -> None:
    """The agent's sender, as one session runs it, until the queue is empty."""
    sender = asyncio.create_task(send_forever(controller.agent, queue, PLAN))
    try:
        await eventually("the queue to drain", lambda: drained(queue))
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


def test_a_re_provisioned_agent_has_every_window_stored_though_its_seqs_were_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.telemetry_queue")

    async def main() -> None:
        async with running_controller(tmp_path / "controller") as controller:
            catalogue(controller.config.database_url, "motions", SHA)
            await controller.agent.Register(
                fleet_pb2.RegisterRequest(
                    device_id=DEVICE, device_class="home-hub", hardware=collect().to_proto()
                ),
                timeout=10,
            )
            # its first life: a queue made 12 s after 1970, four windows sent
            first = TelemetryQueue(tmp_path / "sd-card-1", clock=lambda: 12.0)
            assert first.append(windows(4)) == list(range(BOOT_SEQ, BOOT_SEQ + 4))
            await send_all(controller, first)
            first.close()
            assert jump_warnings(caplog) == []

            # a new card, the same boot time: five windows queued with the same seqs and
            # more, before the controller is reached
            second = TelemetryQueue(tmp_path / "sd-card-2", clock=lambda: 12.0)
            assert second.append(windows(5, first_count=10)) == list(range(BOOT_SEQ, BOOT_SEQ + 5))
            await send_all(controller, second)
            assert second.append(windows(1, first_count=20)) == [BOOT_SEQ + 9]
            await send_all(controller, second)
            second.close()

            rows = stored(controller.data_dir)
            assert [s.seq for s in rows] == list(range(BOOT_SEQ, BOOT_SEQ + 10))
            assert [s.count for s in rows] == [1, 2, 3, 4, *range(10, 15), 20]  # none lost
            (warning,) = jump_warnings(caplog)  # said once, with what it did
            assert f"up to seq {BOOT_SEQ + 3}" in warning
            assert "5 queued windows not yet sent renumbered" in warning

    asyncio.run(main())


def test_a_state_directory_restored_from_a_backup_numbers_above_what_was_sent_since(
    tmp_path: Path,
) -> None:
    """The real SyncLoop: the restored queue's next seqs were sent after the backup."""
    state, restored, backup = tmp_path / "agent", tmp_path / "restored", tmp_path / "backup"

    async def main() -> None:
        async with running_controller(tmp_path / "controller") as controller:
            catalogue(controller.config.database_url, "motions", SHA)
            async with sync_loop(state, controller.address) as queue:
                sent = await asyncio.to_thread(queue.append, windows(3))
                await eventually("the first windows to be sent", lambda: drained(queue))
            shutil.copytree(state, backup)  # the queue is closed: its file is whole
            async with sync_loop(state, controller.address) as queue:
                sent += await asyncio.to_thread(queue.append, windows(3, first_count=10))
                await eventually("the next windows to be sent", lambda: drained(queue))
            shutil.copytree(backup, restored)
            async with sync_loop(restored, controller.address) as queue:
                await asyncio.to_thread(queue.append, windows(3, first_count=20))
                await eventually("the windows after the restore", lambda: drained(queue))
            rows = stored(controller.data_dir)
            # each once, in order: the restored queue's windows numbered above all
            assert [s.count for s in rows] == [1, 2, 3, 10, 11, 12, 20, 21, 22]
            assert [s.seq for s in rows[:6]] == sent

    asyncio.run(main())


def test_a_first_seq_of_0_is_a_window_not_yet_sent(tmp_path: Path) -> None:
    """A queue made at 1970 exactly numbers from 0, which the mark of what was sent must
    not take for sent: the controller's seq 5 moves it, not deletes it."""
    queue = TelemetryQueue(tmp_path, clock=lambda: 0.0)
    try:
        assert queue.append(windows(2)) == [0, 1]
        queue.number_above(5)
        assert [w.seq for w in queue.windows()] == [6, 7]
        assert [w.count for w in queue.windows()] == [1, 2]
        assert [w.seq for w in queue.next_batch(1)] == [6]
        assert queue.acknowledge(6) == 1  # the usual acknowledgement: deleted, not moved
        assert [w.seq for w in queue.windows()] == [7]
        assert queue.append(windows(1)) == [8]
    finally:
        queue.close()
