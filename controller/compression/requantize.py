"""Delta-friendly recompression: quantize a fine-tuned model with an earlier artifact's parameters.

A re-release (the same architecture, fine-tuned weights) quantized afresh gets new scales
everywhere, so even weights that did not move become different integers and the delta
to what devices hold is large. Here the previous static QDQ artifact is the template:
its graph is kept as it is (the same nodes stay float, the same Q/DQ pairs), its scales
and zero points are kept byte for byte, and only the integers are recomputed from the
new float weights with them, so an unchanged weight gives exactly its old integers.

Per parameter pair (one scale and zero point, possibly shared by several tensors, as
onnxruntime shares them across a Flatten or a Reshape):
- reused when the new values fit: at most ``max_saturation`` of them clip at the ends of
  the integer range (activations are checked only when calibration inputs are given);
- refreshed otherwise, with the parameters onnxruntime would compute (symmetric per
  channel for int8 weights, min/max for activations);
- unmatched when the tensor's shape changed: fresh parameters for the new shape.
An int32 bias follows its input and weight: scale ``input_scale * weight_scale`` as
onnxruntime makes it, the old bias scale kept when both of those were reused.

With ``hysteresis`` h > 0 a reused weight keeps its old integer unless the new value
lies more than 0.5 + h steps from it: a fine-tune moves most weights by less than a
step, and plain rounding still flips the ones near a rounding boundary (on PLAID after
one epoch, 18 % of the integers). The error per weight is then at most 0.5 + h steps
instead of 0.5; whether that is acceptable is the accuracy budget's call.

The previous artifact must be a static QDQ model made (by ``quantize.py``) from this
architecture: node names, operators and attributes of the pre-processed new model must
be those of the artifact's non-Q/DQ nodes (onnxruntime folds Relu and Clip into the
quantizer before them, so those may be missing). A canonical artifact (canonical_qdq.py)
holds the nodes of the float model as exported instead (constants as Constant nodes, no
attributes onnxruntime added): it is matched against the new model as given when the
pre-processed one does not match. Anything else is refused, naming the first differences
(against the pre-processed model).

Given calibration inputs, the output is rewritten into the canonical form too (the
devices that hold the new float model rebuild it from a few bytes), when that runs
bit-identically. The output appears at ``out`` only when complete and checked.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization.quant_utils import compute_data_quant_params, get_qmin_qmax_for_qType

from artifact.digest import sha256_file
from controller.compression import quant_graph
from controller.compression.calibration import DictCalibrationReader, batch_size, check_calibration
from controller.compression.canonical_qdq import CanonicalResult, canonicalize
from controller.compression.errors import CompressionError
from controller.compression.quantize import prepare_for_quantization

Role = Literal["weight", "bias", "activation"]
Outcome = Literal["reused", "refreshed", "unmatched"]

DEFAULT_MAX_SATURATION = 0.01
# onnxruntime's QDQ quantizer drops these after a quantized node (the Q range covers them)
REMOVABLE_OPS = frozenset({"Relu", "Clip"})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
INTEGER_TYPES = frozenset(
    {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16}
)
MAX_PROBLEMS_SHOWN = 5


class NotReusableError(CompressionError):
    """The previous artifact cannot lend its parameters to this model (says why)."""


@dataclass(frozen=True)
class TensorChoice:
    """What happened to one quantized tensor of the new model."""

    tensor: str  # the float tensor's name in the (pre-processed) new model
    role: Role
    outcome: Outcome
    elements: int  # values quantized (activations: over the calibration inputs; 0 unchecked)
    saturated: int  # of those, how many clip with the parameters the output uses
    parameters: str  # the scale initializer
    reason: str = ""
    held: int = 0  # integers kept at their old value by hysteresis that rounding would move


@dataclass(frozen=True)
class RequantizeReport:
    """What ``requantize_like`` wrote and, per tensor, whether old parameters were kept."""

    out: Path
    bytes: int
    previous_sha256: str
    choices: tuple[TensorChoice, ...]
    float_nodes: tuple[str, ...]  # compute nodes the previous artifact (and this one) keep float
    activations_checked: bool  # False: no calibration inputs, activation parameters reused as-is
    canonical: CanonicalResult | None = None  # None: no calibration inputs to check it with

    def _with(self, outcome: Outcome) -> tuple[str, ...]:
        return tuple(c.tensor for c in self.choices if c.outcome == outcome)

    @property
    def reused(self) -> tuple[str, ...]:
        return self._with("reused")

    @property
    def refreshed(self) -> tuple[str, ...]:
        return self._with("refreshed")

    @property
    def unmatched(self) -> tuple[str, ...]:
        return self._with("unmatched")

    @property
    def saturated(self) -> int:
        return sum(c.saturated for c in self.choices)

    def summary(self) -> str:
        held = sum(c.held for c in self.choices)
        return (
            f"{len(self.reused)} tensor(s) reused, {len(self.refreshed)} refreshed, "
            f"{len(self.unmatched)} unmatched; {self.saturated} value(s) saturated, "
            f"{held} held by hysteresis"
        )


# ------------------------------------------------------------------ the previous artifact


@dataclass(frozen=True)
class _Member:
    """One tensor quantized with a parameter pair."""

    source: str  # float tensor in the new model
    role: Role
    quantized: str | None = None  # initializer holding its integers (weights, biases)
    consumer: onnx.NodeProto | None = None  # biases: the Conv/Gemm that adds them


@dataclass
class _Group:
    """A (scale, zero point) pair of the previous artifact and the tensors that use it."""

    scale: str
    zero_point: str | None
    axis: int | None  # per-channel axis; None when the scale is one value
    members: list[_Member] = field(default_factory=list)

    @property
    def role(self) -> Role:
        return self.members[0].role


@dataclass(frozen=True)
class _Match:
    groups: tuple[_Group, ...]
    float_inits: tuple[str, ...]  # float initializers the artifact takes from the new model
    float_nodes: tuple[str, ...]


def load_previous(previous: Path) -> onnx.ModelProto:
    """The previous artifact, refused unless it is a static QDQ integer model."""
    previous = Path(previous)
    if not previous.is_file():
        raise NotReusableError(f"previous artifact {previous} does not exist or is not a file")
    try:
        model = onnx.load(str(previous))
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise NotReusableError(
            f"previous artifact {previous} is not an ONNX model: it does not parse ({exc})"
        ) from exc
    if not model.HasField("graph") or not model.graph.node:
        raise NotReusableError(f"previous artifact {previous} is not an ONNX model: no graph nodes")
    inits = {t.name: t for t in model.graph.initializer}
    quantized = [
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and inits[n.input[0]].data_type in INTEGER_TYPES
    ]
    if not quantized:
        ops = sorted({n.op_type for n in model.graph.node})
        raise NotReusableError(
            f"previous artifact {previous} is not a static int8 (QDQ) model: it has no "
            f"DequantizeLinear of integer weights (its operators: {', '.join(ops)}); only "
            "a static quantization's parameters can be reused"
        )
    return model


def _initializer_names(model: onnx.ModelProto) -> set[str]:
    return {t.name for t in model.graph.initializer}


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    names = _initializer_names(model) | {i.name for i in model.graph.input}
    for node in model.graph.node:
        names.update(node.output)
    return names


def _attributes(node: onnx.NodeProto) -> list[bytes]:
    return sorted(a.SerializeToString(deterministic=True) for a in node.attribute)


def _compare_nodes(old: onnx.ModelProto, new: onnx.ModelProto) -> list[str]:
    """Differences between the artifact's compute nodes and the new model's nodes."""
    problems: list[str] = []
    new_nodes = {n.name: n for n in new.graph.node}
    kept = set()
    for node in old.graph.node:
        if node.op_type in QDQ_OPS:
            continue
        kept.add(node.name)
        other = new_nodes.get(node.name)
        if other is None:
            problems.append(f"node {node.name!r} ({node.op_type}) is not in the new model")
        elif other.op_type != node.op_type:
            problems.append(f"node {node.name!r} is {other.op_type} here, {node.op_type} before")
        elif _attributes(other) != _attributes(node):
            problems.append(f"node {node.name!r} ({node.op_type}) has other attributes")
    for node in new.graph.node:
        if node.name not in kept and node.op_type not in REMOVABLE_OPS:
            problems.append(f"node {node.name!r} ({node.op_type}) is new")
    return problems


def _match(old: onnx.ModelProto, new: onnx.ModelProto) -> _Match:
    """Pair every quantizer of the artifact with a tensor of the new model, or refuse."""
    problems = _compare_nodes(old, new)
    old_inits = {t.name: t for t in old.graph.initializer}
    new_inits = _initializer_names(new)
    new_tensors = _tensor_names(new)
    new_nodes = {n.name: n for n in new.graph.node}
    producers = {out: n for n in old.graph.node for out in n.output}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in old.graph.node:
        for index, name in enumerate(node.input):
            consumers[name].append((node, index))

    groups: dict[tuple[str, str | None], _Group] = {}
    parameters: set[str] = set()

    def group(node: onnx.NodeProto) -> _Group:
        scale = node.input[1]
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        parameters.update(n for n in (scale, zero_point) if n)
        key = (scale, zero_point)
        if key not in groups:
            per_channel = int(np.prod(old_inits[scale].dims)) > 1 if scale in old_inits else False
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            groups[key] = _Group(scale, zero_point, axis if per_channel else None)
        return groups[key]

    def weight_source(dq: onnx.NodeProto) -> tuple[str | None, onnx.NodeProto | None]:
        found: set[str] = set()
        user = None
        for node, index in consumers[dq.output[0]]:
            other = new_nodes.get(node.name)
            if other is not None and index < len(other.input):
                found.add(other.input[index])
                user = node
        if len(found) == 1 and (name := found.pop()) in new_inits:
            return name, user
        return None, user

    def activation_source(q: onnx.NodeProto, dq: onnx.NodeProto | None) -> str | None:
        name = q.input[0]
        if name in new_tensors:
            return name
        if dq is not None and dq.output[0] in new_tensors:  # a graph output, renamed
            return dq.output[0]
        producer = producers.get(name)
        other = new_nodes.get(producer.name) if producer is not None else None
        if producer is not None and other is not None:
            index = list(producer.output).index(name)
            if index < len(other.output):
                return other.output[index]
        return None

    dq_of = {n.input[0]: n for n in old.graph.node if n.op_type == "DequantizeLinear"}
    for node in old.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in old_inits:
            quantized = node.input[0]
            source, user = weight_source(node)
            if source is None:
                problems.append(f"quantized weight {quantized!r} has no float counterpart")
                continue
            role: Role = "bias" if old_inits[quantized].data_type == TensorProto.INT32 else "weight"
            group(node).members.append(_Member(source, role, quantized, user))
        elif node.op_type == "QuantizeLinear":
            dq = dq_of.get(node.output[0])
            source = activation_source(node, dq)
            if source is None:
                problems.append(f"activation {node.input[0]!r} is not in the new model")
                continue
            group(node).members.append(_Member(source, "activation"))
            if dq is not None:
                group(dq)  # its parameters, normally the same pair

    quantized_data = {m.quantized for g in groups.values() for m in g.members if m.quantized}
    float_inits = []
    for name in old_inits:
        if name in parameters or name in quantized_data:
            continue
        if name not in new_inits:
            problems.append(f"initializer {name!r} is not in the new model")
        float_inits.append(name)
    if problems:
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
        extra = len(problems) - MAX_PROBLEMS_SHOWN
        more = f" (and {extra} more)" if extra > 0 else ""
        raise NotReusableError(
            f"the previous artifact was not quantized from this model's architecture: "
            f"{shown}{more}; quantize afresh instead"
        )
    mixed = [g.scale for g in groups.values() if len({m.role for m in g.members}) > 1]
    if mixed:
        raise NotReusableError(f"parameters {mixed} are shared by weights and activations")
    return _Match(
        tuple(g for g in groups.values() if g.members),
        tuple(float_inits),
        _float_nodes(old),
    )


def _float_nodes(model: onnx.ModelProto) -> tuple[str, ...]:
    """Nodes static quantization handles (Conv, MatMul, Add, Mul...) that the artifact
    keeps in float: no dequantized constant goes in and no quantizer takes what comes out
    (their input may still arrive dequantized, from the node before)."""
    inits = {t.name for t in model.graph.initializer}
    weights = {
        n.output[0]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits
    }
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    return tuple(
        n.name
        for n in model.graph.node
        if n.op_type in quant_graph.STATIC_QUANTIZED_OPS
        and not any(i in weights for i in n.input)
        and not any(o in quantized for o in n.output)
    )


def _reference(old: onnx.ModelProto, source: Path, pre: Path) -> tuple[Path, _Match]:
    """The float model whose nodes the artifact holds, and the match with it.

    onnxruntime's file holds the pre-processed model's nodes; a canonical artifact holds
    those of the float model as exported. The pre-processed model is tried first, and its
    differences are the ones reported when neither matches."""
    try:
        return pre, _match(old, onnx.load(str(pre)))
    except NotReusableError as first:
        try:
            return source, _match(old, onnx.load(str(source)))
        except NotReusableError:
            raise first from None


def check_previous(previous: Path, source: Path) -> None:
    """Refuse (NotReusableError) a previous artifact whose parameters ``source`` cannot reuse."""
    old = load_previous(previous)
    quant_graph.load_model(Path(source))
    with tempfile.TemporaryDirectory(prefix="homefleet-requantize-") as tmp:
        pre = prepare_for_quantization(Path(source), Path(tmp) / "pre.onnx", "static")
        _reference(old, Path(source), pre)


# ------------------------------------------------------------------ the arithmetic


def _array(proto: TensorProto) -> NDArray[np.generic]:
    return np.asarray(numpy_helper.to_array(proto))


def _along(values: NDArray[np.generic], axis: int | None, ndim: int) -> NDArray[np.generic]:
    """Per-channel parameters shaped to broadcast along ``axis`` of an ``ndim`` tensor."""
    if axis is None or values.size == 1:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _quantize(
    values: NDArray[np.generic],
    scale: NDArray[np.generic],
    zero_point: NDArray[np.generic],
    dtype: np.dtype[np.generic],
    axis: int | None,
) -> tuple[NDArray[np.generic], int]:
    """onnxruntime's arithmetic (quantize_nparray): round(x / scale) + zp, clipped; and how
    many values clipped."""
    s = _along(np.asarray(scale, np.float32), axis, values.ndim).astype(np.float32)
    z = _along(np.asarray(zero_point), axis, values.ndim).astype(np.float32)
    raw = np.round(values.astype(np.float32) / s) + z
    info = np.iinfo(cast("np.dtype[np.integer[Any]]", dtype))
    clipped = int(np.count_nonzero((raw < info.min) | (raw > info.max)))
    return np.clip(raw, info.min, info.max).astype(dtype), clipped


def _quantize_bias(
    values: NDArray[np.generic], scale: NDArray[np.generic]
) -> tuple[NDArray[np.int32], int]:
    """Biases as onnxruntime quantizes them: float64 division, int32."""
    s = (
        np.asarray(scale, np.float64).reshape(-1)
        if scale.size > 1
        else np.float64(scale.ravel()[0])
    )
    raw = np.round(np.asarray(values, np.float64) / s)
    info = np.iinfo(np.int32)
    clipped = int(np.count_nonzero((raw < info.min) | (raw > info.max)))
    return np.clip(raw, info.min, info.max).astype(np.int32), clipped


def _hold(
    quantized: NDArray[np.generic],
    values: NDArray[np.generic],
    scale: NDArray[np.generic],
    zero_point: NDArray[np.generic],
    axis: int | None,
    old: NDArray[np.generic],
    hysteresis: float,
) -> tuple[NDArray[np.generic], int]:
    """Keep an old integer wherever the new value lies within ``0.5 + hysteresis`` steps
    of it (a weight's integer then moves only when the weight moved by more than that);
    and how many integers that kept which rounding alone would have changed."""
    s = _along(np.asarray(scale, np.float32), axis, values.ndim).astype(np.float32)
    z = _along(np.asarray(zero_point), axis, values.ndim).astype(np.float32)
    position = values.astype(np.float32) / s + z
    keep = np.abs(position - old.astype(np.float32)) <= 0.5 + hysteresis
    held = int(np.count_nonzero(keep & (quantized != old)))
    return np.where(keep, old, quantized), held


def _symmetric(zero_point: NDArray[np.generic], qtype: int) -> bool:
    qmin, qmax = get_qmin_qmax_for_qType(qtype, symmetric=True)
    middle = round((int(qmin) + int(qmax)) / 2)
    return bool(np.all(zero_point.astype(np.int64) == middle))


def _reduced(quantized: Iterable[NDArray[np.generic]], qtype: int, symmetric: bool) -> bool:
    """Whether the old integers stayed inside onnxruntime's reduced (7-bit) range: fresh
    parameters then keep it (a fresh quantization reaches its range's end in every channel)."""
    qmin, qmax = get_qmin_qmax_for_qType(qtype, reduce_range=True, symmetric=symmetric)
    return all(int(q.min()) >= int(qmin) and int(q.max()) <= int(qmax) for q in quantized if q.size)


def _fresh_weight_parameters(
    arrays: list[NDArray[np.generic]],
    axis: int | None,
    qtype: int,
    symmetric: bool,
    reduce_range: bool,
) -> tuple[NDArray[np.float32], NDArray[np.generic]]:
    """Scale and zero point as onnxruntime computes them for a weight (per channel or not)."""
    if axis is None:
        rows = [np.concatenate([a.ravel() for a in arrays])]
    else:
        matrices = [np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1) for a in arrays]
        rows = list(np.concatenate(matrices, axis=1))
    scales, zeros = [], []
    for row in rows:
        zero, scale = compute_data_quant_params(
            row.astype(np.float32), qtype, symmetric, reduce_range=reduce_range
        )
        scales.append(scale)
        zeros.append(zero)
    return np.asarray(scales, np.float32), np.asarray(zeros)


def _fresh_activation_parameters(
    low: float, high: float, qtype: int
) -> tuple[NDArray[np.float32], NDArray[np.generic]]:
    """Min/max calibration's parameters (onnxruntime's default for activations)."""
    zero, scale = compute_data_quant_params(np.array([low, high], np.float32), qtype, False)
    return np.asarray(scale, np.float32), np.asarray(zero)


@dataclass
class _Stats:
    """An activation over the calibration inputs, against its previous parameters."""

    low: float = np.inf
    high: float = -np.inf
    elements: int = 0
    clipped: int = 0


def _activation_stats(
    pre: Path,
    groups: Iterable[_Group],
    old_inits: Mapping[str, TensorProto],
    calibration: Mapping[str, NDArray[np.generic]],
) -> dict[str, _Stats]:
    """Run the new float model on the calibration inputs; per activation tensor: range and
    values that the previous parameters clip."""
    model = onnx.load(str(pre))
    params: dict[str, tuple[NDArray[np.generic], NDArray[np.generic], np.dtype[np.generic]]] = {}
    for g in groups:
        if g.role != "activation":
            continue
        scale = _array(old_inits[g.scale])
        zero = _array(old_inits[g.zero_point]) if g.zero_point else np.zeros((), np.uint8)
        for member in g.members:
            params[member.source] = (scale, zero, zero.dtype)
    outputs = {o.name for o in model.graph.output}
    produced = {out for node in model.graph.node for out in node.output}
    for name in params:  # graph inputs come from the feeds, initializers are constants
        if name in produced and name not in outputs:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    constants = {t.name: _array(t) for t in model.graph.initializer if t.name in params}
    stats = {name: _Stats() for name in params}
    reader = DictCalibrationReader(calibration, batch_size(model))
    while (feeds := reader.get_next()) is not None:
        values = dict(zip(names, session.run(None, feeds), strict=True)) | feeds | constants
        for name, (scale, zero, dtype) in params.items():
            x = np.asarray(values[name])
            s = stats[name]
            s.low, s.high = min(s.low, float(x.min())), max(s.high, float(x.max()))
            s.elements += x.size
            s.clipped += _quantize(x, scale, zero, dtype, None)[1]
    return stats


# ------------------------------------------------------------------ the work


@dataclass
class _Builder:
    """New initializers for the artifact's graph, and the choices that made them."""

    old_inits: Mapping[str, TensorProto]
    new_floats: Mapping[str, NDArray[np.generic]]
    max_saturation: float
    hysteresis: float
    stats: Mapping[str, _Stats] | None
    replaced: dict[str, TensorProto] = field(default_factory=dict)
    choices: list[TensorChoice] = field(default_factory=list)
    outcome_of: dict[str, Outcome] = field(default_factory=dict)  # by scale initializer
    shapes_changed: bool = False

    def parameters(self, g: _Group) -> tuple[NDArray[np.generic], NDArray[np.generic]]:
        """The group's scale and zero point as the output has them."""
        scale = self.replaced.get(g.scale, self.old_inits[g.scale])
        if g.zero_point is None:  # ONNX's default: uint8
            return _array(scale), np.zeros((), np.uint8)
        zero = self.replaced.get(g.zero_point, self.old_inits[g.zero_point])
        return _array(scale), _array(zero)

    def _set_parameters(
        self, g: _Group, scale: NDArray[np.generic], zero: NDArray[np.generic]
    ) -> None:
        old_scale = self.old_inits[g.scale]
        dims = tuple(old_scale.dims) if scale.size == int(np.prod(old_scale.dims)) else scale.shape
        self.replaced[g.scale] = numpy_helper.from_array(
            np.asarray(scale, _array(old_scale).dtype).reshape(dims), g.scale
        )
        if g.zero_point is not None:
            old_zero = _array(self.old_inits[g.zero_point])
            self.replaced[g.zero_point] = numpy_helper.from_array(
                np.asarray(zero).astype(old_zero.dtype).reshape(dims), g.zero_point
            )

    def weights(self, g: _Group) -> None:
        """The integers of the group's weights: with its old parameters when they fit."""
        members = [(m.source, m.quantized) for m in g.members if m.quantized]
        old_q = {source: _array(self.old_inits[q]) for source, q in members}
        values = {source: np.asarray(self.new_floats[source]) for source, _ in members}
        scale, zero = self.parameters(g)
        dtype = next(iter(old_q.values())).dtype
        reshaped = [s for s in values if values[s].shape != old_q[s].shape]
        held = dict.fromkeys(values, 0)
        results: dict[str, tuple[NDArray[np.generic], int]] = {}
        if reshaped:
            outcome: Outcome = "unmatched"
            reason = f"shape changed ({', '.join(reshaped)}): fresh parameters"
            self.shapes_changed = True
        else:
            results = {s: _quantize(values[s], scale, zero, dtype, g.axis) for s in values}
            clipped = sum(c for _, c in results.values())
            elements = sum(v.size for v in values.values())
            if clipped > self.max_saturation * elements:
                outcome = "refreshed"
                reason = f"{clipped} of {elements} values would saturate: fresh parameters"
            else:
                outcome, reason = "reused", ""
        if outcome == "reused" and self.hysteresis > 0:
            for s, (q, clipped) in results.items():
                kept, held[s] = _hold(q, values[s], scale, zero, g.axis, old_q[s], self.hysteresis)
                results[s] = (kept, clipped)
        if outcome != "reused":
            qtype = helper.np_dtype_to_tensor_dtype(dtype)
            symmetric = _symmetric(zero, qtype)
            reduce_range = _reduced(old_q.values(), qtype, symmetric)
            scale, zero = _fresh_weight_parameters(
                list(values.values()), g.axis, qtype, symmetric, reduce_range
            )
            self._set_parameters(g, scale, zero)
            results = {s: _quantize(values[s], scale, zero, dtype, g.axis) for s in values}
        self.outcome_of[g.scale] = outcome
        for source, quantized in members:
            q, saturated = results[source]
            self.replaced[quantized] = numpy_helper.from_array(q, quantized)
            self.choices.append(
                TensorChoice(
                    source, "weight", outcome, q.size, saturated, g.scale, reason, held[source]
                )
            )

    def activations(self, g: _Group) -> None:
        scale, zero = self.parameters(g)
        qtype = helper.np_dtype_to_tensor_dtype(zero.dtype)
        if self.stats is None:
            self.outcome_of[g.scale] = "reused"
            for m in g.members:
                self.choices.append(
                    TensorChoice(m.source, "activation", "reused", 0, 0, g.scale, "unchecked")
                )
            return
        member_stats = [self.stats[m.source] for m in g.members]
        elements = sum(s.elements for s in member_stats)
        clipped = sum(s.clipped for s in member_stats)
        outcome: Outcome = "reused"
        reason = ""
        if clipped > self.max_saturation * elements:
            outcome = "refreshed"
            reason = f"{clipped} of {elements} calibration values would saturate: min/max"
            low = min(s.low for s in member_stats)
            high = max(s.high for s in member_stats)
            scale, zero = _fresh_activation_parameters(low, high, qtype)
            self._set_parameters(g, scale, zero)
        self.outcome_of[g.scale] = outcome
        for m, s in zip(g.members, member_stats, strict=True):
            saturated = 0 if outcome == "refreshed" else s.clipped
            self.choices.append(
                TensorChoice(
                    m.source, "activation", outcome, s.elements, saturated, g.scale, reason
                )
            )

    def bias(self, g: _Group, by_output: Mapping[str, _Group]) -> None:
        """int32 biases: scale input_scale * weight_scale (* Gemm's beta), as onnxruntime."""
        for m in g.members:
            if m.quantized is None:
                continue
            values = np.asarray(self.new_floats[m.source])
            old_q = _array(self.old_inits[m.quantized])
            inputs = _bias_inputs(m.consumer, by_output)
            if inputs is None:
                raise NotReusableError(
                    f"bias {m.source!r} is not the third input of a node whose input and "
                    "weight are dequantized; cannot derive its scale"
                )
            x_group, w_group, beta = inputs
            keep = (
                values.shape == old_q.shape
                and self.outcome_of.get(x_group.scale) == "reused"
                and self.outcome_of.get(w_group.scale) == "reused"
            )
            if keep:
                scale = self.parameters(g)[0]
                outcome: Outcome = "reused"
                reason = ""
            else:
                x_scale = self.parameters(x_group)[0].astype(np.float32)
                w_scale = self.parameters(w_group)[0].astype(np.float32)
                scale = np.asarray(x_scale * w_scale * np.float32(beta), np.float32).reshape(-1)
                self._set_parameters(g, scale, np.zeros(scale.shape, np.int32))
                outcome = "unmatched" if values.shape != old_q.shape else "refreshed"
                reason = "follows its input's and weight's parameters"
            q, saturated = _quantize_bias(values, scale)
            self.replaced[m.quantized] = numpy_helper.from_array(
                q.reshape(values.shape), m.quantized
            )
            self.choices.append(
                TensorChoice(m.source, "bias", outcome, q.size, saturated, g.scale, reason)
            )

    def floats(self, names: Iterable[str], new_inits: Mapping[str, TensorProto]) -> None:
        for name in names:
            proto = new_inits[name]
            if tuple(proto.dims) != tuple(self.old_inits[name].dims):
                self.shapes_changed = True
            self.replaced[name] = proto


def _bias_inputs(
    consumer: onnx.NodeProto | None, by_output: Mapping[str, _Group]
) -> tuple[_Group, _Group, float] | None:
    if consumer is None or len(consumer.input) < 3:
        return None
    x_group, w_group = by_output.get(consumer.input[0]), by_output.get(consumer.input[1])
    if x_group is None or w_group is None:
        return None
    beta = next((a.f for a in consumer.attribute if a.name == "beta"), 1.0)
    return x_group, w_group, beta


def _groups_by_dq_output(old: onnx.ModelProto, groups: Iterable[_Group]) -> dict[str, _Group]:
    """Each DequantizeLinear output → the parameter group it dequantizes with."""
    by_scale = {g.scale: g for g in groups}
    return {
        n.output[0]: by_scale[n.input[1]]
        for n in old.graph.node
        if n.op_type == "DequantizeLinear" and n.input[1] in by_scale
    }


def requantize_like(
    previous: Path,
    source: Path,
    out: Path,
    *,
    calibration: Mapping[str, NDArray[np.generic]] | None = None,
    max_saturation: float = DEFAULT_MAX_SATURATION,
    hysteresis: float = 0.0,
) -> RequantizeReport:
    """Quantize the float model ``source`` with the parameters of the QDQ artifact
    ``previous`` (its graph, its float nodes, its scales and zero points) into ``out``.

    ``max_saturation``: the share of a tensor's values allowed to clip with the old
    parameters before that tensor gets fresh ones. ``hysteresis``: extra steps (0 to 1)
    a reused weight may drift before its integer changes. ``calibration`` (input arrays by name,
    samples on axis 0) lets activations be checked the same way; without it they keep
    the previous parameters unchecked (the caller's accuracy check still applies).
    """
    if not 0 <= max_saturation < 1:
        raise CompressionError(f"max_saturation must be in [0, 1), got {max_saturation}")
    if not 0 <= hysteresis <= 1:
        raise CompressionError(f"hysteresis must be in [0, 1] (steps), got {hysteresis}")
    previous, source, out = Path(previous), Path(source), Path(out)
    old = load_previous(previous)
    new_source = quant_graph.load_model(source)
    if calibration is not None:
        check_calibration(new_source, calibration)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        work = Path(tmp)
        pre = prepare_for_quantization(source, work / "pre.onnx", "static")
        reference, match = _reference(old, source, pre)
        new = onnx.load(str(reference))
        old_inits = {t.name: t for t in old.graph.initializer}
        new_inits = {t.name: t for t in new.graph.initializer}
        stats = (
            None
            if calibration is None
            else _activation_stats(reference, match.groups, old_inits, calibration)
        )
        builder = _Builder(
            old_inits,
            {name: _array(t) for name, t in new_inits.items()},
            max_saturation,
            hysteresis,
            stats,
        )
        for g in match.groups:
            if g.role == "weight":
                builder.weights(g)
            elif g.role == "activation":
                builder.activations(g)
        by_output = _groups_by_dq_output(old, match.groups)
        for g in match.groups:
            if g.role == "bias":
                builder.bias(g, by_output)
        builder.floats(match.float_inits, new_inits)
        result = _assemble(old, new, builder.replaced, builder.shapes_changed)
        target = work / "requantized.onnx"
        onnx.save(result, str(target))
        quant_graph.verify_result(target, source, "the requantized model")
        canonical = (
            None if calibration is None else canonicalize(target, source, calibration, target)
        )
        size = target.stat().st_size
        quant_graph.publish(target, out)
    return RequantizeReport(
        out=out,
        bytes=size,
        previous_sha256=sha256_file(previous),
        choices=tuple(builder.choices),
        float_nodes=match.float_nodes,
        activations_checked=calibration is not None,
        canonical=None if canonical is None else dataclasses.replace(canonical, out=out),
    )


def _assemble(
    old: onnx.ModelProto,
    new: onnx.ModelProto,
    replaced: Mapping[str, TensorProto],
    shapes_changed: bool,
) -> onnx.ModelProto:
    """The artifact's model with its initializers replaced; untouched ones keep their bytes."""
    model = onnx.ModelProto()
    model.CopyFrom(old)
    for init in model.graph.initializer:
        if init.name in replaced:
            init.CopyFrom(replaced[init.name])
    if shapes_changed:  # shapes recorded for the old tensors no longer hold
        del model.graph.value_info[:]
        outputs = {o.name: o for o in new.graph.output}
        for value in model.graph.output:
            if value.name in outputs:
                value.CopyFrom(outputs[value.name])
    return model
