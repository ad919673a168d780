"""Bring-your-own ONNX models judged by fidelity: the cases a QA pass found wrong.

Small onnx.helper models run in real onnxruntime; the compress_onnx test runs the real
job up to its up-front refusal.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from controller.compression.errors import CalibrationMismatchError, CompressionError
from controller.compression.executor import OnnxSource
from controller.compression.job import compress_onnx
from controller.device_classes import load_device_class
from controller.workloads.fidelity import (
    check_self_contained,
    choose_threshold,
    fidelity,
)

ROOT = Path(__file__).resolve().parents[2]
HOME_HUB = ROOT / "deploy" / "device-classes" / "home-hub.yaml"
FEATURES = 4
WEIGHT = np.array([[1.0], [-1.0], [0.5], [0.0]], dtype=np.float32)


def save(path: Path, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto],
         inputs: list[onnx.ValueInfoProto], out_dims: list[int | str],
         **save_kwargs: object) -> Path:  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "byo",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path), **save_kwargs)  # type: ignore[arg-type]
    return path


def binary_model(path: Path, tail: list[str], *, weight: NDArray[np.float32] = WEIGHT,
                 constant: float | None = None, **save_kwargs: object) -> Path:  # fmt: skip
    """x [n, 4] @ W [4, 1], then the ops in ``tail`` ("Sigmoid", "Clip", "Flatten", ...).

    ``constant`` replaces the result with that value everywhere (y = r * 0 + constant):
    a candidate that has lost every bit of the model.
    """
    inits = [numpy_helper.from_array(weight, "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["t0"])]
    for i, op in enumerate(tail):
        args = [f"t{i}"]
        if op == "Clip":
            inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
                      (("lo", 0.0), ("hi", 1.0))]  # fmt: skip
            args += ["lo", "hi"]
        nodes.append(helper.make_node(op, args, [f"t{i + 1}"]))
    last = f"t{len(tail)}"
    if constant is not None:
        inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
                  (("zero", 0.0), ("const", constant))]  # fmt: skip
        nodes += [helper.make_node("Mul", [last, "zero"], ["z"])]
        last = "z"
        nodes += [helper.make_node("Add", [last, "const"], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", [last], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", FEATURES])
    return save(path, nodes, inits, [x], ["n", 1], **save_kwargs)


def inputs(n: int = 200, seed: int = 0) -> NDArray[np.float32]:
    return np.random.default_rng(seed).normal(size=(n, FEATURES)).astype(np.float32)


def features(n: int = 200, seed: int = 0) -> dict[str, NDArray[np.generic]]:
    return {"x": inputs(n, seed)}


# ------------------------------------------------------------------ 1: threshold


def test_sigmoid_output_is_judged_at_half_not_zero(tmp_path: Path) -> None:
    """At 0.0 every probability is "positive", so a constant candidate scored 1.0."""
    ref = binary_model(tmp_path / "ref.onnx", ["Sigmoid"])
    constant = binary_model(tmp_path / "const.onnx", ["Sigmoid"], constant=0.5)
    score = fidelity(ref, constant, features())
    assert score.metric == "threshold_agreement"
    assert score.extra["threshold"] == 0.5
    x = inputs()
    positive = float(((x @ WEIGHT) > 0).mean())  # sigmoid > 0.5 exactly there
    assert score.value == pytest.approx(1.0 - positive)
    assert 0.2 < score.value < 0.8
    # The same model judged against itself still agrees fully.
    assert fidelity(ref, binary_model(tmp_path / "same.onnx", ["Sigmoid"]), features()).value == 1.0
    # What a person sees in the trial line and the manifest's metric names.
    assert score.extra["threshold"] == 0.5
    source = OnnxSource(ref, features(), min_fidelity=0.9)
    quality = source.quality(constant)
    assert quality.metric == "threshold_agreement"  # a stable manifest key
    assert quality.value == fidelity(ref, constant, source.split.judge).value


def test_sigmoid_behind_shape_only_ops_decides_by_the_graph(tmp_path: Path) -> None:
    """Sigmoid → Flatten → Identity is a probability whatever the values look like."""
    ref = binary_model(tmp_path / "ref.onnx", ["Sigmoid", "Flatten"])
    model = onnx.load(str(ref))
    outside = np.array([[-3.0], [2.0]])  # values alone would say logits
    assert choose_threshold(model, "y", outside) == 0.5
    logits = onnx.load(str(binary_model(tmp_path / "logits.onnx", ["Flatten"])))
    assert choose_threshold(logits, "y", outside) == 0.0
    assert choose_threshold(logits, "y", np.array([[0.0], [1.0], [0.3]])) == 0.5
    cand = binary_model(tmp_path / "cand.onnx", ["Sigmoid", "Flatten"], weight=WEIGHT * 1.5)
    score = fidelity(ref, cand, features())
    assert score.extra["threshold"] == 0.5
    assert score.value == 1.0  # same sign of x @ W, so the same side of 0.5


def test_outputs_within_unit_range_count_as_probabilities(tmp_path: Path) -> None:
    """No Sigmoid (a Clip to [0, 1]), but every reference value is in [0, 1]."""
    ref = binary_model(tmp_path / "ref.onnx", ["Clip"])
    constant = binary_model(tmp_path / "const.onnx", ["Clip"], constant=0.5)
    score = fidelity(ref, constant, features())
    assert score.extra["threshold"] == 0.5
    assert score.value < 0.9


def test_logits_keep_threshold_zero(tmp_path: Path) -> None:
    ref = binary_model(tmp_path / "ref.onnx", [])
    constant = binary_model(tmp_path / "const.onnx", [], constant=0.5)  # always positive
    score = fidelity(ref, constant, features())
    assert score.extra["threshold"] == 0.0
    x = inputs()
    assert score.value == pytest.approx(float(((x @ WEIGHT) > 0).mean()))
    assert score.extra["threshold"] == 0.0
    # An explicit threshold still wins over the choice.
    assert fidelity(ref, constant, features(), threshold=0.7).extra["threshold"] == 0.7


# ------------------------------------------------------------------ 2: external data


def external_model(directory: Path) -> Path:
    directory.mkdir()
    path = binary_model(
        directory / "ext.onnx",
        ["Sigmoid"],
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    assert (directory / "ext.onnx.data").is_file()
    return path


def test_check_self_contained_refuses_external_data(tmp_path: Path) -> None:
    ext = external_model(tmp_path / "ext")
    with pytest.raises(CompressionError, match=r"\['W'\] keep their data in external files") as e:
        check_self_contained(ext)
    assert "self-contained" in str(e.value) and "\n" not in str(e.value)
    check_self_contained(binary_model(tmp_path / "inline.onnx", ["Sigmoid"]))  # no error


def test_external_data_reference_is_checked_beside_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from another directory, the checker used to look for the .data file in the cwd
    and call the model invalid."""
    ext = external_model(tmp_path / "ext")
    inline = binary_model(tmp_path / "inline.onnx", ["Sigmoid"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    score = fidelity(ext, inline, features())
    assert score.value == 1.0
    assert score.extra["threshold"] == 0.5


@pytest.mark.parametrize("from_its_directory", [False, True])
def test_compress_onnx_refuses_external_data_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, from_its_directory: bool
) -> None:
    """Before: "not a valid ONNX model" from elsewhere, a traceback from its directory
    (the trial copies lost the .data file)."""
    ext = external_model(tmp_path / "ext")
    if from_its_directory:
        monkeypatch.chdir(ext.parent)
        ext = Path(ext.name)
    out = tmp_path / "out"
    with pytest.raises(CompressionError, match="keep their data in external files"):
        compress_onnx(ext, features(), load_device_class(HOME_HUB), out, name="ext")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ext"]  # no staging left behind


# ------------------------------------------------------------------ 3: unrunnable values


def embedding_model(path: Path, rows: int = 10) -> Path:
    """ids int64 [n, 3] → mean of a [rows, 1] table's entries, as [n, 1]."""
    table = np.arange(rows, dtype=np.float32).reshape(rows, 1)
    nodes = [
        helper.make_node("Gather", ["T", "ids"], ["g"]),  # [n, 3, 1]
        helper.make_node("ReduceMean", ["g", "axes"], ["y"], keepdims=0),
    ]
    inits = [numpy_helper.from_array(table, "T"),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]  # fmt: skip
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 3])
    return save(path, nodes, inits, [ids], ["n", 1])


def test_calibration_values_the_source_cannot_run_on_are_one_line(tmp_path: Path) -> None:
    model = embedding_model(tmp_path / "tok.onnx")
    good = {"ids": np.random.default_rng(0).integers(0, 10, (40, 3)).astype(np.int64)}
    assert fidelity(model, model, good).value == 1.0
    bad = {"ids": np.random.default_rng(0).integers(0, 50, (40, 3)).astype(np.int64)}
    with pytest.raises(CalibrationMismatchError) as e:
        fidelity(model, model, bad)
    message = str(e.value)
    assert message.startswith("the source model cannot run on the calibration inputs: ")
    assert "out of data bounds" in message  # onnxruntime's own words
    assert "[ONNXRuntimeError]" not in message and "\n" not in message


# ------------------------------------------------------------------ 5: too few samples


def fidelity_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "controller.workloads.fidelity" and r.levelno == logging.WARNING
    ]


@pytest.mark.parametrize(
    ("samples", "min_fidelity", "judged", "needed"),
    [
        (10, 0.99, "the calibration file's 10 sample(s)", 100),
        (50, 0.99, "25 held-out sample(s) of 50", 100),  # half may be held out, no more
        (10, None, "the calibration file's 10 sample(s)", 20),
        (19, 0.5, "the calibration file's 19 sample(s)", 20),
        (10, 0.9, "the calibration file's 10 sample(s)", 20),
    ],
)
def test_too_few_judged_samples_are_warned_about(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    samples: int,
    min_fidelity: float | None,
    judged: str,
    needed: int,
) -> None:
    ref = binary_model(tmp_path / "ref.onnx", ["Sigmoid"])
    with caplog.at_level(logging.WARNING, logger="controller.workloads.fidelity"):
        OnnxSource(ref, features(samples), min_fidelity=min_fidelity)
    (few,) = [m for m in fidelity_warnings(caplog) if m.startswith("fidelity is judged on only")]
    assert f"only {judged}: " in few
    assert f"give at least {needed} judged samples" in few


@pytest.mark.parametrize("samples", [10, 39])
def test_too_few_samples_to_hold_any_out_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, samples: int
) -> None:
    ref = binary_model(tmp_path / "ref.onnx", ["Sigmoid"])
    with caplog.at_level(logging.WARNING, logger="controller.workloads.fidelity"):
        source = OnnxSource(ref, features(samples), min_fidelity=0.95)
    assert not source.split.held_out
    assert source.split.judge_samples == source.split.fit_samples == samples
    (note,) = [m for m in fidelity_warnings(caplog) if "too few to hold any out" in m]
    assert f"holds {samples} sample(s)" in note and "give at least 40 samples" in note


@pytest.mark.parametrize(
    ("samples", "min_fidelity", "judged"), [(400, 0.99, 100), (40, 0.95, 20), (40, None, 20)]
)
def test_enough_samples_are_split_and_not_warned_about(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    samples: int,
    min_fidelity: float | None,
    judged: int,
) -> None:
    ref = binary_model(tmp_path / "ref.onnx", ["Sigmoid"])
    with caplog.at_level(logging.WARNING, logger="controller.workloads.fidelity"):
        source = OnnxSource(ref, features(samples), min_fidelity=min_fidelity)
    assert not fidelity_warnings(caplog)
    assert source.split.held_out
    assert (source.split.judge_samples, source.split.fit_samples) == (judged, samples - judged)


def test_candidates_are_judged_on_samples_the_quantizers_never_saw(tmp_path: Path) -> None:
    """Static int8 fits its activation ranges to the calibration inputs: judged on them
    too, it looks better than it is. The split is disjoint, covers every sample, is the
    same every run, and mixes a file sorted by class into both parts."""
    ref = binary_model(tmp_path / "ref.onnx", ["Sigmoid"])
    calibration = features(200)
    split = OnnxSource(ref, calibration, min_fidelity=0.95).split
    (x,) = calibration.values()
    fit, judge = (next(iter(part.values())) for part in (split.fit, split.judge))
    rows = {tuple(r) for r in x}
    assert len(rows) == 200  # distinct samples, so rows identify them
    fit_rows, judge_rows = {tuple(r) for r in fit}, {tuple(r) for r in judge}
    assert not fit_rows & judge_rows and fit_rows | judge_rows == rows
    assert len(judge_rows) == 50  # a quarter (20 resolve 0.95)
    again = OnnxSource(ref, calibration, min_fidelity=0.95).split
    assert np.array_equal(next(iter(again.judge.values())), judge)
    order = np.argsort(x[:, 0])  # sorted by a feature, as a file sorted by class would be
    first_half = {tuple(r) for r in x[order[:100]]}
    assert 0 < len(judge_rows & first_half) < 50  # both halves are judged
    # and what the planner sees is the judged part's fidelity, not the whole file's
    constant = binary_model(tmp_path / "const.onnx", ["Sigmoid"], constant=0.5)
    source = OnnxSource(ref, calibration, min_fidelity=0.95)
    assert source.quality(constant).value == fidelity(ref, constant, split.judge).value


# ------------------------------------------------------------------ 4: what --min-fidelity means


def test_min_fidelity_help_names_the_measure_per_output_kind() -> None:
    from controller.cli.compress import compress

    option = inspect.signature(compress).parameters["min_fidelity"].default
    text = option.help
    assert "top-1" in text and "0.5" in text and "cosine" in text and "--calib" in text
    assert not text.startswith("least cosine similarity")
