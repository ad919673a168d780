"""The decisions that turn an FP32 model into its canonical QDQ form, and their bytes.

Plain Python (no onnx, no numpy): the edge agent unpacks these. The decisions are
positional: they index the FP32 model's values (graph inputs that are not
initializers, then node outputs in node order) and initializers, so they only mean
something next to the FP32 model they were made from (a delta's base, sha256-checked
first). A damaged or forged byte string raises ValueError, never anything else.

Wire layout (every integer a LEB128 varint):
  flags            bit 0: onnxruntime's producer and its "onnx.infer" metadata key;
                   bit 1: overrides follow; bit 2: the "onnx.quant.pre_process" key;
                   other bits must be zero
  activation_type  TensorProto data type of the activations' zero points (3 int8, 2 uint8)
  choice A, B      the two commonest quantized-initializer choices: kind, axis + 1
                   (0 = per tensor), data type
  qdq bitmap       one bit per FP32 value: it gets a QuantizeLinear/DequantizeLinear pair
  init codes       two bits per FP32 initializer: 0 float, 1 choice A, 2 choice B,
                   3 listed after: (kind, axis + 1, data type) each, in order
  dropped          [overrides] count, then FP32 node indices (delta-coded)
  raw reads        [overrides] count, then (node index, input slot) pairs that read a
                   Q/DQ'd value's float tensor instead of its DequantizeLinear output
  shared           [overrides] count, then (value index, source value index) pairs: a
                   value whose Q/DQ pair uses another value's scale and zero point
                   (onnxruntime does that after Reshape, Flatten, MaxPool, Transpose, …)
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_ORT_METADATA, _OVERRIDES, _PRE_PROCESSED = 1, 2, 4
_MAX_VARINT_BYTES = 10


class InitKind(enum.IntEnum):
    FLOAT = 0  # kept as it is
    WEIGHT = 1  # W_quantized, W_scale, W_zero_point and a DequantizeLinear node
    BIAS = 2  # W_quantized (int32), W_quantized_scale, W_quantized_zero_point


@dataclass(frozen=True)
class InitChoice:
    kind: InitKind
    axis: int | None = 0  # None: per tensor (no axis attribute, scalar scale)
    dtype: int = 0  # TensorProto data type of W_quantized (0 for float)


FLOAT_INIT = InitChoice(InitKind.FLOAT, None, 0)


@dataclass(frozen=True)
class Decisions:
    """What onnxruntime decided, relative to the FP32 model's own order."""

    ort_metadata: bool  # onnxruntime's producer name/version and "onnx.infer" key
    activation_type: int
    qdq: tuple[bool, ...]  # per FP32 value (graph inputs, then node outputs)
    inits: tuple[InitChoice, ...]  # per FP32 initializer
    dropped: tuple[int, ...] = ()  # FP32 nodes removed (their input renamed to their output)
    raw_reads: tuple[tuple[int, int], ...] = ()  # (node, slot) reading the float tensor
    shared: tuple[tuple[int, int], ...] = ()  # (value, value whose scale and zero point it uses)
    pre_processed: bool = False  # onnxruntime's "onnx.quant.pre_process" metadata key


def _uint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError(f"varint of a negative number {value}")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def uint(self) -> int:
        result = 0
        for shift in range(0, 7 * _MAX_VARINT_BYTES, 7):
            if self.pos >= len(self.data):
                raise ValueError("the decisions are truncated")
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
        raise ValueError("the decisions hold an overlong varint")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("the decisions are truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def _bits(values: Sequence[int], width: int) -> bytes:
    out = bytearray((len(values) * width + 7) // 8)
    for i, v in enumerate(values):
        for b in range(width):
            if v >> b & 1:
                bit = i * width + b
                out[bit // 8] |= 1 << (bit % 8)
    return bytes(out)


def _unbits(data: bytes, count: int, width: int) -> list[int]:
    values = []
    for i in range(count):
        v = 0
        for b in range(width):
            bit = i * width + b
            v |= (data[bit // 8] >> (bit % 8) & 1) << b
        values.append(v)
    return values


def _choice(out: bytearray, c: InitChoice) -> None:
    _uint(out, int(c.kind))
    _uint(out, 0 if c.axis is None else c.axis + 1)
    _uint(out, c.dtype)


def _read_choice(r: _Reader) -> InitChoice:
    kind, axis, dtype = r.uint(), r.uint(), r.uint()
    try:
        init_kind = InitKind(kind)
    except ValueError as exc:
        raise ValueError(f"the decisions name an unknown initializer kind {kind}") from exc
    return InitChoice(init_kind, None if axis == 0 else axis - 1, dtype)


def pack(d: Decisions) -> bytes:
    """The decisions' bytes; the counts of values and initializers come from the FP32 model."""
    out = bytearray()
    overrides = bool(d.dropped or d.raw_reads or d.shared)
    flags = _ORT_METADATA if d.ort_metadata else 0
    flags |= (_OVERRIDES if overrides else 0) | (_PRE_PROCESSED if d.pre_processed else 0)
    _uint(out, flags)
    _uint(out, d.activation_type)
    common = [c for c, _ in Counter(c for c in d.inits if c != FLOAT_INIT).most_common(2)]
    common += [FLOAT_INIT] * (2 - len(common))
    for c in common:
        _choice(out, c)
    out += _bits([int(q) for q in d.qdq], 1)
    codes = [0 if c == FLOAT_INIT else common.index(c) + 1 if c in common else 3 for c in d.inits]
    out += _bits(codes, 2)
    for c, code in zip(d.inits, codes, strict=True):
        if code == 3:
            _choice(out, c)
    if overrides:
        _uint(out, len(d.dropped))
        previous = 0
        for index in sorted(d.dropped):
            _uint(out, index - previous)
            previous = index
        _uint(out, len(d.raw_reads))
        for node, slot in d.raw_reads:
            _uint(out, node)
            _uint(out, slot)
        _uint(out, len(d.shared))
        for value, source in d.shared:
            _uint(out, value)
            _uint(out, source)
    return bytes(out)


def unpack(data: bytes, n_values: int, n_inits: int) -> Decisions:
    """Inverse of `pack` for an FP32 model with ``n_values`` values and ``n_inits`` initializers."""
    r = _Reader(data)
    flags = r.uint()
    if flags & ~(_ORT_METADATA | _OVERRIDES | _PRE_PROCESSED):
        raise ValueError(f"the decisions have unknown flags {flags:#x}")
    activation_type = r.uint()
    common = [_read_choice(r), _read_choice(r)]
    qdq = tuple(bool(v) for v in _unbits(r.take((n_values + 7) // 8), n_values, 1))
    codes = _unbits(r.take((n_inits * 2 + 7) // 8), n_inits, 2)
    inits = [FLOAT_INIT if c == 0 else _read_choice(r) if c == 3 else common[c - 1] for c in codes]
    dropped: list[int] = []
    raw_reads: list[tuple[int, int]] = []
    shared: list[tuple[int, int]] = []
    if flags & _OVERRIDES:
        previous = 0
        for _ in range(r.uint()):
            previous += r.uint()
            dropped.append(previous)
        for _ in range(r.uint()):
            raw_reads.append((r.uint(), r.uint()))
        for _ in range(r.uint()):
            shared.append((r.uint(), r.uint()))
    if r.pos != len(data):
        raise ValueError("the decisions have trailing bytes")
    return Decisions(
        bool(flags & _ORT_METADATA),
        activation_type,
        qdq,
        tuple(inits),
        tuple(dropped),
        tuple(raw_reads),
        tuple(shared),
        bool(flags & _PRE_PROCESSED),
    )
