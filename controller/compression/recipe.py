"""Recipes: ordered, typed compression steps, serialised into the artifact manifest.

Each step is a frozen pydantic model with a ``kind`` tag; a bad parameter is refused
when the step is built, naming the field and the accepted range. Torch steps run on a
PyTorch model with its workload's data; ONNX steps run on an exported model (and are
the only ones available when the source is an ONNX file alone).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from artifact.manifest import RecipeStep


class _Step(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    # Parameters `Recipe.describe` always shows, defaults included: those that tell two
    # recipes of the candidate lists apart (a distilled student's width, a step's bits).
    SHOWN: ClassVar[tuple[str, ...]] = ()

    def to_manifest(self) -> RecipeStep:
        params = self.model_dump(mode="json", exclude={"kind"})
        return RecipeStep(kind=self.kind, params=params)  # type: ignore[attr-defined]


# ------------------------------------------------------------------ torch steps


class UnstructuredPrune(_Step):
    """Zero the smallest weights (magnitude), globally or per layer, over a schedule."""

    kind: Literal["prune.unstructured"] = "prune.unstructured"
    sparsity: float = Field(gt=0, lt=1)
    scope: Literal["global", "layer"] = "global"
    schedule_steps: int = Field(default=3, ge=1, le=20)
    finetune_epochs: int = Field(default=5, ge=0, le=500)


class StructuredPrune(_Step):
    """Physically remove conv filters / linear units (Torch-Pruning dependency graph)."""

    kind: Literal["prune.structured"] = "prune.structured"
    ratio: float = Field(gt=0, lt=1)
    importance: Literal["l1", "l2", "activation"] = "l1"
    iterations: int = Field(default=3, ge=1, le=20)
    finetune_epochs: int = Field(default=10, ge=0, le=500)


class LayerPrune(_Step):
    """Drop whole blocks where the graph allows it (input and output shapes agree)."""

    kind: Literal["prune.layers"] = "prune.layers"
    blocks: int = Field(ge=1, le=64)
    finetune_epochs: int = Field(default=10, ge=0, le=500)


class LowRank(_Step):
    """Truncated SVD of linear layers; Tucker or CP of convolutions (tensorly)."""

    kind: Literal["lowrank"] = "lowrank"
    linear: Literal["svd", "none"] = "svd"
    conv: Literal["tucker", "cp", "none"] = "tucker"
    energy: float = Field(default=0.9, gt=0, le=1, description="singular-value energy kept")
    param_budget: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="per-layer cap: keep at most this fraction of each layer's parameters",
    )
    finetune_epochs: int = Field(default=10, ge=0, le=500)


class Distill(_Step):
    """Train a compact student on the teacher's softened outputs plus the labels.

    Defaults from PLAID (distillation.py): a student trained from scratch wants a higher
    rate than fine-tuning (1e-2, cosine-decayed), and T=2 with equal weight on the
    teacher and the labels distilled better than T=4, alpha=0.7.
    """

    SHOWN: ClassVar[tuple[str, ...]] = ("student", "width")

    kind: Literal["distill"] = "distill"
    student: str = Field(min_length=1, max_length=64, description="name in the student zoo")
    width: float = Field(default=0.5, gt=0, le=4)
    temperature: float = Field(default=2.0, gt=0, le=50)
    alpha: float = Field(default=0.5, ge=0, le=1, description="weight of the KL term")
    epochs: int = Field(default=100, ge=1, le=2000)
    lr: float | None = Field(
        default=1e-2, gt=0, le=1, description="peak learning rate; None: the job's fine-tuning one"
    )


# ------------------------------------------------------------------ ONNX steps


class Quantize(_Step):
    """onnxruntime quantization; with ``max_accuracy_drop`` sensitive nodes stay float."""

    SHOWN: ClassVar[tuple[str, ...]] = ("mode",)

    kind: Literal["quantize"] = "quantize"
    mode: Literal["dynamic", "static", "fp16"] = "static"
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    exclude_nodes: tuple[str, ...] = ()
    accuracy_aware: bool = True


class RequantizeLike(_Step):
    """Static int8 with the scales and zero points of an earlier artifact (requantize.py).

    For a re-release of a model a class already runs as static int8: the earlier
    artifact's graph and parameters are kept, only the integers are recomputed from the
    new float weights, so unchanged weights keep their integers and the delta to the
    devices stays small. A tensor whose values would clip on more than
    ``max_saturation`` of them gets fresh parameters instead. ``previous_sha256`` names
    the artifact the parameters come from (the builder is given its file). With
    ``hysteresis`` h > 0 a weight keeps its old integer unless it moved more than 0.5 + h
    steps away from it: fewer changed integers, at most 0.5 + h steps of error.
    """

    kind: Literal["quantize.reuse"] = "quantize.reuse"
    previous_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the earlier artifact")
    max_saturation: float = Field(
        default=0.01, ge=0, lt=1, description="share of a tensor's values allowed to clip"
    )
    hysteresis: float = Field(
        default=0.0, ge=0, le=1, description="steps a weight may drift before its integer moves"
    )


class WeightOnlyQuantize(_Step):
    """Low-bit weights, float activations (onnxruntime MatMulNBits, GatherBlockQuantized).

    Block-wise: every ``block_size`` weights along a MatMul's input dimension (along the
    row of an embedding table) share one scale, and a zero point unless ``symmetric``.
    ``accuracy_level`` is MatMulNBits' compute type: 4 quantizes activations to int8
    per block (the fast CPU path), 0 dequantizes the weights to float. With
    ``include_gather`` constant Gather tables (embeddings) become 4-bit too, with their
    own ``gather_block_size``. ``matmul_share`` < 1 quantizes only that share of MatMul
    weight elements, those whose rounding moves the outputs least on calibration inputs;
    the rest stay float for a following ``Quantize(mode="dynamic")``.
    """

    SHOWN: ClassVar[tuple[str, ...]] = ("bits",)

    kind: Literal["quantize.weight_only"] = "quantize.weight_only"
    bits: Literal[4, 8] = 4
    block_size: int = Field(default=32, ge=16, le=256, description="a power of two")
    symmetric: bool = False
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    include_gather: bool = True
    gather_block_size: int | None = Field(
        default=None, ge=16, le=256, description="a power of two; None: block_size"
    )
    matmul_share: float = Field(
        default=1.0, ge=0, le=1, description="share of MatMul weight elements quantized"
    )

    @field_validator("block_size", "gather_block_size")
    @classmethod
    def _power_of_two(cls, value: int | None) -> int | None:
        if value is not None and value & (value - 1):
            raise ValueError(f"must be a power of two (16, 32, 64, 128 or 256), got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> WeightOnlyQuantize:
        if self.include_gather and self.bits != 4:
            raise ValueError(
                f"include_gather needs bits=4 (onnxruntime quantizes Gather tables to 4 bits "
                f"only), got bits={self.bits}; set include_gather=False"
            )
        if self.gather_block_size is not None and not self.include_gather:
            raise ValueError("gather_block_size is set but include_gather is False")
        if self.matmul_share == 0 and not self.include_gather:
            raise ValueError("matmul_share=0 with include_gather=False quantizes nothing")
        return self

    @property
    def gather_block(self) -> int:
        return self.gather_block_size or self.block_size


class CodebookQuantize(_Step):
    """Weight sharing: every weight becomes an index into a small fitted codebook.

    One codebook of ``2**bits`` levels per tensor or per output channel (``granularity``),
    its levels placed by k-means on the weights (``iterations`` Lloyd steps from the
    quantiles) or by Lloyd-Max for a Gaussian fitted to them. ``keep_zero`` pins a level
    at exactly 0, so pruned weights stay pruned. Tensors under ``min_elements`` (biases,
    norms) are left as they are. ``compute="int8"`` runs onnxruntime's dynamic int8
    quantization and makes each int8 weight a codebook of int8 levels with a per-channel
    scale: after onnxruntime folds the indices back at session load, the graph is exactly
    dynamic int8's and runs its fast kernel; ``compute="float"`` decodes to float weights.
    Large Gather tables (embeddings, ``gather_bits``) are decoded per call, rows only.
    With calibration inputs, ``error_feedback`` assigns indices GPTQ's way and ``share``
    < 1 leaves the weights whose codebook moves the outputs most (measured) as they were.
    """

    SHOWN: ClassVar[tuple[str, ...]] = ("bits",)

    kind: Literal["quantize.codebook"] = "quantize.codebook"
    bits: int = Field(default=4, description="index bits, 2 to 8: 2**bits levels per codebook")
    gather_bits: int | None = Field(
        default=None, description="index bits for Gather tables, 2 to 8; None: bits"
    )
    granularity: Literal["tensor", "channel"] = "channel"
    method: Literal["kmeans", "gaussian"] = "kmeans"
    iterations: int = Field(default=15, ge=1, le=200, description="Lloyd steps of k-means")
    keep_zero: bool = False
    weighting: Literal["none", "activation"] = Field(
        default="none",
        description="activation: k-means weighs each weight's error by its input's mean "
        "square on calibration inputs",
    )
    error_feedback: bool = Field(
        default=False,
        description="GPTQ-style assignment of 2-D weights: each input row's rounding error "
        "is compensated on the rows not yet assigned (needs calibration inputs)",
    )
    compute: Literal["float", "int8"] = "int8"
    share: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="share of MatMul/Gemm/Conv weight elements given codebooks, least "
        "harm to their layer's output per element first; the rest stay int8 (or float)",
    )
    include_gather: bool = True
    min_elements: int = Field(default=1024, ge=1, description="smaller tensors stay as they are")

    @field_validator("bits", "gather_bits")
    @classmethod
    def _bits_range(cls, value: int | None) -> int | None:
        if value is not None and not 2 <= value <= 8:
            raise ValueError(f"must be between 2 and 8 (a codebook of 2**bits levels), got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CodebookQuantize:
        if self.compute == "int8" and self.bits == 8:
            raise ValueError(
                "compute='int8' needs bits <= 7: 256 distinct levels do not fit on int8's "
                "255 symmetric values; use bits<=7 or compute='float'"
            )
        if self.gather_bits is not None and not self.include_gather:
            raise ValueError("gather_bits is set but include_gather is False")
        return self

    @property
    def table_bits(self) -> int:
        return self.gather_bits or self.bits

    @property
    def needs_calibration(self) -> bool:
        return self.weighting == "activation" or self.error_feedback


LEARNED_WEIGHT_BITS = (2, 3, 4, 8)  # learned.py holds each width's integer range


class LearnedQuantize(_Step):
    """Quantization-aware training with learned step sizes (LSQ), exported as QDQ ONNX.

    Every Conv/Linear weight gets ``weight_bits`` signed integers with a trained step per
    output channel (``per_channel``) or per tensor; every such layer's input uint8 with a
    trained step and zero point. Trains ``epochs`` on the workload's train split at
    ``lr`` (learned.py): with ``train="steps"`` only the quantizers learn, which at 8
    bits is what helps (PLAID: fine-tuning the weights too on 428 samples drifted them
    ~1 point on test; the quantizers alone matched the float model). 2-, 3- and 4-bit
    weights are stored as ONNX INT4 (opset 21; 2 and 3 bits within their narrower
    ranges); 8-bit ones as INT8 within 7 bits (learned.py). It trains and exports in
    one, so it is a recipe's last step, after any torch steps.
    """

    SHOWN: ClassVar[tuple[str, ...]] = ("weight_bits",)

    kind: Literal["quantize.learned"] = "quantize.learned"
    weight_bits: int = Field(
        default=4, description="2, 3 or 4 (stored as ONNX INT4) or 8 (INT8) weights"
    )
    activation_bits: int = Field(default=8, description="8: uint8 activations")
    epochs: int = Field(default=10, ge=1, le=500)
    lr: float = Field(default=1e-3, gt=0, le=1, description="peak rate of the QAT fine-tune")
    per_channel: bool = True
    train: Literal["all", "steps"] = Field(
        default="all",
        description="all: weights, step sizes and zero points (LSQ); steps: only the step "
        "sizes and zero points, the weights stay as they are",
    )
    integer_outputs: bool = Field(
        default=True,
        description="8-bit weights: quantize layer outputs too, so onnxruntime runs its "
        "integer kernels (PLAID: 2x faster than float outputs, ~0.5 pt less accurate); "
        "2-4 bit weights have no integer kernels and keep float outputs either way",
    )

    @field_validator("weight_bits")
    @classmethod
    def _weight_bits(cls, value: int) -> int:
        if value not in LEARNED_WEIGHT_BITS:
            raise ValueError(
                f"must be 2, 3, 4 or 8 (2 to 4 bits are stored as ONNX INT4, 8 as INT8 in a "
                f"QDQ model), got {value}"
            )
        return value

    @field_validator("activation_bits")
    @classmethod
    def _activation_bits(cls, value: int) -> int:
        if value != 8:
            raise ValueError(
                f"must be 8 (activations are uint8; onnxruntime's CPU kernels take no "
                f"lower-bit activations), got {value}"
            )
        return value


Step = Annotated[
    UnstructuredPrune
    | StructuredPrune
    | LayerPrune
    | LowRank
    | Distill
    | Quantize
    | RequantizeLike
    | WeightOnlyQuantize
    | CodebookQuantize
    | LearnedQuantize,
    Field(discriminator="kind"),
]
TORCH_STEPS = (UnstructuredPrune, StructuredPrune, LayerPrune, LowRank, Distill)
ONNX_STEPS = (Quantize, RequantizeLike, WeightOnlyQuantize, CodebookQuantize)
# Steps that train a PyTorch model and write the ONNX file themselves: last in a recipe.
EXPORT_STEPS = (LearnedQuantize,)


class Recipe(BaseModel):
    """Ordered steps: torch steps first, then export, then ONNX steps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: tuple[Step, ...] = ()

    @model_validator(mode="after")
    def _export_step_last(self) -> Recipe:
        for step in self.steps[:-1]:
            if isinstance(step, EXPORT_STEPS):
                raise ValueError(
                    f"{step.kind} trains and exports the model itself: it must be the "
                    "recipe's last step (torch steps may come before it, ONNX steps not after)"
                )
        return self

    def to_manifest(self) -> tuple[RecipeStep, ...]:
        return tuple(step.to_manifest() for step in self.steps)

    @property
    def needs_torch(self) -> bool:
        return any(isinstance(step, TORCH_STEPS + EXPORT_STEPS) for step in self.steps)

    def describe(self) -> str:
        """Short human form: each step with the parameters that differ from defaults, and
        those it always shows (``SHOWN``). No steps: the source as it is (which need not
        be FP32: a model may arrive in fp16 or already quantized)."""
        if not self.steps:
            return "source"
        parts = []
        for step in self.steps:
            shown = step.model_dump(mode="json", include=set(step.SHOWN))
            params = {k: shown[k] for k in step.SHOWN}
            params |= step.model_dump(mode="json", exclude_defaults=True, exclude={"kind"})
            if isinstance(step, RequantizeLike):  # the manifest keeps the whole digest
                params["previous_sha256"] = step.previous_sha256[:12]
            parts.append(f"{step.kind}({', '.join(f'{k}={v}' for k, v in params.items())})")
        return " → ".join(parts)


STEP_ADAPTER: TypeAdapter[Step] = TypeAdapter(Step)


def made_static_int8(recipe: tuple[RecipeStep, ...]) -> bool:
    """Whether a recorded recipe produced a static QDQ int8 model: one whose quantization
    parameters a re-release of the same model can reuse (``RequantizeLike``)."""
    return any(
        step.kind == "quantize.reuse"
        or (step.kind == "quantize" and step.params.get("mode") == "static")
        for step in recipe
    )
