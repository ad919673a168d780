"""The local inference API for home applications: InferenceService on localhost or a unix socket.

Predict stays cheap: look the model up, check and decode the tensors against the cached
input specs, run the session in a worker thread (the event loop keeps answering), encode
the outputs. Oversized requests are refused by gRPC's own limit (RESOURCE_EXHAUSTED).

An address another process serves is refused, never shared or taken over: a TCP port
without SO_REUSEPORT, a unix socket path after a test connection (a socket file nobody
answers on is a crashed agent's, and is replaced). On stop the socket file is removed
only if it is still the one this process made.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from edge_agent.config import BIND_PREFIX, MAX_MESSAGE_BYTES, UNIX_PREFIX, ListenAddress
from edge_agent.convert import check_inputs, spec_to_proto, tensor_to_proto
from edge_agent.errors import AgentError, ErrorCode, RefusalLog, describe_os_error, guarded
from edge_agent.runtime import ModelRuntime
from edge_agent.telemetry import Telemetry
from protos import fleet_pb2, fleet_pb2_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
PROBE_TIMEOUT_S = 1.0  # connecting to a local socket: only a hung server takes this long


class InferenceServicer(fleet_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self, runtime: ModelRuntime, max_concurrent: int, telemetry: Telemetry | None = None
    ) -> None:
        self._runtime = runtime
        self._slots = asyncio.Semaphore(max_concurrent)
        self._telemetry = telemetry
        self._refusals = RefusalLog()

    async def Predict(
        self, request: fleet_pb2.PredictRequest, context: Context
    ) -> fleet_pb2.PredictResponse:
        return await guarded(context, "Predict", self.predict(request), self._refusals)

    async def ListModels(
        self, request: fleet_pb2.LocalModelsRequest, context: Context
    ) -> fleet_pb2.LocalModelsResponse:
        return await guarded(context, "ListModels", self.list_models(), self._refusals)

    async def predict(self, request: fleet_pb2.PredictRequest) -> fleet_pb2.PredictResponse:
        slot = self._runtime.get(request.model_name)  # one reference: a switch cannot split a call
        feeds = check_inputs(request.model_name, slot.inputs, request.inputs)
        async with self._slots:
            if self._telemetry is None:
                outputs = await asyncio.to_thread(slot.run, feeds)
            else:  # measured in the worker thread: its CPU time is the inference's
                outputs = await asyncio.to_thread(self._telemetry.measured_run, slot, feeds)
        return fleet_pb2.PredictResponse(
            outputs=[tensor_to_proto(name, value) for name, value in outputs.items()],
            artifact_sha256=slot.sha256,
        )

    async def list_models(self) -> fleet_pb2.LocalModelsResponse:
        models = []
        for name in self._runtime.model_names():
            slot = self._runtime.active(name)
            if slot is None:
                continue
            previous = self._runtime.previous(name)
            models.append(
                fleet_pb2.LocalModel(
                    model_name=name,
                    artifact_sha256=slot.sha256,
                    previous_sha256=previous.sha256 if previous else "",
                    inputs=[spec_to_proto(s) for s in slot.inputs],
                    outputs=[spec_to_proto(s) for s in slot.outputs],
                )
            )
        return fleet_pb2.LocalModelsResponse(models=models)


@dataclass(frozen=True)
class FileIdentity:
    """Which file a path named when it was recorded: another file at that path differs."""

    device: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        st = path.lstat()
        return cls(st.st_dev, st.st_ino)


@dataclass
class LocalApi:
    server: grpc.aio.Server
    address: str  # "HOST:PORT" with the real port, or "unix:/path"
    listen: ListenAddress
    socket_file: FileIdentity | None = None  # the unix socket this process put in place

    async def stop(self, grace_s: float = 2.0) -> None:
        if self.socket_file is not None:  # first: a successor may take the path at once
            _remove_if_ours(self.listen.unix_path, self.socket_file)
        await self.server.stop(grace_s)


def _listen_failed(message: str) -> AgentError:
    return AgentError(ErrorCode.LISTEN_FAILED, f"--listen: {message}")


def listen_problem(listen: ListenAddress) -> AgentError | None:
    """What stops the local API at ``listen`` now, or None: a port or socket another
    process serves, a host that does not resolve, a socket path that cannot work. Asked
    before the state directory is touched (agent.preflight), so a refused start leaves a
    fresh one as it was; the bind itself can still lose a race, and says so then."""
    if not listen.is_unix:
        return _tcp_problem(listen)
    check_unix_listen(listen)
    path = listen.unix_path
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(path.lstat().st_mode) and _serves(path):
            return _served_by_another(listen)
    return None


def _tcp_failure(listen: ListenAddress) -> AgentError:
    """Why gRPC could not bind ``listen``: a plain socket repeats the bind to learn the errno."""
    return _tcp_problem(listen) or _listen_failed(
        f"cannot listen on {listen.text} (GRPC_VERBOSITY=debug shows gRPC's reason)"
    )


def _tcp_problem(listen: ListenAddress) -> AgentError | None:
    host, _, port_text = listen.text.rpartition(":")
    port = int(port_text)
    try:
        found = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return _listen_failed(f"cannot listen on {listen.text}: {host} does not resolve: {exc}")
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return _listen_failed(
                        f"{listen.text} is already in use by another process (another agent? "
                        f"`ss -ltnp 'sport = :{port}'` names it): stop it, or choose another "
                        "--listen port (port 0 picks a free one)"
                    )
                return _listen_failed(f"cannot listen on {listen.text}: {exc.strerror}")
    return None


def _serves(path: Path) -> bool:
    """Whether a process accepts connections on the unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT_S)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False  # a socket file nobody listens on, or gone meanwhile
        except (BlockingIOError, TimeoutError):
            return True  # listening, its backlog full
        except OSError as exc:
            raise _listen_failed(
                f"cannot tell whether another process serves unix:{path}: {exc.strerror}"
            ) from exc
    return True


def _not_a_socket(path: Path) -> AgentError:
    return AgentError(
        ErrorCode.INVALID_CONFIG,
        f"--listen: {path} exists and is not a socket: choose another --listen path",
    )


def check_unix_listen(listen: ListenAddress) -> None:
    """Refuse a unix socket path that cannot work, changing nothing: its directory is
    missing or no directory, or a file there is not a socket (INVALID_CONFIG: exit 2).

    The agent never creates the directory: a mistyped path made directories (as root,
    anywhere) instead of being refused. A service manager makes it
    (systemd: RuntimeDirectory=), or a person does.
    """
    path = listen.unix_path
    directory = path.parent
    try:
        is_directory = stat.S_ISDIR(directory.stat().st_mode)
    except FileNotFoundError:
        raise AgentError(
            ErrorCode.INVALID_CONFIG,
            f"--listen: the socket's directory {directory} does not exist: create it, "
            f"writable by the agent's user (systemd: RuntimeDirectory=), or choose another "
            "--listen path",
        ) from None
    except OSError as exc:
        raise AgentError(
            ErrorCode.INVALID_CONFIG,
            f"--listen: cannot reach the socket's directory {directory} "
            f"({describe_os_error(exc)}): choose another --listen path",
        ) from None
    if not is_directory:
        raise AgentError(
            ErrorCode.INVALID_CONFIG,
            f"--listen: {directory} is not a directory: choose another --listen path",
        )
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AgentError(
            ErrorCode.INVALID_CONFIG,
            f"--listen: cannot reach {path} ({describe_os_error(exc)}): choose another "
            "--listen path",
        ) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise _not_a_socket(path)


def _clear_stale_socket(listen: ListenAddress) -> None:
    """Refuse a path another process serves or a file that is not a socket; a socket file
    nobody listens on (left by an agent that crashed) is removed."""
    path = listen.unix_path
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise _not_a_socket(path)
    if _serves(path):
        raise _served_by_another(listen)
    if _remove_if_ours(path, FileIdentity(st.st_dev, st.st_ino)):
        log.info("removed %s: a socket file nobody serves (left by a crashed agent?)", path)


def _served_by_another(listen: ListenAddress) -> AgentError:
    return _listen_failed(
        f"another process serves {listen.text} (another agent? `ss -lxp | grep "
        f"{listen.unix_path.parent}/` names the processes serving sockets there): stop it or "
        "choose another --listen path"
    )


def _remove_if_ours(path: Path, ours: FileIdentity) -> bool:
    """Unlink ``path`` only while it is still the file ``ours``: never another's socket."""
    try:
        if FileIdentity.of(path) != ours:
            log.warning("left %s in place: another process has replaced the socket there", path)
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _bind_unix(server: grpc.aio.Server, listen: ListenAddress) -> FileIdentity:
    """Bind at a fresh name beside the path, then hard-link it into place.

    gRPC unlinks whatever socket is at its path, both before binding and when it stops;
    so it only ever gets the temporary name, and the path itself is claimed by link(2),
    which never replaces an existing file: of two agents starting at once, one fails.
    The temporary name is removed at once, but `ss -lx` still lists the socket by it.
    """
    path = listen.unix_path
    check_unix_listen(listen)
    _clear_stale_socket(listen)
    temporary = path.parent / f"{BIND_PREFIX}{secrets.token_hex(4)}"
    try:
        bound = server.add_insecure_port(f"{UNIX_PREFIX}{temporary}")
    except RuntimeError as exc:
        raise _listen_failed(f"cannot listen on {listen.text}: {exc}") from exc
    try:
        if bound == 0:
            raise _listen_failed(f"cannot create a socket in {path.parent}")
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise _listen_failed(
                f"another process took {listen.text} while this agent was starting: stop it "
                "or choose another --listen path"
            ) from None
        except OSError as exc:
            raise _listen_failed(f"cannot create {path}: {exc.strerror}") from exc
        return FileIdentity.of(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


async def start_local_api(
    runtime: ModelRuntime,
    listen: ListenAddress,
    max_concurrent: int,
    telemetry: Telemetry | None = None,
) -> LocalApi:
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # a port in use must fail, not be shared: apps would reach either agent at random
            ("grpc.so_reuseport", 0),
        ]
    )
    fleet_pb2_grpc.add_InferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        InferenceServicer(runtime, max_concurrent, telemetry), server
    )
    socket_file: FileIdentity | None = None
    if listen.is_unix:
        socket_file = _bind_unix(server, listen)
        address = listen.text
    else:
        try:
            port = server.add_insecure_port(listen.text)
        except RuntimeError:
            port = 0  # gRPC raises or returns 0, depending on the version
        if port == 0:
            raise _tcp_failure(listen)
        host = listen.text.rpartition(":")[0]
        address = f"{host}:{port}"
    api = LocalApi(server, address, listen, socket_file)
    try:
        await server.start()
    except BaseException:
        await api.stop(0)
        raise
    log.info("local inference API listening on %s", address)
    return api
