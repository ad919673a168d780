"""ONNX element types as the delta codec sees them: width, kind, and how values are stored.

A tensor's payload is a run of little-endian elements (``raw_data``, packed
``float_data``/``double_data``) or of protobuf varints (``int32_data``, ``int64_data``,
``uint64_data``). The codec works on "words" (unsigned integers holding each
element's bit pattern, one per element) because bit patterns are exact on every
platform; the kind says which predictions make sense (float casts, quantization).
Types the codec does not understand element-wise (4-bit packed, float8, strings) are
"opaque": their bytes are still delta-coded, byte by byte, but never cast.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import numpy as np


class Kind(enum.Enum):
    FLOAT = "float"  # IEEE float16/32/64 (complex: two float lanes per element)
    BFLOAT16 = "bfloat16"  # upper half of a float32; numpy has no dtype for it
    SIGNED = "signed"
    UNSIGNED = "unsigned"  # also BOOL
    OPAQUE = "opaque"  # bytes only


class Storage(enum.IntEnum):
    """How a tensor's elements are laid out in the file."""

    RAW = 0  # little-endian fixed-width elements (raw_data, float_data, double_data)
    VARINT = 1  # one protobuf varint per element (int32_data, int64_data, uint64_data)


@dataclass(frozen=True)
class ElementType:
    code: int  # TensorProto.DataType
    name: str
    kind: Kind
    width: int  # bytes per word (lane); 1 for opaque
    lanes: int = 1  # words per element (2 for complex)

    # Cached: the decoder asks for these a few times per block, and np.dtype("<f4") costs
    # a microsecond each time (the cache lives in the instance's __dict__, which a frozen
    # dataclass still has; equality and hashing look at the fields only).
    @functools.cached_property
    def numpy(self) -> np.dtype[np.generic]:
        """The numpy dtype of one word's value (bfloat16 and opaque: its bit pattern)."""
        if self.kind is Kind.FLOAT:
            return np.dtype(f"<f{self.width}")
        if self.kind is Kind.SIGNED:
            return np.dtype(f"<i{self.width}")
        return np.dtype(f"<u{self.width}")

    @functools.cached_property
    def word(self) -> np.dtype[np.unsignedinteger]:
        return np.dtype(f"<u{self.width}")

    @property
    def int_range(self) -> tuple[int, int]:
        """Smallest and largest value of an integer type (bool: as uint8)."""
        bits = 8 * self.width
        if self.kind is Kind.SIGNED:
            return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return 0, (1 << bits) - 1

    @property
    def is_float(self) -> bool:
        return self.kind in (Kind.FLOAT, Kind.BFLOAT16)

    @property
    def is_integer(self) -> bool:
        return self.kind in (Kind.SIGNED, Kind.UNSIGNED)


def _table() -> dict[int, ElementType]:
    rows = [
        ElementType(1, "float32", Kind.FLOAT, 4),
        ElementType(2, "uint8", Kind.UNSIGNED, 1),
        ElementType(3, "int8", Kind.SIGNED, 1),
        ElementType(4, "uint16", Kind.UNSIGNED, 2),
        ElementType(5, "int16", Kind.SIGNED, 2),
        ElementType(6, "int32", Kind.SIGNED, 4),
        ElementType(7, "int64", Kind.SIGNED, 8),
        ElementType(9, "bool", Kind.UNSIGNED, 1),
        ElementType(10, "float16", Kind.FLOAT, 2),
        ElementType(11, "float64", Kind.FLOAT, 8),
        ElementType(12, "uint32", Kind.UNSIGNED, 4),
        ElementType(13, "uint64", Kind.UNSIGNED, 8),
        ElementType(14, "complex64", Kind.FLOAT, 4, lanes=2),
        ElementType(15, "complex128", Kind.FLOAT, 8, lanes=2),
        ElementType(16, "bfloat16", Kind.BFLOAT16, 2),
    ]
    return {row.code: row for row in rows}


ELEMENT_TYPES: dict[int, ElementType] = _table()


def element_type(code: int) -> ElementType:
    """The element type for a TensorProto.DataType code; unknown codes are opaque bytes."""
    known = ELEMENT_TYPES.get(code)
    if known is not None:
        return known
    return ElementType(code, f"opaque({code})", Kind.OPAQUE, 1)


def varint_storable(etype: ElementType) -> bool:
    """Whether ONNX keeps this type's values as varints (int32_data, int64_data, uint64_data)."""
    return etype.is_integer or etype.code in (10, 16)  # float16, bfloat16 bits in int32_data


def castable(source: ElementType, target: ElementType) -> bool:
    """Whether ``target`` values may be predicted as ``source`` values converted.

    Only conversions that give the same bits on every platform: float to float,
    integer to integer (wrapping), integer to float. Float to integer is left out:
    NaN and out-of-range casts differ between x86 and ARM.
    """
    if source.lanes != target.lanes:
        return False
    if source.is_float and target.is_float:
        return True
    if source.is_integer and target.is_integer:
        return True
    return source.is_integer and target.is_float
