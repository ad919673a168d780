"""The agent gets back to its assigned artifact after what goes wrong on the device itself.

A real controller and the agent's real SyncLoop (tests.edge_agent.test_sync): an active
artifact lost or rotted on disk, a failed artifact the controller re-releases under a new
version, and a state directory that is read-only for a while (a real read-only mount).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_agent.store import StateStore
from tests.edge_agent.models import add_model
from tests.edge_agent.readonly import read_only
from tests.edge_agent.test_sync import (
    Report,
    deploy,
    register_other,
    registrations,
    reports,
    running_agent,
    scenario,
    wait_active,
    wait_final,
)
from tests.support.controller import Controller, eventually


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_an_active_artifact_lost_on_disk_is_fetched_again_under_its_version(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """v1 then v2 deployed; v2's file goes; on restart the agent serves v1 and takes v2
    again under the same v2 manifest: the same bytes, not a reused version."""

    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(state, controller.address) as agent:
            v1 = (await deploy(controller, agent, add_model(1.0))).sha256
            v2 = (await deploy(controller, agent, add_model(2.0))).sha256
        lost = StateStore(state).artifact_path(v2)
        if damage == "deleted":
            lost.unlink()
        else:
            lost.write_bytes(b"bit rot")
        before = len(await reports(controller, v2))
        async with running_agent(state, controller.address) as agent:
            assert agent.runtime.get("motions").sha256 == v1  # fell back before any contact

            async def again() -> Report | None:
                found = (await reports(controller, v2))[before:]
                done = [r for r in found if r["outcome"] in ("active", "failed")]
                return done[-1] if done else None

            report = await eventually("the agent's report on v2 after the restart", again)
            assert report["outcome"] == "active", report
            assert agent.runtime.get("motions").sha256 == v2
            assert agent.store.verify_artifact(v2)
            held = agent.store.load_slots().models["motions"]
            assert held.version_floor == {"home-hub": 2}
            assert held.floor_sha256 == {"home-hub": v2}
        assert "serving the previous slot" in caplog.text
        assert "reused version" not in caplog.text

    scenario(tmp_path, body)


def test_a_rerelease_of_bytes_that_failed_is_tried_at_once(tmp_path: Path) -> None:
    """v2 fails (its blob is missing on the controller; the next retry is an hour away);
    the operator restores the blob and assigns v2 again, which the controller re-releases
    as v4 (v3 is in use elsewhere): a new manifest for the same bytes is tried at once."""

    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(
            state, controller.address, deploy_retry_initial_s=3600.0, deploy_retry_max_s=3600.0
        ) as agent:
            old = (await deploy(controller, agent, add_model(1.0))).sha256
            model = await controller.add_model("motions", add_model(2.0))
            v2 = await controller.create_artifact("motions", "home-hub", model.version)
            blob = controller.blob_path(v2.sha256)
            data = blob.read_bytes()
            blob.unlink()
            await controller.assign(v2.id, device_class="home-hub")
            report = await wait_final(controller, v2.sha256)
            assert report["outcome"] == "failed" and "DATA_LOSS" in report["reason"], report
            assert agent.runtime.get("motions").sha256 == old

            blob.write_bytes(data)  # restored on the controller
            await register_other(controller, "other")
            third = await controller.add_model("motions", add_model(3.0))
            v3 = await controller.create_artifact("motions", "home-hub", third.version)
            await controller.assign(v3.id, device_id="other")
            await controller.assign(v2.id, device_class="home-hub")  # re-released as v4

            await wait_active(controller, v2.sha256)
            assert agent.runtime.get("motions").sha256 == v2.sha256
            held = agent.store.load_slots().models["motions"]
            assert held.active is not None
            manifest = held.active.manifest()
            assert manifest is not None and manifest.version == 4
            assert manifest.rereleases == v2.id
            assert len(await registrations(controller)) == 1  # no reconnect needed

    scenario(tmp_path, body)


def test_a_read_only_state_directory_fails_a_deployment_that_is_retried_once_writable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Writing the artifact fails: a FAILED report naming the file and the errno, no
    traceback, the old model keeps serving; remounted writable, a retry deploys it."""
    caplog.set_level(logging.INFO, logger="edge_agent.sync")

    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(
            state, controller.address, deploy_retry_initial_s=0.2, deploy_retry_max_s=0.4
        ) as agent:
            old = (await deploy(controller, agent, add_model(1.0))).sha256
            with read_only(state):
                sha = (await controller.release("motions", add_model(2.0))).sha256
                report = await wait_final(controller, sha)
                assert report["outcome"] == "failed", report
                assert report["serving_sha256"] == old
                assert agent.runtime.get("motions").sha256 == old
            reason = report["reason"]
            assert f"state directory {state}" in reason, reason
            assert str(agent.store.partial_path(sha)) in reason, reason
            assert "(EROFS)" in reason or "(EACCES)" in reason, reason

            await wait_active(controller, sha)  # a retry, once the directory is writable
            assert agent.runtime.get("motions").sha256 == sha
            assert len(await registrations(controller)) == 1  # retried, not reconnected
        failed = [r for r in caplog.records if "FAILED" in r.getMessage()]
        assert failed and all(r.exc_info is None for r in failed)  # one line, no traceback
        assert "internal error" not in caplog.text
        assert any("retrying the deployment" in r.getMessage() for r in caplog.records)

    scenario(tmp_path, body)


def test_a_deployment_that_failed_on_a_corrupt_blob_is_tried_at_once_when_it_is_repaired(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """v2's bytes rot on the controller: the download ends DATA_LOSS and the agent's next
    retry is an hour away. The operator adds the model's file again (the documented fix):
    the controller records the repair and wakes the watch streams, whose assignment of v2
    now carries the repair time, and the agent tries v2 at once, on the same stream."""
    caplog.set_level(logging.INFO, logger="edge_agent.sync")

    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(
            state, controller.address, deploy_retry_initial_s=3600.0, deploy_retry_max_s=3600.0
        ) as agent:
            old = (await deploy(controller, agent, add_model(1.0))).sha256
            data = add_model(2.0)
            model = await controller.add_model("motions", data)
            v2 = await controller.create_artifact("motions", "home-hub", model.version)
            assert v2.sha256 == model.sha256  # an identity artifact: the model's own bytes
            blob = controller.blob_path(v2.sha256)
            blob.chmod(0o644)
            blob.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # bit rot, same size
            blob.chmod(0o444)
            await controller.assign(v2.id, device_class="home-hub")
            report = await wait_final(controller, v2.sha256)
            assert report["outcome"] == "failed" and "DATA_LOSS" in report["reason"], report
            assert agent.runtime.get("motions").sha256 == old

            repaired = await controller.add_model("motions", data)
            assert repaired.repaired

            await wait_active(controller, v2.sha256)
            assert agent.runtime.get("motions").sha256 == v2.sha256
            assert len(await registrations(controller)) == 1  # no reconnect needed
        assert "has repaired its stored copy" in caplog.text

    scenario(tmp_path, body)
