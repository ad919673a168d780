"""The whole path with real processes: controller and agents over real gRPC on loopback."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import fleet_pb2
from tests.support.proxy import FaultProxy

from .harness import Agent, Controller, linear_model, reference_output, wait_for

ACTIVE = fleet_pb2.DEPLOYMENT_OUTCOME_ACTIVE
FAILED = fleet_pb2.DEPLOYMENT_OUTCOME_FAILED


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    ctl = Controller(tmp_path / "controller").start()
    try:
        yield ctl
    finally:
        assert ctl.stop() == 0, ctl.process.log()


def start_agent(
    tmp_path: Path, address: str, device_id: str, device_class: str, trust_key: Path | None
) -> Agent:
    return Agent(
        device_id, device_class, tmp_path / "agents" / device_id, address, trust_key
    ).start()


def sample(features: int = 16, batch: int = 3) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((batch, features)).astype(np.float32)


def fetches(ctl: Controller, device_id: str, sha256: str) -> list[dict[str, object]]:
    details = [json.loads(e.detail_json) for e in ctl.events("artifact.fetch")]
    return [d for d in details if d["device_id"] == device_id and d["target_sha256"] == sha256]


def test_deploy_update_and_restart(tmp_path: Path, controller: Controller) -> None:
    hub = start_agent(tmp_path, controller.address, "hub-1", "home-hub", controller.public_key)
    speaker = start_agent(
        tmp_path, controller.address, "speaker-1", "smart-speaker", controller.public_key
    )
    try:
        v1 = linear_model(tmp_path / "v1.onnx", seed=1)
        hub_v1 = controller.release("motion", v1, "home-hub")
        speaker_v1 = controller.release("motion", v1, "smart-speaker")
        assert hub_v1.id == "motion/home-hub/v1" and speaker_v1.id == "motion/smart-speaker/v1"

        x = sample()
        for agent, artifact in ((hub, hub_v1), (speaker, speaker_v1)):
            state = controller.wait_serving(agent.device_id, "motion", artifact.sha256)
            assert state.last_outcome == ACTIVE
            y, answered_by = agent.predict("motion", x)
            assert answered_by == artifact.sha256
            np.testing.assert_allclose(y, reference_output(v1, x), rtol=1e-5, atol=1e-5)

        # An update: a second release replaces the first on the hub, the speaker is untouched.
        v2 = linear_model(tmp_path / "v2.onnx", seed=2)
        hub_v2 = controller.release("motion", v2, "home-hub")
        assert hub_v2.id == "motion/home-hub/v2" and hub_v2.sha256 != hub_v1.sha256
        controller.wait_serving("hub-1", "motion", hub_v2.sha256)
        y, answered_by = hub.predict("motion", x)
        assert answered_by == hub_v2.sha256
        np.testing.assert_allclose(y, reference_output(v2, x), rtol=1e-5, atol=1e-5)
        local = hub.inference().ListModels(fleet_pb2.LocalModelsRequest(), timeout=10)
        assert [(m.artifact_sha256, m.previous_sha256) for m in local.models] == [
            (hub_v2.sha256, hub_v1.sha256)
        ]
        _, answered_by = speaker.predict("motion", x)
        assert answered_by == speaker_v1.sha256

        # The CLI shows the fleet as operators see it.
        listing = controller.cli("devices", "--json")
        assert listing.returncode == 0, listing.stderr
        assert "hub-1" in listing.stdout and hub_v2.sha256 in listing.stdout

        # Restart with the controller away: the agent serves what it had, from disk.
        downloads_before = len(fetches(controller, "hub-1", hub_v2.sha256))
        assert hub.stop() == 0
        assert controller.stop() == 0
        hub.start()
        y, answered_by = hub.predict("motion", x)
        assert answered_by == hub_v2.sha256
        np.testing.assert_allclose(y, reference_output(v2, x), rtol=1e-5, atol=1e-5)

        # The controller comes back: the agent reconnects (backoff) and downloads nothing.
        controller.start()
        wait_for(
            "hub-1 to reconnect",
            lambda: (
                (d := controller.device("hub-1")) is not None
                and d.status == fleet_pb2.DEVICE_STATUS_ONLINE
            ),
        )
        controller.wait_serving("hub-1", "motion", hub_v2.sha256)
        assert len(fetches(controller, "hub-1", hub_v2.sha256)) == downloads_before
        # A crash (SIGKILL) is no different from a clean stop.
        hub.stop(signal.SIGKILL)
        hub.start()
        _, answered_by = hub.predict("motion", x)
        assert answered_by == hub_v2.sha256
    finally:
        hub.stop()
        speaker.stop()


def test_interrupted_download_resumes_from_its_offset(
    tmp_path: Path, controller: Controller
) -> None:
    big = linear_model(tmp_path / "big.onnx", seed=3, width=50_000)  # ~3.2 MB
    total = big.stat().st_size
    with FaultProxy(controller.port) as proxy:
        # the uplink stalls mid-download, then breaks once the agent has stored some bytes
        proxy.black_hole_after(1_000_000)
        agent = start_agent(tmp_path, proxy.address, "cam-1", "camera", controller.public_key)
        try:
            artifact = controller.release("big", big, "camera")
            part = agent.state_dir / "partial" / f"{artifact.sha256}.part"

            def stored_some() -> int | None:
                size = part.stat().st_size if part.exists() else 0
                return size if proxy.black_holed and size else None

            stored = wait_for("part of the download to be stored", stored_some)
            proxy.cut_all()
            proxy.pass_through()
            controller.wait_serving("cam-1", "big", artifact.sha256)

            # what the agent asked for, read off the wire: from 0, then from its bytes
            asked = [
                r.offset
                for r in proxy.requests(
                    fleet_pb2.FetchArtifactRequest, lambda r: r.target_sha256 == artifact.sha256
                )
            ]
            assert asked[0] == 0 and len(asked) == 2
            resumed_at = asked[1]
            assert 0 < stored <= resumed_at < total

            # what the controller sent on the resumed call: only the rest, nothing twice
            def resumed_call() -> dict[str, object] | None:
                calls = fetches(controller, "cam-1", artifact.sha256)
                return next((c for c in calls if c["offset"] == resumed_at), None)

            resumed = wait_for("the resumed fetch to be recorded", resumed_call)
            assert resumed["completed"] is True
            assert resumed_at + int(str(resumed["bytes_sent"])) == total
            assert int(str(resumed["total_bytes"])) == total

            x = sample()
            y, answered_by = agent.predict("big", x)
            assert answered_by == artifact.sha256
            np.testing.assert_allclose(y, reference_output(big, x), rtol=1e-4, atol=1e-4)
        finally:
            agent.stop()


def test_corrupt_bytes_are_refused_and_old_model_keeps_serving(
    tmp_path: Path, controller: Controller
) -> None:
    agent = start_agent(tmp_path, controller.address, "hub-2", "home-hub", controller.public_key)
    try:
        v1 = linear_model(tmp_path / "v1.onnx", seed=1)
        good = controller.release("motion", v1, "home-hub")
        controller.wait_serving("hub-2", "motion", good.sha256)

        v2 = linear_model(tmp_path / "v2.onnx", seed=2)
        model = controller.add_model("motion", v2)
        bad = controller.admin().CreateArtifact(
            fleet_pb2.CreateArtifactRequest(
                model_name="motion", model_version=model.version, device_class="home-hub"
            ),
            timeout=30,
        )
        # bit rot on the controller's disk: same length, different bytes
        blob = controller.data_dir / "blobs" / "sha256" / bad.sha256[:2] / bad.sha256
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        controller.admin().Assign(
            fleet_pb2.AssignRequest(artifact_id=bad.id, device_class="home-hub"), timeout=10
        )

        state = controller.wait_outcome("hub-2", "motion", FAILED)
        assert "sha256" in state.last_reason
        assert state.serving_sha256 == good.sha256
        x = sample()
        y, answered_by = agent.predict("motion", x)
        assert answered_by == good.sha256
        np.testing.assert_allclose(y, reference_output(v1, x), rtol=1e-5, atol=1e-5)
        # nothing corrupt was kept on the device
        held = {p.name for p in (agent.state_dir / "artifacts").iterdir()}
        assert not any(bad.sha256 in name for name in held)
    finally:
        agent.stop()


def test_bad_input_gets_the_right_status_and_changes_nothing(
    tmp_path: Path, controller: Controller
) -> None:
    agent = start_agent(tmp_path, controller.address, "hub-3", "home-hub", controller.public_key)
    try:
        v1 = linear_model(tmp_path / "v1.onnx", seed=1)
        artifact = controller.release("motion", v1, "home-hub")
        controller.wait_serving("hub-3", "motion", artifact.sha256)
        agents = controller.agent_stub()

        def status_of(call: object) -> grpc.StatusCode:
            with pytest.raises(grpc.RpcError) as info:
                call()  # type: ignore[operator]
            code: grpc.StatusCode = info.value.code()
            assert info.value.details(), "every refusal says what was wrong"
            return code

        def fetch(**fields: object) -> object:
            request = fleet_pb2.FetchArtifactRequest(device_id="hub-3", **fields)
            return lambda: list(agents.FetchArtifact(request, timeout=10))

        unknown = "0" * 64
        assert status_of(fetch(target_sha256=unknown)) == grpc.StatusCode.NOT_FOUND
        assert (
            status_of(fetch(target_sha256="../../etc/passwd")) == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert (
            status_of(fetch(target_sha256=artifact.sha256, offset=artifact.size_bytes + 1))
            == grpc.StatusCode.OUT_OF_RANGE
        )
        assert (
            status_of(fetch(target_sha256=artifact.sha256, chunk_bytes=10))
            == grpc.StatusCode.INVALID_ARGUMENT
        )

        # the same device id from different hardware is refused, the first device keeps it
        impostor = fleet_pb2.RegisterRequest(
            device_id="hub-3",
            device_class="home-hub",
            hardware=fleet_pb2.HardwareInfo(arch="riscv64", cpu_cores=64, memory_bytes=1),
        )
        assert (
            status_of(lambda: agents.Register(impostor, timeout=10))
            == grpc.StatusCode.ALREADY_EXISTS
        )
        device = controller.device("hub-3")
        assert device is not None and device.hardware.arch != "riscv64"

        # an invalid ONNX file: refused, no model version, no blob
        models_before = controller.admin().ListModels(fleet_pb2.ListModelsRequest(), timeout=10)
        blobs_before = sorted((controller.data_dir / "blobs").rglob("*"))
        junk = tmp_path / "junk.onnx"
        junk.write_bytes(b"this is not a model" * 100)
        result = controller.cli("model", "add", "junk", str(junk))
        assert result.returncode == 1
        assert "ONNX" in result.stdout + result.stderr
        assert (
            controller.admin().ListModels(fleet_pb2.ListModelsRequest(), timeout=10)
            == models_before
        )
        assert sorted((controller.data_dir / "blobs").rglob("*")) == blobs_before

        # oversize: a declared upload beyond the limit, and a message beyond the gRPC limit
        def oversize_upload() -> object:
            header = fleet_pb2.AddModelHeader(name="huge", size_bytes=1 << 40)
            return controller.admin().AddModel(
                iter([fleet_pb2.AddModelChunk(header=header)]), timeout=10
            )

        assert status_of(oversize_upload) == grpc.StatusCode.RESOURCE_EXHAUSTED
        giant = fleet_pb2.RegisterRequest(device_id="x" * (9 * 1024 * 1024))
        assert (
            status_of(lambda: agents.Register(giant, timeout=10))
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        )

        # Predict with wrong shapes and dtypes: INVALID_ARGUMENT naming the input
        local = agent.inference()

        def predict(tensor: fleet_pb2.Tensor, model: str = "motion") -> object:
            return lambda: local.Predict(
                fleet_pb2.PredictRequest(model_name=model, inputs=[tensor]), timeout=10
            )

        wrong_width = np.zeros((2, 5), np.float32)
        for tensor in (
            fleet_pb2.Tensor(name="x", dtype="float32", shape=[2, 5], data=wrong_width.tobytes()),
            fleet_pb2.Tensor(name="x", dtype="int64", shape=[1, 16], data=bytes(128)),
            fleet_pb2.Tensor(name="x", dtype="float32", shape=[1, 16], data=bytes(7)),
            fleet_pb2.Tensor(name="nope", dtype="float32", shape=[1, 16], data=bytes(64)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                predict(tensor)()  # type: ignore[operator]
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "x" in info.value.details()
        good_x = np.zeros((1, 16), np.float32)
        assert (
            status_of(
                predict(
                    fleet_pb2.Tensor(
                        name="x", dtype="float32", shape=[1, 16], data=good_x.tobytes()
                    ),
                    model="nothing",
                )
            )
            == grpc.StatusCode.NOT_FOUND
        )
        # and the agent still serves
        _, answered_by = agent.predict("motion", sample())
        assert answered_by == artifact.sha256
    finally:
        agent.stop()
