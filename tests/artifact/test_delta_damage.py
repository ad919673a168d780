"""A damaged, truncated or misapplied delta is refused with a clear error, and writes nothing.

Every bit of a payload is covered by a checksum (the header's or its record's), and the
rebuilt bytes by the target sha256: a flipped bit anywhere must raise, never yield a
model, and `apply_delta` must leave the output path untouched.
"""

from __future__ import annotations

import functools
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from artifact.delta import (
    CorruptPatchError,
    DeltaError,
    EncodeOptions,
    TargetMismatchError,
    UnsupportedPatchError,
    WrongBaseError,
    apply_delta,
    apply_delta_bytes,
    encode,
)
from artifact.delta.format import (
    FORMAT_VERSION,
    HEADER_SIZE,
    pack_record,
    read_header,
    read_record,
)
from artifact.digest import sha256_bytes
from tests.artifact.delta_models import Init, build, quantize_like_ort, random_array, tweak

POSITIONS = 97  # spread over the payload, plus every header byte


@functools.cache
def pair() -> tuple[bytes, bytes]:
    """Old FP32 model → new one exercising copy, values, quant, params and skeleton."""
    rng = np.random.default_rng(7)
    conv = random_array(rng, np.float32, (48, 16, 3))
    fc = random_array(rng, np.float32, (64, 48))
    big = (rng.standard_normal((256, 160)) * 0.1).astype(np.float32)  # enough to group
    moved = (big + rng.standard_normal(big.shape) * 2e-4).astype(np.float32)  # Adam-like steps
    old = [
        Init("big.weight", big),
        Init("conv.weight", conv),
        Init("fc.weight", fc),
        Init("fc.bias", random_array(rng, np.float32, (64,))),
        Init("ids", np.arange(300, dtype=np.int64), raw=False),
    ]
    q, scale, zero = quantize_like_ort(tweak(rng, fc).astype(np.float32), axis=0)
    new = [
        Init("big.weight", moved),
        Init("conv.weight", tweak(rng, conv)),
        Init("fc.weight_quantized", q),
        Init("fc.weight_scale", scale, raw=False),
        Init("fc.weight_zero_point", zero, raw=False),
        old[2],
        old[3],
        Init("extra", random_array(rng, np.float16, (40,))),
    ]
    return build(old), build(new, doc="tuned")


@functools.cache
def payloads() -> dict[str, bytes]:
    old, new = pair()
    delta = encode(old, new, EncodeOptions(whole_file_fallback=False))
    assert delta.stats.mode == "delta"
    encodings = {t.encoding.split("/")[0] for t in delta.stats.tensors}
    assert {"copy", "values", "quant", "param"} <= encodings, encodings
    assert any(t.encoding.endswith("grouped") for t in delta.stats.tensors)
    whole = encode(old, old[:-40] + new, EncodeOptions())  # not a model any more
    assert whole.stats.mode.startswith("whole"), whole.stats.mode
    return {"delta": delta.payload, "whole": whole.payload}


def positions(kind: str) -> list[int]:
    size = len(payloads()[kind])
    spread = np.linspace(HEADER_SIZE, size - 1, POSITIONS).astype(int).tolist()
    return sorted(set(range(HEADER_SIZE)) | set(spread))


def flipped(data: bytes, position: int) -> bytes:
    out = bytearray(data)
    out[position] ^= 1 << (position % 8)
    return bytes(out)


@pytest.mark.parametrize("kind", ["delta", "whole"])
@pytest.mark.parametrize("fraction", [i / 23 for i in range(24)])
def test_a_flipped_bit_is_detected(kind: str, fraction: float) -> None:
    old, _ = pair()
    data = payloads()[kind]
    candidates = positions(kind)
    start = int(fraction * len(candidates))
    for position in candidates[start : start + max(1, len(candidates) // 24)]:
        with pytest.raises(DeltaError):
            apply_delta_bytes(old, flipped(data, position))


def test_every_header_bit_is_covered_and_reported_as_damage() -> None:
    old, _ = pair()
    data = payloads()["delta"]
    for position in range(HEADER_SIZE):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[position] ^= 1 << bit
            with pytest.raises((CorruptPatchError, UnsupportedPatchError)):
                apply_delta_bytes(old, bytes(damaged))


@pytest.mark.parametrize("kind", ["delta", "whole"])
def test_truncated_or_padded_payloads_are_refused(kind: str) -> None:
    old, _ = pair()
    data = payloads()[kind]
    for cut in (0, 7, HEADER_SIZE, HEADER_SIZE + 5, len(data) // 2, len(data) - 1):
        with pytest.raises(CorruptPatchError):
            apply_delta_bytes(old, data[:cut])
    with pytest.raises(CorruptPatchError):
        apply_delta_bytes(old, data + b"\x00")


def test_a_damaged_patch_writes_nothing_and_keeps_an_existing_output(tmp_path: Path) -> None:
    old, _ = pair()
    (tmp_path / "old.onnx").write_bytes(old)
    data = payloads()["delta"]
    (tmp_path / "bad").write_bytes(flipped(data, len(data) - 10))
    out = tmp_path / "out.onnx"
    with pytest.raises(CorruptPatchError, match="damaged"):
        apply_delta(tmp_path / "old.onnx", tmp_path / "bad", out)
    assert not out.exists()
    out.write_bytes(b"the model in service")
    with pytest.raises(CorruptPatchError):
        apply_delta(tmp_path / "old.onnx", tmp_path / "bad", out)
    assert out.read_bytes() == b"the model in service"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "old.onnx", "out.onnx"]


def test_the_wrong_base_is_refused_before_any_work(tmp_path: Path) -> None:
    old, new = pair()
    data = payloads()["delta"]
    for base in (new, old[:-1], old + b"\x00", b""):
        with pytest.raises(WrongBaseError, match="applies to base sha256"):
            apply_delta_bytes(base, data)
    (tmp_path / "base.onnx").write_bytes(new)
    (tmp_path / "patch").write_bytes(data)
    with pytest.raises(WrongBaseError):
        apply_delta(tmp_path / "base.onnx", tmp_path / "patch", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_the_expected_digest_must_be_the_deltas_target() -> None:
    old, new = pair()
    data = payloads()["delta"]
    assert apply_delta_bytes(old, data, expected_sha256=sha256_bytes(new)) == new
    with pytest.raises(TargetMismatchError):
        apply_delta_bytes(old, data, expected_sha256=sha256_bytes(old))


def test_a_newer_format_version_is_refused_by_name() -> None:
    old, _ = pair()
    data = payloads()["delta"]
    header = read_header(io.BytesIO(data))
    newer = replace(header, version=FORMAT_VERSION + 1).pack()
    with pytest.raises(UnsupportedPatchError, match="format version"):
        apply_delta_bytes(old, newer + data[HEADER_SIZE:])


@pytest.mark.parametrize("kind", ["delta", "whole"])
def test_crafted_records_with_valid_checksums_raise_delta_errors_only(kind: str) -> None:
    """Checksums stop accidents, not a forger: the decoder's own checks must hold too.

    Each record's metadata and data are altered byte by byte and re-checksummed; the
    decoder must raise DeltaError (or, rarely, still rebuild the exact target), never
    crash with another exception and never return other bytes.
    """
    old, _ = pair()
    data = payloads()[kind]
    stream = io.BytesIO(data)
    header = read_header(stream)
    records = [read_record(stream, i, 1 << 30) for i in range(header.record_count)]
    target = apply_delta_bytes(old, data)
    for index, record in enumerate(records):
        for part in ("meta", "data"):
            original = getattr(record, part)
            for pos in range(0, len(original), max(1, len(original) // 60)):
                for value in (0, 0x7F, 0x80, 0xFF, original[pos] ^ 1):
                    altered = bytearray(original)
                    altered[pos] = value
                    if part == "meta":
                        changed = replace(record, meta=bytes(altered))
                    else:
                        changed = replace(record, data=bytes(altered))
                    body = b"".join(
                        pack_record(r.kind, r.meta, r.data)
                        for r in (*records[:index], changed, *records[index + 1 :])
                    )
                    try:
                        rebuilt = apply_delta_bytes(old, header.pack() + body)
                    except DeltaError:
                        continue
                    assert rebuilt == target
