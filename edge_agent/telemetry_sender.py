"""Send the queued telemetry windows while the sync session is up.

Oldest first, in batches; only what the controller acknowledged is deleted. A lost
connection ends the session (the sync loop reconnects with backoff and the windows stay
queued); a batch the controller refuses as invalid is retried one window at a time so
only the window at fault is dropped, and the drop is counted (telemetry_queue).

Each session starts by asking the controller for the highest seq it holds of this device
(an empty batch): an agent whose state directory was lost or restored from a backup may
give its windows seqs the controller holds from before, and they would be skipped as
duplicates. The queue then numbers above it (TelemetryQueue.number_above); every
acknowledgement is held to the same test, should those seqs overtake ours later.

Refusals are logged sparingly (RefusalLog): a device whose clock runs ahead has every
window refused, and one ERROR per window forever would bury the rest of its log. The
first refusal of a kind is logged, then at most one line a minute with how many more.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from edge_agent.fetch import CONNECTION_LOST
from edge_agent.telemetry_queue import TelemetryQueue
from protos import fleet_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendPlan:
    device_id: str
    batch: int
    poll_s: float
    rpc_timeout_s: float


SUMMARY_INTERVAL_S = 60.0
MAX_KINDS = 32  # refusal kinds remembered at once; the oldest is forgotten beyond
_NUMBER = re.compile(r"\d+")


@dataclass
class _Kind:
    example: str  # the latest refusal's details, shown in the summary
    logged_at: float  # when a line was last logged for this kind
    unlogged: int = 0  # refusals since that line


class RefusalLog:
    """Logs refused windows: the first of a kind, then a count at most once per interval.

    The kind is the controller's detail text with its numbers masked (the window's seq,
    index and timestamps differ every time): it only groups log lines, it decides nothing.
    The exact count of dropped windows is the queue's (telemetry_rejected_windows).
    """

    def __init__(
        self,
        interval_s: float = SUMMARY_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}

    def refused(self, seq: int, details: str) -> None:
        now = self._clock()
        key = _NUMBER.sub("#", details)
        kind = self._kinds.get(key)
        if kind is None:
            if len(self._kinds) >= MAX_KINDS:
                oldest = next(iter(self._kinds))
                self._summarise(oldest, force=True)
                del self._kinds[oldest]
            self._kinds[key] = _Kind(details, now)
            log.error(
                "controller refused telemetry window %d as invalid (%s); dropping it (more "
                "windows refused for the same reason are counted, logged at most once every "
                "%.0f s)",
                seq,
                details,
                self.interval_s,
            )
            return
        kind.example = details
        kind.unlogged += 1
        self._summarise(key)

    def flush(self) -> None:
        """Log the counts that are due (the sender calls it as it goes)."""
        for key in list(self._kinds):
            self._summarise(key)

    def _summarise(self, key: str, *, force: bool = False) -> None:
        kind = self._kinds[key]
        now = self._clock()
        if not kind.unlogged or (not force and now - kind.logged_at < self.interval_s):
            return
        log.error(
            "%d more telemetry windows refused for the same reason in the last %.0f s, and "
            "dropped (latest: %s)",
            kind.unlogged,
            now - kind.logged_at,
            kind.example,
        )
        kind.logged_at, kind.unlogged = now, 0


class Outcome(enum.Enum):
    SENT = "sent"  # acknowledged and deleted: send the next batch at once
    IDLE = "idle"  # nothing queued, or no progress: wait before looking again
    REFUSED = "refused"  # the controller refused the batch as invalid


async def send_forever(
    stub: Any, queue: TelemetryQueue, plan: SendPlan, refusals: RefusalLog | None = None
) -> None:
    """Drain the queue, then look again every ``poll_s``; raises when the connection is lost."""
    refusals = refusals if refusals is not None else RefusalLog()
    await number_above_controller(stub, queue, plan)
    limit = plan.batch
    while True:
        refusals.flush()
        outcome = await send_batch(stub, queue, plan, limit, refusals)
        if outcome is Outcome.REFUSED:
            # a refused batch is retried window by window; once the one at fault is
            # dropped, full batches resume
            limit = 1 if limit > 1 else plan.batch
        elif outcome is Outcome.IDLE:
            await asyncio.sleep(plan.poll_s)


async def number_above_controller(stub: Any, queue: TelemetryQueue, plan: SendPlan) -> None:
    """Ask for the highest seq the controller holds of this device (an empty batch stores
    nothing) and let the queue number above it if it is above ours; raises when the
    connection is lost. Any other error is only logged: the sends then go on as before
    (a duplicate of an older seq is caught at its acknowledgement, losing that batch)."""
    request = fleet_pb2.TelemetryBatch(device_id=plan.device_id)
    try:
        ack: fleet_pb2.TelemetryAck = await stub.ReportTelemetry(
            request, timeout=plan.rpc_timeout_s
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() in CONNECTION_LOST:
            raise
        log.warning(
            "could not ask the controller for the highest telemetry seq it holds of this "
            "device (%s: %s); sending without",
            exc.code().name,
            exc.details(),
        )
        return
    await asyncio.to_thread(queue.number_above, ack.highest_seq)


async def send_batch(
    stub: Any,
    queue: TelemetryQueue,
    plan: SendPlan,
    limit: int,
    refusals: RefusalLog | None = None,
) -> Outcome:
    batch = await asyncio.to_thread(queue.next_batch, limit)
    if not batch:
        return Outcome.IDLE
    request = fleet_pb2.TelemetryBatch(device_id=plan.device_id, windows=batch)
    try:
        ack: fleet_pb2.TelemetryAck = await stub.ReportTelemetry(
            request, timeout=plan.rpc_timeout_s
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() in CONNECTION_LOST:
            raise
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            if len(batch) == 1:
                await asyncio.to_thread(queue.reject, [batch[0].seq])
                (refusals or RefusalLog()).refused(batch[0].seq, exc.details() or "")
            return Outcome.REFUSED
        log.error("controller failed to store telemetry (%s: %s)", exc.code().name, exc.details())
        return Outcome.IDLE
    await asyncio.to_thread(queue.acknowledge, ack.highest_seq)
    if ack.highest_seq < batch[-1].seq:
        log.warning(
            "controller acknowledged telemetry up to seq %d of %d..%d; resending the rest",
            ack.highest_seq,
            batch[0].seq,
            batch[-1].seq,
        )
        return Outcome.IDLE
    return Outcome.SENT
