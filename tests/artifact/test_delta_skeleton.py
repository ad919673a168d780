"""The skeleton codec: a QDQ rewrite's new names are matched against names synthesized
from the old model, at no cost on the wire; every method round-trips; old versions are
refused by name."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import onnx
import pytest
import zstandard
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from artifact.delta import UnsupportedPatchError, apply_delta_bytes, encode, skeleton
from artifact.delta.errors import CorruptPatchError
from artifact.delta.format import FORMAT_VERSION, read_header
from artifact.delta.skeleton import (
    SkeletonMethod,
    compress_with_dict,
    decode_skeleton,
    encode_skeleton,
    old_names,
    synthetic_dictionary,
)

WIDTH, HIDDEN, LAYERS = 16, 16, 6


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self._batches = iter(
            [{"x": rng.standard_normal((2, WIDTH)).astype(np.float32)} for _ in range(2)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _fp32() -> bytes:
    """A stack of MatMul/Add/Relu layers: many tensors and activations to rename."""
    rng = np.random.default_rng(1)
    nodes, inits = [], []
    current = "x"
    for i in range(LAYERS):
        w, b = f"/layers.{i}/weight", f"/layers.{i}/bias"
        inits += [
            numpy_helper.from_array(
                (rng.standard_normal((WIDTH if i == 0 else HIDDEN, HIDDEN)) * 0.2).astype(
                    np.float32
                ),
                w,
            ),
            numpy_helper.from_array((rng.standard_normal(HIDDEN) * 0.1).astype(np.float32), b),
        ]
        mm, add, relu = (f"/layers.{i}/{op}" for op in ("MatMul", "Add", "Relu"))
        nodes += [
            helper.make_node("MatMul", [current, w], [f"{mm}_output_0"], name=mm),
            helper.make_node("Add", [f"{mm}_output_0", b], [f"{add}_output_0"], name=add),
            helper.make_node("Relu", [f"{add}_output_0"], [f"{relu}_output_0"], name=relu),
        ]
        current = f"{relu}_output_0"
    nodes.append(helper.make_node("Identity", [current], ["y"], name="/out/Identity"))
    graph = helper.make_graph(
        nodes,
        "stack",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", HIDDEN])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    work = tmp_path_factory.mktemp("skeleton")
    source, target = work / "fp32.onnx", work / "int8.onnx"
    source.write_bytes(_fp32())
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # ORT may leave shape-inference files in the cwd
        quantize_static(
            source,
            target,
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
    return source.read_bytes(), target.read_bytes()


def _graph_bytes(model: bytes) -> bytes:
    """The model without its initializers' payloads: what the skeleton mostly is."""
    proto = onnx.load_from_string(model)
    for init in proto.graph.initializer:
        init.ClearField("raw_data")
    return proto.SerializeToString()


def test_old_names_are_read_from_protobuf_strings() -> None:
    names = old_names(_fp32())
    assert b"/layers.0/weight" in names
    assert b"/layers.3/Relu_output_0" in names
    assert b"/layers.5/MatMul" in names


def test_a_qdq_rewrite_costs_far_less_against_synthesized_names(
    pair: tuple[bytes, bytes],
) -> None:
    old, new = (_graph_bytes(m) for m in pair)
    before = len(compress_with_dict(new, old, 19))  # format version 1: the old skeleton only
    method, coded = encode_skeleton(new, old, 19)
    assert method is SkeletonMethod.ZSTD_NAMES
    assert len(coded) < 0.85 * before, (len(coded), before)
    assert decode_skeleton(coded, method, len(new), old) == new
    # the whole delta rebuilds the file with it
    encoded = encode(*pair)
    assert encoded.stats.mode == "delta"
    assert apply_delta_bytes(pair[0], encoded.payload) == pair[1]


def test_an_unrelated_skeleton_keeps_the_plain_methods() -> None:
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert encode_skeleton(noise, b"", 19) == (SkeletonMethod.STORED, noise)
    assert encode_skeleton(b"", b"old", 19) == (SkeletonMethod.ZERO, b"")
    text = b"graph bytes " * 200
    method, coded = encode_skeleton(text, text, 19)
    assert method in (SkeletonMethod.ZSTD, SkeletonMethod.ZSTD_NAMES)
    assert decode_skeleton(coded, method, len(text), text) == text


@pytest.mark.parametrize("method", list(SkeletonMethod))
def test_every_method_round_trips(method: SkeletonMethod) -> None:
    old = _fp32()[:3000]
    new = b"\x0a\x13/layers.0/weight_scale" * 20 if method is not SkeletonMethod.ZERO else b""
    predicted = new[:100] if method is SkeletonMethod.ZSTD_QDQ else None
    if method is SkeletonMethod.STORED:
        coded = new
    elif method is SkeletonMethod.ZERO:
        coded = b""
    else:
        dictionary = {
            SkeletonMethod.ZSTD: old,
            SkeletonMethod.ZSTD_NAMES: synthetic_dictionary(old) + old,
            SkeletonMethod.ZSTD_QDQ: new[:100] + old,
        }[method]
        coded = compress_with_dict(new, dictionary, 3)
    assert decode_skeleton(coded, method, len(new), old, predicted) == new


def test_an_unknown_skeleton_method_is_refused() -> None:
    with pytest.raises(CorruptPatchError, match="unknown skeleton method 9"):
        decode_skeleton(b"x", 9, 1, b"")


def test_a_version_1_delta_is_refused_by_name(pair: tuple[bytes, bytes]) -> None:
    payload = encode(*pair).payload
    header = read_header(io.BytesIO(payload))
    assert header.version == 4 and FORMAT_VERSION == 5  # no ZSTD_QDQ: written as version 4
    older = replace(header, version=1).pack() + payload[len(header.pack()) :]
    with pytest.raises(UnsupportedPatchError, match="format version 1 is not supported"):
        apply_delta_bytes(pair[0], older)


def test_the_synthetic_dictionary_is_bounded_and_deterministic() -> None:
    old = _fp32()
    first, second = synthetic_dictionary(old), synthetic_dictionary(bytes(old))
    assert first == second
    assert b"/layers.2/Relu_output_0_QuantizeLinear_Output" in first
    assert len(synthetic_dictionary(b"\x10" + b"a" * 16 * 100_000)) <= 8 << 20


def test_compressing_in_pieces_makes_one_frame_that_records_its_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """zstd is fed a piece at a time (so a Ctrl-C is heard between pieces); the result is
    one frame, with its content size, that a one-shot decompress reads back whole."""
    monkeypatch.setattr(skeleton, "COMPRESS_PIECE", 1000)
    data = bytes(range(256)) * 40 + np.random.default_rng(3).bytes(5000)  # 15 pieces
    for dictionary in (b"", data[:3000]):
        frame = skeleton.compress_with_dict(data, dictionary, 19)
        params = zstandard.get_frame_parameters(frame)
        assert params.content_size == len(data)
        zdict = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        reader = (
            zstandard.ZstdDecompressor(dict_data=zdict)
            if dictionary
            else zstandard.ZstdDecompressor()
        )
        assert reader.decompress(frame) == data
