"""A reference classifier trained here: data in, cached FP32 source model out, ONNX scoring.

PLAID and ItalyPowerDemand differ only in their data, their network and a few training
settings; everything else — the cache keyed by architecture, seed and epochs, training
with the test split scored only afterwards, the single-input ONNX export, scoring — is
this class. A subclass says what differs in class attributes and three small methods.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from controller.workloads.base import DEFAULT_CACHE_DIR, Score, TaskKind, Workload, WorkloadData
from controller.workloads.training import (
    TrainConfig,
    TrainReport,
    WorkloadError,
    accuracy,
    export_single_input,
    load_cached,
    logits_torch,
    save_cached,
    score_classifier,
    select_split,
    train_classifier,
)

log = logging.getLogger(__name__)

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class SourceTraining:
    """What one source-model training produced (also stored beside the cached weights)."""

    seed: int
    report: TrainReport
    test_accuracy: float


class TrainedClassifierWorkload(Workload, abc.ABC):
    """A single-input classifier whose FP32 source is trained on first use and cached."""

    kind = TaskKind.CLASSIFICATION
    input_names = ("x",)
    output_names = ("logits",)
    architecture: str  # bump when the network changes: cached weights are then retrained
    default_epochs: int = 60
    batch_size: int = 16
    example_shape: tuple[int, ...]  # one sample, for the ONNX export: e.g. (1, 512)
    onnx_doc: str

    def __init__(self, *, epochs: int | None = None, show_progress: bool = False) -> None:
        self.epochs = self.default_epochs if epochs is None else epochs
        self.show_progress = show_progress

    @property
    def input_name(self) -> str:
        return self.input_names[0]

    @property
    def output_name(self) -> str:
        return self.output_names[0]

    # -- what a subclass says --------------------------------------------------------

    @abc.abstractmethod
    def load_data(self) -> WorkloadData:
        """Train, val and test splits, preprocessed as the exported model expects them."""

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh, untrained source network."""

    def augment(self) -> Augment | None:
        """Training-time augmentation of a batch (None: none)."""
        return None

    # -- the rest is shared ------------------------------------------------------------

    def data(self) -> WorkloadData:
        return self._data

    @cached_property
    def _data(self) -> WorkloadData:
        return self.load_data()

    def cache_path(self, cache_dir: Path | None = None, *, seed: int = 0) -> Path:
        suffix = "" if self.epochs == self.default_epochs else f"-e{self.epochs}"
        return (cache_dir or DEFAULT_CACHE_DIR) / f"{self.name}-seed{seed}{suffix}.pt"

    def source_model(self, cache_dir: Path | None = None, *, seed: int = 0) -> nn.Module:
        """The cached model for this seed, or a freshly trained one (then cached)."""
        path = self.cache_path(cache_dir, seed=seed)
        cached = load_cached(path)
        if cached is not None and cached.meta.get("architecture") == self.architecture:
            model = self.build_model()
            model.load_state_dict(cached.state_dict)
            return model.eval()
        model, result = self.train(seed=seed)
        save_cached(
            path,
            model,
            {
                "architecture": self.architecture,
                "seed": seed,
                "epochs": result.report.epochs,
                "best_epoch": result.report.best_epoch,
                "val_accuracy": result.report.val_accuracy,
                "test_accuracy": result.test_accuracy,
                "train_seconds": result.report.seconds,
            },
        )
        return model

    def train(self, *, seed: int = 0) -> tuple[nn.Module, SourceTraining]:
        """Train a fresh network (no cache); the test split is scored only afterwards."""
        data = self.data()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build_model()
        report = train_classifier(
            model,
            data.train,
            data.val,
            TrainConfig(epochs=self.epochs, batch_size=self.batch_size, seed=seed),
            augment=self.augment(),
            description=f"training {self.name} source model",
            show_progress=self.show_progress,
        )
        if data.test.labels is None:
            raise WorkloadError(f"{self.name} test split has no labels")
        x_test = torch.from_numpy(data.test.inputs[self.input_name])
        test_logits = logits_torch(model, x_test).numpy()
        result = SourceTraining(seed, report, accuracy(test_logits, data.test.labels))
        log.info(
            "trained %s (seed %d) in %.1f s: val %.3f (epoch %d), test %.3f",
            self.name,
            seed,
            report.seconds,
            report.val_accuracy,
            report.best_epoch,
            result.test_accuracy,
        )
        return model, result

    def export_onnx(self, model: nn.Module, path: Path) -> Path:
        return export_single_input(
            model,
            path,
            torch.zeros(1, *self.example_shape),
            input_name=self.input_name,
            output_name=self.output_name,
            metadata={"workload": self.name, "task": TaskKind.CLASSIFICATION.value},
            doc=self.onnx_doc,
        )

    def score_onnx(self, path: Path, *, split: str = "test") -> Score:
        return score_classifier(path, select_split(self.data(), split), self.output_name)
