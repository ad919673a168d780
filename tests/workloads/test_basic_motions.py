"""BasicMotions reference workload: real data from sktime, a real 1D-CNN, real onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from controller.workloads.basic_motions import (
    CHANNELS,
    INPUT_NAME,
    LABELS,
    OUTPUT_NAME,
    STEPS,
    BasicMotionsData,
    TrainConfig,
    TrainResult,
    export_onnx,
    load_basic_motions,
    predict_onnx,
    predict_torch,
    train_and_export,
    train_model,
)


@pytest.fixture(scope="module")
def data() -> BasicMotionsData:
    return load_basic_motions()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data: BasicMotionsData) -> TrainResult:
    """Train once per module with the default seed and epochs (about a second on 2 cores)."""
    return train_and_export(tmp_path_factory.mktemp("bm"), show_progress=False, data=data)


def test_loader_gives_both_splits_with_fixed_sorted_labels(data: BasicMotionsData) -> None:
    assert data.x_train.shape == (40, CHANNELS, STEPS)
    assert data.x_test.shape == (40, CHANNELS, STEPS)
    assert data.x_train.dtype == np.float32 and data.x_test.dtype == np.float32
    assert data.labels == LABELS == tuple(sorted(LABELS))
    assert len(LABELS) == 4
    for y in (data.y_train, data.y_test):
        assert y.dtype == np.int64
        assert y.shape == (40,)
        # BasicMotions is balanced: ten of each activity in each split.
        assert np.bincount(y, minlength=4).tolist() == [10, 10, 10, 10]


def test_exported_model_has_the_wire_signature(trained: TrainResult) -> None:
    model = onnx.load(str(trained.onnx_path))
    (x,) = model.graph.input
    (logits,) = model.graph.output
    assert x.name == INPUT_NAME and logits.name == OUTPUT_NAME
    assert x.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = x.type.tensor_type.shape.dim
    assert dims[0].dim_param  # dynamic batch
    assert [d.dim_value for d in dims[1:]] == [CHANNELS, STEPS]
    out_dims = logits.type.tensor_type.shape.dim
    assert out_dims[1].dim_value == len(LABELS)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["labels"] == '["badminton", "running", "standing", "walking"]'


def test_onnxruntime_predictions_equal_torch_on_the_test_set(
    tmp_path: Path, data: BasicMotionsData
) -> None:
    model = train_model(data, TrainConfig(epochs=5), show_progress=False)
    path = export_onnx(model, tmp_path / "m.onnx")
    want = predict_torch(model, data.x_test)
    got = predict_onnx(path, data.x_test)
    np.testing.assert_array_equal(got.argmax(axis=1), want.argmax(axis=1))
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-4)
    # Batch is dynamic: one sample at a time gives the same logits as the whole batch.
    single = np.concatenate([predict_onnx(path, data.x_test[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(single, got[:3], atol=1e-4, rtol=1e-4)


def test_default_training_reaches_the_accuracy_bar(trained: TrainResult) -> None:
    assert trained.test_accuracy_torch >= 0.9
    assert trained.test_accuracy_onnx == trained.test_accuracy_torch
    assert trained.labels == LABELS


def test_normalisation_is_inside_the_model(data: BasicMotionsData, trained: TrainResult) -> None:
    """The device sends raw sensor values: the model itself must take them as they are."""
    logits = predict_onnx(trained.onnx_path, data.x_test)
    assert float((logits.argmax(axis=1) == data.y_test).mean()) >= 0.9
    # Raw channels are far from standardised (std up to ~7), so the model must normalise.
    assert float(data.x_test.std(axis=(0, 2)).max()) > 3.0


def test_same_seed_gives_the_same_model(tmp_path: Path, data: BasicMotionsData) -> None:
    a = train_and_export(tmp_path / "a", epochs=3, show_progress=False, data=data)
    b = train_and_export(tmp_path / "b", epochs=3, show_progress=False, data=data)
    assert a.onnx_path.read_bytes() == b.onnx_path.read_bytes()


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 0), ("batch_size", 0), ("learning_rate", 0.0), ("scale_jitter", 1.0)],
)
def test_bad_training_config_is_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})  # type: ignore[arg-type]
