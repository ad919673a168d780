"""The agent as a process: `python -m edge_agent run ...` against the real controller.

Covers agent.json, the local API, SIGTERM -> exit 0, and a restart that serves the model
it had without downloading it again, even while the controller is away.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import grpc.aio
import numpy as np

from edge_agent.convert import tensor_from_proto, tensor_to_proto
from protos import fleet_pb2, fleet_pb2_grpc
from tests.edge_agent.models import add_model
from tests.support.controller import Controller, eventually, running_controller

ROOT = Path(__file__).resolve().parents[2]
SAFETY_LIMIT_S = 60.0  # for a hung process, never a timing assertion


async def start_agent(
    state: Path, controller: str, listen: str, log: Path
) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge_agent", "run",
            "--controller", controller, "--device-id", "hub-1", "--device-class", "home-hub",
            "--state-dir", str(state), "--listen", listen, "--log-level", "DEBUG",
            cwd=ROOT,
            stderr=out,
        )  # fmt: skip


async def agent_info(state: Path, process: asyncio.subprocess.Process) -> dict[str, Any]:
    path = state / "agent.json"
    for _ in range(1200):  # a safety limit, not a timing assertion
        if path.exists():
            info: dict[str, Any] = json.loads(path.read_text())
            return info
        if process.returncode is not None:
            break
        await asyncio.sleep(0.05)
    raise AssertionError("agent.json never appeared")


async def stop(process: asyncio.subprocess.Process, log: Path) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(process.wait(), SAFETY_LIMIT_S)
    return code, read_log(log)


def read_log(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


async def logged(log: Path, text: str) -> bool:
    return text in read_log(log)


async def predict(address: str) -> fleet_pb2.PredictResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = fleet_pb2_grpc.InferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        x = tensor_to_proto("x", np.zeros((1, 4), np.float32))
        request = fleet_pb2.PredictRequest(model_name="motions", inputs=[x])
        response: fleet_pb2.PredictResponse = await stub.Predict(request, timeout=30)
        return response


async def hub_fetches(controller: Controller) -> list[dict[str, Any]]:
    return [d for d in await controller.details("artifact.fetch") if d["device_id"] == "hub-1"]


async def recorded(controller: Controller) -> list[dict[str, Any]] | None:
    return await hub_fetches(controller) or None


async def final_report(controller: Controller, sha: str) -> dict[str, Any] | None:
    done = [
        d
        for d in await controller.details("device.status")
        if d["artifact_sha256"] == sha and d["outcome"] in ("active", "failed")
    ]
    return done[-1] if done else None


def test_agent_process_deploys_stops_cleanly_and_restarts_without_downloading(
    tmp_path: Path, short_dir: Path
) -> None:
    state = tmp_path / "state"
    data = add_model(1.0)

    async def main() -> None:
        first_log, second_log = tmp_path / "agent-1.log", tmp_path / "agent-2.log"
        async with running_controller(tmp_path / "controller", heartbeat_seconds=1) as controller:
            address = controller.address
            sha = (await controller.release("motions", data)).sha256

            agent = await start_agent(state, address, "127.0.0.1:0", first_log)
            info = await agent_info(state, agent)
            assert info["pid"] == agent.pid and info["device_id"] == "hub-1"
            assert info["local_api"].startswith("127.0.0.1:")
            report = await eventually(
                "the agent's final report", lambda: final_report(controller, sha)
            )
            assert report["outcome"] == "active", report
            response = await predict(info["local_api"])
            assert response.artifact_sha256 == sha
            np.testing.assert_array_equal(tensor_from_proto(response.outputs[0]), np.ones((1, 4)))
            code, log = await stop(agent, first_log)
            assert code == 0, log
            assert not (state / "agent.json").exists()
            # recorded when the call ends, which can be just after the agent's report
            fetched = await eventually("the download to be recorded", lambda: recorded(controller))
            assert len(fetched) == 1
        # the controller is gone: nothing listens on its port any more

        socket = f"unix:{short_dir}/agent.sock"
        agent = await start_agent(state, address, socket, second_log)
        info = await agent_info(state, agent)
        assert info["local_api"] == socket
        response = await predict(socket)  # served from disk, controller unreachable
        assert response.artifact_sha256 == sha
        await eventually("a reconnect attempt", lambda: logged(second_log, "reconnect attempt"))
        code, log = await stop(agent, second_log)
        assert code == 0, log
        assert "serving " + sha + " (restored)" in log
        assert "fetching" not in log  # nothing was downloaded again

    asyncio.run(main())


def test_bad_options_are_a_usage_error(tmp_path: Path) -> None:
    async def main() -> None:
        log = tmp_path / "agent.log"
        agent = await start_agent(tmp_path / "s", "127.0.0.1:50051", "nowhere", log)
        assert await asyncio.wait_for(agent.wait(), SAFETY_LIMIT_S) == 2
        stderr = read_log(log)
        assert "--listen" in stderr and "HOST:PORT" in stderr

    asyncio.run(main())
