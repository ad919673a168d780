"""The artifact manifest: what an artifact is, how it was made, and what it promises.

It travels as canonical JSON (sorted keys, no spaces, UTF-8); the signature covers
exactly those bytes, so nobody re-serialises what was signed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from artifact.digest import check_sha256
from artifact.names import check_name

MANIFEST_SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 256 * 1024


class InvalidManifestError(ValueError):
    """Manifest bytes that do not parse, or break the schema."""


class TensorSpec(BaseModel):
    """One model input or output: name, numpy dtype name, shape (-1 = dynamic)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    dtype: str = Field(min_length=1, max_length=32)
    shape: tuple[int, ...]

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < -1 for d in shape):
            raise ValueError("shape dimensions must be >= 0, or -1 for a dynamic dimension")
        return shape


class RecipeStep(BaseModel):
    """One compression step and its parameters, as the planner ran it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Manifest(BaseModel):
    """Everything a device needs to decide whether to trust and run an artifact."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = MANIFEST_SCHEMA_VERSION
    model_name: str
    model_version: int = Field(ge=1)
    device_class: str
    version: int = Field(ge=1, description="monotonic per (model_name, device_class)")
    sha256: str
    size_bytes: int = Field(ge=1)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    recipe: tuple[RecipeStep, ...] = ()
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: datetime
    expires_at: datetime
    rereleases: str | None = Field(
        default=None,
        max_length=200,
        description="artifact id whose bytes this version re-releases (a rollback): devices "
        "refuse versions older than one they ran, so going back takes a new version",
    )

    @field_validator("model_name", "device_class")
    @classmethod
    def _names(cls, value: str) -> str:
        return check_name(value, field="name")

    @field_validator("sha256")
    @classmethod
    def _digest(cls, value: str) -> str:
        return check_sha256(value)

    @property
    def artifact_id(self) -> str:
        return artifact_id(self.model_name, self.device_class, self.version)

    def to_json_bytes(self) -> bytes:
        """Canonical JSON: the exact bytes that get signed and sent."""
        data = self.model_dump(mode="json")
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json_bytes(cls, raw: bytes) -> Manifest:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise InvalidManifestError(
                f"manifest is {len(raw)} bytes; at most {MAX_MANIFEST_BYTES} are accepted"
            )
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise InvalidManifestError(f"manifest does not match schema v1: {exc}") from exc

    def is_expired(self, now: datetime | None = None) -> bool:
        return (now or utc_now()) >= self.expires_at


def artifact_id(model_name: str, device_class: str, version: int) -> str:
    """The human-facing id of an artifact: ``<model>/<class>/v<version>``."""
    return f"{model_name}/{device_class}/v{version}"


def default_expiry(created_at: datetime, days: int = 365) -> datetime:
    return created_at + timedelta(days=days)
