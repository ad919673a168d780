"""`unassign`: a device that follows its class again converges on the class's bytes.

End to end, a real controller and the agent's real SyncLoop (tests.edge_agent.test_sync):
a device that ran a newer version than its class's artifact gets that artifact again as
a re-release (agents refuse a manifest older than one they ran). At the RPC level: an
unknown model is NOT_FOUND and changes nothing.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from artifact.manifest import Manifest
from protos import fleet_pb2 as pb
from tests.edge_agent.models import add_model
from tests.edge_agent.test_sync import (
    DEVICE,
    active_manifest,
    deploy,
    final_report_since,
    register_other,
    reports,
    running_agent,
    scenario,
    wait_active,
)
from tests.support.controller import CALL_TIMEOUT_S, Controller


def test_a_device_that_ran_a_newer_version_serves_its_class_bytes_after_unassign(
    tmp_path: Path,
) -> None:
    """Class at v1, the device's own assignment v2 (newer), unassigned: the class's v1
    is re-released as v3 for the class, and the agent serves v1's bytes under it."""

    async def body(controller: Controller, state: Path) -> None:
        async with running_agent(state, controller.address) as agent:
            v1 = await deploy(controller, agent, add_model(1.0))  # assigned to the class
            await register_other(controller, "other")  # follows the class too
            model = await controller.add_model("motions", add_model(2.0))
            v2 = await controller.create_artifact("motions", "home-hub", model.version)
            await controller.assign(v2.id, device_id=DEVICE)
            await wait_active(controller, v2.sha256)
            before = len(await reports(controller, v1.sha256))

            reply = await controller.admin.Unassign(
                pb.UnassignRequest(model_name="motions", device_id=DEVICE),
                timeout=CALL_TIMEOUT_S,
            )
            assert reply.artifact_id == "motions/home-hub/v3", reply

            report = await final_report_since(controller, v1.sha256, before)
            assert report["outcome"] == "active", report
            assert agent.runtime.get("motions").sha256 == v1.sha256
            manifest = active_manifest(agent)
            assert (manifest.version, manifest.rereleases) == (3, v1.id)

        listed = await controller.admin.ListArtifacts(
            pb.ListArtifactsRequest(model_name="motions"), timeout=CALL_TIMEOUT_S
        )
        rerelease = {a.id: a for a in listed.artifacts}["motions/home-hub/v3"]
        assert rerelease.sha256 == v1.sha256
        signed = Manifest.from_json_bytes(rerelease.manifest.manifest_json)
        assert signed.rereleases == v1.id
        # the class's other device gets the same bytes under the new version: no download
        other = await controller.device("other")
        assert other is not None
        assert (other.models[0].desired_artifact_id, other.models[0].desired_sha256) == (
            "motions/home-hub/v3",
            v1.sha256,
        )

    scenario(tmp_path, body)


def test_unassign_without_a_rollback_re_releases_nothing(tmp_path: Path) -> None:
    """The device's own assignment was older than its class's: no new version."""

    async def body(controller: Controller, state: Path) -> None:
        await register_other(controller, "hub-1")
        old = await controller.release("motions", add_model(1.0))
        await controller.assign(old.id, device_id="hub-1")
        new = await controller.release("motions", add_model(2.0))  # the class moves on
        reply = await controller.admin.Unassign(
            pb.UnassignRequest(model_name="motions", device_id="hub-1"), timeout=CALL_TIMEOUT_S
        )
        assert reply.artifact_id == new.id
        listed = await controller.admin.ListArtifacts(
            pb.ListArtifactsRequest(model_name="motions"), timeout=CALL_TIMEOUT_S
        )
        assert [a.id for a in listed.artifacts] == [old.id, new.id]

    scenario(tmp_path, body)


def test_unassigning_a_model_that_does_not_exist_is_not_found_and_changes_nothing(
    tmp_path: Path,
) -> None:
    async def body(controller: Controller, state: Path) -> None:
        await register_other(controller, "hub-1")
        await controller.release("motions", add_model(1.0))
        events = len(await controller.events())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await controller.admin.Unassign(
                pb.UnassignRequest(model_name="nomodel", device_id="hub-1"),
                timeout=CALL_TIMEOUT_S,
            )
        assert refused.value.code() is grpc.StatusCode.NOT_FOUND
        details = refused.value.details() or ""
        assert "model 'nomodel' is not registered" in details, details
        assert "follows class" not in details
        assert len(await controller.events()) == events

    scenario(tmp_path, body)
