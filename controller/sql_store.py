"""The Store over SQLAlchemy: SQLite by default, PostgreSQL with the same code.

Version numbers are allocated as max+1 and protected by unique constraints; a writer
that loses a race sees IntegrityError and retries, so several replicas stay consistent
without locks held in any one process.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    and_,
    case,
    cast,
    delete,
    func,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from artifact import histogram
from artifact.manifest import TensorSpec
from controller import validate
from controller.clock import unix_ms
from controller.db import (
    AppliedUpdateRow,
    ArtifactRow,
    AssignmentRow,
    Base,
    BlobRepairRow,
    CompressionInputRow,
    CompressionJobLeaseRow,
    CompressionJobRow,
    CompressionTrialRow,
    DeviceModelRow,
    DeviceRow,
    DownloadRollupRow,
    EventRow,
    ModelRow,
    TelemetryRefusalRow,
    TelemetryReportingRow,
    TelemetryRollupRow,
    TelemetryWindowRow,
)
from controller.errors import ErrorCode, FleetError, invalid, not_found
from controller.records import (
    JOB_WARNING_EVENT,
    REFUSED_BOUNDS,
    REFUSED_OVERLAP,
    REFUSED_UNKNOWN_MODEL,
    AppliedUpdateTotals,
    ArtifactRecord,
    AssignResult,
    AssignTarget,
    BudgetVerdictRecord,
    ClassCount,
    CompressionInputs,
    CompressionJobRecord,
    DesiredAssignment,
    DesiredSet,
    DeviceModelState,
    DeviceRecord,
    DeviceRegistration,
    DeviceView,
    DownloadTotals,
    Encoding,
    EventRecord,
    FetchOutcome,
    Hardware,
    JobResult,
    JobState,
    ModelRecord,
    NewCompressionJob,
    NewEvent,
    NewModel,
    Outcome,
    RefusalTotals,
    RegisterResult,
    RemovedDevice,
    StatusUpdate,
    TargetKind,
    TelemetryRefusal,
    TelemetrySummary,
    TelemetryTotals,
    TelemetryWindow,
    TrialRecord,
)
from controller.store import (
    JOB_LEASE_MS,
    MAX_ARTIFACT_PAGE,
    MAX_DEVICE_PAGE,
    MAX_MODEL_PAGE,
    MAX_SERIES,
    MAX_SERIES_BUCKETS,
    ArtifactKey,
    ModelKey,
    SeriesSelection,
    Store,
    TelemetryPoint,
    TelemetrySeries,
    VersionConflictError,
)

T = TypeVar("T")
RETRIES = 10
RETRY_PAUSE_S = 0.02  # upper bound of the jittered pause after losing a race
MAX_LIST = 10_000  # every list the store returns is bounded
DEVICE_CONFLICT = "device.conflict"  # controller.agents.CONFLICT_EVENT
# A device's own assignment removed: the event's id is a floor of its desired-set revision.
ASSIGNMENT_REMOVED = "assignment.removed"


class SqlStore(Store):
    def __init__(self, engine: Engine, clock: Callable[[], int] = unix_ms) -> None:
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._now = clock
        self._known = _KnownArtifacts()  # telemetry's model and artifact check, cached

    def _retry(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in one transaction, again when a concurrent writer won a unique key."""
        for attempt in range(RETRIES):
            try:
                with self._sessions.begin() as session:
                    return work(session)
            except IntegrityError:
                if attempt == RETRIES - 1:
                    raise
                time.sleep(random.uniform(0, RETRY_PAUSE_S))
        raise RuntimeError("unreachable")  # pragma: no cover

    def _read(self, work: Callable[[Session], T]) -> T:
        with self._sessions() as session:
            return work(session)

    def _event(self, session: Session, new: NewEvent) -> EventRow:
        row = EventRow(
            unix_ms=self._now(),
            kind=new.kind,
            subject=new.subject,
            message=new.message,
            detail=new.detail,
        )
        session.add(row)
        session.flush()
        return row

    # ---------------------------------------------------------------- models
    def add_model(self, new: NewModel) -> tuple[ModelRecord, bool]:
        def work(session: Session) -> tuple[ModelRecord, bool]:
            same = session.scalars(
                select(ModelRow)
                .where(ModelRow.name == new.name, ModelRow.sha256 == new.sha256)
                .order_by(ModelRow.version.desc())
                .limit(1)
            ).first()
            if same is not None:  # any version, not only the latest: no duplicate versions
                return _model(same), False
            latest = _latest_model(session, new.name)
            row = ModelRow(
                name=new.name,
                version=latest.version + 1 if latest else 1,
                sha256=new.sha256,
                size_bytes=new.size_bytes,
                inputs=[s.model_dump(mode="json") for s in new.inputs],
                outputs=[s.model_dump(mode="json") for s in new.outputs],
                description=new.description,
                created_unix_ms=self._now(),
            )
            session.add(row)
            session.flush()
            self._event(
                session,
                NewEvent(
                    "model.added",
                    new.name,
                    f"model {new.name} v{row.version} added ({new.size_bytes} bytes, "
                    f"sha256 {new.sha256[:12]})",
                    {
                        "name": new.name,
                        "version": row.version,
                        "sha256": new.sha256,
                        "size_bytes": new.size_bytes,
                    },
                ),
            )
            return _model(row), True

        return self._retry(work)

    def get_model(self, name: str, version: int | None = None) -> ModelRecord | None:
        def work(session: Session) -> ModelRecord | None:
            if version is None:
                row = _latest_model(session, name)
            else:
                row = session.scalars(
                    select(ModelRow).where(ModelRow.name == name, ModelRow.version == version)
                ).one_or_none()
            return _model(row) if row else None

        return self._read(work)

    def list_models(
        self, *, after: ModelKey | None = None, limit: int = MAX_MODEL_PAGE
    ) -> list[ModelRecord]:
        query = select(ModelRow)
        if after is not None:
            query = query.where(tuple_(ModelRow.name, ModelRow.version) > tuple_(*after))
        page = max(0, min(limit, MAX_MODEL_PAGE + 1))  # + 1: is there a next page?
        query = query.order_by(ModelRow.name, ModelRow.version).limit(page)
        return self._read(lambda s: [_model(r) for r in s.scalars(query)])

    # ---------------------------------------------------------------- artifacts
    def next_artifact_version(self, model_name: str, device_class: str) -> int:
        query = select(func.max(ArtifactRow.version)).where(
            ArtifactRow.model_name == model_name, ArtifactRow.device_class == device_class
        )
        return self._read(lambda s: (s.scalar(query) or 0) + 1)

    def resign_artifacts(self, key_id: str, sign: Callable[[bytes], bytes]) -> int:
        def work(session: Session) -> int:
            rows = session.scalars(select(ArtifactRow).where(ArtifactRow.key_id != key_id)).all()
            for row in rows:
                row.signature = sign(row.manifest_json)
                row.key_id = key_id
            return len(rows)

        return self._retry(work)

    def highest_version_in_use(self, model_name: str, device_class: str) -> int:
        of_pair = and_(
            ArtifactRow.model_name == model_name, ArtifactRow.device_class == device_class
        )
        assigned = (
            select(func.max(ArtifactRow.version))
            .join(AssignmentRow, AssignmentRow.artifact_id == ArtifactRow.id)
            .where(of_pair)
        )
        served_digests = (
            select(DeviceModelRow.serving_sha256)
            .join(DeviceRow, DeviceRow.device_id == DeviceModelRow.device_id)
            .where(
                DeviceRow.device_class == device_class,
                DeviceModelRow.model_name == model_name,
            )
        )
        served = select(func.max(ArtifactRow.version)).where(
            of_pair, ArtifactRow.sha256.in_(served_digests)
        )
        return self._read(lambda s: max(s.scalar(assigned) or 0, s.scalar(served) or 0))

    def insert_artifact(self, artifact: ArtifactRecord) -> ArtifactRecord:
        try:
            with self._sessions.begin() as session:
                row = ArtifactRow(**dataclasses.asdict(artifact))
                session.add(row)
                session.flush()
                self._event(
                    session,
                    NewEvent(
                        "artifact.created",
                        artifact.id,
                        f"artifact {artifact.id} created from model {artifact.model_name} "
                        f"v{artifact.model_version} (sha256 {artifact.sha256[:12]})",
                        {
                            "artifact_id": artifact.id,
                            "model_name": artifact.model_name,
                            "model_version": artifact.model_version,
                            "device_class": artifact.device_class,
                            "version": artifact.version,
                            "sha256": artifact.sha256,
                            "size_bytes": artifact.size_bytes,
                        },
                    ),
                )
        except IntegrityError as exc:
            raise VersionConflictError(artifact.id) from exc
        return artifact

    def get_artifact(self, artifact_id: str) -> ArtifactRecord | None:
        return self._read(lambda s: _artifact_or_none(s.get(ArtifactRow, artifact_id)))

    def find_artifact_by_sha256(self, sha256: str) -> ArtifactRecord | None:
        query = (
            select(ArtifactRow)
            .where(ArtifactRow.sha256 == sha256)
            .order_by(ArtifactRow.created_unix_ms.desc())
            .limit(1)
        )
        return self._read(lambda s: _artifact_or_none(s.scalars(query).first()))

    def find_model_artifact(self, model_name: str, sha256: str) -> ArtifactRecord | None:
        # ix_artifacts_sha256 finds the few artifacts holding these bytes (the models and
        # classes built alike); the model is checked on those rows only
        query = (
            select(ArtifactRow)
            .where(ArtifactRow.sha256 == sha256, ArtifactRow.model_name == model_name)
            .order_by(ArtifactRow.created_unix_ms.desc())
            .limit(1)
        )
        return self._read(lambda s: _artifact_or_none(s.scalars(query).first()))

    def list_artifacts(
        self,
        model_name: str | None = None,
        device_class: str | None = None,
        *,
        after: ArtifactKey | None = None,
        limit: int = MAX_ARTIFACT_PAGE,
        newest_first: bool = False,
    ) -> list[ArtifactRecord]:
        a = ArtifactRow
        key = tuple_(a.model_name, a.device_class, a.version)
        query = select(a)
        if model_name:
            query = query.where(a.model_name == model_name)
        if device_class:
            query = query.where(a.device_class == device_class)
        if after is not None:
            query = query.where(key < tuple_(*after) if newest_first else key > tuple_(*after))
        columns = (a.model_name, a.device_class, a.version)
        order = [c.desc() for c in columns] if newest_first else list(columns)
        page = max(0, min(limit, MAX_ARTIFACT_PAGE + 1))  # + 1: is there a next page?
        query = query.order_by(*order).limit(page)
        return self._read(lambda s: [_artifact(r) for r in s.scalars(query)])

    def assign(self, artifact: ArtifactRecord, target: AssignTarget) -> AssignResult:
        def work(session: Session) -> AssignResult:
            row = session.scalars(
                select(AssignmentRow).where(
                    AssignmentRow.target_kind == target.kind.value,
                    AssignmentRow.target == target.name,
                    AssignmentRow.model_name == artifact.model_name,
                )
            ).one_or_none()
            own = _devices_with_own(session, artifact.model_name, target)
            if row is not None and row.artifact_id == artifact.id:
                return AssignResult(0, False, row.revision, artifact.id, *own)
            affected = _devices_governed(session, artifact.model_name, target)
            previous = row.artifact_id if row else ""
            event = self._event(
                session,
                NewEvent(
                    "assignment.changed",
                    target.name,
                    f"{target.kind.value} {target.name}: model {artifact.model_name} -> "
                    f"{artifact.id} ({affected} device(s) affected)",
                    {
                        "artifact_id": artifact.id,
                        "model_name": artifact.model_name,
                        "target_kind": target.kind.value,
                        "target": target.name,
                        "previous_artifact_id": previous,
                        "devices_affected": affected,
                    },
                ),
            )
            if row is None:
                row = AssignmentRow(
                    target_kind=target.kind.value,
                    target=target.name,
                    model_name=artifact.model_name,
                )
                session.add(row)
            row.artifact_id = artifact.id
            row.revision = event.id
            row.updated_unix_ms = self._now()
            return AssignResult(affected, True, event.id, artifact.id, *own)

        return self._retry(work)

    def assigned(self, target: AssignTarget, model_name: str) -> ArtifactRecord | None:
        query = (
            select(ArtifactRow)
            .join(AssignmentRow, AssignmentRow.artifact_id == ArtifactRow.id)
            .where(
                AssignmentRow.target_kind == target.kind.value,
                AssignmentRow.target == target.name,
                AssignmentRow.model_name == model_name,
            )
        )
        return self._read(lambda s: _artifact_or_none(s.scalars(query).one_or_none()))

    def unassign(self, model_name: str, device_id: str) -> AssignResult | None:
        """Remove the device's own assignment of ``model_name`` (it follows its class
        again); None when it has none. The ``assignment.removed`` event's id is what
        keeps the device's revision growing (see ``desired_set``)."""

        def work(session: Session) -> AssignResult | None:
            row = session.scalars(
                select(AssignmentRow).where(
                    AssignmentRow.target_kind == TargetKind.DEVICE.value,
                    AssignmentRow.target == device_id,
                    AssignmentRow.model_name == model_name,
                )
            ).one_or_none()
            device = session.get(DeviceRow, device_id)
            if row is None or device is None:
                return None
            follows = session.scalars(
                select(AssignmentRow.artifact_id).where(
                    AssignmentRow.target_kind == TargetKind.CLASS.value,
                    AssignmentRow.target == device.device_class,
                    AssignmentRow.model_name == model_name,
                )
            ).one_or_none()
            then = f"now {follows}" if follows else "the class has none: it keeps what it runs"
            event = self._event(
                session,
                NewEvent(
                    ASSIGNMENT_REMOVED,
                    device_id,
                    f"device {device_id}: model {model_name} follows class "
                    f"{device.device_class} again (was {row.artifact_id}; {then})",
                    {
                        "model_name": model_name,
                        "target_kind": TargetKind.DEVICE.value,
                        "target": device_id,
                        "previous_artifact_id": row.artifact_id,
                        "artifact_id": follows or "",
                        "devices_affected": 1,
                    },
                ),
            )
            session.delete(row)
            return AssignResult(1, True, event.id, follows or "")

        return self._retry(work)

    # ---------------------------------------------------------------- devices
    def register_device(self, registration: DeviceRegistration) -> RegisterResult:
        def work(session: Session) -> RegisterResult:
            now = self._now()
            reg = registration
            row = session.get(DeviceRow, reg.device_id)
            re_registered = row is not None
            watched = row is not None and (row.watch_lease_until_ms or 0) > now
            if row is None:
                row = DeviceRow(
                    device_id=reg.device_id,
                    device_class=reg.device_class,
                    hardware=reg.hardware.to_json(),
                    agent_version=reg.agent_version,
                    registered_unix_ms=now,
                    last_seen_unix_ms=now,
                    watch_lease_until_ms=None,
                )
                session.add(row)
                session.flush()
            else:
                differences = _differences(row, reg)
                if differences:
                    raise FleetError(
                        ErrorCode.ALREADY_EXISTS,
                        f"device id {reg.device_id!r} is already registered with different "
                        f"{'; '.join(differences)}; a device id names one machine: choose "
                        "another id for this one",
                    )
                row.hardware = reg.hardware.to_json()
                row.agent_version = reg.agent_version
                row.last_seen_unix_ms = now
            _record_held(session, reg, now)
            if watched and _conflict_quiet(session, reg.device_id, now):
                # two agents share the id and take turns: their device.conflict event
                # says so once, not one event per turn
                return RegisterResult(_device(row), re_registered, watched)
            self._event(
                session,
                NewEvent(
                    "device.registered",
                    reg.device_id,
                    f"device {reg.device_id} ({reg.device_class}) "
                    f"{'re-registered' if re_registered else 'registered'}",
                    {
                        "device_id": reg.device_id,
                        "device_class": reg.device_class,
                        "hardware": reg.hardware.to_json(),
                        "agent_version": reg.agent_version,
                        "re_registered": re_registered,
                        "held": [
                            {"model_name": h.model_name, "sha256": h.sha256, "active": h.active}
                            for h in reg.held
                        ],
                    },
                ),
            )
            return RegisterResult(_device(row), re_registered, watched)

        return self._retry(work)

    def get_device(self, device_id: str) -> DeviceRecord | None:
        return self._read(lambda s: _device_or_none(s.get(DeviceRow, device_id)))

    def remove_device(self, device_id: str) -> RemovedDevice | None:
        def work(session: Session) -> RemovedDevice | None:
            row = session.get(DeviceRow, device_id)
            if row is None:
                return None
            device = _device(row)
            own = (
                AssignmentRow.target_kind == TargetKind.DEVICE.value,
                AssignmentRow.target == device_id,
            )
            models = tuple(
                session.scalars(
                    select(AssignmentRow.model_name).where(*own).order_by(AssignmentRow.model_name)
                )
            )
            session.execute(delete(AssignmentRow).where(*own))
            mine = TelemetryWindowRow.device_id == device_id
            windows = (
                session.scalar(select(func.count()).select_from(TelemetryWindowRow).where(mine))
                or 0
            )
            session.execute(delete(TelemetryWindowRow).where(mine))
            for table in (TelemetryReportingRow, DeviceModelRow):
                session.execute(delete(table).where(table.device_id == device_id))
            session.delete(row)
            assignments = f"; its own assignment(s) of {', '.join(models)} went" if models else ""
            event = self._event(
                session,
                NewEvent(
                    "device.removed",
                    device_id,
                    f"device {device_id} ({device.device_class}) removed from the fleet, with "
                    f"{windows} telemetry window(s){assignments}",
                    {
                        "device_id": device_id,
                        "device_class": device.device_class,
                        "own_assignments": list(models),
                        "telemetry_windows": windows,
                        "registered_unix_ms": device.registered_unix_ms,
                        "last_seen_unix_ms": device.last_seen_unix_ms,
                    },
                ),
            )
            return RemovedDevice(device, models, windows, event.id)

        return self._retry(work)

    def desired_set(self, device_id: str) -> DesiredSet:
        def work(session: Session) -> DesiredSet:
            device = _require_device(session, device_id)
            rows = session.execute(
                select(AssignmentRow, ArtifactRow, BlobRepairRow.repaired_unix_ms)
                .join(ArtifactRow, AssignmentRow.artifact_id == ArtifactRow.id)
                .outerjoin(BlobRepairRow, BlobRepairRow.sha256 == ArtifactRow.sha256)
                .where(
                    or_(
                        and_(
                            AssignmentRow.target_kind == TargetKind.CLASS.value,
                            AssignmentRow.target == device.device_class,
                        ),
                        and_(
                            AssignmentRow.target_kind == TargetKind.DEVICE.value,
                            AssignmentRow.target == device.device_id,
                        ),
                    )
                )
            )
            repaired: dict[str, int] = {}
            pairs = []
            for assignment, artifact, repaired_ms in rows:
                repaired[artifact.sha256] = repaired_ms or 0
                pairs.append((assignment, artifact))
            chosen = _choose(pairs)
            revision = max((r.revision for r, _ in chosen.values()), default=0)
            return DesiredSet(
                assignments=tuple(
                    _desired(a, repaired[a.sha256]) for _, (_, a) in sorted(chosen.items())
                ),
                revision=max(revision, _removed_since(session, device_id, revision)),
            )

        return self._read(work)

    def touch_watch(self, device_id: str, lease_until_ms: int) -> None:
        with self._sessions.begin() as session:
            session.execute(
                update(DeviceRow)
                .where(DeviceRow.device_id == device_id)
                .values(last_seen_unix_ms=self._now(), watch_lease_until_ms=lease_until_ms)
            )

    def release_watch(self, device_id: str) -> None:
        with self._sessions.begin() as session:
            session.execute(
                update(DeviceRow)
                .where(DeviceRow.device_id == device_id)
                .values(last_seen_unix_ms=self._now(), watch_lease_until_ms=None)
            )

    def report_status(self, status: StatusUpdate) -> None:
        def work(session: Session) -> None:
            now = self._now()
            device = _require_device(session, status.device_id)
            device.last_seen_unix_ms = now
            row = session.get(DeviceModelRow, (status.device_id, status.model_name))
            if row is None:
                # a row per model a device names: only registered ones, or one device could
                # add rows without end (and make its ListDevices page too large to send)
                known = select(ModelRow.id).where(ModelRow.name == status.model_name).limit(1)
                if session.scalar(known) is None:
                    raise not_found(
                        f"model {status.model_name!r} is not registered on this controller: a "
                        "device reports the status of models it was assigned"
                    )
                row = DeviceModelRow(device_id=status.device_id, model_name=status.model_name)
                session.add(row)
            applied = (
                status.outcome is Outcome.ACTIVE
                and status.bytes_received > 0  # downloaded, not found on disk or switched back
                and not (
                    row.last_outcome == Outcome.ACTIVE.value
                    and row.reported_sha256 == status.artifact_sha256
                )  # a report sent again (a reconnect) is one update
            )
            row.serving_sha256 = status.serving_sha256
            row.reported_sha256 = status.artifact_sha256
            row.last_outcome = status.outcome.value
            row.last_reason = status.reason
            row.bytes_received = status.bytes_received
            row.encoding = status.encoding.value if status.encoding else ""
            row.updated_unix_ms = now
            if applied:  # after the row is complete: the lookup flushes it
                _add_applied_update(session, device.device_class, status)
            message = (
                f"device {status.device_id} model {status.model_name}: {status.outcome.value} "
                f"{status.artifact_sha256[:12]}"
            )
            if status.reason:
                message += f": {status.reason}"
            self._event(
                session,
                NewEvent(
                    "device.status",
                    status.device_id,
                    message,
                    {
                        "device_id": status.device_id,
                        "model_name": status.model_name,
                        "artifact_sha256": status.artifact_sha256,
                        "outcome": status.outcome.value,
                        "reason": status.reason,
                        "bytes_received": status.bytes_received,
                        "encoding": status.encoding.value if status.encoding else "",
                        "serving_sha256": status.serving_sha256,
                    },
                ),
            )

        self._retry(work)

    def store_telemetry(self, device_id: str, windows: Sequence[TelemetryWindow]) -> int:
        highest = self.store_telemetry_batches({device_id: windows})
        if device_id not in highest:
            raise not_found(
                f"device {device_id!r} is not registered; register first (AgentService.Register)"
            )
        return highest[device_id]

    def backfill_telemetry_rollup(self) -> int:
        """Build the rollup and reporting rows from stored windows when the rollup is empty
        but windows exist (a database from before the rollup); returns the windows counted.

        One transaction, read in chunks: a controller that stops half-way leaves the
        rollup empty and the next start does it again."""

        def work(session: Session) -> int:
            if session.scalar(select(TelemetryRollupRow.id).limit(1)) is not None:
                return 0
            w = TelemetryWindowRow
            query = select(w, DeviceRow.device_class).join(
                DeviceRow, DeviceRow.device_id == w.device_id
            )
            counted = 0
            for chunk in session.execute(query.execution_options(yield_per=5000)).partitions():
                stored = [(row.device_id, _window_record(row)) for row, _ in chunk]
                classes = {row.device_id: device_class for row, device_class in chunk}
                _add_to_rollup(session, stored, classes)
                latest = max(row.received_unix_ms for row, _ in chunk)
                _mark_reporting(session, stored, latest)
                counted += len(stored)
            return counted

        return self._retry(work)

    def store_telemetry_batches(
        self, batches: Mapping[str, Sequence[TelemetryWindow]]
    ) -> dict[str, int]:
        """One transaction for many devices: a bulk insert that skips (device, seq) pairs
        already stored, so a resent batch is stored once without reading it back first;
        the windows it did store are added to the rollup the scrape reads.

        The new windows are held to what one device can report (``_check_continuity``,
        ``_add_to_rollup``): INVALID_ARGUMENT naming the device rolls the whole
        transaction back, and the group commit then retries the other devices without it."""

        def work(session: Session) -> dict[str, int]:
            now = self._now()
            classes: dict[str, str] = {}
            for chunk in _chunks(sorted(batches)):
                for device_id, device_class in session.execute(
                    update(DeviceRow)
                    .where(DeviceRow.device_id.in_(chunk))
                    .values(last_seen_unix_ms=now)
                    .returning(DeviceRow.device_id, DeviceRow.device_class)
                ):
                    classes[device_id] = device_class
            known = sorted(classes)
            windows = [
                (device_id, w)
                for device_id in known
                for w in {w.seq: w for w in batches[device_id]}.values()
            ]
            windows = _with_known_artifacts(session, windows, self._known)
            # read after the devices update: on PostgreSQL that row lock orders two
            # transactions of one device, so the second sees what the first stored
            before = _stored_state(session, known, {(d, w.model_name) for d, w in windows})
            rows = [
                (
                    device_id,
                    w.seq,
                    w.model_name,
                    w.artifact_sha256,
                    w.start_unix_ms,
                    w.end_unix_ms,
                    w.count,
                    w.errors,
                    "[" + ",".join(map(str, w.latency_bucket_counts)) + "]",  # JSON ints
                    w.cpu_seconds,
                    w.joules,
                    w.energy_source,
                    w.peak_memory_bytes,
                    now,
                )
                for device_id, w in windows
            ]
            highest = {d: before.highest_seq.get(d, 0) for d in known}
            if rows:
                inserted = _insert_new_windows(session, rows)
                stored = [(d, w) for d, w in windows if (d, w.seq) in inserted]
                _check_continuity(stored, before)
                _add_to_rollup(session, stored, classes)
                _mark_reporting(session, stored, now)
                for d, w in stored:
                    highest[d] = max(highest[d], w.seq)
            return highest

        return self._retry(work)

    def list_devices(
        self, device_class: str | None = None, *, after: str = "", limit: int = MAX_DEVICE_PAGE
    ) -> list[DeviceView]:
        def work(session: Session) -> list[DeviceView]:
            now = self._now()
            page = max(0, min(limit, MAX_DEVICE_PAGE + 1))  # + 1: is there a next page?
            query = select(DeviceRow).order_by(DeviceRow.device_id).limit(page)
            if device_class:
                query = query.where(DeviceRow.device_class == device_class)
            if after:
                query = query.where(DeviceRow.device_id > after)
            devices = list(session.scalars(query))
            if not devices:
                return []
            ids = [d.device_id for d in devices]
            classes = {d.device_class for d in devices}
            assignments = session.execute(
                select(AssignmentRow, ArtifactRow)
                .join(ArtifactRow, AssignmentRow.artifact_id == ArtifactRow.id)
                .where(
                    or_(
                        and_(
                            AssignmentRow.target_kind == TargetKind.CLASS.value,
                            AssignmentRow.target.in_(classes),
                        ),
                        and_(
                            AssignmentRow.target_kind == TargetKind.DEVICE.value,
                            AssignmentRow.target.in_(ids),
                        ),
                    )
                )
            ).all()
            reported: dict[str, list[DeviceModelRow]] = {}
            for dm in session.scalars(
                select(DeviceModelRow).where(DeviceModelRow.device_id.in_(ids))
            ):
                reported.setdefault(dm.device_id, []).append(dm)
            serving = {dm.serving_sha256 for dms in reported.values() for dm in dms}
            serving.discard("")
            by_sha: dict[str, list[ArtifactRow]] = {}
            if serving:
                for art in session.scalars(  # oldest first (see _serving_id)
                    select(ArtifactRow)
                    .where(ArtifactRow.sha256.in_(serving))
                    .order_by(ArtifactRow.created_unix_ms, ArtifactRow.id)
                ):
                    by_sha.setdefault(art.sha256, []).append(art)
            views = []
            for device in devices:
                mine = [
                    (a, art)
                    for a, art in assignments
                    if (a.target_kind == TargetKind.CLASS.value and a.target == device.device_class)
                    or (a.target_kind == TargetKind.DEVICE.value and a.target == device.device_id)
                ]
                views.append(
                    DeviceView(
                        device=_device(device),
                        online=(device.watch_lease_until_ms or 0) > now,
                        models=_model_states(
                            device, _choose(mine), reported.get(device.device_id, []), by_sha
                        ),
                    )
                )
            return views

        return self._read(work)

    def count_devices(self) -> list[ClassCount]:
        def work(session: Session) -> list[ClassCount]:
            online = case((DeviceRow.watch_lease_until_ms > self._now(), 1), else_=0)
            rows = session.execute(
                select(DeviceRow.device_class, func.count(), func.sum(online))
                .group_by(DeviceRow.device_class)
                .order_by(DeviceRow.device_class)
                .limit(MAX_LIST)
            ).all()
            return [ClassCount(cls, int(n), int(up or 0)) for cls, n, up in rows]

        return self._read(work)

    # ---------------------------------------------------------------- telemetry aggregates
    def telemetry_totals(self, reporting_since_unix_ms: int) -> list[TelemetryTotals]:
        def work(session: Session) -> list[TelemetryTotals]:
            # O(artifacts) rows, not O(windows): the rollup the ingest transaction keeps,
            # and one row per (device, model, artifact) for "devices reporting".
            r, p = TelemetryRollupRow, TelemetryReportingRow
            sums = list(
                session.scalars(
                    select(r)
                    .order_by(r.device_class, r.model_name, r.artifact_sha256, r.energy_source)
                    .limit(MAX_LIST)
                )
            )
            group = (DeviceRow.device_class, p.model_name, p.artifact_sha256)
            reporting = session.execute(
                select(*group, func.count())
                .join(DeviceRow, DeviceRow.device_id == p.device_id)
                .where(p.received_unix_ms >= reporting_since_unix_ms)
                .group_by(*group)
                .limit(MAX_LIST)
            ).all()
            keys = {(row.device_class, row.model_name, row.artifact_sha256) for row in sums}
            ids = _artifact_ids(session, keys)
            totals: dict[tuple[str, str, str], _Totals] = {}
            for row in sums:
                key = (
                    row.device_class,
                    row.model_name,
                    ids[(row.device_class, row.model_name, row.artifact_sha256)],
                )
                summed = _WindowSums(
                    windows=int(row.windows),
                    count=int(row.count),
                    errors=int(row.errors),
                    cpu_seconds=float(row.cpu_seconds),
                    joules=float(row.joules),
                    buckets=[int(b) for b in row.latency_bucket_counts],
                )
                totals.setdefault(key, _Totals()).add(summed, row.energy_source)
            for cls, model, sha, devices in reporting:
                key = (cls, model, ids.get((cls, model, sha), _short(sha)))
                totals.setdefault(key, _Totals()).devices += int(devices)
            return [
                TelemetryTotals(
                    device_class=cls,
                    model_name=model,
                    artifact_id=artifact_id,
                    count=t.sums.count,
                    errors=t.sums.errors,
                    cpu_seconds=t.sums.cpu_seconds,
                    latency_bucket_counts=tuple(t.sums.buckets),
                    joules_by_source=tuple(sorted(t.joules.items())),
                    windows=t.sums.windows,
                    devices_reporting=t.devices,
                )
                for (cls, model, artifact_id), t in sorted(totals.items())
            ]

        return self._read(work)

    def telemetry_summary(
        self, device_class: str, model_name: str, since_unix_ms: int
    ) -> list[TelemetrySummary]:
        def work(session: Session) -> list[TelemetrySummary]:
            w = TelemetryWindowRow
            rows = session.execute(
                select(w.artifact_sha256, func.count(func.distinct(w.device_id)), *_window_sums())
                .join(DeviceRow, DeviceRow.device_id == w.device_id)
                .where(
                    DeviceRow.device_class == device_class,
                    w.model_name == model_name,
                    w.end_unix_ms >= since_unix_ms,
                )
                .group_by(w.artifact_sha256)
                .order_by(w.artifact_sha256)
                .limit(MAX_LIST)
            ).all()
            ids = _artifact_ids(session, {(device_class, model_name, r[0]) for r in rows})
            summaries = []
            for row in rows:
                sha, devices, sums = row[0], int(row[1]), _WindowSums.of(row[2:])
                summaries.append(
                    TelemetrySummary(
                        artifact_id=ids[(device_class, model_name, sha)],
                        artifact_sha256=sha,
                        count=sums.count,
                        errors=sums.errors,
                        latency_bucket_counts=tuple(sums.buckets),
                        p95_seconds=histogram.percentile(sums.buckets, 0.95),
                        joules=sums.joules,
                        joules_per_inference=sums.joules / sums.count if sums.count else None,
                        windows=sums.windows,
                        devices=devices,
                    )
                )
            return sorted(summaries, key=lambda x: x.artifact_id)

        return self._read(work)

    def telemetry_series(
        self, since_unix_ms: int, until_unix_ms: int, bucket_ms: int
    ) -> SeriesSelection:
        if bucket_ms <= 0 or until_unix_ms <= since_unix_ms:
            raise ValueError(
                f"telemetry_series needs since < until and bucket_ms > 0, got since="
                f"{since_unix_ms} until={until_unix_ms} bucket_ms={bucket_ms}"
            )
        buckets = -(-(until_unix_ms - since_unix_ms) // bucket_ms)
        if buckets > MAX_SERIES_BUCKETS:
            raise ValueError(f"telemetry_series: {buckets} buckets, at most {MAX_SERIES_BUCKETS}")

        def work(session: Session) -> SeriesSelection:
            w = TelemetryWindowRow
            group = (DeviceRow.device_class, w.model_name, w.artifact_sha256)
            in_range = (w.end_unix_ms >= since_unix_ms, w.end_unix_ms < until_unix_ms)
            # The busiest series first: a fleet with more artifacts than a chart can
            # show loses its quietest lines, and the answer says how many.
            busiest = session.execute(
                select(*group)
                .join(DeviceRow, DeviceRow.device_id == w.device_id)
                .where(*in_range)
                .group_by(*group)
                .order_by(func.sum(w.count).desc(), *group)
                .limit(MAX_LIST)
            ).all()
            chosen = busiest[:MAX_SERIES]
            if not chosen:
                return SeriesSelection([], 0)
            # Inlined integers (int() makes them safe), so PostgreSQL sees the same
            # expression in SELECT and GROUP BY rather than two different parameters.
            since = literal_column(str(int(since_unix_ms)), BigInteger)
            step = literal_column(str(int(bucket_ms)), BigInteger)
            bucket = (w.end_unix_ms - since) // step
            rows = session.execute(
                select(*group, bucket, *_window_sums())
                .join(DeviceRow, DeviceRow.device_id == w.device_id)
                .where(
                    *in_range,
                    or_(
                        *(
                            and_(
                                DeviceRow.device_class == c,
                                w.model_name == m,
                                w.artifact_sha256 == a,
                            )
                            for c, m, a in chosen
                        )
                    ),
                )
                .group_by(*group, bucket)
                .order_by(*group, bucket)
            ).all()  # at most MAX_SERIES x MAX_SERIES_BUCKETS rows
            ids = _artifact_ids(session, {(r[0], r[1], r[2]) for r in rows})
            merged: dict[tuple[str, str, str], dict[int, _Totals]] = {}
            for row in rows:
                key = (row[0], row[1], ids[(row[0], row[1], row[2])])
                at = merged.setdefault(key, {}).setdefault(int(row[3]), _Totals())
                at.add(_WindowSums.of(row[4:]), "")
            series = [
                TelemetrySeries(
                    device_class=cls,
                    model_name=model,
                    artifact_id=artifact_id,
                    points=tuple(
                        TelemetryPoint(
                            start_unix_ms=since_unix_ms + index * bucket_ms,
                            count=t.sums.count,
                            errors=t.sums.errors,
                            p95_seconds=histogram.percentile(t.sums.buckets, 0.95),
                            joules_per_inference=(
                                t.sums.joules / t.sums.count if t.sums.count else None
                            ),
                        )
                        for index, t in sorted(by_bucket.items())
                    ),
                )
                for (cls, model, artifact_id), by_bucket in sorted(merged.items())
            ]
            return SeriesSelection(series, len(busiest) - len(chosen))

        return self._read(work)

    # ---------------------------------------------------------------- events
    def record_fetch(self, event: NewEvent | None, outcome: FetchOutcome) -> None:
        def work(session: Session) -> None:
            if event is not None:
                self._event(session, event)
            device_class = session.scalar(
                select(DeviceRow.device_class).where(DeviceRow.device_id == outcome.device_id)
            )
            if device_class is None:  # a device is registered before it may fetch
                return
            completed = 1 if outcome.completed else 0
            fetched = session.get(ArtifactRow, outcome.artifact_id)
            labelled = fetched and _labelled_artifact(
                session, device_class, outcome.model_name, fetched.sha256
            )
            key = {
                "device_class": device_class,
                "model_name": outcome.model_name,
                "artifact_id": labelled.id if labelled else outcome.artifact_id,
                "encoding": outcome.encoding.value,
            }
            amounts = {
                "calls": 1,
                "completed": completed,
                "bytes_sent": outcome.bytes_sent,
                "full_bytes": outcome.artifact_bytes * completed,
            }
            _add_to_sums(session, DownloadRollupRow, key, amounts)

        self._retry(work)

    def applied_update_totals(self) -> list[AppliedUpdateTotals]:
        return self._read(lambda s: _update_sums(s, AppliedUpdateRow, AppliedUpdateTotals))

    def download_totals(self) -> list[DownloadTotals]:
        return self._read(lambda s: _update_sums(s, DownloadRollupRow, DownloadTotals))

    def job_warnings(self, job: CompressionJobRecord) -> list[str]:
        query = (
            select(EventRow)
            .where(
                EventRow.kind == JOB_WARNING_EVENT,
                EventRow.subject == f"{job.model_name}/{job.device_class}",
            )
            .order_by(EventRow.id)
        )
        return self._read(
            lambda s: [
                str(e.detail.get("text", ""))
                for e in s.scalars(query)
                if isinstance(e.detail, dict) and e.detail.get("job_id") == job.id
            ]
        )

    def record_blob_repair(self, sha256: str, event: NewEvent) -> None:
        def work(session: Session) -> None:
            self._event(session, event)
            row = session.get(BlobRepairRow, sha256)
            if row is None:  # two replicas' first repairs race: _retry runs the loser again
                session.add(BlobRepairRow(sha256=sha256, repaired_unix_ms=self._now()))
            else:
                row.repaired_unix_ms = max(row.repaired_unix_ms + 1, self._now())

        self._retry(work)

    def record_telemetry_refusal(self, refusal: TelemetryRefusal, event: NewEvent | None) -> None:
        def work(session: Session) -> None:
            device_class = session.scalar(
                select(DeviceRow.device_class).where(DeviceRow.device_id == refusal.device_id)
            )
            if device_class is None:
                return
            if event is not None:
                self._event(session, event)
            key = {"device_class": device_class, "reason": refusal.reason}
            _add_to_sums(session, TelemetryRefusalRow, key, {"calls": 1}, last_unix_ms=self._now())

        self._retry(work)

    def refusal_totals(self) -> list[RefusalTotals]:
        r = TelemetryRefusalRow
        query = select(r.device_class, r.reason, r.calls).order_by(r.device_class, r.reason)
        return self._read(
            lambda s: [RefusalTotals(c, reason, n) for c, reason, n in s.execute(query)]
        )

    def add_event(self, new: NewEvent) -> EventRecord:
        with self._sessions.begin() as session:
            return _event_record(self._event(session, new))

    def list_events(
        self, after_id: int, limit: int, kind_prefix: str = "", *, newest: bool = False
    ) -> list[EventRecord]:
        query = select(EventRow).where(EventRow.id > after_id)
        if kind_prefix:
            query = query.where(EventRow.kind.startswith(kind_prefix, autoescape=True))
        order = EventRow.id.desc() if newest else EventRow.id
        query = query.order_by(order).limit(min(limit, MAX_LIST))
        found = self._read(lambda s: [_event_record(r) for r in s.scalars(query)])
        return found[::-1] if newest else found

    # ---------------------------------------------------------------- compression jobs
    def create_compression_job(self, new: NewCompressionJob) -> CompressionJobRecord:
        try:
            with self._sessions.begin() as session:
                row = CompressionJobRow(
                    model_name=new.model_name,
                    model_version=new.model_version,
                    workload=new.workload,
                    device_class=new.device_class,
                    state=JobState.QUEUED.value,
                    error="",
                    owner=new.owner,
                    created_unix_ms=self._now(),
                    trials_done=0,
                    artifact_id="",
                    recipe="",
                    verdicts=[],
                )
                session.add(row)
                session.flush()
                session.add(
                    CompressionJobLeaseRow(job_id=row.id, lease_until_ms=self._now() + JOB_LEASE_MS)
                )
                if new.inputs is not None:
                    session.add(
                        CompressionInputRow(
                            job_id=row.id,
                            calibration_sha256=new.inputs.calibration_sha256,
                            device_class_yaml=new.inputs.device_class_yaml,
                            max_size_ratio=new.inputs.max_size_ratio,
                        )
                    )
                self._event(session, _job_event(row, "queued", f"queued for {_source(row)}"))
                return _job(row)
        except IntegrityError as exc:
            active = self.active_compression_job(new.model_name, new.device_class)
            if active is None:  # it ended between our insert and this read: a rare race
                raise FleetError(
                    ErrorCode.UNAVAILABLE,
                    f"another compression job for {new.model_name}/{new.device_class} was "
                    "being started at the same moment; retry",
                ) from exc
            raise FleetError(
                ErrorCode.ALREADY_EXISTS,
                f"compression job {active.id} for {new.model_name}/{new.device_class} is "
                f"already {active.state.value}; follow it (`homefleet jobs watch {active.id}`) "
                f"or cancel it (`homefleet jobs cancel {active.id}`), then start again",
            ) from exc

    def compression_inputs(self, job_id: int) -> CompressionInputs | None:
        def work(session: Session) -> CompressionInputs | None:
            row = session.get(CompressionInputRow, job_id)
            if row is None:
                return None
            return CompressionInputs(
                row.calibration_sha256, row.device_class_yaml, row.max_size_ratio
            )

        return self._read(work)

    def compression_job_of_artifact(self, artifact_id: str) -> CompressionJobRecord | None:
        query = (
            select(CompressionJobRow)
            .where(CompressionJobRow.artifact_id == artifact_id)
            .order_by(CompressionJobRow.id.desc())
            .limit(1)
        )
        return self._read(lambda s: next((_job(r) for r in s.scalars(query)), None))

    def active_compression_job(
        self, model_name: str, device_class: str
    ) -> CompressionJobRecord | None:
        query = select(CompressionJobRow).where(
            CompressionJobRow.model_name == model_name,
            CompressionJobRow.device_class == device_class,
            CompressionJobRow.state.in_(_ACTIVE),
        )
        return self._read(lambda s: _job_or_none(s.scalars(query).first()))

    def start_compression_job(self, job_id: int) -> CompressionJobRecord | None:
        with self._sessions.begin() as session:
            row = session.get(CompressionJobRow, job_id)
            if row is None or row.state != JobState.QUEUED.value:
                return None
            row.state = JobState.RUNNING.value
            row.started_unix_ms = self._now()
            self._event(session, _job_event(row, "started", "started"))
            return _job(row)

    def add_compression_trial(self, job_id: int, trial: TrialRecord) -> None:
        with self._sessions.begin() as session:
            row = session.get(CompressionJobRow, job_id)
            if row is None or row.state not in _ACTIVE:
                return
            if session.get(CompressionTrialRow, (job_id, trial.index)) is not None:
                return
            session.add(
                CompressionTrialRow(
                    job_id=job_id,
                    trial_index=trial.index,
                    summary=trial.summary,
                    recipe=trial.recipe,
                    met=trial.met,
                    artifact_bytes=trial.artifact_bytes,
                    quality_metric=trial.quality_metric,
                    quality_value=trial.quality_value,
                    p95_ms=trial.p95_ms,
                    energy_mj=trial.energy_mj,
                    seconds=trial.seconds,
                    error=trial.error,
                )
            )
            row.trials_done += 1

    def finish_compression_job(self, job_id: int, result: JobResult) -> CompressionJobRecord | None:
        if result.state.active:
            raise ValueError(f"a job cannot finish in state {result.state.value}")
        with self._sessions.begin() as session:
            row = session.get(CompressionJobRow, job_id)
            if row is None or row.state not in _ACTIVE:
                return None
            row.state = result.state.value
            row.error = result.error
            row.finished_unix_ms = self._now()
            row.artifact_id = result.artifact_id
            row.recipe = result.recipe
            row.verdicts = [dataclasses.asdict(v) for v in result.verdicts]
            if result.model_version is not None:
                row.model_version = result.model_version
            self._event(session, _finish_event(row))
            return _job(row, _trials(session, job_id))

    def get_compression_job(self, job_id: int) -> CompressionJobRecord | None:
        def work(session: Session) -> CompressionJobRecord | None:
            row = session.get(CompressionJobRow, job_id)
            return _job(row, _trials(session, job_id)) if row is not None else None

        return self._read(work)

    def list_compression_jobs(
        self, model_name: str | None, device_class: str | None, limit: int
    ) -> list[CompressionJobRecord]:
        query = select(CompressionJobRow)
        if model_name:
            query = query.where(CompressionJobRow.model_name == model_name)
        if device_class:
            query = query.where(CompressionJobRow.device_class == device_class)
        query = query.order_by(CompressionJobRow.id.desc()).limit(min(limit, MAX_LIST))
        return self._read(lambda s: [_job(r) for r in s.scalars(query)])

    def renew_compression_leases(self, owner: str, until_unix_ms: int) -> int:
        with self._sessions.begin() as session:
            ids = select(CompressionJobRow.id).where(
                CompressionJobRow.owner == owner, CompressionJobRow.state.in_(_ACTIVE)
            )
            result = session.execute(
                update(CompressionJobLeaseRow)
                .where(CompressionJobLeaseRow.job_id.in_(ids))
                .values(lease_until_ms=until_unix_ms)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def fail_expired_compression_jobs(self, now_unix_ms: int, reason: str) -> list[int]:
        with self._sessions.begin() as session:
            lease = CompressionJobLeaseRow
            rows = list(
                session.scalars(
                    select(CompressionJobRow)
                    .outerjoin(lease, lease.job_id == CompressionJobRow.id)
                    .where(
                        CompressionJobRow.state.in_(_ACTIVE),
                        or_(
                            lease.lease_until_ms < now_unix_ms,
                            # a job from before leases: its creation time stands in
                            and_(
                                lease.job_id.is_(None),
                                CompressionJobRow.created_unix_ms < now_unix_ms - JOB_LEASE_MS,
                            ),
                        ),
                    )
                    # lock the jobs only: PostgreSQL refuses FOR UPDATE on an outer join's
                    # nullable side (the lease of a job from before leases)
                    .with_for_update(of=CompressionJobRow)
                )
            )
            for row in rows:
                row.state = JobState.FAILED.value
                row.error = reason
                row.finished_unix_ms = self._now()
                self._event(session, _finish_event(row))
            return [row.id for row in rows]

    def active_compression_job_owners(self) -> dict[int, str]:
        query = select(CompressionJobRow.id, CompressionJobRow.owner).where(
            CompressionJobRow.state.in_(_ACTIVE)
        )
        return self._read(lambda s: {int(i): str(o) for i, o in s.execute(query)})

    def fail_active_compression_jobs(self, owner: str, reason: str) -> list[int]:
        with self._sessions.begin() as session:
            rows = list(
                session.scalars(
                    select(CompressionJobRow).where(
                        CompressionJobRow.owner == owner, CompressionJobRow.state.in_(_ACTIVE)
                    )
                )
            )
            for row in rows:
                row.state = JobState.FAILED.value
                row.error = reason
                row.finished_unix_ms = self._now()
                self._event(session, _finish_event(row))
            return [row.id for row in rows]


# -------------------------------------------------------------------- helpers

SHORT_SHA = 12


def _window_sums() -> list[Any]:
    """SQL sums over a group of windows, bucket by bucket: the merge happens in the
    database, so only one row per group comes back however many windows are stored."""
    w = TelemetryWindowRow
    buckets = w.latency_bucket_counts
    return [
        func.count(),
        func.coalesce(func.sum(w.count), 0),
        func.coalesce(func.sum(w.errors), 0),
        func.coalesce(func.sum(w.cpu_seconds), 0.0),
        func.coalesce(func.sum(w.joules), 0.0),
        *(
            func.coalesce(func.sum(cast(buckets[i].as_string(), BigInteger)), 0)
            for i in range(histogram.BUCKET_COUNT)
        ),
    ]


@dataclasses.dataclass
class _WindowSums:
    """One row of ``_window_sums`` as numbers (PostgreSQL sums integers as Decimal)."""

    windows: int = 0
    count: int = 0
    errors: int = 0
    cpu_seconds: float = 0.0
    joules: float = 0.0
    buckets: list[int] = dataclasses.field(default_factory=histogram.empty)

    @classmethod
    def of(cls, values: Sequence[Any]) -> _WindowSums:
        return cls(
            windows=int(values[0]),
            count=int(values[1]),
            errors=int(values[2]),
            cpu_seconds=float(values[3]),
            joules=float(values[4]),
            buckets=[int(v) for v in values[5:]],
        )


@dataclasses.dataclass
class _Totals:
    sums: _WindowSums = dataclasses.field(default_factory=_WindowSums)
    joules: dict[str, float] = dataclasses.field(default_factory=dict)
    devices: int = 0

    def add(self, more: _WindowSums, source: str) -> None:
        s = self.sums
        s.windows += more.windows
        s.count += more.count
        s.errors += more.errors
        s.cpu_seconds += more.cpu_seconds
        s.joules += more.joules
        s.buckets = histogram.merge(s.buckets, more.buckets)
        self.joules[source] = self.joules.get(source, 0.0) + more.joules


def _short(sha256: str) -> str:
    return sha256[:SHORT_SHA] or "unknown"


def _artifact_ids(
    session: Session, keys: set[tuple[str, str, str]]
) -> dict[tuple[str, str, str], str]:
    """(class, model, sha256) -> the artifact id to show: the class's own artifact with
    those bytes, else one of the model's, else the short sha256 (bytes we never built).
    Of several (re-releases of the same bytes) the first: a label that never changes, so
    a Prometheus series and a dashboard line keep their name across a rollback."""
    shas = {sha for _, _, sha in keys if sha}
    by_sha: dict[str, list[ArtifactRow]] = {}
    if shas:
        for art in session.scalars(
            select(ArtifactRow)
            .where(ArtifactRow.sha256.in_(shas))
            .order_by(ArtifactRow.created_unix_ms, ArtifactRow.id)
        ):
            by_sha.setdefault(art.sha256, []).append(art)
    ids = {}
    for cls, model, sha in keys:
        candidates = [a for a in by_sha.get(sha, []) if a.model_name == model]
        own = [a for a in candidates if a.device_class == cls]
        chosen = own or candidates
        ids[(cls, model, sha)] = chosen[0].id if chosen else _short(sha)
    return ids


_ACTIVE = [s.value for s in JobState if s.active]


def _source(row: CompressionJobRow) -> str:
    if row.workload:
        return f"workload {row.workload}"
    return f"model {row.model_name} v{row.model_version}"


def _job_event(row: CompressionJobRow, what: str, message: str) -> NewEvent:
    return NewEvent(
        f"compression.{what}",
        f"{row.model_name}/{row.device_class}",
        f"compression job {row.id} ({row.model_name}/{row.device_class}): {message}",
        {
            "job_id": row.id,
            "model_name": row.model_name,
            "model_version": row.model_version,
            "workload": row.workload,
            "device_class": row.device_class,
            "state": row.state,
            "trials_done": row.trials_done,
            "artifact_id": row.artifact_id,
            "error": row.error,
        },
    )


def _finish_event(row: CompressionJobRow) -> NewEvent:
    state = JobState(row.state)
    if state is JobState.SUCCEEDED:
        return _job_event(row, "finished", f"every budget holds: {row.artifact_id}")
    if state is JobState.NOT_MET:
        return _job_event(
            row, "finished", f"no recipe met every budget; the best is {row.artifact_id}"
        )
    if state is JobState.CANCELLED:
        return _job_event(row, "cancelled", "cancelled")
    return _job_event(row, "failed", f"failed: {row.error}")


def _trials(session: Session, job_id: int) -> tuple[TrialRecord, ...]:
    rows = session.scalars(
        select(CompressionTrialRow)
        .where(CompressionTrialRow.job_id == job_id)
        .order_by(CompressionTrialRow.trial_index)
    )
    return tuple(
        TrialRecord(
            index=r.trial_index,
            summary=r.summary,
            recipe=r.recipe,
            met=r.met,
            artifact_bytes=r.artifact_bytes,
            quality_metric=r.quality_metric,
            quality_value=r.quality_value,
            p95_ms=r.p95_ms,
            energy_mj=r.energy_mj,
            seconds=r.seconds,
            error=r.error,
        )
        for r in rows
    )


def _job(row: CompressionJobRow, trials: tuple[TrialRecord, ...] = ()) -> CompressionJobRecord:
    return CompressionJobRecord(
        id=row.id,
        model_name=row.model_name,
        model_version=row.model_version,
        workload=row.workload,
        device_class=row.device_class,
        state=JobState(row.state),
        error=row.error,
        owner=row.owner,
        created_unix_ms=row.created_unix_ms,
        started_unix_ms=row.started_unix_ms,
        finished_unix_ms=row.finished_unix_ms,
        trials_done=row.trials_done,
        artifact_id=row.artifact_id,
        recipe=row.recipe,
        verdicts=tuple(BudgetVerdictRecord(**v) for v in row.verdicts),
        trials=trials,
    )


def _job_or_none(row: CompressionJobRow | None) -> CompressionJobRecord | None:
    return _job(row) if row is not None else None


def _latest_model(session: Session, name: str) -> ModelRow | None:
    return session.scalars(
        select(ModelRow).where(ModelRow.name == name).order_by(ModelRow.version.desc()).limit(1)
    ).first()


IN_CHUNK = 500  # ids per IN (...) list: well under SQLite's bound-parameter limit


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    return (items[i : i + IN_CHUNK] for i in range(0, len(items), IN_CHUNK))


_WINDOW_COLUMNS = (
    "device_id", "seq", "model_name", "artifact_sha256", "start_unix_ms", "end_unix_ms",
    "count", "errors", "latency_bucket_counts", "cpu_seconds", "joules", "energy_source",
    "peak_memory_bytes", "received_unix_ms",
)  # fmt: skip
_PLACEHOLDERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


ROWS_PER_INSERT = 500  # 7,000 parameters: under SQLite's and PostgreSQL's limits


def _driver_mark(connection: Connection) -> str:
    """The driver's parameter mark, for the ingest SQL written as text."""
    dialect = connection.dialect
    mark = _PLACEHOLDERS.get(str(dialect.paramstyle))
    if dialect.name not in ("sqlite", "postgresql") or mark is None:
        raise NotImplementedError(
            f"telemetry ingest supports SQLite and PostgreSQL drivers with ?/%s parameters, "
            f"not {dialect.name} with {dialect.paramstyle}"
        )
    return mark


def _insert_new_windows(session: Session, rows: Sequence[tuple[Any, ...]]) -> set[tuple[str, int]]:
    """Multi-row INSERT ... ON CONFLICT (device_id, seq) DO NOTHING RETURNING, rows in
    ``_WINDOW_COLUMNS`` order handed straight to the driver (on the ingest hot path
    SQLAlchemy's per-row parameter processing cost more than the database's own work).
    Returns the (device_id, seq) pairs actually inserted: what the rollup may count."""
    connection = session.connection()
    group = "(" + ", ".join([_driver_mark(connection)] * len(_WINDOW_COLUMNS)) + ")"
    inserted: set[tuple[str, int]] = set()
    for i in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[i : i + ROWS_PER_INSERT]
        result = connection.exec_driver_sql(
            f"INSERT INTO {TelemetryWindowRow.__tablename__} ({', '.join(_WINDOW_COLUMNS)}) "
            f"VALUES {', '.join([group] * len(chunk))} "
            "ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq",
            tuple(value for row in chunk for value in row),
        )
        inserted.update((str(device_id), int(seq)) for device_id, seq in result)
    return inserted


# A device's windows of one model may overlap by this much: its clock set back by as
# much as the controller lets it run ahead (agents.MAX_CLOCK_AHEAD_MS), or the two
# windows an agent closes together when a model's artifact changed mid-window.
MAX_WINDOW_OVERLAP_MS = 5 * 60 * 1000


@dataclasses.dataclass(frozen=True)
class _StoredState:
    """What ingest checks new windows against, read in one statement per chunk."""

    highest_seq: dict[str, int]  # device -> highest seq stored (absent: none)
    max_end: dict[tuple[str, str], int]  # (device, model) -> latest end of a stored window


def _stored_state(
    session: Session, devices: Sequence[str], pairs: Iterable[tuple[str, str]]
) -> _StoredState:
    """Per device its highest stored seq (the acknowledgement), per (device, model) the
    latest end of any window stored, whatever its seq (``telemetry_reporting``, kept at
    ingest by ``_mark_reporting``): index lookups in the (device_id, seq) and reporting
    keys, so the cost does not grow with a device's history. ``""`` stands for "no model"
    (a device whose call sends no windows still needs its highest seq).

    Handed to the driver as text, as the insert is: SQLAlchemy compiles a VALUES list
    afresh for every call, which cost more than the whole query."""
    keys = sorted(set(pairs) | {(d, "") for d in devices})
    connection = session.connection()
    mark = _driver_mark(connection)
    windows, reporting = TelemetryWindowRow.__tablename__, TelemetryReportingRow.__tablename__
    highest: dict[str, int] = {}
    max_end: dict[tuple[str, str], int] = {}
    for i in range(0, len(keys), IN_CHUNK):
        chunk = keys[i : i + IN_CHUNK]
        rows = ", ".join([f"({mark}, {mark})"] * len(chunk))
        result = connection.exec_driver_sql(
            # WITH k(...) AS (VALUES ...): SQLite has no column list on a VALUES alias
            f"WITH k (device_id, model_name) AS (VALUES {rows}) "
            "SELECT k.device_id, k.model_name, "
            f"(SELECT max(w.seq) FROM {windows} w WHERE w.device_id = k.device_id), "
            f"(SELECT max(r.max_end_unix_ms) FROM {reporting} r "
            "WHERE r.device_id = k.device_id AND r.model_name = k.model_name) "
            "FROM k",
            tuple(value for key in chunk for value in key),
        )
        for device_id, model_name, seq, end_ms in result:
            if seq is not None:
                highest[str(device_id)] = int(seq)
            if end_ms:  # None: never sent the model; 0: a row from before the column
                max_end[(str(device_id), str(model_name))] = int(end_ms)
    return _StoredState(highest, max_end)


def _labelled_artifact(
    session: Session, device_class: str, model_name: str, sha256: str
) -> ArtifactRow | None:
    """The artifact sums of these bytes are labelled with, as `_artifact_ids` labels
    telemetry: the class's first artifact with them, else the model's first. Downloads
    and applied updates of a re-release thus count where its telemetry does."""
    candidates = list(
        session.scalars(
            select(ArtifactRow)
            .where(ArtifactRow.sha256 == sha256, ArtifactRow.model_name == model_name)
            .order_by(ArtifactRow.created_unix_ms, ArtifactRow.id)
        )
    )
    own = [a for a in candidates if a.device_class == device_class]
    chosen = own or candidates
    return chosen[0] if chosen else None


def _add_applied_update(session: Session, device_class: str, status: StatusUpdate) -> None:
    """Add an update a device applied (its first ACTIVE report of those bytes after a
    download) to the sums per (class, model, artifact, encoding): what it cost the device
    on the wire, as the device counted it (a discarded delta's bytes included), against
    the artifact's size. Bytes this controller did not build are not counted."""
    artifact = _labelled_artifact(session, device_class, status.model_name, status.artifact_sha256)
    if artifact is None:
        return
    encoding = status.encoding.value if status.encoding else Encoding.FULL.value
    key = {
        "device_class": device_class,
        "model_name": status.model_name,
        "artifact_id": artifact.id,
        "encoding": encoding,
    }
    amounts = {
        "updates": 1,
        "bytes_received": status.bytes_received,
        "full_bytes": artifact.size_bytes,
    }
    _add_to_sums(session, AppliedUpdateRow, key, amounts)


_UpdateSums = TypeVar("_UpdateSums", AppliedUpdateTotals, DownloadTotals)


def _update_sums(
    session: Session, table: type[AppliedUpdateRow | DownloadRollupRow], record: type[_UpdateSums]
) -> list[_UpdateSums]:
    """Every row of an update-sums table, in key order, as ``record`` (its fields are the
    table's columns of the same names; the encoding becomes an Encoding)."""
    rows = session.scalars(
        select(table).order_by(
            table.device_class, table.model_name, table.artifact_id, table.encoding
        )
    )
    names = [f.name for f in dataclasses.fields(record)]
    found = []
    for row in rows:
        values: dict[str, Any] = {n: getattr(row, n) for n in names}
        values["encoding"] = Encoding(values["encoding"])
        found.append(record(**values))
    return found


def _add_to_sums(
    session: Session,
    table: type[Base],
    key: Mapping[str, object],
    amounts: Mapping[str, int],
    **latest: object,
) -> None:
    """Add ``amounts`` to the running sums of ``table``'s row whose columns equal ``key``
    (and set ``latest``), creating the row with them when the key is new.

    An increment in SQL, not a read-modify-write: two replicas adding to one key never
    lose a sum. Two first adds of one key race on its unique constraint; the loser's
    transaction fails with IntegrityError and ``SqlStore._retry`` runs it again."""
    where = and_(*(getattr(table, column) == value for column, value in key.items()))
    sums = {column: getattr(table, column) + n for column, n in amounts.items()}
    added = session.execute(update(table).where(where).values({**sums, **latest}))
    if getattr(added, "rowcount", 0) == 0:
        session.add(table(**key, **amounts, **latest))


class _KnownArtifacts:
    """Models and (model, artifact digest) pairs known to exist. Never stale: models and
    artifacts are never deleted, so ingest asks the database only about names it has not
    seen yet. Bounded: past MAX_KNOWN entries it starts afresh."""

    MAX_KNOWN = 100_000

    def __init__(self) -> None:
        self.models: set[str] = set()
        self.artifacts: set[tuple[str, str]] = set()

    def learn(self, models: Iterable[str], artifacts: Iterable[tuple[str, str]]) -> None:
        if len(self.models) + len(self.artifacts) > self.MAX_KNOWN:
            self.models, self.artifacts = set(), set()
        self.models.update(models)
        self.artifacts.update(artifacts)


def _with_known_artifacts(
    session: Session,
    windows: Sequence[tuple[str, TelemetryWindow]],
    cache: _KnownArtifacts,
) -> list[tuple[str, TelemetryWindow]]:
    """Refuse windows of a model this controller never registered; a window naming bytes
    that are none of that model's artifacts is kept with no artifact (``""``, shown as
    "unknown").

    Each (class, model, artifact) names a rollup row and a Prometheus series, and each
    (device, model, artifact) a reporting row: without this, one device sending made-up
    names or digests would add rows and series without end. An honest agent can hold
    bytes this controller never built — it was pointed at a fresh or restored
    controller — and its windows still count for the model once the model is added; a
    model the controller does not know has no budget or series to count them under."""
    models = {w.model_name for _, w in windows} - cache.models
    digests = {
        (w.model_name, w.artifact_sha256) for _, w in windows if w.artifact_sha256
    } - cache.artifacts
    found_models: set[str] = set()
    found: set[tuple[str, str]] = set()
    for chunk in _chunks(sorted(models)):
        found_models.update(session.scalars(select(ModelRow.name).where(ModelRow.name.in_(chunk))))
    for chunk in _chunks(sorted({sha for _, sha in digests})):
        found.update(
            (model, sha)
            for model, sha in session.execute(
                select(ArtifactRow.model_name, ArtifactRow.sha256)
                .where(ArtifactRow.sha256.in_(chunk))
                .distinct()
            )
        )
    cache.learn(found_models, found)  # after which the cache holds every known name here
    known_models, known = cache.models, cache.artifacts
    kept = []
    for device_id, w in windows:
        if w.model_name not in known_models:
            raise invalid(
                f"device {device_id}: window seq {w.seq} is of model {w.model_name!r}, which "
                "is not registered on this controller: a device reports telemetry of the "
                "models it was assigned (an agent moved to a new controller is heard once "
                "its models are added there)",
                reason=REFUSED_UNKNOWN_MODEL,
            )
        if w.artifact_sha256 and (w.model_name, w.artifact_sha256) not in known:
            w = dataclasses.replace(w, artifact_sha256="")
        kept.append((device_id, w))
    return kept


def _check_continuity(stored: Sequence[tuple[str, TelemetryWindow]], before: _StoredState) -> None:
    """Refuse new windows a device could only send to be counted twice: a window of a
    model that starts more than MAX_WINDOW_OVERLAP_MS before the latest end of the
    device's windows of that model, stored or earlier (by seq) in this batch. Without it,
    overlapping windows, each within the per-window rate bound, could claim any count and
    overflow the class rollup.

    Held against the latest end, not the end of the highest-seq window: a new window with
    a seq below the device's highest (a gap in its numbering) that re-covers old time is
    refused too. The seq itself is not checked: an agent that lost its state directory
    numbers afresh under the same device id, and its windows (current times) are stored
    whatever their numbers; those whose (device, seq) is already stored are skipped by the
    insert, and the acknowledgement's highest seq tells the agent to number above it."""
    max_end = dict(before.max_end)
    previous: dict[tuple[str, str], int] = {}  # seq of the latest-ending window in this batch
    for device_id, w in sorted(stored, key=lambda dw: (dw[0], dw[1].seq)):
        key = (device_id, w.model_name)
        end = max_end.get(key)
        if end is not None and w.start_unix_ms < end - MAX_WINDOW_OVERLAP_MS:
            before_seq = previous.get(key)
            which = (
                "the latest end of its stored windows"
                if before_seq is None
                else f"the end of its window seq {before_seq}"
            )
            raise invalid(
                f"device {device_id}: window seq {w.seq} of model {w.model_name} starts at "
                f"{w.start_unix_ms}, {end - w.start_unix_ms} ms before {which} of that model "
                f"({end}); a device's windows of one model may overlap by at most "
                f"{MAX_WINDOW_OVERLAP_MS // 60_000} minutes (clock adjustments), so one time "
                "is never counted twice",
                reason=REFUSED_OVERLAP,
            )
        if end is None or w.end_unix_ms > end:
            max_end[key] = w.end_unix_ms
            previous[key] = w.seq


def _window_record(row: TelemetryWindowRow) -> TelemetryWindow:
    return TelemetryWindow(
        seq=row.seq,
        model_name=row.model_name,
        artifact_sha256=row.artifact_sha256,
        start_unix_ms=row.start_unix_ms,
        end_unix_ms=row.end_unix_ms,
        count=row.count,
        errors=row.errors,
        latency_bucket_counts=tuple(int(c) for c in row.latency_bucket_counts),
        cpu_seconds=row.cpu_seconds,
        joules=row.joules,
        energy_source=row.energy_source,
        peak_memory_bytes=row.peak_memory_bytes,
    )


def _add_to_rollup(
    session: Session, stored: Sequence[tuple[str, TelemetryWindow]], classes: Mapping[str, str]
) -> None:
    """Add newly stored windows to their (class, model, artifact, source) running sums.

    Read-modify-write in the ingest transaction: SQLite holds its write lock already, and
    on PostgreSQL the rows are locked; two replicas adding the same new key race on its
    unique constraint and the loser's transaction is retried whole."""
    groups: dict[tuple[str, str, str, str], list[TelemetryWindow]] = {}
    senders: dict[tuple[str, str, str, str], set[str]] = {}
    for device_id, w in stored:
        key = (classes[device_id], w.model_name, w.artifact_sha256, w.energy_source)
        groups.setdefault(key, []).append(w)
        senders.setdefault(key, set()).add(device_id)
    if not groups:
        return
    r = TelemetryRollupRow
    existing = {
        (row.device_class, row.model_name, row.artifact_sha256, row.energy_source): row
        for row in session.scalars(
            select(r).where(r.model_name.in_({k[1] for k in groups})).with_for_update()
        )
    }
    for key, ws in groups.items():
        row = existing.get(key)
        buckets = [sum(col) for col in zip(*(w.latency_bucket_counts for w in ws), strict=True)]
        was = _WindowSums(buckets=[0] * len(buckets)) if row is None else _rollup_sums(row)
        sums = _WindowSums(
            windows=was.windows + len(ws),
            count=was.count + sum(w.count for w in ws),
            errors=was.errors + sum(w.errors for w in ws),
            cpu_seconds=was.cpu_seconds + sum(w.cpu_seconds for w in ws),
            joules=was.joules + sum(w.joules for w in ws),
            buckets=[a + b for a, b in zip(was.buckets, buckets, strict=True)],
        )
        _check_rollup_fits(sums, key, senders[key])
        if row is None:
            row = TelemetryRollupRow(
                device_class=key[0],
                model_name=key[1],
                artifact_sha256=key[2],
                energy_source=key[3],
            )
            session.add(row)
        row.windows = sums.windows
        row.count = sums.count
        row.errors = sums.errors
        row.cpu_seconds = sums.cpu_seconds
        row.joules = sums.joules
        row.latency_bucket_counts = sums.buckets


def _rollup_sums(row: TelemetryRollupRow) -> _WindowSums:
    return _WindowSums(
        windows=int(row.windows),
        count=int(row.count),
        errors=int(row.errors),
        cpu_seconds=float(row.cpu_seconds),
        joules=float(row.joules),
        buckets=[int(b) for b in row.latency_bucket_counts],
    )


def _check_rollup_fits(
    sums: _WindowSums, key: tuple[str, str, str, str], devices: set[str]
) -> None:
    """Refuse windows that would carry a running sum past what its column holds (a signed
    64-bit integer; a finite float): one device's windows must not overflow the rollup
    and so fail every later ingest of the key, for every device of the class."""
    counters = {"windows": sums.windows, "count": sums.count, "errors": sums.errors}
    over = [name for name, value in counters.items() if value > validate.MAX_INT64]
    if max(sums.buckets, default=0) > validate.MAX_INT64:
        over.append("latency_bucket_counts")
    floats = {"cpu_seconds": sums.cpu_seconds, "joules": sums.joules}
    over += [name for name, value in floats.items() if not math.isfinite(value)]
    if over:
        device_class, model_name, sha256, source = key
        names = sorted(devices)
        who = f"device {names[0]}" if len(names) == 1 else f"devices {', '.join(names[:5])}"
        who += f" and {len(names) - 5} more" if len(names) > 5 else ""
        raise invalid(
            f"{who}: these windows would carry the fleet's running {', '.join(over)} of class "
            f"{device_class}, model {model_name}, artifact {_short(sha256)}, energy source "
            f"{source!r} past what it can hold (2^63-1 for counts, a finite number for "
            "seconds and joules); no device serves that much: check what it reports",
            reason=REFUSED_BOUNDS,
        )


def _mark_reporting(
    session: Session, stored: Sequence[tuple[str, TelemetryWindow]], now: int
) -> None:
    """Upsert when each device last sent windows of each (model, artifact), and the latest
    end of those windows (``_check_continuity`` holds the next ones against it)."""
    ends: dict[tuple[str, str, str], int] = {}
    for d, w in stored:
        key = (d, w.model_name, w.artifact_sha256)
        ends[key] = max(ends.get(key, 0), w.end_unix_ms)
    if not ends:
        return
    r = TelemetryReportingRow
    dialect = session.get_bind().dialect.name
    insert = sqlite.insert(r) if dialect == "sqlite" else postgresql.insert(r)
    # SQLite's max() of two arguments is PostgreSQL's greatest()
    latest = func.max if dialect == "sqlite" else func.greatest
    statement = insert.on_conflict_do_update(
        index_elements=["device_id", "model_name", "artifact_sha256"],
        set_={
            "received_unix_ms": now,
            "max_end_unix_ms": latest(r.max_end_unix_ms, insert.excluded.max_end_unix_ms),
        },
    )
    session.connection().execute(
        statement,
        [
            {
                "device_id": d,
                "model_name": m,
                "artifact_sha256": sha,
                "received_unix_ms": now,
                "max_end_unix_ms": end,
            }
            for (d, m, sha), end in sorted(ends.items())  # lock order
        ],
    )


def _require_device(session: Session, device_id: str) -> DeviceRow:
    row = session.get(DeviceRow, device_id)
    if row is None:
        raise not_found(
            f"device {device_id!r} is not registered; register first (AgentService.Register)"
        )
    return row


def _differences(row: DeviceRow, reg: DeviceRegistration) -> list[str]:
    differences = []
    if row.device_class != reg.device_class:
        differences.append(
            f"device_class (registered {row.device_class!r}, this request {reg.device_class!r})"
        )
    known = Hardware.from_json(row.hardware).to_json()
    asked = reg.hardware.to_json()
    for key in Hardware.IDENTITY:
        if known[key] != asked[key]:
            differences.append(
                f"hardware.{key} (registered {known[key]!r}, this request {asked[key]!r})"
            )
    return differences


def _conflict_quiet(session: Session, device_id: str, now: int) -> bool:
    """Whether the device's latest device.conflict event (controller.agents records it
    when two agents sharing its id keep taking its watch stream) still covers ``now``."""
    row = session.scalars(
        select(EventRow)
        .where(EventRow.kind == DEVICE_CONFLICT, EventRow.subject == device_id)
        .order_by(EventRow.id.desc())
        .limit(1)
    ).first()
    until = row.detail.get("quiet_until_unix_ms") if row is not None else None
    return isinstance(until, int) and until > now


def _record_held(session: Session, reg: DeviceRegistration, now: int) -> None:
    """What the device says it serves becomes device_models.serving_sha256."""
    active = {h.model_name: h.sha256 for h in reg.held if h.active}
    existing = {
        r.model_name: r
        for r in session.scalars(
            select(DeviceModelRow).where(DeviceModelRow.device_id == reg.device_id)
        )
    }
    for name, row in existing.items():
        serving = active.get(name, "")
        if row.serving_sha256 != serving:
            row.serving_sha256 = serving
            row.updated_unix_ms = now
    for name, sha in active.items():
        if name not in existing:
            session.add(
                DeviceModelRow(
                    device_id=reg.device_id,
                    model_name=name,
                    serving_sha256=sha,
                    reported_sha256="",
                    last_outcome="",
                    last_reason="",
                    bytes_received=0,
                    encoding="",
                    updated_unix_ms=now,
                )
            )


def _devices_governed(session: Session, model_name: str, target: AssignTarget) -> int:
    """How many devices take their artifact for ``model_name`` from ``target``."""
    if target.kind is TargetKind.DEVICE:
        return 1
    overridden = select(AssignmentRow.target).where(
        AssignmentRow.target_kind == TargetKind.DEVICE.value,
        AssignmentRow.model_name == model_name,
    )
    return int(
        session.scalar(
            select(func.count())
            .select_from(DeviceRow)
            .where(DeviceRow.device_class == target.name, DeviceRow.device_id.not_in(overridden))
        )
        or 0
    )


MAX_NAMED_KEEPING_OWN = 20


def _devices_with_own(
    session: Session, model_name: str, target: AssignTarget
) -> tuple[tuple[str, ...], int]:
    """For a class target: its devices with an assignment of their own for the model
    (which a class assignment does not change), the first few by id, and how many."""
    if target.kind is TargetKind.DEVICE:
        return (), 0
    own = (
        select(DeviceRow.device_id)
        .join(AssignmentRow, AssignmentRow.target == DeviceRow.device_id)
        .where(
            DeviceRow.device_class == target.name,
            AssignmentRow.target_kind == TargetKind.DEVICE.value,
            AssignmentRow.model_name == model_name,
        )
    )
    count = int(session.scalar(select(func.count()).select_from(own.subquery())) or 0)
    names = session.scalars(own.order_by(DeviceRow.device_id).limit(MAX_NAMED_KEEPING_OWN))
    return tuple(names), count


def _removed_since(session: Session, device_id: str, revision: int) -> int:
    """The id of the latest removal of one of the device's own assignments after
    ``revision`` (0: none). A removal can make the device fall back to a class
    assignment recorded long before (a lower revision) or to none: its event id keeps
    the desired set's revision growing, as event ids do whichever replica writes.

    Removals are operator actions, so few; on SQLite ``ix_events_kind`` (kind, rowid)
    makes this a range scan over those newer than what the assignments already say."""
    latest = select(func.max(EventRow.id)).where(
        EventRow.kind == ASSIGNMENT_REMOVED,
        EventRow.id > revision,
        EventRow.subject == device_id,
    )
    return int(session.scalar(latest) or 0)


def _choose(
    rows: Iterable[tuple[AssignmentRow, ArtifactRow]],
) -> dict[str, tuple[AssignmentRow, ArtifactRow]]:
    """Per model name: the device assignment when there is one, else the class assignment."""
    chosen: dict[str, tuple[AssignmentRow, ArtifactRow]] = {}
    for assignment, artifact in rows:
        current = chosen.get(assignment.model_name)
        if current is None or assignment.target_kind == TargetKind.DEVICE.value:
            chosen[assignment.model_name] = (assignment, artifact)
    return chosen


def _model_states(
    device: DeviceRow,
    desired: dict[str, tuple[AssignmentRow, ArtifactRow]],
    reported: list[DeviceModelRow],
    by_sha: dict[str, list[ArtifactRow]],
) -> tuple[DeviceModelState, ...]:
    rows = {r.model_name: r for r in reported}
    states = []
    for name in sorted(set(desired) | set(rows)):
        want = desired[name][1] if name in desired else None
        have = rows.get(name)
        serving_sha = have.serving_sha256 if have else ""
        states.append(
            DeviceModelState(
                own_assignment=(
                    name in desired and desired[name][0].target_kind == TargetKind.DEVICE.value
                ),
                model_name=name,
                desired_sha256=want.sha256 if want else "",
                desired_artifact_id=want.id if want else "",
                serving_sha256=serving_sha,
                serving_artifact_id=_serving_id(device, name, serving_sha, want, by_sha),
                last_outcome=Outcome(have.last_outcome) if have and have.last_outcome else None,
                last_reason=have.last_reason if have else "",
                bytes_received=have.bytes_received if have else 0,
                encoding=Encoding(have.encoding) if have and have.encoding else None,
            )
        )
    return tuple(states)


def _serving_id(
    device: DeviceRow,
    model_name: str,
    sha: str,
    desired: ArtifactRow | None,
    by_sha: dict[str, list[ArtifactRow]],
) -> str:
    """Which artifact the device serves, when several share its bytes (re-releases):
    the desired one when it holds them (what the device was sent), else the newest
    version of its class holding them (a re-release reaches the devices that run the
    bytes, so the first release is the least likely to be the manifest it runs), else
    the newest of the model. ``by_sha`` lists each digest's artifacts oldest first."""
    if not sha:
        return ""
    if desired is not None and desired.sha256 == sha:
        return desired.id
    candidates = [a for a in by_sha.get(sha, []) if a.model_name == model_name]
    own_class = [a for a in candidates if a.device_class == device.device_class]
    if own_class:
        return max(own_class, key=lambda a: a.version).id
    return candidates[-1].id if candidates else ""


def _specs(raw: list[Any]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.model_validate(item) for item in raw)


def _model(row: ModelRow) -> ModelRecord:
    return ModelRecord(
        name=row.name,
        version=row.version,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        inputs=_specs(row.inputs),
        outputs=_specs(row.outputs),
        description=row.description,
        created_unix_ms=row.created_unix_ms,
    )


def _artifact(row: ArtifactRow) -> ArtifactRecord:
    return ArtifactRecord(
        id=row.id,
        model_name=row.model_name,
        model_version=row.model_version,
        device_class=row.device_class,
        version=row.version,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        manifest_json=bytes(row.manifest_json),
        signature=bytes(row.signature),
        key_id=row.key_id,
        created_unix_ms=row.created_unix_ms,
    )


def _artifact_or_none(row: ArtifactRow | None) -> ArtifactRecord | None:
    return _artifact(row) if row is not None else None


def _desired(row: ArtifactRow, repaired_unix_ms: int = 0) -> DesiredAssignment:
    return DesiredAssignment(
        model_name=row.model_name,
        artifact_id=row.id,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        manifest_json=bytes(row.manifest_json),
        signature=bytes(row.signature),
        key_id=row.key_id,
        repaired_unix_ms=repaired_unix_ms,
    )


def _device(row: DeviceRow) -> DeviceRecord:
    return DeviceRecord(
        device_id=row.device_id,
        device_class=row.device_class,
        hardware=Hardware.from_json(row.hardware),
        agent_version=row.agent_version,
        registered_unix_ms=row.registered_unix_ms,
        last_seen_unix_ms=row.last_seen_unix_ms,
        watch_lease_until_ms=row.watch_lease_until_ms,
    )


def _device_or_none(row: DeviceRow | None) -> DeviceRecord | None:
    return _device(row) if row is not None else None


def _event_record(row: EventRow) -> EventRecord:
    return EventRecord(
        id=row.id,
        unix_ms=row.unix_ms,
        kind=row.kind,
        subject=row.subject,
        message=row.message,
        detail=dict(row.detail),
    )
