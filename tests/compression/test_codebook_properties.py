"""Codebook quantization of convolutions, and the properties issue 6 asks of any codebook.

test_codebook.py covers MatMul, Gemm and Gather tables; the reference workloads' CNNs
(PLAID, BasicMotions) hold Conv weights, whose output channel is axis 0 of a 3-D tensor.
Here: a codebook-quantized Conv model loads in onnxruntime and computes exactly what the
source computes with the dequantized weights plugged in (float and int8 compute); each
output channel (or the whole tensor) holds exactly ``2**bits`` distinct values, or
fewer when it had fewer to begin with; bad parameters are refused with a message that
says what to change.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from controller.compression.codebook import quantize_codebook
from controller.compression.codebook_fit import fit_codebooks
from controller.compression.errors import CompressionError
from controller.compression.quantize import quantize_onnx
from controller.compression.recipe import STEP_ADAPTER, CodebookQuantize, Quantize
from tests.compression.test_codebook import _with  # the same "source with some weights replaced"

CHANNELS, STEPS = 4, 64
BASIC = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def conv_model(path: Path, weights: Mapping[str, NDArray[np.floating]] | None = None) -> Path:
    """x[N, 4, 64] → Conv(W1[32, 4, 9]) → Relu → Conv(W2[16, 32, 5]) → y[N, 16, 64]."""
    rng = np.random.default_rng(0)
    tensors = {
        "W1": rng.normal(0, 0.3, (32, CHANNELS, 9)),
        "W2": rng.normal(0, 0.1, (16, 32, 5)),
        "b2": rng.normal(0, 0.1, (16,)),
        **(weights or {}),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W1"], ["h"], name="conv1", pads=[4, 4]),
            helper.make_node("Relu", ["h"], ["a"], name="relu"),
            helper.make_node("Conv", ["a", "W2", "b2"], ["y"], name="conv2", pads=[2, 2]),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", CHANNELS, STEPS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, STEPS])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _x() -> dict[str, NDArray[np.generic]]:
    return {"x": np.random.default_rng(1).normal(0, 1, (8, CHANNELS, STEPS)).astype(np.float32)}


def _run(model: Path | onnx.ModelProto) -> NDArray[np.float32]:
    data = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    result: NDArray[np.float32] = session.run(None, _x())[0]
    return result


def _folded(path: Path, tmp_path: Path) -> dict[str, NDArray[Any]]:
    """The initializers onnxruntime holds once it has folded the codebook decoding."""
    options = ort.SessionOptions()
    options.graph_optimization_level = BASIC
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}-folded.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(options.optimized_model_filepath)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _distinct(array: NDArray[Any], channel: bool) -> set[int]:
    """Distinct values per output channel (axis 0 of a Conv weight), or in the tensor."""
    if not channel:
        return {len(np.unique(array))}
    return {len(np.unique(row)) for row in array.reshape(array.shape[0], -1)}


@pytest.mark.parametrize(
    ("bits", "granularity"), [(4, "channel"), (3, "channel"), (3, "tensor"), (2, "channel")]
)
def test_conv_codebooks_compute_exactly_with_their_dequantized_weights(
    tmp_path: Path, bits: int, granularity: Literal["tensor", "channel"]
) -> None:
    source = conv_model(tmp_path / "float.onnx")
    step = CodebookQuantize(bits=bits, granularity=granularity, compute="float", min_elements=256)
    result = quantize_codebook(source, tmp_path / "codebook.onnx", step)
    assert {t.name for t in result.tensors} == {"W1", "W2"}  # b2 (16 values) stays
    artifact = onnx.load(str(result.out))
    assert {"W1", "W2"}.isdisjoint(t.name for t in artifact.graph.initializer)  # indices now
    folded = _folded(result.out, tmp_path)
    reference = _with(source, {"W1": folded["W1"], "W2": folded["W2"]})
    np.testing.assert_allclose(_run(result.out), _run(reference), rtol=1e-5, atol=1e-6)
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(source)).graph.initializer}
    channel = granularity == "channel"
    for name in ("W1", "W2"):
        assert folded[name].shape == original[name].shape
        assert _distinct(folded[name], channel) == {1 << bits}
        assert _distinct(original[name], channel) != {1 << bits}
        error = np.linalg.norm(folded[name] - original[name]) / np.linalg.norm(original[name])
        assert error < {2: 0.4, 3: 0.25, 4: 0.15}[bits]  # a scrambled unpacking is ~1.4


def test_int8_conv_codebooks_hold_2_to_the_bits_int8_values_per_channel(tmp_path: Path) -> None:
    source = conv_model(tmp_path / "float.onnx")
    dynamic = quantize_onnx(
        source,
        tmp_path / "dynamic.onnx",
        Quantize(mode="dynamic", accuracy_aware=False),
        calibration=None,
        progress=False,
    ).out
    step = CodebookQuantize(bits=3, min_elements=256)
    result = quantize_codebook(source, tmp_path / "codebook.onnx", step)
    assert {t.name for t in result.tensors} == {"W1_quantized", "W2_quantized"}
    folded = _folded(result.out, tmp_path)
    names = [f"W{i}_{part}" for i in (1, 2) for part in ("quantized", "scale")]
    reference = _with(dynamic, {name: folded[name] for name in names})
    np.testing.assert_allclose(_run(result.out), _run(reference), rtol=1e-6, atol=1e-6)
    for name in ("W1_quantized", "W2_quantized"):
        assert folded[name].dtype == np.int8
        assert _distinct(folded[name], True) == {8}


def test_a_channel_with_fewer_distinct_weights_than_levels_is_kept_exactly(
    tmp_path: Path,
) -> None:
    # every output channel of W1 holds 3 distinct values (36 weights each), 8 levels asked
    rng = np.random.default_rng(2)
    values = rng.normal(0, 0.3, (32, 3))
    picks = rng.integers(0, 3, (32, CHANNELS * 9))
    picks[:, :3] = np.arange(3)  # each of the 3 values occurs in each channel
    w1 = np.take_along_axis(values, picks, axis=1).reshape(32, CHANNELS, 9)
    source = conv_model(tmp_path / "float.onnx", {"W1": w1})
    step = CodebookQuantize(bits=3, compute="float", min_elements=256)
    result = quantize_codebook(source, tmp_path / "codebook.onnx", step)
    folded = _folded(result.out, tmp_path)
    assert _distinct(folded["W1"], True) == {3}
    np.testing.assert_allclose(folded["W1"], w1.astype(np.float16), rtol=1e-3)  # fp16 levels
    assert _distinct(folded["W2"], True) == {8}  # Gaussian weights still use every level


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_outside_2_to_8_are_refused_saying_the_accepted_range(bits: int) -> None:
    with pytest.raises(ValidationError) as caught:
        STEP_ADAPTER.validate_python({"kind": "quantize.codebook", "bits": bits})
    (error,) = caught.value.errors()
    assert error["loc"] == ("quantize.codebook", "bits")
    assert f"must be between 2 and 8 (a codebook of 2**bits levels), got {bits}" in error["msg"]
    if bits != 1:  # the fitting itself refuses what no codebook can hold
        with pytest.raises(CompressionError, match=f"bits must be between 1 and 8, got {bits}"):
            fit_codebooks(np.zeros((2, 512)), bits)


def test_a_tensor_with_fewer_weights_than_levels_is_refused_naming_it(tmp_path: Path) -> None:
    # per tensor: W1 [2, 1, 4] has 8 weights, 16 levels asked
    source = conv_model(
        tmp_path / "float.onnx", {"W1": np.ones((2, 1, 4)), "W2": np.ones((16, 2, 5))}
    )
    model = onnx.load(str(source))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1
    onnx.save(model, str(source))
    step = CodebookQuantize(bits=4, granularity="tensor", compute="float", min_elements=1)
    out = tmp_path / "out.onnx"
    with pytest.raises(
        CompressionError,
        match=r"W1: 16 levels \(4 bits\) but the tensor has only 8 weights; use fewer bits",
    ):
        quantize_codebook(source, out, step)
    assert not out.exists()  # nothing half-written
