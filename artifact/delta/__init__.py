"""The model-aware delta codec: encode on the controller, decode on the device.

Public API:
  encode(old, new) -> EncodedDelta (payload and DeltaStats), encode_delta -> bytes,
  write_delta(old, new, out) -> DeltaStats;
  apply_delta(old_path, patch, out_path, expected_sha256) -> ApplyResult,
  apply_delta_bytes(old, patch) -> bytes;
  DeltaError and its subclasses (CorruptPatchError, WrongBaseError, ...).

Imports numpy and zstandard only: no onnx, no torch (the edge agent decodes).
"""

from artifact.delta.decode import ApplyResult, apply_delta, apply_delta_bytes
from artifact.delta.encode import (
    DeltaStats,
    EncodedDelta,
    EncodeOptions,
    encode,
    encode_delta,
    write_delta,
)
from artifact.delta.errors import (
    CorruptPatchError,
    DeltaError,
    TargetMismatchError,
    UnsupportedPatchError,
    WrongBaseError,
)
from artifact.delta.plan import TensorStat

__all__ = [
    "ApplyResult",
    "CorruptPatchError",
    "DeltaError",
    "DeltaStats",
    "EncodeOptions",
    "EncodedDelta",
    "TargetMismatchError",
    "TensorStat",
    "UnsupportedPatchError",
    "WrongBaseError",
    "apply_delta",
    "apply_delta_bytes",
    "encode",
    "encode_delta",
    "write_delta",
]
