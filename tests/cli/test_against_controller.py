"""The CLI against the real controller: what it sends, what it prints, how it fails.

Every situation is made by driving the real controller (AdminService, or AgentService as
a device would); faults it does not make on its own come from a real loopback proxy
(tests.support.proxy), a damaged database or a bound-but-silent link. What the CLI put
on the wire is read off the wire by the proxy's tap.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from artifact.manifest import Manifest, RecipeStep
from controller.cli import artifacts as artifacts_command
from controller.cli import devices as devices_command
from controller.cli import models as models_command
from controller.cli import output, views
from controller.cli.errors import ExitCode, Failure, explain
from controller.cli.upload import CHUNK_BYTES
from homefleet.cli import app
from protos import fleet_pb2, fleet_pb2_grpc
from tests.cli.conftest import StartController
from tests.controller.test_onnx_inspect import custom_op_model
from tests.support.controller import ControllerThread
from tests.support.proxy import FaultProxy

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


# ------------------------------------------------------------- models and clients


def onnx_file(path: Path, *, scale: float = 1.0, padding: int = 0) -> Path:
    """y[1,2] = x[1,4] @ W; ``padding`` real floats more (summed into a second output)."""
    weight = numpy_helper.from_array((np.arange(8, dtype=np.float32) * scale).reshape(4, 2), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])]
    initializers = [weight]
    if padding:
        pad = np.random.default_rng(0).standard_normal(padding).astype(np.float32)
        initializers.append(numpy_helper.from_array(pad, "pad"))
        nodes.append(helper.make_node("ReduceSum", ["pad"], ["pad_sum"], keepdims=0))
        outputs.append(helper.make_tensor_value_info("pad_sum", TensorProto.FLOAT, []))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        outputs,
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@contextmanager
def stubs(address: str) -> Iterator[tuple[Any, Any]]:
    """Sync AdminService and AgentService stubs (the generated stubs are untyped)."""
    with grpc.insecure_channel(address) as channel:
        yield (
            fleet_pb2_grpc.AdminServiceStub(channel),  # type: ignore[no-untyped-call]
            fleet_pb2_grpc.AgentServiceStub(channel),  # type: ignore[no-untyped-call]
        )


def register(
    agent: Any,
    device_id: str,
    device_class: str,
    *,
    arch: str = "x86_64",
    held: tuple[fleet_pb2.HeldArtifact, ...] = (),
) -> None:
    agent.Register(
        fleet_pb2.RegisterRequest(
            device_id=device_id,
            device_class=device_class,
            hardware=fleet_pb2.HardwareInfo(arch=arch, cpu_cores=2, memory_bytes=1 << 30),
            held=held,
            agent_version="test",
        ),
        timeout=10,
    )


def report(
    agent: Any,
    device_id: str,
    model: str,
    sha: str,
    outcome: fleet_pb2.DeploymentOutcome,
    **fields: Any,
) -> None:
    agent.ReportStatus(
        fleet_pb2.StatusReport(
            device_id=device_id, model_name=model, artifact_sha256=sha, outcome=outcome, **fields
        ),
        timeout=10,
    )


def upload(admin: Any, name: str, path: Path) -> fleet_pb2.Model:
    """AddModel exactly as `homefleet model add NAME FILE` sends it (no description)."""
    data = path.read_bytes()
    header = fleet_pb2.AddModelHeader(
        name=name, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    messages = [fleet_pb2.AddModelChunk(header=header), fleet_pb2.AddModelChunk(data=data)]
    model: fleet_pb2.Model = admin.AddModel(iter(messages), timeout=10)
    return model


def cli(runner: CliRunner, address: str, *args: str) -> Any:
    return runner.invoke(app, [*args, "--controller", address])


# ------------------------------------------------------------- what the CLI sends


def test_model_add_streams_header_then_bounded_chunks(
    runner: CliRunner, live: ControllerThread, tmp_path: Path
) -> None:
    path = onnx_file(tmp_path / "m.onnx", padding=150_000)
    data = path.read_bytes()
    assert 2 * CHUNK_BYTES < len(data) < 3 * CHUNK_BYTES
    with FaultProxy(live.port) as proxy:  # passes everything; taps what the CLI sends
        result = cli(
            runner, proxy.address, "model", "add", "motions", str(path), "--description",
            "demo [x]", "--json",
        )  # fmt: skip
        chunks = proxy.requests(fleet_pb2.AddModelChunk, lambda chunk: True)
    assert result.exit_code == 0, result.output
    assert chunks[0].WhichOneof("part") == "header"
    header = chunks[0].header
    assert (header.name, header.description) == ("motions", "demo [x]")
    assert header.size_bytes == len(data)
    assert header.sha256 == hashlib.sha256(data).hexdigest()
    assert [c.WhichOneof("part") for c in chunks[1:]] == ["data", "data", "data"]
    assert [len(c.data) for c in chunks[1:]] == [CHUNK_BYTES, CHUNK_BYTES, len(data) % CHUNK_BYTES]
    shown = json.loads(result.stdout)
    assert (shown["name"], shown["version"], shown["description"]) == ("motions", 1, "demo [x]")
    assert shown["sha256"] == header.sha256
    assert shown["size_bytes"] == len(data)
    assert shown["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 4]}]
    # the controller stored exactly the streamed bytes
    assert live.controller.blob_path(header.sha256).read_bytes() == data


def test_model_add_prints_a_summary_without_json(
    runner: CliRunner, live: ControllerThread, tmp_path: Path
) -> None:
    path = onnx_file(tmp_path / "m.onnx")
    size = path.stat().st_size
    assert size < 1024
    result = runner.invoke(
        app, ["model", "add", "motions", str(path)], env={"HOMEFLEET_CONTROLLER": live.address}
    )
    assert result.exit_code == 0, result.output
    assert "added model motions v1" in result.stdout
    assert f"{size} B" in result.stdout
    assert "x float32[1,4]" in result.stdout and "y float32[1,2]" in result.stdout


@pytest.mark.parametrize(("flag", "target"), [("--class", "home-hub"), ("--device", "hub-1")])
def test_assign_targets_a_class_or_a_device(
    runner: CliRunner, live: ControllerThread, tmp_path: Path, flag: str, target: str
) -> None:
    with stubs(live.address) as (_, agent):
        register(agent, "hub-1", "home-hub")
        register(agent, "hub-2", "home-hub")
    live.add_model("motions", onnx_file(tmp_path / "m.onnx").read_bytes())
    live.create_artifact("motions", "home-hub")

    result = cli(runner, live.address, "assign", "motions/home-hub/v1", flag, target)
    assert result.exit_code == 0, result.output
    kind = "class" if flag == "--class" else "device"
    affected = 2 if kind == "class" else 1
    plural = "s" if affected > 1 else ""
    said = f"assigned motions/home-hub/v1 to {kind} {target}: {affected} device{plural} affected"
    assert said in result.stdout
    [event] = live.events("assignment.changed")
    detail = json.loads(event.detail_json)
    assert (detail["artifact_id"], detail["target_kind"], detail["target"]) == (
        "motions/home-hub/v1",
        kind,
        target,
    )
    with stubs(live.address) as (admin, _):
        devices = admin.ListDevices(fleet_pb2.ListDevicesRequest(), timeout=10).devices
    desired = {d.device_id: [m.desired_artifact_id for m in d.models] for d in devices}
    assert desired["hub-1"] == ["motions/home-hub/v1"]
    assert desired["hub-2"] == (["motions/home-hub/v1"] if kind == "class" else [])


def test_model_add_says_when_nothing_changed_and_warns_of_a_new_interface(
    runner: CliRunner, live: ControllerThread, tmp_path: Path
) -> None:
    path = onnx_file(tmp_path / "m.onnx")
    assert cli(runner, live.address, "model", "add", "motions", str(path)).exit_code == 0
    again = cli(runner, live.address, "model", "add", "motions", str(path))
    assert again.exit_code == 0, again.output
    assert "unchanged: these bytes already are model motions v1" in again.stdout
    assert "added" not in again.stdout
    same_interface = cli(
        runner,
        live.address,
        "model",
        "add",
        "motions",
        str(onnx_file(tmp_path / "2.onnx", scale=2)),
    )
    assert "added model motions v2" in same_interface.stdout
    assert "interface" not in same_interface.output
    wider = onnx_file(tmp_path / "3.onnx", padding=4)  # a second output
    changed = cli(runner, live.address, "model", "add", "motions", str(wider))
    assert changed.exit_code == 0, changed.output
    assert "added model motions v3" in changed.stdout
    assert (
        "note: motions v3: its interface differs from v2's (outputs y float32[1,2] -> "
        "y float32[1,2], pad_sum float32[])"
    ) in changed.stderr


def test_model_add_of_the_same_file_says_it_repaired_a_corrupt_copy(
    runner: CliRunner, live: ControllerThread, tmp_path: Path
) -> None:
    path = onnx_file(tmp_path / "m.onnx")
    assert cli(runner, live.address, "model", "add", "motions", str(path)).exit_code == 0
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    stored = live.data_dir / "blobs" / "sha256" / digest[:2] / digest
    stored.chmod(0o644)
    with stored.open("r+b") as f:  # a byte rots on the controller's disk
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x40]))
    again = cli(runner, live.address, "model", "add", "motions", str(path))
    assert again.exit_code == 0, again.output
    assert "unchanged: these bytes already are model motions v1" in again.stdout
    assert "motions v1: these bytes replaced a corrupt stored copy" in again.stderr
    assert stored.read_bytes() == path.read_bytes()
    once_more = cli(runner, live.address, "model", "add", "motions", str(path))
    assert "corrupt" not in once_more.output


def test_an_artifact_too_large_for_its_class_is_created_with_a_warning(
    runner: CliRunner, start_controller: StartController, tmp_path: Path
) -> None:
    """CreateArtifact signs the model as it is: over the class's size budget, or over
    what its devices can store, the operator hears so (and how to get one that fits)."""
    classes = tmp_path / "classes"
    classes.mkdir()
    camera = yaml.safe_load((ROOT / "deploy" / "device-classes" / "camera.yaml").read_text())
    padded = onnx_file(tmp_path / "m.onnx", padding=2000)
    size = padded.stat().st_size
    for name, storage, budget in (
        ("roomy", 10 * size, None),
        ("tight", 10 * size, size // 2),
        ("full", size // 2, size // 4),
    ):
        camera_class = camera | {"name": name, "model_storage_bytes": storage}
        camera_class["budgets"] = camera["budgets"] | {"max_artifact_bytes": budget}
        (classes / f"{name}.yaml").write_text(yaml.safe_dump(camera_class))
    live = start_controller(device_classes_dir=classes)
    live.add_model("m", padded.read_bytes())

    roomy = cli(runner, live.address, "artifact", "create", "m", "--class", "roomy")
    assert roomy.exit_code == 0 and roomy.stderr == "", roomy.output
    tight = cli(runner, live.address, "artifact", "create", "m", "--class", "tight")
    assert tight.exit_code == 0, tight.output
    assert "created artifact m/tight/v1" in tight.stdout
    assert f"{size:,} B is over tight's max_artifact_bytes budget ({size // 2:,})" in tight.stderr
    assert "homefleet compress --controller" in tight.stderr
    full = cli(runner, live.address, "artifact", "create", "m", "--class", "full", "--json")
    assert full.exit_code == 0, full.output
    warning = json.loads(full.stdout)["warning"]
    assert f"more than a full device can store (model_storage_bytes {size // 2:,}," in warning
    unknown = cli(runner, live.address, "artifact", "create", "m", "--class", "rooomy")
    assert unknown.exit_code == 0, unknown.output  # created, but the likely typo is named
    assert "no device-class file on this controller declares class 'rooomy'" in unknown.stderr


def test_going_back_to_an_older_artifact_names_the_re_release(
    runner: CliRunner, live: ControllerThread, tmp_path: Path
) -> None:
    with stubs(live.address) as (_, agent):
        register(agent, "hub-1", "home-hub")
    live.add_model("motions", onnx_file(tmp_path / "1.onnx").read_bytes())
    live.create_artifact("motions", "home-hub")
    live.add_model("motions", onnx_file(tmp_path / "2.onnx", scale=2).read_bytes())
    live.create_artifact("motions", "home-hub")
    created = cli(runner, live.address, "artifact", "create", "motions", "--class", "home-hub")
    assert "created artifact motions/home-hub/v3 (model motions v2, sha256" in created.stdout
    assigned = cli(runner, live.address, "assign", "motions/home-hub/v3", "--class", "home-hub")
    assert assigned.exit_code == 0, assigned.output
    back = cli(runner, live.address, "assign", "motions/home-hub/v1", "--class", "home-hub")
    assert back.exit_code == 0, back.output
    assert "assigned motions/home-hub/v4 to class home-hub: 1 device affected" in back.stdout
    assert "motions/home-hub/v4 re-releases motions/home-hub/v1's bytes" in back.stdout
    # asked again: v4 stays, and nothing new was released (QA: it said so again)
    again = cli(runner, live.address, "assign", "motions/home-hub/v1", "--class", "home-hub")
    assert again.exit_code == 0, again.output
    said = "motions/home-hub/v4, already assigned, re-releases motions/home-hub/v1's bytes"
    assert f"{said}: nothing new was released" in again.stdout
    assert "under a new version" not in again.stdout
    as_json = cli(
        runner, live.address, "assign", "motions/home-hub/v1", "--class", "home-hub", "--json"
    )
    reply = json.loads(as_json.stdout)
    assert (reply["artifact_id"], reply["requested_artifact_id"]) == (
        "motions/home-hub/v4",
        "motions/home-hub/v1",
    )


def test_a_device_with_its_own_assignment_is_shown_and_can_follow_its_class_again(
    runner: CliRunner, live: ControllerThread, tmp_path: Path
) -> None:
    with stubs(live.address) as (_, agent):
        register(agent, "hub-1", "home-hub")
        register(agent, "hub-2", "home-hub")
    live.add_model("motions", onnx_file(tmp_path / "1.onnx").read_bytes())
    live.create_artifact("motions", "home-hub")
    live.add_model("motions", onnx_file(tmp_path / "2.onnx", scale=2).read_bytes())
    live.create_artifact("motions", "home-hub")
    pinned = cli(runner, live.address, "assign", "motions/home-hub/v1", "--device", "hub-1")
    assert pinned.exit_code == 0, pinned.output
    to_class = cli(runner, live.address, "assign", "motions/home-hub/v2", "--class", "home-hub")
    assert "to class home-hub: 1 device affected" in to_class.stdout
    assert "1 device(s) keep an assignment of their own: hub-1 " in to_class.stdout
    table = cli(runner, live.address, "devices")
    [hub1] = [line for line in table.stdout.splitlines() if "hub-1" in line]
    assert "motions/home-hub/v1 (own assignment)" in hub1

    back = cli(runner, live.address, "unassign", "motions", "--device", "hub-1")
    assert back.exit_code == 0, back.output
    assert (
        "device hub-1 follows its class for motions again: now motions/home-hub/v2" in back.stdout
    )
    with stubs(live.address) as (admin, _):
        devices = admin.ListDevices(fleet_pb2.ListDevicesRequest(), timeout=10).devices
    states = {d.device_id: d.models[0] for d in devices}
    assert states["hub-1"].desired_artifact_id == "motions/home-hub/v2"
    assert not states["hub-1"].own_assignment
    [removed] = live.events("assignment.removed")
    assert json.loads(removed.detail_json)["previous_artifact_id"] == "motions/home-hub/v1"

    again = cli(runner, live.address, "unassign", "motions", "--device", "hub-1")
    assert again.exit_code == ExitCode.REFUSED
    assert "has no assignment of its own for model 'motions'" in again.output
    unknown = cli(runner, live.address, "unassign", "motions", "--device", "nobody")
    assert unknown.exit_code == ExitCode.REFUSED
    assert "device 'nobody' is not registered" in unknown.output


# ------------------------------------------------------------- how it fails


@dataclass(frozen=True)
class Refusal:
    """A request the controller refuses: as CLI arguments, and the same call made directly."""

    code: grpc.StatusCode
    argv: Callable[[Path], list[str]]
    direct: Callable[[Any, Path], object]


REFUSALS = {
    "not-loadable": Refusal(  # (a bad name is refused before any call: test_offline)
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda d: ["model", "add", "custom", str(d / "custom.onnx")],
        lambda admin, d: upload(admin, "custom", d / "custom.onnx"),
    ),
    "not-onnx": Refusal(
        grpc.StatusCode.INVALID_ARGUMENT,
        lambda d: ["model", "add", "junk", str(d / "junk.onnx")],
        lambda admin, d: upload(admin, "junk", d / "junk.onnx"),
    ),
    "unknown-model": Refusal(
        grpc.StatusCode.NOT_FOUND,
        lambda d: ["artifact", "create", "nothing", "--class", "home-hub"],
        lambda admin, d: admin.CreateArtifact(
            fleet_pb2.CreateArtifactRequest(model_name="nothing", device_class="home-hub"),
            timeout=10,
        ),
    ),
    "unknown-artifact": Refusal(
        grpc.StatusCode.NOT_FOUND,
        lambda d: ["assign", "no[such]/c/v9", "--device", "nobody"],
        lambda admin, d: admin.Assign(
            fleet_pb2.AssignRequest(artifact_id="no[such]/c/v9", device_id="nobody"), timeout=10
        ),
    ),
    "wrong-class": Refusal(
        grpc.StatusCode.FAILED_PRECONDITION,
        lambda d: ["assign", "motions/home-hub/v1", "--class", "camera"],
        lambda admin, d: admin.Assign(
            fleet_pb2.AssignRequest(artifact_id="motions/home-hub/v1", device_class="camera"),
            timeout=10,
        ),
    ),
    "too-big": Refusal(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        lambda d: ["model", "add", "big", str(d / "big.onnx")],
        lambda admin, d: upload(admin, "big", d / "big.onnx"),
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_exit_1_with_the_controllers_message(
    runner: CliRunner, start_controller: StartController, tmp_path: Path, case: str
) -> None:
    live = start_controller(max_model_bytes=4096)
    onnx_file(tmp_path / "tiny.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"these bytes are not an ONNX model")
    (tmp_path / "custom.onnx").write_bytes(custom_op_model())
    (tmp_path / "big.onnx").write_bytes(bytes(5000))
    live.add_model("motions", (tmp_path / "tiny.onnx").read_bytes())
    live.create_artifact("motions", "home-hub")
    refusal = REFUSALS[case]

    with stubs(live.address) as (admin, _), pytest.raises(grpc.RpcError) as info:
        refusal.direct(admin, tmp_path)
    assert info.value.code() == refusal.code
    message = info.value.details()
    assert message

    result = cli(runner, live.address, *refusal.argv(tmp_path))
    assert result.exit_code == 1
    assert result.stderr == f"error: {message}\n"  # the controller's own words, unaltered
    assert result.stdout == ""


def test_refusals_only_a_device_meets_are_explained_the_same_way(
    live: ControllerThread, tmp_path: Path
) -> None:
    """ALREADY_EXISTS and OUT_OF_RANGE come only from AgentService, never from a CLI call."""
    artifact_data = onnx_file(tmp_path / "m.onnx").read_bytes()
    live.add_model("motions", artifact_data)
    artifact = live.create_artifact("motions", "home-hub")
    sha = artifact.sha256
    with stubs(live.address) as (_, agent):
        register(agent, "hub-1", "home-hub")
        live.assign(artifact.id, device_id="hub-1")  # a device fetches only its own
        with pytest.raises(grpc.RpcError) as taken:
            register(agent, "hub-1", "home-hub", arch="riscv64")
        request = fleet_pb2.FetchArtifactRequest(
            device_id="hub-1", target_sha256=sha, offset=len(artifact_data) + 1
        )
        with pytest.raises(grpc.RpcError) as past_end:
            list(agent.FetchArtifact(request, timeout=10))
    for error, code in (
        (taken.value, grpc.StatusCode.ALREADY_EXISTS),
        (past_end.value, grpc.StatusCode.OUT_OF_RANGE),
    ):
        assert error.code() == code
        failure = explain(error, address=live.address, timeout_s=10)
        assert failure == Failure(ExitCode.REFUSED, error.details() or "")
        assert failure.message  # the controller said why


def test_internal_errors_point_at_the_controller_log(
    runner: CliRunner, live: ControllerThread, caplog: pytest.LogCaptureFixture
) -> None:
    db = sqlite3.connect(live.data_dir / "homefleet.db")
    try:
        db.execute("DROP TABLE events")  # a damaged database: the controller has a bug to log
        db.commit()
    finally:
        db.close()
    result = cli(runner, live.address, "events")
    assert result.exit_code == 1
    assert "INTERNAL" in result.stderr and "log" in result.stderr
    assert result.stderr.count("log has the detail") == 1  # said once, not twice
    assert "no such table" not in result.stderr  # the detail stays in the controller's log
    logged = [r for r in caplog.records if r.name == "controller.errors"]
    assert any("ListEvents failed unexpectedly" in r.getMessage() for r in logged)
    assert any("no such table" in str(r.exc_info[1]) for r in logged if r.exc_info)


def test_a_link_that_drops_every_connection_exits_4(
    runner: CliRunner, live: ControllerThread
) -> None:
    with FaultProxy(live.port) as proxy:
        proxy.cut_after(0, every_connection=True)
        result = cli(runner, proxy.address, "devices")
        assert proxy.cuts >= 1
    assert result.exit_code == 4
    assert result.stderr.startswith(f"error: cannot reach the controller at {proxy.address}")
    said = re.search(r"\(gRPC said: (.+)\)\n$", result.stderr)
    assert said is not None, result.stderr
    assert said.group(1).strip() and "without a message" not in said.group(1)
    assert result.stdout == ""


@pytest.mark.parametrize(
    "command", [["events"], ["devices"], ["model", "list"], ["artifact", "list"]]
)
def test_deadline_applies_to_every_call(
    runner: CliRunner, live: ControllerThread, command: list[str]
) -> None:
    with FaultProxy(live.port) as proxy:
        assert cli(runner, proxy.address, *command).exit_code == 0  # the link works
        proxy.black_hole()  # then answers stop coming; the connection stays open
        result = cli(runner, proxy.address, *command, "--timeout", "0.3")
    assert result.exit_code == 4
    assert "did not answer within 0.3 s" in result.stderr
    assert result.stdout == ""


# ------------------------------------------------------------- what it prints


def test_events_passes_filters_and_prints_json_only(
    runner: CliRunner, live: ControllerThread, tmp_path: Path
) -> None:
    m, n = onnx_file(tmp_path / "m.onnx"), onnx_file(tmp_path / "n.onnx", scale=2.0)
    live.add_model("m", m.read_bytes())
    hub = live.create_artifact("m", "home-hub")
    live.create_artifact("m", "camera")
    live.add_model("n", n.read_bytes())
    with stubs(live.address) as (_, agent):
        register(agent, "hub-1", "home-hub")
        live.assign(hub.id, device_id="hub-1")  # a device fetches only its own
        request = fleet_pb2.FetchArtifactRequest(device_id="hub-1", target_sha256=hub.sha256)
        assert b"".join(c.data for c in agent.FetchArtifact(request, timeout=10)) == m.read_bytes()
    for model in ("m", "n"):
        for device_class in ("speaker", "tv", "lamp"):
            live.create_artifact(model, device_class)

    everything = live.events()
    after = [e.id for e in everything if e.kind.startswith("artifact.")][1]
    later = [e for e in everything if e.id > after]
    wanted = [e for e in later if e.kind.startswith("artifact.")]
    # every filter matters: other kinds come later, and more than the limit match
    assert len(wanted) > 5 and len(wanted) < len(later)
    assert "artifact.fetch" in [e.kind for e in wanted[:5]]

    result = cli(
        runner, live.address, "events", "--kind", "artifact.", "--limit", "5", "--after",
        str(after), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    shown = json.loads(result.stdout)["events"]  # stdout is JSON and nothing else
    assert [e["id"] for e in shown] == [e.id for e in wanted[:5]]
    for view, event in zip(shown, wanted, strict=False):
        assert (view["kind"], view["subject"], view["message"]) == (
            event.kind,
            event.subject,
            event.message,
        )
        assert view["detail"] == json.loads(event.detail_json)
    [fetch] = [e["detail"] for e in shown if e["kind"] == "artifact.fetch"]
    assert (fetch["device_id"], fetch["offset"], fetch["completed"]) == ("hub-1", 0, True)
    assert fetch["total_bytes"] == m.stat().st_size  # an integer, parsed from the detail
    assert json.loads(result.stdout)["more"] is True

    # without --after: the newest, oldest first, and a note that older ones exist
    result = cli(runner, live.address, "events", "--kind", "artifact.", "--limit", "3")
    assert result.exit_code == 0, result.output
    newest = [e for e in everything if e.kind.startswith("artifact.")][-3:]
    rows = (re.match(r"\W*(\d+)\W", line) for line in result.stdout.splitlines())
    listed = [row.group(1) for row in rows if row]
    assert listed == [str(e.id) for e in newest]
    assert "older events exist" in result.stderr and "--after 0" in result.stderr


def test_events_table_shows_server_text_as_it_is(
    runner: CliRunner, live: ControllerThread, tmp_path: Path
) -> None:
    live.add_model("motions", onnx_file(tmp_path / "m.onnx").read_bytes())
    with stubs(live.address) as (_, agent):
        register(agent, "hub-1", "home-hub")
        report(
            agent, "hub-1", "motions", "c" * 64, fleet_pb2.DEPLOYMENT_OUTCOME_FAILED,
            reason="[bold]boom[/bold]",
        )  # fmt: skip
    [event] = live.events("device.status")
    assert "[bold]boom[/bold]" in event.message
    result = cli(runner, live.address, "events")
    assert result.exit_code == 0, result.output
    assert "device.status" in result.stdout and "device.registered" in result.stdout
    assert event.message in result.stdout  # server text is never read as markup


@contextmanager
def watching(agent: Any, device_id: str) -> Iterator[None]:
    """Hold a WatchAssignments stream open, as a connected agent does: the device is online."""
    call = agent.WatchAssignments(fleet_pb2.WatchAssignmentsRequest(device_id=device_id))
    try:
        next(call)  # the controller leases "online" before it sends the first set
        yield
    finally:
        call.cancel()


def test_devices_table_shows_serving_desired_and_outcome(
    runner: CliRunner, live: ControllerThread, tmp_path: Path
) -> None:
    live.add_model("motions", onnx_file(tmp_path / "v1.onnx", scale=1.0).read_bytes())
    v1 = live.create_artifact("motions", "home-hub")
    live.add_model("motions", onnx_file(tmp_path / "v2.onnx", scale=2.0).read_bytes())
    v2 = live.create_artifact("motions", "home-hub")
    live.add_model("intents", onnx_file(tmp_path / "i.onnx", scale=3.0).read_bytes())
    intents = live.create_artifact("intents", "home-hub")
    unknown = "a" * 64  # served by the device, known to no artifact of this controller
    legacy = fleet_pb2.HeldArtifact(model_name="legacy", sha256=unknown, active=True)
    with stubs(live.address) as (_, agent):
        register(agent, "hub-1", "home-hub", held=(legacy,))
        register(agent, "cam-1", "camera")
        live.assign(v2.id, device_class="home-hub")
        live.assign(intents.id, device_class="home-hub")
        failed = fleet_pb2.DEPLOYMENT_OUTCOME_FAILED
        report(agent, "hub-1", "motions", v2.sha256, failed, reason="self-test failed",
               serving_sha256=v1.sha256)  # fmt: skip
        active = fleet_pb2.DEPLOYMENT_OUTCOME_ACTIVE
        report(agent, "hub-1", "intents", intents.sha256, active, serving_sha256=intents.sha256,
               bytes_received=45_000, encoding=fleet_pb2.PAYLOAD_ENCODING_DELTA)  # fmt: skip
        with watching(agent, "hub-1"):
            result = cli(runner, live.address, "devices")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in (
        "hub-1",
        "home-hub",
        "online",
        "motions/home-hub/v1",  # serving
        "motions/home-hub/v2",  # desired
        "failed: self-test failed",
        "intents",
        "active",
        "legacy",
        "aaaaaaaaaaaa",  # a digest no artifact has: shown short
        "cam-1",
        "offline",
    ):
        assert text in out, text
    assert re.search(r"\b\d+s ago\b", out)
    assert "a" * 13 not in out
    intents_line = next(line for line in out.splitlines() if "intents" in line)
    assert intents_line.count("intents/home-hub/v1") == 1  # desired is not repeated
    assert "delta 43.9 KiB" in intents_line  # what the last update cost on the wire


def test_devices_json(runner: CliRunner, live: ControllerThread, tmp_path: Path) -> None:
    live.add_model("motions", onnx_file(tmp_path / "m.onnx").read_bytes())
    rolled_back = fleet_pb2.DEPLOYMENT_OUTCOME_ROLLED_BACK
    with stubs(live.address) as (_, agent):
        register(agent, "hub-1", "home-hub")
        report(
            agent, "hub-1", "motions", "d" * 64, rolled_back,
            encoding=fleet_pb2.PAYLOAD_ENCODING_DELTA, bytes_received=1 << 40,
            serving_sha256="e" * 64,
        )  # fmt: skip
        with watching(agent, "hub-1"):
            result = cli(runner, live.address, "devices", "--json")
    assert result.exit_code == 0, result.output
    [device] = json.loads(result.stdout)["devices"]
    assert device["device_id"] == "hub-1" and device["status"] == "online"
    assert device["hardware"]["cpu_cores"] == 2 and device["hardware"]["arch"] == "x86_64"
    [model] = device["models"]
    assert model["last_outcome"] == "rolled_back"
    assert model["encoding"] == "delta"
    assert model["bytes_received"] == 1 << 40  # an integer, not a string
    assert model["serving_sha256"] == "e" * 64


def test_artifact_list_parses_the_signed_manifest(
    runner: CliRunner, live: ControllerThread, tmp_path: Path
) -> None:
    path = onnx_file(tmp_path / "big.onnx", padding=786_000)
    size = path.stat().st_size
    assert 2.95 * MIB <= size < 3.05 * MIB  # shown as "3.0 MiB"
    live.add_model("motions", path.read_bytes())
    artifact = live.create_artifact("motions", "home-hub")
    signed = Manifest.from_json_bytes(artifact.manifest.manifest_json)

    result = cli(runner, live.address, "artifact", "list", "--json")
    assert result.exit_code == 0, result.output
    [shown] = json.loads(result.stdout)["artifacts"]
    assert shown["id"] == "motions/home-hub/v1"
    assert shown["signed"] is True
    assert shown["key_id"] == live.key_id
    assert Manifest.model_validate(shown["manifest"]) == signed

    table = cli(runner, live.address, "artifact", "list")
    assert table.exit_code == 0, table.output
    assert "motions/home-hub/v1" in table.stdout
    assert artifact.sha256[:12] in table.stdout and artifact.sha256[:13] not in table.stdout
    assert "3.0 MiB" in table.stdout
    assert signed.expires_at.astimezone().strftime("%Y-%m-%d") in table.stdout
    assert "motions v1" in table.stdout  # the model version it was made from
    assert "source" in table.stdout  # its recipe (no compression: the class's budget held)

    # a compressed artifact shows its recipe as `jobs` and `compress` do (what differs
    # from the defaults); a step this build does not know, every parameter (a digest
    # shortened as sha256 is); a rollback, what it re-releases
    [view] = views.ArtifactList.model_validate(json.loads(result.stdout)).artifacts

    def shown(*steps: RecipeStep, rereleases: str | None = None) -> str:
        manifest = signed.model_copy(update={"recipe": steps, "rereleases": rereleases})
        return artifacts_command.describe_recipe(view.model_copy(update={"manifest": manifest}))

    fp16 = {"mode": "fp16", "per_channel": True, "calibration": "minmax", "exclude_nodes": []}
    assert shown(RecipeStep(kind="quantize", params=fp16)) == "quantize(mode=fp16)"
    assert shown(RecipeStep(kind="identity")) == "source"
    future = RecipeStep(kind="future.step", params={"previous_sha256": "ab" * 32, "bits": 8})
    assert shown(future) == f"future.step(previous_sha256={'ab' * 6}…, bits=8)"
    assert shown(rereleases="motions/home-hub/v1") == "re-release of motions/home-hub/v1"


def test_what_no_controller_sends_still_renders() -> None:
    """Cases the real controller never produces: an unset time, an event with no detail."""
    assert output.relative_time(0) == "never"
    assert views.event_from_proto(fleet_pb2.Event(id=1, kind="x")).detail == {}
    assert views.event_from_proto(fleet_pb2.Event(id=2, detail_json="[1]")).detail == {"raw": "[1]"}


def test_devices_remove_forgets_a_device_and_names_what_to_fix(
    runner: CliRunner, live: ControllerThread
) -> None:
    with stubs(live.address) as (_, agent):
        register(agent, "cam-1", "camera")
        register(agent, "cam-2", "camera")
    result = cli(runner, live.address, "devices", "remove", "cam-1")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "removed device cam-1 (camera) with 0 telemetry window(s)"
    listed = cli(runner, live.address, "devices", "--json")
    assert [d["device_id"] for d in json.loads(listed.stdout)["devices"]] == ["cam-2"]

    again = cli(runner, live.address, "devices", "remove", "cam-1")
    assert again.exit_code == ExitCode.REFUSED, again.output
    assert "device 'cam-1' is not registered; `homefleet devices` lists the fleet" in again.stderr
    # the listing's options before the subcommand would be dropped: refused, not ignored
    misplaced = runner.invoke(app, ["devices", "--class", "camera", "remove", "cam-2"])
    assert misplaced.exit_code == ExitCode.USAGE, misplaced.output
    text = " ".join(misplaced.output.replace("│", " ").split())
    assert "--class before `remove` would be ignored" in text, text
    # the advice moves only what `remove` takes (QA: it suggested `remove ID --class ...`)
    assert "--class only narrows the listing: `remove` does not take it" in text, text
    misplaced = runner.invoke(app, ["devices", "--timeout", "5", "remove", "cam-2"])
    text = " ".join(misplaced.output.replace("│", " ").split())
    assert "give --timeout after the subcommand, e.g. `homefleet devices remove ID" in text
    listed = cli(runner, live.address, "devices", "--json")
    assert [d["device_id"] for d in json.loads(listed.stdout)["devices"]] == ["cam-2"]


def test_devices_walks_every_page_and_limit_stops_early(
    runner: CliRunner, live: ControllerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devices_command, "PAGE_SIZE", 2)  # five devices: three pages
    ids = [f"dev-{i}" for i in range(5)]
    with stubs(live.address) as (_, agent):
        for device_id in reversed(ids):
            register(agent, device_id, "camera")
    result = cli(runner, live.address, "devices", "--json")
    assert result.exit_code == 0, result.output
    assert [d["device_id"] for d in json.loads(result.stdout)["devices"]] == ids
    assert "note:" not in result.stderr

    result = cli(runner, live.address, "devices", "--json", "--limit", "3")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [d["device_id"] for d in listed["devices"]] == ids[:3] and listed["more"] is True
    assert "showing the first 3 devices; more exist (--limit 0 shows all)" in result.stderr

    # a class with no device: said, not an empty frame
    result = cli(runner, live.address, "devices", "--class", "no-such-class")
    assert result.exit_code == 0 and result.stdout == ""
    assert "no devices of class no-such-class are registered" in result.stderr

    result = cli(runner, live.address, "devices", "--limit", "5")
    assert result.exit_code == 0 and "note:" not in result.stderr
    assert all(device_id in result.stdout for device_id in ids)


def test_artifact_list_walks_every_page_and_limit_stops_early(
    runner: CliRunner, live: ControllerThread, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(artifacts_command, "PAGE_SIZE", 2)  # five artifacts: three pages
    live.add_model("motions", onnx_file(tmp_path / "m.onnx").read_bytes())
    made = [live.create_artifact("motions", "home-hub").id for _ in range(5)]
    result = cli(runner, live.address, "artifact", "list", "--json")
    assert result.exit_code == 0, result.output
    assert [a["id"] for a in json.loads(result.stdout)["artifacts"]] == made
    assert "note:" not in result.stderr

    result = cli(runner, live.address, "artifact", "list", "--json", "--limit", "3")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [a["id"] for a in listed["artifacts"]] == made[:3] and listed["more"] is True
    assert "showing the first 3 artifacts; more exist (--limit 0 shows all)" in result.stderr


def test_model_list_walks_every_page_and_limit_stops_early(
    runner: CliRunner, live: ControllerThread, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(models_command, "PAGE_SIZE", 2)  # three versions: two pages
    for scale in (1.0, 2.0, 3.0):
        live.add_model("motions", onnx_file(tmp_path / f"{scale}.onnx", scale=scale).read_bytes())
    result = cli(runner, live.address, "model", "list", "--json")
    assert result.exit_code == 0, result.output
    assert [m["version"] for m in json.loads(result.stdout)["models"]] == [1, 2, 3]
    result = cli(runner, live.address, "model", "list", "--json", "--limit", "2")
    listed = json.loads(result.stdout)
    assert [m["version"] for m in listed["models"]] == [1, 2] and listed["more"] is True
    assert "showing the first 2 model versions; more exist" in result.stderr
