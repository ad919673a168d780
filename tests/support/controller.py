"""The real controller for other packages' tests: ControllerServer on a loopback port.

``running_controller`` serves it on the caller's event loop (async tests: the agent's
sync loop runs beside it); ``ControllerThread`` serves it on an event loop of its own in
a thread, for synchronous tests such as the operator CLI's. Both drive it only through
its real AdminService and look at it through ListEvents/ListDevices or its data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

from controller.config import MAX_MESSAGE_BYTES, ControllerConfig
from controller.server import ControllerServer
from protos import fleet_pb2 as pb
from protos import fleet_pb2_grpc

T = TypeVar("T")
CALL_TIMEOUT_S = 30.0
WAIT_TIMEOUT_S = 60.0  # a safety limit for a hung test, never a timing assertion
POLL_S = 0.05
UPLOAD_CHUNK = 256 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def reserve_port() -> socket.socket:
    """A loopback port bound but not listening: connections to it are refused until the
    socket is closed and a server takes the port (no fixed ports, no race with port 0)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Controller:
    """A started ControllerServer and aio stubs for it (used on the loop that started it)."""

    server: ControllerServer
    config: ControllerConfig
    channel: grpc.aio.Channel
    admin: Any  # fleet_pb2_grpc.AdminServiceStub (the generated stub is untyped)
    agent: Any  # fleet_pb2_grpc.AgentServiceStub

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    @property
    def key_id(self) -> str:
        info = self.server.info
        return info.key_id if info is not None else ""

    @property
    def public_key_path(self) -> Path:
        return self.config.key_dir / "signing.pub.pem"

    def blob_path(self, sha256: str) -> Path:
        return self.config.blob_dir / "sha256" / sha256[:2] / sha256

    # ---------------------------------------------------------------- AdminService
    async def add_model(self, name: str, data: bytes, description: str = "") -> pb.Model:
        header = pb.AddModelHeader(name=name, description=description, size_bytes=len(data))
        messages = [pb.AddModelChunk(header=header)] + [
            pb.AddModelChunk(data=data[i : i + UPLOAD_CHUNK])
            for i in range(0, len(data), UPLOAD_CHUNK)
        ]
        model: pb.Model = await self.admin.AddModel(iter(messages), timeout=CALL_TIMEOUT_S)
        return model

    async def create_artifact(
        self, model: str, device_class: str = "home-hub", model_version: int | None = None
    ) -> pb.Artifact:
        request = pb.CreateArtifactRequest(model_name=model, device_class=device_class)
        if model_version is not None:
            request.model_version = model_version
        artifact: pb.Artifact = await self.admin.CreateArtifact(request, timeout=CALL_TIMEOUT_S)
        return artifact

    async def assign(
        self, artifact_id: str, *, device_class: str = "", device_id: str = ""
    ) -> pb.AssignResponse:
        if device_id:
            request = pb.AssignRequest(artifact_id=artifact_id, device_id=device_id)
        else:
            request = pb.AssignRequest(artifact_id=artifact_id, device_class=device_class)
        response: pb.AssignResponse = await self.admin.Assign(request, timeout=CALL_TIMEOUT_S)
        return response

    async def release(self, name: str, data: bytes, device_class: str = "home-hub") -> pb.Artifact:
        """Add ``data`` as the next version of model ``name``, build it for a class, assign it."""
        model = await self.add_model(name, data)
        artifact = await self.create_artifact(name, device_class, model.version)
        await self.assign(artifact.id, device_class=device_class)
        return artifact

    async def events(self, kind_prefix: str = "") -> list[pb.Event]:
        response = await self.admin.ListEvents(
            pb.ListEventsRequest(kind_prefix=kind_prefix, limit=1000), timeout=CALL_TIMEOUT_S
        )
        return list(response.events)

    async def details(self, kind: str) -> list[dict[str, Any]]:
        """The parsed detail of every event of exactly this kind, oldest first."""
        return [json.loads(e.detail_json) for e in await self.events(kind) if e.kind == kind]

    async def device(self, device_id: str) -> pb.Device | None:
        response = await self.admin.ListDevices(pb.ListDevicesRequest(), timeout=CALL_TIMEOUT_S)
        return next((d for d in response.devices if d.device_id == device_id), None)


async def open_controller(data_dir: Path, **overrides: Any) -> Controller:
    fields: dict[str, Any] = {"data_dir": data_dir, "port": 0, "grace_seconds": 0.5}
    fields.update(overrides)
    config = ControllerConfig(**fields)
    server = ControllerServer(config)
    await server.start()
    channel = grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS)
    return Controller(
        server=server,
        config=config,
        channel=channel,
        admin=fleet_pb2_grpc.AdminServiceStub(channel),  # type: ignore[no-untyped-call]
        agent=fleet_pb2_grpc.AgentServiceStub(channel),  # type: ignore[no-untyped-call]
    )


async def close_controller(controller: Controller) -> None:
    await controller.channel.close(None)
    await controller.server.stop(grace=0.5)


@contextlib.asynccontextmanager
async def running_controller(data_dir: Path, **overrides: Any) -> AsyncIterator[Controller]:
    """A real controller on 127.0.0.1 (port 0 unless ``port`` is given), SQLite in data_dir."""
    controller = await open_controller(data_dir, **overrides)
    try:
        yield controller
    finally:
        await close_controller(controller)


async def eventually(what: str, probe: Callable[[], Awaitable[T | None]]) -> T:
    """Poll ``probe`` until it returns something other than None (or False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_TIMEOUT_S
    while True:
        value = await probe()
        if value is not None and value is not False:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_S)


class ControllerThread:
    """A real controller serving from an event loop in a thread, for synchronous tests.

    The AdminService helpers of ``Controller`` are offered here as blocking calls; ``call``
    runs any other coroutine on the controller's loop and returns its result.
    """

    def __init__(self, data_dir: Path, **overrides: Any) -> None:
        self._data_dir = data_dir
        self._overrides = overrides
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._controller: Controller | None = None

    def __enter__(self) -> ControllerThread:
        self._thread.start()
        self._controller = self.call(open_controller(self._data_dir, **self._overrides))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._controller is not None:
                self.call(close_controller(self._controller))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CALL_TIMEOUT_S)
            if not self._thread.is_alive():
                self._loop.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(WAIT_TIMEOUT_S)

    @property
    def controller(self) -> Controller:
        if self._controller is None:
            raise RuntimeError("the controller is not running: use `with ControllerThread(...)`")
        return self._controller

    @property
    def address(self) -> str:
        return self.controller.address

    @property
    def port(self) -> int:
        return self.controller.port

    @property
    def data_dir(self) -> Path:
        return self.controller.data_dir

    @property
    def key_id(self) -> str:
        return self.controller.key_id

    def add_model(self, name: str, data: bytes, description: str = "") -> pb.Model:
        return self.call(self.controller.add_model(name, data, description))

    def create_artifact(
        self, model: str, device_class: str = "home-hub", model_version: int | None = None
    ) -> pb.Artifact:
        return self.call(self.controller.create_artifact(model, device_class, model_version))

    def assign(
        self, artifact_id: str, *, device_class: str = "", device_id: str = ""
    ) -> pb.AssignResponse:
        return self.call(
            self.controller.assign(artifact_id, device_class=device_class, device_id=device_id)
        )

    def events(self, kind_prefix: str = "") -> list[pb.Event]:
        return self.call(self.controller.events(kind_prefix))
