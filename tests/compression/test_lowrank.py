"""Low-rank decomposition shrinks layers, reproduces them at full energy, and still exports."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from torch import nn

from controller.compression.errors import CompressionError, UnsupportedModelError
from controller.compression.lowrank import cp_conv, decompose, energy_rank, svd_linear, tucker_conv
from controller.compression.recipe import LowRank
from controller.compression.training import count_parameters
from tests.compression.test_training import (
    QUIET,
    TinyCNN,
    TinyResNet,
    onnx_outputs,
    synthetic_split,
    trained,
)

DATA = synthetic_split()
X = DATA.inputs["x"][:5].astype(np.float32)


def _low_rank_linear(n_in: int, n_out: int, rank: int) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, rank) @ torch.randn(rank, n_in))
    return layer


def _low_rank_conv(dims: int, c_in: int, c_out: int, rank: int) -> nn.Module:
    """A conv whose weight has rank ``rank`` in both channel unfoldings (a Tucker-2 product)."""
    torch.manual_seed(0)
    conv: nn.Conv1d | nn.Conv2d
    if dims == 1:
        conv = nn.Conv1d(c_in, c_out, 3, padding=1, stride=2)
        kernel: tuple[int, ...] = (3,)
    else:
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, stride=(1, 2))
        kernel = (3, 3)
    core = torch.randn(rank, rank, *kernel)
    u_out, u_in = torch.randn(c_out, rank), torch.randn(c_in, rank)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("ab...,oa,ib->oi...", core, u_out, u_in))
    return conv


def test_energy_rank() -> None:
    s = np.array([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 1.0) == 3  # the zero singular value is never needed
    assert energy_rank(np.zeros(3), 0.9) == 1


def test_svd_at_full_energy_reproduces_a_low_rank_linear() -> None:
    layer = _low_rank_linear(64, 48, rank=5)
    outcome = svd_linear(layer, energy=1.0)
    assert not isinstance(outcome, str)
    new, ranks = outcome
    assert ranks == (5,)
    assert count_parameters(new) == 5 * (64 + 48) + 48 < count_parameters(layer)
    x = torch.randn(10, 64)
    with torch.no_grad():
        torch.testing.assert_close(new(x), layer(x), rtol=1e-4, atol=1e-3)


def test_svd_skips_a_layer_it_would_not_shrink() -> None:
    torch.manual_seed(0)
    outcome = svd_linear(nn.Linear(8, 8), energy=1.0)
    assert isinstance(outcome, str)
    assert "not fewer than 64" in outcome


def test_param_budget_caps_the_rank() -> None:
    layer = _low_rank_linear(64, 64, rank=30)
    outcome = svd_linear(layer, energy=1.0, budget=0.25)
    assert not isinstance(outcome, str)
    new, (rank,) = outcome
    assert rank == 8  # 8 * 128 = 1024 = 0.25 * 64 * 64
    assert sum(p.numel() for p in new.parameters() if p.ndim == 2) <= 0.25 * 64 * 64


@pytest.mark.parametrize("dims", [1, 2])
def test_tucker_reproduces_a_low_rank_conv_with_fewer_parameters(dims: int) -> None:
    conv = _low_rank_conv(dims, c_in=24, c_out=32, rank=4)
    outcome = tucker_conv(conv, energy=1.0)
    assert not isinstance(outcome, str)
    new, ranks = outcome
    assert ranks == (4, 4)
    assert isinstance(new, nn.Sequential)
    kinds = [type(m) for m in new]
    assert kinds == [type(conv)] * 3
    assert count_parameters(new) < count_parameters(conv) / 3
    x = torch.randn(2, 24, *(12,) * dims)
    with torch.no_grad():
        want, got = conv(x), new(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dims", [1, 2])
def test_cp_builds_pointwise_and_depthwise_convs(dims: int) -> None:
    conv = _low_rank_conv(dims, c_in=24, c_out=32, rank=3)
    outcome = cp_conv(conv, energy=0.95)
    assert not isinstance(outcome, str)
    new, (rank,) = outcome
    assert isinstance(new, nn.Sequential)
    depthwise = [m for m in new if isinstance(m, nn.Conv1d | nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == dims and all(m.groups == rank for m in depthwise)
    assert count_parameters(new) < count_parameters(conv) / 3
    x = torch.randn(2, 24, *(12,) * dims)
    with torch.no_grad():
        want, got = conv(x), new(x)
    assert got.shape == want.shape
    # CP of a rank-3 Tucker core is approximate: close in direction, not exact.
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert float(cos) > 0.8


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    return trained(lambda: TinyCNN(width=32), DATA)


@pytest.mark.parametrize("conv", ["tucker", "cp"])
def test_decompose_shrinks_a_trained_model_which_still_exports(
    cnn: nn.Module, conv: Literal["tucker", "cp"], tmp_path: Path
) -> None:
    step = LowRank(conv=conv, energy=0.8, finetune_epochs=2)
    result = decompose(cnn, step, DATA, options=QUIET)
    assert result.params_after < result.params_before
    assert result.params_after == count_parameters(result.model)
    assert result.params_before == count_parameters(cnn)  # the caller's model is untouched
    methods = {r.name: r.method for r in result.layers}
    assert methods["features.1.0"] == conv
    assert methods["head"] == "skipped"  # the classifier keeps every class direction
    assert sum(r.params_before - r.params_after for r in result.layers) == (
        result.params_before - result.params_after
    )
    assert isinstance(result.model.get_submodule("features.1.0"), nn.Sequential)
    assert onnx_outputs(result.model, X, tmp_path).shape == (5, 3)


def test_decompose_through_a_residual_model(tmp_path: Path) -> None:
    model = trained(lambda: TinyResNet(width=32), DATA, epochs=3)
    result = decompose(model, LowRank(energy=0.7, finetune_epochs=1), DATA, options=QUIET)
    assert result.decomposed
    assert result.params_after < result.params_before
    onnx_outputs(result.model, X, tmp_path)


def test_decompose_refuses_when_nothing_would_shrink() -> None:
    tiny = nn.Sequential(nn.Flatten(), nn.Linear(96, 2), nn.ReLU(), nn.Linear(2, 3))
    with pytest.raises(UnsupportedModelError, match=r"would shrink no layer: 1 \(Linear\)"):
        decompose(tiny, LowRank(energy=1.0), DATA, options=QUIET)
    with pytest.raises(UnsupportedModelError, match="no Linear or Conv"):
        decompose(nn.Sequential(nn.Flatten()), LowRank(), DATA, options=QUIET)
    with pytest.raises(CompressionError, match="would change nothing"):
        decompose(tiny, LowRank(linear="none", conv="none"), DATA, options=QUIET)


def test_grouped_convs_are_skipped_with_a_reason() -> None:
    outcome = tucker_conv(nn.Conv1d(8, 8, 3, groups=8), energy=0.5)
    assert isinstance(outcome, str) and "groups=8" in outcome
