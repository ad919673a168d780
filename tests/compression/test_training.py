"""The shared fine-tuning loop is seeded, learns, keeps the weights asked for; counters count right.

Also home of the tiny models and data the other technique tests share (imported by name:
pytest only collects the ``test_*`` functions here).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from numpy.typing import NDArray
from torch import nn
from torch.nn import functional as F

from controller.compression.errors import CompressionError
from controller.compression.training import (
    TrainOptions,
    count_macs,
    count_nonzero,
    count_parameters,
    distillation_loss,
    evaluate_accuracy,
    fine_tune,
)
from controller.workloads.base import Split

QUIET = TrainOptions(show_progress=False, batch_size=16, lr=5e-3)

# ------------------------------------------------------------------ shared helpers


def synthetic_split(
    n: int = 96, channels: int = 3, length: int = 32, classes: int = 3, seed: int = 0
) -> Split:
    """Noisy sines whose frequency is the class: learnable in a few epochs by a tiny CNN."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).astype(np.int64)
    t = np.arange(length, dtype=np.float32)
    phase = rng.uniform(0, 2 * np.pi, (n, channels, 1))
    x = np.sin(2 * np.pi * (y[:, None, None] + 1) * t / length + phase)
    x = x + rng.normal(0, 0.3, x.shape)
    return Split({"x": x.astype(np.float32)}, y)


class TinyCNN(nn.Module):
    """Conv blocks in an nn.Sequential (one keeps its width), pooling, a linear classifier."""

    def __init__(self, channels: int = 3, classes: int = 3, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(
                nn.Conv1d(channels, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU()
            ),
            nn.Sequential(nn.Conv1d(width, width, 3, padding=1), nn.BatchNorm1d(width), nn.ReLU()),
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=2))  # type: ignore[no-any-return]


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class TinyResNet(nn.Module):
    """Stem, two residual blocks (their adds couple the stem's and both conv2's channels)."""

    def __init__(self, channels: int = 3, classes: int = 3, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(channels, width, 5, padding=2), nn.BatchNorm1d(width))
        self.blocks = nn.Sequential(ResidualBlock(width), ResidualBlock(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(F.relu(self.stem(x)))
        return self.head(h.mean(dim=2))  # type: ignore[no-any-return]


def trained(
    build: Callable[[], nn.Module], split: Split, epochs: int = 8, seed: int = 0
) -> nn.Module:
    """A freshly initialised (seeded) model after a short fine-tune."""
    torch.manual_seed(seed)
    model = build()
    fine_tune(model, split, epochs=epochs, options=QUIET)
    return model


def conv_at(model: nn.Module, name: str) -> nn.Conv1d:
    """The Conv1d at a dotted module path (typed access for the assertions)."""
    module = model.get_submodule(name)
    assert isinstance(module, nn.Conv1d), (name, module)
    return module


def onnx_outputs(model: nn.Module, x: NDArray[np.float32], tmp_path: Path) -> NDArray[np.float32]:
    """Export (TorchScript exporter), run in onnxruntime; the shape must match torch's."""
    model.eval()
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(x[:1]),),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=18,
            dynamo=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    (got,) = session.run(["logits"], {"x": x})
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    return np.asarray(got)


# ------------------------------------------------------------------ tests


def test_fine_tune_is_deterministic_given_a_seed() -> None:
    data = synthetic_split()

    def run(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = TinyCNN()
        fine_tune(model, data, epochs=2, options=TrainOptions(show_progress=False, seed=seed))
        return model.state_dict()

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fine_tune_learns_and_keeps_the_best_weights_on_val_when_asked() -> None:
    train, val = synthetic_split(seed=0), synthetic_split(n=48, seed=1)
    torch.manual_seed(0)
    model = TinyCNN()
    before = evaluate_accuracy(model, val)
    options = dataclasses.replace(QUIET, keep="best_val")
    fit = fine_tune(model, train, epochs=10, options=options, val=val)
    assert fit.val_accuracy is not None
    assert fit.val_accuracy == evaluate_accuracy(model, val)  # the kept weights are the best
    assert fit.val_accuracy >= before
    assert fit.val_accuracy > 0.8
    assert not model.training


def test_fine_tune_keeps_the_last_weights_by_default_and_only_scores_val() -> None:
    """Val never picks the weights by default: the planner judges on that same split."""
    train, val = synthetic_split(seed=0), synthetic_split(n=48, seed=1)
    torch.manual_seed(0)
    with_val = TinyCNN()
    torch.manual_seed(0)
    without_val = TinyCNN()
    fit = fine_tune(with_val, train, epochs=4, options=QUIET, val=val)
    fine_tune(without_val, train, epochs=4, options=QUIET)
    state = without_val.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in with_val.state_dict().items())
    assert fit.best_epoch == 4
    assert fit.val_accuracy == evaluate_accuracy(with_val, val)


def test_distilling_without_augmentation_matches_a_live_teacher() -> None:
    """Cached teacher logits (no augmentation) train exactly like a teacher run per batch."""
    data = synthetic_split()
    torch.manual_seed(1)
    teacher = TinyCNN().eval()

    def unchanged(xb: tuple[torch.Tensor, ...], _gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return xb  # an augmentation that changes nothing forces the per-batch teacher path

    states = []
    for augment in (None, unchanged):
        torch.manual_seed(0)
        student = TinyCNN(width=4)
        options = dataclasses.replace(QUIET, augment=augment)
        fine_tune(student, data, epochs=2, options=options, teacher=teacher, alpha=0.5)
        states.append(student.state_dict())
    for key, value in states[0].items():
        torch.testing.assert_close(value, states[1][key], rtol=1e-4, atol=1e-5)


def test_zero_epochs_changes_nothing() -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fit = fine_tune(model, synthetic_split(), epochs=0, options=QUIET)
    assert fit.epochs == 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_teacher_loss_is_kl_plus_label_loss() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(8, 4), torch.randn(8, 4)
    y = torch.randint(0, 4, (8,))
    ce = F.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, t, y, temperature=3, alpha=0), ce)
    assert float(distillation_loss(s, s, y, temperature=3, alpha=1)) == pytest.approx(0, abs=1e-6)
    mixed = distillation_loss(s, t, y, temperature=2, alpha=0.5)
    kl = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean")
    assert torch.allclose(mixed, 0.5 * 4 * kl + 0.5 * ce, atol=1e-6)


def test_fine_tune_with_a_teacher_runs() -> None:
    data = synthetic_split()
    teacher = trained(TinyCNN, data)
    torch.manual_seed(1)
    student = TinyCNN(width=4)
    fit = fine_tune(student, data, epochs=3, options=QUIET, teacher=teacher, alpha=0.9)
    assert np.isfinite(fit.train_loss)


def test_counters() -> None:
    model = nn.Sequential(
        nn.Conv1d(3, 8, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    assert count_parameters(model) == 3 * 8 * 5 + 8 + 8 * 4 + 4
    assert count_macs(model, torch.zeros(2, 3, 32)) == 32 * 8 * 3 * 5 + 8 * 4
    conv = model.get_submodule("0")
    assert isinstance(conv, nn.Conv1d)
    with torch.no_grad():
        conv.weight[:4].zero_()
    assert count_nonzero(model) == count_parameters(model) - 4 * 3 * 5
    depthwise = nn.Conv1d(8, 8, 3, padding=1, groups=8)
    assert count_macs(depthwise, torch.zeros(1, 8, 10)) == 10 * 8 * 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"epochs": -1}, "epochs"), ({"epochs": 1, "alpha": 2.0}, "alpha")],
)
def test_bad_arguments_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(CompressionError, match=match):
        fine_tune(TinyCNN(), synthetic_split(), options=QUIET, teacher=TinyCNN(), **kwargs)  # type: ignore[arg-type]


def test_unlabelled_split_and_bad_options_are_refused() -> None:
    data = synthetic_split()
    with pytest.raises(CompressionError, match="labels"):
        fine_tune(TinyCNN(), Split(data.inputs, None), epochs=1, options=QUIET)
    with pytest.raises(CompressionError, match="lr"):
        TrainOptions(lr=0)


def test_tiny_models_export(tmp_path: Path) -> None:
    x = synthetic_split(n=4).inputs["x"].astype(np.float32)
    for model in (TinyCNN(), TinyResNet()):
        assert onnx_outputs(model, x, tmp_path).shape == (4, 3)
