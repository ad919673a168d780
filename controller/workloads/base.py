"""What every reference workload offers the compression code: data, a source model, a score.

A workload owns its preprocessing, so `homefleet evaluate` and the planner score an
ONNX file exactly the same way. Classification workloads are scored by accuracy on
their held-out test split; an embedding workload (MiniLM) by cosine fidelity to the
FP32 source, since it has no labels to score against.
"""

from __future__ import annotations

import abc
import enum
import os
from dataclasses import dataclass, field
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

    def spread(self, n: int) -> Split:
        """``n`` samples evenly spaced over the split (all of them when it is smaller).

        Not the first ``n``: several datasets come sorted by class, and the first 64 of
        PLAID's train split are two classes of eleven.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        count = min(n, len(self))
        idx = np.unique(np.linspace(0, len(self) - 1, count).round().astype(np.int64))
        return Split(
            {k: v[idx] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[idx],
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

    metric: str  # "accuracy" | "cosine" | "top1_agreement" | "threshold_agreement"
    value: float
    samples: int
    # Secondary measurements beside the headline one, e.g. MiniLM's "intent_accuracy".
    extra: dict[str, float] = field(default_factory=dict)


def default_cache_dir() -> Path:
    """Where trained source models and exported FP32 files live unless a caller names a
    directory: $HOMEFLEET_CACHE_DIR; else, in a source checkout, its git-ignored
    `.cache/homefleet/workloads` (so `make demo` and `make test` share one training);
    else the user's cache ($XDG_CACHE_HOME or ~/.cache)/homefleet/workloads, never next
    to an installed package."""
    override = os.environ.get("HOMEFLEET_CACHE_DIR")
    if override:
        return Path(override).expanduser() / "workloads"
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file():
        return checkout / ".cache" / "homefleet" / "workloads"
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return user_cache / "homefleet" / "workloads"


DEFAULT_CACHE_DIR = default_cache_dir()


class Workload(abc.ABC):
    """A reference workload: real data shipped in a PyPI package, never downloaded."""

    name: str
    kind: TaskKind
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    show_progress: bool = False  # progress bars while the source model trains (a terminal)

    @abc.abstractmethod
    def data(self) -> WorkloadData:
        """Load (and cache) the splits, preprocessed as the exported model expects them."""

    @abc.abstractmethod
    def source_model(self, cache_dir: Path | None = None, *, seed: int = 0) -> nn.Module:
        """The FP32 source model, trained (or loaded pretrained) and cached under cache_dir.

        ``None`` means ``DEFAULT_CACHE_DIR``.
        """

    @abc.abstractmethod
    def export_onnx(self, model: nn.Module, path: Path) -> Path:
        """Export with this workload's input/output names and dynamic batch axis."""

    @abc.abstractmethod
    def score_onnx(self, path: Path, *, split: str = "test") -> Score:
        """Score an ONNX model with this workload's own preprocessing."""

    def calibration_inputs(self, n: int = 64) -> dict[str, NDArray[np.generic]]:
        """Representative inputs for static quantization and fidelity checks.

        ``n`` train samples spread over the whole split, so every class is represented.
        """
        return self.data().train.spread(n).inputs

    def input_preprocessor(self, model: nn.Module) -> nn.Module | None:
        """The part of ``model`` that turns raw inputs into what its layers expect.

        A distilled student gets a copy in front of it, so it sees what the teacher sees
        and its exported model still takes raw inputs. By convention a source model
        keeps that part as its ``norm`` attribute; None when there is none.
        """
        norm = getattr(model, "norm", None)
        return norm if isinstance(norm, nn.Module) else None
