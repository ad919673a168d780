"""How the demo decides that a device serves its artifact, and says why one does not."""

from __future__ import annotations

from demo.operator import ArtifactRef, devices_not_serving
from protos import fleet_pb2

SHA_A = "a" * 64
SHA_B = "b" * 64


def artifact(sha256: str) -> ArtifactRef:
    return ArtifactRef("m/hub/v2", "m", "hub", 2, sha256, 100)


def device(device_id: str, serving: str, outcome: int = 0, reason: str = "") -> fleet_pb2.Device:
    return fleet_pb2.Device(
        device_id=device_id,
        device_class="hub",
        models=[
            fleet_pb2.DeviceModelState(
                model_name="m",
                serving_sha256=serving,
                serving_artifact_id="m/hub/v1" if serving else "",
                last_outcome=outcome,  # type: ignore[arg-type]
                last_reason=reason,
            )
        ],
    )


def test_a_device_serving_the_expected_digest_is_done() -> None:
    assert devices_not_serving([device("d1", SHA_A)], {"d1": artifact(SHA_A)}) == []


def test_every_waiting_device_is_named_with_its_reason() -> None:
    failed = fleet_pb2.DeploymentOutcome.Value("DEPLOYMENT_OUTCOME_FAILED")
    lines = devices_not_serving(
        [
            device("d1", SHA_B, failed, "signature does not verify"),
            fleet_pb2.Device(device_id="d3"),
        ],
        {"d1": artifact(SHA_A), "d2": artifact(SHA_A), "d3": artifact(SHA_A)},
    )
    assert len(lines) == 3
    assert "d1: serves m/hub/v1, wants m/hub/v2" in lines[0]
    assert "DEPLOYMENT_OUTCOME_FAILED (signature does not verify)" in lines[0]
    assert "d2: not registered" in lines[1]
    assert "d3: no state for model 'm'" in lines[2]
