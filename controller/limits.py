"""Concurrency bounds the controller enforces itself (grpc.aio's own limit can be bypassed).

Each kind of call has a pool of its own, so one kind held open cannot starve another:
short calls queue for a fixed number of slots; watch streams (assignment and health) are
counted apart, with a cap per health client; downloads have their own pool with a cap
per device (``DownloadPool``, held by the fetch handler); client-streamed uploads
(AddModel, StartCompression) have theirs with a cap per client and a bound on how long
one may last (``UploadPool``, held by the upload handlers); health ``Check`` takes no
slot at all, so a load balancer probing a busy controller still gets its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from artifact.tls import peer_identity
from controller.access import Access
from controller.errors import ErrorCode, FleetError

if TYPE_CHECKING:
    from controller.config import ControllerConfig

M = TypeVar("M")


def _exhausted(message: str) -> FleetError:
    return FleetError(ErrorCode.RESOURCE_EXHAUSTED, message)


class RpcLimits:
    """Short RPCs queue for one of a fixed number of slots; watch streams are counted apart.

    A watch stream lives as long as its device is online, so it must not hold a slot that
    short calls wait for; past ``max_watch_streams`` a new stream is refused at once, and
    past ``max_health_watches_per_peer`` from one health client too.
    """

    def __init__(
        self,
        max_concurrent_rpcs: int,
        max_watch_streams: int,
        *,
        max_health_watches_per_peer: int,
        uploads: UploadPool,
    ) -> None:
        self._slots = asyncio.Semaphore(max_concurrent_rpcs)
        self._max_watch = max_watch_streams
        self._watching = 0
        self._max_per_peer = max_health_watches_per_peer
        self._peer_watches: dict[str, int] = {}
        self.uploads = uploads

    @classmethod
    def from_config(cls, config: ControllerConfig) -> RpcLimits:
        return cls(
            config.max_concurrent_rpcs,
            config.max_watch_streams,
            max_health_watches_per_peer=config.max_health_watches_per_peer,
            uploads=UploadPool(
                config.max_upload_streams,
                config.max_uploads_per_peer,
                idle_seconds=config.upload_idle_timeout_seconds,
                min_bytes_per_second=config.upload_min_bytes_per_second,
                grace_seconds=config.upload_rate_grace_seconds,
            ),
        )

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._slots:
            yield

    @contextlib.asynccontextmanager
    async def watch_slot(self) -> AsyncIterator[None]:
        if self._watching >= self._max_watch:
            raise _exhausted(
                f"this controller already serves {self._watching} watch streams "
                f"(at most {self._max_watch}, max_watch_streams); retry later or use another "
                "replica"
            )
        self._watching += 1
        try:
            yield
        finally:
            self._watching -= 1

    @contextlib.contextmanager
    def health_watch_slot(self, peer: str) -> Iterator[None]:
        """One of ``peer``'s few health Watch streams (a load balancer needs one or two)."""
        held = self._peer_watches.get(peer, 0)
        if held >= self._max_per_peer:
            raise _exhausted(
                f"this client already holds {held} health Watch streams (at most "
                f"{self._max_per_peer}, max_health_watches_per_peer); reuse one, or use Check"
            )
        self._peer_watches[peer] = held + 1
        try:
            yield
        finally:
            left = self._peer_watches[peer] - 1
            if left:
                self._peer_watches[peer] = left
            else:
                del self._peer_watches[peer]

    @property
    def watch_streams(self) -> int:
        return self._watching


class DownloadPool:
    """Artifact downloads: at most ``max_streams`` at once, ``max_per_device`` per device,
    and no chunk write waiting more than ``write_seconds`` for its client.

    Refused at once past either (an agent retries with backoff), never queued: a download
    lasts as long as its client reads, so a queue would wait behind stalled readers.
    A stream whose chunk write timed out frees its pool slot when its handler ends, but
    still counts for its device until the transport lets go of that chunk (the client
    reads again, cancels, or its connection closes): gRPC keeps the unsent chunk in
    memory until then, and the per-device cap keeps that memory bounded per device.
    """

    def __init__(self, max_streams: int, max_per_device: int, write_seconds: float) -> None:
        self._max_streams = max_streams
        self._write_seconds = write_seconds
        self._max_per_device = max_per_device
        self._streams = 0
        self._per_device: dict[str, int] = {}
        self._pending: set[asyncio.Future[Any]] = set()  # held: the loop keeps weak refs

    @contextlib.contextmanager
    def lease(self, device_id: str) -> Iterator[DownloadLease]:
        held = self._per_device.get(device_id, 0)
        if held >= self._max_per_device:
            raise _exhausted(
                f"device {device_id} already has {held} downloads open (at most "
                f"{self._max_per_device}, max_fetches_per_device; a stream whose reader "
                "stopped counts until it is cancelled or its connection closes); finish or "
                "cancel one, then retry"
            )
        if self._streams >= self._max_streams:
            raise _exhausted(
                f"this controller already serves {self._streams} downloads (at most "
                f"{self._max_streams}, max_fetch_streams); retry later or use another replica"
            )
        self._streams += 1
        self._per_device[device_id] = held + 1
        lease = DownloadLease(self._write_seconds)
        try:
            yield lease
        finally:
            self._streams -= 1
            if lease.unsent is None:
                self._release_device(device_id)
            else:  # run soon if the chunk went out meanwhile
                self._pending.add(lease.unsent)
                lease.unsent.add_done_callback(lambda unsent: self._unsent_done(unsent, device_id))

    def _unsent_done(self, unsent: asyncio.Future[Any], device_id: str) -> None:
        self._pending.discard(unsent)
        if not unsent.cancelled():
            unsent.exception()  # retrieved: the transport's failure is expected here
        self._release_device(device_id)

    def _release_device(self, device_id: str) -> None:
        left = self._per_device[device_id] - 1
        if left:
            self._per_device[device_id] = left
        else:
            del self._per_device[device_id]


class DownloadLease:
    """One download's hold on the pool; ``unsent`` is a write that outlived its timeout."""

    def __init__(self, write_seconds: float) -> None:
        self._write_seconds = write_seconds
        self.unsent: asyncio.Future[Any] | None = None

    async def write(self, sending: asyncio.Future[Any], what: str) -> None:
        """Wait a limited time for ``sending`` (one chunk handed to the client).

        Past it the download ends with DEADLINE_EXCEEDED; the write itself is left to the
        transport (cancelling it would not free the chunk) and keeps the device's count.
        """
        try:
            await asyncio.wait_for(asyncio.shield(sending), self._write_seconds)
        except TimeoutError:
            self.unsent = sending
            raise FleetError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"the client took no data for {self._write_seconds:g} s "
                f"(fetch_write_timeout_seconds) while {what} waited to be sent: the download "
                "was ended; resume it from the last byte received",
            ) from None
        except BaseException:
            sending.cancel()  # the call is going away (cancelled, revoked): drop the write
            raise


def peer_key(context: grpc.aio.ServicerContext[Any, Any], access: Access) -> str:
    """Who is calling, for a per-client cap: the certificate under mutual TLS, else the
    client's address without its port (each connection has a port of its own)."""
    if access.mtls:
        identity = peer_identity(context.auth_context())
        if identity is not None:  # authorize() already refused a missing or revoked one
            return f"certificate {identity.serial:x}"
    kind, _, address = str(context.peer()).partition(":")
    if kind in ("ipv4", "ipv6"):
        address = address.rpartition(":")[0]
    return f"{kind}:{address}"


class UploadPool:
    """Client-streamed uploads (AddModel, StartCompression): at most ``max_streams`` at
    once, ``max_per_peer`` per client, each bounded in time by its ``UploadLease``.

    Refused at once past either cap, never queued: an upload lasts as long as its client
    sends, so a queue would wait behind stalled senders. Uploads used to hold short-call
    slots, so 64 clients that sent a header and then nothing stopped every Register and
    listing for as long as they stayed open; here they hold only slots of this pool.
    """

    def __init__(
        self,
        max_streams: int,
        max_per_peer: int,
        *,
        idle_seconds: float,
        min_bytes_per_second: int,
        grace_seconds: float,
    ) -> None:
        self._max_streams = max_streams
        self._max_per_peer = max_per_peer
        self._idle_seconds = idle_seconds
        self._min_bytes_per_second = min_bytes_per_second
        self._grace_seconds = grace_seconds
        self._streams = 0
        self._per_peer: dict[str, int] = {}

    @contextlib.contextmanager
    def lease(self, peer: str, rpc_name: str) -> Iterator[UploadLease]:
        held = self._per_peer.get(peer, 0)
        if held >= self._max_per_peer:
            raise _exhausted(
                f"this client ({peer}) already has {held} uploads open (at most "
                f"{self._max_per_peer}, max_uploads_per_peer); let one finish or cancel it, "
                "then retry"
            )
        if self._streams >= self._max_streams:
            raise _exhausted(
                f"this controller already receives {self._streams} uploads (at most "
                f"{self._max_streams}, max_upload_streams); retry later or use another replica"
            )
        self._streams += 1
        self._per_peer[peer] = held + 1
        try:
            yield UploadLease(
                rpc_name, self._idle_seconds, self._min_bytes_per_second, self._grace_seconds
            )
        finally:
            self._streams -= 1
            left = self._per_peer[peer] - 1
            if left:
                self._per_peer[peer] = left
            else:
                del self._per_peer[peer]

    @property
    def streams(self) -> int:
        return self._streams


class UploadLease:
    """One upload's hold on the pool, and the pace its client must keep.

    Each message must come within ``idle_seconds`` of asking for it, and once
    ``grace_seconds`` have passed the bytes received must keep up with
    ``min_bytes_per_second`` on average: by ``grace + n / rate`` seconds after the start,
    ``n`` bytes must have arrived. The idle bound alone let a client that sends one byte
    every 59 s keep its upload open for ever; with both, an upload of N bytes lasts at most
    ``grace + N / rate`` seconds however it paces its messages.
    """

    def __init__(
        self, rpc_name: str, idle_seconds: float, min_bytes_per_second: int, grace_seconds: float
    ) -> None:
        self._rpc_name = rpc_name
        self._idle_seconds = idle_seconds
        self._min_bytes_per_second = min_bytes_per_second
        self._grace_seconds = grace_seconds
        self._started = asyncio.get_running_loop().time()
        self.received = 0

    def count(self, size: int) -> None:
        """``size`` more bytes of the upload arrived (they move its rate deadline on)."""
        self.received += size

    async def next(self, messages: AsyncIterator[M]) -> M | None:
        """The next message of the client stream (None at its end), within both bounds."""
        loop = asyncio.get_running_loop()
        due = self._started + self._grace_seconds + self.received / self._min_bytes_per_second
        until_due = due - loop.time()
        rate_bound = until_due < self._idle_seconds
        if until_due <= 0:
            raise self._too_slow(loop.time())
        try:
            async with asyncio.timeout(min(until_due, self._idle_seconds)):
                return await anext(messages, None)
        except TimeoutError:
            raise (self._too_slow(loop.time()) if rate_bound else self._quiet()) from None

    def _quiet(self) -> FleetError:
        return FleetError(
            ErrorCode.DEADLINE_EXCEEDED,
            f"the {self._rpc_name} stream sent nothing for {self._idle_seconds:g} s "
            "(upload_idle_timeout_seconds): the upload was ended and nothing was stored; "
            "send the messages without pausing",
        )

    def _too_slow(self, now: float) -> FleetError:
        return FleetError(
            ErrorCode.DEADLINE_EXCEEDED,
            f"the {self._rpc_name} stream sent {self.received} bytes in "
            f"{now - self._started:.0f} s, slower than upload_min_bytes_per_second "
            f"({self._min_bytes_per_second} bytes/s on average once the first "
            f"{self._grace_seconds:g} s, upload_rate_grace_seconds, have passed): the upload "
            "was ended and nothing was stored; send the bytes without pausing (an operator "
            "on a slow link can lower upload_min_bytes_per_second)",
        )
