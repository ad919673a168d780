"""What the trained workloads share: seeded splits, one training loop, export, ONNX runs, cache.

PLAID and ItalyPowerDemand train their source models the same way — AdamW with a
one-cycle schedule, a validation split carved from TRAIN (stratified) that picks the
epoch whose weights are kept, deterministic kernels — so a difference between them is
the data and the architecture, never the loop. The test split is never looked at while
training.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.nn import functional as F

from controller.workloads.base import Score, Split, WorkloadData
from controller.workloads.sessions import session

log = logging.getLogger(__name__)

ONNX_OPSET = 18
CACHE_FORMAT = 1

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""Random training-time transform of one batch of (single-input) samples."""


class WorkloadError(RuntimeError):
    """A dataset is not what its workload expects, or an export does not match torch."""


# ------------------------------------------------------------------ splits


def stratified_split(
    labels: NDArray[np.int64], fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(keep, held-out) sorted indices: ``fraction`` of every class held out, at least one.

    Classes with a single sample stay entirely in ``keep``.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) > 1:
            held.extend(idx[: max(1, round(fraction * len(idx)))].tolist())
    held_out = np.array(sorted(held), dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(labels), dtype=np.int64), held_out)
    return keep, held_out


def subset(split: Split, idx: NDArray[np.int64]) -> Split:
    return Split(
        {k: v[idx] for k, v in split.inputs.items()},
        None if split.labels is None else split.labels[idx],
    )


# ------------------------------------------------------------------ training


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, restoring the caller's setting afterwards.

    These models are small, and the machines they train on are shared: with two threads
    and the second core busy, an epoch took 4-20x longer than with one (OpenMP
    barriers wait on the busy core), while one thread costs at most ~1.4x on an idle
    machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch and force deterministic kernels, restoring the caller's state afterwards."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the source-model loop; checked when built."""

    epochs: int
    batch_size: int = 32
    learning_rate: float = 3e-3
    weight_decay: float = 1e-2
    label_smoothing: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class TrainReport:
    """What training did: which epoch's weights were kept and how good they were on val."""

    epochs: int
    best_epoch: int  # 1-based
    val_accuracy: float
    val_loss: float
    seconds: float


def _only_input(split: Split) -> torch.Tensor:
    if len(split.inputs) != 1:
        raise WorkloadError(f"expected one model input, got {sorted(split.inputs)}")
    (array,) = split.inputs.values()
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _labels(split: Split) -> torch.Tensor:
    if split.labels is None:
        raise WorkloadError("training needs labels; the split has none")
    return torch.from_numpy(np.ascontiguousarray(split.labels, dtype=np.int64))


def logits_torch(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Logits in eval mode without gradients (restores the caller's train/eval mode)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def train_classifier(
    model: nn.Module,
    train: Split,
    val: Split,
    config: TrainConfig,
    *,
    augment: Augment | None = None,
    description: str = "training",
    show_progress: bool = False,
) -> TrainReport:
    """Train in place; keep the weights of the epoch with the lowest val loss.

    Loss, not accuracy: on a val split of ~100 samples accuracy moves in 1% steps and
    often peaks early by chance (on PLAID, picking by val accuracy lost ~1 point of test
    accuracy over four seeds). Ties go to the later epoch: with a one-cycle schedule
    the late, low-learning-rate epochs are the stable ones.
    """
    started = time.perf_counter()
    with deterministic(config.seed), single_thread():
        gen = torch.Generator().manual_seed(config.seed)
        x, y = _only_input(train), _labels(train)
        xv, yv = _only_input(val), _labels(val)
        optimiser = torch.optim.AdamW(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        steps_per_epoch = -(-len(x) // config.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=config.learning_rate, total_steps=config.epochs * steps_per_epoch
        )
        best: tuple[float, float, int] = (0.0, float("inf"), 0)  # (val acc, val loss, epoch)
        best_state = copy.deepcopy(model.state_dict())
        with epoch_progress(show_progress) as progress:
            task = progress.add_task(description, total=config.epochs)
            for epoch in range(1, config.epochs + 1):
                model.train()
                order = torch.randperm(len(x), generator=gen)
                for start in range(0, len(x), config.batch_size):
                    idx = order[start : start + config.batch_size]
                    if len(idx) < 2 and len(x) > 1:
                        continue  # BatchNorm cannot train on a batch of one
                    xb = x[idx] if augment is None else augment(x[idx], gen)
                    loss = F.cross_entropy(
                        model(xb), y[idx], label_smoothing=config.label_smoothing
                    )
                    optimiser.zero_grad()
                    loss.backward()  # type: ignore[no-untyped-call]
                    optimiser.step()
                    schedule.step()
                logits = logits_torch(model, xv)
                val_acc = float((logits.argmax(dim=1) == yv).float().mean())
                val_loss = float(F.cross_entropy(logits, yv))
                if val_loss <= best[1]:
                    best = (val_acc, val_loss, epoch)
                    best_state = copy.deepcopy(model.state_dict())
                log.debug("%s epoch %d val %.3f (loss %.3f)", description, epoch, val_acc, val_loss)
                progress.update(task, advance=1, description=f"{description} (val {val_acc:.3f})")
        model.load_state_dict(best_state)
        model.eval()
    return TrainReport(
        epochs=config.epochs,
        best_epoch=best[2],
        val_accuracy=best[0],
        val_loss=best[1],
        seconds=time.perf_counter() - started,
    )


@contextlib.contextmanager
def epoch_progress(show: bool) -> Iterator[Progress]:
    """A transient progress bar over epochs (disabled when ``show`` is false)."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs"),
        TimeElapsedColumn(),
        disable=not show,
        transient=True,
    )
    with progress:
        yield progress


# ------------------------------------------------------------------ export and ONNX runs


def export_single_input(
    model: nn.Module,
    path: Path,
    example: torch.Tensor,
    *,
    input_name: str,
    output_name: str,
    metadata: Mapping[str, str],
    doc: str,
) -> Path:
    """Export a one-input, one-output model with a dynamic batch axis, self-contained.

    Written to a temporary file and renamed, so a failed export leaves nothing behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with temporary_path(path) as tmp:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in torch 2.9+ but stable for these graphs.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=FutureWarning)
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, dict(metadata))
        proto.doc_string = doc
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return path


@contextlib.contextmanager
def temporary_path(path: Path) -> Iterator[Path]:
    """A temp path beside ``path``, renamed onto it on success and removed on failure."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; exports are read by other processes
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_onnx(
    path: Path,
    inputs: Mapping[str, NDArray[np.generic]],
    output_name: str,
    *,
    batch_size: int = 256,
) -> NDArray[np.float32]:
    """One output of an ONNX model over all samples, ``batch_size`` at a time."""
    sess = session(path)
    n = len(next(iter(inputs.values())))
    outs = []
    for start in range(0, n, batch_size):
        feed = {k: np.ascontiguousarray(v[start : start + batch_size]) for k, v in inputs.items()}
        (out,) = sess.run([output_name], feed)
        outs.append(np.asarray(out, dtype=np.float32))
    return np.concatenate(outs)


def accuracy(logits: NDArray[np.float32], labels: NDArray[np.int64]) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def log_loss(logits: NDArray[np.float32], labels: NDArray[np.int64]) -> float:
    """Mean cross-entropy of the labels under softmax(logits), in nats.

    Finer than accuracy: on a small test set where every model is right on every sample
    (BasicMotions: 40 samples), it still tells a more confident model from a less
    confident one.
    """
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def select_split(data: WorkloadData, split: str) -> Split:
    splits = {"train": data.train, "val": data.val, "test": data.test}
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(splits)}")
    return splits[split]


def score_classifier(path: Path, split: Split, output_name: str) -> Score:
    """Top-1 accuracy of an ONNX classifier on a labelled split (and its log loss)."""
    if split.labels is None:
        raise WorkloadError("scoring needs labels; the split has none")
    logits = run_onnx(path, split.inputs, output_name)
    return Score(
        metric="accuracy",
        value=accuracy(logits, split.labels),
        samples=len(split),
        extra={"log_loss": log_loss(logits, split.labels)},
    )


# ------------------------------------------------------------------ cache


@dataclass(frozen=True)
class CachedModel:
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, float | int | str]


def save_cached(path: Path, model: nn.Module, meta: Mapping[str, float | int | str]) -> None:
    """Write the state_dict and a small JSON-able record atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_path(path) as tmp:
        torch.save(
            {"format": CACHE_FORMAT, "state_dict": model.state_dict(), "meta": json.dumps(meta)},
            tmp,
        )


def load_cached(path: Path) -> CachedModel | None:
    """The cached model, or None when absent, unreadable or of another format."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: retrain rather than fail
        log.warning("ignoring unreadable cached model %s: %s", path, exc)
        return None
    if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT:
        log.warning("ignoring cached model %s of another format", path)
        return None
    return CachedModel(state_dict=blob["state_dict"], meta=json.loads(blob["meta"]))
