"""Download an artifact from the controller in chunks, resuming where a broken stream left off.

When the device holds an earlier artifact of the model (``FetchPlan.base_sha256``), it
asks for a delta against it; the controller answers with a delta payload (the model-aware
codec, artifact.delta) or, when that would not be smaller, the full artifact. The first
chunk says which. Bytes go to a part file as they arrive — ``partial/<sha256>.part`` for
the artifact itself, ``partial/<sha256>.delta`` (described by ``.delta.json``) for a
delta — and after any break the next request resumes from the part file's size, also
after a restart of the agent. A finished delta is applied to the base and the result
checked against the manifest's sha256 before it moves into ``artifacts/`` (with the mode a
full download gets); a delta that does not apply is thrown away and the full artifact
fetched instead, and the result says so (the operator sees it in the status report).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import grpc.aio

from artifact.delta import DeltaError, apply_delta
from artifact.digest import InvalidDigestError, check_sha256, sha256_file
from artifact.files import atomic_write_bytes, fsync_dir
from edge_agent.backoff import Backoff
from edge_agent.errors import AgentError, ErrorCode
from edge_agent.store import StateStore
from protos import fleet_pb2

log = logging.getLogger(__name__)

FULL = fleet_pb2.PAYLOAD_ENCODING_FULL
DELTA = fleet_pb2.PAYLOAD_ENCODING_DELTA
UNSPECIFIED = fleet_pb2.PAYLOAD_ENCODING_UNSPECIFIED

# Codes after which asking again (from the current offset) may work.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
# How long a download whose last byte arrived waits for the controller to end its stream
# (it does at once, once it has recorded the call) before cancelling it: _await_end.
END_OF_STREAM_WAIT_S = 5.0
# Codes that mean the controller itself is away: give up the session and reconnect.
CONNECTION_LOST = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


@dataclass(frozen=True)
class FetchPlan:
    device_id: str
    sha256: str
    size_bytes: int
    chunk_bytes: int
    timeout_s: float
    attempts: int
    base_sha256: str = ""  # an artifact this device holds, to receive a delta against


@dataclass(frozen=True)
class DiscardedDelta:
    """A finished delta that did not rebuild the artifact: the operator hears of it, since
    its bytes were paid for (a metered home link) and the full artifact came after it."""

    base_sha256: str
    why: str  # DeltaNotApplied's message
    bytes_received: int  # the delta's bytes over the network (those resumed from included)

    def describe(self) -> str:
        """For a StatusReport's reason: which delta, what it cost, and why it went."""
        return (
            f"delta from {self.base_sha256[:12]} discarded ({self.bytes_received} bytes "
            f"received): {self.why}"
        )


@dataclass(frozen=True)
class FetchResult:
    path: Path
    total_bytes: int  # size of the payload that travelled (the delta's, for a delta)
    resumed_from: int  # bytes already on disk when this fetch began
    received: int  # bytes that came over the network during this fetch
    encoding: int  # fleet_pb2.PayloadEncoding
    discarded_delta: DiscardedDelta | None = None  # a delta fetched first, then thrown away

    @property
    def bytes_received(self) -> int:
        """What this update took over the network: StatusReport.bytes_received.

        The operator reads it as the update's cost on the wire (`homefleet devices`, "last
        download"), so it is neither the payload's size nor only this call's bytes: it is
        the bytes received in this fetch, every one (a discarded delta, a payload that
        changed and started over) plus those an earlier attempt left in the part file
        this fetch resumed from. Bytes an earlier attempt received and then threw away are
        not known here and not counted.
        """
        return self.resumed_from + self.received


@dataclass(frozen=True)
class Payload:
    """What the controller is sending: learnt from the first chunk, kept for resuming."""

    encoding: int
    sha256: str
    total: int
    base_sha256: str = ""


class StreamEndedEarly(Exception):
    """The controller closed a chunk stream before the whole payload arrived."""


class PayloadChanged(Exception):
    """The controller now sends another payload than the part file holds: start over."""


def _failed(message: str) -> AgentError:
    return AgentError(ErrorCode.FETCH_FAILED, message)


def with_path(exc: OSError, path: Path) -> OSError:
    """``exc`` naming ``path`` (a failed write on an open file names none)."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror, str(path))


class _Download:
    """One payload download: its part file, the offset reached, and the chunk checks."""

    def __init__(self, store: StateStore, plan: FetchPlan) -> None:
        self.store = store
        self.plan = plan
        self.received = 0
        self.payload: Payload | None = self._resumable()

    # -- which payload, and where its bytes go -----------------------------------------

    def _resumable(self) -> Payload | None:
        """The payload a part file left by an earlier attempt holds, if it can go on."""
        plan, store = self.plan, self.store
        info = store.delta_info_path(plan.sha256)
        if info.exists():
            try:
                raw = json.loads(info.read_bytes())
                payload = Payload(
                    DELTA, check_sha256(raw["sha256"]), int(raw["total"]), raw["base_sha256"]
                )
            except (OSError, ValueError, KeyError, TypeError, InvalidDigestError) as exc:
                log.warning("unreadable %s (%s); starting over", info, exc)
                payload = None
            if payload is not None and payload.base_sha256 == plan.base_sha256:
                return payload
            store.discard_delta_partial(plan.sha256)  # made against another base
        if store.partial_size(plan.sha256):
            return Payload(FULL, plan.sha256, plan.size_bytes)
        return None

    def part(self) -> Path:
        if self.payload is not None and self.payload.encoding == DELTA:
            return self.store.delta_partial_path(self.plan.sha256)
        return self.store.partial_path(self.plan.sha256)

    def offset(self) -> int:
        if self.payload is None:
            return 0
        try:
            size = self.part().stat().st_size
        except FileNotFoundError:
            return 0
        if size > self.payload.total:
            log.warning(
                "part file of %s is longer than its payload; starting over", self.plan.sha256
            )
            self.restart()
            return 0
        return size

    def restart(self) -> None:
        """Forget the payload and its bytes (it changed, or did not apply)."""
        self.store.discard_partial(self.plan.sha256)
        self.store.discard_delta_partial(self.plan.sha256)
        self.payload = None

    def check_disk(self, offset: int) -> None:
        remaining = self.plan.size_bytes - offset
        part = self.part()
        free = shutil.disk_usage(part.parent).free
        if free < remaining:
            raise _failed(
                f"not enough disk for artifact {self.plan.sha256}: {remaining} bytes needed, "
                f"{free} free in {part.parent}"
            )

    def _adopt(self, chunk: fleet_pb2.ArtifactChunk) -> Payload:
        """The first chunk names the payload; check it is one this device asked for."""
        plan = self.plan
        if chunk.encoding in (FULL, UNSPECIFIED):
            if chunk.payload_sha256 and chunk.payload_sha256 != plan.sha256:
                raise _failed(
                    f"controller sent payload {chunk.payload_sha256} while {plan.sha256} was "
                    "asked for"
                )
            if chunk.total_bytes != plan.size_bytes:
                raise _failed(
                    f"controller says artifact {plan.sha256} has {chunk.total_bytes} bytes; "
                    f"its manifest says {plan.size_bytes}"
                )
            return Payload(FULL, plan.sha256, plan.size_bytes)
        if chunk.encoding != DELTA:
            raise _failed(f"controller sent a payload of unknown encoding {chunk.encoding}")
        if not plan.base_sha256:
            raise _failed("controller sent a delta although this agent holds no base")
        if chunk.base_sha256 != plan.base_sha256:
            raise _failed(
                f"controller sent a delta against {chunk.base_sha256 or 'no base'}; this "
                f"agent holds {plan.base_sha256}"
            )
        try:
            digest = check_sha256(chunk.payload_sha256, field="payload_sha256")
        except InvalidDigestError as exc:
            raise _failed(f"controller sent a delta without a valid digest: {exc}") from exc
        if not 0 < chunk.total_bytes <= plan.size_bytes:
            raise _failed(
                f"controller sent a {chunk.total_bytes}-byte delta for a {plan.size_bytes}-byte "
                "artifact; a delta is never larger than the artifact"
            )
        payload = Payload(DELTA, digest, chunk.total_bytes, plan.base_sha256)
        info = {"sha256": digest, "total": payload.total, "base_sha256": payload.base_sha256}
        self.store.partial_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.store.delta_info_path(plan.sha256), json.dumps(info).encode())
        return payload

    def check_chunk(self, chunk: fleet_pb2.ArtifactChunk, offset: int) -> None:
        if self.payload is None:
            self.payload = self._adopt(chunk)
        payload = self.payload
        if chunk.encoding not in (payload.encoding, UNSPECIFIED) or (
            chunk.total_bytes != payload.total
            or (chunk.payload_sha256 and chunk.payload_sha256 != payload.sha256)
        ):
            raise PayloadChanged(
                f"controller now sends payload {chunk.payload_sha256} ({chunk.total_bytes} "
                f"bytes) instead of {payload.sha256} ({payload.total} bytes)"
            )
        if chunk.offset != offset:
            raise _failed(
                f"controller sent a chunk at offset {chunk.offset} while {offset} was expected"
            )
        if offset + len(chunk.data) > payload.total:
            raise _failed(f"controller sent more than the {payload.total} bytes of the payload")

    # -- the network ----------------------------------------------------------------

    def _request(self, offset: int) -> fleet_pb2.FetchArtifactRequest:
        payload = self.payload
        encoding: int = UNSPECIFIED  # a fresh start: the controller chooses full or delta
        base = self.plan.base_sha256
        if payload is not None:
            encoding, base = payload.encoding, payload.base_sha256
        return fleet_pb2.FetchArtifactRequest(
            device_id=self.plan.device_id,
            target_sha256=self.plan.sha256,
            base_sha256=base,
            offset=offset,
            chunk_bytes=self.plan.chunk_bytes,
            encoding=encoding,  # type: ignore[arg-type]
        )

    def done(self, offset: int) -> bool:
        return self.payload is not None and offset == self.payload.total

    async def one_stream(self, stub: Any, offset: int) -> int:
        """Request from ``offset``, append what arrives; return the offset reached."""
        call = stub.FetchArtifact(self._request(offset), timeout=self.plan.timeout_s)
        out: BinaryIO | None = None
        try:
            while isinstance(chunk := await call.read(), fleet_pb2.ArtifactChunk):  # else EOF
                self.check_chunk(chunk, offset)
                if out is None:
                    self.part().parent.mkdir(parents=True, exist_ok=True)
                    out = self.part().open("ab")
                try:
                    out.write(chunk.data)
                except OSError as exc:
                    raise with_path(exc, self.part()) from exc
                offset += len(chunk.data)
                self.received += len(chunk.data)
                if self.done(offset):
                    await self._await_end(call)
                    break
        finally:
            if not call.done():
                call.cancel()
            if out is not None:
                self._close(out)
        return offset

    async def _await_end(self, call: Any) -> None:
        """Every byte is here: let the controller end the stream, which it does right
        after the last chunk, instead of cancelling it at once.

        The controller counts a chunk as sent only once its write returned; a cancel
        that lands in between loses the last chunk's count, and the download is recorded
        "interrupted" with no completed update although the device has every byte. The
        wait is bounded (END_OF_STREAM_WAIT_S): a stream that does not end is cancelled.
        Nothing that comes after the last byte can spoil the payload, which ``finish``
        verifies, so an error or a stray message here is logged, never raised.
        """
        try:
            async with asyncio.timeout(min(END_OF_STREAM_WAIT_S, self.plan.timeout_s)):
                extra = await call.read()
        except TimeoutError:
            log.debug(
                "artifact %s: the stream did not end after the last byte; cancelling it",
                self.plan.sha256,
            )
            return
        except grpc.aio.AioRpcError as exc:
            log.debug(
                "artifact %s: every byte arrived, then the stream ended %s: %s",
                self.plan.sha256,
                exc.code().name,
                exc.details(),
            )
            return
        if isinstance(extra, fleet_pb2.ArtifactChunk):
            log.warning(
                "artifact %s: the controller sent a chunk past the payload's %d bytes; "
                "ignoring it (the payload is verified against its digest)",
                self.plan.sha256,
                self.payload.total if self.payload is not None else 0,
            )

    def _close(self, out: BinaryIO) -> None:
        """Flush and fsync the part file; a failure names it (a write error has no path)."""
        try:
            out.flush()
            os.fsync(out.fileno())
        except OSError as exc:
            raise with_path(exc, self.part()) from exc
        finally:
            with contextlib.suppress(OSError):  # after a failed flush, close repeats it
                out.close()

    # -- the end ------------------------------------------------------------------------

    def finish(self) -> Path:
        """Verify the payload and turn it into the artifact (blocking: run in a thread)."""
        assert self.payload is not None
        if self.payload.encoding == FULL:
            return self.store.promote_partial(self.plan.sha256)
        part = self.store.delta_partial_path(self.plan.sha256)
        actual = sha256_file(part)
        if actual != self.payload.sha256:
            raise DeltaNotApplied(
                f"the delta payload hashes to {actual}, the controller said {self.payload.sha256}"
            )
        # Rebuilt beside the part file, then given the part file's mode and moved into
        # artifacts/ as a full download is: apply_delta writes through a temporary file
        # made private (0600), while a part file is made by open() under the agent's umask
        # (0644 with the usual 022), and other local processes may read the model.
        rebuilt = self.store.partial_path(self.plan.sha256).with_suffix(".rebuilt")
        try:
            apply_delta(
                self.store.artifact_path(self.payload.base_sha256),
                part,
                rebuilt,
                expected_sha256=self.plan.sha256,
            )
        except (DeltaError, OSError) as exc:
            raise DeltaNotApplied(f"the delta does not apply: {exc}") from exc
        if sha256_file(rebuilt) != self.plan.sha256:  # apply_delta checks too; never trust one
            rebuilt.unlink(missing_ok=True)
            raise DeltaNotApplied("the rebuilt artifact does not match the manifest's sha256")
        os.chmod(rebuilt, stat.S_IMODE(part.stat().st_mode))
        target = self.store.artifact_path(self.plan.sha256)
        self.store.artifacts_dir.mkdir(parents=True, exist_ok=True)
        os.replace(rebuilt, target)
        fsync_dir(self.store.artifacts_dir)
        self.store.discard_delta_partial(self.plan.sha256)
        fsync_dir(self.store.partial_dir)
        return target


class DeltaNotApplied(Exception):
    """A finished delta that does not rebuild the artifact: fetch the full artifact instead."""


async def fetch_artifact(
    stub: Any,
    store: StateStore,
    plan: FetchPlan,
    backoff: Backoff,
    on_delta_discarded: Callable[[DiscardedDelta], Awaitable[None]] | None = None,
) -> FetchResult:
    """Fetch ``plan.sha256`` into artifacts/ and return where it is.

    With a base, a delta is tried first; a delta that does not apply is logged, handed to
    ``on_delta_discarded`` (the caller tells the controller) before the full artifact is
    fetched, and named in the result (and in an AgentError from the full fetch). Retryable
    stream errors resume from the part file's size; after ``plan.attempts`` failures in a
    row without progress, a lost connection is re-raised (the caller reconnects) and
    anything else becomes FETCH_FAILED. A full download whose digest does not match raises
    HASH_MISMATCH with "sha256 mismatch: expected X got Y".
    """
    if plan.base_sha256 and not store.verify_artifact(plan.base_sha256):
        plan = _without_base(plan)
    download = _Download(store, plan)
    start = download.offset()
    received = 0
    discarded: DiscardedDelta | None = None
    try:
        result = await _fetch(stub, download, backoff)
        received = download.received
        path = await asyncio.to_thread(download.finish)
    except DeltaNotApplied as exc:
        discarded = DiscardedDelta(plan.base_sha256, str(exc), start + download.received)
        log.error(
            "artifact %s: %s; fetching the full artifact instead (%d bytes of delta wasted)",
            plan.sha256,
            exc,
            discarded.bytes_received,
        )
        await asyncio.to_thread(download.restart)
        if on_delta_discarded is not None:
            await on_delta_discarded(discarded)
        received = download.received
        download = _Download(store, _without_base(plan))
        try:
            result = await _fetch(stub, download, backoff)
            received += download.received
            path = await asyncio.to_thread(download.finish)
        except AgentError as failed:  # the full artifact failed too: say both
            raise AgentError(
                failed.code,
                f"{failed.message} (fetching the full artifact: {discarded.describe()})",
            ) from failed
    if start and discarded is None:  # after a discard, start was the delta's, not this one's
        log.info("artifact %s: resumed at byte %d, received %d bytes", plan.sha256, start, received)
    return FetchResult(
        path=path,
        total_bytes=result.total,
        resumed_from=start,
        received=received,
        encoding=result.encoding,
        discarded_delta=discarded,
    )


def _without_base(plan: FetchPlan) -> FetchPlan:
    return FetchPlan(
        plan.device_id, plan.sha256, plan.size_bytes, plan.chunk_bytes, plan.timeout_s,
        plan.attempts,
    )  # fmt: skip


async def _fetch(stub: Any, download: _Download, backoff: Backoff) -> Payload:
    """Stream the payload into its part file, resuming after breaks; return what it was."""
    plan = download.plan
    offset = download.offset()
    download.check_disk(offset)
    failures = 0
    while not download.done(offset):
        before = offset
        try:
            offset = await download.one_stream(stub, offset)
            if not download.done(offset):
                raise StreamEndedEarly(f"stream ended at byte {offset} of the payload")
        except PayloadChanged as exc:
            log.warning("artifact %s: %s; starting over", plan.sha256, exc)
            download.restart()
            offset = 0
            failures += 1
            if failures >= plan.attempts:
                raise _failed(f"fetching artifact {plan.sha256}: {exc}") from exc
        except (grpc.aio.AioRpcError, StreamEndedEarly) as exc:
            offset = download.offset()
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.ABORTED
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            if code is grpc.StatusCode.FAILED_PRECONDITION:
                # the payload being sent or resumed is gone (a delta no longer held, or one
                # the controller found corrupt and dropped, even before its first chunk
                # came): start over at once, full or delta; nothing of it is kept
                log.warning("artifact %s: %s; starting over", plan.sha256, detail)
                download.restart()
                offset = 0
                failures += 1
                if failures < plan.attempts:
                    continue
            if code is grpc.StatusCode.DATA_LOSS:
                # the artifact's stored bytes are corrupt, gone or unreadable: those
                # received may be the corrupt ones, so the next attempt (a deployment retry,
                # after its backoff) starts from byte 0; the controller refuses until fixed
                download.restart()
            if code is grpc.StatusCode.NOT_FOUND:
                # a device may fetch only what is assigned to it: the assignment changed
                # while this download ran, and the new desired set is on its way
                raise AgentError(
                    ErrorCode.NOT_ASSIGNED,
                    f"artifact {plan.sha256} is no longer assigned: {detail}",
                ) from exc
            if code not in RETRYABLE:
                raise _failed(
                    f"controller refused to send artifact {plan.sha256}: {code.name}: {detail}"
                ) from exc
            if offset > before:
                failures = 0
                backoff.reset()
            failures += 1
            if failures >= plan.attempts:
                if code in CONNECTION_LOST:
                    raise
                raise _failed(
                    f"fetching artifact {plan.sha256} failed {failures} times in a row at byte "
                    f"{offset}: {code.name}: {detail}"
                ) from exc
            delay = backoff.next_delay()
            log.warning(
                "artifact %s: stream broke at byte %d (%s: %s); resuming in %.2f s",
                plan.sha256,
                offset,
                code.name,
                detail,
                delay,
            )
            await asyncio.sleep(delay)
    assert download.payload is not None
    return download.payload
