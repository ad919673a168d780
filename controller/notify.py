"""In-process wake-ups for watch streams when an assignment changes.

Only a hint: every watcher also re-reads the database each heartbeat, so a change made
by another replica reaches it too, one heartbeat later at most.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from controller.records import AssignTarget, TargetKind


class Subscription:
    def __init__(self, device_id: str, device_class: str) -> None:
        self.device_id = device_id
        self.device_class = device_class
        self._event = asyncio.Event()
        self.closed = False

    def wake(self) -> None:
        self._event.set()

    async def wait(self, within: float) -> bool:
        """Wait until woken or ``within`` seconds pass; True when woken."""
        try:
            await asyncio.wait_for(self._event.wait(), within)
        except TimeoutError:
            return False
        self._event.clear()
        return True


class AssignmentNotifier:
    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()
        self._closed = False

    @contextlib.contextmanager
    def subscribe(self, device_id: str, device_class: str) -> Iterator[Subscription]:
        sub = Subscription(device_id, device_class)
        sub.closed = self._closed
        self._subscriptions.add(sub)
        try:
            yield sub
        finally:
            self._subscriptions.discard(sub)

    def notify(self, target: AssignTarget) -> int:
        """Wake the watchers the change may concern; returns how many were woken."""
        woken = 0
        for sub in self._subscriptions:
            if (target.kind is TargetKind.CLASS and sub.device_class == target.name) or (
                target.kind is TargetKind.DEVICE and sub.device_id == target.name
            ):
                sub.wake()
                woken += 1
        return woken

    def notify_all(self) -> int:
        """Wake every watcher (a change that is not an assignment's, such as a repaired
        blob, may concern any of them); returns how many were woken."""
        for sub in self._subscriptions:
            sub.wake()
        return len(self._subscriptions)

    def close(self) -> None:
        """Shutting down: every watcher ends its stream (agents reconnect elsewhere)."""
        self._closed = True
        for sub in self._subscriptions:
            sub.closed = True
            sub.wake()

    @property
    def watchers(self) -> int:
        return len(self._subscriptions)
