"""The operator's side of the demo: the real `homefleet` CLI for every change, and
AdminService (the wire contract) for reading state back.

Changes go through the CLI so the demo shows — and exercises — exactly what a person
would type. Reads use the gRPC stubs because the proto, not the CLI's output format,
is the contract the demo can rely on.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc

from demo.fleet import homefleet_argv
from protos import fleet_pb2, fleet_pb2_grpc

CLI_TIMEOUT = 120.0
COMPRESS_TIMEOUT = 600.0  # a safety limit: a job is normally 10-30 s
RPC_TIMEOUT = 10.0
SERVING_TIMEOUT = 120.0
_POLL_SECONDS = 0.5
_MAX_MESSAGE = 8 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
)


class OperatorError(RuntimeError):
    """A CLI command failed, or the fleet did not reach the state the operator asked for."""


@dataclass(frozen=True)
class CliResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def shown(self) -> str:
        """The command as a person would type it: `homefleet ...`."""
        return "homefleet " + shlex.join(self.argv[3:])


@dataclass(frozen=True)
class ArtifactRef:
    """An artifact the operator created: its id ("<model>/<class>/v<n>") and digest."""

    artifact_id: str
    model_name: str
    device_class: str
    version: int
    sha256: str
    size_bytes: int


class Operator:
    """Talks to one controller as its operator; use as a context manager (closes the channel)."""

    def __init__(
        self,
        controller_address: str,
        *,
        cwd: Path,
        log_path: Path,
        on_command: Callable[[CliResult], None] | None = None,
    ) -> None:
        self.address = controller_address
        self._cwd = cwd
        self._log_path = log_path
        self._on_command = on_command
        self._channel = grpc.insecure_channel(controller_address, options=CHANNEL_OPTIONS)
        self._admin = fleet_pb2_grpc.AdminServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._channel.close()

    # ------------------------------------------------------------------ the CLI

    def cli(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        echo: bool = True,
        timeout: float = CLI_TIMEOUT,
    ) -> CliResult:
        """Run `homefleet ARGS` against this controller; raise OperatorError unless it exits 0.

        ``echo``: pass the result to ``on_command`` (the caller shows it itself otherwise).
        """
        argv = tuple(homefleet_argv(*args))
        child_env = {**os.environ, "HOMEFLEET_CONTROLLER": self.address, **(env or {})}
        try:
            done = subprocess.run(
                argv,
                cwd=self._cwd,
                env=child_env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise OperatorError(
                f"`homefleet {shlex.join(args)}` did not finish within {timeout:.0f} s"
            ) from exc
        result = CliResult(argv, done.returncode, done.stdout, done.stderr)
        self._log(result)
        if echo and self._on_command is not None:
            self._on_command(result)
        if result.returncode != 0:
            raise OperatorError(
                f"`{result.shown}` exited with code {result.returncode}\n"
                f"stdout:\n{result.stdout.strip() or '(empty)'}\n"
                f"stderr:\n{result.stderr.strip() or '(empty)'}"
            )
        return result

    def _log(self, result: CliResult) -> None:
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._log_path.open("a") as log:
            log.write(f"$ {result.shown}\n(exit {result.returncode})\n")
            log.write(result.stdout)
            log.write(result.stderr)
            log.write("\n")

    def add_model(self, name: str, onnx_path: Path, description: str) -> None:
        self.cli("model", "add", name, str(onnx_path), "--description", description)

    def create_artifact(self, model_name: str, device_class: str) -> ArtifactRef:
        """`homefleet artifact create`, then read the new artifact back from AdminService."""
        self.cli("artifact", "create", model_name, "--class", device_class)
        return self.latest_artifact(model_name, device_class)

    def compress_on_controller(
        self, workload: str, device_class_file: Path, model_name: str
    ) -> ArtifactRef:
        """`homefleet compress --controller`: the controller trains and compresses the
        workload for the class (its planner's trials are the progress), then the artifact
        is read back. The controller keeps the job's inputs for the budget loop."""
        self.cli(
            "compress",
            "--controller",
            self.address,
            "--workload",
            workload,
            "--device-class",
            str(device_class_file),
            timeout=COMPRESS_TIMEOUT,
        )
        return self.latest_artifact(model_name, device_class_file.stem)

    def events(self, kind_prefix: str, after_id: int = 0) -> list[fleet_pb2.Event]:
        response = self._admin.ListEvents(
            fleet_pb2.ListEventsRequest(kind_prefix=kind_prefix, after_id=after_id, limit=1000),
            timeout=RPC_TIMEOUT,
        )
        return list(response.events)

    def assign_class(self, artifact_id: str, device_class: str) -> None:
        self.cli("assign", artifact_id, "--class", device_class)

    def devices_table(self, width: int, *, color: bool) -> str:
        """What `homefleet devices` prints, rendered for a terminal ``width`` columns wide."""
        env = {"COLUMNS": str(width)}
        if color:
            env["FORCE_COLOR"] = "1"
        return self.cli("devices", env=env, echo=False).stdout

    # ------------------------------------------------------------------ AdminService

    def latest_artifact(self, model_name: str, device_class: str) -> ArtifactRef:
        response = self._admin.ListArtifacts(
            fleet_pb2.ListArtifactsRequest(model_name=model_name, device_class=device_class),
            timeout=RPC_TIMEOUT,
        )
        matching = [
            a
            for a in response.artifacts
            if a.model_name == model_name and a.device_class == device_class
        ]
        if not matching:
            raise OperatorError(
                f"the controller lists no artifact of model {model_name!r} for class "
                f"{device_class!r} right after `homefleet artifact create` succeeded"
            )
        newest = max(matching, key=lambda a: a.version)
        return ArtifactRef(
            artifact_id=newest.id,
            model_name=newest.model_name,
            device_class=newest.device_class,
            version=newest.version,
            sha256=newest.sha256,
            size_bytes=newest.size_bytes,
        )

    def latest_artifact_by_id(self, artifact_id: str) -> ArtifactRef:
        """The artifact ``artifact_id`` ("<model>/<class>/v<n>") as AdminService lists it."""
        model_name, device_class, _ = artifact_id.split("/", 2)
        response = self._admin.ListArtifacts(
            fleet_pb2.ListArtifactsRequest(model_name=model_name, device_class=device_class),
            timeout=RPC_TIMEOUT,
        )
        for a in response.artifacts:
            if a.id == artifact_id:
                return ArtifactRef(
                    artifact_id=a.id,
                    model_name=a.model_name,
                    device_class=a.device_class,
                    version=a.version,
                    sha256=a.sha256,
                    size_bytes=a.size_bytes,
                )
        raise OperatorError(f"the controller lists no artifact {artifact_id!r}")

    def list_devices(self) -> list[fleet_pb2.Device]:
        response = self._admin.ListDevices(fleet_pb2.ListDevicesRequest(), timeout=RPC_TIMEOUT)
        return list(response.devices)

    def wait_until_serving(
        self,
        expected: Mapping[str, ArtifactRef],
        *,
        timeout: float = SERVING_TIMEOUT,
        on_poll: Callable[[int, int], None] | None = None,
    ) -> list[fleet_pb2.Device]:
        """Poll ListDevices until every device in ``expected`` serves its artifact.

        ``expected`` maps device id to the artifact it should serve. ``on_poll`` gets
        (devices serving, devices expected) after each poll, for progress display.
        """
        deadline = time.monotonic() + timeout
        while True:
            devices = self.list_devices()
            waiting = devices_not_serving(devices, expected)
            if on_poll is not None:
                on_poll(len(expected) - len(waiting), len(expected))
            if not waiting:
                return devices
            if time.monotonic() >= deadline:
                raise OperatorError(
                    f"after {timeout:.0f} s, {len(waiting)} of {len(expected)} devices do not "
                    "serve their assigned artifact:\n" + "\n".join(waiting)
                )
            time.sleep(_POLL_SECONDS)


def devices_not_serving(
    devices: list[fleet_pb2.Device], expected: Mapping[str, ArtifactRef]
) -> list[str]:
    """One line per expected device that does not serve its artifact yet, saying why."""
    by_id = {d.device_id: d for d in devices}
    lines = []
    for device_id, want in expected.items():
        device = by_id.get(device_id)
        if device is None:
            lines.append(f"  {device_id}: not registered with the controller")
            continue
        state = next((m for m in device.models if m.model_name == want.model_name), None)
        if state is None:
            lines.append(f"  {device_id}: no state for model {want.model_name!r} yet")
        elif state.serving_sha256 != want.sha256:
            outcome = fleet_pb2.DeploymentOutcome.Name(state.last_outcome)
            reason = f" ({state.last_reason})" if state.last_reason else ""
            lines.append(
                f"  {device_id}: serves {state.serving_artifact_id or 'nothing'}, wants "
                f"{want.artifact_id}; last outcome {outcome}{reason}"
            )
    return lines
