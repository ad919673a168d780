"""The delta's table of contents: skeleton size, old ranges to cut, parameters and blocks.

Format version 3 (4: copies carry no payload length). Both sides list the old file's
tensors with `onnx_wire.find_tensors` (numpy-free protobuf walking; the base's sha256 is
checked first, so the list is the same), and the table refers to them by index: an old
tensor costs one varint instead of offset, size, dtype and storage, and the ranges cut
from the old skeleton are runs of that list. A block's position is coded relative to the
old tensor it is predicted from (zero when a re-release keeps the layout) or to the
previous block's end, whichever the encoder found shorter. Fields are written column by
column (all positions, then all sizes, ...) so that zstd sees runs of alike values.

Every field is range-checked when read: a damaged table raises CorruptPatchError, never
an IndexError deep in numpy.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from artifact.delta.codecs import (
    Block,
    Channels,
    Decay,
    Dequant,
    OldRef,
    Predictor,
    Product,
    Quant,
    ScaleFit,
)
from artifact.delta.dtypes import Storage, element_type
from artifact.delta.errors import CorruptPatchError
from artifact.delta.frames import Layout, Transform
from artifact.delta.onnx_wire import find_tensors
from artifact.delta.varint import Reader, Writer

MAX_ENTRIES = 1 << 24
_BIG = 1 << 48


@dataclass(frozen=True)
class Table:
    skeleton_len: int  # bytes of the new file that no block covers
    old_cuts: tuple[tuple[int, int], ...]  # (offset, length): old bytes left out of its skeleton
    params: tuple[Block, ...]  # decoded first and kept: scales and zero points
    blocks: tuple[Block, ...]  # in output order


def old_tensors(data: bytes | memoryview) -> tuple[OldRef, ...]:
    """The old file's tensors as the table indexes them (the same on both sides)."""
    return tuple(OldRef(s.offset, s.nbytes, s.etype.code, s.storage) for s in find_tensors(data))


class _Col(enum.IntEnum):
    """The table's columns, in the order they are stored."""

    HEAD = 0  # skeleton size, cuts, block counts
    KIND = 1  # dtype, storage, (layout x transform) x predictor
    POS = 2  # out offset: (zigzag delta << 1) | relative-to-the-old-tensor
    SIZE = 3  # word start and count, out size minus count x width; copies: out size
    REF = 4  # old tensors: 0 = explicit (EXPLICIT), else 1 + zigzag(index - previous)
    EXPLICIT = 5  # old tensor references not in the list: offset, size, dtype, storage
    ARGS = 6  # the predictors' own numbers: channels, parameter indices, clip range, ...
    LEN = 7  # payload lengths


_PREDICTORS = 8  # KIND codes predictor, transform and layout in one number (format 4)
assert max(Predictor) < _PREDICTORS


class _Place(enum.IntEnum):
    """What a block's position (POS) is relative to."""

    AFTER = 0  # the previous block's end
    SOURCE = 1  # where its old tensor's words are (`_anchor`)
    OLD_TENSOR = 2  # an old tensor's start, named in REF (a parameter keeping its place)


def _zigzag(value: int) -> int:
    return value * 2 if value >= 0 else -value * 2 - 1


def _unzigzag(value: int) -> int:
    return value >> 1 if value % 2 == 0 else -((value + 1) >> 1)


class _Writers:
    def __init__(self, old: Sequence[OldRef]) -> None:
        self.cols = [Writer() for _ in _Col]
        self.old = old  # sorted by offset, as find_tensors returns them
        self.offsets = [ref.offset for ref in old]
        self.index = {ref: i for i, ref in enumerate(old)}
        self.last_ref = 0
        self.last_scale = 0

    def __getitem__(self, col: _Col) -> Writer:
        return self.cols[col]

    def ref(self, ref: OldRef) -> None:
        index = self.index.get(ref)
        if index is None:
            self[_Col.REF].uint(0)
            w = self[_Col.EXPLICIT]
            w.uint(ref.offset)
            w.uint(ref.nbytes)
            w.uint(ref.dtype)
            w.uint(ref.storage)
            return
        self[_Col.REF].uint(1 + _zigzag(index - self.last_ref))
        self.last_ref = index

    def getvalue(self) -> bytes:
        out = Writer()
        parts = [c.getvalue() for c in self.cols]
        for part in parts:
            out.uint(len(part))
        return out.getvalue() + b"".join(parts)


class _Readers:
    def __init__(self, data: bytes, old: Sequence[OldRef]) -> None:
        head = Reader(data)
        lengths = [head.uint(len(data)) for _ in _Col]
        pos = head.position
        if pos + sum(lengths) != len(data):
            raise CorruptPatchError("the delta's table columns do not add up to its size")
        self.cols = []
        for length in lengths:
            self.cols.append(Reader(data[pos : pos + length]))
            pos += length
        self.old = old
        self.last_ref = 0
        self.last_scale = 0

    def __getitem__(self, col: _Col) -> Reader:
        return self.cols[col]

    def ref(self) -> OldRef:
        code = self[_Col.REF].uint(_BIG)
        if code == 0:
            r = self[_Col.EXPLICIT]
            return OldRef(r.uint(_BIG), r.uint(_BIG), r.uint(1 << 16), Storage(r.uint(1)))
        index = self.last_ref + _unzigzag(code - 1)
        if not 0 <= index < len(self.old):
            raise CorruptPatchError(
                f"the delta refers to old tensor {index} of {len(self.old)}: "
                "it was made for another base"
            )
        self.last_ref = index
        return self.old[index]

    def check_done(self) -> None:
        if not all(c.done for c in self.cols):
            raise CorruptPatchError("the delta's table has trailing bytes")


def _source(b: Block) -> OldRef | None:
    """The old tensor a block is predicted from: its position is coded relative to it."""
    if b.values is not None:
        return b.values
    if b.quant is not None:
        return b.quant.source
    if b.scale_fit is not None:
        return b.scale_fit.source
    if b.decay is not None:
        return b.decay.source
    return None


def _anchor(b: Block) -> int | None:
    """Where the block would start if the new file kept the old one's layout."""
    return _anchor_of(b.predictor, b.copy_from, _source(b), b.storage, b.dtype, b.word_start)


def _anchor_of(
    predictor: Predictor,
    copy_from: int,
    source: OldRef | None,
    storage: Storage,
    dtype: int,
    word_start: int,
) -> int | None:
    """`_anchor` from a block's fields: the reader places a block before it builds it."""
    if predictor is Predictor.COPY:
        return copy_from
    if source is None:
        return None
    if storage is Storage.RAW:
        return source.offset + word_start * element_type(dtype).width
    return source.offset


def _channels(w: Writer, ch: Channels, same: Channels | None = None) -> None:
    """0: the same channels as ``same`` (a requantized tensor keeps its axis); else count, inner."""
    if ch == same:
        w.uint(0)
        return
    w.uint(ch.count)
    w.uint(ch.inner)


def _write_copy(w: _Writers, b: Block) -> None:
    """A copy's source: the old tensor it lies in, and how far into it."""
    owner = _owner(w, b.copy_from, b.out_nbytes)
    if owner is None:
        w[_Col.REF].uint(0)
        w[_Col.EXPLICIT].uint(b.copy_from)
        return
    index, ref = owner
    w[_Col.REF].uint(1 + _zigzag(index - w.last_ref))
    w.last_ref = index
    w[_Col.ARGS].uint(b.copy_from - ref.offset)


def _owner(w: _Writers, offset: int, nbytes: int) -> tuple[int, OldRef] | None:
    """The old tensor holding bytes ``offset .. offset+nbytes``, if one does."""
    index = bisect.bisect_right(w.offsets, offset) - 1
    if index < 0:
        return None
    ref = w.old[index]
    return (index, ref) if offset + nbytes <= ref.offset + ref.nbytes else None


def _write_block(w: _Writers, b: Block, prev_end: int) -> None:
    kind = w[_Col.KIND]
    kind.uint(b.dtype)
    kind.uint(b.storage)
    kind.uint((b.layout * len(Transform) + b.transform) * _PREDICTORS + b.predictor)
    size = w[_Col.SIZE]
    args = w[_Col.ARGS]
    if b.predictor is Predictor.COPY:
        size.uint(b.out_nbytes)
        _write_copy(w, b)
    else:
        size.uint(b.word_start)
        size.uint(b.word_count)
        size.sint(b.out_nbytes - b.word_count * element_type(b.dtype).width)
    if b.predictor is Predictor.VALUES and b.values is not None:
        w.ref(b.values)
    elif b.predictor is Predictor.QUANT and b.quant is not None:
        q = b.quant
        w.ref(q.source)
        args.uint(0 if q.dequant is None else 1 + (q.dequant.zero_point is not None))
        if q.dequant is not None:
            w.ref(q.dequant.scale)
            if q.dequant.zero_point is not None:
                w.ref(q.dequant.zero_point)
            _channels(args, q.dequant.channels)
        args.sint(q.scale - w.last_scale)
        w.last_scale = q.scale
        args.uint(0 if q.zero_point is None else 1 + _zigzag(q.zero_point - q.scale))
        _channels(args, q.channels, None if q.dequant is None else q.dequant.channels)
        args.uint(q.precision)
        args.sint(q.lo)
        args.sint(q.hi)
    elif b.predictor is Predictor.SCALE and b.scale_fit is not None:
        fit = b.scale_fit
        w.ref(fit.source)
        _channels(args, fit.channels)
        args.uint(1 if fit.symmetric else 0)
        args.uint(fit.levels)
    elif b.predictor is Predictor.PRODUCT and b.product is not None:
        args.uint(b.product.left)
        args.uint(b.product.right)
    elif b.predictor is Predictor.DECAY and b.decay is not None:
        w.ref(b.decay.source)
        args.uint(b.decay.factor_bits)
        args.uint(b.decay.steps)
    anchor = _anchor(b)
    after = b.out_offset - prev_end
    owner = _owner(w, b.out_offset, 0) if anchor is None else None
    if anchor is not None and abs(b.out_offset - anchor) <= abs(after):
        w[_Col.POS].uint(_zigzag(b.out_offset - anchor) << 2 | _Place.SOURCE)
    elif owner is not None and b.out_offset - owner[1].offset < abs(after):
        index, ref = owner
        w[_Col.REF].uint(1 + _zigzag(index - w.last_ref))
        w.last_ref = index
        w[_Col.POS].uint(_zigzag(b.out_offset - ref.offset) << 2 | _Place.OLD_TENSOR)
    else:
        w[_Col.POS].uint(_zigzag(after) << 2 | _Place.AFTER)
    if b.predictor is not Predictor.COPY:  # a copy has no payload
        w[_Col.LEN].uint(b.payload_len)


def pack_table(table: Table, old: Sequence[OldRef]) -> bytes:
    """The table's bytes; ``old`` is `old_tensors` of the base."""
    w = _Writers(old)
    head = w[_Col.HEAD]
    head.uint(table.skeleton_len)
    _write_cuts(head, table.old_cuts, old)
    for blocks in (table.params, table.blocks):
        head.uint(len(blocks))
        prev = 0
        for b in blocks:
            _write_block(w, b, prev)
            prev = b.out_offset + b.out_nbytes
    return w.getvalue()


def _write_cuts(head: Writer, cuts: tuple[tuple[int, int], ...], old: Sequence[OldRef]) -> None:
    """Cuts that are old tensors as runs (skip, take) of the list; any others explicitly."""
    where = {(ref.offset, ref.nbytes): i for i, ref in enumerate(old)}
    listed = sorted(where[c] for c in cuts if c in where)
    others = [c for c in cuts if c not in where]
    runs: list[tuple[int, int]] = []
    pos = 0
    for index in listed:
        if runs and index == pos:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index - pos, 1))
        pos = index + 1
    head.uint(len(runs))
    for skip, take in runs:
        head.uint(skip)
        head.uint(take)
    head.uint(len(others))
    prev = 0
    for offset, length in sorted(others):
        head.sint(offset - prev)
        head.uint(length)
        prev = offset + length


def _read_cuts(head: Reader, old: Sequence[OldRef]) -> tuple[tuple[int, int], ...]:
    cuts: list[tuple[int, int]] = []
    pos = 0
    for _ in range(head.uint(MAX_ENTRIES)):
        pos += head.uint(MAX_ENTRIES)
        take = head.uint(MAX_ENTRIES)
        if pos + take > len(old):
            raise CorruptPatchError("the delta cuts old tensors its base does not have")
        cuts.extend((ref.offset, ref.nbytes) for ref in old[pos : pos + take])
        pos += take
    prev = 0
    for _ in range(head.uint(MAX_ENTRIES)):
        offset = prev + head.sint(_BIG)
        length = head.uint(_BIG)
        if offset < 0:
            raise CorruptPatchError("the delta cuts bytes before the start of its base")
        cuts.append((offset, length))
        prev = offset + length
    return tuple(sorted(cuts))


def _read_channels(r: Reader, same: Channels | None = None) -> Channels:
    count = r.uint(_BIG)
    if count == 0 and same is not None:
        return same
    inner = r.uint(_BIG) if count else 0
    if count < 1 or inner < 1:
        raise CorruptPatchError("a channel layout with zero channels")
    return Channels(count, inner)


def _read_copy(r: _Readers) -> int:
    code = r[_Col.REF].uint(_BIG)
    if code == 0:
        return r[_Col.EXPLICIT].uint(_BIG)
    index = r.last_ref + _unzigzag(code - 1)
    if not 0 <= index < len(r.old):
        raise CorruptPatchError(f"a copy from old tensor {index} of {len(r.old)}")
    r.last_ref = index
    return r.old[index].offset + r[_Col.ARGS].uint(_BIG)


# Every KIND code (see `_write_block`) as its (predictor, transform, layout), decoded
# once here rather than through three enum constructors per block; None: no predictor.
_KIND_CODES: tuple[tuple[Predictor, Transform, Layout] | None, ...] = tuple(
    (
        Predictor(code % _PREDICTORS),
        Transform(code // _PREDICTORS % len(Transform)),
        Layout(code // _PREDICTORS // len(Transform)),
    )
    if code % _PREDICTORS in set(Predictor)
    else None
    for code in range(len(Layout) * len(Transform) * _PREDICTORS)
)
_STORAGES = tuple(Storage)  # by value: RAW, VARINT


def _read_block(r: _Readers, prev_end: int) -> Block:
    kind = r[_Col.KIND]
    dtype = kind.uint(1 << 16)
    storage = _STORAGES[kind.uint(len(_STORAGES) - 1)]
    code = kind.uint(len(_KIND_CODES) - 1)
    decoded = _KIND_CODES[code]
    if decoded is None:
        raise CorruptPatchError(f"a block with unknown predictor {code % _PREDICTORS}")
    predictor, transform, layout = decoded
    size, args = r[_Col.SIZE], r[_Col.ARGS]
    word_start, word_count, copy_from = 0, 0, 0
    if predictor is Predictor.COPY:
        out_nbytes = size.uint(_BIG)
        copy_from = _read_copy(r)
    else:
        word_start, word_count = size.uint(_BIG), size.uint(_BIG)
        out_nbytes = word_count * element_type(dtype).width + size.sint(_BIG)
        if out_nbytes < 0:
            raise CorruptPatchError("a block of negative size")
    values, quant, scale_fit, product, decay = None, None, None, None, None
    source: OldRef | None = None  # what the block is predicted from (see `_source`)
    if predictor is Predictor.VALUES:
        values = source = r.ref()
    elif predictor is Predictor.QUANT:
        source = r.ref()
        dequant = None
        flag = args.uint(2)
        if flag:
            scale = r.ref()
            zero_point = r.ref() if flag == 2 else None
            dequant = Dequant(scale, zero_point, _read_channels(args))
        scale_index = r.last_scale + args.sint(MAX_ENTRIES)
        if not 0 <= scale_index <= MAX_ENTRIES:
            raise CorruptPatchError(f"a scale that is parameter {scale_index}")
        r.last_scale = scale_index
        zp = args.uint(2 * MAX_ENTRIES)
        zp_index = None if zp == 0 else scale_index + _unzigzag(zp - 1)
        if zp_index is not None and not 0 <= zp_index <= MAX_ENTRIES:
            raise CorruptPatchError(f"a zero point that is parameter {zp_index}")
        channels = _read_channels(args, None if dequant is None else dequant.channels)
        precision = args.uint(8)
        lo, hi = args.sint(), args.sint()
        quant = Quant(source, dequant, scale_index, zp_index, channels, precision, lo, hi)
    elif predictor is Predictor.SCALE:
        source = r.ref()
        channels = _read_channels(args)
        scale_fit = ScaleFit(source, channels, bool(args.uint(1)), args.uint(1 << 32))
    elif predictor is Predictor.PRODUCT:
        product = Product(args.uint(MAX_ENTRIES), args.uint(MAX_ENTRIES))
    elif predictor is Predictor.DECAY:
        source = r.ref()
        decay = Decay(source, args.uint(1 << 32), args.uint(1 << 16))
    payload_len = 0 if predictor is Predictor.COPY else r[_Col.LEN].uint(_BIG)
    # The position comes last: it may be relative to the block's own old tensor, so
    # it is resolved from the fields above and the block built once, already placed.
    pos = r[_Col.POS].uint(_BIG)
    delta = _unzigzag(pos >> 2)
    place = pos & 3
    if place == _Place.SOURCE:
        anchor = _anchor_of(predictor, copy_from, source, storage, dtype, word_start)
        if anchor is None:
            raise CorruptPatchError("a block placed relative to an old tensor it does not use")
        out_offset = anchor + delta
    elif place == _Place.OLD_TENSOR:
        out_offset = r.ref().offset + delta
    elif place == _Place.AFTER:
        out_offset = prev_end + delta
    else:
        raise CorruptPatchError(f"a block with unknown placement {place}")
    if out_offset < 0:
        raise CorruptPatchError("a block starts before the beginning of the file")
    return Block(
        out_offset,
        out_nbytes,
        dtype,
        storage,
        word_start,
        word_count,
        predictor,
        copy_from,
        values,
        quant,
        scale_fit,
        product,
        decay,
        transform,
        layout,
        payload_len,
    )


def unpack_table(data: bytes, old: Sequence[OldRef]) -> Table:
    """The table ``pack_table`` wrote, against the same ``old_tensors`` of the base."""
    try:
        r = _Readers(data, old)
        head = r[_Col.HEAD]
        skeleton_len = head.uint(_BIG)
        cuts = _read_cuts(head, old)
        lists: list[tuple[Block, ...]] = []
        for _ in range(2):
            blocks = []
            prev = 0
            for _ in range(head.uint(MAX_ENTRIES)):
                block = _read_block(r, prev)
                blocks.append(block)
                prev = block.out_offset + block.out_nbytes
            lists.append(tuple(blocks))
        r.check_done()
    except ValueError as exc:  # VarintError, or an enum given an unknown value
        raise CorruptPatchError(f"the delta's table is damaged: {exc}") from exc
    return Table(skeleton_len, cuts, lists[0], lists[1])
