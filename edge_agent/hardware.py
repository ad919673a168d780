"""What the device is made of, told to the controller at registration.

The controller uses it to check the device against its class (an arm64 speaker with
512 MiB should not be sent a 90 MB model) and operators see it in `homefleet devices`.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import onnxruntime
import psutil

from protos import fleet_pb2


@dataclass(frozen=True)
class HardwareFacts:
    arch: str
    cpu_cores: int
    memory_bytes: int
    onnxruntime_version: str
    os: str

    def to_proto(self) -> fleet_pb2.HardwareInfo:
        return fleet_pb2.HardwareInfo(
            arch=self.arch,
            cpu_cores=self.cpu_cores,
            memory_bytes=self.memory_bytes,
            onnxruntime_version=self.onnxruntime_version,
            os=self.os,
        )


def collect() -> HardwareFacts:
    return HardwareFacts(
        arch=platform.machine() or "unknown",
        cpu_cores=os.cpu_count() or 1,
        memory_bytes=int(psutil.virtual_memory().total),
        onnxruntime_version=str(onnxruntime.__version__),
        os=f"{platform.system()} {platform.release()}".strip(),
    )
