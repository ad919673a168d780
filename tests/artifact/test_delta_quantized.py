"""Quantization-aware prediction: a recompressed model costs almost nothing on the wire.

Real onnxruntime static QDQ quantization of a small MLP: the device holds the FP32 model
(or an earlier int8 one) and receives the int8 artifact; the delta predicts every
integer from the old weights and the new scale and zero point.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import zstandard
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from artifact.delta import apply_delta_bytes, encode
from artifact.delta.codecs import Predictor
from tests.artifact.delta_models import table_of

CHANNELS, STEPS, FILTERS, HIDDEN, OUT = 4, 16, 16, 192, 48
WIDTH = FILTERS * STEPS


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            [{"x": rng.standard_normal((4, CHANNELS, STEPS)).astype(np.float32)} for _ in range(4)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _mlp(weights: dict[str, np.ndarray]) -> bytes:
    nodes = [
        helper.make_node(
            "Conv", ["x", "conv.weight", "conv.bias"], ["c0"], name="conv", pads=[1, 1]
        ),
        helper.make_node("Relu", ["c0"], ["c1"], name="conv_relu"),
        helper.make_node("Reshape", ["c1", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc1.weight"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "fc1.bias"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "fc2.weight"], ["h3"], name="fc2"),
        helper.make_node("Add", ["h3", "fc2.bias"], ["y"], name="fc2_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", CHANNELS, STEPS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT])],
        initializer=[
            numpy_helper.from_array(np.array([-1, WIDTH], dtype=np.int64), "flat_shape"),
            *(numpy_helper.from_array(v, k) for k, v in weights.items()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (rng.standard_normal((FILTERS, CHANNELS, 3)) * 0.3).astype(np.float32),
        "conv.bias": (rng.standard_normal(FILTERS) * 0.05).astype(np.float32),
        "fc1.weight": (rng.standard_normal((WIDTH, HIDDEN)) * 0.1).astype(np.float32),
        "fc1.bias": (rng.standard_normal(HIDDEN) * 0.01).astype(np.float32),
        "fc2.weight": (rng.standard_normal((HIDDEN, OUT)) * 0.1).astype(np.float32),
        "fc2.bias": (rng.standard_normal(OUT) * 0.01).astype(np.float32),
    }


def _fine_tuned(weights: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: (v + rng.standard_normal(v.shape).astype(np.float32) * 2e-3 * np.abs(v)).astype(
            np.float32
        )
        for k, v in weights.items()
    }


def _quantize(fp32: bytes, work: Path, name: str, per_channel: bool) -> bytes:
    source, target = work / f"{name}.onnx", work / f"{name}-int8.onnx"
    source.write_bytes(fp32)
    quantize_static(
        source,
        target,
        _Reader(0),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    return target.read_bytes()


@functools.cache
def _models(work: Path, per_channel: bool) -> dict[str, bytes]:
    base = _weights(0)
    tuned = _fine_tuned(base, 1)
    fp32, fp32_tuned = _mlp(base), _mlp(tuned)
    return {
        "fp32": fp32,
        "int8": _quantize(fp32, work, "base", per_channel),
        "int8_tuned": _quantize(fp32_tuned, work, "tuned", per_channel),
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quantized")


def _zstd19(data: bytes) -> int:
    return len(zstandard.ZstdCompressor(level=19).compress(data))


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp32_to_its_int8_quantization_costs_a_fraction_of_zstd(
    work: Path, per_channel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(work)  # ORT may leave shape-inference files in the cwd
    models = _models(work, per_channel)
    old, new = models["fp32"], models["int8"]
    encoded = encode(old, new)
    assert apply_delta_bytes(old, encoded.payload) == new
    coded = {t.name: t for t in encoded.stats.tensors}
    for name in ("conv.weight_quantized", "fc1.weight_quantized", "fc2.weight_quantized"):
        assert coded[name].encoding.startswith("quant"), coded[name]
        assert coded[name].coded_bytes < coded[name].nbytes / 50, coded[name]
    # scales are recomputed from the old weights, the int32 bias's scale is a product
    assert coded["conv.weight_scale"].encoding.startswith("param/scale"), coded
    assert coded["conv.bias_quantized_scale"].encoding.startswith("param/product"), coded
    assert coded["conv.bias_quantized"].encoding.startswith("quant"), coded
    assert all(t.coded_bytes <= 8 for n, t in coded.items() if n.endswith("_quantized")), coded
    assert encoded.stats.mode == "delta"
    assert len(encoded.payload) < _zstd19(new) / 5, (len(encoded.payload), _zstd19(new))
    # all-zero zero points are neither parameters nor blocks: the QDQ prediction holds them
    table = table_of(old, encoded.payload)
    listed = [
        new[b.out_offset : b.out_offset + b.out_nbytes] for b in (*table.params, *table.blocks)
    ]
    assert not [data for data in listed if not any(data)], "an all-zero tensor is listed"


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_to_int8_after_a_fine_tune_is_predicted_by_requantization(
    work: Path, per_channel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(work)
    models = _models(work, per_channel)
    old, new = models["int8"], models["int8_tuned"]
    encoded = encode(old, new)
    assert apply_delta_bytes(old, encoded.payload) == new
    coded = {t.name: t.encoding for t in encoded.stats.tensors}
    assert coded["fc1.weight_quantized"].startswith(("quant", "values")), coded
    assert len(encoded.payload) < _zstd19(new) / 2, (len(encoded.payload), _zstd19(new))


def _nudged(int8: bytes, name: str, every: int) -> bytes:
    """The int8 model with one weight in ``every`` (at random) moved by one step, scales kept
    (what delta-friendly recompression sends after a fine-tune)."""
    model = onnx.load_from_string(int8)
    for init in model.graph.initializer:
        if init.name == name:
            q = numpy_helper.to_array(init).copy()
            flat = q.reshape(-1)
            rng = np.random.default_rng(every)
            where = rng.choice(flat.size, size=flat.size // every, replace=False)
            flat[where] = np.where(flat[where] < 127, flat[where] + 1, flat[where] - 1)
            init.CopyFrom(numpy_helper.from_array(q, name))
    return model.SerializeToString()


def test_a_re_release_keeping_its_scales_codes_only_the_moved_weights(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unchanged scales are copies (no payload, and no parameter: the old integers predict
    the weights as well as a requantization and cost less to describe); a weight moved in
    a hundred costs about its position's entropy (SPARSE), not a bit a weight."""
    monkeypatch.chdir(work)
    old = _models(work, True)["int8"]
    new = _nudged(old, "fc1.weight_quantized", 97)
    encoded = encode(old, new)
    assert apply_delta_bytes(old, encoded.payload) == new
    coded = {t.name: t for t in encoded.stats.tensors}
    assert coded["fc1.weight_scale"].encoding.startswith("copy"), coded["fc1.weight_scale"]
    weight = coded["fc1.weight_quantized"]
    assert weight.encoding.startswith("values/") and weight.encoding.endswith("/sparse"), weight
    # the unchanged tensors stay in the skeleton: the table lists the moved weight alone
    table = table_of(old, encoded.payload)
    assert not table.params and [b.predictor for b in table.blocks] == [Predictor.VALUES]
    moved = weight.nbytes // 97
    assert weight.coded_bytes < moved * 1.4, (weight, moved)  # ~8.5 bits a gap, 1.5 a value
    assert encoded.stats.mode == "delta"
