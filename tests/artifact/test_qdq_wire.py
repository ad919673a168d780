"""The QDQ builder's field writer: the compiled one and the Python reference agree, and
both write what protobuf itself serializes (so a built model round-trips unchanged)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from artifact.delta.qdq import hf_onnx_pb2 as pb
from artifact.delta.qdq import wire
from artifact.delta.qdq.wire import BYTES, MESSAGE, NODE_TAIL, STRINGS, VARINT, ZEROS, Field

NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=140)
INT64 = st.integers(-(2**63), 2**63 - 1)


def test_the_compiled_writer_is_built() -> None:
    assert wire.available(), (
        "artifact/delta/qdq/_wire.c was not compiled: `make setup` builds it (pip install -e . "
        "needs gcc and the Python headers); without it the agent rebuilds QDQ graphs in Python"
    )


def _both(fields: list[Field]) -> bytes:
    compiled = wire.write(fields)
    assert wire.write_python(fields) == compiled
    return compiled


@settings(max_examples=200, deadline=None)
@given(
    st.lists(NAMES, max_size=5),
    st.lists(NAMES, max_size=3),
    NAMES,
    NAMES,
    st.none() | INT64,
)
def test_a_node_is_written_as_protobuf_serializes_it(
    inputs: list[str], outputs: list[str], name: str, op: str, axis: int | None
) -> None:
    node = pb.NodeProto(input=inputs, output=outputs, name=name, op_type=op)
    fields: list[Field] = [
        (STRINGS, 0x0A, inputs),
        (STRINGS, 0x12, outputs),
        (BYTES, 0x1A, name),
        (BYTES, 0x22, op),
    ]
    if axis is not None:
        node.attribute.add(name="axis", i=axis, type=pb.AttributeProto.INT)
        attribute: list[Field] = [(BYTES, 0x0A, "axis"), (VARINT, 0x18, axis), (VARINT, 0xA0, 2)]
        fields.append((MESSAGE, 0x2A, attribute))
    assert _both(fields) == node.SerializeToString()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(INT64, max_size=4),
    st.integers(0, 16),
    NAMES,
    st.binary(max_size=300),
    st.booleans(),
)
def test_a_tensor_is_written_as_protobuf_serializes_it(
    dims: list[int], dtype: int, name: str, raw: bytes, zero_filled: bool
) -> None:
    tensor = pb.TensorProto(dims=dims, data_type=dtype, name=name)
    tensor.raw_data = bytes(len(raw)) if zero_filled else raw
    payload: Field = (ZEROS, 0x4A, len(raw)) if zero_filled else (BYTES, 0x4A, raw)
    fields: list[Field] = [(VARINT, 0x08, d) for d in dims]
    fields += [(VARINT, 0x10, dtype), (BYTES, 0x42, name), payload]
    graph = pb.GraphProto()
    graph.initializer.append(tensor)
    assert _both([(MESSAGE, 0x2A, fields)]) == graph.SerializeToString()


@settings(max_examples=100, deadline=None)
@given(st.lists(NAMES, max_size=4), st.lists(NAMES, max_size=3), st.lists(NAMES, max_size=3))
def test_a_rewired_node_keeps_its_attributes_and_unknown_fields(
    inputs: list[str], outputs: list[str], new_inputs: list[str]
) -> None:
    node = pb.NodeProto(input=inputs, output=outputs, name="n", op_type="Conv", domain="d")
    node.attribute.add(name="strides", ints=[2, 2], type=pb.AttributeProto.INTS)
    unknown = b"\x9a\x06\x03xyz"  # field 99: protobuf keeps it, and writes it last
    node.ParseFromString(unknown + node.SerializeToString())
    rewired = pb.NodeProto()
    rewired.CopyFrom(node)
    del rewired.input[:]
    rewired.input.extend(new_inputs)
    fields: list[Field] = [
        (STRINGS, 0x0A, new_inputs),
        (STRINGS, 0x12, outputs),
        (NODE_TAIL, 0, node.SerializeToString()),
    ]
    assert _both(fields) == rewired.SerializeToString()
    assert _both(fields).endswith(unknown)


@pytest.mark.parametrize(
    "fields",
    [
        [(9, 0x0A, b"")],  # no such kind
        [(MESSAGE, 0x0A, "not a list")],
        [(VARINT, 0x08, "1")],
        [(VARINT, 0x08, 2**64)],
        [(ZEROS, 0x4A, -1)],
        [(BYTES, 0x0A, 3)],
        [(STRINGS, 0x0A, [b"ok", 3])],
        [(NODE_TAIL, 0, b"\x0a\x05ab")],  # an input cut short
        [(BYTES, 0x0A)],  # not a triple
    ],
)
def test_a_bad_field_list_is_refused_by_both_writers(fields: list[Field]) -> None:
    for writer in (wire.write, wire.write_python):
        with pytest.raises((TypeError, ValueError, OverflowError)):
            writer(fields)


def test_nesting_is_bounded() -> None:
    fields: list[Field] = []
    for _ in range(wire.MAX_DEPTH + 2):
        fields = [(MESSAGE, 0x0A, fields)]
    for writer in (wire.write, wire.write_python):
        with pytest.raises(ValueError, match="nested too deep"):
            writer(fields)
