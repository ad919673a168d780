"""The CLI against a scripted AdminService: what it sends, what it prints, how it fails."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from artifact.manifest import Manifest, RecipeStep, TensorSpec, default_expiry, utc_now
from controller.cli.upload import CHUNK_BYTES
from homefleet.cli import app
from protos import fleet_pb2
from tests.cli.conftest import Scripted


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_model_add_streams_header_then_bounded_chunks(
    runner: CliRunner, scripted: Scripted, tmp_path: Path
) -> None:
    data = os.urandom(2 * CHUNK_BYTES + 12_345)
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    result = runner.invoke(
        app,
        [
            "model",
            "add",
            "motions",
            str(path),
            "--description",
            "demo [x]",
            "--controller",
            scripted.address,
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    [chunks] = scripted.admin.uploads
    header = chunks[0].header
    assert chunks[0].WhichOneof("part") == "header"
    assert (header.name, header.description) == ("motions", "demo [x]")
    assert header.size_bytes == len(data)
    assert header.sha256 == hashlib.sha256(data).hexdigest()
    sizes = [len(c.data) for c in chunks[1:]]
    assert all(c.WhichOneof("part") == "data" for c in chunks[1:])
    assert sizes == [CHUNK_BYTES, CHUNK_BYTES, 12_345]
    shown = json.loads(result.stdout)
    assert shown["name"] == "motions"
    assert shown["sha256"] == header.sha256
    assert shown["size_bytes"] == len(data)
    assert shown["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 4]}]


def test_model_add_prints_a_summary_without_json(
    runner: CliRunner, scripted: Scripted, tmp_path: Path
) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"\x08" * 1000)
    result = runner.invoke(
        app, ["model", "add", "motions", str(path)], env={"HOMEFLEET_CONTROLLER": scripted.address}
    )
    assert result.exit_code == 0, result.output
    assert "added model motions v1" in result.stdout
    assert "1000 B" in result.stdout
    assert "x float32[1,4]" in result.stdout


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ],
)
def test_refusals_exit_1_with_the_servers_message(
    runner: CliRunner, scripted: Scripted, code: grpc.StatusCode
) -> None:
    message = f"model 'x' [{code.name}] is not acceptable: use a-z"
    scripted.admin.fail = (code, message)
    result = runner.invoke(app, ["events", "--controller", scripted.address])
    assert result.exit_code == 1
    assert result.stderr == f"error: {message}\n"
    assert result.stdout == ""


def test_refused_upload_exits_1(runner: CliRunner, scripted: Scripted, tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"not onnx")
    scripted.admin.fail = (grpc.StatusCode.INVALID_ARGUMENT, "bad.onnx is not an ONNX model")
    result = runner.invoke(
        app, ["model", "add", "bad", str(path), "--controller", scripted.address]
    )
    assert result.exit_code == 1
    assert "bad.onnx is not an ONNX model" in result.stderr


def test_internal_errors_point_at_the_controller_log(runner: CliRunner, scripted: Scripted) -> None:
    scripted.admin.fail = (grpc.StatusCode.INTERNAL, "internal controller error")
    result = runner.invoke(app, ["devices", "--controller", scripted.address])
    assert result.exit_code == 1
    assert "INTERNAL" in result.stderr
    assert "log" in result.stderr


def test_unavailable_from_the_controller_exits_4(runner: CliRunner, scripted: Scripted) -> None:
    scripted.admin.fail = (grpc.StatusCode.UNAVAILABLE, "store is busy")
    result = runner.invoke(app, ["devices", "--controller", scripted.address])
    assert result.exit_code == 4
    assert "store is busy" in result.stderr


def test_deadline_applies_to_every_call(runner: CliRunner, scripted: Scripted) -> None:
    scripted.admin.hang = True
    result = runner.invoke(app, ["events", "--controller", scripted.address, "--timeout", "0.3"])
    assert result.exit_code == 4
    assert "did not answer within 0.3 s" in result.stderr


def test_events_passes_filters_and_prints_json_only(runner: CliRunner, scripted: Scripted) -> None:
    detail = {"device_id": "hub-1", "offset": 65536, "completed": True}
    scripted.admin.events = [
        fleet_pb2.Event(
            id=7,
            unix_ms=now_ms(),
            kind="artifact.fetch",
            subject="hub-1",
            message="sent 10 bytes",
            detail_json=json.dumps(detail),
        ),
        fleet_pb2.Event(id=8, unix_ms=now_ms(), kind="artifact.created", subject="m/c/v1"),
    ]
    result = runner.invoke(
        app,
        [
            "events",
            "--kind",
            "artifact.",
            "--limit",
            "5",
            "--after",
            "3",
            "--json",
            "--controller",
            scripted.address,
        ],
    )
    assert result.exit_code == 0, result.output
    [request] = scripted.admin.event_requests
    assert (request.kind_prefix, request.limit, request.after_id) == ("artifact.", 5, 3)
    events = json.loads(result.stdout)["events"]
    assert [e["id"] for e in events] == [7, 8]
    assert events[0]["detail"] == detail
    assert events[1]["detail"] == {}


def test_events_table(runner: CliRunner, scripted: Scripted) -> None:
    scripted.admin.events = [
        fleet_pb2.Event(
            id=1,
            unix_ms=now_ms(),
            kind="model.added",
            subject="motions",
            message="added [bold]motions[/bold] v1",
        ),
    ]
    result = runner.invoke(app, ["events", "--controller", scripted.address])
    assert result.exit_code == 0, result.output
    assert "model.added" in result.stdout
    assert "added [bold]motions[/bold] v1" in result.stdout  # server text is never markup


def test_devices_table_shows_serving_desired_and_outcome(
    runner: CliRunner, scripted: Scripted
) -> None:
    serving, desired = "a" * 64, "b" * 64
    scripted.admin.devices = [
        fleet_pb2.Device(
            device_id="hub-1",
            device_class="home-hub",
            status=fleet_pb2.DEVICE_STATUS_ONLINE,
            last_seen_unix_ms=now_ms() - 3_000,
            models=[
                fleet_pb2.DeviceModelState(
                    model_name="motions",
                    serving_sha256=serving,
                    serving_artifact_id="motions/home-hub/v1",
                    desired_sha256=desired,
                    desired_artifact_id="motions/home-hub/v2",
                    last_outcome=fleet_pb2.DEPLOYMENT_OUTCOME_FAILED,
                    last_reason="self-test failed",
                ),
                fleet_pb2.DeviceModelState(
                    model_name="intents",
                    serving_sha256=serving,
                    desired_sha256=serving,
                    last_outcome=fleet_pb2.DEPLOYMENT_OUTCOME_ACTIVE,
                ),
            ],
        ),
        fleet_pb2.Device(
            device_id="cam-1", device_class="camera", status=fleet_pb2.DEVICE_STATUS_OFFLINE
        ),
    ]
    result = runner.invoke(app, ["devices", "--controller", scripted.address])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in (
        "hub-1",
        "home-hub",
        "online",
        "motions/home-hub/v1",
        "motions/home-hub/v2",
        "failed: self-test failed",
        "intents",
        "aaaaaaaaaaaa",
        "active",
        "cam-1",
        "offline",
        "never",
    ):
        assert text in out, text
    assert re.search(r"\b\d+s ago\b", out)
    intents_line = next(line for line in out.splitlines() if "intents" in line)
    assert "bbbbbbbbbbbb" not in intents_line and intents_line.count("aaaaaaaaaaaa") == 1


def test_devices_json(runner: CliRunner, scripted: Scripted) -> None:
    scripted.admin.devices = [
        fleet_pb2.Device(
            device_id="hub-1",
            device_class="home-hub",
            status=fleet_pb2.DEVICE_STATUS_ONLINE,
            hardware=fleet_pb2.HardwareInfo(arch="x86_64", cpu_cores=2),
            models=[
                fleet_pb2.DeviceModelState(
                    model_name="motions",
                    last_outcome=fleet_pb2.DEPLOYMENT_OUTCOME_ROLLED_BACK,
                    encoding=fleet_pb2.PAYLOAD_ENCODING_DELTA,
                    bytes_received=1 << 40,
                )
            ],
        )
    ]
    result = runner.invoke(app, ["devices", "--json", "--controller", scripted.address])
    assert result.exit_code == 0, result.output
    [device] = json.loads(result.stdout)["devices"]
    assert device["status"] == "online"
    assert device["hardware"]["cpu_cores"] == 2
    [model] = device["models"]
    assert model["last_outcome"] == "rolled_back"
    assert model["encoding"] == "delta"
    assert model["bytes_received"] == 1 << 40  # an integer, not a string


def test_artifact_list_parses_the_signed_manifest(runner: CliRunner, scripted: Scripted) -> None:
    created = utc_now()
    manifest = Manifest(
        model_name="motions",
        model_version=1,
        device_class="home-hub",
        version=2,
        sha256="c" * 64,
        size_bytes=3 * 1024 * 1024,
        inputs=(TensorSpec(name="x", dtype="float32", shape=(-1, 6, 100)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=(-1, 4)),),
        recipe=(RecipeStep(kind="identity"),),
        created_at=created,
        expires_at=default_expiry(created),
    )
    scripted.admin.artifacts = [
        fleet_pb2.Artifact(
            id=manifest.artifact_id,
            model_name="motions",
            device_class="home-hub",
            version=2,
            sha256=manifest.sha256,
            size_bytes=manifest.size_bytes,
            manifest=fleet_pb2.SignedManifest(
                manifest_json=manifest.to_json_bytes(), signature=b"s" * 64, key_id="k1"
            ),
            created_unix_ms=now_ms(),
        )
    ]
    result = runner.invoke(app, ["artifact", "list", "--json", "--controller", scripted.address])
    assert result.exit_code == 0, result.output
    [shown] = json.loads(result.stdout)["artifacts"]
    assert shown["id"] == "motions/home-hub/v2"
    assert shown["signed"] is True
    assert shown["key_id"] == "k1"
    assert Manifest.model_validate(shown["manifest"]) == manifest

    table = runner.invoke(app, ["artifact", "list", "--controller", scripted.address])
    assert table.exit_code == 0, table.output
    assert "motions/home-hub/v2" in table.stdout
    assert "cccccccccccc" in table.stdout and "c" * 13 not in table.stdout
    assert "3.0 MiB" in table.stdout
    assert default_expiry(created).astimezone().strftime("%Y-%m-%d") in table.stdout


@pytest.mark.parametrize(
    ("flag", "field"), [("--class", "device_class"), ("--device", "device_id")]
)
def test_assign_targets_a_class_or_a_device(
    runner: CliRunner, scripted: Scripted, flag: str, field: str
) -> None:
    result = runner.invoke(
        app, ["assign", "motions/home-hub/v1", flag, "home-hub", "--controller", scripted.address]
    )
    assert result.exit_code == 0, result.output
    [request] = scripted.admin.assigns
    assert request.artifact_id == "motions/home-hub/v1"
    assert request.WhichOneof("target") == field
    assert "2 devices affected" in result.stdout
