"""Metadata tables (SQLAlchemy 2.0 typed ORM) and engine setup.

Portable SQL only: the same models run on SQLite (the embedded default) and on
PostgreSQL (several replicas). SQLite-specific settings live in ``make_engine`` alone.
Times are integer unix milliseconds, so no backend's time-zone handling gets in the way.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Engine,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAME = 64
DIGEST = 64
# SQLite only auto-increments an INTEGER PRIMARY KEY; elsewhere use 64-bit ids.
BigId = BigInteger().with_variant(Integer(), "sqlite")

SQLITE_BUSY_TIMEOUT_MS = 10_000


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    """A registered source model: one row per (name, version)."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_models_name_version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(DIGEST))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    inputs: Mapped[list[Any]] = mapped_column(JSON)
    outputs: Mapped[list[Any]] = mapped_column(JSON)
    description: Mapped[str] = mapped_column(Text, default="")
    created_unix_ms: Mapped[int] = mapped_column(BigInteger)


class ArtifactRow(Base):
    """An artifact built for one device class: the signed manifest is kept byte for byte."""

    __tablename__ = "artifacts"
    __table_args__ = (
        UniqueConstraint("model_name", "device_class", "version", name="uq_artifacts_version"),
        ForeignKeyConstraint(["model_name", "model_version"], ["models.name", "models.version"]),
        Index("ix_artifacts_sha256", "sha256"),
    )

    id: Mapped[str] = mapped_column(String(3 * NAME), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(NAME))
    model_version: Mapped[int] = mapped_column(Integer)
    device_class: Mapped[str] = mapped_column(String(NAME))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(DIGEST))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    manifest_json: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    key_id: Mapped[str] = mapped_column(String(64))
    created_unix_ms: Mapped[int] = mapped_column(BigInteger)


class AssignmentRow(Base):
    """Desired state: for a target (a class or one device) and a model, which artifact.

    ``revision`` is the id of the event that recorded the change: event ids only grow,
    so the largest revision a device sees grows whenever its desired set changes,
    whichever replica made the change.
    """

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("target_kind", "target", "model_name", name="uq_assignment_target"),
        CheckConstraint("target_kind IN ('class', 'device')", name="ck_assignment_kind"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    target_kind: Mapped[str] = mapped_column(String(8))
    target: Mapped[str] = mapped_column(String(NAME))
    model_name: Mapped[str] = mapped_column(String(NAME))
    artifact_id: Mapped[str] = mapped_column(ForeignKey("artifacts.id"))
    revision: Mapped[int] = mapped_column(BigInteger)
    updated_unix_ms: Mapped[int] = mapped_column(BigInteger)


class DeviceRow(Base):
    """A registered device. ``watch_lease_until_ms`` is set while a watch stream is open.

    The lease lives in the database, not in one replica's memory, so any replica can
    tell whether a device is online; a crashed replica's leases simply run out.
    """

    __tablename__ = "devices"
    __table_args__ = (Index("ix_devices_class", "device_class"),)

    device_id: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    device_class: Mapped[str] = mapped_column(String(NAME))
    hardware: Mapped[dict[str, Any]] = mapped_column(JSON)
    agent_version: Mapped[str] = mapped_column(String(NAME), default="")
    registered_unix_ms: Mapped[int] = mapped_column(BigInteger)
    last_seen_unix_ms: Mapped[int] = mapped_column(BigInteger)
    watch_lease_until_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class DeviceModelRow(Base):
    """What a device last reported for one model: what it serves, and the last outcome."""

    __tablename__ = "device_models"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    serving_sha256: Mapped[str] = mapped_column(String(DIGEST), default="")
    reported_sha256: Mapped[str] = mapped_column(String(DIGEST), default="")
    last_outcome: Mapped[str] = mapped_column(String(16), default="")
    last_reason: Mapped[str] = mapped_column(Text, default="")
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    encoding: Mapped[str] = mapped_column(String(8), default="")
    updated_unix_ms: Mapped[int] = mapped_column(BigInteger)


class EventRow(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_kind", "kind"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    unix_ms: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(NAME))
    subject: Mapped[str] = mapped_column(String(4 * NAME))
    message: Mapped[str] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


class TelemetryWindowRow(Base):
    """One reported telemetry window; (device_id, seq) is stored at most once."""

    __tablename__ = "telemetry_windows"
    __table_args__ = (
        UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),
        # the budget evaluator's sliding window: one model's windows since a time
        Index("ix_telemetry_model_end", "model_name", "end_unix_ms"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"))
    seq: Mapped[int] = mapped_column(BigInteger)
    model_name: Mapped[str] = mapped_column(String(NAME))
    artifact_sha256: Mapped[str] = mapped_column(String(DIGEST))
    start_unix_ms: Mapped[int] = mapped_column(BigInteger)
    end_unix_ms: Mapped[int] = mapped_column(BigInteger)
    count: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    latency_bucket_counts: Mapped[list[Any]] = mapped_column(JSON)
    cpu_seconds: Mapped[float] = mapped_column(Float)
    joules: Mapped[float] = mapped_column(Float)
    energy_source: Mapped[str] = mapped_column(String(32))
    peak_memory_bytes: Mapped[int] = mapped_column(BigInteger)
    received_unix_ms: Mapped[int] = mapped_column(BigInteger)


class TelemetryRollupRow(Base):
    """Running sums of every stored window per (class, model, artifact bytes, energy
    source), updated in the ingest transaction: a /metrics scrape reads these few rows
    instead of summing every window ever stored. The class is the device's at ingest."""

    __tablename__ = "telemetry_rollup"
    __table_args__ = (
        UniqueConstraint(
            "device_class",
            "model_name",
            "artifact_sha256",
            "energy_source",
            name="uq_telemetry_rollup_key",
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_class: Mapped[str] = mapped_column(String(NAME))
    model_name: Mapped[str] = mapped_column(String(NAME))
    artifact_sha256: Mapped[str] = mapped_column(String(DIGEST))
    energy_source: Mapped[str] = mapped_column(String(32))
    windows: Mapped[int] = mapped_column(BigInteger)
    count: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    cpu_seconds: Mapped[float] = mapped_column(Float)
    joules: Mapped[float] = mapped_column(Float)
    latency_bucket_counts: Mapped[list[Any]] = mapped_column(JSON)


class DownloadRollupRow(Base):
    """Running sums of FetchArtifact calls per (class, model, artifact, encoding), added as
    each call ends (with its ``artifact.fetch`` event): what updates cost on the wire and
    what deltas saved, for /metrics, in rows that grow with artifacts, not with fetches.
    The class is the device's when it fetched."""

    __tablename__ = "download_rollup"
    __table_args__ = (
        UniqueConstraint(
            "device_class", "model_name", "artifact_id", "encoding", name="uq_download_rollup_key"
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_class: Mapped[str] = mapped_column(String(NAME))
    model_name: Mapped[str] = mapped_column(String(NAME))
    artifact_id: Mapped[str] = mapped_column(String(3 * NAME))
    encoding: Mapped[str] = mapped_column(String(8))
    calls: Mapped[int] = mapped_column(BigInteger)
    completed: Mapped[int] = mapped_column(BigInteger)
    bytes_sent: Mapped[int] = mapped_column(BigInteger)
    full_bytes: Mapped[int] = mapped_column(BigInteger)  # artifact size per completed call


class AppliedUpdateRow(Base):
    """Updates devices applied (their first ACTIVE report after a download), summed per
    (class, model, artifact, encoding) with the bytes they reported receiving and the
    artifacts' size: what deltas saved, by the devices' own count."""

    __tablename__ = "applied_updates"
    __table_args__ = (
        UniqueConstraint(
            "device_class", "model_name", "artifact_id", "encoding", name="uq_applied_updates_key"
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_class: Mapped[str] = mapped_column(String(NAME))
    model_name: Mapped[str] = mapped_column(String(NAME))
    artifact_id: Mapped[str] = mapped_column(String(3 * NAME))
    encoding: Mapped[str] = mapped_column(String(8))
    updates: Mapped[int] = mapped_column(BigInteger)
    bytes_received: Mapped[int] = mapped_column(BigInteger)
    full_bytes: Mapped[int] = mapped_column(BigInteger)


class TelemetryRefusalRow(Base):
    """Refused ReportTelemetry calls per (device class, reason): a fleet whose clocks
    drift, or an agent that misbehaves, shows in /metrics without reading device logs."""

    __tablename__ = "telemetry_refusals"
    __table_args__ = (UniqueConstraint("device_class", "reason", name="uq_telemetry_refusals_key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    device_class: Mapped[str] = mapped_column(String(NAME))
    reason: Mapped[str] = mapped_column(String(32))
    calls: Mapped[int] = mapped_column(BigInteger)
    last_unix_ms: Mapped[int] = mapped_column(BigInteger)


class BlobRepairRow(Base):
    """When sound bytes last replaced a corrupt stored copy of a blob: sent with each
    assignment of those bytes, so agents whose download failed retry at once instead
    of waiting out their backoff (up to 15 minutes)."""

    __tablename__ = "blob_repairs"

    sha256: Mapped[str] = mapped_column(String(DIGEST), primary_key=True)
    repaired_unix_ms: Mapped[int] = mapped_column(BigInteger)


class TelemetryReportingRow(Base):
    """When each device last sent windows of a (model, artifact): "devices reporting"
    counts these rows (one per device and artifact), not the windows.

    ``max_end_unix_ms`` is the latest end of any window of the (model, artifact) the
    device stored, whatever its seq: ingest refuses a window of the model that starts well
    before it (overlap), so the device's windows cannot count one time twice. 0 is
    "unknown" (a row an older controller wrote): no window is held against it."""

    __tablename__ = "telemetry_reporting"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    artifact_sha256: Mapped[str] = mapped_column(String(DIGEST), primary_key=True)
    received_unix_ms: Mapped[int] = mapped_column(BigInteger)
    # a default, so an older controller's insert (no such column) still works beside this
    max_end_unix_ms: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


def _add_reporting_max_end(engine: Engine) -> None:
    """Give a telemetry_reporting table from before max_end_unix_ms that column, filled
    from the windows stored: create_all adds no column to a table that exists, and ingest
    reads it. Runs at every start; several processes may run it at once."""
    table, column = TelemetryReportingRow.__tablename__, "max_end_unix_ms"

    def present() -> bool:
        return column in {c["name"] for c in inspect(engine).get_columns(table)}

    if present():
        return
    guard = "IF NOT EXISTS " if engine.dialect.name == "postgresql" else ""
    try:
        with engine.begin() as conn:
            conn.execute(
                text(f"ALTER TABLE {table} ADD COLUMN {guard}{column} BIGINT NOT NULL DEFAULT 0")
            )
    except DBAPIError:
        if not present():  # not another process adding it first (SQLite has no IF NOT EXISTS)
            raise
    windows = TelemetryWindowRow.__tablename__
    with engine.begin() as conn:
        conn.execute(
            text(
                f"UPDATE {table} SET {column} = COALESCE((SELECT max(w.end_unix_ms) "
                f"FROM {windows} w WHERE w.device_id = {table}.device_id "
                f"AND w.model_name = {table}.model_name "
                f"AND w.artifact_sha256 = {table}.artifact_sha256), 0) WHERE {column} = 0"
            )
        )


ACTIVE_JOB_STATES_SQL = "state IN ('queued', 'running')"


class CompressionJobRow(Base):
    """A compression job. At most one active job per (model, class): the partial unique
    index settles even a race between replicas."""

    __tablename__ = "compression_jobs"
    __table_args__ = (
        Index(
            "uq_compression_jobs_active",
            "model_name",
            "device_class",
            unique=True,
            sqlite_where=text(ACTIVE_JOB_STATES_SQL),
            postgresql_where=text(ACTIVE_JOB_STATES_SQL),
        ),
        CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'not_met', 'failed', 'cancelled')",
            name="ck_compression_jobs_state",
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(NAME))
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    workload: Mapped[str] = mapped_column(String(NAME), default="")
    device_class: Mapped[str] = mapped_column(String(NAME))
    state: Mapped[str] = mapped_column(String(16))
    error: Mapped[str] = mapped_column(Text, default="")
    owner: Mapped[str] = mapped_column(Text)
    created_unix_ms: Mapped[int] = mapped_column(BigInteger)
    started_unix_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_unix_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    trials_done: Mapped[int] = mapped_column(Integer, default=0)
    artifact_id: Mapped[str] = mapped_column(String(3 * NAME), default="")
    recipe: Mapped[str] = mapped_column(Text, default="")
    verdicts: Mapped[list[Any]] = mapped_column(JSON, default=list)


class CompressionTrialRow(Base):
    """One trial a job reported, in order."""

    __tablename__ = "compression_trials"

    job_id: Mapped[int] = mapped_column(ForeignKey("compression_jobs.id"), primary_key=True)
    trial_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    summary: Mapped[str] = mapped_column(Text)
    recipe: Mapped[str] = mapped_column(Text)
    met: Mapped[bool] = mapped_column(Boolean)
    artifact_bytes: Mapped[int] = mapped_column(BigInteger)
    quality_metric: Mapped[str] = mapped_column(String(NAME), default="")
    quality_value: Mapped[float] = mapped_column(Float, default=0.0)
    p95_ms: Mapped[float] = mapped_column(Float, default=0.0)
    energy_mj: Mapped[float] = mapped_column(Float, default=0.0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str] = mapped_column(Text, default="")


ACTIVE_ROLLOUT_STATES_SQL = "state IN ('recompressing', 'canary')"


class RolloutRow(Base):
    """One closed-loop fix of a (model, device class) that missed its budget.

    recompressing -> canary -> promoted | rolled_back, or failed at any step. At most one
    active rollout per (model, class): the partial unique index settles even two
    replicas noticing the same miss at once, so a miss starts exactly one recompression.
    """

    __tablename__ = "rollouts"
    __table_args__ = (
        Index(
            "uq_rollouts_active",
            "model_name",
            "device_class",
            unique=True,
            sqlite_where=text(ACTIVE_ROLLOUT_STATES_SQL),
            postgresql_where=text(ACTIVE_ROLLOUT_STATES_SQL),
        ),
        CheckConstraint(
            "state IN ('recompressing', 'canary', 'promoted', 'rolled_back', 'failed')",
            name="ck_rollouts_state",
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(NAME))
    device_class: Mapped[str] = mapped_column(String(NAME))
    state: Mapped[str] = mapped_column(String(16))
    baseline_artifact_id: Mapped[str] = mapped_column(String(3 * NAME))
    candidate_artifact_id: Mapped[str] = mapped_column(String(3 * NAME), default="")
    job_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    canary_devices: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # The planner's per-class speed the recompression used (observed-to-predicted).
    relative_speed: Mapped[float] = mapped_column(Float)
    p95_target_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_unix_ms: Mapped[int] = mapped_column(BigInteger)
    updated_unix_ms: Mapped[int] = mapped_column(BigInteger)
    canary_since_unix_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_unix_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class RolloutPauseRow(Base):
    """An operator's pause of the budget loop for one (model, device class): while the
    row exists the loop takes no action for the pair (it still judges its telemetry, and
    keeps the latest verdict here for the operator to see)."""

    __tablename__ = "rollout_pauses"

    model_name: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    device_class: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    paused_by: Mapped[str] = mapped_column(String(4 * NAME))
    reason: Mapped[str] = mapped_column(Text, default="")
    paused_unix_ms: Mapped[int] = mapped_column(BigInteger)
    verdict: Mapped[str] = mapped_column(Text, default="")
    verdict_unix_ms: Mapped[int] = mapped_column(BigInteger, default=0)


class CompressionJobLeaseRow(Base):
    """How long an active job's controller vouches for it. The owner renews the lease
    while it runs the job; any replica fails an active job whose lease ran out (its
    controller died and never came back), so the (model, class) pair is not blocked."""

    __tablename__ = "compression_job_leases"

    job_id: Mapped[int] = mapped_column(ForeignKey("compression_jobs.id"), primary_key=True)
    lease_until_ms: Mapped[int] = mapped_column(BigInteger)


class CompressionInputRow(Base):
    """What a compression job was started from, kept so the budget loop can run it again:
    the calibration data (a blob) and the device class as the request declared it."""

    __tablename__ = "compression_inputs"

    job_id: Mapped[int] = mapped_column(ForeignKey("compression_jobs.id"), primary_key=True)
    calibration_sha256: Mapped[str] = mapped_column(String(DIGEST), default="")
    device_class_yaml: Mapped[str] = mapped_column(Text, default="")
    max_size_ratio: Mapped[float | None] = mapped_column(Float, nullable=True)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
                cursor.execute("PRAGMA synchronous=NORMAL")
            finally:
                cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def create_schema(engine: Engine) -> None:
    """Create missing tables (no migrations yet: the schema is new), and add the one
    column added to an existing table since (``_add_reporting_max_end``)."""
    Base.metadata.create_all(engine)
    _add_reporting_max_end(engine)
