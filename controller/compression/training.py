"""The one training loop every PyTorch technique fine-tunes with, plus size counters.

Pruning, low-rank decomposition and distillation all end in "train a bit more": sharing
one seeded loop means a recipe's accuracy differs only by the technique, never by a
different optimiser or shuffling. A model is called with its split's inputs as
positional arguments in the split's input-name order (the order the ONNX export uses).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from controller.compression.errors import CompressionError
from controller.workloads.base import Split
from controller.workloads.training import deterministic, epoch_progress

log = logging.getLogger(__name__)

Inputs = tuple[torch.Tensor, ...]
Augment = Callable[[Inputs, torch.Generator], Inputs]
"""Random training-time transform of one batch's inputs (labels unchanged)."""

_MAC_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class TrainOptions:
    """How to fine-tune: shared by every technique so a recipe changes only the technique."""

    lr: float = 3e-3
    batch_size: int = 16
    weight_decay: float = 1e-4
    seed: int = 0
    show_progress: bool = True
    augment: Augment | None = None
    eval_batch_size: int = 256
    # Intra-op threads while training (None: torch's default). Small models train several
    # times faster on one thread: no OpenMP barrier waits, above all on a busy machine.
    threads: int | None = 1
    # Which weights a fine-tune with ``val`` leaves in the model: "last" (the end of the
    # cosine schedule; val is only scored) or "best_val" (the epoch that scored best on
    # val). "last" is the default because the planner judges candidates on that same val
    # split: picking the best of N noisy epochs on ~100 samples would flatter every
    # candidate by a sample or two, more than a 0.5-point budget.
    keep: Literal["last", "best_val"] = "last"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise CompressionError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise CompressionError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise CompressionError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.eval_batch_size < 1:
            raise CompressionError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.threads is not None and self.threads < 1:
            raise CompressionError(f"threads must be >= 1 or None, got {self.threads}")
        if self.keep not in ("last", "best_val"):
            raise CompressionError(f"keep must be 'last' or 'best_val', got {self.keep!r}")


@dataclass(frozen=True)
class FitResult:
    """What a fine-tune did: epochs run, which epoch's weights were kept, final scores."""

    epochs: int
    best_epoch: int  # epoch whose weights were kept; 0 = the starting ones (keep="best_val")
    train_loss: float  # mean loss of the last epoch (nan when epochs == 0)
    val_accuracy: float | None
    val_loss: float | None


# ------------------------------------------------------------------ inputs


def split_tensors(split: Split) -> Inputs:
    """The split's inputs as tensors in input-name order; float64 becomes float32."""
    tensors = []
    for name, array in split.inputs.items():
        arr = np.ascontiguousarray(array)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        if arr.dtype.kind not in "fiub":
            raise CompressionError(f"input {name!r} has dtype {arr.dtype}; expected numbers")
        tensors.append(torch.from_numpy(arr))
    if not tensors:
        raise CompressionError("the split has no inputs")
    return tuple(tensors)


def split_labels(split: Split, purpose: str) -> torch.Tensor:
    if split.labels is None:
        raise CompressionError(f"{purpose} needs labels; the split has none")
    labels = torch.from_numpy(np.ascontiguousarray(split.labels, dtype=np.int64))
    if len(labels) != len(split):
        raise CompressionError(
            f"the split has {len(split)} samples but {len(labels)} labels ({purpose})"
        )
    return labels


def example_inputs(split: Split, n: int = 1) -> Inputs:
    """The first ``n`` samples' inputs: what graph tracers (Torch-Pruning, hooks) run on."""
    return split_tensors(split.take(n))


def _select(inputs: Inputs, idx: torch.Tensor | slice) -> Inputs:
    return tuple(t[idx] for t in inputs)


# ------------------------------------------------------------------ determinism


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads, restoring the caller's setting afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ loss and evaluation


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha·T²·KL(softmax(t/T) || softmax(s/T)) + (1 - alpha)·CE(s, y) (Hinton et al.).

    T² keeps the soft term's gradient scale independent of the temperature.
    """
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        log_target=True,
        reduction="batchmean",
    )
    ce = F.cross_entropy(student_logits, labels)
    return alpha * t * t * kl + (1 - alpha) * ce


def predict_logits(model: nn.Module, split: Split, *, batch_size: int = 256) -> torch.Tensor:
    """Logits for every sample, in eval mode without gradients; restores train/eval mode."""
    inputs = split_tensors(split)
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.no_grad():
            for start in range(0, len(split), batch_size):
                outs.append(model(*_select(inputs, slice(start, start + batch_size))))
    finally:
        model.train(was_training)
    logits = torch.cat(outs)
    if logits.ndim != 2:
        raise CompressionError(
            f"the model returns shape {tuple(logits.shape)}; expected [batch, classes] logits"
        )
    return logits


def evaluate(model: nn.Module, split: Split, *, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on a labelled split."""
    labels = split_labels(split, "evaluation")
    logits = predict_logits(model, split, batch_size=batch_size)
    if logits.shape[0] != len(labels):
        raise CompressionError(f"the model returned {logits.shape[0]} rows for {len(labels)}")
    accuracy = float((logits.argmax(dim=1) == labels).float().mean())
    loss = float(F.cross_entropy(logits, labels))
    return accuracy, loss


def evaluate_accuracy(model: nn.Module, split: Split, *, batch_size: int = 256) -> float:
    """Top-1 accuracy on a labelled split."""
    return evaluate(model, split, batch_size=batch_size)[0]


# ------------------------------------------------------------------ the loop


def fine_tune(
    model: nn.Module,
    train: Split,
    *,
    epochs: int,
    options: TrainOptions | None = None,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    val: Split | None = None,
    label: str = "fine-tuning",
) -> FitResult:
    """Train ``model`` in place: AdamW, cosine LR decay per batch, seeded and deterministic.

    Without a teacher the loss is cross-entropy; with one it is ``distillation_loss``
    on the same (augmented) batch. Without augmentation the teacher's logits are computed
    once for the whole split (the teacher is frozen and in eval mode, so they are the
    same every epoch). With ``val``: ``options.keep == "last"`` leaves the weights of the
    last epoch and only scores them on val; ``"best_val"`` leaves those that scored best
    on it (accuracy, then lower loss; the starting weights count as epoch 0), so the
    fine-tune never returns something worse than it started from on val, at the price of
    flattering val. The model is left in eval mode.
    """
    options = options or TrainOptions()
    if epochs < 0:
        raise CompressionError(f"epochs must be >= 0, got {epochs}")
    if teacher is not None:
        if not temperature > 0:
            raise CompressionError(f"temperature must be > 0, got {temperature}")
        if not 0 <= alpha <= 1:
            raise CompressionError(f"alpha must be in [0, 1], got {alpha}")
    inputs = split_tensors(train)
    labels = split_labels(train, "training")
    if len(labels) == 0:
        raise CompressionError("the training split is empty")
    if val is not None:
        split_labels(val, "validation")
    select = val is not None and options.keep == "best_val"

    best_state: dict[str, torch.Tensor] | None = None
    best_key: tuple[float, float] | None = None
    best_epoch = 0
    if select and val is not None:
        start_acc, start_loss = evaluate(model, val, batch_size=options.eval_batch_size)
        best_key, best_state = (start_acc, -start_loss), copy.deepcopy(model.state_dict())
    train_loss = float("nan")

    if epochs > 0:
        if teacher is not None:
            teacher.eval()
        with deterministic(options.seed), threads(options.threads):
            gen = torch.Generator().manual_seed(options.seed)
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise CompressionError("the model has no trainable parameters")
            fixed_targets = None
            if teacher is not None and options.augment is None:
                fixed_targets = predict_logits(teacher, train, batch_size=options.eval_batch_size)
            optimiser = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
            batches = _batch_starts(len(labels), options.batch_size)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimiser, T_max=epochs * len(batches)
            )
            with epoch_progress(options.show_progress) as progress:
                task = progress.add_task(label, total=epochs)
                for epoch in range(1, epochs + 1):
                    model.train()
                    order = torch.randperm(len(labels), generator=gen)
                    total, seen = 0.0, 0
                    for start, stop in batches:
                        idx = order[start:stop]
                        xb = _select(inputs, idx)
                        if options.augment is not None:
                            xb = options.augment(xb, gen)
                        logits = model(*xb)
                        if teacher is None:
                            loss = F.cross_entropy(logits, labels[idx])
                        else:
                            if fixed_targets is not None:
                                teacher_logits = fixed_targets[idx]
                            else:
                                with torch.no_grad():
                                    teacher_logits = teacher(*xb)
                            loss = distillation_loss(
                                logits,
                                teacher_logits,
                                labels[idx],
                                temperature=temperature,
                                alpha=alpha,
                            )
                        optimiser.zero_grad()
                        loss.backward()  # type: ignore[no-untyped-call]
                        optimiser.step()
                        schedule.step()
                        total += loss.item() * len(idx)
                        seen += len(idx)
                    train_loss = total / seen
                    desc = f"{label} (loss {train_loss:.3f}"
                    if select and val is not None:
                        acc, vloss = evaluate(model, val, batch_size=options.eval_batch_size)
                        desc += f", val acc {acc:.3f}"
                        if best_key is None or (acc, -vloss) > best_key:
                            best_key, best_epoch = (acc, -vloss), epoch
                            best_state = copy.deepcopy(model.state_dict())
                    log.debug("%s epoch %d/%d: %s", label, epoch, epochs, desc)
                    progress.update(task, advance=1, description=desc + ")")
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    if val is None:
        return FitResult(epochs, epochs, train_loss, None, None)
    if best_key is None:  # keep == "last": score the weights that stay
        acc, vloss = evaluate(model, val, batch_size=options.eval_batch_size)
        return FitResult(epochs, epochs, train_loss, acc, vloss)
    return FitResult(epochs, best_epoch, train_loss, best_key[0], -best_key[1])


def _batch_starts(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batch bounds; a trailing batch of one sample joins the previous one (BatchNorm needs 2)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


# ------------------------------------------------------------------ size counters


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Number of parameter elements that are not exactly zero."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def executed_layers(model: nn.Module, example: Sequence[torch.Tensor]) -> list[nn.Module]:
    """Every Conv/Linear call of one forward pass, in order; the last is the classifier."""
    calls: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda mod, _i, _o: calls.append(mod))
        for m in model.modules()
        if isinstance(m, _MAC_LAYERS)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls


def count_macs(model: nn.Module, example: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Multiply-accumulates of one sample through every Conv and Linear layer (dense count).

    Counted with forward hooks, so only layers that actually run are included, as
    often as they run. Zeros from unstructured pruning still count: a dense kernel
    multiplies them anyway.
    """
    args = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    if not args:
        raise CompressionError("count_macs needs at least one example input")
    batch = args[0].shape[0] if args[0].ndim > 0 else 1
    total = 0

    def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            per_output = module.in_features
        elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        else:
            return
        total += output.numel() * per_output

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _MAC_LAYERS)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total // max(batch, 1)
