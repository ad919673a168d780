"""Post-training quantization really changes the graph: int8 weights, QDQ pairs, fp16 tensors.

Models are built with onnx.helper (no training): an MLP of MatMuls, the same head as a
Gemm (how torch exports nn.Linear), and a small CNN. The builders are reused by the
other quantization and measurement tests.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from controller.compression.cpu_features import choose_reduce_range, host_reduce_range
from controller.compression.errors import CompressionError, UnsupportedModelError
from controller.compression.quantize import list_quantizable_nodes, quantize_onnx
from controller.compression.recipe import Quantize

Mode = Literal["dynamic", "static", "fp16"]
Method = Literal["minmax", "entropy", "percentile"]
OPSET = [helper.make_opsetid("", 17)]
Arrays = dict[str, NDArray[np.float32]]


def _init(name: str, array: NDArray[np.generic]) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def save(
    path: Path,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto],
) -> Path:
    model = helper.make_model(
        helper.make_graph(nodes, "test", inputs, outputs, inits), opset_imports=OPSET
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def mlp_model(path: Path, *, seed: int = 0, hidden: int = 64) -> Path:
    """x[N,64] → fc1 (MatMul) → relu → fc2 (MatMul) + fc2_bias → y[N,32]."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.2, (64, hidden))
    w2 = rng.normal(0, 0.2, (hidden, 32))
    return save(
        path,
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W2"], ["m"], name="fc2"),
            helper.make_node("Add", ["m", "B2"], ["y"], name="fc2_bias"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [_init("W1", w1), _init("W2", w2), _init("B2", rng.normal(0, 0.1, 32))],
    )


def gemm_model(path: Path, *, seed: int = 0) -> Path:
    """x[N,64] → head (Gemm, transB=1, as torch exports nn.Linear) → y[N,32]."""
    rng = np.random.default_rng(seed)
    return save(
        path,
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="head", transB=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [_init("W", rng.normal(0, 0.2, (32, 64))), _init("B", rng.normal(0, 0.1, 32))],
    )


def cnn_model(path: Path, *, seed: int = 0, c1: int = 8, c2: int = 16) -> Path:
    """x[N,3,16,16] → conv1 → relu → conv2 → relu → pool → flatten → head (Gemm) → logits[N,10]."""
    rng = np.random.default_rng(seed)
    return save(
        path,
        [
            helper.make_node("Conv", ["x", "C1", "D1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
            helper.make_node("Conv", ["ar", "C2", "D2"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["b"], ["br"], name="relu2"),
            helper.make_node("GlobalAveragePool", ["br"], ["p"], name="pool"),
            helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "H", "HB"], ["logits"], name="head", transB=1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [
            _init("C1", rng.normal(0, 0.3, (c1, 3, 3, 3))),
            _init("D1", rng.normal(0, 0.1, c1)),
            _init("C2", rng.normal(0, 0.2, (c2, c1, 3, 3))),
            _init("D2", rng.normal(0, 0.1, c2)),
            _init("H", rng.normal(0, 0.3, (10, c2))),
            _init("HB", rng.normal(0, 0.1, 10)),
        ],
    )


def cnn_inputs(n: int = 16, seed: int = 1) -> Arrays:
    return {"x": np.random.default_rng(seed).normal(size=(n, 3, 16, 16)).astype(np.float32)}


def mlp_inputs(n: int = 32, seed: int = 1) -> Arrays:
    return {"x": np.random.default_rng(seed).normal(size=(n, 64)).astype(np.float32)}


def run(path: Path, feeds: Arrays) -> list[NDArray[np.float32]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feeds)]


def output_names(path: Path) -> list[str]:
    return [o.name for o in onnx.load(str(path)).graph.output]


def cosine(a: NDArray[np.float32], b: NDArray[np.float32]) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def initializers(path: Path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def node(path: Path, name: str) -> onnx.NodeProto:
    return next(n for n in onnx.load(str(path)).graph.node if n.name == name)


# ------------------------------------------------------------------ dynamic


def test_dynamic_turns_matmul_weights_into_int8(tmp_path: Path) -> None:
    source = mlp_model(tmp_path / "mlp.onnx")
    out = tmp_path / "mlp.int8.onnx"
    result = quantize_onnx(source, out, Quantize(mode="dynamic"), calibration=None, progress=False)
    assert result.out == out and out.is_file()
    assert result.bytes == out.stat().st_size < source.stat().st_size / 2
    assert result.quantizable_nodes == ("fc1", "fc2")
    assert result.excluded_nodes == ()
    kinds = ops(out)
    assert kinds.count("MatMulInteger") == 2 and "MatMul" not in kinds
    inits = initializers(out)
    assert "W1" not in inits and "W2" not in inits
    assert inits["W1_quantized"].data_type == TensorProto.INT8
    assert inits["W2_quantized"].data_type == TensorProto.INT8
    assert output_names(out) == output_names(source)
    feeds = mlp_inputs()
    assert cosine(run(out, feeds)[0], run(source, feeds)[0]) > 0.99
    assert [t.purpose for t in result.trials] == ["full"]
    assert result.trials[0].path == out


def test_dynamic_quantizes_a_gemm_head_by_rewriting_it_as_matmul(tmp_path: Path) -> None:
    source = gemm_model(tmp_path / "gemm.onnx")
    out = tmp_path / "gemm.int8.onnx"
    result = quantize_onnx(source, out, Quantize(mode="dynamic"), calibration=None, progress=False)
    assert result.quantizable_nodes == ("head",)
    assert "Gemm" not in ops(out) and "MatMulInteger" in ops(out)
    assert any(t.data_type == TensorProto.INT8 for t in initializers(out).values())
    feeds = mlp_inputs()
    assert cosine(run(out, feeds)[0], run(source, feeds)[0]) > 0.99


def test_dynamic_exclude_nodes_keeps_the_named_node_in_float(tmp_path: Path) -> None:
    source = mlp_model(tmp_path / "mlp.onnx")
    out = tmp_path / "mlp.int8.onnx"
    step = Quantize(mode="dynamic", exclude_nodes=("fc2",))
    result = quantize_onnx(source, out, step, calibration=None, progress=False)
    assert result.excluded_nodes == ("fc2",)
    fc2 = node(out, "fc2")
    assert fc2.op_type == "MatMul"
    assert initializers(out)["W2"].data_type == TensorProto.FLOAT
    assert initializers(out)["W1_quantized"].data_type == TensorProto.INT8


# ------------------------------------------------------------------ static QDQ


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_inserts_qdq_with_one_scale_per_output_channel(
    tmp_path: Path, method: Method
) -> None:
    source = cnn_model(tmp_path / "cnn.onnx")
    out = tmp_path / "cnn.qdq.onnx"
    step = Quantize(mode="static", calibration=method, per_channel=True)
    result = quantize_onnx(source, out, step, calibration=cnn_inputs(), progress=False)
    kinds = ops(out)
    assert "QuantizeLinear" in kinds and "DequantizeLinear" in kinds
    assert result.calibration_method == method and result.calibration_samples == 16
    assert result.per_channel
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    # the DequantizeLinear that feeds each conv's weight carries one scale per filter
    for conv, filters in (("conv1", 8), ("conv2", 16)):
        weight_dq_out = node(out, conv).input[1]
        dq = next(n for n in model.graph.node if weight_dq_out in n.output)
        assert dq.op_type == "DequantizeLinear"
        assert inits[dq.input[0]].data_type == TensorProto.INT8
        assert list(inits[dq.input[1]].dims) == [filters]
    assert output_names(out) == output_names(source)
    feeds = cnn_inputs(4, seed=7)
    assert cosine(run(out, feeds)[0], run(source, feeds)[0]) > 0.95


def test_onnxruntimes_prints_and_root_warnings_stay_out_of_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The histogram calibrators print "Number of histogram bins"; a controller log or an
    operator's terminal is no place for that (it goes to the debug log)."""
    source = cnn_model(tmp_path / "cnn.onnx")
    step = Quantize(mode="static", calibration="entropy", per_channel=True)
    with caplog.at_level(logging.DEBUG):
        quantize_onnx(source, tmp_path / "q.onnx", step, calibration=cnn_inputs(), progress=False)
    assert "histogram bins" not in capsys.readouterr().out
    assert not [r for r in caplog.records if r.name == "root"]
    assert any("onnxruntime: Number of histogram bins" in r.getMessage() for r in caplog.records)


def test_static_per_tensor_has_scalar_weight_scales(tmp_path: Path) -> None:
    source = cnn_model(tmp_path / "cnn.onnx")
    out = tmp_path / "cnn.qdq.onnx"
    step = Quantize(mode="static", per_channel=False)
    quantize_onnx(source, out, step, calibration=cnn_inputs(), progress=False)
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    weight_dq_out = node(out, "conv2").input[1]
    dq = next(n for n in model.graph.node if weight_dq_out in n.output)
    assert list(inits[dq.input[1]].dims) == []


def test_static_exclude_matches_a_node_the_optimiser_fused(tmp_path: Path) -> None:
    """MatMul fc2 + Add become one Gemm 'fc2/MatMulAddFusion'; 'fc2' still names it."""
    source = mlp_model(tmp_path / "mlp.onnx")
    out = tmp_path / "mlp.qdq.onnx"
    step = Quantize(mode="static", exclude_nodes=("fc2",))
    result = quantize_onnx(source, out, step, calibration=mlp_inputs(), progress=False)
    assert result.excluded_nodes == ("fc2/MatMulAddFusion",)
    fused = node(out, "fc2/MatMulAddFusion")
    assert initializers(out)[fused.input[1]].data_type == TensorProto.FLOAT
    assert list_quantizable_nodes(source, "static") == ("fc1", "relu", "fc2/MatMulAddFusion")
    assert list_quantizable_nodes(source, "dynamic") == ("fc1", "fc2")


def test_reduce_range_choice_is_recorded(tmp_path: Path) -> None:
    source = mlp_model(tmp_path / "mlp.onnx")
    result = quantize_onnx(
        source,
        tmp_path / "o.onnx",
        Quantize(mode="static"),
        calibration=mlp_inputs(),
        progress=False,
    )
    host = host_reduce_range()
    assert (result.reduce_range, result.reduce_range_reason) == (host.reduce_range, host.reason)


def test_reduce_range_only_on_x86_without_vnni() -> None:
    with_vnni = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"
    avx_vnni = "flags\t\t: fpu avx2 avx_vnni\n"
    without = "flags\t\t: fpu sse avx2 avx512f\n"
    assert not choose_reduce_range("x86_64", with_vnni).reduce_range
    assert not choose_reduce_range("x86_64", avx_vnni).reduce_range
    assert choose_reduce_range("x86_64", without).reduce_range
    assert choose_reduce_range("x86_64", None).reduce_range
    assert not choose_reduce_range("aarch64", "Features\t: fp asimd asimddp\n").reduce_range


# ------------------------------------------------------------------ fp16


def test_fp16_makes_weights_float16_and_keeps_float32_io(tmp_path: Path) -> None:
    source = cnn_model(tmp_path / "cnn.onnx")
    out = tmp_path / "cnn.fp16.onnx"
    result = quantize_onnx(source, out, Quantize(mode="fp16"), calibration=None, progress=False)
    weights = [t for t in initializers(out).values() if len(t.dims) >= 1]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert result.bytes < source.stat().st_size * 0.7
    assert not result.reduce_range and not result.per_channel
    feeds = cnn_inputs(4)
    got, want = run(out, feeds)[0], run(source, feeds)[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)


def test_fp16_exclude_nodes_keeps_their_weights_float32(tmp_path: Path) -> None:
    source = cnn_model(tmp_path / "cnn.onnx")
    out = tmp_path / "cnn.fp16.onnx"
    step = Quantize(mode="fp16", exclude_nodes=("head",))
    result = quantize_onnx(source, out, step, calibration=None, progress=False)
    assert result.excluded_nodes == ("head",)
    inits = initializers(out)
    assert inits["H"].data_type == TensorProto.FLOAT
    assert inits["C1"].data_type == TensorProto.FLOAT16
    onnx.checker.check_model(str(out))  # Cast nodes are in topological order
    assert run(out, cnn_inputs(2))[0].shape == (2, 10)


# ------------------------------------------------------------------ refusals


def relu_model(path: Path) -> Path:
    return save(
        path,
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [],
    )


@pytest.mark.parametrize("mode", ["dynamic", "static", "fp16"])
def test_a_model_with_nothing_to_quantize_is_refused(tmp_path: Path, mode: Mode) -> None:
    source = relu_model(tmp_path / "relu.onnx")
    out = tmp_path / "out.onnx"
    calibration = {"x": np.ones((4, 4), np.float32)}
    with pytest.raises(UnsupportedModelError, match="nothing to"):
        quantize_onnx(
            source,
            out,
            Quantize(mode=mode),
            calibration=calibration,
            progress=False,
        )
    assert list(tmp_path.iterdir()) == [source]


def test_excluding_every_quantizable_node_is_refused(tmp_path: Path) -> None:
    source = mlp_model(tmp_path / "mlp.onnx")
    step = Quantize(mode="dynamic", exclude_nodes=("fc1", "fc2"))
    with pytest.raises(UnsupportedModelError, match="exclude_nodes"):
        quantize_onnx(source, tmp_path / "o.onnx", step, calibration=None, progress=False)


def test_an_unknown_excluded_node_is_named(tmp_path: Path) -> None:
    source = mlp_model(tmp_path / "mlp.onnx")
    step = Quantize(mode="dynamic", exclude_nodes=("fc9",))
    with pytest.raises(CompressionError, match=r"fc9.*fc1"):
        quantize_onnx(source, tmp_path / "o.onnx", step, calibration=None, progress=False)


def test_static_without_calibration_is_refused_by_argument(tmp_path: Path) -> None:
    source = mlp_model(tmp_path / "mlp.onnx")
    with pytest.raises(CompressionError, match="calibration="):
        quantize_onnx(source, tmp_path / "o.onnx", Quantize(mode="static"), calibration=None)


def test_max_drop_without_evaluate_is_refused(tmp_path: Path) -> None:
    source = mlp_model(tmp_path / "mlp.onnx")
    with pytest.raises(CompressionError, match="evaluate="):
        quantize_onnx(
            source, tmp_path / "o.onnx", Quantize(mode="dynamic"), calibration=None, max_drop=0.01
        )


@pytest.mark.parametrize(
    "content",
    [b"not a model at all", b""],
    ids=["garbage", "empty"],
)
def test_invalid_onnx_is_refused_and_nothing_is_written(tmp_path: Path, content: bytes) -> None:
    source = tmp_path / "bad.onnx"
    source.write_bytes(content)
    out = tmp_path / "out.onnx"
    with pytest.raises(CompressionError, match="not a valid ONNX model"):
        quantize_onnx(source, out, Quantize(mode="dynamic"), calibration=None, progress=False)
    assert sorted(tmp_path.iterdir()) == [source]


def test_an_invalid_graph_is_refused(tmp_path: Path) -> None:
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "missing"], ["y"], name="mm")],
            "broken",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        ),
        opset_imports=OPSET,
    )
    source = tmp_path / "broken.onnx"
    onnx.save(model, str(source))
    with pytest.raises(CompressionError, match="not a valid ONNX model"):
        quantize_onnx(source, tmp_path / "o.onnx", Quantize(mode="dynamic"), calibration=None)


def test_a_failure_midway_leaves_the_old_output_untouched(tmp_path: Path) -> None:
    source = mlp_model(tmp_path / "mlp.onnx")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous artifact")

    def evaluate(path: Path) -> float:
        if path != source:
            raise RuntimeError("scorer crashed")
        return 1.0

    with pytest.raises(RuntimeError, match="scorer crashed"):
        quantize_onnx(
            source,
            out,
            Quantize(mode="dynamic"),
            calibration=None,
            evaluate=evaluate,
            max_drop=0.01,
            progress=False,
        )
    assert out.read_bytes() == b"previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "out.onnx"]


def test_external_data_counts_in_the_source_size_and_the_output_is_one_file(
    tmp_path: Path,
) -> None:
    """torch's dynamo exporter writes weights beside the model (``model.onnx.data``)."""
    model = onnx.load(str(mlp_model(tmp_path / "inline.onnx")))
    source = tmp_path / "split.onnx"
    onnx.save(
        model,
        str(source),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="split.onnx.data",
        size_threshold=0,
    )
    data = tmp_path / "split.onnx.data"
    out = tmp_path / "out.onnx"
    result = quantize_onnx(source, out, Quantize(mode="dynamic"), calibration=None, progress=False)
    assert result.source_bytes == source.stat().st_size + data.stat().st_size
    assert result.bytes < result.source_bytes / 2
    stored = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location != TensorProto.EXTERNAL for t in stored.graph.initializer)
