"""Protobuf varints, many at a time with numpy: tensors stored in int32_data and friends.

ONNX writers keep small tensors (per-channel zero points, scales made with
``onnx.helper.make_tensor``) as repeated varint fields rather than raw bytes. The codec
decodes them to 64-bit words, predicts and codes those, and re-encodes: exact because
it only treats a payload as varints when encoding its decoded words gives back the
very same bytes (see onnx_wire).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

MAX_VARINT_BYTES = 10
_SEVEN = np.uint64(7)
_LOW7 = np.uint64(0x7F)


class VarintError(ValueError):
    """Bytes that are not a whole number of well-formed varints."""


def decode(data: bytes | memoryview) -> NDArray[np.uint64]:
    """Every varint in ``data``, as uint64 words (negative ints come out two's complement)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(raw < 0x80)
    if ends.size == 0 or ends[-1] != raw.size - 1:
        raise VarintError("the last varint is cut short")
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > MAX_VARINT_BYTES:
        raise VarintError(f"a varint is longer than {MAX_VARINT_BYTES} bytes")
    values = np.zeros(ends.size, dtype=np.uint64)
    for k in range(MAX_VARINT_BYTES):
        take = np.flatnonzero(lengths > k)
        if take.size == 0:
            break
        part = raw[starts[take] + k].astype(np.uint64) & _LOW7
        values[take] |= part << np.uint64(7 * k)
    return values


def encoded_lengths(values: NDArray[np.uint64]) -> NDArray[np.int64]:
    lengths = np.ones(values.shape, dtype=np.int64)
    for k in range(1, MAX_VARINT_BYTES):
        lengths += values >= np.uint64(1 << (7 * k))
    return lengths


def encode(values: NDArray[np.uint64]) -> bytes:
    """The shortest varint encoding of each word, concatenated (as protobuf writes them)."""
    values = np.ascontiguousarray(values, dtype=np.uint64)
    lengths = encoded_lengths(values)
    starts = np.zeros(values.shape, dtype=np.int64)
    if values.size:
        np.cumsum(lengths[:-1], out=starts[1:])
    out = np.zeros(int(lengths.sum()), dtype=np.uint8)
    for k in range(MAX_VARINT_BYTES):
        take = np.flatnonzero(lengths > k)
        if take.size == 0:
            break
        byte = (values[take] >> np.uint64(7 * k)) & _LOW7
        more = (lengths[take] > k + 1).astype(np.uint64) << _SEVEN
        out[starts[take] + k] = (byte | more).astype(np.uint8)
    return out.tobytes()


class Writer:
    """Builds a byte string of unsigned and zigzag-signed varints (the delta's table)."""

    def __init__(self) -> None:
        self._out = bytearray()

    def uint(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"uint field must be >= 0, got {value}")
        while value >= 0x80:
            self._out.append((value & 0x7F) | 0x80)
            value >>= 7
        self._out.append(value)

    def sint(self, value: int) -> None:
        self.uint(value * 2 if value >= 0 else -value * 2 - 1)

    def getvalue(self) -> bytes:
        return bytes(self._out)


class Reader:
    """Reads what `Writer` wrote; any overrun or oversized value raises VarintError."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def uint(self, limit: int = 1 << 64) -> int:
        pos = self._pos
        if pos < len(self._data):
            # Fast path: most table fields (kinds, counts, small deltas) are one byte,
            # and a table has ten or so per block.
            byte = self._data[pos]
            if byte < 0x80 and byte <= limit:
                self._pos = pos + 1
                return byte
        return self._uint_slow(limit)

    def _uint_slow(self, limit: int) -> int:
        result = 0
        shift = 0
        while True:
            if self._pos >= len(self._data):
                raise VarintError("table ends in the middle of a field")
            byte = self._data[self._pos]
            self._pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift >= 7 * MAX_VARINT_BYTES:
                raise VarintError("table field longer than 10 bytes")
        if result > limit:
            raise VarintError(f"table field {result} exceeds its limit {limit}")
        return result

    def sint(self, limit: int = 1 << 63) -> int:
        raw = self.uint(2 * limit + 1)
        return raw >> 1 if raw % 2 == 0 else -((raw + 1) >> 1)

    @property
    def done(self) -> bool:
        return self._pos == len(self._data)

    @property
    def position(self) -> int:
        return self._pos
