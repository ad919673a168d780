"""The local inference API for home applications: InferenceService on localhost or a unix socket.

Predict stays cheap: look the model up, check and decode the tensors against the cached
input specs, run the session in a worker thread (the event loop keeps answering), encode
the outputs. Oversized requests are refused by gRPC's own limit (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from edge_agent.config import MAX_MESSAGE_BYTES, ListenAddress
from edge_agent.convert import check_inputs, spec_to_proto, tensor_to_proto
from edge_agent.errors import AgentError, ErrorCode, guarded
from edge_agent.runtime import ModelRuntime
from edge_agent.telemetry import Telemetry
from protos import fleet_pb2, fleet_pb2_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


class InferenceServicer(fleet_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self, runtime: ModelRuntime, max_concurrent: int, telemetry: Telemetry | None = None
    ) -> None:
        self._runtime = runtime
        self._slots = asyncio.Semaphore(max_concurrent)
        self._telemetry = telemetry

    async def Predict(
        self, request: fleet_pb2.PredictRequest, context: Context
    ) -> fleet_pb2.PredictResponse:
        return await guarded(context, "Predict", self.predict(request))

    async def ListModels(
        self, request: fleet_pb2.LocalModelsRequest, context: Context
    ) -> fleet_pb2.LocalModelsResponse:
        return await guarded(context, "ListModels", self.list_models())

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


@dataclass
class LocalApi:
    server: grpc.aio.Server
    address: str  # "HOST:PORT" with the real port, or "unix:/path"
    listen: ListenAddress

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.server.stop(grace_s)
        if self.listen.is_unix:
            with contextlib.suppress(FileNotFoundError):
                self.listen.unix_path.unlink()


def _clear_stale_socket(listen: ListenAddress) -> None:
    """A socket file left by an agent that died would make the bind fail; files are kept."""
    path = listen.unix_path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AgentError(ErrorCode.INVALID_CONFIG, f"--listen: {path} exists and is not a socket")
    path.unlink()


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
        ]
    )
    fleet_pb2_grpc.add_InferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        InferenceServicer(runtime, max_concurrent, telemetry), server
    )
    if listen.is_unix:
        _clear_stale_socket(listen)
    try:
        port = server.add_insecure_port(listen.text)
    except RuntimeError as exc:
        raise AgentError(
            ErrorCode.INVALID_CONFIG, f"--listen: cannot listen on {listen.text}: {exc}"
        ) from exc
    if listen.is_unix:
        address = listen.text
    else:
        if port == 0:
            raise AgentError(ErrorCode.INVALID_CONFIG, f"--listen: cannot listen on {listen.text}")
        host = listen.text.rpartition(":")[0]
        address = f"{host}:{port}"
    await server.start()
    log.info("local inference API listening on %s", address)
    return LocalApi(server, address, listen)
