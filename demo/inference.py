"""A home application's view: send sensor windows to the local agent, one call each.

Only the wire contract (InferenceService) and numpy are used, exactly what an app on
the device would have. Each call's wall latency is measured around the gRPC call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from numpy.typing import NDArray

from protos import fleet_pb2, fleet_pb2_grpc

PREDICT_TIMEOUT = 10.0
WARMUP_CALLS = 1
_MAX_MESSAGE = 8 * 1024 * 1024


class InferenceError(RuntimeError):
    """The agent refused a call, or answered with something that is not the expected logits."""


@dataclass(frozen=True)
class InferenceRun:
    """Every answer of one device on one test set."""

    samples: int
    correct: int
    latencies_ms: tuple[float, ...]
    answered_by: frozenset[str]  # artifact sha256s the agent said answered

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else 0.0

    def latency_percentile(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.latencies_ms), q))


def tensor_from_array(name: str, array: NDArray[np.float32]) -> fleet_pb2.Tensor:
    """A wire Tensor: numpy dtype name, shape and C-order little-endian bytes."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return fleet_pb2.Tensor(
        name=name, dtype="float32", shape=list(data.shape), data=data.tobytes(order="C")
    )


def array_from_tensor(tensor: fleet_pb2.Tensor) -> NDArray[np.float32]:
    if tensor.dtype != "float32":
        raise InferenceError(f"output {tensor.name!r} has dtype {tensor.dtype!r}; float32 expected")
    shape = tuple(int(d) for d in tensor.shape)
    expected_bytes = 4 * int(np.prod(shape, dtype=np.int64))
    if len(tensor.data) != expected_bytes:
        raise InferenceError(
            f"output {tensor.name!r} has {len(tensor.data)} bytes; shape {shape} needs "
            f"{expected_bytes}"
        )
    return np.frombuffer(tensor.data, dtype="<f4").reshape(shape).astype(np.float32)


def _logits(response: fleet_pb2.PredictResponse, output_name: str) -> NDArray[np.float32]:
    outputs = {t.name: t for t in response.outputs}
    tensor = outputs.get(output_name)
    if tensor is None and len(response.outputs) == 1:
        tensor = response.outputs[0]
    if tensor is None:
        raise InferenceError(
            f"the agent's answer has outputs {sorted(outputs)}; expected {output_name!r}"
        )
    return array_from_tensor(tensor)


def run_test_set(
    local_api: str,
    model_name: str,
    x: NDArray[np.float32],
    y: NDArray[np.int64],
    *,
    input_name: str = "x",
    output_name: str = "logits",
    on_sample: Callable[[int], None] | None = None,
) -> InferenceRun:
    """Send each sample of ``x`` as its own Predict call; count correct argmax predictions.

    The first WARMUP_CALLS calls (with sample 0) are not measured: they pay for the
    connection and the session's first run, which no steady-state app sees.
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as samples, at least one: {len(x)} vs {len(y)}")
    channel = grpc.insecure_channel(
        local_api,
        options=[
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ],
    )
    try:
        stub = fleet_pb2_grpc.InferenceServiceStub(channel)  # type: ignore[no-untyped-call]

        def predict(sample: NDArray[np.float32]) -> fleet_pb2.PredictResponse:
            request = fleet_pb2.PredictRequest(
                model_name=model_name, inputs=[tensor_from_array(input_name, sample[None])]
            )
            try:
                response: fleet_pb2.PredictResponse = stub.Predict(request, timeout=PREDICT_TIMEOUT)
            except grpc.RpcError as exc:
                raise InferenceError(
                    f"Predict on {local_api} failed: {exc.code().name}: {exc.details()}"
                ) from exc
            return response

        for _ in range(WARMUP_CALLS):
            predict(x[0])
        latencies: list[float] = []
        answered_by: set[str] = set()
        correct = 0
        for i, sample in enumerate(x):
            started = time.perf_counter()
            response = predict(sample)
            latencies.append((time.perf_counter() - started) * 1000.0)
            logits = _logits(response, output_name)
            if logits.ndim != 2 or logits.shape[0] != 1:
                raise InferenceError(f"logits have shape {logits.shape}; expected [1, classes]")
            correct += int(int(logits[0].argmax()) == int(y[i]))
            answered_by.add(response.artifact_sha256)
            if on_sample is not None:
                on_sample(i + 1)
    finally:
        channel.close()
    return InferenceRun(len(x), correct, tuple(latencies), frozenset(answered_by))
