"""Runs compression jobs in a process pool and turns their results into signed artifacts.

The pool (spawned processes, ``compression_workers`` of them, created on first use)
keeps torch out of the server process. For each job a task on the event loop waits
for the worker's result and meanwhile copies its progress file into the database and
wakes watchers. A job that ends with a model (every budget met, or the best trial when
none met them) is published through the admin handlers, so its artifact is versioned
and signed like any other. Job directories live under ``DATA_DIR/jobs`` and are removed
when the job ends; a controller that restarts fails the jobs it was running.

A job waits for a free worker here, not in the pool's queue (which marks a job running
the moment it is handed over), so a queued job is cancelled at once. Each controller
run owns its jobs under its own name (host, data directory, pid and start time): a
second controller started on the same data directory fails only the jobs of a run
whose process is gone, and leaves a live one's jobs, directories and workers alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil
from pydantic import BaseModel, ConfigDict

from artifact.manifest import RecipeStep
from controller.config import ControllerConfig
from controller.device_classes import DeviceClass
from controller.errors import FleetError
from controller.jobs.progress import Activity, ProgressReader, Started, Warned
from controller.jobs.watchers import JobWatchers
from controller.jobs.worker import WorkerResult, WorkerSpec, init_worker, run_job
from controller.records import (
    JOB_WARNING_EVENT,
    ArtifactRecord,
    BudgetVerdictRecord,
    CompressionJobRecord,
    JobResult,
    JobState,
    ModelRecord,
    NewEvent,
)
from controller.store import JOB_LEASE_MS, Store

log = logging.getLogger(__name__)

TAIL_SECONDS = 0.25  # how often a running job's progress file is read
START_ATTEMPTS = 2  # a job that never started when its pool broke is queued once more
CLOSE_WAIT_SECONDS = 10.0
STALE_INCOMING_SECONDS = 3600.0
INCOMING_PREFIX = ".incoming-"
WORKER_PREFIX = ".worker-"
CALIBRATION_FILE = "calibration.npz"
# Stored blobs a job reads are copied (digest checked) into its directory before it is
# recorded: the worker reads bytes known sound, whatever happens to the store meanwhile.
SOURCE_FILE = "source-model.onnx"
PREVIOUS_FILE = "previous-artifact.onnx"

# The operator's remedy, at the end of a failure that says it: the budget loop, which
# starts jobs of its own, drops it (it tries again by itself).
START_AGAIN = "; start it again"
RESTARTED = (
    "controller restarted: the job was queued or running when the controller stopped" + START_AGAIN
)
STOPPED = "controller stopped before the job finished" + START_AGAIN
DIED = (
    "the compression process exited unexpectedly (out of memory, or killed); "
    "the controller log may say more"
)
FINISHING_FAILED = "internal controller error while finishing the job; the controller log has it"
LOST = (
    "its controller stopped renewing the job's lease (the replica died and did not come "
    "back)" + START_AGAIN
)
# Leases (JOB_LEASE_MS in the store: 2 minutes) are renewed this often by their owner,
# and expired ones are failed by whichever replica looks first.
LEASE_RENEW_SECONDS = 20.0


class Publisher(Protocol):
    """Where finished jobs go: the admin handlers, which version and sign artifacts."""

    async def register_source(self, name: str, path: Path, description: str) -> ModelRecord: ...

    async def publish_compressed(
        self,
        model: ModelRecord,
        device_class: str,
        path: Path,
        recipe: tuple[RecipeStep, ...],
        metrics: dict[str, float],
    ) -> ArtifactRecord: ...


@dataclass(frozen=True)
class JobPlan:
    """What a checked request asks for: the source, the class with its budgets.

    The job reads the model's and the previous artifact's bytes from the copies in its
    directory (``JobRunner.source_path`` / ``previous_path``), made before it is queued.
    """

    model: ModelRecord | None  # a registered model, or None for a workload
    workload: str
    device_class: DeviceClass
    max_size_ratio: float | None
    previous: ArtifactRecord | None = None  # the class's latest static int8 artifact of it


class _Verdict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    budget: str
    limit: float
    observed: float
    met: bool
    gap: float


class JobManifest(BaseModel):
    """The parts of job.py's manifest.json that become the artifact's recipe and metrics."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    recipe: tuple[RecipeStep, ...]
    recipe_text: str
    metrics: dict[str, float]
    budgets: tuple[_Verdict, ...]
    met: bool

    @classmethod
    def read(cls, path: Path) -> JobManifest:
        return cls.model_validate_json(path.read_bytes())

    def verdicts(self) -> tuple[BudgetVerdictRecord, ...]:
        return tuple(BudgetVerdictRecord(**v.model_dump()) for v in self.budgets)


@dataclass
class _Job:
    record: CompressionJobRecord
    plan: JobPlan
    spec: WorkerSpec
    directory: Path
    progress: ProgressReader
    future: Future[WorkerResult] | None = None
    task: asyncio.Task[None] | None = None
    pid: int | None = None
    cancel_requested: bool = False
    activity: str = ""
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # ends a wait for a worker


class JobRunner:
    def __init__(
        self,
        store: Store,
        config: ControllerConfig,
        publisher: Publisher,
        watchers: JobWatchers,
    ) -> None:
        self._store = store
        self._config = config
        self._publisher = publisher
        self._watchers = watchers
        self._pool: ProcessPoolExecutor | None = None
        self._jobs: dict[int, _Job] = {}
        self._closing = False
        self._leases: asyncio.Task[None] | None = None
        # Who runs a job: this run of the controller. A restarted controller (same host,
        # same data directory) recognises the jobs its previous run left behind, and
        # tells them from those of another controller running there now.
        self._place = f"{socket.gethostname()}:{config.data_dir}"
        self.owner = f"{self._place} {_run_name(psutil.Process())}"
        self._workers = asyncio.Semaphore(config.compression_workers)

    @property
    def jobs_dir(self) -> Path:
        return self._config.jobs_dir

    # ---------------------------------------------------------------- lifecycle
    def recover(self) -> list[int]:
        """At start: fail the jobs a previous run of this controller left active, and
        remove what is left of them and of its workers (blocking: run in a thread).

        Another controller running on this data directory now keeps its jobs, their
        directories and its workers' scratch space; jobs of other hosts end by their
        leases (`keep_leases_once`).
        """
        active = self._store.active_compression_job_owners()
        gone = {o for o in set(active.values()) if _run_ended(o, self._place)}
        failed: list[int] = []
        for owner in sorted(gone):
            failed += self._store.fail_active_compression_jobs(owner, RESTARTED)
        for job_id in failed:
            log.warning("compression job %d failed: %s", job_id, RESTARTED)
        kept = {str(job_id) for job_id, owner in active.items() if owner not in gone}
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - STALE_INCOMING_SECONDS
        for entry in self.jobs_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.name in kept or _live_workers(entry.name):
                    continue
                if entry.name.startswith(INCOMING_PREFIX) and entry.stat().st_mtime > cutoff:
                    continue  # an upload another replica on this directory is receiving
                _remove(entry)
        return failed

    def start_leases(self, renew_seconds: float = LEASE_RENEW_SECONDS) -> None:
        """Renew this controller's job leases, and fail jobs whose owner stopped renewing."""
        if self._leases is None:
            self._leases = asyncio.create_task(self._keep_leases(renew_seconds), name="job-leases")

    async def keep_leases_once(self) -> list[int]:
        """One round: renew ours, fail the expired ones (theirs); the ids failed."""
        now = int(time.time() * 1000)
        await asyncio.to_thread(
            self._store.renew_compression_leases, self.owner, now + JOB_LEASE_MS
        )
        lost = await asyncio.to_thread(self._store.fail_expired_compression_jobs, now, LOST)
        for job_id in lost:
            log.warning("compression job %d failed: %s", job_id, LOST)
            self._watchers.notify(job_id)
        return lost

    async def _keep_leases(self, renew_seconds: float) -> None:
        while True:
            try:
                await self.keep_leases_once()
            except Exception:  # the database may be away for a moment: next round
                log.exception("renewing compression job leases failed")
            await asyncio.sleep(renew_seconds)

    async def close(self) -> None:
        """Stop every job: queued ones are dropped, running workers are killed, and each
        job fails as 'controller stopped'; then the pool's scratch space goes."""
        self._closing = True
        if self._leases is not None:
            self._leases.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._leases
            self._leases = None
        loop = asyncio.get_running_loop()
        for job in self._jobs.values():
            job.stop.set()  # a job waiting for a worker ends
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        deadline = loop.time() + CLOSE_WAIT_SECONDS
        while self._jobs and loop.time() < deadline:
            for job in list(self._jobs.values()):
                await self._drain(job)  # learn the pid of a worker that has just started
                if job.pid is not None and job.future is not None and not job.future.done():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(job.pid, signal.SIGKILL)
            tasks = [job.task for job in self._jobs.values() if job.task is not None]
            if tasks:
                await asyncio.wait(tasks, timeout=TAIL_SECONDS)
        self._watchers.close()
        if self.jobs_dir.is_dir():
            for entry in self.jobs_dir.glob(f"{self._worker_prefix}*"):
                await asyncio.to_thread(_remove, entry)

    # ---------------------------------------------------------------- submitting
    @property
    def active(self) -> int:
        return len(self._jobs)

    @property
    def _worker_prefix(self) -> str:
        """This run's workers' scratch directories: ``.worker-<controller pid>-<pid>``."""
        return f"{WORKER_PREFIX}{os.getpid()}-"

    def activity(self, job_id: int) -> str:
        """What job ``job_id`` works on now, if this runner runs it ("" otherwise)."""
        job = self._jobs.get(job_id)
        return "" if job is None else job.activity

    def incoming_dir(self) -> Path:
        """A fresh directory for a request being received (before the job has an id)."""
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=INCOMING_PREFIX, dir=self.jobs_dir))

    @staticmethod
    def calibration_path(incoming: Path) -> Path:
        return incoming / CALIBRATION_FILE

    @staticmethod
    def source_path(incoming: Path) -> Path:
        """Where the model's bytes go, checked, for the worker to read."""
        return incoming / SOURCE_FILE

    @staticmethod
    def previous_path(incoming: Path) -> Path:
        """Where the previous static int8 artifact's bytes go, checked."""
        return incoming / PREVIOUS_FILE

    async def submit(self, record: CompressionJobRecord, plan: JobPlan, incoming: Path) -> None:
        """Move the received files to the job's directory and queue it in the pool."""
        directory = self.jobs_dir / str(record.id)
        try:
            await asyncio.to_thread(os.replace, incoming, directory)
        except OSError as exc:
            log.error("compression job %d: cannot prepare %s: %s", record.id, directory, exc)
            await asyncio.to_thread(_remove, incoming)
            result = JobResult(JobState.FAILED, error=f"cannot prepare the job's directory: {exc}")
            await asyncio.to_thread(self._store.finish_compression_job, record.id, result)
            return
        spec = WorkerSpec(
            job_id=record.id,
            name=record.model_name,
            device_class_json=plan.device_class.model_dump_json(),
            max_size_ratio=plan.max_size_ratio,
            out_dir=directory / "out",
            progress_path=directory / "progress.jsonl",
            cancel_path=directory / "cancel",
            source_onnx=self.source_path(directory) if plan.model is not None else None,
            calibration=directory / CALIBRATION_FILE if plan.model is not None else None,
            workload=plan.workload,
            previous=self.previous_path(directory) if plan.previous is not None else None,
        )
        job = _Job(record, plan, spec, directory, ProgressReader(spec.progress_path))
        self._jobs[record.id] = job
        job.task = asyncio.create_task(self._follow(job), name=f"compression-job-{record.id}")

    async def cancel(self, job_id: int) -> bool:
        """Ask a job of this controller to stop; False when it does not run here."""
        job = self._jobs.get(job_id)
        if job is None:
            return False
        job.cancel_requested = True
        if job.future is None:  # still waiting for a worker: it ends at once
            job.stop.set()
            if job.task is not None:
                await asyncio.shield(job.task)
            return True
        try:
            await asyncio.to_thread(job.spec.cancel_path.touch)
        except FileNotFoundError:
            # its directory is gone: the job ended meanwhile and is being cleaned up (its
            # follower sees cancel_requested); not the caller's error, never INTERNAL
            log.info("compression job %d ended while it was being cancelled", job_id)
        return True

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self._config.compression_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=init_worker,
                initargs=(
                    self._config.compression_threads,
                    self.jobs_dir / self._worker_prefix,
                    logging.getLogger().getEffectiveLevel(),
                ),
            )
        return self._pool

    def _start(self, job: _Job) -> tuple[ProcessPoolExecutor, Future[WorkerResult]]:
        pool = self._executor()
        try:
            return pool, pool.submit(run_job, job.spec)
        except BrokenProcessPool:  # a worker died earlier: start a fresh pool
            self._discard(pool)
            pool = self._executor()
            return pool, pool.submit(run_job, job.spec)

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        """Forget a broken pool (once: several jobs may learn that it broke)."""
        if self._pool is pool:
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- following
    async def _follow(self, job: _Job) -> None:
        job_id = job.record.id
        try:
            result = await self._run(job)
        except Exception:
            log.exception("compression job %d: finishing it failed", job_id)
            result = JobResult(JobState.FAILED, error=FINISHING_FAILED)
        await asyncio.to_thread(_remove, job.directory)  # before anyone learns it ended
        try:
            await asyncio.to_thread(self._store.finish_compression_job, job_id, result)
        except Exception:
            log.exception("compression job %d: recording its end failed", job_id)
        why = f": {result.error}" if result.error else ""
        log.info("compression job %d ended %s%s", job_id, result.state.value, why)
        self._jobs.pop(job_id, None)
        self._watchers.notify(job_id)

    async def _run(self, job: _Job) -> JobResult:
        if not await self._worker_free(job):
            if job.cancel_requested:
                return JobResult(JobState.CANCELLED)
            return JobResult(JobState.FAILED, error=STOPPED)
        try:
            result = await self._compute(job)
        finally:
            self._workers.release()
        return await self._publish(job) if result is None else result

    async def _worker_free(self, job: _Job) -> bool:
        """Wait for a worker of our own pool (held until `_compute` returns); False when
        the job is cancelled, or the controller stops, while it waits."""
        if job.cancel_requested or self._closing:
            return False
        acquire = asyncio.ensure_future(self._workers.acquire())
        stopped = asyncio.ensure_future(job.stop.wait())
        await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not acquire.done():
            acquire.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acquire
        if acquire.cancelled():
            return False
        if job.cancel_requested or self._closing:
            self._workers.release()
            return False
        return True

    async def _compute(self, job: _Job) -> JobResult | None:
        """Run the job in a worker: its result, or None when there is a model to publish."""
        for attempt in range(1, START_ATTEMPTS + 1):
            if self._closing:
                return JobResult(JobState.FAILED, error=STOPPED)
            if job.cancel_requested:
                return JobResult(JobState.CANCELLED)
            pool, future = self._start(job)
            job.future = future
            waiter = asyncio.wrap_future(future)
            done: set[asyncio.Future[WorkerResult]] = set()
            while not done:
                done, _ = await asyncio.wait({waiter}, timeout=TAIL_SECONDS)
                await self._drain(job)
            if future.cancelled():
                if job.cancel_requested:
                    return JobResult(JobState.CANCELLED)
                return JobResult(JobState.FAILED, error=STOPPED)
            error = waiter.exception()  # through the waiter, so asyncio sees it retrieved
            if isinstance(error, BrokenProcessPool):
                self._discard(pool)
                if self._closing:
                    return JobResult(JobState.FAILED, error=STOPPED)
                if job.pid is None and attempt < START_ATTEMPTS:
                    continue  # another job's worker died; this one never started: retry
                log.error("compression job %d: its worker process died", job.record.id)
                return JobResult(JobState.FAILED, error=DIED)
            if error is not None:
                raise error
            outcome = future.result()
            if outcome.cancelled or job.cancel_requested:
                return JobResult(JobState.CANCELLED)
            if outcome.error:
                return JobResult(JobState.FAILED, error=outcome.error)
            return None
        raise AssertionError("unreachable: the last attempt returns")  # pragma: no cover

    async def _drain(self, job: _Job) -> None:
        """Copy new progress lines into the database and wake the job's watchers."""
        lines = await asyncio.to_thread(job.progress.read_new)
        if not lines:
            return
        for line in lines:
            if isinstance(line, Started):
                job.pid = line.pid
                await asyncio.to_thread(self._store.start_compression_job, job.record.id)
            elif isinstance(line, Activity):
                job.activity = line.text
            elif isinstance(line, Warned):
                await asyncio.to_thread(self._store.add_event, _warning_event(job, line.text))
            else:
                await asyncio.to_thread(
                    self._store.add_compression_trial, job.record.id, line.record()
                )
        self._watchers.notify(job.record.id)

    async def _publish(self, job: _Job) -> JobResult:
        out = job.spec.out_dir
        manifest = await asyncio.to_thread(JobManifest.read, out / "manifest.json")
        model = job.plan.model
        try:
            if model is None:
                model = await self._publisher.register_source(
                    job.plan.workload,
                    out / "source.onnx",
                    f"source model of workload {job.plan.workload} "
                    f"(registered by compression job {job.record.id})",
                )
            metrics = {**manifest.metrics, "budgets_met": 1.0 if manifest.met else 0.0}
            artifact = await self._publisher.publish_compressed(
                model,
                job.record.device_class,
                out / "model.onnx",
                manifest.recipe or (RecipeStep(kind="identity"),),
                metrics,
            )
        except FleetError as exc:
            return JobResult(
                JobState.FAILED, error=f"the compressed model could not be published: {exc}"
            )
        return JobResult(
            JobState.SUCCEEDED if manifest.met else JobState.NOT_MET,
            artifact_id=artifact.id,
            model_version=model.version,
            recipe=manifest.recipe_text,
            verdicts=manifest.verdicts(),
        )


def _warning_event(job: _Job, text: str) -> NewEvent:
    """A job's warning, kept in the event log: `homefleet jobs watch` and `compress
    --controller` print it (CompressionJob.warnings), and `homefleet events` lists it."""
    r = job.record
    return NewEvent(
        JOB_WARNING_EVENT,
        f"{r.model_name}/{r.device_class}",
        f"compression job {r.id} ({r.model_name}/{r.device_class}): {text}",
        {"job_id": r.id, "model_name": r.model_name, "device_class": r.device_class, "text": text},
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _run_name(process: psutil.Process) -> str:
    """A controller run: its pid and start time (a pid alone may be reused)."""
    return f"(pid {process.pid}, started {process.create_time():.2f})"


_RUN_NAME = re.compile(r" \(pid (\d+), started (\d+\.\d+)\)$")


def _running(pid: int, started: float) -> bool:
    """Is process ``pid``, started at ``started`` (epoch seconds), still there?"""
    try:
        return bool(abs(psutil.Process(pid).create_time() - started) < 0.02)
    except psutil.Error:
        return False


def _run_ended(owner: str, place: str) -> bool:
    """Is ``owner`` a run of the controller at ``place`` (host and data directory) whose
    process has ended? A name without a run (from before runs were named) has."""
    if owner == place:
        return True
    run = _RUN_NAME.fullmatch(owner[len(place) :]) if owner.startswith(place) else None
    if run is None:
        return False  # another host or data directory: its lease decides
    return not _running(int(run[1]), float(run[2]))


def _live_workers(name: str) -> bool:
    """A scratch directory ``.worker-<controller pid>-<pid>`` of a controller still running
    (another one on this data directory)."""
    if not name.startswith(WORKER_PREFIX):
        return False
    controller_pid = name[len(WORKER_PREFIX) :].split("-")[0]
    return controller_pid.isdigit() and bool(psutil.pid_exists(int(controller_pid)))
