"""Accuracy-aware fallback keeps the node that hurts in float, and only that one.

The sensitive model has one layer (fc2) with a single huge weight on an input that is
always zero: per-tensor int8 rounds every other weight of that layer to zero, so fully
quantized the model is useless, while fc1 and fc3 quantize harmlessly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from controller.compression.quantize import quantize_onnx
from controller.compression.recipe import Quantize
from controller.compression.rounding import activation_errors, node_priors, rounding_error
from controller.compression.sensitivity import QuantizeTrial
from tests.compression.test_quantize import _init, cosine, initializers, node, run, save

FEEDS = {"x": np.random.default_rng(3).normal(size=(64, 16)).astype(np.float32)}


def sensitive_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (16, 16))
    w1[:, 0] = 0.0  # hidden unit 0 is always 0 after fc1
    w2 = rng.normal(0, 0.1, (16, 16))
    w2[0, 0] = 1000.0  # ... so this huge weight never matters, except to int8's range
    w3 = rng.normal(0, 0.3, (16, 8))
    return save(
        path,
        [
            helper.make_node("MatMul", ["x", "W1"], ["a"], name="fc1"),
            helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
            helper.make_node("MatMul", ["ar", "W2"], ["b"], name="fc2"),
            helper.make_node("Relu", ["b"], ["br"], name="relu2"),
            helper.make_node("MatMul", ["br", "W3"], ["y"], name="fc3"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [_init("W1", w1), _init("W2", w2), _init("W3", w3)],
    )


def fidelity_to(source: Path) -> Callable[[Path], float]:
    """Cosine of a model's outputs to the source's on fixed inputs (1.0 for the source)."""
    want = run(source, FEEDS)[0]
    return lambda path: cosine(run(path, FEEDS)[0], want)


def test_the_sensitive_node_stays_float_and_the_drop_fits(tmp_path: Path) -> None:
    source = sensitive_model(tmp_path / "s.onnx")
    out = tmp_path / "s.int8.onnx"
    seen: list[QuantizeTrial] = []
    step = Quantize(mode="dynamic", per_channel=False, accuracy_aware=True)
    result = quantize_onnx(
        source,
        out,
        step,
        calibration=None,
        evaluate=fidelity_to(source),
        max_drop=0.01,
        progress=False,
        on_trial=seen.append,
    )
    assert result.met
    assert result.fallback_nodes == ("fc2",) and result.excluded_nodes == ("fc2",)
    assert result.baseline_score == pytest.approx(1.0)
    assert result.final_score is not None and result.drop is not None
    assert result.drop <= 0.01
    # the search really saw the damage first, then ranked fc2 as the most harmful
    full = result.trials[0]
    assert full.purpose == "full" and full.drop is not None and full.drop > 0.1
    sensitivity = {t.kept_float: t.score for t in result.trials if t.purpose == "sensitivity"}
    assert set(sensitivity) == {("fc1",), ("fc2",), ("fc3",)}
    assert max(sensitivity, key=lambda k: sensitivity[k] or 0.0) == ("fc2",)
    assert result.ranking[0][0] == "fc2" and {n for n, _ in result.ranking} == {"fc1", "fc2", "fc3"}
    harm = result.ranking[0][1]
    assert harm is not None and harm > 0.1
    assert [t.index for t in seen] == [t.index for t in result.trials]
    # the file: fc2 is a float MatMul on W2, the others are integer
    assert node(out, "fc2").op_type == "MatMul"
    inits = initializers(out)
    assert inits["W2"].data_type == TensorProto.FLOAT
    assert inits["W1_quantized"].data_type == TensorProto.INT8
    assert inits["W3_quantized"].data_type == TensorProto.INT8
    assert result.final_score == pytest.approx(fidelity_to(source)(out))
    assert [t for t in result.trials if t.path is not None] == [
        t for t in result.trials if t.kept_float == ("fc2",)
    ]


def test_static_fallback_finds_the_same_node(tmp_path: Path) -> None:
    source = sensitive_model(tmp_path / "s.onnx")
    out = tmp_path / "s.qdq.onnx"
    step = Quantize(mode="static", per_channel=False)
    result = quantize_onnx(
        source,
        out,
        step,
        calibration=FEEDS,
        evaluate=fidelity_to(source),
        max_drop=0.01,
        progress=False,
    )
    assert result.met and result.fallback_nodes == ("fc2",)
    model = onnx.load(str(out))
    fc2 = node(out, "fc2")
    assert fc2.input[1] == "W2"  # fed straight from the float initializer, no DequantizeLinear
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def test_no_fallback_without_accuracy_awareness(tmp_path: Path) -> None:
    source = sensitive_model(tmp_path / "s.onnx")
    step = Quantize(mode="dynamic", per_channel=False, accuracy_aware=False)
    result = quantize_onnx(
        source,
        tmp_path / "o.onnx",
        step,
        calibration=None,
        evaluate=fidelity_to(source),
        max_drop=0.01,
        progress=False,
    )
    assert not result.met
    assert result.fallback_nodes == () and len(result.trials) == 1
    assert result.drop is not None and result.drop > 0.1


def test_a_drop_that_never_fits_returns_the_best_with_met_false(tmp_path: Path) -> None:
    source = sensitive_model(tmp_path / "s.onnx")
    out = tmp_path / "o.onnx"
    fidelity = fidelity_to(source)

    def harsh(path: Path) -> float:
        # the source scores 1; every quantized file loses at least 0.5
        return 1.0 if path == source else fidelity(path) - 0.5

    step = Quantize(mode="dynamic", per_channel=False)
    result = quantize_onnx(
        source,
        out,
        step,
        calibration=None,
        evaluate=harsh,
        max_drop=0.01,
        max_evaluations=6,
        progress=False,
    )
    assert not result.met
    assert out.is_file()
    assert len(result.trials) <= 6
    best = max(t.score or -1.0 for t in result.trials)
    assert result.final_score == best
    assert "fc2" in result.excluded_nodes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx", "s.onnx"]


def test_a_tight_budget_measures_the_likeliest_nodes_first(tmp_path: Path) -> None:
    """With room for one sensitivity probe, the weight-rounding prior picks fc2 (the outlier)."""
    source = sensitive_model(tmp_path / "s.onnx")
    step = Quantize(mode="dynamic", per_channel=False)
    result = quantize_onnx(
        source,
        tmp_path / "o.onnx",
        step,
        calibration=None,
        evaluate=fidelity_to(source),
        max_drop=0.01,
        max_evaluations=3,
        progress=False,
    )
    probes = [t.kept_float for t in result.trials if t.purpose == "sensitivity"]
    assert probes == [("fc2",)]
    assert result.met and result.fallback_nodes == ("fc2",)
    assert len(result.trials) == 2


def test_greedy_fallback_keeps_adding_nodes_until_it_fits(tmp_path: Path) -> None:
    """A scorer that needs two specific nodes back: the search finds a set that fits."""
    source = sensitive_model(tmp_path / "s.onnx")
    names = ("fc2", "fc3")

    def needs_two(path: Path) -> float:
        if path == source:
            return 1.0
        floats = {n.name for n in onnx.load(str(path)).graph.node if n.op_type == "MatMul"}
        return 0.5 + 0.25 * len(floats & set(names))

    step = Quantize(mode="dynamic", per_channel=False)
    result = quantize_onnx(
        source,
        tmp_path / "o.onnx",
        step,
        calibration=None,
        evaluate=needs_two,
        max_drop=0.0,
        progress=False,
    )
    assert result.met
    assert set(result.fallback_nodes) == set(names)
    assert any(t.purpose == "fallback" for t in result.trials)


# ------------------------------------------------------------------ the prior


def test_the_rounding_prior_notices_an_outlier_that_a_norm_would_hide() -> None:
    rng = np.random.default_rng(0)
    typical = rng.normal(0, 0.1, 1000)
    with_outlier = typical.copy()
    with_outlier[0] = 1000.0
    plain = rounding_error(typical, "static", symmetric=True)
    stretched = rounding_error(with_outlier, "static", symmetric=True)
    assert plain < 0.1 < 0.9 < stretched
    # an attention-mask-like activation: scores of a few units plus -3.4e38 where masked
    scores = rng.normal(0, 3, 1000)
    scores[::3] = -3.4e38
    assert rounding_error(scores, "static", symmetric=False) > 0.6
    # fp16: overflow loses the value entirely, ordinary values barely change
    assert rounding_error(np.array([1e6, 1.0]), "fp16", symmetric=True) == pytest.approx(0.5)
    assert rounding_error(typical, "fp16", symmetric=True) < 1e-3


def test_node_priors_rank_the_outlier_layer_first(tmp_path: Path) -> None:
    source = sensitive_model(tmp_path / "s.onnx")
    model = onnx.load(str(source))
    weights_only = node_priors(model, "dynamic")
    assert max(weights_only, key=lambda n: weights_only[n]) == "fc2"
    acts = activation_errors(source, FEEDS, "static", batch=16)
    assert set(acts) >= {"x", "a", "ar", "b", "br"}
    with_acts = node_priors(model, "static", acts)
    assert max(with_acts, key=lambda n: with_acts[n]) == "fc2"
