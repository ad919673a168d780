"""The agent as a process: `python -m edge_agent run ...` against the real controller.

Covers agent.json, the local API, SIGTERM -> exit 0, a restart that serves the model it
had without downloading it again, even while the controller is away, a second agent
on a served --listen address exiting 1 instead of sharing or taking it, a corrupt
telemetry queue set aside while serving goes on, and a read-only state directory
refused in one line with exit 2.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
from pathlib import Path
from typing import Any

import grpc.aio
import numpy as np

from artifact.digest import sha256_bytes
from edge_agent.convert import tensor_from_proto, tensor_to_proto
from edge_agent.store import ModelSlots, SlotRecord, SlotsFile, StateStore
from protos import fleet_pb2, fleet_pb2_grpc
from tests.edge_agent.models import add_model
from tests.edge_agent.readonly import read_only_prefix
from tests.support.controller import Controller, eventually, reserve_port, running_controller

ROOT = Path(__file__).resolve().parents[2]
SAFETY_LIMIT_S = 60.0  # for a hung process, never a timing assertion


def trust_args(trust_key: Path | None) -> list[str]:
    """The controller's key pinned, or (no controller to pin) verification waived by name."""
    return ["--trust-key", str(trust_key)] if trust_key else ["--allow-unsigned-manifests"]


async def start_agent(
    state: Path,
    controller: str,
    listen: str,
    log: Path,
    device_id: str = "hub-1",
    trust_key: Path | None = None,
) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge_agent", "run",
            "--controller", controller, "--device-id", device_id, "--device-class", "home-hub",
            "--state-dir", str(state), "--listen", listen, "--log-level", "DEBUG",
            *trust_args(trust_key),
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


async def local_models(address: str) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = fleet_pb2_grpc.InferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        response: fleet_pb2.LocalModelsResponse = await stub.ListModels(
            fleet_pb2.LocalModelsRequest(), timeout=30
        )
        return [m.model_name for m in response.models]


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

            key = controller.public_key_path
            agent = await start_agent(state, address, "127.0.0.1:0", first_log, trust_key=key)
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
            assert "NOT verified" not in log  # the pinned key verified the manifest
            assert not (state / "agent.json").exists()
            # recorded when the call ends, which can be just after the agent's report
            fetched = await eventually("the download to be recorded", lambda: recorded(controller))
            assert len(fetched) == 1
        # the controller is gone: nothing listens on its port any more

        socket = f"unix:{short_dir}/agent.sock"
        agent = await start_agent(state, address, socket, second_log, trust_key=key)
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


def test_a_second_agent_on_a_served_listen_address_exits_1_and_the_first_keeps_it(
    tmp_path: Path, short_dir: Path
) -> None:
    refusing = reserve_port()  # the controller is away: the local API serves regardless
    controller = f"127.0.0.1:{refusing.getsockname()[1]}"
    socket_file = short_dir / "agent.sock"
    agents: list[asyncio.subprocess.Process] = []

    async def start(name: str, listen: str) -> asyncio.subprocess.Process:
        agent = await start_agent(
            tmp_path / name, controller, listen, tmp_path / f"{name}.log", device_id=name
        )
        agents.append(agent)
        return agent

    async def check() -> None:
        tcp = await start("hub-tcp", "127.0.0.1:0")
        unix = await start("hub-unix", f"unix:{socket_file}")
        tcp_address = (await agent_info(tmp_path / "hub-tcp", tcp))["local_api"]
        await agent_info(tmp_path / "hub-unix", unix)
        seconds = [
            await start("hub-tcp-2", tcp_address),
            await start("hub-unix-2", f"unix:{socket_file}"),
        ]
        codes = [await asyncio.wait_for(a.wait(), SAFETY_LIMIT_S) for a in seconds]
        tcp_log, unix_log = (
            read_log(tmp_path / "hub-tcp-2.log"),
            read_log(tmp_path / "hub-unix-2.log"),
        )
        assert codes == [1, 1], (tcp_log, unix_log)  # could not start: systemd retries
        assert f"error: --listen: {tcp_address} is already in use" in tcp_log
        assert f"error: --listen: another process serves unix:{socket_file}" in unix_log
        for address in (tcp_address, f"unix:{socket_file}"):
            assert await local_models(address) == []  # the first agents still answer
        for agent, name in ((tcp, "hub-tcp"), (unix, "hub-unix")):
            code, log = await stop(agent, tmp_path / f"{name}.log")
            assert code == 0, log
        assert not socket_file.exists()

    async def main() -> None:
        try:
            await check()
        finally:
            for agent in agents:  # only left running when the test failed
                if agent.returncode is None:
                    agent.kill()
                    await agent.wait()

    try:
        asyncio.run(main())
    finally:
        refusing.close()


def served_state(state: Path) -> str:
    """A state directory as a previous run left it: model "motions" active; its digest."""
    store = StateStore(state)
    data = add_model(1.0)
    sha = sha256_bytes(data)
    store.artifact_path(sha).write_bytes(data)
    store.save_slots(SlotsFile(models={"motions": ModelSlots(active=SlotRecord(sha256=sha))}))
    return sha


def test_a_corrupt_telemetry_queue_is_set_aside_and_the_agent_keeps_serving(
    tmp_path: Path,
) -> None:
    state, log = tmp_path / "state", tmp_path / "agent.log"
    sha = served_state(state)
    garbage = random.Random(3).randbytes(50_000)  # `head -c 50000 /dev/urandom > ...`
    (state / "telemetry.db").write_bytes(garbage)
    refusing = reserve_port()  # the controller is away: serving does not need it

    async def main() -> None:
        agent = await start_agent(
            state, f"127.0.0.1:{refusing.getsockname()[1]}", "127.0.0.1:0", log
        )
        try:
            info = await agent_info(state, agent)
            assert (await predict(info["local_api"])).artifact_sha256 == sha
        finally:
            code, text = await stop(agent, log)
        assert code == 0, text
        assert "WARNING edge_agent.telemetry_queue" in text and "set aside" in text, text
        (aside,) = state.glob("telemetry.db.corrupt-*")
        assert aside.read_bytes() == garbage
        assert str(aside) in text

    try:
        asyncio.run(main())
    finally:
        refusing.close()


def test_a_read_only_state_directory_is_a_one_line_configuration_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    served_state(state)

    async def main() -> tuple[int, str]:
        prefix = read_only_prefix(state)
        agent = await asyncio.create_subprocess_exec(
            *prefix, sys.executable, "-m", "edge_agent", "run",
            "--controller", "127.0.0.1:1", "--device-id", "hub-1", "--device-class", "home-hub",
            "--state-dir", str(state), "--allow-unsigned-manifests",
            cwd=ROOT,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(agent.communicate(), SAFETY_LIMIT_S)
        return await agent.wait(), stderr.decode(errors="replace")

    code, stderr = asyncio.run(main())
    assert code == 2, stderr  # bad configuration: systemd does not restart it
    (line,) = stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"error: --state-dir: the agent cannot write to {state} "), line
    assert "(EROFS)" in line or "(EACCES)" in line, line
    assert "read-write" in line or "write access" in line, line
