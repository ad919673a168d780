"""Group-commit telemetry ingest: concurrent calls from many devices, with duplicates.

Every window must be stored exactly once, every ack must be the device's highest stored
seq after its commit, and one unregistered device must not fail the others sharing its
transaction.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from artifact import histogram
from controller.clock import unix_ms
from controller.db import create_schema, make_engine
from controller.errors import ErrorCode, FleetError
from controller.records import DeviceRegistration, Hardware, TelemetryTotals, TelemetryWindow
from controller.sql_store import SqlStore
from controller.telemetry_ingest import TelemetryIngest
from protos import fleet_pb2 as pb
from tests.controller.helpers import Harness, catalogue, expect_status, run, running_controller

DEVICES = 12
ROUNDS = 6
BATCH = 10
OVERLAP = 4  # each batch resends the previous batch's last windows (a lost ack)
SHA = "cd" * 32


def counts_for(device: int, seq: int) -> list[int]:
    return histogram.histogram([0.0001 * (1 + device % 5)] * (seq % 7 + 1) + [0.01])


BASE_MS = unix_ms() - 24 * 3600 * 1000  # a day ago: windows from 1970 are refused


def window(device: int, seq: int) -> pb.TelemetryWindow:
    counts = counts_for(device, seq)
    return pb.TelemetryWindow(
        seq=seq,
        model_name="motions",
        artifact_sha256=SHA,
        start_unix_ms=BASE_MS + (seq - 1) * 10_000,
        end_unix_ms=BASE_MS + seq * 10_000,
        count=sum(counts),
        latency_bucket_counts=counts,
        cpu_seconds=0.01 * seq,
        joules=0.5,
        energy_source="estimate",
    )


def stored(c: Harness) -> list[tuple[str, int, int]]:
    with sqlite3.connect(c.config.data_dir / "homefleet.db") as conn:
        return [
            (str(d), int(s), int(n))
            for d, s, n in conn.execute(
                "SELECT device_id, seq, count FROM telemetry_windows ORDER BY device_id, seq"
            )
        ]


def test_concurrent_reports_with_duplicates_store_each_window_once(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_controller(tmp_path) as c:
            catalogue(c.config.database_url, "motions", SHA)
            for d in range(DEVICES):
                await c.register(f"dev-{d:02d}")

            async def send(device: int, seqs: range) -> int:
                batch = pb.TelemetryBatch(
                    device_id=f"dev-{device:02d}", windows=[window(device, s) for s in seqs]
                )
                ack = await c.agent.ReportTelemetry(batch, timeout=30)
                return int(ack.highest_seq)

            async def agent(device: int) -> None:
                """One device: rounds in order; each round's batch goes out twice at once
                (a retry racing the original) and overlaps the round before."""
                for r in range(ROUNDS):
                    last = (r + 1) * BATCH
                    seqs = range(max(1, r * BATCH + 1 - OVERLAP), last + 1)
                    acks = await asyncio.gather(send(device, seqs), send(device, seqs))
                    assert list(acks) == [last, last], (device, r, acks)

            ghost = pb.TelemetryBatch(device_id="ghost", windows=[window(0, 1)])
            await asyncio.gather(
                *(agent(d) for d in range(DEVICES)),
                expect_status(
                    c.agent.ReportTelemetry(ghost, timeout=30), grpc.StatusCode.NOT_FOUND, "ghost"
                ),
            )
            expected = [
                (f"dev-{d:02d}", s, sum(counts_for(d, s)))
                for d in range(DEVICES)
                for s in range(1, ROUNDS * BATCH + 1)
            ]
            assert stored(c) == expected
            # a resend of everything after the fact stores nothing and acks the highest
            assert await send(3, range(1, ROUNDS * BATCH + 1)) == ROUNDS * BATCH
            assert stored(c) == expected
            # the scrape's running sums (kept at ingest) equal the sums of stored windows
            engine = make_engine(c.config.database_url)
            try:
                (totals,) = SqlStore(engine).telemetry_totals(reporting_since_unix_ms=0)
            finally:
                engine.dispose()
            seqs = range(1, ROUNDS * BATCH + 1)
            assert totals.device_class == "home-hub" and totals.model_name == "motions"
            assert totals.windows == DEVICES * ROUNDS * BATCH
            assert totals.count == sum(n for _, _, n in expected)
            assert list(totals.latency_bucket_counts) == histogram.merge(
                *(counts_for(d, s) for d in range(DEVICES) for s in seqs)
            )
            assert totals.cpu_seconds == pytest.approx(DEVICES * sum(0.01 * s for s in seqs))
            assert dict(totals.joules_by_source) == pytest.approx(
                {"estimate": 0.5 * DEVICES * ROUNDS * BATCH}
            )
            assert totals.devices_reporting == DEVICES

    run(body())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    engine = make_engine(f"sqlite:///{tmp_path / 'homefleet.db'}")
    create_schema(engine)
    catalogue(engine, "motions", SHA)
    yield SqlStore(engine)
    engine.dispose()


def registration(device_id: str) -> DeviceRegistration:
    return DeviceRegistration(
        device_id=device_id,
        device_class="home-hub",
        hardware=Hardware("x86_64", 4, 4 << 30, "1.20.0", "Linux"),
        held=(),
        agent_version="test",
    )


def record(seq: int) -> TelemetryWindow:
    counts = tuple(histogram.histogram([0.001] * seq))
    return TelemetryWindow(
        seq, "motions", SHA, 0, 10_000, sum(counts), 0, counts, 0.1, 1.0, "estimate", 0
    )


def test_concurrent_calls_share_one_transaction_and_a_ghost_fails_alone(
    store: SqlStore,
) -> None:
    for d in range(20):
        store.register_device(registration(f"dev-{d}"))
    store.store_telemetry("dev-0", [record(1), record(2), record(3)])

    async def body() -> tuple[list[int | BaseException], int]:
        ingest = TelemetryIngest(store)
        calls = [ingest.store(f"dev-{d}", [record(1), record(2)]) for d in range(20)]
        calls.append(ingest.store("ghost", [record(1)]))
        calls.append(ingest.store("dev-5", [record(2), record(3)]))  # same device twice
        results = await asyncio.gather(*calls, return_exceptions=True)
        await ingest.close()
        return results, ingest.commits

    results, commits = asyncio.run(body())
    # every call was queued before the first commit started: one transaction for all
    assert commits == 1
    ghost = results[20]
    assert isinstance(ghost, FleetError) and ghost.code is ErrorCode.NOT_FOUND
    assert results[:20] == [3] + [2] * 4 + [3] + [2] * 14  # dev-0 had 3 already; dev-5 sent 3
    assert results[21] == 3
    assert store.store_telemetry("dev-7", []) == 2


def test_a_database_from_before_the_rollup_is_backfilled_once(
    store: SqlStore, tmp_path: Path
) -> None:
    for d in range(3):
        store.register_device(registration(f"dev-{d}"))
        store.store_telemetry(f"dev-{d}", [record(s) for s in range(1, 4 + d)])
    expected = store.telemetry_totals(0)
    assert expected and expected[0].windows == 3 + 4 + 5
    # a database written before the rollup existed: windows, but no rollup rows
    with sqlite3.connect(tmp_path / "homefleet.db") as db:
        db.execute("DELETE FROM telemetry_rollup")
        db.execute("DELETE FROM telemetry_reporting")
    assert store.telemetry_totals(0) == []
    assert store.backfill_telemetry_rollup() == 12
    assert rounded(store.telemetry_totals(0)) == rounded(expected)
    assert store.backfill_telemetry_rollup() == 0  # once: a filled rollup is left alone
    assert rounded(store.telemetry_totals(0)) == rounded(expected)


def rounded(totals: list[TelemetryTotals]) -> list[TelemetryTotals]:
    """Float sums in another order differ in the last bit."""
    return [
        dataclasses.replace(
            t,
            cpu_seconds=round(t.cpu_seconds, 9),
            joules_by_source=tuple((s, round(j, 9)) for s, j in t.joules_by_source),
        )
        for t in totals
    ]
