"""Distillation trains a smaller student from the teacher; train_alone is the fair baseline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from controller.compression.distillation import compare_with_alone, distill, train_alone
from controller.compression.errors import CompressionError
from controller.compression.pruning import prune_structured
from controller.compression.recipe import Distill, StructuredPrune
from controller.compression.students import DSCNN1d
from controller.compression.training import count_parameters, evaluate_accuracy, fine_tune
from controller.workloads.base import Split
from controller.workloads.basic_motions import MotionCNN, channel_stats, load_basic_motions
from tests.compression.test_training import (
    QUIET,
    TinyCNN,
    onnx_outputs,
    synthetic_split,
    trained,
)

DATA = synthetic_split()
VAL = synthetic_split(n=48, seed=1)
X = VAL.inputs["x"][:5].astype(np.float32)
STEP = Distill(student="ds-cnn1d", width=0.25, epochs=6, temperature=4, alpha=0.7)


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    return trained(lambda: TinyCNN(width=32), DATA, epochs=10)


def test_distill_trains_a_smaller_zoo_student(teacher: nn.Module, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = distill(teacher, STEP, DATA, VAL, in_shape=(3, 32), num_classes=3, options=QUIET)
    assert result.student_name == "ds-cnn1d"
    assert isinstance(result.student, DSCNN1d)
    assert result.student_params == count_parameters(result.student)
    assert result.teacher_params == count_parameters(teacher)
    assert result.student_params < result.teacher_params / 2
    assert result.fit.val_accuracy == evaluate_accuracy(result.student, VAL)
    assert result.fit.val_accuracy is not None and result.fit.val_accuracy > 1 / 3
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert onnx_outputs(result.student, X, tmp_path).shape == (5, 3)


def test_train_alone_starts_from_the_same_student(teacher: nn.Module) -> None:
    step = STEP.model_copy(update={"epochs": 1})
    with_teacher = distill(teacher, step, DATA, in_shape=(3, 32), num_classes=3, options=QUIET)
    alone = train_alone(step, DATA, in_shape=(3, 32), num_classes=3, options=QUIET)
    assert alone.teacher_params is None
    assert alone.student_params == with_teacher.student_params
    # Same seed, data and schedule: only the loss differs, so the weights differ.
    a, b = with_teacher.student.state_dict(), alone.student.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    zero = STEP.model_copy(update={"alpha": 0.0, "epochs": 1})
    ce_only = distill(teacher, zero, DATA, in_shape=(3, 32), num_classes=3, options=QUIET)
    c = ce_only.student.state_dict()
    assert all(torch.allclose(b[k].float(), c[k].float(), atol=1e-5) for k in b)


def test_compare_with_alone_scores_both_runs_of_every_seed(teacher: nn.Module) -> None:
    step = STEP.model_copy(update={"epochs": 2})
    result = compare_with_alone(
        teacher, step, DATA, {"val": VAL, "train": DATA},
        in_shape=(3, 32), num_classes=3, seeds=(0, 1), options=QUIET,
    )  # fmt: skip
    assert [o.seed for o in result.outcomes] == [0, 1]
    assert result.student == "ds-cnn1d" and result.epochs == 2
    assert all(set(o.alone) == set(o.distilled) == {"val", "train"} for o in result.outcomes)
    # Each side is exactly what distill / train_alone give for that seed alone.
    seeded = dataclasses.replace(QUIET, seed=1)
    alone = train_alone(step, DATA, in_shape=(3, 32), num_classes=3, options=seeded)
    taught = distill(teacher, step, DATA, in_shape=(3, 32), num_classes=3, options=seeded)
    assert result.outcomes[1].alone["val"] == evaluate_accuracy(alone.student, VAL)
    assert result.outcomes[1].distilled["val"] == evaluate_accuracy(taught.student, VAL)
    assert result.student_params == taught.student_params
    gain = sum(o.distilled["val"] - o.alone["val"] for o in result.outcomes) / 2
    assert result.gain("val") == pytest.approx(gain)
    assert result.wins("val") == sum(o.distilled["val"] > o.alone["val"] for o in result.outcomes)
    with pytest.raises(CompressionError, match="at least one seed"):
        compare_with_alone(
            teacher, step, DATA, {"val": VAL}, in_shape=(3, 32), num_classes=3, seeds=()
        )


def test_a_pruned_teacher_can_be_the_student(teacher: nn.Module, tmp_path: Path) -> None:
    pruned = prune_structured(
        teacher, StructuredPrune(ratio=0.5, iterations=1, finetune_epochs=0), DATA, options=QUIET
    ).model
    result = distill(
        teacher, STEP, DATA, in_shape=(3, 32), num_classes=3, student=pruned, options=QUIET
    )
    assert result.student_name == "given"
    assert result.student_params == count_parameters(pruned) < count_parameters(teacher)
    onnx_outputs(result.student, X, tmp_path)


def test_preprocess_is_prepended(teacher: nn.Module) -> None:
    scale = nn.BatchNorm1d(3)
    result = distill(
        teacher,
        STEP.model_copy(update={"epochs": 1}),
        DATA,
        in_shape=(3, 32),
        num_classes=3,
        preprocess=scale,
        options=QUIET,
    )
    assert isinstance(result.student, nn.Sequential)
    assert isinstance(result.student[0], nn.BatchNorm1d)
    assert result.student[0] is not scale


def test_mismatches_are_refused(teacher: nn.Module) -> None:
    with pytest.raises(CompressionError, match=r"teacher returns \(2, 3\).*\[2, 5\]"):
        distill(teacher, STEP, DATA, in_shape=(3, 32), num_classes=5, options=QUIET)
    with pytest.raises(CompressionError, match="unknown student 'tiny'"):
        distill(
            teacher, Distill(student="tiny"), DATA, in_shape=(3, 32), num_classes=3, options=QUIET
        )
    with pytest.raises(CompressionError, match="channels, length"):
        distill(teacher, STEP, DATA, in_shape=(96,), num_classes=3, options=QUIET)


def test_basic_motions_teacher_distils_into_a_tenfold_smaller_student(tmp_path: Path) -> None:
    data = load_basic_motions()
    train = Split({"x": data.x_train}, data.y_train)
    test = Split({"x": data.x_test}, data.y_test)
    torch.manual_seed(0)
    teacher = MotionCNN(*channel_stats(data.x_train))
    fine_tune(teacher, train, epochs=20, options=QUIET)
    step = Distill(student="ds-cnn1d", width=0.5, epochs=30)
    result = distill(teacher, step, train, in_shape=(6, 100), num_classes=4, options=QUIET)
    assert result.student_params * 10 < count_parameters(teacher)
    assert evaluate_accuracy(result.student, test) > 0.5  # four classes: chance is 0.25
    onnx_outputs(result.student, data.x_test[:5], tmp_path)
