"""Concurrency bounds the controller enforces itself (grpc.aio's own limit can be bypassed)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from controller.errors import ErrorCode, FleetError


class RpcLimits:
    """Short RPCs queue for one of a fixed number of slots; watch streams are counted apart.

    A watch stream lives as long as its device is online, so it must not hold a slot that
    short calls wait for; past ``max_watch_streams`` a new stream is refused at once.
    """

    def __init__(self, max_concurrent_rpcs: int, max_watch_streams: int) -> None:
        self._slots = asyncio.Semaphore(max_concurrent_rpcs)
        self._max_watch = max_watch_streams
        self._watching = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._slots:
            yield

    @contextlib.asynccontextmanager
    async def watch_slot(self) -> AsyncIterator[None]:
        if self._watching >= self._max_watch:
            raise FleetError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"this controller already serves {self._watching} watch streams "
                f"(at most {self._max_watch}); retry later or use another replica",
            )
        self._watching += 1
        try:
            yield
        finally:
            self._watching -= 1

    @property
    def watch_streams(self) -> int:
        return self._watching
