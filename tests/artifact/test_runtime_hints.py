"""Session settings an artifact carries in its ONNX metadata, read without onnx."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx.helper
import pytest

from artifact import runtime_hints
from artifact.delta.onnx_wire import model_metadata
from artifact.runtime_hints import METADATA_KEY, InvalidHintError


def model(**props: str) -> bytes:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    m = onnx.helper.make_model(graph)
    onnx.helper.set_model_props(m, props)
    return m.SerializeToString()


def test_metadata_is_read_from_the_wire_as_onnx_writes_it() -> None:
    data = model(workload="plaid", **{METADATA_KEY: "{}"}, note="é ✓")
    assert model_metadata(data) == {"workload": "plaid", METADATA_KEY: "{}", "note": "é ✓"}
    assert model_metadata(b"not a model") == {}


def test_an_allowed_setting_is_applied_from_bytes_and_files(tmp_path: Path) -> None:
    value = runtime_hints.encode(runtime_hints.FOLD_WEIGHT_DEQUANTIZE)
    data = model(**{METADATA_KEY: value})
    assert runtime_hints.session_config(data) == {"session.disable_quant_qdq": "1"}
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    assert runtime_hints.session_config_of_file(path) == {"session.disable_quant_qdq": "1"}
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert runtime_hints.session_config_of_file(empty) == {}
    assert runtime_hints.session_config(model()) == {}  # no hint: nothing to apply


@pytest.mark.parametrize(
    "raw",
    [
        '{"session.intra_op.allow_spinning": "1"}',  # a real setting, but not ours to set
        '{"session.disable_quant_qdq": "2"}',  # an allowed key with a value it never takes
        '{"session.disable_quant_qdq": 1}',  # not a string
        '["session.disable_quant_qdq"]',  # not an object
        "{not json",
    ],
)
def test_settings_outside_the_allow_list_are_ignored(raw: str) -> None:
    assert runtime_hints.session_config(model(**{METADATA_KEY: raw})) == {}


def test_encoding_refuses_what_the_reader_would_ignore() -> None:
    with pytest.raises(InvalidHintError, match=r"session\.disable_quant_qdq in"):
        runtime_hints.encode({"session.intra_op.allow_spinning": "1"})
