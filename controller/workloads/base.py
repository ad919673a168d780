"""What every reference workload offers the compression code: data, a source model, a score.

A workload owns its preprocessing, so `homefleet evaluate` and the planner score an
ONNX file exactly the same way. Classification workloads are scored by accuracy on
their held-out test split; an embedding workload (MiniLM) by cosine fidelity to the
FP32 source, since it has no labels to score against.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from torch import nn


class TaskKind(enum.StrEnum):
    CLASSIFICATION = "classification"
    EMBEDDING = "embedding"


@dataclass(frozen=True)
class Split:
    """One split: model inputs by input name (first axis = samples) and integer labels."""

    inputs: dict[str, NDArray[np.generic]]
    labels: NDArray[np.int64] | None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, n: int) -> Split:
        return Split(
            {k: v[:n] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[:n],
        )


@dataclass(frozen=True)
class WorkloadData:
    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Score:
    """Quality of a model on a workload: ``value`` is accuracy or fidelity, in [0, 1]."""

    metric: str  # "accuracy" | "cosine" | "top1_agreement"
    value: float
    samples: int


class Workload(abc.ABC):
    """A reference workload: real data shipped in a PyPI package, never downloaded."""

    name: str
    kind: TaskKind
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @abc.abstractmethod
    def data(self) -> WorkloadData:
        """Load (and cache) the splits, preprocessed as the exported model expects them."""

    @abc.abstractmethod
    def source_model(self, cache_dir: Path, *, seed: int = 0) -> nn.Module:
        """The FP32 source model, trained (or loaded pretrained) and cached under cache_dir."""

    @abc.abstractmethod
    def export_onnx(self, model: nn.Module, path: Path) -> Path:
        """Export with this workload's input/output names and dynamic batch axis."""

    @abc.abstractmethod
    def score_onnx(self, path: Path, *, split: str = "test") -> Score:
        """Score an ONNX model with this workload's own preprocessing."""

    def calibration_inputs(self, n: int = 64) -> dict[str, NDArray[np.generic]]:
        """Representative inputs for static quantization and fidelity checks."""
        return self.data().train.take(n).inputs
