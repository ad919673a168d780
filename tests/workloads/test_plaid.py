"""PLAID workload: real data from sktime, a residual 1D-CNN, real onnxruntime.

Most tests train for one or two epochs in a temporary cache. One test,
``test_source_model_reaches_the_accuracy_bar``, uses the real source model from the
repository cache (.cache/homefleet/workloads/plaid-seed0.pt) and TRAINS IT WHEN ABSENT:
about 30-40 s on one core (60 epochs), longer on a heavily loaded machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from controller.workloads.base import WorkloadData
from controller.workloads.plaid import (
    INPUT_NAME,
    N_CLASSES,
    OUTPUT_NAME,
    STEPS,
    PlaidNet,
    PlaidWorkload,
    load_split,
    preprocess,
)
from controller.workloads.training import logits_torch, run_onnx, save_cached


@pytest.fixture(scope="module")
def data() -> WorkloadData:
    return PlaidWorkload().data()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[PlaidWorkload, torch.nn.Module, Path]:
    """Two epochs: enough for a model that predicts more than one class."""
    workload = PlaidWorkload(epochs=2)
    cache = tmp_path_factory.mktemp("plaid-cache")
    model = workload.source_model(cache, seed=0)
    return workload, model, workload.export_onnx(model, cache / "plaid.onnx")


def test_raw_series_have_variable_length() -> None:
    series, labels = load_split("test")
    assert len(series) == len(labels) == 537
    lengths = {len(s) for s in series}
    assert min(lengths) >= 100 and max(lengths) <= 1344 and len(lengths) > 10


def test_preprocess_pads_and_truncates() -> None:
    out = preprocess([np.arange(3.0), np.ones(STEPS + 100)])
    assert out.shape == (2, 1, STEPS) and out.dtype == np.float32
    assert out[0, 0, :4].tolist() == [0.0, 1.0, 2.0, 0.0]
    assert not out[0, 0, 3:].any()
    assert (out[1, 0] == 1).all()


def test_splits_shapes_and_labels(data: WorkloadData) -> None:
    assert len(data.train) + len(data.val) == 537
    assert len(data.test) == 537
    assert len(data.class_names) == N_CLASSES
    for split in (data.train, data.val, data.test):
        x = split.inputs[INPUT_NAME]
        assert x.dtype == np.float32 and x.shape[1:] == (1, STEPS)
        assert split.labels is not None and split.labels.dtype == np.int64
        assert set(split.labels.tolist()) == set(range(N_CLASSES))
    # Stratified: every class is in val, at about a fifth of its TRAIN count.
    assert data.train.labels is not None and data.val.labels is not None
    train_counts = np.bincount(data.train.labels, minlength=N_CLASSES)
    val_counts = np.bincount(data.val.labels, minlength=N_CLASSES)
    share = val_counts / (train_counts + val_counts)
    assert share.min() > 0.14 and share.max() < 0.26


def test_exported_model_signature_and_dynamic_batch(
    tiny: tuple[PlaidWorkload, torch.nn.Module, Path], data: WorkloadData
) -> None:
    _, model, path = tiny
    proto = onnx.load(str(path))
    (x,) = proto.graph.input
    (y,) = proto.graph.output
    assert (x.name, y.name) == (INPUT_NAME, OUTPUT_NAME)
    assert x.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = x.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, STEPS]
    assert y.type.tensor_type.shape.dim[1].dim_value == N_CLASSES
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["task"] == "classification" and props["workload"] == "plaid"
    xs = data.test.inputs[INPUT_NAME][:4]
    batch = run_onnx(path, {INPUT_NAME: xs}, OUTPUT_NAME)
    singles = np.concatenate(
        [run_onnx(path, {INPUT_NAME: xs[i : i + 1]}, OUTPUT_NAME) for i in range(4)]
    )
    np.testing.assert_allclose(singles, batch, atol=1e-4)
    want = logits_torch(model, torch.from_numpy(xs)).numpy()
    np.testing.assert_allclose(batch, want, atol=1e-3, rtol=1e-4)


def test_score_onnx_equals_torch_accuracy(
    tiny: tuple[PlaidWorkload, torch.nn.Module, Path], data: WorkloadData
) -> None:
    workload, model, path = tiny
    for split_name, split in (("test", data.test), ("val", data.val)):
        logits = logits_torch(model, torch.from_numpy(split.inputs[INPUT_NAME])).numpy()
        want = float((logits.argmax(1) == split.labels).mean())
        score = workload.score_onnx(path, split=split_name)
        assert score.metric == "accuracy" and score.samples == len(split)
        assert score.value == want


def test_model_takes_raw_current_and_holds_no_statistics() -> None:
    """The log/z-score transform is a parameter-free first layer: nothing to ship beside it."""
    model = PlaidNet().eval()
    assert not list(model.norm.parameters()) and not list(model.norm.buffers())
    x = torch.tensor([[[-300.0, -1e-6, 0.0, 1e-6, 300.0]]])
    both = model.norm(x)
    assert both.shape == (1, 2, 5)
    assert torch.isfinite(both).all() and both.abs().max() < 3


def test_cache_is_written_reused_and_replaced_when_unreadable(tmp_path: Path) -> None:
    workload = PlaidWorkload(epochs=1)
    first = workload.source_model(tmp_path, seed=3)
    path = tmp_path / "plaid-seed3-e1.pt"
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    again = workload.source_model(tmp_path, seed=3)
    assert path.stat().st_mtime_ns == stamp  # loaded, not retrained and rewritten
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    path.write_bytes(b"truncated")
    retrained = workload.source_model(tmp_path, seed=3)
    assert path.stat().st_size > 1000
    for key, value in first.state_dict().items():
        assert torch.equal(value, retrained.state_dict()[key])  # same seed, same weights


def test_cache_of_another_architecture_is_retrained(tmp_path: Path) -> None:
    workload = PlaidWorkload(epochs=1)
    save_cached(tmp_path / "plaid-seed0-e1.pt", PlaidNet((8, 8, 8)), {"architecture": "old"})
    model = workload.source_model(tmp_path, seed=0)
    assert isinstance(model, PlaidNet) and model.head.in_features == 96


def test_source_model_reaches_the_accuracy_bar(tmp_path: Path) -> None:
    """The real source model (cached in the repo's .cache; trains ~30-40 s when absent)."""
    workload = PlaidWorkload()
    model = workload.source_model(seed=0)
    score = workload.score_onnx(workload.export_onnx(model, tmp_path / "plaid.onnx"))
    assert score.value >= 0.85


def test_input_preprocessor_is_the_parameter_free_transform() -> None:
    model = PlaidNet()
    pre = PlaidWorkload().input_preprocessor(model)
    assert pre is model.norm
    assert pre(torch.zeros(2, 1, STEPS)).shape == (2, 2, STEPS)
