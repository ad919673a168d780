"""The controller checks the bytes it serves: a corrupt blob is never handed on whole.

Each test corrupts a real blob on disk under a real controller (blob files are 0444, as
the store leaves them) and fetches over loopback gRPC: an artifact's corrupt bytes end
the download with DATA_LOSS before its last chunk, are recorded once as a blob.corrupt
event and refused from then on until the same bytes are added again; a corrupt cached
delta is computed again instead of being sent. An edge agent's fetch gives up on such a
download without keeping what it received, and gets the repaired artifact next time.
The last test is about how the same download path ends when its client stops reading.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest

from artifact.delta import apply_delta_bytes
from artifact.delta.format import FORMAT_VERSION
from edge_agent.backoff import Backoff
from edge_agent.errors import AgentError
from edge_agent.errors import ErrorCode as AgentCode
from edge_agent.fetch import FetchPlan, fetch_artifact
from edge_agent.store import StateStore
from protos import fleet_pb2 as pb
from tests.controller.helpers import (
    Harness,
    collect,
    eventually,
    onnx_model,
    run,
    running_controller,
    sha256,
)
from tests.controller.test_agent_rpc import CHUNK, deployed, fetch_request, finetuned
from tests.controller.test_stream_limits import deployed as deployed_big
from tests.controller.test_stream_limits import stalled_fetch, stalling_channel

DATA_LOSS = grpc.StatusCode.DATA_LOSS


def blob_path(c: Harness, digest: str) -> Path:
    return c.config.blob_dir / "sha256" / digest[:2] / digest


def corrupt(path: Path, at: int) -> None:
    """Flip one byte in place, as bit rot would (the file keeps its mode and inode)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    path.chmod(0o644)
    with path.open("r+b") as f:
        f.seek(at)
        (byte,) = f.read(1)
        f.seek(at)
        f.write(bytes([byte ^ 0xFF]))
    path.chmod(mode)


async def read_until_status(call: Any) -> tuple[list[pb.ArtifactChunk], grpc.aio.AioRpcError]:
    """The chunks a download delivered before it failed, and how it failed."""
    chunks: list[pb.ArtifactChunk] = []
    try:
        while isinstance(chunk := await call.read(), pb.ArtifactChunk):  # else grpc.aio.EOF
            chunks.append(chunk)
    except grpc.aio.AioRpcError as exc:
        return chunks, exc
    raise AssertionError(f"the download succeeded ({len(chunks)} chunks) although corrupt")


async def corrupt_events(c: Harness) -> list[dict[str, Any]]:
    return [json.loads(e.detail_json) for e in await c.events("blob.corrupt")]


def test_a_corrupt_artifact_ends_before_its_last_chunk_and_is_refused_until_added_again(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            data, art = await deployed(c, weights=60_000)
            assert len(data) > 3 * CHUNK
            path = blob_path(c, art.sha256)
            corrupt(path, len(data) // 2)
            rotten = path.read_bytes()

            chunks, exc = await read_until_status(c.agent.FetchArtifact(fetch_request(art)))
            assert exc.code() == DATA_LOSS, exc
            message = exc.details() or ""
            for fragment in (art.id, art.sha256, sha256(rotten), "homefleet model add motions"):
                assert fragment in message, (fragment, message)
            # every chunk but the last went out (streamed while hashed), never the last
            assert [ch.offset for ch in chunks] == list(range(0, len(data), CHUNK))[:-1]
            assert all(ch.offset + len(ch.data) < len(data) for ch in chunks)

            (event,) = await c.events("blob.corrupt")
            assert event.subject == art.id
            detail = json.loads(event.detail_json)
            assert (detail["artifact_id"], detail["blob"]) == (art.id, "artifact")
            assert (detail["expected_sha256"], detail["actual_sha256"]) == (
                art.sha256,
                sha256(rotten),
            )
            assert (detail["device_id"], detail["offset"]) == ("hub-1", 0)
            fetched = json.loads((await c.events("artifact.fetch"))[-1].detail_json)
            assert fetched["completed"] is False

            # from now on refused at once: no byte streamed, no second event
            chunks, exc = await read_until_status(c.agent.FetchArtifact(fetch_request(art)))
            assert (chunks, exc.code()) == ([], DATA_LOSS)
            assert art.id in (exc.details() or "")
            assert len(await c.events("blob.corrupt")) == 1
            assert path.read_bytes() == rotten  # the evidence stays where rows name it

            # the same bytes added again replace the corrupt copy, which is kept aside
            again = await c.add_model("motions", data)
            assert again.sha256 == art.sha256
            chunks = await collect(c.agent.FetchArtifact(fetch_request(art), timeout=10))
            assert b"".join(ch.data for ch in chunks) == data
            assert path.read_bytes() == data
            (kept,) = (c.config.blob_dir / "corrupt").glob(f"{art.sha256}.*.blob")
            assert kept.read_bytes() == rotten

    run(body())


def test_a_resumed_fetch_hashes_the_prefix_it_does_not_send(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            data, art = await deployed(c, weights=60_000)
            corrupt(blob_path(c, art.sha256), 10)  # before any byte this fetch sends

            request = fetch_request(art, offset=CHUNK, encoding=pb.PAYLOAD_ENCODING_FULL)
            chunks, exc = await read_until_status(c.agent.FetchArtifact(request))
            assert exc.code() == DATA_LOSS, exc
            assert art.id in (exc.details() or "")
            assert chunks and chunks[0].offset == CHUNK
            assert all(ch.offset + len(ch.data) < len(data) for ch in chunks)
            (detail,) = await corrupt_events(c)
            assert (detail["artifact_id"], detail["offset"]) == (art.id, CHUNK)

            # resuming at the very end: the one (empty) chunk that would say "done" is
            # not sent either
            other = onnx_model(weights=20_000, seed=3)
            await c.add_model("other", other)
            other_art = await c.artifact("other", "home-hub")
            await c.admin.Assign(
                pb.AssignRequest(artifact_id=other_art.id, device_class="home-hub"), timeout=10
            )
            corrupt(blob_path(c, other_art.sha256), len(other) - 1)
            at_end = fetch_request(other_art, offset=len(other))
            chunks, exc = await read_until_status(c.agent.FetchArtifact(at_end))
            assert (chunks, exc.code()) == ([], DATA_LOSS)
            assert [d["artifact_id"] for d in await corrupt_events(c)] == [art.id, other_art.id]

    run(body())


async def new_version(c: Harness, old_data: bytes, fraction: float) -> tuple[bytes, pb.Artifact]:
    """A fine-tune of ``old_data`` as motions' next artifact, assigned to the class."""
    new_data = finetuned(old_data, fraction)
    await c.add_model("motions", new_data)
    new_art = await c.artifact("motions", "home-hub")
    await c.admin.Assign(
        pb.AssignRequest(artifact_id=new_art.id, device_class="home-hub"), timeout=10
    )
    return new_data, new_art


def test_a_corrupt_cached_delta_is_computed_again_not_sent(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            old_data, old_art = await deployed(c, weights=60_000)
            new_data, new_art = await new_version(c, old_data, 0.02)
            request = fetch_request(new_art, base_sha256=old_art.sha256)
            first = await collect(c.agent.FetchArtifact(request, timeout=60))
            digest = first[0].payload_sha256
            assert first[0].encoding == pb.PAYLOAD_ENCODING_DELTA
            corrupt(blob_path(c, digest), len(b"".join(ch.data for ch in first)) // 2)

            chunks = await collect(c.agent.FetchArtifact(request, timeout=60))
            payload = b"".join(ch.data for ch in chunks)
            assert {ch.encoding for ch in chunks} == {pb.PAYLOAD_ENCODING_DELTA}
            assert sha256(payload) == chunks[0].payload_sha256
            assert apply_delta_bytes(old_data, payload, new_art.sha256) == new_data
            assert sha256(blob_path(c, chunks[0].payload_sha256).read_bytes()) == (
                chunks[0].payload_sha256
            )

            async def reported() -> bool:
                return bool(await c.events("blob.corrupt"))

            await eventually(reported)  # recorded beside the fetch, not before it ends
            (detail,) = await corrupt_events(c)
            assert (detail["artifact_id"], detail["blob"]) == (new_art.id, "delta")
            assert (detail["expected_sha256"], detail["base_sha256"]) == (digest, old_art.sha256)
            assert detail["action"] == "removed and computed again"

    run(body())


def test_a_cached_delta_that_rots_while_it_is_sent_is_dropped_from_the_cache(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            old_data, old_art = await deployed(c, weights=500_000)
            new_data, new_art = await new_version(c, old_data, 0.5)
            request = fetch_request(new_art, base_sha256=old_art.sha256)
            call = c.agent.FetchArtifact(request, timeout=60)
            first = await call.read()  # the delta is computed and checked; it streams
            total, digest = first.total_bytes, first.payload_sha256
            assert first.encoding == pb.PAYLOAD_ENCODING_DELTA and total > 10 * CHUNK
            # the controller is a flow-control window ahead at most: it has not read this
            corrupt(blob_path(c, digest), total - 1)
            chunks, exc = await read_until_status(call)
            assert exc.code() == DATA_LOSS, exc
            assert "cached delta" in (exc.details() or "") and new_art.id in (exc.details() or "")
            assert first.offset + len(first.data) + sum(len(ch.data) for ch in chunks) < total

            record = (
                c.config.blob_dir
                / "deltas"
                / f"v{FORMAT_VERSION}"
                / old_art.sha256
                / f"{new_art.sha256}.json"
            )
            assert not record.exists() and not blob_path(c, digest).exists()
            (detail,) = await corrupt_events(c)
            assert (detail["blob"], detail["expected_sha256"]) == ("delta", digest)

            chunks = await collect(c.agent.FetchArtifact(request, timeout=60))
            payload = b"".join(ch.data for ch in chunks)
            assert apply_delta_bytes(old_data, payload, new_art.sha256) == new_data

    run(body())


def test_an_agent_keeps_nothing_of_a_corrupt_artifact_and_gets_it_once_repaired(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            data, art = await deployed(c, weights=60_000)
            corrupt(blob_path(c, art.sha256), 100)
            store = StateStore(tmp_path / "agent")
            plan = FetchPlan("hub-1", art.sha256, len(data), CHUNK, timeout_s=10, attempts=3)

            def backoff() -> Backoff:
                return Backoff(0.01, 0.05, rng=random.Random(0))

            try:
                await fetch_artifact(c.agent, store, plan, backoff())
            except AgentError as exc:
                # not retried in place: the deployment's own backoff decides when again
                assert exc.code is AgentCode.FETCH_FAILED, exc
                assert "DATA_LOSS" in exc.message and art.id in exc.message
            else:
                raise AssertionError("a corrupt artifact was fetched")
            assert store.partial_size(art.sha256) == 0  # what came may be the corrupt part
            assert len(await c.events("artifact.fetch")) == 1

            await c.add_model("motions", data)
            result = await fetch_artifact(c.agent, store, plan, backoff())
            assert result.path.read_bytes() == data
            assert result.resumed_from == 0

    run(body())


async def stall_until_timed_out_then_leave(
    c: Harness, art: pb.Artifact, device: str, per_device: int, leave: str
) -> None:
    """``per_device`` downloads whose client reads one chunk and stops; once the write
    timeout has ended each, the client cancels them or just closes its channel."""
    channel = stalling_channel(c)
    calls = [await stalled_fetch(channel, art, device) for _ in range(per_device)]
    before = len(await c.events("artifact.fetch"))

    async def timed_out() -> bool:
        return len(await c.events("artifact.fetch")) == before + per_device

    await eventually(timed_out)
    if leave == "cancel":
        for call in calls:
            call.cancel()
    await channel.close(None)
    # each let go of its chunk once its call was over: as many downloads as the device may
    # hold are accepted again, all at once
    probes: list[Any] = []

    async def released() -> bool:
        probe = c.agent.FetchArtifact(fetch_request(art, device_id=device), timeout=10)
        try:
            await probe.read()
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            return False
        probes.append(probe)
        return len(probes) == per_device

    await eventually(released)
    for probe in probes:
        probe.cancel()


def test_downloads_ended_by_the_write_timeout_whose_clients_then_leave_log_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A write timeout ends a download while gRPC still holds its chunk; the client then
    cancels, or drops its connection. The call is over: nothing to log, above all not
    grpc.aio's "ExecuteBatchError raised in core" traceback, which it used to log for
    most such downloads (their status, queued behind the unsent chunk, failed)."""

    async def body() -> None:
        async with running_controller(
            tmp_path, fetch_write_timeout_seconds=0.5, max_fetches_per_device=4
        ) as c:
            art = await deployed_big(c, "hub-1", "hub-2")
            await stall_until_timed_out_then_leave(c, art, "hub-1", 4, "cancel")
            await stall_until_timed_out_then_leave(c, art, "hub-2", 4, "close")
            await asyncio.sleep(0.2)  # the handlers' last steps after their calls ended

    with caplog.at_level(logging.ERROR):
        run(body())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
