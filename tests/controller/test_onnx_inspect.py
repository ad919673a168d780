"""ONNX validation and spec extraction, on files built with onnx.helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import pytest

from controller.errors import ErrorCode, FleetError
from controller.onnx_inspect import inspect_onnx
from tests.controller.helpers import onnx_model


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    return path


def test_specs_use_numpy_dtype_names_and_minus_one_for_dynamic_dims(tmp_path: Path) -> None:
    info = inspect_onnx(write(tmp_path, onnx_model(width=6)))
    assert [(s.name, s.dtype, s.shape) for s in info.inputs] == [("x", "float32", (-1, 6))]
    assert [(s.name, s.dtype, s.shape) for s in info.outputs] == [("y", "float32", (-1, 6))]
    assert info.opset == 17


def test_initializers_listed_as_inputs_are_not_inputs(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 3])
    b = onnx.helper.make_tensor_value_info("b", onnx.TensorProto.INT64, [3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT64, [2, 3])
    init = onnx.numpy_helper.from_array(np.arange(3, dtype=np.int64), "b")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["ids", "b"], ["y"])], "g", [x, b], [y], initializer=[init]
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 9
    info = inspect_onnx(write(tmp_path, model.SerializeToString()))
    assert [(s.name, s.dtype, s.shape) for s in info.inputs] == [("ids", "int64", (2, 3))]


@pytest.mark.parametrize(
    "data",
    [b"", b"this is not an onnx file", bytes(range(256)) * 4],
    ids=["empty", "text", "binary"],
)
def test_non_onnx_bytes_are_invalid_argument(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(FleetError) as caught:
        inspect_onnx(write(tmp_path, data))
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert caught.value.message.startswith("model is not a valid ONNX file: ")


def test_a_graph_the_checker_refuses_is_invalid_argument(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("NoSuchOp", ["x"], ["y"])], "g", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(FleetError, match=r"model is not a valid ONNX file: .*NoSuchOp"):
        inspect_onnx(write(tmp_path, model.SerializeToString()))


def test_external_data_is_refused(tmp_path: Path) -> None:
    model = onnx.load_from_string(onnx_model(weights=4096))
    onnx.save(
        model,
        str(tmp_path / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    with pytest.raises(FleetError, match="external files"):
        inspect_onnx(tmp_path / "model.onnx")


def custom_op_model() -> bytes:
    """A graph the ONNX checker accepts (ops of unknown domains are not checked) and
    onnxruntime cannot load: no kernel for com.example:Bar."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    node = onnx.helper.make_node("Bar", ["x"], ["y"], domain="com.example")
    graph = onnx.helper.make_graph([node], "g", [x], [y])
    model = onnx.helper.make_model(
        graph,
        opset_imports=[
            onnx.helper.make_opsetid("", 17),
            onnx.helper.make_opsetid("com.example", 1),
        ],
    )
    model.ir_version = 9
    return model.SerializeToString()


def test_a_model_onnxruntime_cannot_load_is_invalid_argument(tmp_path: Path) -> None:
    path = write(tmp_path, custom_op_model())
    onnx.checker.check_model(str(path))  # the checker alone lets it through
    with pytest.raises(FleetError) as caught:
        inspect_onnx(path)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    message = caught.value.message
    assert message.startswith("model is not a valid ONNX file: onnxruntime ")
    assert "cannot load it" in message and "com.example" in message and "Bar" in message
