"""Weight-only low-bit quantization: MatMulNBits / GatherBlockQuantized graphs that run.

Tiny models built with onnx.helper (no training), quantized by onnxruntime's own
MatMulNBitsQuantizer through our step, and run in onnxruntime.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from controller.compression.errors import CompressionError, UnsupportedModelError
from controller.compression.executor import OnnxSource
from controller.compression.recipe import (
    STEP_ADAPTER,
    Quantize,
    Recipe,
    WeightOnlyQuantize,
)
from controller.compression.weight_only import quantize_weight_only

OPSET = [helper.make_opsetid("", 17)]
VOCAB, WIDTH, TOKENS = 200, 64, 8


def _save(path: Path, graph: onnx.GraphProto) -> Path:
    model = helper.make_model(graph, opset_imports=OPSET)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def embedding_model(path: Path) -> Path:
    """ids int64[N, 8] → Gather(table[200, 64]) → MatMul(W[64, 64]) → y[N, 8, 64]."""
    rng = np.random.default_rng(0)
    return _save(
        path,
        helper.make_graph(
            [
                helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
                helper.make_node("MatMul", ["emb", "W"], ["y"], name="proj"),
            ],
            "embedding",
            [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", TOKENS])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", TOKENS, WIDTH])],
            [
                numpy_helper.from_array(
                    rng.normal(0, 1, (VOCAB, WIDTH)).astype(np.float32), "table"
                ),
                numpy_helper.from_array(rng.normal(0, 0.2, (WIDTH, WIDTH)).astype(np.float32), "W"),
            ],
        ),
    )


def two_branch_model(path: Path) -> Path:
    """y = x @ smooth + x @ spiky: same shapes, but one outlier per 32-block in ``spiky``
    stretches its 4-bit range so its other weights round to zero."""
    rng = np.random.default_rng(1)
    smooth = rng.normal(0, 0.2, (WIDTH, WIDTH)).astype(np.float32)
    spiky = rng.normal(0, 0.2, (WIDTH, WIDTH)).astype(np.float32)
    spiky[::32, :] = 20.0
    return _save(
        path,
        helper.make_graph(
            [
                helper.make_node("MatMul", ["x", "smooth"], ["a"], name="smooth_mm"),
                helper.make_node("MatMul", ["x", "spiky"], ["b"], name="spiky_mm"),
                helper.make_node("Add", ["a", "b"], ["y"], name="add"),
            ],
            "two_branch",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", WIDTH])],
            [numpy_helper.from_array(smooth, "smooth"), numpy_helper.from_array(spiky, "spiky")],
        ),
    )


def _ids(n: int = 16) -> dict[str, NDArray[np.generic]]:
    return {"ids": np.random.default_rng(2).integers(0, VOCAB, (n, TOKENS)).astype(np.int64)}


def _run(path: Path, feed: Mapping[str, NDArray[np.generic]]) -> NDArray[np.float32]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result: NDArray[np.float32] = session.run(None, feed)[0]
    return result


def _ops(path: Path) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in onnx.load(str(path)).graph.node}


def _relative_error(got: NDArray[np.float32], want: NDArray[np.float32]) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_int4_weights_and_table_become_low_bit_ops_that_run_close_to_float(
    tmp_path: Path,
) -> None:
    source = embedding_model(tmp_path / "float.onnx")
    step = WeightOnlyQuantize(bits=4, block_size=32, gather_block_size=64)
    result = quantize_weight_only(source, tmp_path / "int4.onnx", step)
    ops = {n.op_type: n for n in _ops(result.out).values()}
    assert set(ops) == {"GatherBlockQuantized", "MatMulNBits"}
    attrs = {a.name: helper.get_attribute_value(a) for a in ops["MatMulNBits"].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
    table = {a.name: helper.get_attribute_value(a) for a in ops["GatherBlockQuantized"].attribute}
    assert table["block_size"] == 64
    assert result.matmul_nodes == ("proj",) and result.gather_nodes == ("embed",)
    assert result.bytes < 0.25 * result.source_bytes
    feed = _ids()
    assert _relative_error(_run(result.out, feed), _run(source, feed)) < 0.15


def test_int8_weights_are_closer_than_int4(tmp_path: Path) -> None:
    source = embedding_model(tmp_path / "float.onnx")
    feed, want = _ids(), _run(source, _ids())
    errors = {}
    for bits in (4, 8):
        step = WeightOnlyQuantize(bits=bits, include_gather=False)
        out = quantize_weight_only(source, tmp_path / f"int{bits}.onnx", step).out
        assert [n.op_type for n in _ops(out).values()] == ["Gather", "MatMulNBits"]
        errors[bits] = _relative_error(_run(out, feed), want)
    assert errors[8] < errors[4] / 4


def test_a_share_quantizes_the_matmul_that_harms_least(tmp_path: Path) -> None:
    source = two_branch_model(tmp_path / "float.onnx")
    calibration = {"x": np.random.default_rng(3).normal(0, 1, (16, WIDTH)).astype(np.float32)}
    step = WeightOnlyQuantize(matmul_share=0.5, include_gather=False)
    with pytest.raises(CompressionError, match="calibration"):
        quantize_weight_only(source, tmp_path / "none.onnx", step)
    result = quantize_weight_only(source, tmp_path / "half.onnx", step, calibration=calibration)
    assert result.matmul_nodes == ("smooth_mm",) and result.float_matmuls == ("spiky_mm",)
    assert [r.node for r in result.ranking] == ["smooth_mm", "spiky_mm"]
    assert result.ranking[0].harm < result.ranking[1].harm / 10
    ops = _ops(result.out)
    assert ops["spiky_mm"].op_type == "MatMul"
    assert any(n.op_type == "MatMulNBits" for n in ops.values())


def test_the_rest_becomes_dynamic_int8_in_a_recipe(tmp_path: Path) -> None:
    source = two_branch_model(tmp_path / "float.onnx")
    calibration = {"x": np.random.default_rng(4).normal(0, 1, (16, WIDTH)).astype(np.float32)}
    recipe = Recipe(
        steps=(
            WeightOnlyQuantize(matmul_share=0.5, include_gather=False),
            Quantize(mode="dynamic"),
        )
    )
    assert [s.kind for s in recipe.to_manifest()] == ["quantize.weight_only", "quantize"]
    assert Recipe.model_validate_json(recipe.model_dump_json()) == recipe
    builder = OnnxSource(source, calibration)
    out = builder.build(recipe, tmp_path / "trial")
    types = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "MatMulNBits" in types and "MatMul" not in types
    assert types & {"MatMulInteger", "DynamicQuantizeMatMul"}
    feed = {"x": calibration["x"]}
    assert _relative_error(_run(out, feed), _run(source, feed)) < 0.5


def test_a_model_without_weights_to_quantize_is_refused(tmp_path: Path) -> None:
    source = _save(
        tmp_path / "relu.onnx",
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"], name="relu")],
            "relu",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        ),
    )
    with pytest.raises(UnsupportedModelError, match=r"nothing to quantize.*Relu"):
        quantize_weight_only(source, tmp_path / "out.onnx", WeightOnlyQuantize())
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"bits": 3}, "bits"),
        ({"block_size": 48}, "power of two"),
        ({"block_size": 8}, "block_size"),
        ({"gather_block_size": 100}, "power of two"),
        ({"bits": 8}, "include_gather needs bits=4"),
        ({"accuracy_level": 5}, "accuracy_level"),
        ({"matmul_share": 1.5}, "matmul_share"),
        ({"matmul_share": 0, "include_gather": False}, "quantizes nothing"),
    ],
)
def test_bad_parameters_are_refused_when_the_step_is_built(
    raw: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError, match=field):
        STEP_ADAPTER.validate_python({"kind": "quantize.weight_only", **raw})
