"""Parameters and multiply-accumulates of an ONNX model, for reports ("pruning gives fewer MACs").

Best effort: symbolic input dims are fixed (1 unless given), shape inference
propagates them, and MACs are counted for the operators that dominate compute —
Conv/ConvTranspose/MatMul/Gemm and their integer and QLinear forms. Nodes of those types
whose shapes cannot be inferred are listed rather than guessed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.shape_inference

from controller.compression.errors import CompressionError
from controller.compression.quant_graph import symbolic_shapes

# stored numbers that are weights; int64 tensors are shapes and indices
PARAM_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.INT32,
        onnx.TensorProto.INT4,
        onnx.TensorProto.UINT4,
    }
)
# op type → (data input index, weight input index)
CONV_OPS = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
MATMUL_OPS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}


@dataclass(frozen=True)
class ModelCost:
    params: int
    macs: int
    macs_by_op: tuple[tuple[str, int], ...]  # (op type, MACs), largest first
    unresolved_nodes: tuple[str, ...]  # counted ops whose shapes were unknown (MACs left out)


Shape = tuple[int, ...]


def count_macs(path: Path, *, dims: Mapping[str, int] | None = None) -> ModelCost:
    """Count parameters and per-inference MACs; ``dims`` fixes symbolic input dims (default 1)."""
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise CompressionError(f"{path} is not a readable ONNX model: {exc}") from exc
    params = _params(model)
    _fix_input_dims(model, dims or {})
    inferred = _infer(model)
    shapes = _shapes(inferred)
    by_op: dict[str, int] = {}
    unresolved: list[str] = []
    for node in inferred.graph.node:
        macs = _node_macs(node, shapes)
        if macs is None:
            unresolved.append(node.name or node.op_type)
        elif macs:
            by_op[node.op_type] = by_op.get(node.op_type, 0) + macs
    ranked = tuple(sorted(by_op.items(), key=lambda kv: -kv[1]))
    return ModelCost(params, sum(by_op.values()), ranked, tuple(unresolved))


def _params(model: onnx.ModelProto) -> int:
    total = sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type in PARAM_TYPES)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in PARAM_TYPES:
                    total += math.prod(attr.t.dims)
    return int(total)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's symbolic inference (it follows Shape/Gather/Concat chains that ONNX's
    loses the batch dim in, e.g. in transformers), else ONNX's, else the stored shapes."""
    inferred = symbolic_shapes(model)
    if inferred is not None:
        return inferred
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return model


def _fix_input_dims(model: onnx.ModelProto, dims: Mapping[str, int]) -> None:
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                size = dims.get(dim.dim_param, 1)
                dim.Clear()
                dim.dim_value = size


def _shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {t.name: tuple(t.dims) for t in model.graph.initializer}
    graph = model.graph
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = tensor.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, Shape]) -> int | None:
    """MACs of one node; 0 for ops not counted, None when a counted op lacks shapes."""
    inputs = list(node.input)

    def shape(index: int) -> Shape | None:
        return shapes.get(inputs[index]) if index < len(inputs) else None

    out = shapes.get(node.output[0]) if node.output else None
    if node.op_type in CONV_OPS:
        _, w_index = CONV_OPS[node.op_type]
        w = shape(w_index)
        if w is None or out is None:
            return None
        return math.prod(out) * math.prod(w[1:])
    if node.op_type == "ConvTranspose":
        x, w = shape(0), shape(1)
        if x is None or w is None:
            return None
        return math.prod(x) * math.prod(w[1:])
    if node.op_type in MATMUL_OPS:
        a_index, _ = MATMUL_OPS[node.op_type]
        a = shape(a_index)
        if a is None or out is None or not a:
            return None
        return math.prod(out) * a[-1]
    if node.op_type == "Gemm":
        a = shape(0)
        if a is None or out is None or len(a) != 2:
            return None
        trans_a = any(x.name == "transA" and x.i for x in node.attribute)
        return math.prod(out) * (a[0] if trans_a else a[1])
    return 0
