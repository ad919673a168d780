"""Real processes for end-to-end tests: a controller and edge agents.

Everything runs as the README runs it (`python -m homefleet ...`), on loopback, port 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from artifact.tls import ENV_TLS, TlsBundle
from protos import fleet_pb2, fleet_pb2_grpc

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
WAIT_SECONDS = 90.0
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = WAIT_SECONDS) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except grpc.RpcError as exc:  # controller or agent still starting
            last_error = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last error: {last_error})")


@dataclass
class Process:
    """A child process started from the `homefleet` command, with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "homefleet", *self.argv],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        code = self.popen.returncode
        self.popen = None
        return code

    def read_json(self, path: Path) -> dict[str, object]:
        def probe() -> dict[str, object] | None:
            if not self.alive():
                raise AssertionError(f"{self.name} exited early; log:\n{self.log()}")
            if path.exists():
                data: dict[str, object] = json.loads(path.read_text())
                if data.get("pid") == (self.popen.pid if self.popen else None):
                    return data
            return None

        return wait_for(f"{self.name} to write {path.name}", probe)


@dataclass
class Controller:
    data_dir: Path
    port: int = 0
    tls: Path | None = None  # the controller's TLS directory: serve mutual TLS
    admin_tls: Path | None = None  # the admin certificate this harness and `cli` dial with
    extra_args: tuple[str, ...] = ()  # more `controller serve` options
    process: Process = field(init=False)
    address: str = ""

    def __post_init__(self) -> None:
        argv = ["controller", "serve", "--data-dir", str(self.data_dir), *self.extra_args]
        if self.tls is not None:
            argv += ["--tls", str(self.tls)]
        self.process = Process(
            "controller",
            [*argv, "--port", str(self.port)],
            self.data_dir.parent / "logs" / "controller.log",
        )

    def start(self) -> Controller:
        self.process.start()
        info = self.process.read_json(self.data_dir / "controller.json")
        self.address = str(info["address"])
        self.port = int(self.address.rsplit(":", 1)[1])
        # the next start reuses the port, as a restarted real controller would
        self.process.argv[-1] = str(self.port)
        return self

    def stop(self) -> int | None:
        return self.process.stop()

    @property
    def public_key(self) -> Path:
        return self.data_dir / "keys" / "signing.pub.pem"

    def channel(self) -> grpc.Channel:
        if self.admin_tls is None:
            return grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        credentials = TlsBundle.load(self.admin_tls).channel_credentials()
        return grpc.secure_channel(self.address, credentials, options=CHANNEL_OPTIONS)

    def admin(self) -> fleet_pb2_grpc.AdminServiceStub:
        return fleet_pb2_grpc.AdminServiceStub(self.channel())

    def agent_stub(self) -> fleet_pb2_grpc.AgentServiceStub:
        return fleet_pb2_grpc.AgentServiceStub(self.channel())

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "homefleet", *args, "--controller", self.address],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, ENV_TLS: str(self.admin_tls or "")},
        )

    def events(self, kind_prefix: str = "") -> list[fleet_pb2.Event]:
        response = self.admin().ListEvents(
            fleet_pb2.ListEventsRequest(kind_prefix=kind_prefix, limit=1000), timeout=10
        )
        return list(response.events)

    def device(self, device_id: str) -> fleet_pb2.Device | None:
        response = self.admin().ListDevices(fleet_pb2.ListDevicesRequest(), timeout=10)
        return next((d for d in response.devices if d.device_id == device_id), None)

    def model_state(self, device_id: str, model: str) -> fleet_pb2.DeviceModelState | None:
        device = self.device(device_id)
        if device is None:
            return None
        return next((m for m in device.models if m.model_name == model), None)

    def wait_serving(self, device_id: str, model: str, sha256: str) -> fleet_pb2.DeviceModelState:
        def probe() -> fleet_pb2.DeviceModelState | None:
            state = self.model_state(device_id, model)
            return state if state is not None and state.serving_sha256 == sha256 else None

        return wait_for(f"{device_id} to serve {model} {sha256[:12]}", probe)

    def wait_outcome(self, device_id: str, model: str, outcome: int) -> fleet_pb2.DeviceModelState:
        def probe() -> fleet_pb2.DeviceModelState | None:
            state = self.model_state(device_id, model)
            return state if state is not None and state.last_outcome == outcome else None

        return wait_for(f"{device_id} to report outcome {outcome} for {model}", probe)

    def add_model(self, name: str, path: Path) -> fleet_pb2.Model:
        data = path.read_bytes()

        def chunks() -> Iterator[fleet_pb2.AddModelChunk]:
            yield fleet_pb2.AddModelChunk(
                header=fleet_pb2.AddModelHeader(name=name, size_bytes=len(data))
            )
            for start in range(0, len(data), 256 * 1024):
                yield fleet_pb2.AddModelChunk(data=data[start : start + 256 * 1024])

        model: fleet_pb2.Model = self.admin().AddModel(chunks(), timeout=60)
        return model

    def release(self, name: str, path: Path, device_class: str) -> fleet_pb2.Artifact:
        """Add a model, build its artifact for a class and assign it there."""
        model = self.add_model(name, path)
        artifact: fleet_pb2.Artifact = self.admin().CreateArtifact(
            fleet_pb2.CreateArtifactRequest(
                model_name=name, model_version=model.version, device_class=device_class
            ),
            timeout=60,
        )
        self.admin().Assign(
            fleet_pb2.AssignRequest(artifact_id=artifact.id, device_class=device_class),
            timeout=10,
        )
        return artifact


@dataclass
class Agent:
    device_id: str
    device_class: str
    state_dir: Path
    controller_address: str
    trust_key: Path | None = None
    tls: Path | None = None  # this device's TLS directory
    extra_args: tuple[str, ...] = ()  # more `agent run` options
    process: Process = field(init=False)
    local_api: str = ""

    def __post_init__(self) -> None:
        argv = [
            "agent", "run",
            "--controller", self.controller_address,
            "--device-id", self.device_id,
            "--device-class", self.device_class,
            "--state-dir", str(self.state_dir),
            "--listen", "127.0.0.1:0",
            "--threads", "1",
            *self.extra_args,
        ]  # fmt: skip
        if self.trust_key is not None:
            argv += ["--trust-key", str(self.trust_key)]
        else:  # an agent verifies manifests unless told not to, by name
            argv += ["--allow-unsigned-manifests"]
        if self.tls is not None:
            argv += ["--tls", str(self.tls)]
        self.process = Process(
            f"agent {self.device_id}",
            argv,
            self.state_dir.parent / "logs" / f"{self.device_id}.log",
        )

    def start(self) -> Agent:
        self.process.start()
        info = self.process.read_json(self.state_dir / "agent.json")
        self.local_api = str(info["local_api"])
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return self.process.stop(sig)

    def inference(self) -> fleet_pb2_grpc.InferenceServiceStub:
        channel = grpc.insecure_channel(self.local_api, options=CHANNEL_OPTIONS)
        return fleet_pb2_grpc.InferenceServiceStub(channel)

    def predict(self, model: str, x: np.ndarray) -> tuple[np.ndarray, str]:
        response = self.inference().Predict(
            fleet_pb2.PredictRequest(
                model_name=model,
                inputs=[
                    fleet_pb2.Tensor(
                        name="x", dtype=str(x.dtype), shape=list(x.shape), data=x.tobytes()
                    )
                ],
            ),
            timeout=30,
        )
        out = response.outputs[0]
        y = np.frombuffer(out.data, dtype=np.dtype(out.dtype)).reshape(tuple(out.shape))
        return y, response.artifact_sha256


def linear_model(path: Path, *, seed: int, width: int = 8, features: int = 16) -> Path:
    """A small real ONNX model, y = x @ W + b, with weights drawn from ``seed``.

    ``width`` sets the size: 16 x 50_000 float32 weights make a ~3 MB file.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((features, width)).astype(np.float32)
    b = rng.standard_normal((width,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def reference_output(path: Path, x: np.ndarray) -> np.ndarray:
    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    result: np.ndarray = x @ weights["W"] + weights["b"]
    return result
