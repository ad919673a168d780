"""Build the canonical QDQ model from the FP32 model and the decisions (no onnx import).

One function for both sides: the controller calls `build` with the real tensor values
to make the artifact it ships; the edge agent calls `predict` (``values=None``: every
payload zero-filled) to get a file that matches the shipped one byte for byte
everywhere except inside tensor payloads. Uses protobuf and a vendored compiled copy
of onnx.proto (package ``hfonnx``, so it never collides with onnx's own descriptors)
to read the FP32 model, and writes the new one as a list of fields (`wire`: one C
call, where building protobuf messages cost the agent a Python call per field).

Canonical form (what `build` writes):
- model: FP32's ir_version, domain, model_version, doc_string, opset imports, graph
  name/doc/inputs/outputs; onnxruntime's producer and "onnx.infer" metadata key when
  ``ort_metadata``, its "onnx.quant.pre_process" key when ``pre_processed``; metadata
  sorted by key; no value_info.
- nodes: FP32 order, FP32 attributes, dropped nodes removed (their input renamed to
  their output); each quantized initializer's DequantizeLinear right before its first
  consumer; each Q/DQ'd value's QuantizeLinear + DequantizeLinear right after its
  producer (graph inputs first), reading the value's own scale and zero point or, when
  it shares them, its source's. Names as onnxruntime writes them.
- initializers: FP32 order, each quantized one replaced by its three derived tensors,
  then every activation's own (scale, zero point) in value order. Every tensor raw_data.

The decisions may come off the wire: whatever they say, `build` raises ValueError or
returns a model no larger than a few times the FP32 one (quantized initializers must
be float raw_data, so their derived tensors are bounded by the bytes already held).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from google.protobuf.message import DecodeError

from artifact.delta.qdq import hf_onnx_pb2 as pb
from artifact.delta.qdq.decisions import Decisions, InitKind, unpack
from artifact.delta.qdq.wire import BYTES, MESSAGE, NODE_TAIL, STRINGS, VARINT, ZEROS, Field, write

FLOAT, INT32 = 1, 6
# TensorProto data type → bytes an element (the fixed-width types a QDQ model uses)
WIDTH = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
ORT_PRODUCER = ("onnx.quantize", "0.1.0")
ORT_INFER = ("onnx.infer", "onnxruntime.quant")
ORT_PRE_PROCESS = ("onnx.quant.pre_process", "onnxruntime.quant")
ORT_METADATA = (ORT_INFER, ORT_PRE_PROCESS)
_WEIGHT_SUFFIXES = ("_quantized", "_scale", "_zero_point")
_BIAS_SUFFIXES = ("_quantized", "_quantized_scale", "_quantized_zero_point")


def derived_names(name: str, kind: InitKind) -> tuple[str, str, str]:
    """The (quantized, scale, zero point) initializers onnxruntime derives from ``name``."""
    suffixes = _WEIGHT_SUFFIXES if kind is InitKind.WEIGHT else _BIAS_SUFFIXES
    q, scale, zp = (name + s for s in suffixes)
    return q, scale, zp


def param_dims(dims: list[int], kind: InitKind, axis: int | None) -> tuple[list[int], list[int]]:
    """The shapes of a quantized initializer's scale and zero point, as onnxruntime makes
    them: one per channel along ``axis``; scalars per tensor, except a bias's scale ([1])."""
    if axis is not None:
        return [dims[axis]], [dims[axis]]
    return ([1] if kind is InitKind.BIAS else []), []


def value_names(model: pb.ModelProto) -> list[str]:
    """The FP32 values the qdq bitmap indexes: graph inputs (not initializers), node outputs."""
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    names += [o for n in model.graph.node for o in n.output if o]
    return names


def _count(dims: list[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _width(dtype: int) -> int:
    width = WIDTH.get(dtype)
    if width is None:
        raise ValueError(f"data type {dtype} is not a fixed-width tensor type")
    return width


# Field keys (number << 3 | wire type) of the messages the builder lists.
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP, _NODE_ATTRIBUTE = 0x0A, 0x12, 0x1A, 0x22, 0x2A
_ATTR_NAME, _ATTR_I, _ATTR_TYPE = 0x0A, 0x18, 0xA0
_TENSOR_DIM, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_RAW = 0x08, 0x10, 0x42, 0x4A
_GRAPH_NODE, _GRAPH_NAME, _GRAPH_INIT = 0x0A, 0x12, 0x2A
_GRAPH_DOC, _GRAPH_INPUT, _GRAPH_OUTPUT = 0x52, 0x5A, 0x62
_MODEL_IR, _MODEL_PRODUCER, _MODEL_PRODUCER_VERSION = 0x08, 0x12, 0x1A
_MODEL_DOMAIN, _MODEL_VERSION, _MODEL_DOC, _MODEL_GRAPH = 0x22, 0x28, 0x32, 0x3A
_MODEL_OPSET, _MODEL_METADATA, _MODEL_FUNCTION = 0x42, 0x72, 0xCA
_ENTRY_KEY, _ENTRY_VALUE = 0x0A, 0x12
_AXIS_NAME = (BYTES, _ATTR_NAME, "axis")
_INT_TYPE = (VARINT, _ATTR_TYPE, pb.AttributeProto.INT)


class _Builder:
    """Lists the canonical model's fields for `wire.write`, in the order upb serializes
    them (field number order); messages it copies (FP32 nodes, float initializers,
    graph inputs) are serialized by upb itself. Tests check every built model
    round-trips through protobuf unchanged."""

    def __init__(
        self,
        fp32: pb.ModelProto,
        d: Decisions,
        values: Mapping[str, bytes] | None,
        names: list[str] | None = None,
    ) -> None:
        self.fp32 = fp32
        self.d = d
        self.values = values
        g = fp32.graph
        self.names = value_names(fp32) if names is None else names
        if len(d.qdq) != len(self.names) or len(d.inits) != len(g.initializer):
            raise ValueError("the decisions do not fit this FP32 model")
        self.qdq = {n for n, q in zip(self.names, d.qdq, strict=True) if q}
        self.shared = self._shared()
        self.outputs = {o.name for o in g.output}
        self.choices = {t.name: c for t, c in zip(g.initializer, d.inits, strict=True)}
        self.raw_reads = set(d.raw_reads)
        self.dropped = set(d.dropped)
        self.rename: dict[str, str] = {}
        for index in sorted(self.dropped):
            if index >= len(g.node):
                raise ValueError(f"dropped node {index} is not in the FP32 model")
            node = g.node[index]
            if len(node.input) != 1 or len(node.output) != 1:
                raise ValueError(f"dropped node {node.name} must have one input and one output")
            self.rename[node.input[0]] = node.output[0]

    def _shared(self) -> dict[str, str]:
        """Q/DQ'd value → the Q/DQ'd value whose (own) scale and zero point it uses."""
        shared: dict[str, str] = {}
        for value_index, source_index in self.d.shared:
            if max(value_index, source_index) >= len(self.names):
                raise ValueError(f"shared scale {value_index} → {source_index}: no such value")
            shared[self.names[value_index]] = self.names[source_index]
        for value, source in shared.items():
            if value == source or value not in self.qdq or source not in self.qdq:
                raise ValueError(f"{value} shares the scale of {source}: both need Q/DQ pairs")
            if source in shared:
                raise ValueError(f"{value} shares the scale of {source}, which shares another's")
        return shared

    # ---------------------------------------------------------------- tensors
    # Each method appends GraphProto.initializer fields to ``into``.

    def _tensor(self, into: list[Field], name: str, dtype: int, dims: list[int]) -> None:
        nbytes = _count(dims) * _width(dtype)
        raw: Field
        if self.values is None:
            raw = (ZEROS, _TENSOR_RAW, nbytes)
        else:
            given = self.values.get(name)
            if given is None or len(given) != nbytes:
                got = "nothing" if given is None else f"{len(given)} bytes"
                raise ValueError(f"tensor {name}: {got} given, {nbytes} bytes expected")
            raw = (BYTES, _TENSOR_RAW, given)
        fields: list[Field] = [(VARINT, _TENSOR_DIM, d) for d in dims] if dims else []
        fields += ((VARINT, _TENSOR_TYPE, dtype), (BYTES, _TENSOR_NAME, name), raw)
        into.append((MESSAGE, _GRAPH_INIT, fields))

    def _derived(self, into: list[Field], w: pb.TensorProto) -> None:
        choice = self.choices[w.name]
        dims = list(w.dims)
        if w.data_type != FLOAT or len(w.raw_data) != _count(dims) * 4:
            raise ValueError(f"quantized initializer {w.name} is not float raw_data")
        if choice.axis is not None and not 0 <= choice.axis < len(dims):
            raise ValueError(f"axis {choice.axis} of {w.name} is out of range")
        scale_dims, zp_dims = param_dims(dims, choice.kind, choice.axis)
        q, scale, zp = derived_names(w.name, choice.kind)
        dtype = choice.dtype if choice.kind is InitKind.WEIGHT else INT32
        self._tensor(into, q, dtype, dims)
        self._tensor(into, scale, FLOAT, scale_dims)
        self._tensor(into, zp, dtype, zp_dims)

    def initializers(self, into: list[Field]) -> None:
        for w in self.fp32.graph.initializer:
            if self.choices[w.name].kind is InitKind.FLOAT:
                into.append((BYTES, _GRAPH_INIT, w.SerializeToString()))
            else:
                self._derived(into, w)
        for name in self.names:
            if name in self.qdq and name not in self.shared:
                self._tensor(into, name + "_scale", FLOAT, [])
                self._tensor(into, name + "_zero_point", self.d.activation_type, [])

    # ---------------------------------------------------------------- nodes
    # Each method appends GraphProto.node fields to ``into``.

    @staticmethod
    def _node(
        into: list[Field],
        op: str,
        inputs: list[str],
        output: str,
        name: str,
        axis: int | None = None,
    ) -> None:
        fields: list[Field] = [
            (STRINGS, _NODE_INPUT, inputs),
            (BYTES, _NODE_OUTPUT, output),
            (BYTES, _NODE_NAME, name),
            (BYTES, _NODE_OP, op),
        ]
        if axis is not None:
            attribute: list[Field] = [_AXIS_NAME, (VARINT, _ATTR_I, axis), _INT_TYPE]
            fields.append((MESSAGE, _NODE_ATTRIBUTE, attribute))
        into.append((MESSAGE, _GRAPH_NODE, fields))

    def _qdq(self, into: list[Field], t: str) -> None:
        graph_out = t in self.outputs
        q_in = t + "_QuantizeLinear_Input" if graph_out else t
        q_out = t + "_QuantizeLinear_Output"
        dq_out = t if graph_out else t + "_DequantizeLinear_Output"
        source = self.shared.get(t, t)
        scale, zp = source + "_scale", source + "_zero_point"
        self._node(into, "QuantizeLinear", [q_in, scale, zp], q_out, t + "_QuantizeLinear")
        self._node(into, "DequantizeLinear", [q_out, scale, zp], dq_out, t + "_DequantizeLinear")

    def _weight_dq(self, into: list[Field], w: str) -> None:
        choice = self.choices[w]
        out = w + "_DequantizeLinear_Output" if choice.kind is InitKind.WEIGHT else w
        inputs = list(derived_names(w, choice.kind))
        self._node(into, "DequantizeLinear", inputs, out, w + "_DequantizeLinear", choice.axis)

    def _kept(self, into: list[Field], index: int, node: pb.NodeProto, emitted: set[str]) -> None:
        """An FP32 node rewired to the dequantized tensors, with the Q/DQ nodes around it:
        its weights' DequantizeLinear nodes first (not yet emitted), then the node, then a
        QuantizeLinear + DequantizeLinear pair for each of its outputs that has one."""
        inputs: list[str] = []
        for slot, original in enumerate(node.input):
            name = self.rename.get(original, original)
            choice = self.choices.get(name)
            if choice is not None and choice.kind is not InitKind.FLOAT:
                if name not in emitted:
                    emitted.add(name)
                    self._weight_dq(into, name)
                if choice.kind is InitKind.WEIGHT:
                    name += "_DequantizeLinear_Output"
            elif name in self.qdq and (index, slot) not in self.raw_reads:
                name = name if name in self.outputs else name + "_DequantizeLinear_Output"
            inputs.append(name)
        outputs: list[str] = []
        produced = []
        for original in node.output:
            name = self.rename.get(original, original)
            if name in self.qdq:
                produced.append(name)
                if name in self.outputs:
                    name += "_QuantizeLinear_Input"
            outputs.append(name)
        # inputs and outputs are a NodeProto's first fields (upb writes unknown ones last)
        rewired: list[Field] = [
            (STRINGS, _NODE_INPUT, inputs),
            (STRINGS, _NODE_OUTPUT, outputs),
            (NODE_TAIL, 0, node.SerializeToString()),
        ]
        into.append((MESSAGE, _GRAPH_NODE, rewired))
        for name in produced:
            self._qdq(into, name)

    def nodes(self, into: list[Field]) -> None:
        inits = {t.name for t in self.fp32.graph.initializer}
        for i in self.fp32.graph.input:
            if i.name not in inits and i.name in self.qdq:
                self._qdq(into, i.name)
        emitted: set[str] = set()
        for index, node in enumerate(self.fp32.graph.node):
            if index not in self.dropped:
                self._kept(into, index, node, emitted)

    def graph(self) -> list[Field]:
        """The GraphProto: nodes, name, initializers, doc string, inputs, outputs."""
        src = self.fp32.graph
        fields: list[Field] = []
        self.nodes(fields)
        fields.append((BYTES, _GRAPH_NAME, src.name))
        self.initializers(fields)
        if src.HasField("doc_string"):
            fields.append((BYTES, _GRAPH_DOC, src.doc_string))
        fields += ((BYTES, _GRAPH_INPUT, i.SerializeToString()) for i in src.input)
        fields += ((BYTES, _GRAPH_OUTPUT, o.SerializeToString()) for o in src.output)
        return fields

    def model(self) -> bytes:
        src = self.fp32
        producer = (
            ORT_PRODUCER if self.d.ort_metadata else (src.producer_name, src.producer_version)
        )
        fields: list[Field] = [
            (VARINT, _MODEL_IR, src.ir_version),
            (BYTES, _MODEL_PRODUCER, producer[0]),
            (BYTES, _MODEL_PRODUCER_VERSION, producer[1]),
        ]
        if src.HasField("domain"):
            fields.append((BYTES, _MODEL_DOMAIN, src.domain))
        if src.HasField("model_version"):
            fields.append((VARINT, _MODEL_VERSION, src.model_version))
        if src.HasField("doc_string"):
            fields.append((BYTES, _MODEL_DOC, src.doc_string))
        fields.append((MESSAGE, _MODEL_GRAPH, self.graph()))
        fields += ((BYTES, _MODEL_OPSET, o.SerializeToString()) for o in src.opset_import)
        meta = {e.key: e.value for e in src.metadata_props}
        if self.d.ort_metadata:
            meta.update([ORT_INFER])
        if self.d.pre_processed:
            meta.update([ORT_PRE_PROCESS])
        for key in sorted(meta):
            entry: list[Field] = [(BYTES, _ENTRY_KEY, key), (BYTES, _ENTRY_VALUE, meta[key])]
            fields.append((MESSAGE, _MODEL_METADATA, entry))
        fields += ((BYTES, _MODEL_FUNCTION, f.SerializeToString()) for f in src.functions)
        return write(fields)


def parse(fp32: bytes | memoryview) -> pb.ModelProto:
    """The FP32 model as the vendored ModelProto, or ValueError."""
    model = pb.ModelProto()
    try:
        model.ParseFromString(cast(bytes, fp32))  # upb parses any buffer: no copy of a mapping
    except DecodeError as exc:
        raise ValueError(f"not an ONNX model: {exc}") from exc
    return model


def build(fp32: bytes, d: Decisions, values: Mapping[str, bytes] | None = None) -> bytes:
    """The canonical model's bytes (``values=None``: every derived tensor zero-filled)."""
    return _Builder(parse(fp32), d, values).model()


def predict(fp32: bytes | memoryview, packed: bytes) -> bytes:
    """The canonical model with zero payloads, from the FP32 model and packed decisions.

    What the edge agent runs: ValueError when ``packed`` does not fit ``fp32``.
    """
    model = parse(fp32)
    names = value_names(model)
    d = unpack(packed, len(names), len(model.graph.initializer))
    return _Builder(model, d, None, names).model()


def counts(fp32: bytes) -> tuple[int, int]:
    """(values, initializers) of the FP32 model: what `decisions.unpack` needs."""
    model = parse(fp32)
    return len(value_names(model)), len(model.graph.initializer)
