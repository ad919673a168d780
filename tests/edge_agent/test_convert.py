"""Wire tensors <-> numpy, and ORT type strings <-> numpy dtypes."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.convert import (
    SUPPORTED_DTYPES,
    check_inputs,
    dtype_of_ort,
    ort_type_of,
    spec_from_ort,
    tensor_from_proto,
    tensor_to_proto,
)
from edge_agent.errors import AgentError, ErrorCode
from protos import fleet_pb2


@pytest.mark.parametrize("dtype", sorted(SUPPORTED_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4)])
def test_round_trip_keeps_dtype_shape_and_values(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(7)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    tensor = tensor_to_proto("t", array)
    assert tensor.dtype == dtype
    assert tuple(tensor.shape) == shape
    back = tensor_from_proto(tensor)
    assert back.dtype == np.dtype(dtype)
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_wire_bytes_are_c_order_little_endian_even_for_views() -> None:
    array = np.arange(6, dtype=">i4").reshape(2, 3).T  # big-endian, not contiguous
    tensor = tensor_to_proto("t", array)
    assert tensor.data == np.ascontiguousarray(array, dtype="<i4").tobytes()
    np.testing.assert_array_equal(tensor_from_proto(tensor), array)


def test_ort_types_map_to_numpy_names_and_back() -> None:
    assert dtype_of_ort("tensor(float)") == "float32"
    assert dtype_of_ort("tensor(int64)") == "int64"
    assert dtype_of_ort("tensor(bool)") == "bool"
    assert dtype_of_ort("tensor(string)") == "tensor(string)"  # kept, then refused by name
    for dtype in SUPPORTED_DTYPES:
        assert dtype_of_ort(ort_type_of(dtype)) == dtype
    with pytest.raises(AgentError) as err:
        ort_type_of("complex64")
    assert err.value.code is ErrorCode.UNSUPPORTED


def test_symbolic_and_unknown_dims_become_minus_one() -> None:
    spec = spec_from_ort("x", "tensor(float)", ["batch", 3, None, -1])
    assert spec.shape == (-1, 3, -1, -1)
    assert spec.dtype == "float32"


def test_byte_length_mismatch_is_refused_naming_the_input() -> None:
    tensor = fleet_pb2.Tensor(name="x", dtype="float32", shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(AgentError) as err:
        tensor_from_proto(tensor)
    assert err.value.code is ErrorCode.INVALID_INPUT
    assert (
        "'x'" in err.value.message
        and "24 bytes" in err.value.message
        and "got 20" in err.value.message
    )


def test_check_inputs_accepts_any_size_for_dynamic_dims() -> None:
    spec = spec_from_ort("x", "tensor(float)", ["batch", 3])
    feeds = check_inputs("m", [spec], [tensor_to_proto("x", np.ones((7, 3), np.float32))])
    assert feeds["x"].shape == (7, 3)
