"""`homefleet rollouts`: what the budget loop did about classes that missed their budget,
and the operator's hands on it.

Each rollout is one miss and its fix: the recompression job, the canary devices, and
whether the candidate was promoted or rolled back (and why). The decisions themselves,
with their numbers, are events: `homefleet events --kind rollout.`.

  homefleet rollouts [--model M] [--class C] [--active]   list rollouts and paused pairs
  homefleet rollouts pause --class C --model M [--reason TEXT]
      the loop takes no action for the pair until resumed: no new recompression, and an
      active rollout holds (a canary keeps its devices; its timeout does not run); the
      pair's telemetry is still judged, and the verdict shown here. Survives restarts.
  homefleet rollouts resume --class C --model M
  homefleet rollouts abort ID [--reason TEXT]
      end an active rollout now: its job is cancelled, canaries go back to the baseline
      (re-released, as a rollback), and the cool-down follows.

Exit codes: 0 ok; 1 the controller refused (an unknown model, class or rollout id, a
pair already paused or not paused, a rollout that has already ended); 2 usage error;
4 the controller cannot be reached.
"""

from __future__ import annotations

from typing import Annotated, Protocol

import grpc
import typer
from pydantic import Field

from controller.cli import output
from controller.cli.client import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT_S,
    ControllerOption,
    TimeoutOption,
    create_channel,
)
from controller.cli.errors import rpc_errors
from controller.cli.groups import refuse_listing_options
from controller.cli.output import JsonOption
from controller.cli.views import View, enum_label
from protos import fleet_pb2 as pb
from protos import fleet_pb2_grpc

MAX_LIMIT = 1000  # the server's bound (fleet.proto: ListRolloutsRequest.limit)
MAX_REASON = 500  # the server's bound on a pause's or an abort's reason
STATE_PREFIX = "ROLLOUT_STATE_"


class _RolloutsStub(Protocol):
    ListRollouts: grpc.UnaryUnaryMultiCallable[pb.ListRolloutsRequest, pb.ListRolloutsResponse]
    PauseRollouts: grpc.UnaryUnaryMultiCallable[pb.PauseRolloutsRequest, pb.RolloutPause]
    ResumeRollouts: grpc.UnaryUnaryMultiCallable[pb.ResumeRolloutsRequest, pb.RolloutPause]
    AbortRollout: grpc.UnaryUnaryMultiCallable[pb.AbortRolloutRequest, pb.Rollout]


class RolloutView(View):
    id: int
    model_name: str
    device_class: str
    state: str  # recompressing, canary, promoted, rolled_back, failed, aborted
    baseline_artifact_id: str
    candidate_artifact_id: str
    job_id: int
    canary_devices: list[str]
    relative_speed: float
    p95_target_ms: float
    reason: str
    created_unix_ms: int
    updated_unix_ms: int
    finished_unix_ms: int
    paused: bool = False  # active, and its (class, model) is paused: it holds


class PauseView(View):
    model_name: str
    device_class: str
    paused_by: str
    reason: str
    paused_unix_ms: int
    verdict: str  # the loop's latest judgement of the pair while paused ("" none yet)
    verdict_unix_ms: int


class RolloutList(View):
    rollouts: list[RolloutView]
    pauses: list[PauseView] = Field(default_factory=list)


def rollout_from_proto(r: pb.Rollout) -> RolloutView:
    return RolloutView(
        id=r.id,
        model_name=r.model_name,
        device_class=r.device_class,
        state=enum_label(pb.RolloutState, r.state, STATE_PREFIX),
        baseline_artifact_id=r.baseline_artifact_id,
        candidate_artifact_id=r.candidate_artifact_id,
        job_id=r.job_id,
        canary_devices=list(r.canary_devices),
        relative_speed=r.relative_speed,
        p95_target_ms=r.p95_target_ms,
        reason=r.reason,
        created_unix_ms=r.created_unix_ms,
        updated_unix_ms=r.updated_unix_ms,
        finished_unix_ms=r.finished_unix_ms,
        paused=r.paused,
    )


def pause_from_proto(p: pb.RolloutPause) -> PauseView:
    return PauseView(
        model_name=p.model_name,
        device_class=p.device_class,
        paused_by=p.paused_by,
        reason=p.reason,
        paused_unix_ms=p.paused_unix_ms,
        verdict=p.verdict,
        verdict_unix_ms=p.verdict_unix_ms,
    )


ModelOption = Annotated[
    str, typer.Option("--model", metavar="NAME", help="The model the budget loop watches.")
]
ClassOption = Annotated[
    str, typer.Option("--class", metavar="CLASS", help="The device class it is assigned to.")
]
ReasonOption = Annotated[
    str,
    typer.Option(
        "--reason", metavar="TEXT", help="Why, for the event log (at most 500 characters)."
    ),
]

app = typer.Typer(name="rollouts", no_args_is_help=False)


@app.callback(invoke_without_command=True)
def rollouts(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Option("--model", metavar="NAME", help="Only rollouts of this model.")
    ] = "",
    device_class: Annotated[
        str, typer.Option("--class", metavar="CLASS", help="Only rollouts for this device class.")
    ] = "",
    active: Annotated[
        bool, typer.Option("--active", help="Only rollouts still recompressing or in canary.")
    ] = False,
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=MAX_LIMIT, metavar="N", help="At most N.")
    ] = 100,
    as_json: JsonOption = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """List the budget loop's rollouts and paused pairs (no subcommand); pause, resume, abort.

    A rollout: a class missed its budget, so the loop recompressed the model, put the candidate
    on a canary share, then promoted or rolled it back.
    """
    if ctx.invoked_subcommand is not None:
        refuse_listing_options(ctx, f"homefleet rollouts {ctx.invoked_subcommand}")
        return
    request = pb.ListRolloutsRequest(
        model_name=model, device_class=device_class, active_only=active, limit=limit
    )
    with rpc_errors(address=controller, timeout_s=timeout), create_channel(controller) as channel:
        reply = _stub(channel).ListRollouts(request, timeout=timeout)
    listed = RolloutList(
        rollouts=[rollout_from_proto(r) for r in reply.rollouts],
        pauses=[pause_from_proto(p) for p in reply.pauses],
    )
    if as_json:
        output.print_json(listed)
        return
    table = output.table(
        "id", "class", "model", "state", "baseline", "candidate", "job", "canary", "updated", "why"
    )
    for r in listed.rollouts:
        output.add_row(
            table,
            str(r.id),
            r.device_class,
            r.model_name,
            f"{r.state} (paused)" if r.paused else r.state,
            r.baseline_artifact_id,
            r.candidate_artifact_id or "-",
            str(r.job_id) if r.job_id else "-",
            ", ".join(r.canary_devices) or "-",
            output.local_time(r.updated_unix_ms),
            r.reason,
        )
    which = "".join(
        f" {label} {value}" for label, value in (("of", model), ("on", device_class)) if value
    )
    output.print_table(table, empty=f"no {'active ' if active else ''}rollouts{which}")
    if listed.pauses:
        paused = output.table(
            "class",
            "model",
            "paused",
            "by",
            "why",
            "latest verdict",
            title="Paused: the budget loop takes no action for these",
        )
        for p in listed.pauses:
            output.add_row(
                paused,
                p.device_class,
                p.model_name,
                output.local_time(p.paused_unix_ms),
                p.paused_by,
                p.reason or "-",
                f"{p.verdict} ({output.local_time(p.verdict_unix_ms)})" if p.verdict else "-",
            )
        output.print_table(paused)


@app.command("pause")
def pause(
    device_class: ClassOption,
    model: ModelOption,
    reason: ReasonOption = "",
    as_json: JsonOption = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """Stop the budget loop acting for one (class, model) until `rollouts resume`.

    No new recompression starts, and an active rollout holds where it is: a canary keeps its
    devices, is neither promoted nor rolled back, and its timeout does not run while paused. The
    pair's telemetry is still judged (`homefleet rollouts` shows the latest verdict). The
    controller keeps the pause across restarts. Already paused: exit 1.
    """
    _check_reason(reason)
    request = pb.PauseRolloutsRequest(model_name=model, device_class=device_class, reason=reason)
    with rpc_errors(address=controller, timeout_s=timeout), create_channel(controller) as channel:
        done = pause_from_proto(_stub(channel).PauseRollouts(request, timeout=timeout))
    if as_json:
        output.print_json(done)
        return
    output.say(f"budget loop paused for {done.model_name} on {done.device_class}")
    output.note(
        f"`homefleet rollouts resume --class {done.device_class} --model {done.model_name}` "
        "lets it act again"
    )


@app.command("resume")
def resume(
    device_class: ClassOption,
    model: ModelOption,
    as_json: JsonOption = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """Let the budget loop act for a paused (class, model) again.

    A held rollout carries on where it stood (a canary's timeout resumes counting). Not paused:
    exit 1.
    """
    request = pb.ResumeRolloutsRequest(model_name=model, device_class=device_class)
    with rpc_errors(address=controller, timeout_s=timeout), create_channel(controller) as channel:
        ended = pause_from_proto(_stub(channel).ResumeRollouts(request, timeout=timeout))
    if as_json:
        output.print_json(ended)
        return
    why = f": {ended.reason}" if ended.reason else ""
    output.say(
        f"budget loop resumed for {ended.model_name} on {ended.device_class} (paused since "
        f"{output.local_time(ended.paused_unix_ms)} by {ended.paused_by}{why})"
    )


@app.command("abort")
def abort(
    rollout_id: Annotated[
        int,
        typer.Argument(
            metavar="ID", min=1, help="The rollout's id (the first column of `homefleet rollouts`)."
        ),
    ],
    reason: ReasonOption = "",
    as_json: JsonOption = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """End an active rollout now, as a rollback would, then the usual cool-down.

    Its compression job is cancelled if it still runs; canary devices go back to the baseline
    (re-released, as a rollback does). A rollout that has already ended, or an unknown id: exit
    1.
    """
    _check_reason(reason)
    request = pb.AbortRolloutRequest(rollout_id=rollout_id, reason=reason)
    with rpc_errors(address=controller, timeout_s=timeout), create_channel(controller) as channel:
        done = rollout_from_proto(_stub(channel).AbortRollout(request, timeout=timeout))
    if as_json:
        output.print_json(done)
        return
    output.say(f"rollout {done.id} ({done.model_name} on {done.device_class}) {done.reason}")


def _stub(channel: grpc.Channel) -> _RolloutsStub:
    stub: _RolloutsStub = fleet_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
    return stub


def _check_reason(reason: str) -> None:
    if len(reason) > MAX_REASON:
        raise typer.BadParameter(
            f"is {len(reason)} characters long; at most {MAX_REASON} are accepted",
            param_hint="--reason",
        )
