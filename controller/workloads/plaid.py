"""Appliance identification from plug-load current: PLAID, a small residual 1D-CNN, ONNX.

PLAID (UCR archive, shipped inside sktime) holds current signatures of 11 appliance
types (537 train / 537 test), each a different length (100 to 1344 samples). The device
sends the raw current zero-padded (or truncated) to ``STEPS`` samples — padding rather
than resampling keeps the waveform's time scale (its mains period) and the recording's
length, both of which tell appliances apart; resampling to 512 scored about the same
and to 256 clearly worse.

Everything else lives in the model, so the device needs no statistics: amplitudes span
~5 orders of magnitude (|x| from ~1e-6 to ~470 in the UCR copy, from appliances in
standby to heaters), so the first layer turns the raw current into two channels, a
sign·log1p one that keeps the amplitude and a per-recording z-normalised one that
keeps the shape. The log channel alone scored about 7 points lower.

The network is a plain residual CNN (stem, three residual blocks with BatchNorm/ReLU,
global average pooling, linear head, ~98k parameters) so that pruning meets a real
dependency graph (residual adds, projection shortcuts) and low-rank decomposition meets
real convolutions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from torch.nn import functional as F

from controller.workloads.base import (
    DEFAULT_CACHE_DIR,
    Score,
    Split,
    TaskKind,
    Workload,
    WorkloadData,
)
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
    stratified_split,
    subset,
    train_classifier,
)

log = logging.getLogger(__name__)

NAME = "plaid"
ARCHITECTURE = "plaid-rescnn-v1"  # bump when PlaidNet changes: cached weights are then retrained
STEPS = 512
N_CLASSES = 11
INPUT_NAME = "x"
OUTPUT_NAME = "logits"
VAL_FRACTION = 0.2
SPLIT_SEED = 0  # the val split is fixed; the model seed changes init and shuffling only
DEFAULT_EPOCHS = 60
# The UCR copy of PLAID labels its 11 appliance types "0".."10" without naming them, so
# neither do we (guessing names would put a wrong label on a device's dashboard).
CLASS_NAMES: tuple[str, ...] = tuple(f"appliance_{i}" for i in range(N_CLASSES))


# ------------------------------------------------------------------ data


def preprocess(series: Sequence[NDArray[np.floating]], steps: int = STEPS) -> NDArray[np.float32]:
    """Raw recordings of any length → float32 [N, 1, steps]: truncated, or zero-padded at the end.

    This is all a device does before calling the model.
    """
    out = np.zeros((len(series), 1, steps), dtype=np.float32)
    for i, s in enumerate(series):
        values = np.asarray(s, dtype=np.float32).reshape(-1)[:steps]
        out[i, 0, : len(values)] = values
    return out


def load_split(split: str) -> tuple[list[NDArray[np.float64]], NDArray[np.int64]]:
    """One split of PLAID from the copy inside sktime: raw recordings and class indices."""
    from sktime.datasets import load_plaid  # heavy import: only when used

    x, y = load_plaid(split=split)
    series = [np.asarray(cell, dtype=np.float64) for cell in x.iloc[:, 0]]
    try:
        labels = np.array([int(v) for v in y], dtype=np.int64)
    except ValueError as exc:
        raise WorkloadError(f"PLAID {split} labels are not class numbers: {exc}") from exc
    if labels.min() < 0 or labels.max() >= N_CLASSES:
        raise WorkloadError(
            f"PLAID {split} labels span {labels.min()}..{labels.max()}; expected 0..{N_CLASSES - 1}"
        )
    return series, labels


def load_data() -> WorkloadData:
    """TRAIN minus a stratified 20% val split, val, and TEST, all as [N, 1, STEPS] float32."""
    train_series, y_train = load_split("train")
    test_series, y_test = load_split("test")
    full = Split({INPUT_NAME: preprocess(train_series)}, y_train)
    keep, val = stratified_split(y_train, VAL_FRACTION, SPLIT_SEED)
    return WorkloadData(
        train=subset(full, keep),
        val=subset(full, val),
        test=Split({INPUT_NAME: preprocess(test_series)}, y_test),
        class_names=CLASS_NAMES,
    )


# ------------------------------------------------------------------ model


class LogAndShape(nn.Module):
    """Raw current [N, 1, T] → [N, 2, T]: sign·log1p(|x|·1000)/5 and per-recording z-score.

    The log channel maps 1e-6..500 A onto about 0..2.6; the z-score channel is
    amplitude-free. No parameters, no statistics: nothing a device must know.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_amp = torch.sign(x) * torch.log1p(x.abs() * 1000.0) / 5.0
        mean = x.mean(dim=2, keepdim=True)
        std = (x - mean).pow(2).mean(dim=2, keepdim=True).add(1e-12).sqrt()
        return torch.cat([log_amp, (x - mean) / std], dim=1)


class ResBlock(nn.Module):
    """Two conv-BN layers with a shortcut (1x1 conv-BN projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel, 1, kernel // 2, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Sequential(
                nn.Conv1d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm1d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class PlaidNet(nn.Module):
    """Input transform, stem (stride 2), three residual blocks, global average pool, linear."""

    def __init__(
        self, widths: tuple[int, int, int] = (32, 64, 96), n_classes: int = N_CLASSES
    ) -> None:
        super().__init__()
        self.norm = LogAndShape()  # "norm": the input transform, by Workload convention
        self.stem = nn.Sequential(
            nn.Conv1d(2, widths[0], 7, 2, 3, bias=False),
            nn.BatchNorm1d(widths[0]),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(
            ResBlock(widths[0], widths[0], 5, 1),
            ResBlock(widths[0], widths[1], 5, 2),
            ResBlock(widths[1], widths[2], 3, 2),
        )
        self.head = nn.Linear(widths[2], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(self.norm(x)))
        return self.head(h.mean(dim=2))  # type: ignore[no-any-return]


def amplitude_jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Scale each recording by U(0.9, 1.1): the same appliance draws a little more or less."""
    return x * (1 + (torch.rand(len(x), 1, 1, generator=gen) * 2 - 1) * 0.1)


# ------------------------------------------------------------------ workload


@dataclass(frozen=True)
class PlaidTraining:
    """What one source-model training produced (also stored beside the cached weights)."""

    seed: int
    report: TrainReport
    test_accuracy: float


class PlaidWorkload(Workload):
    name = NAME
    kind = TaskKind.CLASSIFICATION
    input_names = (INPUT_NAME,)
    output_names = (OUTPUT_NAME,)

    def __init__(self, *, epochs: int = DEFAULT_EPOCHS, show_progress: bool = False) -> None:
        self.epochs = epochs
        self.show_progress = show_progress

    def data(self) -> WorkloadData:
        return self._data

    @cached_property
    def _data(self) -> WorkloadData:
        return load_data()

    def cache_path(self, cache_dir: Path | None = None, *, seed: int = 0) -> Path:
        suffix = "" if self.epochs == DEFAULT_EPOCHS else f"-e{self.epochs}"
        return (cache_dir or DEFAULT_CACHE_DIR) / f"{NAME}-seed{seed}{suffix}.pt"

    def source_model(self, cache_dir: Path | None = None, *, seed: int = 0) -> nn.Module:
        """The cached model for this seed, or a freshly trained one (then cached)."""
        path = self.cache_path(cache_dir, seed=seed)
        cached = load_cached(path)
        if cached is not None and cached.meta.get("architecture") == ARCHITECTURE:
            model = PlaidNet()
            model.load_state_dict(cached.state_dict)
            return model.eval()
        model, result = self.train(seed=seed)
        save_cached(
            path,
            model,
            {
                "architecture": ARCHITECTURE,
                "seed": seed,
                "epochs": result.report.epochs,
                "best_epoch": result.report.best_epoch,
                "val_accuracy": result.report.val_accuracy,
                "test_accuracy": result.test_accuracy,
                "train_seconds": result.report.seconds,
            },
        )
        return model

    def train(self, *, seed: int = 0) -> tuple[PlaidNet, PlaidTraining]:
        """Train a fresh PlaidNet (no cache); the test split is scored only afterwards."""
        data = self.data()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = PlaidNet()
        report = train_classifier(
            model,
            data.train,
            data.val,
            TrainConfig(epochs=self.epochs, seed=seed),
            augment=amplitude_jitter,
            description="training plaid 1D-CNN",
            show_progress=self.show_progress,
        )
        x_test = torch.from_numpy(data.test.inputs[INPUT_NAME])
        test_logits = logits_torch(model, x_test).numpy()
        if data.test.labels is None:
            raise WorkloadError("PLAID test split has no labels")
        result = PlaidTraining(seed, report, accuracy(test_logits, data.test.labels))
        log.info(
            "trained %s (seed %d) in %.1f s: val %.3f (epoch %d), test %.3f",
            NAME,
            seed,
            report.seconds,
            report.val_accuracy,
            report.best_epoch,
            result.test_accuracy,
        )
        return model, result

    def export_onnx(self, model: nn.Module, path: Path) -> Path:
        """Input "x" [batch, 1, 512] float32 raw current (padded), output "logits" [batch, 11]."""
        return export_single_input(
            model,
            path,
            torch.zeros(1, 1, STEPS),
            input_name=INPUT_NAME,
            output_name=OUTPUT_NAME,
            metadata={"workload": NAME, "task": TaskKind.CLASSIFICATION.value},
            doc=(
                "PLAID appliance identification: raw plug current zero-padded/truncated to "
                f"[batch, 1, {STEPS}] -> logits over {N_CLASSES} appliance types"
            ),
        )

    def score_onnx(self, path: Path, *, split: str = "test") -> Score:
        return score_classifier(path, select_split(self.data(), split), OUTPUT_NAME)
