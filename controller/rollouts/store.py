"""Rollouts in the database: started once per miss, advanced by conditional updates.

Every transition is one transaction with the event that records it, and only applies
when the rollout is still in the state the caller saw: two replicas acting on the same
rollout cannot both promote it, and a miss noticed twice starts one rollout (the
partial unique index on active rollouts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from controller.clock import unix_ms
from controller.db import (
    ArtifactRow,
    AssignmentRow,
    DeviceRow,
    EventRow,
    RolloutRow,
    TelemetryWindowRow,
)
from controller.records import NewEvent, TargetKind
from controller.rollouts.check import SliceStats
from controller.rollouts.records import (
    KnownBytes,
    NewRollout,
    RolloutChange,
    RolloutRecord,
    RolloutState,
)
from controller.sql_store import _window_sums, _WindowSums

MAX_LIST = 1000


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
                query = (
                    select(func.count(func.distinct(w.device_id)), *_window_sums())
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
                sums = _WindowSums.of(row[1:])
                out.append(
                    SliceStats(
                        start_unix_ms=start,
                        end_unix_ms=end,
                        count=sums.count,
                        errors=sums.errors,
                        latency_bucket_counts=tuple(sums.buckets),
                        joules=sums.joules,
                        devices=int(row[0]),
                    )
                )
        return out

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
            if row is None or row.state != expected.value:
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
            row.state = change.state.value
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
        self, model_name: str, device_class: str, sha256: str, other_than: int
    ) -> KnownBytes | None:
        """Whether another rollout of (model, class) already tried these bytes: as a
        candidate it rolled back (checked first), or as the baseline that missed."""
        r, a = RolloutRow, ArtifactRow
        pair = (r.model_name == model_name, r.device_class == device_class, r.id != other_than)
        rolled_back = (
            select(r.id, a.id)
            .join(a, a.id == r.candidate_artifact_id)
            .where(*pair, r.state == RolloutState.ROLLED_BACK.value, a.sha256 == sha256)
            .order_by(r.id.desc())
            .limit(1)
        )
        missed = (
            select(r.id, a.id)
            .join(a, a.id == r.baseline_artifact_id)
            .where(*pair, a.sha256 == sha256)
            .order_by(r.id.desc())
            .limit(1)
        )
        with self._sessions() as session:
            for query, was_rolled_back in ((rolled_back, True), (missed, False)):
                found = session.execute(query).first()
                if found is not None:
                    return KnownBytes(int(found[0]), str(found[1]), was_rolled_back)
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

    def _event(self, session: Session, new: NewEvent, rollout_id: int) -> None:
        detail: dict[str, Any] = {**new.detail, "rollout_id": rollout_id}
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


def _record(row: RolloutRow) -> RolloutRecord:
    return RolloutRecord(
        id=row.id,
        model_name=row.model_name,
        device_class=row.device_class,
        state=RolloutState(row.state),
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
