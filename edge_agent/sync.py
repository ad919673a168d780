"""The controller loop: register, watch the desired artifacts, and converge on them.

Per assignment whose digest differs from what is served: check the manifest (signature
when a key is pinned, digest, device class, model, expiry), fetch, load into a spare
slot, self-test, switch, persist, report. Any failure is reported FAILED with its reason
and the old model keeps serving. A failure that may pass by itself (a refused or broken
fetch, a state directory that refused a write) is tried again with a capped exponential
backoff per (model, artifact), checked each time the desired set arrives (every
heartbeat); one that retrying the same manifest would only repeat (errors.SETTLED) waits
for another manifest. Either is tried at once when the controller has repaired its
stored copy of the bytes since (``Assignment.repaired_unix_ms``). A reconnect forgets
every failure. When the controller is away the
loop reconnects with exponential backoff and full jitter, and the local API keeps
serving meanwhile. A session whose stream worked starts the backoff over, unless another
agent with the same device id took the stream over: the two would otherwise take turns
several times a second. A registration the controller refuses for good (the device id
taken with another class or hardware, an invalid request: REFUSAL_FIX) is no network
problem: it is logged as an ERROR naming the fix and ends the loop (the agent exits 2).
Without a pinned key (--allow-unsigned-manifests) every deployment warns that its
manifest was not verified.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import random
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from artifact.digest import InvalidDigestError, check_sha256
from artifact.manifest import InvalidManifestError, Manifest
from artifact.names import InvalidNameError, check_name
from artifact.signing import SignatureError, TrustedKey
from edge_agent import __version__
from edge_agent.backoff import Backoff
from edge_agent.config import MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES, MIN_CHUNK_BYTES, AgentConfig
from edge_agent.errors import SETTLED, AgentError, ErrorCode, describe_os_error
from edge_agent.fetch import (
    CONNECTION_LOST,
    DiscardedDelta,
    FetchPlan,
    FetchResult,
    fetch_artifact,
)
from edge_agent.hardware import HardwareFacts
from edge_agent.runtime import ModelRuntime, ModelSlot
from edge_agent.store import SlotRecord, StateStore
from edge_agent.telemetry_queue import TelemetryQueue
from edge_agent.telemetry_sender import RefusalLog, SendPlan, send_forever
from edge_agent.trust import TrustAnchor
from protos import fleet_pb2, fleet_pb2_grpc

log = logging.getLogger(__name__)

FULL = fleet_pb2.PAYLOAD_ENCODING_FULL
DELTA = fleet_pb2.PAYLOAD_ENCODING_DELTA
MAX_REASON = 2000  # a reason is for people; the controller bounds it too
CERT_RENEW_WARNING = datetime.timedelta(days=30)  # warn at each connection from then on
TAKEOVER_LOG_INTERVAL_S = 600.0  # "another agent took over" is logged at most this often
Outcome = int  # fleet_pb2.DeploymentOutcome
# Register refusals that asking again cannot fix, and what the operator does instead:
# the agent stops (exit 2) rather than retrying forever as if the network were at fault.
REFUSAL_FIX: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.ALREADY_EXISTS: (
        "another machine, or this one with another --device-class, registered under this "
        "--device-id; start this agent with its own --device-id, or with the class and "
        "machine it registered with (`homefleet devices` lists them); to move this machine "
        "to another class, an operator removes the old registration first (`homefleet "
        "devices remove ID`)"
    ),
    grpc.StatusCode.INVALID_ARGUMENT: (
        "the controller does not accept what this agent sends: check --device-id and "
        "--device-class, or install an agent version this controller supports"
    ),
}


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class RegistrationRefused(AgentError):
    """The controller refused Register for a reason asking again cannot fix (REFUSAL_FIX):
    the sync loop ends with it, and the agent exits 2 (a configuration error)."""


class WatchEnded(Exception):
    """The controller closed the assignment stream (it is probably shutting down)."""


class WatchReplaced(WatchEnded):
    """The controller ended the stream (CANCELLED) because a newer one for this device id
    took it over: another agent runs with this id. Reconnecting at once would only take it
    back, so the reconnect backoff is not reset by the stream having worked."""


@dataclass(frozen=True)
class Failure:
    """A deployment that failed in this session, and when the same manifest is tried again."""

    reason: str
    manifest: bytes  # digest of the signed manifest it failed with: another one is news
    failures: int  # in a row, with that manifest
    retry_at: float | None  # event-loop time; None: not until another manifest comes
    repaired_unix_ms: int = 0  # the controller's repair time of the bytes when it failed

    def due(self, now: float) -> bool:
        return self.retry_at is not None and now >= self.retry_at


def manifest_digest(signed: fleet_pb2.SignedManifest) -> bytes:
    return hashlib.sha256(signed.SerializeToString(deterministic=True)).digest()


class _Latest:
    """The newest AssignmentSet: a newer one supersedes one not yet applied."""

    def __init__(self) -> None:
        self._value: fleet_pb2.AssignmentSet | None = None
        self._ready = asyncio.Event()

    def publish(self, value: fleet_pb2.AssignmentSet) -> None:
        self._value = value
        self._ready.set()

    async def take(self) -> fleet_pb2.AssignmentSet:
        while self._value is None:
            self._ready.clear()
            await self._ready.wait()
        value, self._value = self._value, None
        return value


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups: what actually went wrong."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def describe_error(exc: BaseException) -> str:
    """One line for the log: the first leaf of a group, gRPC errors as CODE: details."""
    exc = first_leaf(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, AgentError):  # e.g. its TLS directory no longer holds a usable one
        return exc.message
    return f"{type(exc).__name__}: {exc}"


PLAINTEXT_HINT = (
    " -- the controller closed the connection before answering: if it serves mutual TLS, "
    "start this agent with --tls DIR (this device's certificate, `homefleet certs device`)"
)


def closed_at_handshake(exc: BaseException) -> bool:
    """Whether Register failed as a plaintext call to a TLS server does: the server hangs up.

    gRPC gives no code for it, only UNAVAILABLE with its own (not the controller's)
    wording; a hint that rests on that wording is all this is used for.
    """
    exc = first_leaf(exc)
    if not isinstance(exc, grpc.aio.AioRpcError) or exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    details = (exc.details() or "").lower()
    return "socket closed" in details or "handshake" in details


async def until_first_ends(*coros: Coroutine[Any, Any, None]) -> None:
    """Run ``coros`` as tasks until one ends, cancel the rest, and raise what it raised.

    Not an asyncio.TaskGroup: on Python 3.11 a TaskGroup whose task is cancelled while a
    child fails raises the child's error instead of CancelledError, so a stop (SIGTERM)
    that coincided with a broken stream was lost and the sync loop reconnected forever.
    """
    tasks = [asyncio.create_task(coro) for coro in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    for task in tasks:  # retrieve every outcome, so no error is reported as never retrieved
        if not task.cancelled():
            task.exception()
    first = next((t.exception() for t in tasks if t in done and not t.cancelled()), None)
    if first is not None:
        raise first


class SyncLoop:
    def __init__(
        self,
        config: AgentConfig,
        store: StateStore,
        runtime: ModelRuntime,
        hardware: HardwareFacts,
        trusted: TrustedKey | None = None,
        rng: random.Random | None = None,
        telemetry: TelemetryQueue | None = None,
        on_update: Callable[[str, FetchResult], None] | None = None,
    ) -> None:
        self.config = config
        self.telemetry = telemetry  # sent while a session is up; None: no telemetry
        self._on_update = on_update  # each finished download (the agent's /metrics)
        self._refusals = RefusalLog()  # across sessions: a reconnect does not log anew
        self.store = store
        self.runtime = runtime
        self.hardware = hardware
        # The pinned key, or its successor reached through a key rotation (trust.py).
        self.trust = TrustAnchor(trusted, config.state_dir) if trusted is not None else None
        self._rng = rng or random.Random()
        self._chunk_bytes = config.chunk_bytes
        self._heartbeat_s = 0
        self._revision: int | None = None
        self._pending: dict[str, fleet_pb2.StatusReport] = {}
        self._failed: dict[tuple[str, str], Failure] = {}  # (model, sha): retried after
        self.connected = asyncio.Event()
        self._registered = False  # in the current session
        self._watched = False  # the current session's stream delivered a desired set
        self._takeover_logged_at: float | None = None  # time.monotonic()
        self._refusal_logged = False  # this attempt's Register refusal was logged as an ERROR

    # -- connection -------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected until cancelled; every lost session is retried after a backoff."""
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s, rng=self._rng)
        hinted = False  # the TLS hint is given once per run: it is a guess, not news
        while True:
            hint = ""
            replaced = False
            self._refusal_logged = False
            try:
                await self._session()
                reason = "session ended"
            except (asyncio.CancelledError, RegistrationRefused):
                raise
            except Exception as exc:
                reason = describe_error(exc)
                replaced = isinstance(first_leaf(exc), WatchReplaced)
                if not isinstance(first_leaf(exc), grpc.aio.AioRpcError | WatchEnded | AgentError):
                    log.error("sync session failed unexpectedly", exc_info=exc)
                if (
                    not hinted
                    and not self._registered
                    and self.config.tls_dir is None
                    and closed_at_handshake(exc)
                ):
                    hinted, hint = True, PLAINTEXT_HINT
            finally:
                self.connected.clear()
            if replaced:
                self._log_takeover()
            elif self._watched:
                backoff.reset()  # the link worked: the next outage starts the backoff over
            delay = backoff.next_delay()
            if self._refusal_logged:  # an ERROR above said why and what to fix
                log.warning("registering again: attempt %d in %.2f s", backoff.attempt, delay)
            else:
                log.warning(
                    "controller %s unreachable or stream broken (%s); reconnect attempt %d "
                    "in %.2f s%s",
                    self.config.controller,
                    reason,
                    backoff.attempt,
                    delay,
                    hint,
                )
            await asyncio.sleep(delay)

    def _log_takeover(self) -> None:
        """Once per TAKEOVER_LOG_INTERVAL_S: two agents sharing an id take turns forever."""
        now = time.monotonic()
        last = self._takeover_logged_at
        if last is not None and now - last < TAKEOVER_LOG_INTERVAL_S:
            return
        self._takeover_logged_at = now
        log.warning(
            "another agent with device id %s took over the stream: two agents share this id? "
            "(a cloned device image: give each machine its own --device-id and certificate); "
            "reconnecting with a growing backoff meanwhile",
            self.config.device_id,
        )

    def _channel(self) -> grpc.aio.Channel:
        """Plaintext, or mutual TLS with this device's certificate (read afresh each time)."""
        tls = self.config.device_tls()
        if tls is None:
            return grpc.aio.insecure_channel(self.config.controller, options=channel_options())
        left = tls.not_after - datetime.datetime.now(datetime.UTC)
        if left < CERT_RENEW_WARNING:
            log.warning(
                "this device's certificate (%s) expires in %d day(s), on %s: renew it with "
                "`homefleet certs device`",
                tls.directory,
                left.days,
                f"{tls.not_after:%Y-%m-%d}",
            )
        return grpc.aio.secure_channel(
            self.config.controller, tls.channel_credentials(), options=channel_options()
        )

    async def _session(self) -> None:
        self._registered = False
        self._watched = False
        async with self._channel() as channel:
            stub: Any = fleet_pb2_grpc.AgentServiceStub(channel)  # type: ignore[no-untyped-call]
            register = self.register_request()
            try:
                response: fleet_pb2.RegisterResponse = await stub.Register(
                    register, timeout=self.config.rpc_timeout_s
                )
            except grpc.aio.AioRpcError as exc:
                self._on_register_refused(exc)
                raise
            self._registered = True  # the controller answered: it speaks this transport
            if response.warning:
                log.warning("controller: %s", response.warning)
            self._chunk_bytes = self._pick_chunk_bytes(response.max_chunk_bytes)
            self._heartbeat_s = response.heartbeat_seconds
            log.info(
                "registered with controller %s as %s (class %s, holding %d artifacts)",
                self.config.controller,
                self.config.device_id,
                self.config.device_class,
                len(register.held),
            )
            self._failed.clear()  # a new session may succeed where the last one failed
            if response.new_device:
                self._report_served()
            await self._flush_reports(stub)
            self.connected.set()
            desired = _Latest()
            await until_first_ends(
                self._watch(stub, desired),
                self._apply_forever(stub, desired),
                self._send_telemetry(stub),
            )

    def _on_register_refused(self, exc: grpc.aio.AioRpcError) -> None:
        """Raise INVALID_CONFIG (exit 2) when the controller refused to register this
        device for a reason that asking again cannot change; log it as an ERROR that says
        what to fix. Anything else (the controller away, overloaded) is retried.

        PERMISSION_DENIED is retried (logged as an ERROR each time): under mutual TLS it
        means this device's certificate was revoked, and the agent reads its --tls
        directory afresh at every attempt, so a certificate renewed in place fixes it
        without a restart.
        """
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.PERMISSION_DENIED:
            where = (
                f"into {self.config.tls_dir}; it is read again at the next attempt"
                if self.config.tls_dir is not None
                else "and start this agent with --tls DIR"
            )
            log.error(
                "controller %s refused to register device %r (%s: %s): issue it a new "
                "certificate (`homefleet certs device %s`) %s",
                self.config.controller,
                self.config.device_id,
                code.name,
                details,
                self.config.device_id,
                where,
            )
            self._refusal_logged = True
            return
        fix = REFUSAL_FIX.get(code)
        if fix is None:
            return
        message = (
            f"controller {self.config.controller} refused to register device "
            f"{self.config.device_id!r} (class {self.config.device_class!r}) with "
            f"{code.name}: {details}; retrying cannot change that: {fix}"
        )
        log.error("%s", message)
        raise RegistrationRefused(ErrorCode.INVALID_CONFIG, message) from exc

    def _pick_chunk_bytes(self, controller_max: int) -> int:
        chunk = self.config.chunk_bytes
        if controller_max:
            chunk = min(chunk, controller_max)
        return max(MIN_CHUNK_BYTES, min(MAX_CHUNK_BYTES, chunk))

    def register_request(self) -> fleet_pb2.RegisterRequest:
        held: list[fleet_pb2.HeldArtifact] = []
        for name in self.runtime.model_names():
            for slot, active in (
                (self.runtime.active(name), True),
                (self.runtime.previous(name), False),
            ):
                if slot is not None:
                    held.append(
                        fleet_pb2.HeldArtifact(model_name=name, sha256=slot.sha256, active=active)
                    )
        return fleet_pb2.RegisterRequest(
            device_id=self.config.device_id,
            device_class=self.config.device_class,
            hardware=self.hardware.to_proto(),
            held=held,
            agent_version=__version__,
        )

    async def _watch(self, stub: Any, desired: _Latest) -> None:
        """Feed every AssignmentSet to ``desired``; a silent stream counts as a lost one.

        The controller re-sends the set every heartbeat, so nothing for three heartbeats
        means the link is dead even if TCP has not noticed (a partition, a stuck proxy).
        The controller keeps one stream per device and ends the older one CANCELLED, the
        only way it ends a watch stream with that code: WatchReplaced.
        """
        request = fleet_pb2.WatchAssignmentsRequest(device_id=self.config.device_id)
        idle = 3.0 * self._heartbeat_s + self.config.rpc_timeout_s if self._heartbeat_s else None
        while True:
            call = stub.WatchAssignments(request, timeout=self.config.watch_renew_s)
            try:
                while True:
                    try:
                        async with asyncio.timeout(idle):
                            message = await call.read()
                    except TimeoutError:
                        call.cancel()
                        raise WatchEnded(
                            f"no assignment message for {idle:.0f} s although the controller "
                            f"promised one every {self._heartbeat_s} s"
                        ) from None
                    if not isinstance(message, fleet_pb2.AssignmentSet):  # grpc.aio.EOF
                        raise WatchEnded("controller closed the assignment stream")
                    self._watched = True
                    desired.publish(message)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue  # the watch is renewed on purpose; nothing is wrong
                if exc.code() == grpc.StatusCode.CANCELLED:
                    raise WatchReplaced(f"CANCELLED: {exc.details()}") from exc
                raise

    async def _send_telemetry(self, stub: Any) -> None:
        if self.telemetry is None:
            await asyncio.Event().wait()  # nothing to send: wait for the session to end
            return
        plan = SendPlan(
            device_id=self.config.device_id,
            batch=self.config.telemetry_batch,
            poll_s=self.config.telemetry_poll_s,
            rpc_timeout_s=self.config.rpc_timeout_s,
        )
        await send_forever(stub, self.telemetry, plan, self._refusals)

    async def _apply_forever(self, stub: Any, desired: _Latest) -> None:
        while True:
            await self.apply(stub, await desired.take())

    # -- converging -------------------------------------------------------------------

    async def apply(self, stub: Any, assignment_set: fleet_pb2.AssignmentSet) -> None:
        changed = assignment_set.revision != self._revision
        self._revision = assignment_set.revision
        log.log(
            logging.INFO if changed else logging.DEBUG,
            "desired state revision %d: %s",
            assignment_set.revision,
            ", ".join(
                f"{a.model_name}={a.artifact_sha256[:12]}" for a in assignment_set.assignments
            )
            or "no models",
        )
        wanted = {a.artifact_sha256 for a in assignment_set.assignments}
        for removed in self.store.discard_partials_except(wanted):
            log.info("dropped the partial download of %s: it is no longer assigned", removed)
        assigned = {(a.model_name, a.artifact_sha256) for a in assignment_set.assignments}
        for key in [k for k in self._failed if k not in assigned]:
            del self._failed[key]  # assigned again later, it is tried at once
        for assignment in assignment_set.assignments:
            await self._converge(stub, assignment)

    def _serving(self, model_name: str) -> str:
        slot = self.runtime.active(model_name)
        return slot.sha256 if slot else ""

    async def _converge(self, stub: Any, assignment: fleet_pb2.Assignment) -> None:
        model, sha = assignment.model_name, assignment.artifact_sha256
        if self._serving(model) == sha:
            return
        if not self._due(assignment):
            return
        try:
            report = await self._deploy(stub, assignment)
        except AgentError as exc:
            if exc.code is ErrorCode.NOT_ASSIGNED:  # superseded: nothing failed, nothing cached
                log.info("stopped deploying %s=%s: %s", model, sha, exc.message)
                return
            report = self._failure(assignment, exc.message, exc.code)
        except grpc.aio.AioRpcError:
            raise  # the controller went away: reconnect, then resume
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                # read-only, full or failing storage: may pass (remounted, space freed)
                reason = (
                    f"storage error in the state directory {self.config.state_dir}: "
                    f"{describe_os_error(exc)}"
                )
                report = self._failure(assignment, reason, ErrorCode.STORAGE_FAILED)
            else:
                log.exception("deploying %s=%s failed unexpectedly", model, sha)
                reason = f"internal error in the agent: {type(exc).__name__}: {exc}"
                report = self._failure(assignment, reason, None)
        else:
            self._failed.pop((model, sha), None)
        await self.report(stub, report)

    def _due(self, assignment: fleet_pb2.Assignment) -> bool:
        """Whether to try ``assignment`` now: never failed, its retry is due, or it comes
        with another manifest than the one that failed (e.g. a re-release of its bytes)."""
        model, sha = assignment.model_name, assignment.artifact_sha256
        failed = self._failed.get((model, sha))
        if failed is None:
            return True
        if failed.manifest != manifest_digest(assignment.manifest):
            log.info(
                "model %s: %s is now assigned with another manifest than the one that "
                "failed; trying it",
                model,
                sha,
            )
            return True
        if assignment.repaired_unix_ms > failed.repaired_unix_ms:
            log.info(
                "model %s: the controller has repaired its stored copy of %s since the "
                "deployment failed (%s); trying it now",
                model,
                sha,
                failed.reason,
            )
            return True
        if not failed.due(self._now()):
            log.debug("not retrying %s=%s yet: %s", model, sha, failed.reason)
            return False
        log.info(
            "retrying the deployment of %s=%s (retry %d; it failed: %s); if it fails again, "
            "the next retry is in about %.3g s",
            model,
            sha,
            failed.failures,
            failed.reason,
            self._retry_ceiling(failed.failures + 1),
        )
        return True

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _retry_ceiling(self, failures: int) -> float:
        """Capped exponential: the initial delay after the first failure, doubling after."""
        initial, most = self.config.deploy_retry_initial_s, self.config.deploy_retry_max_s
        return min(most, initial * 2.0 ** min(failures - 1, 32))

    def _failure(
        self, assignment: fleet_pb2.Assignment, reason: str, code: ErrorCode | None
    ) -> fleet_pb2.StatusReport:
        model, sha = assignment.model_name, assignment.artifact_sha256
        digest = manifest_digest(assignment.manifest)
        before = self._failed.get((model, sha))
        failures = before.failures + 1 if before and before.manifest == digest else 1
        if code in SETTLED:
            retry_at = None
            then = "not retried until the controller sends another manifest for it"
        else:
            # a little jitter, so a fleet that failed together does not retry together
            delay = self._retry_ceiling(failures) * self._rng.uniform(0.9, 1.0)
            retry_at = self._now() + delay
            then = (
                f"next retry in {delay:.3g} s, at "
                f"{time.strftime('%H:%M:%S', time.localtime(time.time() + delay))}"
            )
        self._failed[(model, sha)] = Failure(
            reason, digest, failures, retry_at, assignment.repaired_unix_ms
        )
        serving = self._serving(model)
        log.error(
            "deployment of %s=%s FAILED: %s; %s; %s",
            model,
            sha,
            reason,
            f"still serving {serving}" if serving else "nothing served for this model",
            then,
        )
        return self._status(model, sha, fleet_pb2.DEPLOYMENT_OUTCOME_FAILED, reason=reason)

    def _status(
        self,
        model: str,
        sha: str,
        outcome: Outcome,
        *,
        reason: str = "",
        bytes_received: int = 0,
        encoding: int = FULL,
    ) -> fleet_pb2.StatusReport:
        return fleet_pb2.StatusReport(
            device_id=self.config.device_id,
            model_name=model,
            artifact_sha256=sha,
            outcome=outcome,  # type: ignore[arg-type]
            reason=_printable(
                reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."
            ),
            bytes_received=bytes_received,
            encoding=encoding,  # type: ignore[arg-type]
            serving_sha256=self._serving(model),
        )

    def check_manifest(self, assignment: fleet_pb2.Assignment) -> Manifest:
        """Refuse an assignment whose manifest is unsigned, tampered, stale or not for us."""
        model, sha = assignment.model_name, assignment.artifact_sha256
        try:
            check_name(model, field="model_name")
            check_sha256(sha, field="artifact_sha256")
        except (InvalidNameError, InvalidDigestError) as exc:
            raise AgentError(ErrorCode.INVALID_ASSIGNMENT, f"assignment refused: {exc}") from exc
        signed = assignment.manifest
        if not signed.manifest_json:
            raise AgentError(
                ErrorCode.INVALID_ASSIGNMENT, f"assignment of {sha} carries no manifest"
            )
        signer: TrustedKey | None = None
        if self.trust is not None:
            try:
                signer = self.trust.key_for(signed.key_id, signed.key_chain)
                signer.verify(signed.manifest_json, signed.signature)
            except SignatureError as exc:
                raise AgentError(ErrorCode.UNTRUSTED_MANIFEST, f"manifest refused: {exc}") from exc
        try:
            manifest = Manifest.from_json_bytes(signed.manifest_json)
        except InvalidManifestError as exc:
            raise AgentError(ErrorCode.INVALID_ASSIGNMENT, str(exc)) from exc
        if manifest.sha256 != sha:
            raise AgentError(
                ErrorCode.MANIFEST_MISMATCH,
                f"manifest names artifact {manifest.sha256}, the assignment {sha}",
            )
        if manifest.device_class != self.config.device_class:
            raise AgentError(
                ErrorCode.MANIFEST_MISMATCH,
                f"artifact is built for device class {manifest.device_class!r}; "
                f"this device is {self.config.device_class!r}",
            )
        if manifest.model_name != model:
            raise AgentError(
                ErrorCode.MANIFEST_MISMATCH,
                f"manifest is for model {manifest.model_name!r}, the assignment for {model!r}",
            )
        if assignment.size_bytes and assignment.size_bytes != manifest.size_bytes:
            raise AgentError(
                ErrorCode.MANIFEST_MISMATCH,
                f"assignment says {assignment.size_bytes} bytes, "
                f"the manifest {manifest.size_bytes}",
            )
        if manifest.is_expired():
            raise AgentError(
                ErrorCode.UNTRUSTED_MANIFEST,
                f"manifest of {manifest.artifact_id} expired at {manifest.expires_at.isoformat()}",
            )
        floor = self.runtime.version_floor(model, manifest.device_class)
        if manifest.version < floor:
            raise AgentError(
                ErrorCode.UNTRUSTED_MANIFEST,
                f"manifest {manifest.artifact_id} is older than v{floor}, which this device "
                "already ran; refusing a rollback to an old manifest (the controller rolls "
                "back by re-releasing older bytes under a new version)",
            )
        # The same version may name only the bytes it was first accepted with (fetching
        # them again after losing them on disk is fine); other bytes mean a reused version.
        first = self.runtime.floor_artifact(model, manifest.device_class)
        if manifest.version == floor and first and first != sha:
            raise AgentError(
                ErrorCode.UNTRUSTED_MANIFEST,
                f"manifest {manifest.artifact_id} names {sha}, but this device accepted "
                f"{first} under the same version v{floor}; refusing a reused version",
            )
        if self.trust is not None and signer is not None:
            self.trust.adopt(signer)  # a rotated key that signed a good manifest
        return manifest

    async def _deploy(self, stub: Any, assignment: fleet_pb2.Assignment) -> fleet_pb2.StatusReport:
        manifest = self.check_manifest(assignment)
        model, sha = assignment.model_name, assignment.artifact_sha256
        if self.trust is None:
            log.warning(
                "model %s: deploying %s with its manifest NOT verified: no controller key "
                "is pinned (--trust-key); tests and demos only (--allow-unsigned-manifests)",
                model,
                manifest.artifact_id,
            )
        active = fleet_pb2.DEPLOYMENT_OUTCOME_ACTIVE
        previous = self.runtime.previous(model)
        if previous is not None and previous.sha256 == sha:
            serving = self.runtime.active(model)
            self.runtime.switch_back(model, SlotRecord.from_signed(sha, assignment.manifest))
            self.runtime.raise_floor(model, manifest.device_class, manifest.version, sha)
            self._persist_or_put_back(model, serving, previous)
            log.info("model %s: switched back to the previous slot %s", model, sha)
            return self._status(model, sha, active)
        received, encoding, note = 0, int(FULL), ""
        if await asyncio.to_thread(self.store.verify_artifact, sha):
            path = self.store.artifact_path(sha)
            log.info("model %s: artifact %s is already on disk; not downloading", model, sha)
        else:
            result = await self._download(stub, model, sha, manifest)
            path, received, encoding = result.path, result.bytes_received, result.encoding
            if result.discarded_delta is not None:
                note = f"{result.discarded_delta.describe()}; fetched the full artifact"
        record = SlotRecord.from_signed(sha, assignment.manifest).activated_now()
        slot = await asyncio.to_thread(self.runtime.prepare, model, path, record)
        # switch and persist with no await in between: a cancellation cannot split them
        before = self.runtime.active(model), self.runtime.previous(model)
        replaced = self.runtime.activate(slot)
        self.runtime.raise_floor(model, manifest.device_class, manifest.version, sha)
        self._persist_or_put_back(model, *before)
        log.info(
            "model %s: now serving %s (%s)%s",
            model,
            manifest.artifact_id,
            sha,
            f"; previous slot keeps {replaced.sha256}" if replaced else "",
        )
        return self._status(
            model, sha, active, reason=note, bytes_received=received, encoding=encoding
        )

    async def _download(self, stub: Any, model: str, sha: str, manifest: Manifest) -> FetchResult:
        """Fetch the artifact (a delta when a base is held), telling the controller as it
        goes: DOWNLOADING first, and again should a delta be discarded for the full one."""
        resume_at = self.store.partial_size(sha) + self._delta_partial_size(sha)
        downloading = fleet_pb2.DEPLOYMENT_OUTCOME_DOWNLOADING
        await self.report(stub, self._status(model, sha, downloading, bytes_received=resume_at))
        plan = FetchPlan(
            device_id=self.config.device_id,
            sha256=sha,
            size_bytes=manifest.size_bytes,
            chunk_bytes=self._chunk_bytes,
            timeout_s=self.config.fetch_timeout_s,
            attempts=self.config.fetch_attempts,
            base_sha256=self._delta_base(model),
        )
        base = plan.base_sha256[:12]
        if self.store.partial_size(sha):  # fetch.py resumes a full download as one
            how = f"; resuming the full download at byte {resume_at}"
        elif base:
            how = f"; asking for a delta against {base}"
            how += f", resuming at byte {resume_at}" if resume_at else ""
        else:
            how = ""
        log.info(
            "model %s: fetching %s (%d bytes in full%s)",
            model,
            manifest.artifact_id,
            manifest.size_bytes,
            how,
        )

        async def discarded(delta: DiscardedDelta) -> None:
            """Said at once: the full download may take long, or break."""
            reason = f"{delta.describe()}; fetching the full artifact"
            status = self._status(
                model, sha, downloading, reason=reason, bytes_received=delta.bytes_received
            )
            await self.report(stub, status)

        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s, rng=self._rng)
        result = await fetch_artifact(stub, self.store, plan, backoff, discarded)
        log.info(
            "model %s: %s arrived as %s; %d bytes received%s",
            model,
            manifest.artifact_id,
            f"a delta against {base}" if result.encoding == DELTA else "the full artifact",
            result.bytes_received,
            ", a discarded delta's included" if result.discarded_delta else "",
        )
        if self._on_update is not None:
            self._on_update(model, result)
        return result

    def _delta_base(self, model: str) -> str:
        """The artifact to receive a delta against: the one served (else the previous)."""
        for slot in (self.runtime.active(model), self.runtime.previous(model)):
            if slot is not None and self.store.has_artifact(slot.sha256):
                return slot.sha256
        return ""

    def _delta_partial_size(self, sha: str) -> int:
        try:
            return self.store.delta_partial_path(sha).stat().st_size
        except FileNotFoundError:
            return 0

    def _persist_or_put_back(
        self, model: str, active: ModelSlot | None, previous: ModelSlot | None
    ) -> None:
        """Persist a switch; when slots.json cannot be written, undo it and raise: the old
        model keeps serving, as a restart would (the raised floor stays, in memory only)."""
        try:
            self._persist()
        except OSError:
            self.runtime.put_back(model, active, previous)
            raise

    def _persist(self) -> None:
        slots = self.runtime.snapshot()
        self.store.save_slots(slots)
        try:
            removed = self.store.collect_garbage(slots.referenced())
        except OSError as exc:  # the switch is saved; the next one collects again
            log.warning("could not remove unused artifacts: %s", describe_os_error(exc))
            return
        for sha in removed:
            log.info("removed artifact %s: no slot holds it any more", sha)

    # -- reporting --------------------------------------------------------------------

    async def report(self, stub: Any, report: fleet_pb2.StatusReport) -> None:
        """Send a status report; if the controller is away it is resent after reconnecting."""
        self._pending[report.model_name] = report
        await self._send(stub, report)

    def _report_served(self) -> None:
        """Queue an ACTIVE report of every model served, for a controller that has just
        met this device (QA: removed with `--force`, a device came back with its last
        outcome unknown for good). A report still pending for a model is newer news."""
        for model in self.runtime.model_names():
            slot = self.runtime.active(model)
            if slot is not None and model not in self._pending:
                self._pending[model] = self._status(
                    model, slot.sha256, fleet_pb2.DEPLOYMENT_OUTCOME_ACTIVE
                )

    async def _flush_reports(self, stub: Any) -> None:
        for report in list(self._pending.values()):
            await self._send(stub, report)

    async def _send(self, stub: Any, report: fleet_pb2.StatusReport) -> None:
        try:
            await stub.ReportStatus(report, timeout=self.config.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in CONNECTION_LOST:
                raise
            log.error("controller refused a status report (%s); dropping it", describe_error(exc))
        if self._pending.get(report.model_name) is report:
            del self._pending[report.model_name]


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _printable(reason: str) -> str:
    """The controller refuses control characters in a reason (they would restyle an
    operator's terminal); a library's message carrying one is sent with it replaced."""
    return _CONTROL.sub("?", reason)
