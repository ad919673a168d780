"""ItalyPowerDemand workload: real data from sktime, a tiny CNN, real onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from controller.workloads.base import WorkloadData
from controller.workloads.italy_power import (
    CLASS_NAMES,
    INPUT_NAME,
    OUTPUT_NAME,
    STEPS,
    ItalyNet,
    ItalyPowerWorkload,
)
from controller.workloads.training import logits_torch, run_onnx


@pytest.fixture(scope="module")
def workload() -> ItalyPowerWorkload:
    return ItalyPowerWorkload()


@pytest.fixture(scope="module")
def data(workload: ItalyPowerWorkload) -> WorkloadData:
    return workload.data()


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, workload: ItalyPowerWorkload
) -> tuple[torch.nn.Module, Path]:
    """Default epochs: under a second on one thread."""
    cache = tmp_path_factory.mktemp("italy-cache")
    model = workload.source_model(cache, seed=0)
    path = workload.export_onnx(model, cache / "italy.onnx")
    return model, path


def test_splits_shapes_and_labels(data: WorkloadData) -> None:
    assert len(data.train) + len(data.val) == 67
    assert len(data.test) == 1029
    assert data.class_names == CLASS_NAMES
    for split in (data.train, data.val, data.test):
        x = split.inputs[INPUT_NAME]
        assert x.dtype == np.float32 and x.shape[1:] == (1, STEPS)
        assert split.labels is not None and split.labels.dtype == np.int64
        assert set(split.labels.tolist()) == {0, 1}
    # Stratified: the val split holds both seasons in about TRAIN's proportions (34/33).
    assert data.val.labels is not None
    assert np.bincount(data.val.labels).tolist() == [7, 7]


def test_exported_model_signature_and_dynamic_batch(
    trained: tuple[torch.nn.Module, Path], data: WorkloadData
) -> None:
    model, path = trained
    proto = onnx.load(str(path))
    (x,) = proto.graph.input
    (y,) = proto.graph.output
    assert (x.name, y.name) == (INPUT_NAME, OUTPUT_NAME)
    dims = x.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, STEPS]
    xs = data.test.inputs[INPUT_NAME][:5]
    batch = run_onnx(path, {INPUT_NAME: xs}, OUTPUT_NAME)
    singles = np.concatenate(
        [run_onnx(path, {INPUT_NAME: xs[i : i + 1]}, OUTPUT_NAME) for i in range(5)]
    )
    np.testing.assert_allclose(singles, batch, atol=1e-5)
    np.testing.assert_allclose(batch, logits_torch(model, torch.from_numpy(xs)).numpy(), atol=1e-4)


def test_score_onnx_equals_torch_accuracy(
    workload: ItalyPowerWorkload, trained: tuple[torch.nn.Module, Path], data: WorkloadData
) -> None:
    model, path = trained
    logits = logits_torch(model, torch.from_numpy(data.test.inputs[INPUT_NAME])).numpy()
    torch_accuracy = float((logits.argmax(1) == data.test.labels).mean())
    score = workload.score_onnx(path)
    assert score.metric == "accuracy" and score.samples == 1029
    assert score.value == torch_accuracy
    assert score.value >= 0.95


def test_raw_readings_in_any_unit_give_the_same_answer(
    trained: tuple[torch.nn.Module, Path], data: WorkloadData
) -> None:
    """The z-normalisation is inside the model: kW with an offset is the same day."""
    _, path = trained
    xs = np.asarray(data.test.inputs[INPUT_NAME][:50], dtype=np.float32)
    want = run_onnx(path, {INPUT_NAME: xs}, OUTPUT_NAME)
    kilowatts = (xs * 250 + 1800).astype(np.float32)
    got = run_onnx(path, {INPUT_NAME: kilowatts}, OUTPUT_NAME)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_unknown_split_is_refused(
    workload: ItalyPowerWorkload, trained: tuple[torch.nn.Module, Path]
) -> None:
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        workload.score_onnx(trained[1], split="dev")


def test_input_preprocessor_is_the_z_score(workload: ItalyPowerWorkload) -> None:
    model = ItalyNet()
    assert workload.input_preprocessor(model) is model.norm
