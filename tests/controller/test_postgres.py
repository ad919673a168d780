"""The store on real PostgreSQL (what several replicas share): the SQL that differs by
dialect — bulk ingest with ON CONFLICT ... RETURNING, the telemetry rollup, partial unique
indexes for active jobs and rollouts, FOR UPDATE, job leases — and a whole controller.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from artifact import histogram
from controller.clock import unix_ms
from controller.db import create_schema, make_engine
from controller.errors import ErrorCode, FleetError
from controller.records import (
    DeviceRegistration,
    Hardware,
    JobState,
    NewCompressionJob,
    NewEvent,
    NewModel,
    TelemetryWindow,
)
from controller.rollouts.records import NewRollout, RolloutChange, RolloutState
from controller.rollouts.store import RolloutStore
from controller.sql_store import SqlStore
from controller.store import JOB_LEASE_MS, MAX_SERIES
from protos import fleet_pb2 as pb
from tests.controller.helpers import catalogue, onnx_model, run, running_controller
from tests.support.postgres import PostgresCluster

SHA = "cd" * 32


@pytest.fixture
def engine(postgres: PostgresCluster) -> Iterator[Engine]:
    created = make_engine(postgres.new_database())
    create_schema(created)
    yield created
    created.dispose()


def registration(device_id: str, device_class: str = "home-hub") -> DeviceRegistration:
    return DeviceRegistration(
        device_id, device_class, Hardware("x86_64", 4, 4 << 30, "1.20.0", "Linux"), (), "test"
    )


def window(seq: int, end_ms: int = 10_000) -> TelemetryWindow:
    counts = tuple(histogram.histogram([0.001] * 4 + [0.05]))
    return TelemetryWindow(
        seq, "motions", SHA, end_ms - 10_000, end_ms, 5, 0, counts, 0.1, 1.0, "rapl", 0
    )


def test_ingest_stores_each_window_once_and_keeps_the_rollup(engine: Engine) -> None:
    store = SqlStore(engine)
    catalogue(engine, "motions", SHA)
    for d in ("a", "b"):
        store.register_device(registration(d))
    acks = store.store_telemetry_batches({"a": [window(1), window(2)], "b": [window(1)]})
    assert acks == {"a": 2, "b": 1}
    # a resent batch (the ack was lost) is stored once; the new window is added
    assert store.store_telemetry_batches({"a": [window(2), window(3)]}) == {"a": 3}
    (totals,) = store.telemetry_totals(0)
    assert totals.windows == 4 and totals.count == 20 and totals.devices_reporting == 2
    assert totals.latency_bucket_counts[histogram.bucket_index(0.05)] == 4
    # an unknown device fails alone, naming itself
    with pytest.raises(FleetError) as refused:
        store.store_telemetry("ghost", [window(1)])
    assert refused.value.code is ErrorCode.NOT_FOUND
    # the backfill leaves a filled rollup alone
    assert store.backfill_telemetry_rollup() == 0
    selection = store.telemetry_series(0, 40_000, 10_000)
    (series,) = selection.series
    assert sum(p.count for p in series.points) == 20 and selection.omitted == 0
    # a removed device takes its windows along; the rollup keeps what it reported
    removed = store.remove_device("a")
    assert removed is not None and removed.telemetry_windows == 3
    assert store.get_device("a") is None and store.remove_device("a") is None
    (totals,) = store.telemetry_totals(0)
    assert totals.windows == 4
    assert store.store_telemetry_batches({"b": [window(2)]}) == {"b": 2}


def test_one_active_rollout_per_pair_and_conditional_transitions(engine: Engine) -> None:
    rollouts = RolloutStore(engine)
    new = NewRollout("motions", "camera", "motions/camera/v1", 0.12, 9.0, "p95 over budget")
    event = NewEvent("budget.miss", "camera/motions", "miss")
    first = rollouts.start(new, event)
    assert first is not None
    assert rollouts.start(new, event) is None  # the partial unique index holds on PostgreSQL
    moved = rollouts.advance(
        first.id,
        RolloutState.RECOMPRESSING,
        RolloutChange(RolloutState.CANARY, "canary", candidate_artifact_id="motions/camera/v2"),
    )
    assert moved is not None and moved.state is RolloutState.CANARY
    # a second replica acting on the state it saw earlier changes nothing
    stale = rollouts.advance(
        first.id, RolloutState.RECOMPRESSING, RolloutChange(RolloutState.FAILED, "late")
    )
    assert stale is None
    done = rollouts.advance(
        first.id, RolloutState.CANARY, RolloutChange(RolloutState.PROMOTED, "ok")
    )
    assert done is not None and done.finished_unix_ms is not None
    assert rollouts.start(new, event) is not None  # the pair is free again
    assert [r.state for r in rollouts.list(active_only=True)] == [RolloutState.RECOMPRESSING]


def test_job_leases_expire_and_free_the_pair(engine: Engine) -> None:
    now = [2_000_000_000]
    store = SqlStore(engine, clock=lambda: now[0])
    store.add_model(NewModel("clf", "ab" * 32, 10, (), ()))
    gone = store.create_compression_job(NewCompressionJob("clf", 1, "", "home-hub", "host:dead"))
    with pytest.raises(FleetError) as taken:
        store.create_compression_job(NewCompressionJob("clf", 1, "", "home-hub", "host:live"))
    assert taken.value.code is ErrorCode.ALREADY_EXISTS
    now[0] += JOB_LEASE_MS + 1
    assert store.renew_compression_leases("host:live", now[0] + JOB_LEASE_MS) == 0
    assert store.fail_expired_compression_jobs(now[0], "lost") == [gone.id]
    job = store.get_compression_job(gone.id)
    assert job is not None and job.state is JobState.FAILED
    store.create_compression_job(NewCompressionJob("clf", 1, "", "home-hub", "host:live"))


def recent(w: TelemetryWindow) -> TelemetryWindow:
    """The window moved to a day ago: through the RPC, windows from 1970 are refused."""
    day_ago = unix_ms() - 24 * 3600 * 1000
    return dataclasses.replace(
        w, start_unix_ms=day_ago + w.start_unix_ms, end_unix_ms=day_ago + w.end_unix_ms
    )


def test_a_controller_on_postgresql_serves_and_ingests(
    postgres: PostgresCluster, tmp_path: Path
) -> None:
    async def body() -> None:
        async with running_controller(tmp_path, db_url=postgres.new_database()) as c:
            await c.add_model("motions", onnx_model())
            art = await c.artifact("motions", "home-hub")
            await c.register("hub-1")
            windows = [
                pb.TelemetryWindow(**dataclasses.asdict(w) | {"artifact_sha256": art.sha256})
                for w in (recent(window(1)), recent(window(2)))
            ]
            ack = await c.agent.ReportTelemetry(
                pb.TelemetryBatch(device_id="hub-1", windows=windows), timeout=10
            )
            assert ack.highest_seq == 2
            again = await c.agent.ReportTelemetry(
                pb.TelemetryBatch(device_id="hub-1", windows=windows), timeout=10
            )
            assert again.highest_seq == 2  # a resent batch is acknowledged, stored once
            engine = make_engine(c.config.database_url)
            try:
                (totals,) = SqlStore(engine).telemetry_totals(0)
            finally:
                engine.dispose()
            assert totals.windows == 2 and totals.artifact_id == art.id

    run(body())


@pytest.fixture
def either_engine(database_url: str | None, tmp_path: Path) -> Iterator[Engine]:
    """A fresh schema on SQLite, then on PostgreSQL."""
    created = make_engine(database_url or f"sqlite:///{tmp_path / 'homefleet.db'}")
    create_schema(created)
    yield created
    created.dispose()


def test_series_keep_the_busiest_and_count_the_rest(either_engine: Engine) -> None:
    store = SqlStore(either_engine)
    store.register_device(registration("a"))
    extra = 3
    shas = [f"{i:02x}" * 32 for i in range(MAX_SERIES + extra)]
    ids = catalogue(either_engine, "motions", *shas)
    # Artifact i served i + 1 inferences: the `extra` quietest do not fit in an answer.
    windows = [
        dataclasses.replace(window(i + 1), artifact_sha256=sha, count=i + 1)
        for i, sha in enumerate(shas)
    ]
    assert store.store_telemetry_batches({"a": windows}) == {"a": len(shas)}
    selection = store.telemetry_series(0, 40_000, 10_000)
    assert selection.omitted == extra
    drawn = {s.artifact_id for s in selection.series}
    assert len(drawn) == MAX_SERIES
    assert not any(ids[sha] in drawn for sha in shas[:extra])  # the quietest are left out
    assert sum(p.count for s in selection.series for p in s.points) == sum(
        range(extra + 1, len(shas) + 1)
    )
    with pytest.raises(ValueError, match="at most 240"):
        store.telemetry_series(0, 241_000, 1_000)
