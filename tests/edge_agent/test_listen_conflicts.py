"""A local API address another process serves is refused, never shared or taken over.

Real gRPC servers in this process (the second one stands for a second agent) and plain
sockets for "another process": a busy TCP port or a served unix socket fails the second
start with LISTEN_FAILED (exit 1, retried by systemd) while the first keeps answering,
and stopping never removes a socket file that is no longer this server's.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc.aio
import pytest

from edge_agent.config import ListenAddress
from edge_agent.errors import AgentError, ErrorCode
from edge_agent.local_api import LocalApi, start_local_api
from edge_agent.runtime import ModelRuntime
from protos import fleet_pb2, fleet_pb2_grpc
from tests.edge_agent.conftest import load

MODEL = "demo"


async def serving(model_dir: Path, model: bytes, listen: str) -> LocalApi:
    runtime = ModelRuntime(threads=1)
    runtime.activate(load(runtime, model_dir, MODEL, model))
    return await start_local_api(runtime, ListenAddress(listen), max_concurrent=2)


async def models_at(address: str) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = fleet_pb2_grpc.InferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        response: fleet_pb2.LocalModelsResponse = await stub.ListModels(
            fleet_pb2.LocalModelsRequest(), timeout=10
        )
        return [m.model_name for m in response.models]


async def refused(model_dir: Path, model: bytes, listen: str) -> AgentError:
    with pytest.raises(AgentError) as err:
        second = await serving(model_dir, model, listen)
        await second.stop(0)  # only reached when the bug is back: leave nothing behind
    return err.value


def inode(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_dev, st.st_ino


def test_a_second_api_on_a_busy_port_is_refused_and_the_first_keeps_answering(
    tmp_path: Path, add_bytes: bytes
) -> None:
    async def main() -> None:
        first = await serving(tmp_path, add_bytes, "127.0.0.1:0")
        try:
            error = await refused(tmp_path, add_bytes, first.address)
            assert error.code is ErrorCode.LISTEN_FAILED  # exit 1: may pass, so retried
            for text in ("--listen", first.address, "already in use", "port 0"):
                assert text in error.message, error.message
            for _ in range(4):  # with a shared port some of these would reach nobody
                assert await models_at(first.address) == [MODEL]
        finally:
            await first.stop(0)

    asyncio.run(main())


def test_a_served_unix_socket_is_refused_and_left_to_its_server(
    short_dir: Path, tmp_path: Path, add_bytes: bytes
) -> None:
    path = short_dir / "agent.sock"
    listen = f"unix:{path}"

    async def main() -> None:
        first = await serving(tmp_path, add_bytes, listen)
        try:
            before = inode(path)
            error = await refused(tmp_path, add_bytes, listen)
            assert error.code is ErrorCode.LISTEN_FAILED
            assert f"another process serves {listen}" in error.message, error.message
            assert "choose another --listen path" in error.message
            assert inode(path) == before  # not unlinked and bound again
            assert await models_at(listen) == [MODEL]
        finally:
            await first.stop(0)

    asyncio.run(main())
    assert list(short_dir.iterdir()) == []  # its socket file went with it, no temporary one


def test_stopping_leaves_a_socket_another_process_made_at_the_path(
    short_dir: Path, tmp_path: Path, add_bytes: bytes
) -> None:
    path = short_dir / "agent.sock"

    async def main() -> None:
        api = await serving(tmp_path, add_bytes, f"unix:{path}")
        path.unlink()  # someone removed it and started their own server there
        with socket.socket(socket.AF_UNIX) as other:
            other.bind(str(path))
            other.listen()
            theirs = inode(path)
            await api.stop(0)
            assert path.exists() and inode(path) == theirs
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))  # still reaches the other server

    asyncio.run(main())
