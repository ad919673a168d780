"""Learned step-size quantization: steps that train, an export that stores them, the planner.

Real torch training, real ONNX export and onnxruntime; a tiny CNN on synthetic sines.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from artifact import runtime_hints
from controller.compression import candidates
from controller.compression.errors import UnsupportedModelError
from controller.compression.executor import OnnxSource, TorchSource
from controller.compression.learned import (
    WEIGHT_RANGES,
    WEIGHT_TYPES,
    QatModel,
    calibrated_qat,
    export_learned,
    learned_quantize,
    prepare_qat,
    train_learned,
)
from controller.compression.measure import session_options
from controller.compression.planner import plan, size_floor
from controller.compression.recipe import (
    LEARNED_WEIGHT_BITS,
    STEP_ADAPTER,
    LearnedQuantize,
    Quantize,
    Recipe,
    StructuredPrune,
)
from controller.compression.training import TrainOptions
from controller.device_classes import load_device_class
from controller.workloads.base import Score, TaskKind, Workload, WorkloadData
from controller.workloads.training import export_single_input, score_classifier, select_split
from tests.compression.test_planner import CAMERA, _measure
from tests.compression.test_training import (
    QUIET,
    TinyCNN,
    TinyResNet,
    synthetic_split,
    trained,
)

TRAIN = synthetic_split()
VAL = synthetic_split(n=48, seed=1)
CALIBRATION = TRAIN.spread(32).inputs
OPTIONS = TrainOptions(show_progress=False, batch_size=16)


class SinesWorkload(Workload):
    """A workload over the synthetic sines: what the planner and the executor need."""

    name = "sines"
    kind = TaskKind.CLASSIFICATION
    input_names = ("x",)
    output_names = ("logits",)

    def __init__(self, width: int = 16) -> None:
        self.width = width

    def data(self) -> WorkloadData:
        return WorkloadData(TRAIN, VAL, VAL, ("a", "b", "c"))

    def source_model(self, cache_dir: Path | None = None, *, seed: int = 0) -> nn.Module:
        return trained(lambda: TinyCNN(width=self.width), TRAIN, epochs=8, seed=seed).eval()

    def export_onnx(self, model: nn.Module, path: Path) -> Path:
        return export_single_input(
            model, path, torch.zeros(1, 3, 32), input_name="x", output_name="logits",
            metadata={}, doc="sines",
        )  # fmt: skip

    def score_onnx(self, path: Path, *, split: str = "test") -> Score:
        return score_classifier(path, select_split(self.data(), split), "logits")


@pytest.fixture(scope="module")
def source() -> nn.Module:
    return trained(lambda: TinyCNN(width=16), TRAIN, epochs=8)


@pytest.fixture(scope="module")
def wide() -> nn.Module:
    """Wide enough (13k weights) that bytes are mostly weights, not graph and scales."""
    return SinesWorkload(width=64).source_model()


def _initializers(path: Path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def _trained(
    model: nn.Module, bits: int
) -> tuple[QatModel, dict[str, tuple[np.ndarray, float, int]]]:
    step = LearnedQuantize(weight_bits=bits, epochs=3, lr=1e-2)
    qat, initial, fit = train_learned(model, step, TRAIN, VAL, CALIBRATION, options=OPTIONS)
    assert fit.epochs == 3
    return qat, initial


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_step_sizes_move_and_the_export_stores_exactly_them(
    source: nn.Module, bits: int, tmp_path: Path
) -> None:
    qat, initial = _trained(source, bits)
    final = qat.steps()
    assert set(final) == {"features.0.0", "features.1.0", "head"}  # BatchNorm folded away
    for name, (weight_steps, input_step, _zero) in final.items():
        assert not np.allclose(weight_steps, initial[name][0], rtol=1e-4), name
        assert input_step != pytest.approx(initial[name][1], rel=1e-5), name

    out = tmp_path / "learned.onnx"
    diff = export_learned(qat, SinesWorkload().export_onnx, out, CALIBRATION)
    inits = _initializers(out)
    kind = onnx.TensorProto.INT8 if bits == 8 else onnx.TensorProto.INT4  # 2, 3 bits: INT4 too
    assert WEIGHT_TYPES[bits] == kind
    low, high = WEIGHT_RANGES[bits]
    for name, (weight_steps, input_step, zero) in final.items():
        stored = onnx.numpy_helper.to_array(inits[f"lsq/{name}/weight_scale"])
        np.testing.assert_array_equal(stored, weight_steps)
        q = inits[f"lsq/{name}/weight_q"]
        assert q.data_type == kind
        ints = onnx.numpy_helper.to_array(q).astype(np.int64)
        assert low <= ints.min() and ints.max() <= high
        channels = ints.reshape(len(weight_steps), -1)  # the torch layout: [out, ...]
        assert max(len(np.unique(c)) for c in channels) <= min(2**bits, high - low + 1)
        layer = qat.layers[name]
        want = layer.weight_quant(layer.layer.weight).detach().numpy()
        scale = weight_steps.reshape(-1, *([1] * (ints.ndim - 1)))
        np.testing.assert_array_equal(ints.astype(np.float32) * scale, want)  # DQ(ints)
        (input_scale,) = [k for k in inits if k.startswith(f"lsq/{name}/") and "input_scale" in k]
        assert float(onnx.numpy_helper.to_array(inits[input_scale])) == np.float32(input_step)
        zp = inits[input_scale.replace("input_scale", "input_zero_point")]
        assert int(onnx.numpy_helper.to_array(zp)) == zero
    assert not any(t.data_type == onnx.TensorProto.FLOAT and t.dims and "weight" in t.name
                   and len(t.dims) > 1 for t in inits.values())  # fmt: skip

    # onnxruntime (with its Q/DQ fusions) computes what the fake-quantized torch model does
    x = VAL.inputs["x"].astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        want = qat.model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert diff < 0.02 * np.abs(want).max()  # what export_learned measured on calibration
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95


@pytest.mark.parametrize("build", [TinyCNN, TinyResNet], ids=["chain", "residual"])
def test_int8_export_runs_every_conv_on_integers_in_onnxruntime(
    build: type[nn.Module], tmp_path: Path
) -> None:
    """Every Conv becomes a QLinearConv: outputs that feed the next layer through ReLU
    reuse its input quantizer, outputs that reach a mean, an add or a branch get their
    own; onnxruntime still computes what the fake-quantized torch model does."""
    model = trained(lambda: build(width=16), TRAIN, epochs=2)
    step = LearnedQuantize(weight_bits=8, epochs=1, lr=1e-2)
    qat, _initial, _fit = train_learned(model, step, TRAIN, VAL, CALIBRATION, options=OPTIONS)
    assert qat.integer_outputs
    own = sorted(name for name, layer in qat.layers.items() if layer.output_quant is not None)
    if build is TinyCNN:  # conv 1 -> ReLU -> conv 2 needs none; conv 2 -> ReLU -> mean does
        assert own == ["features.1.0"]
    else:  # the stem branches into a block; each conv2 meets an add; conv1s feed conv2s
        assert own == ["blocks.0.conv2", "blocks.1.conv2", "stem.0"]
    assert qat.layers["head"].output_quant is None  # the logits stay float

    out = tmp_path / "w8.onnx"
    export_learned(qat, SinesWorkload().export_onnx, out, CALIBRATION)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(out)).graph.node)
    kernels = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert kernels.count("QLinearConv") == convs > 0, kernels
    assert not {"Conv", "FusedConv"} & set(kernels), kernels

    x = VAL.inputs["x"].astype(np.float32)
    got = session.run(None, {"x": x})[0]
    with torch.no_grad():
        want = qat.model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def test_low_bit_and_float_output_exports_keep_float_outputs(
    source: nn.Module, tmp_path: Path
) -> None:
    """onnxruntime has no integer kernel for INT4 weights: quantizing outputs there would
    only add error, so 2-4 bit layers get no output quantizer and no output Q/DQ; nor do
    8-bit ones asked for float outputs (fewer roundings)."""
    for step in (
        LearnedQuantize(weight_bits=4),
        LearnedQuantize(weight_bits=8, integer_outputs=False),  # asked for float outputs
    ):
        qat = calibrated_qat(source, step, CALIBRATION)
        assert not qat.integer_outputs
        assert all(layer.output_quant is None for layer in qat.layers.values())
        out = tmp_path / f"w{step.weight_bits}.onnx"
        export_learned(qat, SinesWorkload().export_onnx, out, CALIBRATION)
        assert not any(n.name.startswith("lsq/output/") for n in onnx.load(str(out)).graph.node)


def test_int4_exports_ask_for_their_weights_folded_at_load(
    source: nn.Module, tmp_path: Path
) -> None:
    """No integer kernel takes INT4 Conv weights, so the artifact asks (in its metadata)
    for the dequantization to be folded once at load instead of at every call; the
    planner's sessions apply it (and compute the fake-quantized model exactly), int8
    exports ask nothing."""
    qat = calibrated_qat(source, LearnedQuantize(weight_bits=4), CALIBRATION)
    out = tmp_path / "w4.onnx"
    export_learned(qat, SinesWorkload().export_onnx, out, CALIBRATION)
    config = runtime_hints.session_config_of_file(out)
    assert config == {"session.disable_quant_qdq": "1"}

    def optimized(settings: dict[str, str], name: str) -> tuple[list[str], np.ndarray]:
        options = session_options(1, settings)
        options.optimized_model_filepath = str(tmp_path / name)
        session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": VAL.inputs["x"].astype(np.float32)})[0]
        graph = onnx.load(options.optimized_model_filepath).graph
        return [i for n in graph.node if n.op_type == "DequantizeLinear" for i in n.input], got

    folded_inputs, folded = optimized(config, "folded.onnx")
    kept_inputs, kept = optimized({}, "kept.onnx")
    assert any(i.endswith("/weight_q") for i in kept_inputs)  # dequantized at every call
    assert not any(i.endswith("/weight_q") for i in folded_inputs)  # folded at load
    with torch.no_grad():
        want = qat.model(torch.from_numpy(VAL.inputs["x"].astype(np.float32))).numpy()
    # Folded, onnxruntime computes exactly what the fake-quantized model does; with its
    # Q/DQ rewrites (kept) it only comes close.
    np.testing.assert_allclose(folded, want, rtol=1e-5, atol=1e-5)
    assert np.abs(kept - want).max() < 0.02 * np.abs(want).max()

    qat8 = calibrated_qat(source, LearnedQuantize(weight_bits=8), CALIBRATION)
    out8 = tmp_path / "w8.onnx"
    export_learned(qat8, SinesWorkload().export_onnx, out8, CALIBRATION)
    assert runtime_hints.session_config_of_file(out8) == {}  # QLinearConv wants its Q/DQ


def test_training_only_the_steps_leaves_the_weights_as_they_were(source: nn.Module) -> None:
    step = LearnedQuantize(weight_bits=8, epochs=2, lr=1e-2, train="steps")
    qat, initial, _fit = train_learned(source, step, TRAIN, VAL, CALIBRATION, options=OPTIONS)
    folded = prepare_qat(source, step)  # the same folding, untrained
    for name, layer in qat.layers.items():
        assert torch.equal(layer.layer.weight, folded.layers[name].layer.weight), name
        assert not np.allclose(qat.steps()[name][0], initial[name][0], rtol=1e-4), name


def test_calibrate_only_exports_the_initial_steps_untrained(
    source: nn.Module, tmp_path: Path
) -> None:
    """Post-training quantization by the same quantizer: the calibrated initial steps,
    stored as they are, and an onnxruntime model that computes the untrained one."""
    step = LearnedQuantize(weight_bits=3, epochs=5, lr=1e-1)  # both unused: nothing trains
    workload = SinesWorkload()
    result = learned_quantize(
        workload, source, step, tmp_path / "w3.onnx", options=OPTIONS, calibrate_only=True
    )
    assert result.fit is None and result.weight_type == "int4"
    reference = calibrated_qat(source, step, workload.calibration_inputs())  # built apart
    inits = _initializers(result.out)
    low, high = WEIGHT_RANGES[3]
    for layer in result.layers:
        quant = reference.layers[layer.layer]
        initial = quant.weight_quant.initial.numpy()
        np.testing.assert_array_equal(layer.weight_step, layer.initial_weight_step)
        np.testing.assert_array_equal(layer.weight_step, initial)
        stored = onnx.numpy_helper.to_array(inits[f"lsq/{layer.layer}/weight_scale"])
        np.testing.assert_array_equal(stored, initial)
        (input_scale,) = [
            k for k in inits if k.startswith(f"lsq/{layer.layer}/") and "input_scale" in k
        ]
        assert float(onnx.numpy_helper.to_array(inits[input_scale])) == np.float32(
            quant.input_quant.initial
        )
        ints = onnx.numpy_helper.to_array(inits[f"lsq/{layer.layer}/weight_q"]).astype(np.int64)
        assert low <= ints.min() and ints.max() <= high
        want = quant.weight_quant(quant.layer.weight).detach().numpy()  # untrained weights
        scale = initial.reshape(-1, *([1] * (ints.ndim - 1)))
        np.testing.assert_array_equal(ints.astype(np.float32) * scale, want)

    x = VAL.inputs["x"].astype(np.float32)
    session = ort.InferenceSession(str(result.out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    with torch.no_grad():
        want = reference.model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95


def test_learned_quantize_on_a_workload_writes_a_smaller_model_that_still_classifies(
    wide: nn.Module, tmp_path: Path
) -> None:
    workload = SinesWorkload(width=64)
    float_path = workload.export_onnx(wide, tmp_path / "float.onnx")
    result = learned_quantize(
        workload, wide, LearnedQuantize(weight_bits=4, epochs=2), tmp_path / "w4.onnx",
        options=OPTIONS,
    )  # fmt: skip
    assert result.weight_type == "int4" and result.bytes == result.out.stat().st_size
    assert result.bytes < float_path.stat().st_size / 3
    assert workload.score_onnx(result.out, split="val").value >= 0.8
    assert len(result.layers) == 3


def test_bad_parameters_are_refused_with_what_is_expected() -> None:
    for bits in (0, 1, 5, 6, 7, 9, 16):
        with pytest.raises(ValidationError, match=r"weight_bits\n.*must be 2, 3, 4 or 8"):
            LearnedQuantize(weight_bits=bits)
    assert [LearnedQuantize(weight_bits=b).weight_bits for b in (2, 3, 4, 8)] == [2, 3, 4, 8]
    assert set(WEIGHT_RANGES) == set(WEIGHT_TYPES) == set(LEARNED_WEIGHT_BITS)
    with pytest.raises(ValidationError, match="must be 8"):
        LearnedQuantize(activation_bits=4)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        LearnedQuantize(epochs=0)
    with pytest.raises(ValidationError, match="greater than 0"):
        LearnedQuantize(lr=0)
    with pytest.raises(ValidationError, match="must be the recipe's last step"):
        Recipe(steps=(LearnedQuantize(), Quantize()))
    # torch steps may come first; the step round-trips through its manifest form
    recipe = Recipe(steps=(StructuredPrune(ratio=0.5), LearnedQuantize(weight_bits=8)))
    assert recipe.needs_torch
    manifest = recipe.to_manifest()[-1]
    assert manifest.kind == "quantize.learned" and manifest.params["weight_bits"] == 8
    again = STEP_ADAPTER.validate_python({"kind": manifest.kind, **manifest.params})
    assert again == LearnedQuantize(weight_bits=8)


def test_a_model_without_conv_or_linear_layers_is_refused(tmp_path: Path) -> None:
    step = LearnedQuantize(epochs=1)
    with pytest.raises(UnsupportedModelError, match="no Conv or Linear layer"):
        train_learned(nn.Flatten(), step, TRAIN, VAL, CALIBRATION, options=OPTIONS)


def test_an_onnx_file_alone_cannot_be_learned_quantized(tmp_path: Path, source: nn.Module) -> None:
    path = SinesWorkload().export_onnx(source, tmp_path / "float.onnx")
    builder = OnnxSource(path, CALIBRATION)
    with pytest.raises(UnsupportedModelError, match="needs a PyTorch model"):
        builder.build(Recipe(steps=(LearnedQuantize(),)), tmp_path / "out")


def test_the_planner_turns_to_learned_quantization_when_post_training_int8_cannot_fit(
    wide: nn.Module, tmp_path: Path
) -> None:
    """Learned steps follow post-training int8 in the candidates; the planner reaches
    them when int8 misses, and the trial records the step with its parameters."""
    order = [r.steps[-1] for r in candidates.torch_classifier_recipes()][:5]
    assert order == [
        candidates.INT8_STATIC, candidates.INT8_DYNAMIC,
        candidates.LEARNED_INT8, candidates.LEARNED_INT8_FLOAT_OUTPUTS, candidates.LEARNED_INT4,
    ]  # fmt: skip
    assert candidates.LEARNED_INT8.integer_outputs  # fast first, then fewer roundings
    assert not candidates.LEARNED_INT8_FLOAT_OUTPUTS.integer_outputs
    assert size_floor(Recipe(steps=(candidates.LEARNED_INT4,)), 1000) == 100

    workload, model = SinesWorkload(width=64), wide
    source_bytes = workload.export_onnx(model, tmp_path / "source.onnx").stat().st_size
    # below what int8 weights reach, within 4-bit weights' reach (graph and scales included)
    dc = load_device_class(CAMERA).with_budgets(
        max_artifact_bytes=int(source_bytes * 0.23), max_accuracy_drop=0.2,
        p95_latency_ms=10_000, energy_per_inference_mj=10_000,
    )  # fmt: skip
    quick = [
        Recipe(steps=(candidates.INT8_STATIC,)),
        Recipe(steps=(candidates.INT8_DYNAMIC,)),
        Recipe(steps=(candidates.LEARNED_INT8.model_copy(update={"epochs": 2}),)),
        Recipe(steps=(candidates.LEARNED_INT4.model_copy(update={"epochs": 2}),)),
    ]
    builder = TorchSource(workload, model, max_accuracy_drop=0.2, options=QUIET)
    result = plan(quick, builder, _measure(CALIBRATION), dc, tmp_path / "plan")
    assert result.met
    chosen = result.best
    assert chosen.recipe.steps[-1].kind == "quantize.learned"
    assert len(result.trials) == 5 and chosen is result.trials[4]
    for missed in result.trials[1:4]:  # built and judged: int8 weights are too many bytes
        assert not missed.error and not missed.met
        assert [v.budget for v in missed.verdicts if not v.met] == ["max_artifact_bytes"]
    recorded = json.loads(json.dumps(chosen.as_json()))
    assert recorded["recipe"][0]["kind"] == "quantize.learned"
    assert recorded["recipe"][0]["params"]["weight_bits"] == 4
    assert recorded["recipe_text"].startswith("quantize.learned(")
