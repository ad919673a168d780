"""Shared test helpers: tiny ONNX models and a real controller on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.orm import Session

from controller.config import MAX_MESSAGE_BYTES, ControllerConfig
from controller.db import ArtifactRow, ModelRow
from controller.server import ControllerServer
from protos import fleet_pb2 as pb
from protos import fleet_pb2_grpc

T = TypeVar("T")
TEST_TIMEOUT = 60.0
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
TABLES = (
    "models",
    "artifacts",
    "assignments",
    "devices",
    "device_models",
    "events",
    "telemetry_windows",
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """pytest has no asyncio plugin here: each async test body runs in its own loop."""
    return asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT))


def onnx_model(*, width: int = 4, weights: int = 0, seed: int = 0, opset: int = 17) -> bytes:
    """A valid model: y = relu(x + b) with a dynamic batch dimension.

    ``weights`` > 0 adds an unused-by-shape but real initializer of that many floats, to
    make the file large enough to span several chunks; ``seed`` changes the bytes.
    """
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", width])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", width])
    rng = np.random.default_rng(seed)
    bias = onnx.numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "b")
    nodes = [
        onnx.helper.make_node("Add", ["x", "b"], ["s"]),
        onnx.helper.make_node("Relu", ["s"], ["y"]),
    ]
    initializers = [bias]
    if weights:
        big = rng.standard_normal(weights).astype(np.float32)
        initializers.append(onnx.numpy_helper.from_array(big, "w"))
        nodes.append(onnx.helper.make_node("ReduceSum", ["w"], ["w_sum"], keepdims=0))
        y_sum = onnx.helper.make_tensor_value_info("w_sum", onnx.TensorProto.FLOAT, [])
        outputs = [y, y_sum]
    else:
        outputs = [y]
    graph = onnx.helper.make_graph(nodes, "tiny", [x], outputs, initializer=initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def catalogue(
    database: Engine | str, model: str, *artifact_sha256: str, device_class: str = "home-hub"
) -> dict[str, str]:
    """Make ``model`` and artifacts of it with these digests known to the controller;
    return each digest's artifact id.

    Telemetry is accepted only for registered models and their artifacts' bytes; tests
    of ingest that do not care what the model is record it in the database directly
    (placeholder manifests: nothing here is ever fetched)."""
    engine = create_engine(database) if isinstance(database, str) else database
    try:
        with Session(engine) as session, session.begin():
            if session.scalar(select(ModelRow.id).where(ModelRow.name == model)) is None:
                session.add(
                    ModelRow(
                        name=model,
                        version=1,
                        sha256="0" * 64,
                        size_bytes=1,
                        inputs=[],
                        outputs=[],
                        created_unix_ms=0,
                    )
                )
            ids = {
                sha: id_
                for sha, id_ in session.execute(
                    select(ArtifactRow.sha256, ArtifactRow.id).where(
                        ArtifactRow.model_name == model
                    )
                )
            }
            version = len(ids)
            for digest in artifact_sha256:
                if digest in ids:
                    continue
                version += 1
                ids[digest] = f"{model}-{device_class}-t{version}"
                session.add(
                    ArtifactRow(
                        id=ids[digest],
                        model_name=model,
                        model_version=1,
                        device_class=device_class,
                        version=version,
                        sha256=digest,
                        size_bytes=1,
                        manifest_json=b"{}",
                        signature=b"",
                        key_id="",
                        created_unix_ms=0,
                    )
                )
        return {sha: ids[sha] for sha in artifact_sha256}
    finally:
        if isinstance(database, str):
            engine.dispose()


def hardware(**overrides: Any) -> pb.HardwareInfo:
    fields: dict[str, Any] = {
        "arch": "x86_64",
        "cpu_cores": 4,
        "memory_bytes": 4 << 30,
        "onnxruntime_version": "1.32.0",
        "os": "Linux",
    }
    fields.update(overrides)
    return pb.HardwareInfo(**fields)


@dataclass
class Harness:
    """A running controller plus clients for it, and ways to look at its state directly."""

    server: ControllerServer
    config: ControllerConfig
    channel: grpc.aio.Channel
    admin: Any  # fleet_pb2_grpc.AdminServiceStub (untyped generated code)
    agent: Any  # fleet_pb2_grpc.AgentServiceStub

    # ---------------------------------------------------------------- state checks
    def counts(self) -> dict[str, int]:
        engine = create_engine(self.config.database_url)
        try:
            with engine.connect() as conn:
                return {
                    t: int(conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one())
                    for t in TABLES
                }
        finally:
            engine.dispose()

    def blob_files(self) -> list[str]:
        """Every file under blobs/ (stored blobs and temporaries), relative to blobs/."""
        root = self.config.blob_dir
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def snapshot(self) -> tuple[dict[str, int], list[str]]:
        return self.counts(), self.blob_files()

    def new_event_kinds(self, since: tuple[dict[str, int], list[str]]) -> set[str]:
        """Kinds of the events recorded after the ``since`` snapshot."""
        engine = create_engine(self.config.database_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    text("SELECT kind FROM events WHERE id > :n"), {"n": since[0]["events"]}
                )
                return {str(kind) for (kind,) in rows}
        finally:
            engine.dispose()

    # ---------------------------------------------------------------- calls
    async def add_model(
        self,
        name: str,
        data: bytes,
        *,
        description: str = "",
        chunk: int = 64 * 1024,
        size_bytes: int | None = None,
        digest: str | None = None,
    ) -> pb.Model:
        header = pb.AddModelHeader(
            name=name,
            description=description,
            size_bytes=len(data) if size_bytes is None else size_bytes,
            sha256=sha256(data) if digest is None else digest,
        )
        messages = [pb.AddModelChunk(header=header)] + [
            pb.AddModelChunk(data=data[i : i + chunk]) for i in range(0, len(data), chunk)
        ]
        model: pb.Model = await self.admin.AddModel(iter(messages), timeout=30)
        return model

    async def register(
        self, device_id: str, device_class: str = "home-hub", **kwargs: Any
    ) -> pb.RegisterResponse:
        kwargs.setdefault("hardware", hardware())
        response: pb.RegisterResponse = await self.agent.Register(
            pb.RegisterRequest(device_id=device_id, device_class=device_class, **kwargs),
            timeout=10,
        )
        return response

    async def artifact(
        self, model: str, device_class: str = "home-hub", **kwargs: Any
    ) -> pb.Artifact:
        artifact: pb.Artifact = await self.admin.CreateArtifact(
            pb.CreateArtifactRequest(model_name=model, device_class=device_class, **kwargs),
            timeout=10,
        )
        return artifact

    async def events(self, kind_prefix: str = "") -> list[pb.Event]:
        response = await self.admin.ListEvents(
            pb.ListEventsRequest(kind_prefix=kind_prefix, limit=1000), timeout=10
        )
        return list(response.events)

    async def device(self, device_id: str) -> pb.Device:
        response = await self.admin.ListDevices(pb.ListDevicesRequest(), timeout=10)
        for device in response.devices:
            if device.device_id == device_id:
                found: pb.Device = device
                return found
        raise LookupError(device_id)


def assert_nothing_stored(c: Harness, before: tuple[dict[str, int], list[str]]) -> None:
    """Refused telemetry changes no data: only telemetry.refused events may be new."""
    counts, blobs = c.snapshot()
    assert blobs == before[1]
    others = {k: n for k, n in counts.items() if k != "events"}
    assert others == {k: n for k, n in before[0].items() if k != "events"}
    assert c.new_event_kinds(before) <= {"telemetry.refused"}


@contextlib.asynccontextmanager
async def running_controller(tmp_path: Path, **overrides: Any) -> AsyncIterator[Harness]:
    """A real controller on 127.0.0.1:0 with a real SQLite file, and aio clients for it."""
    fields: dict[str, Any] = {"data_dir": tmp_path / "data", "port": 0, "grace_seconds": 1.0}
    fields.update(overrides)
    config = ControllerConfig(**fields)
    server = ControllerServer(config)
    await server.start()
    channel = grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS)
    try:
        yield Harness(
            server=server,
            config=config,
            channel=channel,
            admin=fleet_pb2_grpc.AdminServiceStub(channel),  # type: ignore[no-untyped-call]
            agent=fleet_pb2_grpc.AgentServiceStub(channel),  # type: ignore[no-untyped-call]
        )
    finally:
        await channel.close(None)
        await server.stop(grace=1.0)


async def expect_status(
    call: Awaitable[Any], code: grpc.StatusCode, *fragments: str
) -> grpc.aio.AioRpcError:
    """Await ``call``; it must fail with ``code`` and a message containing ``fragments``."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == code, f"expected {code}, got {exc.code()}: {exc.details()}"
        details = exc.details() or ""
        for fragment in fragments:
            assert fragment in details, f"{fragment!r} not in {details!r}"
        return exc
    raise AssertionError(f"expected {code}, but the call succeeded")


async def collect(stream: Any) -> list[Any]:
    return [message async for message in stream]


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    """Poll ``check`` until it holds (state that settles asynchronously, e.g. OFFLINE)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            raise AssertionError("condition did not hold in time")
        await asyncio.sleep(0.05)
