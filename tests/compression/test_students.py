"""Every zoo entry builds, runs, exports, and scales with its width multiplier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from controller.compression.errors import CompressionError
from controller.compression.students import (
    STUDENTS,
    build_student,
    ds_cnn1d,
    students_for,
)
from controller.compression.training import count_macs, count_parameters
from tests.compression.test_training import onnx_outputs

SHAPES: dict[str, tuple[int, ...]] = {
    "ds-cnn1d": (6, 100),
    "ds-cnn2d": (1, 20, 24),
    "mlp": (6, 100),
}


def test_the_zoo_covers_the_documented_students() -> None:
    assert set(STUDENTS) == set(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_student_builds_runs_and_exports(name: str, tmp_path: Path) -> None:
    shape = SHAPES[name]
    torch.manual_seed(0)
    model = build_student(name, shape, num_classes=5, width=0.5).eval()
    x = np.random.default_rng(0).normal(size=(3, *shape)).astype(np.float32)
    with torch.no_grad():
        assert model(torch.from_numpy(x)).shape == (3, 5)
    assert onnx_outputs(model, x, tmp_path).shape == (3, 5)
    assert name in students_for(shape)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_width_scales_parameters(name: str) -> None:
    shape = SHAPES[name]
    narrow = count_parameters(build_student(name, shape, 4, width=0.5))
    wide = count_parameters(build_student(name, shape, 4, width=2.0))
    assert wide > 2 * narrow


def test_depthwise_separable_blocks_are_cheap() -> None:
    model = ds_cnn1d(6, 100, 4, width=1.0)
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv1d) and m.groups > 1]
    assert len(depthwise) == 3 and all(m.groups == m.in_channels for m in depthwise)
    # Long inputs are strided down, so MACs grow far slower than the length.
    short = count_macs(ds_cnn1d(6, 100, 4), torch.zeros(1, 6, 100))
    long = count_macs(ds_cnn1d(6, 800, 4), torch.zeros(1, 6, 800))
    assert long < 8 * short / 1.5


def test_students_for_picks_by_input_rank() -> None:
    assert students_for((6, 100)) == ("ds-cnn1d", "mlp")
    assert students_for((1, 20, 24)) == ("ds-cnn2d", "mlp")


def test_unknown_names_and_bad_shapes_are_refused() -> None:
    with pytest.raises(
        CompressionError, match=r"unknown student 'resnet'.*ds-cnn1d, ds-cnn2d, mlp"
    ):
        build_student("resnet", (6, 100), 4)
    with pytest.raises(CompressionError, match=r"\(channels, length\); got \(6, 100, 2\)"):
        build_student("ds-cnn1d", (6, 100, 2), 4)
    with pytest.raises(CompressionError, match="num_classes"):
        build_student("mlp", (10,), 1)
    with pytest.raises(CompressionError, match="width"):
        build_student("ds-cnn1d", (6, 100), 4, width=0)
