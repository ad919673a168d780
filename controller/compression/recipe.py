"""Recipes: ordered, typed compression steps, serialised into the artifact manifest.

Each step is a frozen pydantic model with a ``kind`` tag; a bad parameter is refused
when the step is built, naming the field and the accepted range. Torch steps run on a
PyTorch model with its workload's data; ONNX steps run on an exported model (and are
the only ones available when the source is an ONNX file alone).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from artifact.manifest import RecipeStep


class _Step(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

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
    """Train a compact student on the teacher's softened outputs plus the labels."""

    kind: Literal["distill"] = "distill"
    student: str = Field(min_length=1, max_length=64, description="name in the student zoo")
    width: float = Field(default=0.5, gt=0, le=4)
    temperature: float = Field(default=4.0, gt=0, le=50)
    alpha: float = Field(default=0.7, ge=0, le=1, description="weight of the KL term")
    epochs: int = Field(default=60, ge=1, le=2000)


# ------------------------------------------------------------------ ONNX steps


class Quantize(_Step):
    """onnxruntime quantization; with ``max_accuracy_drop`` sensitive nodes stay float."""

    kind: Literal["quantize"] = "quantize"
    mode: Literal["dynamic", "static", "fp16"] = "static"
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    exclude_nodes: tuple[str, ...] = ()
    accuracy_aware: bool = True


Step = Annotated[
    UnstructuredPrune | StructuredPrune | LayerPrune | LowRank | Distill | Quantize,
    Field(discriminator="kind"),
]
TORCH_STEPS = (UnstructuredPrune, StructuredPrune, LayerPrune, LowRank, Distill)
ONNX_STEPS = (Quantize,)


class Recipe(BaseModel):
    """Ordered steps: torch steps first, then export, then ONNX steps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: tuple[Step, ...] = ()

    def to_manifest(self) -> tuple[RecipeStep, ...]:
        return tuple(step.to_manifest() for step in self.steps)

    @property
    def needs_torch(self) -> bool:
        return any(isinstance(step, TORCH_STEPS) for step in self.steps)

    def describe(self) -> str:
        """Short human form: each step with the parameters that differ from defaults."""
        if not self.steps:
            return "fp32"
        parts = []
        for step in self.steps:
            params = step.model_dump(mode="json", exclude_defaults=True, exclude={"kind"})
            if isinstance(step, Quantize):
                params = {"mode": step.mode, **params}
            parts.append(f"{step.kind}({', '.join(f'{k}={v}' for k, v in params.items())})")
        return " → ".join(parts)


STEP_ADAPTER: TypeAdapter[Step] = TypeAdapter(Step)
