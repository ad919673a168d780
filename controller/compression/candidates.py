"""The recipes the planner tries, cheapest first.

Cheap means compute spent building the candidate: post-training quantization takes
seconds, pruning and low-rank need fine-tuning, distillation trains a new network.
Stronger variants of a technique follow weaker ones, so the first recipe that meets
the budget is also the one that changed the model least.
"""

from __future__ import annotations

from collections.abc import Iterator

from controller.compression.recipe import (
    Distill,
    LayerPrune,
    LowRank,
    Quantize,
    Recipe,
    StructuredPrune,
)

INT8_STATIC = Quantize(mode="static", calibration="minmax", per_channel=True)
INT8_DYNAMIC = Quantize(mode="dynamic")


def post_training_recipes() -> Iterator[Recipe]:
    """What an ONNX file alone allows: quantization variants."""
    yield Recipe(steps=(Quantize(mode="fp16"),))
    yield Recipe(steps=(INT8_DYNAMIC,))
    for method in ("minmax", "percentile", "entropy"):
        yield Recipe(steps=(Quantize(mode="static", calibration=method, per_channel=True),))


def torch_classifier_recipes(student: str = "ds-cnn1d") -> Iterator[Recipe]:
    """Every technique for a PyTorch classifier with data, weakest change first."""
    yield Recipe(steps=(INT8_STATIC,))
    yield Recipe(steps=(INT8_DYNAMIC,))
    for ratio in (0.5, 0.75):
        yield Recipe(steps=(StructuredPrune(ratio=ratio, importance="l1"), INT8_STATIC))
    yield Recipe(steps=(LowRank(energy=0.9, param_budget=0.3), INT8_STATIC))
    yield Recipe(steps=(LayerPrune(blocks=1), StructuredPrune(ratio=0.5), INT8_STATIC))
    for width in (1.0, 0.5):
        yield Recipe(steps=(Distill(student=student, width=width), INT8_STATIC))
    yield Recipe(steps=(StructuredPrune(ratio=0.9, importance="l1"), INT8_STATIC))


def embedding_recipes() -> Iterator[Recipe]:
    """A pretrained encoder with no labels: post-training steps, dynamic int8 first."""
    yield Recipe(steps=(INT8_DYNAMIC,))
    yield Recipe(steps=(Quantize(mode="fp16"),))
    yield Recipe(steps=(Quantize(mode="static", calibration="percentile", per_channel=True),))
