"""Static int8 artifacts are shipped in the canonical QDQ form whenever it is exact.

The models are small CNNs built with onnx.helper, shaped like PLAID (a Constant folded
by onnxruntime's pre-processing, Relu, a ReduceMean head); onnxruntime's own file comes
from onnxruntime's quantize_static, called as quantize.py calls it. The canonical form
is checked against artifact/delta/qdq's own ``build`` and run in onnxruntime.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from artifact.delta.qdq.analyse import analyse
from artifact.delta.qdq.build import build, parse
from controller.compression.calibration import DictCalibrationReader
from controller.compression.canonical_qdq import canonicalize
from controller.compression.cpu_features import host_reduce_range
from controller.compression.quantize import prepare_for_quantization, quantize_onnx
from controller.compression.recipe import Quantize
from controller.compression.requantize import check_previous, requantize_like
from tests.compression.test_quantize import (
    Arrays,
    _init,
    cnn_inputs,
    cnn_model,
    cosine,
    mlp_inputs,
    mlp_model,
    run,
    save,
)
from tests.compression.test_requantize import fine_tune, only, parameter_names, raw

LOGGER = "controller.compression.canonical_qdq"


def pool_cnn(path: Path, *, seed: int = 0, gain: float = 2.0) -> Path:
    """x[N,3,16,16] / gain (a Constant) → conv1 → relu → conv2 → relu → mean → head."""
    rng = np.random.default_rng(seed)
    constant = numpy_helper.from_array(np.array(gain, np.float32))
    return save(
        path,
        [
            helper.make_node("Constant", [], ["g"], name="gain", value=constant),
            helper.make_node("Div", ["x", "g"], ["xs"], name="scale"),
            helper.make_node("Conv", ["xs", "C1", "D1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
            helper.make_node("Conv", ["ar", "C2", "D2"], ["b"], name="conv2", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["b"], ["br"], name="relu2"),
            helper.make_node("ReduceMean", ["br"], ["p"], name="pool", axes=[2, 3], keepdims=0),
            helper.make_node("Gemm", ["p", "H", "HB"], ["logits"], name="head", transB=1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [
            _init("C1", rng.normal(0, 0.3, (8, 3, 3, 3))),
            _init("D1", rng.normal(0, 0.1, 8)),
            _init("C2", rng.normal(0, 0.2, (16, 8, 3, 3))),
            _init("D2", rng.normal(0, 0.1, 16)),
            _init("H", rng.normal(0, 0.3, (10, 16))),
            _init("HB", rng.normal(0, 0.1, 10)),
        ],
    )


def onnxruntime_int8(source: Path, out: Path, calibration: Arrays) -> Path:
    """onnxruntime's static QDQ file, made as quantize.py makes it (before canonicalize)."""
    pre = prepare_for_quantization(source, out.with_suffix(".pre.onnx"), "static")
    quantize_static(
        pre,
        out,
        DictCalibrationReader(calibration, 16),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=host_reduce_range().reduce_range,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        calibration_providers=["CPUExecutionProvider"],
    )
    return out


def rebuilt(fp32: Path, int8: Path) -> bytes:
    """What a device holding ``fp32`` rebuilds from the decisions for ``int8``."""
    analysis = analyse(onnx.load(str(int8)), onnx.load(str(fp32)))
    built = build(fp32.read_bytes(), analysis.decisions, analysis.values)
    assert parse(built).SerializeToString() == built  # fields in protobuf's own order
    return built


def test_the_canonical_form_runs_bit_identically_and_is_what_quantize_onnx_ships(
    tmp_path: Path,
) -> None:
    source = pool_cnn(tmp_path / "cnn.onnx")
    ort_file = onnxruntime_int8(source, tmp_path / "ort.onnx", cnn_inputs())
    ort_bytes = ort_file.read_bytes()
    out = tmp_path / "canonical.onnx"
    result = canonicalize(ort_file, source, cnn_inputs(), out)

    assert result.canonical and result.reason == "" and result.samples_compared == 16
    assert out.read_bytes() == rebuilt(source, ort_file) != ort_bytes
    assert result.bytes == out.stat().st_size < result.onnxruntime_bytes == len(ort_bytes)
    assert ort_file.read_bytes() == ort_bytes  # onnxruntime's file is left as it was
    feeds = cnn_inputs(8, seed=5)  # not the calibration inputs
    for got, want in zip(run(out, feeds), run(ort_file, feeds), strict=True):
        assert got.tobytes() == want.tobytes()

    shipped = tmp_path / "shipped.onnx"
    quantized = quantize_onnx(
        source, shipped, Quantize(mode="static"), calibration=cnn_inputs(), progress=False
    )
    assert shipped.read_bytes() == out.read_bytes() == rebuilt(source, shipped)
    assert quantized.canonical is not None and quantized.canonical.canonical
    assert quantized.canonical.out == shipped and quantized.bytes == shipped.stat().st_size


@pytest.mark.parametrize("kind", ["dynamic-int8", "other-model"])
def test_an_int8_file_analyse_refuses_is_kept_as_onnxruntime_wrote_it(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    int8 = tmp_path / "int8.onnx"
    if kind == "dynamic-int8":
        source, inputs = mlp_model(tmp_path / "mlp.onnx"), mlp_inputs()
        quantize_onnx(source, int8, Quantize(mode="dynamic"), calibration=None, progress=False)
    else:  # the int8 file of another model with the same input
        source, inputs = cnn_model(tmp_path / "cnn.onnx"), cnn_inputs()
        onnxruntime_int8(pool_cnn(tmp_path / "pool.onnx"), int8, inputs)
    before = int8.read_bytes()
    out = tmp_path / "out.onnx"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = canonicalize(int8, source, inputs, out)

    assert not result.canonical and result.reason.startswith("not canonical: ")
    assert out.read_bytes() == before == int8.read_bytes()
    assert result.bytes == result.onnxruntime_bytes == len(before)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines == [f"kept onnxruntime's int8 file int8.onnx: {result.reason}"]


def test_quantize_onnx_ships_onnxruntimes_file_when_preprocessing_changed_the_graph(
    tmp_path: Path,
) -> None:
    """quant_pre_process fuses the MLP's MatMul + Add into a Gemm: no device holding the
    MLP can rebuild that from decisions, so onnxruntime's file is the artifact."""
    source = mlp_model(tmp_path / "mlp.onnx")
    out = tmp_path / "mlp.int8.onnx"
    result = quantize_onnx(
        source, out, Quantize(mode="static"), calibration=mlp_inputs(), progress=False
    )
    assert result.canonical is not None and not result.canonical.canonical
    assert "fc2" in result.canonical.reason
    ort_file = onnxruntime_int8(source, tmp_path / "ort.onnx", mlp_inputs())
    assert out.read_bytes() == ort_file.read_bytes()
    fp16 = quantize_onnx(source, tmp_path / "fp16.onnx", Quantize(mode="fp16"), calibration=None)
    assert fp16.canonical is None


def test_a_canonical_form_that_computes_something_else_is_not_shipped(tmp_path: Path) -> None:
    """The FP32 model given holds another value in the Constant onnxruntime folded away:
    its canonical form divides by 3, onnxruntime's file by 2; onnxruntime's file stays."""
    ort_file = onnxruntime_int8(
        pool_cnn(tmp_path / "cnn.onnx"), tmp_path / "ort.onnx", cnn_inputs()
    )
    other = pool_cnn(tmp_path / "other.onnx", gain=3.0)
    before = ort_file.read_bytes()
    result = canonicalize(ort_file, other, cnn_inputs(), ort_file)

    assert not result.canonical
    assert "differs" in result.reason or "not canonical" in result.reason, result.reason
    assert ort_file.read_bytes() == before


def test_requantize_reuses_a_canonical_previous_artifact_and_ships_canonical_too(
    tmp_path: Path,
) -> None:
    source = pool_cnn(tmp_path / "v1.onnx")
    old = tmp_path / "v1.int8.onnx"
    first = quantize_onnx(
        source, old, Quantize(mode="static"), calibration=cnn_inputs(), progress=False
    )
    assert first.canonical is not None and first.canonical.canonical
    assert any(n.op_type == "Constant" for n in onnx.load(str(old)).graph.node)

    new = fine_tune(source, tmp_path / "v2.onnx", only({"C2", "D2"}, noise=0.002))
    check_previous(old, new)
    out = tmp_path / "v2.int8.onnx"
    report = requantize_like(old, new, out, calibration=cnn_inputs())

    assert report.canonical is not None and report.canonical.canonical
    assert out.read_bytes() == rebuilt(new, out)
    assert report.refreshed == () and {"C1", "C2", "H", "xs", "logits"} <= set(report.reused)
    assert report.unmatched == ()
    for name in parameter_names(old):  # every scale and zero point, byte for byte
        assert raw(out, name) == raw(old, name), name
    assert raw(out, "C1_quantized") == raw(old, "C1_quantized")
    assert raw(out, "C2_quantized") != raw(old, "C2_quantized")
    feeds = cnn_inputs(seed=3)
    assert cosine(run(out, feeds)[0], run(new, feeds)[0]) > 0.99
    # the same float weights: the canonical artifact comes back byte for byte
    same = requantize_like(old, source, tmp_path / "same.onnx", calibration=cnn_inputs())
    assert same.out.read_bytes() == old.read_bytes()
