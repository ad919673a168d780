"""--emulate-slowdown takes only factors whose "<meter>*F" the controller accepts.

QA: `homefleet agent run --emulate-slowdown 2.25` started normally, then the controller
refused every telemetry window ("<meter>*2.25": one decimal place at most) and the agent
dropped them all. The agent now refuses such a factor at start, in one line and with
exit 2; an accepted one (2.5) runs, and its windows are stored by the real controller.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from homefleet.cli import app
from tests.edge_agent.models import add_model
from tests.edge_agent.test_agent_process import (
    ROOT,
    agent_info,
    final_report,
    predict,
    read_log,
    stop,
)
from tests.support.controller import Controller, eventually, running_controller

DEVICE = "hub-1"  # test_agent_process.final_report reads the reports of any device


@pytest.mark.parametrize("factor", ["2.25", "1.00001", "100.5", "0.5", "nan"])
def test_a_slowdown_the_controller_would_refuse_is_refused_at_start(
    tmp_path: Path, factor: str
) -> None:
    state = tmp_path / "state"
    result = CliRunner().invoke(
        app,
        [
            "agent", "run", "--device-id", DEVICE, "--device-class", "home-hub",
            "--state-dir", str(state), "--emulate-slowdown", factor,
        ],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()  # one line, saying what is accepted
    assert line.startswith("error: --emulate-slowdown:"), line
    assert "at most 100, with at most one decimal place (e.g. 2.5 or 10)" in line
    assert line.endswith(f"got {float(factor)!r}"), line
    assert not state.exists()  # refused before anything was written


async def stored_sources(controller: Controller) -> set[str] | None:
    """The energy sources of the windows the controller stored (None while there is none)."""
    with sqlite3.connect(controller.data_dir / "homefleet.db") as db:
        rows = db.execute(
            "SELECT DISTINCT energy_source FROM telemetry_windows WHERE device_id = ?", (DEVICE,)
        ).fetchall()
    return {str(source) for (source,) in rows} or None


def test_an_agent_run_with_slowdown_2_5_has_its_telemetry_stored(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "agent.log"
    no_meters = tmp_path / "sysfs"  # no RAPL or hwmon under it: the "none" meter
    no_meters.mkdir()

    async def main() -> None:
        async with running_controller(tmp_path / "controller", heartbeat_seconds=1) as controller:
            sha = (await controller.release("motions", add_model(1.0))).sha256
            with log.open("ab") as out:
                agent = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "edge_agent", "run",
                    "--controller", controller.address, "--device-id", DEVICE,
                    "--device-class", "home-hub", "--state-dir", str(state),
                    "--sysfs-root", str(no_meters), "--emulate-slowdown", "2.5",
                    "--telemetry-window-seconds", "0.2",
                    "--trust-key", str(controller.public_key_path),
                    cwd=ROOT,
                    stderr=out,
                )  # fmt: skip
            try:
                info = await agent_info(state, agent)
                report = await eventually("its report", lambda: final_report(controller, sha))
                assert report["outcome"] == "active", report
                await predict(info["local_api"])
                sources = await eventually("a stored window", lambda: stored_sources(controller))
            finally:
                code, text = await stop(agent, log)
            assert sources == {"none*2.5"}, read_log(log)
            assert code == 0, text
            assert "emulating a device 2.5x slower" in text

    asyncio.run(main())
