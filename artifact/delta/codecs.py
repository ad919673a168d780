"""Per-tensor encodings: predict a block of the new tensor from what the device holds.

A block is up to ``BLOCK_WORDS`` words of one tensor. Its *predictor* guesses the new
words from the old model (and from scales decoded earlier, the *parameters*):

- ``COPY``: the bytes are somewhere in the old file already (unchanged or renamed);
- ``VALUES``: the old tensor of the same name, converted to the new element type
  (identity for a fine-tune, float32 → float16 for a re-typed tensor);
- ``QUANT``: the old float tensor quantized with the new scale and zero point (ORT's
  QuantizeLinear: ``clip(round(x / scale) + zero_point)``, per tensor or per channel),
  or an old integer tensor dequantized with its old parameters and requantized;
- ``SCALE``: a quantization scale recomputed from the old float weights;
- ``PRODUCT``: a bias scale, the product of two earlier scales;
- ``DECAY``: float32 weights shrunk by AdamW's decoupled weight decay.

What is left (the residual) is coded by frames.py. Every computation here is exact and
the same on x86 and ARM: bit patterns, integer arithmetic, IEEE division, multiplication
and round-half-to-even, and no float-to-integer cast of a value not already rounded
and clipped into range.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from artifact.delta import varint
from artifact.delta.dtypes import (
    ElementType,
    Kind,
    Storage,
    castable,
    element_type,
    varint_storable,
)
from artifact.delta.errors import CorruptPatchError
from artifact.delta.frames import GROUP_MIN_WORDS, Grouping, Layout, Transform, group_by
from artifact.delta.words import (
    Values,
    Words,
    convert,
    to_float,
    values_to_words,
    words_to_values,
)

_Operands = tuple[NDArray[Any], Values]  # see `_by_channel`

BLOCK_WORDS = 1 << 20  # bounds the decoder's working memory per block (~8 bytes a word)


class Predictor(enum.IntEnum):
    NONE = 0
    COPY = 1
    VALUES = 2
    QUANT = 3
    SCALE = 4
    PRODUCT = 5
    DECAY = 6


@dataclass(frozen=True)
class OldRef:
    """A tensor payload in the old file."""

    offset: int
    nbytes: int
    dtype: int
    storage: Storage


@dataclass(frozen=True)
class Channels:
    """Which scale applies to word ``i``: ``(i // inner) % count`` (per-tensor: count 1)."""

    count: int
    inner: int

    def expand(self, values: Values, start: int, n: int) -> Values:
        """``values[(i // inner) % count]`` for i in ``start .. start+n``, by runs.

        A block spans whole runs of ``inner`` words with one value each: repeating
        per run is several times faster than indexing word by word.
        """
        if n == 0:
            return values[:0]
        if self.inner == 1:  # a new value every word: the values, cycled
            return np.resize(np.roll(values, -(start % self.count)), n)
        first, last = start // self.inner, (start + n - 1) // self.inner
        runs = np.arange(first, last + 1, dtype=np.int64)
        counts = np.full(runs.size, self.inner, dtype=np.int64)
        counts[0] -= start - first * self.inner
        counts[-1] -= (last + 1) * self.inner - (start + n)
        return np.repeat(values[runs % self.count], counts)

    def grid(self, start: int, n: int) -> tuple[int, int, int] | None:
        """Words ``start .. start+n`` as (outer, count, inner), when they are whole periods.

        A block that starts and ends on a multiple of ``count * inner`` words (any
        tensor that fits one block) can then meet its per-channel values by
        broadcasting, with no expanded copy of them; None when it does not.
        """
        period = self.count * self.inner
        if start % period or n % period:
            return None
        return (n // period, self.count, self.inner)


PER_TENSOR = Channels(1, 1)


@dataclass(frozen=True)
class Dequant:
    """How to turn an old integer tensor back into floats: its old scale and zero point."""

    scale: OldRef
    zero_point: OldRef | None
    channels: Channels


@dataclass(frozen=True)
class Quant:
    """Predict integers by quantizing old values with the new scale and zero point."""

    source: OldRef
    dequant: Dequant | None
    scale: int  # index of the new scale tensor among the delta's parameters
    zero_point: int | None  # parameter index; None: zero
    channels: Channels
    precision: int  # 4: float32 arithmetic (ORT weights), 8: float64 (ORT int32 biases)
    lo: int
    hi: int


@dataclass(frozen=True)
class ScaleFit:
    """Predict a quantization scale from the old float weights it was computed from.

    onnxruntime's ``compute_scale_zp``: per channel, ``rmin = min(min(x), 0)``,
    ``rmax = max(max(x), 0)`` (symmetric: both ``±max(|rmin|, |rmax|)``), then
    ``scale = float64(rmax - rmin) / levels`` stored in the weights' float type.
    """

    source: OldRef
    channels: Channels
    symmetric: bool
    levels: int  # qmax - qmin, e.g. 254 for symmetric int8


@dataclass(frozen=True)
class Product:
    """Predict a scale as the float32 product of two earlier parameters.

    onnxruntime quantizes a bias with ``input_scale * weight_scale``.
    """

    left: int
    right: int


MAX_DECAY_STEPS = 256


@dataclass(frozen=True)
class Decay:
    """Predict float32 weights as the old ones shrunk by decoupled weight decay.

    AdamW multiplies every weight by ``1 - lr * weight_decay`` each step before its
    update; a weight that got no gradient (an embedding row no batch used) ends up at
    ``old * factor`` rounded to float32, ``steps`` times over. Other weights moved for
    their own reasons and are coded as a residual, as with VALUES.
    """

    source: OldRef
    factor_bits: int  # the float32 factor's bit pattern
    steps: int


@dataclass(frozen=True)
class Block:
    """One coded run of a tensor's words, and where its bytes go in the new file."""

    out_offset: int
    out_nbytes: int
    dtype: int
    storage: Storage
    word_start: int  # index of the first word within its tensor
    word_count: int
    predictor: Predictor
    copy_from: int = 0  # COPY: offset in the old file
    values: OldRef | None = None  # VALUES
    quant: Quant | None = None  # QUANT
    scale_fit: ScaleFit | None = None  # SCALE
    product: Product | None = None  # PRODUCT
    decay: Decay | None = None  # DECAY
    transform: Transform = Transform.NONE
    layout: Layout = Layout.INTERLEAVED
    payload_len: int = 0

    @property
    def etype(self) -> ElementType:
        return element_type(self.dtype)

    def check(self) -> None:
        """Refuse a block whose fields contradict each other (a crafted or buggy delta)."""
        etype = self.etype
        if self.storage is Storage.VARINT and not varint_storable(etype):
            raise CorruptPatchError(f"a {etype.name} block stored as varints")
        raw = self.storage is Storage.RAW and self.predictor is not Predictor.COPY
        if raw and self.out_nbytes != self.word_count * etype.width:
            raise CorruptPatchError("a block's byte size does not match its word count")
        refs = (
            self.values,
            self.quant.source if self.quant else None,
            self.scale_fit.source if self.scale_fit else None,
            self.decay.source if self.decay else None,
        )
        for ref in refs:
            if ref is not None:
                check_ref(ref)

    @property
    def word_dtype(self) -> np.dtype[np.unsignedinteger]:
        return np.dtype(np.uint64) if self.storage is Storage.VARINT else self.etype.word


def check_ref(ref: OldRef) -> None:
    if ref.storage is Storage.VARINT and not varint_storable(element_type(ref.dtype)):
        raise CorruptPatchError("an old tensor reference with an impossible layout")


class OldModel:
    """Read access to the base file: bytes by range, and tensor values by reference."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self._varints: dict[OldRef, Words] = {}

    def span(self, offset: int, nbytes: int) -> memoryview:
        if offset < 0 or nbytes < 0 or offset + nbytes > len(self.data):
            raise CorruptPatchError(
                f"the delta refers to bytes {offset}..{offset + nbytes} of a "
                f"{len(self.data)}-byte base"
            )
        return self.data[offset : offset + nbytes]

    def words(self, ref: OldRef, start: int, count: int) -> Words:
        """Words ``start .. start+count`` of ``ref``, cut short where the tensor ends."""
        check_ref(ref)
        etype = element_type(ref.dtype)
        if ref.storage is Storage.VARINT:
            whole = self._varints.get(ref)
            if whole is None:
                try:
                    whole = varint.decode(self.span(ref.offset, ref.nbytes))
                except varint.VarintError as exc:
                    raise CorruptPatchError(f"an old tensor is not varints: {exc}") from exc
                self._varints[ref] = whole
            return whole[start : start + count]
        width = etype.width
        total = ref.nbytes // width
        if ref.nbytes % width:
            raise CorruptPatchError("an old tensor's size is not a whole number of elements")
        stop = min(start + count, total)
        if start >= stop:
            return np.zeros(0, dtype=etype.word)
        return np.frombuffer(
            self.span(ref.offset + start * width, (stop - start) * width), dtype=etype.word
        )

    def values(self, ref: OldRef, start: int, count: int) -> Values:
        return words_to_values(self.words(ref, start, count), element_type(ref.dtype), ref.storage)


@dataclass(frozen=True)
class Param:
    """A small new tensor decoded ahead of the blocks (a scale or a zero point)."""

    etype: ElementType
    storage: Storage
    words: Words

    @property
    def values(self) -> Values:
        return words_to_values(self.words, self.etype, self.storage)


def _by_channel(x: NDArray[Any], values: Values, channels: Channels, start: int) -> _Operands:
    """``x`` (a block's words, flat and contiguous) and its per-channel ``values``, shaped
    so that an elementwise ufunc with ``out=`` the first updates ``x`` in place.

    Word i meets ``values[(start + i) // inner % count]``. Per tensor: a scalar. A block
    of whole periods: a (outer, count, inner) view of ``x`` and ``values`` as a column,
    broadcast. Otherwise the values expanded word by word (`Channels.expand`). Each
    element gets the same operation on the same two numbers either way: exact.
    """
    if channels.count == 1:
        if values.size != 1:
            raise CorruptPatchError(f"a per-tensor parameter has {values.size} values")
        return x, values.reshape(())
    if values.size != channels.count:
        raise CorruptPatchError(
            f"a per-channel parameter has {values.size} values for {channels.count} channels"
        )
    grid = channels.grid(start, x.size)
    if grid is None:
        return x, channels.expand(values.reshape(-1), start, x.size)
    return x.reshape(grid, copy=False), values.reshape(channels.count, 1)  # a view of x


def _dequantize(q: Values, dq: Dequant, old: OldModel, start: int) -> NDArray[np.float32]:
    """ORT DequantizeLinear: ``(q - zero_point) * scale`` in float32 (a fresh array).

    The difference is taken exactly (in int64), then rounded once to float32. For 8- and
    16-bit tensors (nearly all) it is taken in float32 instead: both operands and their
    difference (under 2**17) are exact there, so the bits are the same, without an
    int64 copy of the block eight bytes a word wide.
    """
    scale_ref = dq.scale
    scale = to_float(old.values(scale_ref, 0, 1 << 62), element_type(scale_ref.dtype), np.float32)
    zp = None if dq.zero_point is None else old.values(dq.zero_point, 0, 1 << 62)
    if _narrow_int(q) and (zp is None or _narrow_int(zp)):
        out = q.astype(np.float32)
        if zp is not None:
            view, zp_by_word = _by_channel(out, zp.astype(np.float32), dq.channels, start)
            np.subtract(view, zp_by_word, out=view)
    else:
        centred = q.astype(np.int64)
        if zp is not None:
            view, zp_by_word = _by_channel(centred, zp.astype(np.int64), dq.channels, start)
            np.subtract(view, zp_by_word, out=view)
        out = centred.astype(np.float32)
    view, s = _by_channel(out, scale, dq.channels, start)
    np.multiply(view, s.astype(np.float32), out=view)
    return out


def _narrow_int(values: Values) -> bool:
    """An integer array of at most 16 bits: exact in float32, and so are differences."""
    return values.dtype.kind in "iu" and values.dtype.itemsize <= 2


def quantize_prediction(
    q: Quant, target: ElementType, old: OldModel, params: list[Param], start: int, n: int
) -> Values:
    """The integers QuantizeLinear would give for the old values with the new parameters."""
    if not target.is_integer or target.lanes != 1:
        raise CorruptPatchError(f"quantized prediction for a {target.name} tensor")
    smallest, largest = target.int_range
    if not (smallest <= q.lo <= q.hi <= largest):
        raise CorruptPatchError(f"clip range {q.lo}..{q.hi} outside {target.name}")
    if q.precision not in (4, 8):
        raise CorruptPatchError(f"quantization precision {q.precision}")
    dtype: type[np.floating] = np.float32 if q.precision == 4 else np.float64
    src_type = element_type(q.source.dtype)
    src = old.values(q.source, start, n)
    if src.size != n:
        raise CorruptPatchError("the quantized tensor is longer than its old source")
    if q.dequant is not None:
        if not src_type.is_integer:
            raise CorruptPatchError("requantization from a non-integer tensor")
        x = _dequantize(src, q.dequant, old, start).astype(dtype, copy=False)
    elif src_type.is_float and src_type.lanes == 1:
        x = to_float(src, src_type, dtype)
    else:
        raise CorruptPatchError(f"quantized prediction from a {src_type.name} tensor")
    scale = _param(params, q.scale)
    y = x  # a fresh array (astype copies, and so does _dequantize): safe to work in place
    view, s = _by_channel(y, to_float(scale.values, scale.etype, dtype), q.channels, start)
    with np.errstate(all="ignore"):
        np.divide(view, s, out=view)
    np.rint(y, out=y)
    nan = np.isnan(y)
    if nan.any():
        y[nan] = 0
    if q.zero_point is not None:
        zp = _param(params, q.zero_point)
        if not zp.etype.is_integer:
            raise CorruptPatchError("a zero point that is not an integer tensor")
        view, zp_by_word = _by_channel(y, zp.values.astype(dtype), q.channels, start)
        np.add(view, zp_by_word, out=view)
    np.clip(y, q.lo, q.hi, out=y)
    out: Values = y.astype(target.numpy)  # exact: integral and within the type's range
    return out


def _param(params: list[Param], index: int) -> Param:
    if not 0 <= index < len(params):
        raise CorruptPatchError(f"the delta refers to parameter {index} of {len(params)}")
    return params[index]


def predict(block: Block, old: OldModel, params: list[Param]) -> Words | None:
    """The predicted words of ``block`` (None when it has no predictor)."""
    target = block.etype
    if block.predictor is Predictor.NONE:
        return None
    if block.predictor is Predictor.VALUES and block.values is not None:
        ref = block.values
        source = element_type(ref.dtype)
        same = source.code == target.code and ref.storage == block.storage
        if not same and not castable(source, target):
            raise CorruptPatchError(f"cannot predict {target.name} from {source.name}")
        if same:
            words = old.words(ref, block.word_start, block.word_count)
        else:
            values = convert(old.values(ref, block.word_start, block.word_count), source, target)
            words = values_to_words(values, target, block.storage)
        return _padded(words, block)
    if block.predictor is Predictor.QUANT and block.quant is not None:
        values = quantize_prediction(
            block.quant, target, old, params, block.word_start, block.word_count
        )
        return values_to_words(values, target, block.storage)
    if block.predictor is Predictor.SCALE and block.scale_fit is not None:
        values = scale_prediction(block.scale_fit, target, old, block.word_start, block.word_count)
        return values_to_words(values, target, block.storage)
    if block.predictor is Predictor.DECAY and block.decay is not None:
        return _padded(decay_prediction(block.decay, block, old), block)
    if block.predictor is Predictor.PRODUCT and block.product is not None:
        values = product_prediction(
            block.product, target, params, block.word_start, block.word_count
        )
        return values_to_words(values, target, block.storage)
    raise CorruptPatchError(f"block predictor {block.predictor.name} without its parameters")


def decay_prediction(decay: Decay, block: Block, old: OldModel) -> Words:
    """``old * factor`` rounded to float32, ``steps`` times, for the block's words."""
    if block.dtype != 1 or decay.source.dtype != 1 or block.storage is not Storage.RAW:
        raise CorruptPatchError("a weight-decay prediction for a tensor that is not float32")
    if not 1 <= decay.steps <= MAX_DECAY_STEPS or not 0 <= decay.factor_bits < 1 << 32:
        raise CorruptPatchError(f"a weight-decay prediction of {decay.steps} steps")
    factor = np.array([decay.factor_bits], dtype=np.uint32).view(np.float32)[0]
    values = old.values(decay.source, block.word_start, block.word_count).astype(np.float32)
    with np.errstate(all="ignore"):
        for _ in range(decay.steps):
            np.multiply(values, factor, out=values)
    return values.view(np.uint32)


def channel_ranges(
    fit: ScaleFit, old: OldModel
) -> tuple[NDArray[np.floating], NDArray[np.floating], ElementType]:
    """Per-channel (rmin, rmax) of the old float tensor, zero included, as ORT takes them."""
    source = element_type(fit.source.dtype)
    if not source.is_float or source.lanes != 1:
        raise CorruptPatchError(f"a scale fitted to a {source.name} tensor")
    values = old.values(fit.source, 0, 1 << 62)
    if source.kind is Kind.BFLOAT16:
        values = to_float(values, source, np.float32)
    per_block = fit.channels.count * fit.channels.inner
    if values.size == 0 or values.size % per_block:
        raise CorruptPatchError("a scale's channels do not divide its source tensor")
    grid = values.reshape(-1, fit.channels.count, fit.channels.inner)
    zero = np.zeros((), dtype=grid.dtype)
    rmin = np.minimum(grid.min(axis=(0, 2)), zero)
    rmax = np.maximum(grid.max(axis=(0, 2)), zero)
    return rmin, rmax, source


def scale_prediction(
    fit: ScaleFit, target: ElementType, old: OldModel, start: int, n: int
) -> Values:
    if not target.is_float or target.lanes != 1:
        raise CorruptPatchError(f"a scale prediction for a {target.name} tensor")
    if not 1 <= fit.levels < 1 << 32:
        raise CorruptPatchError(f"a scale fit with {fit.levels} quantization levels")
    if start + n > fit.channels.count:
        raise CorruptPatchError("a scale tensor longer than its channels")
    rmin, rmax, _ = channel_ranges(fit, old)
    if fit.symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        rmin, rmax = -absmax, absmax
    with np.errstate(all="ignore"):
        scale = (rmax.astype(np.float64) - rmin.astype(np.float64)) / np.float64(fit.levels)
    stored = scale.astype(rmax.dtype)
    tiny = np.finfo(rmax.dtype).smallest_subnormal if rmax.dtype == np.float16 else None
    floor = tiny if tiny is not None else np.finfo(rmax.dtype).tiny
    small = (stored if tiny is not None else scale) < floor
    stored = np.where(small, np.ones_like(stored), stored)
    return convert(stored[start : start + n], element_type(_float_code(stored.dtype)), target)


def _float_code(dtype: np.dtype[np.generic]) -> int:
    return {2: 10, 4: 1, 8: 11}[dtype.itemsize]


def product_prediction(
    product: Product, target: ElementType, params: list[Param], start: int, n: int
) -> Values:
    if not target.is_float or target.lanes != 1:
        raise CorruptPatchError(f"a product prediction for a {target.name} tensor")
    left, right = _param(params, product.left), _param(params, product.right)
    if not (left.etype.is_float and right.etype.is_float):
        raise CorruptPatchError("a product of parameters that are not floats")
    a = to_float(left.values, left.etype, np.float32)
    b = to_float(right.values, right.etype, np.float32)
    if a.size not in (1, start + n) and a.size < start + n:
        raise CorruptPatchError("a product factor shorter than its tensor")
    a = a.reshape(()) if a.size == 1 else a[start : start + n]
    b = b.reshape(()) if b.size == 1 else b[start : start + n]
    if a.size not in (1, n) or b.size not in (1, n):
        raise CorruptPatchError("a product factor shorter than its tensor")
    result = np.broadcast_to(a * b, (n,))
    return convert(np.ascontiguousarray(result), element_type(1), target)


_EXPONENT_FIELD = {2: (10, 0x1F), 4: (23, 0xFF), 8: (52, 0x7FF)}  # float16/32/64


def exponent_grouping(block: Block, predicted: Words | None) -> Grouping | None:
    """Group a float block's words by the exponent of their prediction.

    A weight's residual in ulps scales with its magnitude; grouped by exponent, each
    group's residuals have one spread. None where it does not apply (no prediction,
    not a float, varint storage, or too few words to be worth it).
    """
    etype = block.etype
    if (
        predicted is None
        or not etype.is_float
        or block.storage is not Storage.RAW
        or predicted.size < 2 * GROUP_MIN_WORDS
    ):
        return None
    shift, mask = (7, 0xFF) if etype.kind is Kind.BFLOAT16 else _EXPONENT_FIELD[etype.width]
    keys = (predicted >> predicted.dtype.type(shift)) & predicted.dtype.type(mask)
    return group_by(keys.astype(np.uint16))


def _padded(words: Words, block: Block) -> Words:
    """A resized tensor: words past the old tensor's end are predicted as zero."""
    words = words.astype(block.word_dtype, copy=False)
    if words.size == block.word_count:
        return words
    if words.size > block.word_count:
        raise CorruptPatchError("a prediction longer than its block")
    out = np.zeros(block.word_count, dtype=block.word_dtype)
    out[: words.size] = words
    return out
