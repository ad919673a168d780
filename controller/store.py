"""The metadata store as handlers see it: domain methods, dataclass results, no SQL.

Every method is one transaction: a change and the event that records it are written
together or not at all. Methods are synchronous and short; async callers run them in
a worker thread (``asyncio.to_thread``). Expected failures raise FleetError.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from controller.records import (
    AppliedUpdateTotals,
    ArtifactRecord,
    AssignResult,
    AssignTarget,
    ClassCount,
    CompressionInputs,
    CompressionJobRecord,
    DesiredSet,
    DeviceRecord,
    DeviceRegistration,
    DeviceView,
    DownloadTotals,
    EventRecord,
    FetchOutcome,
    JobResult,
    ModelRecord,
    NewCompressionJob,
    NewEvent,
    NewModel,
    RefusalTotals,
    RegisterResult,
    RemovedDevice,
    StatusUpdate,
    TelemetryRefusal,
    TelemetrySummary,
    TelemetryTotals,
    TelemetryWindow,
    TrialRecord,
)


@dataclass(frozen=True)
class TelemetryPoint:
    """One time bucket of a series: its windows merged (percentile from merged buckets)."""

    start_unix_ms: int  # the bucket covers [start, start + bucket_ms) of window end times
    count: int
    errors: int
    p95_seconds: float | None  # None: no inference in the bucket
    joules_per_inference: float | None


@dataclass(frozen=True)
class TelemetrySeries:
    """One (device class, model, artifact) over time: what the dashboard charts."""

    device_class: str
    model_name: str
    artifact_id: str  # as in TelemetryTotals: the id, or the short sha256 of unknown bytes
    points: tuple[TelemetryPoint, ...]  # buckets holding windows only, oldest first


MAX_SERIES = 40  # series one telemetry_series answer carries at most (the busiest)
MAX_SERIES_BUCKETS = 240  # buckets a caller asks for at most: 40 x 240 rows per answer


@dataclass(frozen=True)
class SeriesSelection:
    """The series of a range, and how many quieter ones did not fit in MAX_SERIES."""

    series: list[TelemetrySeries]
    omitted: int  # series with windows in the range that are not in ``series``


# An active compression job's owner renews its lease well within this; past it, any
# replica may fail the job (its controller is gone and the pair would stay blocked).
JOB_LEASE_MS = 120_000
MAX_DEVICE_PAGE = 10_000  # devices one `list_devices` call returns at most
MAX_ARTIFACT_PAGE = 10_000  # artifacts one `list_artifacts` call returns at most
ArtifactKey = tuple[str, str, int]  # (model, device class, version): the listing's order
MAX_MODEL_PAGE = 10_000  # model versions one `list_models` call returns at most
ModelKey = tuple[str, int]  # (name, version)


class VersionConflictError(Exception):
    """Another writer took the version number first; the caller rebuilds and retries."""


class Store(abc.ABC):
    # ---------------------------------------------------------------- models
    @abc.abstractmethod
    def add_model(self, new: NewModel) -> tuple[ModelRecord, bool]:
        """Add the next version of ``new.name``; (record, created).

        When a version of the model already has the same sha256, return it (the newest such)
        with created=False: the same bytes never become two versions.
        """

    @abc.abstractmethod
    def get_model(self, name: str, version: int | None = None) -> ModelRecord | None:
        """One version, or the latest when ``version`` is None."""

    @abc.abstractmethod
    def list_models(
        self, *, after: ModelKey | None = None, limit: int = MAX_MODEL_PAGE
    ) -> list[ModelRecord]:
        """One page of model versions in (name, version) order, past ``after``, at most
        ``limit`` (bounded by MAX_MODEL_PAGE + 1, as `list_devices`)."""

    # ---------------------------------------------------------------- artifacts
    @abc.abstractmethod
    def next_artifact_version(self, model_name: str, device_class: str) -> int: ...

    @abc.abstractmethod
    def backfill_telemetry_rollup(self) -> int:
        """Fill the telemetry rollup from stored windows if it is empty (older databases)."""

    @abc.abstractmethod
    def resign_artifacts(self, key_id: str, sign: Callable[[bytes], bytes]) -> int:
        """Re-sign every manifest not signed by ``key_id`` (after a key rotation, so agents
        that now trust only the new key accept old artifacts too); returns how many."""

    @abc.abstractmethod
    def highest_version_in_use(self, model_name: str, device_class: str) -> int:
        """The highest artifact version of (model, class) assigned to any target or served by
        any device of the class (0: none). Devices refuse anything older than they ran."""

    @abc.abstractmethod
    def insert_artifact(self, artifact: ArtifactRecord) -> ArtifactRecord:
        """Insert; VersionConflictError when (model, class, version) is taken."""

    @abc.abstractmethod
    def get_artifact(self, artifact_id: str) -> ArtifactRecord | None: ...

    @abc.abstractmethod
    def find_artifact_by_sha256(self, sha256: str) -> ArtifactRecord | None: ...

    @abc.abstractmethod
    def find_model_artifact(self, model_name: str, sha256: str) -> ArtifactRecord | None:
        """The newest artifact of ``model_name`` holding the bytes ``sha256`` (None: the
        model has none), such as a delta base of the model's own. Not
        ``find_artifact_by_sha256``, which finds one artifact of any model: two models can
        share identical bytes, and it may well be the other model's."""

    @abc.abstractmethod
    def list_artifacts(
        self,
        model_name: str | None = None,
        device_class: str | None = None,
        *,
        after: ArtifactKey | None = None,
        limit: int = MAX_ARTIFACT_PAGE,
        newest_first: bool = False,
    ) -> list[ArtifactRecord]:
        """One page of artifacts ordered by (model, class, version), or the reverse with
        ``newest_first``: those past ``after`` in that order, at most ``limit`` (bounded
        by MAX_ARTIFACT_PAGE + 1, so a caller serving pages can tell whether another
        follows)."""

    @abc.abstractmethod
    def assign(self, artifact: ArtifactRecord, target: AssignTarget) -> AssignResult:
        """Point ``target``'s copy of the artifact's model at the artifact."""

    @abc.abstractmethod
    def assigned(self, target: AssignTarget, model_name: str) -> ArtifactRecord | None:
        """The artifact assigned to ``target`` itself for the model (None: none), not what
        a device inherits from its class."""

    @abc.abstractmethod
    def unassign(self, model_name: str, device_id: str) -> AssignResult | None:
        """Remove the device's own assignment of the model; None when it has none. The
        removal's event id becomes a floor of the device's desired-set revision, so the
        revision still grows when the device falls back to an older class assignment."""

    # ---------------------------------------------------------------- devices
    @abc.abstractmethod
    def register_device(self, registration: DeviceRegistration) -> RegisterResult:
        """Insert or re-register; ALREADY_EXISTS when the id is taken by other hardware."""

    @abc.abstractmethod
    def get_device(self, device_id: str) -> DeviceRecord | None: ...

    @abc.abstractmethod
    def remove_device(self, device_id: str) -> RemovedDevice | None:
        """Forget a device: its row, what it reported per model, its own assignments and
        its telemetry windows, with one ``device.removed`` event; None when unknown. An
        agent that still runs registers again at its next connection, as a new device."""

    @abc.abstractmethod
    def desired_set(self, device_id: str) -> DesiredSet:
        """Per model: the device's own assignment if any, else its class's. The revision
        is the id of the latest event that changed this set (an assignment, or the
        removal of one of the device's own): it never goes down."""

    @abc.abstractmethod
    def touch_watch(self, device_id: str, lease_until_ms: int) -> None:
        """A watch stream is open: refresh last_seen and extend the online lease."""

    @abc.abstractmethod
    def release_watch(self, device_id: str) -> None:
        """The last watch stream of the device on this replica closed: end the lease."""

    @abc.abstractmethod
    def report_status(self, status: StatusUpdate) -> None: ...

    @abc.abstractmethod
    def store_telemetry(self, device_id: str, windows: Sequence[TelemetryWindow]) -> int:
        """Store windows not stored yet (by seq); return the highest seq stored for the device."""

    @abc.abstractmethod
    def store_telemetry_batches(
        self, batches: Mapping[str, Sequence[TelemetryWindow]]
    ) -> dict[str, int]:
        """Many devices' windows in one transaction (group commit), each stored at most once
        by (device, seq). Returns each registered device's highest stored seq; a device that
        is not registered is left out of the result and none of its windows are stored."""

    @abc.abstractmethod
    def list_devices(
        self, device_class: str | None = None, *, after: str = "", limit: int = MAX_DEVICE_PAGE
    ) -> list[DeviceView]:
        """One page of devices in id order: those whose id sorts after ``after``, at most
        ``limit`` (bounded by MAX_DEVICE_PAGE + 1, so that a caller serving pages of
        MAX_DEVICE_PAGE can tell whether another follows). `all_devices` walks them all."""

    @abc.abstractmethod
    def count_devices(self) -> list[ClassCount]:
        """Devices and online devices per class, over the whole fleet, by class name."""

    # ---------------------------------------------------------------- telemetry aggregates
    @abc.abstractmethod
    def telemetry_totals(self, reporting_since_unix_ms: int) -> list[TelemetryTotals]:
        """Per (class, model, artifact): every stored window summed (counters since the data
        began, the same on every replica); devices_reporting counts the devices whose
        windows arrived at or after ``reporting_since_unix_ms`` (controller clock)."""

    @abc.abstractmethod
    def telemetry_summary(
        self, device_class: str, model_name: str, since_unix_ms: int
    ) -> list[TelemetrySummary]:
        """Per artifact of (class, model): the windows that ended at or after
        ``since_unix_ms`` (device clock) merged, sorted by artifact id."""

    @abc.abstractmethod
    def telemetry_series(
        self, since_unix_ms: int, until_unix_ms: int, bucket_ms: int
    ) -> SeriesSelection:
        """Per (class, model, artifact): the windows that ended in [since, until) (device
        clock) merged per ``bucket_ms`` bucket, sorted by (class, model, artifact).

        At most MAX_SERIES series, the busiest (most inferences in the range); how many
        quieter ones were left out is part of the answer, never silently dropped. Callers
        ask for at most MAX_SERIES_BUCKETS buckets, so the answer is bounded.
        """

    @abc.abstractmethod
    def job_warnings(self, job: CompressionJobRecord) -> list[str]:
        """The warnings a compression job's worker reported (compression.warning events)."""

    # ---------------------------------------------------------------- downloads
    @abc.abstractmethod
    def record_fetch(self, event: NewEvent | None, outcome: FetchOutcome) -> None:
        """Record a finished FetchArtifact call: its bytes added to the download sums
        (every call), and ``event`` when given (AgentHandlers summarises most calls into
        the event of a later one), in one transaction."""

    @abc.abstractmethod
    def applied_update_totals(self) -> list[AppliedUpdateTotals]:
        """Updates devices applied, per (class, model, artifact, encoding), for /metrics."""

    @abc.abstractmethod
    def download_totals(self) -> list[DownloadTotals]:
        """The download sums per (class, model, artifact, encoding), for /metrics."""

    # ---------------------------------------------------------------- repaired blobs
    @abc.abstractmethod
    def record_blob_repair(self, sha256: str, event: NewEvent) -> None:
        """Sound bytes replaced a corrupt stored copy of blob ``sha256`` now: record the
        time (each assignment of these bytes carries it, so agents whose download failed
        retry at once) and ``event``, in one transaction."""

    # ---------------------------------------------------------------- refused telemetry
    @abc.abstractmethod
    def record_telemetry_refusal(self, refusal: TelemetryRefusal, event: NewEvent | None) -> None:
        """Count a refused ReportTelemetry call under the device's class (nothing for a
        device that is not registered), and record ``event`` with it when given."""

    @abc.abstractmethod
    def refusal_totals(self) -> list[RefusalTotals]:
        """Refused calls per (device class, reason), for /metrics."""

    # ---------------------------------------------------------------- events
    @abc.abstractmethod
    def add_event(self, new: NewEvent) -> EventRecord: ...

    @abc.abstractmethod
    def list_events(
        self, after_id: int, limit: int, kind_prefix: str = "", *, newest: bool = False
    ) -> list[EventRecord]:
        """Events with ids above ``after_id`` (a kind prefix taken literally), oldest first:
        the first ``limit`` of them, or with ``newest`` the last ``limit``."""

    # ---------------------------------------------------------------- compression jobs
    @abc.abstractmethod
    def renew_compression_leases(self, owner: str, until_unix_ms: int) -> int:
        """Extend the leases of ``owner``'s active jobs to ``until_unix_ms``; how many."""

    @abc.abstractmethod
    def fail_expired_compression_jobs(self, now_unix_ms: int, reason: str) -> list[int]:
        """Fail every active job whose lease ran out before ``now_unix_ms``; their ids."""

    @abc.abstractmethod
    def compression_inputs(self, job_id: int) -> CompressionInputs | None:
        """What job ``job_id`` started from (None: not recorded, e.g. an older job)."""

    @abc.abstractmethod
    def compression_job_of_artifact(self, artifact_id: str) -> CompressionJobRecord | None:
        """The job that published ``artifact_id``, if a job did."""

    @abc.abstractmethod
    def create_compression_job(self, new: NewCompressionJob) -> CompressionJobRecord:
        """Insert a queued job; ALREADY_EXISTS naming the job already active for the pair."""

    @abc.abstractmethod
    def active_compression_job(
        self, model_name: str, device_class: str
    ) -> CompressionJobRecord | None:
        """The queued or running job for (model, class), if any."""

    @abc.abstractmethod
    def start_compression_job(self, job_id: int) -> CompressionJobRecord | None:
        """Queued -> running; None when the job is not queued any more."""

    @abc.abstractmethod
    def add_compression_trial(self, job_id: int, trial: TrialRecord) -> None:
        """Record a finished trial of an active job (again with the same index: ignored)."""

    @abc.abstractmethod
    def finish_compression_job(self, job_id: int, result: JobResult) -> CompressionJobRecord | None:
        """Active -> the result's final state; None when the job had already ended."""

    @abc.abstractmethod
    def get_compression_job(self, job_id: int) -> CompressionJobRecord | None:
        """The job with all its trials."""

    @abc.abstractmethod
    def list_compression_jobs(
        self, model_name: str | None, device_class: str | None, limit: int
    ) -> list[CompressionJobRecord]:
        """Newest first, without trials."""

    @abc.abstractmethod
    def fail_active_compression_jobs(self, owner: str, reason: str) -> list[int]:
        """Fail every active job ``owner`` runs (it restarted, so nothing runs them now)."""

    @abc.abstractmethod
    def active_compression_job_owners(self) -> dict[int, str]:
        """The queued and running jobs: id → the controller run that owns it."""


def all_devices(store: Store, device_class: str | None = None) -> Iterator[DeviceView]:
    """Every device of ``device_class`` (None: of the fleet), page by page in id order.

    Each page is its own read: a device registered meanwhile may or may not be seen,
    none is seen twice.
    """
    after = ""
    while True:
        page = store.list_devices(device_class, after=after, limit=MAX_DEVICE_PAGE)
        yield from page
        if len(page) < MAX_DEVICE_PAGE:
            return
        after = page[-1].device.device_id


def all_artifacts(
    store: Store,
    model_name: str | None = None,
    device_class: str | None = None,
    *,
    newest_first: bool = False,
) -> Iterator[ArtifactRecord]:
    """Every artifact of the filter, page by page (see `all_devices`)."""
    after: ArtifactKey | None = None
    while True:
        page = store.list_artifacts(
            model_name,
            device_class,
            after=after,
            limit=MAX_ARTIFACT_PAGE,
            newest_first=newest_first,
        )
        yield from page
        if len(page) < MAX_ARTIFACT_PAGE:
            return
        last = page[-1]
        after = (last.model_name, last.device_class, last.version)
