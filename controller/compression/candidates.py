"""The recipes the planner tries, cheapest first.

Cheap means compute spent building the candidate: post-training quantization takes
seconds, pruning and low-rank need fine-tuning, distillation trains a new network.
Stronger variants of a technique follow weaker ones, so the first recipe that meets
the budget is also the one that changed the model least.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from controller.compression.recipe import (
    CodebookQuantize,
    Distill,
    LayerPrune,
    LearnedQuantize,
    LowRank,
    Quantize,
    Recipe,
    RequantizeLike,
    StructuredPrune,
    WeightOnlyQuantize,
)

INT8_STATIC = Quantize(mode="static", calibration="minmax", per_channel=True)
INT8_DYNAMIC = Quantize(mode="dynamic")
# Weight-only low-bit steps (weight_only.py) need no calibration run. Embedding tables
# in 4 bits cost little fidelity and keep int8's speed; 4-bit MatMuls buy bytes but run
# slower than int8 on x86 (MatMulNBits), so only the share that harms least goes first.
INT4_EMBEDDINGS = WeightOnlyQuantize(bits=4, block_size=128, matmul_share=0.0)
INT4_MOST = WeightOnlyQuantize(bits=4, block_size=32, gather_block_size=128, matmul_share=0.7)
INT4_ALL = WeightOnlyQuantize(bits=4, block_size=32, gather_block_size=128)
# Codebooks (codebook.py) fold back into dynamic int8's own graph at session load: 4-bit
# files at int8's speed. Error feedback on calibration inputs and, below a share of 1,
# int8 for the weights whose codebook moves the outputs most. On MiniLM: share 0.7 is
# 6.7x smaller at cosine 0.983, share 1 7.5x at 0.975 (MatMulNBits 70 %: 6.2x at about
# half of int8's speed).
CODEBOOK_MOST = CodebookQuantize(bits=4, error_feedback=True, share=0.7)
CODEBOOK_ALL = CodebookQuantize(bits=4, error_feedback=True)
# Learned step sizes (learned.py): quantization-aware training, a fine-tune's cost, for
# when post-training int8 misses the accuracy budget; int8 weights first, then 4-bit.
# At 8 bits only the quantizers learn (PLAID test 0.892 against 0.879 when the weights
# trained too); at 4 bits the weights must move to round well (LSQ as published).
# Integer outputs first (onnxruntime's integer kernels: PLAID 2x faster), then float
# outputs, fewer roundings (PLAID test +0.6 pt), for when accuracy is what missed.
LEARNED_INT8 = LearnedQuantize(weight_bits=8, train="steps")
LEARNED_INT8_FLOAT_OUTPUTS = LearnedQuantize(weight_bits=8, train="steps", integer_outputs=False)
LEARNED_INT4 = LearnedQuantize(weight_bits=4)
# A re-release reusing the earlier artifact's parameters: integers held within half an
# extra step first (smallest delta), then plain rounding (see requantize.py).
REUSE_HYSTERESIS = (0.5, 0.0)


def with_previous(recipes: Iterable[Recipe], previous_sha256: str | None) -> Iterator[Recipe]:
    """``recipes``, led by reusing the earlier artifact's int8 parameters when there is one.

    Cheapest of all (no calibration run, no search) and the smallest delta for devices
    that hold the earlier artifact; judged by the same budget as any other recipe, and
    when they miss, the usual recipes follow. Holding integers that drifted less than a
    step (hysteresis 0.5) comes first: on PLAID after a one-epoch fine-tune its delta is
    1,505 B against 13.3 KiB with fresh parameters (bench/RESULTS.md, pairs (c+) and (c)).
    """
    if previous_sha256 is not None:
        for hysteresis in REUSE_HYSTERESIS:
            step = RequantizeLike(previous_sha256=previous_sha256, hysteresis=hysteresis)
            yield Recipe(steps=(step,))
    yield from recipes


def _low_bit_recipes() -> Iterator[Recipe]:
    """4-bit weights, weakest first; what stays float becomes dynamic int8. Codebooks
    before MatMulNBits: as small or smaller, and they keep int8's speed."""
    yield Recipe(steps=(INT4_EMBEDDINGS, INT8_DYNAMIC))
    yield Recipe(steps=(CODEBOOK_MOST,))
    yield Recipe(steps=(CODEBOOK_ALL,))
    yield Recipe(steps=(INT4_MOST, INT8_DYNAMIC))
    yield Recipe(steps=(INT4_ALL,))


def post_training_recipes() -> Iterator[Recipe]:
    """What an ONNX file alone allows: quantization variants.

    Weight-only low-bit recipes come before static int8: they need no calibration run
    (ranking a share of MatMuls takes a few inference passes), static needs one and, when
    it hurts, a fallback search.
    """
    yield Recipe(steps=(Quantize(mode="fp16"),))
    yield Recipe(steps=(INT8_DYNAMIC,))
    yield from _low_bit_recipes()
    for method in ("minmax", "percentile", "entropy"):
        yield Recipe(steps=(Quantize(mode="static", calibration=method, per_channel=True),))


def torch_classifier_recipes(student: str = "ds-cnn1d") -> Iterator[Recipe]:
    """Every technique for a PyTorch classifier with data, weakest change first.

    Post-training int8 first (seconds); when it misses, the same int8 with learned scales
    (quantization-aware training), then learned 4-bit weights; then pruning and low-rank,
    which keep the architecture and fine-tune it; then distillation into a zoo student,
    tried in float before int8 (at a few thousand weights, int8's scales and Q/DQ nodes
    cost about as many bytes as they save, and time). With the teacher's logits computed once, a zoo
    student trains in about the time pruning fine-tunes the source, and on PLAID it is
    what reaches a tenth of the source's bytes with no net sample lost on val.

    Pruning removes its channels in one step, then fine-tunes: on PLAID that matched
    three prune/fine-tune rounds at 50 % (same val accuracy, half the time) and beat
    them at 75 % (val 0.890 against 0.830 over two seeds, with 60 epochs against 3x10).
    """
    yield Recipe(steps=(INT8_STATIC,))
    yield Recipe(steps=(INT8_DYNAMIC,))
    yield Recipe(steps=(LEARNED_INT8,))
    yield Recipe(steps=(LEARNED_INT8_FLOAT_OUTPUTS,))
    yield Recipe(steps=(LEARNED_INT4,))
    yield Recipe(steps=(StructuredPrune(ratio=0.5, iterations=1, finetune_epochs=30), INT8_STATIC))
    yield Recipe(steps=(LowRank(energy=0.9, param_budget=0.3), INT8_STATIC))
    for width in (1.0, 0.5):
        distilled = Distill(student=student, width=width)
        yield Recipe(steps=(distilled,))
        yield Recipe(steps=(distilled, INT8_STATIC))
    strong = StructuredPrune(ratio=0.75, iterations=1, finetune_epochs=60)
    yield Recipe(steps=(strong,))
    yield Recipe(steps=(strong, INT8_STATIC))
    yield Recipe(steps=(LayerPrune(blocks=1), StructuredPrune(ratio=0.5), INT8_STATIC))
    yield Recipe(steps=(StructuredPrune(ratio=0.9, iterations=1, finetune_epochs=60), INT8_STATIC))


def embedding_recipes() -> Iterator[Recipe]:
    """A pretrained encoder with no labels: post-training steps, dynamic int8 first."""
    yield Recipe(steps=(INT8_DYNAMIC,))
    yield Recipe(steps=(Quantize(mode="fp16"),))
    yield from _low_bit_recipes()
    yield Recipe(steps=(Quantize(mode="static", calibration="percentile", per_channel=True),))
