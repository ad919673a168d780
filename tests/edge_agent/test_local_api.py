"""The local InferenceService over real gRPC (TCP port 0 and a unix socket)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import numpy as np
import pytest

from edge_agent.config import AgentConfig, ListenAddress
from edge_agent.convert import tensor_from_proto, tensor_to_proto
from edge_agent.errors import AgentError, ErrorCode, RefusalLog
from edge_agent.local_api import start_local_api
from edge_agent.runtime import SHRINK_ARENA_ABOVE_BYTES, ModelRuntime
from protos import fleet_pb2, fleet_pb2_grpc
from tests.edge_agent.conftest import load
from tests.edge_agent.models import paired_inputs_model

T = TypeVar("T")
MODEL = "demo"


@pytest.fixture(params=["tcp", "unix"])
def listen(request: pytest.FixtureRequest, short_dir: Path) -> str:
    return "127.0.0.1:0" if request.param == "tcp" else f"unix:{short_dir}/agent.sock"


def with_api(
    listen: str, model_dir: Path, model: bytes, body: Callable[[Any], Awaitable[T]]
) -> tuple[T, str]:
    """Serve ``model`` as MODEL on a real local API; return ``body(stub)`` and the sha."""

    async def main() -> tuple[T, str]:
        runtime = ModelRuntime(threads=1)
        slot = load(runtime, model_dir, MODEL, model)
        runtime.activate(slot)
        api = await start_local_api(runtime, ListenAddress(listen), max_concurrent=4)
        try:
            options = [("grpc.max_send_message_length", 32 << 20)]
            async with grpc.aio.insecure_channel(api.address, options=options) as channel:
                stub = fleet_pb2_grpc.InferenceServiceStub(channel)  # type: ignore[no-untyped-call]
                return await body(stub), slot.sha256
        finally:
            await api.stop()

    return asyncio.run(main())


def x_tensor(array: Any, name: str = "x") -> fleet_pb2.Tensor:
    return tensor_to_proto(name, np.asarray(array))


GOOD_X = np.arange(6, dtype=np.float32).reshape(2, 3)
GOOD_IDS = np.array([4, 5], dtype=np.int64)


def test_predict_answers_with_outputs_and_the_artifact_sha(
    listen: str, tmp_path: Path, two_input_bytes: bytes
) -> None:
    async def body(stub: Any) -> fleet_pb2.PredictResponse:
        request = fleet_pb2.PredictRequest(
            model_name=MODEL, inputs=[x_tensor(GOOD_X), x_tensor(GOOD_IDS, "ids")]
        )
        response: fleet_pb2.PredictResponse = await stub.Predict(request, timeout=10)
        return response

    response, sha = with_api(listen, tmp_path, two_input_bytes, body)
    assert response.artifact_sha256 == sha
    outputs = {t.name: t for t in response.outputs}
    assert set(outputs) == {"y", "ids_out"}
    assert outputs["y"].dtype == "float32" and list(outputs["y"].shape) == [2, 3]
    np.testing.assert_array_equal(tensor_from_proto(outputs["y"]), GOOD_X * 2)
    np.testing.assert_array_equal(tensor_from_proto(outputs["ids_out"]), GOOD_IDS)


def test_a_batch_large_enough_to_give_the_memory_arena_back_is_answered_alike(
    tmp_path: Path, two_input_bytes: bytes
) -> None:
    """Over SHRINK_ARENA_ABOVE_BYTES of inputs the run gives onnxruntime's arena back as
    it ends (the agent's memory stays bounded; RSS is measured outside the suite)."""
    big = np.random.default_rng(0).standard_normal((SHRINK_ARENA_ABOVE_BYTES // 12 + 1, 3))
    x = big.astype(np.float32)

    async def body(stub: Any) -> list[fleet_pb2.PredictResponse]:
        request = fleet_pb2.PredictRequest(
            model_name=MODEL, inputs=[x_tensor(x), x_tensor(GOOD_IDS, "ids")]
        )
        return [await stub.Predict(request, timeout=30) for _ in range(2)]

    responses, _ = with_api("127.0.0.1:0", tmp_path, two_input_bytes, body)
    for response in responses:
        (y,) = [t for t in response.outputs if t.name == "y"]
        np.testing.assert_array_equal(tensor_from_proto(y), x * 2)


def test_list_models_shows_the_served_artifact_and_its_specs(
    listen: str, tmp_path: Path, two_input_bytes: bytes
) -> None:
    async def body(stub: Any) -> fleet_pb2.LocalModelsResponse:
        response: fleet_pb2.LocalModelsResponse = await stub.ListModels(
            fleet_pb2.LocalModelsRequest(), timeout=10
        )
        return response

    response, sha = with_api(listen, tmp_path, two_input_bytes, body)
    (model,) = response.models
    assert (
        model.model_name == MODEL and model.artifact_sha256 == sha and model.previous_sha256 == ""
    )
    assert [(s.name, s.dtype, list(s.shape)) for s in model.inputs] == [
        ("x", "float32", [-1, 3]),
        ("ids", "int64", [2]),
    ]
    assert [s.name for s in model.outputs] == ["y", "ids_out"]


BAD_REQUESTS = {
    "wrong dtype": (
        [x_tensor(GOOD_X.astype(np.float64)), x_tensor(GOOD_IDS, "ids")],
        ["'x'", "dtype", "float32", "[-1, 3]", "got float64", "[2, 3]"],
    ),
    "wrong rank": (
        [x_tensor(np.ones(3, np.float32)), x_tensor(GOOD_IDS, "ids")],
        ["'x'", "rank", "float32", "[-1, 3]", "got float32 with shape [3]"],
    ),
    "wrong static dim": (
        [x_tensor(np.ones((2, 4), np.float32)), x_tensor(GOOD_IDS, "ids")],
        ["'x'", "dimension 1", "[-1, 3]", "got float32 with shape [2, 4]"],
    ),
    "wrong static dim of a fixed input": (
        [x_tensor(GOOD_X), x_tensor(np.arange(3, dtype=np.int64), "ids")],
        ["'ids'", "dimension 0", "int64 with shape [2]", "got int64 with shape [3]"],
    ),
    "missing input": (
        [x_tensor(GOOD_X)],
        ["missing", "'ids'", "int64 with shape [2]", "got 'x'"],
    ),
    "unknown input": (
        [x_tensor(GOOD_X), x_tensor(GOOD_IDS, "ids"), x_tensor(GOOD_IDS, "extra")],
        ["'extra'", "not an input", "'x': float32 with shape [-1, 3]", "'ids': int64"],
    ),
    "byte length mismatch": (
        [
            fleet_pb2.Tensor(name="x", dtype="float32", shape=[2, 3], data=b"\0" * 20),
            x_tensor(GOOD_IDS, "ids"),
        ],
        ["'x'", "24 bytes", "got 20"],
    ),
    "unsupported dtype": (
        [
            fleet_pb2.Tensor(name="x", dtype="complex64", shape=[2, 3], data=b"\0" * 48),
            x_tensor(GOOD_IDS, "ids"),
        ],
        ["'x'", "got complex64"],
    ),
    "input sent twice": (
        [x_tensor(GOOD_X), x_tensor(GOOD_X), x_tensor(GOOD_IDS, "ids")],
        ["'x'", "twice"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_inputs_are_invalid_argument_naming_the_input_expected_and_sent(
    case: str, listen: str, tmp_path: Path, two_input_bytes: bytes
) -> None:
    inputs, expected = BAD_REQUESTS[case]

    async def body(stub: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(
                fleet_pb2.PredictRequest(model_name=MODEL, inputs=inputs), timeout=10
            )
        return err.value

    error, _ = with_api(listen, tmp_path, two_input_bytes, body)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    for text in expected:
        assert text in (error.details() or ""), f"{text!r} not in {error.details()!r}"


def test_inputs_the_graph_cannot_combine_are_invalid_argument_not_internal(
    tmp_path: Path,
) -> None:
    """Declared shapes allow a: [2] with b: [3]; onnxruntime then fails the run (FAIL):
    the inputs were wrong, not the agent (QA: INTERNAL and a traceback per call)."""

    async def body(stub: Any) -> grpc.aio.AioRpcError:
        inputs = [x_tensor(np.ones(2, np.float32), "a"), x_tensor(np.ones(3, np.float32), "b")]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(
                fleet_pb2.PredictRequest(model_name=MODEL, inputs=inputs), timeout=10
            )
        return err.value

    error, _ = with_api("127.0.0.1:0", tmp_path, paired_inputs_model(), body)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert f"model '{MODEL}' refused the inputs" in (error.details() or "")


def test_a_refusal_too_long_for_a_status_arrives_shortened(
    tmp_path: Path, two_input_bytes: bytes
) -> None:
    """A shape of 5,000 dimensions, quoted back, would pass gRPC's 8 KiB trailer limit and
    reach the client as RESOURCE_EXHAUSTED without its reason."""
    many = fleet_pb2.Tensor(name="x", dtype="float32", shape=[1] * 5000, data=b"\0" * 4)

    async def body(stub: Any) -> grpc.aio.AioRpcError:
        inputs = [many, x_tensor(GOOD_IDS, "ids")]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(
                fleet_pb2.PredictRequest(model_name=MODEL, inputs=inputs), timeout=10
            )
        return err.value

    error, _ = with_api("127.0.0.1:0", tmp_path, two_input_bytes, body)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    details = error.details() or ""
    assert "'x'" in details and details.endswith("(message shortened)")


def test_unknown_model_is_not_found_and_lists_served_models(
    listen: str, tmp_path: Path, two_input_bytes: bytes
) -> None:
    async def body(stub: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(fleet_pb2.PredictRequest(model_name="nope"), timeout=10)
        return err.value

    error, _ = with_api(listen, tmp_path, two_input_bytes, body)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in (error.details() or "") and MODEL in (error.details() or "")


def test_a_request_over_the_message_limit_is_resource_exhausted(
    tmp_path: Path, two_input_bytes: bytes
) -> None:
    big = np.zeros((800_000, 3), np.float32)  # 9.6 MB > 8 MiB

    async def body(stub: Any) -> grpc.aio.AioRpcError:
        request = fleet_pb2.PredictRequest(
            model_name=MODEL, inputs=[x_tensor(big), x_tensor(GOOD_IDS, "ids")]
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(request, timeout=30)
        return err.value

    error, _ = with_api("127.0.0.1:0", tmp_path, two_input_bytes, body)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_stale_socket_file_is_replaced_but_another_file_is_refused(
    short_dir: Path, tmp_path: Path, two_input_bytes: bytes
) -> None:
    import socket

    stale = short_dir / "agent.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale))
    sock.close()  # the file stays, as after a crash

    async def body(stub: Any) -> int:
        response: fleet_pb2.LocalModelsResponse = await stub.ListModels(
            fleet_pb2.LocalModelsRequest(), timeout=10
        )
        return len(response.models)

    count, _ = with_api(f"unix:{stale}", tmp_path, two_input_bytes, body)
    assert count == 1
    assert not stale.exists()  # removed on stop

    regular = short_dir / "not-a-socket"
    regular.write_text("keep me")
    from edge_agent.errors import AgentError

    with pytest.raises(AgentError, match="not a socket") as err:
        with_api(f"unix:{regular}", tmp_path, two_input_bytes, body)
    assert err.value.code is ErrorCode.INVALID_CONFIG  # exit 2: retrying cannot help
    assert regular.read_text() == "keep me"


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "192.168.1.20:8080", "hub.local:0"])
def test_the_api_beyond_loopback_must_be_asked_for(tmp_path: Path, listen: str) -> None:
    """The local API has no client identities: anyone who reaches it can run the models."""
    fields: dict[str, Any] = {
        "controller": "127.0.0.1:50051",
        "device_id": "hub-1",
        "device_class": "home-hub",
        "state_dir": tmp_path,
        "listen": ListenAddress(listen),
    }
    with pytest.raises(AgentError, match="--insecure-listen"):
        AgentConfig(**fields)
    assert AgentConfig(**fields, insecure_listen=True).insecure_listen
    for local in ("127.0.0.1:0", "[::1]:0", "localhost:0", "unix:/run/agent.sock"):
        AgentConfig(**(fields | {"listen": ListenAddress(local)}))


def test_a_client_retrying_a_bad_request_is_told_every_time_but_logged_once(
    tmp_path: Path, two_input_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Thirty refused Predicts: thirty INVALID_ARGUMENTs with the reason, one log line."""
    bad = fleet_pb2.PredictRequest(model_name=MODEL, inputs=[x_tensor(GOOD_X)])  # no "ids"

    async def body(stub: Any) -> list[grpc.StatusCode]:
        codes = []
        for _ in range(30):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Predict(bad, timeout=10)
            codes.append(err.value.code())
        with pytest.raises(grpc.aio.AioRpcError) as err:  # another status: its own line
            await stub.Predict(fleet_pb2.PredictRequest(model_name="nope"), timeout=10)
        return [*codes, err.value.code()]

    with caplog.at_level(logging.INFO, logger="edge_agent.errors"):
        codes, _ = with_api("127.0.0.1:0", tmp_path, two_input_bytes, body)
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 30 + [grpc.StatusCode.NOT_FOUND]
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "INVALID_ARGUMENT" in lines[0] and "NOT_FOUND" in lines[1]


def test_the_refusals_not_logged_are_counted_on_the_next_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    refusals = RefusalLog(window_s=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="edge_agent.errors"):
        for second in range(5):  # within a minute of the first: counted, not logged
            now[0] = float(second)
            refusals.refused("Predict", grpc.StatusCode.INVALID_ARGUMENT, "no input 'ids'")
        now[0] = 61.0
        refusals.refused("Predict", grpc.StatusCode.INVALID_ARGUMENT, "no input 'ids'")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[1].endswith("; 4 more Predict refusals (INVALID_ARGUMENT) since the last line")
