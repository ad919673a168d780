"""Fixtures for the `homefleet` command's tests: a runner, and a scripted AdminService.

The scripted service is a real gRPC server on loopback that answers with whatever a test
sets: it lets the CLI's rendering and its status-code mapping be checked exactly, without
needing the controller to produce each error. Tests against the real controller live in
test_with_controller.py.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from typer.testing import CliRunner

from protos import fleet_pb2, fleet_pb2_grpc


@pytest.fixture
def runner() -> CliRunner:
    # Wide enough that table cells are not folded; no ambient controller address.
    return CliRunner(env={"COLUMNS": "200", "HOMEFLEET_CONTROLLER": None})


@dataclass
class ScriptedAdmin(fleet_pb2_grpc.AdminServiceServicer):
    """Answers AdminService calls from fields a test sets, and records what it received."""

    fail: tuple[grpc.StatusCode, str] | None = None
    hang: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    uploads: list[list[fleet_pb2.AddModelChunk]] = field(default_factory=list)
    assigns: list[fleet_pb2.AssignRequest] = field(default_factory=list)
    event_requests: list[fleet_pb2.ListEventsRequest] = field(default_factory=list)
    devices: list[fleet_pb2.Device] = field(default_factory=list)
    events: list[fleet_pb2.Event] = field(default_factory=list)
    artifacts: list[fleet_pb2.Artifact] = field(default_factory=list)

    def _script(self, context: grpc.ServicerContext) -> None:
        if self.hang:
            self.release.wait(30)
        if self.fail is not None:
            context.abort(*self.fail)

    def AddModel(
        self, request_iterator: Iterator[fleet_pb2.AddModelChunk], context: grpc.ServicerContext
    ) -> fleet_pb2.Model:
        chunks = list(request_iterator)
        self.uploads.append(chunks)
        self._script(context)
        header = chunks[0].header
        data = b"".join(c.data for c in chunks[1:])
        return fleet_pb2.Model(
            name=header.name,
            version=1,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            description=header.description,
            inputs=[fleet_pb2.TensorSpec(name="x", dtype="float32", shape=[1, 4])],
            outputs=[fleet_pb2.TensorSpec(name="y", dtype="float32", shape=[1, 2])],
            created_unix_ms=1_700_000_000_000,
        )

    def ListModels(
        self, request: fleet_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.ListModelsResponse:
        self._script(context)
        return fleet_pb2.ListModelsResponse()

    def ListArtifacts(
        self, request: fleet_pb2.ListArtifactsRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.ListArtifactsResponse:
        self._script(context)
        return fleet_pb2.ListArtifactsResponse(artifacts=self.artifacts)

    def Assign(
        self, request: fleet_pb2.AssignRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.AssignResponse:
        self.assigns.append(request)
        self._script(context)
        return fleet_pb2.AssignResponse(devices_affected=2)

    def ListDevices(
        self, request: fleet_pb2.ListDevicesRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.ListDevicesResponse:
        self._script(context)
        return fleet_pb2.ListDevicesResponse(devices=self.devices)

    def ListEvents(
        self, request: fleet_pb2.ListEventsRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.ListEventsResponse:
        self.event_requests.append(request)
        self._script(context)
        return fleet_pb2.ListEventsResponse(events=self.events)


@dataclass(frozen=True)
class Scripted:
    admin: ScriptedAdmin
    address: str


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    admin = ScriptedAdmin()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    fleet_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Scripted(admin=admin, address=f"127.0.0.1:{port}")
    finally:
        admin.release.set()
        server.stop(grace=None)
