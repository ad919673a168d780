"""Every --emulate-slowdown an agent starts with names an energy source the controller takes.

QA: an agent run with --emulate-slowdown 2.25 (or 1.00001) started normally, and the
controller refused every telemetry window it sent ("rapl*2.25" has two decimal places),
which the agent then dropped. Both sides now use artifact.energy_sources; here the
agent's own config and Telemetry make the sources, and the real controller judges them.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import grpc

from controller.clock import unix_ms
from edge_agent.config import AgentConfig
from edge_agent.errors import AgentError
from edge_agent.meters import NoMeter
from edge_agent.telemetry import Telemetry
from protos import fleet_pb2 as pb
from tests.controller.helpers import Harness, catalogue, expect_status, run, running_controller
from tests.controller.test_telemetry_abuse import SHA, window

WINDOW_MS = 10_000
# values people type, the QA's two, and the edges of the rule
TYPED = [1.0, 1.1, 1.5, 2.0, 2.5, 3.0, 9.9, 10.0, 12.5, 33.3, 99.9, 100.0]
TYPED += [2.25, 1.00001, 2.0000001, 99.95, 100.1, 101.0, 0.5, float("nan"), float("inf")]


def sample() -> list[float]:
    """TYPED, every factor with one decimal place, and arbitrary floats (seeded)."""
    rng = random.Random(7)
    values = TYPED + [n / 10 for n in range(0, 1100)]
    values += [rng.uniform(0.0, 120.0) for _ in range(200)]
    values += [round(rng.uniform(1.0, 100.0), 2) for _ in range(200)]
    return values


def agent_accepts(slowdown: float, state: Path) -> bool:
    try:
        AgentConfig(
            controller="127.0.0.1:1",
            device_id="hub-1",
            device_class="home-hub",
            state_dir=state,
            emulate_slowdown=slowdown,
        )
    except AgentError as exc:
        assert "--emulate-slowdown" in exc.message and "one decimal place" in exc.message
        return False
    return True


async def send(c: Harness, windows: list[pb.TelemetryWindow]) -> int:
    batch = pb.TelemetryBatch(device_id="hub-1", windows=windows)
    ack = await c.agent.ReportTelemetry(batch, timeout=30)
    return int(ack.highest_seq)


def test_every_slowdown_the_agent_accepts_the_controller_accepts(tmp_path: Path) -> None:
    accepted = sorted({v for v in sample() if agent_accepts(v, tmp_path)})
    refused = [v for v in TYPED if v not in accepted]
    assert {1.0, 1.1, 2.5, 10.0, 12.5, 99.9, 100.0} <= set(accepted)
    assert {2.25, 1.00001, 2.0000001, 99.95, 100.1} <= set(refused)  # the QA's, and more
    assert len(accepted) == 991  # 1.0, 1.1 ... 100.0: the one-decimal grid and no other
    sources = [Telemetry(NoMeter(), slowdown=v).source for v in accepted]
    assert "none*2.5" in sources and "none" in sources

    async def body() -> None:
        async with running_controller(tmp_path / "controller") as c:
            await c.register("hub-1")
            catalogue(c.config.database_url, "motions", SHA)
            start = unix_ms() - (len(sources) + 10) * WINDOW_MS
            windows = [
                window(seq, start + seq * WINDOW_MS, start + (seq + 1) * WINDOW_MS, source=s)
                for seq, s in enumerate(sources, start=1)
            ]
            assert await send(c, windows) == len(windows)  # one batch: every one stored
            # what the agent refuses, the controller refuses too; "²" is a digit to
            # str.isdigit but not to float(): no INTERNAL error either
            seq, end = len(windows) + 1, start + (len(windows) + 2) * WINDOW_MS
            for source in ("none*2.25", "none*1.00001", "rapl*²"):
                bad = window(seq, end, end + WINDOW_MS, source=source)
                await expect_status(
                    send(c, [bad]), grpc.StatusCode.INVALID_ARGUMENT, "energy_source"
                )
            with sqlite3.connect(c.config.data_dir / "homefleet.db") as db:
                stored = {s for (s,) in db.execute("SELECT energy_source FROM telemetry_windows")}
            assert stored == set(sources)

    run(body())
