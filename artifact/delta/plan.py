"""Choose how each new tensor is predicted and coded: the encoder's search.

For every initializer of the new model: a copy when the old file holds the same bytes;
else each applicable prediction (codecs) is tried block by block at a fast zstd level
and the one whose residual codes smallest is kept. Quantized tensors are planned first:
their scales and zero points become *parameters*, coded once ahead of the blocks
(themselves predicted where possible: a scale from the old weights, a bias scale as a
product of two earlier ones).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from artifact.delta import varint
from artifact.delta.codecs import (
    BLOCK_WORDS,
    MAX_DECAY_STEPS,
    PER_TENSOR,
    Block,
    Channels,
    Decay,
    Dequant,
    OldModel,
    OldRef,
    Param,
    Predictor,
    Product,
    Quant,
    ScaleFit,
    channel_ranges,
    exponent_grouping,
    predict,
    quantize_prediction,
    scale_prediction,
)
from artifact.delta.dtypes import Storage, castable
from artifact.delta.errors import CorruptPatchError
from artifact.delta.frames import (
    Grouping,
    Layout,
    Transform,
    Trial,
    best_residual,
    pack_frames,
)
from artifact.delta.onnx_wire import TensorSpan, find_tensors
from artifact.delta.words import bytes_to_words, to_float, values_to_words, words_to_values

QUANT_SUFFIX = "_quantized"  # onnxruntime's names: W → W_quantized, W_scale, W_zero_point
SCALE_SUFFIX = "_scale"
COPY_BYTES = 8 << 20


@dataclass(frozen=True)
class TensorStat:
    """How one new tensor was coded: for the benchmark and the logs."""

    name: str
    dtype: str
    nbytes: int
    encoding: str  # e.g. "copy", "values/sub/planes", "quant/xor", "param/scale/xor"
    coded_bytes: int
    offset: int = -1  # where the tensor's payload starts in the new file


def _ref(span: TensorSpan) -> OldRef:
    return OldRef(span.offset, span.nbytes, span.etype.code, span.storage)


def _varints_exact(data: bytes, span: TensorSpan) -> bool:
    """Treat a varint payload as words only if re-encoding gives back the same bytes."""
    try:
        words = varint.decode(data[span.offset : span.end])
    except varint.VarintError:
        return False
    return words.size == span.count and varint.encode(words) == data[span.offset : span.end]


def _usable(data: bytes, spans: Iterable[TensorSpan], *, exact: bool) -> list[TensorSpan]:
    out = []
    for span in spans:
        if span.storage is Storage.VARINT:
            if span.count > BLOCK_WORDS:
                continue
            if exact and not _varints_exact(data, span):
                continue
            if not exact:
                try:
                    if varint.decode(data[span.offset : span.end]).size != span.count:
                        continue
                except varint.VarintError:
                    continue
        out.append(span)
    return out


def _channel_options(dims: tuple[int, ...], count: int) -> list[Channels]:
    if count == 1:
        return [PER_TENSOR]
    return [
        Channels(count, math.prod(dims[axis + 1 :]) or 1)
        for axis, d in enumerate(dims)
        if d == count
    ]


@dataclass
class _Plan:
    """What the encoder knows while it works; nothing here goes on the wire as is."""

    old: bytes
    new: bytes
    level: int  # zstd level for what is kept
    old_model: OldModel
    old_by_name: dict[str, TensorSpan]
    new_by_name: dict[str, TensorSpan]
    old_by_digest: dict[bytes, TensorSpan]
    params: list[Block] = field(default_factory=list)
    param_values: list[Param] = field(default_factory=list)
    param_index: dict[int, int] = field(default_factory=dict)  # by the span's offset
    param_stats: list[TensorStat] = field(default_factory=list)
    param_payloads: list[bytes] = field(default_factory=list)
    scales: list[TensorSpan] = field(default_factory=list)  # new float tensors named *_scale
    in_progress: set[int] = field(default_factory=set)  # params being coded (no cycles)

    def words(self, span: TensorSpan, start: int = 0, count: int | None = None) -> np.ndarray:
        data = memoryview(self.new)[span.offset : span.end]
        words = bytes_to_words(data, span.etype, span.storage)
        stop = span.count if count is None else min(span.count, start + count)
        return words[start:stop]


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(frozen=True)
class _Candidate:
    """One way to predict a tensor: a predictor and what it needs."""

    predictor: Predictor
    values: OldRef | None = None
    quant: Quant | None = None
    scale_fit: ScaleFit | None = None
    product: Product | None = None
    decay: Decay | None = None


_NO_PREDICTION = _Candidate(Predictor.NONE)

# About what a block's table entry costs beyond the varints every block has, in bytes
# before the table's zstd: a requantization names three old tensors and a dozen numbers,
# a copy of the old values one. Residuals that code the same size (a re-release keeping
# its scales predicts the same integers both ways) then go to the cheaper entry.
TABLE_BYTES = {
    Predictor.NONE: 0,
    Predictor.COPY: 1,
    Predictor.VALUES: 1,
    Predictor.PRODUCT: 2,
    Predictor.SCALE: 4,
    Predictor.DECAY: 6,
    Predictor.QUANT: 16,
}


def _code_block(
    plan: _Plan, span: TensorSpan, start: int, count: int, candidates: list[_Candidate]
) -> tuple[Block, bytes, str]:
    """Try every candidate prediction for one block; keep the one that codes smallest."""
    new_words = plan.words(span, start, count)
    width = new_words.dtype.itemsize
    if span.storage is Storage.RAW:
        out_offset, out_nbytes = span.offset + start * width, count * width
    else:
        out_offset, out_nbytes = span.offset, span.nbytes
    base = Block(
        out_offset, out_nbytes, span.etype.code, span.storage, start, count, Predictor.NONE
    )
    best: tuple[Trial, Block, str, Grouping | None] | None = None
    best_cost = 0
    for index, candidate in enumerate(candidates):
        block = replace(
            base,
            predictor=candidate.predictor,
            values=candidate.values,
            quant=candidate.quant,
            scale_fit=candidate.scale_fit,
            product=candidate.product,
            decay=candidate.decay,
        )
        predicted = predict(block, plan.old_model, plan.param_values)
        grouping = exponent_grouping(block, predicted)
        trial = best_residual(new_words, predicted, grouping, plan.level)
        cost = trial.size + TABLE_BYTES[candidate.predictor]
        if best is None or cost < best_cost:
            best = (trial, block, candidate.predictor.name.lower(), grouping)
            best_cost = cost
        cheapest_left = min(
            (TABLE_BYTES[c.predictor] for c in candidates[index + 1 :]), default=best_cost
        )
        if trial.size <= len(_planes_of(trial)) and best_cost <= cheapest_left:
            break  # an all-zero residual with the cheapest entry left: nothing beats it
    if best is None:
        raise AssertionError("no candidates")
    trial, block, label, grouping = best
    payload = pack_frames(trial.residual, trial.layout, plan.level, grouping)
    block = replace(block, transform=trial.transform, layout=trial.layout, payload_len=len(payload))
    parts = [label]
    if trial.transform is not Transform.NONE:
        parts.append(trial.transform.name.lower())
    if trial.layout is not Layout.INTERLEAVED:
        parts.append(trial.layout.name.lower())
    return block, payload, "/".join(parts)


def _planes_of(trial: Trial) -> range:
    """The frames an all-zero residual takes (one byte each)."""
    n = trial.residual.dtype.itemsize if trial.layout is Layout.PLANES else 1
    return range(n)


def _value_candidates(plan: _Plan, span: TensorSpan) -> list[_Candidate]:
    old = plan.old_by_name.get(span.name)
    if old is None or old.etype.lanes != span.etype.lanes:
        return []
    same = old.etype.code == span.etype.code and old.storage == span.storage
    if same or castable(old.etype, span.etype):
        return [_Candidate(Predictor.VALUES, values=_ref(old))]
    return []


def _float_values(plan: _Plan, span: TensorSpan) -> np.ndarray:
    values = words_to_values(plan.words(span), span.etype, span.storage)
    return to_float(values, span.etype, np.float64)


def _is_scale(span: TensorSpan) -> bool:
    return span.name.endswith(SCALE_SUFFIX) and span.etype.is_float and span.etype.lanes == 1


def _scale_candidate(plan: _Plan, span: TensorSpan) -> _Candidate | None:
    """A quantization scale recomputed from the old float weights (``W`` for ``W_scale``)."""
    if not _is_scale(span):
        return None
    old = plan.old_by_name.get(span.name[: -len(SCALE_SUFFIX)])
    if old is None or not old.etype.is_float or old.etype.lanes != 1 or old.count == 0:
        return None
    target = plan.words(span)
    wanted = _float_values(plan, span)
    best: tuple[int, ScaleFit] | None = None
    for channels in _channel_options(old.dims, span.count):
        for symmetric in (True, False):
            fit = ScaleFit(_ref(old), channels, symmetric, 1)
            try:
                rmin, rmax, _ = channel_ranges(fit, plan.old_model)
            except CorruptPatchError:
                continue
            if symmetric:
                rmax = np.maximum(np.abs(rmin), np.abs(rmax))
                rmin = -rmax
            spread = rmax.astype(np.float64) - rmin.astype(np.float64)
            usable = (spread > 0) & (wanted > 0) & np.isfinite(wanted)
            if not usable.any():
                continue
            levels = round(float(np.median(spread[usable] / wanted[usable])))
            if not 1 <= levels < 1 << 32:
                continue
            fit = replace(fit, levels=levels)
            predicted = values_to_words(
                scale_prediction(fit, span.etype, plan.old_model, 0, span.count),
                span.etype,
                span.storage,
            )
            misses = int(np.count_nonzero(predicted != target))
            if best is None or misses < best[0]:
                best = (misses, fit)
    if best is None or best[0] == span.count:
        return None
    return _Candidate(Predictor.SCALE, scale_fit=best[1])


def _product_candidate(plan: _Plan, span: TensorSpan) -> _Candidate | None:
    """A bias scale as the product of an activation scale and a weight scale."""
    if not _is_scale(span) or span.offset in plan.in_progress:
        return None
    wanted = words_to_values(plan.words(span), span.etype, span.storage)
    if span.etype.code != 1:
        return None  # float32 products only, as onnxruntime computes them
    factors = [
        f
        for f in plan.scales
        if f.offset != span.offset and f.count in (1, span.count) and f.etype.code == 1
    ]
    values = {f.offset: _float_values(plan, f).astype(np.float32) for f in factors}
    for left in factors:
        if left.count != span.count and span.count != 1:
            continue
        a = values[left.offset]
        for right in factors:
            if right.count != 1 or right.offset == left.offset:
                continue
            b = values[right.offset]
            if np.float32(a.reshape(-1)[0] * b[0]) != wanted[0]:
                continue
            if np.array_equal((a * b[0]).view(np.uint32), wanted.view(np.uint32)):
                plan.in_progress.add(span.offset)
                try:
                    product = Product(_param(plan, left), _param(plan, right))
                finally:
                    plan.in_progress.discard(span.offset)
                return _Candidate(Predictor.PRODUCT, product=product)
    return None


DECAY_SAMPLE = 1 << 16
DECAY_SCREEN = 512
DECAY_SHARE = 0.05  # offer a weight-decay prediction when it is exact for this share


def _decay_candidate(plan: _Plan, span: TensorSpan) -> _Candidate | None:
    """Decoupled weight decay: the factor and step count that rebuild the most weights.

    The ratio new/old of untouched weights is ``factor ** steps`` (up to rounding);
    each step count up to MAX_DECAY_STEPS implies a float32 factor, tried with its
    neighbours on a sample.
    """
    old = plan.old_by_name.get(span.name)
    if (
        old is None
        or span.etype.code != 1
        or old.etype.code != 1
        or span.storage is not Storage.RAW
        or old.storage is not Storage.RAW
    ):
        return None
    n = min(span.count, old.count, DECAY_SAMPLE)
    before = plan.old_model.values(_ref(old), 0, n).astype(np.float64)
    after = words_to_values(plan.words(span, 0, n), span.etype, span.storage).astype(np.float64)
    with np.errstate(all="ignore"):
        ratio = after / before
    close = ratio[np.isfinite(ratio) & (np.abs(ratio - 1) < 1e-4) & (ratio != 1)]
    if close.size < DECAY_SHARE * n:
        return None
    target = float(np.median(close))
    screen_old = before[:DECAY_SCREEN].astype(np.float32)
    screen_new = after[:DECAY_SCREEN].astype(np.float32)
    shortlist: list[tuple[int, int, int]] = []  # (matches on the screen, bits, steps)
    for steps in range(1, MAX_DECAY_STEPS + 1):
        guess = int(np.float32(target ** (1 / steps)).view(np.uint32))
        bits = np.arange(guess - 2, guess + 3, dtype=np.uint32)
        factors = bits.view(np.float32)[:, None]
        x = np.repeat(screen_old[None, :], len(bits), axis=0)
        for _ in range(steps):
            np.multiply(x, factors, out=x)
        matches = np.count_nonzero(x == screen_new[None, :], axis=1)
        shortlist += [(int(m), int(b), steps) for m, b in zip(matches, bits, strict=True)]
    shortlist.sort(reverse=True)
    sample_old = before.astype(np.float32)
    sample_new = after.astype(np.float32)
    best: tuple[int, int, int] | None = None  # (matches, factor bits, steps)
    for _, bits_, steps in shortlist[:4]:
        factor = np.array([bits_], dtype=np.uint32).view(np.float32)[0]
        x = sample_old.copy()
        for _ in range(steps):
            np.multiply(x, factor, out=x)
        found = int(np.count_nonzero(x == sample_new))
        if best is None or found > best[0]:
            best = (found, bits_, steps)
    if best is None or best[0] < DECAY_SHARE * n:
        return None
    return _Candidate(Predictor.DECAY, decay=Decay(_ref(old), best[1], best[2]))


def _candidates(plan: _Plan, span: TensorSpan) -> list[_Candidate]:
    """Every prediction worth trying for ``span``, cheapest to decode first."""
    found = _value_candidates(plan, span)
    extras = (
        _scale_candidate(plan, span),
        _product_candidate(plan, span),
        _decay_candidate(plan, span),
    )
    for extra in extras:
        if extra is not None:
            found.insert(0, extra)
    return [*found, _NO_PREDICTION]


def _param(plan: _Plan, span: TensorSpan) -> int:
    """Index of ``span`` as a parameter, coded on first use (after what it depends on)."""
    index = plan.param_index.get(span.offset)
    if index is not None:
        return index
    same = plan.old_by_digest.get(_digest(memoryview(plan.new)[span.offset : span.end]))
    if same is not None and span.nbytes <= COPY_BYTES:  # kept as it was: a copy, no payload
        block, payload, label = _copy_blocks(span, same)[0], b"", "copy"
    else:
        block, payload, label = _code_block(plan, span, 0, span.count, _candidates(plan, span))
    index = len(plan.params)
    plan.params.append(block)
    plan.param_values.append(Param(span.etype, span.storage, plan.words(span)))
    plan.param_index[span.offset] = index
    plan.param_stats.append(
        TensorStat(
            span.name, span.etype.name, span.nbytes, f"param/{label}", len(payload), span.offset
        )
    )
    plan.param_payloads.append(payload)
    return index


def _names(name: str, suffix: str) -> list[str]:
    names = [name + suffix]
    if name.endswith(QUANT_SUFFIX):
        names.insert(0, name[: -len(QUANT_SUFFIX)] + suffix)
    return names


def _find(by_name: dict[str, TensorSpan], names: list[str]) -> TensorSpan | None:
    for name in names:
        if name in by_name:
            return by_name[name]
    return None


def _quant_candidate(plan: _Plan, span: TensorSpan) -> Quant | None:
    """The best quantization-aware prediction for an integer tensor, if it has one.

    Tries the old float tensor (``W`` for ``W_quantized``) and the old integer tensor
    of the same name (requantization), every channel axis the scale fits, and float32
    or float64 arithmetic; ranks them by mismatches on the first block.
    """
    etype = span.etype
    if not etype.is_integer or etype.lanes != 1 or etype.width > 4:
        return None
    scale_span = _find(plan.new_by_name, _names(span.name, "_scale"))
    if scale_span is None or not scale_span.etype.is_float or scale_span.etype.lanes != 1:
        return None
    channels_count = scale_span.count
    zp_span = _find(plan.new_by_name, _names(span.name, "_zero_point"))
    if zp_span is not None and (not zp_span.etype.is_integer or zp_span.count != channels_count):
        zp_span = None
    channel_options = _channel_options(span.dims, channels_count)
    if not channel_options or channels_count > BLOCK_WORDS:
        return None
    sources: list[tuple[OldRef, list[Dequant | None]]] = []
    if span.name.endswith(QUANT_SUFFIX):
        old_float = plan.old_by_name.get(span.name[: -len(QUANT_SUFFIX)])
        if (
            old_float is not None
            and old_float.etype.is_float
            and old_float.etype.lanes == 1
            and old_float.count == span.count
        ):
            sources.append((_ref(old_float), [None]))
    old_int = plan.old_by_name.get(span.name)
    if old_int is not None and old_int.etype.is_integer and old_int.count == span.count:
        old_scale = _find(plan.old_by_name, _names(span.name, "_scale"))
        old_zp = _find(plan.old_by_name, _names(span.name, "_zero_point"))
        if old_scale is not None and old_scale.etype.is_float and old_scale.etype.lanes == 1:
            if old_zp is not None and old_zp.count != old_scale.count:
                old_zp = None
            dequants: list[Dequant | None] = [
                Dequant(_ref(old_scale), None if old_zp is None else _ref(old_zp), ch)
                for ch in _channel_options(old_int.dims, old_scale.count)
            ]
            if dequants:
                sources.append((_ref(old_int), dequants))
    if not sources:
        return None
    typed = words_to_values(plan.words(span), etype, span.storage).astype(np.int64)
    lo, hi = int(typed.min()), int(typed.max())
    smallest, largest = etype.int_range
    lo, hi = max(lo, smallest), min(hi, largest)
    scale_index = _param(plan, scale_span)
    # an all-zero zero point predicts as no zero point: no parameter, and its bytes can
    # stay in the skeleton (where the QDQ prediction already holds them as zeros)
    zero = zp_span is None or not plan.words(zp_span).any()
    zp_index = None if zero or zp_span is None else _param(plan, zp_span)
    sample = min(span.count, BLOCK_WORDS)
    target = typed[:sample].astype(etype.numpy)
    best: tuple[int, Quant] | None = None
    for source, dequants in sources:
        for dequant in dequants:
            for channels in channel_options:
                for precision in (4, 8):
                    quant = Quant(
                        source, dequant, scale_index, zp_index, channels, precision, lo, hi
                    )
                    predicted = quantize_prediction(
                        quant, etype, plan.old_model, plan.param_values, 0, sample
                    )
                    misses = int(np.count_nonzero(predicted != target))
                    if best is None or misses < best[0]:
                        best = (misses, quant)
    return None if best is None else best[1]


def _block_ranges(span: TensorSpan) -> Iterator[tuple[int, int]]:
    if span.storage is Storage.VARINT:
        yield 0, span.count
        return
    step = BLOCK_WORDS
    for start in range(0, span.count, step):
        yield start, min(step, span.count - start)


def _copy_blocks(span: TensorSpan, source: TensorSpan) -> list[Block]:
    blocks = []
    for start in range(0, span.nbytes, COPY_BYTES):
        n = min(COPY_BYTES, span.nbytes - start)
        blocks.append(
            Block(
                span.offset + start,
                n,
                span.etype.code,
                span.storage,
                0,
                0,
                Predictor.COPY,
                copy_from=source.offset + start,
            )
        )
    return blocks


@dataclass
class _Coded:
    blocks: list[Block]
    payloads: list[bytes]
    stats: list[TensorStat]


TensorProgress = Callable[[int, int], None]
"""Called with (bytes of the new model's tensors coded so far, bytes in all)."""


def _code_tensors(
    plan: _Plan, spans: list[TensorSpan], progress: TensorProgress | None = None
) -> _Coded:
    out = _Coded([], [], [])
    total = sum(s.nbytes for s in spans)
    done = 0
    # Plan quantized predictions first: they make scales and zero points parameters,
    # which are coded once, ahead of the blocks, wherever they sit in the file.
    quants: dict[int, Quant] = {}  # by the span's offset: names need not be unique
    digests = {s.offset: _digest(memoryview(plan.new)[s.offset : s.end]) for s in spans}
    for span in spans:
        if digests[span.offset] in plan.old_by_digest:
            continue
        quant = _quant_candidate(plan, span)
        if quant is not None:
            quants[span.offset] = quant
    for span in spans:
        if progress is not None:
            progress(done, total)
        done += span.nbytes
        if span.offset in plan.param_index:
            continue
        same = plan.old_by_digest.get(digests[span.offset])
        if same is not None:
            out.blocks.extend(_copy_blocks(span, same))
            out.payloads.extend(b"" for _ in range(math.ceil(span.nbytes / COPY_BYTES)))
            out.stats.append(
                TensorStat(span.name, span.etype.name, span.nbytes, "copy", 0, span.offset)
            )
            continue
        candidates = _candidates(plan, span)
        quant = quants.get(span.offset)
        if quant is not None:
            candidates.insert(0, _Candidate(Predictor.QUANT, quant=quant))
        labels: dict[str, int] = {}
        coded = 0
        for start, count in _block_ranges(span):
            block, payload, label = _code_block(plan, span, start, count, candidates)
            out.blocks.append(block)
            out.payloads.append(payload)
            labels[label] = labels.get(label, 0) + len(payload)
            coded += len(payload)
        label = max(labels, key=lambda k: labels[k]) if labels else "empty"
        out.stats.append(
            TensorStat(span.name, span.etype.name, span.nbytes, label, coded, span.offset)
        )
    if progress is not None:
        progress(total, total)
    return out


@dataclass(frozen=True)
class TensorPlan:
    """Everything the encoder decided about the tensors, ready to be written."""

    params: tuple[Block, ...]
    blocks: tuple[Block, ...]
    payloads: tuple[bytes, ...]  # the parameters' payloads, then the blocks'
    old_cuts: tuple[tuple[int, int], ...]  # old tensor payloads left out of its skeleton
    stats: tuple[TensorStat, ...]


def plan_tensors(
    old: bytes,
    new: bytes,
    *,
    level: int,
    min_tensor_bytes: int,
    progress: TensorProgress | None = None,
) -> TensorPlan:
    """Find both models' tensors and code every new one of at least ``min_tensor_bytes``."""
    old_spans = _usable(old, find_tensors(old), exact=False)
    new_spans = _usable(new, find_tensors(new), exact=True)
    old_view = memoryview(old)
    plan = _Plan(
        old,
        new,
        level,
        OldModel(old_view),
        {s.name: s for s in old_spans},
        {s.name: s for s in new_spans},
        {_digest(old_view[s.offset : s.end]): s for s in old_spans},
        scales=[s for s in new_spans if _is_scale(s)],
    )
    coded = _code_tensors(plan, [s for s in new_spans if s.nbytes >= min_tensor_bytes], progress)
    params, blocks, payloads, param_stats = _without_unused_params(plan, coded)
    return TensorPlan(
        params=params,
        blocks=blocks,
        payloads=payloads,
        old_cuts=tuple((s.offset, s.nbytes) for s in old_spans if s.nbytes >= min_tensor_bytes),
        stats=(*param_stats, *coded.stats),
    )


def _param_refs(block: Block) -> tuple[int, ...]:
    if block.quant is not None:
        q = block.quant
        return (q.scale,) if q.zero_point is None else (q.scale, q.zero_point)
    if block.product is not None:
        return (block.product.left, block.product.right)
    return ()


def _renumbered(block: Block, index: dict[int, int]) -> Block:
    if block.quant is not None:
        q = block.quant
        zp = None if q.zero_point is None else index[q.zero_point]
        return replace(block, quant=replace(q, scale=index[q.scale], zero_point=zp))
    if block.product is not None:
        p = block.product
        return replace(block, product=Product(index[p.left], index[p.right]))
    return block


def _without_unused_params(
    plan: _Plan, coded: _Coded
) -> tuple[tuple[Block, ...], tuple[Block, ...], tuple[bytes, ...], list[TensorStat]]:
    """Parameters no chosen prediction reads become ordinary blocks.

    Planning makes a tensor's scale and zero point parameters before it knows whether
    the quantized prediction wins; where another one won (the old integers, when a
    re-release kept its scales), they need no place ahead of the blocks, and a copied
    one can then live in the skeleton (encode._layouts).
    """
    used = {i for b in (*plan.params, *coded.blocks) for i in _param_refs(b)}
    keep = [i for i in range(len(plan.params)) if i in used]
    index = {old: new for new, old in enumerate(keep)}
    params = tuple(_renumbered(plan.params[i], index) for i in keep)
    moved = [
        (_renumbered(plan.params[i], index), plan.param_payloads[i])
        for i in range(len(plan.params))
        if i not in used
    ]
    pairs = [(_renumbered(b, index), p) for b, p in zip(coded.blocks, coded.payloads, strict=True)]
    pairs = sorted([*pairs, *moved], key=lambda pair: pair[0].out_offset)
    payloads = (*(plan.param_payloads[i] for i in keep), *(p for _, p in pairs))
    stats = [
        stat if i in used else replace(stat, encoding=stat.encoding.removeprefix("param/"))
        for i, stat in enumerate(plan.param_stats)
    ]
    return params, tuple(b for b, _ in pairs), payloads, stats
