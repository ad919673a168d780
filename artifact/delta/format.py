"""The delta container: a versioned header, then records, each with its own checksum.

Layout (little-endian)::

    header  magic "\\x89HFDELT\\n" | format version u16 | mode u8 | flags u8
            | base size u64 | base sha256 (32) | target size u64 | target sha256 (32)
            | record count u32 | crc32 of the preceding header bytes u32
    record  kind u8 | meta length varint | data length varint | meta | data
            | crc32 of kind..data u32   (format 3 and before: lengths u32, u64)

Mode ``RECORDS`` (a model-aware delta): a TABLE record (the blocks, zstd'd), a SKELETON
record (meta: the skeleton method u8, then for ZSTD_QDQ the packed QDQ decisions; data:
the bytes between tensors, coded against what the old file predicts: skeleton.py), then
CHUNK records carrying the blocks' payloads in table order. Mode ``WHOLE``: one WHOLE record, the
new file stored or zstd'd (optionally with the old file as dictionary), decoded as a
stream.

The checksums catch damage early and say where; the rebuilt file's sha256, checked
before anything is written in place, is what guarantees a wrong model never appears.
A reader given a newer format version refuses it rather than guessing; it reads every
version from OLDEST_READABLE on (each later one only added methods).
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from artifact.delta.errors import CorruptPatchError, UnsupportedPatchError

MAGIC = b"\x89HFDELT\n"
FORMAT_VERSION = 5  # 2: QDQ-names skeleton dictionary; 3: the table indexes old tensors;
# 4: Rice-coded residual layouts (RICE, SPARSE), varint record lengths;
# 5: skeleton method ZSTD_QDQ (a version 4 payload is a valid version 5 one: still read)
OLDEST_READABLE = 4
# The version a payload without ZSTD_QDQ is written as: agents that read only version 4
# (not yet upgraded) still apply every delta that does not need the new method.
WITHOUT_QDQ_VERSION = 4
MAX_META = 1 << 20
READ_CHUNK = 1 << 20

_HEADER = struct.Struct("<8sHBBQ32sQ32sI")
_CRC = struct.Struct("<I")
MAX_VARINT_BYTES = 10
HEADER_SIZE = _HEADER.size + _CRC.size


class Mode(enum.IntEnum):
    RECORDS = 1
    WHOLE = 2


class Kind(enum.IntEnum):
    TABLE = 1
    SKELETON = 2
    CHUNK = 3
    WHOLE = 4


class Flags(enum.IntFlag):
    NONE = 0
    NEEDS_BASE = 1  # decoding reads the old file (every RECORDS delta; WHOLE with dictionary)


@dataclass(frozen=True)
class Header:
    mode: Mode
    flags: Flags
    base_size: int
    base_sha256: str
    target_size: int
    target_sha256: str
    record_count: int
    version: int = FORMAT_VERSION

    @property
    def needs_base(self) -> bool:
        return bool(self.flags & Flags.NEEDS_BASE)

    def pack(self) -> bytes:
        body = _HEADER.pack(
            MAGIC,
            self.version,
            self.mode,
            self.flags,
            self.base_size,
            bytes.fromhex(self.base_sha256),
            self.target_size,
            bytes.fromhex(self.target_sha256),
            self.record_count,
        )
        return body + _CRC.pack(zlib.crc32(body))


def read_exact(stream: BinaryIO, n: int, what: str) -> bytes:
    """Exactly ``n`` bytes, read in bounded chunks (a damaged length cannot exhaust memory)."""
    parts: list[bytes] = []
    left = n
    while left:
        part = stream.read(min(left, READ_CHUNK))
        if not part:
            raise CorruptPatchError(f"the delta is truncated: {what} is cut short")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def read_header(stream: BinaryIO) -> Header:
    raw = stream.read(HEADER_SIZE)
    if len(raw) < 8 or raw[:8] != MAGIC:
        raise CorruptPatchError("not a HomeFleet delta (bad magic bytes)")
    if len(raw) < HEADER_SIZE:
        raise CorruptPatchError("the delta is truncated: its header is cut short")
    body, (crc,) = raw[: _HEADER.size], _CRC.unpack(raw[_HEADER.size :])
    if zlib.crc32(body) != crc:
        raise CorruptPatchError("the delta's header is damaged (checksum mismatch)")
    _, version, mode, flags, base_size, base_sha, target_size, target_sha, count = _HEADER.unpack(
        body
    )
    if not OLDEST_READABLE <= version <= FORMAT_VERSION:
        raise UnsupportedPatchError(
            f"delta format version {version} is not supported by this HomeFleet (it reads "
            f"versions {OLDEST_READABLE} to {FORMAT_VERSION}): upgrade the agent or ask for "
            "a full artifact"
        )
    try:
        header_mode = Mode(mode)
        header_flags = Flags(flags)
    except ValueError as exc:
        raise UnsupportedPatchError(f"unknown delta mode {mode} or flags {flags}") from exc
    return Header(
        header_mode,
        header_flags,
        base_size,
        base_sha.hex(),
        target_size,
        target_sha.hex(),
        count,
        version,
    )


@dataclass(frozen=True)
class Record:
    kind: Kind
    meta: bytes
    data: bytes


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(stream: BinaryIO, what: str) -> tuple[int, bytes]:
    """A varint read byte by byte from ``stream``, and its bytes (for the checksum)."""
    raw = bytearray()
    value = 0
    while True:
        byte = read_exact(stream, 1, what)[0]
        value |= (byte & 0x7F) << (7 * len(raw))
        raw.append(byte)
        if byte < 0x80:
            return value, bytes(raw)
        if len(raw) >= MAX_VARINT_BYTES:
            raise CorruptPatchError(f"{what} is not a valid length")


def pack_record(kind: Kind, meta: bytes, data: bytes) -> bytes:
    head = bytes([kind]) + _varint(len(meta)) + _varint(len(data))
    crc = zlib.crc32(data, zlib.crc32(meta, zlib.crc32(head)))
    return head + meta + data + _CRC.pack(crc)


def _read_head(stream: BinaryIO, index: int, max_data: int) -> tuple[Kind, int, int, int]:
    what = f"record {index}'s header"
    kind = read_exact(stream, 1, what)[0]
    meta_len, meta_raw = _read_varint(stream, what)
    data_len, data_raw = _read_varint(stream, what)
    head = bytes([kind]) + meta_raw + data_raw
    if kind not in Kind.__members__.values():
        raise CorruptPatchError(f"record {index} has unknown kind {kind}")
    if meta_len > MAX_META or data_len > max_data:
        raise CorruptPatchError(f"record {index} declares an impossible size")
    return Kind(kind), meta_len, data_len, zlib.crc32(head)


def _check_crc(stream: BinaryIO, crc: int, index: int) -> None:
    (stored,) = _CRC.unpack(read_exact(stream, _CRC.size, f"record {index}'s checksum"))
    if stored != crc:
        raise CorruptPatchError(f"record {index} of the delta is damaged (checksum mismatch)")


def read_record(stream: BinaryIO, index: int, max_data: int) -> Record:
    """The next record, whole, after checking its checksum."""
    kind, meta_len, data_len, crc = _read_head(stream, index, max_data)
    meta = read_exact(stream, meta_len, f"record {index}'s metadata")
    data = read_exact(stream, data_len, f"record {index}'s data")
    crc = zlib.crc32(data, zlib.crc32(meta, crc))
    _check_crc(stream, crc, index)
    return Record(kind, meta, data)


@dataclass
class StreamedRecord:
    """A record whose data is too large to hold: iterate ``chunks`` once, in order.

    The checksum is checked after the last chunk; a consumer must not trust its
    output until the iteration has finished without raising.
    """

    kind: Kind
    meta: bytes
    data_len: int
    chunks: Iterator[bytes]


def stream_record(stream: BinaryIO, index: int, max_data: int) -> StreamedRecord:
    kind, meta_len, data_len, crc = _read_head(stream, index, max_data)
    meta = read_exact(stream, meta_len, f"record {index}'s metadata")
    crc = zlib.crc32(meta, crc)

    def chunks() -> Iterator[bytes]:
        running = crc
        left = data_len
        while left:
            part = read_exact(stream, min(left, READ_CHUNK), f"record {index}'s data")
            running = zlib.crc32(part, running)
            left -= len(part)
            yield part
        _check_crc(stream, running, index)

    return StreamedRecord(kind, meta, data_len, chunks())


def expect_end(stream: BinaryIO) -> None:
    if stream.read(1):
        raise CorruptPatchError("the delta has bytes after its last record")
