"""The artifact distribution path under load and odd data: FetchArtifact's events stay
bounded per device while its counters count every call; a delta base is the model's own
even when another model holds the same bytes; delta encodes and blob reads run on pools
sized by the controller config; repairs keep one corrupt copy per digest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import event

from artifact.delta import apply_delta_bytes
from controller.agents import _FetchEvents
from controller.blobstore import VERIFIED_TTL_SECONDS, BlobStore
from controller.config import ConfigError, ControllerConfig
from controller.db import make_engine
from controller.sql_store import SqlStore
from protos import fleet_pb2 as pb
from tests.controller.helpers import Harness, collect, onnx_model, run, running_controller, sha256
from tests.controller.test_agent_rpc import deployed, fetch_request, finetuned
from tests.controller.test_blob_integrity import (
    DATA_LOSS,
    blob_path,
    corrupt,
    read_until_status,
    rot_in_place,
    update_sums,
)


async def fetch_details(c: Harness, device_id: str = "hub-1") -> list[dict[str, Any]]:
    details = [json.loads(e.detail_json) for e in await c.events("artifact.fetch")]
    return [d for d in details if d["device_id"] == device_id]


async def assign(c: Harness, art: pb.Artifact) -> None:
    await c.admin.Assign(pb.AssignRequest(artifact_id=art.id, device_class="home-hub"), timeout=10)


# ---------------------------------------------------------------- 1. bounded events


def test_many_tiny_resumed_fetches_add_a_bounded_handful_of_events_and_count_every_byte(
    tmp_path: Path,
) -> None:
    """100 one-byte fetches at the end of an artifact wrote 100 event rows (a device could
    add ~130 a second). Now the first has an event, the other 99 are summed up in the
    device's next event of that payload, here its completed download, which always has
    one; the download sums (/metrics) still count every call and every byte."""

    async def body() -> None:
        async with running_controller(tmp_path, metrics_port=0) as c:
            data, art = await deployed(c, weights=20_000)
            size = len(data)
            at_end = fetch_request(art, offset=size - 1)
            for _ in range(100):
                (last,) = await collect(c.agent.FetchArtifact(at_end, timeout=10))
                assert last.data == data[-1:]
            (first,) = await fetch_details(c)
            assert (first["offset"], first["bytes_sent"], first["calls_summarised"]) == (
                size - 1,
                1,
                0,
            )
            assert first["update_completed"] is False

            chunks = await collect(c.agent.FetchArtifact(fetch_request(art), timeout=10))
            assert b"".join(ch.data for ch in chunks) == data
            first_again, done = await fetch_details(c)
            assert first_again == first
            assert (done["offset"], done["bytes_sent"], done["update_completed"]) == (0, size, True)
            assert (done["calls_summarised"], done["bytes_summarised"]) == (99, 99)
            assert done["updates_summarised"] == 0
            assert "99 earlier call(s)" in (await c.events("artifact.fetch"))[-1].message

            # every call and byte counted, as before
            assert await update_sums(c, art.id) == {
                "update_fetches": 101,
                "updates_completed": 1,
                "update_full_bytes": size,
                "update_bytes_sent": 100 + size,
            }

            # another device's calls are its own: their first call has an event too
            await c.register("hub-2")
            await collect(c.agent.FetchArtifact(fetch_request(art, device_id="hub-2"), timeout=10))
            (other,) = await fetch_details(c, "hub-2")
            assert (other["update_completed"], other["calls_summarised"]) == (True, 0)

    run(body())


def test_calls_held_back_are_summed_up_in_the_first_event_after_the_interval() -> None:
    """Per (device, payload): one event per interval for completions, one for other
    calls; what came between is told by the next event, counted exactly."""
    now = [0.0]
    events = _FetchEvents(interval_s=60.0, clock=lambda: now[0])
    assert events.ended("hub-1", "p", 10, completed=False) is not None  # a transfer starts
    for _ in range(5):
        assert events.ended("hub-1", "p", 7, completed=False) is None  # it keeps breaking
    done = events.ended("hub-1", "p", 100, completed=True)  # an update is always told...
    assert done is not None and (done.calls, done.bytes_sent, done.updates) == (5, 35, 0)
    assert events.ended("hub-1", "p", 100, completed=True) is None  # ...a loop's repeats not
    assert events.ended("hub-2", "p", 1, completed=False) is not None  # per device
    assert events.ended("hub-1", "q", 1, completed=False) is not None  # and per payload
    now[0] = 60.0
    later = events.ended("hub-1", "p", 3, completed=False)
    assert later is not None and (later.calls, later.bytes_sent, later.updates) == (1, 100, 1)

    bounded = _FetchEvents(interval_s=60.0, max_keys=2, clock=lambda: now[0])
    for payload in ("a", "b", "c"):
        assert bounded.ended("hub-1", payload, 1, completed=False) is not None
    # "a" was forgotten (the least recently moved): memory stays bounded
    assert bounded.ended("hub-1", "a", 1, completed=False) is not None
    assert bounded.ended("hub-1", "c", 1, completed=False) is None


# ---------------------------------------------------------------- 2. the model's own base


def test_a_base_whose_bytes_another_model_shares_still_gets_a_delta(tmp_path: Path) -> None:
    """Two models with identical bytes (one file registered under two names): the
    newest artifact holding the base's bytes is the other model's, which made the
    controller refuse the base and send the full artifact."""

    async def body() -> None:
        async with running_controller(tmp_path) as c:
            old_data, old_art = await deployed(c, weights=60_000)
            await asyncio.sleep(1.05)  # creation times are whole seconds: the twin's is newer
            await c.add_model("twin", old_data)
            twin_art = await c.artifact("twin", "home-hub")
            assert twin_art.sha256 == old_art.sha256
            new_data = finetuned(old_data)
            await c.add_model("motions", new_data)
            new_art = await c.artifact("motions", "home-hub")
            await assign(c, new_art)

            engine = make_engine(c.config.database_url)
            try:
                store = SqlStore(engine)
                # the lookup by bytes alone finds the twin's artifact: the old check failed
                found = store.find_artifact_by_sha256(old_art.sha256)
                assert found is not None and found.model_name == "twin"
                plans = model_artifact_plans(engine, store, "motions", old_art.sha256)
                mine = store.find_model_artifact("motions", old_art.sha256)
                assert mine is not None and mine.id == old_art.id
                theirs = store.find_model_artifact("twin", old_art.sha256)
                assert theirs is not None and theirs.id == twin_art.id
                assert store.find_model_artifact("nobody", old_art.sha256) is None
                assert store.find_model_artifact("motions", sha256(b"never stored")) is None
            finally:
                engine.dispose()
            # answered from the sha256 index, never by reading the whole artifacts table
            assert any("USING INDEX ix_artifacts_sha256" in step for step in plans), plans
            assert not any(step.startswith("SCAN artifacts") for step in plans), plans

            request = fetch_request(new_art, base_sha256=old_art.sha256, chunk_bytes=1 << 20)
            chunks = await collect(c.agent.FetchArtifact(request, timeout=60))
            assert {ch.encoding for ch in chunks} == {pb.PAYLOAD_ENCODING_DELTA}
            payload = b"".join(ch.data for ch in chunks)
            assert len(payload) < len(new_data) / 5
            assert apply_delta_bytes(old_data, payload, new_art.sha256) == new_data

    run(body())


def model_artifact_plans(engine: Any, store: SqlStore, model: str, digest: str) -> list[str]:
    """SQLite's plan for the very statement ``find_model_artifact`` runs."""
    statements: list[tuple[str, Any]] = []

    def seen(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", seen)
    try:
        store.find_model_artifact(model, digest)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    ((statement, parameters),) = [s for s in statements if "FROM artifacts" in s[0]]
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
    return [str(row[-1]) for row in rows]


# ---------------------------------------------------------------- 3. pools and trust


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("blob_read_threads", 0, "an integer in 1..256"),
        ("blob_read_threads", 2.5, "an integer in 1..256"),
        ("blob_read_threads", True, "an integer in 1..256"),
        ("delta_threads", 0, "an integer in 1..64"),
        ("delta_threads", 65, "an integer in 1..64"),
        ("delta_threads", "2", "an integer in 1..64"),
        ("verified_blob_trust_seconds", 0, "a number of seconds in (0, 86400]"),
        ("verified_blob_trust_seconds", -1.0, "a number of seconds in (0, 86400]"),
        ("verified_blob_trust_seconds", math.nan, "a number of seconds in (0, 86400]"),
        ("verified_blob_trust_seconds", 86_401, "a number of seconds in (0, 86400]"),
        ("verified_blob_trust_seconds", "600", "a number of seconds in (0, 86400]"),
    ],
)
def test_pool_sizes_and_the_trust_window_are_checked_when_the_config_is_built(
    tmp_path: Path, field: str, value: object, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        ControllerConfig(data_dir=tmp_path, **{field: value})  # type: ignore[arg-type]
    assert str(caught.value).startswith(f"{field} must be {expected}, got ")


def test_pool_sizes_and_the_trust_window_default_to_what_they_were(tmp_path: Path) -> None:
    config = ControllerConfig(data_dir=tmp_path)
    assert (config.blob_read_threads, config.delta_threads) == (4, 2)
    assert config.verified_blob_trust_seconds == VERIFIED_TTL_SECONDS == 600.0
    tuned = ControllerConfig(
        data_dir=tmp_path, blob_read_threads=8, delta_threads=1, verified_blob_trust_seconds=30
    )
    assert (tuned.blob_read_threads, tuned.delta_threads) == (8, 1)
    assert tuned.verified_blob_trust_seconds == 30


def test_the_configured_trust_window_decides_when_a_resumed_fetch_hashes_again(
    tmp_path: Path,
) -> None:
    """With the default window a resumed fetch of a blob hashed whole lately skips its
    prefix (test_blob_integrity); a window of a millisecond has it hashed again, so rot
    in place is caught by the very next resumed fetch."""

    async def body() -> None:
        async with running_controller(tmp_path, verified_blob_trust_seconds=0.001) as c:
            data, art = await deployed(c, weights=60_000)
            await collect(c.agent.FetchArtifact(fetch_request(art), timeout=10))  # hashed whole
            rot_in_place(blob_path(c, art.sha256), 10)
            await asyncio.sleep(0.01)  # the window runs out
            resumed = fetch_request(art, offset=len(data) - 1)
            chunks, exc = await read_until_status(c.agent.FetchArtifact(resumed))
            assert (chunks, exc.code()) == ([], DATA_LOSS)

    run(body())


def test_delta_encodes_and_blob_reads_run_on_pools_of_the_configured_size(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two pairs encoded at once on a one-thread delta pool share its one thread (never
    asyncio's default executor); four downloads at once on a one-thread read pool too."""

    async def body() -> None:
        async with running_controller(tmp_path, blob_read_threads=1, delta_threads=1) as c:
            v1, art1 = await deployed(c, weights=60_000)
            v2 = finetuned(v1, seed=2)
            await c.add_model("motions", v2)
            art2 = await c.artifact("motions", "home-hub")
            v3 = finetuned(v2, seed=3)
            await c.add_model("motions", v3)
            art3 = await c.artifact("motions", "home-hub")
            await assign(c, art3)
            deltas = [
                collect(c.agent.FetchArtifact(fetch_request(art3, base_sha256=base), timeout=60))
                for base in (art1.sha256, art2.sha256)
            ]
            for chunks, base in zip(await asyncio.gather(*deltas), (v1, v2), strict=True):
                assert {ch.encoding for ch in chunks} == {pb.PAYLOAD_ENCODING_DELTA}
                payload = b"".join(ch.data for ch in chunks)
                assert apply_delta_bytes(base, payload, art3.sha256) == v3
            fulls = [
                collect(c.agent.FetchArtifact(fetch_request(art3), timeout=60)) for _ in range(4)
            ]
            for chunks in await asyncio.gather(*fulls):
                assert b"".join(ch.data for ch in chunks) == v3
            readers = {t.name for t in threading.enumerate() if t.name.startswith("blob-read")}
            assert readers == {"blob-read_0"}

    with caplog.at_level(logging.INFO, logger="controller.deltas"):
        run(body())
    encoded = [r for r in caplog.records if r.getMessage().startswith("delta ")]
    assert len(encoded) == 2
    assert {r.threadName for r in encoded} == {"delta-encode_0"}


# ---------------------------------------------------------------- 4. corrupt/ is bounded


def test_repairs_keep_one_corrupt_copy_per_digest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every repair kept a full copy under blobs/corrupt/ for good: a disk that keeps
    rotting one blob filled the volume. The newest copy replaces the one before."""
    store = BlobStore(tmp_path / "blobs")
    data = onnx_model(weights=20_000)
    ref = store.put_bytes(data)
    other = store.put_bytes(b"another blob" * 1000)
    corrupt(store.path_for(other.sha256), 3)
    assert store.put_bytes(b"another blob" * 1000).repaired
    (other_kept,) = store.evidence(other.sha256)

    with caplog.at_level(logging.WARNING, logger="controller.blobstore"):
        for at in (5, 50, 500):
            corrupt(store.path_for(ref.sha256), at)
            rotten = store.path_for(ref.sha256).read_bytes()
            assert store.put_bytes(data).repaired
            (kept,) = store.evidence(ref.sha256)  # one copy, the newest
            assert kept.read_bytes() == rotten
            assert store.read(ref.sha256) == data
    dropped = [r for r in caplog.records if "removed the corrupt copy" in r.getMessage()]
    assert len(dropped) == 2 and all(ref.sha256 in r.getMessage() for r in dropped)
    assert store.evidence(other.sha256) == [other_kept]  # another digest's copy stays
    assert sorted(p.name for p in store.corrupt_dir.iterdir()) == sorted(
        [kept.name, other_kept.name]
    )


def test_a_repair_through_the_controller_replaces_the_copy_an_earlier_one_kept(
    tmp_path: Path,
) -> None:
    """The documented fix (`model add` of the same file) run twice for one artifact."""

    async def body() -> None:
        async with running_controller(tmp_path) as c:
            data, art = await deployed(c, weights=20_000)
            blobs = BlobStore(c.config.blob_dir)
            for at in (100, 200):
                corrupt(blob_path(c, art.sha256), at)
                rotten = blob_path(c, art.sha256).read_bytes()
                _, exc = await read_until_status(c.agent.FetchArtifact(fetch_request(art)))
                assert exc.code() == grpc.StatusCode.DATA_LOSS
                await c.add_model("motions", data)  # the same bytes: the repair
                (kept,) = blobs.evidence(art.sha256)
                assert kept.read_bytes() == rotten
            chunks = await collect(c.agent.FetchArtifact(fetch_request(art), timeout=10))
            assert b"".join(ch.data for ch in chunks) == data

    run(body())
