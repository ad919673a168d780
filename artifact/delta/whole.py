"""The whole-file fallback: the new file stored, zstd'd, or zstd'd against the old file.

Used when the model-aware delta would not be smaller (unrelated files, a model the
parser does not understand). Decoded as a stream: memory stays at zstd's window plus
one read chunk, however large the file.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Iterator
from typing import IO, Protocol, cast

import zstandard

from artifact.delta.errors import CorruptPatchError, UnsupportedPatchError
from artifact.delta.format import READ_CHUNK

_META = struct.Struct("<BB")
MIN_WINDOW_LOG = 10
MAX_WINDOW_LOG = 31


class WholeMethod(enum.IntEnum):
    STORED = 0
    ZSTD = 1
    ZSTD_DICT = 2  # zstd with the old file as a raw-content dictionary (like --patch-from)


def window_log_for(size: int) -> int:
    """A zstd window that reaches back over ``size`` bytes (the old file and the new)."""
    return max(MIN_WINDOW_LOG, min(MAX_WINDOW_LOG, math.ceil(math.log2(max(size, 2)))))


def pack_whole_meta(method: WholeMethod, window_log: int) -> bytes:
    return _META.pack(method, window_log)


def unpack_whole_meta(meta: bytes) -> tuple[WholeMethod, int]:
    if len(meta) != _META.size:
        raise CorruptPatchError("the whole-file record's metadata has the wrong size")
    method, window_log = _META.unpack(meta)
    try:
        whole = WholeMethod(method)
    except ValueError as exc:
        raise UnsupportedPatchError(f"unknown whole-file method {method}") from exc
    if whole is WholeMethod.ZSTD_DICT and not MIN_WINDOW_LOG <= window_log <= MAX_WINDOW_LOG:
        raise CorruptPatchError(f"zstd window log {window_log} out of range")
    return whole, window_log


class Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> object: ...


class _ChunkFile:
    """A read()-able file over an iterator of chunks, for zstd's stream reader."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        if not self._buffer:
            self._buffer = next(self._chunks, b"")
        if size < 0 or size >= len(self._buffer):
            out, self._buffer = self._buffer, b""
            return out
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out

    def drain(self) -> int:
        """Consume what is left (checking the record's checksum); return its length."""
        left = len(self._buffer)
        self._buffer = b""
        for chunk in self._chunks:
            left += len(chunk)
        return left


def decode_whole(
    method: WholeMethod,
    window_log: int,
    chunks: Iterator[bytes],
    old: memoryview,
    sink: Sink,
    target_size: int,
) -> None:
    """Write the decoded file to ``sink``; never more than ``target_size`` bytes."""
    if method is WholeMethod.STORED:
        for chunk in chunks:
            sink.write(chunk)
        return
    source = _ChunkFile(chunks)
    if method is WholeMethod.ZSTD_DICT:
        zdict = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        dctx = zstandard.ZstdDecompressor(dict_data=zdict, max_window_size=1 << window_log)
    else:
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << MAX_WINDOW_LOG)
    written = 0
    try:
        reader_source = cast(IO[bytes], source)  # it has the read() zstd needs
        with dctx.stream_reader(
            reader_source, read_size=READ_CHUNK, read_across_frames=False
        ) as reader:
            while part := reader.read(READ_CHUNK):
                written += len(part)
                if written > target_size:
                    raise CorruptPatchError("the whole-file payload decodes to too many bytes")
                sink.write(part)
    except zstandard.ZstdError as exc:
        raise CorruptPatchError(f"the whole-file payload does not decompress: {exc}") from exc
    if source.drain():
        raise CorruptPatchError("the whole-file payload has bytes after its zstd frame")
