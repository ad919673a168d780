"""Between the wire and onnxruntime: proto Tensors <-> numpy arrays, ORT types <-> dtypes.

It also checks what a home application sends against the model's inputs, so a wrong
tensor is refused with a message naming the input, what it expects and what came,
instead of an onnxruntime error from deep inside a kernel.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from artifact.manifest import TensorSpec
from edge_agent.errors import AgentError, ErrorCode
from protos import fleet_pb2

# onnxruntime's type strings for the tensors the local API can carry, and their numpy names.
ORT_TO_DTYPE: Mapping[str, str] = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}
DTYPE_TO_ORT: Mapping[str, str] = {v: k for k, v in ORT_TO_DTYPE.items()}
SUPPORTED_DTYPES: frozenset[str] = frozenset(ORT_TO_DTYPE.values())
_SUPPORTED_TEXT = ", ".join(sorted(SUPPORTED_DTYPES))

Array = npt.NDArray[Any]


def dtype_of_ort(ort_type: str) -> str:
    """numpy dtype name for an ORT type string; unsupported types keep their ORT name."""
    return ORT_TO_DTYPE.get(ort_type, ort_type)


def ort_type_of(dtype: str) -> str:
    try:
        return DTYPE_TO_ORT[dtype]
    except KeyError:
        raise AgentError(
            ErrorCode.UNSUPPORTED, f"dtype {dtype!r} is not supported; use one of {_SUPPORTED_TEXT}"
        ) from None


def spec_from_ort(name: str, ort_type: str, shape: Sequence[object] | None) -> TensorSpec:
    """A TensorSpec from onnxruntime's NodeArg fields; symbolic or unknown dims become -1."""
    dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (shape or ()))
    return TensorSpec(name=name, dtype=dtype_of_ort(ort_type), shape=dims)


def spec_to_proto(spec: TensorSpec) -> fleet_pb2.TensorSpec:
    return fleet_pb2.TensorSpec(name=spec.name, dtype=spec.dtype, shape=list(spec.shape))


def shape_text(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def describe(spec: TensorSpec) -> str:
    dynamic = " (-1: any size)" if -1 in spec.shape else ""
    return f"{spec.dtype} with shape {shape_text(spec.shape)}{dynamic}"


def _invalid(message: str) -> AgentError:
    return AgentError(ErrorCode.INVALID_INPUT, message)


def _wire_dtype(dtype: str) -> np.dtype[Any]:
    """The little-endian numpy dtype the wire format uses for ``dtype``."""
    return np.dtype(dtype).newbyteorder("<")


def tensor_from_proto(tensor: fleet_pb2.Tensor) -> Array:
    """Decode one wire tensor; refuse unknown dtypes, negative dims and a wrong byte count."""
    label = f"input {tensor.name!r}"
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise _invalid(
            f"{label}: dtype {tensor.dtype!r} is not supported; use one of {_SUPPORTED_TEXT}"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise _invalid(
            f"{label}: shape {shape_text(shape)} has a negative dimension; send sizes >= 0"
        )
    wire = _wire_dtype(tensor.dtype)
    needed = math.prod(shape) * wire.itemsize
    if len(tensor.data) != needed:
        raise _invalid(
            f"{label}: shape {shape_text(shape)} of {tensor.dtype} needs {needed} bytes of data "
            f"(C order, little-endian), got {len(tensor.data)}"
        )
    array = np.frombuffer(tensor.data, dtype=wire).reshape(shape)
    if sys.byteorder != "little":
        array = array.astype(np.dtype(tensor.dtype))
    return array


def tensor_to_proto(name: str, array: Array) -> fleet_pb2.Tensor:
    """Encode an array as a wire tensor (C order, little-endian)."""
    dtype = array.dtype.name
    if dtype not in SUPPORTED_DTYPES:
        raise AgentError(
            ErrorCode.UNSUPPORTED,
            f"output {name!r} has dtype {dtype!r}, which the local API cannot carry "
            f"(supported: {_SUPPORTED_TEXT})",
        )
    data = np.ascontiguousarray(array, dtype=_wire_dtype(dtype)).tobytes()
    return fleet_pb2.Tensor(name=name, dtype=dtype, shape=list(array.shape), data=data)


def _check_against(spec: TensorSpec, tensor: fleet_pb2.Tensor) -> None:
    sent_shape = tuple(int(d) for d in tensor.shape)
    if spec.dtype not in SUPPORTED_DTYPES:
        raise _invalid(
            f"input {spec.name!r} has type {spec.dtype}, which the local API cannot carry "
            f"(supported: {_SUPPORTED_TEXT})"
        )
    rank_ok = len(sent_shape) == len(spec.shape)
    dims_ok = rank_ok and all(e in (-1, s) for e, s in zip(spec.shape, sent_shape, strict=True))
    if tensor.dtype != spec.dtype or not dims_ok:
        what = []
        if tensor.dtype != spec.dtype:
            what.append("dtype")
        if not rank_ok:
            what.append(f"rank ({len(sent_shape)} dims instead of {len(spec.shape)})")
        elif not dims_ok:
            bad = [
                str(i)
                for i, (e, s) in enumerate(zip(spec.shape, sent_shape, strict=True))
                if e not in (-1, s)
            ]
            what.append(f"dimension {', '.join(bad)}")
        raise _invalid(
            f"input {spec.name!r}: wrong {' and '.join(what)}: expected {describe(spec)}, "
            f"got {tensor.dtype or '(no dtype)'} with shape {shape_text(sent_shape)}"
        )


def check_inputs(
    model_name: str, specs: Sequence[TensorSpec], tensors: Sequence[fleet_pb2.Tensor]
) -> dict[str, Array]:
    """Match request tensors to the model's inputs and decode them, or say what is wrong."""
    by_name = {spec.name: spec for spec in specs}
    accepted = "; ".join(f"{s.name!r}: {describe(s)}" for s in specs)
    seen: dict[str, fleet_pb2.Tensor] = {}
    for tensor in tensors:
        if tensor.name not in by_name:
            raise _invalid(
                f"input {tensor.name!r} is not an input of model {model_name!r}; "
                f"it takes {accepted}"
            )
        if tensor.name in seen:
            raise _invalid(f"input {tensor.name!r} is sent twice; send each input once")
        seen[tensor.name] = tensor
    missing = [spec for spec in specs if spec.name not in seen]
    if missing:
        wanted = "; ".join(f"{s.name!r}: {describe(s)}" for s in missing)
        sent = ", ".join(repr(n) for n in seen) or "none"
        raise _invalid(
            f"model {model_name!r} is missing input(s) {wanted} (got {sent}); it takes {accepted}"
        )
    feeds: dict[str, Array] = {}
    for spec in specs:
        tensor = seen[spec.name]
        _check_against(spec, tensor)
        feeds[spec.name] = tensor_from_proto(tensor)
    return feeds
