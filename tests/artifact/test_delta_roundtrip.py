"""patch(old, diff(old, new)) == new, byte for byte, for random pairs of models.

Pairs are drawn by hypothesis: initializers of six element types, stored raw or in the
typed fields, then kept, fine-tuned, renamed, resized, re-typed, quantized (onnxruntime
naming, per tensor or per channel), removed, or joined by new ones, in any order.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from artifact.delta import EncodeOptions, apply_delta, apply_delta_bytes, encode, encode_delta
from tests.artifact.delta_models import (
    DTYPES,
    Init,
    build,
    quantize_like_ort,
    random_array,
    tweak,
)

FAST = EncodeOptions(level=3)
DELTA_ONLY = EncodeOptions(level=3, whole_file_fallback=False, verify=False)
OPS = (
    "keep",
    "tweak",
    "rename",
    "resize",
    "retype",
    "remove",
    "quantize",
    "quantize_tuned",
    "requantize",
    "duplicate",
)

shapes = st.lists(st.integers(1, 12), min_size=0, max_size=3).map(tuple)


def _retype(rng: np.random.Generator, array: np.ndarray) -> np.ndarray:
    floats = [d for d in DTYPES if np.issubdtype(d, np.floating)]
    ints = [d for d in DTYPES if not np.issubdtype(d, np.floating)]
    pool = floats if np.issubdtype(array.dtype, np.floating) else ints
    choices = [d for d in pool if np.dtype(d) != array.dtype]
    return tweak(rng, array.astype(choices[int(rng.integers(len(choices)))]))


def _quantized(name: str, array: np.ndarray, rng: np.random.Generator, raw: bool) -> list[Init]:
    floats = array.astype(np.float32)
    axis = int(rng.integers(floats.ndim)) if floats.ndim and rng.random() < 0.5 else None
    dtype = np.int8 if rng.random() < 0.5 else np.uint8
    q, scale, zero = quantize_like_ort(floats, dtype=dtype, axis=axis)
    return [
        Init(f"{name}_quantized", q, raw),
        Init(f"{name}_scale", scale, raw),
        Init(f"{name}_zero_point", zero, raw),
    ]


@st.composite
def model_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    old: list[Init] = []
    for k in range(draw(st.integers(0, 6))):
        dtype = draw(st.sampled_from(DTYPES))
        old.append(Init(f"t{k}", random_array(rng, dtype, draw(shapes)), draw(st.booleans())))
    new: list[Init] = []
    for init in list(old):
        op = draw(st.sampled_from((*OPS, "quantize", "requantize")))  # weighted: rarer paths
        floating = np.issubdtype(init.array.dtype, np.floating)
        if op == "keep":
            new.append(init)
        elif op == "tweak":
            new.append(replace(init, array=tweak(rng, init.array)))
        elif op == "rename":
            new.append(replace(init, name=init.name + "_renamed"))
        elif op == "resize":
            rows = draw(st.integers(1, 12))
            shape = (rows, *init.array.shape[1:]) if init.array.ndim else (rows,)
            grown = random_array(rng, init.array.dtype.type, shape)
            flat_old = init.array.reshape(-1)
            n = min(grown.size, flat_old.size)
            grown.reshape(-1)[:n] = flat_old[:n]
            new.append(replace(init, array=grown))
        elif op == "duplicate":  # not a valid model, but still bytes to rebuild
            new.extend([init, replace(init, array=tweak(rng, init.array))])
        elif op == "retype":
            new.append(replace(init, array=_retype(rng, init.array)))
        elif op == "quantize" and floating:  # the same weights: scales are predictable
            new.extend(_quantized(init.name, init.array, rng, init.raw))
        elif op == "quantize_tuned" and floating:
            new.extend(_quantized(init.name, tweak(rng, init.array), rng, init.raw))
        elif op == "requantize" and floating:
            # the old model already holds a quantized form; the new one requantizes it
            old.extend(_quantized(init.name, init.array, rng, init.raw))
            new.extend(_quantized(init.name, tweak(rng, init.array), rng, not init.raw))
        # "remove", and quantize ops on integer tensors: gone from the new model
    for k in range(draw(st.integers(0, 2))):
        dtype = draw(st.sampled_from(DTYPES))
        new.append(Init(f"added{k}", random_array(rng, dtype, draw(shapes)), draw(st.booleans())))
    new = draw(st.permutations(new))
    return build(old, doc="old"), build(new, doc="new model")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_pairs())
def test_patch_rebuilds_the_new_model_exactly(pair: tuple[bytes, bytes]) -> None:
    old, new = pair
    # the model-aware delta itself, even where a whole-file payload would be smaller
    assert apply_delta_bytes(old, encode_delta(old, new, DELTA_ONLY)) == new
    encoded = encode(old, new, FAST)
    assert encoded.stats.delta_error is None
    assert apply_delta_bytes(old, encoded.payload) == new


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=2000), st.binary(max_size=2000))
def test_any_two_files_round_trip(old: bytes, new: bytes) -> None:
    assert apply_delta_bytes(old, encode_delta(old, new, FAST)) == new


@settings(max_examples=20, deadline=None)
@given(model_pairs(), st.integers(0, 10_000), st.integers(0, 200))
def test_damaged_models_still_round_trip(pair: tuple[bytes, bytes], cut: int, junk: int) -> None:
    """Truncated or padded model files are just bytes: the codec must not trip on them."""
    old, new = pair
    new = new[: cut % (len(new) + 1)] + bytes(range(junk % 256))
    assert apply_delta_bytes(old, encode_delta(old, new, FAST)) == new


def _fine_tune_pair(rng: np.random.Generator) -> tuple[bytes, bytes]:
    weights = [
        Init("conv.weight", random_array(rng, np.float32, (64, 32, 3))),
        Init("fc.weight", random_array(rng, np.float32, (128, 96))),
        Init("fc.bias", random_array(rng, np.float32, (128,))),
        Init("steps", np.arange(100, dtype=np.int64)),
    ]
    tuned = [replace(w, array=tweak(rng, w.array)) for w in weights[:3]] + weights[3:]
    return build(weights), build(tuned)


def test_each_model_tensor_is_coded_with_a_prediction_and_the_file_api_matches(
    tmp_path: Path,
) -> None:
    old, new = _fine_tune_pair(np.random.default_rng(3))
    encoded = encode(old, new)
    assert encoded.stats.mode == "delta"
    coded = {t.name: t.encoding for t in encoded.stats.tensors}
    assert coded["steps"].startswith("copy")  # listed, or left in the skeleton
    assert all(coded[n].startswith("values/") for n in ("conv.weight", "fc.weight", "fc.bias"))
    (tmp_path / "old.onnx").write_bytes(old)
    (tmp_path / "patch").write_bytes(encoded.payload)
    result = apply_delta(tmp_path / "old.onnx", tmp_path / "patch", tmp_path / "new.onnx")
    assert (tmp_path / "new.onnx").read_bytes() == new
    assert result.size == len(new) and result.mode == "delta"


def test_a_fine_tune_costs_less_than_zstd_19_of_the_new_model() -> None:
    import zstandard

    old, new = _fine_tune_pair(np.random.default_rng(4))
    payload = encode_delta(old, new)
    generic = len(zstandard.ZstdCompressor(level=19).compress(new))
    assert len(payload) < 0.75 * generic, (len(payload), generic)


@pytest.mark.parametrize("same", [True, False])
def test_unrelated_or_identical_files_fall_back_to_whole_file_coding(same: bool) -> None:
    rng = np.random.default_rng(5)
    old = rng.bytes(50_000)
    new = old if same else rng.bytes(50_000)
    encoded = encode(old, new)
    sizes = dict(encoded.stats.candidates)
    assert len(encoded.payload) == min(sizes.values())
    assert apply_delta_bytes(old, encoded.payload) == new
    if same:
        assert len(encoded.payload) < 300
    else:
        assert encoded.stats.mode == "whole-stored"
