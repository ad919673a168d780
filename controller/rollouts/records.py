"""Rollout records: what the budget loop decided for one (model, device class)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class RolloutState(enum.Enum):
    RECOMPRESSING = "recompressing"  # a compression job is making the candidate
    CANARY = "canary"  # the candidate runs on a share of the class
    PROMOTED = "promoted"  # the candidate is the class's artifact
    ROLLED_BACK = "rolled_back"  # the canary did worse; the class keeps the baseline
    FAILED = "failed"  # no candidate could be made or deployed
    # an operator ended it (AbortRollout); stored as "failed" with ``ABORTED_KEY`` in its
    # detail, see ``RolloutStore``
    ABORTED = "aborted"

    @property
    def active(self) -> bool:
        return self in (RolloutState.RECOMPRESSING, RolloutState.CANARY)


@dataclass(frozen=True)
class NewRollout:
    model_name: str
    device_class: str
    baseline_artifact_id: str
    relative_speed: float
    p95_target_ms: float | None
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RolloutRecord:
    id: int
    model_name: str
    device_class: str
    state: RolloutState
    baseline_artifact_id: str
    candidate_artifact_id: str
    job_id: int | None
    canary_devices: tuple[str, ...]
    relative_speed: float
    p95_target_ms: float | None
    reason: str
    detail: dict[str, Any]
    created_unix_ms: int
    updated_unix_ms: int
    canary_since_unix_ms: int | None
    finished_unix_ms: int | None


@dataclass(frozen=True)
class RolloutChange:
    """One transition: the new state and what it sets; None leaves a field as it is."""

    state: RolloutState
    reason: str
    candidate_artifact_id: str | None = None
    job_id: int | None = None
    canary_devices: tuple[str, ...] | None = None
    detail: dict[str, Any] | None = None


class Judged(enum.Enum):
    """How the loop judged bytes it already tried for a (model, class)."""

    ROLLED_BACK = "rolled_back"  # the candidate of a rollout that was rolled back
    FAILED = "failed"  # the candidate of a rollout that failed on it (e.g. over size)
    MISSED = "missed"  # the class's artifact a rollout started from (it missed its budget)


@dataclass(frozen=True)
class KnownBytes:
    """A candidate's bytes the loop already tried for the same (model, class)."""

    rollout_id: int
    artifact_id: str
    judged: Judged

    def describe(self) -> str:
        if self.judged is Judged.ROLLED_BACK:
            return f"{self.artifact_id}, which was rolled back in rollout {self.rollout_id}"
        if self.judged is Judged.FAILED:
            return f"{self.artifact_id}, which rollout {self.rollout_id} failed on"
        return (
            f"{self.artifact_id}, which missed its budget as the class's artifact in rollout "
            f"{self.rollout_id}"
        )


@dataclass(frozen=True)
class PauseRecord:
    """An operator's pause of the budget loop for one (model, class)."""

    model_name: str
    device_class: str
    paused_by: str
    reason: str
    paused_unix_ms: int
    verdict: str  # the loop's latest judgement of the pair while paused ("" none yet)
    verdict_unix_ms: int

    @property
    def key(self) -> tuple[str, str]:
        return (self.model_name, self.device_class)

    def describe(self) -> str:
        """'paused by X: why' for messages."""
        return f"paused by {self.paused_by}" + (f": {self.reason}" if self.reason else "")
