"""The controller loop against a wire-level fake controller over real loopback gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artifact.digest import sha256_bytes
from artifact.signing import SigningKey, TrustedKey
from edge_agent.agent import restore_slots
from edge_agent.config import AgentConfig
from edge_agent.hardware import collect
from edge_agent.runtime import ModelRuntime
from edge_agent.store import StateStore
from edge_agent.sync import SyncLoop
from protos import fleet_pb2
from tests.edge_agent.fake_controller import FakeController, make_manifest, start_fake
from tests.edge_agent.models import add_model

ACTIVE = fleet_pb2.DEPLOYMENT_OUTCOME_ACTIVE
FAILED = fleet_pb2.DEPLOYMENT_OUTCOME_FAILED
DOWNLOADING = fleet_pb2.DEPLOYMENT_OUTCOME_DOWNLOADING


@dataclass
class Agent:
    loop: SyncLoop
    store: StateStore
    runtime: ModelRuntime


@contextlib.asynccontextmanager
async def running_agent(
    state: Path, address: str, *, trusted: TrustedKey | None = None, rpc_timeout_s: float = 10.0
) -> AsyncIterator[Agent]:
    config = AgentConfig(
        controller=address,
        device_id="dev-1",
        device_class="home-hub",
        state_dir=state,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        rpc_timeout_s=rpc_timeout_s,
    )
    store = StateStore(state)
    runtime = ModelRuntime(threads=1)
    restore_slots(store, runtime)
    loop = SyncLoop(config, store, runtime, collect(), trusted, rng=random.Random(0))
    task = asyncio.create_task(loop.run())
    try:
        yield Agent(loop, store, runtime)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def scenario(body: Callable[[FakeController, str], Awaitable[None]], **fake: Any) -> None:
    async def main() -> None:
        controller = FakeController(**fake)
        server, address = await start_fake(controller)
        try:
            await body(controller, address)
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_deploys_an_assignment_and_reports_active(tmp_path: Path) -> None:
    data = add_model(1.0)

    async def body(controller: FakeController, address: str) -> None:
        async with running_agent(tmp_path, address) as agent:
            sha = await controller.assign("motions", data)
            await controller.wait_for(lambda: controller.final_report(sha) is not None)
            report = controller.final_report(sha)
            assert report is not None and report.outcome == ACTIVE, report
            assert report.serving_sha256 == sha
            assert report.bytes_received == len(data)
            assert report.encoding == fleet_pb2.PAYLOAD_ENCODING_FULL
            assert controller.outcomes(sha) == [DOWNLOADING, ACTIVE]
            assert agent.runtime.get("motions").sha256 == sha
            held = agent.store.load_slots().models["motions"]
            assert held.active is not None and held.active.sha256 == sha
            assert held.active.to_signed() == controller.assignments["motions"].manifest
            register = controller.registers[0]
            assert (register.device_id, register.device_class) == ("dev-1", "home-hub")
            assert register.hardware.cpu_cores >= 1 and register.hardware.onnxruntime_version

    scenario(body)


def test_a_broken_stream_resumes_from_the_bytes_already_received(tmp_path: Path) -> None:
    data = add_model(1.0)

    async def body(controller: FakeController, address: str) -> None:
        controller.break_fetch_after = 100  # one chunk, then the connection is cut
        async with running_agent(tmp_path, address) as agent:
            sha = await controller.assign("motions", data)
            await controller.wait_for(lambda: controller.final_report(sha) is not None)
            assert controller.outcomes(sha)[-1] == ACTIVE
            offsets = [(f.offset, f.encoding) for f in controller.fetches]
            assert offsets == [
                (0, fleet_pb2.PAYLOAD_ENCODING_UNSPECIFIED),
                (100, fleet_pb2.PAYLOAD_ENCODING_FULL),
            ]
            assert agent.store.artifact_path(sha).read_bytes() == data

    scenario(body)


def test_a_part_file_left_by_a_previous_run_is_resumed(tmp_path: Path) -> None:
    data = add_model(1.0)
    sha = sha256_bytes(data)
    StateStore(tmp_path).partial_path(sha).write_bytes(data[:50])

    async def body(controller: FakeController, address: str) -> None:
        async with running_agent(tmp_path, address):
            await controller.assign("motions", data)
            await controller.wait_for(lambda: controller.final_report(sha) is not None)
            assert controller.outcomes(sha)[-1] == ACTIVE
            assert [f.offset for f in controller.fetches] == [50]

    scenario(body)


def _deploy_first(controller: FakeController, agent: Agent) -> Callable[[], Awaitable[str]]:
    async def deploy() -> str:
        sha = await controller.assign("motions", add_model(1.0))
        await controller.wait_for(lambda: controller.final_report(sha) is not None)
        assert agent.runtime.get("motions").sha256 == sha
        return sha

    return deploy


async def _expect_failure(controller: FakeController, agent: Agent, old: str, sha: str) -> str:
    await controller.wait_for(lambda: controller.final_report(sha) is not None)
    report = controller.final_report(sha)
    assert report is not None and report.outcome == FAILED
    assert report.serving_sha256 == old
    assert agent.runtime.get("motions").sha256 == old  # the old model keeps serving
    return report.reason


def test_a_hash_mismatch_fails_with_the_digests_and_keeps_the_old_model(tmp_path: Path) -> None:
    good = add_model(2.0)
    evil = add_model(3.0)  # same length, other bytes

    async def body(controller: FakeController, address: str) -> None:
        async with running_agent(tmp_path, address) as agent:
            old = await _deploy_first(controller, agent)()
            sha = await controller.assign("motions", good, serve=evil)
            reason = await _expect_failure(controller, agent, old, sha)
            assert reason == f"sha256 mismatch: expected {sha} got {sha256_bytes(evil)}"
            assert not agent.store.partial_path(sha).exists()
            assert not agent.store.has_artifact(sha)

    scenario(body)


def test_a_model_failing_self_test_is_reported_and_the_old_model_kept(tmp_path: Path) -> None:
    async def body(controller: FakeController, address: str) -> None:
        async with running_agent(tmp_path, address) as agent:
            old = await _deploy_first(controller, agent)()
            sha = await controller.assign("motions", add_model(float("nan")))
            reason = await _expect_failure(controller, agent, old, sha)
            assert "self-test" in reason and "non-finite" in reason
            held = agent.store.load_slots().models["motions"]
            assert held.active is not None and held.active.sha256 == old

    scenario(body)


def test_manifests_for_another_class_or_unsigned_or_tampered_are_refused(tmp_path: Path) -> None:
    key = SigningKey.generate()
    other = SigningKey.generate()

    async def body(controller: FakeController, address: str) -> None:
        async with running_agent(
            tmp_path, address, trusted=TrustedKey(key.private.public_key())
        ) as agent:
            old = await controller.assign("motions", add_model(1.0), key=key)
            await controller.wait_for(lambda: controller.final_report(old) is not None)
            assert controller.outcomes(old)[-1] == ACTIVE

            data = add_model(2.0)
            wrong_class = make_manifest("motions", data, device_class="camera")
            sha = await controller.assign("motions", data, key=key, manifest=wrong_class)
            reason = await _expect_failure(controller, agent, old, sha)
            assert "'camera'" in reason and "'home-hub'" in reason

            data = add_model(4.0)
            sha = await controller.assign("motions", data)  # unsigned
            assert "unsigned" in await _expect_failure(controller, agent, old, sha)

            data = add_model(5.0)
            sha = await controller.assign("motions", data, key=other)
            assert "trusts only key" in await _expect_failure(controller, agent, old, sha)
            assert len(controller.fetches) == 1  # nothing refused was downloaded

    scenario(body)


def test_after_a_restart_the_model_is_served_and_not_downloaded_again(tmp_path: Path) -> None:
    data = add_model(1.0)

    async def body(controller: FakeController, address: str) -> None:
        async with running_agent(tmp_path, address):
            sha = await controller.assign("motions", data)
            await controller.wait_for(lambda: controller.final_report(sha) is not None)
        fetches = len(controller.fetches)
        async with running_agent(tmp_path, address) as agent:
            assert agent.runtime.get("motions").sha256 == sha  # served before any contact
            await controller.wait_for(lambda: len(controller.registers) == 2)
            held = [(h.model_name, h.sha256, h.active) for h in controller.registers[1].held]
            assert held == [("motions", sha, True)]
            await agent.loop.connected.wait()
            # a new revision makes the agent re-read the desired state: still nothing to fetch
            other = await controller.assign("other", add_model(7.0))
            await controller.wait_for(lambda: controller.final_report(other) is not None)
            assert [f.target_sha256 for f in controller.fetches[fetches:]] == [other]

    scenario(body)


def test_switching_back_to_the_previous_artifact_needs_no_download(tmp_path: Path) -> None:
    async def body(controller: FakeController, address: str) -> None:
        async with running_agent(tmp_path, address) as agent:
            first = await controller.assign("motions", add_model(1.0))
            await controller.wait_for(lambda: controller.final_report(first) is not None)
            second = await controller.assign("motions", add_model(2.0))
            await controller.wait_for(lambda: controller.final_report(second) is not None)
            reports = len(controller.reports)
            await controller.assign("motions", add_model(1.0))
            await controller.wait_for(lambda: len(controller.reports) > reports)
            assert controller.reports[-1].outcome == ACTIVE
            assert controller.reports[-1].artifact_sha256 == first
            assert len(controller.fetches) == 2
            assert agent.runtime.get("motions").sha256 == first
            previous = agent.runtime.previous("motions")
            assert previous is not None and previous.sha256 == second

    scenario(body)


class _Attempts(logging.Handler):
    """Collects the sync loop's reconnect messages; sets ``enough`` after three."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.enough = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "reconnect attempt" in record.getMessage():
            self.messages.append(record.getMessage())
            if len(self.messages) >= 3:
                self.enough.set()


def test_reconnects_with_backoff_until_the_controller_is_there(tmp_path: Path) -> None:
    async def main() -> None:
        attempts = _Attempts()
        logging.getLogger("edge_agent.sync").addHandler(attempts)
        controller = FakeController()
        server, address = await start_fake(controller)
        await server.stop(0)  # the controller is away; its port is known
        async with running_agent(tmp_path, address) as agent:
            await asyncio.wait_for(attempts.enough.wait(), 60)
            server, _ = await start_fake(controller, address)
            try:
                sha = await controller.assign("motions", add_model(1.0))
                await controller.wait_for(lambda: controller.final_report(sha) is not None)
                assert agent.runtime.get("motions").sha256 == sha
            finally:
                await server.stop(0)
        logging.getLogger("edge_agent.sync").removeHandler(attempts)
        first, second = attempts.messages[:2]
        assert "reconnect attempt 1 " in first and "reconnect attempt 2 " in second
        assert "UNAVAILABLE" in first

    asyncio.run(main())


def test_a_controller_that_never_answers_fetch_is_retried_then_reported(tmp_path: Path) -> None:
    data = add_model(1.0)

    async def body(controller: FakeController, address: str) -> None:
        async with running_agent(tmp_path, address) as agent:
            sha = await controller.assign("motions", data)
            controller.blobs.pop(sha)  # NOT_FOUND: a refusal, not an outage
            await controller.wait_for(lambda: controller.final_report(sha) is not None)
            report = controller.final_report(sha)
            assert report is not None and report.outcome == FAILED
            assert "NOT_FOUND" in report.reason
            assert agent.runtime.model_names() == []

    scenario(body)


def test_a_watch_stream_silent_for_three_heartbeats_is_treated_as_lost(tmp_path: Path) -> None:
    async def body(controller: FakeController, address: str) -> None:
        attempts = _Attempts()
        logging.getLogger("edge_agent.sync").addHandler(attempts)
        try:
            async with running_agent(tmp_path, address, rpc_timeout_s=0.5):
                await controller.wait_for(lambda: len(controller.registers) >= 2)
        finally:
            logging.getLogger("edge_agent.sync").removeHandler(attempts)
        assert "no assignment message" in attempts.messages[0]

    scenario(body, heartbeat_seconds=1, silent=True)
