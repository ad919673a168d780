"""Telemetry from the agent to the real controller: at-least-once sends, exactly-once storage.

The real controller (tests.support.controller) runs beside the agent's real SyncLoop and
TelemetryQueue; what the controller stored is read back from its own SQLite database.
The full agent (run_agent) is driven through its local API, with its energy meter on a
prepared RAPL tree, and its Prometheus endpoint is scraped over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.aio
import numpy as np
import pytest

from edge_agent.agent import run_agent
from edge_agent.config import AgentConfig, ListenAddress
from edge_agent.convert import tensor_to_proto
from edge_agent.hardware import collect
from edge_agent.local_api import start_local_api
from edge_agent.meters import NoMeter
from edge_agent.metrics import AgentMetrics, serve_metrics
from edge_agent.runtime import ModelRuntime
from edge_agent.store import StateStore
from edge_agent.sync import SyncLoop
from edge_agent.telemetry import Sample, Telemetry, Window
from edge_agent.telemetry_queue import TelemetryQueue
from edge_agent.telemetry_sender import RefusalLog, SendPlan, send_forever
from protos import fleet_pb2, fleet_pb2_grpc
from tests.controller.helpers import catalogue
from tests.edge_agent.conftest import load
from tests.edge_agent.models import add_model
from tests.edge_agent.test_telemetry_meters import rapl_zone
from tests.support.controller import (
    WAIT_TIMEOUT_S,
    Controller,
    close_controller,
    eventually,
    open_controller,
    reserve_port,
    running_controller,
)

DEVICE = "dev-tel"
SHA = "c" * 64


@dataclass(frozen=True)
class Stored:
    seq: int
    count: int


def stored(controller_dir: Path) -> list[Stored]:
    """The windows the controller stored for DEVICE, from its database."""
    db = sqlite3.connect(controller_dir / "homefleet.db")
    try:
        rows = db.execute(
            "SELECT seq, count FROM telemetry_windows WHERE device_id = ? ORDER BY seq", (DEVICE,)
        ).fetchall()
    finally:
        db.close()
    return [Stored(int(seq), int(count)) for seq, count in rows]


def windows(n: int, first_count: int = 1) -> list[Window]:
    telemetry = Telemetry(NoMeter())
    result = []
    for i in range(n):
        for _ in range(first_count + i):
            telemetry.record(Sample("motions", SHA, 0.002, 0.001, 0.0, 1 << 20, ok=True))
        result.extend(telemetry.close_windows())
    return result


def config(state: Path, address: str, **overrides: Any) -> AgentConfig:
    fields: dict[str, Any] = {
        "controller": address,
        "device_id": DEVICE,
        "device_class": "home-hub",
        "state_dir": state,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.3,
        "telemetry_poll_s": 0.05,
        "telemetry_batch": 3,
    }
    fields.update(overrides)
    return AgentConfig(**fields)


@contextlib.asynccontextmanager
async def sync_loop(state: Path, address: str) -> AsyncIterator[TelemetryQueue]:
    """The agent's real SyncLoop with its telemetry queue, until the block ends."""
    queue = TelemetryQueue(state)
    loop = SyncLoop(
        config(state, address),
        StateStore(state),
        ModelRuntime(1),
        collect(),
        None,
        rng=random.Random(0),
        telemetry=queue,
    )
    task = asyncio.create_task(loop.run())
    try:
        yield queue
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=WAIT_TIMEOUT_S)
        queue.close()


async def drained(queue: TelemetryQueue) -> bool:
    return queue.stats().depth == 0


def test_windows_reach_the_controller_and_a_batch_sent_twice_is_stored_once(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with running_controller(tmp_path / "controller") as controller:
            catalogue(controller.config.database_url, "motions", SHA)
            async with sync_loop(tmp_path / "agent", controller.address) as queue:
                seqs = await asyncio.to_thread(queue.append, windows(7))
                await eventually("the queue to drain", lambda: drained(queue))
            first = stored(controller.data_dir)
            assert [s.seq for s in first] == seqs
            assert [s.count for s in first] == list(range(1, 8))
            # the acknowledgement was lost: the agent sends the same batch again
            again = fleet_pb2.TelemetryBatch(
                device_id=DEVICE,
                windows=[w.to_proto(s) for w, s in zip(windows(7), seqs, strict=True)],
            )
            ack = await controller.agent.ReportTelemetry(again, timeout=10)
            assert ack.highest_seq == seqs[-1]
            assert stored(controller.data_dir) == first

    asyncio.run(main())


def test_a_controller_restart_and_an_agent_restart_lose_no_window_and_store_none_twice(
    tmp_path: Path,
) -> None:
    state, data = tmp_path / "agent", tmp_path / "controller"

    async def main() -> None:
        sock = reserve_port()
        port = sock.getsockname()[1]
        sock.close()
        address = f"127.0.0.1:{port}"
        controller: Controller | None = await open_controller(data, port=port)
        catalogue(controller.config.database_url, "motions", SHA)
        expected: list[int] = []
        try:
            async with sync_loop(state, address) as queue:
                expected += await asyncio.to_thread(queue.append, windows(4))
                await eventually("the first windows to be sent", lambda: drained(queue))
                assert controller is not None
                await close_controller(controller)  # the controller goes away...
                controller = None
                expected += await asyncio.to_thread(queue.append, windows(5, first_count=10))
            # ...and the agent restarts meanwhile: its queue is still on disk
            async with sync_loop(state, address) as queue:
                assert [w.seq for w in queue.windows()] == expected[4:]
                expected += await asyncio.to_thread(queue.append, windows(2, first_count=20))
                controller = await open_controller(data, port=port)  # back, same database
                await eventually("the queue to drain", lambda: drained(queue))
            rows = stored(data)
            assert [s.seq for s in rows] == expected  # each once, none lost
            assert [s.count for s in rows] == [1, 2, 3, 4, *range(10, 15), 20, 21]
        finally:
            if controller is not None:
                await close_controller(controller)

    asyncio.run(main())


async def predict(stub: Any, n: int) -> None:
    x = tensor_to_proto("x", np.zeros((1, 4), np.float32))
    for _ in range(n):
        await stub.Predict(fleet_pb2.PredictRequest(model_name="motions", inputs=[x]), timeout=30)
    bad = tensor_to_proto("x", np.zeros((1, 4), np.float64))  # refused before it runs
    with contextlib.suppress(grpc.aio.AioRpcError):
        await stub.Predict(fleet_pb2.PredictRequest(model_name="motions", inputs=[bad]))


def test_the_agent_measures_predicts_into_windows_the_controller_stores(tmp_path: Path) -> None:
    sysfs = tmp_path / "sysfs"
    rapl_zone(sysfs, "intel-rapl:0", 5_000_000)

    async def main() -> None:
        async with running_controller(tmp_path / "controller", heartbeat_seconds=1) as controller:
            state = tmp_path / "agent"
            stop = asyncio.Event()
            agent_config = config(
                state, controller.address, sysfs_root=sysfs, telemetry_window_s=0.2
            )
            agent = asyncio.create_task(run_agent(agent_config, stop))
            try:
                artifact = await controller.release("motions", add_model(1.0))

                async def serving() -> dict[str, Any] | None:
                    info = state / "agent.json"
                    active = any(
                        d["device_id"] == DEVICE
                        and d["artifact_sha256"] == artifact.sha256
                        and d["outcome"] == "active"
                        for d in await controller.details("device.status")
                    )
                    return json.loads(info.read_text()) if active and info.exists() else None

                address = (await eventually("the model to be served", serving))["local_api"]
                async with grpc.aio.insecure_channel(address) as channel:
                    await predict(fleet_pb2_grpc.InferenceServiceStub(channel), 12)  # type: ignore[no-untyped-call]

                async def all_counted() -> bool:
                    return sum(s.count for s in stored(controller.data_dir)) == 12

                await eventually("12 inferences stored at the controller", all_counted)
            finally:
                stop.set()
                await asyncio.wait_for(agent, WAIT_TIMEOUT_S)
            db = sqlite3.connect(controller.data_dir / "homefleet.db")
            rows = db.execute(
                "SELECT artifact_sha256, energy_source, errors, latency_bucket_counts, "
                "cpu_seconds, peak_memory_bytes FROM telemetry_windows WHERE device_id = ?",
                (DEVICE,),
            ).fetchall()
            db.close()
            assert {(r[0], r[1], r[2]) for r in rows} == {(artifact.sha256, "rapl", 0)}
            assert sum(sum(json.loads(r[3])) for r in rows) == 12
            assert all(r[4] >= 0 and r[5] > 0 for r in rows)

    asyncio.run(main())


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def test_metrics_endpoint_shows_latency_inferences_joules_queue_and_model(
    tmp_path: Path,
) -> None:
    async def main() -> str:
        runtime = ModelRuntime(threads=1)
        slot = load(runtime, tmp_path, "motions", add_model(1.0))
        runtime.activate(slot)
        queue = TelemetryQueue(tmp_path / "state")
        metrics = AgentMetrics(runtime, queue)
        telemetry = Telemetry(NoMeter(), observer=metrics)
        api = await start_local_api(runtime, ListenAddress("127.0.0.1:0"), 2, telemetry)
        server = serve_metrics(metrics, "127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(api.address) as channel:
                await predict(fleet_pb2_grpc.InferenceServiceStub(channel), 3)  # type: ignore[no-untyped-call]
            queue.append(telemetry.close_windows())
            text = await asyncio.to_thread(scrape, f"http://127.0.0.1:{server.port}/metrics")
            return f"{slot.sha256}\n{text}"
        finally:
            server.stop()
            await api.stop()
            queue.close()

    sha, text = asyncio.run(main()).split("\n", 1)
    assert 'homefleet_agent_inference_latency_seconds_count{model="motions"} 3.0' in text
    assert 'le="0.0001"' in text  # sub-millisecond buckets
    assert 'homefleet_agent_inferences_total{model="motions",outcome="ok"} 3.0' in text
    assert 'homefleet_agent_energy_joules_total{model="motions",source="none"} 0.0' in text
    assert "homefleet_agent_telemetry_queue_windows 1.0" in text
    assert "homefleet_agent_telemetry_summarised_windows_total 0.0" in text
    assert f'homefleet_agent_model_info{{artifact_sha256="{sha}",model="motions"}} 1.0' in text


def ahead(n: int) -> list[Window]:
    """Windows from a device whose clock runs an hour ahead: the controller refuses each."""
    telemetry = Telemetry(NoMeter(), clock=lambda: time.time() + 3600)
    result = []
    for _ in range(n):
        telemetry.record(Sample("motions", SHA, 0.002, 0.001, 0.0, 1 << 20, ok=True))
        result.extend(telemetry.close_windows())
    return result


def refusal_lines(caplog: pytest.LogCaptureFixture) -> tuple[list[str], list[str]]:
    """(first refusals, summaries) the sender logged."""
    messages = [r.getMessage() for r in caplog.records if r.name == "edge_agent.telemetry_sender"]
    return (
        [m for m in messages if m.startswith("controller refused telemetry window")],
        [m for m in messages if "more telemetry windows refused" in m],
    )


def test_windows_refused_for_a_clock_ahead_are_logged_once_then_counted_a_minute_at_a_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The sender's minute is a clock the test turns (no waiting): first refusal logged,
    the rest counted into one line a minute, and every dropped window in the metric."""

    async def main() -> None:
        async with running_controller(tmp_path / "controller") as controller:
            catalogue(controller.config.database_url, "motions", SHA)
            await controller.agent.Register(
                fleet_pb2.RegisterRequest(
                    device_id=DEVICE, device_class="home-hub", hardware=collect().to_proto()
                ),
                timeout=10,
            )
            queue = TelemetryQueue(tmp_path / "agent")
            minute = [0.0]
            refusals = RefusalLog(interval_s=60.0, clock=lambda: minute[0] * 60.0)
            plan = SendPlan(device_id=DEVICE, batch=3, poll_s=0.02, rpc_timeout_s=10)
            sender = asyncio.create_task(send_forever(controller.agent, queue, plan, refusals))
            try:
                await asyncio.to_thread(queue.append, ahead(5))
                await eventually("the refused windows to be dropped", lambda: drained(queue))
                firsts, summaries = refusal_lines(caplog)
                assert len(firsts) == 1 and summaries == []
                assert "in the future" in firsts[0] and "NTP" in firsts[0]

                minute[0] = 1.0  # a minute on: the count comes, without a new refusal
                await eventually("a summary", lambda: _some(lambda: refusal_lines(caplog)[1]))
                await asyncio.to_thread(queue.append, ahead(3))
                await eventually("the next ones to be dropped", lambda: drained(queue))
                assert len(refusal_lines(caplog)[1]) == 1  # within that minute: no new line
                minute[0] = 2.0
                await eventually(
                    "a second summary", lambda: _some(lambda: refusal_lines(caplog)[1][1:])
                )
            finally:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            firsts, summaries = refusal_lines(caplog)
            assert len(firsts) == 1
            assert summaries[0].startswith("4 more telemetry windows refused for the same reason")
            assert summaries[1].startswith("3 more telemetry windows refused for the same reason")
            assert queue.stats().rejected_windows == 8  # the metric counts every one
            assert stored(controller.data_dir) == []
            queue.close()

    asyncio.run(main())


async def _some(found: Callable[[], list[str]]) -> list[str] | None:
    return found() or None


def test_the_sync_loop_logs_a_run_of_refused_windows_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with (
            running_controller(tmp_path / "controller") as controller,
            sync_loop(tmp_path / "agent", controller.address) as queue,
        ):
            await asyncio.to_thread(queue.append, ahead(6))
            await eventually("the refused windows to be dropped", lambda: drained(queue))
            assert queue.stats().rejected_windows == 6
        firsts, _ = refusal_lines(caplog)
        assert len(firsts) == 1, firsts

    asyncio.run(main())
