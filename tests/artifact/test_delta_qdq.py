"""ZSTD_QDQ: an FP32 → canonical int8 update carries a few bytes of decisions, not a graph.

A small CNN (Conv, Relu, Conv, Relu, GlobalAveragePool, Flatten, Gemm) is quantized by
onnxruntime's static QDQ quantizer, read back by `analyse` and rebuilt in canonical form;
the delta from the FP32 model then predicts the whole int8 skeleton from the base. The
device side decodes it without onnx or torch; damage and forgery are refused.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from artifact.delta import (
    DeltaError,
    EncodeOptions,
    UnsupportedPatchError,
    WrongBaseError,
    apply_delta_bytes,
    encode,
)
from artifact.delta.format import (
    FORMAT_VERSION,
    HEADER_SIZE,
    Kind,
    pack_record,
    read_header,
    read_record,
)
from artifact.delta.qdq.analyse import NotCanonical, analyse, exact_decisions
from artifact.delta.qdq.build import build, counts, parse, predict
from artifact.delta.qdq.decisions import pack, unpack
from artifact.delta.skeleton import MAX_QDQ_BASE, SkeletonMethod, predicted_skeleton
from tests.artifact.test_delta_cli import homefleet

CHANNELS, STEPS, FILTERS, CLASSES = 3, 32, 16, 5


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{"x": rng.standard_normal((2, CHANNELS, STEPS)).astype(np.float32)} for _ in range(4)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _cnn(seed: int) -> bytes:
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    weights = {
        "conv1.weight": weight(FILTERS, CHANNELS, 3),
        "conv1.bias": weight(FILTERS),
        "conv2.weight": weight(FILTERS, FILTERS, 3),
        "conv2.bias": weight(FILTERS),
        "fc.weight": weight(CLASSES, FILTERS),
        "fc.bias": weight(CLASSES),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], "conv1", pads=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], "relu1"),
        helper.make_node(
            "Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], "conv2", pads=[1, 1]
        ),
        helper.make_node("Relu", ["c2"], ["r2"], "relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"], "pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], "flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["y"], "fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", CHANNELS, STEPS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@dataclass(frozen=True)
class Models:
    fp32: bytes
    int8: bytes  # onnxruntime's file
    canonical: bytes


@functools.cache
def _models(work: Path, per_channel: bool) -> Models:
    fp32 = _cnn(0)
    source, target = work / "cnn.onnx", work / f"cnn-int8-{per_channel}.onnx"
    source.write_bytes(fp32)
    quantize_static(
        source,
        target,
        _Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    int8 = target.read_bytes()
    analysis = analyse(onnx.load_from_string(int8), onnx.load_from_string(fp32))
    return Models(fp32, int8, build(fp32, analysis.decisions, analysis.values))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qdq")


@pytest.fixture
def models(work: Path, monkeypatch: pytest.MonkeyPatch) -> Models:
    monkeypatch.chdir(work)  # onnxruntime may leave shape-inference files in the cwd
    return _models(work, True)


def _skeleton_record(payload: bytes) -> tuple[int, int, bytes]:
    """(start, end, meta) of the payload's SKELETON record."""
    stream = io.BytesIO(payload)
    read_header(stream)
    read_record(stream, 0, len(payload))
    start = stream.tell()
    record = read_record(stream, 1, len(payload))
    assert record.kind is Kind.SKELETON
    return start, stream.tell(), record.meta


@pytest.mark.parametrize("per_channel", [True, False])
def test_the_canonical_int8_model_rides_on_a_predicted_skeleton(
    work: Path, per_channel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(work)
    m = _models(work, per_channel)
    encoded = encode(m.fp32, m.canonical)
    assert encoded.stats.mode == "delta"
    assert encoded.stats.skeleton_method == "ZSTD_QDQ"
    assert apply_delta_bytes(m.fp32, encoded.payload) == m.canonical
    without = encode(m.fp32, m.canonical, EncodeOptions(qdq_skeleton=False))
    assert without.stats.skeleton_method != "ZSTD_QDQ"
    assert len(encoded.payload) < 0.6 * len(without.payload), (
        len(encoded.payload),
        len(without.payload),
    )
    _, _, meta = _skeleton_record(encoded.payload)
    assert meta[0] == SkeletonMethod.ZSTD_QDQ
    assert (
        unpack(meta[1:], *counts(m.fp32))
        == analyse(onnx.load_from_string(m.int8), onnx.load_from_string(m.fp32)).decisions
    )
    assert len(meta) < 24  # the graph's worth of decisions


def test_the_canonical_model_computes_what_onnxruntimes_does(models: Models) -> None:
    """Same outputs, bit for bit: the canonical form only reorders and renames nothing."""
    decisions = analyse(onnx.load_from_string(models.int8), onnx.load_from_string(models.fp32))
    assert decisions.decisions.shared  # the Flatten's Q/DQ pair uses the pool's scale
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    x = np.random.default_rng(5).standard_normal((3, CHANNELS, STEPS)).astype(np.float32)
    outputs = [
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )[0]
        for model in (models.int8, models.canonical)
    ]
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("per_channel", [True, False])
def test_the_canonical_model_is_what_protobuf_writes_by_either_writer(
    work: Path, per_channel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The builder lists fields in the order upb serializes them: a built model parses
    and serializes back unchanged, and the Python writer gives the same bytes."""
    models = _models(work, per_channel)
    assert parse(models.canonical).SerializeToString() == models.canonical
    analysis = analyse(onnx.load_from_string(models.int8), onnx.load_from_string(models.fp32))
    decisions = pack(analysis.decisions)
    predicted = predict(models.fp32, decisions)
    assert parse(predicted).SerializeToString() == predicted
    monkeypatch.setenv("HOMEFLEET_DELTA_DECODER", "python")
    assert build(models.fp32, analysis.decisions, analysis.values) == models.canonical
    assert predict(models.fp32, decisions) == predicted


def test_decisions_round_trip_and_refuse_what_does_not_fit(models: Models) -> None:
    decisions = exact_decisions(models.fp32, models.canonical)
    assert pack(unpack(decisions, *counts(models.fp32))) == decisions
    assert predict(models.fp32, decisions) != models.canonical  # payloads zero-filled
    assert len(predict(models.fp32, decisions)) == len(models.canonical)
    with pytest.raises(ValueError, match="trailing"):
        unpack(decisions + b"\x00", *counts(models.fp32))
    with pytest.raises(ValueError, match="truncated"):
        unpack(decisions[:-1], *counts(models.fp32))
    assert len(predict(_cnn(1), decisions)) == len(models.canonical)  # other weights fit
    relu = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(ValueError, match="decisions"):
        predict(helper.make_model(relu).SerializeToString(), decisions)
    with pytest.raises(ValueError, match="not an ONNX model"):
        predict(b"\x0a\xff", decisions)


def test_onnxruntimes_own_file_is_not_offered_the_method(models: Models) -> None:
    with pytest.raises(NotCanonical, match="canonical form"):
        exact_decisions(models.fp32, models.int8)
    encoded = encode(models.fp32, models.int8)
    assert encoded.stats.skeleton_method not in ("", "ZSTD_QDQ")
    assert apply_delta_bytes(models.fp32, encoded.payload) == models.int8


def test_every_flipped_bit_is_detected(models: Models) -> None:
    payload = encode(models.fp32, models.canonical).payload
    for bit in range(len(payload) * 8):
        damaged = bytearray(payload)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DeltaError):
            apply_delta_bytes(models.fp32, bytes(damaged))


def test_forged_decisions_never_yield_a_wrong_model(models: Models) -> None:
    """Re-checksummed decisions: an error (a DeltaError, nothing else) or the exact target."""
    payload = encode(models.fp32, models.canonical).payload
    start, end, meta = _skeleton_record(payload)
    data = read_record(io.BytesIO(payload[start:]), 1, len(payload)).data
    forgeries = [meta[:-1], meta + b"\x00", meta[:1] + b"\xff" * 40]
    for i in range(1, len(meta)):
        for value in {0, 1, 0x7F, 0x80, 0xFF, meta[i] ^ 1, meta[i] ^ 0x10}:
            forgeries.append(meta[:i] + bytes([value]) + meta[i + 1 :])
    for forged in forgeries:
        record = pack_record(Kind.SKELETON, forged, data)
        try:
            rebuilt = apply_delta_bytes(models.fp32, payload[:start] + record + payload[end:])
        except DeltaError:
            continue
        assert rebuilt == models.canonical


def test_a_wrong_base_is_refused(models: Models) -> None:
    payload = encode(models.fp32, models.canonical).payload
    with pytest.raises(WrongBaseError):
        apply_delta_bytes(_cnn(1), payload)


def test_a_base_over_the_limit_is_refused_before_any_work(models: Models) -> None:
    decisions = exact_decisions(models.fp32, models.canonical)
    with pytest.raises(UnsupportedPatchError, match="limit"):
        predicted_skeleton(memoryview(bytes(MAX_QDQ_BASE + 1)), decisions, [], 0)


def test_the_device_decodes_it_without_onnx_or_torch(models: Models, tmp_path: Path) -> None:
    old, patch, out = tmp_path / "cnn.onnx", tmp_path / "p.hfd", tmp_path / "int8.onnx"
    old.write_bytes(models.fp32)
    encoded = encode(models.fp32, models.canonical)
    assert encoded.stats.skeleton_method == "ZSTD_QDQ"
    patch.write_bytes(encoded.payload)
    done = homefleet("artifact", "patch", old, patch, "-o", out)  # heavy imports blocked
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == models.canonical
    # `diff` without onnx still works, but cannot find the decisions: it says so
    new, again = tmp_path / "canonical.onnx", tmp_path / "again.hfd"
    new.write_bytes(models.canonical)
    made = homefleet("artifact", "diff", old, new, "-o", again)
    assert made.returncode == 0, made.stderr
    assert "does not predict the int8 graph" in made.stderr
    assert again.stat().st_size > len(encoded.payload)


def test_only_a_zstd_qdq_delta_is_written_as_version_5(models: Models) -> None:
    """Version 5 only added ZSTD_QDQ: a delta of any other method is written as version 4,
    so agents not yet upgraded still apply it; both versions decode."""
    payload = encode(models.fp32, models.int8).payload  # onnxruntime's file: no ZSTD_QDQ
    header = read_header(io.BytesIO(payload))
    assert header.version == 4 and FORMAT_VERSION == 5
    assert apply_delta_bytes(models.fp32, payload) == models.int8
    newer = replace(header, version=5).pack() + payload[HEADER_SIZE:]
    assert apply_delta_bytes(models.fp32, newer) == models.int8
    qdq = encode(models.fp32, models.canonical).payload
    assert read_header(io.BytesIO(qdq)).version == 5
