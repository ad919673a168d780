"""Calibration arrays that do not fit the model are refused up front, naming the input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper

from controller.compression.calibration import DictCalibrationReader, check_calibration
from controller.compression.errors import CalibrationMismatchError, CompressionError
from controller.compression.quantize import quantize_onnx
from controller.compression.recipe import Quantize
from tests.compression.test_quantize import _init, cnn_inputs, cnn_model, save


def two_input_model(path: Path) -> Path:
    """tokens[N,seq] (int64) and features[N,seq,8] (float): a shared symbolic 'seq'."""
    rng = np.random.default_rng(0)
    return save(
        path,
        [
            helper.make_node("Cast", ["tokens"], ["t"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["t", "axis"], ["tu"], name="unsq"),
            helper.make_node("Add", ["features", "tu"], ["s"], name="add"),
            helper.make_node("MatMul", ["s", "W"], ["y"], name="proj"),
        ],
        [
            helper.make_tensor_value_info("tokens", TensorProto.INT64, ["N", "seq"]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", "seq", 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "seq", 4])],
        [
            _init("W", rng.normal(size=(8, 4))),
            onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis"),
        ],
    )


def good() -> dict[str, NDArray[np.generic]]:
    return {
        "tokens": np.zeros((6, 5), dtype=np.int64),
        "features": np.zeros((6, 5, 8), dtype=np.float32),
    }


def _with(**changes: NDArray[np.generic] | None) -> dict[str, NDArray[np.generic]]:
    arrays = good()
    for name, value in changes.items():
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value
    return arrays


BAD = {
    "missing input": (_with(tokens=None), r"no array for model input\(s\) \['tokens'\]"),
    "unknown input": (
        {**good(), "mask": np.zeros((6, 5), np.int64)},
        r"\['mask'\] that are not model inputs",
    ),
    "dtype": (
        _with(features=np.zeros((6, 5, 8), np.float64)),
        r"calibration\['features'\].*expects dtype float32",
    ),
    "rank": (
        _with(features=np.zeros((6, 40), np.float32)),
        r"calibration\['features'\].*expects rank 3 \(float32\[N, seq, 8\]\)",
    ),
    "static dim": (
        _with(features=np.zeros((6, 5, 7), np.float32)),
        r"calibration\['features'\].*expects 8 on axis 2",
    ),
    "shared symbolic dim": (
        _with(features=np.zeros((6, 4, 8), np.float32)),
        r"axis 1 is 4 but 'tokens' gives 5 for the same dimension 'seq'",
    ),
    "sample counts": (
        _with(tokens=np.zeros((3, 5), np.int64), features=np.zeros((6, 5, 8), np.float32)),
        r"different numbers of samples",
    ),
    "non-finite": (
        _with(features=np.full((6, 5, 8), np.nan, np.float32)),
        r"calibration\['features'\].*NaN",
    ),
    "no samples": (
        _with(tokens=np.zeros((0, 5), np.int64), features=np.zeros((0, 5, 8), np.float32)),
        r"at least one sample",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_mismatched_calibration_is_refused_naming_the_input(tmp_path: Path, case: str) -> None:
    arrays, message = BAD[case]
    source = two_input_model(tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    with pytest.raises(CalibrationMismatchError, match=message):
        quantize_onnx(source, out, Quantize(mode="static"), calibration=arrays, progress=False)
    assert sorted(tmp_path.iterdir()) == [source]


def test_matching_calibration_passes_and_counts_samples(tmp_path: Path) -> None:
    model = onnx.load(str(two_input_model(tmp_path / "m.onnx")))
    assert check_calibration(model, good()) == 6


def test_calibration_is_checked_in_dynamic_mode_too(tmp_path: Path) -> None:
    source = cnn_model(tmp_path / "cnn.onnx")
    wrong = {"x": np.zeros((4, 3, 8, 8), np.float32)}
    with pytest.raises(CalibrationMismatchError, match=r"expects 16 on axis 2"):
        quantize_onnx(source, tmp_path / "o.onnx", Quantize(mode="dynamic"), calibration=wrong)


def test_a_mismatch_is_a_compression_error_and_a_value_error(tmp_path: Path) -> None:
    source = cnn_model(tmp_path / "cnn.onnx")
    with pytest.raises(CalibrationMismatchError) as caught:
        quantize_onnx(
            source, tmp_path / "o.onnx", Quantize(mode="static"), calibration={"y": np.zeros(1)}
        )
    assert isinstance(caught.value, CompressionError) and isinstance(caught.value, ValueError)


def test_static_batch_axis_needs_a_multiple_of_its_size(tmp_path: Path) -> None:
    source = save(
        tmp_path / "fixed.onnx",
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 2])],
        [_init("W", np.ones((8, 2)))],
    )
    model = onnx.load(str(source))
    with pytest.raises(CalibrationMismatchError, match="multiple of 4"):
        check_calibration(model, {"x": np.zeros((6, 8), np.float32)})
    assert check_calibration(model, {"x": np.zeros((8, 8), np.float32)}) == 8
    # and the static batch is what calibration feeds
    result = quantize_onnx(
        source,
        tmp_path / "o.onnx",
        Quantize(mode="static"),
        calibration={"x": np.ones((8, 8), np.float32)},
        progress=False,
    )
    assert result.calibration_samples == 8


def test_the_reader_feeds_every_sample_once_per_pass() -> None:
    arrays = cnn_inputs(10)
    reader = DictCalibrationReader(arrays, 4)
    for _ in range(2):
        sizes = []
        while (batch := reader.get_next()) is not None:
            sizes.append(len(batch["x"]))
        assert sizes == [4, 4, 2]
        reader.rewind()
