"""Turn a recipe into an ONNX artifact and score it: the planner's CandidateBuilders.

Two sources, as the issue describes them:
- ``TorchSource``: a PyTorch model with its workload's data — every technique. Torch
  steps run first (each on the previous step's result), then the model is exported,
  then ONNX steps run. Results are cached per recipe prefix, so "prune 50 % → int8"
  reuses the pruned model that "prune 50 %" already built. A recipe ending in learned
  quantization (``quantize.learned``) trains after its torch steps and writes the QDQ
  file itself (learned.py).
- ``OnnxSource``: an ONNX file and calibration inputs alone — post-training steps only;
  quality is fidelity to the original's outputs, since there may be no labels.

Either may hold ``previous``, the class's earlier static int8 artifact: a
``RequantizeLike`` step reuses its quantization parameters (requantize.py) and must name
that file's sha256, so a recipe never runs against an artifact other than the one it
records.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from torch import nn

from artifact.digest import sha256_file
from controller.compression.codebook import quantize_codebook
from controller.compression.distillation import distill
from controller.compression.errors import CompressionError, UnsupportedModelError
from controller.compression.learned import learned_quantize
from controller.compression.lowrank import decompose
from controller.compression.planner import Quality, SizeFloor, quantized_share
from controller.compression.pruning import prune_layers, prune_structured, prune_unstructured
from controller.compression.quantize import quantize_onnx
from controller.compression.recipe import (
    ONNX_STEPS,
    CodebookQuantize,
    Distill,
    LayerPrune,
    LearnedQuantize,
    LowRank,
    Quantize,
    Recipe,
    RequantizeLike,
    StructuredPrune,
    UnstructuredPrune,
    WeightOnlyQuantize,
)
from controller.compression.requantize import requantize_like
from controller.compression.students import build_student
from controller.compression.training import TrainOptions
from controller.compression.weight_only import quantize_weight_only
from controller.workloads.base import TaskKind, Workload

if TYPE_CHECKING:  # fidelity imports onnxruntime: only where ONNX sources are used
    from controller.workloads.fidelity import CalibrationSplit

log = logging.getLogger(__name__)


def _prefix_key(recipe: Recipe, upto: int) -> str:
    return Recipe(steps=recipe.steps[:upto]).model_dump_json()


OnnxStep = Quantize | RequantizeLike | WeightOnlyQuantize | CodebookQuantize


def _previous_for(step: RequantizeLike, previous: Path | None) -> Path:
    """The earlier artifact's file, refused unless it is the one the step names."""
    if previous is None:
        raise CompressionError(
            f"{step.kind} reuses artifact {step.previous_sha256[:12]}, but no previous "
            "artifact was given to this compression job"
        )
    digest = sha256_file(previous)
    if digest != step.previous_sha256:
        raise CompressionError(
            f"{step.kind} names artifact {step.previous_sha256[:12]}, but the previous "
            f"artifact given ({previous}) is {digest[:12]}"
        )
    return previous


def _run_onnx_step(
    step: OnnxStep,
    source: Path,
    out: Path,
    calibration: Mapping[str, NDArray[np.generic]],
    evaluate: Callable[[Path], float],
    max_drop: float | None,
    previous: Path | None = None,
) -> Path:
    """One post-training step on an ONNX file; returns the file it wrote."""
    if isinstance(step, RequantizeLike):
        return requantize_like(
            _previous_for(step, previous),
            source,
            out,
            calibration=calibration,
            max_saturation=step.max_saturation,
            hysteresis=step.hysteresis,
        ).out
    if isinstance(step, WeightOnlyQuantize):
        return quantize_weight_only(source, out, step, calibration=calibration).out
    if isinstance(step, CodebookQuantize):
        return quantize_codebook(source, out, step, calibration=calibration).out
    return quantize_onnx(
        source,
        out,
        step,
        calibration=calibration,
        evaluate=evaluate,
        max_drop=max_drop,
        progress=False,
    ).out


@dataclass
class TorchSource:
    """A PyTorch source model and the workload that owns its data and scoring."""

    workload: Workload
    model: nn.Module
    max_accuracy_drop: float | None = None
    options: TrainOptions = field(default_factory=lambda: TrainOptions(show_progress=False))
    previous: Path | None = None  # the class's earlier static int8 artifact (RequantizeLike)
    _models: dict[str, nn.Module] = field(default_factory=dict, init=False)
    _exports: dict[str, Path] = field(default_factory=dict, init=False)
    _scores: dict[Path, Quality] = field(default_factory=dict, init=False)

    def _torch_model(self, recipe: Recipe, upto: int) -> nn.Module:
        key = _prefix_key(recipe, upto)
        if key in self._models:
            return self._models[key]
        if upto == 0:
            model = copy.deepcopy(self.model).eval()
        else:
            previous = self._torch_model(recipe, upto - 1)
            model = self._apply(previous, recipe.steps[upto - 1])
        self._models[key] = model
        return model

    def _apply(self, model: nn.Module, step: object) -> nn.Module:
        data = self.workload.data()
        if self.workload.kind is not TaskKind.CLASSIFICATION:
            raise UnsupportedModelError(
                f"{step.__class__.__name__} needs a labelled classification workload; "
                f"{self.workload.name} is {self.workload.kind.value}"
            )
        train, val = data.train, data.val
        if isinstance(step, UnstructuredPrune):
            return prune_unstructured(model, step, train, val, options=self.options).model
        if isinstance(step, StructuredPrune):
            return prune_structured(model, step, train, val, options=self.options).model
        if isinstance(step, LayerPrune):
            return prune_layers(model, step, train, val, options=self.options).model
        if isinstance(step, LowRank):
            return decompose(model, step, train, val, options=self.options).model
        if isinstance(step, Distill):
            first = next(iter(train.inputs.values()))
            result = distill(
                model,
                step,
                train,
                val,
                in_shape=tuple(first.shape[1:]),
                num_classes=len(data.class_names),
                preprocess=self.workload.input_preprocessor(model),
                options=self.options,
            )
            return result.student
        raise CompressionError(f"{step.__class__.__name__} is not a torch step")

    def build(self, recipe: Recipe, out_dir: Path) -> Path:
        last = recipe.steps[-1] if recipe.steps else None
        if isinstance(last, LearnedQuantize):
            return self._build_learned(recipe, last, out_dir)
        torch_steps = 0
        for step in recipe.steps:
            if isinstance(step, ONNX_STEPS):
                break
            torch_steps += 1
        onnx_steps = [s for s in recipe.steps[torch_steps:] if isinstance(s, ONNX_STEPS)]
        if len(onnx_steps) != len(recipe.steps) - torch_steps:
            raise CompressionError("torch steps must come before ONNX steps in a recipe")
        out_dir.mkdir(parents=True, exist_ok=True)
        key = _prefix_key(recipe, torch_steps)
        exported = self._exports.get(key)
        if exported is None:
            model = self._torch_model(recipe, torch_steps)
            exported = self.workload.export_onnx(model, out_dir / "float.onnx")
            self._exports[key] = exported
        current = exported
        for index, step in enumerate(onnx_steps):
            current = _run_onnx_step(
                step,
                current,
                out_dir / f"step-{torch_steps + index}-quantized.onnx",
                self.workload.calibration_inputs(),
                self._evaluate_value,
                self.max_accuracy_drop,
                self.previous,
            )
        final = out_dir / "model.onnx"
        if current != final:
            shutil.copyfile(current, final)
        return final

    def _build_learned(self, recipe: Recipe, step: LearnedQuantize, out_dir: Path) -> Path:
        """The torch steps before it, then QAT with learned step sizes (learned.py),
        which writes the QDQ ONNX file itself."""
        model = self._torch_model(recipe, len(recipe.steps) - 1)
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / "model.onnx"
        return learned_quantize(self.workload, model, step, out, options=self.options).out

    def _evaluate_value(self, path: Path) -> float:
        return self.quality(path).value

    def size_floor(self, recipe: Recipe) -> SizeFloor | None:
        """A distilled student's floor, from its weights before it trains: 4 bytes each
        in float, at least a fifth of that after int8 (biases, batch norms, the graph and
        a preprocessing front only add); unknown for any other recipe."""
        first, rest = (recipe.steps[0], recipe.steps[1:]) if recipe.steps else (None, ())
        if not isinstance(first, Distill) or not all(isinstance(s, Quantize) for s in rest):
            return None
        if self.workload.kind is not TaskKind.CLASSIFICATION:
            return None
        data = self.workload.data()
        sample = next(iter(data.train.inputs.values()))
        try:
            student = build_student(
                first.student, tuple(sample.shape[1:]), len(data.class_names), first.width
            )
        except (CompressionError, ValueError, RuntimeError):
            return None  # the build itself will say what is wrong
        weights = sum(
            module.weight.numel()
            for module in student.modules()
            if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Linear)
        )
        share = quantized_share(s for s in rest if isinstance(s, Quantize))
        floor = int(4 * weights * share)
        return SizeFloor(
            floor, f"the {first.student} student has {weights} weights: at least {floor} bytes"
        )

    def quality(self, onnx_path: Path) -> Quality:
        cached = self._scores.get(onnx_path)
        if cached is None:
            score = self.workload.score_onnx(onnx_path, split="val")
            labelled = self.workload.kind is TaskKind.CLASSIFICATION
            cached = Quality(score.metric, score.value, labelled)
            self._scores[onnx_path] = cached
        return cached


@dataclass
class OnnxSource:
    """An ONNX model alone: post-training steps, judged by fidelity to the original.

    The calibration inputs are split (fidelity.split_holdout): the quantizers calibrate
    and steer their searches on one part, and candidates are judged on the other, so a
    static int8 model is not scored on the very inputs its ranges were fitted to."""

    path: Path
    calibration: Mapping[str, NDArray[np.generic]]
    min_fidelity: float | None = None
    previous: Path | None = None  # the class's earlier static int8 artifact (RequantizeLike)
    split: CalibrationSplit = field(init=False)

    def __post_init__(self) -> None:
        from controller.workloads.fidelity import split_holdout

        self.split = split_holdout(self.calibration, self.min_fidelity)

    def build(self, recipe: Recipe, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        current = self.path
        for index, step in enumerate(recipe.steps):
            if not isinstance(step, ONNX_STEPS):
                raise UnsupportedModelError(
                    f"{step.kind} needs a PyTorch model and its data; an ONNX file alone "
                    "supports post-training steps only (quantize, quantize.weight_only, "
                    "quantize.codebook)"
                )
            current = _run_onnx_step(
                step,
                current,
                out_dir / f"step-{index}-quantized.onnx",
                self.split.fit,
                self._fit_fidelity,
                None if self.min_fidelity is None else 1.0 - self.min_fidelity,
                self.previous,
            )
        final = out_dir / "model.onnx"
        shutil.copyfile(current, final)
        return final

    def size_floor(self, recipe: Recipe) -> SizeFloor | None:
        """None: an ONNX file's recipes are quantization, whose floors the planner knows."""
        return None

    def quality(self, onnx_path: Path) -> Quality:
        """Fidelity on the held-out samples: what the planner judges a candidate by."""
        from controller.workloads.fidelity import fidelity

        score = fidelity(self.path, onnx_path, self.split.judge)
        return Quality(score.metric, score.value, labelled=False)

    def _fit_fidelity(self, onnx_path: Path) -> float:
        """Fidelity on the calibration part: what a step's own search (which nodes stay
        float) may look at, so the held-out samples stay unseen until judging."""
        from controller.workloads.fidelity import fidelity

        return fidelity(self.path, onnx_path, self.split.fit).value
