"""The compiled fast path of the delta decoder, and when to use it.

`_native.c` decodes a RECORDS delta's table and blocks in C: a small int8 model in
about a millisecond where the Python decoder, which spends its time per block and per
tensor, takes ten. It is built with the package (an optional extension: an install
without a C compiler still works, on the Python decoder alone) and used when

- it was built and ``HOMEFLEET_DELTA_DECODER`` is not ``python``, and
- the target is at most ``MAX_TARGET`` bytes: it holds the payload and the whole new
  file in memory, where the Python decoder streams block by block (so what it adds to
  the decoder's memory stays under a constant, twice MAX_TARGET). Larger models decode
  at over 100 MB/s in Python anyway: numpy does the per-word work, and the compiled
  decoder was no faster on a 22 MB int8 MiniLM.

It answers None for what it does not implement (casts between element types, float16
and bfloat16 arithmetic, int64 quantization) and for any delta it finds damaged;
the caller then runs the Python decoder, the reference, which decodes the first and
explains the second. Its output is checked against the target sha256 like any other.
"""

from __future__ import annotations

import os
from types import ModuleType

from artifact.delta.frames import decompress_exact

MAX_TARGET = 16 << 20
ENV = "HOMEFLEET_DELTA_DECODER"  # "python": never use the compiled decoder

Ranges = list[tuple[int, int]]


def _load() -> ModuleType | None:
    try:
        from artifact.delta import _native  # type: ignore[attr-defined]
    except ImportError:
        return None
    module: ModuleType = _native
    return module


_MODULE = _load()


def available() -> bool:
    """Whether the compiled decoder was built for this interpreter."""
    return _MODULE is not None


def usable(target_size: int) -> bool:
    return _MODULE is not None and target_size <= MAX_TARGET and os.environ.get(ENV) != "python"


def ranges(old: bytes | memoryview, table: bytes, target_size: int) -> tuple[Ranges, Ranges] | None:
    """(the old file's cut ranges, the new file's ranges that blocks cover), sorted; None:
    leave the table to the Python decoder."""
    if _MODULE is None:
        return None
    try:
        found: tuple[Ranges, Ranges] | None = _MODULE.ranges(old, table, target_size)
    except MemoryError:  # the Python decoder streams: it may still fit
        return None
    return found


def decode(
    old: bytes | memoryview,
    table: bytes,
    skeleton: bytes,
    chunks: tuple[bytes, ...],
    target_size: int,
) -> bytes | None:
    """The new file, not yet verified; None: leave it to the Python decoder."""
    if _MODULE is None:
        return None
    try:
        built: bytes | None = _MODULE.decode(
            old, table, skeleton, chunks, target_size, decompress_exact
        )
    except MemoryError:  # the whole target at once did not fit; streaming may
        return None
    return built


def unpack_words(
    payload: bytes, count: int, dtype: int, layout: int, predicted: bytes = b""
) -> bytes | None:
    """`frames.unpack_frames` in C, for the differential tests (see _native.c)."""
    if _MODULE is None:
        return None
    words: bytes | None = _MODULE.unpack_words(
        payload, count, dtype, layout, predicted, decompress_exact
    )
    return words


def last_decline() -> tuple[str, int] | None:
    """Why the last call answered None ("unsupported", "damaged", "memory") and the line
    of _native.c that decided it; None if it decoded."""
    if _MODULE is None:
        return None
    found: tuple[str, int] | None = _MODULE.last_decline()
    return found
