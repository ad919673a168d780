"""Compression-job operations, free of gRPC: start, get, watch, list, cancel.

Start checks everything before it records anything: the source (a registered model or
a known workload), the device class, the budget overrides, the calibration data and
whether a job for the same (model, class) is already active. A refusal leaves no row,
no event and no file behind (but for a ``blob.corrupt`` event: see below). When the class
already has a static int8 artifact of the model, the job is given its bytes, so a
re-release first tries reusing its quantization parameters (a small delta for the devices
that hold it; see compression/requantize.py).

The stored blobs a job reads (the model, that artifact) are copied into its directory
through a digest-checked read before the job is recorded (``integrity.py``). A corrupt
model refuses the job with DATA_LOSS naming it and the fix; a corrupt previous artifact is
only not reused, since the job makes the artifact that replaces it. Either is recorded
once as a ``blob.corrupt`` event and refused by downloads from then on.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

from artifact.manifest import InvalidManifestError, Manifest
from controller import validate
from controller.admin import in_thread, stored_model
from controller.blobstore import BlobStore
from controller.compression.budgets import quality_budget_problem
from controller.compression.recipe import made_static_int8
from controller.config import ControllerConfig
from controller.device_classes import DeviceClass
from controller.errors import ErrorCode, FleetError, invalid, not_found
from controller.integrity import BlobIntegrity, StoredBlob
from controller.jobs.request import (
    apply_overrides,
    check_calibration_file,
    device_class_yaml,
    parse_device_class,
)
from controller.jobs.runner import JobPlan, JobRunner
from controller.jobs.watchers import JobWatchers
from controller.records import (
    ArtifactRecord,
    CompressionInputs,
    CompressionJobRecord,
    CompressionStart,
    NewCompressionJob,
)
from controller.store import Store, all_artifacts
from controller.workloads.names import UNLABELLED_WORKLOADS, WORKLOAD_NAMES

log = logging.getLogger(__name__)

DEFAULT_JOB_LIMIT = 100
MAX_JOB_LIMIT = 1000
# Watchers re-read the job this often even without a wake-up (a job on another replica).
WATCH_REREAD_SECONDS = 2.0
COPY_CHUNK_BYTES = 1024 * 1024


def previous_static_int8_artifact(
    store: Store, blobs: BlobStore, model_name: str, device_class: str
) -> ArtifactRecord | None:
    """The class's latest artifact of the model made by static int8 quantization, if the
    store still holds its bytes (blocking: run in a thread)."""
    for artifact in all_artifacts(store, model_name, device_class, newest_first=True):
        try:
            recipe = Manifest.from_json_bytes(artifact.manifest_json).recipe
        except InvalidManifestError:
            continue
        if made_static_int8(recipe) and blobs.exists(artifact.sha256):
            return artifact
    return None


def previous_static_int8(
    store: Store, blobs: BlobStore, model_name: str, device_class: str
) -> Path | None:
    """The blob of ``previous_static_int8_artifact`` (blocking: run in a thread)."""
    artifact = previous_static_int8_artifact(store, blobs, model_name, device_class)
    return None if artifact is None else blobs.path_for(artifact.sha256)


class CompressionHandlers:
    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        config: ControllerConfig,
        runner: JobRunner,
        watchers: JobWatchers,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._integrity = BlobIntegrity(store, blobs)
        self._config = config
        self._runner = runner
        self._watchers = watchers

    # ---------------------------------------------------------------- start
    async def start(
        self, request: CompressionStart, calibration: AsyncIterator[bytes]
    ) -> CompressionJobRecord:
        """Check the request, receive the calibration data, record the job and queue it."""
        plan = await self._plan(request)
        name = plan.model.name if plan.model is not None else plan.workload
        active = await in_thread(self._store.active_compression_job, name, plan.device_class.name)
        if active is not None:
            raise FleetError(
                ErrorCode.ALREADY_EXISTS,
                f"compression job {active.id} for {name}/{plan.device_class.name} is already "
                f"{active.state.value}; follow it (`homefleet jobs watch {active.id}`) or "
                f"cancel it (`homefleet jobs cancel {active.id}`), then start again",
            )
        if self._runner.active >= self._config.max_active_jobs:
            raise FleetError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"this controller already has {self._runner.active} compression jobs queued or "
                f"running (at most {self._config.max_active_jobs}); retry when some have ended",
            )
        incoming = await in_thread(self._runner.incoming_dir)
        calibration_sha256 = ""
        try:
            plan = await self._copy_inputs(plan, incoming)
            if plan.model is not None:
                target = JobRunner.calibration_path(incoming)
                await self._receive(calibration, target, request.calibration_bytes)
                source = JobRunner.source_path(incoming)
                await in_thread(check_calibration_file, target, source)
                # kept (content-addressed) so the budget loop can recompress without it
                kept = await in_thread(self._blobs.put, _chunks(target))
                calibration_sha256 = kept.sha256
                if kept.repaired:  # the fix the budget loop names for corrupt calibration
                    await self._integrity.repaired(
                        StoredBlob.of_calibration(kept.sha256, name, plan.device_class.name),
                        f"starting a compression of {name} for {plan.device_class.name}",
                    )
            else:
                async for _ in calibration:
                    raise invalid(
                        "a workload brings its own data: send no calibration bytes with it"
                    )
            record = await in_thread(
                self._store.create_compression_job,
                NewCompressionJob(
                    model_name=name,
                    model_version=plan.model.version if plan.model is not None else None,
                    workload=plan.workload,
                    device_class=plan.device_class.name,
                    owner=self._runner.owner,
                    inputs=CompressionInputs(
                        calibration_sha256,
                        device_class_yaml(plan.device_class),
                        plan.max_size_ratio,
                    ),
                ),
            )
        except BaseException:
            await in_thread(shutil.rmtree, incoming, True)
            raise
        await self._runner.submit(record, plan, incoming)
        return record

    async def _plan(self, request: CompressionStart) -> JobPlan:
        if bool(request.model_name) == bool(request.workload):
            raise invalid(
                "name exactly one source: model (a registered ONNX model, with calibration "
                "data) or workload (a reference workload, e.g. basic-motions)"
            )
        budgeted = apply_overrides(parse_device_class(request.device_class_yaml), request.budgets)
        if request.calibration_bytes > self._config.max_model_bytes:
            raise FleetError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"the calibration data is {request.calibration_bytes} bytes; this controller "
                f"accepts at most {self._config.max_model_bytes} bytes (max_model_bytes)",
            )
        if request.workload:
            validate.name(request.workload, "workload")
            if request.calibration_bytes:
                raise invalid(
                    "a workload brings its own data: calibration_bytes must be 0 for a workload"
                )
            if request.workload not in WORKLOAD_NAMES:  # torch-free: no registry import
                raise invalid(
                    f"unknown workload {request.workload!r}; known workloads: "
                    f"{', '.join(WORKLOAD_NAMES)}"
                )
            _check_quality_budget(
                budgeted.device_class,
                labelled=request.workload not in UNLABELLED_WORKLOADS,
                source=f"workload {request.workload}",
            )
            previous = await in_thread(
                previous_static_int8_artifact,
                self._store,
                self._blobs,
                request.workload,
                budgeted.device_class.name,
            )
            return JobPlan(
                None,
                request.workload,
                budgeted.device_class,
                budgeted.max_size_ratio,
                previous,
            )
        validate.name(request.model_name, "model.name")
        _check_quality_budget(
            budgeted.device_class, labelled=False, source=f"model {request.model_name}"
        )
        if request.model_version is not None:
            validate.int_range(request.model_version, "model.version", 1, 2**31 - 1)
        if request.calibration_bytes == 0:
            raise invalid(
                "an ONNX model is judged by its fidelity on calibration inputs: send an .npz "
                "with one array per model input, named after it (calibration_bytes > 0)"
            )
        model = await stored_model(
            self._store, self._blobs, request.model_name, request.model_version
        )
        previous = await in_thread(
            previous_static_int8_artifact,
            self._store,
            self._blobs,
            model.name,
            budgeted.device_class.name,
        )
        return JobPlan(
            model,
            "",
            budgeted.device_class,
            budgeted.max_size_ratio,
            previous,
        )

    async def _copy_inputs(self, plan: JobPlan, incoming: Path) -> JobPlan:
        """Copy the stored blobs the job reads into ``incoming``, checking their digests.

        A corrupt model refuses the job (DATA_LOSS); a corrupt previous artifact is not
        reused (the plan comes back without it): refusing would block the very
        compression that makes the artifact to replace it.
        """
        device_class = plan.device_class.name
        if plan.model is not None:
            model = plan.model
            try:
                await self._integrity.copy_sound(
                    StoredBlob.of_model(model),
                    JobRunner.source_path(incoming),
                    "starting a compression job",
                    f"no compression job of it is started for {device_class}",
                )
            except FileNotFoundError as exc:  # deleted since _plan looked
                raise FleetError(
                    ErrorCode.FAILED_PRECONDITION,
                    f"the bytes of model {model.name} v{model.version} ({model.sha256}) are "
                    "missing from the blob store; add the model again",
                ) from exc
        if plan.previous is None:
            return plan
        blob = StoredBlob.of_artifact(
            plan.previous,
            f"assign the artifact this compression makes for {device_class} in its place",
        )
        try:
            error = await in_thread(
                self._integrity.copy_checked, blob, JobRunner.previous_path(incoming)
            )
        except FileNotFoundError:
            return dataclasses.replace(plan, previous=None)  # gone meanwhile: nothing to reuse
        if error is None:
            return plan
        message = await self._integrity.found_corrupt(
            blob,
            error,
            f"starting a compression of {plan.previous.model_name} for {device_class}",
            "compression does not reuse its quantization parameters (it starts from the "
            "model alone)",
        )
        log.warning("%s", message)
        return dataclasses.replace(plan, previous=None)

    async def _receive(self, chunks: AsyncIterator[bytes], target: Path, expected: int) -> None:
        """Write the calibration bytes to ``target``: exactly as many as announced."""
        received = 0
        with target.open("wb") as f:
            async for data in chunks:
                received += len(data)
                if received > expected:
                    raise invalid(
                        f"received more than the {expected} calibration bytes the header "
                        "announced (calibration_bytes); send exactly the file's size"
                    )
                await in_thread(f.write, data)
        if received != expected:
            raise invalid(
                f"received {received} calibration bytes but the header announced {expected} "
                "(calibration_bytes); the upload was cut short or the size is wrong"
            )

    # ---------------------------------------------------------------- reading
    async def get(self, job_id: int) -> CompressionJobRecord:
        validate.int_range(job_id, "id", 1, validate.MAX_INT64)
        job = await in_thread(self._store.get_compression_job, job_id)
        if job is None:
            raise not_found(f"compression job {job_id} does not exist; list them: `homefleet jobs`")
        warnings = tuple(await in_thread(self._store.job_warnings, job))
        if job.state.active:
            return dataclasses.replace(
                job, activity=self._runner.activity(job_id), warnings=warnings
            )
        return dataclasses.replace(job, warnings=warnings)

    async def watch(
        self, job_id: int, send: Callable[[CompressionJobRecord], Awaitable[None]]
    ) -> None:
        """Send the job now and whenever it changes; return once it has ended."""
        job = await self.get(job_id)
        with self._watchers.subscribe(job_id) as sub:
            last: CompressionJobRecord | None = None
            while True:
                if job != last:
                    await send(job)
                    last = job
                if not job.state.active or sub.closed:
                    return
                await sub.wait(WATCH_REREAD_SECONDS)
                job = await self.get(job_id)

    async def list(
        self, model_name: str, device_class: str, limit: int
    ) -> list[CompressionJobRecord]:
        validate.int_range(limit, "limit", 0, MAX_JOB_LIMIT)
        return await in_thread(
            self._store.list_compression_jobs,
            validate.optional_name(model_name, "model_name"),
            validate.optional_name(device_class, "device_class"),
            limit or DEFAULT_JOB_LIMIT,
        )

    # ---------------------------------------------------------------- cancel
    async def cancel(self, job_id: int) -> CompressionJobRecord:
        """Cancel a queued job at once, a running one after its current trial (the job
        comes back as it is now: watch it to see it end)."""
        job = await self.get(job_id)
        if not job.state.active:
            raise FleetError(
                ErrorCode.FAILED_PRECONDITION,
                f"compression job {job_id} has already ended ({job.state.value}); "
                "nothing to cancel",
            )
        if not await self._runner.cancel(job_id):
            raise FleetError(
                ErrorCode.FAILED_PRECONDITION,
                f"compression job {job_id} runs on another controller ({job.owner}); "
                "cancel it there",
            )
        return await self.get(job_id)


def _chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(size):
            yield chunk


def _check_quality_budget(device_class: DeviceClass, *, labelled: bool, source: str) -> None:
    """INVALID_ARGUMENT for a job whose chosen artifact's quality nobody would judge."""
    problem = quality_budget_problem(device_class.budgets, labelled=labelled, source=source)
    if problem is not None:
        raise invalid(f"{problem} (device class {device_class.name})")
