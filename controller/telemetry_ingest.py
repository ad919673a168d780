"""Group commit for telemetry: concurrent ReportTelemetry calls share one transaction.

A transaction per call caps ingest at the database's commit rate and spends most of
each call on per-transaction overhead (SQLite takes one writer at a time). Here calls
queue their windows; whenever no commit is running, one starts and stores everything
queued so far in one transaction (``Store.store_telemetry_batches``). Each caller is
answered with its device's highest stored seq only after that commit, so an ack still
means "on disk" and at-least-once delivery across a controller restart holds. While a
commit runs the next calls queue up, so commits grow with load without a timer adding
latency when the fleet is quiet.

A commit that fails (one device's windows refused, say) is retried in halves until each
failing caller stands alone: the others are stored and acknowledged, and only the caller
whose own batch fails hears why. k failing callers among n cost O(k log n) transactions,
not n, so a device that keeps sending refused batches cannot take group commit away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from controller.errors import FleetError, not_found
from controller.records import TelemetryWindow
from controller.store import Store

log = logging.getLogger(__name__)

MAX_WINDOWS_PER_COMMIT = 10_000  # a caller's batch is never split; this bounds one commit


@dataclass
class _Pending:
    device_id: str
    windows: Sequence[TelemetryWindow]
    done: asyncio.Future[int]


class TelemetryIngest:
    """Stores telemetry batches for one event loop, many callers per transaction."""

    def __init__(self, store: Store, max_windows_per_commit: int = MAX_WINDOWS_PER_COMMIT) -> None:
        self._store = store
        self._max_windows = max_windows_per_commit
        self._queue: list[_Pending] = []
        self._committing: asyncio.Task[None] | None = None  # held: the loop keeps weak refs
        self.commits = 0  # transactions so far (windows per commit tells how well it groups)

    async def store(self, device_id: str, windows: Sequence[TelemetryWindow]) -> int:
        """Store ``windows`` (validated) of ``device_id``; return its highest stored seq
        once they are committed. NOT_FOUND when the device is not registered."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(device_id, windows, done))
        if self._committing is None:
            self._committing = asyncio.ensure_future(self._drain())
        # A cancelled caller (client deadline) cancels only its own future: the commit
        # runs in its own task for the others (and its windows may still be stored).
        return await done

    async def close(self) -> None:
        """Wait for the commit in progress (the server stops after its calls finished)."""
        if self._committing is not None:
            await asyncio.shield(self._committing)

    async def _drain(self) -> None:
        try:
            while self._queue:
                await self._commit(self._take())
        finally:
            self._committing = None

    def _take(self) -> list[_Pending]:
        taken, windows = 0, 0
        for pending in self._queue:
            if taken and windows + len(pending.windows) > self._max_windows:
                break
            taken += 1
            windows += len(pending.windows)
        group, self._queue = self._queue[:taken], self._queue[taken:]
        return group

    async def _commit(self, group: list[_Pending]) -> None:
        batches: dict[str, list[TelemetryWindow]] = {}
        for pending in group:
            batches.setdefault(pending.device_id, []).extend(pending.windows)
        try:
            highest = await asyncio.to_thread(self._store.store_telemetry_batches, batches)
        except Exception as exc:
            if len(group) > 1:  # find whose batch fails: the rest must not fail with it
                log.debug(
                    "storing telemetry of %d device(s) failed (%s); retrying in halves",
                    len(batches),
                    exc,
                )
                half = len(group) // 2
                await self._commit(group[:half])
                await self._commit(group[half:])
                return
            if not isinstance(exc, FleetError):  # a refusal is the caller's to hear
                log.warning("storing telemetry of device %s failed: %s", group[0].device_id, exc)
            if not group[0].done.done():
                group[0].done.set_exception(exc)
            return
        self.commits += 1
        for pending in group:
            if pending.done.done():
                continue
            if pending.device_id in highest:
                pending.done.set_result(highest[pending.device_id])
            else:
                pending.done.set_exception(
                    not_found(
                        f"device {pending.device_id!r} is not registered; register first "
                        "(AgentService.Register)"
                    )
                )
