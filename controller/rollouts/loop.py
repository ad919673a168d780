"""The budget loop: notice a class missing its budget, recompress, canary, promote or roll back.

Each ``tick`` looks at every (device class, model) assigned to a whole class:

1. **Judge** the class's artifact on the last K telemetry slices (``check``). K missed
   slices in a row start one rollout, recorded as a ``budget.miss`` decision with the
   numbers. Only telemetry sent after the artifact was assigned and after the previous
   rollout ended counts, and a cool-down follows every rollout; it doubles with every
   rollout in a row that was rolled back or failed (``backoff``), until a promotion or
   the class meeting its budget again.
2. **Recompress**: the job that made the artifact runs again from the same source and
   calibration data, with the class's latency model recalibrated (the planner predicts
   ``measured / relative_speed``; the speed that job planned with is scaled by its
   predicted / observed p95, so what earlier rollouts learned is kept) and the p95
   target tightened by the policy's margin (``rollout.recompress``).
3. **Canary**: the candidate goes to a share of the class's devices (per-device
   assignments; ``rollout.canary``). Bytes the loop already judged for the pair (the
   baseline's, a candidate rolled back or failed on, a baseline that missed) are not
   canaried again: the rollout fails saying which rollout judged them. Nor are they
   published again: a job that makes them gets the earlier artifact back instead of a
   new version with the same bytes (``vet_publication``, which the admin handlers ask
   before they sign a compression job's artifact).
4. **Promote** when the canary meets the budgets K slices in a row, or when it is
   still over budget but clearly better than the rest of the class on the same slices
   (p95 at least 10 % lower, energy no higher: an improvement is kept and the next miss
   recompresses again); **roll back** what is not better, or gives no verdict before
   the timeout. The rest of the class is the baseline on the devices that are not
   canaries, after the canary started, with enough inferences in every slice; without
   it the canary is compared with the numbers of the miss that started the rollout. A
   rollback re-assigns the baseline to the class, which re-releases it under a new
   signed version (agents refuse older versions). Both are recorded with the numbers.

Operators steer it (``RolloutHandlers``): a **pause** of a (class, model) stops every
action for the pair — no new rollout, and an active one holds where it is (a
recompression's candidate waits, a canary keeps its devices and is neither promoted nor
rolled back); its telemetry is still judged and the verdict kept on the pause. A
canary's timeout does not run while paused: the paused time is credited to it on
resume. An **abort** ends an active rollout now: its job is cancelled, canaries go back
to the baseline as in a rollback, and the cool-down follows.

All state lives in the database (``RolloutStore``): a restarted controller, or another
replica, carries a rollout on from where it stands, and a pause holds on all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from artifact.manifest import Manifest
from controller.admin import AdminHandlers, in_thread
from controller.blobstore import BlobStore
from controller.clock import unix_ms
from controller.compression.budgets import MEASURED_ON_DEVICE
from controller.config import BudgetPolicy
from controller.device_classes import Budgets, DeviceClass
from controller.errors import ErrorCode, FleetError, not_found
from controller.fleet_classes import DeviceClassRegistry
from controller.integrity import BlobIntegrity, StoredBlob
from controller.jobs.handlers import CompressionHandlers
from controller.jobs.request import device_class_yaml, parse_device_class
from controller.jobs.runner import START_AGAIN
from controller.notify import AssignmentNotifier
from controller.records import (
    ArtifactRecord,
    AssignTarget,
    BudgetOverrides,
    CompressionJobRecord,
    CompressionStart,
    JobState,
    NewEvent,
    TargetKind,
)
from controller.rollouts.backoff import BUDGET_MET, HISTORY, Backoff
from controller.rollouts.check import BudgetCheck, SliceVerdict, check, slice_bounds
from controller.rollouts.records import (
    NewRollout,
    PauseRecord,
    RolloutChange,
    RolloutRecord,
    RolloutState,
)
from controller.rollouts.store import (
    ABORTED_KEY,
    CANDIDATE_JUDGED,
    PAUSED_MS,
    ClassAssignment,
    RolloutStore,
)
from controller.store import Store, all_devices

log = logging.getLogger(__name__)

# Verdicts a device measures; a candidate that misses only these may still be tried on a
# canary (the planner's latency model is an estimate, the canary measures). A candidate
# missing accuracy, fidelity or size is never shipped.
DEVICE_BUDGETS = MEASURED_ON_DEVICE
MIN_SPEED, MAX_SPEED = 1e-4, 100.0


@dataclass(frozen=True)
class Recalibration:
    """The class's speed before and after the observed-to-predicted correction."""

    speed_before: float
    speed_after: float
    predicted_p95_ms: float | None
    observed_p95_ms: float | None
    basis: str  # where speed_before comes from: "as job 5 planned", "as declared"


class RolloutLoop:
    def __init__(
        self,
        store: Store,
        rollouts: RolloutStore,
        blobs: BlobStore,
        admin: AdminHandlers,
        compression: CompressionHandlers,
        notifier: AssignmentNotifier,
        classes: DeviceClassRegistry,
        policy: BudgetPolicy,
        clock: Callable[[], int] = unix_ms,
    ) -> None:
        self._store = store
        self._rollouts = rollouts
        self._blobs = blobs
        self._integrity = BlobIntegrity(store, blobs)
        self._admin = admin
        self._compression = compression
        self._notifier = notifier
        self._classes = classes
        self._policy = policy
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        # one tick (or abort) at a time in this process: an abort never lands between a
        # tick's canary assignments and the transition that records them
        self._lock = asyncio.Lock()
        # what a compression job makes is checked before it is published (see
        # ``vet_publication``): every job, the loop's own and an operator's
        admin.add_publish_check(self.vet_publication)

    @contextlib.asynccontextmanager
    async def between_ticks(self) -> AsyncIterator[None]:
        """Hold this process's ticks off: an operator's change (a pause) lands between two
        ticks, so once it is made no tick here still acts on what it saw before."""
        async with self._lock:
            yield

    @property
    def classes(self) -> DeviceClassRegistry:
        """The device classes the loop watches (declared with --device-classes)."""
        return self._classes

    # ---------------------------------------------------------------- running
    def start(self) -> None:
        """Tick every ``policy.check_seconds`` in the background (0: only when called)."""
        if self._policy.check_seconds > 0 and self._classes.classes and self._task is None:
            self._task = asyncio.create_task(self._run(), name="budget-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._policy.check_seconds)
            try:
                await self.tick()
            except Exception:  # a bad tick must not end the loop; the next one retries
                log.exception("budget loop tick failed")

    async def tick(self, now_unix_ms: int | None = None) -> None:
        """Carry every active rollout on, then judge every class assignment once."""
        async with self._lock:
            now = self._clock() if now_unix_ms is None else now_unix_ms
            paused = {p.key: p for p in await in_thread(self._rollouts.pauses)}
            # one (model, class) that fails must not hold the others up: each is logged
            # and tried again next tick
            for rollout in await in_thread(self._rollouts.active):
                try:
                    if (rollout.model_name, rollout.device_class) in paused:
                        await self._hold(rollout, now)
                    else:
                        await self._advance(rollout, now)
                except Exception:
                    log.exception("rollout %d could not be carried on", rollout.id)
            for assignment in await in_thread(self._rollouts.class_assignments):
                key = (assignment.model_name, assignment.device_class)
                try:
                    await self._judge(assignment, now, paused.get(key))
                except Exception:
                    log.exception(
                        "judging %s on %s failed", assignment.model_name, assignment.device_class
                    )

    # ---------------------------------------------------------------- 1. judge
    async def _judge(
        self, assignment: ClassAssignment, now: int, pause: PauseRecord | None = None
    ) -> None:
        device_class = self._classes.get(assignment.device_class)
        if device_class is None or not _watched(device_class.budgets):
            return
        history = await in_thread(
            lambda: self._rollouts.list(
                HISTORY, model_name=assignment.model_name, device_class=assignment.device_class
            )
        )
        latest = history[0] if history else None
        if latest is not None and latest.state.active:
            return
        if pause is not None:
            await self._judge_paused(assignment, device_class, now)
            return
        fresh_from = assignment.updated_unix_ms
        if (
            latest is not None
            and latest.state is RolloutState.FAILED
            and not latest.detail.get("retry")
            and latest.baseline_artifact_id == assignment.artifact_id
        ):
            return  # not retried on the same artifact: the failure said what to do
        backoff = Backoff.of(history, self._policy.cooldown_seconds)
        waited_ms: int | None = None
        if latest is not None and latest.finished_unix_ms is not None:
            waited_ms = now - latest.finished_unix_ms
            if waited_ms < self._policy.cooldown_seconds * 1000:
                return
            fresh_from = max(fresh_from, latest.finished_unix_ms)
        bounds = slice_bounds(now, self._policy.window_ms, self._policy.windows_in_a_row)
        if bounds[0][0] < fresh_from:
            return  # not K whole slices of this artifact yet
        artifact = await in_thread(self._store.get_artifact, assignment.artifact_id)
        if artifact is None:
            return
        slices = await in_thread(
            self._rollouts.slices,
            assignment.device_class,
            assignment.model_name,
            artifact.sha256,
            bounds,
        )
        verdict = check(device_class.budgets, slices, self._policy.min_samples)
        if verdict.met and backoff.misses and latest is not None:
            # within budget again: the rollouts that fixed nothing no longer count
            await in_thread(self._rollouts.note, latest.id, {BUDGET_MET: now})
            log.info(
                "%s on %s meets its budget again: the back-off after rollout %d is reset",
                assignment.model_name,
                assignment.device_class,
                latest.id,
            )
        elif verdict.missed and (waited_ms is None or waited_ms >= backoff.seconds * 1000):
            await self._start_rollout(device_class, artifact, verdict)

    async def _judge_paused(
        self, assignment: ClassAssignment, device_class: DeviceClass, now: int
    ) -> None:
        """Judge a paused pair's last K slices as usual, but only keep the verdict on the
        pause (for `homefleet rollouts`): no rollout starts, the back-off is left alone."""
        artifact = await in_thread(self._store.get_artifact, assignment.artifact_id)
        if artifact is None:
            return
        bounds = slice_bounds(now, self._policy.window_ms, self._policy.windows_in_a_row)
        verdict = check(
            device_class.budgets,
            await in_thread(
                self._rollouts.slices,
                assignment.device_class,
                assignment.model_name,
                artifact.sha256,
                bounds,
            ),
            self._policy.min_samples,
        )
        if verdict.missed:
            said = f"misses its budget ({'; '.join(verdict.reasons) or over_budget(verdict)})"
            said += ": a rollout would start, but the pair is paused"
        elif verdict.met:
            said = "within budget"
        else:
            said = "no verdict"
        await in_thread(
            self._rollouts.note_verdict,
            assignment.model_name,
            assignment.device_class,
            f"{artifact.id} {said}: {verdict.summary()}",
            now,
        )

    async def _hold(self, rollout: RolloutRecord, now: int) -> None:
        """A paused pair's active rollout stays where it is; what it would be judged on is
        kept on the pause (the canary's slices since it started, or the job's state)."""
        if rollout.state is RolloutState.CANARY:
            device_class = self._classes.get(rollout.device_class)
            candidate = await in_thread(self._store.get_artifact, rollout.candidate_artifact_id)
            if device_class is None or candidate is None:
                return
            since = rollout.canary_since_unix_ms or rollout.updated_unix_ms
            bounds = slice_bounds(now, self._policy.window_ms, self._policy.windows_in_a_row)
            after = [(max(start, since), max(start, since, end)) for start, end in bounds]
            canary = check(
                device_class.budgets,
                await in_thread(
                    self._rollouts.slices,
                    rollout.device_class,
                    rollout.model_name,
                    candidate.sha256,
                    after,
                ),
                self._policy.min_samples,
            )
            said = (
                f"rollout {rollout.id} holds its canary {candidate.id} on "
                f"{', '.join(rollout.canary_devices)}: canary {canary.summary()}"
            )
        else:
            job = None
            if rollout.job_id is not None:
                job = await in_thread(self._store.get_compression_job, rollout.job_id)
            doing = f"compression job {job.id} is {job.state.value}" if job else "no job yet"
            said = f"rollout {rollout.id} holds before its canary ({doing})"
        await in_thread(
            self._rollouts.note_verdict, rollout.model_name, rollout.device_class, said, now
        )

    async def _start_rollout(
        self, device_class: DeviceClass, artifact: ArtifactRecord, verdict: BudgetCheck
    ) -> None:
        job, made_it = await self._source_job(artifact)
        recal = await self._recalibrate(device_class, job, made_it, verdict)
        budget_ms = device_class.budgets.p95_latency_ms
        target = budget_ms * self._policy.latency_margin if budget_ms is not None else None
        subject = f"{device_class.name}/{artifact.model_name}"
        numbers = _numbers(device_class.budgets, verdict)
        rollout = await in_thread(
            self._rollouts.start,
            NewRollout(
                model_name=artifact.model_name,
                device_class=device_class.name,
                baseline_artifact_id=artifact.id,
                relative_speed=recal.speed_after,
                p95_target_ms=target,
                reason="; ".join(verdict.reasons),
                detail={"miss": numbers},
            ),
            NewEvent(
                "budget.miss",
                subject,
                f"{artifact.id} misses its budget on {device_class.name} "
                f"{self._policy.windows_in_a_row} windows in a row: "
                f"{'; '.join(verdict.reasons)} ({verdict.summary()})",
                {
                    "device_class": device_class.name,
                    "model": artifact.model_name,
                    "artifact_id": artifact.id,
                    **numbers,
                },
            ),
        )
        if rollout is None:
            return  # another replica (or tick) started it first
        log.info("budget miss: %s %s; rollout %d", subject, verdict.summary(), rollout.id)
        if job is None:
            await self._fail(
                rollout,
                f"{artifact.model_name} was never compressed for {device_class.name} by this "
                "controller, so there is no job to run again; start one with "
                "`homefleet compress --controller` and assign the result",
            )
            return
        try:
            started = await self._restart_job(job, device_class, recal.speed_after, target)
        except (FleetError, OSError, ValueError) as exc:
            await self._fail(rollout, f"the recompression could not start: {exc}", retry=True)
            return
        await in_thread(
            self._rollouts.advance,
            rollout.id,
            RolloutState.RECOMPRESSING,
            RolloutChange(
                RolloutState.RECOMPRESSING,
                # true for as long as it is shown (a pause can hold it past the job's end)
                f"compression job {started.id} started; `homefleet jobs watch {started.id}` "
                "follows it",
                job_id=started.id,
            ),
            [
                NewEvent(
                    "rollout.recompress",
                    subject,
                    f"recompressing {artifact.model_name} for {device_class.name} (job "
                    f"{started.id}): relative speed {recal.speed_before:.4g} ({recal.basis}) "
                    f"-> {recal.speed_after:.4g} (observed/predicted p95 "
                    f"{_fmt(recal.observed_p95_ms)} / {_fmt(recal.predicted_p95_ms)} ms), "
                    f"p95 target {_fmt(target)} ms",
                    {
                        "device_class": device_class.name,
                        "model": artifact.model_name,
                        "job_id": started.id,
                        "relative_speed_before": recal.speed_before,
                        "relative_speed_after": recal.speed_after,
                        "relative_speed_basis": recal.basis,
                        "predicted_p95_ms": recal.predicted_p95_ms,
                        "observed_p95_ms": recal.observed_p95_ms,
                        "p95_target_ms": target,
                    },
                )
            ],
        )

    async def _source_job(
        self, artifact: ArtifactRecord
    ) -> tuple[CompressionJobRecord | None, bool]:
        """The job to run again, and whether it made ``artifact``'s bytes.

        The job that made them (followed through re-releases), else the latest job for
        the same (model, class) that produced something: an artifact assigned by hand
        is recompressed from the inputs the controller last compressed this model with.
        """
        current: ArtifactRecord | None = artifact
        for _ in range(32):  # a re-release names an older artifact; never a cycle
            if current is None:
                break
            job = await in_thread(self._store.compression_job_of_artifact, current.id)
            if job is not None:
                return job, True
            older = Manifest.from_json_bytes(current.manifest_json).rereleases
            if not older:
                break
            current = await in_thread(self._store.get_artifact, older)
        jobs = await in_thread(
            self._store.list_compression_jobs, artifact.model_name, artifact.device_class, 50
        )
        done = [j for j in jobs if j.state in (JobState.SUCCEEDED, JobState.NOT_MET)]
        return (done[0] if done else None), False

    async def _recalibrate(
        self,
        device_class: DeviceClass,
        job: CompressionJobRecord | None,
        made_it: bool,
        verdict: BudgetCheck,
    ) -> Recalibration:
        """Scale the speed the baseline was planned with by its predicted / observed p95.

        The prediction and the speed come from the same plan: the job that made the
        baseline predicted ``measured / speed`` with the speed in its own inputs (the
        declared one, or one an earlier rollout learned). Pairing that prediction with
        any other speed (the declared one, when a re-release hides which rollout made the
        bytes) throws the learned slowdown away, and the loop ships the artifact that
        started the miss again. Without a prediction (an artifact assigned by hand) the
        speed the controller last compressed with is kept as it is.
        """
        if job is None:
            declared = device_class.relative_speed
            return Recalibration(declared, declared, None, None, "as declared")
        speed, basis = await self._planned_speed(job, device_class)
        predicted = None
        if made_it:
            predicted = next(
                (v.observed for v in job.verdicts if v.budget == "p95_latency_ms"), None
            )
        observed = verdict.merged.p95_ms
        return Recalibration(
            speed, recalibrated_speed(speed, predicted, observed), predicted, observed, basis
        )

    async def _planned_speed(
        self, job: CompressionJobRecord, device_class: DeviceClass
    ) -> tuple[float, str]:
        """The relative speed ``job`` planned with, and where that number comes from."""
        inputs = await in_thread(self._store.compression_inputs, job.id)
        if inputs is not None and inputs.device_class_yaml:
            with contextlib.suppress(FleetError):
                planned = parse_device_class(inputs.device_class_yaml)
                return planned.relative_speed, f"as job {job.id} planned"
        made_by = None
        if job.artifact_id:
            made_by = await in_thread(self._rollouts.by_candidate, job.artifact_id)
        if made_by is not None:
            return made_by.relative_speed, f"as rollout {made_by.id} planned"
        return device_class.relative_speed, "as declared"

    async def _restart_job(
        self,
        job: CompressionJobRecord,
        device_class: DeviceClass,
        speed: float,
        p95_target_ms: float | None,
    ) -> CompressionJobRecord:
        inputs = await in_thread(self._store.compression_inputs, job.id)
        declared = device_class
        if inputs is not None and inputs.device_class_yaml:
            declared = parse_device_class(inputs.device_class_yaml)
        recalibrated = declared.model_copy(update={"relative_speed": speed})
        calibration: StoredBlob | None = None
        size = 0
        doing = "recompressing for the budget loop"
        refused = f"the budget loop cannot recompress {job.model_name} for {declared.name}"
        if not job.workload:
            if inputs is None or not inputs.calibration_sha256:
                raise ValueError(
                    f"job {job.id} kept no calibration data (it predates the budget loop); "
                    "start a compression with `homefleet compress --controller` once"
                )
            calibration = StoredBlob.of_calibration(
                inputs.calibration_sha256, job.model_name, declared.name, job.id
            )
            # Checked before it is sent on: corrupt calibration data would judge every
            # candidate on inputs nobody chose. (The model and the previous artifact are
            # checked by the job's start, as for any other.)
            await self._integrity.require_sound(calibration, doing, refused)
            size = await in_thread(self._blobs.size, calibration.sha256)
        request = CompressionStart(
            model_name="" if job.workload else job.model_name,
            model_version=None if job.workload else job.model_version,
            workload=job.workload,
            device_class_yaml=device_class_yaml(recalibrated),
            budgets=BudgetOverrides(
                p95_ms=p95_target_ms,
                max_size_ratio=inputs.max_size_ratio if inputs is not None else None,
            ),
            calibration_bytes=size,
        )
        chunks = (
            self._integrity.chunks(dataclasses.replace(calibration, size=size), doing, refused)
            if calibration is not None
            else _no_chunks()
        )
        return await self._compression.start(request, chunks)

    # ---------------------------------------------------------------- 2.-4. advance
    async def _advance(self, rollout: RolloutRecord, now: int) -> None:
        if rollout.state is RolloutState.RECOMPRESSING:
            await self._after_job(rollout, now)
        elif rollout.state is RolloutState.CANARY:
            await self._judge_canary(rollout, now)

    async def _after_job(self, rollout: RolloutRecord, now: int) -> None:
        if rollout.job_id is None:
            # started, but the job never did (the replica stopped in between)
            if now - rollout.created_unix_ms > 60_000:
                await self._fail(rollout, "the recompression job was never started", retry=True)
            return
        job = await in_thread(self._store.get_compression_job, rollout.job_id)
        if job is None or job.state.active:
            return
        if job.state not in (JobState.SUCCEEDED, JobState.NOT_MET) or not job.artifact_id:
            # cancelled, or the controller running it stopped: the next miss tries again
            why = job.error.removesuffix(START_AGAIN)
            await self._fail(
                rollout,
                f"compression job {job.id} ended {job.state.value}"
                + (f": {why}" if why else "")
                + "; the budget loop tries again at the class's next miss",
                retry=True,
            )
            return
        missed = sorted(v.budget for v in job.verdicts if not v.met)
        if set(missed) - DEVICE_BUDGETS:
            await self._fail(
                rollout,
                f"compression job {job.id} found no candidate within {', '.join(missed)}",
                candidate=job.artifact_id,
                judged=True,
            )
            return
        candidate = await in_thread(self._store.get_artifact, job.artifact_id)
        baseline = await in_thread(self._store.get_artifact, rollout.baseline_artifact_id)
        if candidate is None or baseline is None:
            await self._fail(rollout, "the candidate or the baseline artifact is gone")
            return
        # Bytes the loop has already judged are not canaried again: the same verdict would
        # follow, and the loop would flip between two artifacts forever. The cause may pass
        # (later observations recalibrate further), so a later miss may try again, after
        # a cool-down that grows with every such failure. (Such bytes were not published
        # as a new version either: ``vet_publication`` gave the job the earlier artifact.)
        if candidate.sha256 == baseline.sha256:
            await self._fail(
                rollout,
                f"compression job {job.id} produced {_made(candidate, job)}, the same "
                f"bytes as the baseline {baseline.id}: nothing different under the "
                "recalibrated latency model, not canaried",
                retry=True,
                candidate=candidate.id,
                judged=True,
            )
            return
        known = await in_thread(
            self._rollouts.known_bytes,
            rollout.model_name,
            rollout.device_class,
            candidate.sha256,
            rollout.id,
        )
        if known is not None:
            await self._fail(
                rollout,
                f"compression job {job.id} produced {_made(candidate, job)}, the same bytes as "
                f"{known.describe()}: not canaried again",
                retry=True,
                candidate=candidate.id,
                judged=True,
            )
            return
        devices = await self._pick_canary(rollout)
        if not devices:
            await self._fail(
                rollout,
                f"no device of class {rollout.device_class} to canary on",
                candidate=candidate.id,
            )
            return
        assigned = []
        try:
            for device_id in devices:
                result = await self._admin.assign(
                    candidate.id, AssignTarget(TargetKind.DEVICE, device_id)
                )
                assigned.append(device_id)
                log.debug("canary %s on %s (revision %d)", candidate.id, device_id, result.revision)
        except FleetError as exc:
            await self._fail(
                rollout,
                f"the canary could not be assigned: {exc}",
                assigned,
                retry=True,
                candidate=candidate.id,
            )
            return
        note = (
            ""
            if not missed
            else f" (the planner predicted it misses {', '.join(missed)}; the canary measures)"
        )
        await in_thread(
            self._rollouts.advance,
            rollout.id,
            RolloutState.RECOMPRESSING,
            RolloutChange(
                RolloutState.CANARY,
                f"{candidate.id} on {len(devices)} canary device(s){note}",
                candidate_artifact_id=candidate.id,
                canary_devices=tuple(devices),
            ),
            [
                NewEvent(
                    "rollout.canary",
                    f"{rollout.device_class}/{rollout.model_name}",
                    f"canary: {candidate.id} ({job.recipe or 'recipe n/a'}) on "
                    f"{', '.join(devices)}{note}",
                    {
                        "device_class": rollout.device_class,
                        "model": rollout.model_name,
                        "artifact_id": candidate.id,
                        "baseline_artifact_id": baseline.id,
                        "devices": list(devices),
                        "job_id": job.id,
                        "recipe": job.recipe,
                    },
                )
            ],
        )

    async def _pick_canary(self, rollout: RolloutRecord) -> list[str]:
        """The canary share of the class: online devices first, then by id (stable)."""
        views = await in_thread(lambda: list(all_devices(self._store, rollout.device_class)))
        pinned = await in_thread(self._rollouts.pinned_devices, rollout.model_name)
        eligible = [v for v in views if v.device.device_id not in pinned]
        eligible.sort(key=lambda v: (not v.online, v.device.device_id))
        return [v.device.device_id for v in eligible[: self._policy.canary_size(len(eligible))]]

    async def _judge_canary(self, rollout: RolloutRecord, now: int) -> None:
        device_class = self._classes.get(rollout.device_class)
        candidate = await in_thread(self._store.get_artifact, rollout.candidate_artifact_id)
        baseline = await in_thread(self._store.get_artifact, rollout.baseline_artifact_id)
        if device_class is None or candidate is None or baseline is None:
            await self._fail(rollout, "the class, candidate or baseline is gone", canary=True)
            return
        since = rollout.canary_since_unix_ms or rollout.updated_unix_ms
        bounds = slice_bounds(now, self._policy.window_ms, self._policy.windows_in_a_row)
        # time the pair spent paused does not count (credited on resume)
        held_ms = int(rollout.detail.get(PAUSED_MS, 0))
        timed_out = now - since - held_ms > self._policy.canary_timeout_seconds * 1000
        if bounds[0][0] < since and not timed_out:
            return  # not K whole slices since the canary started
        # only what was sent after the canary started counts (a timed-out canary is
        # judged on slices that may begin before it)
        after = [(max(start, since), end) for start, end in bounds]
        budgets = device_class.budgets
        key = (rollout.device_class, rollout.model_name)
        canary = check(
            budgets,
            await in_thread(self._rollouts.slices, *key, candidate.sha256, after),
            self._policy.min_samples,
        )
        # The rest of the class: the baseline on the devices that are not canaries (a
        # canary's own windows of the baseline, sent before it switched, are not), held
        # to the same sample floor as any verdict.
        rest = check(
            budgets,
            await in_thread(
                lambda: self._rollouts.slices(
                    *key, baseline.sha256, after, excluding=rollout.canary_devices
                )
            ),
            self._policy.min_samples,
        )
        whole = bounds[0][0] >= since  # K whole slices since the canary started
        reference = CanaryReference.of(rest, rollout)
        if whole and canary.met:
            await self._finish(
                rollout, promote=True, canary=canary, reference=reference, why="within budget"
            )
        elif whole and canary.judged:
            if reference.improved_by(canary):
                why = (
                    f"better than the baseline ({reference.describe(canary)}) though still "
                    f"over budget ({over_budget(canary)}); the next miss recompresses again"
                )
                await self._finish(
                    rollout, promote=True, canary=canary, reference=reference, why=why
                )
            else:
                why = f"not better than the baseline ({reference.describe(canary)})"
                if canary.reasons:
                    why += f"; {'; '.join(canary.reasons)}"
                await self._finish(
                    rollout, promote=False, canary=canary, reference=reference, why=why
                )
        elif timed_out:
            await self._finish(
                rollout,
                promote=False,
                canary=canary,
                reference=reference,
                why=f"no verdict within {self._policy.canary_timeout_seconds} s",
            )

    async def _finish(
        self,
        rollout: RolloutRecord,
        *,
        promote: bool,
        canary: BudgetCheck,
        reference: CanaryReference,
        why: str,
    ) -> None:
        keep = rollout.candidate_artifact_id if promote else rollout.baseline_artifact_id
        try:
            class_artifact = await self._assign_class(rollout, keep)
        except FleetError as exc:
            log.warning("rollout %d: cannot assign %s to the class: %s", rollout.id, keep, exc)
            return  # the next tick tries again
        device_class = self._classes.get(rollout.device_class)
        budget = device_class.budgets.p95_latency_ms if device_class is not None else None
        state = RolloutState.PROMOTED if promote else RolloutState.ROLLED_BACK
        verb = "promoted" if promote else "rolled back"
        wait = "" if promote else await self._backoff_after(rollout)
        reason = f"{verb}: {why}" + (f"; {wait}" if wait else "")
        message = (
            f"{verb} {rollout.candidate_artifact_id} on {rollout.device_class} ({why}): canary "
            f"{canary.summary()}; {reference.summary()}" + (f". {wait}" if wait else "")
        )
        done = await self._end_canary(
            rollout,
            RolloutChange(state, reason),
            [
                NewEvent(
                    "rollout.promote" if promote else "rollout.rollback",
                    f"{rollout.device_class}/{rollout.model_name}",
                    message,
                    {
                        "device_class": rollout.device_class,
                        "model": rollout.model_name,
                        "artifact_id": rollout.candidate_artifact_id,
                        "baseline_artifact_id": rollout.baseline_artifact_id,
                        "class_artifact_id": class_artifact,
                        # what the canary was compared with: the rest of the class, or
                        # the miss that started the rollout ("baseline_from")
                        "baseline_p95_ms": reference.p95_ms,
                        "canary_p95_ms": canary.merged.p95_ms,
                        "p95_budget_ms": budget,
                        "baseline_energy_mj": reference.energy_mj,
                        "canary_energy_mj": canary.merged.energy_mj,
                        "baseline_from": reference.source,
                        "reason": why,
                    },
                )
            ],
        )
        if done is not None:
            log.info("rollout %d %s: %s", rollout.id, verb, message)

    async def _assign_class(self, rollout: RolloutRecord, keep: str) -> str:
        """Assign ``keep`` (the candidate, or the baseline) to the whole class and return
        the class's artifact id now: going back to the baseline re-releases it under a new
        signed version, since the canaries ran a newer one (agents refuse older versions).
        FleetError when it cannot be assigned (the canary stays as it is)."""
        await self._admin.assign(keep, AssignTarget(TargetKind.CLASS, rollout.device_class))
        return await in_thread(
            self._rollouts.class_artifact, rollout.model_name, rollout.device_class
        )

    async def _end_canary(
        self, rollout: RolloutRecord, change: RolloutChange, events: list[NewEvent]
    ) -> RolloutRecord | None:
        """After ``_assign_class``: end the canary with ``change`` and drop its devices'
        own assignments in one transaction (they follow the class again), then wake them.
        None when the rollout had moved on."""
        done = await in_thread(
            self._rollouts.advance,
            rollout.id,
            RolloutState.CANARY,
            change,
            events,
            drop_device_assignments=True,
        )
        if done is not None:
            self._notify_devices(rollout.canary_devices)
        return done

    async def _fail(
        self,
        rollout: RolloutRecord,
        reason: str,
        assigned: list[str] | None = None,
        *,
        canary: bool = False,
        retry: bool = False,
        candidate: str = "",
        judged: bool = False,
    ) -> None:
        """End ``rollout`` as failed; the class keeps its artifact, canaries go back to it.

        ``retry``: the cause may pass (a job cancelled or lost with its controller, a
        candidate the loop already judged), so a sustained miss after the cool-down (longer
        with every rollout in a row that fixed nothing) starts a new rollout; otherwise the
        same artifact is not tried again until the operator changes something.
        ``candidate``: what the job made, kept on the rollout; ``judged``: the rollout
        failed on those bytes themselves, so they are not published or tried again."""
        wait = await self._backoff_after(rollout) if retry else ""
        if wait:
            reason = f"{reason}; {wait}"
        done = await in_thread(
            self._rollouts.advance,
            rollout.id,
            rollout.state,
            RolloutChange(
                RolloutState.FAILED,
                reason,
                candidate_artifact_id=candidate or None,
                # a half-assigned canary: those devices go back to the class artifact
                canary_devices=tuple(assigned) if assigned else None,
                detail={"retry": retry, CANDIDATE_JUDGED: judged},
            ),
            [
                NewEvent(
                    "rollout.failed",
                    f"{rollout.device_class}/{rollout.model_name}",
                    f"rollout for {rollout.model_name} on {rollout.device_class} failed: {reason}",
                    {
                        "device_class": rollout.device_class,
                        "model": rollout.model_name,
                        "reason": reason,
                        "retry": retry,
                    },
                )
            ],
            drop_device_assignments=bool(assigned) or canary,
        )
        if done is not None:
            self._notify_devices(done.canary_devices)
            log.warning("rollout %d failed: %s", rollout.id, reason)

    async def _backoff_after(self, rollout: RolloutRecord, *, counts: bool = True) -> str:
        """How long the pair waits once ``rollout`` ends rolled back or failed (or, with
        ``counts`` False, aborted), said for the decision that ends it ("" without a
        cool-down)."""
        history = await in_thread(
            lambda: self._rollouts.list(
                HISTORY, model_name=rollout.model_name, device_class=rollout.device_class
            )
        )
        earlier = [r for r in history if r.id != rollout.id]
        backoff = Backoff.of(earlier, self._policy.cooldown_seconds)
        if counts:
            backoff = backoff.after_one_more()
        return backoff.describe(rollout.model_name, rollout.device_class)

    # ---------------------------------------------------------------- operators
    async def abort(self, rollout_id: int, by: str, reason: str) -> RolloutRecord:
        """End an active rollout now (``rollout.aborted``): its compression job is
        cancelled if it still runs, a canary's devices go back to the baseline as in a
        rollback (re-released), and the cool-down follows. NOT_FOUND for an unknown id,
        FAILED_PRECONDITION for a rollout that has already ended."""
        async with self._lock:
            rollout = await in_thread(self._rollouts.get, rollout_id)
            if rollout is None:
                raise not_found(
                    f"rollout {rollout_id} does not exist; `homefleet rollouts` lists them"
                )
            if not rollout.state.active:
                raise _ended(rollout, "abort")
            subject = f"{rollout.device_class}/{rollout.model_name}"
            steps = []
            if rollout.state is RolloutState.RECOMPRESSING and rollout.job_id is not None:
                steps.append(await self._cancel_job(rollout.job_id))
            if rollout.state is RolloutState.CANARY:
                class_artifact = await self._assign_class(rollout, rollout.baseline_artifact_id)
                steps.append(
                    f"canary {', '.join(rollout.canary_devices) or '-'} back on the baseline "
                    f"{rollout.baseline_artifact_id} (as {class_artifact})"
                )
            wait = await self._backoff_after(rollout, counts=False)
            why = reason or "no reason given"
            said = f"aborted by {by}: {why}" + "".join(f"; {step}" for step in steps)
            message = (
                f"rollout {rollout.id} for {rollout.model_name} on {rollout.device_class} {said}"
                + (f". {wait}" if wait else "")
            )
            change = RolloutChange(
                RolloutState.ABORTED,
                said + (f"; {wait}" if wait else ""),
                detail={ABORTED_KEY: {"by": by, "reason": reason, "from": rollout.state.value}},
            )
            event = NewEvent(
                "rollout.aborted",
                subject,
                message,
                {
                    "device_class": rollout.device_class,
                    "model": rollout.model_name,
                    "artifact_id": rollout.candidate_artifact_id,
                    "baseline_artifact_id": rollout.baseline_artifact_id,
                    "from_state": rollout.state.value,
                    "job_id": rollout.job_id,
                    "canary_devices": list(rollout.canary_devices),
                    "by": by,
                    "reason": reason,
                },
            )
            if rollout.state is RolloutState.CANARY:
                done = await self._end_canary(rollout, change, [event])
            else:
                done = await in_thread(
                    self._rollouts.advance, rollout.id, rollout.state, change, [event]
                )
            if done is None:  # another replica moved it on in the meantime
                now = await in_thread(self._rollouts.get, rollout_id)
                raise _ended(now or rollout, "abort")
            log.warning("%s", message)
            return done

    async def _cancel_job(self, job_id: int) -> str:
        """Cancel a rollout's recompression; what happened, for the abort's message."""
        try:
            job = await self._compression.cancel(job_id)
        except FleetError as exc:  # it ended meanwhile, or runs on another replica
            return f"compression job {job_id} not cancelled ({exc.message}); its result is unused"
        if job.state.active:
            return f"compression job {job_id} stops after its current trial"
        return f"compression job {job_id} cancelled"

    async def vet_publication(
        self, model_name: str, device_class: str, sha256: str
    ) -> ArtifactRecord | None:
        """The artifact to give a compression job instead of publishing its bytes as a new
        version: the earlier artifact holding them when the loop already judged those
        bytes for the pair (a candidate rolled back or failed on, a baseline that missed,
        the active rollout's included). None: publish as usual."""
        known = await in_thread(self._rollouts.known_bytes, model_name, device_class, sha256)
        if known is None:
            return None
        earlier = await in_thread(self._store.get_artifact, known.artifact_id)
        if earlier is not None:
            log.info(
                "%s/%s: a compression made the bytes of %s again: not published as a new version",
                model_name,
                device_class,
                known.describe(),
            )
        return earlier

    def _notify_devices(self, devices: tuple[str, ...]) -> None:
        for device_id in devices:
            self._notifier.notify(AssignTarget(TargetKind.DEVICE, device_id))


def recalibrated_speed(
    speed: float, predicted_ms: float | None, observed_ms: float | None
) -> float:
    """The class speed that would have predicted what was observed.

    The planner predicts ``measured_here / speed``; a device observed slower than that
    was slower by observed / predicted, so the speed shrinks by the same factor. Only
    ever slower (a fast device never loosens a budget), bounded to the class schema.
    """
    if not predicted_ms or not observed_ms or predicted_ms <= 0 or observed_ms <= predicted_ms:
        return speed
    return min(max(speed * predicted_ms / observed_ms, MIN_SPEED), MAX_SPEED)


def _ended(rollout: RolloutRecord, doing: str) -> FleetError:
    """FAILED_PRECONDITION for an operator action on a rollout that is over."""
    return FleetError(
        ErrorCode.FAILED_PRECONDITION,
        f"rollout {rollout.id} ({rollout.model_name} on {rollout.device_class}) has already "
        f"ended {rollout.state.value} ({rollout.reason}): nothing to {doing}",
    )


def _made(candidate: ArtifactRecord, job: CompressionJobRecord) -> str:
    """What a job made, for a message: its artifact, or only the digest when the job was
    handed an earlier artifact with those bytes (``vet_publication``: not published)."""
    if candidate.created_unix_ms < job.created_unix_ms:
        return f"{candidate.sha256[:12]} (not published again)"
    return f"{candidate.id} ({candidate.sha256[:12]})"


def _watched(budgets: Budgets) -> bool:
    return budgets.p95_latency_ms is not None or budgets.energy_per_inference_mj is not None


def over_budget(verdict: BudgetCheck) -> str:
    """What misses: the merged slices' reasons, or (when together they are within budget
    and only some slice is not) how many slices missed."""
    missed = verdict.verdicts.count(SliceVerdict.MISSED)
    return "; ".join(verdict.reasons) or f"{missed} of {len(verdict.verdicts)} slices"


# A canary over budget is kept only when it improves p95 by at least this factor (a
# difference within the histogram's bucket width is noise, not an improvement).
IMPROVEMENT = 0.9


@dataclass(frozen=True)
class CanaryReference:
    """What a canary is compared with: the rest of the class on the same slices (devices
    that are not canaries, with enough inferences in every slice), or, when there is no
    such telemetry, the numbers of the miss that started the rollout."""

    p95_ms: float | None
    energy_mj: float | None
    what: str
    rest: BudgetCheck  # the rest of the class, whether or not it was usable

    @classmethod
    def of(cls, rest: BudgetCheck, rollout: RolloutRecord) -> CanaryReference:
        if rest.judged:
            return cls(rest.merged.p95_ms, rest.merged.energy_mj, "the rest of the class", rest)
        miss = rollout.detail.get("miss", {})
        p95, energy = miss.get("p95_ms"), miss.get("energy_mj")
        return cls(
            float(p95) if isinstance(p95, int | float) else None,
            float(energy) if isinstance(energy, int | float) else None,
            "the class before the rollout",
            rest,
        )

    @property
    def from_rest(self) -> bool:
        return self.rest.judged

    @property
    def source(self) -> str:
        """For scripts: ``rest_of_class`` or ``budget_miss``."""
        return "rest_of_class" if self.from_rest else "budget_miss"

    def improved_by(self, canary: BudgetCheck) -> bool:
        """p95 at least ``IMPROVEMENT`` times the reference's, and energy no worse."""
        p95, energy = canary.merged.p95_ms, canary.merged.energy_mj
        if p95 is None or self.p95_ms is None or p95 > IMPROVEMENT * self.p95_ms:
            return False
        return energy is None or self.energy_mj is None or energy <= self.energy_mj

    def describe(self, canary: BudgetCheck) -> str:
        said = f"p95 {_fmt(canary.merged.p95_ms)} ms against {_fmt(self.p95_ms)} ms on {self.what}"
        if not self.from_rest:
            said += " (the budget miss that started the rollout: no comparable telemetry from "
            said += "the rest of the class)"
        return said

    def summary(self) -> str:
        """The reference's numbers, for the decision's message."""
        if self.from_rest:
            return f"rest of the class {self.rest.summary()}"
        merged = self.rest.merged
        said = "no comparable telemetry from the rest of the class"
        if merged.count:
            said += (
                f" ({merged.count} inferences on {merged.devices} other device(s), "
                f"{self.rest.slice_counts()})"
            )
        numbers = [f"p95 {_fmt(self.p95_ms)} ms"]
        if self.energy_mj is not None:
            numbers.append(f"{_fmt(self.energy_mj)} mJ/inference")
        return (
            f"{said}; compared with the budget miss that started the rollout ({', '.join(numbers)})"
        )


def _numbers(budgets: Budgets, verdict: BudgetCheck) -> dict[str, float | int | None]:
    return {
        "p95_ms": verdict.merged.p95_ms,
        "p95_budget_ms": budgets.p95_latency_ms,
        "energy_mj": verdict.merged.energy_mj,
        "energy_budget_mj": budgets.energy_per_inference_mj,
        "windows": len(verdict.slices),
        "samples": verdict.merged.count,
        "devices": verdict.merged.devices,
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


async def _no_chunks() -> AsyncIterator[bytes]:
    """A workload's start sends no calibration bytes."""
    empty: tuple[bytes, ...] = ()
    for chunk in empty:
        yield chunk
