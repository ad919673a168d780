"""Check that uploaded bytes are a valid ONNX model and read its input/output specs.

Only the controller imports onnx. The checker runs on the file path (the form that
works past protobuf's 2 GiB message limit and keeps a second copy out of memory). A
model that passes the checker can still be one onnxruntime will not run (a custom
operator, an opset newer than the runtime): it is loaded once, unoptimised, so it is
refused here rather than signed, shipped and failed on every device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx.checker
import onnx.helper
import onnxruntime as ort
from google.protobuf.message import DecodeError

from artifact.manifest import TensorSpec
from controller.errors import invalid

PREFIX = "model is not a valid ONNX file: "


@dataclass(frozen=True)
class OnnxInfo:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    ir_version: int


def inspect_onnx(path: Path) -> OnnxInfo:
    """Validate the ONNX file at ``path``; FleetError(INVALID_ARGUMENT) says what is wrong."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise invalid(f"{PREFIX}it does not parse as an ONNX ModelProto ({_short(exc)})") from exc
    if not model.HasField("graph"):
        raise invalid(f"{PREFIX}it has no graph (is it an ONNX file at all?)")
    external = [
        t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise invalid(
            f"{PREFIX}initializers {external[:3]} keep their data in external files; "
            "upload one self-contained .onnx file (onnx.save with save_as_external_data=False)"
        )
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError, RuntimeError, OSError) as exc:
        raise invalid(f"{PREFIX}{_short(exc)}") from exc
    initializers = {t.name for t in model.graph.initializer}
    try:
        inputs = tuple(_spec(v) for v in model.graph.input if v.name not in initializers)
        outputs = tuple(_spec(v) for v in model.graph.output)
    except ValueError as exc:
        raise invalid(f"{PREFIX}{_short(exc)}") from exc
    if not outputs:
        raise invalid(f"{PREFIX}the graph has no outputs")
    _check_loads(path)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return OnnxInfo(inputs=inputs, outputs=outputs, opset=opset, ir_version=model.ir_version)


def _check_loads(path: Path) -> None:
    """Load the model in onnxruntime's CPU provider, as an agent would (no graph
    optimisation: only whether it loads, in about 0.25 s for a 90 MB encoder)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 4  # the error below says it; no C++ log line as well
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception classes (Fail, InvalidGraph, ...)
        # its message names the file, here a temporary upload name: say "the model"
        why = _short(exc).replace(f"Load model from {path} failed:", "").strip()
        raise invalid(
            f"{PREFIX}onnxruntime {ort.__version__} cannot load it, so no device could run it "
            f"(HomeFleet agents run onnxruntime's CPU provider): {why}"
        ) from exc


def _spec(value: Any) -> TensorSpec:
    """TensorSpec of a graph input/output: numpy dtype name, -1 for each dynamic dim."""
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        # sequences, maps, optionals: described by their kind, no shape
        return TensorSpec(
            name=value.name, dtype=str(kind or "unknown").removesuffix("_type"), shape=()
        )
    tensor = value.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    except (KeyError, TypeError, ValueError):
        dtype = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
    shape = (
        tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        if tensor.HasField("shape")
        else ()
    )
    return TensorSpec(name=value.name or "unnamed", dtype=dtype, shape=shape)


def _short(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
