"""A minimal AgentService that speaks the wire contract, for the agent's own tests.

It is a test double of the *controller* (another package), never of agent code: the
agent under test runs for real against it over loopback gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import grpc
import grpc.aio

from artifact.digest import sha256_bytes
from artifact.manifest import Manifest, RecipeStep, TensorSpec
from artifact.signing import SigningKey
from protos import fleet_pb2, fleet_pb2_grpc


def make_manifest(
    model_name: str, data: bytes, *, device_class: str = "home-hub", version: int = 1, **over: Any
) -> Manifest:
    created = datetime.now(UTC).replace(microsecond=0)
    fields: dict[str, Any] = {
        "model_name": model_name,
        "model_version": 1,
        "device_class": device_class,
        "version": version,
        "sha256": sha256_bytes(data),
        "size_bytes": len(data),
        "inputs": (TensorSpec(name="x", dtype="float32", shape=(-1, 4)),),
        "outputs": (TensorSpec(name="y", dtype="float32", shape=(-1, 4)),),
        "recipe": (RecipeStep(kind="identity"),),
        "created_at": created,
        "expires_at": created + timedelta(days=30),
    }
    fields.update(over)
    return Manifest.model_validate(fields)


class FakeController(fleet_pb2_grpc.AgentServiceServicer):
    def __init__(
        self, *, chunk: int = 100, heartbeat_seconds: int = 30, silent: bool = False
    ) -> None:
        self.chunk = chunk
        self.heartbeat_seconds = heartbeat_seconds
        self.silent = silent  # a stuck link: the watch stream never sends anything
        self.blobs: dict[str, bytes] = {}
        self.assignments: dict[str, fleet_pb2.Assignment] = {}
        self.revision = 0
        self.registers: list[fleet_pb2.RegisterRequest] = []
        self.fetches: list[fleet_pb2.FetchArtifactRequest] = []
        self.reports: list[fleet_pb2.StatusReport] = []
        self.break_fetch_after: int | None = None  # cut the next fetch after this many bytes
        self._changed = asyncio.Condition()

    def _changed_since(self, revision: int) -> bool:
        return self.revision != revision

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def assign(
        self,
        model_name: str,
        data: bytes,
        *,
        key: SigningKey | None = None,
        manifest: Manifest | None = None,
        serve: bytes | None = None,
    ) -> str:
        """Make ``data`` the desired artifact of ``model_name``; ``serve``: other bytes to send."""
        manifest = manifest or make_manifest(model_name, data)
        raw = manifest.to_json_bytes()
        signed = fleet_pb2.SignedManifest(
            manifest_json=raw,
            signature=key.sign(raw) if key else b"",
            key_id=key.key_id if key else "",
        )
        sha = manifest.sha256
        self.blobs[sha] = data if serve is None else serve
        self.assignments[model_name] = fleet_pb2.Assignment(
            model_name=model_name, artifact_sha256=sha, size_bytes=len(data), manifest=signed
        )
        self.revision += 1
        await self._notify()
        return sha

    async def wait_for(self, check: Callable[[], bool]) -> None:
        """Wait until ``check()`` holds (a safety limit stops a hung test; nothing is timed)."""
        async with asyncio.timeout(60), self._changed:
            await self._changed.wait_for(check)

    def outcomes(self, sha: str) -> list[int]:
        return [r.outcome for r in self.reports if r.artifact_sha256 == sha]

    def final_report(self, sha: str) -> fleet_pb2.StatusReport | None:
        done = (fleet_pb2.DEPLOYMENT_OUTCOME_ACTIVE, fleet_pb2.DEPLOYMENT_OUTCOME_FAILED)
        found = [r for r in self.reports if r.artifact_sha256 == sha and r.outcome in done]
        return found[-1] if found else None

    # -- AgentService -----------------------------------------------------------------

    async def Register(
        self, request: fleet_pb2.RegisterRequest, context: Any
    ) -> fleet_pb2.RegisterResponse:
        self.registers.append(request)
        await self._notify()
        return fleet_pb2.RegisterResponse(
            device_id=request.device_id,
            max_chunk_bytes=1 << 20,
            heartbeat_seconds=self.heartbeat_seconds,
        )

    async def WatchAssignments(
        self, request: fleet_pb2.WatchAssignmentsRequest, context: Any
    ) -> AsyncIterator[fleet_pb2.AssignmentSet]:
        seen = -1
        if self.silent:
            await asyncio.Event().wait()
        while True:
            async with self._changed:
                await self._changed.wait_for(partial(self._changed_since, seen))
                seen = self.revision
                current = fleet_pb2.AssignmentSet(
                    assignments=list(self.assignments.values()), revision=seen
                )
            yield current

    async def FetchArtifact(
        self, request: fleet_pb2.FetchArtifactRequest, context: Any
    ) -> AsyncIterator[fleet_pb2.ArtifactChunk]:
        self.fetches.append(request)
        await self._notify()
        data = self.blobs.get(request.target_sha256)
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such artifact")
            return
        sent = 0
        for offset in range(request.offset, len(data), self.chunk):
            if self.break_fetch_after is not None and sent >= self.break_fetch_after:
                self.break_fetch_after = None
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection cut by the test")
            piece = data[offset : offset + self.chunk]
            yield fleet_pb2.ArtifactChunk(
                encoding=fleet_pb2.PAYLOAD_ENCODING_FULL,
                total_bytes=len(data),
                payload_sha256=request.target_sha256,
                offset=offset,
                data=piece,
            )
            sent += len(piece)

    async def ReportStatus(
        self, request: fleet_pb2.StatusReport, context: Any
    ) -> fleet_pb2.StatusAck:
        self.reports.append(request)
        await self._notify()
        return fleet_pb2.StatusAck()


async def start_fake(
    controller: FakeController, address: str = "127.0.0.1:0"
) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    fleet_pb2_grpc.add_AgentServiceServicer_to_server(controller, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(address)
    await server.start()
    return server, f"127.0.0.1:{port}"
