"""What edge agents ask of the controller, free of gRPC: register, watch, fetch, report.

Streams are pushed through a ``send`` callback, so the try/finally that records a
download (or ends a device's online lease) wraps the very awaits a cancel interrupts.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from artifact import energy_sources, histogram
from artifact.delta import DeltaError
from controller import validate
from controller.admin import in_thread
from controller.blobstore import BlobStore, CorruptBlobError
from controller.clock import unix_ms
from controller.config import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, ControllerConfig
from controller.deltas import DeltaCache, DroppedDelta, Payload
from controller.errors import ErrorCode, FleetError, invalid, not_found
from controller.fleet_classes import DeviceClassRegistry
from controller.integrity import CHECK_DISK, CORRUPT_EVENT
from controller.limits import DownloadPool
from controller.notify import AssignmentNotifier
from controller.records import (
    REFUSED_BOUNDS,
    REFUSED_CLOCK,
    REFUSED_ENERGY_SOURCE,
    REFUSED_MALFORMED,
    ArtifactRecord,
    Chunk,
    DesiredSet,
    DeviceRecord,
    DeviceRegistration,
    Encoding,
    FetchOutcome,
    FetchRequest,
    NewEvent,
    Outcome,
    RegisterResult,
    StatusUpdate,
    TelemetryRefusal,
    TelemetryWindow,
)
from controller.store import Store
from controller.telemetry_ingest import TelemetryIngest

log = logging.getLogger(__name__)

MAX_HELD = 256
MAX_SHORT_TEXT = 64
MAX_OS_TEXT = 256
MAX_REASON = 4096
MAX_WINDOWS_PER_BATCH = 1000
# The energy meters an agent names (edge_agent/meters.py), and no others: each value is a
# rollup row and a Prometheus series per class and artifact. An agent run with
# --emulate-slowdown F (demos, tests) names "<meter>*F" and reports latency, CPU time and
# energy F times what it measured; artifact.energy_sources holds the rule both sides use.
ENERGY_SOURCES = energy_sources.METERS
MAX_EMULATED_SLOWDOWN = energy_sources.MAX_EMULATED_SLOWDOWN
LEASE_HEARTBEATS = 3  # a device stays ONLINE this many heartbeats past its last refresh
# Two agents sharing one device id (a cloned device image: its certificate is cloned too)
# take the device's watch stream from each other for good. More than CONFLICT_REPLACEMENTS
# replacements within CONFLICT_WINDOW_S record one CONFLICT_EVENT, at most one per
# CONFLICT_EVENT_INTERVAL_S; meanwhile a re-registration adds no event
# (sql_store.register_device reads the event's quiet_until_unix_ms) and logs no warning.
CONFLICT_EVENT = "device.conflict"
CONFLICT_REPLACEMENTS = 3
CONFLICT_WINDOW_S = 60.0
CONFLICT_EVENT_INTERVAL_S = 600.0
# Refused telemetry (AgentHandlers._refused): every call counted, one event an hour per
# device and reason; the rate limiter remembers this many (device, reason) pairs at most.
REFUSAL_EVENT = "telemetry.refused"
REFUSAL_EVENT_INTERVAL_S = 3600.0
MAX_REFUSAL_KEYS = 100_000
# A corrupt blob: one CORRUPT_EVENT (controller/integrity.py) when it is found, none for
# each fetch refused while it stays so. A blob gone from the store, or one the file
# system would not read (an I/O error): each fetch ends DATA_LOSS at once (nothing
# streams), so one event per blob an hour and controller process says it, not one per
# fetch.
MISSING_EVENT = "blob.missing"
UNREADABLE_EVENT = "blob.unreadable"
BLOB_EVENT_INTERVAL_S = 3600.0
MAX_BLOB_EVENT_KEYS = 10_000
# Blob reads and hashing run on threads of their own (ControllerConfig.blob_read_threads),
# never queued before the database calls every other RPC waits for (a blob hashed whole
# reads ~1 GB/s of disk and CPU); so do delta encodes (ControllerConfig.delta_threads).
# Devices x payloads whose download progress is remembered (see _UpdateProgress), and
# whose artifact.fetch events are summarised (see _FetchEvents).
MAX_PROGRESS_KEYS = 100_000
FETCH_EVENT = "artifact.fetch"
FETCH_EVENT_INTERVAL_S = 600.0
# A window is the device's own account, so it is held to what a real one can say: it
# cannot end in the future (beyond a device clock's drift), and it cannot count more
# inferences than its length allows, or other than its histogram holds. One device could
# otherwise fill its class's future budget slices, or outweigh every other device.
MAX_CLOCK_AHEAD_MS = 5 * 60 * 1000
# Nor can it start before a year ago: a device without a real-time clock that boots in
# 1970 would otherwise report windows decades long, whose counts the per-millisecond
# bound cannot limit and whose end falls in the current budget slice.
MAX_WINDOW_AGE_MS = 365 * 24 * 3600 * 1000
MAX_INFERENCES_PER_MS = 1000  # a million a second: far above any device's real rate
# Its CPU time and energy are held to what hardware can spend over the window, or two
# windows of 1e308 joules make the fleet's running sum +Inf for good. An agent opens a
# window when an inference ends, so that first inference ran before the start: the span
# allowed is the window's length plus the longest latency the histogram resolves.
MAX_CORES = 256  # CPU seconds per second: more cores than any edge device has
MAX_WATTS = 10_000.0  # joules per second: a home device draws under 1 kW; 10 kW is a rack
FIRST_INFERENCE_MS = 100_000  # artifact.histogram's last bucket bound (100 s)

SendSet = Callable[[DesiredSet], Awaitable[None]]
SendChunk = Callable[[Chunk], Awaitable[None]]
P = ParamSpec("P")
T = TypeVar("T")


class _Unreadable(Exception):
    """An OSError of the blob store's file system while a blob was read: the disk's
    fault (or the operator's), not a bug, so it never becomes INTERNAL."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _UpdateProgress:
    """How far each device got through each payload since its last completed update, as
    far as this controller's calls sent it (in memory, bounded: the least recently moved
    go first). A call that sends the last byte completes an update only when the bytes
    before its offset went out too (it started at 0, or the device's earlier calls
    reached its offset), so calls resumed near the end count no update they did not send.
    """

    def __init__(self, max_keys: int = MAX_PROGRESS_KEYS) -> None:
        self._max = max_keys
        self._reached: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()

    def ended(self, device_id: str, payload_sha256: str, offset: int, sent: int, end: bool) -> bool:
        """Count a call that sent ``sent`` bytes from ``offset`` (``end``: the payload's
        last byte among them); True when it completed an update."""
        key = (device_id, payload_sha256)
        before = self._reached.pop(key, 0)
        covered = offset <= before
        if covered and end:
            return True  # the next update of this payload starts from byte 0 again
        reached = max(before, offset + sent) if covered else before
        if reached:
            self._reached[key] = reached
            while len(self._reached) > self._max:
                self._reached.popitem(last=False)
        return False


@dataclasses.dataclass
class _Unrecorded:
    """FetchArtifact calls of one (device, payload) counted since its last event, none of
    them with an event of its own: the next event of that device and payload says them."""

    calls: int = 0
    bytes_sent: int = 0
    updates: int = 0  # calls among them that completed an update


@dataclasses.dataclass
class _FetchKey:
    completion_at: float | None = None  # time.monotonic() of its last completion's event
    other_at: float | None = None  # ... and of its last other call's event
    unrecorded: _Unrecorded = dataclasses.field(default_factory=_Unrecorded)


class _FetchEvents:
    """Which FetchArtifact calls get an ``artifact.fetch`` event of their own.

    Every call is counted, byte for byte, in the download sums (``Store.record_fetch``,
    the ``homefleet_update_*`` counters); an event per call, though, let one device add
    rows as fast as it could open calls (a resumed 1-byte fetch costs it nothing: ~130
    rows a second). What an operator reads the events for is an update arriving, and a
    transfer that starts, breaks or keeps breaking. So, per (device, payload), within
    ``interval_s``:

    - the first call that completes an update gets its event. Each new update is a new
      payload, so every update's completion is recorded; only a device downloading the
      same payload whole again and again (an agent in a loop) has the repeats summed up;
    - the first other call gets its event (a transfer started, or broke);
    - every further call is summed up in the next event of the same device and payload
      (``calls_summarised``, ``bytes_summarised``, ``updates_summarised``): a hundred
      retries of a broken download are one row that says so, not a hundred rows.

    A device thus adds at most two events per payload it may fetch (its assigned
    artifacts, in full or as a delta from one of the model's own) per interval, whatever
    it does. Kept in memory and bounded (the least recently moved keys go first): calls
    summed after a key's last event, by a device that never calls again, or before a
    controller restart, are in the sums only.
    """

    def __init__(
        self,
        interval_s: float = FETCH_EVENT_INTERVAL_S,
        max_keys: int = MAX_PROGRESS_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval_s
        self._max = max_keys
        self._clock = clock
        self._keys: collections.OrderedDict[tuple[str, str], _FetchKey] = collections.OrderedDict()

    def ended(
        self, device_id: str, payload_sha256: str, sent: int, completed: bool
    ) -> _Unrecorded | None:
        """Count a call; the earlier calls it sums up when it gets an event, else None."""
        key = (device_id, payload_sha256)
        state = self._keys.pop(key, None) or _FetchKey()
        now = self._clock()
        last = state.completion_at if completed else state.other_at
        summed = None
        if last is None or now - last >= self._interval:
            summed, state.unrecorded = state.unrecorded, _Unrecorded()
            if completed:
                state.completion_at = now
            else:
                state.other_at = now
        else:
            state.unrecorded.calls += 1
            state.unrecorded.bytes_sent += sent
            state.unrecorded.updates += completed
        self._keys[key] = state
        while len(self._keys) > self._max:
            self._keys.popitem(last=False)
        return summed


class _Quiet:
    """Keys whose event was recorded lately: one event per key per interval (bounded)."""

    def __init__(self, interval_s: float, max_keys: int) -> None:
        self._interval = interval_s
        self._max = max_keys
        self._last: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()

    def due(self, key: tuple[str, str]) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self._max:
            self._last.popitem(last=False)
        return True


class _WatchStream:
    """A device's current WatchAssignments stream, which a newer one may replace."""

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.replaced = False

    def replace(self) -> None:
        self.replaced = True
        self.task.cancel()


class _Handovers:
    """When a device's watch stream was last replaced, and its conflict last recorded."""

    def __init__(self) -> None:
        self.times: collections.deque[float] = collections.deque(maxlen=CONFLICT_REPLACEMENTS + 1)
        self.recorded_at: float | None = None  # time.monotonic() of the last conflict event

    def quiet(self, now: float) -> bool:
        """Whether a conflict event recorded lately already says what each stream would."""
        return self.recorded_at is not None and now - self.recorded_at < CONFLICT_EVENT_INTERVAL_S

    def replaced(self, now: float) -> bool:
        """Count a replacement; True when it makes a conflict to record now."""
        self.times.append(now)
        flapping = len(self.times) == self.times.maxlen and now - self.times[0] <= CONFLICT_WINDOW_S
        if not flapping or self.quiet(now):
            return False
        self.recorded_at = now
        return True


class AgentHandlers:
    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        config: ControllerConfig,
        notifier: AssignmentNotifier,
        classes: DeviceClassRegistry | None = None,
    ) -> None:
        self._classes = classes or DeviceClassRegistry()
        self._store = store
        self._blobs = blobs
        self._config = config
        self._notifier = notifier
        self._open_watches: dict[str, int] = {}
        self._watch_streams: dict[str, _WatchStream] = {}  # the one current stream per device
        self._handovers: dict[str, _Handovers] = {}  # devices whose stream was ever replaced
        self._downloads = DownloadPool(
            config.max_fetch_streams,
            config.max_fetches_per_device,
            config.fetch_write_timeout_seconds,
        )
        self._bookkeeping: set[asyncio.Task[None]] = set()  # held: the loop keeps weak refs
        self._blob_reads = ThreadPoolExecutor(
            config.blob_read_threads, thread_name_prefix="blob-read"
        )
        self._delta_encodes = ThreadPoolExecutor(
            config.delta_threads, thread_name_prefix="delta-encode"
        )
        self._deltas = DeltaCache(blobs, encodes=self._delta_encodes, reads=self._blob_reads)
        self._progress = _UpdateProgress()
        self._fetch_events = _FetchEvents()
        self._blob_events = _Quiet(BLOB_EVENT_INTERVAL_S, MAX_BLOB_EVENT_KEYS)
        self._telemetry = TelemetryIngest(store)  # group commit: many calls, one transaction
        # (device, reason) -> when its last telemetry.refused event was recorded
        self._refusal_events: collections.OrderedDict[tuple[str, str], float] = (
            collections.OrderedDict()
        )

    @property
    def heartbeat_seconds(self) -> int:
        return self._config.heartbeat_seconds

    async def _device(self, device_id: str) -> DeviceRecord:
        device = await in_thread(self._store.get_device, device_id)
        if device is None:
            raise not_found(
                f"device {device_id!r} is not registered; register first (AgentService.Register)"
            )
        return device

    # ---------------------------------------------------------------- register
    async def register(self, registration: DeviceRegistration) -> RegisterResult:
        reg = registration
        validate.name(reg.device_id, "device_id")
        validate.name(reg.device_class, "device_class")
        hw = reg.hardware
        if not hw.arch:
            raise invalid("hardware.arch is required (platform.machine(), e.g. 'x86_64')")
        validate.text(hw.arch, "hardware.arch", MAX_SHORT_TEXT)
        validate.text(hw.onnxruntime_version, "hardware.onnxruntime_version", MAX_SHORT_TEXT)
        validate.text(hw.os, "hardware.os", MAX_OS_TEXT)
        validate.int_range(hw.memory_bytes, "hardware.memory_bytes", 0, validate.MAX_INT64)
        validate.text(reg.agent_version, "agent_version", MAX_SHORT_TEXT)
        if len(reg.held) > MAX_HELD:
            raise invalid(f"held lists {len(reg.held)} artifacts; at most {MAX_HELD} are accepted")
        active: set[str] = set()
        for i, held in enumerate(reg.held):
            validate.name(held.model_name, f"held[{i}].model_name")
            validate.digest(held.sha256, f"held[{i}].sha256")
            if held.active:
                if held.model_name in active:
                    raise invalid(
                        f"held marks two artifacts of model {held.model_name!r} active; "
                        "a device serves one artifact per model"
                    )
                active.add(held.model_name)
        result = await in_thread(self._store.register_device, reg)
        declared = self._classes.names()
        if declared and reg.device_class not in declared:
            warning = (
                f"device class {reg.device_class!r} is declared by no device-class file on this "
                f"controller (it has {', '.join(declared)}): no budgets are watched for it and "
                "no class assignment names it; a typo in --device-class?"
            )
            log.warning("device %s registered: %s", reg.device_id, warning)
            result = dataclasses.replace(result, warning=warning)
        if result.watched:
            handovers = self._handovers.get(reg.device_id)
            quiet = handovers is not None and handovers.quiet(time.monotonic())
            log.log(
                logging.DEBUG if quiet else logging.WARNING,  # its device.conflict said it
                "device %s registered while another connection still holds its watch lease: "
                "an agent that restarted or lost its link, or two agents sharing one device "
                "id (a cloned device image, certificate included: give each machine its own "
                "--device-id and certificate)",
                reg.device_id,
            )
        return result

    # ---------------------------------------------------------------- watch
    async def watch(self, device_id: str, send: SendSet) -> None:
        """Send the desired set now, on every change, and every heartbeat as a keepalive.

        One stream per device: a new one ends the one before (CANCELLED), so an agent that
        reconnects takes over at once, before its old stream has noticed the broken link,
        and one device id cannot hold many streams. Two agents sharing the id take it from
        each other again and again: that is recorded once, as a device.conflict event.
        """
        validate.name(device_id, "device_id")
        device = await self._device(device_id)
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - gRPC runs every call in a task
            raise RuntimeError("AgentHandlers.watch must run in an asyncio task")
        stream = _WatchStream(task)
        previous = self._watch_streams.get(device_id)
        self._watch_streams[device_id] = stream
        if previous is not None:
            previous.replace()
            self._replaced(device_id)
        try:
            await self._watch(device, send)
        except asyncio.CancelledError:
            if stream.replaced and task.uncancel() == 0:  # not also cancelled by its client
                raise FleetError(
                    ErrorCode.CANCELLED,
                    f"a newer WatchAssignments stream for device {device_id} replaced this one "
                    "(one stream per device; if two agents share this device id, give each its "
                    "own)",
                ) from None
            raise
        finally:
            if self._watch_streams.get(device_id) is stream:
                del self._watch_streams[device_id]

    def _replaced(self, device_id: str) -> None:
        """Count a replaced stream; record a device.conflict event when they flap.

        Not awaited: the new stream must count itself in ``_open_watches`` before the old
        one's end runs, or that end would release the device's watch lease.
        """
        handovers = self._handovers.setdefault(device_id, _Handovers())
        if not handovers.replaced(time.monotonic()):
            return
        message = (
            f"device {device_id}: its WatchAssignments stream was taken over "
            f"{len(handovers.times)} times within {CONFLICT_WINDOW_S:g} s: two agents share "
            "this device id (a cloned device image?); give each machine its own --device-id "
            f"(and certificate). For {CONFLICT_EVENT_INTERVAL_S / 60:g} minutes its "
            "re-registrations add no event each"
        )
        log.warning("%s", message)
        quiet_until = unix_ms() + int(CONFLICT_EVENT_INTERVAL_S * 1000)
        detail = {
            "device_id": device_id,
            "replacements": len(handovers.times),
            "within_seconds": CONFLICT_WINDOW_S,
            "quiet_until_unix_ms": quiet_until,
        }
        self._record_soon(NewEvent(CONFLICT_EVENT, device_id, message, detail))

    def _record_soon(self, event: NewEvent) -> None:
        """Record an event without waiting for it (from code that must not await)."""

        async def record() -> None:
            try:
                await in_thread(self._store.add_event, event)
            except Exception:
                log.exception("recording the %s event of %s failed", event.kind, event.subject)

        task = asyncio.ensure_future(record())
        self._bookkeeping.add(task)
        task.add_done_callback(self._bookkeeping.discard)

    async def _watch(self, device: DeviceRecord, send: SendSet) -> None:
        device_id = device.device_id
        beat = float(self._config.heartbeat_seconds)
        lease_ms = int(LEASE_HEARTBEATS * beat * 1000)
        loop = asyncio.get_running_loop()
        with self._notifier.subscribe(device.device_id, device.device_class) as sub:
            self._open_watches[device_id] = self._open_watches.get(device_id, 0) + 1
            try:
                last_sent: DesiredSet | None = None
                next_beat = loop.time()
                while not sub.closed:
                    heartbeat = loop.time() >= next_beat
                    if heartbeat:
                        next_beat = loop.time() + beat
                        await in_thread(self._store.touch_watch, device_id, unix_ms() + lease_ms)
                    desired = await in_thread(self._store.desired_set, device_id)
                    # any change, not only the revision's: a repaired blob changes no
                    # assignment but its repair time, which makes failed agents retry
                    if heartbeat or desired != last_sent:
                        await send(desired)
                        last_sent = desired
                    await sub.wait(max(0.0, next_beat - loop.time()))
            finally:
                left = self._open_watches[device_id] - 1
                if left:
                    self._open_watches[device_id] = left
                else:
                    del self._open_watches[device_id]
                    await self._quietly(self._store.release_watch, device_id)

    # ---------------------------------------------------------------- fetch
    def _check_fetch(self, request: FetchRequest) -> int:
        validate.name(request.device_id, "device_id")
        validate.digest(request.target_sha256, "target_sha256")
        validate.optional_digest(request.base_sha256, "base_sha256")
        validate.int_range(request.offset, "offset", 0, validate.MAX_INT64)
        if request.chunk_bytes and not MIN_CHUNK_BYTES <= request.chunk_bytes <= MAX_CHUNK_BYTES:
            raise invalid(
                f"chunk_bytes must be 0 (server default) or {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}, "
                f"got {request.chunk_bytes}"
            )
        if request.encoding is Encoding.DELTA and not request.base_sha256:
            raise invalid("encoding DELTA needs base_sha256: the artifact the delta applies to")
        if request.encoding is None and request.offset and request.base_sha256:
            raise invalid(
                "a resumed fetch (offset > 0) with a base must say the encoding of the payload "
                "it resumes (FULL or DELTA)"
            )
        return request.chunk_bytes or self._config.chunk_bytes

    async def _payload(self, request: FetchRequest, artifact: ArtifactRecord) -> Payload:
        """Full artifact, or a delta against the base the device holds (computed once).

        The base must be an artifact of the same model: a delta from any other blob would
        cost CPU for nothing and, by its answer, tell a device which digests exist. A base
        whose stored bytes are corrupt is no base (the device gets the full artifact);
        CorruptBlobError when the target's are. The full artifact is announced with the
        artifact's recorded size, whatever its file holds (the stream finds it corrupt),
        and a delta the disk will not give (an OSError) falls back to it."""
        target, base = request.target_sha256, request.base_sha256
        full = self._deltas.full(target, artifact.size_bytes)
        if request.encoding is Encoding.FULL or not base or base == target:
            return full
        # the model's own artifact with those bytes: another model's may hold them too
        held = await in_thread(self._store.find_model_artifact, artifact.model_name, base)
        usable = (
            held is not None
            and await in_thread(self._blobs.exists, base)
            and await self._sound(base)
        )
        if held is None or not usable:
            if request.encoding is Encoding.DELTA:
                raise FleetError(
                    ErrorCode.FAILED_PRECONDITION,
                    f"this controller no longer holds base {base}, so the delta cannot be "
                    "resumed; fetch the full artifact (encoding FULL) from offset 0",
                )
            return full

        def dropped(d: DroppedDelta) -> None:
            self._delta_dropped(request, artifact, d)

        try:
            payload = await self._deltas.payload(base, target, dropped)
        except DeltaError as exc:
            log.warning("no delta %s -> %s (%s); sending the full artifact", base, target, exc)
            payload = full
        except CorruptBlobError as exc:
            if exc.sha256 != base:
                raise  # the target's own bytes: nothing can be sent (_fetch says so)
            refused = await self._corrupt_artifact(request, held, exc, "computing a delta")
            log.error("%s (device %s gets the full artifact)", refused.message, request.device_id)
            payload = full
        except OSError as exc:  # reading base or target, or writing the delta: the stream
            # of the full artifact says so if its own bytes are the ones the disk lost
            log.error("no delta %s -> %s (%s); sending the full artifact", base, target, exc)
            payload = full
        if payload.encoding is Encoding.FULL:
            payload = full  # a cached "full" record names the file's size, not the artifact's
        if request.encoding is Encoding.DELTA and payload.encoding is not Encoding.DELTA:
            raise FleetError(
                ErrorCode.FAILED_PRECONDITION,
                f"there is no delta payload from {base} to {target} (the full artifact is "
                "smaller); fetch with encoding FULL from offset 0",
            )
        return payload

    async def fetch(self, request: FetchRequest, send: SendChunk) -> None:
        """Stream the artifact's bytes from ``offset``; record the attempt however it ends.

        Downloads hold a slot of the download pool (a few per device), never a short-call
        slot; a chunk the client does not take within ``fetch_write_timeout_seconds`` ends
        the download, so a reader that stopped cannot keep the slot.
        """
        chunk_bytes = self._check_fetch(request)
        with self._downloads.lease(request.device_id) as lease:

            async def send_within(chunk: Chunk) -> None:
                what = f"the {len(chunk.data)} bytes at offset {chunk.offset}"
                await lease.write(asyncio.ensure_future(send(chunk)), what)

            await self._fetch(request, chunk_bytes, send_within)

    async def _sound(self, sha256: str) -> bool:
        """Whether a blob is not known corrupt (nor unreadable): a base a delta may use."""
        try:
            return await self._blob_io(self._blobs.known_corrupt, sha256) is None
        except _Unreadable as exc:
            log.error("blob %s cannot be read (%s): not used as a delta base", sha256, exc)
            return False

    async def _blob_io(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Blocking blob work on the blob-read threads (blob_read_threads); an OSError
        of the file system comes out as _Unreadable."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._blob_reads, functools.partial(fn, *args, **kwargs)
            )
        except OSError as exc:
            raise _Unreadable(exc) from exc

    async def _fetch(self, request: FetchRequest, chunk_bytes: int, send: SendChunk) -> None:
        target = request.target_sha256
        await self._device(request.device_id)
        desired = await in_thread(self._store.desired_set, request.device_id)
        # The artifact the device was told to fetch, by id: two artifacts can hold the same
        # bytes (one model built alike for two classes, a re-release), and events,
        # messages and download sums are about the device's own.
        assigned = next((a for a in desired.assignments if a.sha256 == target), None)
        artifact = None
        if assigned is not None:
            artifact = await in_thread(self._store.get_artifact, assigned.artifact_id)
        if artifact is None:  # one answer for "no such artifact" and "not yours"
            raise not_found(
                f"no artifact with sha256 {target} is assigned to device {request.device_id}; "
                "fetch what WatchAssignments names"
            )
        try:
            payload = await self._payload(request, artifact)
        except CorruptBlobError as exc:  # found hashing the target to encode a delta
            raise await self._corrupt_artifact(request, artifact, exc, "computing a delta") from exc
        total = payload.size
        if request.offset > total:
            raise FleetError(
                ErrorCode.OUT_OF_RANGE,
                f"offset {request.offset} is past the end of the payload: it has {total} bytes, "
                f"so resume from an offset in 0..{total}",
            )
        if payload.encoding is Encoding.FULL:
            try:
                known = await self._blob_io(self._blobs.known_corrupt, payload.sha256, total)
            except _Unreadable as exc:
                raise await self._unreadable(request, artifact, payload, exc.error) from exc
            if known is not None:  # said once (its event); not streamed again to fail again
                raise FleetError(ErrorCode.DATA_LOSS, await self._corrupt_message(artifact, known))

        def chunk(position: int, data: bytes) -> Chunk:
            return Chunk(
                payload.encoding, total, payload.sha256, position, data, payload.base_sha256
            )

        sent = 0
        reached_end = False
        try:
            # Hashed from byte 0 (the prefix of a resumed fetch is read, not sent, unless
            # the same file was hashed whole lately: BlobStore.verified); the read that
            # reaches the end checks the digest, so a corrupt blob's last chunk is never
            # sent and no device is handed all of its bytes.
            with await self._blob_io(self._blobs.open_verified, payload.sha256, total) as reader:
                await self._blob_io(reader.skip_to, request.offset)
                position = request.offset
                while position < total:
                    data = await self._blob_io(reader.read, chunk_bytes)
                    await send(chunk(position, data))
                    position += len(data)
                    sent += len(data)
                if sent == 0:
                    # Nothing left to send: one empty chunk still tells size and digest.
                    await send(chunk(position, b""))
            reached_end = position == total
        except CorruptBlobError as exc:
            if payload.encoding is Encoding.DELTA:
                raise await self._corrupt_delta(request, artifact, payload, exc) from exc
            raise await self._corrupt_artifact(request, artifact, exc, "sending it") from exc
        except _Unreadable as exc:
            raise await self._unreadable(request, artifact, payload, exc.error) from exc
        finally:
            completed = self._progress.ended(
                request.device_id, payload.sha256, request.offset, sent, reached_end
            )
            outcome = FetchOutcome(
                request.device_id,
                artifact.model_name,
                artifact.id,
                artifact.size_bytes,
                payload.encoding,
                sent,
                completed,
            )
            summed = self._fetch_events.ended(request.device_id, payload.sha256, sent, completed)
            event = None
            if summed is not None:
                event = _fetch_event(request, artifact, payload, outcome, reached_end, summed)
            await self._quietly(self._store.record_fetch, event, outcome)

    # ---------------------------------------------------------------- corrupt blobs
    async def _corrupt_artifact(
        self,
        request: FetchRequest,
        artifact: ArtifactRecord,
        error: CorruptBlobError,
        doing: str,
    ) -> FleetError:
        """An artifact's stored bytes are corrupt: say so once, and refuse it from now on.

        The blob stays (rows name it, and it is the evidence) and is recorded corrupt, so
        later fetches are refused at once instead of streaming it again to fail at the
        end; storing the same bytes again replaces it (BlobStore.commit).
        """
        message = await self._corrupt_message(artifact, error)
        try:
            new = await in_thread(self._blobs.mark_corrupt, error)
        except OSError as exc:  # the disk will not take the record either: say it anyway
            log.error("could not record blob %s as corrupt: %s", error.sha256, exc)
            new = True
        if new:
            detail = self._corrupt_detail(request, artifact, error, "artifact")
            detail.update(found_while=doing, action="refused until the blob is replaced")
            await self._quietly(
                self._store.add_event, NewEvent(CORRUPT_EVENT, artifact.id, message, detail)
            )
        return FleetError(ErrorCode.DATA_LOSS, message)

    async def _corrupt_message(self, artifact: ArtifactRecord, error: CorruptBlobError) -> str:
        fix = await self._fix(artifact, "the corrupt copy, which is kept under blobs/corrupt/")
        return (
            f"artifact {artifact.id}: its stored bytes are corrupt on the controller "
            f"({_found(error)}), so it cannot be sent; no device gets its last chunk, and "
            f"the controller refuses it until the blob is replaced: {fix}; and {CHECK_DISK}"
        )

    async def _fix(self, artifact: ArtifactRecord, replaces: str) -> str:
        """How the operator puts an artifact's bytes back: the model's file when the
        artifact is the model itself, else a new artifact (compression output is gone)."""
        model = await in_thread(self._store.get_model, artifact.model_name, artifact.model_version)
        if model is not None and model.sha256 == artifact.sha256:
            return (
                f"add model {model.name} v{model.version}'s file again (`homefleet model add "
                f"{model.name} FILE`; the same bytes replace {replaces})"
            )
        return (
            f"make a new artifact for {artifact.device_class} (run the compression again, "
            "`homefleet compress`, or `homefleet artifact create`) and assign it"
        )

    async def _unreadable(
        self, request: FetchRequest, artifact: ArtifactRecord, payload: Payload, error: OSError
    ) -> FleetError:
        """The file system would not give a payload's bytes: DATA_LOSS with the fix, and
        one event per blob an hour (every fetch fails the same way, at once). A cached
        delta is the controller's own: it is dropped, and the device starts over."""
        missing = isinstance(error, FileNotFoundError)
        if payload.encoding is Encoding.DELTA:
            if missing:  # removed from the cache meanwhile: nothing lost, start over
                await in_thread(
                    self._deltas.drop, payload.base_sha256, artifact.sha256, payload.sha256
                )
                return FleetError(
                    ErrorCode.FAILED_PRECONDITION,
                    f"artifact {artifact.id}: the cached delta from base {payload.base_sha256} "
                    "went away; fetch again from offset 0 (a fresh one is computed)",
                )
            found = f"reading it failed: {_os_error(error)}"
            return await self._dropped_mid_stream(request, artifact, payload, found, {})
        if missing:
            kind = MISSING_EVENT
            fix = await self._fix(artifact, "the missing file")
            message = (
                f"artifact {artifact.id}: its bytes (blob {payload.sha256}) are missing from "
                "the controller's blob store (deleted, or the blob volume is not mounted), "
                f"so it cannot be sent: {fix}"
            )
        else:
            kind = UNREADABLE_EVENT
            fix = await self._fix(artifact, "the unreadable file")
            message = (
                f"artifact {artifact.id}: the controller could not read its stored bytes "
                f"(blob {payload.sha256}: {_os_error(error)}), so it cannot be sent; check "
                "the controller's disk (its kernel log, SMART: a failing disk?); if the "
                f"blob stays unreadable, {fix}"
            )
        if self._blob_events.due((kind, payload.sha256)):
            detail = {
                "artifact_id": artifact.id,
                "blob": "artifact",
                "expected_sha256": payload.sha256,
                "error": _os_error(error),
                "errno": error.errno,
                "device_id": request.device_id,
                "offset": request.offset,
                "quiet_seconds": BLOB_EVENT_INTERVAL_S,
            }
            await self._quietly(self._store.add_event, NewEvent(kind, artifact.id, message, detail))
        return FleetError(ErrorCode.DATA_LOSS, message)

    async def _corrupt_delta(
        self,
        request: FetchRequest,
        artifact: ArtifactRecord,
        payload: Payload,
        error: CorruptBlobError,
    ) -> FleetError:
        """A cached delta went corrupt while it was sent: drop it; the next fetch gets a
        fresh one (the bytes already sent cannot be taken back, so this call fails)."""
        detail = self._corrupt_detail(request, artifact, error, "delta")
        return await self._dropped_mid_stream(request, artifact, payload, _found(error), detail)

    async def _dropped_mid_stream(
        self,
        request: FetchRequest,
        artifact: ArtifactRecord,
        payload: Payload,
        found: str,
        detail: dict[str, Any],
    ) -> FleetError:
        """Drop a cached delta that failed while it was sent, record one blob.corrupt
        event, and end the call FAILED_PRECONDITION: the agent then starts over from
        byte 0 at once (edge_agent.fetch), and gets a freshly computed delta. Not
        DATA_LOSS: nothing of the operator's is lost, and the device need not wait."""
        await in_thread(self._deltas.drop, payload.base_sha256, artifact.sha256, payload.sha256)
        message = (
            f"artifact {artifact.id}: the cached delta from base {payload.base_sha256} is "
            f"corrupt on the controller ({found}); it was removed from the cache and "
            f"the next fetch computes it again: fetch again from offset 0; {CHECK_DISK}"
        )
        log.error("%s (device %s, offset %d)", message, request.device_id, request.offset)
        detail = {
            "artifact_id": artifact.id,
            "blob": "delta",
            "expected_sha256": payload.sha256,
            "base_sha256": payload.base_sha256,
            "device_id": request.device_id,
            "offset": request.offset,
            **detail,
            "action": "removed from the delta cache; the next fetch computes it again",
        }
        await self._quietly(
            self._store.add_event, NewEvent(CORRUPT_EVENT, artifact.id, message, detail)
        )
        return FleetError(ErrorCode.FAILED_PRECONDITION, message)

    def _delta_dropped(
        self, request: FetchRequest, artifact: ArtifactRecord, dropped: DroppedDelta
    ) -> None:
        """A cached delta was found corrupt before any byte of it went out, and computed
        again: the device never notices, the operator still hears of the disk."""
        message = (
            f"artifact {artifact.id}: the cached delta from base {dropped.base_sha256} was "
            f"corrupt on the controller ({_found(dropped.error)}); it was removed and "
            f"computed again, so device {request.device_id} got a sound one; {CHECK_DISK}"
        )
        detail = self._corrupt_detail(request, artifact, dropped.error, "delta")
        detail.update(base_sha256=dropped.base_sha256, action="removed and computed again")
        self._record_soon(NewEvent(CORRUPT_EVENT, artifact.id, message, detail))

    @staticmethod
    def _corrupt_detail(
        request: FetchRequest, artifact: ArtifactRecord, error: CorruptBlobError, blob: str
    ) -> dict[str, Any]:
        return {
            "artifact_id": artifact.id,
            "blob": blob,  # "artifact": the operator's bytes; "delta": a cached payload
            "expected_sha256": error.sha256,
            "actual_sha256": error.actual_sha256,
            "bytes_found": error.size,
            "target_sha256": request.target_sha256,
            "base_sha256": request.base_sha256,
            "device_id": request.device_id,
            "offset": request.offset,
        }

    # ---------------------------------------------------------------- reports
    async def report_status(self, status: StatusUpdate) -> None:
        validate.name(status.device_id, "device_id")
        validate.name(status.model_name, "model_name")
        validate.digest(status.artifact_sha256, "artifact_sha256")
        validate.optional_digest(status.serving_sha256, "serving_sha256")
        validate.text(status.reason, "reason", MAX_REASON)
        validate.int_range(status.bytes_received, "bytes_received", 0, validate.MAX_INT64)
        if status.outcome is Outcome.FAILED and not status.reason.strip():
            raise invalid("reason is required when outcome is FAILED: say why it failed")
        await in_thread(self._store.report_status, status)

    async def report_telemetry(self, device_id: str, windows: Sequence[TelemetryWindow]) -> int:
        validate.name(device_id, "device_id")
        if len(windows) > MAX_WINDOWS_PER_BATCH:
            raise invalid(
                f"the batch has {len(windows)} windows; at most {MAX_WINDOWS_PER_BATCH} are "
                "accepted per call: send smaller batches"
            )
        try:
            now = unix_ms()
            for i, w in enumerate(windows):
                _check_window(w, f"windows[{i}]", now)
            return await self._telemetry.store(device_id, windows)
        except FleetError as exc:
            if exc.code is ErrorCode.INVALID_ARGUMENT:
                reason = exc.reason or REFUSED_MALFORMED
                await self._refused(TelemetryRefusal(device_id, reason, exc.message))
            raise

    async def _refused(self, refusal: TelemetryRefusal) -> None:
        """Count a refused call (per class and reason, for /metrics) and, at most once an
        hour per device and reason, record a ``telemetry.refused`` event naming the device:
        the agent drops what is refused, so without this only its own log would know."""
        key = (refusal.device_id, refusal.reason)
        now = time.monotonic()
        last = self._refusal_events.get(key)
        event = None
        if last is None or now - last >= REFUSAL_EVENT_INTERVAL_S:
            self._refusal_events[key] = now
            self._refusal_events.move_to_end(key)
            while len(self._refusal_events) > MAX_REFUSAL_KEYS:
                self._refusal_events.popitem(last=False)
            event = NewEvent(
                REFUSAL_EVENT,
                refusal.device_id,
                f"device {refusal.device_id}: telemetry refused ({refusal.reason}): "
                f"{refusal.message} (its agent drops such windows; at most one event an hour "
                "per device and reason, every refusal counted in "
                "homefleet_telemetry_refusals_total)",
                {"device_id": refusal.device_id, "reason": refusal.reason},
            )
        await self._quietly(self._store.record_telemetry_refusal, refusal, event)

    async def close(self) -> None:
        """Finish the telemetry commit in progress (after the server's calls ended), and
        end the blob-read and delta pools (an encode still queued has nobody waiting)."""
        await self._telemetry.close()
        self._blob_reads.shutdown(wait=False)
        self._delta_encodes.shutdown(wait=False, cancel_futures=True)

    async def _quietly(self, fn: Callable[..., object], *args: object) -> None:
        """Bookkeeping after a stream ends must not hide the stream's own outcome.

        Shielded: a stream often ends because the client cancelled it (a resumed or
        broken download, an agent stopping; one that has every byte reads the stream to
        its end first, so its last chunk counts), and that cancellation must not cancel
        the record of the stream before its thread has even started.
        """

        async def work() -> None:
            try:
                await in_thread(fn, *args)
            except Exception:
                log.exception("bookkeeping %s failed", getattr(fn, "__name__", fn))

        task = asyncio.ensure_future(work())
        self._bookkeeping.add(task)
        task.add_done_callback(self._bookkeeping.discard)
        await asyncio.shield(task)


def _fetch_event(
    request: FetchRequest,
    artifact: ArtifactRecord,
    payload: Payload,
    outcome: FetchOutcome,
    reached_end: bool,
    summed: _Unrecorded,
) -> NewEvent:
    """The ``artifact.fetch`` event of one call, and of the calls it sums up (_FetchEvents)."""
    sent, total = outcome.bytes_sent, payload.size
    delta = (
        f"as a delta from {payload.base_sha256[:12]} " if payload.encoding is Encoding.DELTA else ""
    )
    message = (
        f"device {request.device_id} fetched {artifact.id} {delta}from offset "
        f"{request.offset}: {sent} of {total} bytes sent"
        + ("" if reached_end else " (interrupted)")
        + ("; the update is complete" if outcome.completed else "")
    )
    if summed.calls:
        message += (
            f"; {summed.calls} earlier call(s) of this payload since its last event, "
            f"{summed.bytes_sent} bytes, {summed.updates} update(s) completed, are summed "
            f"up here (at most one event per device and payload every "
            f"{FETCH_EVENT_INTERVAL_S / 60:g} minutes for completed updates and one for other "
            "calls; every call is counted in homefleet_update_fetches_total)"
        )
    detail = {
        "device_id": request.device_id,
        "target_sha256": request.target_sha256,
        "artifact_id": artifact.id,
        "encoding": payload.encoding.value,
        "base_sha256": payload.base_sha256,
        "payload_sha256": payload.sha256,
        "artifact_bytes": artifact.size_bytes,
        "offset": request.offset,
        "bytes_sent": sent,
        "total_bytes": total,
        "completed": reached_end,  # this call sent the last byte
        "update_completed": outcome.completed,  # ...and the update is complete (the sums)
        "calls_summarised": summed.calls,  # earlier calls without an event of their own
        "bytes_summarised": summed.bytes_sent,
        "updates_summarised": summed.updates,
    }
    return NewEvent(FETCH_EVENT, request.device_id, message, detail)


def _found(error: CorruptBlobError) -> str:
    if error.wrong_size:
        how = "cut short" if error.size < (error.expected_size or 0) else "lengthened"
        return (
            f"blob {error.sha256} was {how}: its file holds {error.size} bytes where it must "
            f"hold {error.expected_size}"
        )
    return (
        f"sha256 mismatch: the {error.size} bytes of blob {error.sha256} hash to "
        f"{error.actual_sha256}"
    )


def _os_error(error: OSError) -> str:
    return f"{error.strerror or error} (errno {error.errno})"


def _check_window(w: TelemetryWindow, at: str, now_unix_ms: int) -> None:
    validate.int_range(w.seq, f"{at}.seq", 0, validate.MAX_INT64)
    validate.name(w.model_name, f"{at}.model_name")
    validate.optional_digest(w.artifact_sha256, f"{at}.artifact_sha256")
    validate.int_range(w.start_unix_ms, f"{at}.start_unix_ms", 0, validate.MAX_INT64)
    if w.start_unix_ms < now_unix_ms - MAX_WINDOW_AGE_MS:
        raise invalid(
            f"{at}.start_unix_ms {w.start_unix_ms} is more than "
            f"{MAX_WINDOW_AGE_MS // (24 * 3600 * 1000)} days before the controller's clock: "
            "set the device's clock (NTP); a device that boots in 1970 reports nonsense",
            reason=REFUSED_CLOCK,
        )
    if w.end_unix_ms > now_unix_ms + MAX_CLOCK_AHEAD_MS:
        raise invalid(
            f"{at}.end_unix_ms {w.end_unix_ms} is in the future (more than "
            f"{MAX_CLOCK_AHEAD_MS // 60_000} minutes ahead of the controller's clock): "
            "set the device's clock (NTP)",
            reason=REFUSED_CLOCK,
        )
    validate.int_range(w.end_unix_ms, f"{at}.end_unix_ms", w.start_unix_ms, validate.MAX_INT64)
    most = max(1, w.end_unix_ms - w.start_unix_ms) * MAX_INFERENCES_PER_MS
    validate.int_range(w.count, f"{at}.count", 0, most)
    validate.int_range(w.errors, f"{at}.errors", 0, w.count)
    validate.int_range(w.peak_memory_bytes, f"{at}.peak_memory_bytes", 0, validate.MAX_INT64)
    counts = w.latency_bucket_counts
    if counts and not (min(counts) >= 0 and max(counts) <= validate.MAX_INT64):
        for b in counts:  # the slow path only to name the offending value
            validate.int_range(b, f"{at}.latency_bucket_counts[]", 0, validate.MAX_INT64)
    try:
        histogram.check_counts(w.latency_bucket_counts, what=f"{at}.latency_bucket_counts")
    except histogram.HistogramError as exc:
        raise invalid(str(exc)) from exc
    if sum(counts) != w.count:
        raise invalid(
            f"{at}.latency_bucket_counts hold {sum(counts)} inferences but count is {w.count}: "
            "every inference of a window is in its histogram"
        )
    factor = _emulated_factor(w.energy_source, f"{at}.energy_source")
    span_s = (w.end_unix_ms - w.start_unix_ms + FIRST_INFERENCE_MS) / 1000
    for field, value, per_s, what in (
        ("cpu_seconds", w.cpu_seconds, float(MAX_CORES), "cores busy"),
        ("joules", w.joules, MAX_WATTS, "watts drawn"),
    ):
        validate.non_negative_float(value, f"{at}.{field}")
        bound = span_s * per_s * factor
        if value > bound:
            emulated = f", times the emulated slowdown {factor:g}" if factor != 1 else ""
            raise invalid(
                f"{at}.{field} is {value:g}, above its bound {bound:g}: {per_s:g} {what} for "
                f"the window's {w.end_unix_ms - w.start_unix_ms} ms plus "
                f"{FIRST_INFERENCE_MS // 1000} s (its first inference){emulated}",
                reason=REFUSED_BOUNDS,
            )


def _emulated_factor(source: str, at: str) -> float:
    """1 for a meter's own name; F for "<meter>*F" from an agent emulating a slower device."""
    try:
        return energy_sources.parse_energy_source(source).slowdown
    except energy_sources.EnergySourceError:
        raise invalid(
            f"{at} {source[:40]!r} is not an energy source this controller accepts: send one "
            f"of {', '.join(ENERGY_SOURCES)}, or '<source>*<factor>' from an agent run with "
            f"--emulate-slowdown (a factor above 1, at most {MAX_EMULATED_SLOWDOWN:g}, with at "
            "most one decimal place, written as '2.5' or '10')",
            reason=REFUSED_ENERGY_SOURCE,
        ) from None
