"""How a residual becomes bytes: transforms, layouts, and zstd frames.

The residual between the new words and their prediction is XOR'd (floats: sign and
exponent bits cancel) or subtracted with wrap-around and zigzag'd (integers; float
bit patterns that moved a few ulps). It is then laid out as it is, split into byte
planes (the high planes of a fine-tune are nearly all zero), or packed 8, 4 or 2
small words to a byte with escapes; each resulting frame is stored, zstd'd, or marked
all-zero. Small residuals may instead be Golomb-Rice coded, every word (RICE) or only
the nonzero ones with the gaps between them (SPARSE). `best_residual` tries them all
at a fast zstd level and keeps the smallest.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, replace

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
    # Golomb-Rice codes (format 4): a word w costs (w >> k) + 1 + k bits. Near the
    # entropy of small residuals, where zstd spends at least a bit a byte and a few
    # bytes a match: RICE codes every word (int32 biases off by a few units), SPARSE
    # only the nonzero ones, as the gaps between them and their values less one (a
    # re-release that changed a weight in a hundred).
    RICE = 6
    SPARSE = 7


PACK_BITS = {Layout.PACK1: 1, Layout.PACK2: 2, Layout.PACK4: 4}
RICE_LAYOUTS = (Layout.RICE, Layout.SPARSE)


class Frame(enum.IntEnum):
    STORED = 0
    ZSTD = 1
    ZERO = 2


def _zigzag(d: Words) -> Words:
    bits = d.dtype.itemsize * 8
    return (d << d.dtype.type(1)) ^ (d.dtype.type(0) - (d >> d.dtype.type(bits - 1)))


def _unzigzag(z: Words) -> Words:
    """The inverse of `_zigzag`, as a fresh array (two block-sized temporaries, not four)."""
    one = z.dtype.type(1)
    out = z >> one
    sign = z & one
    np.negative(sign, out=sign)  # unsigned: 0 - 1 wraps to all ones
    out ^= sign
    return out


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
    if predicted.dtype != res.dtype or predicted.shape != res.shape:
        raise CorruptPatchError("a block's prediction does not match its residual")
    if transform is Transform.XOR:
        return res ^ predicted
    words = _unzigzag(res)
    words += predicted  # in place (wrapping, like +): one block-sized array less
    return words


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
    if layout is Layout.RICE:
        return rice_encode(words.astype(np.uint64))
    if layout is Layout.SPARSE:
        return sparse_encode(words)
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


def exact_prediction(payload: memoryview, layout: Layout, transform: Transform, width: int) -> bool:
    """Whether ``payload`` only says "the prediction was exact": its residual is all-zero
    frames (one per byte plane) under XOR or SUB, which leave the prediction unchanged.

    A fast path for the decoder, which then skips building a zero residual and
    combining it with the prediction: most blocks of a re-quantized or re-released
    model (their scales, zero points and many weights) are predicted exactly.
    `unpack_frames` would accept the same payload, so the result is the same.
    """
    if transform is Transform.NONE:
        return False
    if layout is Layout.INTERLEAVED:
        frames = 1
    elif layout is Layout.PLANES:
        frames = width
    else:
        return False
    return len(payload) == frames and payload.tobytes() == bytes([Frame.ZERO]) * frames


def _read_words(
    reader: _PayloadReader, count: int, dtype: np.dtype[np.unsignedinteger], layout: Layout
) -> Words:
    width = dtype.itemsize
    if layout is Layout.RICE:
        return _fit(rice_decode(reader, count), dtype)
    if layout is Layout.SPARSE:
        return sparse_decode(reader, count, dtype)
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

    def uint(self) -> int:
        return self._length()

    def take(self, n: int) -> memoryview:
        return self._take(n)

    def remaining(self) -> memoryview:
        return self._data[self._pos :]

    def skip(self, n: int) -> None:
        self._take(n)

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


RICE_MAX_K = 63
_RICE_CHUNK = 1 << 15  # words per step when unpacking remainder bits (bounds memory)
_UNARY_CHUNK = 1 << 16  # bytes per step when scanning unary codes


def _rice_k(u: NDArray[np.uint64]) -> int:
    """The Rice parameter that codes ``u`` in the fewest bits (near log2 of the mean)."""
    if not u.size:
        return 0
    mean = float(u.mean())
    guess = max(0, int(np.log2(mean + 1)) - 1) if mean > 0 else 0
    best: tuple[int, int] | None = None
    for k in range(max(0, guess - 2), min(RICE_MAX_K, guess + 3) + 1):
        bits = int((u >> np.uint64(k)).sum(dtype=np.uint64)) + u.size * (k + 1)
        if best is None or bits < best[0]:
            best = (bits, k)
    assert best is not None
    return best[1]


def rice_encode(u: NDArray[np.uint64]) -> bytes:
    """``k``, then the unary quotients (q zeros and a one, MSB first), then the k-bit
    remainders, each part padded to a byte."""
    k = _rice_k(u)
    out = bytearray([k])
    if not u.size:
        return bytes(out)
    q = (u >> np.uint64(k)).astype(np.int64)
    ones = np.cumsum(q + 1) - 1
    unary = np.zeros(int(ones[-1]) + 1, dtype=np.uint8)
    unary[ones] = 1
    out += np.packbits(unary).tobytes()
    if k:
        for start in range(0, u.size, _RICE_CHUNK):
            part = u[start : start + _RICE_CHUNK]
            shifts = np.arange(k - 1, -1, -1, dtype=np.uint64)
            bits = ((part[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
            out += np.packbits(bits.reshape(-1)).tobytes()
    return bytes(out)


def rice_decode(reader: _PayloadReader, count: int) -> NDArray[np.uint64]:
    """Inverse of `rice_encode` for ``count`` words; a damaged stream is CorruptPatchError."""
    head = reader.take(1)
    k = head[0]
    if k > RICE_MAX_K:
        raise CorruptPatchError(f"a Rice code with parameter {k}")
    out = np.empty(count, dtype=np.uint64)
    if not count:
        return out
    data = reader.remaining()
    found, base, last = 0, 0, -1
    step = min(_UNARY_CHUNK, 16 + count // 4)  # about two bits a word, then doubling
    while found < count:  # the ones end the codes: scan for ``count`` of them
        chunk = data[base // 8 : base // 8 + step]
        step = min(_UNARY_CHUNK, 2 * step)
        if not len(chunk):
            raise CorruptPatchError("a Rice code ends before its last word")
        bits = np.unpackbits(np.frombuffer(chunk, dtype=np.uint8))
        ones = np.flatnonzero(bits.view(np.bool_))  # 0/1 bytes: a bool view scans faster
        ends = ones[: count - found]  # where each code's terminating one is
        ends += base
        if ends.size:
            # the quotient is the number of zeros since the previous code's one
            quotients = out[found : found + ends.size]
            quotients[0] = int(ends[0]) - last - 1
            np.subtract(ends[1:], ends[:-1], out=quotients[1:], casting="unsafe")
            quotients[1:] -= np.uint64(1)
            last = int(ends[-1])
            found += ends.size
        base += len(chunk) * 8
    reader.skip(last // 8 + 1)
    if k:
        shift = np.uint64(k)
        for start in range(0, count, _RICE_CHUNK):
            n = min(_RICE_CHUNK, count - start)
            rem = _remainders(reader.take(-(-n * k // 8)), n, k)
            part = out[start : start + n]
            if int(part.max()) >> (64 - k):
                raise CorruptPatchError("a Rice code overflows 64 bits")
            np.left_shift(part, shift, out=part)
            np.bitwise_or(part, rem, out=part)
    return out


def _remainders(raw: memoryview, n: int, k: int) -> NDArray[np.uint64]:
    """``n`` k-bit numbers packed MSB first in ``raw``, as uint64.

    Each number's bits are right-aligned in a row of 8, 16, 32 or 64 zero bits, and
    the rows packed back into big-endian integers: a fixed handful of numpy passes
    whatever ``k`` is (shifting in one bit column at a time took ``2k`` passes).
    """
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=n * k).reshape(n, k)
    width = next(w for w in (8, 16, 32, 64) if k <= w)
    rows = np.zeros((n, width), dtype=np.uint8)
    rows[:, width - k :] = bits
    packed = np.packbits(rows.reshape(-1)).view(f">u{width // 8}")
    return packed.astype(np.uint64)


def _fit(u: NDArray[np.uint64], dtype: np.dtype[np.unsignedinteger]) -> Words:
    if u.size and int(u.max()) >> (8 * dtype.itemsize):
        raise CorruptPatchError(f"a decoded word does not fit {dtype.name}")
    return u.astype(dtype)


def sparse_encode(words: Words) -> bytes:
    """The count of nonzero words, then the gaps before each and their values less one."""
    where = np.flatnonzero(words)
    writer = varint.Writer()
    writer.uint(int(where.size))
    out = bytearray(writer.getvalue())
    if where.size:
        gaps = np.diff(where, prepend=-1) - 1
        out += rice_encode(gaps.astype(np.uint64))
        out += rice_encode(words[where].astype(np.uint64) - np.uint64(1))
    return bytes(out)


def sparse_decode(reader: _PayloadReader, count: int, dtype: np.dtype[np.unsignedinteger]) -> Words:
    n = reader.uint()
    if n > count:
        raise CorruptPatchError(f"a sparse residual with {n} nonzero words of {count}")
    words = np.zeros(count, dtype=dtype)
    if n:
        gaps = rice_decode(reader, n)
        if int(gaps.sum(dtype=np.float64)) > count:  # float64: a sum that cannot wrap
            raise CorruptPatchError("a sparse residual's positions run past its block")
        where = np.cumsum(gaps.astype(np.int64) + 1) - 1
        if where[-1] >= count:
            raise CorruptPatchError("a sparse residual's positions run past its block")
        values = rice_decode(reader, n)
        if (values == np.uint64(2**64 - 1)).any():
            raise CorruptPatchError("a sparse residual's value overflows")
        words[where] = _fit(values + np.uint64(1), dtype)
    return words


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
SPARSE_WORTHWHILE = 0.5  # try SPARSE when at most this share of words is not zero


def _layouts(res: Words) -> list[Layout]:
    layouts = (
        [Layout.INTERLEAVED] if res.dtype.itemsize == 1 else [Layout.PLANES, Layout.INTERLEAVED]
    )
    if res.size:
        for layout, bits in PACK_BITS.items():
            small = np.count_nonzero(res < res.dtype.type((1 << bits) - 1))
            if small >= PACK_WORTHWHILE * res.size:
                layouts.append(layout)
        if np.count_nonzero(res < res.dtype.type(255)) >= PACK_WORTHWHILE * res.size:
            layouts.append(Layout.RICE)
        if np.count_nonzero(res) <= SPARSE_WORTHWHILE * res.size:
            layouts.append(Layout.SPARSE)
    return layouts


def best_residual(
    new: Words,
    predicted: Words | None,
    grouping: Grouping | None = None,
    level: int = FAST_LEVEL,
) -> Trial:
    """The smallest of the transform x layout options for ``new`` given a prediction.

    Sizes are taken at FAST_LEVEL, except that a Rice layout (whose size does not
    depend on the level) is checked against the best zstd one at ``level``.
    """
    best: Trial | None = None
    best_zstd: Trial | None = None
    transforms = [Transform.XOR, Transform.SUB] if predicted is not None else [Transform.NONE]
    for transform in transforms:
        res = residual(new, predicted, transform)
        layouts = _layouts(res) + ([Layout.GROUPED] if grouping is not None else [])
        for layout in layouts:
            size = len(pack_frames(res, layout, FAST_LEVEL, grouping))
            trial = Trial(size, transform, layout, res)
            if best is None or size < best.size:
                best = trial
            if layout not in RICE_LAYOUTS and (best_zstd is None or size < best_zstd.size):
                best_zstd = trial
    if best is None:  # _options is never empty
        raise AssertionError("no residual options")
    if best.layout in RICE_LAYOUTS and best_zstd is not None and level != FAST_LEVEL:
        slow = len(pack_frames(best_zstd.residual, best_zstd.layout, level, grouping))
        if slow <= best.size:
            return replace(best_zstd, size=slow)
    return best
