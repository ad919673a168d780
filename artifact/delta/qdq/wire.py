"""Protobuf bytes from a list of fields: how the canonical QDQ builder writes its model.

Building the model as protobuf messages costs the edge agent a Python call per field
(about a millisecond for a small CNN, most of decoding its FP32 → int8 update); the
builder lists its fields as plain tuples instead and `write` turns them into bytes in
one call to the compiled `_wire` (built with the package) or, without it, in
`write_python`, the reference. A field is ``(kind, tag, value)``, ``tag`` the field's
key (number << 3 | wire type):

- ``(BYTES, tag, str | bytes)``: a length-delimited string (UTF-8) or bytes
- ``(VARINT, tag, int)``: a varint (a negative int64 as its two's complement)
- ``(MESSAGE, tag, [fields])``: a nested message
- ``(ZEROS, tag, n)``: ``n`` zero bytes, length-delimited (a payload the delta fills)
- ``(STRINGS, tag, [str])``: a repeated string, one field each
- ``(NODE_TAIL, 0, bytes)``: a serialized NodeProto's fields after its inputs and
  outputs (its leading fields 1 and 2), as they are

Fields are written in the order given; the builder gives them in field-number order,
as upb serializes, so the bytes are the ones serializing the messages would give.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType

BYTES, VARINT, MESSAGE, ZEROS, STRINGS, NODE_TAIL = range(6)
ENV = "HOMEFLEET_DELTA_DECODER"  # "python": the Python writer (as for the delta decoder)
MAX_DEPTH = 8  # a model is 3 deep (model, graph, node, attribute)
_NODE_INPUT, _NODE_OUTPUT = 0x0A, 0x12

Field = tuple[int, int, str | bytes | int | list["Field"] | Sequence[str]]


def _load() -> ModuleType | None:
    try:
        from artifact.delta.qdq import _wire  # type: ignore[attr-defined]
    except ImportError:
        return None
    module: ModuleType = _wire
    return module


_MODULE = _load()


def available() -> bool:
    """Whether the compiled writer was built for this interpreter."""
    return _MODULE is not None


def write(fields: list[Field]) -> bytes:
    """The bytes of ``fields``, by the compiled writer when there is one."""
    if _MODULE is not None and os.environ.get(ENV) != "python":
        written: bytes = _MODULE.write(fields)
        return written
    return write_python(fields)


def _varint(value: int, out: bytearray) -> None:
    value &= 0xFFFF_FFFF_FFFF_FFFF
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos
    return -1, pos  # cut short


def node_tail(node: bytes) -> bytes:
    """A serialized NodeProto without its leading inputs and outputs."""
    pos = 0
    while pos < len(node):
        key, after_key = _read_varint(node, pos)
        if key not in (_NODE_INPUT, _NODE_OUTPUT) or after_key >= len(node):
            break
        size, start = _read_varint(node, after_key)
        if size < 0 or size > len(node) - start:
            raise ValueError("a node's serialized inputs or outputs are cut short")
        pos = start + size
    return node[pos:]


def _delimited(tag: int, data: bytes, out: bytearray) -> None:
    _varint(tag, out)
    _varint(len(data), out)
    out += data


def _write(fields: list[Field], out: bytearray, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("messages nested too deep")
    if not isinstance(fields, list):
        raise TypeError("a message's fields must be a list")
    for kind, tag, value in fields:
        if kind == BYTES and isinstance(value, str | bytes):
            _delimited(tag, value.encode() if isinstance(value, str) else value, out)
        elif kind == VARINT and isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise OverflowError("a varint field's value does not fit int64")
            _varint(tag, out)
            _varint(value, out)
        elif kind == MESSAGE and isinstance(value, list):
            inner = bytearray()
            _write(value, inner, depth + 1)
            _delimited(tag, bytes(inner), out)
        elif kind == ZEROS and isinstance(value, int) and value >= 0:
            _delimited(tag, bytes(value), out)
        elif kind == STRINGS and isinstance(value, list | tuple):
            for text in value:
                if not isinstance(text, str | bytes):
                    raise TypeError(f"field ({kind}, {tag}): a repeated string holds {text!r}")
                _delimited(tag, text.encode() if isinstance(text, str) else text, out)
        elif kind == NODE_TAIL and isinstance(value, bytes):
            out += node_tail(value)
        else:
            raise TypeError(f"field ({kind}, {tag}): a value of the wrong type, or no such kind")


def write_python(fields: list[Field]) -> bytes:
    """`write` in Python: the reference the compiled writer is tested against."""
    out = bytearray()
    _write(fields, out)
    return bytes(out)
