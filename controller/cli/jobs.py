"""Compression jobs on a controller: `homefleet compress --controller` and `homefleet jobs`.

`compress --controller HOST:PORT` sends the device-class file, the budget flags and the
calibration arrays to StartCompression, then (unless --no-wait) follows the job's
trials as the controller reports them and prints the artifact it published.

Exit codes, as the local `homefleet compress`: 0 every budget holds; 5 no recipe met
them (the best trial is still published as an artifact); 2 bad input (a local file, or
the controller refused the request as invalid or naming an unknown model). Beyond
those: 1 the controller refused otherwise (a job for the pair is already active), or
the job failed or was cancelled; 4 the controller cannot be reached.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol

import grpc
import typer

from controller.cli import output
from controller.cli.client import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT_S,
    ControllerOption,
    TimeoutOption,
    create_channel,
    upload_timeout,
)
from controller.cli.errors import ExitCode, explain, fail, rpc_errors
from controller.cli.output import JsonOption
from controller.cli.upload import CHUNK_BYTES
from controller.cli.views import View, enum_label
from protos import fleet_pb2 as pb
from protos import fleet_pb2_grpc

EXIT_MET, EXIT_BAD_INPUT, EXIT_NOT_MET = ExitCode.OK, ExitCode.USAGE, ExitCode.BUDGET_NOT_MET
BAD_INPUT_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
DEFAULT_WAIT_S = 24 * 3600.0
MAX_LIMIT = 1000  # the server's bound (fleet.proto: ListCompressionJobsRequest.limit)
STATE_PREFIX = "COMPRESSION_JOB_STATE_"


class _JobsStub(Protocol):
    """The compression-job calls of the generated AdminService stub, typed."""

    StartCompression: grpc.StreamUnaryMultiCallable[pb.StartCompressionChunk, pb.CompressionJob]
    GetCompressionJob: grpc.UnaryUnaryMultiCallable[pb.CompressionJobRef, pb.CompressionJob]
    WatchCompressionJob: grpc.UnaryStreamMultiCallable[pb.CompressionJobRef, pb.CompressionJob]
    ListCompressionJobs: grpc.UnaryUnaryMultiCallable[
        pb.ListCompressionJobsRequest, pb.ListCompressionJobsResponse
    ]


# -------------------------------------------------------------------- views


class TrialView(View):
    index: int
    summary: str
    recipe: str
    met: bool
    artifact_bytes: int
    quality_metric: str
    quality_value: float
    p95_ms: float
    energy_mj: float
    seconds: float
    error: str


class VerdictView(View):
    budget: str
    limit: float
    observed: float
    met: bool
    gap: float


class JobView(View):
    id: int
    model_name: str
    model_version: int
    workload: str
    device_class: str
    state: str  # queued, running, succeeded, not_met, failed, cancelled
    error: str
    created_unix_ms: int
    started_unix_ms: int
    finished_unix_ms: int
    trials_done: int
    trials: list[TrialView]
    artifact_id: str
    recipe: str
    verdicts: list[VerdictView]


class JobList(View):
    jobs: list[JobView]


def job_from_proto(job: pb.CompressionJob) -> JobView:
    return JobView(
        id=job.id,
        model_name=job.model_name,
        model_version=job.model_version,
        workload=job.workload,
        device_class=job.device_class,
        state=enum_label(pb.CompressionJobState, job.state, STATE_PREFIX),
        error=job.error,
        created_unix_ms=job.created_unix_ms,
        started_unix_ms=job.started_unix_ms,
        finished_unix_ms=job.finished_unix_ms,
        trials_done=job.trials_done,
        trials=[
            TrialView(
                index=t.index,
                summary=t.summary,
                recipe=t.recipe,
                met=t.met,
                artifact_bytes=t.artifact_bytes,
                quality_metric=t.quality_metric,
                quality_value=t.quality_value,
                p95_ms=t.p95_ms,
                energy_mj=t.energy_mj,
                seconds=t.seconds,
                error=t.error,
            )
            for t in job.trials
        ],
        artifact_id=job.artifact_id,
        recipe=job.recipe,
        verdicts=[
            VerdictView(budget=v.budget, limit=v.limit, observed=v.observed, met=v.met, gap=v.gap)
            for v in job.verdicts
        ],
    )


ACTIVE_STATES = ("queued", "running")


# -------------------------------------------------------------------- starting a job


@dataclass(frozen=True)
class RemoteCompression:
    """What `homefleet compress --controller` was asked to do."""

    device_class: Path
    model: str | None = None
    model_version: int = 0
    workload: str | None = None
    calibration: Path | None = None
    min_fidelity: float | None = None
    max_accuracy_drop: float | None = None
    max_bytes: int | None = None
    max_size_ratio: float | None = None
    p95_ms: float | None = None

    def header(self, device_class_yaml: str, calibration_bytes: int) -> pb.StartCompressionHeader:
        budgets = pb.BudgetOverrides()
        for field in ("min_fidelity", "max_accuracy_drop", "max_bytes", "max_size_ratio"):
            value = getattr(self, field)
            if value is not None:
                setattr(budgets, field, value)
        if self.p95_ms is not None:
            budgets.p95_ms = self.p95_ms
        header = pb.StartCompressionHeader(
            device_class_yaml=device_class_yaml,
            budgets=budgets,
            calibration_bytes=calibration_bytes,
        )
        if self.workload is not None:
            header.workload = self.workload
        else:
            header.model.CopyFrom(pb.ModelRef(name=self.model or "", version=self.model_version))
        return header


def _bad_input(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad_input(f"cannot read {what} {path}: {exc}") from exc


def _chunks(
    header: pb.StartCompressionHeader, calibration: Path | None
) -> Iterator[pb.StartCompressionChunk]:
    yield pb.StartCompressionChunk(header=header)
    if calibration is not None:
        with calibration.open("rb") as f:
            while block := f.read(CHUNK_BYTES):
                yield pb.StartCompressionChunk(data=block)


def compress_on_controller(
    request: RemoteCompression,
    *,
    address: str,
    timeout_s: float,
    wait: bool,
    wait_timeout_s: float,
    as_json: bool,
) -> None:
    """Start the job; follow it unless told not to; exit with the local command's codes."""
    if (request.model is None) == (request.workload is None):
        raise _bad_input("give exactly one of --model NAME (with --calib) or --workload NAME")
    if request.model is not None and request.calibration is None:
        raise _bad_input(
            "--model needs --calib INPUTS.npz (arrays named after the model's inputs): an ONNX "
            "model is judged by its fidelity to the original on those inputs"
        )
    device_class_yaml = _read_text(request.device_class, "--device-class")
    size = 0
    if request.calibration is not None:
        try:
            size = request.calibration.stat().st_size
        except OSError as exc:
            raise _bad_input(f"cannot read --calib {request.calibration}: {exc}") from exc
    header = request.header(device_class_yaml, size)
    with create_channel(address) as channel:
        stub: _JobsStub = fleet_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            job = stub.StartCompression(
                _chunks(header, request.calibration), timeout=upload_timeout(size, timeout_s)
            )
        except grpc.RpcError as error:
            failure = explain(error, address=address, timeout_s=timeout_s)
            if isinstance(error, grpc.Call) and error.code() in BAD_INPUT_CODES:
                raise _bad_input(failure.message) from None
            raise fail(failure) from None
        view = job_from_proto(job)
        _note(f"compression job {view.id} for {view.model_name}/{view.device_class}: {view.state}")
        if not wait:
            if as_json:
                output.print_json(view)
            else:
                output.say(f"job {view.id}")
            return
        with rpc_errors(address=address, timeout_s=wait_timeout_s):
            final = _follow(stub, view, wait_timeout_s)
    _finish(final, as_json)


def _follow(stub: _JobsStub, job: JobView, wait_timeout_s: float) -> JobView:
    """Print each trial and state change as the controller reports it; the final job."""
    shown, state = 0, job.state
    for message in stub.WatchCompressionJob(
        pb.CompressionJobRef(id=job.id), timeout=wait_timeout_s
    ):
        job = job_from_proto(message)
        if job.state != state:
            state = job.state
            _note(f"  {state}")
        for trial in job.trials[shown:]:
            _note(f"  {trial.summary}")
        shown = max(shown, len(job.trials))
    return job


def _note(line: str) -> None:
    """Progress for the person watching: stderr, unwrapped, never read as markup."""
    typer.echo(line, err=True)


def _amount(budget: str, value: float) -> str:
    return f"{value:,.0f}" if budget.endswith("bytes") else f"{value:.4g}"


def _finish(job: JobView, as_json: bool) -> None:
    if as_json:
        output.print_json(job)
    if job.state in ACTIVE_STATES:
        _note(
            f"the controller ended the stream before job {job.id} finished; "
            "follow it with `homefleet jobs`"
        )
        raise typer.Exit(int(ExitCode.REFUSED))
    if job.state in ("failed", "cancelled"):
        _note(f"compression job {job.id} {job.state}: {job.error}")
        raise typer.Exit(int(ExitCode.REFUSED))
    if not as_json:
        for v in job.verdicts:
            verdict = "ok" if v.met else f"missed by {_amount(v.budget, v.gap)}"
            _note(
                f"  {v.budget}: {_amount(v.budget, v.observed)} "
                f"(limit {_amount(v.budget, v.limit)}) {verdict}"
            )
        output.say(job.artifact_id)
    if job.state == "not_met":
        _note(
            f"no recipe met every budget; the best trial ({job.recipe}) is artifact "
            f"{job.artifact_id}"
        )
        raise typer.Exit(EXIT_NOT_MET)
    _note(f"budget holds: {job.recipe} is artifact {job.artifact_id}")


# -------------------------------------------------------------------- listing jobs


def jobs(
    model: Annotated[
        str, typer.Option("--model", metavar="NAME", help="Only jobs for this model or workload.")
    ] = "",
    device_class: Annotated[
        str, typer.Option("--class", metavar="CLASS", help="Only jobs for this device class.")
    ] = "",
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=MAX_LIMIT, metavar="N", help="At most N jobs.")
    ] = 100,
    as_json: JsonOption = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """List compression jobs the controller ran or runs, newest first."""
    request = pb.ListCompressionJobsRequest(
        model_name=model, device_class=device_class, limit=limit
    )
    with rpc_errors(address=controller, timeout_s=timeout), create_channel(controller) as channel:
        stub: _JobsStub = fleet_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.ListCompressionJobs(request, timeout=timeout)
    listed = JobList(jobs=[job_from_proto(j) for j in reply.jobs])
    if as_json:
        output.print_json(listed)
        return
    table = output.table("id", "model", "class", "state", "trials", "artifact", "created", "note")
    for j in listed.jobs:
        model_label = f"{j.model_name} v{j.model_version}" if j.model_version else j.model_name
        output.add_row(
            table,
            str(j.id),
            model_label,
            j.device_class,
            j.state,
            str(j.trials_done),
            j.artifact_id or "-",
            output.local_time(j.created_unix_ms),
            j.error or j.recipe,
        )
    output.print_table(table)
