"""The hand-written ONNX wire walker agrees with onnx itself on every initializer."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from artifact.delta.onnx_wire import find_tensors
from artifact.delta.words import bytes_to_words, words_to_values
from tests.artifact.delta_models import DTYPES, Init, build, random_array


def test_every_initializer_is_found_with_its_name_type_shape_and_exact_values() -> None:
    rng = np.random.default_rng(1)
    inits = [
        Init(f"w{k}.{np.dtype(dtype).name}.{raw}", random_array(rng, dtype, shape), raw)
        for k, (dtype, shape) in enumerate((d, s) for d in DTYPES for s in ((5,), (2, 3, 4), ()))
        for raw in (True, False)
    ]
    data = build(inits)
    model = onnx.load_from_string(data)
    expected = {t.name: t for t in model.graph.initializer}
    spans = find_tensors(data)
    assert sorted(s.name for s in spans) == sorted(expected)
    for span in spans:
        proto = expected[span.name]
        assert span.dims == tuple(proto.dims)
        assert span.etype.code == proto.data_type
        payload = memoryview(data)[span.offset : span.end]
        values = words_to_values(
            bytes_to_words(payload, span.etype, span.storage), span.etype, span.storage
        )
        reference = numpy_helper.to_array(proto).reshape(-1)
        assert values.dtype == reference.dtype, span.name
        np.testing.assert_array_equal(values, reference, err_msg=span.name)


def test_bytes_that_are_not_a_model_have_no_tensors() -> None:
    assert find_tensors(b"") == []
    assert find_tensors(b"\xff" * 100) == []
    data = build([Init("w", np.arange(64, dtype=np.float32))])
    assert len(find_tensors(data)) == 1
    assert find_tensors(data[: len(data) // 2]) == []  # truncated inside the graph
