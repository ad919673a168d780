"""Small ONNX models for the agent's tests, built with onnx.helper (tests may import onnx)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node(
        "Constant",
        [],
        [name],
        value=helper.make_tensor(name + "_v", TensorProto.FLOAT, [], [value]),
    )


def two_input_model(scale: float = 2.0) -> bytes:
    """x: float32 [batch, 3] -> y = x * scale; ids: int64 [2] -> ids_out (identity)."""
    return _model(
        [
            _const("k", scale),
            helper.make_node("Mul", ["x", "k"], ["y"]),
            helper.make_node("Identity", ["ids"], ["ids_out"]),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, [2]),
        ],
    )


def paired_inputs_model() -> bytes:
    """a, b: float32 [n] -> y = a + b: the graph needs the two lengths equal, which their
    declared shapes (both [n], n free) do not say; onnxruntime fails the run otherwise."""
    return _model(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )


def add_model(offset: float) -> bytes:
    """x: float32 [batch, 4] -> y = x + offset (offset NaN makes a model that fails self-test)."""
    return _model(
        [_const("k", offset), helper.make_node("Add", ["x", "k"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )


def large_add_model(offset: float, floats: int = 150_000, seed: int = 0) -> bytes:
    """add_model(offset) plus ``floats`` real weights summed into a second output.

    Big enough (4 bytes a float) to span many 64 KiB chunks, so a download can break,
    stall and resume in the middle; still finite, so it passes the agent's self-test.
    """
    weights = np.random.default_rng(seed).standard_normal(floats).astype(np.float32)
    graph = helper.make_graph(
        [
            _const("k", offset),
            helper.make_node("Add", ["x", "k"], ["y"]),
            helper.make_node("ReduceSum", ["w"], ["w_sum"], keepdims=0),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("w_sum", TensorProto.FLOAT, []),
        ],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def finetuned(data: bytes, fraction: float = 0.02, seed: int = 1) -> bytes:
    """``data`` (a large_add_model) with a share of its weights moved, as a fine-tune does."""
    model = onnx.load_from_string(data)
    (init,) = [t for t in model.graph.initializer if t.name == "w"]
    w = numpy_helper.to_array(init).copy()
    rng = np.random.default_rng(seed)
    moved = rng.choice(w.size, int(w.size * fraction), replace=False)
    w[moved] += rng.standard_normal(moved.size).astype(np.float32) * 0.01
    init.CopyFrom(numpy_helper.from_array(w, "w"))
    return model.SerializeToString()
