"""The controller process: one grpc.aio server with AgentService, AdminService, health and
reflection, over a SQL store, a blob directory and a signing key.

``ControllerServer`` starts and stops it in-process (tests use it on port 0);
``serve_forever`` runs it until SIGTERM or SIGINT and stops it gracefully.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy import Engine
from sqlalchemy.exc import DatabaseError

from artifact.files import atomic_write_bytes
from artifact.tls import CRL_FILE, Role, TlsBundle, TlsError
from controller.access import Access
from controller.admin import AdminHandlers
from controller.agents import AgentHandlers
from controller.blobstore import BlobStore
from controller.config import MAX_MESSAGE_BYTES, ControllerConfig
from controller.dashboard.http import DashboardServer, serve_dashboard
from controller.db import create_schema, make_engine
from controller.device_classes import DeviceClassError
from controller.fleet_classes import DeviceClassRegistry
from controller.health import GuardedHealthServicer
from controller.jobs.handlers import CompressionHandlers
from controller.jobs.runner import JobRunner
from controller.jobs.watchers import JobWatchers
from controller.keys import KeyStoreError, load_key_chain, load_signing_key, public_key_path
from controller.limits import RpcLimits
from controller.liveness import live_info, process_running
from controller.notify import AssignmentNotifier
from controller.revocation import RevocationList
from controller.rollouts.handlers import RolloutHandlers
from controller.rollouts.loop import RolloutLoop
from controller.rollouts.store import RolloutStore
from controller.servicers import AdminServicer, AgentServicer
from controller.sql_store import SqlStore
from protos import fleet_pb2, fleet_pb2_grpc

log = logging.getLogger(__name__)

AGENT_SERVICE = fleet_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
ADMIN_SERVICE = fleet_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Ping idle clients so dead connections (and their watch streams) are noticed.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Clients may ping as often as every 5 s (agents keep watch streams alive).
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    # A fixed port already in use must fail, not be silently shared with another process.
    ("grpc.so_reuseport", 0),
]


class ControllerStartError(RuntimeError):
    """The controller could not start (port in use, unreadable data directory, ...).

    ``configuration`` marks what only an operator can fix (a broken device-class file, a
    data directory that is a file, a bad certificate): `serve` exits 2 for it, which the
    systemd unit does not restart, and 1 for what may pass (a port still in use).
    """

    def __init__(self, message: str, *, configuration: bool = False) -> None:
        super().__init__(message)
        self.configuration = configuration


# A data directory that is a file, or one this user may not write: restarting won't help.
_OPERATOR_FIXES = (FileExistsError, NotADirectoryError, PermissionError, IsADirectoryError)


@dataclass(frozen=True)
class ControllerInfo:
    """What controller.json tells agents, the CLI and tests about a running controller."""

    address: str
    pid: int
    public_key_path: str
    key_id: str
    metrics_address: str = ""  # HOST:PORT of Prometheus /metrics; empty: not served
    tls_dir: str = ""  # the controller's TLS directory; empty: plaintext

    def to_json_bytes(self) -> bytes:
        optional = ("metrics_address", "tls_dir")
        fields = {k: v for k, v in self.__dict__.items() if v or k not in optional}
        return json.dumps(fields, indent=2, sort_keys=True).encode() + b"\n"


def client_address(host: str, port: int) -> str:
    """The address a local client dials: a wildcard host becomes loopback."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


class ControllerServer:
    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self._server: grpc.aio.Server | None = None
        self._engine: Engine | None = None
        self._health: GuardedHealthServicer | None = None
        self._notifier = AssignmentNotifier()
        self._job_watchers = JobWatchers()
        self._jobs: JobRunner | None = None
        self._metrics: DashboardServer | None = None  # /metrics and the dashboard
        self._agents: AgentHandlers | None = None
        self.budget_loop: RolloutLoop | None = None
        self.port = 0
        self.info: ControllerInfo | None = None
        self._previous_info: dict[str, object] | None = None  # a live controller's, kept

    @property
    def address(self) -> str:
        return client_address(self.config.host, self.port)

    async def start(self) -> ControllerInfo:
        """Open the store, bind, start serving, then write controller.json atomically.

        What the operator configured (TLS directory, device classes) and the port are
        checked first: a start refused for a typo there or a busy port writes nothing into
        the data directory (no empty database, no fresh signing key)."""
        config = self.config
        tls, revoked = _load_tls(config)
        try:
            classes = (
                DeviceClassRegistry.load(config.device_classes_dir)
                if config.device_classes_dir is not None
                else DeviceClassRegistry()
            )
        except DeviceClassError as exc:
            raise ControllerStartError(str(exc), configuration=True) from exc
        listeners = (
            (config.host, config.port, "--port", "--host"),
            (config.http_host, config.metrics_port, "--metrics-port", "--metrics-host"),
        )
        for host, port, port_flag, host_flag in listeners:
            if not port:  # 0: any free port; None: no dashboard
                continue
            busy = _bind_problem(host, port, port_flag, host_flag)
            if busy is not None:
                raise ControllerStartError(f"cannot listen on {bind_address(host, port)}: {busy}")
        try:
            config.data_dir.mkdir(parents=True, exist_ok=True)
            fresh = _database_is_new(config)
            self._engine = make_engine(config.database_url)
            await asyncio.to_thread(create_schema, self._engine)
            blobs = BlobStore(
                config.blob_dir, verified_ttl_seconds=config.verified_blob_trust_seconds
            )
            stored = len(blobs.digests()) if fresh else 0
            if stored:
                log.warning(
                    "the database %s is new or empty, but the blob store %s holds %d blob(s): "
                    "was the database deleted or truncated? Stop and restore it from a "
                    "backup, or every model, artifact and assignment is forgotten",
                    config.database_url,
                    config.blob_dir,
                    stored,
                )
            blobs.remove_stale_temp_files()
            key = load_signing_key(config.key_dir)
            chain = load_key_chain(config.key_dir)
        except OSError as exc:
            raise ControllerStartError(
                f"cannot use data directory {config.data_dir}: {exc}",
                configuration=isinstance(exc, _OPERATOR_FIXES),
            ) from exc
        except KeyStoreError as exc:
            raise ControllerStartError(str(exc), configuration=True) from exc
        except DatabaseError as exc:
            raise ControllerStartError(
                f"the database {config.database_url} cannot be used ({exc.orig}): restore it "
                "from a backup, or move it aside to start with an empty one",
                configuration=True,
            ) from exc
        store = SqlStore(self._engine)
        resigned = await asyncio.to_thread(store.resign_artifacts, key.key_id, key.sign)
        backfilled = await asyncio.to_thread(store.backfill_telemetry_rollup)
        if backfilled:
            log.info("telemetry rollup built from %d stored window(s)", backfilled)
        if resigned:
            log.info(
                "re-signed %d artifact manifest(s) with the current key %s", resigned, key.key_id
            )
        limits = RpcLimits.from_config(config)
        access = Access(mtls=tls is not None, revoked=revoked)

        server = grpc.aio.server(options=SERVER_OPTIONS)
        self._agents = AgentHandlers(store, blobs, config, self._notifier, classes)
        fleet_pb2_grpc.add_AgentServiceServicer_to_server(  # type: ignore[no-untyped-call]
            AgentServicer(
                self._agents,
                limits,
                [link.to_json_bytes() for link in chain],
                access,
            ),
            server,
        )
        admin = AdminHandlers(store, blobs, key, config, self._notifier, classes)
        runner = JobRunner(store, config, admin, self._job_watchers)
        try:
            await asyncio.to_thread(runner.recover)
        except OSError as exc:
            raise ControllerStartError(f"cannot use {config.jobs_dir}: {exc}") from exc
        self._jobs = runner
        runner.start_leases()
        compression = CompressionHandlers(store, blobs, config, runner, self._job_watchers)
        rollout_store = RolloutStore(self._engine)
        self.budget_loop = RolloutLoop(
            store,
            rollout_store,
            blobs,
            admin,
            compression,
            self._notifier,
            classes,
            config.budget_policy,
        )
        fleet_pb2_grpc.add_AdminServiceServicer_to_server(  # type: ignore[no-untyped-call]
            AdminServicer(
                admin,
                compression,
                RolloutHandlers(rollout_store, self.budget_loop),
                limits,
                access,
            ),
            server,
        )
        self._health = GuardedHealthServicer(limits, access)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        if tls is None:  # under mutual TLS reflection would bypass the access check
            reflection.enable_server_reflection(
                (AGENT_SERVICE, ADMIN_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
            )
        where = bind_address(config.host, config.port)
        try:
            self.port = (
                server.add_secure_port(where, tls.server_credentials())
                if tls is not None
                else server.add_insecure_port(where)
            )
        except RuntimeError as exc:
            raise ControllerStartError(
                f"cannot listen on {where}: {_bind_failure(config.host, config.port, exc)}"
            ) from exc
        if self.port == 0:
            raise ControllerStartError(
                f"cannot listen on {where}: the address is in use or invalid"
            )
        if config.metrics_port is not None:
            try:
                self._metrics = serve_dashboard(
                    store, config.http_host, config.metrics_port, classes.classes
                )
            except OSError as exc:
                where = bind_address(config.http_host, config.metrics_port)
                raise ControllerStartError(f"cannot serve /metrics on {where}: {exc}") from exc
        await server.start()
        self._server = server
        for service in ("", AGENT_SERVICE, ADMIN_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.budget_loop.start()
        if classes.classes:
            log.info(
                "budget loop watching device classes %s (from %s)",
                ", ".join(classes.names()),
                classes.source,
            )

        self.info = ControllerInfo(
            address=self.address,
            pid=os.getpid(),
            public_key_path=str(public_key_path(config.key_dir)),
            key_id=key.key_id,
            metrics_address=(
                client_address(config.http_host, self._metrics.port) if self._metrics else ""
            ),
            tls_dir=str(tls.directory) if tls is not None else "",
        )
        self._previous_info = _another_controller(config.info_path)
        if self._previous_info is not None:
            log.warning(
                "another controller (pid %s, %s) uses data directory %s: both share its "
                "database and blobs; controller.json names this one until it stops",
                self._previous_info.get("pid"),
                self._previous_info.get("address"),
                config.data_dir,
            )
        atomic_write_bytes(config.info_path, self.info.to_json_bytes())
        log.info(
            "controller listening on %s (%s; data %s, key %s)",
            self.address,
            "mutual TLS" if tls is not None else "plaintext, no client identities",
            config.data_dir,
            key.key_id,
        )
        if self.info.metrics_address:
            address = self.info.metrics_address
            log.info("Prometheus /metrics and the dashboard on http://%s/", address)
        return self.info

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, end watch streams, let calls finish for ``grace`` seconds."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        self._notifier.close()
        if self.budget_loop is not None:
            await self.budget_loop.stop()
        if self._jobs is not None:
            await self._jobs.close()  # running jobs fail as 'controller stopped'
            self._jobs = None
        if self._server is not None:
            await self._server.stop(self.config.grace_seconds if grace is None else grace)
            self._server = None
        if self._agents is not None:  # the last telemetry commit, before the engine goes
            await self._agents.close()
            self._agents = None
        if self._metrics is not None:  # before the engine goes: a scrape reads the store
            await asyncio.to_thread(self._metrics.stop)
            self._metrics = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        _remove_info(self.config.info_path, os.getpid(), self._previous_info)
        log.info("controller stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _load_tls(config: ControllerConfig) -> tuple[TlsBundle | None, RevocationList | None]:
    """The controller's TLS directory and the CA's revocation list in it (``crl.pem``)."""
    if config.tls_dir is None:
        return None, None
    try:
        bundle = TlsBundle.load(config.tls_dir).require_role(Role.CONTROLLER)
        ca = x509.load_pem_x509_certificate(bundle.ca_pem)
        return bundle, RevocationList(config.tls_dir / CRL_FILE, ca)
    except TlsError as exc:
        raise ControllerStartError(f"cannot serve with TLS: {exc}", configuration=True) from exc


def _bind_failure(host: str, port: int, error: RuntimeError) -> str:
    """Why gRPC could not bind, in the operator's terms: its own message only says
    "Failed to bind" and to set GRPC_VERBOSITY."""
    return _bind_problem(host, port) or str(error)


def _bind_problem(
    host: str, port: int, port_flag: str = "--port", host_flag: str = "--host"
) -> str | None:
    """What stops a listener on (host, port), or None: a plain socket bound to the same
    address tells the errno. Asked before the data directory is touched, so a start
    refused for a busy port writes nothing (the bind itself can still lose a race)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            probe.bind((host.strip("[]"), port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return (
                f"port {port} is already in use (another controller, or another program): "
                f"stop it or choose another {port_flag}"
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"{host} is not an address of this machine: choose another {host_flag}"
        return f"{exc.strerror or exc} (choose another {host_flag} or {port_flag})"
    return None


def _database_is_new(config: ControllerConfig) -> bool:
    """The embedded SQLite file is missing or empty (a PostgreSQL URL: never judged)."""
    if config.db_url:
        return False
    path = config.data_dir / "homefleet.db"
    return not path.exists() or path.stat().st_size == 0


def _another_controller(path: Path) -> dict[str, object] | None:
    info = live_info(path)
    return None if info is None or info.get("pid") == os.getpid() else info


def _remove_info(path: Path, pid: int, previous: dict[str, object] | None) -> None:
    """Remove controller.json if it is still ours: its presence means 'listening'. When
    another controller on the same data directory wrote it before us and still runs,
    its file is put back, so that controller stays findable."""
    try:
        if json.loads(path.read_bytes()).get("pid") != pid:
            return
        if previous is not None and process_running(previous.get("pid")):
            atomic_write_bytes(
                path, json.dumps(previous, indent=2, sort_keys=True).encode() + b"\n"
            )
        else:
            path.unlink()
    except (OSError, ValueError):
        pass


async def run_until_signalled(config: ControllerConfig) -> None:
    server = ControllerServer(config)
    # handlers first: a signal that arrives while the server starts (it is already
    # findable in controller.json) stops it gracefully once started, not by default death
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        await stop.wait()
        log.info("signal received: stopping")
    finally:
        await server.stop()


def serve_forever(config: ControllerConfig) -> None:
    """Run the controller until SIGTERM/SIGINT; return after a graceful stop."""
    asyncio.run(run_until_signalled(config))
