"""Rollouts in the database: started once per miss, advanced by conditional updates.

Every transition is one transaction with the event that records it, and only applies
when the rollout is still in the state the caller saw: two replicas acting on the same
rollout cannot both promote it, and a miss noticed twice starts one rollout (the
partial unique index on active rollouts).

An aborted rollout is stored as ``failed`` with ``ABORTED_KEY`` in its detail and read
back as ``RolloutState.ABORTED``: databases made before that state existed have a CHECK
constraint naming five states, which SQLite cannot widen without rebuilding the table.

Pauses (``rollout_pauses``) are an operator's "hands off this (model, class)": the loop
reads them every tick, so a pause holds on every replica and across restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, case, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from artifact.energy_sources import NO_METER
from controller.clock import unix_ms
from controller.db import (
    ArtifactRow,
    AssignmentRow,
    DeviceRow,
    EventRow,
    ModelRow,
    RolloutPauseRow,
    RolloutRow,
    TelemetryWindowRow,
)
from controller.records import NewEvent, TargetKind
from controller.rollouts.check import SliceStats
from controller.rollouts.records import (
    Judged,
    KnownBytes,
    NewRollout,
    PauseRecord,
    RolloutChange,
    RolloutRecord,
    RolloutState,
)
from controller.sql_store import _window_sums, _WindowSums

MAX_LIST = 1000
# Detail keys: who aborted a rollout and why (its presence makes a stored "failed" an
# aborted rollout); how long a canary was held by pauses (its timeout does not run then);
# whether a failed rollout's candidate was judged (its bytes are not tried again).
ABORTED_KEY = "aborted"
PAUSED_MS = "paused_ms"
CANDIDATE_JUDGED = "candidate_judged"


@dataclass(frozen=True)
class ClassAssignment:
    """A model assigned to a whole device class: what the budget loop watches."""

    device_class: str
    model_name: str
    artifact_id: str
    updated_unix_ms: int


class RolloutStore:
    def __init__(self, engine: Engine, clock: Callable[[], int] = unix_ms) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._now = clock

    # ---------------------------------------------------------------- what to watch
    def class_assignments(self) -> list[ClassAssignment]:
        query = (
            select(AssignmentRow)
            .where(AssignmentRow.target_kind == TargetKind.CLASS.value)
            .order_by(AssignmentRow.target, AssignmentRow.model_name)
            .limit(MAX_LIST)
        )
        with self._sessions() as session:
            return [
                ClassAssignment(r.target, r.model_name, r.artifact_id, r.updated_unix_ms)
                for r in session.scalars(query)
            ]

    def class_artifact(self, model_name: str, device_class: str) -> str:
        """The artifact id assigned to the whole class ("" when none)."""
        query = select(AssignmentRow.artifact_id).where(
            AssignmentRow.target_kind == TargetKind.CLASS.value,
            AssignmentRow.target == device_class,
            AssignmentRow.model_name == model_name,
        )
        with self._sessions() as session:
            return session.scalar(query) or ""

    def pinned_devices(self, model_name: str) -> set[str]:
        """Devices with their own assignment of ``model_name`` (an operator's pin, or a
        canary): a new canary leaves them alone."""
        query = select(AssignmentRow.target).where(
            AssignmentRow.target_kind == TargetKind.DEVICE.value,
            AssignmentRow.model_name == model_name,
        )
        with self._sessions() as session:
            return set(session.scalars(query.limit(100_000)))

    def slices(
        self,
        device_class: str,
        model_name: str,
        artifact_sha256: str,
        bounds: Sequence[tuple[int, int]],
        *,
        excluding: Sequence[str] = (),
    ) -> list[SliceStats]:
        """Merged telemetry of one artifact on the class's devices, one row per slice.

        A window belongs to the slice its end time falls in. ``excluding``: devices whose
        windows do not count (a canary's own windows are not "the rest of the class").
        """
        w = TelemetryWindowRow
        out = []
        with self._sessions() as session:
            for start, end in bounds:
                metered = case((w.energy_source.not_like(f"{NO_METER}%"), w.count), else_=0)
                query = (
                    select(
                        func.count(func.distinct(w.device_id)),
                        func.coalesce(func.sum(metered), 0),
                        *_window_sums(),
                    )
                    .join(DeviceRow, DeviceRow.device_id == w.device_id)
                    .where(
                        DeviceRow.device_class == device_class,
                        w.model_name == model_name,
                        w.artifact_sha256 == artifact_sha256,
                        w.end_unix_ms >= start,
                        w.end_unix_ms < end,
                    )
                )
                if excluding:
                    query = query.where(w.device_id.not_in(list(excluding)))
                row = session.execute(query).one()
                sums = _WindowSums.of(row[2:])
                out.append(
                    SliceStats(
                        start_unix_ms=start,
                        end_unix_ms=end,
                        count=sums.count,
                        errors=sums.errors,
                        latency_bucket_counts=tuple(sums.buckets),
                        joules=sums.joules,
                        devices=int(row[0]),
                        metered=int(row[1]),
                    )
                )
        return out

    # ---------------------------------------------------------------- pauses
    def pause(
        self,
        model_name: str,
        device_class: str,
        paused_by: str,
        reason: str,
        event: NewEvent,
    ) -> tuple[PauseRecord, bool]:
        """Pause the pair and record ``event``; (the pause in place, False) when it
        already was paused (nothing is written then)."""
        try:
            with self._sessions.begin() as session:
                row = session.get(RolloutPauseRow, (model_name, device_class))
                if row is not None:
                    return _pause(row), False
                row = RolloutPauseRow(
                    model_name=model_name,
                    device_class=device_class,
                    paused_by=paused_by,
                    reason=reason,
                    paused_unix_ms=self._now(),
                    verdict="",
                    verdict_unix_ms=0,
                )
                session.add(row)
                session.flush()
                self._event(session, event, self._active_id(session, model_name, device_class))
                return _pause(row), True
        except IntegrityError:  # another replica paused it in the meantime
            existing = self.pause_of(model_name, device_class)
            if existing is None:
                raise
            return existing, False

    def resume(
        self, model_name: str, device_class: str, event: Callable[[PauseRecord, int], NewEvent]
    ) -> PauseRecord | None:
        """End the pair's pause (None: it was not paused) and record ``event(pause,
        now)``; an active canary is credited the paused time, so its timeout only counts
        the time the loop could act on it."""
        with self._sessions.begin() as session:
            row = session.get(RolloutPauseRow, (model_name, device_class), with_for_update=True)
            if row is None:
                return None
            pause, now = _pause(row), self._now()
            session.delete(row)
            active = session.scalars(
                select(RolloutRow).where(
                    RolloutRow.model_name == model_name,
                    RolloutRow.device_class == device_class,
                    RolloutRow.state == RolloutState.CANARY.value,
                )
            ).first()
            if active is not None:
                since = max(pause.paused_unix_ms, active.canary_since_unix_ms or 0)
                held = int(active.detail.get(PAUSED_MS, 0)) + max(0, now - since)
                active.detail = {**active.detail, PAUSED_MS: held}
            self._event(session, event(pause, now), active.id if active is not None else None)
            return pause

    def pause_of(self, model_name: str, device_class: str) -> PauseRecord | None:
        with self._sessions() as session:
            row = session.get(RolloutPauseRow, (model_name, device_class))
            return _pause(row) if row is not None else None

    def pauses(
        self, *, model_name: str | None = None, device_class: str | None = None
    ) -> list[PauseRecord]:
        """The paused pairs (optionally one model, one class), by class then model."""
        p = RolloutPauseRow
        query = select(p).order_by(p.device_class, p.model_name).limit(MAX_LIST)
        if model_name:
            query = query.where(p.model_name == model_name)
        if device_class:
            query = query.where(p.device_class == device_class)
        with self._sessions() as session:
            return [_pause(r) for r in session.scalars(query)]

    def note_verdict(self, model_name: str, device_class: str, verdict: str, unix_ms: int) -> None:
        """Keep the loop's latest judgement of a paused pair (nothing when not paused)."""
        with self._sessions.begin() as session:
            row = session.get(RolloutPauseRow, (model_name, device_class))
            if row is not None and (row.verdict, row.verdict_unix_ms) != (verdict, unix_ms):
                row.verdict, row.verdict_unix_ms = verdict, unix_ms

    def known_pair(self, model_name: str, device_class: str) -> bool:
        """Whether the loop has anything of the pair: a class assignment or a rollout."""
        assigned = select(AssignmentRow.artifact_id).where(
            AssignmentRow.target_kind == TargetKind.CLASS.value,
            AssignmentRow.target == device_class,
            AssignmentRow.model_name == model_name,
        )
        rolled = select(RolloutRow.id).where(
            RolloutRow.model_name == model_name, RolloutRow.device_class == device_class
        )
        with self._sessions() as session:
            return any(session.execute(q.limit(1)).first() is not None for q in (assigned, rolled))

    def model_exists(self, model_name: str) -> bool:
        with self._sessions() as session:
            found = session.scalar(select(ModelRow.id).where(ModelRow.name == model_name).limit(1))
            return found is not None

    @staticmethod
    def _active_id(session: Session, model_name: str, device_class: str) -> int | None:
        states = [s.value for s in RolloutState if s.active]
        return session.scalar(
            select(RolloutRow.id).where(
                RolloutRow.model_name == model_name,
                RolloutRow.device_class == device_class,
                RolloutRow.state.in_(states),
            )
        )

    # ---------------------------------------------------------------- rollouts
    def start(self, new: NewRollout, event: NewEvent) -> RolloutRecord | None:
        """Record a new rollout and its decision; None when one is already active."""
        try:
            with self._sessions.begin() as session:
                now = self._now()
                row = RolloutRow(
                    model_name=new.model_name,
                    device_class=new.device_class,
                    state=RolloutState.RECOMPRESSING.value,
                    baseline_artifact_id=new.baseline_artifact_id,
                    candidate_artifact_id="",
                    job_id=None,
                    canary_devices=[],
                    relative_speed=new.relative_speed,
                    p95_target_ms=new.p95_target_ms,
                    reason=new.reason,
                    detail=new.detail,
                    created_unix_ms=now,
                    updated_unix_ms=now,
                )
                session.add(row)
                session.flush()
                self._event(session, event, row.id)
                return _record(row)
        except IntegrityError:
            return None

    def advance(
        self,
        rollout_id: int,
        expected: RolloutState,
        change: RolloutChange,
        events: Sequence[NewEvent] = (),
        *,
        drop_device_assignments: bool = False,
    ) -> RolloutRecord | None:
        """Apply ``change`` if the rollout is still ``expected``; None when it moved on.

        ``drop_device_assignments`` removes the canary's per-device assignments in the
        same transaction (a promotion or rollback has just reassigned the class).
        """
        with self._sessions.begin() as session:
            row = session.get(RolloutRow, rollout_id, with_for_update=True)
            if row is None or _state(row) is not expected:
                return None
            now = self._now()
            if change.canary_devices is not None:
                row.canary_devices = list(change.canary_devices)
            if drop_device_assignments and row.canary_devices:
                session.execute(
                    delete(AssignmentRow).where(
                        AssignmentRow.target_kind == TargetKind.DEVICE.value,
                        AssignmentRow.model_name == row.model_name,
                        AssignmentRow.target.in_(list(row.canary_devices)),
                    )
                )
            row.state = _stored(change.state)
            row.reason = change.reason
            row.updated_unix_ms = now
            if change.candidate_artifact_id is not None:
                row.candidate_artifact_id = change.candidate_artifact_id
            if change.job_id is not None:
                row.job_id = change.job_id
            if change.state is RolloutState.CANARY:
                row.canary_since_unix_ms = now
            if change.detail is not None:
                row.detail = {**row.detail, **change.detail}
            if change.state is RolloutState.ABORTED and ABORTED_KEY not in row.detail:
                row.detail = {**row.detail, ABORTED_KEY: {"reason": change.reason}}
            if not change.state.active:
                row.finished_unix_ms = now
            for event in events:
                self._event(session, event, row.id)
            return _record(row)

    def get(self, rollout_id: int) -> RolloutRecord | None:
        with self._sessions() as session:
            row = session.get(RolloutRow, rollout_id)
            return _record(row) if row is not None else None

    def active(self) -> list[RolloutRecord]:
        states = [s.value for s in RolloutState if s.active]
        query = select(RolloutRow).where(RolloutRow.state.in_(states)).order_by(RolloutRow.id)
        with self._sessions() as session:
            return [_record(r) for r in session.scalars(query.limit(MAX_LIST))]

    def latest(self, model_name: str, device_class: str) -> RolloutRecord | None:
        query = (
            select(RolloutRow)
            .where(RolloutRow.model_name == model_name, RolloutRow.device_class == device_class)
            .order_by(RolloutRow.id.desc())
            .limit(1)
        )
        with self._sessions() as session:
            row = session.scalars(query).one_or_none()
            return _record(row) if row is not None else None

    def known_bytes(
        self, model_name: str, device_class: str, sha256: str, other_than: int = 0
    ) -> KnownBytes | None:
        """Whether a rollout of (model, class) other than ``other_than`` already tried
        these bytes: as a candidate it rolled back (checked first), as a candidate it
        failed on (judged: over size, or bytes already known; not one it never got to
        try, e.g. for want of devices, nor an aborted one's), or as the baseline that
        missed (the active rollout's included)."""
        r, a = RolloutRow, ArtifactRow
        pair = (r.model_name == model_name, r.device_class == device_class, r.id != other_than)
        rolled_back = (
            select(r.id, a.id)
            .join(a, a.id == r.candidate_artifact_id)
            .where(*pair, r.state == RolloutState.ROLLED_BACK.value, a.sha256 == sha256)
            .order_by(r.id.desc())
            .limit(1)
        )
        failed = (
            select(r.id, a.id, r.detail)
            .join(a, a.id == r.candidate_artifact_id)
            .where(*pair, r.state == RolloutState.FAILED.value, a.sha256 == sha256)
            .order_by(r.id.desc())
            .limit(MAX_LIST)
        )
        missed = (
            select(r.id, a.id)
            .join(a, a.id == r.baseline_artifact_id)
            .where(*pair, a.sha256 == sha256)
            .order_by(r.id.desc())
            .limit(1)
        )
        with self._sessions() as session:
            found = session.execute(rolled_back).first()
            if found is not None:
                return KnownBytes(int(found[0]), str(found[1]), Judged.ROLLED_BACK)
            # the flag is in the JSON detail: checked here, the rows are few
            for rollout_id, artifact_id, detail in session.execute(failed):
                if detail.get(CANDIDATE_JUDGED) and ABORTED_KEY not in detail:
                    return KnownBytes(int(rollout_id), str(artifact_id), Judged.FAILED)
            found = session.execute(missed).first()
            if found is not None:
                return KnownBytes(int(found[0]), str(found[1]), Judged.MISSED)
        return None

    def note(self, rollout_id: int, detail: dict[str, Any]) -> RolloutRecord | None:
        """Add ``detail`` to a rollout without moving it (what the loop learned after it
        ended, e.g. that the class met its budget again)."""
        with self._sessions.begin() as session:
            row = session.get(RolloutRow, rollout_id, with_for_update=True)
            if row is None:
                return None
            row.detail = {**row.detail, **detail}
            return _record(row)

    def by_candidate(self, artifact_id: str) -> RolloutRecord | None:
        """The rollout that made ``artifact_id`` (to know the speed its planner assumed)."""
        query = (
            select(RolloutRow)
            .where(RolloutRow.candidate_artifact_id == artifact_id)
            .order_by(RolloutRow.id.desc())
            .limit(1)
        )
        with self._sessions() as session:
            row = session.scalars(query).one_or_none()
            return _record(row) if row is not None else None

    def list(
        self,
        limit: int = MAX_LIST,
        *,
        model_name: str | None = None,
        device_class: str | None = None,
        active_only: bool = False,
    ) -> list[RolloutRecord]:
        """Newest first, optionally one model, one class, or only the active ones."""
        query = select(RolloutRow)
        if model_name:
            query = query.where(RolloutRow.model_name == model_name)
        if device_class:
            query = query.where(RolloutRow.device_class == device_class)
        if active_only:
            query = query.where(RolloutRow.state.in_([s.value for s in RolloutState if s.active]))
        query = query.order_by(RolloutRow.id.desc()).limit(min(limit, MAX_LIST))
        with self._sessions() as session:
            return [_record(r) for r in session.scalars(query)]

    def _event(self, session: Session, new: NewEvent, rollout_id: int | None) -> None:
        detail: dict[str, Any] = dict(new.detail)
        if rollout_id is not None:
            detail["rollout_id"] = rollout_id
        session.add(
            EventRow(
                unix_ms=self._now(),
                kind=new.kind,
                subject=new.subject,
                message=new.message,
                detail=detail,
            )
        )
        session.flush()


def _stored(state: RolloutState) -> str:
    """The ``state`` column's value (see the module docstring for aborted)."""
    return RolloutState.FAILED.value if state is RolloutState.ABORTED else state.value


def _state(row: RolloutRow) -> RolloutState:
    state = RolloutState(row.state)
    if state is RolloutState.FAILED and ABORTED_KEY in row.detail:
        return RolloutState.ABORTED
    return state


def _pause(row: RolloutPauseRow) -> PauseRecord:
    return PauseRecord(
        model_name=row.model_name,
        device_class=row.device_class,
        paused_by=row.paused_by,
        reason=row.reason,
        paused_unix_ms=row.paused_unix_ms,
        verdict=row.verdict,
        verdict_unix_ms=row.verdict_unix_ms,
    )


def _record(row: RolloutRow) -> RolloutRecord:
    return RolloutRecord(
        id=row.id,
        model_name=row.model_name,
        device_class=row.device_class,
        state=_state(row),
        baseline_artifact_id=row.baseline_artifact_id,
        candidate_artifact_id=row.candidate_artifact_id,
        job_id=row.job_id,
        canary_devices=tuple(row.canary_devices),
        relative_speed=row.relative_speed,
        p95_target_ms=row.p95_target_ms,
        reason=row.reason,
        detail=dict(row.detail),
        created_unix_ms=row.created_unix_ms,
        updated_unix_ms=row.updated_unix_ms,
        canary_since_unix_ms=row.canary_since_unix_ms,
        finished_unix_ms=row.finished_unix_ms,
    )
