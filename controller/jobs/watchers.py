"""In-process wake-ups for WatchCompressionJob streams when a job changes.

Only a hint, like assignment watches: a watcher also re-reads the database every few
seconds, so it follows a job that another replica runs too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class JobSubscription:
    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self.closed = False
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()

    async def wait(self, within: float) -> None:
        """Return when woken or after ``within`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), within)
        self._event.clear()


class JobWatchers:
    def __init__(self) -> None:
        self._subscriptions: set[JobSubscription] = set()
        self._closed = False

    @contextlib.contextmanager
    def subscribe(self, job_id: int) -> Iterator[JobSubscription]:
        sub = JobSubscription(job_id)
        sub.closed = self._closed
        self._subscriptions.add(sub)
        try:
            yield sub
        finally:
            self._subscriptions.discard(sub)

    def notify(self, job_id: int) -> None:
        for sub in self._subscriptions:
            if sub.job_id == job_id:
                sub.wake()

    def close(self) -> None:
        """Shutting down: every stream sends what it has and ends."""
        self._closed = True
        for sub in self._subscriptions:
            sub.closed = True
            sub.wake()
