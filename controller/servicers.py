"""gRPC servicers: turn messages into records, call a handler, turn the result back.

No logic lives here; every method is wrapped by ``rpc``/``long_lived_rpc``/``unqueued_rpc``,
which maps FleetError to its status and bounds concurrency. Client-streamed uploads take
no short-call slot: each holds a slot of the upload pool (``UploadPool``) instead, and is
read through its lease, which ends an upload that goes quiet or trickles.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from artifact.tls import peer_identity
from controller import convert
from controller.access import OPEN, Access
from controller.admin import AdminHandlers
from controller.agents import AgentHandlers
from controller.config import MAX_CHUNK_BYTES
from controller.errors import FleetError, invalid, long_lived_rpc, rpc, unqueued_rpc
from controller.jobs import wire
from controller.jobs.handlers import CompressionHandlers
from controller.limits import RpcLimits, UploadLease, peer_key
from controller.records import Chunk, CompressionJobRecord, DesiredSet
from controller.rollouts.handlers import (
    RolloutHandlers,
    listing_to_proto,
    pause_to_proto,
    rollout_to_proto,
)
from protos import fleet_pb2 as pb
from protos import fleet_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class AgentServicer(fleet_pb2_grpc.AgentServiceServicer):
    def __init__(
        self,
        handlers: AgentHandlers,
        limits: RpcLimits,
        key_chain: Sequence[bytes] = (),
        access: Access = OPEN,
    ) -> None:
        self._h = handlers
        self._limits = limits
        self._key_chain = tuple(key_chain)  # sent with every manifest (key rotation)
        self._access = access

    @property
    def limits(self) -> RpcLimits:
        return self._limits

    def authorize(self, request: object, context: Context) -> None:
        """Every AgentService request names its device (field 1): its own certificate only."""
        device_class = getattr(request, "device_class", None)  # RegisterRequest only
        self._access.check_agent(
            context,
            str(getattr(request, "device_id", "")),
            None if device_class is None else str(device_class),
        )

    @rpc
    async def Register(self, request: pb.RegisterRequest, context: Context) -> pb.RegisterResponse:
        result = await self._h.register(convert.registration_from_proto(request))
        return convert.register_to_proto(result, self._h.heartbeat_seconds, MAX_CHUNK_BYTES)

    @long_lived_rpc
    async def WatchAssignments(self, request: pb.WatchAssignmentsRequest, context: Context) -> None:
        async def send(desired: DesiredSet) -> None:
            # again before every write (heartbeats included): a certificate revoked while
            # its stream is open loses the stream within one heartbeat
            self.authorize(request, context)
            await context.write(convert.desired_to_proto(desired, self._key_chain))

        await self._h.watch(request.device_id, send)

    @unqueued_rpc  # the handler holds a download slot instead (AgentHandlers.fetch)
    async def FetchArtifact(self, request: pb.FetchArtifactRequest, context: Context) -> None:
        writing: set[asyncio.Future[Any]] = set()  # writes gRPC has not finished

        async def send(chunk: Chunk) -> None:
            self.authorize(request, context)  # a revoked device stops mid-download
            this = asyncio.current_task()  # AgentHandlers.fetch runs each send as a task
            if this is None:  # pragma: no cover - it always does
                raise RuntimeError("FetchArtifact's send must run in an asyncio task")
            writing.add(this)
            try:
                await context.write(convert.chunk_to_proto(chunk))
            except Exception as exc:
                # gRPC fails a write only once the call is over (the client cancelled, left
                # or passed its deadline), and cancels the call's task right after; the write
                # runs in a task of its own (AgentHandlers.fetch bounds its wait), so its
                # failure can arrive first: end as that cancellation, not as a bug.
                raise asyncio.CancelledError("the download's call ended mid-write") from exc
            finally:
                writing.discard(this)

        try:
            await self._h.fetch(convert.fetch_from_proto(request), send)
        except FleetError:
            await _after_unsent(writing)
            raise

    @rpc
    async def ReportStatus(self, request: pb.StatusReport, context: Context) -> pb.StatusAck:
        await self._h.report_status(convert.status_from_proto(request))
        return pb.StatusAck()

    @rpc
    async def ReportTelemetry(
        self, request: pb.TelemetryBatch, context: Context
    ) -> pb.TelemetryAck:
        windows = [convert.window_from_proto(w) for w in request.windows]
        highest = await self._h.report_telemetry(request.device_id, windows)
        return pb.TelemetryAck(highest_seq=highest)


class AdminServicer(fleet_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        handlers: AdminHandlers,
        compression: CompressionHandlers,
        rollouts: RolloutHandlers,
        limits: RpcLimits,
        access: Access = OPEN,
    ) -> None:
        self._h = handlers
        self._jobs = compression
        self._rollouts = rollouts
        self._limits = limits
        self._access = access

    @property
    def limits(self) -> RpcLimits:
        return self._limits

    def authorize(self, request: object, context: Context) -> None:
        self._access.check_admin(context)

    @unqueued_rpc  # holds an upload slot instead: an upload lasts as long as its client sends
    async def AddModel(
        self, request_iterator: AsyncIterator[pb.AddModelChunk], context: Context
    ) -> pb.Model:
        with self._limits.uploads.lease(peer_key(context, self._access), "AddModel") as lease:
            first = await lease.next(request_iterator)
            if first is None or first.WhichOneof("part") != "header":
                raise invalid(
                    "the first AddModel message must carry the header (name, size_bytes, "
                    "optional sha256 and description); the ONNX bytes follow in data messages"
                )
            upload = convert.upload_from_proto(first.header)
            added = await self._h.add_model(upload, _data_parts(request_iterator, lease))
        reply = convert.model_to_proto(added.record)
        reply.unchanged = not added.created
        reply.interface_change = added.interface_change
        reply.repaired = added.repaired
        return reply

    @rpc
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        page = await self._h.list_models(request.page_size, request.page_token)
        return pb.ListModelsResponse(
            models=[convert.model_to_proto(m) for m in page.models],
            next_page_token=page.next_page_token,
        )

    @rpc
    async def CreateArtifact(
        self, request: pb.CreateArtifactRequest, context: Context
    ) -> pb.Artifact:
        record = await self._h.create_artifact(convert.artifact_request_from_proto(request))
        reply = convert.artifact_to_proto(record)
        reply.warning = self._h.size_warning(record)
        return reply

    @rpc
    async def ListArtifacts(
        self, request: pb.ListArtifactsRequest, context: Context
    ) -> pb.ListArtifactsResponse:
        page = await self._h.list_artifacts(
            request.model_name, request.device_class, request.page_size, request.page_token
        )
        return pb.ListArtifactsResponse(
            artifacts=[convert.artifact_to_proto(a) for a in page.artifacts],
            next_page_token=page.next_page_token,
        )

    @rpc
    async def Assign(self, request: pb.AssignRequest, context: Context) -> pb.AssignResponse:
        result = await self._h.assign(
            request.artifact_id, convert.assign_target_from_proto(request)
        )
        return convert.assign_result_to_proto(result)

    @rpc
    async def Unassign(self, request: pb.UnassignRequest, context: Context) -> pb.AssignResponse:
        result = await self._h.unassign(request.model_name, request.device_id)
        return convert.assign_result_to_proto(result)

    @rpc
    async def ListDevices(
        self, request: pb.ListDevicesRequest, context: Context
    ) -> pb.ListDevicesResponse:
        page = await self._h.list_devices(
            request.device_class, request.page_size, request.page_token
        )
        return pb.ListDevicesResponse(
            devices=[convert.device_to_proto(v) for v in page.devices],
            next_page_token=page.next_page_token,
        )

    @rpc
    async def RemoveDevice(
        self, request: pb.RemoveDeviceRequest, context: Context
    ) -> pb.RemoveDeviceResponse:
        removed = await self._h.remove_device(request.device_id, force=request.force)
        return pb.RemoveDeviceResponse(
            device_id=removed.device.device_id,
            device_class=removed.device.device_class,
            own_assignments=removed.own_assignments,
            telemetry_windows=removed.telemetry_windows,
            event_id=removed.event_id,
            rereleased=removed.rereleased,
        )

    @rpc
    async def ListEvents(
        self, request: pb.ListEventsRequest, context: Context
    ) -> pb.ListEventsResponse:
        page = await self._h.list_events(
            request.after_id, request.limit, request.kind_prefix, newest=request.newest
        )
        return pb.ListEventsResponse(
            events=[convert.event_to_proto(e) for e in page.events], more=page.more
        )

    @unqueued_rpc  # holds an upload slot instead, like AddModel
    async def StartCompression(
        self, request_iterator: AsyncIterator[pb.StartCompressionChunk], context: Context
    ) -> pb.CompressionJob:
        peer = peer_key(context, self._access)
        with self._limits.uploads.lease(peer, "StartCompression") as lease:
            first = await lease.next(request_iterator)
            if first is None or first.WhichOneof("part") != "header":
                raise invalid(
                    "the first StartCompression message must carry the header (model or "
                    "workload, device_class_yaml, budgets, calibration_bytes); calibration "
                    "bytes follow"
                )
            job = await self._jobs.start(
                wire.start_from_proto(first.header), _calibration_parts(request_iterator, lease)
            )
        return wire.job_to_proto(job)

    @rpc
    async def GetCompressionJob(
        self, request: pb.CompressionJobRef, context: Context
    ) -> pb.CompressionJob:
        return wire.job_to_proto(await self._jobs.get(request.id))

    @long_lived_rpc
    async def WatchCompressionJob(self, request: pb.CompressionJobRef, context: Context) -> None:
        async def send(job: CompressionJobRecord) -> None:
            self.authorize(request, context)  # a revoked admin stops receiving updates
            await context.write(wire.job_to_proto(job))

        await self._jobs.watch(request.id, send)

    @rpc
    async def ListCompressionJobs(
        self, request: pb.ListCompressionJobsRequest, context: Context
    ) -> pb.ListCompressionJobsResponse:
        jobs = await self._jobs.list(request.model_name, request.device_class, request.limit)
        return pb.ListCompressionJobsResponse(jobs=[wire.job_to_proto(j) for j in jobs])

    @rpc
    async def CancelCompressionJob(
        self, request: pb.CompressionJobRef, context: Context
    ) -> pb.CompressionJob:
        return wire.job_to_proto(await self._jobs.cancel(request.id))

    @rpc
    async def ListRollouts(
        self, request: pb.ListRolloutsRequest, context: Context
    ) -> pb.ListRolloutsResponse:
        listing = await self._rollouts.list(
            request.model_name, request.device_class, request.active_only, request.limit
        )
        return listing_to_proto(listing)

    @rpc
    async def PauseRollouts(
        self, request: pb.PauseRolloutsRequest, context: Context
    ) -> pb.RolloutPause:
        pause = await self._rollouts.pause(
            request.model_name, request.device_class, request.reason, self._operator(context)
        )
        return pause_to_proto(pause)

    @rpc
    async def ResumeRollouts(
        self, request: pb.ResumeRolloutsRequest, context: Context
    ) -> pb.RolloutPause:
        ended = await self._rollouts.resume(
            request.model_name, request.device_class, self._operator(context)
        )
        return pause_to_proto(ended)

    @rpc
    async def AbortRollout(self, request: pb.AbortRolloutRequest, context: Context) -> pb.Rollout:
        rollout = await self._rollouts.abort(
            request.rollout_id, request.reason, self._operator(context)
        )
        return rollout_to_proto(rollout)

    def _operator(self, context: Context) -> str:
        """Who acts, for the events that record an operator's decision: the admin
        certificate's name under mutual TLS (authorize() already checked it), else the
        client's address (a plaintext controller has no identities)."""
        if self._access.mtls:
            identity = peer_identity(context.auth_context())
            if identity is not None:
                return f"{identity.name} (admin certificate)"
        return f"{peer_key(context, self._access)} (no client certificate)"


UNSENT_WAIT_SECONDS = 10.0


async def _after_unsent(writing: set[asyncio.Future[Any]]) -> None:
    """Before a download whose write timed out is given its status: wait for that write.

    gRPC sends a call's status after its messages, so the status waits behind the unsent
    chunk anyway, and if the client then leaves (cancels, its deadline passes, its link
    drops) instead of reading on, sending the status fails inside gRPC
    (ExecuteBatchError), which grpc.aio logged with a traceback whenever that failure
    was handled before it had noted the client's cancellation. Cancelling the write task
    does not help (gRPC still holds the chunk, and the status still queues behind it);
    waiting for the write does: once it fails, the call is over, so the download ends as
    that cancellation and no status is sent; once it is sent, the status follows at once.
    The wait is bounded (UNSENT_WAIT_SECONDS): the download's slot is already free, and a
    client that neither reads nor leaves must not keep handlers waiting without end.
    """
    if not writing:
        return
    done, _ = await asyncio.wait(writing, timeout=UNSENT_WAIT_SECONDS)
    if any(w.cancelled() or w.exception() is not None for w in done):
        raise asyncio.CancelledError("the download's call ended while a chunk waited")


async def _data_parts(
    messages: AsyncIterator[pb.AddModelChunk], lease: UploadLease
) -> AsyncIterator[bytes]:
    while (message := await lease.next(messages)) is not None:
        if message.WhichOneof("part") != "data":
            raise invalid("only the first AddModel message may carry a header; send data after it")
        lease.count(len(message.data))
        yield message.data


async def _calibration_parts(
    messages: AsyncIterator[pb.StartCompressionChunk], lease: UploadLease
) -> AsyncIterator[bytes]:
    while (message := await lease.next(messages)) is not None:
        if message.WhichOneof("part") != "data":
            raise invalid(
                "only the first StartCompression message may carry a header; send data after it"
            )
        lease.count(len(message.data))
        yield message.data
