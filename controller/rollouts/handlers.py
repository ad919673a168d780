"""ListRollouts for operators: checked arguments in, rollout records out (no gRPC here)."""

from __future__ import annotations

from controller import validate
from controller.admin import in_thread
from controller.rollouts.records import RolloutRecord, RolloutState
from controller.rollouts.store import RolloutStore
from protos import fleet_pb2 as pb

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

_STATES = {
    RolloutState.RECOMPRESSING: pb.ROLLOUT_STATE_RECOMPRESSING,
    RolloutState.CANARY: pb.ROLLOUT_STATE_CANARY,
    RolloutState.PROMOTED: pb.ROLLOUT_STATE_PROMOTED,
    RolloutState.ROLLED_BACK: pb.ROLLOUT_STATE_ROLLED_BACK,
    RolloutState.FAILED: pb.ROLLOUT_STATE_FAILED,
}


class RolloutHandlers:
    def __init__(self, rollouts: RolloutStore) -> None:
        self._rollouts = rollouts

    async def list(
        self, model_name: str, device_class: str, active_only: bool, limit: int
    ) -> list[RolloutRecord]:
        model = validate.optional_name(model_name, "model_name")
        cls = validate.optional_name(device_class, "device_class")
        validate.int_range(limit, "limit", 0, MAX_LIMIT)
        return await in_thread(
            lambda: self._rollouts.list(
                limit or DEFAULT_LIMIT, model_name=model, device_class=cls, active_only=active_only
            )
        )


def rollout_to_proto(r: RolloutRecord) -> pb.Rollout:
    return pb.Rollout(
        id=r.id,
        model_name=r.model_name,
        device_class=r.device_class,
        state=_STATES[r.state],
        baseline_artifact_id=r.baseline_artifact_id,
        candidate_artifact_id=r.candidate_artifact_id,
        job_id=r.job_id or 0,
        canary_devices=list(r.canary_devices),
        relative_speed=r.relative_speed,
        p95_target_ms=r.p95_target_ms or 0.0,
        reason=r.reason,
        created_unix_ms=r.created_unix_ms,
        updated_unix_ms=r.updated_unix_ms,
        finished_unix_ms=r.finished_unix_ms or 0,
    )
