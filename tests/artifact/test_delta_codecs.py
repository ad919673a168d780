"""The codec's building blocks: channel expansion, packed layouts, varints, weight decay."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from artifact.delta import CorruptPatchError, apply_delta_bytes, encode, varint
from artifact.delta.codecs import Channels
from artifact.delta.frames import Layout, best_residual, group_by, pack_frames, unpack_frames
from tests.artifact.delta_models import Init, build


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 200), st.integers(0, 200))
def test_channel_expansion_matches_the_per_word_formula(
    count: int, inner: int, start: int, n: int
) -> None:
    values = np.arange(count, dtype=np.float32) * 1.5
    expected = values[(np.arange(start, start + n) // inner) % count]
    np.testing.assert_array_equal(Channels(count, inner).expand(values, start, n), expected)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([np.uint8, np.uint16, np.uint32, np.uint64]),
    st.sampled_from(list(Layout)),
    st.lists(st.integers(0, 2**64 - 1), max_size=300),
    st.integers(0, 300),
)
def test_every_layout_round_trips(
    dtype: type[np.unsignedinteger], layout: Layout, big: list[int], zeros: int
) -> None:
    info = np.iinfo(dtype)
    rng = np.random.default_rng(len(big) + zeros)
    small = rng.integers(0, 4, size=zeros)
    words = np.array([v & int(info.max) for v in big] + small.tolist(), dtype=dtype)
    rng.shuffle(words)
    grouping = group_by(rng.integers(0, 5, size=words.size).astype(np.uint16))
    payload = pack_frames(words, layout, 3, grouping)
    back = unpack_frames(memoryview(payload), words.size, np.dtype(dtype), layout, grouping)
    np.testing.assert_array_equal(back, words)


def test_sparse_small_residuals_pack_smaller_than_plain_bytes() -> None:
    rng = np.random.default_rng(0)
    changed = rng.random(50_000) < 0.15
    words = (changed * rng.integers(1, 3, 50_000)).astype(np.uint8)
    plain = len(pack_frames(words, Layout.INTERLEAVED, level=19))
    packed = len(pack_frames(words, Layout.PACK2, level=19))
    assert packed < 0.9 * plain, (packed, plain)


def test_rare_changes_cost_their_positions_not_a_bit_a_word() -> None:
    """SPARSE codes gaps and values with Rice codes: near the entropy, below zstd."""
    rng = np.random.default_rng(1)
    words = np.zeros(30_000, dtype=np.uint8)
    moved = rng.choice(words.size, size=240, replace=False)
    words[moved] = rng.integers(1, 3, size=moved.size)
    sparse = len(pack_frames(words, Layout.SPARSE, level=19))
    packed = min(
        len(pack_frames(words, layout, level=19)) for layout in (Layout.PACK1, Layout.PACK2)
    )
    assert sparse < 0.8 * packed, (sparse, packed)
    assert best_residual(words, None, level=19).layout is Layout.SPARSE


def test_small_dense_residuals_take_rice_codes() -> None:
    """int32 biases off by a few units: every word Rice-coded beats zstd's bytes."""
    rng = np.random.default_rng(2)
    words = rng.geometric(0.3, size=384).astype(np.uint32) - 1
    trial = best_residual(words, None, level=19)
    assert trial.layout is Layout.RICE, trial.layout
    assert trial.size < 0.8 * len(pack_frames(words, Layout.PLANES, level=19))


@pytest.mark.parametrize("layout", [Layout.RICE, Layout.SPARSE])
def test_damaged_rice_codes_raise_corrupt_patch(layout: Layout) -> None:
    words = np.array([0, 5, 0, 0, 900, 0, 1, 0] * 40, dtype=np.uint16)
    payload = pack_frames(words, layout, 19)
    damaged = [payload[: len(payload) // 2], payload + b"\x00", b"\x40" + payload[1:]]
    damaged += [payload[:i] + bytes([payload[i] ^ 0xFF]) + payload[i + 1 :] for i in range(4)]
    for data in damaged:
        try:
            back = unpack_frames(memoryview(data), words.size, np.dtype(np.uint16), layout)
        except CorruptPatchError:
            continue
        assert back.size == words.size  # a flip that still parses: the sha256 catches it


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([Layout.RICE, Layout.SPARSE]),
    st.sampled_from([np.uint8, np.uint32, np.uint64]),
    st.binary(max_size=80),
    st.integers(0, 60),
)
def test_arbitrary_rice_payloads_decode_or_raise_corrupt_patch(
    layout: Layout, dtype: type[np.unsignedinteger], data: bytes, count: int
) -> None:
    try:
        words = unpack_frames(memoryview(data), count, np.dtype(dtype), layout)
    except CorruptPatchError:
        return
    assert words.size == count and words.dtype == dtype


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), max_size=200))
def test_varints_round_trip_like_protobuf(values: list[int]) -> None:
    words = np.array(values, dtype=np.uint64)
    data = varint.encode(words)
    expected = b"".join(_protobuf_varint(v) for v in values)
    assert data == expected
    np.testing.assert_array_equal(varint.decode(data), words)


def _protobuf_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def test_decoupled_weight_decay_is_predicted_exactly() -> None:
    """AdamW shrinks untouched rows by a float32 factor per step: they cost nothing."""
    rng = np.random.default_rng(9)
    table = (rng.standard_normal((4000, 32)) * 0.1).astype(np.float32)
    decayed = table.copy()
    factor = np.float32(1 - 2e-5 * 0.01)
    for _ in range(12):
        decayed *= factor
    touched = rng.choice(len(table), size=40, replace=False)
    decayed[touched] += (rng.standard_normal((40, 32)) * 1e-3).astype(np.float32)
    old, new = build([Init("embedding.weight", table)]), build([Init("embedding.weight", decayed)])
    encoded = encode(old, new)
    (stat,) = encoded.stats.tensors
    assert stat.encoding.startswith("decay"), stat
    assert stat.coded_bytes < 0.05 * table.nbytes, stat
    assert apply_delta_bytes(old, encoded.payload) == new
