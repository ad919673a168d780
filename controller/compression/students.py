"""The compact zoo: small architectures the planner can pick as distillation students.

Depthwise-separable convolutions cost about 1/k of a full convolution's multiply-adds
(k = kernel size) for a similar receptive field, which is why they dominate on-device
models (MobileNet, DS-CNN keyword spotting). For the same reason a wide depthwise kernel
is almost free: the 1D student uses 9 taps per block (and a 7-tap stem), which on PLAID
distilled better than 5/5/3 taps (val 0.899 against 0.876, mean of two seeds; 15 taps
scored lower again). Every student starts with a BatchNorm on
its raw input, so it learns its own input scaling (the teachers carry theirs inside too)
and the exported model still takes raw values.

A builder takes the per-sample input shape (no batch axis), the number of classes and a
width multiplier, and returns an untrained ``nn.Module`` producing [batch, classes] logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from controller.compression.errors import CompressionError

Builder = Callable[[tuple[int, ...], int, float], nn.Module]

_BASE_WIDTHS = (16, 32, 64)
_STEM_KERNEL_1D = 7
_BLOCK_KERNEL_1D = 9
_MIN_WIDTH = 4
_MIN_POOLED_LENGTH = 16  # stop striding once the sequence / image side would be this short


def _scaled(width: float, base: int) -> int:
    return max(_MIN_WIDTH, round(base * width))


def _check(in_shape: tuple[int, ...], rank: int, num_classes: int, width: float, name: str) -> None:
    if len(in_shape) != rank or any(d < 1 for d in in_shape):
        axes = {1: "(features,)", 2: "(channels, length)", 3: "(channels, height, width)"}[rank]
        raise CompressionError(f"student {name!r} needs an input shape {axes}; got {in_shape}")
    if num_classes < 2:
        raise CompressionError(f"num_classes must be >= 2, got {num_classes}")
    if not 0 < width <= 4:
        raise CompressionError(f"width multiplier must be in (0, 4], got {width}")


def _strides(size: int, blocks: int) -> list[int]:
    """Stride 2 in the first blocks while the feature map stays >= _MIN_POOLED_LENGTH long."""
    strides = []
    for _ in range(blocks):
        if size // 2 >= _MIN_POOLED_LENGTH:
            strides.append(2)
            size //= 2
        else:
            strides.append(1)
    return strides


class DepthwiseSeparable1d(nn.Sequential):
    """Depthwise conv (one filter per channel) then pointwise 1x1 mixing, each with BN+ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__(
            nn.Conv1d(c_in, c_in, kernel, stride, kernel // 2, groups=c_in, bias=False),
            nn.BatchNorm1d(c_in),
            nn.ReLU(),
            nn.Conv1d(c_in, c_out, 1, bias=False),
            nn.BatchNorm1d(c_out),
            nn.ReLU(),
        )


class DepthwiseSeparable2d(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_in, kernel, stride, kernel // 2, groups=c_in, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )


class DSCNN1d(nn.Module):
    """Input BN, a full stem conv, three depthwise-separable blocks, global average pool, linear."""

    def __init__(self, in_channels: int, length: int, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        _check((in_channels, length), 2, num_classes, width, "ds-cnn1d")
        w = [_scaled(width, b) for b in _BASE_WIDTHS]
        strides = _strides(length, 1 + len(w))
        self.input_norm = nn.BatchNorm1d(in_channels)
        k = _BLOCK_KERNEL_1D
        self.stem = nn.Sequential(
            nn.Conv1d(
                in_channels, w[0], _STEM_KERNEL_1D, strides[0], _STEM_KERNEL_1D // 2, bias=False
            ),
            nn.BatchNorm1d(w[0]),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(
            DepthwiseSeparable1d(w[0], w[0], k, strides[1]),
            DepthwiseSeparable1d(w[0], w[1], k, strides[2]),
            DepthwiseSeparable1d(w[1], w[2], k, strides[3]),
        )
        self.head = nn.Linear(w[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(self.input_norm(x)))
        return self.head(h.mean(dim=2))  # type: ignore[no-any-return]


class DSCNN2d(nn.Module):
    """The 2D counterpart (spectrograms, small images)."""

    def __init__(
        self, in_channels: int, height: int, width_px: int, num_classes: int, width: float = 1.0
    ) -> None:
        super().__init__()
        _check((in_channels, height, width_px), 3, num_classes, width, "ds-cnn2d")
        w = [_scaled(width, b) for b in _BASE_WIDTHS]
        strides = _strides(min(height, width_px), 1 + len(w))
        self.input_norm = nn.BatchNorm2d(in_channels)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w[0], 3, strides[0], 1, bias=False),
            nn.BatchNorm2d(w[0]),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(
            DepthwiseSeparable2d(w[0], w[0], 3, strides[1]),
            DepthwiseSeparable2d(w[0], w[1], 3, strides[2]),
            DepthwiseSeparable2d(w[1], w[2], 3, strides[3]),
        )
        self.head = nn.Linear(w[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(self.input_norm(x)))
        return self.head(h.mean(dim=(2, 3)))  # type: ignore[no-any-return]


class MLP(nn.Module):
    """Flatten, input BN, two hidden layers (128·w, 64·w by default), linear head."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: float = 1.0,
        hidden: tuple[int, ...] = (128, 64),
    ) -> None:
        super().__init__()
        _check((in_features,), 1, num_classes, width, "mlp")
        layers: list[nn.Module] = [nn.Flatten(), nn.BatchNorm1d(in_features)]
        prev = in_features
        for base in hidden:
            size = _scaled(width, base)
            layers += [nn.Linear(prev, size), nn.ReLU()]
            prev = size
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


def ds_cnn1d(in_channels: int, length: int, num_classes: int, width: float = 1.0) -> nn.Module:
    return DSCNN1d(in_channels, length, num_classes, width)


def ds_cnn2d(
    in_channels: int, height: int, width_px: int, num_classes: int, width: float = 1.0
) -> nn.Module:
    return DSCNN2d(in_channels, height, width_px, num_classes, width)


def mlp(in_features: int, num_classes: int, width: float = 1.0) -> nn.Module:
    return MLP(in_features, num_classes, width)


def _build_1d(in_shape: tuple[int, ...], num_classes: int, width: float) -> nn.Module:
    _check(in_shape, 2, num_classes, width, "ds-cnn1d")
    return ds_cnn1d(in_shape[0], in_shape[1], num_classes, width)


def _build_2d(in_shape: tuple[int, ...], num_classes: int, width: float) -> nn.Module:
    _check(in_shape, 3, num_classes, width, "ds-cnn2d")
    return ds_cnn2d(in_shape[0], in_shape[1], in_shape[2], num_classes, width)


def _build_mlp(in_shape: tuple[int, ...], num_classes: int, width: float) -> nn.Module:
    if not in_shape or any(d < 1 for d in in_shape):
        raise CompressionError(f"student 'mlp' needs a non-empty input shape; got {in_shape}")
    features = 1
    for d in in_shape:
        features *= d
    return mlp(features, num_classes, width)


@dataclass(frozen=True)
class StudentSpec:
    name: str
    builder: Builder
    input_rank: int | None  # per-sample input dimensions it accepts; None = any (flattened)
    description: str


STUDENTS: Mapping[str, StudentSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            StudentSpec("ds-cnn1d", _build_1d, 2, "depthwise-separable 1D CNN (channels, length)"),
            StudentSpec(
                "ds-cnn2d", _build_2d, 3, "depthwise-separable 2D CNN (channels, height, width)"
            ),
            StudentSpec("mlp", _build_mlp, None, "narrow MLP over the flattened input"),
        )
    }
)
DEFAULT_STUDENT = "ds-cnn1d"


def student_spec(name: str) -> StudentSpec:
    try:
        return STUDENTS[name]
    except KeyError:
        raise CompressionError(
            f"unknown student {name!r}; the zoo has: {', '.join(sorted(STUDENTS))}"
        ) from None


def build_student(
    name: str, in_shape: tuple[int, ...], num_classes: int, width: float = 1.0
) -> nn.Module:
    """Build an untrained student by zoo name for inputs shaped ``in_shape`` (no batch axis)."""
    spec = student_spec(name)
    return spec.builder(tuple(in_shape), num_classes, width)


def students_for(in_shape: tuple[int, ...]) -> tuple[str, ...]:
    """Zoo names that accept inputs of this per-sample shape (what the planner may try)."""
    return tuple(
        name
        for name, spec in STUDENTS.items()
        if spec.input_rank is None or spec.input_rank == len(in_shape)
    )
