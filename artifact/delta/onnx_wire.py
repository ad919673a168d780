"""Find an ONNX model's initializers by walking the protobuf wire format by hand.

The edge agent decodes deltas and must not import onnx (nor generated ONNX stubs), so
this walks ModelProto.graph (7) → GraphProto.initializer (5) → TensorProto fields
itself. For each initializer it reports name, element type, shape and the exact byte
range of its payload in the file; everything else (graph, attributes, metadata,
small or odd tensors) stays "skeleton" and is coded as bytes.

Nothing here has to be right for a delta to be correct: a tensor range only says
which bytes are coded element-wise, and every rebuilt file is checked against its
sha256. A file that is not a well-formed model simply yields no tensors.

TensorProto fields used: dims=1, data_type=2, segment=3, float_data=4, int32_data=5,
string_data=6, int64_data=7, name=8, raw_data=9, double_data=10, uint64_data=11,
external_data=13, data_location=14.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from artifact.delta.dtypes import ElementType, Kind, Storage, element_type

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5

# payload field → storage, and the element types allowed in it
_RAW_DATA = 9
_PACKED_FIXED = {4: frozenset({1, 14}), 10: frozenset({11, 15})}  # float_data, double_data
_PACKED_VARINT = {
    5: frozenset({2, 3, 4, 5, 6, 9, 10, 16}),  # int32_data
    7: frozenset({7}),  # int64_data
    11: frozenset({12, 13}),  # uint64_data
}
_NOT_INLINE = {3, 6, 13}  # segment, string_data, external_data: not ours to code
_DATA_LOCATION = 14


class WireError(ValueError):
    """Bytes that do not parse as the protobuf messages expected."""


@dataclass(frozen=True)
class TensorSpan:
    """One initializer's payload: where it is in the file and how to read it."""

    name: str
    etype: ElementType
    dims: tuple[int, ...]
    offset: int  # first payload byte in the file
    nbytes: int
    storage: Storage
    count: int  # words in the payload (elements x lanes; bytes for opaque tensors)

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    if pos < end and buf[pos] < 0x80:  # one byte: most lengths, dims and types
        return buf[pos], pos + 1
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


# One field of a message: (number, wire type, value, start, end). ``value`` is the varint
# or fixed value, or the payload length of a LEN field; ``start`` is the first byte of the
# value (LEN: of the payload). A plain tuple: the decoder walks a few fields per tensor
# of the base, and a tuple costs a fraction of a dataclass or named tuple to make.
_Field = tuple[int, int, int, int, int]


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[_Field]:
    while pos < end:
        key = buf[pos]
        if key < 0x80:  # field numbers below 16: every field this module reads
            pos += 1
        else:
            key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        start = pos
        if wire == _WIRE_VARINT:
            value, pos = _varint(buf, pos, end)
        elif wire == _WIRE_I64:
            value, pos = 0, pos + 8
        elif wire == _WIRE_I32:
            value, pos = 0, pos + 4
        elif wire == _WIRE_LEN:
            value, start = _varint(buf, pos, end)
            pos = start + value
        else:  # groups (3, 4) are not used by ONNX
            raise WireError(f"unsupported wire type {wire}")
        if pos > end:
            raise WireError("field runs past the end of its message")
        yield number, wire, value, start, pos


def _packed_varints(buf: memoryview, start: int, end: int) -> list[int]:
    out = []
    pos = start
    while pos < end:
        value, pos = _varint(buf, pos, end)
        out.append(value)
    return out


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _tensor(buf: memoryview, start: int, end: int) -> TensorSpan | None:
    dims: list[int] = []
    data_type = 0
    name = ""
    payloads: list[_Field] = []
    for field in _fields(buf, start, end):
        n, wire, value, first, last = field
        if n == 1:
            if wire == _WIRE_VARINT:
                dims.append(_signed64(value))
            elif wire == _WIRE_LEN:
                dims.extend(_signed64(v) for v in _packed_varints(buf, first, last))
        elif n == 2 and wire == _WIRE_VARINT:
            data_type = value
        elif n == 8 and wire == _WIRE_LEN:
            name = str(buf[first:last], "utf-8", "replace")
        elif n in _NOT_INLINE or (n == _DATA_LOCATION and value != 0):
            return None
        elif n == _RAW_DATA or n in _PACKED_FIXED or n in _PACKED_VARINT:
            if wire != _WIRE_LEN:
                return None  # unpacked repeated values: not one contiguous range
            payloads.append(field)
    if len(payloads) != 1 or min(dims, default=0) < 0:
        return None
    field_number, _, _, payload_start, payload_end = payloads[0]
    etype = element_type(data_type)
    elements = math.prod(dims)
    nbytes = payload_end - payload_start
    if nbytes == 0:
        return None
    if field_number == _RAW_DATA:
        storage = Storage.RAW
        count = elements * etype.lanes
        if etype.kind is Kind.OPAQUE or nbytes != count * etype.width:
            etype = ElementType(data_type, f"opaque({data_type})", Kind.OPAQUE, 1)
            count = nbytes
    elif field_number in _PACKED_FIXED:
        if data_type not in _PACKED_FIXED[field_number]:
            return None
        storage = Storage.RAW
        count = elements * etype.lanes
        if nbytes != count * etype.width:
            return None
    else:
        if data_type not in _PACKED_VARINT[field_number]:
            return None
        storage = Storage.VARINT
        count = elements
    return TensorSpan(name, etype, tuple(dims), payload_start, nbytes, storage, count)


def _initializers(buf: memoryview, start: int, end: int) -> Iterator[TensorSpan]:
    for number, wire, _, first, last in _fields(buf, start, end):
        if number == _GRAPH_INITIALIZER and wire == _WIRE_LEN:
            span = _tensor(buf, first, last)
            if span is not None:
                yield span


def find_tensors(data: bytes | memoryview) -> list[TensorSpan]:
    """Every inline initializer of the main graph, in file order; [] if not a model."""
    buf = memoryview(data).cast("B")
    try:
        spans: list[TensorSpan] = []
        for number, wire, _, first, last in _fields(buf, 0, len(buf)):
            if number == _MODEL_GRAPH and wire == _WIRE_LEN:
                spans.extend(_initializers(buf, first, last))
        return sorted(spans, key=lambda s: s.offset)
    except WireError:
        return []


_MODEL_METADATA = 14  # ModelProto.metadata_props: StringStringEntryProto key=1, value=2


def model_metadata(data: bytes | memoryview) -> dict[str, str]:
    """ModelProto.metadata_props as a dict (the last of repeated keys wins); {} if the
    bytes are not a well-formed model. Walks the top level only: the graph is skipped."""
    buf = memoryview(data).cast("B")
    found: dict[str, str] = {}
    try:
        for number, wire, _, first, last in _fields(buf, 0, len(buf)):
            if number != _MODEL_METADATA or wire != _WIRE_LEN:
                continue
            entry: dict[int, str] = {}
            for part, part_wire, _, part_first, part_last in _fields(buf, first, last):
                if part in (1, 2) and part_wire == _WIRE_LEN:
                    raw = bytes(buf[part_first:part_last])
                    entry[part] = raw.decode("utf-8", errors="replace")
            found[entry.get(1, "")] = entry.get(2, "")
    except WireError:
        return {}
    return found
