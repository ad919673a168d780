"""Download an artifact from the controller in chunks, resuming where a broken stream left off.

Bytes go to ``partial/<sha256>.part`` as they arrive; after any break the next request
asks for ``offset = size of the part file``, also after a restart of the agent. Only a
file whose sha256 matches moves into ``artifacts/``; a mismatch deletes the part file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from edge_agent.backoff import Backoff
from edge_agent.errors import AgentError, ErrorCode
from edge_agent.store import StateStore
from protos import fleet_pb2

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class FetchResult:
    path: Path
    total_bytes: int
    resumed_from: int  # bytes already on disk when this fetch began
    received: int  # bytes that came over the network during this fetch
    encoding: int  # fleet_pb2.PayloadEncoding


class StreamEndedEarly(Exception):
    """The controller closed a chunk stream before the whole payload arrived."""


def _failed(message: str) -> AgentError:
    return AgentError(ErrorCode.FETCH_FAILED, message)


class _Download:
    """One artifact download: its part file, the offset reached, and the chunk checks."""

    def __init__(self, store: StateStore, plan: FetchPlan) -> None:
        self.store = store
        self.plan = plan
        self.part = store.partial_path(plan.sha256)
        self.received = 0

    def offset(self) -> int:
        size = self.store.partial_size(self.plan.sha256)
        if size > self.plan.size_bytes:
            log.warning(
                "part file of %s is longer than the artifact; starting over", self.plan.sha256
            )
            self.store.discard_partial(self.plan.sha256)
            return 0
        return size

    def check_disk(self, offset: int) -> None:
        remaining = self.plan.size_bytes - offset
        free = shutil.disk_usage(self.part.parent).free
        if free < remaining:
            raise _failed(
                f"not enough disk for artifact {self.plan.sha256}: {remaining} bytes needed, "
                f"{free} free in {self.part.parent}"
            )

    def check_chunk(self, chunk: fleet_pb2.ArtifactChunk, offset: int) -> None:
        plan = self.plan
        if chunk.encoding not in (
            fleet_pb2.PAYLOAD_ENCODING_FULL,
            fleet_pb2.PAYLOAD_ENCODING_UNSPECIFIED,
        ):
            raise _failed(
                f"controller sent a {fleet_pb2.PayloadEncoding.Name(chunk.encoding)} payload; "
                "this agent asked for the full artifact (it sent no base)"
            )
        if chunk.payload_sha256 and chunk.payload_sha256 != plan.sha256:
            raise _failed(
                f"controller sent payload {chunk.payload_sha256} while {plan.sha256} was asked for"
            )
        if chunk.total_bytes != plan.size_bytes:
            raise _failed(
                f"controller says artifact {plan.sha256} has {chunk.total_bytes} bytes; "
                f"its manifest says {plan.size_bytes}"
            )
        if chunk.offset != offset:
            raise _failed(
                f"controller sent a chunk at offset {chunk.offset} while {offset} was expected"
            )
        if offset + len(chunk.data) > plan.size_bytes:
            raise _failed(
                f"controller sent more than the {plan.size_bytes} bytes of artifact {plan.sha256}"
            )

    async def one_stream(self, stub: Any, offset: int) -> int:
        """Request from ``offset``, append what arrives; return the offset reached."""
        encoding = (
            fleet_pb2.PAYLOAD_ENCODING_FULL if offset else fleet_pb2.PAYLOAD_ENCODING_UNSPECIFIED
        )
        request = fleet_pb2.FetchArtifactRequest(
            device_id=self.plan.device_id,
            target_sha256=self.plan.sha256,
            base_sha256="",
            offset=offset,
            chunk_bytes=self.plan.chunk_bytes,
            encoding=encoding,
        )
        call = stub.FetchArtifact(request, timeout=self.plan.timeout_s)
        with self.part.open("ab") as out:
            try:
                chunk: fleet_pb2.ArtifactChunk
                async for chunk in call:
                    self.check_chunk(chunk, offset)
                    out.write(chunk.data)
                    offset += len(chunk.data)
                    self.received += len(chunk.data)
                    if offset == self.plan.size_bytes:
                        break
            finally:
                if not call.done():
                    call.cancel()
                out.flush()
                os.fsync(out.fileno())
        return offset


async def fetch_artifact(
    stub: Any, store: StateStore, plan: FetchPlan, backoff: Backoff
) -> FetchResult:
    """Fetch ``plan.sha256`` into artifacts/ and return where it is.

    Retryable stream errors resume from the part file's size; after ``plan.attempts``
    failures in a row without progress, a lost connection is re-raised (the caller
    reconnects) and anything else becomes FETCH_FAILED. A digest mismatch raises
    HASH_MISMATCH with "sha256 mismatch: expected X got Y".
    """
    download = _Download(store, plan)
    start = download.offset()
    download.check_disk(start)
    offset = start
    failures = 0
    while offset < plan.size_bytes:
        before = offset
        try:
            offset = await download.one_stream(stub, offset)
            if offset < plan.size_bytes:
                raise StreamEndedEarly(f"stream ended at byte {offset} of {plan.size_bytes}")
        except (grpc.aio.AioRpcError, StreamEndedEarly) as exc:
            offset = download.offset()
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.ABORTED
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
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
                "artifact %s: stream broke at byte %d of %d (%s: %s); resuming in %.2f s",
                plan.sha256,
                offset,
                plan.size_bytes,
                code.name,
                detail,
                delay,
            )
            await asyncio.sleep(delay)
    if start:
        log.info(
            "artifact %s: resumed at byte %d, received %d bytes",
            plan.sha256,
            start,
            download.received,
        )
    path = await asyncio.to_thread(store.promote_partial, plan.sha256)
    return FetchResult(
        path=path,
        total_bytes=plan.size_bytes,
        resumed_from=start,
        received=download.received,
        encoding=fleet_pb2.PAYLOAD_ENCODING_FULL,
    )
