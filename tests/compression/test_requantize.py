"""Delta-friendly recompression: a re-release quantized with the previous artifact's parameters.

The previous artifact is a real static QDQ model (quantize_onnx on a small CNN built with
onnx.helper); the "fine-tune" changes chosen weights of its float source. Deltas are the
real codec's (artifact.delta.encode_delta).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import TensorProto, numpy_helper
from typer.testing import CliRunner

from artifact.delta import encode_delta
from artifact.digest import sha256_file
from controller.compression import candidates
from controller.compression.errors import CompressionError
from controller.compression.job import compress_onnx
from controller.compression.quantize import quantize_onnx
from controller.compression.recipe import Quantize, Recipe, RequantizeLike, made_static_int8
from controller.compression.requantize import NotReusableError, requantize_like
from controller.device_classes import DeviceClass
from homefleet.cli import app
from tests.compression.test_quantize import (
    cnn_inputs,
    cnn_model,
    cosine,
    initializers,
    mlp_inputs,
    mlp_model,
    run,
)

Change = Callable[[str, NDArray[np.float32]], NDArray[np.float32]]
QDQ_PARAMETERS = ("_scale", "_zero_point")
# Generous time and size budgets: these tests are about which recipe wins on quality.
DEVICE_CLASS = DeviceClass.model_validate(
    {
        "name": "test-hub",
        "arch": "x86_64",
        "cores": 1,
        "relative_speed": 1.0,
        "memory_bytes": 1 << 30,
        "model_storage_bytes": 1 << 30,
        "power": {"idle_watts": 1.0, "active_watts": 2.0},
        "budgets": {"p95_latency_ms": 10_000, "min_fidelity": 0.98},
    }
)


def fine_tune(source: Path, out: Path, change: Change) -> Path:
    """A copy of ``source`` whose initializers went through ``change(name, values)``."""
    model = onnx.load(str(source))
    for init in model.graph.initializer:
        values = numpy_helper.to_array(init)
        init.CopyFrom(
            numpy_helper.from_array(change(init.name, values).astype(np.float32), init.name)
        )
    onnx.save(model, str(out))
    return out


def only(names: set[str], noise: float = 0.0, scale: float = 1.0, shift: float = 0.0) -> Change:
    rng = np.random.default_rng(7)

    def change(name: str, values: NDArray[np.float32]) -> NDArray[np.float32]:
        if name not in names:
            return values
        return values * scale + shift + rng.normal(0, noise, values.shape).astype(np.float32)

    return change


def static_int8(source: Path, out: Path, calibration: dict[str, NDArray[np.float32]]) -> Path:
    quantize_onnx(source, out, Quantize(mode="static"), calibration=calibration, progress=False)
    return out


@pytest.fixture()
def previous(tmp_path: Path) -> tuple[Path, Path]:
    """(float source, its static int8 artifact): the release devices hold."""
    source = cnn_model(tmp_path / "v1.onnx", c1=16, c2=32)
    return source, static_int8(source, tmp_path / "v1.int8.onnx", cnn_inputs())


def parameter_names(path: Path) -> list[str]:
    return [n for n in initializers(path) if n.endswith(QDQ_PARAMETERS)]


def raw(path: Path, name: str) -> bytes:
    return initializers(path)[name].SerializeToString()


# ------------------------------------------------------------------ requantize_like


def test_reused_parameters_are_the_previous_bytes_and_unchanged_weights_keep_their_integers(
    tmp_path: Path, previous: tuple[Path, Path]
) -> None:
    source, old = previous
    new = fine_tune(source, tmp_path / "v2.onnx", only({"H", "HB"}, noise=0.01))
    out = tmp_path / "v2.int8.onnx"
    report = requantize_like(old, new, out, calibration=cnn_inputs())

    assert report.out == out and report.previous_sha256 == sha256_file(old)
    assert report.refreshed == () and report.unmatched == () and report.activations_checked
    assert set(report.reused) >= {"C1", "C2", "H", "D1", "D2", "HB", "x", "logits"}
    assert parameter_names(out) == parameter_names(old)
    for name in parameter_names(old):  # every scale and zero point, byte for byte
        assert raw(out, name) == raw(old, name), name
    for name in ("C1_quantized", "C2_quantized", "D1_quantized", "D2_quantized"):
        assert raw(out, name) == raw(old, name), name  # unchanged weights: same integers
    assert raw(out, "H_quantized") != raw(old, "H_quantized")
    # the same graph: every node, the same nodes in float
    assert [n.SerializeToString() for n in onnx.load(str(out)).graph.node] == [
        n.SerializeToString() for n in onnx.load(str(old)).graph.node
    ]
    feeds = cnn_inputs(seed=3)
    assert cosine(run(out, feeds)[0], run(new, feeds)[0]) > 0.99


def test_nodes_the_previous_artifact_kept_float_stay_float_with_the_new_weights(
    tmp_path: Path,
) -> None:
    source = cnn_model(tmp_path / "v1.onnx")
    old = tmp_path / "v1.int8.onnx"
    step = Quantize(mode="static", exclude_nodes=("head",))
    quantize_onnx(source, old, step, calibration=cnn_inputs(), progress=False)
    new = fine_tune(source, tmp_path / "v2.onnx", only({"H", "C2"}, noise=0.01))
    report = requantize_like(old, new, tmp_path / "v2.int8.onnx", calibration=cnn_inputs())

    assert report.float_nodes == ("head",)
    out = initializers(report.out)
    assert out["H"].data_type == TensorProto.FLOAT and "H_quantized" not in out
    assert np.array_equal(
        numpy_helper.to_array(out["H"]), numpy_helper.to_array(initializers(new)["H"])
    )
    assert "C2" in report.reused and raw(report.out, "C2_quantized") != raw(old, "C2_quantized")


def test_reuse_makes_a_smaller_delta_than_fresh_quantization_and_hysteresis_smaller_still(
    tmp_path: Path, previous: tuple[Path, Path]
) -> None:
    source, old = previous
    everything = {t.name for t in onnx.load(str(source)).graph.initializer}
    new = fine_tune(source, tmp_path / "v2.onnx", only(everything, noise=0.002))
    fresh = static_int8(new, tmp_path / "fresh.onnx", cnn_inputs())
    reused = requantize_like(old, new, tmp_path / "reused.onnx", calibration=cnn_inputs())
    held = requantize_like(old, new, tmp_path / "held.onnx", hysteresis=0.5)

    base = old.read_bytes()
    sizes = {p.name: len(encode_delta(base, p.read_bytes())) for p in (fresh, reused.out, held.out)}
    assert sizes["reused.onnx"] < sizes["fresh.onnx"], sizes
    assert sizes["held.onnx"] < sizes["reused.onnx"], sizes
    assert sum(c.held for c in held.choices) > 0 == sum(c.held for c in reused.choices)
    assert not held.activations_checked  # no calibration: activation parameters kept as-is
    feeds = cnn_inputs(seed=3)
    for model in (reused.out, held.out):
        assert cosine(run(model, feeds)[0], run(new, feeds)[0]) > 0.99


def test_a_weight_that_would_saturate_gets_fresh_parameters_and_its_bias_follows(
    tmp_path: Path, previous: tuple[Path, Path]
) -> None:
    source, old = previous
    new = fine_tune(source, tmp_path / "v2.onnx", only({"H"}, scale=3.0))
    out = tmp_path / "v2.int8.onnx"
    report = requantize_like(old, new, out, calibration=cnn_inputs())

    # the weight, the logits it now makes (calibration shows them) and the bias that follows
    assert set(report.refreshed) == {"H", "logits", "HB"}
    weight = next(c for c in report.choices if c.tensor == "H")
    assert weight.role == "weight" and "saturate" in weight.reason
    assert weight.saturated == 0  # with its fresh parameters nothing clips
    assert "C1" in report.reused and "C2" in report.reused
    # fresh means what onnxruntime computes for this weight on its own
    fresh = static_int8(new, tmp_path / "fresh.onnx", cnn_inputs())
    scale = numpy_helper.to_array(initializers(out)["H_scale"])
    assert np.array_equal(scale, numpy_helper.to_array(initializers(fresh)["H_scale"]))
    assert raw(out, "H_scale") != raw(old, "H_scale")
    assert raw(out, "C1_scale") == raw(old, "C1_scale")
    feeds = cnn_inputs(seed=3)
    assert cosine(run(out, feeds)[0], run(new, feeds)[0]) > 0.99


def test_an_activation_that_outgrew_its_range_is_refreshed_when_calibration_shows_it(
    tmp_path: Path, previous: tuple[Path, Path]
) -> None:
    source, old = previous
    new = fine_tune(source, tmp_path / "v2.onnx", only({"D1"}, shift=10.0))  # conv1 out grows
    checked = requantize_like(old, new, tmp_path / "checked.onnx", calibration=cnn_inputs())
    unchecked = requantize_like(old, new, tmp_path / "unchecked.onnx")

    choice = next(c for c in checked.choices if c.tensor == "ar")
    assert choice.outcome == "refreshed" and choice.role == "activation"
    assert "D2" in checked.refreshed  # conv2's bias scale follows its input's
    assert "ar" in unchecked.reused and unchecked.refreshed == ()
    feeds = cnn_inputs(seed=3)
    want = run(new, feeds)[0]
    assert cosine(run(checked.out, feeds)[0], want) > cosine(run(unchecked.out, feeds)[0], want)


def test_a_tensor_whose_shape_changed_is_unmatched_and_quantized_afresh(
    tmp_path: Path, previous: tuple[Path, Path]
) -> None:
    source, old = previous
    model = onnx.load(str(source))  # a head for 12 classes instead of 10
    rng = np.random.default_rng(3)
    for init in model.graph.initializer:
        if init.name in ("H", "HB"):
            shape = (12, 32) if init.name == "H" else (12,)
            values = rng.normal(0, 0.3, shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(values, init.name))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 12
    new = tmp_path / "v2.onnx"
    onnx.save(model, str(new))
    report = requantize_like(old, new, tmp_path / "v2.int8.onnx", calibration=cnn_inputs())

    assert report.unmatched == ("H", "HB")
    assert "C1" in report.reused and "C2" in report.reused
    feeds = cnn_inputs(seed=3)
    got, want = run(report.out, feeds)[0], run(new, feeds)[0]
    assert got.shape == want.shape == (16, 12)
    assert cosine(got, want) > 0.99


@pytest.mark.parametrize("kind", ["not-onnx", "float", "dynamic-int8", "other-model"])
def test_a_previous_artifact_that_cannot_lend_its_parameters_is_refused(
    tmp_path: Path, previous: tuple[Path, Path], kind: str
) -> None:
    source, _ = previous
    bad = tmp_path / "bad.onnx"
    if kind == "not-onnx":
        bad.write_bytes(b"not a model at all")
        expected = "is not an ONNX model"
    elif kind == "float":
        bad = source
        expected = "not a static int8 (QDQ) model"
    elif kind == "dynamic-int8":
        mlp = mlp_model(tmp_path / "mlp.onnx")
        quantize_onnx(mlp, bad, Quantize(mode="dynamic"), calibration=None, progress=False)
        expected = "not a static int8 (QDQ) model"
    else:
        static_int8(mlp_model(tmp_path / "mlp.onnx"), bad, mlp_inputs())
        expected = "not quantized from this model's architecture"
    out = tmp_path / "out.onnx"
    with pytest.raises(NotReusableError, match=re.escape(expected)):
        requantize_like(bad, source, out)
    assert not out.exists()


# ------------------------------------------------------------------ the planner


def test_the_planner_tries_the_reuse_recipes_first_only_with_a_previous_artifact() -> None:
    usual = list(candidates.post_training_recipes())
    assert list(candidates.with_previous(usual, None)) == usual
    digest = "ab" * 32
    led = list(candidates.with_previous(usual, digest))
    assert led[len(candidates.REUSE_HYSTERESIS) :] == usual
    steps = [r.steps for r in led[: len(candidates.REUSE_HYSTERESIS)]]
    assert steps == [
        (RequantizeLike(previous_sha256=digest, hysteresis=h),) for h in candidates.REUSE_HYSTERESIS
    ]
    recorded = Recipe(steps=steps[0]).to_manifest()
    assert made_static_int8(recorded) and recorded[0].params["previous_sha256"] == digest


def test_compress_onnx_with_previous_picks_reuse_and_records_the_artifact_it_reused(
    tmp_path: Path, previous: tuple[Path, Path]
) -> None:
    source, old = previous
    new = fine_tune(source, tmp_path / "v2.onnx", only({"H", "HB"}, noise=0.01))
    out = tmp_path / "out"
    outcome = compress_onnx(
        new, cnn_inputs(), DEVICE_CLASS.with_budgets(max_artifact_bytes=new.stat().st_size // 2),
        out, name="cnn", previous=old,
    )  # fmt: skip

    assert outcome.met
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["kind"] for s in manifest["recipe"]] == ["quantize.reuse"]
    assert manifest["recipe"][0]["params"]["previous_sha256"] == sha256_file(old)
    trials = json.loads((out / "trials.json").read_text())
    assert trials[1]["recipe"] == manifest["recipe"] and trials[1]["met"]
    for name in parameter_names(old):
        assert raw(out / "model.onnx", name) == raw(old, name), name


def test_a_previous_artifact_of_another_model_is_refused_or_skipped_as_asked(
    tmp_path: Path, previous: tuple[Path, Path]
) -> None:
    source, _ = previous
    other = static_int8(mlp_model(tmp_path / "mlp.onnx"), tmp_path / "mlp.int8.onnx", mlp_inputs())
    budgets = DEVICE_CLASS.with_budgets(max_artifact_bytes=source.stat().st_size // 2)
    refused = tmp_path / "refused"
    with pytest.raises(CompressionError, match="architecture"):
        compress_onnx(source, cnn_inputs(), budgets, refused, name="cnn", previous=other)
    assert (
        not refused.exists()
        and sorted(p.name for p in tmp_path.iterdir() if p.name[0] == ".") == []
    )

    # found by a controller rather than named by an operator: skipped, the usual recipes run
    skipped = tmp_path / "skipped"
    outcome = compress_onnx(
        source, cnn_inputs(), budgets, skipped, name="cnn", previous=other,
        previous_required=False,
    )  # fmt: skip
    assert outcome.met
    assert all(
        not isinstance(step, RequantizeLike) for t in outcome.plan.trials for step in t.recipe.steps
    )


# ------------------------------------------------------------------ the command line


def test_the_cli_reuses_previous_and_refuses_a_bad_one_writing_nothing(
    tmp_path: Path, previous: tuple[Path, Path]
) -> None:
    source, old = previous
    new = fine_tune(source, tmp_path / "v2.onnx", only({"H", "HB"}, noise=0.01))
    calib = tmp_path / "inputs.npz"
    np.savez(calib, **cnn_inputs())
    device_class = tmp_path / "test-hub.yaml"
    device_class.write_text(json.dumps(DEVICE_CLASS.model_dump(mode="json")))  # YAML ⊃ JSON
    runner = CliRunner(env={"COLUMNS": "200"})
    base = ["compress", "--onnx", str(new), "--calib", str(calib)]
    base += ["--device-class", str(device_class), "--max-size-ratio", "0.5"]

    out = tmp_path / "out"
    result = runner.invoke(app, [*base, "--previous", str(old), "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"][0]["kind"] == "quantize.reuse"
    assert manifest["recipe"][0]["params"]["previous_sha256"] == sha256_file(old)

    for bad, message in ((new, "not a static int8"), (tmp_path / "nosuch.onnx", "does not exist")):
        refused = tmp_path / f"refused-{bad.stem}"
        result = runner.invoke(app, [*base, "--previous", str(bad), "--out", str(refused)])
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert not refused.exists()


def test_dtype_of_reused_parameters_is_the_artifacts(
    tmp_path: Path, previous: tuple[Path, Path]
) -> None:
    """Zero points keep their integer type (int8 activations and weights, int32 biases)."""
    source, old = previous
    report = requantize_like(old, source, tmp_path / "same.onnx")
    inits = initializers(report.out)
    assert inits["C1_zero_point"].data_type == TensorProto.INT8
    assert inits["D1_quantized"].data_type == TensorProto.INT32
    # the same float weights: the artifact comes back byte for byte
    assert report.out.read_bytes() == old.read_bytes()
