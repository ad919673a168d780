"""`homefleet rollouts`: what the budget loop did about classes that missed their budget.

Each rollout is one miss and its fix: the recompression job, the canary devices, and
whether the candidate was promoted or rolled back (and why). The decisions themselves,
with their numbers, are events: `homefleet events --kind rollout.`.
"""

from __future__ import annotations

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
)
from controller.cli.errors import rpc_errors
from controller.cli.output import JsonOption
from controller.cli.views import View, enum_label
from protos import fleet_pb2 as pb
from protos import fleet_pb2_grpc

MAX_LIMIT = 1000  # the server's bound (fleet.proto: ListRolloutsRequest.limit)
STATE_PREFIX = "ROLLOUT_STATE_"


class _RolloutsStub(Protocol):
    ListRollouts: grpc.UnaryUnaryMultiCallable[pb.ListRolloutsRequest, pb.ListRolloutsResponse]


class RolloutView(View):
    id: int
    model_name: str
    device_class: str
    state: str  # recompressing, canary, promoted, rolled_back, failed
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


class RolloutList(View):
    rollouts: list[RolloutView]


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
    )


def rollouts(
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
    """List the budget loop's rollouts, newest first (a class missed its budget: recompress,
    canary, then promote or roll back)."""
    request = pb.ListRolloutsRequest(
        model_name=model, device_class=device_class, active_only=active, limit=limit
    )
    with rpc_errors(address=controller, timeout_s=timeout), create_channel(controller) as channel:
        stub: _RolloutsStub = fleet_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.ListRollouts(request, timeout=timeout)
    listed = RolloutList(rollouts=[rollout_from_proto(r) for r in reply.rollouts])
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
            r.state,
            r.baseline_artifact_id,
            r.candidate_artifact_id or "-",
            str(r.job_id) if r.job_id else "-",
            ", ".join(r.canary_devices) or "-",
            output.local_time(r.updated_unix_ms),
            r.reason,
        )
    output.print_table(table)
