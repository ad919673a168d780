"""The skeleton: the new file's bytes between tensors, zstd'd against what the device holds.

The dictionary is the old file's skeleton; with ``ZSTD_NAMES`` it is preceded by a
synthetic part built from the old skeleton alone (so it costs nothing on the wire):
the graph nodes and initializer names a QDQ rewrite (onnxruntime's quantizer) derives
from each old name — ``N_scale``, ``N_zero_point``, ``N_quantized``,
``N_QuantizeLinear_Output``, whole QuantizeLinear / DequantizeLinear NodeProtos — so a
FP32 → int8 update matches each inserted node in one go instead of name by name.
Nothing here has to guess right: the dictionary is only a compression hint, the
encoder keeps whichever method is smaller, and the rebuilt file is sha256-checked.

Names are found by a byte scan for protobuf strings (a length byte, then printable
bytes): no onnx import, the same on both sides. The synthetic part is capped at
``MAX_SYNTHETIC`` bytes, which bounds the decoder's memory.
"""

from __future__ import annotations

import enum
import re

import zstandard

from artifact.delta.errors import CorruptPatchError
from artifact.delta.frames import decompress_exact
from artifact.delta.whole import window_log_for

MAX_SYNTHETIC = 8 << 20
MIN_NAME = 3

_PRINTABLE = re.compile(rb"[\x20-\x7e]{3,}")
_QUANTIZE = b"QuantizeLinear"
_DEQUANTIZE = b"DequantizeLinear"
_AXIS_0 = b"*\x0b\n\x04axis\x18\x00\xa0\x01\x02"  # AttributeProto axis=0, type INT
_NAME_SUFFIXES = (
    b"_quantized",
    b"_scale",
    b"_zero_point",
    b"_quantized_scale",
    b"_quantized_zero_point",
    b"_QuantizeLinear",
    b"_DequantizeLinear",
    b"_QuantizeLinear_Input",
    b"_QuantizeLinear_Output",
    b"_DequantizeLinear_Output",
)
# protobuf tags (field << 3 | 2): NodeProto input 1, output 2, name 3, op_type 4;
# TensorProto name 8
_INPUT, _OUTPUT, _NAME, _OP, _TENSOR_NAME = 0x0A, 0x12, 0x1A, 0x22, 0x42


class SkeletonMethod(enum.IntEnum):
    STORED = 0
    ZSTD = 1  # against the old skeleton
    ZERO = 2  # no skeleton bytes at all
    ZSTD_NAMES = 3  # against the synthetic QDQ names, then the old skeleton


def old_names(old_skeleton: bytes | memoryview) -> list[bytes]:
    """Strings of the old skeleton that look like protobuf names, first seen first."""
    data = bytes(old_skeleton)
    seen: set[bytes] = set()
    names: list[bytes] = []
    for match in _PRINTABLE.finditer(data):
        start, run = match.start(), match.group()
        found: list[bytes] = []
        if start > 0 and MIN_NAME <= data[start - 1] <= len(run):
            found.append(run[: data[start - 1]])  # the length byte precedes the run
        if MIN_NAME <= run[0] < len(run):
            found.append(run[1 : 1 + run[0]])  # the length byte is printable itself
        for name in found or [run]:
            if name not in seen:
                seen.add(name)
                names.append(name)
    return names


def _field(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:  # most names: one length byte (the common case, kept fast for the decoder)
        return bytes((tag, n)) + value
    head = bytearray([tag])
    while n >= 0x80:
        head.append((n & 0x7F) | 0x80)
        n >>= 7
    head.append(n)
    return bytes(head) + value


def _node(inputs: tuple[bytes, ...], output: bytes, name: bytes, op: bytes) -> bytes:
    fields = [_field(_INPUT, i) for i in inputs]
    fields += [_field(_OUTPUT, output), _field(_NAME, name), _field(_OP, op)]
    return b"".join(fields)


def _rewrites(n: bytes) -> bytes:
    """What onnxruntime's QDQ quantizer writes for a tensor named ``n``."""
    scale, zp = n + b"_scale", n + b"_zero_point"
    q_out, dq_out = n + b"_QuantizeLinear_Output", n + b"_DequantizeLinear_Output"
    parts = [
        _node((n, scale, zp), q_out, n + b"_QuantizeLinear", _QUANTIZE),  # an activation
        _node((q_out, scale, zp), dq_out, n + b"_DequantizeLinear", _DEQUANTIZE),
        _node((n + b"_quantized", scale, zp), dq_out, n + b"_DequantizeLinear", _DEQUANTIZE)
        + _AXIS_0,  # a weight, per channel
        _node(  # a bias: the DequantizeLinear output keeps the old name
            (n + b"_quantized", n + b"_quantized_scale", n + b"_quantized_zero_point"),
            n,
            n + b"_DequantizeLinear",
            _DEQUANTIZE,
        ),
    ]
    parts += [_field(_TENSOR_NAME, n + suffix) for suffix in _NAME_SUFFIXES]
    return b"".join(parts)


def synthetic_dictionary(old_skeleton: bytes | memoryview) -> bytes:
    """The QDQ rewrites of the old skeleton's names, at most MAX_SYNTHETIC bytes."""
    parts: list[bytes] = []
    size = 0
    for name in old_names(old_skeleton):
        part = _rewrites(name)
        if size + len(part) > MAX_SYNTHETIC:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def _dictionary(method: SkeletonMethod, old_skeleton: bytes) -> bytes:
    if method is SkeletonMethod.ZSTD_NAMES:
        return synthetic_dictionary(old_skeleton) + old_skeleton
    return old_skeleton


def compress_with_dict(data: bytes, dictionary: bytes, level: int) -> bytes:
    """One zstd frame of ``data`` against raw-content ``dictionary`` (none when empty)."""
    if not dictionary:
        return zstandard.ZstdCompressor(level=level).compress(data)
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(data),
        dict_size=len(dictionary),
        window_log=window_log_for(len(dictionary) + len(data)),
        enable_ldm=len(dictionary) + len(data) > 1 << 24,
    )
    zdict = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(dict_data=zdict, compression_params=params).compress(data)


def encode_skeleton(
    skeleton: bytes, old_skeleton: bytes, level: int
) -> tuple[SkeletonMethod, bytes]:
    """The smallest coding of ``skeleton`` given the old one."""
    if not skeleton:
        return SkeletonMethod.ZERO, b""
    best = (SkeletonMethod.STORED, skeleton)
    for method in (SkeletonMethod.ZSTD, SkeletonMethod.ZSTD_NAMES):
        coded = compress_with_dict(skeleton, _dictionary(method, old_skeleton), level)
        if len(coded) < len(best[1]):
            best = (method, coded)
    return best


def decode_skeleton(data: bytes, method: int, size: int, old_skeleton: bytes) -> bytes:
    """The new skeleton, exactly ``size`` bytes, or CorruptPatchError."""
    if method == SkeletonMethod.ZERO:
        if size or data:
            raise CorruptPatchError("an empty skeleton with content")
        return b""
    if method == SkeletonMethod.STORED:
        if len(data) != size:
            raise CorruptPatchError("the stored skeleton has the wrong size")
        return data
    if method not in (SkeletonMethod.ZSTD, SkeletonMethod.ZSTD_NAMES):
        raise CorruptPatchError(f"unknown skeleton method {method}")
    return decompress_exact(data, size, _dictionary(SkeletonMethod(method), old_skeleton))
