"""A free estimate of how much rounding each node's tensors to int8 (or fp16) destroys.

It is the prior of the accuracy-aware search (sensitivity.py): when the evaluation
budget cannot measure every node, the nodes with the worst estimate are measured first.

The estimate for a tensor is the mean, over its non-zero values, of the relative
rounding error capped at 1. Means of capped per-value errors, not norms: one outlier
that stretches the int8 range dominates a norm yet rounds every typical value to zero,
which is exactly what the prior must notice (an attention mask of -3.4e38 added to
scores of a few units is the classic case). Weights use symmetric per-tensor ranges
(overstating per-channel error); activations come from a float run over a few
calibration samples with min/max asymmetric ranges (Entropy/Percentile clip less
harshly); fp16 uses a float16 round trip, where overflow counts as total loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.shape_inference
import onnxruntime as ort
from numpy.typing import NDArray

from controller.compression.quant_graph import Mode, float_tensors

MAX_SAMPLES = 16
MAX_VALUES = 200_000  # per tensor, a seeded subsample beyond this


def rounding_error(values: NDArray[np.floating], mode: Mode, *, symmetric: bool) -> float:
    """Mean capped relative error of rounding ``values`` (range from the values themselves)."""
    x = values.astype(np.float64).ravel()
    x = x[x != 0]
    if x.size == 0:
        return 0.0
    if not np.isfinite(x).all():
        return 1.0
    if mode == "fp16":
        with np.errstate(over="ignore"):
            back = x.astype(np.float16).astype(np.float64)
        back[~np.isfinite(back)] = 0.0  # overflow: the value is lost
    elif symmetric:
        scale = float(np.abs(x).max()) / 127.0
        back = np.round(x / scale) * scale
    else:
        low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        scale = (high - low) / 255.0
        zero = np.round(-low / scale)
        back = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    return float(np.minimum(np.abs(x - back) / np.abs(x), 1.0).mean())


def weight_errors(model: onnx.ModelProto, mode: Mode) -> dict[str, float]:
    """Rounding error of each float initializer, by name."""
    return {
        t.name: rounding_error(onnx.numpy_helper.to_array(t), mode, symmetric=True)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    }


def activation_errors(
    path: Path,
    calibration: Mapping[str, NDArray[np.generic]],
    mode: Mode,
    batch: int,
) -> dict[str, float]:
    """Rounding error of every float intermediate tensor over a few calibration samples."""
    model = onnx.load(str(path))
    if not model.graph.value_info:  # quant_pre_process output has it; a raw export may not
        model = onnx.shape_inference.infer_shapes(model)
    floats = float_tensors(model)
    skip = {t.name for t in model.graph.initializer} | {o.name for o in model.graph.output}
    model.graph.output.extend(
        v for v in model.graph.value_info if v.name in floats and v.name not in skip
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    count = len(next(iter(calibration.values())))
    take = min(count, max(MAX_SAMPLES, batch) // batch * batch)
    per_batch = MAX_VALUES // max(1, -(-take // batch))
    rng = np.random.default_rng(0)
    collected: dict[str, list[NDArray[np.generic]]] = {n: [] for n in names if n in floats}
    for start in range(0, take, batch):
        feed = {k: np.asarray(v)[start : start + batch] for k, v in calibration.items()}
        for name, value in zip(names, session.run(names, feed), strict=True):
            if name in collected:
                collected[name].append(_subsample(np.asarray(value).ravel(), per_batch, rng))
    errors = {
        name: rounding_error(np.concatenate(parts), mode, symmetric=False)
        for name, parts in collected.items()
        if parts
    }
    for name, array in calibration.items():
        if name in floats:
            errors[name] = rounding_error(np.asarray(array)[:take], mode, symmetric=False)
    return errors


def _subsample(values: NDArray[np.generic], cap: int, rng: np.random.Generator) -> NDArray[Any]:
    """At most ``cap`` values, always keeping the extremes (they set the int8 range)."""
    if values.size <= cap:
        return values
    extremes = values[[int(values.argmin()), int(values.argmax())]]
    return np.concatenate([rng.choice(values, cap, replace=False), extremes])


def node_priors(
    model: onnx.ModelProto,
    mode: Mode,
    activations: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Worst rounding error among each node's float inputs and outputs, by node name."""
    weights = weight_errors(model, mode)
    seen = {**(activations or {}), **weights}
    priors: dict[str, float] = {}
    for node in model.graph.node:
        tensors = [*node.input, *node.output]
        priors[node.name] = max((seen[t] for t in tensors if t in seen), default=0.0)
    return priors
