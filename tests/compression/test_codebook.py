"""Codebook quantization: weights shared through fitted codebooks, decoded by onnxruntime.

Tiny models built with onnx.helper; the reference for every check is what onnxruntime
itself folds the codebook decoding into (a session's optimized model), or the table rows
the artifact's own decoding produces, plugged back into the source model as plain
initializers.
"""

from __future__ import annotations

from collections import Counter
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
from controller.compression.codebook_fit import (
    assign,
    fit_codebooks,
    gaussian_levels,
    gptq_assign,
    pack_indices,
    unpack_indices,
)
from controller.compression.errors import CompressionError
from controller.compression.quantize import quantize_onnx
from controller.compression.recipe import STEP_ADAPTER, CodebookQuantize, Quantize

OPSET = [helper.make_opsetid("", 17)]
VOCAB, WIDTH, TOKENS, HIDDEN = 16384, 64, 8, 48  # table: 2**20 weights, decoded per call


def _save(path: Path, graph: onnx.GraphProto) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def embedding_model(path: Path) -> Path:
    """ids[N, 8] → Gather(table[16384, 64]) → MatMul(W[64, 48]) → Relu → Flatten →
    Gemm(G[10, 384], transB) → y[N, 10]."""
    rng = np.random.default_rng(0)
    tensors = {
        "table": rng.normal(0, 1, (VOCAB, WIDTH)),
        "W": rng.normal(0, 0.2, (WIDTH, HIDDEN)),
        "G": rng.normal(0, 0.1, (10, TOKENS * HIDDEN)),
        "g_bias": np.zeros(10),
    }
    return _save(
        path,
        helper.make_graph(
            [
                helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
                helper.make_node("MatMul", ["emb", "W"], ["hidden"], name="proj"),
                helper.make_node("Relu", ["hidden"], ["act"], name="relu"),
                helper.make_node("Flatten", ["act"], ["flat"], name="flatten", axis=1),
                helper.make_node("Gemm", ["flat", "G", "g_bias"], ["y"], name="head", transB=1),
            ],
            "embedding",
            [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", TOKENS])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
            [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tensors.items()],
        ),
    )


def mlp_model(path: Path, *, second: tuple[int, int] = (128, 32)) -> Path:
    """x[N, 256] → MatMul(W1[256, 128]) → Relu → MatMul(W2) → y."""
    rng = np.random.default_rng(1)
    w1 = rng.normal(0, 0.1, (256, 128)).astype(np.float32)
    w2 = rng.normal(0, 0.1, second).astype(np.float32)
    return _save(
        path,
        helper.make_graph(
            [
                helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
                helper.make_node("Relu", ["h"], ["a"], name="relu"),
                helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2"),
            ],
            "mlp",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 256])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", second[1]])],
            [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
        ),
    )


def _ids(n: int = 12) -> dict[str, NDArray[np.generic]]:
    return {"ids": np.random.default_rng(2).integers(0, VOCAB, (n, TOKENS)).astype(np.int64)}


def _x(n: int = 32) -> dict[str, NDArray[np.generic]]:
    rng = np.random.default_rng(3)
    base = rng.normal(0, 1, (n, 8)) @ rng.normal(0, 1, (8, 256))  # correlated features
    return {"x": (base + 0.1 * rng.normal(0, 1, (n, 256))).astype(np.float32)}


def _run(
    model: Path | onnx.ModelProto, feed: dict[str, NDArray[np.generic]]
) -> NDArray[np.float32]:
    data = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    result: NDArray[np.float32] = session.run(None, feed)[0]
    return result


def _folded(path: Path, tmp_path: Path, level: ort.GraphOptimizationLevel) -> onnx.ModelProto:
    """The graph onnxruntime runs after its optimizations at ``level``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}-{int(level)}.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def _initializers(model: onnx.ModelProto) -> dict[str, NDArray[Any]]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _with(source: Path, weights: Mapping[str, NDArray[Any]]) -> onnx.ModelProto:
    """``source`` with some initializers replaced."""
    model = onnx.load(str(source))
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(weights[tensor.name]), tensor.name))
    return model


def _distinct(array: NDArray[np.generic], axis: int | None) -> set[int]:
    if axis is None:
        return {len(np.unique(array))}
    return {len(np.unique(column)) for column in np.moveaxis(array, axis, 0)}


@pytest.mark.parametrize(
    ("bits", "granularity"), [(4, "channel"), (3, "channel"), (4, "tensor"), (2, "tensor")]
)
def test_float_codebooks_compute_exactly_with_their_dequantized_weights(
    tmp_path: Path, bits: int, granularity: Literal["tensor", "channel"]
) -> None:
    source = embedding_model(tmp_path / "float.onnx")
    step = CodebookQuantize(bits=bits, granularity=granularity, compute="float", min_elements=256)
    result = quantize_codebook(source, tmp_path / "codebook.onnx", step)
    assert {(t.name, t.decode) for t in result.tensors} == {
        ("table", "call"),
        ("W", "load"),
        ("G", "load"),
    }
    assert result.bytes < source.stat().st_size / 4  # codebooks and nodes: a few kB
    # the MatMul / Gemm weights as onnxruntime folds them at session load
    folded = _initializers(
        _folded(result.out, tmp_path, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    )
    # the table rows as the artifact's per-call decoding returns them, for every id
    rows = onnx.load(str(result.out))
    rows.graph.output.insert(0, helper.make_tensor_value_info("emb", TensorProto.FLOAT, None))
    every_id = np.arange(VOCAB, dtype=np.int64).reshape(-1, TOKENS)
    table = _run(rows, {"ids": every_id}).reshape(VOCAB, WIDTH)
    reference = _with(source, {"W": folded["W"], "G": folded["G"], "table": table})
    feed = _ids()
    np.testing.assert_allclose(_run(result.out, feed), _run(reference, feed), rtol=1e-5, atol=1e-6)
    channel = granularity == "channel"
    levels = 1 << bits
    assert _distinct(folded["W"], 1 if channel else None) == {levels}  # per output column
    assert _distinct(folded["G"], 0 if channel else None) == {levels}  # transB: per row
    assert _distinct(table, 1 if channel else None) == {levels}  # per embedding dimension
    # the decoded weights are the fitted ones (same error as numpy's decoding reports), and
    # close to the source's: a wrong unpacking would scramble them
    original = _initializers(onnx.load(str(source)))
    assert not _distinct(original["W"], 1) <= {levels}
    reports = {t.name: t for t in result.tensors}
    for name, decoded in (("W", folded["W"]), ("G", folded["G"]), ("table", table)):
        error = float(np.sum((decoded - original[name]) ** 2) / np.sum(original[name] ** 2))
        assert error == pytest.approx(reports[name].relative_error, rel=1e-3)
        assert error < {2: 0.15, 3: 0.05, 4: 0.015}[bits]  # Lloyd-Max N(0,1): .12 .035 .0095


def test_int8_codebooks_fold_into_dynamic_int8s_own_graph(tmp_path: Path) -> None:
    source = mlp_model(tmp_path / "float.onnx")
    dynamic = quantize_onnx(
        source,
        tmp_path / "dynamic.onnx",
        Quantize(mode="dynamic", accuracy_aware=False),
        calibration=None,
        progress=False,
    ).out
    result = quantize_codebook(source, tmp_path / "codebook.onnx", CodebookQuantize(bits=4))
    assert {t.name for t in result.tensors} == {"W1_quantized", "W2_quantized"}
    assert result.bytes < dynamic.stat().st_size * 0.65  # tiny: graph overhead
    artifact = onnx.load(str(result.out))
    assert any(t.data_type == TensorProto.UINT4 for t in artifact.graph.initializer)
    # once onnxruntime has folded the codebooks, it runs dynamic int8's graph
    full = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ops = Counter(n.op_type for n in _folded(result.out, tmp_path, full).graph.node)
    assert ops == Counter(n.op_type for n in _folded(dynamic, tmp_path, full).graph.node)
    assert ops["DynamicQuantizeMatMul"] + ops["MatMulIntegerToFloat"] == 2
    # ... with the folded int8 codebook weights and their new scales
    basic = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    folded = _initializers(_folded(result.out, tmp_path, basic))
    names = [f"W{i}_{part}" for i in (1, 2) for part in ("quantized", "scale")]
    reference = _with(dynamic, {name: folded[name] for name in names})
    feed = _x()
    np.testing.assert_allclose(_run(result.out, feed), _run(reference, feed), rtol=1e-6, atol=1e-6)
    for name in ("W1_quantized", "W2_quantized"):
        assert folded[name].dtype == np.int8
        assert _distinct(folded[name], 1) == {16}
    float_weights = _initializers(onnx.load(str(source)))
    dequantized = folded["W1_quantized"] * folded["W1_scale"][None, :]
    error = np.linalg.norm(dequantized - float_weights["W1"]) / np.linalg.norm(float_weights["W1"])
    assert error < 0.15  # 16 Gaussian levels: ~0.1 relative error


def test_packed_indices_round_trip_at_every_width(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    for bits in range(2, 9):
        indices = rng.integers(0, 1 << bits, (3, 37)).astype(np.uint8)
        packed = pack_indices(indices, bits)
        assert packed.nbytes == 3 * (37 if bits == 8 else bits * 5)  # 5 bytes per plane
        np.testing.assert_array_equal(unpack_indices(packed, bits, 37), indices)
    with pytest.raises(CompressionError, match="indices must lie"):
        pack_indices(np.array([16]), 4)
    # 4-bit indices in the artifact are UINT4 tensors: onnx's own reader gets them back
    source = mlp_model(tmp_path / "float.onnx")
    result = quantize_codebook(
        source, tmp_path / "codebook.onnx", CodebookQuantize(bits=4, compute="float")
    )
    stored = _initializers(onnx.load(str(result.out)))
    folded = _initializers(
        _folded(result.out, tmp_path, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    )
    levels = stored["W1/codebook"].astype(np.float32)  # [16, 128]: one column per output
    indices = stored["W1/indices"].astype(np.int64)
    assert indices.shape == (256, 128) and indices.max() == 15
    np.testing.assert_array_equal(np.take_along_axis(levels, indices, axis=0), folded["W1"])


def test_pruned_weights_stay_exactly_zero_with_keep_zero(tmp_path: Path) -> None:
    source = mlp_model(tmp_path / "float.onnx")
    model = onnx.load(str(source))
    weights = _initializers(model)
    pruned = {k: np.where(np.abs(v) < 0.07, 0.0, v).astype(np.float32) for k, v in weights.items()}
    sparse = tmp_path / "pruned.onnx"
    onnx.save(_with(source, pruned), str(sparse))
    step = CodebookQuantize(bits=3, keep_zero=True, compute="float")
    result = quantize_codebook(sparse, tmp_path / "codebook.onnx", step)
    folded = _initializers(
        _folded(result.out, tmp_path, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    )
    for name in ("W1", "W2"):
        zeros = pruned[name] == 0
        assert zeros.mean() > 0.4
        np.testing.assert_array_equal(folded[name][zeros], 0.0)
        assert (folded[name][~zeros] != 0).mean() > 0.9  # the zero level is for zeros


def test_lloyd_max_levels_and_kmeans_beat_uniform_levels() -> None:
    # the classic Lloyd-Max quantizer of N(0, 1) with 4 levels
    np.testing.assert_allclose(gaussian_levels(4), (-1.510, -0.4528, 0.4528, 1.510), atol=1e-3)
    values = np.random.default_rng(5).standard_t(4, (8, 4096))  # heavy-tailed, like weights
    kmeans = fit_codebooks(values, 4, method="kmeans")
    gaussian = fit_codebooks(values, 4, method="gaussian")
    uniform = np.linspace(values.min(axis=1), values.max(axis=1), 16, axis=1)
    uniform_values = np.take_along_axis(uniform, assign(values, uniform).astype(np.intp), axis=1)

    def mse(decoded: NDArray[np.float64]) -> float:
        return float(np.mean((decoded - values) ** 2))

    assert mse(kmeans.values()) < mse(gaussian.values())
    assert mse(kmeans.values()) < 0.5 * mse(uniform_values)
    assert {len(np.unique(row)) for row in kmeans.values()} == {16}


def test_error_feedback_lowers_the_layers_output_error() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, (512, 6)) @ rng.normal(0, 1, (6, 64)) + 0.05 * rng.normal(0, 1, (512, 64))
    weights = rng.normal(0, 1, (64, 32))
    fit = fit_codebooks(weights.T, 3)  # one codebook per output column
    nearest = fit.values().T
    feedback_indices = gptq_assign(weights, fit.levels, x.T @ x / len(x))
    feedback = np.take_along_axis(fit.levels, feedback_indices.T.astype(np.intp), axis=1).T
    error = {
        name: float(np.linalg.norm(x @ (weights - w)))
        for name, w in (("nearest", nearest), ("feedback", feedback))
    }
    assert error["feedback"] < 0.7 * error["nearest"]


def test_error_feedback_works_when_every_weight_reads_a_graph_input(tmp_path: Path) -> None:
    """Statistics of activations that are all graph inputs need no inference run (it
    had no output to ask for, and onnxruntime refused)."""
    rng = np.random.default_rng(4)
    weight = rng.normal(0, 0.1, (256, 64)).astype(np.float32)
    source = _save(
        tmp_path / "one-layer.onnx",
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
            "one-layer",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 256])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
            [numpy_helper.from_array(weight, "W")],
        ),
    )
    step = CodebookQuantize(bits=4, error_feedback=True)
    result = quantize_codebook(source, tmp_path / "codebook.onnx", step, calibration=_x())
    assert [t.name for t in result.tensors] == ["W_quantized"]
    feed = _x(8)
    reference = feed["x"] @ weight
    error = np.linalg.norm(_run(result.out, feed) - reference) / np.linalg.norm(reference)
    assert error < 0.25  # 4-bit codebooks of Gaussian weights: about 12 %


def test_a_share_keeps_the_weight_whose_codebook_harms_most_in_int8(tmp_path: Path) -> None:
    # equal sizes; W1 holds 4 distinct values per column (a 2-bit codebook is exact for
    # it), W2 is Gaussian: half the elements means W1 alone
    source = mlp_model(tmp_path / "float.onnx", second=(128, 256))
    rng = np.random.default_rng(7)
    steps = rng.choice([-0.15, -0.05, 0.05, 0.15], (256, 128)) * rng.uniform(0.5, 2, 128)
    onnx.save(_with(source, {"W1": steps.astype(np.float32)}), str(source))
    step = CodebookQuantize(bits=2, share=0.5, error_feedback=True)
    with pytest.raises(CompressionError, match="calibration"):
        quantize_codebook(source, tmp_path / "no-data.onnx", step)
    result = quantize_codebook(source, tmp_path / "codebook.onnx", step, calibration=_x())
    (coded,) = result.tensors
    assert coded.name == "W1_quantized" and coded.output_error < 1e-3
    artifact = _initializers(onnx.load(str(result.out)))
    assert artifact["W2_quantized"].dtype == np.int8  # still dynamic quantization's own
    assert "W1_quantized/indices" in artifact and "W1_quantized" not in artifact


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"gather_bits": 1}, "gather_bits"),
        ({"bits": 8}, "int8"),  # 256 levels do not fit int8's 255 values
        ({"share": 0}, "share"),
        ({"gather_bits": 3, "include_gather": False}, "include_gather"),
    ],
)
def test_bad_parameters_are_refused_when_the_step_is_built(
    params: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError, match=field):
        STEP_ADAPTER.validate_python({"kind": "quantize.codebook", **params})


def test_more_levels_than_weights_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    # W2 [8, 256]: 8 weights per output column, 16 levels asked
    source = mlp_model(tmp_path / "float.onnx", second=(128, 256))
    model = _with(source, {"W1": np.zeros((256, 8), np.float32)})
    model.graph.initializer[1].CopyFrom(
        numpy_helper.from_array(np.ones((8, 256), np.float32), "W2")
    )
    onnx.save(model, str(tmp_path / "narrow.onnx"))
    step = CodebookQuantize(bits=4, compute="float", min_elements=1)
    with pytest.raises(CompressionError, match=r"W2: 16 levels \(4 bits\) but each output channel"):
        quantize_codebook(tmp_path / "narrow.onnx", tmp_path / "out.onnx", step)
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(CompressionError, match="at least as many weights as levels"):
        fit_codebooks(np.zeros((2, 3)), 2)
