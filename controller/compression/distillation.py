"""Knowledge distillation: a compact student learns from the teacher's softened outputs.

The teacher's full distribution over classes ("this walk looks a bit like running")
carries more information per sample than the label alone, which matters most when
the training set is small, as on a home device's data. ``train_alone`` trains the same
student with the same seed, data and schedule on the labels only: the comparison
that shows what the teacher adds.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from controller.compression.errors import CompressionError
from controller.compression.recipe import Distill
from controller.compression.students import build_student
from controller.compression.training import (
    FitResult,
    TrainOptions,
    count_parameters,
    evaluate_accuracy,
    example_inputs,
    fine_tune,
)
from controller.workloads.base import Split


@dataclass(frozen=True)
class DistillResult:
    student: nn.Module
    student_name: str  # zoo name, or "given" for a student passed in (e.g. a pruned teacher)
    teacher_params: int | None  # None for train_alone
    student_params: int
    fit: FitResult


def _student(
    step: Distill,
    in_shape: tuple[int, ...],
    num_classes: int,
    student: nn.Module | None,
    preprocess: nn.Module | None,
    seed: int,
) -> tuple[nn.Module, str]:
    """The zoo student (seeded, so distilled and alone runs start from the same weights).

    ``in_shape`` is the raw per-sample input shape; with ``preprocess`` the zoo student is
    built for what the preprocessor outputs (e.g. PLAID's 1 raw channel becomes 2).
    """
    if preprocess is not None and student is None:
        with torch.no_grad():
            in_shape = tuple(preprocess.eval()(torch.zeros((1, *in_shape))).shape[1:])
    if student is not None:
        model, name = copy.deepcopy(student), "given"
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, name = (
                build_student(step.student, in_shape, num_classes, step.width),
                step.student,
            )
    if preprocess is not None:
        model = nn.Sequential(copy.deepcopy(preprocess), model)
    return model, name


def _step_options(step: Distill, options: TrainOptions | None) -> TrainOptions:
    """The job's training options, with the step's own learning rate when it names one."""
    options = options or TrainOptions()
    return options if step.lr is None else dataclasses.replace(options, lr=step.lr)


def _check_outputs(model: nn.Module, train: Split, num_classes: int, who: str) -> None:
    model.eval()
    with torch.no_grad():
        out = model(*example_inputs(train, 2))
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CompressionError(
            f"the {who} returns {shape} for 2 samples; expected [2, {num_classes}] logits"
        )


def distill(
    teacher: nn.Module,
    step: Distill,
    train: Split,
    val: Split | None = None,
    *,
    in_shape: tuple[int, ...],
    num_classes: int,
    student: nn.Module | None = None,
    preprocess: nn.Module | None = None,
    options: TrainOptions | None = None,
) -> DistillResult:
    """Train a student on alpha·T²·KL(teacher || student) + (1 - alpha)·CE for ``step.epochs``.

    The student is ``step.student`` from the zoo at ``step.width`` for per-sample input
    shape ``in_shape``, or ``student`` when given (a copy is trained). ``preprocess``
    (e.g. a copy of the teacher's own input normalisation) is prepended to the student,
    so it sees what the teacher sees and the exported model still takes raw inputs.
    Neither the teacher nor a given student is modified.
    """
    options = _step_options(step, options)
    teacher = copy.deepcopy(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    _check_outputs(teacher, train, num_classes, "teacher")
    model, name = _student(step, in_shape, num_classes, student, preprocess, options.seed)
    _check_outputs(model, train, num_classes, f"student {name!r}")
    fit = fine_tune(
        model,
        train,
        epochs=step.epochs,
        options=options,
        teacher=teacher,
        temperature=step.temperature,
        alpha=step.alpha,
        val=val,
        label=f"distilling into {name}",
    )
    return DistillResult(model, name, count_parameters(teacher), count_parameters(model), fit)


def train_alone(
    step: Distill,
    train: Split,
    val: Split | None = None,
    *,
    in_shape: tuple[int, ...],
    num_classes: int,
    student: nn.Module | None = None,
    preprocess: nn.Module | None = None,
    options: TrainOptions | None = None,
) -> DistillResult:
    """The same student, seed, data, epochs and learning rate as ``distill``, labels only."""
    options = _step_options(step, options)
    model, name = _student(step, in_shape, num_classes, student, preprocess, options.seed)
    _check_outputs(model, train, num_classes, f"student {name!r}")
    fit = fine_tune(
        model, train, epochs=step.epochs, options=options, val=val, label=f"training {name} alone"
    )
    return DistillResult(model, name, None, count_parameters(model), fit)


# ------------------------------------------------------------------ does the teacher help?


@dataclass(frozen=True)
class SeedOutcome:
    """One seed: the same student distilled and trained alone, scored on held-out splits."""

    seed: int
    distilled: dict[str, float]  # split name -> accuracy
    alone: dict[str, float]


@dataclass(frozen=True)
class DistillComparison:
    """Distilled vs trained alone over several seeds: what the teacher adds, and how surely."""

    student: str
    student_params: int
    epochs: int
    outcomes: tuple[SeedOutcome, ...]

    def mean(self, split: str, *, distilled: bool) -> float:
        values = [(o.distilled if distilled else o.alone)[split] for o in self.outcomes]
        return sum(values) / len(values)

    def gain(self, split: str) -> float:
        """Mean accuracy of the distilled student minus the one trained alone."""
        return self.mean(split, distilled=True) - self.mean(split, distilled=False)

    def wins(self, split: str) -> int:
        """Seeds on which the distilled student scored strictly higher."""
        return sum(o.distilled[split] > o.alone[split] for o in self.outcomes)


def compare_with_alone(
    teacher: nn.Module,
    step: Distill,
    train: Split,
    held_out: dict[str, Split],
    *,
    in_shape: tuple[int, ...],
    num_classes: int,
    preprocess: nn.Module | None = None,
    seeds: tuple[int, ...] = (0, 1, 2),
    options: TrainOptions | None = None,
) -> DistillComparison:
    """Train ``step``'s student with and without the teacher for every seed; score both.

    Per seed the two runs share everything but the loss: initial weights, shuffling,
    epochs, learning rate. Neither run looks at ``held_out`` while training (the
    weights of the last epoch are kept), so the splits there, e.g. val and test, score
    both students the same way.
    """
    if not seeds:
        raise CompressionError("compare_with_alone needs at least one seed")
    if not held_out:
        raise CompressionError("compare_with_alone needs at least one held-out split to score")
    base = dataclasses.replace(options or TrainOptions(show_progress=False), keep="last")
    outcomes = []
    name, params = step.student, 0
    for seed in seeds:
        seeded = dataclasses.replace(base, seed=seed)
        taught = distill(
            teacher, step, train, in_shape=in_shape, num_classes=num_classes,
            preprocess=preprocess, options=seeded,
        )  # fmt: skip
        alone = train_alone(
            step, train, in_shape=in_shape, num_classes=num_classes,
            preprocess=preprocess, options=seeded,
        )  # fmt: skip
        name, params = taught.student_name, taught.student_params
        outcomes.append(
            SeedOutcome(
                seed,
                {name: evaluate_accuracy(taught.student, s) for name, s in held_out.items()},
                {name: evaluate_accuracy(alone.student, s) for name, s in held_out.items()},
            )
        )
    return DistillComparison(name, params, step.epochs, tuple(outcomes))
