"""The delta's table of contents: skeleton size, old ranges to cut, parameters and blocks.

Serialized as varints (offsets as differences from the previous block's end, old
offsets relative to the block's own) and zstd'd, so a hundred tensors cost a few
hundred bytes. Every field is range-checked when read: a damaged table raises
CorruptPatchError, never an IndexError deep in numpy.
"""

from __future__ import annotations

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
from artifact.delta.dtypes import Storage
from artifact.delta.errors import CorruptPatchError
from artifact.delta.frames import Layout, Transform
from artifact.delta.varint import Reader, Writer

MAX_ENTRIES = 1 << 24
_BIG = 1 << 48


@dataclass(frozen=True)
class Table:
    skeleton_len: int  # bytes of the new file that no block covers
    old_cuts: tuple[tuple[int, int], ...]  # (offset, length): old bytes left out of its skeleton
    params: tuple[Block, ...]  # decoded first and kept: scales and zero points
    blocks: tuple[Block, ...]  # in output order


def _ref(w: Writer, ref: OldRef, anchor: int) -> None:
    w.sint(ref.offset - anchor)
    w.uint(ref.nbytes)
    w.uint(ref.dtype)
    w.uint(ref.storage)


def _channels(w: Writer, ch: Channels) -> None:
    w.uint(ch.count)
    w.uint(ch.inner)


def _block(w: Writer, b: Block, prev_end: int) -> None:
    w.sint(b.out_offset - prev_end)
    w.uint(b.out_nbytes)
    w.uint(b.dtype)
    w.uint(b.storage)
    w.uint(b.word_start)
    w.uint(b.word_count)
    w.uint(b.predictor)
    if b.predictor is Predictor.COPY:
        w.sint(b.copy_from - b.out_offset)
    elif b.predictor is Predictor.VALUES and b.values is not None:
        _ref(w, b.values, b.out_offset)
    elif b.predictor is Predictor.QUANT and b.quant is not None:
        q = b.quant
        _ref(w, q.source, b.out_offset)
        w.uint(0 if q.dequant is None else 1)
        if q.dequant is not None:
            _ref(w, q.dequant.scale, b.out_offset)
            w.uint(0 if q.dequant.zero_point is None else 1)
            if q.dequant.zero_point is not None:
                _ref(w, q.dequant.zero_point, b.out_offset)
            _channels(w, q.dequant.channels)
        w.uint(q.scale)
        w.uint(0 if q.zero_point is None else q.zero_point + 1)
        _channels(w, q.channels)
        w.uint(q.precision)
        w.sint(q.lo)
        w.sint(q.hi)
    elif b.predictor is Predictor.SCALE and b.scale_fit is not None:
        fit = b.scale_fit
        _ref(w, fit.source, b.out_offset)
        _channels(w, fit.channels)
        w.uint(1 if fit.symmetric else 0)
        w.uint(fit.levels)
    elif b.predictor is Predictor.PRODUCT and b.product is not None:
        w.uint(b.product.left)
        w.uint(b.product.right)
    elif b.predictor is Predictor.DECAY and b.decay is not None:
        _ref(w, b.decay.source, b.out_offset)
        w.uint(b.decay.factor_bits)
        w.uint(b.decay.steps)
    w.uint(b.transform)
    w.uint(b.layout)
    w.uint(b.payload_len)


def pack_table(table: Table) -> bytes:
    w = Writer()
    w.uint(table.skeleton_len)
    w.uint(len(table.old_cuts))
    prev = 0
    for offset, length in table.old_cuts:
        w.uint(offset - prev)
        w.uint(length)
        prev = offset + length
    for blocks in (table.params, table.blocks):
        w.uint(len(blocks))
        prev = 0
        for b in blocks:
            _block(w, b, prev)
            prev = b.out_offset + b.out_nbytes
    return w.getvalue()


def _read_ref(r: Reader, anchor: int) -> OldRef:
    offset = anchor + r.sint(_BIG)
    return OldRef(offset, r.uint(_BIG), r.uint(1 << 16), Storage(r.uint(1)))


def _read_channels(r: Reader) -> Channels:
    count, inner = r.uint(_BIG), r.uint(_BIG)
    if count < 1 or inner < 1:
        raise CorruptPatchError("a channel layout with zero channels")
    return Channels(count, inner)


def _read_block(r: Reader, prev_end: int) -> Block:
    out_offset = prev_end + r.sint(_BIG)
    out_nbytes = r.uint(_BIG)
    dtype = r.uint(1 << 16)
    storage = Storage(r.uint(1))
    word_start, word_count = r.uint(_BIG), r.uint(_BIG)
    predictor = Predictor(r.uint(max(Predictor)))
    copy_from, values, quant, scale_fit, product, decay = 0, None, None, None, None, None
    if predictor is Predictor.COPY:
        copy_from = out_offset + r.sint(_BIG)
    elif predictor is Predictor.VALUES:
        values = _read_ref(r, out_offset)
    elif predictor is Predictor.QUANT:
        source = _read_ref(r, out_offset)
        dequant = None
        if r.uint(1):
            scale = _read_ref(r, out_offset)
            zero_point = _read_ref(r, out_offset) if r.uint(1) else None
            dequant = Dequant(scale, zero_point, _read_channels(r))
        scale_index = r.uint(MAX_ENTRIES)
        zp = r.uint(MAX_ENTRIES)
        channels = _read_channels(r)
        precision = r.uint(8)
        lo, hi = r.sint(), r.sint()
        quant = Quant(
            source, dequant, scale_index, zp - 1 if zp else None, channels, precision, lo, hi
        )
    elif predictor is Predictor.SCALE:
        source = _read_ref(r, out_offset)
        channels = _read_channels(r)
        scale_fit = ScaleFit(source, channels, bool(r.uint(1)), r.uint(1 << 32))
    elif predictor is Predictor.PRODUCT:
        product = Product(r.uint(MAX_ENTRIES), r.uint(MAX_ENTRIES))
    elif predictor is Predictor.DECAY:
        decay = Decay(_read_ref(r, out_offset), r.uint(1 << 32), r.uint(1 << 16))
    transform = Transform(r.uint(2))
    layout = Layout(r.uint(max(Layout)))
    payload_len = r.uint(_BIG)
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


def unpack_table(data: bytes) -> Table:
    try:
        r = Reader(data)
        skeleton_len = r.uint(_BIG)
        cuts = []
        prev = 0
        for _ in range(r.uint(MAX_ENTRIES)):
            offset = prev + r.uint(_BIG)
            length = r.uint(_BIG)
            cuts.append((offset, length))
            prev = offset + length
        lists: list[tuple[Block, ...]] = []
        for _ in range(2):
            blocks = []
            prev = 0
            for _ in range(r.uint(MAX_ENTRIES)):
                block = _read_block(r, prev)
                blocks.append(block)
                prev = block.out_offset + block.out_nbytes
            lists.append(tuple(blocks))
        if not r.done:
            raise CorruptPatchError("the delta's table has trailing bytes")
    except ValueError as exc:  # VarintError, or an enum given an unknown value
        raise CorruptPatchError(f"the delta's table is damaged: {exc}") from exc
    return Table(skeleton_len, tuple(cuts), lists[0], lists[1])
