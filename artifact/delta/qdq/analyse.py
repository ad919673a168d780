"""Controller side: read onnxruntime's static QDQ model back as FP32 model + decisions.

`analyse` explains every node and initializer of onnxruntime's output in terms of the
FP32 model (a kept node, a Q/DQ pair on an FP32 value, a quantized FP32 initializer, a
node onnxruntime removed) and refuses (`NotCanonical`) anything it cannot explain; the
controller then ships onnxruntime's model unchanged. `canonical` builds the canonical
model with `build` (the code the agent runs), and `exact_decisions` is what the delta
encoder asks: the packed decisions that rebuild a given file byte for byte.

Differences from onnxruntime's file that are deliberately not reproduced (all
semantically neutral; the controller checks both in onnxruntime):
- Constant nodes stay Constant nodes (onnxruntime folded them into initializers and
  de-duplicated equal ones, so a consumer may read another Constant's copy);
- a Relu onnxruntime removed (QDQRemovableActivation) stays when its Q/DQ zero point is
  the type's minimum (then Q(Relu(x)) == Q(x)); otherwise it is a dropped node;
- attributes onnxruntime added with their default values (auto_pad=NOTSET, transA=0, …)
  are left out;
- no value_info; only the FP32 opset imports; scales and zero points as raw_data.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from artifact.delta.qdq.build import (
    ORT_INFER,
    ORT_PRE_PROCESS,
    ORT_PRODUCER,
    build,
    derived_names,
    param_dims,
)
from artifact.delta.qdq.decisions import FLOAT_INIT, Decisions, InitChoice, InitKind, pack

DEFAULT_ATTRS: dict[str, object] = {
    "auto_pad": b"NOTSET",
    "noop_with_empty_axes": 0,
    "transA": 0,
    "transB": 0,
    "alpha": 1.0,
    "beta": 1.0,
    "group": 1,
    "keepdims": 1,
}
REMOVABLE = {"Relu"}  # onnxruntime's QDQRemovableActivation (Clip needs its bounds checked)
QMIN = {3: -128, 2: 0}  # the zero point at which Relu is a no-op after quantization
_NO_DEFAULT = object()


class NotCanonical(ValueError):
    """onnxruntime's output has something the canonical form cannot express."""


@dataclass(frozen=True)
class Analysis:
    decisions: Decisions
    values: dict[str, bytes]  # every derived tensor's raw bytes, by name
    notes: tuple[str, ...]  # every difference from onnxruntime's file that was handled


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _raw(t: onnx.TensorProto) -> bytes:
    return bytes(numpy_helper.to_array(t).tobytes())


@dataclass
class _State:
    """What is known about onnxruntime's model while its parts are being explained."""

    int8: onnx.ModelProto
    fp32: onnx.ModelProto
    notes: list[str] = field(default_factory=list)
    accounted: set[str] = field(default_factory=set)  # int8 node names explained so far

    def __post_init__(self) -> None:
        g8, g32 = self.int8.graph, self.fp32.graph
        self.inits8 = {t.name: t for t in g8.initializer}
        self.inits32 = {t.name: t for t in g32.initializer}
        self.nodes8 = {n.name: n for n in g8.node}
        self.consumers8: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in g8.node:
            for name in n.input:
                self.consumers8[name].append(n)
        self.outputs = {o.name for o in g32.output}

    def tensor(self, name: str, what: str) -> onnx.TensorProto:
        t = self.inits8.get(name)
        if t is None:
            raise NotCanonical(f"{what} reads {name}, which is not an initializer")
        return t


def _check_fp32(fp32: onnx.ModelProto) -> None:
    """FP32 parts the canonical form does not carry must be absent."""
    g = fp32.graph
    if len(g.sparse_initializer) or len(g.quantization_annotation) or len(fp32.training_info):
        raise NotCanonical("the FP32 model has sparse initializers, annotations or training info")


def _activations(
    s: _State,
) -> tuple[dict[str, tuple[onnx.TensorProto, onnx.TensorProto]], dict[str, str]]:
    """Each Q/DQ pair on an FP32 value: value → (scale, zero point), and value → the value
    whose scale and zero point it uses when not its own."""
    qdq: dict[str, tuple[onnx.TensorProto, onnx.TensorProto]] = {}
    shared: dict[str, str] = {}
    for n in s.int8.graph.node:
        if n.op_type != "QuantizeLinear":
            continue
        src = n.input[0] if n.input else ""
        if src in s.inits8:
            raise NotCanonical(f"QuantizeLinear of an initializer ({src}): not supported")
        t = src.removesuffix("_QuantizeLinear_Input")
        if src != t and t not in s.outputs:
            raise NotCanonical(f"{src}: _QuantizeLinear_Input on a value that is no graph output")
        source = n.input[1].removesuffix("_scale") if len(n.input) == 3 else ""
        scale, zp = source + "_scale", source + "_zero_point"
        if list(n.input) != [src, scale, zp] or n.name != t + "_QuantizeLinear" or n.attribute:
            raise NotCanonical(f"QuantizeLinear {n.name} is not named as expected")
        if source != t:
            shared[t] = source
        q_out = t + "_QuantizeLinear_Output"
        dq = s.nodes8.get(t + "_DequantizeLinear")
        dq_out = t if t in s.outputs else t + "_DequantizeLinear_Output"
        if (
            list(n.output) != [q_out]
            or dq is None
            or list(dq.input) != [q_out, scale, zp]
            or list(dq.output) != [dq_out]
            or dq.attribute
            or s.consumers8[q_out] != [dq]
        ):
            raise NotCanonical(f"the Q/DQ pair of {t} is not the expected shape")
        qdq[t] = (s.tensor(scale, n.name), s.tensor(zp, n.name))
        s.accounted |= {n.name, dq.name}
    for t, source in shared.items():
        if source not in qdq or source in shared:
            raise NotCanonical(f"{t} uses the scale of {source}, which has no Q/DQ pair of its own")
    return qdq, shared


def _initializers(s: _State) -> dict[str, InitChoice]:
    """Each quantized FP32 initializer (a DequantizeLinear of ``W_quantized``): its choice."""
    choices: dict[str, InitChoice] = {}
    for n in s.int8.graph.node:
        if n.op_type != "DequantizeLinear" or n.name in s.accounted:
            continue
        q = n.input[0] if n.input else ""
        if q not in s.inits8 or not q.endswith("_quantized"):
            raise NotCanonical(f"DequantizeLinear {n.name} of {q}: not a quantized initializer")
        w = q.removesuffix("_quantized")
        w32 = s.inits32.get(w)
        if w32 is None:
            raise NotCanonical(f"{q} derives from {w}, which is not an FP32 initializer")
        attrs = _attrs(n)
        axis_attr = attrs.pop("axis", None)
        if attrs or not (axis_attr is None or isinstance(axis_attr, int)):
            raise NotCanonical(f"{n.name}: unexpected attributes {_attrs(n)}")
        axis = axis_attr
        kind = InitKind.BIAS if list(n.output) == [w] else InitKind.WEIGHT
        if kind is InitKind.WEIGHT and list(n.output) != [w + "_DequantizeLinear_Output"]:
            raise NotCanonical(f"{n.name}: unexpected output {list(n.output)}")
        names = derived_names(w, kind)
        if list(n.input) != list(names) or n.name != w + "_DequantizeLinear":
            raise NotCanonical(f"{n.name}: unexpected names {list(n.input)}")
        quantized = s.inits8[q]
        scale, zp = s.tensor(names[1], n.name), s.tensor(names[2], n.name)
        if axis is not None and not 0 <= axis < len(w32.dims):
            raise NotCanonical(f"{n.name}: axis {axis} out of range")
        want = param_dims(list(w32.dims), kind, axis)
        if list(quantized.dims) != list(w32.dims) or (list(scale.dims), list(zp.dims)) != want:
            raise NotCanonical(f"{w}: shapes differ from the canonical rule")
        if kind is InitKind.BIAS and quantized.data_type != onnx.TensorProto.INT32:
            raise NotCanonical(f"{q}: bias not int32")
        if w in s.inits8:
            raise NotCanonical(f"{w} is both kept float and quantized")
        if w32.data_type != onnx.TensorProto.FLOAT or not w32.HasField("raw_data"):
            raise NotCanonical(f"FP32 initializer {w} is not float raw_data")
        choices[w] = InitChoice(kind, axis, quantized.data_type)
        s.accounted.add(n.name)
    return choices


def _nodes(
    s: _State, qdq: dict[str, tuple[onnx.TensorProto, onnx.TensorProto]]
) -> tuple[list[int], dict[str, str], dict[str, np.ndarray]]:
    """Match FP32 nodes to onnxruntime's: (dropped indices, renames, Constant values)."""
    dropped: list[int] = []
    renamed: dict[str, str] = {}
    constants: dict[str, np.ndarray] = {}
    for index, node in enumerate(s.fp32.graph.node):
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        n8 = s.nodes8.get(node.name)
        if n8 is None:
            if node.op_type == "Constant":
                folded = node.output[0] in s.inits8
                s.notes.append(
                    f"Constant {node.name} kept as a node"
                    + ("" if folded else " (onnxruntime merged it into an equal one)")
                )
                continue
            if node.op_type not in REMOVABLE:
                raise NotCanonical(f"FP32 node {node.name} ({node.op_type}) is missing")
            out = node.output[0]
            renamed[node.input[0]] = out
            zp = qdq[out][1] if out in qdq else None
            if zp is not None and numpy_helper.to_array(zp).item() == QMIN.get(zp.data_type):
                s.notes.append(f"{node.op_type} {node.name} kept (zero point at the minimum)")
            else:
                dropped.append(index)
                s.notes.append(f"{node.op_type} {node.name} dropped")
            continue
        _check_kept(s, node, n8)
    return dropped, renamed, constants


def _check_kept(s: _State, node: onnx.NodeProto, n8: onnx.NodeProto) -> None:
    """onnxruntime's copy of an FP32 node: same op, same attributes (or added defaults)."""
    if n8.op_type != node.op_type or n8.domain != node.domain:
        raise NotCanonical(f"{node.name}: op changed {node.op_type} → {n8.op_type}")
    a32, a8 = _attrs(node), _attrs(n8)
    for key, value in a8.items():
        if key in a32:
            if a32[key] != value:
                raise NotCanonical(f"{node.name}: attribute {key} changed")
        elif DEFAULT_ATTRS.get(key, _NO_DEFAULT) != value:
            raise NotCanonical(f"{node.name}: onnxruntime added {key}={value!r}")
        else:
            s.notes.append(f"{node.name}: default attribute {key} left out")
    if set(a32) - set(a8):
        raise NotCanonical(f"{node.name}: onnxruntime removed attributes")
    if len(node.input) != len(n8.input) or len(node.output) != len(n8.output):
        raise NotCanonical(f"{node.name}: inputs or outputs added or removed")
    s.accounted.add(n8.name)


def _wiring(
    s: _State,
    qdq: dict[str, tuple[onnx.TensorProto, onnx.TensorProto]],
    choices: dict[str, InitChoice],
    renamed: dict[str, str],
    constants: dict[str, np.ndarray],
) -> list[tuple[int, int]]:
    """Check each kept node's outputs and inputs; the inputs reading the float tensor."""
    raw_reads: list[tuple[int, int]] = []
    for index, node in enumerate(s.fp32.graph.node):
        n8 = s.nodes8.get(node.name)
        if n8 is None:
            continue
        for o32, o8 in zip(node.output, n8.output, strict=True):
            name = renamed.get(o32, o32)
            if name in qdq and name in s.outputs:
                name += "_QuantizeLinear_Input"
            if name != o8:
                raise NotCanonical(f"{node.name}: output {o8}, expected {name}")
        for slot, (i32, i8) in enumerate(zip(node.input, n8.input, strict=True)):
            name = renamed.get(i32, i32)
            expected = name
            if name in choices and choices[name].kind is InitKind.WEIGHT:
                expected = name + "_DequantizeLinear_Output"
            elif name in qdq and name not in s.outputs:
                if i8 == name:
                    raw_reads.append((index, slot))
                else:
                    expected = name + "_DequantizeLinear_Output"
            if i8 == expected:
                continue
            copy = s.inits8.get(i8)
            if (
                name in constants
                and copy is not None
                and np.array_equal(constants[name], numpy_helper.to_array(copy))
            ):
                s.notes.append(f"{node.name} reads {i8}, an equal copy of {name}")
                continue
            raise NotCanonical(f"{node.name} input {slot}: {i8}, expected {expected}")
    return raw_reads


def _ort_metadata(s: _State) -> tuple[bool, bool]:
    """Whether onnxruntime stamped its producer and "onnx.infer" key, and its pre-processing
    key (the FP32 model's metadata being otherwise unchanged)."""
    ort_meta = (s.int8.producer_name, s.int8.producer_version) == ORT_PRODUCER
    meta8 = {e.key: e.value for e in s.int8.metadata_props}
    meta32 = {e.key: e.value for e in s.fp32.metadata_props}
    pre_processed = ORT_PRE_PROCESS[0] not in meta32 and ORT_PRE_PROCESS in meta8.items()
    expected = meta32 | dict([ORT_INFER] if ort_meta else [])
    expected |= dict([ORT_PRE_PROCESS] if pre_processed else [])
    if meta8 != expected:
        raise NotCanonical(f"metadata {meta8} is not FP32's plus onnxruntime's")
    if list(meta8) != sorted(meta8):
        s.notes.append("metadata order: sorted by key")
    return ort_meta, pre_processed


def analyse(int8: onnx.ModelProto, fp32: onnx.ModelProto) -> Analysis:
    """The decisions and tensor values that make ``int8`` canonical, or NotCanonical."""
    _check_fp32(fp32)
    s = _State(int8, fp32)
    g8, g32 = int8.graph, fp32.graph
    if [o.SerializeToString() for o in g8.output] != [o.SerializeToString() for o in g32.output]:
        s.notes.append("graph outputs' ValueInfo differ: FP32's kept")
    if [i.SerializeToString() for i in g8.input] != [i.SerializeToString() for i in g32.input]:
        s.notes.append("graph inputs' ValueInfo differ: FP32's kept")
    qdq, shared = _activations(s)
    act_types = {zp.data_type for _, zp in qdq.values()}
    if len(act_types) > 1:
        raise NotCanonical(f"mixed activation types {act_types}")
    activation_type = act_types.pop() if act_types else onnx.TensorProto.INT8
    choices = _initializers(s)
    dropped, renamed, constants = _nodes(s, qdq)
    raw_reads = _wiring(s, qdq, choices, renamed, constants)
    missing = [n.name for n in g8.node if n.name not in s.accounted]
    if missing:
        raise NotCanonical(f"onnxruntime nodes not explained: {missing}")
    for name, init in s.inits32.items():
        if name not in choices and (name not in s.inits8 or _raw(s.inits8[name]) != _raw(init)):
            raise NotCanonical(f"FP32 initializer {name} changed or vanished")
    names = [i.name for i in g32.input if i.name not in s.inits32]
    names += [o for n in g32.node for o in n.output if o]
    unknown = set(qdq) - set(names)
    if unknown:
        raise NotCanonical(f"Q/DQ on values the FP32 model does not have: {sorted(unknown)}")
    values: dict[str, bytes] = {}
    for value, (scale, zp) in qdq.items():
        if value not in shared:
            values[value + "_scale"], values[value + "_zero_point"] = _raw(scale), _raw(zp)
    for w, choice in choices.items():
        for name in derived_names(w, choice.kind):
            values[name] = _raw(s.inits8[name])
    ort_meta, pre_processed = _ort_metadata(s)
    used = {n.domain for n in g32.node}
    extra = [o.domain for o in int8.opset_import if o.domain not in used]
    if extra:
        s.notes.append(f"opset imports nothing uses dropped: {extra}")
    if len(g8.value_info):
        s.notes.append(f"{len(g8.value_info)} value_info entries dropped")
    decisions = Decisions(
        ort_meta,
        activation_type,
        tuple(n in qdq for n in names),
        tuple(choices.get(t.name, FLOAT_INIT) for t in g32.initializer),
        tuple(dropped),
        tuple(raw_reads),
        tuple((names.index(value), names.index(source)) for value, source in shared.items()),
        pre_processed,
    )
    return Analysis(decisions, values, tuple(s.notes))


def canonical(int8: onnx.ModelProto, fp32: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's QDQ model rewritten into the form `build` predicts."""
    a = analyse(int8, fp32)
    return onnx.load_from_string(build(fp32.SerializeToString(), a.decisions, a.values))


def exact_decisions(fp32: bytes, int8: bytes) -> bytes:
    """The packed decisions that rebuild ``int8`` from ``fp32`` byte for byte.

    What the delta encoder asks of a (base, target) pair: NotCanonical unless ``int8``
    is exactly the canonical file (a file in onnxruntime's own form is explained by
    `analyse` but not rebuilt, so it is refused here).
    """
    a = analyse(onnx.load_from_string(int8), onnx.load_from_string(fp32))
    if build(fp32, a.decisions, a.values) != int8:
        raise NotCanonical("the file is not in canonical form (it does not rebuild exactly)")
    return pack(a.decisions)
