"""How a residual becomes bytes: transforms, layouts, and zstd frames.

The residual between the new words and their prediction is XOR'd (floats: sign and
exponent bits cancel) or subtracted with wrap-around and zigzag'd (integers; float
bit patterns that moved a few ulps). It is then laid out as it is, split into byte
planes (the high planes of a fine-tune are nearly all zero), or packed 8, 4 or 2
small words to a byte with escapes; each resulting frame is stored, zstd'd, or marked
all-zero. `best_residual` tries them all at a fast zstd level and keeps the smallest.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

import numpy as np
import zstandard
from numpy.typing import NDArray

from artifact.delta import varint
from artifact.delta.errors import CorruptPatchError
from artifact.delta.words import Words

FAST_LEVEL = 1  # zstd level used to compare candidate encodings
NOISE_RATIO = 0.97  # a plane the fast level cannot shrink below this is stored as it is


class Transform(enum.IntEnum):
    NONE = 0  # the words themselves
    XOR = 1  # new ^ predicted
    SUB = 2  # zigzag(new - predicted), wrapping


class Layout(enum.IntEnum):
    INTERLEAVED = 0  # the words' bytes as they are
    PLANES = 1  # byte 0 of every word, then byte 1, ...
    # Small words packed 8, 4 or 2 to a byte, the largest code meaning "see the escapes"
    # (the excess, as PLANES). zstd codes each literal byte with at least one bit, so a
    # residual that is 80 % zeros costs a bit a word unpacked, ~0.9 bits packed by two.
    PACK1 = 2
    PACK2 = 3
    PACK4 = 4
    # PLANES after grouping the words by a key both sides know (the predicted float's
    # exponent): one set of planes per group, so zstd's tables fit each magnitude.
    GROUPED = 5


PACK_BITS = {Layout.PACK1: 1, Layout.PACK2: 2, Layout.PACK4: 4}


class Frame(enum.IntEnum):
    STORED = 0
    ZSTD = 1
    ZERO = 2


def _zigzag(d: Words) -> Words:
    bits = d.dtype.itemsize * 8
    return (d << d.dtype.type(1)) ^ (d.dtype.type(0) - (d >> d.dtype.type(bits - 1)))


def _unzigzag(z: Words) -> Words:
    return (z >> z.dtype.type(1)) ^ (z.dtype.type(0) - (z & z.dtype.type(1)))


def residual(new: Words, predicted: Words | None, transform: Transform) -> Words:
    if transform is Transform.NONE or predicted is None:
        return new
    if transform is Transform.XOR:
        return new ^ predicted
    return _zigzag(new - predicted)


def apply_residual(res: Words, predicted: Words | None, transform: Transform) -> Words:
    if transform is Transform.NONE:
        return res
    if predicted is None:
        raise CorruptPatchError(f"residual transform {transform.name} without a prediction")
    if transform is Transform.XOR:
        return res ^ predicted
    return _unzigzag(res) + predicted


def _planes(words: Words, layout: Layout) -> list[NDArray[np.uint8]]:
    width = words.dtype.itemsize
    flat = np.ascontiguousarray(words).view(np.uint8)
    if layout is Layout.INTERLEAVED or width == 1:
        return [flat]
    grid = flat.reshape(-1, width)
    return [np.ascontiguousarray(grid[:, i]) for i in range(width)]


@functools.cache
def _compressor(level: int) -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=level)


@functools.cache
def _decompressor() -> zstandard.ZstdDecompressor:
    return zstandard.ZstdDecompressor()


def _frame(out: bytearray, raw: bytes, level: int) -> None:
    if not np.frombuffer(raw, dtype=np.uint8).any():
        out.append(Frame.ZERO)
        return
    packed = _compressor(FAST_LEVEL).compress(raw)
    if level != FAST_LEVEL and len(packed) < len(raw) * NOISE_RATIO:
        packed = _compressor(level).compress(raw)  # worth the slow level: not noise
    if len(packed) + 4 < len(raw):
        writer = varint.Writer()
        writer.uint(len(packed))
        out.append(Frame.ZSTD)
        out += writer.getvalue()
        out += packed
    else:
        out.append(Frame.STORED)
        out += raw


def _pack_codes(codes: NDArray[np.uint8], bits: int) -> bytes:
    per = 8 // bits
    padded = np.zeros(-(-codes.size // per) * per, dtype=np.uint8)
    padded[: codes.size] = codes
    grid = padded.reshape(-1, per)
    packed = np.zeros(len(grid), dtype=np.uint8)
    for i in range(per):
        packed |= grid[:, i] << np.uint8(bits * i)
    return packed.tobytes()


def _unpack_codes(packed: NDArray[np.uint8], bits: int, count: int) -> NDArray[np.uint8]:
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    grid = np.empty((packed.size, per), dtype=np.uint8)
    for i in range(per):
        grid[:, i] = (packed >> np.uint8(bits * i)) & mask
    return grid.reshape(-1)[:count]


GROUP_MIN_WORDS = 1 << 14  # smaller groups are merged with the next (frame overhead)


@dataclass(frozen=True)
class Grouping:
    """Words reordered by a key, cut into segments of at least GROUP_MIN_WORDS."""

    order: NDArray[np.intp]  # word indices, group by group
    ends: tuple[int, ...]  # where each segment ends in ``order``


def group_by(keys: NDArray[np.unsignedinteger]) -> Grouping:
    """Stable grouping of word indices by ``keys`` (a radix sort for small integer keys)."""
    order = np.argsort(keys, kind="stable")
    starts = (np.flatnonzero(np.diff(keys[order])) + 1).tolist()
    ends: list[int] = []
    begin = 0
    for end in [*starts, int(keys.size)]:
        if end - begin >= GROUP_MIN_WORDS:
            ends.append(end)
            begin = end
    if begin < keys.size:
        if ends:
            ends[-1] = int(keys.size)
        else:
            ends.append(int(keys.size))
    return Grouping(order, tuple(ends))


def pack_frames(
    words: Words, layout: Layout, level: int, grouping: Grouping | None = None
) -> bytes:
    """The residual as frames: one per byte plane (PLANES), one for all (INTERLEAVED),
    the packed codes then the escapes' planes (PACK*), or planes per group (GROUPED)."""
    out = bytearray()
    if layout is Layout.GROUPED:
        if grouping is None:
            raise ValueError("the GROUPED layout needs a grouping")
        ordered = words[grouping.order]
        begin = 0
        for end in grouping.ends:
            out += pack_frames(ordered[begin:end], Layout.PLANES, level)
            begin = end
        return bytes(out)
    bits = PACK_BITS.get(layout)
    if bits is not None:
        limit = (1 << bits) - 1
        codes = np.minimum(words, limit).astype(np.uint8)
        _frame(out, _pack_codes(codes, bits), level)
        escapes = words[words >= limit] - words.dtype.type(limit)
        if escapes.size:
            out += pack_frames(escapes, Layout.PLANES, level)
        return bytes(out)
    for plane in _planes(words, layout):
        _frame(out, plane.tobytes(), level)
    return bytes(out)


def unpack_frames(
    payload: memoryview,
    count: int,
    dtype: np.dtype[np.unsignedinteger],
    layout: Layout,
    grouping: Grouping | None = None,
) -> Words:
    """Inverse of `pack_frames`; any inconsistency is a corrupt payload."""
    reader = _PayloadReader(payload)
    if layout is Layout.GROUPED:
        if grouping is None or (grouping.ends and grouping.ends[-1] != count):
            raise CorruptPatchError("a grouped block without a matching prediction")
        ordered = np.empty(count, dtype=dtype)
        begin = 0
        for end in grouping.ends:
            ordered[begin:end] = _read_words(reader, end - begin, dtype, Layout.PLANES)
            begin = end
        words = np.empty(count, dtype=dtype)
        words[grouping.order] = ordered
    else:
        words = _read_words(reader, count, dtype, layout)
    reader.finish()
    return words


def _read_words(
    reader: _PayloadReader, count: int, dtype: np.dtype[np.unsignedinteger], layout: Layout
) -> Words:
    width = dtype.itemsize
    bits = PACK_BITS.get(layout)
    if bits is not None:
        limit = (1 << bits) - 1
        packed = reader.frame(-(-count * bits // 8))
        codes = _unpack_codes(packed, bits, count)
        words = codes.astype(dtype)
        escaped = np.flatnonzero(codes == limit)
        if escaped.size:
            excess = _read_words(reader, escaped.size, dtype, Layout.PLANES)
            words[escaped] = excess + dtype.type(limit)
        return words
    planes = width if layout is Layout.PLANES and width > 1 else 1
    plane_len = count * width // planes
    if planes == 1:
        return reader.frame(plane_len).view(dtype)
    grid = np.empty((count, width), dtype=np.uint8)
    for i in range(planes):
        grid[:, i] = reader.frame(plane_len)
    return grid.reshape(-1).view(dtype)


class _PayloadReader:
    def __init__(self, payload: memoryview) -> None:
        self._data = payload
        self._pos = 0

    def frame(self, size: int) -> NDArray[np.uint8]:
        if self._pos >= len(self._data):
            raise CorruptPatchError("a block's payload ends before its last frame")
        method = self._data[self._pos]
        self._pos += 1
        if method == Frame.ZERO:
            return np.zeros(size, dtype=np.uint8)
        if method == Frame.STORED:
            return np.frombuffer(self._take(size), dtype=np.uint8)
        if method != Frame.ZSTD:
            raise CorruptPatchError(f"unknown frame method {method}")
        length = self._length()
        return np.frombuffer(decompress_exact(self._take(length), size), dtype=np.uint8)

    def _length(self) -> int:
        result, shift = 0, 0
        while True:
            if self._pos >= len(self._data) or shift > 63:
                raise CorruptPatchError("a frame length is cut short")
            byte = self._data[self._pos]
            self._pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    def _take(self, n: int) -> memoryview:
        if self._pos + n > len(self._data):
            raise CorruptPatchError("a frame runs past the end of its block")
        part = self._data[self._pos : self._pos + n]
        self._pos += n
        return part

    def finish(self) -> None:
        if self._pos != len(self._data):
            raise CorruptPatchError("a block's payload has bytes after its last frame")


def decompress_exact(
    frame: bytes | memoryview, size: int, dictionary: bytes | memoryview | None = None
) -> bytes:
    """Decompress one zstd frame that must hold exactly ``size`` bytes.

    ``dictionary``: raw content the frame was compressed against (the old skeleton).
    """
    try:
        declared = zstandard.frame_content_size(frame)
        if declared not in (-1, size):
            raise CorruptPatchError(f"a zstd frame declares {declared} bytes, expected {size}")
        if dictionary:
            zdict = zstandard.ZstdCompressionDict(
                dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT
            )
            dctx = zstandard.ZstdDecompressor(dict_data=zdict, max_window_size=1 << 31)
        else:
            dctx = _decompressor()
        out = dctx.decompress(frame, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CorruptPatchError(f"a zstd frame does not decompress: {exc}") from exc
    if len(out) != size:
        raise CorruptPatchError(f"a zstd frame holds {len(out)} bytes, expected {size}")
    return out


@dataclass(frozen=True)
class Trial:
    """One way to code a block's residual, sized at FAST_LEVEL for comparison."""

    size: int
    transform: Transform
    layout: Layout
    residual: Words


PACK_WORTHWHILE = 0.75  # try a PACK layout when this share of words fits its codes


def _layouts(res: Words) -> list[Layout]:
    layouts = (
        [Layout.INTERLEAVED] if res.dtype.itemsize == 1 else [Layout.PLANES, Layout.INTERLEAVED]
    )
    if res.size:
        for layout, bits in PACK_BITS.items():
            small = np.count_nonzero(res < res.dtype.type((1 << bits) - 1))
            if small >= PACK_WORTHWHILE * res.size:
                layouts.append(layout)
    return layouts


def best_residual(new: Words, predicted: Words | None, grouping: Grouping | None = None) -> Trial:
    """The smallest of the transform x layout options for ``new`` given a prediction."""
    best: Trial | None = None
    transforms = [Transform.XOR, Transform.SUB] if predicted is not None else [Transform.NONE]
    for transform in transforms:
        res = residual(new, predicted, transform)
        layouts = _layouts(res) + ([Layout.GROUPED] if grouping is not None else [])
        for layout in layouts:
            size = len(pack_frames(res, layout, FAST_LEVEL, grouping))
            if best is None or size < best.size:
                best = Trial(size, transform, layout, res)
    if best is None:  # _options is never empty
        raise AssertionError("no residual options")
    return best
