"""Log loss, the finer quality measure scored beside accuracy for classifiers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller.workloads.training import accuracy, log_loss


def test_log_loss_is_cross_entropy_in_nats() -> None:
    labels = np.array([0, 1, 2], dtype=np.int64)
    uniform = np.zeros((3, 3), dtype=np.float32)
    assert log_loss(uniform, labels) == pytest.approx(math.log(3))
    confident = np.eye(3, dtype=np.float32) * 20
    assert log_loss(confident, labels) == pytest.approx(2 * math.exp(-20), rel=1e-3)
    # Both are right on every sample; only the log loss tells them apart.
    hesitant = np.eye(3, dtype=np.float32) * 2
    assert accuracy(hesitant, labels) == accuracy(confident, labels) == 1.0
    assert log_loss(hesitant, labels) > log_loss(confident, labels)


def test_log_loss_is_stable_for_huge_logits() -> None:
    logits = np.array([[1e4, -1e4], [-1e4, 1e4]], dtype=np.float32)
    labels = np.array([1, 1], dtype=np.int64)
    assert log_loss(logits, labels) == pytest.approx(1e4)  # (2e4 + 0) / 2, no overflow
