"""Send the queued telemetry windows while the sync session is up.

Oldest first, in batches; only what the controller acknowledged is deleted. A lost
connection ends the session (the sync loop reconnects with backoff and the windows stay
queued); a batch the controller refuses as invalid is retried one window at a time so
only the window at fault is dropped, and the drop is counted (telemetry_queue).
"""

from __future__ import annotations

import asyncio
import enum
import logging
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


class Outcome(enum.Enum):
    SENT = "sent"  # acknowledged and deleted: send the next batch at once
    IDLE = "idle"  # nothing queued, or no progress: wait before looking again
    REFUSED = "refused"  # the controller refused the batch as invalid


async def send_forever(stub: Any, queue: TelemetryQueue, plan: SendPlan) -> None:
    """Drain the queue, then look again every ``poll_s``; raises when the connection is lost."""
    limit = plan.batch
    while True:
        outcome = await send_batch(stub, queue, plan, limit)
        if outcome is Outcome.REFUSED:
            # a refused batch is retried window by window; once the one at fault is
            # dropped, full batches resume
            limit = 1 if limit > 1 else plan.batch
        elif outcome is Outcome.IDLE:
            await asyncio.sleep(plan.poll_s)


async def send_batch(stub: Any, queue: TelemetryQueue, plan: SendPlan, limit: int) -> Outcome:
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
                log.error(
                    "controller refused telemetry window %d as invalid (%s); dropping it",
                    batch[0].seq,
                    exc.details(),
                )
                await asyncio.to_thread(queue.reject, [batch[0].seq])
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
