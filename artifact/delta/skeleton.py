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

``ZSTD_QDQ`` goes further when the new file is the canonical QDQ form of the old FP32
model (artifact/delta/qdq): the record carries the few bytes of quantization decisions,
both sides rebuild the new file from the old one with every tensor payload zero-filled
(same layout, since no size depends on a value), cut the same tensor ranges out of it,
and use that predicted skeleton (then the old skeleton) as the dictionary. What remains
to send is the small tensors' and activation scales' bytes. The decoder rebuilds a model
in memory for it, so the method is offered and accepted only for bases of at most
``MAX_QDQ_BASE`` bytes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

import zstandard

from artifact.delta.errors import CorruptPatchError, UnsupportedPatchError
from artifact.delta.frames import decompress_exact
from artifact.delta.whole import window_log_for

MAX_SYNTHETIC = 8 << 20
MAX_QDQ_BASE = 64 << 20  # bytes; ZSTD_QDQ's decoder holds about three times this
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
    ZSTD_QDQ = 4  # against the skeleton the QDQ decisions predict, then the old skeleton


@dataclass(frozen=True)
class QdqPrediction:
    """What ZSTD_QDQ needs: the packed decisions (sent) and the skeleton they predict."""

    decisions: bytes
    skeleton: bytes


def cut(data: bytes | memoryview, ranges: Sequence[tuple[int, int]]) -> bytes:
    """``data`` without the (offset, length) ranges, which must be sorted and disjoint."""
    parts = []
    pos = 0
    for offset, length in ranges:
        parts.append(data[pos:offset])
        pos = offset + length
    parts.append(data[pos:])
    return b"".join(parts)


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


def _dictionary(method: SkeletonMethod, old_skeleton: bytes, predicted: bytes | None) -> bytes:
    if method is SkeletonMethod.ZSTD_NAMES:
        return synthetic_dictionary(old_skeleton) + old_skeleton
    if method is SkeletonMethod.ZSTD_QDQ:
        if predicted is None:
            raise CorruptPatchError("a ZSTD_QDQ skeleton without its predicted skeleton")
        return predicted + old_skeleton
    return old_skeleton


def pack_meta(method: SkeletonMethod, qdq: QdqPrediction | None) -> bytes:
    """The SKELETON record's meta: the method, then (ZSTD_QDQ only) the packed decisions."""
    if method is SkeletonMethod.ZSTD_QDQ:
        if qdq is None:
            raise ValueError("ZSTD_QDQ needs its decisions")
        return bytes([method]) + qdq.decisions
    return bytes([method])


def unpack_meta(meta: bytes) -> tuple[int, bytes]:
    """(method, packed decisions) from a SKELETON record's meta."""
    if not meta:
        raise CorruptPatchError("the delta's skeleton record has no method")
    method, decisions = meta[0], meta[1:]
    if (method == SkeletonMethod.ZSTD_QDQ) != bool(decisions):
        raise CorruptPatchError("the delta's skeleton method and its decisions do not agree")
    return method, decisions


def predicted_skeleton(
    old_file: bytes | memoryview,
    decisions: bytes,
    covered: Sequence[tuple[int, int]],
    target_size: int,
) -> bytes:
    """The skeleton ``decisions`` predict from the old file, cut like the new file's.

    Raises UnsupportedPatchError for a base over MAX_QDQ_BASE (the encoder never offers
    it) and CorruptPatchError when the decisions do not fit the base.
    """
    if len(old_file) > MAX_QDQ_BASE:
        raise UnsupportedPatchError(
            f"the delta predicts its skeleton from a {len(old_file)}-byte base, over this "
            f"build's limit of {MAX_QDQ_BASE} bytes: ask for a full artifact"
        )
    from artifact.delta.qdq.build import predict  # protobuf: only for this method

    try:
        predicted = predict(old_file, decisions)
    except ValueError as exc:
        raise CorruptPatchError(f"the delta's QDQ decisions do not fit its base: {exc}") from exc
    if len(predicted) != target_size:
        raise CorruptPatchError("the delta's QDQ decisions predict a file of the wrong size")
    return cut(predicted, covered)


COMPRESS_PIECE = 1 << 20  # bytes handed to zstd per call (see compress_in_pieces)


def compress_in_pieces(cctx: zstandard.ZstdCompressor, data: bytes) -> bytes:
    """One zstd frame of ``data``, fed a piece at a time. Python sees a Ctrl-C only
    between C calls: one call over a large model at level 19 left `artifact diff`
    deaf to it for many seconds (QA: 10.8 s on 9 MB), a piece is about a second at most.
    The frame records the content size, as a one-shot compress does."""
    compressor = cctx.compressobj(size=len(data))
    view = memoryview(data)
    parts = [
        compressor.compress(view[start : start + COMPRESS_PIECE])
        for start in range(0, len(data), COMPRESS_PIECE)
    ]
    parts.append(compressor.flush())
    return b"".join(parts)


def compress_with_dict(data: bytes, dictionary: bytes, level: int) -> bytes:
    """One zstd frame of ``data`` against raw-content ``dictionary`` (none when empty)."""
    if not dictionary:
        return compress_in_pieces(zstandard.ZstdCompressor(level=level), data)
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=len(data),
        dict_size=len(dictionary),
        window_log=window_log_for(len(dictionary) + len(data)),
        enable_ldm=len(dictionary) + len(data) > 1 << 24,
    )
    zdict = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return compress_in_pieces(
        zstandard.ZstdCompressor(dict_data=zdict, compression_params=params), data
    )


def encode_skeleton(
    skeleton: bytes, old_skeleton: bytes, level: int, qdq: QdqPrediction | None = None
) -> tuple[SkeletonMethod, bytes]:
    """The smallest coding of ``skeleton`` given the old one (and the QDQ prediction).

    ZSTD_QDQ's size includes its decisions, which travel in the record's meta.
    """
    if not skeleton:
        return SkeletonMethod.ZERO, b""
    best = (SkeletonMethod.STORED, skeleton)
    best_size = len(skeleton)
    methods: list[tuple[SkeletonMethod, QdqPrediction | None]] = [
        (SkeletonMethod.ZSTD, None),
        (SkeletonMethod.ZSTD_NAMES, None),
    ]
    if qdq is not None:
        methods.append((SkeletonMethod.ZSTD_QDQ, qdq))
    for method, prediction in methods:
        predicted = prediction.skeleton if prediction else None
        coded = compress_with_dict(skeleton, _dictionary(method, old_skeleton, predicted), level)
        size = len(coded) + (len(prediction.decisions) if prediction else 0)
        if size < best_size:
            best, best_size = (method, coded), size
    return best


def decode_skeleton(
    data: bytes, method: int, size: int, old_skeleton: bytes, predicted: bytes | None = None
) -> bytes:
    """The new skeleton, exactly ``size`` bytes, or CorruptPatchError.

    ``predicted``: `predicted_skeleton`'s result, needed by ZSTD_QDQ only.
    """
    if method == SkeletonMethod.ZERO:
        if size or data:
            raise CorruptPatchError("an empty skeleton with content")
        return b""
    if method == SkeletonMethod.STORED:
        if len(data) != size:
            raise CorruptPatchError("the stored skeleton has the wrong size")
        return data
    if method not in SkeletonMethod.__members__.values():
        raise CorruptPatchError(f"unknown skeleton method {method}")
    dictionary = _dictionary(SkeletonMethod(method), old_skeleton, predicted)
    return decompress_exact(data, size, dictionary)
