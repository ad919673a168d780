"""Rollouts for operators: list them, pause and resume the loop for a (class, model),
abort one. Checked arguments in, records out (no gRPC here); who asks is the caller's
identity as the servicer read it (the admin certificate's name under mutual TLS).
"""

from __future__ import annotations

from dataclasses import dataclass

from controller import validate
from controller.admin import in_thread
from controller.errors import ErrorCode, FleetError, invalid, not_found
from controller.records import NewEvent
from controller.rollouts.loop import RolloutLoop
from controller.rollouts.records import PauseRecord, RolloutRecord, RolloutState
from controller.rollouts.store import RolloutStore
from protos import fleet_pb2 as pb

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_REASON = 500  # characters of an operator's reason (pause, abort)

_STATES = {
    RolloutState.RECOMPRESSING: pb.ROLLOUT_STATE_RECOMPRESSING,
    RolloutState.CANARY: pb.ROLLOUT_STATE_CANARY,
    RolloutState.PROMOTED: pb.ROLLOUT_STATE_PROMOTED,
    RolloutState.ROLLED_BACK: pb.ROLLOUT_STATE_ROLLED_BACK,
    RolloutState.FAILED: pb.ROLLOUT_STATE_FAILED,
    RolloutState.ABORTED: pb.ROLLOUT_STATE_ABORTED,
}


@dataclass(frozen=True)
class RolloutListing:
    """ListRollouts' answer: the rollouts, newest first, and the paused pairs."""

    rollouts: list[RolloutRecord]
    pauses: list[PauseRecord]

    def holds(self, rollout: RolloutRecord) -> bool:
        """An active rollout of a paused pair: it holds where it is."""
        key = (rollout.model_name, rollout.device_class)
        return rollout.state.active and any(p.key == key for p in self.pauses)


class RolloutHandlers:
    def __init__(self, rollouts: RolloutStore, loop: RolloutLoop) -> None:
        self._rollouts = rollouts
        self._loop = loop

    async def list(
        self, model_name: str, device_class: str, active_only: bool, limit: int
    ) -> RolloutListing:
        model = validate.optional_name(model_name, "model_name")
        cls = validate.optional_name(device_class, "device_class")
        validate.int_range(limit, "limit", 0, MAX_LIMIT)
        rollouts = await in_thread(
            lambda: self._rollouts.list(
                limit or DEFAULT_LIMIT, model_name=model, device_class=cls, active_only=active_only
            )
        )
        pauses = await in_thread(lambda: self._rollouts.pauses(model_name=model, device_class=cls))
        return RolloutListing(rollouts, pauses)

    async def pause(self, model_name: str, device_class: str, reason: str, by: str) -> PauseRecord:
        """Pause the loop for the pair (``rollout.paused``); FAILED_PRECONDITION when it
        already is, naming who paused it and why."""
        model, cls = await self._pair(model_name, device_class)
        validate.text(reason, "reason", MAX_REASON)
        async with self._loop.between_ticks():
            pause, created = await self._pause(model, cls, reason, by)
        if not created:
            raise FleetError(
                ErrorCode.FAILED_PRECONDITION,
                f"the budget loop is already paused for {model} on {cls} "
                f"({pause.describe()}); `homefleet rollouts resume` ends the pause",
            )
        return pause

    async def _pause(self, model: str, cls: str, reason: str, by: str) -> tuple[PauseRecord, bool]:
        """Record the pause and its event, which names the rollout it holds, if any."""
        active = await in_thread(lambda: self._rollouts.list(1, model_name=model, device_class=cls))
        holding = (
            f"; rollout {active[0].id} holds in {active[0].state.value}"
            if active and active[0].state.active
            else ""
        )
        return await in_thread(
            self._rollouts.pause,
            model,
            cls,
            by,
            reason,
            NewEvent(
                "rollout.paused",
                f"{cls}/{model}",
                f"budget loop paused for {model} on {cls} by {by}"
                + (f": {reason}" if reason else "")
                + holding,
                {"device_class": cls, "model": model, "by": by, "reason": reason},
            ),
        )

    async def resume(self, model_name: str, device_class: str, by: str) -> PauseRecord:
        """End the pair's pause (``rollout.resumed``); FAILED_PRECONDITION when it is not
        paused. Any stored pause can be ended, even one whose class is no longer declared
        (the controller restarted without its file): only without one are the names
        checked, so that a typo is NOT_FOUND."""
        model = validate.name(model_name, "model_name")
        cls = validate.name(device_class, "device_class")

        def event(pause: PauseRecord, now: int) -> NewEvent:
            seconds = max(0, now - pause.paused_unix_ms) // 1000
            return NewEvent(
                "rollout.resumed",
                f"{cls}/{model}",
                f"budget loop resumed for {model} on {cls} by {by} after {seconds} s "
                f"({pause.describe()})",
                {
                    "device_class": cls,
                    "model": model,
                    "by": by,
                    "paused_by": pause.paused_by,
                    "reason": pause.reason,
                    "paused_seconds": seconds,
                },
            )

        ended = await in_thread(self._rollouts.resume, model, cls, event)
        if ended is None:
            await self._pair(model, cls)  # NOT_FOUND for an unknown model or class
            raise FleetError(
                ErrorCode.FAILED_PRECONDITION,
                f"the budget loop is not paused for {model} on {cls}: nothing to resume",
            )
        return ended

    async def abort(self, rollout_id: int, reason: str, by: str) -> RolloutRecord:
        if rollout_id <= 0:
            raise invalid("rollout_id is required: the rollout's id (`homefleet rollouts`)")
        validate.int_range(rollout_id, "rollout_id", 1, validate.MAX_INT64)
        validate.text(reason, "reason", MAX_REASON)
        return await self._loop.abort(rollout_id, by, reason)

    async def _pair(self, model_name: str, device_class: str) -> tuple[str, str]:
        """A checked (model, class) the loop could act on: the model is registered, and
        the class is declared (--device-classes) or the pair already has a class
        assignment or a rollout. NOT_FOUND names what is unknown (a typo would else
        pause nothing)."""
        model = validate.name(model_name, "model_name")
        cls = validate.name(device_class, "device_class")
        if not await in_thread(self._rollouts.model_exists, model):
            raise not_found(
                f"model {model!r} is not registered on this controller; "
                "`homefleet model list` lists the models"
            )
        classes = self._loop.classes
        if classes.get(cls) is None and not await in_thread(self._rollouts.known_pair, model, cls):
            declared = ", ".join(classes.names()) or "none: it runs without --device-classes"
            raise not_found(
                f"device class {cls!r} is not declared on this controller (it declares "
                f"{declared}) and {model} has no class assignment or rollout there"
            )
        return model, cls


def rollout_to_proto(r: RolloutRecord, *, paused: bool = False) -> pb.Rollout:
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
        paused=paused,
    )


def pause_to_proto(p: PauseRecord) -> pb.RolloutPause:
    return pb.RolloutPause(
        model_name=p.model_name,
        device_class=p.device_class,
        paused_by=p.paused_by,
        reason=p.reason,
        paused_unix_ms=p.paused_unix_ms,
        verdict=p.verdict,
        verdict_unix_ms=p.verdict_unix_ms,
    )


def listing_to_proto(listing: RolloutListing) -> pb.ListRolloutsResponse:
    return pb.ListRolloutsResponse(
        rollouts=[rollout_to_proto(r, paused=listing.holds(r)) for r in listing.rollouts],
        pauses=[pause_to_proto(p) for p in listing.pauses],
    )
