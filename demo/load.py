"""Steady inference traffic on every device while the demo watches the budget loop.

Each device gets one thread sending test samples to its local API at a fixed rate, as
an app on the device would. The agents measure and report every inference; the
controller only ever sees their telemetry.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from numpy.typing import NDArray

from demo.inference import PREDICT_TIMEOUT, tensor_from_array
from protos import fleet_pb2, fleet_pb2_grpc


@dataclass
class DeviceLoad:
    """What one device's traffic thread has done so far."""

    device_id: str
    sent: int = 0
    failed: int = 0
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class LoadGenerator:
    """``rate`` Predict calls per second to each device until ``stop``."""

    def __init__(
        self,
        local_apis: dict[str, str],
        model_name: str,
        input_name: str,
        samples: NDArray[np.float32],
        rate: float,
    ) -> None:
        self._apis = local_apis
        self._model = model_name
        self._input = input_name
        self._samples = samples
        self._interval = 1.0 / rate
        self._stop = threading.Event()
        self.loads = {device_id: DeviceLoad(device_id) for device_id in local_apis}
        self._threads = [
            threading.Thread(target=self._run, args=(d,), name=f"load-{d}", daemon=True)
            for d in local_apis
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=PREDICT_TIMEOUT + 1)

    def total_sent(self) -> int:
        return sum(load.sent for load in self.loads.values())

    def _run(self, device_id: str) -> None:
        load = self.loads[device_id]
        with grpc.insecure_channel(self._apis[device_id]) as channel:
            stub = fleet_pb2_grpc.InferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            i = 0
            next_at = time.monotonic()
            while not self._stop.is_set():
                sample = self._samples[i % len(self._samples)][np.newaxis]
                request = fleet_pb2.PredictRequest(
                    model_name=self._model, inputs=[tensor_from_array(self._input, sample)]
                )
                try:
                    stub.Predict(request, timeout=PREDICT_TIMEOUT)
                    with load.lock:
                        load.sent += 1
                except grpc.RpcError as exc:  # e.g. the model being swapped: keep going
                    with load.lock:
                        load.failed += 1
                        load.last_error = f"{exc.code().name}: {exc.details()}"
                i += 1
                next_at += self._interval
                self._stop.wait(max(0.0, next_at - time.monotonic()))
