"""The agent's sync loop against the real controller over loopback gRPC.

The controller (controller.server.ControllerServer, real SQLite, real blob store, real
signing key) runs on the test's event loop beside the agent's SyncLoop; situations are
made through its AdminService, and what the agent did is read back from the controller's
event log (device.registered, device.status, artifact.fetch). Network faults the
controller never makes on its own come from a real TCP proxy (tests.support.proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from artifact.digest import sha256_bytes
from artifact.manifest import Manifest
from artifact.signing import SigningKey, TrustedKey
from controller.keys import rotate_signing_key
from edge_agent.agent import restore_slots
from edge_agent.config import MIN_CHUNK_BYTES, AgentConfig
from edge_agent.hardware import collect
from edge_agent.runtime import ModelRuntime
from edge_agent.store import StateStore
from edge_agent.sync import SyncLoop
from protos import fleet_pb2
from tests.edge_agent.models import add_model, finetuned, large_add_model
from tests.support.controller import (
    WAIT_TIMEOUT_S,
    Controller,
    close_controller,
    eventually,
    open_controller,
    reserve_port,
    running_controller,
)
from tests.support.proxy import FaultProxy

DEVICE = "dev-1"
HEARTBEAT_S = 1  # the controller re-sends the desired state this often
FAULT_AT_BYTES = 200_000  # downstream bytes before a fault: mid-way through a large model
Report = dict[str, Any]


@dataclass
class Agent:
    loop: SyncLoop
    store: StateStore
    runtime: ModelRuntime


@contextlib.asynccontextmanager
async def running_agent(
    state: Path, address: str, *, trusted: TrustedKey | None = None, **config: Any
) -> AsyncIterator[Agent]:
    fields: dict[str, Any] = {
        "controller": address,
        "device_id": DEVICE,
        "device_class": "home-hub",
        "state_dir": state,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
    }
    fields.update(config)
    store = StateStore(state)
    runtime = ModelRuntime(threads=1)
    restore_slots(store, runtime)
    loop = SyncLoop(AgentConfig(**fields), store, runtime, collect(), trusted, rng=random.Random(0))
    task = asyncio.create_task(loop.run())
    try:
        yield Agent(loop, store, runtime)
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=WAIT_TIMEOUT_S)
        if not task.done():
            raise AssertionError("the sync loop did not stop when it was cancelled")
        if not task.cancelled() and task.exception() is not None:
            raise AssertionError("the sync loop failed") from task.exception()


def scenario(tmp_path: Path, body: Callable[[Controller, Path], Awaitable[None]]) -> None:
    """Run ``body`` with a real controller; the agent's state goes in the second argument."""

    async def main() -> None:
        async with running_controller(
            tmp_path / "controller", heartbeat_seconds=HEARTBEAT_S
        ) as controller:
            await body(controller, tmp_path / "agent")

    asyncio.run(main())


# ------------------------------------------------------------- the controller's view


async def reports(controller: Controller, sha: str) -> list[Report]:
    """Every ReportStatus the agent made about ``sha``, as the controller recorded it."""
    return [
        d
        for d in await controller.details("device.status")
        if d["device_id"] == DEVICE and d["artifact_sha256"] == sha
    ]


async def final_report(controller: Controller, sha: str) -> Report | None:
    done = [r for r in await reports(controller, sha) if r["outcome"] in ("active", "failed")]
    return done[-1] if done else None


async def final_report_since(controller: Controller, sha: str, before: int) -> Report:
    """The agent's next ACTIVE or FAILED report on ``sha`` after the first ``before``
    reports on it (`len(await reports(...))` taken before the change)."""

    async def done() -> Report | None:
        later = [
            r
            for r in (await reports(controller, sha))[before:]
            if r["outcome"] in ("active", "failed")
        ]
        return later[-1] if later else None

    return await eventually(f"the agent's report on {sha[:12]}", done)


def active_manifest(agent: Agent, model: str = "motions") -> Manifest:
    """The signed manifest the agent serves ``model`` under, from its slots."""
    held = agent.store.load_slots().models[model]
    assert held.active is not None
    manifest = held.active.manifest()
    assert manifest is not None
    return manifest


async def wait_final(controller: Controller, sha: str) -> Report:
    return await eventually(f"a final report on {sha[:12]}", lambda: final_report(controller, sha))


async def wait_active(controller: Controller, sha: str) -> Report:
    """The agent's ACTIVE report on ``sha``, once it comes (after failures, for example)."""

    async def active() -> Report | None:
        report = await final_report(controller, sha)
        return report if report is not None and report["outcome"] == "active" else None

    return await eventually(f"{sha[:12]} to be active", active)


async def fetches(controller: Controller, sha: str | None = None) -> list[Report]:
    """Every FetchArtifact call of the agent (for ``sha``), as the controller recorded it."""
    return [
        d
        for d in await controller.details("artifact.fetch")
        if d["device_id"] == DEVICE and sha in (None, d["target_sha256"])
    ]


async def registrations(controller: Controller) -> list[Report]:
    return [d for d in await controller.details("device.registered") if d["device_id"] == DEVICE]


async def register_other(controller: Controller, device_id: str) -> None:
    """Another home-hub device, registered by hand (no agent runs for it)."""
    await controller.agent.Register(
        fleet_pb2.RegisterRequest(
            device_id=device_id,
            device_class="home-hub",
            hardware=fleet_pb2.HardwareInfo(arch="x86_64", cpu_cores=1),
        ),
        timeout=30,
    )


async def recorded_fetches(controller: Controller, sha: str) -> list[Report]:
    """The fetches of ``sha`` once the controller has recorded at least one (it records a
    call when the call ends, which can be just after the agent has reported on it)."""

    async def some() -> list[Report] | None:
        return await fetches(controller, sha) or None

    return await eventually(f"a fetch of {sha[:12]} to be recorded", some)


async def deploy(controller: Controller, agent: Agent, data: bytes) -> fleet_pb2.Artifact:
    """Release ``data`` as model "motions" and wait until the agent serves it."""
    artifact = await controller.release("motions", data)
    report = await wait_final(controller, artifact.sha256)
    assert report["outcome"] == "active", report
    assert agent.runtime.get("motions").sha256 == artifact.sha256
    await recorded_fetches(controller, artifact.sha256)
    return artifact


async def expect_failure(controller: Controller, agent: Agent, old: str, sha: str) -> str:
    report = await wait_final(controller, sha)
    assert report["outcome"] == "failed", report
    assert report["serving_sha256"] == old
    assert agent.runtime.get("motions").sha256 == old  # the old model keeps serving
    return str(report["reason"])


class LogWatch(logging.Handler):
    """Collects one logger's messages that contain ``fragment``; ``seen`` after ``count``."""

    def __init__(self, logger: str, fragment: str, count: int = 1) -> None:
        super().__init__(logging.WARNING)
        self.logger = logging.getLogger(logger)
        self.fragment = fragment
        self.count = count
        self.messages: list[str] = []
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.fragment in message:
            self.messages.append(message)
            if len(self.messages) >= self.count:
                self.seen.set()

    def __enter__(self) -> LogWatch:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)

    async def wait(self) -> None:
        await asyncio.wait_for(self.seen.wait(), WAIT_TIMEOUT_S)


# ------------------------------------------------------------- deploying


def test_deploys_an_assignment_and_reports_active(tmp_path: Path) -> None:
    data = add_model(1.0)

    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(state, controller.address) as agent:
            artifact = await controller.release("motions", data)
            sha = artifact.sha256
            report = await wait_final(controller, sha)
            assert report["outcome"] == "active", report
            assert report["serving_sha256"] == sha
            assert report["bytes_received"] == len(data)
            assert report["encoding"] == "full"
            assert [r["outcome"] for r in await reports(controller, sha)] == [
                "downloading",
                "active",
            ]
            assert agent.runtime.get("motions").sha256 == sha
            held = agent.store.load_slots().models["motions"]
            assert held.active is not None and held.active.sha256 == sha
            assert held.active.to_signed() == artifact.manifest  # kept exactly as signed
            register = (await registrations(controller))[0]
            assert (register["device_id"], register["device_class"]) == (DEVICE, "home-hub")
            hardware = register["hardware"]
            assert hardware["cpu_cores"] >= 1 and hardware["onnxruntime_version"]

    scenario(tmp_path, body)


def test_a_broken_stream_resumes_from_the_bytes_already_received(tmp_path: Path) -> None:
    data = large_add_model(1.0)

    async def body(controller: Controller, state: Path) -> None:
        with FaultProxy(controller.port) as proxy:
            # the link stalls mid-download, then drops once the agent has stored some bytes
            proxy.black_hole_after(FAULT_AT_BYTES)
            async with running_agent(state, proxy.address, chunk_bytes=MIN_CHUNK_BYTES) as agent:
                sha = (await controller.release("motions", data)).sha256
                part = agent.store.partial_path(sha)

                async def stored_some() -> int | None:
                    size = part.stat().st_size if part.exists() else 0
                    return size if proxy.black_holed and size else None

                stored = await eventually("part of the download to be stored", stored_some)
                proxy.cut_all()
                assert (await wait_final(controller, sha))["outcome"] == "active"
                assert agent.store.artifact_path(sha).read_bytes() == data

                async def both_recorded() -> list[Report] | None:
                    calls = await fetches(controller, sha)
                    return calls if len(calls) >= 2 else None

                # (the controller cannot tell bytes queued from bytes delivered: the broken
                # call may be recorded as "completed"; what the agent asked for is exact)
                calls = await eventually("both fetches to be recorded", both_recorded)
                first, resumed = sorted(calls, key=lambda c: int(c["offset"]))
                assert first["offset"] == 0
                # resumed where the agent's stored bytes ended, and only the rest was sent
                assert 0 < stored <= resumed["offset"] <= FAULT_AT_BYTES
                assert resumed["completed"] is True
                assert resumed["offset"] + resumed["bytes_sent"] == len(data)
                assert resumed["total_bytes"] == len(data)
                # what the agent asked for, read off the wire: FULL when resuming
                asked = proxy.requests(
                    fleet_pb2.FetchArtifactRequest, lambda r: r.target_sha256 == sha
                )
                assert [(r.offset, r.encoding) for r in asked] == [
                    (0, fleet_pb2.PAYLOAD_ENCODING_UNSPECIFIED),
                    (resumed["offset"], fleet_pb2.PAYLOAD_ENCODING_FULL),
                ]

    scenario(tmp_path, body)


def test_a_part_file_left_by_a_previous_run_is_resumed(tmp_path: Path) -> None:
    data = add_model(1.0)
    sha = sha256_bytes(data)
    StateStore(tmp_path / "agent").partial_path(sha).write_bytes(data[:50])

    async def body(controller: Controller, state: Path) -> None:
        # assigned before the agent (re)starts, as when it stopped mid-download
        assert (await controller.release("motions", data)).sha256 == sha
        async with running_agent(state, controller.address):
            assert (await wait_final(controller, sha))["outcome"] == "active"
            calls = await recorded_fetches(controller, sha)
            assert [(c["offset"], c["bytes_sent"], c["completed"]) for c in calls] == [
                (50, len(data) - 50, True)
            ]

    scenario(tmp_path, body)


# ------------------------------------------------------------- refusing


def test_a_hash_mismatch_fails_with_the_digests_and_keeps_the_old_model(tmp_path: Path) -> None:
    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(state, controller.address) as agent:
            old = (await deploy(controller, agent, add_model(1.0))).sha256
            data = add_model(2.0)
            model = await controller.add_model("motions", data)
            artifact = await controller.create_artifact("motions", model_version=model.version)
            sha = artifact.sha256
            # bit rot on the device: the part file an earlier attempt left holds other bytes
            # (the controller checks its own blobs, so it never sends corrupt ones)
            corrupt = bytearray(data)
            corrupt[len(corrupt) // 4] ^= 0xFF
            agent.store.partial_dir.mkdir(parents=True, exist_ok=True)
            agent.store.partial_path(sha).write_bytes(bytes(corrupt[: len(corrupt) // 2]))
            await controller.assign(artifact.id, device_class="home-hub")

            reason = await expect_failure(controller, agent, old, sha)
            assert reason == f"sha256 mismatch: expected {sha} got {sha256_bytes(bytes(corrupt))}"
            assert not agent.store.partial_path(sha).exists()
            assert not agent.store.has_artifact(sha)

    scenario(tmp_path, body)


def test_a_model_failing_self_test_is_reported_and_the_old_model_kept(tmp_path: Path) -> None:
    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(state, controller.address) as agent:
            old = (await deploy(controller, agent, add_model(1.0))).sha256
            sha = (await controller.release("motions", add_model(float("nan")))).sha256
            reason = await expect_failure(controller, agent, old, sha)
            assert "self-test" in reason and "non-finite" in reason
            held = agent.store.load_slots().models["motions"]
            assert held.active is not None and held.active.sha256 == old

    scenario(tmp_path, body)


def test_manifests_signed_by_a_key_the_agent_does_not_trust_are_refused(tmp_path: Path) -> None:
    """The class/unsigned/tampered checks are in test_manifest_checks.py."""

    async def body(controller: Controller, state: Path) -> None:
        pinned = TrustedKey.from_pem(controller.public_key_path.read_bytes())
        async with running_agent(state, controller.address, trusted=pinned) as agent:
            # the pinned key verifies the controller's manifest
            old = (await deploy(controller, agent, add_model(1.0))).sha256

        stranger = TrustedKey(SigningKey.generate().private.public_key())
        async with running_agent(state, controller.address, trusted=stranger) as agent:
            sha = (await controller.release("motions", add_model(2.0))).sha256
            reason = await expect_failure(controller, agent, old, sha)
            assert "no endorsement that leads there" in reason
            assert controller.key_id in reason and stranger.key_id in reason
            assert [c["target_sha256"] for c in await fetches(controller)] == [old]
            assert not agent.store.has_artifact(sha)  # nothing refused was downloaded

    scenario(tmp_path, body)


def test_after_a_key_rotation_the_agent_follows_the_endorsement_and_drops_the_old_key(
    tmp_path: Path,
) -> None:
    """Rotate while the controller is stopped; the pinned agent keeps updating."""
    controller_dir, state = tmp_path / "controller", tmp_path / "agent"

    async def main() -> None:
        async with running_controller(controller_dir, heartbeat_seconds=HEARTBEAT_S) as c:
            pinned = TrustedKey.from_pem(c.public_key_path.read_bytes())
            old_key_id = c.key_id
            async with running_agent(state, c.address, trusted=pinned) as agent:
                first = await deploy(c, agent, add_model(1.0))
        rotation = rotate_signing_key(controller_dir / "keys")
        assert rotation.old_key_id == old_key_id

        async with running_controller(controller_dir, heartbeat_seconds=HEARTBEAT_S) as c:
            assert c.key_id == rotation.new_key_id
            # artifacts made before the rotation were re-signed with the new key at start
            (listed,) = (await c.admin.ListArtifacts(fleet_pb2.ListArtifactsRequest())).artifacts
            assert listed.manifest.key_id == rotation.new_key_id
            async with running_agent(state, c.address, trusted=pinned) as agent:
                second = await deploy(c, agent, add_model(2.0))
                assert agent.runtime.get("motions").sha256 == second.sha256
                assert agent.loop.trust is not None
                assert agent.loop.trust.current.key_id == rotation.new_key_id
            assert first.sha256 != second.sha256

        # the agent now trusts only the new key, even when restarted with the old pin
        again = SyncLoop(
            AgentConfig(controller="127.0.0.1:1", device_id=DEVICE, device_class="home-hub",
                        state_dir=state),
            StateStore(state), ModelRuntime(threads=1), collect(), pinned,
        )  # fmt: skip
        assert again.trust is not None and again.trust.current.key_id == rotation.new_key_id

    asyncio.run(main())


def test_a_fetch_the_controller_refuses_is_retried_after_a_backoff_without_a_reconnect(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A blob missing on the controller (DATA_LOSS) may be restored: the agent tries again
    with a backoff on a stable link. A model that failed its self-test is not tried again:
    the same bytes would fail the same way."""
    caplog.set_level(logging.INFO, logger="edge_agent.sync")
    data = add_model(1.0)

    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(
            state, controller.address, deploy_retry_initial_s=0.1, deploy_retry_max_s=0.2
        ) as agent:
            broken = (await controller.release("broken", add_model(float("nan")))).sha256
            assert (await wait_final(controller, broken))["outcome"] == "failed"

            model = await controller.add_model("motions", data)
            artifact = await controller.create_artifact("motions", model_version=model.version)
            blob = controller.blob_path(artifact.sha256)
            blob.unlink()  # DATA_LOSS: a refusal, not an outage
            await controller.assign(artifact.id, device_class="home-hub")

            async def failed_twice() -> list[Report] | None:
                found = await reports(controller, artifact.sha256)
                failed = [r for r in found if r["outcome"] == "failed"]
                return failed if len(failed) >= 2 else None

            first, _ = (await eventually("a retry that fails again", failed_twice))[:2]
            assert "DATA_LOSS" in first["reason"] and "missing" in first["reason"]
            assert "motions" not in agent.runtime.model_names()

            blob.write_bytes(data)  # restored on the controller: the next retry works
            await wait_active(controller, artifact.sha256)
            assert agent.runtime.get("motions").sha256 == artifact.sha256
            assert len(await registrations(controller)) == 1  # no reconnect needed
            # tried once: every retry pass above considered it too
            outcomes = [r["outcome"] for r in await reports(controller, broken)]
            assert outcomes == ["downloading", "failed"]
        retries = [m for m in caplog.messages if m.startswith("retrying the deployment")]
        assert retries and all(artifact.sha256 in m for m in retries)
        assert all("the next retry is in about" in m for m in retries)
        assert any("not retried until the controller sends another manifest" in m
                   for m in caplog.messages)  # fmt: skip

    scenario(tmp_path, body)


# ------------------------------------------------------------- restarts and switching


def test_after_a_restart_the_model_is_served_and_not_downloaded_again(tmp_path: Path) -> None:
    data = add_model(1.0)

    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(state, controller.address) as agent:
            sha = (await deploy(controller, agent, data)).sha256
        downloaded = len(await fetches(controller))
        async with running_agent(state, controller.address) as agent:
            assert agent.runtime.get("motions").sha256 == sha  # served before any contact

            async def second_registration() -> Report | None:
                found = await registrations(controller)
                return found[1] if len(found) >= 2 else None

            register = await eventually("the agent to register again", second_registration)
            assert register["re_registered"] is True
            assert register["held"] == [{"model_name": "motions", "sha256": sha, "active": True}]
            await asyncio.wait_for(agent.loop.connected.wait(), WAIT_TIMEOUT_S)
            # a new revision makes the agent re-read the desired state: still nothing to fetch
            other = (await controller.release("other", add_model(7.0))).sha256
            assert (await wait_final(controller, other))["outcome"] == "active"
            await recorded_fetches(controller, other)
            calls = (await fetches(controller))[downloaded:]
            assert [c["target_sha256"] for c in calls] == [other]

    scenario(tmp_path, body)


def test_switching_back_to_the_previous_artifact_needs_no_download(tmp_path: Path) -> None:
    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(state, controller.address) as agent:
            first_artifact = await deploy(controller, agent, add_model(1.0))
            first = first_artifact.sha256
            second = (await deploy(controller, agent, add_model(2.0))).sha256
            before = len(await controller.details("device.status"))
            await controller.assign(first_artifact.id, device_class="home-hub")

            async def next_report() -> Report | None:
                found = await controller.details("device.status")
                return found[-1] if len(found) > before else None

            report = await eventually("a report on the switch back", next_report)
            assert (report["outcome"], report["artifact_sha256"]) == ("active", first)
            assert len(await fetches(controller)) == 2
            assert agent.runtime.get("motions").sha256 == first
            previous = agent.runtime.previous("motions")
            assert previous is not None and previous.sha256 == second

    scenario(tmp_path, body)


# ------------------------------------------------------------- updates as deltas


def test_an_update_travels_as_a_delta_against_the_artifact_held(tmp_path: Path) -> None:
    old_data = large_add_model(1.0)
    new_data = finetuned(old_data)

    async def body(controller: Controller, state: Path) -> None:
        with FaultProxy(controller.port) as proxy:
            async with running_agent(state, proxy.address) as agent:
                old = (await deploy(controller, agent, old_data)).sha256
                new = (await deploy(controller, agent, new_data)).sha256
                assert agent.store.artifact_path(new).read_bytes() == new_data
                report = await final_report(controller, new)
                assert report is not None and report["encoding"] == "delta"
                assert 0 < report["bytes_received"] < len(new_data) / 5
                (fetch,) = await fetches(controller, new)
                assert (fetch["encoding"], fetch["base_sha256"]) == ("delta", old)
                assert fetch["bytes_sent"] == report["bytes_received"]
                asked = proxy.requests(
                    fleet_pb2.FetchArtifactRequest, lambda r: r.target_sha256 == new
                )
                assert [(r.base_sha256, r.offset) for r in asked] == [(old, 0)]
                assert not list(agent.store.partial_dir.iterdir())  # nothing left behind

    scenario(tmp_path, body)


def test_a_broken_delta_download_resumes_as_a_delta(tmp_path: Path) -> None:
    old_data = large_add_model(1.0, floats=600_000)
    new_data = finetuned(old_data, fraction=0.2)

    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(state, controller.address) as agent:
            old = (await deploy(controller, agent, old_data)).sha256
        with FaultProxy(controller.port) as proxy:
            # a fresh connection: the link stalls once 2 chunks of the delta went through
            proxy.black_hole_after(2 * MIN_CHUNK_BYTES)
            async with running_agent(state, proxy.address, chunk_bytes=MIN_CHUNK_BYTES) as agent:
                new = (await controller.release("motions", new_data)).sha256
                part = agent.store.delta_partial_path(new)

                async def stored_some() -> int | None:
                    size = part.stat().st_size if part.exists() else 0
                    return size if proxy.black_holed and size else None

                await eventually("part of the delta to be stored", stored_some)
                proxy.cut_all()
                report = await wait_final(controller, new)
                assert (report["outcome"], report["encoding"]) == ("active", "delta")
                assert agent.store.artifact_path(new).read_bytes() == new_data
                asked = proxy.requests(
                    fleet_pb2.FetchArtifactRequest, lambda r: r.target_sha256 == new
                )
                assert [(r.base_sha256, r.encoding) for r in asked] == [
                    (old, fleet_pb2.PAYLOAD_ENCODING_UNSPECIFIED),
                    (old, fleet_pb2.PAYLOAD_ENCODING_DELTA),
                ]
                assert asked[1].offset > 0  # resumed, not started over

    scenario(tmp_path, body)


def test_a_delta_that_does_not_rebuild_the_artifact_falls_back_to_the_full_one(
    tmp_path: Path,
) -> None:
    old_data = large_add_model(1.0)
    new_data = finetuned(old_data)

    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(state, controller.address) as agent:
            old = await deploy(controller, agent, old_data)
            model = await controller.add_model("motions", new_data)
            new = await controller.create_artifact("motions", "home-hub", model.version)
            # have the controller compute the delta (for another device of the class, which
            # may fetch it: it is assigned there), then leave a damaged first half of it in
            # the agent's part files, as an earlier attempt on a failing disk would (the
            # controller checks its own blobs, so it never sends a corrupt payload)
            await register_other(controller, "prefetcher")
            await controller.assign(new.id, device_id="prefetcher")
            request = fleet_pb2.FetchArtifactRequest(
                device_id="prefetcher", target_sha256=new.sha256, base_sha256=old.sha256
            )
            chunks = [c async for c in controller.agent.FetchArtifact(request, timeout=60)]
            assert chunks[0].encoding == fleet_pb2.PAYLOAD_ENCODING_DELTA
            damaged = bytearray(b"".join(c.data for c in chunks))
            damaged[len(damaged) // 4] ^= 0x10
            info = {
                "sha256": chunks[0].payload_sha256,
                "total": len(damaged),
                "base_sha256": old.sha256,
            }
            agent.store.partial_dir.mkdir(parents=True, exist_ok=True)
            agent.store.delta_info_path(new.sha256).write_text(json.dumps(info))
            agent.store.delta_partial_path(new.sha256).write_bytes(damaged[: len(damaged) // 2])

            with LogWatch("edge_agent.fetch", "fetching the full artifact instead") as watch:
                await controller.assign(new.id, device_class="home-hub")
                report = await wait_final(controller, new.sha256)
                await watch.wait()
            assert (report["outcome"], report["encoding"]) == ("active", "full")
            # the whole delta (half of it left by the earlier attempt), then the artifact
            assert report["bytes_received"] == len(damaged) + len(new_data)
            assert agent.store.artifact_path(new.sha256).read_bytes() == new_data
            assert "hashes to" in watch.messages[0]

    scenario(tmp_path, body)


# ------------------------------------------------------------- an absent or silent controller


def test_reconnects_with_backoff_until_the_controller_is_there(tmp_path: Path) -> None:
    async def main() -> None:
        reserved = reserve_port()  # refused until the controller takes it over
        port = reserved.getsockname()[1]
        with LogWatch("edge_agent.sync", "reconnect attempt", count=3) as attempts:
            try:
                async with running_agent(
                    tmp_path / "agent",
                    f"127.0.0.1:{port}",
                    backoff_initial_s=0.1,
                    backoff_max_s=1.0,
                ) as agent:
                    await attempts.wait()
                    reserved.close()
                    async with running_controller(
                        tmp_path / "controller", port=port, heartbeat_seconds=HEARTBEAT_S
                    ) as controller:
                        await deploy(controller, agent, add_model(1.0))
            finally:
                reserved.close()
        first, second = attempts.messages[:2]
        assert "reconnect attempt 1 " in first and "reconnect attempt 2 " in second
        assert "UNAVAILABLE" in first

    asyncio.run(main())


def test_a_stop_that_comes_as_the_controller_goes_away_still_stops(tmp_path: Path) -> None:
    """The agent's stop (a cancel) lands while its watch stream breaks: it must not be lost."""

    async def main() -> None:
        for attempt in range(5):
            controller = await open_controller(
                tmp_path / f"controller-{attempt}", heartbeat_seconds=HEARTBEAT_S
            )
            state = tmp_path / f"agent-{attempt}"
            try:
                async with running_agent(state, controller.address) as agent:
                    await asyncio.wait_for(agent.loop.connected.wait(), WAIT_TIMEOUT_S)
                    await close_controller(controller)  # ends the watch stream, then the stop
            finally:
                await close_controller(controller)

    asyncio.run(main())


def test_a_watch_stream_silent_for_three_heartbeats_is_treated_as_lost(tmp_path: Path) -> None:
    async def body(controller: Controller, state: Path) -> None:
        with (
            FaultProxy(controller.port) as proxy,
            LogWatch("edge_agent.sync", "reconnect attempt") as attempts,
        ):
            async with running_agent(state, proxy.address, rpc_timeout_s=0.5) as agent:
                await asyncio.wait_for(agent.loop.connected.wait(), WAIT_TIMEOUT_S)
                proxy.black_hole()  # the link goes quiet; TCP stays up
                await attempts.wait()
                proxy.pass_through()
                await eventually(
                    "the agent to register again",
                    lambda: _at_least(2, registrations(controller)),
                )
        assert "no assignment message" in attempts.messages[0], attempts.messages
        assert f"every {HEARTBEAT_S} s" in attempts.messages[0]

    scenario(tmp_path, body)


def test_a_fetch_the_controller_stops_answering_times_out_and_resumes(tmp_path: Path) -> None:
    data = large_add_model(2.0)

    async def body(controller: Controller, state: Path) -> None:
        with FaultProxy(controller.port) as proxy:
            proxy.black_hole_after(FAULT_AT_BYTES)  # mid-download, the answers stop coming

            class StalledFetch(LogWatch):
                def emit(self, record: logging.LogRecord) -> None:
                    if proxy.black_holed:  # a deadline that passed while nothing came
                        super().emit(record)

            with StalledFetch("edge_agent.fetch", "DEADLINE_EXCEEDED") as stalled:
                async with running_agent(
                    state, proxy.address, chunk_bytes=MIN_CHUNK_BYTES, fetch_timeout_s=2.0
                ) as agent:
                    sha = (await controller.release("motions", data)).sha256
                    await stalled.wait()
                    proxy.pass_through()
                    assert (await wait_final(controller, sha))["outcome"] == "active"
                    assert agent.store.artifact_path(sha).read_bytes() == data

                    asked = proxy.requests(
                        fleet_pb2.FetchArtifactRequest, lambda r: r.target_sha256 == sha
                    )
                    assert asked[0].offset == 0
                    last = asked[-1]  # resumed, not started over
                    assert 0 < last.offset < len(data)
                    assert last.encoding == fleet_pb2.PAYLOAD_ENCODING_FULL

                    async def resumed() -> Report | None:
                        calls = await fetches(controller, sha)
                        done = [c for c in calls if c["offset"] == last.offset and c["completed"]]
                        return done[-1] if done else None

                    done = await eventually("the resumed fetch to be recorded", resumed)
                    assert done["offset"] + done["bytes_sent"] == len(data)
            assert "stream broke at byte" in stalled.messages[0]

    scenario(tmp_path, body)


async def _at_least(count: int, found: Awaitable[list[Report]]) -> bool:
    return len(await found) >= count


def test_an_artifact_no_longer_assigned_is_skipped_not_failed(tmp_path: Path) -> None:
    """A desired set the controller has moved past (the agent acts on it just as the
    assignment changes): the fetch is refused, and the agent neither reports a failure nor
    refuses the artifact later in the session when it is assigned after all."""

    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(state, controller.address) as agent:
            await eventually("the agent to register", lambda: registrations(controller))
            await register_other(controller, "other")
            model = await controller.add_model("motions", add_model(1.0))
            artifact = await controller.create_artifact("motions", "home-hub", model.version)
            await controller.assign(artifact.id, device_id="other")  # not to DEVICE
            watch = controller.agent.WatchAssignments(
                fleet_pb2.WatchAssignmentsRequest(device_id="other"), timeout=30
            )
            stale = await anext(aiter(watch))  # a desired set that is not DEVICE's
            watch.cancel()
            await agent.loop.apply(controller.agent, stale)  # a failure would be reported here
            assert await final_report(controller, artifact.sha256) is None  # no "failed"

            await controller.assign(artifact.id, device_class="home-hub")
            report = await wait_final(controller, artifact.sha256)
            assert report["outcome"] == "active", report

    scenario(tmp_path, body)
