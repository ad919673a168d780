"""What `assign`, `unassign` and `devices` tell the operator, against the real controller:
a re-release made so a device can follow its class again, an unknown model, a class
nobody declared or registered, and which of several same-byte artifacts a device serves."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from controller.cli.errors import ExitCode
from protos import fleet_pb2
from tests.cli.conftest import StartController
from tests.cli.test_against_controller import cli, onnx_file, register, report, stubs
from tests.support.controller import ControllerThread

ROOT = Path(__file__).resolve().parents[2]
ACTIVE = fleet_pb2.DEPLOYMENT_OUTCOME_ACTIVE


def test_unassign_names_the_re_release_that_lets_the_device_follow_its_class(
    runner: CliRunner, live: ControllerThread, tmp_path: Path
) -> None:
    """The class has v1, the device ran its own v2: following the class again takes v1's
    bytes under a newer version, and the CLI says so; `devices` then names that version."""
    live.add_model("motions", onnx_file(tmp_path / "1.onnx").read_bytes())
    v1 = live.create_artifact("motions", "home-hub")
    live.add_model("motions", onnx_file(tmp_path / "2.onnx", scale=2).read_bytes())
    v2 = live.create_artifact("motions", "home-hub")
    with stubs(live.address) as (_, agent):
        register(agent, "hub-1", "home-hub")
        live.assign(v1.id, device_class="home-hub")
        live.assign(v2.id, device_id="hub-1")
        report(agent, "hub-1", "motions", v2.sha256, ACTIVE, serving_sha256=v2.sha256)

        back = cli(runner, live.address, "unassign", "motions", "--device", "hub-1")
        assert back.exit_code == 0, back.output
        assert (
            "device hub-1 follows its class for motions again: now motions/home-hub/v3"
            in back.stdout
        )
        assert "motions/home-hub/v1 was re-released as motions/home-hub/v3" in back.stdout

        # the device switches back to v1's bytes while the class moves on to new ones
        report(agent, "hub-1", "motions", v1.sha256, ACTIVE, serving_sha256=v1.sha256)
        live.add_model("motions", onnx_file(tmp_path / "3.onnx", scale=3).read_bytes())
        v4 = live.create_artifact("motions", "home-hub")
        live.assign(v4.id, device_class="home-hub")
    table = cli(runner, live.address, "devices")
    [hub1] = [line for line in table.stdout.splitlines() if "hub-1" in line]
    assert "motions/home-hub/v3" in hub1 and "motions/home-hub/v1" not in hub1, hub1

    live.assign(v2.id, device_id="hub-1")  # v2 again: itself re-released, as v5
    as_json = cli(runner, live.address, "unassign", "motions", "--device", "hub-1", "--json")
    assert as_json.exit_code == 0, as_json.output
    reply = json.loads(as_json.stdout)
    assert (reply["artifact_id"], reply["rereleases"]) == ("motions/home-hub/v6", v4.id)


def test_unassign_of_a_model_that_does_not_exist_names_the_model(
    runner: CliRunner, live: ControllerThread
) -> None:
    with stubs(live.address) as (_, agent):
        register(agent, "hub-1", "home-hub")
    result = cli(runner, live.address, "unassign", "nomodel", "--device", "hub-1")
    assert result.exit_code == ExitCode.REFUSED
    assert "model 'nomodel' is not registered" in result.output
    assert "already follows" not in result.output
    assert live.events("assignment.") == []


def test_assigning_to_a_class_nobody_declared_or_registered_is_noted(
    runner: CliRunner, start_controller: StartController, tmp_path: Path
) -> None:
    """As `artifact create` notes a class no device-class file declares, so does `assign
    --class` when no registered device has it either; a warning, not a refusal."""
    live = start_controller(device_classes_dir=ROOT / "deploy" / "device-classes")
    live.add_model("motions", onnx_file(tmp_path / "1.onnx").read_bytes())
    for device_class in ("kamera", "home-hub", "speakr"):
        live.create_artifact("motions", device_class)
    with stubs(live.address) as (_, agent):
        register(agent, "odd-1", "speakr")  # undeclared, but a device has it

    typo = cli(runner, live.address, "assign", "motions/kamera/v1", "--class", "kamera")
    assert typo.exit_code == 0, typo.output
    assert "assigned motions/kamera/v1 to class kamera: 0 devices affected" in typo.stdout
    assert "no device-class file on this controller declares class 'kamera'" in typo.stderr
    assert "no registered device is of that class: a typo?" in typo.stderr
    as_json = cli(
        runner, live.address, "assign", "motions/kamera/v1", "--class", "kamera", "--json"
    )
    assert "declares class 'kamera'" in json.loads(as_json.stdout)["warning"]

    for artifact_id, device_class in (
        ("motions/home-hub/v1", "home-hub"),  # declared, no device yet: fine
        ("motions/speakr/v1", "speakr"),  # a device registered with it
    ):
        quiet = cli(runner, live.address, "assign", artifact_id, "--class", device_class)
        assert quiet.exit_code == 0 and quiet.stderr == "", quiet.output
