"""The demo's fleet: where its files live, and how a controller and agents are started.

Only command lines and the JSON files the processes write (controller.json,
agent.json) connect the demo to them: it imports neither the controller nor the agent.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from controller.device_classes import load_device_class
from demo.processes import ManagedProcess, ProcessError, ProcessGroup, wait_for_json_file

T = TypeVar("T")

CONTROLLER_READY_TIMEOUT = 90.0
AGENT_READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class DeviceSpec:
    """One simulated device: its id, its class, its inference threads, and how much slower
    than this machine it reports itself (``--emulate-slowdown``; 1 = as measured)."""

    device_id: str
    device_class: str
    threads: int
    emulate_slowdown: float = 1.0


# The demo's cameras report 10x what this machine measures, about the 8.3x the camera
# class's relative_speed (0.12) makes the planner assume; but an app's occasional call
# costs more than the planner's back-to-back runs, so the class turns out slower than
# planned and the controller has to notice and fix it.
CAMERA_SLOWDOWN = 10.0
DEMO_DEVICES: tuple[DeviceSpec, ...] = (
    DeviceSpec("hub-livingroom", "home-hub", threads=2),
    DeviceSpec("speaker-kitchen", "smart-speaker", threads=1),
    DeviceSpec("camera-porch", "camera", threads=1, emulate_slowdown=CAMERA_SLOWDOWN),
    DeviceSpec("camera-garage", "camera", threads=1, emulate_slowdown=CAMERA_SLOWDOWN),
)
DEMO_CLASSES_DIR = Path(__file__).resolve().parent / "device-classes"
# Telemetry and budget slices of 5 s, judged 3 in a row: a miss is noticed in ~20 s.
WINDOW_SECONDS = 5
BUDGET_WINDOWS = 3
BUDGET_MIN_SAMPLES = 30


@dataclass(frozen=True)
class RunLayout:
    """Every path of one demo run, under one root directory."""

    root: Path

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def controller_dir(self) -> Path:
        return self.root / "controller"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def result_path(self) -> Path:
        return self.root / "demo-result.json"

    def agent_dir(self, device_id: str) -> Path:
        return self.root / "agents" / device_id


@dataclass(frozen=True)
class ControllerInfo:
    """What a running controller wrote to DATA_DIR/controller.json."""

    address: str
    pid: int
    public_key_path: Path
    key_id: str
    metrics_address: str  # HOST:PORT of /metrics and the dashboard page

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: Path) -> ControllerInfo:
        return cls(
            address=_field(data, "address", str, source),
            pid=_field(data, "pid", int, source),
            public_key_path=Path(_field(data, "public_key_path", str, source)),
            key_id=_field(data, "key_id", str, source),
            metrics_address=str(data.get("metrics_address", "")),
        )


@dataclass(frozen=True)
class AgentInfo:
    """What a running agent wrote to STATE_DIR/agent.json."""

    local_api: str
    pid: int
    device_id: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: Path) -> AgentInfo:
        return cls(
            local_api=_field(data, "local_api", str, source),
            pid=_field(data, "pid", int, source),
            device_id=_field(data, "device_id", str, source),
        )


def _field(data: Mapping[str, Any], key: str, kind: type[T], source: Path) -> T:
    value = data.get(key)
    if not isinstance(value, kind):
        raise ProcessError(
            f"{source} has {key}={value!r}; expected a {kind.__name__} (fields: {sorted(data)})"
        )
    return value


def homefleet_argv(*args: str) -> list[str]:
    """The `homefleet` command, run by this interpreter (works without the console script)."""
    return [sys.executable, "-m", "homefleet", *args]


def controller_argv(data_dir: Path) -> list[str]:
    """A controller with its dashboard on a free port and the budget loop on the demo's
    device classes, judging short slices so the demo's loop closes in minutes."""
    return homefleet_argv(
        "controller",
        "serve",
        "--data-dir",
        str(data_dir),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--device-classes",
        str(DEMO_CLASSES_DIR),
        "--budget-window-seconds",
        str(WINDOW_SECONDS),
        "--budget-windows",
        str(BUDGET_WINDOWS),
        "--budget-min-samples",
        str(BUDGET_MIN_SAMPLES),
        "--budget-check-seconds",
        "1",
        "--canary-share",
        "0.5",
        "--budget-cooldown-seconds",
        "3600",
    )


def agent_argv(controller: ControllerInfo, device: DeviceSpec, state_dir: Path) -> list[str]:
    return homefleet_argv(
        "agent",
        "run",
        "--controller",
        controller.address,
        "--device-id",
        device.device_id,
        "--device-class",
        device.device_class,
        "--state-dir",
        str(state_dir),
        "--listen",
        "127.0.0.1:0",
        "--trust-key",
        str(controller.public_key_path),
        "--threads",
        str(device.threads),
        "--telemetry-window-seconds",
        str(WINDOW_SECONDS),
        "--emulate-slowdown",
        str(device.emulate_slowdown),
        *_power_flags(device.device_class),
    )


def _power_flags(device_class: str) -> list[str]:
    """The class's power model, so agents without a meter estimate energy as it would."""
    power = load_device_class(DEMO_CLASSES_DIR / f"{device_class}.yaml").power
    return ["--idle-watts", str(power.idle_watts), "--active-watts", str(power.active_watts)]


def start_controller(
    group: ProcessGroup, layout: RunLayout, *, cwd: Path, timeout: float = CONTROLLER_READY_TIMEOUT
) -> tuple[ManagedProcess, ControllerInfo]:
    """Start `homefleet controller serve` on a free port; return once controller.json exists."""
    process = group.start("controller", controller_argv(layout.controller_dir), cwd=cwd)
    info_path = layout.controller_dir / "controller.json"
    data = wait_for_json_file(info_path, process, timeout=timeout, what="start listening")
    return process, ControllerInfo.from_json(data, info_path)


def start_agents(
    group: ProcessGroup,
    layout: RunLayout,
    controller: ControllerInfo,
    devices: tuple[DeviceSpec, ...],
    *,
    cwd: Path,
    timeout: float = AGENT_READY_TIMEOUT,
) -> dict[str, AgentInfo]:
    """Start one agent per device, all at once; return once each has written agent.json."""
    started = [
        (
            device,
            group.start(
                f"agent-{device.device_id}",
                agent_argv(controller, device, layout.agent_dir(device.device_id)),
                cwd=cwd,
            ),
        )
        for device in devices
    ]
    agents: dict[str, AgentInfo] = {}
    for device, process in started:
        info_path = layout.agent_dir(device.device_id) / "agent.json"
        data = wait_for_json_file(info_path, process, timeout=timeout, what="start listening")
        agents[device.device_id] = AgentInfo.from_json(data, info_path)
    return agents


RUN_MARKER = ".homefleet-demo-run"


class RunDirError(RuntimeError):
    """The run directory exists but was not made by the demo, so it will not be removed."""


def prepare_run_dir(root: Path) -> RunLayout:
    """Remove the previous run at ``root`` (only if the demo made it) and start afresh."""
    if root.exists():
        if not root.is_dir() or (not (root / RUN_MARKER).exists() and any(root.iterdir())):
            raise RunDirError(
                f"{root} exists and was not made by the demo (it has no {RUN_MARKER} file); "
                "remove it yourself or pick another --run-dir"
            )
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / RUN_MARKER).write_text("made by `python -m demo`; removed by its next run\n")
    return RunLayout(root)
