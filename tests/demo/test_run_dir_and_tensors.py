"""The demo's run directory rules and its wire tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from demo.fleet import RUN_MARKER, RunDirError, prepare_run_dir
from demo.inference import InferenceError, array_from_tensor, tensor_from_array
from protos import fleet_pb2


def test_a_previous_run_is_replaced(tmp_path: Path) -> None:
    root = tmp_path / "run"
    layout = prepare_run_dir(root)
    (layout.root / "old.txt").write_text("old")
    layout = prepare_run_dir(root)
    assert sorted(p.name for p in layout.root.iterdir()) == [RUN_MARKER]


def test_a_directory_the_demo_did_not_make_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="was not made by the demo"):
        prepare_run_dir(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_tensor_round_trip_is_c_order_little_endian_float32() -> None:
    array = (np.arange(12, dtype=np.float32) / 7).reshape(1, 3, 4).astype(np.float32)
    tensor = tensor_from_array("x", array)
    assert (tensor.name, tensor.dtype, list(tensor.shape)) == ("x", "float32", [1, 3, 4])
    assert tensor.data == array.astype("<f4").tobytes()
    np.testing.assert_array_equal(array_from_tensor(tensor), array)


def test_a_tensor_whose_bytes_do_not_fit_its_shape_is_refused() -> None:
    bad = fleet_pb2.Tensor(name="logits", dtype="float32", shape=[1, 4], data=b"\0" * 12)
    with pytest.raises(InferenceError, match="needs 16"):
        array_from_tensor(bad)
