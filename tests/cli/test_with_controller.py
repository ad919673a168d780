"""The operator commands against a real controller process (real gRPC, SQLite, onnx).

The controller runs as `python -m homefleet controller serve --port 0`, exactly as an
operator starts it; its address comes from the controller.json it writes once listening.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from homefleet.cli import app
from protos import fleet_pb2, fleet_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A controller process on a free port; yields its address."""
    data_dir = tmp_path_factory.mktemp("controller")
    log = (data_dir.parent / "controller.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "homefleet",
            "controller",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            "0",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    info = data_dir / "controller.json"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not info.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                output = (data_dir.parent / "controller.log").read_text(errors="replace")
                pytest.fail(f"controller did not start (exit {proc.poll()}):\n{output}")
            time.sleep(0.05)
        yield str(json.loads(info.read_text())["address"])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def make_onnx(path: Path, *, scale: float = 1.0) -> Path:
    """A tiny linear model: y[1,2] = x[1,4] @ W."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array((np.arange(8, dtype=np.float32) * scale).reshape(4, 2), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def cli(runner: CliRunner, controller: str, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, [*args, "--controller", controller])
    return result.exit_code, result.stdout, result.stderr


def cli_json(runner: CliRunner, controller: str, *args: str) -> object:
    code, out, err = cli(runner, controller, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def register_device(controller: str, device_id: str, device_class: str) -> None:
    with grpc.insecure_channel(controller) as channel:
        stub = fleet_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
        stub.Register(
            fleet_pb2.RegisterRequest(
                device_id=device_id,
                device_class=device_class,
                hardware=fleet_pb2.HardwareInfo(arch="x86_64", cpu_cores=2),
                agent_version="test",
            ),
            timeout=10,
        )


def test_operator_workflow(runner: CliRunner, controller: str, tmp_path: Path) -> None:
    onnx_path = make_onnx(tmp_path / "tiny.onnx")
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()

    model = cli_json(
        runner, controller, "model", "add", "tiny", str(onnx_path), "--description", "a 4x2 MatMul"
    )
    assert isinstance(model, dict)
    assert (model["name"], model["version"], model["sha256"]) == ("tiny", 1, digest)
    assert model["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 4]}]
    assert model["outputs"] == [{"name": "y", "dtype": "float32", "shape": [1, 2]}]

    code, out, err = cli(runner, controller, "model", "list")
    assert code == 0, err
    assert "tiny" in out and digest[:12] in out

    register_device(controller, "hub-1", "home-hub")

    artifact = cli_json(runner, controller, "artifact", "create", "tiny", "--class", "home-hub")
    assert isinstance(artifact, dict)
    assert artifact["id"] == "tiny/home-hub/v1"
    assert artifact["sha256"] == digest  # identity recipe: the model's bytes unchanged
    assert artifact["signed"] is True
    assert artifact["manifest"]["recipe"] == [{"kind": "identity", "params": {}}]

    listed = cli_json(runner, controller, "artifact", "list", "--class", "home-hub")
    assert isinstance(listed, dict)
    assert [a["id"] for a in listed["artifacts"]] == ["tiny/home-hub/v1"]
    code, out, err = cli(runner, controller, "artifact", "list")
    assert code == 0, err
    assert "tiny/home-hub/v1" in out

    code, out, err = cli(runner, controller, "assign", "tiny/home-hub/v1", "--class", "home-hub")
    assert code == 0, err
    assert "assigned tiny/home-hub/v1 to class home-hub" in out

    fleet = cli_json(runner, controller, "devices")
    assert isinstance(fleet, dict)
    [device] = [d for d in fleet["devices"] if d["device_id"] == "hub-1"]
    assert device["device_class"] == "home-hub"
    assert device["hardware"]["cpu_cores"] == 2
    states = {m["model_name"]: m for m in device["models"]}
    assert states["tiny"]["desired_artifact_id"] == "tiny/home-hub/v1"
    code, out, err = cli(runner, controller, "devices", "--class", "home-hub")
    assert code == 0, err
    assert "hub-1" in out and "tiny/home-hub/v1" in out

    events = cli_json(runner, controller, "events")
    assert isinstance(events, dict)
    kinds = [e["kind"] for e in events["events"]]
    for kind in ("model.added", "device.registered", "artifact.created", "assignment.changed"):
        assert kind in kinds, kinds
    only = cli_json(runner, controller, "events", "--kind", "artifact.")
    assert isinstance(only, dict)
    assert only["events"] and all(e["kind"].startswith("artifact.") for e in only["events"])


def test_invalid_onnx_is_refused_with_the_servers_message(
    runner: CliRunner, controller: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"these bytes are not an ONNX model")
    code, out, err = cli(runner, controller, "model", "add", "broken", str(bad))
    assert code == 1
    assert out == ""
    assert err.startswith("error: ") and "ONNX" in err
    models = cli_json(runner, controller, "model", "list")
    assert isinstance(models, dict)
    assert "broken" not in [m["name"] for m in models["models"]]


def test_unknown_names_are_refused(runner: CliRunner, controller: str) -> None:
    code, _, err = cli(runner, controller, "artifact", "create", "no-such-model", "--class", "c")
    assert code == 1
    assert "no-such-model" in err
    code, _, err = cli(runner, controller, "assign", "no-such/c/v9", "--device", "nobody")
    assert code == 1
    assert err.startswith("error: ")


def test_bad_model_name_is_a_usage_error_and_nothing_is_uploaded(
    runner: CliRunner, controller: str, tmp_path: Path
) -> None:
    code, _, err = cli(
        runner, controller, "model", "add", "Bad Name", str(make_onnx(tmp_path / "m.onnx"))
    )
    assert code == 2
    assert "Bad Name" in err and "lowercase letters" in err


def test_the_installed_entry_point_runs_as_a_process(controller: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "homefleet", "events", "--json", "--limit", "1"],
        cwd=ROOT,
        env={**os.environ, "HOMEFLEET_CONTROLLER": controller},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout)["events"], list)
