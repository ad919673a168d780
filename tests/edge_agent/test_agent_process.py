"""The agent as a process: `python -m edge_agent run ...` against a wire-level fake controller.

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
from tests.edge_agent.fake_controller import FakeController, start_fake
from tests.edge_agent.models import add_model

ROOT = Path(__file__).resolve().parents[2]


async def start_agent(state: Path, controller: str, listen: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge_agent", "run",
        "--controller", controller, "--device-id", "hub-1", "--device-class", "home-hub",
        "--state-dir", str(state), "--listen", listen, "--log-level", "DEBUG",
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
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


async def stop(process: asyncio.subprocess.Process) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def predict(address: str) -> fleet_pb2.PredictResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = fleet_pb2_grpc.InferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        x = tensor_to_proto("x", np.zeros((1, 4), np.float32))
        request = fleet_pb2.PredictRequest(model_name="motions", inputs=[x])
        response: fleet_pb2.PredictResponse = await stub.Predict(request, timeout=30)
        return response


def test_agent_process_deploys_stops_cleanly_and_restarts_without_downloading(
    tmp_path: Path, short_dir: Path
) -> None:
    state = tmp_path / "state"
    data = add_model(1.0)

    async def main() -> None:
        controller = FakeController()
        server, address = await start_fake(controller)
        sha = await controller.assign("motions", data)

        agent = await start_agent(state, address, "127.0.0.1:0")
        info = await agent_info(state, agent)
        assert info["pid"] == agent.pid and info["device_id"] == "hub-1"
        assert info["local_api"].startswith("127.0.0.1:")
        await controller.wait_for(lambda: controller.final_report(sha) is not None)
        report = controller.final_report(sha)
        assert report is not None and report.outcome == fleet_pb2.DEPLOYMENT_OUTCOME_ACTIVE
        response = await predict(info["local_api"])
        assert response.artifact_sha256 == sha
        np.testing.assert_array_equal(tensor_from_proto(response.outputs[0]), np.ones((1, 4)))
        code, log = await stop(agent)
        assert code == 0, log
        assert not (state / "agent.json").exists()
        await server.stop(0)  # the controller goes away

        socket = f"unix:{short_dir}/agent.sock"
        agent = await start_agent(state, address, socket)
        info = await agent_info(state, agent)
        assert info["local_api"] == socket
        response = await predict(socket)  # served from disk, controller unreachable
        assert response.artifact_sha256 == sha
        code, log = await stop(agent)
        assert code == 0, log
        assert "serving " + sha + " (restored)" in log
        assert "reconnect attempt" in log
        assert len(controller.fetches) == 1

    asyncio.run(main())


def test_bad_options_are_a_usage_error(tmp_path: Path) -> None:
    async def main() -> None:
        agent = await start_agent(tmp_path / "s", "127.0.0.1:50051", "nowhere")
        _, stderr = await asyncio.wait_for(agent.communicate(), 60)
        assert agent.returncode == 2
        assert "--listen" in stderr.decode() and "HOST:PORT" in stderr.decode()

    asyncio.run(main())
