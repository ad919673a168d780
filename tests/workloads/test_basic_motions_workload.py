"""BasicMotions behind the Workload interface (the module's own functions are tested apart)."""

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
    BasicMotionsWorkload,
    MotionCNN,
)
from controller.workloads.training import run_onnx


@pytest.fixture(scope="module")
def workload() -> BasicMotionsWorkload:
    return BasicMotionsWorkload()


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, workload: BasicMotionsWorkload
) -> tuple[Path, Path]:
    """(cache dir, ONNX path); default epochs, about a second on one core."""
    cache = tmp_path_factory.mktemp("bm-cache")
    model = workload.source_model(cache, seed=0)
    return cache, workload.export_onnx(model, cache / "bm.onnx")


def test_val_is_carved_from_train_two_per_activity(workload: BasicMotionsWorkload) -> None:
    data = workload.data()
    assert (len(data.train), len(data.val), len(data.test)) == (32, 8, 40)
    assert data.class_names == LABELS
    assert data.val.labels is not None and data.train.labels is not None
    assert np.bincount(data.val.labels).tolist() == [2, 2, 2, 2]
    assert np.bincount(data.train.labels).tolist() == [8, 8, 8, 8]
    assert data.train.inputs[INPUT_NAME].shape == (32, CHANNELS, STEPS)
    # No sample is in both train and val.
    train = {x.tobytes() for x in data.train.inputs[INPUT_NAME]}
    assert not train & {x.tobytes() for x in data.val.inputs[INPUT_NAME]}


def test_source_model_is_accurate_cached_and_exported(
    workload: BasicMotionsWorkload, exported: tuple[Path, Path]
) -> None:
    cache, path = exported
    assert (cache / "basic-motions-seed0.pt").is_file()
    cached = workload.source_model(cache, seed=0)
    assert isinstance(cached, MotionCNN)
    assert workload.score_onnx(path).value >= 0.9
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["task"] == "classification" and props["labels"].startswith('["badminton"')
    # The cached copy exports to the same predictions.
    other = workload.export_onnx(cached, cache / "again.onnx")
    xs = workload.data().test.inputs[INPUT_NAME]
    np.testing.assert_allclose(
        run_onnx(other, {INPUT_NAME: xs}, OUTPUT_NAME),
        run_onnx(path, {INPUT_NAME: xs}, OUTPUT_NAME),
        atol=1e-5,
    )


def test_calibration_inputs_come_from_train(workload: BasicMotionsWorkload) -> None:
    calib = workload.calibration_inputs(5)
    assert list(calib) == [INPUT_NAME] and calib[INPUT_NAME].shape == (5, CHANNELS, STEPS)
