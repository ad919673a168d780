"""Apply a delta on the device: stream the payload in, write the new model out, verify it.

The base is memory-mapped, the payload read record by record, and the new file written
front to back while its sha256 is computed. Held in memory at once: the table, the
skeleton (the new file's non-tensor bytes), the parameters (scales, zero points) and
one block (at most BLOCK_WORDS words and its prediction); while the skeleton is decoded
with ZSTD_QDQ, also a model rebuilt from the base (at most MAX_QDQ_BASE bytes of it).
The output goes to a temporary file renamed over ``out`` only when the rebuilt bytes
hash to the target digest: a wrong base, a damaged payload or a bug yields an error and
leaves nothing.

Targets of at most `native.MAX_TARGET` bytes go to the compiled decoder first (native.py):
it reads the payload records ahead and builds the whole file in memory, then this module
checks it. Anything the compiled decoder declines, and any output that does not hash to
the target, is decoded again here from the same records, so the result never depends
on which decoder ran.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import mmap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from artifact.delta import native, varint
from artifact.delta.codecs import (
    BLOCK_WORDS,
    Block,
    OldModel,
    Param,
    Predictor,
    exponent_grouping,
    predict,
)
from artifact.delta.dtypes import Storage
from artifact.delta.errors import (
    CorruptPatchError,
    DeltaError,
    TargetMismatchError,
    WrongBaseError,
)
from artifact.delta.format import (
    Header,
    Kind,
    Mode,
    Record,
    expect_end,
    read_header,
    read_record,
    stream_record,
)
from artifact.delta.frames import (
    Layout,
    Transform,
    apply_residual,
    decompress_exact,
    exact_prediction,
    unpack_frames,
)
from artifact.delta.skeleton import (
    SkeletonMethod,
    decode_skeleton,
    predicted_skeleton,
    unpack_meta,
)
from artifact.delta.table import Table, old_tensors, unpack_table
from artifact.delta.whole import decode_whole, unpack_whole_meta
from artifact.delta.words import words_to_bytes
from artifact.digest import check_sha256
from artifact.files import atomic_writer

MAX_TABLE = 64 << 20
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyResult:
    sha256: str
    size: int
    mode: str  # "delta" | "whole"
    decoder: str = "python"  # "native": the compiled decoder built it (native.py)


class _HashingSink:
    """Writes through to a file, hashing and counting, and refusing to overrun."""

    def __init__(self, out: BinaryIO, limit: int) -> None:
        self._out = out
        self._limit = limit
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self.size > self._limit:
            raise CorruptPatchError("the delta rebuilds a file larger than its target size")
        self._hash.update(data)
        self._out.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def reset(self) -> None:
        """Forget what was written (the output is a temporary file or a buffer)."""
        self._out.seek(0)
        self._out.truncate()
        self._hash = hashlib.sha256()
        self.size = 0


def _max_data(header: Header) -> int:
    """No record of a sane delta is larger than the target plus zstd's worst-case growth."""
    return header.target_size + header.target_size // 64 + (1 << 20)


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[memoryview]:
    with path.open("rb") as f:
        size = f.seek(0, io.SEEK_END)
        if size == 0:
            yield memoryview(b"")
            return
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mm)
        try:
            yield view
        finally:
            view.release()
            with contextlib.suppress(BufferError):  # numpy views may still be alive
                mm.close()


def _check_base(header: Header, old: memoryview) -> None:
    if not header.needs_base:
        return
    digest = hashlib.sha256(old).hexdigest()
    if len(old) != header.base_size or digest != header.base_sha256:
        raise WrongBaseError(
            f"this delta applies to base sha256 {header.base_sha256[:12]}… "
            f"({header.base_size} bytes), but the file given is sha256 {digest[:12]}… "
            f"({len(old)} bytes): fetch a delta against the model you hold, or the full artifact"
        )


class _Payloads:
    """Hands out the blocks' payloads in order from the CHUNK records.

    Records are read as the blocks need them, or all at once by `read_ahead` (for the
    compiled decoder); either way a damaged record is reported when a block first
    needs it, so both decoders fail alike.
    """

    def __init__(self, stream: BinaryIO, first: int, count: int, max_data: int) -> None:
        self._stream = stream
        self._first = first
        self._next = first
        self._end = count
        self._max = max_data
        self._chunk = memoryview(b"")
        self._pos = 0
        self._ahead: list[Record] = []
        self._ahead_error: DeltaError | None = None

    def read_ahead(self) -> tuple[bytes, ...] | None:
        """Every CHUNK record's data, or None when one is missing or damaged."""
        for index in range(self._first, self._end):
            try:
                record = read_record(self._stream, index, self._max)
            except DeltaError as exc:
                self._ahead_error = exc
                return None
            self._ahead.append(record)
            if record.kind is not Kind.CHUNK:
                return None
        return tuple(r.data for r in self._ahead)

    def _record(self, index: int) -> Record:
        ahead = index - self._first
        if ahead < len(self._ahead):
            return self._ahead[ahead]
        if ahead == len(self._ahead) and self._ahead_error is not None:
            raise self._ahead_error
        return read_record(self._stream, index, self._max)

    def take(self, n: int) -> memoryview:
        if n == 0:
            return memoryview(b"")
        if self._pos == len(self._chunk):
            if self._next >= self._end:
                raise CorruptPatchError("the delta has fewer payload records than its table says")
            record = self._record(self._next)
            if record.kind is not Kind.CHUNK:
                raise CorruptPatchError(f"record {self._next} should be a payload chunk")
            self._next += 1
            self._chunk, self._pos = memoryview(record.data), 0
        if self._pos + n > len(self._chunk):
            raise CorruptPatchError("a block's payload runs past the end of its chunk")
        part = self._chunk[self._pos : self._pos + n]
        self._pos += n
        return part

    def finish(self) -> None:
        if self._pos != len(self._chunk) or self._next != self._end:
            raise CorruptPatchError("the delta has payload bytes its table does not account for")


def _decode_block(
    block: Block, payload: memoryview, old: OldModel, params: list[Param]
) -> bytes | memoryview:
    """The block's bytes in the new file; a copy is a view of the base (no copy made)."""
    block.check()
    if block.predictor is Predictor.COPY:
        if block.transform is not Transform.NONE or len(payload):
            raise CorruptPatchError("a copied block carries a payload")
        return old.span(block.copy_from, block.out_nbytes)
    if block.word_count > BLOCK_WORDS:
        raise CorruptPatchError(f"a block of {block.word_count} words (limit {BLOCK_WORDS})")
    predicted = predict(block, old, params)
    word_dtype = block.word_dtype
    if (
        predicted is not None
        and predicted.dtype == word_dtype
        and predicted.size == block.word_count
        and exact_prediction(payload, block.layout, block.transform, word_dtype.itemsize)
    ):
        words = predicted  # what a zero residual would give back (see exact_prediction)
    else:
        grouping = exponent_grouping(block, predicted) if block.layout is Layout.GROUPED else None
        res = unpack_frames(payload, block.word_count, word_dtype, block.layout, grouping)
        words = apply_residual(res, predicted, block.transform)
    out = words_to_bytes(words, block.storage)
    if len(out) != block.out_nbytes:
        raise CorruptPatchError("a block decodes to the wrong number of bytes")
    return out


def _check_layout(table: Table, header: Header) -> list[tuple[int, int]]:
    """Blocks and parameters must tile the file with the skeleton, without overlap."""
    ranges = sorted((b.out_offset, b.out_nbytes) for b in (*table.params, *table.blocks))
    pos = 0
    covered = 0
    for offset, length in ranges:
        if offset < pos:
            raise CorruptPatchError("two blocks of the delta overlap")
        pos = offset + length
        covered += length
    if pos > header.target_size or covered + table.skeleton_len != header.target_size:
        raise CorruptPatchError("the delta's blocks and skeleton do not add up to the target")
    offsets = [b.out_offset for b in table.blocks]
    if offsets != sorted(offsets):
        raise CorruptPatchError("the delta's blocks are out of order")
    return ranges


def _old_skeleton(old: memoryview, cuts: tuple[tuple[int, int], ...]) -> bytes:
    parts = []
    pos = 0
    for offset, length in cuts:
        if offset < pos or offset + length > len(old):
            raise CorruptPatchError("the delta cuts bytes outside its base")
        parts.append(old[pos:offset])
        pos = offset + length
    parts.append(old[pos:])
    return b"".join(parts)


def _read_table(stream: BinaryIO, max_data: int) -> bytes:
    first = read_record(stream, 0, max_data)
    if first.kind is not Kind.TABLE:
        raise CorruptPatchError("the delta does not start with its table")
    meta = varint.Reader(first.meta)
    try:
        table_len = meta.uint(MAX_TABLE + 1)
    except varint.VarintError as exc:
        raise CorruptPatchError(f"the delta's table size is damaged: {exc}") from exc
    if not meta.done:
        raise CorruptPatchError("the delta's table size has trailing bytes")
    if table_len > MAX_TABLE:
        raise CorruptPatchError("the delta's table is impossibly large")
    return decompress_exact(first.data, table_len)


def _read_skeleton(
    stream: BinaryIO,
    old_view: memoryview,
    header: Header,
    max_data: int,
    cuts: Sequence[tuple[int, int]],
    covered: Sequence[tuple[int, int]],
) -> bytes:
    second = read_record(stream, 1, max_data)
    if second.kind is not Kind.SKELETON:
        raise CorruptPatchError("the delta's second record is not its skeleton")
    method, decisions = unpack_meta(second.meta)
    predicted = None
    if method == SkeletonMethod.ZSTD_QDQ:
        predicted = predicted_skeleton(old_view, decisions, covered, header.target_size)
    old_skeleton = _old_skeleton(old_view, tuple(cuts))
    skeleton_len = header.target_size - sum(length for _, length in covered)
    return decode_skeleton(second.data, method, skeleton_len, old_skeleton, predicted)


def _decode_records(
    header: Header, stream: BinaryIO, old_view: memoryview, sink: _HashingSink
) -> str:
    """Rebuild the file into ``sink``; which decoder built it ("native" or "python")."""
    max_data = _max_data(header)
    if header.record_count < 2:
        raise CorruptPatchError("a delta needs at least a table and a skeleton record")
    table_bytes = _read_table(stream, max_data)
    found = None
    if native.usable(header.target_size):
        found = native.ranges(old_view, table_bytes, header.target_size)
    table = None
    cuts: Sequence[tuple[int, int]]
    if found is None:
        table = unpack_table(table_bytes, old_tensors(old_view))
        cuts, covered = table.old_cuts, _check_layout(table, header)
    else:
        cuts, covered = found
    skeleton = _read_skeleton(stream, old_view, header, max_data, cuts, covered)
    payloads = _Payloads(stream, 2, header.record_count, max_data)
    if found is not None:
        chunks = payloads.read_ahead()
        built = None
        if chunks is not None:
            built = native.decode(old_view, table_bytes, skeleton, chunks, header.target_size)
        if built is None:
            _log.debug(
                "the compiled delta decoder declined %s: decoding in Python", native.last_decline()
            )
        else:
            sink.write(built)
            if sink.hexdigest() == header.target_sha256 and sink.size == header.target_size:
                return "native"
            _log.warning(
                "the compiled delta decoder rebuilt a file that does not match its target "
                "(sha256 %s…): decoding it again in Python",
                header.target_sha256[:12],
            )
            sink.reset()
        # the records read ahead are handed out again (a damaged one: its error, in turn)
    if table is None:
        table = unpack_table(table_bytes, old_tensors(old_view))
        _check_layout(table, header)
    _decode_blocks(table, payloads, old_view, skeleton, sink)
    return "python"


def _decode_blocks(
    table: Table,
    payloads: _Payloads,
    old_view: memoryview,
    skeleton: bytes,
    sink: _HashingSink,
) -> None:
    """The Python decoder: parameters first, then the blocks, written front to back."""
    old = OldModel(old_view)
    params: list[Param] = []
    placed: dict[int, bytes | memoryview] = {}
    for block in table.params:
        data = _decode_block(block, payloads.take(block.payload_len), old, params)
        if block.storage is Storage.VARINT:
            param_words = varint.decode(data)
        else:
            param_words = np.frombuffer(data, dtype=block.word_dtype)
        params.append(Param(block.etype, block.storage, param_words))
        placed[block.out_offset] = data
    out = _Assembler(sink, skeleton)
    pending = sorted(placed.items())  # parameters go where they were in the file
    next_param = 0
    for block in table.blocks:
        while next_param < len(pending) and pending[next_param][0] < block.out_offset:
            out.put(*pending[next_param])
            next_param += 1
        out.put(
            block.out_offset, _decode_block(block, payloads.take(block.payload_len), old, params)
        )
    for offset, data in pending[next_param:]:
        out.put(offset, data)
    out.finish()
    payloads.finish()


class _Assembler:
    """Writes the new file front to back: skeleton bytes between the decoded pieces.

    The layout was checked against the target size up front (`_check_layout`), so the
    skeleton runs out exactly at the end.
    """

    def __init__(self, sink: _HashingSink, skeleton: bytes) -> None:
        self._sink = sink
        self._skeleton = memoryview(skeleton)
        self._used = 0  # skeleton bytes written
        self._pos = 0  # file bytes written

    def put(self, offset: int, data: bytes | memoryview) -> None:
        gap = offset - self._pos
        self._sink.write(self._skeleton[self._used : self._used + gap])
        self._sink.write(data)
        self._used += gap
        self._pos = offset + len(data)

    def finish(self) -> None:
        self._sink.write(self._skeleton[self._used :])


def _decode(
    stream: BinaryIO, old_view: memoryview, out: BinaryIO, expected_sha256: str | None
) -> ApplyResult:
    header = read_header(stream)
    if expected_sha256 is not None and header.target_sha256 != expected_sha256:
        raise TargetMismatchError(
            f"this delta builds sha256 {header.target_sha256[:12]}…, "
            f"not the expected {expected_sha256[:12]}…"
        )
    _check_base(header, old_view)
    sink = _HashingSink(out, header.target_size)
    decoder = "python"
    if header.mode is Mode.RECORDS:
        decoder = _decode_records(header, stream, old_view, sink)
        mode = "delta"
    else:
        if header.record_count != 1:
            raise CorruptPatchError("a whole-file delta must have exactly one record")
        record = stream_record(stream, 0, _max_data(header))
        if record.kind is not Kind.WHOLE:
            raise CorruptPatchError("a whole-file delta without its whole-file record")
        method, window_log = unpack_whole_meta(record.meta)
        decode_whole(method, window_log, record.chunks, old_view, sink, header.target_size)
        mode = "whole"
    expect_end(stream)
    digest = sink.hexdigest()
    if sink.size != header.target_size or digest != header.target_sha256:
        raise CorruptPatchError(
            f"the rebuilt file does not match the delta's target (sha256 {digest[:12]}…, "
            f"{sink.size} bytes; expected {header.target_sha256[:12]}…, "
            f"{header.target_size} bytes): the delta is damaged"
        )
    return ApplyResult(digest, sink.size, mode, decoder)


@contextlib.contextmanager
def _opened(patch: Path | BinaryIO) -> Iterator[BinaryIO]:
    if isinstance(patch, Path | str):
        with Path(patch).open("rb") as f:
            yield f
    else:
        yield patch


def apply_delta(
    old_path: Path,
    patch: Path | BinaryIO,
    out_path: Path,
    expected_sha256: str | None = None,
) -> ApplyResult:
    """Rebuild the target of ``patch`` from ``old_path`` into ``out_path``, verified.

    ``expected_sha256`` (the manifest's digest) is compared with the delta's target
    before any work. On any error ``out_path`` is left as it was.
    """
    if expected_sha256 is not None:
        check_sha256(expected_sha256, field="expected_sha256")
    with (
        _mapped(Path(old_path)) as old,
        _opened(patch) as stream,
        atomic_writer(Path(out_path)) as out,
    ):
        return _decode(stream, old, out, expected_sha256)


def apply_delta_bytes(old: bytes, patch: bytes, expected_sha256: str | None = None) -> bytes:
    """`apply_delta` in memory, for tests and small models."""
    out = io.BytesIO()
    _decode(io.BytesIO(patch), memoryview(old), out, expected_sha256)
    return out.getvalue()


__all__ = ["ApplyResult", "DeltaError", "apply_delta", "apply_delta_bytes"]
