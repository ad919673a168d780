"""The operator's connection to the controller: where it is, channel limits, deadlines.

Every call goes through `AdminClient`, which passes a deadline on each one; `session`
opens the channel and applies the one error mapping in `errors`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Protocol

import grpc
import typer

from artifact.tls import ENV_TLS, Role, TlsBundle, TlsError
from controller.cli.errors import ExitCode, rpc_errors
from protos import fleet_pb2, fleet_pb2_grpc

ENV_CONTROLLER = "HOMEFLEET_CONTROLLER"
DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# An upload's deadline grows with its size; assume at least this much throughput.
UPLOAD_MIN_BYTES_PER_S = 1024 * 1024

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)


def _check_address(value: str) -> str:
    address = value.strip()
    if not address or any(c.isspace() for c in address):
        raise typer.BadParameter(
            f"{value!r} is not an address: use HOST:PORT, e.g. {DEFAULT_ADDRESS}"
        )
    _, colon, port = address.rpartition(":")
    if colon and port.isdigit() and not 1 <= int(port) <= 65535:
        # gRPC would dial the port modulo 65536: another controller, perhaps
        raise typer.BadParameter(f"port {port} of {address!r} is not between 1 and 65535")
    return address


ControllerOption = Annotated[
    str,
    typer.Option(
        "--controller",
        callback=_check_address,
        envvar=ENV_CONTROLLER,
        metavar="HOST:PORT",
        help="Address of the controller's gRPC API.",
        show_envvar=True,
    ),
]
TimeoutOption = Annotated[
    float,
    typer.Option(
        "--timeout",
        min=0.1,
        metavar="SECONDS",
        help="Deadline for each call to the controller (uploads get more for large files).",
    ),
]


class _AdminStub(Protocol):
    """The generated AdminService stub, typed (grpcio-tools emits no type hints for it)."""

    AddModel: grpc.StreamUnaryMultiCallable[fleet_pb2.AddModelChunk, fleet_pb2.Model]
    ListModels: grpc.UnaryUnaryMultiCallable[
        fleet_pb2.ListModelsRequest, fleet_pb2.ListModelsResponse
    ]
    CreateArtifact: grpc.UnaryUnaryMultiCallable[
        fleet_pb2.CreateArtifactRequest, fleet_pb2.Artifact
    ]
    ListArtifacts: grpc.UnaryUnaryMultiCallable[
        fleet_pb2.ListArtifactsRequest, fleet_pb2.ListArtifactsResponse
    ]
    Assign: grpc.UnaryUnaryMultiCallable[fleet_pb2.AssignRequest, fleet_pb2.AssignResponse]
    Unassign: grpc.UnaryUnaryMultiCallable[fleet_pb2.UnassignRequest, fleet_pb2.AssignResponse]
    RemoveDevice: grpc.UnaryUnaryMultiCallable[
        fleet_pb2.RemoveDeviceRequest, fleet_pb2.RemoveDeviceResponse
    ]
    ListDevices: grpc.UnaryUnaryMultiCallable[
        fleet_pb2.ListDevicesRequest, fleet_pb2.ListDevicesResponse
    ]
    ListEvents: grpc.UnaryUnaryMultiCallable[
        fleet_pb2.ListEventsRequest, fleet_pb2.ListEventsResponse
    ]


def admin_credentials() -> grpc.ChannelCredentials | None:
    """Mutual TLS with the admin certificate in ``$HOMEFLEET_TLS``; None: plaintext.

    A directory that cannot be used is a usage error (exit 2) that says what to fix,
    rather than a handshake failure that looks like an unreachable controller.
    """
    directory = os.environ.get(ENV_TLS, "").strip()
    if not directory:
        return None
    try:
        bundle = TlsBundle.load(Path(directory)).require_role(Role.ADMIN)
    except TlsError as exc:
        typer.echo(f"error: {ENV_TLS}: {exc}", err=True)
        raise typer.Exit(int(ExitCode.USAGE)) from None
    return bundle.channel_credentials()


def create_channel(address: str) -> grpc.Channel:
    credentials = admin_credentials()
    if credentials is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)


def upload_timeout(size_bytes: int, timeout_s: float) -> float:
    """A deadline that does not cut off a large model on a slow link."""
    return timeout_s + size_bytes / UPLOAD_MIN_BYTES_PER_S


class AdminClient:
    """AdminService calls, each with a deadline."""

    def __init__(self, channel: grpc.Channel, *, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        stub: _AdminStub = fleet_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        self._stub = stub

    def add_model(
        self, chunks: Iterator[fleet_pb2.AddModelChunk], *, size_bytes: int
    ) -> fleet_pb2.Model:
        return self._stub.AddModel(chunks, timeout=upload_timeout(size_bytes, self.timeout_s))

    def list_models(self, request: fleet_pb2.ListModelsRequest) -> fleet_pb2.ListModelsResponse:
        return self._stub.ListModels(request, timeout=self.timeout_s)

    def create_artifact(self, request: fleet_pb2.CreateArtifactRequest) -> fleet_pb2.Artifact:
        return self._stub.CreateArtifact(request, timeout=self.timeout_s)

    def list_artifacts(
        self, request: fleet_pb2.ListArtifactsRequest
    ) -> fleet_pb2.ListArtifactsResponse:
        return self._stub.ListArtifacts(request, timeout=self.timeout_s)

    def assign(self, request: fleet_pb2.AssignRequest) -> fleet_pb2.AssignResponse:
        return self._stub.Assign(request, timeout=self.timeout_s)

    def unassign(self, request: fleet_pb2.UnassignRequest) -> fleet_pb2.AssignResponse:
        return self._stub.Unassign(request, timeout=self.timeout_s)

    def list_devices(self, request: fleet_pb2.ListDevicesRequest) -> fleet_pb2.ListDevicesResponse:
        return self._stub.ListDevices(request, timeout=self.timeout_s)

    def remove_device(
        self, request: fleet_pb2.RemoveDeviceRequest
    ) -> fleet_pb2.RemoveDeviceResponse:
        return self._stub.RemoveDevice(request, timeout=self.timeout_s)

    def list_events(self, request: fleet_pb2.ListEventsRequest) -> fleet_pb2.ListEventsResponse:
        return self._stub.ListEvents(request, timeout=self.timeout_s)


@contextlib.contextmanager
def session(address: str, timeout_s: float) -> Iterator[AdminClient]:
    """A client for one command: the channel closes and gRPC errors are explained on exit."""
    with rpc_errors(address=address, timeout_s=timeout_s), create_channel(address) as channel:
        yield AdminClient(channel, address=address, timeout_s=timeout_s)
