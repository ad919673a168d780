"""Compression jobs on a controller: `homefleet compress --controller` and `homefleet jobs`.

`compress --controller HOST:PORT` sends the device-class file, the budget flags and the
calibration arrays to StartCompression, then (unless --no-wait) follows the job's
trials as the controller reports them and prints the artifact it published.
`homefleet jobs` lists jobs; `homefleet jobs watch ID` follows any job the same way (a
job started with --no-wait, or one whose follower was interrupted); `homefleet jobs
cancel ID` stops one (a queued job at once, a running one after its current trial).

Exit codes, as the local `homefleet compress`: 0 every budget holds; 5 no recipe met
them (the best trial is still published as an artifact); 2 bad input (a local file, or
the controller refused the request as invalid or naming an unknown model or job id).
Beyond those: 1 the controller refused otherwise (a job for the pair is already active,
a job to cancel has already ended), or the job failed or was cancelled; 4 the controller
cannot be reached; 130 interrupted (Ctrl-C) while following: the job keeps running.
"""

from __future__ import annotations

import contextlib
import os
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
    ENV_CONTROLLER,
    ControllerOption,
    TimeoutOption,
    create_channel,
    upload_timeout,
)
from controller.cli.errors import ExitCode, Failure, explain, fail, rpc_errors
from controller.cli.groups import refuse_listing_options
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
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for Ctrl-C
# Budgets a device's telemetry measures (controller.compression.budgets.MEASURED_ON_DEVICE,
# repeated here: the CLI does not import the compression stack)
MEASURED_ON_DEVICE = frozenset(
    {"p95_latency_ms", "energy_per_inference_mj"}
)  # 128 + SIGINT: what a shell reports for Ctrl-C


class _JobsStub(Protocol):
    """The compression-job calls of the generated AdminService stub, typed."""

    StartCompression: grpc.StreamUnaryMultiCallable[pb.StartCompressionChunk, pb.CompressionJob]
    GetCompressionJob: grpc.UnaryUnaryMultiCallable[pb.CompressionJobRef, pb.CompressionJob]
    WatchCompressionJob: grpc.UnaryStreamMultiCallable[pb.CompressionJobRef, pb.CompressionJob]
    ListCompressionJobs: grpc.UnaryUnaryMultiCallable[
        pb.ListCompressionJobsRequest, pb.ListCompressionJobsResponse
    ]
    CancelCompressionJob: grpc.UnaryUnaryMultiCallable[pb.CompressionJobRef, pb.CompressionJob]


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
    activity: str = ""  # a running job: what it works on now
    warnings: tuple[str, ...] = ()  # what the compression warned of


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
        activity=job.activity,
        warnings=tuple(job.warnings),
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
            raise fail(failure) from None  # ALREADY_EXISTS names the active job's commands
        view = job_from_proto(job)
        _note(_headline(view))
        if not wait:
            if as_json:
                output.print_json(view)
            else:
                output.say(f"job {view.id}")
            return
        with _job_errors(address, wait_timeout_s), _keeps_running(view.id, address):
            final = _follow(stub, view.id, wait_timeout_s, address, view)
    _finish(final, as_json, address)


def _headline(job: JobView) -> str:
    return f"compression job {job.id} for {job.model_name}/{job.device_class}: {job.state}"


def _job_commands(job_id: int, address: str) -> tuple[str, str]:
    """`homefleet jobs watch N` and `... cancel N`, with --controller when `homefleet jobs`
    would not reach ``address`` by itself (`compress --controller` reads no environment)."""
    implied = os.environ.get(ENV_CONTROLLER, DEFAULT_ADDRESS).strip()
    where = "" if address == implied else f" --controller {address}"
    return f"homefleet jobs watch {job_id}{where}", f"homefleet jobs cancel {job_id}{where}"


@contextlib.contextmanager
def _job_errors(address: str, timeout_s: float) -> Iterator[None]:
    """`rpc_errors`, except that an unknown job id or an invalid request is bad input (2)."""
    try:
        yield
    except grpc.RpcError as error:
        failure = explain(error, address=address, timeout_s=timeout_s)
        if isinstance(error, grpc.Call) and error.code() in BAD_INPUT_CODES:
            raise _bad_input(failure.message) from None
        raise fail(failure) from None


@contextlib.contextmanager
def _keeps_running(job_id: int, address: str) -> Iterator[None]:
    """Ctrl-C stops the follower, not the job: say so, and how to follow or stop it."""
    try:
        yield
    except KeyboardInterrupt:
        watch_cmd, cancel_cmd = _job_commands(job_id, address)
        _note(
            f"interrupted: compression job {job_id} keeps running on the controller; "
            f"follow it with `{watch_cmd}` or stop it with `{cancel_cmd}`"
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _follow(
    stub: _JobsStub,
    job_id: int,
    wait_timeout_s: float,
    address: str,
    seen: JobView | None = None,
) -> JobView:
    """Print each trial and state change as the controller reports it; the final job.

    ``seen`` is the job as already shown (by StartCompression); without it the first
    message gets the headline. A job still running at --wait-timeout is no unreachable
    controller: exit 1, saying how to follow or stop it.
    """
    state = {"job": seen}
    try:
        return _follow_stream(stub, job_id, wait_timeout_s, state)
    except grpc.RpcError as error:
        job = state["job"]
        if job is None or not isinstance(error, grpc.Call):
            raise
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
        watch_cmd, cancel_cmd = _job_commands(job_id, address)
        raise fail(
            Failure(
                ExitCode.REFUSED,
                f"compression job {job_id} did not end within --wait-timeout "
                f"{wait_timeout_s:g} s (it is {job.state}); it keeps running on the "
                f"controller: follow it with `{watch_cmd}` or stop it with `{cancel_cmd}`",
            )
        ) from None


def _follow_stream(
    stub: _JobsStub, job_id: int, wait_timeout_s: float, state: dict[str, JobView | None]
) -> JobView:
    job, shown, doing, warned = state["job"], 0, "", 0
    for message in stub.WatchCompressionJob(
        pb.CompressionJobRef(id=job_id), timeout=wait_timeout_s
    ):
        current = job_from_proto(message)
        if job is None:
            _note(_headline(current))
        elif current.state != job.state:
            _note(f"  {current.state}")
        job = state["job"] = current
        for trial in job.trials[shown:]:
            _note(f"  {trial.summary}")
        shown = max(shown, len(job.trials))
        for warning in job.warnings[warned:]:
            _note(f"  warning: {warning}")
        warned = max(warned, len(job.warnings))
        if job.activity and job.activity != doing:
            _note(f"  … {job.activity}")
        doing = job.activity
    if job is None:  # the controller always sends the job first; say so if it did not
        raise fail(
            Failure(ExitCode.REFUSED, f"the controller ended the stream of job {job_id} empty")
        )
    return job


def _note(line: str) -> None:
    """Progress for the person watching: stderr, unwrapped, never read as markup."""
    typer.echo(line, err=True)


def budget_amount(budget: str, value: float) -> str:
    """Bytes as bytes (395,365 B, not 3.954e+05); other budgets to four digits."""
    return f"{value:,.0f} B" if budget.endswith("bytes") else f"{value:.4g}"


def _finish(job: JobView, as_json: bool, address: str) -> None:
    if as_json:
        output.print_json(job)
    if job.state in ACTIVE_STATES:
        watch_cmd, _ = _job_commands(job.id, address)
        _note(
            f"the controller ended the stream before job {job.id} finished; "
            f"follow it again with `{watch_cmd}`"
        )
        raise typer.Exit(int(ExitCode.REFUSED))
    if job.state in ("failed", "cancelled"):
        _note(f"compression job {job.id} {job.state}" + (f": {job.error}" if job.error else ""))
        raise typer.Exit(int(ExitCode.REFUSED))
    if not as_json:
        for v in job.verdicts:
            verdict = "ok" if v.met else f"missed by {budget_amount(v.budget, v.gap)}"
            _note(
                f"  {v.budget}: {budget_amount(v.budget, v.observed)} "
                f"(limit {budget_amount(v.budget, v.limit)}) {verdict}"
            )
        output.say(job.artifact_id)
    if job.state == "not_met":
        device_only = all(v.met or v.budget in MEASURED_ON_DEVICE for v in job.verdicts)
        why = (
            "it misses only budgets a device measures (predicted p95 or energy), which a "
            "canary may refute"
            if device_only
            else "none is within size and quality, so it is the one that misses the fewest "
            "of those budgets, by the least"
        )
        _note(
            f"no recipe met every budget; the best trial ({job.recipe}) is artifact "
            f"{job.artifact_id}: {why}"
        )
        raise typer.Exit(EXIT_NOT_MET)
    _note(f"budget holds: {job.recipe} is artifact {job.artifact_id}")


# -------------------------------------------------------------------- `homefleet jobs`

app = typer.Typer(name="jobs", no_args_is_help=False)

JobIdArgument = Annotated[
    int,
    typer.Argument(
        metavar="ID", min=1, help="The job's id (the first column of `homefleet jobs`)."
    ),
]


@app.callback(invoke_without_command=True)
def jobs(
    ctx: typer.Context,
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
    """List compression jobs, newest first (no subcommand); follow or cancel one by id."""
    if ctx.invoked_subcommand is not None:
        refuse_listing_options(ctx, f"homefleet jobs {ctx.invoked_subcommand} ID")
        return
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
        if j.model_version:
            model_label = f"{j.model_name} v{j.model_version}"
        elif j.workload:  # its source model is registered (and versioned) when it ends
            model_label = f"{j.model_name} (workload)"
        else:
            model_label = j.model_name
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


@app.command("watch")
def watch(
    job_id: JobIdArgument,
    wait_timeout: Annotated[
        float,
        typer.Option(
            "--wait-timeout", min=1.0, metavar="SECONDS", help="How long to follow the job."
        ),
    ] = DEFAULT_WAIT_S,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the finished job as JSON to stdout.")
    ] = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
) -> None:
    """Follow a job until it ends, then print its artifact (as compress --controller).

    Same output and exit codes as `homefleet compress --controller`; a job that has
    already ended is shown at once. Ctrl-C stops following, not the job.
    """
    with create_channel(controller) as channel:
        stub: _JobsStub = fleet_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        with _job_errors(controller, wait_timeout), _keeps_running(job_id, controller):
            final = _follow(stub, job_id, wait_timeout, controller)
    _finish(final, as_json, controller)


@app.command("cancel")
def cancel(
    job_id: JobIdArgument,
    as_json: JsonOption = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """Cancel a job: a queued one at once, a running one after its current trial.

    A job that has already ended is refused (exit 1); an unknown id is bad input (exit 2).
    """
    with create_channel(controller) as channel, _job_errors(controller, timeout):
        stub: _JobsStub = fleet_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        job = job_from_proto(
            stub.CancelCompressionJob(pb.CompressionJobRef(id=job_id), timeout=timeout)
        )
    if as_json:
        output.print_json(job)
    elif job.state == "cancelled":
        output.say(f"compression job {job.id} cancelled")
    else:
        watch_cmd, _ = _job_commands(job.id, controller)
        output.say(
            f"compression job {job.id} is {job.state}: it stops after its current trial "
            f"(`{watch_cmd}` shows it end)"
        )
