"""Household power demand: ItalyPowerDemand, a tiny 1D-CNN, exported to ONNX.

ItalyPowerDemand (UCR archive, shipped inside sktime) holds 24 hourly demand readings
of one day (67 train / 1029 test) labelled by season: October to March (class 0) or
April to September (class 1). The UCR copy is z-normalised per day; the model
z-normalises its input itself, so a device can send the day's raw readings in any unit
and get the same answer.

Position in the day matters (the morning and evening peaks move with the season), so
the head flattens the feature map instead of pooling it away.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from controller.workloads.base import Split, WorkloadData
from controller.workloads.classifier import TrainedClassifierWorkload
from controller.workloads.training import WorkloadError, stratified_split, subset

log = logging.getLogger(__name__)

NAME = "italy-power"
ARCHITECTURE = "italy-cnn-v1"  # bump when ItalyNet changes: cached weights are then retrained
STEPS = 24
INPUT_NAME = "x"
OUTPUT_NAME = "logits"
CLASS_NAMES: tuple[str, ...] = ("oct_to_mar", "apr_to_sep")
VAL_FRACTION = 0.2
SPLIT_SEED = 0
DEFAULT_EPOCHS = 60


def load_split(split: str) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """One split from the copy inside sktime: [N, 1, 24] float32 and class indices 0/1."""
    from sktime.datasets import load_italy_power_demand  # heavy import: only when used

    x, y = load_italy_power_demand(split=split, return_type="numpy3D")
    if x.ndim != 3 or x.shape[1:] != (1, STEPS):
        raise WorkloadError(f"ItalyPowerDemand {split} has shape {x.shape}; expected [N, 1, 24]")
    unknown = sorted(set(y.tolist()) - {"1", "2"})
    if unknown:
        raise WorkloadError(f"ItalyPowerDemand {split} has labels {unknown}; expected '1', '2'")
    labels = np.array([int(v) - 1 for v in y], dtype=np.int64)
    return np.ascontiguousarray(x, dtype=np.float32), labels


def load_data() -> WorkloadData:
    """TRAIN minus a stratified 20% val split, val, and TEST."""
    x_train, y_train = load_split("train")
    x_test, y_test = load_split("test")
    full = Split({INPUT_NAME: x_train}, y_train)
    keep, val = stratified_split(y_train, VAL_FRACTION, SPLIT_SEED)
    return WorkloadData(
        train=subset(full, keep),
        val=subset(full, val),
        test=Split({INPUT_NAME: x_test}, y_test),
        class_names=CLASS_NAMES,
    )


class ZScore(nn.Module):
    """Per-sample, per-channel z-normalisation over time (no parameters, no statistics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=2, keepdim=True)
        centred = x - mean
        return centred / centred.pow(2).mean(dim=2, keepdim=True).add(1e-8).sqrt()


class ItalyNet(nn.Module):
    """Two conv blocks, max-pool, flatten, dropout, linear (~3.5k parameters)."""

    def __init__(self, widths: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        self.norm = ZScore()  # "norm": the input transform, by Workload convention
        self.features = nn.Sequential(
            nn.Conv1d(1, widths[0], 5, padding=2, bias=False),
            nn.BatchNorm1d(widths[0]),
            nn.ReLU(),
            nn.Conv1d(widths[0], widths[1], 5, padding=2, bias=False),
            nn.BatchNorm1d(widths[1]),
            nn.ReLU(),
            nn.MaxPool1d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(widths[1] * STEPS // 2, len(CLASS_NAMES))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.norm(x)))  # type: ignore[no-any-return]


class ItalyPowerWorkload(TrainedClassifierWorkload):
    name = NAME
    architecture = ARCHITECTURE
    input_names = (INPUT_NAME,)
    output_names = (OUTPUT_NAME,)
    default_epochs = DEFAULT_EPOCHS
    batch_size = 8
    example_shape = (1, STEPS)
    onnx_doc = (
        "ItalyPowerDemand season: one day's 24 hourly demand readings [batch, 1, 24] "
        "-> logits over (oct_to_mar, apr_to_sep)"
    )

    def load_data(self) -> WorkloadData:
        return load_data()

    def build_model(self) -> nn.Module:
        return ItalyNet()
