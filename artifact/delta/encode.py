"""Build a delta from the model a device holds to the model it should hold (controller side).

The tensors are planned by plan.py (each new initializer gets the cheapest of its
candidate predictions, block by block); the bytes between tensors (the skeleton) are
zstd'd against the old file's skeleton, or against the skeleton predicted from the old
file when the new one is its canonical QDQ quantization (skeleton.py); table, skeleton
and payloads are framed as format.py says. The result is compared with the whole new
file stored, zstd'd, and zstd'd with the old file as dictionary (what `zstd
--patch-from` sends), and the smallest is kept: a payload is never larger than those.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import zstandard

from artifact.delta import varint
from artifact.delta.codecs import Block, Predictor
from artifact.delta.decode import apply_delta_bytes
from artifact.delta.errors import DeltaError
from artifact.delta.format import (
    FORMAT_VERSION,
    WITHOUT_QDQ_VERSION,
    Flags,
    Header,
    Kind,
    Mode,
    pack_record,
)
from artifact.delta.plan import TensorPlan, TensorStat, plan_tensors
from artifact.delta.skeleton import (
    MAX_QDQ_BASE,
    QdqPrediction,
    SkeletonMethod,
    compress_in_pieces,
    compress_with_dict,
    cut,
    encode_skeleton,
    pack_meta,
    predicted_skeleton,
)
from artifact.delta.table import Table, old_tensors, pack_table
from artifact.delta.whole import WholeMethod, pack_whole_meta, window_log_for
from artifact.digest import sha256_bytes
from artifact.files import atomic_write_bytes

log = logging.getLogger(__name__)

PROBE_LEVEL = 3
PROBE_MARGIN = 1.3
CHUNK_BYTES = 1 << 20


EncodeProgress = Callable[[str, int, int], None]
"""Called with (phase, done, total): one of the PHASE_* names, in its own units."""
PHASE_TENSORS = "coding tensors"  # bytes of the new model's tensors
PHASE_VERIFY = "checking the delta"  # 0 of 1: the delta is decoded once
PHASE_WHOLE = "trying whole-file zstd"  # fallbacks computed, of those to try


@dataclass(frozen=True)
class EncodeOptions:
    """How hard to work. The defaults suit the controller (once per base/target pair)."""

    level: int = 19  # zstd level for everything that is kept
    whole_file_fallback: bool = True  # also try zstd of the whole file; keep the smaller
    min_tensor_bytes: int = 64  # smaller initializers stay in the skeleton
    verify: bool = True  # decode the delta before offering it (see `encode`)
    probe_above: int = 8 << 20  # bytes; larger files probe the whole-file fallback first
    qdq_skeleton: bool = True  # try ZSTD_QDQ when the new file may be the old one quantized

    def __post_init__(self) -> None:
        if not 1 <= self.level <= 22:
            raise ValueError(f"level must be a zstd level 1..22, got {self.level}")
        if self.min_tensor_bytes < 0:
            raise ValueError(f"min_tensor_bytes must be >= 0, got {self.min_tensor_bytes}")


@dataclass(frozen=True)
class DeltaStats:
    mode: str  # "delta" | "whole-zstd-dict" | "whole-zstd" | "whole-stored"
    base_size: int
    target_size: int
    payload_size: int
    candidates: tuple[tuple[str, int], ...]  # every mode tried, with its size
    skeleton_raw: int = 0
    skeleton_coded: int = 0  # the SKELETON record's data (and ZSTD_QDQ's decisions)
    skeleton_method: str = ""  # SkeletonMethod name
    table_coded: int = 0
    tensors: tuple[TensorStat, ...] = ()  # how the model-aware delta coded each tensor
    delta_error: str | None = None  # set when the model-aware delta failed its own check
    encode_seconds: float = 0.0

    @property
    def ratio(self) -> float:
        return self.target_size / self.payload_size if self.payload_size else math.inf


@dataclass(frozen=True)
class EncodedDelta:
    payload: bytes
    stats: DeltaStats


def _read(source: bytes | Path) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def _qdq_prediction(old: bytes, new: bytes, covered: list[tuple[int, int]]) -> QdqPrediction | None:
    """ZSTD_QDQ's inputs when ``new`` is the canonical QDQ form of ``old``, else None.

    Tried only when the bytes suggest it (the new file dequantizes, the old one does not
    quantize). Finding the decisions needs onnx, which only the controller has; any
    failure just means the method is not offered.
    """
    if len(old) > MAX_QDQ_BASE or b"DequantizeLinear" not in new or b"QuantizeLinear" in old:
        return None
    try:
        from artifact.delta.qdq.analyse import exact_decisions
    except ImportError as exc:  # an edge-only install: say why the patch may be larger
        log.warning(
            "%s: a FP32 -> int8 patch made here does not predict the int8 graph (install "
            "HomeFleet's full package for patches as small as the controller sends)",
            exc,
        )
        return None
    try:
        decisions = exact_decisions(old, new)
        return QdqPrediction(decisions, predicted_skeleton(old, decisions, covered, len(new)))
    except Exception as exc:  # onnx missing, not canonical, a bug: all mean "not offered"
        log.debug("skeleton method ZSTD_QDQ not offered: %s: %s", type(exc).__name__, exc)
        return None


def _chunks(payloads: list[bytes]) -> list[bytes]:
    chunks: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for payload in payloads:
        if not payload:
            continue
        current.append(payload)
        size += len(payload)
        if size >= CHUNK_BYTES:
            chunks.append(b"".join(current))
            current, size = [], 0
    if current:
        chunks.append(b"".join(current))
    return chunks


def _uint(value: int) -> bytes:
    writer = varint.Writer()
    writer.uint(value)
    return writer.getvalue()


FOLD_COPIES_MAX = 4 << 20  # bytes of unchanged tensors worth trying in the skeleton
FOLD_ZEROS_MAX = 1 << 16  # and all-zero blocks up to this size (a QDQ prediction has them)


@dataclass(frozen=True)
class _Layout:
    """Which tensors the table lists and which old ones are cut from the old skeleton."""

    params: tuple[Block, ...]
    blocks: tuple[Block, ...]
    old_cuts: tuple[tuple[int, int], ...]


def _layouts(old: bytes, new: bytes, plan: TensorPlan) -> list[_Layout]:
    """The plan as it is, and with its copied (and all-zero) tensors left in the skeletons.

    A table entry for an unchanged tensor costs a few bytes; left in the new skeleton,
    and in the old one every old tensor holding the same bytes (zero points repeat), zstd
    matches a run of unchanged tensors for a few bytes in all. A re-release that moved a
    few weights (c+) is then mostly one long match. Parameters stay listed: predictions
    read their values.
    """
    layouts = [_Layout(plan.params, plan.blocks, plan.old_cuts)]
    copies = [b for b in plan.blocks if b.predictor is Predictor.COPY]
    zeros = [  # no prediction and a one-byte payload (a ZERO frame): all-zero zero points
        b
        for b in plan.blocks
        if b.predictor is Predictor.NONE and b.payload_len == 1 and b.out_nbytes <= FOLD_ZEROS_MAX
    ]
    for fold in (copies, [*copies, *zeros]):
        if not fold or sum(b.out_nbytes for b in fold) > FOLD_COPIES_MAX:
            continue
        folded = {new[b.out_offset : b.out_offset + b.out_nbytes] for b in fold}
        kept_cuts = tuple(c for c in plan.old_cuts if old[c[0] : c[0] + c[1]] not in folded)
        blocks = tuple(b for b in plan.blocks if b not in fold)
        layout = _Layout(plan.params, blocks, kept_cuts)
        if layout not in layouts:
            layouts.append(layout)
    return layouts


def _records_delta(
    old: bytes, new: bytes, options: EncodeOptions, progress: EncodeProgress | None
) -> tuple[bytes, DeltaStats]:
    def tensors(done: int, total: int) -> None:
        if progress is not None:
            progress(PHASE_TENSORS, done, total)

    plan = plan_tensors(
        old, new, level=options.level, min_tensor_bytes=options.min_tensor_bytes, progress=tensors
    )
    n_params = len(plan.params)
    by_block = dict(zip(plan.blocks, plan.payloads[n_params:], strict=True))
    best: tuple[bytes, DeltaStats] | None = None
    for layout in _layouts(old, new, plan):
        kept = [*plan.payloads[:n_params], *(by_block[b] for b in layout.blocks)]
        found = _records_payload(old, new, layout, plan, _chunks(kept), options)
        if best is None or len(found[0]) < len(best[0]):
            best = found
    assert best is not None
    return best


def _records_payload(
    old: bytes,
    new: bytes,
    layout: _Layout,
    plan: TensorPlan,
    chunks: list[bytes],
    options: EncodeOptions,
) -> tuple[bytes, DeltaStats]:
    covered = sorted((b.out_offset, b.out_nbytes) for b in (*layout.params, *layout.blocks))
    skeleton = cut(new, covered)
    old_skeleton = cut(old, sorted(layout.old_cuts))
    table = Table(len(skeleton), layout.old_cuts, layout.params, layout.blocks)
    table_raw = pack_table(table, old_tensors(old))
    table_packed = zstandard.ZstdCompressor(level=options.level).compress(table_raw)
    qdq = _qdq_prediction(old, new, covered) if options.qdq_skeleton else None
    method, skeleton_data = encode_skeleton(skeleton, old_skeleton, options.level, qdq)
    skeleton_meta = pack_meta(method, qdq)
    records = [
        pack_record(Kind.TABLE, _uint(len(table_raw)), table_packed),
        pack_record(Kind.SKELETON, skeleton_meta, skeleton_data),
        *(pack_record(Kind.CHUNK, b"", chunk) for chunk in chunks),
    ]
    header = Header(
        Mode.RECORDS,
        Flags.NEEDS_BASE,
        len(old),
        sha256_bytes(old),
        len(new),
        sha256_bytes(new),
        len(records),
        FORMAT_VERSION if method is SkeletonMethod.ZSTD_QDQ else WITHOUT_QDQ_VERSION,
    )
    payload = header.pack() + b"".join(records)
    listed = {b.out_offset for b in (*layout.params, *layout.blocks)}
    tensors = tuple(  # a tensor left in the skeleton is coded there
        t
        if t.offset in listed or t.offset < 0
        else replace(t, encoding=f"{t.encoding.split('/')[0]}/skeleton", coded_bytes=0)
        for t in plan.stats
    )
    stats = DeltaStats(
        "delta",
        len(old),
        len(new),
        len(payload),
        (),
        skeleton_raw=len(skeleton),
        skeleton_coded=len(skeleton_meta) - 1 + len(skeleton_data),
        skeleton_method=method.name,
        table_coded=len(table_packed),
        tensors=tensors,
    )
    return payload, stats


def _whole(old: bytes, new: bytes, method: WholeMethod, level: int) -> bytes:
    window_log = 0
    if method is WholeMethod.STORED:
        data = new
    elif method is WholeMethod.ZSTD:
        data = compress_in_pieces(zstandard.ZstdCompressor(level=level), new)
    else:
        window_log = window_log_for(len(old) + len(new))
        data = compress_with_dict(new, old, level)
    flags = Flags.NEEDS_BASE if method is WholeMethod.ZSTD_DICT else Flags.NONE
    record = pack_record(Kind.WHOLE, pack_whole_meta(method, window_log), data)
    header = Header(
        Mode.WHOLE,
        flags,
        len(old),
        sha256_bytes(old),
        len(new),
        sha256_bytes(new),
        1,
        WITHOUT_QDQ_VERSION,
    )
    return header.pack() + record


def _fallbacks(
    old: bytes,
    new: bytes,
    options: EncodeOptions,
    to_beat: int | None,
    progress: EncodeProgress | None = None,
) -> list[tuple[str, bytes]]:
    """The whole-file payloads worth computing.

    On a large file zstd at the full level takes a minute, so it is first probed at
    PROBE_LEVEL and computed in full only when the probe comes within PROBE_MARGIN of
    the delta (higher levels gain a few percent on model weights, never a third).
    """
    found = [("whole-stored", _whole(old, new, WholeMethod.STORED, 0))]
    methods = [WholeMethod.ZSTD] + ([WholeMethod.ZSTD_DICT] if old else [])
    names = {WholeMethod.ZSTD: "whole-zstd", WholeMethod.ZSTD_DICT: "whole-zstd-dict"}
    for i, method in enumerate(methods):
        if progress is not None:
            progress(PHASE_WHOLE, i, len(methods))
        if to_beat is not None and len(new) > options.probe_above:
            probe = _whole(old, new, method, PROBE_LEVEL)
            if len(probe) > to_beat * PROBE_MARGIN:
                found.append((f"{names[method]} (level {PROBE_LEVEL} probe)", probe))
                continue
        found.append((names[method], _whole(old, new, method, options.level)))
    return found


def encode(
    old: bytes | Path,
    new: bytes | Path,
    options: EncodeOptions | None = None,
    progress: EncodeProgress | None = None,
) -> EncodedDelta:
    """The smallest payload that turns ``old`` into ``new``, with how it was made.

    The model-aware delta is decoded once here before it is offered (``verify``): a
    codec bug then costs bytes on the wire (the whole-file fallback is sent), never a
    device an update. ``progress`` hears each phase (a 90 MB encoder takes ~20 s).
    """
    options = options or EncodeOptions()
    started = time.perf_counter()
    old_bytes, new_bytes = _read(old), _read(new)
    payload, stats = _records_delta(old_bytes, new_bytes, options, progress)
    candidates: list[tuple[str, bytes]] = []
    if options.verify and progress is not None:
        progress(PHASE_VERIFY, 0, 1)
    delta_error = _verify(old_bytes, new_bytes, payload) if options.verify else None
    if delta_error is None:
        candidates.append(("delta", payload))
    else:
        log.error("model-aware delta failed its own check, sending the whole file: %s", delta_error)
    if options.whole_file_fallback or delta_error is not None:
        to_beat = len(payload) if delta_error is None else None
        candidates += _fallbacks(old_bytes, new_bytes, options, to_beat, progress)
    mode, best = min(candidates, key=lambda c: len(c[1]))
    stats = replace(
        stats,
        mode=mode,
        payload_size=len(best),
        candidates=tuple((name, len(data)) for name, data in candidates),
        delta_error=delta_error,
        encode_seconds=time.perf_counter() - started,
    )
    return EncodedDelta(best, stats)


def _verify(old: bytes, new: bytes, payload: bytes) -> str | None:
    """None when ``payload`` rebuilds ``new`` from ``old``; else what went wrong."""
    try:
        rebuilt = apply_delta_bytes(old, payload)
    except DeltaError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if rebuilt == new else "the delta rebuilds different bytes"


def encode_delta(
    old: bytes | Path, new: bytes | Path, options: EncodeOptions | None = None
) -> bytes:
    """The delta payload that turns ``old`` into ``new`` (see `encode` for its stats)."""
    return encode(old, new, options).payload


def write_delta(
    old: bytes | Path,
    new: bytes | Path,
    out: Path,
    options: EncodeOptions | None = None,
    progress: EncodeProgress | None = None,
) -> DeltaStats:
    """Encode and write the payload to ``out`` atomically."""
    encoded = encode(old, new, options, progress)
    atomic_write_bytes(Path(out), encoded.payload)
    return encoded.stats
