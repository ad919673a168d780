"""Domain records: what handlers and the store exchange, free of SQL and protobuf."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from artifact.manifest import TensorSpec


class Outcome(enum.Enum):
    """A deployment outcome a device reports (DeploymentOutcome on the wire)."""

    DOWNLOADING = "downloading"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class Encoding(enum.Enum):
    """How an artifact's bytes travel (PayloadEncoding on the wire)."""

    FULL = "full"
    DELTA = "delta"


class TargetKind(enum.Enum):
    CLASS = "class"
    DEVICE = "device"


@dataclass(frozen=True)
class Hardware:
    arch: str
    cpu_cores: int
    memory_bytes: int
    onnxruntime_version: str = ""
    os: str = ""

    # What identifies a device's hardware: a change in these means a different machine.
    IDENTITY = ("arch", "cpu_cores", "memory_bytes")

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "cpu_cores": self.cpu_cores,
            "memory_bytes": self.memory_bytes,
            "onnxruntime_version": self.onnxruntime_version,
            "os": self.os,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Hardware:
        return cls(
            arch=str(data.get("arch", "")),
            cpu_cores=int(data.get("cpu_cores", 0)),
            memory_bytes=int(data.get("memory_bytes", 0)),
            onnxruntime_version=str(data.get("onnxruntime_version", "")),
            os=str(data.get("os", "")),
        )


@dataclass(frozen=True)
class NewModel:
    name: str
    sha256: str
    size_bytes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str = ""


@dataclass(frozen=True)
class ModelRecord:
    name: str
    version: int
    sha256: str
    size_bytes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str
    created_unix_ms: int


@dataclass(frozen=True)
class ArtifactRecord:
    id: str
    model_name: str
    model_version: int
    device_class: str
    version: int
    sha256: str
    size_bytes: int
    manifest_json: bytes
    signature: bytes
    key_id: str
    created_unix_ms: int


@dataclass(frozen=True)
class AssignTarget:
    kind: TargetKind
    name: str


@dataclass(frozen=True)
class AssignResult:
    devices_affected: int
    changed: bool
    revision: int
    artifact_id: str = ""  # what is assigned now ("" after an unassign)
    keeping_own: tuple[str, ...] = ()  # class targets: devices with their own (some named)
    keeping_own_count: int = 0
    rereleased_from: str = ""  # this call re-released that artifact as ``artifact_id``
    warning: str = ""  # for the operator: why it may reach no device


@dataclass(frozen=True)
class HeldArtifact:
    model_name: str
    sha256: str
    active: bool


@dataclass(frozen=True)
class DeviceRegistration:
    device_id: str
    device_class: str
    hardware: Hardware
    held: tuple[HeldArtifact, ...] = ()
    agent_version: str = ""


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    device_class: str
    hardware: Hardware
    agent_version: str
    registered_unix_ms: int
    last_seen_unix_ms: int
    watch_lease_until_ms: int | None


@dataclass(frozen=True)
class RemovedDevice:
    """A device the fleet forgot: what went with it. The per-class counters (telemetry and
    download rollups, /metrics) keep what it contributed; events keep its history."""

    device: DeviceRecord
    own_assignments: tuple[str, ...]  # models it had an assignment of its own for
    telemetry_windows: int  # its stored windows, deleted
    event_id: int
    rereleased: tuple[str, ...] = ()  # "<artifact> as <re-release>": classes kept ahead


@dataclass(frozen=True)
class RegisterResult:
    device: DeviceRecord
    re_registered: bool
    watched: bool = False  # another connection still held the device's watch lease
    warning: str = ""  # for the device's operator, e.g. a class no device-class file declares


@dataclass(frozen=True)
class DesiredAssignment:
    """The artifact a device should run for one model, with its signed manifest."""

    model_name: str
    artifact_id: str
    sha256: str
    size_bytes: int
    manifest_json: bytes
    signature: bytes
    key_id: str
    repaired_unix_ms: int = 0  # when sound bytes last replaced a corrupt stored copy


@dataclass(frozen=True)
class DesiredSet:
    assignments: tuple[DesiredAssignment, ...]
    revision: int


@dataclass(frozen=True)
class StatusUpdate:
    device_id: str
    model_name: str
    artifact_sha256: str
    outcome: Outcome
    reason: str
    bytes_received: int
    encoding: Encoding | None
    serving_sha256: str


@dataclass(frozen=True)
class DeviceModelState:
    model_name: str
    desired_sha256: str = ""
    desired_artifact_id: str = ""
    serving_sha256: str = ""
    serving_artifact_id: str = ""
    last_outcome: Outcome | None = None
    last_reason: str = ""
    bytes_received: int = 0
    encoding: Encoding | None = None
    own_assignment: bool = False  # desired comes from an assignment to the device itself


@dataclass(frozen=True)
class DeviceView:
    device: DeviceRecord
    online: bool
    models: tuple[DeviceModelState, ...]


@dataclass(frozen=True)
class ClassCount:
    """How many devices report one class, and how many of them are online."""

    device_class: str
    devices: int
    online: int


@dataclass(frozen=True)
class TelemetryWindow:
    seq: int
    model_name: str
    artifact_sha256: str
    start_unix_ms: int
    end_unix_ms: int
    count: int
    errors: int
    latency_bucket_counts: tuple[int, ...]
    cpu_seconds: float
    joules: float
    energy_source: str
    peak_memory_bytes: int


@dataclass(frozen=True)
class NewEvent:
    kind: str
    subject: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EventRecord:
    id: int
    unix_ms: int
    kind: str
    subject: str
    message: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class ModelUpload:
    """The header of an AddModel stream: what is about to arrive."""

    name: str
    description: str
    size_bytes: int
    sha256: str  # empty: not checked


@dataclass(frozen=True)
class ArtifactRequest:
    model_name: str
    model_version: int | None  # None: the latest
    device_class: str
    expires_in_days: int | None  # None: the default


@dataclass(frozen=True)
class FetchRequest:
    device_id: str
    target_sha256: str
    base_sha256: str
    offset: int
    chunk_bytes: int  # 0: the server's default
    encoding: Encoding | None  # None: let the server choose


@dataclass(frozen=True)
class Chunk:
    encoding: Encoding
    total_bytes: int
    payload_sha256: str
    offset: int
    data: bytes
    base_sha256: str = ""


# -------------------------------------------------------------------- compression jobs


class JobState(enum.Enum):
    """Where a compression job is (CompressionJobState on the wire)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    NOT_MET = "not_met"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True)
class BudgetOverrides:
    """Budgets tightened for one job; None keeps the device class's own."""

    min_fidelity: float | None = None
    max_accuracy_drop: float | None = None
    max_bytes: int | None = None
    max_size_ratio: float | None = None
    p95_ms: float | None = None


@dataclass(frozen=True)
class CompressionStart:
    """The header of a StartCompression stream: what to compress, for which class, how."""

    model_name: str  # empty for a workload
    model_version: int | None  # None: the latest
    workload: str  # empty for a registered model
    device_class_yaml: str
    budgets: BudgetOverrides
    calibration_bytes: int


@dataclass(frozen=True)
class NewCompressionJob:
    model_name: str  # the model, or the workload's name
    model_version: int | None  # None for a workload until its source is registered
    workload: str
    device_class: str
    owner: str  # the controller running it (host and data directory)
    inputs: CompressionInputs | None = None  # kept so the budget loop can run it again


@dataclass(frozen=True)
class CompressionInputs:
    """What a job started from, beyond its source: enough to start it again."""

    calibration_sha256: str  # a blob; empty for a workload (it brings its own data)
    device_class_yaml: str  # the class as the job used it (overrides applied)
    max_size_ratio: float | None


@dataclass(frozen=True)
class TrialRecord:
    """One planner trial as a job reports it."""

    index: int
    summary: str
    recipe: str
    met: bool
    artifact_bytes: int
    quality_metric: str = ""
    quality_value: float = 0.0
    p95_ms: float = 0.0
    energy_mj: float = 0.0
    seconds: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class BudgetVerdictRecord:
    budget: str
    limit: float
    observed: float
    met: bool
    gap: float


@dataclass(frozen=True)
class JobResult:
    """How a job ended: its final state and what it produced."""

    state: JobState
    error: str = ""
    artifact_id: str = ""
    model_version: int | None = None
    recipe: str = ""
    verdicts: tuple[BudgetVerdictRecord, ...] = ()


JOB_WARNING_EVENT = "compression.warning"  # a job's warning, kept as an event (jobs/runner.py)


@dataclass(frozen=True)
class CompressionJobRecord:
    id: int
    model_name: str
    model_version: int | None
    workload: str
    device_class: str
    state: JobState
    error: str
    owner: str
    created_unix_ms: int
    started_unix_ms: int | None
    finished_unix_ms: int | None
    trials_done: int
    artifact_id: str
    recipe: str
    verdicts: tuple[BudgetVerdictRecord, ...]
    trials: tuple[TrialRecord, ...] = ()  # empty in lists
    # What a running job is doing now, e.g. "trial 3: building distill(...)": kept in the
    # memory of the controller running it, not stored ("" from any other replica).
    activity: str = ""
    # What the compression warned of (kept as compression.warning events), oldest first.
    warnings: tuple[str, ...] = ()


# -------------------------------------------------------------------- telemetry aggregates


@dataclass(frozen=True)
class TelemetryTotals:
    """Every stored window of one (device class, model, artifact) summed: what /metrics
    exports as counters. ``artifact_id`` is the artifact's id, or the short sha256 when the
    controller does not know the bytes the devices reported."""

    device_class: str
    model_name: str
    artifact_id: str
    count: int
    errors: int
    cpu_seconds: float
    latency_bucket_counts: tuple[int, ...]  # artifact.histogram buckets, merged
    joules_by_source: tuple[tuple[str, float], ...]  # (energy source, joules), sorted
    windows: int
    devices_reporting: int  # distinct devices heard from since the caller's cut-off


# Why a telemetry window was refused (FleetError.reason), one word each: counted per
# device class and reason, so an operator sees a fleet's clocks drift or an agent
# misbehave without reading every device's log.
REFUSED_CLOCK = "clock"  # too old for the controller's clock, or in its future
REFUSED_OVERLAP = "overlap"  # re-covers time the device already reported
REFUSED_BOUNDS = "bounds"  # more CPU, energy or inferences than the window allows
REFUSED_ENERGY_SOURCE = "energy_source"
REFUSED_UNKNOWN_MODEL = "unknown_model"
REFUSED_MALFORMED = "malformed"  # any other field out of range


@dataclass(frozen=True)
class TelemetryRefusal:
    """A ReportTelemetry call refused as invalid: who, why (a REFUSED_* word), and the
    controller's message (what the device was told)."""

    device_id: str
    reason: str
    message: str


@dataclass(frozen=True)
class RefusalTotals:
    """Refused ReportTelemetry calls of one (device class, reason), for /metrics."""

    device_class: str
    reason: str
    calls: int


@dataclass(frozen=True)
class FetchOutcome:
    """One FetchArtifact call as it ended, added to the download sums (DownloadTotals).

    ``completed`` says the call completed an update: it sent the payload's last byte, and
    the device got every byte before its offset from this controller (the call started
    at 0, or resumed where the device's calls since its last completed update stopped;
    remembered in memory, so a resume after a restart or on another replica counts no
    update). One-byte calls at the end of a payload therefore never count one, however
    many a device makes; what a call sent is counted in ``bytes_sent`` either way.
    """

    device_id: str
    model_name: str
    artifact_id: str
    artifact_bytes: int  # the artifact's size: what a full download sends
    encoding: Encoding
    bytes_sent: int
    completed: bool  # the call completed an update (see above), not merely sent the end


@dataclass(frozen=True)
class AppliedUpdateTotals:
    """Updates devices applied, per (device class, model, artifact, encoding), as the
    devices reported them: ``bytes_received`` is what the updates cost on the wire by
    the devices' count (a discarded delta's bytes included, under the encoding the
    artifact finally arrived in), ``full_bytes`` the artifacts' size, so full_bytes -
    bytes_received is what deltas saved, never overstated by a delta a device threw away."""

    device_class: str
    model_name: str
    artifact_id: str
    encoding: Encoding
    updates: int
    bytes_received: int
    full_bytes: int


@dataclass(frozen=True)
class DownloadTotals:
    """Every FetchArtifact call of one (device class, model, artifact, encoding) summed:
    what updates cost on the wire, exported by /metrics. ``completed`` counts the calls
    that completed an update (FetchOutcome.completed: the last byte sent, and every byte
    before the call's offset sent to that device by its earlier calls), and
    ``full_bytes`` is the artifact's size for each: what those updates would have cost
    sent in full, so full_bytes - bytes_sent over the delta rows is what deltas saved
    (understated, never overstated, by updates resumed across a controller restart)."""

    device_class: str
    model_name: str
    artifact_id: str
    encoding: Encoding
    calls: int
    completed: int
    bytes_sent: int
    full_bytes: int


@dataclass(frozen=True)
class TelemetrySummary:
    """One artifact of a (device class, model) over a sliding window: what a budget is
    checked against. None where nothing was measured (no inference in the window)."""

    artifact_id: str
    artifact_sha256: str
    count: int
    errors: int
    latency_bucket_counts: tuple[int, ...]
    p95_seconds: float | None  # artifact.histogram.percentile of the merged buckets
    joules: float
    joules_per_inference: float | None
    windows: int
    devices: int
