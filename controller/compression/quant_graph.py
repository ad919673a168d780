"""The ONNX graph work quantization needs around onnxruntime's own tools.

Loading with a clear error, naming every node (exclusion lists address nodes by name),
rewriting Gemm as MatMul + Add for dynamic quantization (onnxruntime has no integer
Gemm, so a torch ``nn.Linear`` exported as Gemm would stay float), listing the nodes a
mode actually quantizes, and a topological sort (the fp16 converter appends its Cast
nodes out of order, which onnx.checker refuses).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import onnx
import onnx.checker
import onnx.helper
import onnx.numpy_helper
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from artifact.files import fsync_dir
from controller.compression.errors import CompressionError

Mode = Literal["dynamic", "static", "fp16"]

# Dynamic mode quantizes only weight-bearing ops (its activations are quantized per call).
DYNAMIC_OPS = frozenset(
    {"MatMul", "Conv", "Gather", "Attention", "LSTM", "EmbedLayerNormalization"}
)
# Static QDQ puts Q/DQ pairs around every op of onnxruntime's default list (Add, Softmax,
# Where... too): all of them are candidates for staying float. A model is worth
# quantizing statically only if it has compute ops with weights or products.
STATIC_QUANTIZED_OPS = frozenset(QLinearOpsRegistry) | frozenset(QDQRegistry)
STATIC_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Gather"})
# ops whose fp16 arithmetic overflows or loses precision first (sums, exponentials, norms)
FP16_RISKY_OPS = frozenset(
    {
        "Exp",
        "Pow",
        "Softmax",
        "LogSoftmax",
        "ReduceSum",
        "ReduceMean",
        "ReduceSumSquare",
        "ReduceL2",
        "LayerNormalization",
        "Sqrt",
        "Div",
    }
)
FLOAT = onnx.TensorProto.FLOAT


def load_model(path: Path) -> onnx.ModelProto:
    """Load and check an ONNX file; CompressionError says why it is not usable."""
    if not path.is_file():
        raise CompressionError(f"source model {path} does not exist or is not a file")
    try:
        model = onnx.load(str(path))
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise CompressionError(
            f"{path} is not a valid ONNX model: it does not parse ({exc})"
        ) from exc
    if not model.HasField("graph") or not model.graph.node:
        raise CompressionError(f"{path} is not a valid ONNX model: it has no graph nodes")
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressionError(f"{path} is not a valid ONNX model: {first}") from exc
    return model


def onnx_file_bytes(path: Path) -> int:
    """Bytes of an ONNX model on disk: the file plus any external data files it references
    (torch's dynamo exporter writes weights to ``model.onnx.data``)."""
    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError):
        return total
    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entry = {e.key: e.value for e in tensor.external_data}
            if "location" in entry:
                locations.add(entry["location"])
    for location in locations:
        external = path.parent / location
        if external.is_file():
            total += external.stat().st_size
    return total


def symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime's symbolic shape inference (auto-merging conflicting symbolic dims), or
    None when it fails.

    Runs the steps of ``SymbolicShapeInference.infer_shapes`` itself because that function,
    when inference is incomplete, saves ``sym_shape_infer_temp.onnx`` plus a weights file
    into the current directory before raising; a partial result is still returned here.
    """
    try:
        engine = SymbolicShapeInference(2**31 - 1, True, False, 0)
        engine._preprocess(model)
        while engine.run_:
            engine._infer_impl()
        engine._update_output_from_vi()
        result: onnx.ModelProto = engine.out_mp_
        return result
    except Exception:  # best effort: callers fall back to ONNX's own shape inference
        return None


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name, in place; existing unique names are kept."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        while name in seen:
            name = f"{name}_{index}"
        node.name = name
        seen.add(name)


def gemm_to_matmul(model: onnx.ModelProto) -> list[str]:
    """Rewrite plain Gemm nodes with a constant B as MatMul (+ Add), in place.

    Only Gemm with alpha=beta=1, transA=0 and a float initializer B is rewritten (a
    transposed B is transposed once, in a new initializer). The MatMul keeps the Gemm's
    name, so an exclusion by that name still applies. Returns the rewritten names.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    rewritten: list[str] = []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        b = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        plain = (
            attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
            and attrs.get("transA", 0) == 0
        )
        if b is None or not plain or b.data_type != FLOAT or len(b.dims) != 2:
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            weight = _unique(f"{node.input[1]}_transposed", inits)
            array = onnx.numpy_helper.to_array(b).T.copy()
            tensor = onnx.numpy_helper.from_array(array, weight)
            graph.initializer.append(tensor)
            inits[weight] = tensor
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.name}/matmul_out" if has_bias else node.output[0]
        nodes.append(
            onnx.helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name)
        )
        if has_bias:
            nodes.append(
                onnx.helper.make_node(
                    "Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}/bias"
                )
            )
        rewritten.append(node.name)
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unused_initializers(model)
    return rewritten


def _unique(name: str, taken: Iterable[str]) -> str:
    existing = set(taken)
    candidate, n = name, 0
    while candidate in existing:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def _float_inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer if t.data_type == FLOAT}


def quantizable_nodes(model: onnx.ModelProto, mode: Mode) -> tuple[str, ...]:
    """Names of the nodes ``mode`` quantizes (the candidates for keeping in float)."""
    inits = _float_inits(model)
    floats, typed = float_tensors(model), _typed_tensors(model)
    names = []
    for node in model.graph.node:
        inputs = list(node.input)
        if mode == "dynamic":
            if node.op_type not in DYNAMIC_OPS:
                continue
            # onnxruntime's dynamic mode quantizes only MatMul with a constant B
            if node.op_type == "MatMul" and (len(inputs) < 2 or inputs[1] not in inits):
                continue
            if node.op_type == "Gather" and inputs[0] not in inits:
                continue
        elif mode == "static":
            if node.op_type not in STATIC_QUANTIZED_OPS:
                continue
            if node.op_type == "Gather" and inputs[0] not in inits:
                continue
            # ops on shapes and indices (int64) stay as they are; unknown types count as float
            touched = [t for t in [*inputs[:1], *node.output[:1]] if t]
            if touched and all(t in typed and t not in floats for t in touched):
                continue
        elif not (any(i in inits for i in inputs) or node.op_type in FP16_RISKY_OPS):
            continue
        names.append(node.name)
    return tuple(names)


def compute_nodes(model: onnx.ModelProto, mode: Mode) -> tuple[str, ...]:
    """The candidates that make quantizing worth it: weights or products (not Relu, Add...)."""
    inits = _float_inits(model)
    ops = {n.name: n for n in model.graph.node}
    names = quantizable_nodes(model, mode)
    if mode == "static":
        return tuple(n for n in names if ops[n].op_type in STATIC_OPS)
    if mode == "fp16":
        return tuple(n for n in names if any(i in inits for i in ops[n].input))
    return names


def has_float_weights(model: onnx.ModelProto) -> bool:
    return bool(_float_inits(model))


def float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors whose type the graph records (after shape inference)."""
    graph = model.graph
    names = {t.name for t in graph.initializer if t.data_type == FLOAT}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if value.type.tensor_type.elem_type == FLOAT:
            names.add(value.name)
    return names


def _typed_tensors(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    names = {t.name for t in graph.initializer}
    names |= {v.name for v in [*graph.input, *graph.value_info, *graph.output]}
    return names


def topological_sort(model: onnx.ModelProto) -> None:
    """Order the graph's nodes so each comes after the producers of its inputs, in place.

    Stable (ties keep the original order); names a subgraph uses from the outer scope
    count as inputs. Nodes that can never become ready are appended as they were, so
    the checker afterwards names the real problem.
    """
    graph = model.graph
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    deps: list[set[int]] = []
    for i, node in enumerate(graph.node):
        names = set(node.input) | _subgraph_names(node)
        deps.append({producer[n] for n in names if n in producer and producer[n] != i})
    done: set[int] = set()
    order: list[int] = []
    progress = True
    while progress:
        progress = False
        for i in range(len(graph.node)):
            if i not in done and deps[i] <= done:
                done.add(i)
                order.append(i)
                progress = True
    order += [i for i in range(len(graph.node)) if i not in done]
    if order != list(range(len(graph.node))):
        nodes = [graph.node[i] for i in order]
        copies = [onnx.NodeProto() for _ in nodes]
        for copy, node in zip(copies, nodes, strict=True):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(copies)


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs)
        if attr.HasField("g"):
            graphs.append(attr.g)
        for sub in graphs:
            for inner in sub.node:
                names |= set(inner.input) | _subgraph_names(inner)
    return names


def verify_result(path: Path, source: Path, what: str) -> None:
    """A rewritten model must pass the checker and load in onnxruntime with the source's
    outputs; ``what`` names the step in the error ("the int8 model", ...)."""
    try:
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CompressionError(f"{what} is not usable: {exc}") from exc
    want = [o.name for o in onnx.load(str(source), load_external_data=False).graph.output]
    got = [o.name for o in session.get_outputs()]
    if got != want:
        raise CompressionError(f"{what}'s outputs {got} differ from {want}")


def publish(path: Path, out: Path) -> None:
    """Move a finished file to ``out`` atomically (same directory, fsync, rename)."""
    with path.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(path, out)
    fsync_dir(out.parent)
