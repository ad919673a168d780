"""One misbehaving device must not corrupt the fleet's telemetry (security QA, S1/S2/M4).

Each window alone was held to what a device can say, but not against the device's other
windows: ~293k overlapping year-long windows pushed the class rollup's count past 2^63-1,
and from then on every ingest of that key failed, dragging down every device sharing
the group commit. Two windows of 1e308 joules made the rollup +Inf for good, and any
text up to 32 characters was a new energy source (a new rollup row and series).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import Engine, text, update

from artifact import histogram
from controller.agents import ENERGY_SOURCES, MAX_INFERENCES_PER_MS
from controller.clock import unix_ms
from controller.db import TelemetryRollupRow, create_schema, make_engine
from controller.errors import ErrorCode, FleetError
from controller.records import DeviceRegistration, Hardware, TelemetryWindow
from controller.sql_store import SqlStore
from controller.telemetry_ingest import TelemetryIngest
from edge_agent.meters import EnergyMeter, NoMeter
from edge_agent.telemetry import Sample, Telemetry, Window
from edge_agent.telemetry_queue import TelemetryQueue
from edge_agent.telemetry_sender import Outcome, SendPlan, send_batch
from protos import fleet_pb2 as pb
from tests.controller.helpers import (
    Harness,
    assert_nothing_stored,
    catalogue,
    expect_status,
    run,
    running_controller,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
SHA = "ab" * 32
OTHER_SHA = "cd" * 32
MINUTE = 60_000
DAY = 24 * 60 * MINUTE
MAX_INT64 = 2**63 - 1
BUCKET = 20  # the histogram bucket every inference of these windows falls in
MODELS = ("motions", "doorbell", "radar")  # each with artifacts SHA and OTHER_SHA
BOOT_SEQ = 12_000_000  # an agent queue made 12 s after 1970 numbers from unix ms x 1000


@contextlib.asynccontextmanager
async def catalogued_controller(tmp_path: Path) -> AsyncIterator[Harness]:
    """A running controller that knows MODELS and their artifacts' digests."""
    async with running_controller(tmp_path) as c:
        for model in MODELS:
            catalogue(c.config.database_url, model, SHA, OTHER_SHA)
        yield c


def counts(n: int) -> list[int]:
    c = histogram.empty()
    c[BUCKET] = n
    return c


def window(
    seq: int,
    start: int,
    end: int,
    *,
    count: int = 10,
    model: str = "motions",
    sha: str = SHA,
    cpu: float = 0.1,
    joules: float = 1.0,
    source: str = "estimate",
) -> pb.TelemetryWindow:
    return pb.TelemetryWindow(
        seq=seq,
        model_name=model,
        artifact_sha256=sha,
        start_unix_ms=start,
        end_unix_ms=end,
        count=count,
        latency_bucket_counts=counts(count),
        cpu_seconds=cpu,
        joules=joules,
        energy_source=source,
    )


async def send(c: Harness, device_id: str, *windows: pb.TelemetryWindow) -> int:
    batch = pb.TelemetryBatch(device_id=device_id, windows=list(windows))
    ack = await c.agent.ReportTelemetry(batch, timeout=10)
    return int(ack.highest_seq)


def rollup(c: Harness) -> list[tuple[str, str, str, int, int, float]]:
    with sqlite3.connect(c.config.data_dir / "homefleet.db") as db:
        return [
            (str(k), str(m), str(s), int(w), int(n), float(j))
            for k, m, s, w, n, j in db.execute(
                "SELECT device_class, model_name, energy_source, windows, count, joules "
                "FROM telemetry_rollup ORDER BY device_class, model_name, energy_source"
            )
        ]


# ------------------------------------------------------------------ S1 (a): no overlap


def test_a_device_cannot_report_the_same_time_of_a_model_twice(tmp_path: Path) -> None:
    async def body() -> None:
        async with catalogued_controller(tmp_path) as c:
            await c.register("lab-2", "lab")
            now = unix_ms()
            year = 364 * DAY

            def longest(seq: int) -> pb.TelemetryWindow:
                """A year-long window with the most inferences the rate bound allows."""
                return window(seq, now - year, now, count=year * MAX_INFERENCES_PER_MS)

            assert await send(c, "lab-2", longest(1)) == 1
            before = c.snapshot()
            # the QA repro: the same year again, each window alone within every bound
            await expect_status(
                send(c, "lab-2", longest(2)),
                INVALID,
                "device lab-2",
                "window seq 2 of model motions",
                "before the latest end of its stored windows",
                "may overlap by at most 5 minutes",
            )
            # nor two windows of one batch (a device with nothing stored yet)
            await c.register("lab-3", "lab")
            await expect_status(
                send(
                    c,
                    "lab-3",
                    window(1, now - 20 * MINUTE, now - 10 * MINUTE),
                    window(2, now - 20 * MINUTE, now - 5 * MINUTE),
                ),
                INVALID,
                "window seq 2",
                "before the end of its window seq 1",
            )
            assert await send(c, "lab-3", window(10, now - 10 * MINUTE, now - 9 * MINUTE)) == 10
            # a gap in its numbering filled later, with old times: refused by its times
            mid = c.snapshot()
            await expect_status(
                send(c, "lab-3", window(5, now - 40 * MINUTE, now - 30 * MINUTE)),
                INVALID,
                "window seq 5 of model motions",
                "1860000 ms before the latest end of its stored windows",
            )
            # nor can the device walk back 5 minutes a window with windows that end early:
            # the latest end stays the one to hold against, not the last window's
            assert (
                await send(c, "lab-3", window(11, now - 13 * MINUTE, now - 13 * MINUTE, count=1))
                == 11
            )
            await expect_status(
                send(c, "lab-3", window(12, now - 17 * MINUTE, now - 17 * MINUTE, count=1)),
                INVALID,
                "window seq 12",
                "480000 ms before the latest end of its stored windows",
            )
            # a low seq it never used, with times after what it reported: stored
            assert await send(c, "lab-3", window(5, now - 8 * MINUTE, now - 7 * MINUTE)) == 11
            assert [r for r in rollup(c) if r[0] == "lab"] == [
                ("lab", "motions", "estimate", 4, year * MAX_INFERENCES_PER_MS + 21, 4.0)
            ]
            assert before[0]["telemetry_windows"] + 3 == c.counts()["telemetry_windows"]
            assert mid[0]["telemetry_windows"] + 2 == c.counts()["telemetry_windows"]

    run(body())


def test_what_an_honest_agent_sends_still_goes_through(tmp_path: Path) -> None:
    async def body() -> None:
        async with catalogued_controller(tmp_path) as c:
            await c.register("hub-1")
            t = unix_ms() - 30 * MINUTE
            windows = [
                window(1, t, t + 10_000),
                # its clock was set back 2 minutes (NTP): within the tolerance
                window(2, t + 10_000 - 2 * MINUTE, t + 20_000 - 2 * MINUTE),
                # the model's artifact changed mid-window: the agent closes both together
                window(3, t + 30_000, t + 40_000, sha=SHA),
                window(4, t + 33_000, t + 40_000, sha=OTHER_SHA),
                # another model's windows are its own
                window(5, t, t + 40_000, model="doorbell"),
                # an idle window holding one inference that ended as it opened
                window(6, t + 50_000, t + 50_000, count=1),
            ]
            assert await send(c, "hub-1", *windows[:3]) == 3
            assert await send(c, "hub-1", *windows[3:]) == 6
            assert await send(c, "hub-1", *windows) == 6  # a resend after a lost ack
            assert c.counts()["telemetry_windows"] == 6

    run(body())


def test_made_up_models_and_digests_add_no_rollup_rows_or_series(tmp_path: Path) -> None:
    """Every (class, model, artifact) is a rollup row and a Prometheus series: a device
    naming models or bytes this controller never made would add them without end. An
    unknown model is refused; bytes the controller never built are counted as "unknown"
    (an honest agent moved to a fresh controller holds such bytes)."""

    def artifacts(c: Harness) -> set[str]:
        with sqlite3.connect(c.config.data_dir / "homefleet.db") as db:
            rows = db.execute("SELECT artifact_sha256 FROM telemetry_rollup")
            reporting = db.execute("SELECT artifact_sha256 FROM telemetry_reporting")
            return {str(sha) for (sha,) in [*rows, *reporting]}

    async def body() -> None:
        async with catalogued_controller(tmp_path) as c:
            await c.register("hub-1")
            t = unix_ms() - 30 * MINUTE
            assert await send(c, "hub-1", window(1, t, t + 10_000)) == 1
            before = rollup(c)
            for bad in (
                window(2, t + 10_000, t + 20_000, model="ghost"),
                window(2, t + 10_000, t + 20_000, model="ghost", sha=SHA),  # another model's
            ):
                await expect_status(send(c, "hub-1", bad), INVALID, "'ghost', which is not")
            assert rollup(c) == before
            assert c.counts()["telemetry_windows"] == 1
            # a hundred made-up digests of a known model: kept, all under one "unknown"
            made_up = [
                window(seq, t + seq * 10_000, t + (seq + 1) * 10_000, sha=f"{seq:064x}")
                for seq in range(2, 102)
            ]
            assert await send(c, "hub-1", *made_up) == 101
            assert artifacts(c) == {SHA, ""}
            # an empty digest (nothing served yet) and the other artifact still go through
            assert await send(c, "hub-1", window(102, t + 1020_000, t + 1030_000, sha="")) == 102
            last = window(103, t + 1030_000, t + 1040_000, sha=OTHER_SHA)
            assert await send(c, "hub-1", last) == 103
            assert artifacts(c) == {SHA, "", OTHER_SHA}

    run(body())


def stored_seqs(c: Harness, device_id: str) -> list[tuple[int, int]]:
    """(seq, count) of the device's stored windows."""
    with sqlite3.connect(c.config.data_dir / "homefleet.db") as db:
        return [
            (int(seq), int(n))
            for seq, n in db.execute(
                "SELECT seq, count FROM telemetry_windows WHERE device_id = ? ORDER BY seq",
                (device_id,),
            )
        ]


def agent_windows(first_ms: int, counts: list[int]) -> list[Window]:
    """Closed windows a minute apart from ``first_ms``, built by the agent's Telemetry."""
    result = []
    for i, n in enumerate(counts):
        telemetry = Telemetry(NoMeter(), clock=functools.partial(float, first_ms / 1000 + i * 60))
        for _ in range(n):
            telemetry.record(Sample("motions", SHA, 0.002, 0.001, 0.0, 1 << 20, ok=True))
        result.extend(telemetry.close_windows())
    return result


def test_a_re_provisioned_device_is_heard_whatever_its_seqs(tmp_path: Path) -> None:
    """An agent that lost its state directory numbers afresh under the same device id (with
    mutual TLS its certificate pins the id): from about 0 when its clock was behind as its
    queue was made. Its windows of current times are stored whatever their seqs; those
    whose seqs are stored already are skipped as duplicates, and the acknowledgement's
    highest seq, above the agent's own, moves its numbering past them."""

    async def body() -> None:
        async with catalogued_controller(tmp_path) as c:
            await c.register("hub-9")
            t = unix_ms() - 60 * MINUTE
            # its first queue, made 12 s after 1970 (no RTC, before NTP)
            old = [window(BOOT_SEQ + i, t + i * MINUTE, t + (i + 1) * MINUTE) for i in range(3)]
            assert await send(c, "hub-9", *old) == BOOT_SEQ + 2
            # the card replaced: the new queue numbers from 0, its windows are of now
            now = unix_ms() - 10 * MINUTE
            assert await send(c, "hub-9", window(0, now, now + MINUTE, count=1)) == BOOT_SEQ + 2
            assert stored_seqs(c, "hub-9")[0] == (0, 1)
            # a seq stored already: skipped as a duplicate, the ack above the agent's own
            taken = window(BOOT_SEQ + 1, now + MINUTE, now + 2 * MINUTE, count=2)
            assert await send(c, "hub-9", taken) == BOOT_SEQ + 2
            assert (BOOT_SEQ + 1, 2) not in stored_seqs(c, "hub-9")
            # old times are still refused, whatever the seq (a gap filled later)
            await expect_status(
                send(c, "hub-9", window(1, t, t + MINUTE, count=3)),
                INVALID,
                "window seq 1 of model motions",
                "before the latest end of its stored windows",
            )

            # the agent itself, with a queue made at the same 12 s after 1970: its first
            # batch has seqs the controller holds and is skipped, the acknowledgement says
            # so, and the windows it had not sent yet are renumbered above: none lost after
            queue = TelemetryQueue(tmp_path / "agent", clock=lambda: 12.0)
            try:
                seqs = queue.append(agent_windows(now + 3 * MINUTE, [4, 5, 6, 7, 8]))
                assert seqs == list(range(BOOT_SEQ, BOOT_SEQ + 5))
                plan = SendPlan(device_id="hub-9", batch=2, poll_s=0.01, rpc_timeout_s=10)
                assert await send_batch(c.agent, queue, plan, 2) is Outcome.SENT
                assert [w.seq for w in queue.windows()] == [
                    BOOT_SEQ + 3,
                    BOOT_SEQ + 4,
                    BOOT_SEQ + 5,
                ]
                while await send_batch(c.agent, queue, plan, 2) is Outcome.SENT:
                    pass
                assert queue.stats().depth == 0
                assert queue.append(agent_windows(now + 8 * MINUTE, [9])) == [BOOT_SEQ + 6]
                assert await send_batch(c.agent, queue, plan, 2) is Outcome.SENT
            finally:
                queue.close()
            assert stored_seqs(c, "hub-9") == [
                (0, 1),
                (BOOT_SEQ, 10),
                (BOOT_SEQ + 1, 10),
                (BOOT_SEQ + 2, 10),
                (BOOT_SEQ + 3, 6),
                (BOOT_SEQ + 4, 7),
                (BOOT_SEQ + 5, 8),
                (BOOT_SEQ + 6, 9),
            ]

    run(body())


# --------------------------------------------- S1 (b, c): no overflow, no fate sharing


def test_a_rollup_count_that_would_overflow_refuses_only_the_device_carrying_it(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with catalogued_controller(tmp_path) as c:
            await c.register("lab-0", "lab")
            await c.register("hub-1")
            t = unix_ms() - 30 * MINUTE
            assert await send(c, "lab-0", window(1, t, t + 10_000)) == 1
            # where ~293k overlapping year-long windows took it before they were refused
            with sqlite3.connect(c.config.data_dir / "homefleet.db") as db:
                db.execute(
                    "UPDATE telemetry_rollup SET count = ? WHERE device_class = 'lab'",
                    (MAX_INT64 - 5,),
                )
            await expect_status(
                send(c, "lab-0", window(2, t + 10_000, t + 20_000)),
                INVALID,
                "device lab-0",
                "running count of class lab, model motions",
            )
            # not INTERNAL, and not for anyone else: other keys take windows as before
            assert await send(c, "hub-1", window(1, t, t + 10_000)) == 1
            assert await send(c, "lab-0", window(2, t + 10_000, t + 20_000, source="rapl")) == 2

    run(body())


@pytest.fixture
def engine(database_url: str | None, tmp_path: Path) -> Iterator[Engine]:
    """A fresh schema on SQLite, then on PostgreSQL (the ingest SQL differs by dialect)."""
    created = make_engine(database_url or f"sqlite:///{tmp_path / 'homefleet.db'}")
    create_schema(created)
    for model in MODELS:
        catalogue(created, model, SHA, OTHER_SHA)
    yield created
    created.dispose()


def registration(device_id: str, device_class: str = "home-hub") -> DeviceRegistration:
    return DeviceRegistration(
        device_id, device_class, Hardware("x86_64", 4, 4 << 30, "1.20.0", "Linux"), (), "test"
    )


def record(
    seq: int, start: int = 0, end: int = 10_000, *, model: str = "motions", joules: float = 1.0
) -> TelemetryWindow:
    return TelemetryWindow(
        seq, model, SHA, start, end, 5, 0, tuple(counts(5)), 0.1, joules, "estimate", 0
    )


def test_one_refused_caller_fails_alone_in_a_group_commit(engine: Engine) -> None:
    store = SqlStore(engine)
    for d in range(20):
        store.register_device(registration(f"dev-{d:02d}"))
    store.register_device(registration("lab-0", "lab"))
    assert store.store_telemetry("lab-0", [record(1)]) == 1
    with engine.begin() as conn:
        conn.execute(
            update(TelemetryRollupRow)
            .where(TelemetryRollupRow.device_class == "lab")
            .values(count=MAX_INT64 - 2)
        )

    async def body() -> tuple[list[int | BaseException], int]:
        ingest = TelemetryIngest(store)
        calls = [
            ingest.store(f"dev-{d:02d}", [record(1), record(2, 10_000, 20_000)]) for d in range(20)
        ]
        calls.insert(13, ingest.store("lab-0", [record(2, 10_000, 20_000)]))
        results = await asyncio.gather(*calls, return_exceptions=True)
        await ingest.close()
        return results, ingest.commits

    results, commits = asyncio.run(body())
    refused = results.pop(13)
    assert isinstance(refused, FleetError) and refused.code is ErrorCode.INVALID_ARGUMENT
    assert "device lab-0" in refused.message
    assert results == [2] * 20  # stored and acknowledged despite sharing its transaction
    # retried in halves around the one failing caller, not a transaction per caller
    assert commits <= 6
    hubs = [t for t in store.telemetry_totals(0) if t.device_class == "home-hub"]
    assert [(t.windows, t.count) for t in hubs] == [(40, 200)]


def test_the_store_refuses_overlap_and_sums_it_cannot_hold(engine: Engine) -> None:
    """The store's own checks, on each backend (the direct callers skip the RPC's)."""
    store = SqlStore(engine)
    store.register_device(registration("a"))
    assert store.store_telemetry("a", [record(1, 0, 10 * MINUTE)]) == 1
    with pytest.raises(FleetError) as overlap:
        store.store_telemetry("a", [record(2, 4 * MINUTE, 11 * MINUTE)])
    assert overlap.value.code is ErrorCode.INVALID_ARGUMENT
    assert "device a" in overlap.value.message and "360000 ms before" in overlap.value.message
    assert store.store_telemetry("a", [record(2, 6 * MINUTE, 11 * MINUTE)]) == 2
    assert store.store_telemetry("a", [record(3, 0, 10 * MINUTE, model="doorbell")]) == 3
    assert store.store_telemetry("a", []) == 3
    # two finite windows whose sum is not: refused, not stored as +Inf
    with pytest.raises(FleetError) as infinite:
        store.store_telemetry(
            "a",
            [
                record(4, 11 * MINUTE, 12 * MINUTE, joules=1e308),
                record(5, 12 * MINUTE, 13 * MINUTE, joules=1e308),
            ],
        )
    assert infinite.value.code is ErrorCode.INVALID_ARGUMENT
    assert "device a" in infinite.value.message and "running joules" in infinite.value.message
    assert [t.windows for t in store.telemetry_totals(0)] == [1, 2]


def test_a_database_from_before_the_latest_end_column_is_given_it_filled(
    engine: Engine,
) -> None:
    """create_all adds no column to a table that exists: create_schema adds the latest end
    to an older controller's telemetry_reporting, filled from the stored windows, so
    ingest works on it and holds new windows against what was stored before."""
    store = SqlStore(engine)
    store.register_device(registration("a"))
    earlier = [record(1, 0, 10 * MINUTE), record(2, 0, 20 * MINUTE, model="doorbell")]
    assert store.store_telemetry("a", earlier) == 2
    with engine.begin() as conn:  # the table as HomeFleet created it before
        conn.execute(text("ALTER TABLE telemetry_reporting DROP COLUMN max_end_unix_ms"))
    create_schema(engine)
    create_schema(engine)  # every start runs it: the second finds the column there
    with pytest.raises(FleetError) as overlap:
        store.store_telemetry("a", [record(3, 14 * MINUTE, 21 * MINUTE, model="doorbell")])
    assert "360000 ms before the latest end of its stored windows" in overlap.value.message
    assert store.store_telemetry("a", [record(3, 10 * MINUTE, 11 * MINUTE)]) == 3
    # an older controller beside this one (PostgreSQL replicas, upgraded one at a time)
    # writes reporting rows without the column: they take its default, "unknown"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO telemetry_reporting (device_id, model_name, artifact_sha256, "
                "received_unix_ms) VALUES ('a', 'radar', :sha, 1)"
            ),
            {"sha": SHA},
        )
    assert store.store_telemetry("a", [record(4, 0, MINUTE, model="radar")]) == 4


# ------------------------------------------------- S2 and M4: what one window may claim


def test_cpu_time_and_energy_are_bounded_by_the_window(tmp_path: Path) -> None:
    async def body() -> None:
        async with catalogued_controller(tmp_path) as c:
            await c.register("hub-2")
            t = unix_ms() - 30 * MINUTE
            before = c.snapshot()
            for bad, fragments in (
                (
                    window(1, t, t + 10_000, joules=1e308),
                    ("windows[0].joules is 1e+308", "bound 1.1e+06"),
                ),
                (window(1, t, t + 10_000, cpu=1e9), ("windows[0].cpu_seconds", "256 cores busy")),
                (
                    window(1, t, t + 10_000, cpu=1e6, source="rapl*10"),
                    ("cpu_seconds", "times the emulated slowdown 10"),
                ),
            ):
                await expect_status(send(c, "hub-2", bad), INVALID, *fragments)
            assert_nothing_stored(c, before)
            # a real 5 s inference in a window that closed as it ended, and a demo device
            # reporting 10x what it measured
            assert await send(c, "hub-2", window(1, t, t, count=1, cpu=5.0, joules=60.0)) == 1
            slow = window(
                2, t + 1, t + 10_001, cpu=10 * 9.5, joules=10 * 9.5 * 65, source="rapl*10"
            )
            assert await send(c, "hub-2", slow) == 2
            assert all(j < 1e9 for *_, j in rollup(c))

    run(body())


def test_only_the_energy_sources_agents_send_are_accepted(tmp_path: Path) -> None:
    # every meter the agent can choose, and what --emulate-slowdown makes of one
    agent_meters = [m for m in EnergyMeter.__subclasses__() if m.__module__ == "edge_agent.meters"]
    meters = {m.source for m in agent_meters}
    assert meters == set(ENERGY_SOURCES)
    emulated = [Telemetry(NoMeter(), slowdown=f).source for f in (2.5, 10.0, 100.0)]
    assert emulated == ["none*2.5", "none*10", "none*100"]

    async def body() -> None:
        async with catalogued_controller(tmp_path) as c:
            await c.register("hub-2")
            t = unix_ms() - 30 * MINUTE
            accepted = sorted(meters) + emulated
            for seq, source in enumerate(accepted, start=1):
                w = window(seq, t + seq * 10_000, t + (seq + 1) * 10_000, source=source)
                assert await send(c, "hub-2", w) == seq
            before = c.snapshot()
            made_up = ["", "e" * 33, 'a"}\n{x', "meter", "RAPL", "rapl*", "rapl*1", "rapl*2.50"]
            made_up += ["rapl*2.25", "rapl*1e1", "rapl*101", "rapl*nan", "rapl*10*2", "x*10"]
            for source in made_up:
                w = window(99, t + 99 * 10_000, t + 100 * 10_000, source=source)
                await expect_status(
                    send(c, "hub-2", w), INVALID, "energy_source", "estimate, hwmon, none, rapl"
                )
            assert_nothing_stored(c, before)
            assert sorted({r[2] for r in rollup(c)}) == sorted(accepted)

    run(body())
