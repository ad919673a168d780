"""Compression jobs between protobuf messages and controller records, both ways.

The companion of ``controller/convert.py`` for this one feature; as there, enums map
strictly and every other check belongs to the handlers.
"""

from __future__ import annotations

from controller.records import (
    BudgetOverrides,
    BudgetVerdictRecord,
    CompressionJobRecord,
    CompressionStart,
    JobState,
    TrialRecord,
)
from protos import fleet_pb2 as pb

_STATE_TO_PROTO = {
    JobState.QUEUED: pb.COMPRESSION_JOB_STATE_QUEUED,
    JobState.RUNNING: pb.COMPRESSION_JOB_STATE_RUNNING,
    JobState.SUCCEEDED: pb.COMPRESSION_JOB_STATE_SUCCEEDED,
    JobState.NOT_MET: pb.COMPRESSION_JOB_STATE_NOT_MET,
    JobState.FAILED: pb.COMPRESSION_JOB_STATE_FAILED,
    JobState.CANCELLED: pb.COMPRESSION_JOB_STATE_CANCELLED,
}


def state_to_proto(state: JobState) -> pb.CompressionJobState:
    return _STATE_TO_PROTO[state]


def overrides_from_proto(msg: pb.BudgetOverrides) -> BudgetOverrides:
    return BudgetOverrides(
        min_fidelity=msg.min_fidelity if msg.HasField("min_fidelity") else None,
        max_accuracy_drop=msg.max_accuracy_drop if msg.HasField("max_accuracy_drop") else None,
        max_bytes=msg.max_bytes if msg.HasField("max_bytes") else None,
        max_size_ratio=msg.max_size_ratio if msg.HasField("max_size_ratio") else None,
        p95_ms=msg.p95_ms if msg.HasField("p95_ms") else None,
    )


def start_from_proto(header: pb.StartCompressionHeader) -> CompressionStart:
    source = header.WhichOneof("source")
    return CompressionStart(
        model_name=header.model.name if source == "model" else "",
        model_version=(header.model.version or None) if source == "model" else None,
        workload=header.workload if source == "workload" else "",
        device_class_yaml=header.device_class_yaml,
        budgets=overrides_from_proto(header.budgets),
        calibration_bytes=header.calibration_bytes,
    )


def trial_to_proto(trial: TrialRecord) -> pb.CompressionTrial:
    return pb.CompressionTrial(
        index=trial.index,
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


def verdict_to_proto(verdict: BudgetVerdictRecord) -> pb.BudgetVerdict:
    return pb.BudgetVerdict(
        budget=verdict.budget,
        limit=verdict.limit,
        observed=verdict.observed,
        met=verdict.met,
        gap=verdict.gap,
    )


def job_to_proto(job: CompressionJobRecord) -> pb.CompressionJob:
    return pb.CompressionJob(
        id=job.id,
        model_name=job.model_name,
        model_version=job.model_version or 0,
        workload=job.workload,
        device_class=job.device_class,
        state=state_to_proto(job.state),
        error=job.error,
        created_unix_ms=job.created_unix_ms,
        started_unix_ms=job.started_unix_ms or 0,
        finished_unix_ms=job.finished_unix_ms or 0,
        trials_done=job.trials_done,
        trials=[trial_to_proto(t) for t in job.trials],
        artifact_id=job.artifact_id,
        recipe=job.recipe,
        verdicts=[verdict_to_proto(v) for v in job.verdicts],
        activity=job.activity,
        warnings=list(job.warnings),
    )
