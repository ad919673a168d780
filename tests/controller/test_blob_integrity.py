"""The controller checks the bytes it serves: a corrupt blob is never handed on whole.

Each test corrupts a real blob on disk under a real controller (blob files are 0444, as
the store leaves them) and fetches over loopback gRPC: an artifact's corrupt bytes end
the download with DATA_LOSS before its last chunk, are recorded once as a blob.corrupt
event and refused from then on until the same bytes are added again; a corrupt cached
delta is computed again instead of being sent, or, found while it is sent, ends the call
FAILED_PRECONDITION so the agent starts over at once. An edge agent's fetch gives up on
such an artifact without keeping what it received, and gets the repaired artifact next
time. A blob hashed whole lately is not hashed again to resume a download (the bytes a
device could make the controller read with 1-byte fetches), and such calls count no
completed update. A blob cut short, missing or unreadable ends DATA_LOSS with the fix
and one event. The last test is about how the same download path ends when its client
stops reading.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import stat
from pathlib import Path
from typing import Any

import grpc
import pytest

from artifact.delta import apply_delta_bytes
from artifact.delta.format import FORMAT_VERSION
from controller.blobstore import (
    VERIFIED_TTL_SECONDS,
    BlobStore,
    CorruptBlobError,
    FileIdentity,
    RecentlyVerified,
)
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
from tests.controller.test_stream_limits import (
    big_model,
    download_calls,
    stalled_fetch,
    stalling_channel,
)
from tests.controller.test_stream_limits import deployed as deployed_big
from tests.controller.test_telemetry_metrics import scrape_controller, values

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
            # not DATA_LOSS: nothing of the operator's is lost, and an agent told
            # FAILED_PRECONDITION starts over at once instead of after its backoff
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
            assert "cached delta" in (exc.details() or "") and new_art.id in (exc.details() or "")
            assert "from offset 0" in (exc.details() or "")
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
    before, _ = await download_calls(c)

    async def timed_out() -> bool:
        return (await download_calls(c))[0] == before + per_device

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


# ---------------------------------------------------------------- QA pass 7


def rot_in_place(path: Path, at: int) -> None:
    """Flip a byte and put the file's mtime back: bit rot that leaves its identity (inode,
    size, mtime) as it was, so only hashing the bytes can notice it."""
    st = path.stat()
    corrupt(path, at)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_download_that_read_the_old_copy_does_not_refuse_the_repaired_one(
    tmp_path: Path,
) -> None:
    """A slow download of a corrupt blob still reads the old file when the same bytes are
    added again; its DATA_LOSS must not record the repaired file as the corrupt one."""

    async def body() -> None:
        async with running_controller(tmp_path) as c:
            art = await deployed_big(c, "hub-1")
            data = big_model()
            path = blob_path(c, art.sha256)
            corrupt(path, len(data) // 2)
            async with stalling_channel(c) as channel:
                slow = await stalled_fetch(channel, art, "hub-1")  # reading the old file
                repaired = await c.add_model("big", data)
                assert repaired.sha256 == art.sha256 and path.read_bytes() == data
                _, exc = await read_until_status(slow)
                assert exc.code() == DATA_LOSS, exc

            chunks = await collect(c.agent.FetchArtifact(fetch_request(art), timeout=30))
            assert sha256(b"".join(ch.data for ch in chunks)) == art.sha256
            at_end = fetch_request(art, offset=len(data) - 1)
            (last,) = await collect(c.agent.FetchArtifact(at_end, timeout=10))
            assert last.data == data[-1:]
            assert not (c.config.blob_dir / "corrupt" / f"{art.sha256}.json").exists()

    run(body())


def test_storing_sound_bytes_again_clears_any_corruption_record(tmp_path: Path) -> None:
    """A record naming the file that is there now, while it is sound (left by an earlier
    version's race), is cleared by the next `model add` of those bytes: else it would
    refuse the blob for good, and adding it again would change nothing."""
    store = BlobStore(tmp_path / "blobs")
    data = b"sound bytes" * 1000
    ref = store.put_bytes(data)
    assert store.mark_corrupt(CorruptBlobError(ref.sha256, sha256(b"other"), len(data)))
    assert store.known_corrupt(ref.sha256) is not None

    again = store.put_bytes(data)
    assert (again.created, again.repaired) == (False, False)
    assert store.known_corrupt(ref.sha256) is None


def test_a_resumed_fetch_of_a_blob_hashed_whole_lately_does_not_hash_it_again(
    tmp_path: Path,
) -> None:
    """1-byte fetches at the end of a big blob made the controller hash all of it each
    time. A blob found sound by a full read is trusted for resumed reads of the same file
    (VERIFIED_TTL_SECONDS): rot that keeps the file's identity is then not seen by them,
    but still by any download from byte 0, and by a changed file at once."""

    async def body() -> None:
        async with running_controller(tmp_path) as c:
            data, art = await deployed(c, weights=60_000)
            path = blob_path(c, art.sha256)
            await collect(c.agent.FetchArtifact(fetch_request(art), timeout=10))  # hashed whole
            rot_in_place(path, 10)

            at_end = fetch_request(art, offset=len(data) - 1)
            for _ in range(3):  # the prefix is neither read nor hashed again
                (last,) = await collect(c.agent.FetchArtifact(at_end, timeout=10))
                assert (last.offset, last.data) == (len(data) - 1, data[-1:])
            assert await c.events("blob.corrupt") == []

            # from byte 0 the digest is still checked before the last chunk
            chunks, exc = await read_until_status(c.agent.FetchArtifact(fetch_request(art)))
            assert exc.code() == DATA_LOSS, exc
            assert all(ch.offset + len(ch.data) < len(data) for ch in chunks)
            # ...and from then on it is refused, resumed or not
            chunks, exc = await read_until_status(c.agent.FetchArtifact(at_end))
            assert (chunks, exc.code()) == ([], DATA_LOSS)

            # a file that changed is hashed again: no trust carried over to it
            other = onnx_model(weights=20_000, seed=3)
            await c.add_model("other", other)
            other_art = await c.artifact("other", "home-hub")
            await c.admin.Assign(
                pb.AssignRequest(artifact_id=other_art.id, device_class="home-hub"), timeout=10
            )
            await collect(c.agent.FetchArtifact(fetch_request(other_art), timeout=10))
            corrupt(blob_path(c, other_art.sha256), 10)  # a write: a new mtime
            resumed = fetch_request(other_art, offset=len(other) - 1)
            chunks, exc = await read_until_status(c.agent.FetchArtifact(resumed))
            assert (chunks, exc.code()) == ([], DATA_LOSS)
            assert [d["artifact_id"] for d in await corrupt_events(c)] == [art.id, other_art.id]

    run(body())


def test_trust_in_a_verified_blob_runs_out_and_is_bounded(tmp_path: Path) -> None:
    data = b"0123456789" * 10_000
    for ttl, caught in ((VERIFIED_TTL_SECONDS, False), (0.0, True)):
        store = BlobStore(tmp_path / f"ttl-{ttl}", verified_ttl_seconds=ttl)
        ref = store.put_bytes(data)
        store.verify(ref.sha256)
        rot_in_place(store.path_for(ref.sha256), 5)
        if caught:  # the time ran out: hashed again
            with pytest.raises(CorruptBlobError):
                store.verify(ref.sha256)
        else:
            store.verify(ref.sha256)

    verified = RecentlyVerified(max_entries=3)
    identity = FileIdentity(1, 10, 1)
    for i in range(5):
        verified.note(f"{i:064x}", 10, identity)
    assert len(verified) == 3
    assert not verified.holds(f"{0:064x}", 10, identity)
    assert verified.holds(f"{4:064x}", 10, identity)
    assert not verified.holds(f"{4:064x}", 10, FileIdentity(2, 10, 1))  # another file


async def update_sums(c: Harness, artifact_id: str) -> dict[str, float]:
    """The download sums /metrics exports for one artifact's full downloads."""
    metrics = await scrape_controller(c)
    sums = {}
    for name in ("update_fetches", "updates_completed", "update_full_bytes", "update_bytes_sent"):
        family = f"homefleet_{name}"
        found = values(metrics.get(family, []), f"{family}_total", artifact_id=artifact_id)
        sums[name] = sum(found.values())
    return sums


def test_calls_resumed_near_the_end_count_no_completed_update(tmp_path: Path) -> None:
    """311 one-byte calls at offset size-1 counted 311 completed updates (63 GB of "full
    bytes" for deltas to have saved). A call completes an update only when the device's
    calls sent every byte before its offset: from 0, or resumed where they stopped."""

    async def body() -> None:
        async with running_controller(tmp_path, metrics_port=0) as c:
            data, art = await deployed(c, weights=200_000)
            for offset in (len(data) - 1, len(data), len(data) - 1):
                await collect(c.agent.FetchArtifact(fetch_request(art, offset=offset), timeout=10))
            assert await update_sums(c, art.id) == {
                "update_fetches": 3,
                "updates_completed": 0,
                "update_full_bytes": 0,
                "update_bytes_sent": 2,
            }

            # a download cut short, then resumed where the device's bytes end: one update
            call = c.agent.FetchArtifact(fetch_request(art), timeout=10)
            first = await call.read()
            call.cancel()

            async def cut_recorded() -> bool:
                return (await update_sums(c, art.id))["update_fetches"] == 4

            await eventually(cut_recorded)
            rest = fetch_request(art, offset=len(first.data))
            chunks = await collect(c.agent.FetchArtifact(rest, timeout=10))
            assert first.data + b"".join(ch.data for ch in chunks) == data
            sums = await update_sums(c, art.id)
            assert (sums["updates_completed"], sums["update_full_bytes"]) == (1, len(data))

            # that update is over: a call at the end now counts none again
            at_end = fetch_request(art, offset=len(data) - 1)
            await collect(c.agent.FetchArtifact(at_end, timeout=10))
            assert (await update_sums(c, art.id))["updates_completed"] == 1

    run(body())


def test_a_blob_cut_short_is_read_to_its_recorded_size_and_found_corrupt(
    tmp_path: Path,
) -> None:
    """The full payload's size is the artifact's, not the file's: an agent no longer
    stops at "controller says N bytes; its manifest says M" on every retry while the
    controller never learns the blob lost its tail."""

    async def body() -> None:
        async with running_controller(tmp_path) as c:
            data, art = await deployed(c, weights=60_000)
            path = blob_path(c, art.sha256)
            path.chmod(0o644)
            with path.open("r+b") as f:
                f.truncate(len(data) // 2)
            path.chmod(0o444)
            store = StateStore(tmp_path / "agent")
            plan = FetchPlan("hub-1", art.sha256, len(data), CHUNK, timeout_s=10, attempts=3)
            backoff = Backoff(0.01, 0.05, rng=random.Random(0))
            with pytest.raises(AgentError) as failed:
                await fetch_artifact(c.agent, store, plan, backoff)
            message = failed.value.message
            for fragment in ("DATA_LOSS", "cut short", str(len(data) // 2), str(len(data))):
                assert fragment in message, (fragment, message)
            assert "homefleet model add motions" in message
            (detail,) = await corrupt_events(c)
            assert (detail["artifact_id"], detail["bytes_found"]) == (art.id, len(data) // 2)

            await c.add_model("motions", data)
            result = await fetch_artifact(c.agent, store, plan, backoff)
            assert result.path.read_bytes() == data

    run(body())


def test_a_missing_or_unreadable_blob_says_the_fix_and_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            data, art = await deployed(c, weights=20_000)
            path = blob_path(c, art.sha256)
            path.unlink()
            for _ in range(3):
                chunks, exc = await read_until_status(c.agent.FetchArtifact(fetch_request(art)))
                assert (chunks, exc.code()) == ([], DATA_LOSS)
                message = exc.details() or ""
                for fragment in ("missing", art.id, "homefleet model add motions"):
                    assert fragment in message, (fragment, message)
            (missing,) = await c.events("blob.missing")
            assert missing.subject == art.id

            # a path the file system will not read as a file: an I/O error, not a bug
            path.mkdir()
            for _ in range(3):
                chunks, exc = await read_until_status(c.agent.FetchArtifact(fetch_request(art)))
                assert (chunks, exc.code()) == ([], DATA_LOSS)
                assert "check the controller's disk" in (exc.details() or "")
            (unreadable,) = await c.events("blob.unreadable")
            assert json.loads(unreadable.detail_json)["expected_sha256"] == art.sha256
            path.rmdir()

            await c.add_model("motions", data)
            chunks = await collect(c.agent.FetchArtifact(fetch_request(art), timeout=10))
            assert b"".join(ch.data for ch in chunks) == data

    with caplog.at_level(logging.ERROR):
        run(body())
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_downloads_are_counted_for_the_artifact_the_device_was_assigned(
    tmp_path: Path,
) -> None:
    """One model's bytes as two artifacts (built alike for two classes): a hub's download
    is about the hub's artifact, not whichever holds those bytes and was made last."""

    async def body() -> None:
        async with running_controller(tmp_path, metrics_port=0) as c:
            _, hub_art = await deployed(c, weights=20_000)
            await asyncio.sleep(1.05)  # creation times are whole seconds: the garage's is newer
            garage_art = await c.artifact("motions", "garage")
            assert garage_art.sha256 == hub_art.sha256 and garage_art.id != hub_art.id
            await c.admin.Assign(
                pb.AssignRequest(artifact_id=garage_art.id, device_class="garage"), timeout=10
            )
            await collect(c.agent.FetchArtifact(fetch_request(hub_art), timeout=10))
            (event,) = await c.events("artifact.fetch")
            assert json.loads(event.detail_json)["artifact_id"] == hub_art.id
            assert hub_art.id in event.message
            assert (await update_sums(c, hub_art.id))["updates_completed"] == 1
            assert (await update_sums(c, garage_art.id))["update_fetches"] == 0

            corrupt(blob_path(c, hub_art.sha256), 10)
            _, exc = await read_until_status(c.agent.FetchArtifact(fetch_request(hub_art)))
            assert exc.code() == DATA_LOSS and hub_art.id in (exc.details() or "")
            (detail,) = await corrupt_events(c)
            assert detail["artifact_id"] == hub_art.id

    run(body())


def test_an_agent_starts_over_at_once_when_a_cached_delta_is_found_corrupt_as_it_streams(
    tmp_path: Path,
) -> None:
    """A delta trusted as found sound lately, rotten in place since, is caught by the
    digest check of a download from byte 0, before its only chunk; the agent, told
    FAILED_PRECONDITION, starts over in the same fetch and gets a fresh delta."""

    async def body() -> None:
        async with running_controller(tmp_path) as c:
            old_data, old_art = await deployed(c, weights=60_000)
            new_data, new_art = await new_version(c, old_data, 0.02)
            request = fetch_request(new_art, base_sha256=old_art.sha256, chunk_bytes=1 << 20)
            (only,) = await collect(c.agent.FetchArtifact(request, timeout=60))
            assert only.encoding == pb.PAYLOAD_ENCODING_DELTA
            rot_in_place(blob_path(c, only.payload_sha256), len(only.data) // 2)

            store = StateStore(tmp_path / "agent")
            store.artifacts_dir.mkdir(parents=True, exist_ok=True)
            store.artifact_path(old_art.sha256).write_bytes(old_data)
            plan = FetchPlan(
                "hub-1", new_art.sha256, len(new_data), 1 << 20, timeout_s=30, attempts=3,
                base_sha256=old_art.sha256,
            )  # fmt: skip
            backoff = Backoff(60.0, 60.0, rng=random.Random(0))  # a backoff would time out
            result = await fetch_artifact(c.agent, store, plan, backoff)
            assert result.path.read_bytes() == new_data
            assert result.encoding == pb.PAYLOAD_ENCODING_DELTA
            (detail,) = await corrupt_events(c)
            assert (detail["blob"], detail["expected_sha256"]) == ("delta", only.payload_sha256)

    run(body())
