"""Device classes: what a kind of home device can carry and what a model must stay within.

Declared in YAML (``deploy/device-classes/*.yaml``; later also as a Kubernetes custom
resource) and validated here before anything uses them: a malformed file is refused
with the field named and the expected form, never half-applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from artifact.names import check_name


class DeviceClassError(ValueError):
    """A device-class file that cannot be read or does not match the schema."""


class PowerModel(BaseModel):
    """Watts drawn idle and with every core busy; energy is estimated between the two."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    idle_watts: float = Field(ge=0)
    active_watts: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> PowerModel:
        if self.active_watts < self.idle_watts:
            raise ValueError("active_watts must be >= idle_watts")
        return self

    def joules(self, seconds: float, busy_cores: float, cores: int) -> float:
        """Energy over ``seconds`` with ``busy_cores`` of ``cores`` working."""
        share = min(max(busy_cores / cores, 0.0), 1.0)
        return seconds * (self.idle_watts + (self.active_watts - self.idle_watts) * share)


class Budgets(BaseModel):
    """What an artifact for this class must meet; None = no budget on that quantity."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_artifact_bytes: int | None = Field(default=None, gt=0)
    p95_latency_ms: float | None = Field(default=None, gt=0)
    energy_per_inference_mj: float | None = Field(default=None, gt=0)
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)
    min_fidelity: float | None = Field(default=None, gt=0, le=1)


class DeviceClass(BaseModel):
    """One kind of device: its hardware, its power model and its budgets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    arch: Literal["x86_64", "aarch64", "armv7l"]
    cores: int = Field(ge=1, le=256)
    relative_speed: float = Field(
        gt=0, le=100, description="per-core speed relative to the machine measuring (1.0 = same)"
    )
    memory_bytes: int = Field(gt=0)
    model_storage_bytes: int = Field(gt=0)
    power: PowerModel
    budgets: Budgets

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, field="device class name")

    @model_validator(mode="after")
    def _storage(self) -> DeviceClass:
        limit = self.budgets.max_artifact_bytes
        if limit is not None and limit > self.model_storage_bytes:
            raise ValueError(
                f"budgets.max_artifact_bytes ({limit}) exceeds model_storage_bytes "
                f"({self.model_storage_bytes}): the artifact could never be stored"
            )
        return self

    def with_budgets(self, **overrides: float | int | None) -> DeviceClass:
        """A copy whose budgets are tightened for one run (CLI flags); None keeps a budget."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        budgets = Budgets.model_validate({**self.budgets.model_dump(), **changes})
        return self.model_copy(update={"budgets": budgets})


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message without its '<unicode string>' source name: line, column, problem."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return str(problem)
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}"
    return f"{where}: {problem}" + (f" ({context})" if context else "")


def load_device_class(path: Path) -> DeviceClass:
    """Read and validate one YAML file; the error names the file and every bad field."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise DeviceClassError(f"cannot read device class file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise DeviceClassError(f"{path} is not valid YAML: {yaml_problem(exc)}") from exc
    if not isinstance(raw, dict):
        raise DeviceClassError(f"{path} must hold a mapping with name, arch, cores, ... budgets")
    try:
        return DeviceClass.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise DeviceClassError(f"{path} is not a valid device class: {problems}") from exc
