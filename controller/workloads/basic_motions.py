"""Activity recognition from a wearable: BasicMotions, a small 1D-CNN, exported to ONNX.

BasicMotions (UEA archive, shipped inside sktime) holds 3-axis accelerometer and
3-axis gyroscope recordings of four activities, 100 time steps each: 40 training and
40 test samples. The exported model takes RAW sensor values: the per-channel
normalisation (statistics from the training split only) is a layer inside the model,
so an edge device never needs to know them.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from torch import nn
from torch.nn import functional as F

from controller.workloads import sessions, training
from controller.workloads.base import (
    DEFAULT_CACHE_DIR,
    Score,
    Split,
    TaskKind,
    Workload,
    WorkloadData,
)
from controller.workloads.training import (
    deterministic,
    epoch_progress,
    export_single_input,
    load_cached,
    save_cached,
    score_classifier,
    select_split,
    single_thread,
    stratified_split,
    subset,
)

log = logging.getLogger(__name__)

MODEL_NAME = "basic-motions"
# Fixed and sorted, so the output index of a class never depends on load order.
LABELS: tuple[str, ...] = ("badminton", "running", "standing", "walking")
CHANNELS = 6
STEPS = 100
INPUT_NAME = "x"
OUTPUT_NAME = "logits"
DEFAULT_SEED = 0
DEFAULT_EPOCHS = 60
ONNX_OPSET = 18
# onnxruntime and torch may differ in the last bits; predictions must not differ at all.
LOGITS_ATOL = 1e-3


class WorkloadError(training.WorkloadError):
    """The dataset is not what this workload expects, or the export does not match torch."""


@dataclass(frozen=True)
class BasicMotionsData:
    """Both splits as float32 arrays [N, 6, 100] and int64 class indices into ``labels``."""

    x_train: NDArray[np.float32]
    y_train: NDArray[np.int64]
    x_test: NDArray[np.float32]
    y_test: NDArray[np.int64]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters; checked when built so a bad value fails before any work."""

    seed: int = DEFAULT_SEED
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 8
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    scale_jitter: float = 0.1  # each sample's channels scaled by U(1 - s, 1 + s)
    noise_std: float = 0.03  # gaussian noise, as a fraction of each channel's std
    widths: tuple[int, int, int] = (32, 64, 64)  # MotionCNN's conv channels

    def __post_init__(self) -> None:
        if any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be >= 1, got {self.widths}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.scale_jitter < 1:
            raise ValueError(f"scale_jitter must be in [0, 1), got {self.scale_jitter}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


@dataclass(frozen=True)
class TrainResult:
    """What training produced: the ONNX file and how good and how slow it was."""

    onnx_path: Path
    train_seconds: float
    test_accuracy_torch: float
    test_accuracy_onnx: float
    labels: tuple[str, ...]
    seed: int
    epochs: int
    parameters: int


def load_basic_motions() -> BasicMotionsData:
    """Load both splits from the copy inside sktime (no network)."""
    from sktime.datasets import load_basic_motions as _load  # heavy import: only when used

    x_train, y_train = _load(split="train", return_type="numpy3D")
    x_test, y_test = _load(split="test", return_type="numpy3D")
    return BasicMotionsData(
        x_train=_as_samples(x_train, "train"),
        y_train=_as_indices(y_train, "train"),
        x_test=_as_samples(x_test, "test"),
        y_test=_as_indices(y_test, "test"),
        labels=LABELS,
    )


def _as_samples(x: NDArray[np.float64], split: str) -> NDArray[np.float32]:
    if x.ndim != 3 or x.shape[1:] != (CHANNELS, STEPS):
        raise WorkloadError(
            f"BasicMotions {split} split has shape {x.shape}; expected [N, {CHANNELS}, {STEPS}]"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def _as_indices(y: NDArray[np.str_], split: str) -> NDArray[np.int64]:
    unknown = sorted(set(y.tolist()) - set(LABELS))
    if unknown:
        raise WorkloadError(f"BasicMotions {split} split has labels {unknown}; expected {LABELS}")
    index = {label: i for i, label in enumerate(LABELS)}
    return np.array([index[str(label)] for label in y], dtype=np.int64)


class ChannelNorm(nn.Module):
    """(x - mean) / std per channel, with statistics frozen in as buffers (exported too)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: NDArray[np.float32], std: NDArray[np.float32]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_block(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(),
    )


class MotionCNN(nn.Module):
    """Three conv blocks, global average pooling and a linear head (~24k parameters)."""

    def __init__(
        self,
        mean: NDArray[np.float32],
        std: NDArray[np.float32],
        n_classes: int = len(LABELS),
        widths: tuple[int, int, int] = (32, 64, 64),
    ) -> None:
        super().__init__()
        self.norm = ChannelNorm(mean, std)
        self.features = nn.Sequential(
            _conv_block(mean.shape[0], widths[0], 7),
            _conv_block(widths[0], widths[1], 5),
            _conv_block(widths[1], widths[2], 3),
        )
        self.head = nn.Linear(widths[2], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(self.norm(x))
        return self.head(h.mean(dim=2))  # type: ignore[no-any-return]


def channel_stats(x_train: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Per-channel mean and std over samples and time, from the training split only."""
    mean = x_train.mean(axis=(0, 2)).astype(np.float32)
    std = x_train.std(axis=(0, 2)).astype(np.float32)
    return mean, np.maximum(std, np.float32(1e-6))


def _augment(
    xb: torch.Tensor, std: torch.Tensor, config: TrainConfig, gen: torch.Generator
) -> torch.Tensor:
    """Random per-sample, per-channel scaling plus small gaussian jitter, on raw values."""
    n, c, _ = xb.shape
    scale = 1 + (torch.rand(n, c, 1, generator=gen) * 2 - 1) * config.scale_jitter
    noise = torch.randn(xb.shape, generator=gen) * std * config.noise_std
    return xb * scale + noise


def train_model(
    data: BasicMotionsData, config: TrainConfig, *, show_progress: bool = True
) -> MotionCNN:
    """Train a MotionCNN on the training split; seeded, deterministic, CPU only."""
    with deterministic(config.seed):
        mean, std = channel_stats(data.x_train)
        model = MotionCNN(mean, std, n_classes=len(data.labels), widths=config.widths)
        gen = torch.Generator().manual_seed(config.seed)
        x = torch.from_numpy(data.x_train)
        y = torch.from_numpy(data.y_train)
        std_t = model.norm.std
        optimiser = torch.optim.AdamW(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        steps_per_epoch = -(-len(x) // config.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimiser,
            max_lr=config.learning_rate,
            total_steps=config.epochs * steps_per_epoch,
        )
        with epoch_progress(show_progress) as progress:
            task = progress.add_task("training basic-motions 1D-CNN", total=config.epochs)
            for epoch in range(config.epochs):
                model.train()
                order = torch.randperm(len(x), generator=gen)
                total_loss = 0.0
                for start in range(0, len(x), config.batch_size):
                    idx = order[start : start + config.batch_size]
                    xb = _augment(x[idx], std_t, config, gen)
                    loss = F.cross_entropy(model(xb), y[idx])
                    optimiser.zero_grad()
                    loss.backward()  # type: ignore[no-untyped-call]
                    optimiser.step()
                    schedule.step()
                    total_loss += loss.item() * len(idx)
                mean_loss = total_loss / len(x)
                log.debug("epoch %d/%d loss %.4f", epoch + 1, config.epochs, mean_loss)
                progress.update(task, advance=1, description=f"training (loss {mean_loss:.3f})")
        model.eval()
        return model


def predict_torch(model: nn.Module, x: NDArray[np.float32]) -> NDArray[np.float32]:
    """Logits [N, classes] from the model in eval mode."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    out: NDArray[np.float32] = logits.numpy().astype(np.float32)
    return out


def predict_onnx(path: Path, x: NDArray[np.float32]) -> NDArray[np.float32]:
    """Logits [N, classes] from onnxruntime on the CPU, the way an edge agent runs it."""
    session = sessions.session(path)
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, np.float32)})
    return np.asarray(logits, dtype=np.float32)


def accuracy(logits: NDArray[np.float32], y: NDArray[np.int64]) -> float:
    return float((logits.argmax(axis=1) == y).mean())


def export_onnx(model: MotionCNN, path: Path, labels: tuple[str, ...] = LABELS) -> Path:
    """Export to ONNX: input "x" [batch, 6, 100] float32 (batch dynamic), output "logits".

    The file is self-contained (no external data) and carries the label order in its
    metadata ("labels", a JSON list), so whoever reads the logits can name the class.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    example = torch.zeros(1, CHANNELS, STEPS, dtype=torch.float32)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in torch 2.9+ but stable for this graph.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(
        proto,
        {"labels": json.dumps(list(labels)), "workload": MODEL_NAME},
    )
    proto.doc_string = (
        "BasicMotions activity recognition: raw accelerometer+gyroscope [batch, 6, 100] "
        "-> logits over labels (metadata 'labels')"
    )
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def check_onnx_matches_torch(
    path: Path, model: nn.Module, x: NDArray[np.float32]
) -> NDArray[np.float32]:
    """Return onnxruntime's logits; raise WorkloadError if any prediction differs from torch's."""
    want = predict_torch(model, x)
    got = predict_onnx(path, x)
    if got.shape != want.shape:
        raise WorkloadError(f"ONNX logits have shape {got.shape}; torch gave {want.shape}")
    differing = int((got.argmax(axis=1) != want.argmax(axis=1)).sum())
    worst = float(np.abs(got - want).max())
    if differing or worst > LOGITS_ATOL:
        raise WorkloadError(
            f"exported model disagrees with torch: {differing} of {len(x)} predictions differ, "
            f"max |logit difference| {worst:.2e} (allowed {LOGITS_ATOL:.0e})"
        )
    return got


def train_and_export(
    out_dir: Path,
    *,
    seed: int = DEFAULT_SEED,
    epochs: int = DEFAULT_EPOCHS,
    show_progress: bool = True,
    data: BasicMotionsData | None = None,
) -> TrainResult:
    """Train on BasicMotions, export ``out_dir/basic-motions.onnx``, verify it in onnxruntime."""
    config = TrainConfig(seed=seed, epochs=epochs)
    data = data if data is not None else load_basic_motions()
    started = time.perf_counter()
    model = train_model(data, config, show_progress=show_progress)
    train_seconds = time.perf_counter() - started
    torch_logits = predict_torch(model, data.x_test)
    path = export_onnx(model, out_dir / f"{MODEL_NAME}.onnx", data.labels)
    onnx_logits = check_onnx_matches_torch(path, model, data.x_test)
    result = TrainResult(
        onnx_path=path,
        train_seconds=train_seconds,
        test_accuracy_torch=accuracy(torch_logits, data.y_test),
        test_accuracy_onnx=accuracy(onnx_logits, data.y_test),
        labels=data.labels,
        seed=seed,
        epochs=epochs,
        parameters=sum(p.numel() for p in model.parameters()),
    )
    log.info(
        "trained %s (seed %d, %d epochs) in %.1f s: test accuracy %.3f",
        MODEL_NAME,
        seed,
        epochs,
        train_seconds,
        result.test_accuracy_torch,
    )
    return result


# ------------------------------------------------------------------ Workload interface


_ARCHITECTURE = "motion-cnn-v1"  # bump when MotionCNN changes: cached weights are then retrained


class BasicMotionsWorkload(Workload):
    """BasicMotions behind the common Workload interface, for the compression code.

    The functions above stay as the demo uses them (trained on all 40 TRAIN samples).
    Here a stratified fifth of TRAIN (two per activity) is held out as the val split
    that compression fine-tuning selects on, so the source model trains on the other 32.
    """

    name = MODEL_NAME
    kind = TaskKind.CLASSIFICATION
    input_names = (INPUT_NAME,)
    output_names = (OUTPUT_NAME,)
    val_fraction = 0.2
    split_seed = 0
    widths: tuple[int, int, int] = (32, 64, 64)
    architecture = _ARCHITECTURE

    def __init__(self, *, epochs: int = DEFAULT_EPOCHS, show_progress: bool = False) -> None:
        self.epochs = epochs
        self.show_progress = show_progress

    def data(self) -> WorkloadData:
        return self._data

    @cached_property
    def _data(self) -> WorkloadData:
        raw = load_basic_motions()
        full = Split({INPUT_NAME: raw.x_train}, raw.y_train)
        keep, val = stratified_split(raw.y_train, self.val_fraction, self.split_seed)
        return WorkloadData(
            train=subset(full, keep),
            val=subset(full, val),
            test=Split({INPUT_NAME: raw.x_test}, raw.y_test),
            class_names=raw.labels,
        )

    def cache_path(self, cache_dir: Path | None = None, *, seed: int = 0) -> Path:
        suffix = "" if self.epochs == DEFAULT_EPOCHS else f"-e{self.epochs}"
        return (cache_dir or DEFAULT_CACHE_DIR) / f"{self.name}-seed{seed}{suffix}.pt"

    def source_model(self, cache_dir: Path | None = None, *, seed: int = 0) -> nn.Module:
        """The cached MotionCNN for this seed, or one trained on the train split (then cached)."""
        path = self.cache_path(cache_dir, seed=seed)
        cached = load_cached(path)
        if cached is not None and cached.meta.get("architecture") == self.architecture:
            zeros = np.zeros(CHANNELS, dtype=np.float32)
            # the norm buffers come from the state_dict
            model = MotionCNN(zeros, zeros + 1, widths=self.widths)
            model.load_state_dict(cached.state_dict)
            return model.eval()
        train = self.data().train
        if train.labels is None:
            raise WorkloadError("BasicMotions train split has no labels")
        subset_data = BasicMotionsData(
            x_train=np.asarray(train.inputs[INPUT_NAME], dtype=np.float32),
            y_train=train.labels,
            x_test=np.asarray(self.data().test.inputs[INPUT_NAME], dtype=np.float32),
            y_test=np.zeros(0, dtype=np.int64),
            labels=LABELS,
        )
        started = time.perf_counter()
        with single_thread():
            model = train_model(
                subset_data,
                TrainConfig(seed=seed, epochs=self.epochs, widths=self.widths),
                show_progress=self.show_progress,
            )
        meta: dict[str, float | int | str] = {
            "architecture": self.architecture,
            "seed": seed,
            "epochs": self.epochs,
            "train_seconds": time.perf_counter() - started,
        }
        save_cached(path, model, meta)
        return model

    def export_onnx(self, model: nn.Module, path: Path) -> Path:
        """Input "x" [batch, 6, 100] float32 raw sensor values, output "logits" [batch, 4].

        Any module with MotionCNN's signature (a pruned or distilled one too); same
        names and label metadata as the module-level ``export_onnx``, plus "task".
        """
        return export_single_input(
            model,
            path,
            torch.zeros(1, CHANNELS, STEPS),
            input_name=INPUT_NAME,
            output_name=OUTPUT_NAME,
            metadata={
                "labels": json.dumps(list(LABELS)),
                "workload": self.name,
                "task": TaskKind.CLASSIFICATION.value,
            },
            doc=(
                "BasicMotions activity recognition: raw accelerometer+gyroscope "
                f"[batch, {CHANNELS}, {STEPS}] -> logits over labels (metadata 'labels')"
            ),
        )

    def score_onnx(self, path: Path, *, split: str = "test") -> Score:
        return score_classifier(path, select_split(self.data(), split), OUTPUT_NAME)


class WideBasicMotionsWorkload(BasicMotionsWorkload):
    """The same task with four times the channels (~400k parameters, ~16x the MACs).

    The size where compute, not a call's fixed cost, decides a small device's latency:
    the demo's closed loop uses it, so a recompression visibly changes what devices
    measure (on the small model an inference is mostly fixed per-call cost).
    """

    name = "basic-motions-wide"
    widths = (128, 256, 256)
    architecture = "motion-cnn-v1-wide"
