"""The compiled delta decoder (artifact/delta/native.py) against the Python one, its reference.

Both must rebuild the same bytes from the same payload. The compiled one must really be
used where it applies (a fallback would otherwise hide behind the same bytes, slower),
hand what it does not implement to the Python decoder, and never let a mistake of its
own reach the output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from artifact.delta import EncodeOptions, apply_delta, encode_delta, native
from artifact.delta.codecs import Predictor
from artifact.delta.errors import DeltaError
from artifact.delta.frames import Layout, group_by, pack_frames, unpack_frames
from tests.artifact.delta_models import Init, build, quantize_like_ort, random_array, table_of
from tests.artifact.test_delta_quantized import _models
from tests.artifact.test_delta_roundtrip import _fine_tune_pair

DELTA_ONLY = EncodeOptions(level=3, whole_file_fallback=False, verify=False)
WORD_TYPES = {1: np.uint32, 2: np.uint8, 3: np.uint8, 5: np.uint16, 6: np.uint32, 7: np.uint64}
PLAIN_LAYOUTS = [
    Layout.INTERLEAVED,
    Layout.PLANES,
    Layout.PACK1,
    Layout.PACK2,
    Layout.PACK4,
    Layout.RICE,
    Layout.SPARSE,
]


def test_the_compiled_decoder_is_built() -> None:
    assert native.available(), (
        "artifact/delta/_native.c was not compiled: `make setup` builds it (pip install -e . "
        "needs gcc and the Python headers); without it every delta decodes in Python"
    )


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(sorted(WORD_TYPES)),
    st.sampled_from(PLAIN_LAYOUTS),
    st.integers(0, 3000),
    st.integers(0, 2**32 - 1),
    st.sampled_from([1, 4, 200, 2**64 - 1]),
)
def test_every_residual_layout_unpacks_to_the_same_words(
    dtype: int, layout: Layout, count: int, seed: int, spread: int
) -> None:
    word = np.dtype(WORD_TYPES[dtype])
    rng = np.random.default_rng(seed)
    top = min(spread, int(np.iinfo(word).max))
    words = rng.integers(0, top, size=count, dtype=word, endpoint=True)
    words[rng.random(count) < 0.6] = 0  # residuals are mostly zero
    payload = pack_frames(words, layout, level=3)
    assert native.unpack_words(payload, count, dtype, layout) == words.tobytes()
    python = unpack_frames(memoryview(payload), count, word, layout)
    assert python.tobytes() == words.tobytes()


def test_the_grouped_layout_follows_the_predictions_exponents() -> None:
    rng = np.random.default_rng(5)
    predicted = (rng.standard_normal(100_000) * 10.0 ** rng.integers(-6, 3, 100_000)).astype(
        np.float32
    )
    words = predicted.view(np.uint32)
    residual = rng.integers(0, 64, size=words.size, dtype=np.uint32)
    grouping = group_by(((words >> np.uint32(23)) & np.uint32(0xFF)).astype(np.uint16))
    assert len(grouping.ends) > 2  # several segments, merged where small
    payload = pack_frames(residual, Layout.GROUPED, level=3, grouping=grouping)
    unpacked = native.unpack_words(payload, words.size, 1, Layout.GROUPED, words.tobytes())
    assert unpacked == residual.tobytes()
    python = unpack_frames(
        memoryview(payload), words.size, np.dtype(np.uint32), Layout.GROUPED, grouping
    )
    assert python.tobytes() == residual.tobytes()


@pytest.mark.parametrize("layout", PLAIN_LAYOUTS)
def test_a_cut_or_padded_residual_is_declined_as_python_refuses_it(layout: Layout) -> None:
    words = np.random.default_rng(1).integers(0, 5, size=500, dtype=np.uint16)
    payload = pack_frames(words, layout, level=3)
    for damaged in (payload[:-1], payload + b"\0", payload[: len(payload) // 2]):
        assert native.unpack_words(damaged, words.size, 5, layout) is None
        with pytest.raises(DeltaError):
            unpack_frames(memoryview(damaged), words.size, np.dtype(np.uint16), layout)


def _decay_pair() -> tuple[bytes, bytes]:
    rng = np.random.default_rng(9)
    table = (rng.standard_normal((4000, 32)) * 0.1).astype(np.float32)
    decayed = table.copy()
    for _ in range(12):
        decayed *= np.float32(1 - 2e-5 * 0.01)
    touched = rng.choice(len(table), size=40, replace=False)
    decayed[touched] += (rng.standard_normal((40, 32)) * 1e-3).astype(np.float32)
    return build([Init("embedding.weight", table)]), build([Init("embedding.weight", decayed)])


def _last_axis_pair() -> tuple[bytes, bytes]:
    """FP32 to int8 per channel along the last axis (a new scale every word), as dynamic
    int8 quantizes MatMul weights, and the int8 requantized after a fine-tune."""
    rng = np.random.default_rng(6)
    w = random_array(rng, np.float32, (96, 40))
    q, scale, zero = quantize_like_ort(w, dtype=np.uint8, axis=1)
    derived = [Init("w_quantized", q), Init("w_scale", scale), Init("w_zero_point", zero)]
    return build([Init("w", w)]), build(derived)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, bytes]]:
    """Updates of every kind the compiled decoder takes, with onnxruntime's own int8."""
    found = {
        "fine-tune": _fine_tune_pair(np.random.default_rng(3)),
        "weight decay": _decay_pair(),
        "int8 along the last axis": _last_axis_pair(),
    }
    for per_channel in (False, True):
        work = tmp_path_factory.mktemp(f"quantized-{per_channel}")
        models = _models(work, per_channel)
        found[f"fp32 to int8 ({per_channel=})"] = (models["fp32"], models["int8"])
        found[f"int8 fine-tune ({per_channel=})"] = (models["int8"], models["int8_tuned"])
    return found


def _apply(old: bytes, payload: bytes, work: Path) -> tuple[str, bytes]:
    (work / "old.onnx").write_bytes(old)
    (work / "patch").write_bytes(payload)
    result = apply_delta(work / "old.onnx", work / "patch", work / "new.onnx")
    return result.decoder, (work / "new.onnx").read_bytes()


def _table(old: bytes, payload: bytes) -> list[tuple[Predictor, Layout]]:
    table = table_of(old, payload)
    return [(b.predictor, b.layout) for b in (*table.params, *table.blocks)]


def test_real_updates_are_decoded_natively_to_the_python_decoders_bytes(
    pairs: dict[str, tuple[bytes, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: set[tuple[Predictor, Layout]] = set()
    for name, (old, new) in pairs.items():
        payload = encode_delta(old, new, DELTA_ONLY)
        used.update(_table(old, payload))
        with monkeypatch.context() as forced:
            forced.setenv(native.ENV, "python")
            assert _apply(old, payload, tmp_path) == ("python", new), name
        assert _apply(old, payload, tmp_path) == ("native", new), name
    predictors = {predictor for predictor, _ in used}
    layouts = {layout for predictor, layout in used if predictor is not Predictor.COPY}
    assert predictors >= set(Predictor) - {Predictor.NONE}, predictors
    # every layout is also checked on its own above, GROUPED included
    assert layouts >= {Layout.INTERLEAVED, Layout.PLANES, Layout.RICE, Layout.SPARSE}, layouts


def test_what_it_does_not_implement_is_decoded_in_python(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    weights = random_array(rng, np.float32, (32, 32))
    old = build([Init("w", weights)])
    new = build([Init("w", weights.astype(np.float16))])  # a cast: float32 to float16
    payload = encode_delta(old, new, DELTA_ONLY)
    assert [p for p, _ in _table(old, payload)] == [Predictor.VALUES]
    assert _apply(old, payload, tmp_path) == ("python", new)
    declined = native.last_decline()
    assert declined is not None and declined[0] == "unsupported", declined


def test_a_wrong_rebuild_is_caught_and_decoded_again_in_python(
    pairs: dict[str, tuple[bytes, bytes]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Fault injection: the real compiled decoder runs, then one of its bytes is flipped."""
    old, new = pairs["int8 fine-tune (per_channel=True)"]
    payload = encode_delta(old, new, DELTA_ONLY)
    real: Callable[..., bytes | None] = native.decode

    def flipped(*args: object) -> bytes | None:
        built = real(*args)
        assert built is not None
        return built[:100] + bytes([built[100] ^ 1]) + built[101:]

    monkeypatch.setattr(native, "decode", flipped)
    with caplog.at_level(logging.WARNING, logger="artifact.delta.decode"):
        assert _apply(old, payload, tmp_path) == ("python", new)
    assert "decoding it again in Python" in caplog.text


def test_a_target_over_the_limit_is_streamed_in_python(
    pairs: dict[str, tuple[bytes, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = pairs["fine-tune"]
    payload = encode_delta(old, new, DELTA_ONLY)
    monkeypatch.setattr(native, "MAX_TARGET", len(new) - 1)
    assert _apply(old, payload, tmp_path) == ("python", new)


def _outcome(old: bytes, payload: bytes, work: Path) -> str:
    try:
        return _apply(old, payload, work)[1].hex()[:16]
    except DeltaError as exc:
        return f"{type(exc).__name__}: {exc}"


def test_damage_reads_the_same_with_either_decoder(
    pairs: dict[str, tuple[bytes, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = pairs["int8 fine-tune (per_channel=True)"]
    payload = encode_delta(old, new, DELTA_ONLY)
    for position in range(0, len(payload), max(1, len(payload) // 40)):
        damaged = bytearray(payload)
        damaged[position] ^= 0x10
        compiled = _outcome(old, bytes(damaged), tmp_path)
        with monkeypatch.context() as forced:
            forced.setenv(native.ENV, "python")
            assert _outcome(old, bytes(damaged), tmp_path) == compiled, position
        assert not (tmp_path / "new.onnx").exists() or compiled.startswith(new.hex()[:16])
        (tmp_path / "new.onnx").unlink(missing_ok=True)
