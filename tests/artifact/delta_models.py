"""ONNX models for the delta codec's tests, built with onnx.helper (tests may import onnx).

`build` turns a list of named arrays into a serialized model whose initializers are
stored either as raw_data or in the typed fields (float_data, int32_data, int64_data),
so both layouts the codec parses are exercised. `quantize_like_ort` reproduces
onnxruntime's QuantizeLinear for the synthetic quantized tensors.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import cast

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper, numpy_helper

from artifact.delta.format import read_header, read_record
from artifact.delta.frames import decompress_exact
from artifact.delta.table import Table, old_tensors, unpack_table
from artifact.delta.varint import Reader

OPSET = 17
DTYPES: tuple[type[np.generic], ...] = (
    np.float32,
    np.float16,
    np.int8,
    np.uint8,
    np.int32,
    np.int64,
)


@dataclass(frozen=True)
class Init:
    name: str
    array: NDArray[np.generic]
    raw: bool = True


def tensor(init: Init) -> onnx.TensorProto:
    if init.raw:
        return numpy_helper.from_array(init.array, init.name)
    dtype = helper.np_dtype_to_tensor_dtype(init.array.dtype)
    values = init.array.flatten()
    if init.array.dtype == np.float16:  # make_tensor wants the floats; it stores their bits
        return helper.make_tensor(init.name, dtype, init.array.shape, values.astype(np.float32))
    return helper.make_tensor(init.name, dtype, init.array.shape, values.tolist())


def build(inits: list[Init], *, doc: str = "") -> bytes:
    """A model holding ``inits``, each consumed by an Identity node (a skeleton to code)."""
    nodes = [
        helper.make_node("Identity", [i.name], [f"{i.name}__out"], name=f"id_{k}")
        for k, i in enumerate(inits)
    ]
    outputs = [
        helper.make_tensor_value_info(
            f"{i.name}__out", helper.np_dtype_to_tensor_dtype(i.array.dtype), i.array.shape
        )
        for i in inits
    ]
    graph = helper.make_graph(nodes, "g", [], outputs, initializer=[tensor(i) for i in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model.doc_string = doc
    return model.SerializeToString()


def random_array(
    rng: np.random.Generator, dtype: type[np.generic], shape: tuple[int, ...]
) -> NDArray[np.generic]:
    if np.issubdtype(dtype, np.floating):
        return (rng.standard_normal(shape) * 0.1).astype(dtype)
    info = np.iinfo(cast(type[np.integer], dtype))
    lo, hi = max(int(info.min), -(1 << 40)), min(int(info.max), 1 << 40)
    return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)


def tweak(rng: np.random.Generator, array: NDArray[np.generic]) -> NDArray[np.generic]:
    """A fine-tune's worth of change: small relative noise, or a few small integer steps."""
    if np.issubdtype(array.dtype, np.floating):
        noise = rng.standard_normal(array.shape) * 1e-3 * np.abs(array.astype(np.float64))
        return (array.astype(np.float64) + noise).astype(array.dtype)
    step = rng.integers(-2, 3, size=array.shape)
    return (array.astype(np.int64) + step).astype(array.dtype)


def quantize_like_ort(
    weights: NDArray[np.floating],
    *,
    dtype: type[np.integer] = np.int8,
    axis: int | None = None,
) -> tuple[NDArray[np.integer], NDArray[np.float32], NDArray[np.integer]]:
    """Min/max quantization as onnxruntime's compute_scale_zp does it: (q, scale, zero_point).

    int8 symmetric over [-127, 127] (zero point 0), uint8 asymmetric over [0, 255].
    """
    w = weights.astype(np.float32)
    reduce = tuple(a for a in range(w.ndim) if a != axis) if axis is not None else None
    rmin = np.minimum(w.min(axis=reduce), np.float32(0))
    rmax = np.maximum(w.max(axis=reduce), np.float32(0))
    if dtype == np.int8:
        qmin, qmax = -127, 127
        rmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin = -rmax
    else:
        qmin, qmax = 0, 255
    spread = (rmax.astype(np.float64) - rmin.astype(np.float64)) / np.float64(qmax - qmin)
    spread = np.where(spread < np.finfo(np.float32).tiny, 1.0, spread)  # as onnxruntime does
    zero = np.round(qmin - rmin.astype(np.float64) / spread) if dtype != np.int8 else 0 * spread
    scale = np.atleast_1d(spread.astype(np.float32))
    zero_point = np.atleast_1d(zero).astype(dtype)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    info = np.iinfo(dtype)
    scaled = np.rint(w / scale.reshape(shape)) + zero_point.reshape(shape).astype(np.float32)
    q = np.clip(scaled, info.min, info.max).astype(dtype)
    if axis is None:
        return q, scale.reshape(()), zero_point.reshape(())
    return q, scale, zero_point


def table_of(old: bytes, payload: bytes) -> Table:
    """The table of a RECORDS delta: which blocks and parameters it lists."""
    stream = io.BytesIO(payload)
    read_header(stream)
    record = read_record(stream, 0, 1 << 30)
    raw = decompress_exact(record.data, Reader(record.meta).uint())
    return unpack_table(raw, old_tensors(old))
