"""Words, values and bytes: the three ways the codec sees a tensor's elements.

*Words* are unsigned integers holding each element's bit pattern (what residuals are
computed on: exact on every platform); *values* are the elements as numpy numbers
(what predictions compute with); *bytes* are what the file holds (little-endian
words, or protobuf varints). Conversions between element types are limited to the
ones that give the same bits on x86 and ARM (see dtypes.castable).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from artifact.delta import varint
from artifact.delta.dtypes import ElementType, Kind, Storage

Words = NDArray[np.unsignedinteger]
Values = NDArray[np.generic]


def words_to_values(words: Words, etype: ElementType, storage: Storage) -> Values:
    """Element values (bfloat16 and opaque: bit patterns) from stored words."""
    if storage is Storage.RAW:
        return words.view(etype.numpy)
    if etype.kind is Kind.SIGNED:
        return words.view(np.int64).astype(etype.numpy)
    if etype.kind is Kind.FLOAT:  # float16 bits in int32_data
        return words.astype(np.uint16).view(etype.numpy)
    return words.astype(etype.numpy)


def values_to_words(values: Values, etype: ElementType, storage: Storage) -> Words:
    values = np.ascontiguousarray(values, dtype=etype.numpy)
    if storage is Storage.RAW:
        return values.view(etype.word)
    if etype.kind is Kind.SIGNED:
        return values.astype(np.int64).view(np.uint64)
    if etype.kind is Kind.FLOAT:
        return values.view(np.uint16).astype(np.uint64)
    return values.astype(np.uint64)


def words_to_bytes(words: Words, storage: Storage) -> bytes:
    if storage is Storage.VARINT:
        return varint.encode(words.astype(np.uint64, copy=False))
    return np.ascontiguousarray(words).tobytes()


def bytes_to_words(data: bytes | memoryview, etype: ElementType, storage: Storage) -> Words:
    if storage is Storage.VARINT:
        return varint.decode(data)
    return np.frombuffer(data, dtype=etype.word)


def _bf16_to_f32(bits: Values) -> NDArray[np.float32]:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _f32_to_bf16(values: NDArray[np.float32]) -> NDArray[np.uint16]:
    """Round to nearest even, as torch does; NaNs stay quiet NaNs."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return out


def to_float(values: Values, etype: ElementType, dtype: type[np.floating]) -> NDArray[np.floating]:
    if etype.kind is Kind.BFLOAT16:
        return _bf16_to_f32(values).astype(dtype)
    if etype.is_integer:
        return values.astype(np.float64).astype(dtype)
    return values.astype(dtype)


def convert(values: Values, source: ElementType, target: ElementType) -> Values:
    """``values`` of type ``source`` as ``target`` values (see dtypes.castable)."""
    if source.code == target.code:
        return values
    if target.is_integer:
        return values.astype(target.numpy)
    if target.kind is Kind.BFLOAT16:
        return _f32_to_bf16(to_float(values, source, np.float32))
    if source.kind is Kind.FLOAT:
        return values.astype(target.numpy)
    return to_float(values, source, np.float64).astype(target.numpy)
