"""Pruning does what it says: exact zeros, fewer channels (through residual adds), fewer blocks."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from torch import nn

from controller.compression.errors import UnsupportedModelError
from controller.compression.pruning import (
    cubic_schedule,
    droppable_blocks,
    prune_layers,
    prune_structured,
    prune_unstructured,
)
from controller.compression.recipe import LayerPrune, StructuredPrune, UnstructuredPrune
from controller.compression.training import (
    count_macs,
    count_parameters,
    evaluate_accuracy,
    example_inputs,
    fine_tune,
)
from controller.workloads.base import Split
from controller.workloads.basic_motions import (
    MotionCNN,
    channel_stats,
    check_onnx_matches_torch,
    export_onnx,
    load_basic_motions,
)
from tests.compression.test_training import (
    QUIET,
    TinyCNN,
    TinyResNet,
    conv_at,
    onnx_outputs,
    synthetic_split,
    trained,
)

DATA = synthetic_split()
X = DATA.inputs["x"][:5].astype(np.float32)


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    return trained(TinyCNN, DATA)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return trained(TinyResNet, DATA)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv1d | nn.Linear)]


# ------------------------------------------------------------------ unstructured


def test_cubic_schedule_reaches_the_target_fast_first() -> None:
    steps = cubic_schedule(0.8, 4)
    assert steps[-1] == pytest.approx(0.8)
    gains = np.diff((0.0, *steps))
    assert all(a > b for a, b in itertools.pairwise(gains))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_reaches_the_sparsity_with_exact_zeros(
    cnn: nn.Module, scope: Literal["global", "layer"], tmp_path: Path
) -> None:
    original = [w.clone() for w in _weights(cnn)]
    step = UnstructuredPrune(sparsity=0.6, scope=scope, schedule_steps=3, finetune_epochs=1)
    result = prune_unstructured(cnn, step, DATA, options=QUIET)
    model = result.model
    assert result.sparsity == pytest.approx(0.6, abs=0.01)
    zeros = sum(int((w == 0).sum()) for w in _weights(model))
    total = sum(w.numel() for w in _weights(model))
    assert zeros / total == pytest.approx(result.sparsity)
    # Plain tensors again: no masks or original copies left behind, same parameter count.
    assert not any(name.endswith(("_orig", "_mask")) for name, _ in model.state_dict().items())
    assert count_parameters(model) == count_parameters(cnn)
    if scope == "layer":
        assert all(s == pytest.approx(0.6, abs=0.02) for s in result.layer_sparsity.values())
    # The caller's model is untouched.
    assert all(torch.equal(a, b) for a, b in zip(original, _weights(cnn), strict=True))
    onnx_outputs(model, X, tmp_path)


def test_unstructured_refuses_a_model_without_weights() -> None:
    with pytest.raises(UnsupportedModelError, match="Conv or Linear"):
        prune_unstructured(nn.Sequential(nn.ReLU()), UnstructuredPrune(sparsity=0.5), DATA)


# ------------------------------------------------------------------ structured


@pytest.mark.parametrize("importance", ["l1", "l2", "activation"])
def test_structured_removes_channels_and_keeps_the_classifier(
    cnn: nn.Module, importance: Literal["l1", "l2", "activation"], tmp_path: Path
) -> None:
    step = StructuredPrune(ratio=0.5, importance=importance, iterations=2, finetune_epochs=1)
    result = prune_structured(cnn, step, DATA, options=QUIET)
    model = result.model
    assert isinstance(model, TinyCNN)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [tuple(c.weight.shape) for c in convs] == [(8, 3, 5), (8, 8, 3)]
    bn = model.get_submodule("features.0.1")
    assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == 8  # followed its conv
    assert tuple(model.head.weight.shape) == (3, 8)  # classifier: inputs pruned, outputs kept
    assert result.channels == {"features.0.0": (16, 8), "features.1.0": (16, 8)}
    assert result.ignored == ("head",)
    assert result.params_after < result.params_before / 2
    ex = example_inputs(DATA)
    assert count_macs(model, ex) < count_macs(cnn, ex) / 2
    assert onnx_outputs(model, X, tmp_path).shape == (5, 3)


def test_structured_keeps_residual_adds_consistent(resnet: nn.Module, tmp_path: Path) -> None:
    step = StructuredPrune(ratio=0.5, iterations=2, finetune_epochs=3)
    result = prune_structured(resnet, step, DATA, options=QUIET, val=DATA)
    model = result.model
    # The stem and both blocks' second convs feed the same adds: they shrink together.
    width = conv_at(model, "stem.0").out_channels
    assert width == 8
    for block in ("blocks.0", "blocks.1"):
        assert conv_at(model, f"{block}.conv2").out_channels == width
        assert conv_at(model, f"{block}.conv1").in_channels == width
        assert conv_at(model, f"{block}.conv1").out_channels == 8
    assert isinstance(model, TinyResNet) and model.head.in_features == width
    assert result.params_after < result.params_before / 2
    assert evaluate_accuracy(model, DATA) > 0.9
    onnx_outputs(model, X, tmp_path)


def test_activation_importance_prunes_the_channels_that_never_fire() -> None:
    """Dead channels with the largest weights: L1 keeps them, activation importance drops them."""
    torch.manual_seed(0)
    model = TinyCNN(width=8)
    conv = conv_at(model, "features.0.0")
    assert conv.bias is not None
    with torch.no_grad():
        conv.weight[:4] *= 10  # large weights...
        conv.bias[:4] = -1e4  # ...but ReLU silences them on every input
    model.eval()
    cases: tuple[tuple[Literal["activation", "l1"], bool], ...] = (
        ("activation", False),
        ("l1", True),
    )
    for importance, kept_dead in cases:
        step = StructuredPrune(ratio=0.5, importance=importance, iterations=1, finetune_epochs=0)
        pruned = prune_structured(model, step, DATA, options=QUIET).model
        kept = conv_at(pruned, "features.0.0").bias
        assert kept is not None
        assert bool((kept.detach() < -1e3).any()) is kept_dead, importance


def test_structured_refuses_a_model_with_only_a_classifier() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(96, 3))
    with pytest.raises(UnsupportedModelError, match=r"no prunable layer.*'1'"):
        prune_structured(model, StructuredPrune(ratio=0.5), DATA)


# ------------------------------------------------------------------ layers


def test_layer_pruning_drops_a_residual_block(resnet: nn.Module, tmp_path: Path) -> None:
    ex = example_inputs(DATA)
    assert droppable_blocks(resnet, ex) == ["blocks.0", "blocks.1"]
    result = prune_layers(resnet, LayerPrune(blocks=1, finetune_epochs=2), DATA, options=QUIET)
    model = result.model
    (name,) = result.dropped
    index = int(name.split(".")[1])
    assert isinstance(model.get_submodule(f"blocks.{index}"), nn.Identity)
    assert not isinstance(model.get_submodule(f"blocks.{1 - index}"), nn.Identity)
    # The caller's model is untouched.
    assert not isinstance(resnet.get_submodule(f"blocks.{index}"), nn.Identity)
    assert result.params_after < result.params_before
    assert count_macs(model, ex) < count_macs(resnet, ex)
    assert onnx_outputs(model, X, tmp_path).shape == (5, 3)


def test_layer_pruning_only_offers_shape_preserving_blocks(cnn: nn.Module) -> None:
    # features.0 changes 3 -> 16 channels; features.1 keeps 16 (so does its conv, but
    # dropping the whole block already covers it).
    assert droppable_blocks(cnn, example_inputs(DATA)) == ["features.1"]
    result = prune_layers(cnn, LayerPrune(blocks=1, finetune_epochs=0), DATA, options=QUIET)
    assert result.dropped == ("features.1",)
    assert result.model(torch.from_numpy(X)).shape == (5, 3)
    with pytest.raises(UnsupportedModelError, match=r"only 1 droppable \(features.1\)"):
        prune_layers(cnn, LayerPrune(blocks=2), DATA, options=QUIET)


def test_layer_pruning_refuses_what_it_cannot_drop(resnet: nn.Module) -> None:
    plain = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30, 3))
    with pytest.raises(UnsupportedModelError, match="no block whose input and output shapes"):
        prune_layers(plain, LayerPrune(blocks=1), DATA, options=QUIET)
    with pytest.raises(UnsupportedModelError, match="only 2 droppable"):
        prune_layers(resnet, LayerPrune(blocks=3), DATA, options=QUIET)


def test_a_model_can_name_its_droppable_blocks(resnet: nn.Module) -> None:
    class Named(TinyResNet):
        def droppable_blocks(self) -> list[str]:
            return ["blocks.1"]

    model = Named()
    model.load_state_dict(resnet.state_dict())
    result = prune_layers(model, LayerPrune(blocks=1, finetune_epochs=0), DATA, options=QUIET)
    assert result.dropped == ("blocks.1",)


# ------------------------------------------------------------------ the real workload


def test_basic_motions_cnn_loses_channels_and_still_exports(tmp_path: Path) -> None:
    """The workload's own MotionCNN, pruned, goes through the workload's own exporter."""
    data = load_basic_motions()
    train = Split({"x": data.x_train}, data.y_train)
    test = Split({"x": data.x_test}, data.y_test)
    torch.manual_seed(0)
    model = MotionCNN(*channel_stats(data.x_train))
    fine_tune(model, train, epochs=20, options=QUIET)
    before = evaluate_accuracy(model, test)
    step = StructuredPrune(ratio=0.5, importance="activation", iterations=2, finetune_epochs=5)
    result = prune_structured(model, step, train, options=QUIET)
    pruned = result.model
    assert isinstance(pruned, MotionCNN)
    assert [conv_at(pruned, f"features.{i}.0").out_channels for i in range(3)] == [16, 32, 32]
    assert result.params_after < result.params_before / 3
    assert evaluate_accuracy(pruned, test) >= before - 0.1
    path = export_onnx(pruned, tmp_path / "pruned.onnx")
    check_onnx_matches_torch(path, pruned, data.x_test)
