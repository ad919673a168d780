"""ONNX-only fidelity: small onnx.helper models run in real onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from controller.compression.errors import CalibrationMismatchError, CompressionError
from controller.workloads.fidelity import FidelityMetric, fidelity, load_calibration

FEATURES = 4


def linear_model(
    path: Path,
    weight: NDArray[np.float32],
    *,
    input_name: str = "x",
    output_name: str = "y",
    sigmoid: bool = False,
    task: str | None = None,
    batch: int | str = "batch",
) -> Path:
    """y = x @ W (optionally sigmoid), x float32 [batch, 4]."""
    w = numpy_helper.from_array(weight.astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", [input_name, "W"], ["mm" if sigmoid else output_name])]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["mm"], [output_name]))
    out_dims: list[int | str] = [batch, *weight.shape[1:]]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, FEATURES])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, out_dims)],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    if task is not None:
        helper.set_model_props(model, {"task": task})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def features(n: int = 200, seed: int = 0) -> NDArray[np.float32]:
    return np.random.default_rng(seed).normal(size=(n, FEATURES)).astype(np.float32)


def calibration(n: int = 200, seed: int = 0) -> dict[str, NDArray[np.generic]]:
    return {"x": features(n, seed)}


@pytest.fixture
def weight() -> NDArray[np.float32]:
    return np.random.default_rng(1).normal(size=(FEATURES, 3)).astype(np.float32)


def test_identical_classifier_agrees_fully(tmp_path: Path, weight: NDArray[np.float32]) -> None:
    ref = linear_model(tmp_path / "ref.onnx", weight)
    cand = linear_model(tmp_path / "cand.onnx", weight.copy())
    score = fidelity(ref, cand, calibration())
    assert score.metric == FidelityMetric.TOP1.value == "top1_agreement"
    assert score.value == 1.0
    assert score.samples == 200
    assert score.extra["max_abs_diff"] == 0.0


def test_perturbed_classifier_agrees_less(tmp_path: Path, weight: NDArray[np.float32]) -> None:
    ref = linear_model(tmp_path / "ref.onnx", weight)
    noisy = weight + np.random.default_rng(2).normal(scale=0.5, size=weight.shape)
    cand = linear_model(tmp_path / "cand.onnx", noisy.astype(np.float32))
    score = fidelity(ref, cand, calibration())
    assert 0.3 < score.value < 1.0
    # Cross-check against numpy: the share of samples whose arg-max is the same.
    x = features()
    want = float(((x @ weight).argmax(1) == (x @ noisy).argmax(1)).mean())
    assert score.value == pytest.approx(want)


def test_binary_logits_use_threshold_zero(tmp_path: Path) -> None:
    w = np.array([[1.0], [-1.0], [0.5], [0.0]], dtype=np.float32)
    ref = linear_model(tmp_path / "ref.onnx", w)
    # Same sign everywhere (scaled): full agreement even though values differ.
    scaled = linear_model(tmp_path / "scaled.onnx", w * 3)
    score = fidelity(ref, scaled, calibration())
    assert score.metric == "threshold_agreement"
    assert score.value == 1.0
    assert score.extra["threshold"] == 0.0
    assert score.extra["max_abs_diff"] > 0
    flipped = linear_model(tmp_path / "flipped.onnx", -w)
    assert fidelity(ref, flipped, calibration()).value == 0.0


def test_binary_probabilities_with_threshold_half(tmp_path: Path) -> None:
    w = np.array([[1.0], [-1.0], [0.5], [0.0]], dtype=np.float32)
    ref = linear_model(tmp_path / "ref.onnx", w, sigmoid=True)
    shifted = w.copy()
    shifted[3, 0] = 0.8  # moves some samples across 0.5
    cand = linear_model(tmp_path / "cand.onnx", shifted, sigmoid=True)
    score = fidelity(ref, cand, calibration(), threshold=0.5)
    x = features()
    want = float((((x @ w) > 0) == ((x @ shifted) > 0)).mean())
    assert score.value == pytest.approx(want)
    assert 0.5 < score.value < 1.0


def test_embeddings_use_cosine_from_task_metadata(tmp_path: Path) -> None:
    w = np.random.default_rng(3).normal(size=(FEATURES, 8)).astype(np.float32)
    ref = linear_model(tmp_path / "ref.onnx", w, task="embedding")
    same = linear_model(tmp_path / "same.onnx", w * 2)  # same direction, different norm
    score = fidelity(ref, same, calibration())
    assert score.metric == "cosine"
    assert score.value == pytest.approx(1.0, abs=1e-6)
    noisy = w + np.random.default_rng(4).normal(scale=0.3, size=w.shape).astype(np.float32)
    degraded = fidelity(ref, linear_model(tmp_path / "noisy.onnx", noisy), calibration())
    assert degraded.metric == "cosine"
    assert 0.5 < degraded.value < 0.999
    assert degraded.extra["cosine_min"] <= degraded.value


def test_explicit_metric_overrides_the_shape(tmp_path: Path, weight: NDArray[np.float32]) -> None:
    ref = linear_model(tmp_path / "ref.onnx", weight)
    cand = linear_model(tmp_path / "cand.onnx", weight * 2)
    assert fidelity(ref, cand, calibration(), metric="cosine").metric == "cosine"
    with pytest.raises(CompressionError, match="unknown fidelity metric 'l2'"):
        fidelity(ref, cand, calibration(), metric="l2")


def test_calibration_npz_round_trip(tmp_path: Path, weight: NDArray[np.float32]) -> None:
    ref = linear_model(tmp_path / "ref.onnx", weight)
    path = tmp_path / "INPUTS.npz"
    np.savez(path, x=features(50))
    loaded = load_calibration(path)
    assert list(loaded) == ["x"] and loaded["x"].shape == (50, FEATURES)
    assert fidelity(ref, ref, loaded).samples == 50


def test_unreadable_calibration_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CalibrationMismatchError, match="does not exist"):
        load_calibration(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CalibrationMismatchError, match=r"not a readable \.npz"):
        load_calibration(junk)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CalibrationMismatchError, match=r"not a readable \.npz"):
        load_calibration(pickled)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        # missing input, unknown array: both named
        ({"z": np.zeros((4, FEATURES), np.float32)}, r"\['x'\] \(arrays found: \['z'\]\)"),
        ({"x": np.zeros((4, FEATURES), np.float64)}, "'x' expects dtype float32"),
        ({"x": np.zeros((4, FEATURES + 1), np.float32)}, "'x' expects 4 on axis 1"),
        ({"x": np.zeros((FEATURES,), np.float32)}, "'x' expects rank 2"),
        (
            {"x": np.zeros((4, FEATURES), np.float32), "extra": np.zeros(4, np.float32)},
            "'extra'",
        ),
    ],
)
def test_calibration_mismatch_names_the_input(
    tmp_path: Path,
    weight: NDArray[np.float32],
    arrays: dict[str, NDArray[np.generic]],
    message: str,
) -> None:
    ref = linear_model(tmp_path / "ref.onnx", weight)
    with pytest.raises(CalibrationMismatchError, match=message):
        fidelity(ref, ref, arrays)


def test_candidate_with_other_inputs_is_refused(
    tmp_path: Path, weight: NDArray[np.float32]
) -> None:
    ref = linear_model(tmp_path / "ref.onnx", weight)
    other = linear_model(tmp_path / "other.onnx", weight, input_name="features")
    with pytest.raises(CalibrationMismatchError, match="'features'"):
        fidelity(ref, other, calibration())


def test_candidate_without_the_output_is_refused(
    tmp_path: Path, weight: NDArray[np.float32]
) -> None:
    ref = linear_model(tmp_path / "ref.onnx", weight)
    renamed = linear_model(tmp_path / "renamed.onnx", weight, output_name="logits")
    with pytest.raises(CompressionError, match="candidate model has no output 'y'"):
        fidelity(ref, renamed, calibration())


def test_invalid_onnx_is_refused_naming_the_file(
    tmp_path: Path, weight: NDArray[np.float32]
) -> None:
    ref = linear_model(tmp_path / "ref.onnx", weight)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(CompressionError, match=r"candidate model .*bad\.onnx is not a valid ONNX"):
        fidelity(ref, bad, calibration())


def test_static_batch_models_run_in_their_batch(
    tmp_path: Path, weight: NDArray[np.float32]
) -> None:
    ref = linear_model(tmp_path / "ref.onnx", weight)
    static = linear_model(tmp_path / "static.onnx", weight, batch=1)
    score = fidelity(ref, static, calibration(7))
    assert score.value == 1.0 and score.samples == 7
