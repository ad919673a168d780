"""`homefleet assign` and `unassign`: which artifact a device class or one device should run."""

from __future__ import annotations

from typing import Annotated

import typer

from controller.cli import output, views
from controller.cli.client import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT_S,
    ControllerOption,
    TimeoutOption,
    session,
)
from controller.cli.output import JsonOption
from protos import fleet_pb2


def assign(
    artifact_id: Annotated[
        str, typer.Argument(metavar="ARTIFACT_ID", help="An artifact id: MODEL/CLASS/vN.")
    ],
    device_class: Annotated[
        str | None,
        typer.Option("--class", metavar="CLASS", help="Assign to every device of this class."),
    ] = None,
    device_id: Annotated[
        str | None,
        typer.Option("--device", metavar="DEVICE_ID", help="Assign to this one device."),
    ] = None,
    as_json: JsonOption = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """Assign ARTIFACT_ID to a device class (--class) or to one device (--device)."""
    if (device_class is None) == (device_id is None):
        raise typer.BadParameter(
            "give exactly one of --class CLASS or --device DEVICE_ID",
            param_hint="'--class' / '--device'",
        )
    if device_class is not None:
        request = fleet_pb2.AssignRequest(artifact_id=artifact_id, device_class=device_class)
        target = f"class {device_class}"
    else:
        request = fleet_pb2.AssignRequest(artifact_id=artifact_id, device_id=device_id)
        target = f"device {device_id}"
    with session(controller, timeout) as client:
        reply = client.assign(request)
    result = views.AssignmentView(
        artifact_id=reply.artifact_id or artifact_id,
        requested_artifact_id=artifact_id,
        device_class=device_class,
        device_id=device_id,
        devices_affected=reply.devices_affected,
        devices_keeping_own=reply.devices_keeping_own,
        devices_keeping_own_ids=list(reply.devices_keeping_own_ids),
        rereleases=reply.rereleased_from,
        warning=reply.warning,
    )
    if as_json:
        output.print_json(result)
        return
    affected = result.devices_affected
    output.say(
        f"assigned {result.artifact_id} to {target}: "
        f"{affected} device{'' if affected == 1 else 's'} affected"
    )
    if result.rereleases:
        output.say(
            f"  {result.artifact_id} re-releases {artifact_id}'s bytes under a new version: "
            "agents refuse a manifest older than one they ran (a rollback needs a newer one)"
        )
    elif result.artifact_id != artifact_id:  # an earlier call made that re-release
        output.say(
            f"  {result.artifact_id}, already assigned, re-releases {artifact_id}'s bytes: "
            "nothing new was released"
        )
    if result.devices_keeping_own:
        named = ", ".join(result.devices_keeping_own_ids)
        more = result.devices_keeping_own - len(result.devices_keeping_own_ids)
        output.say(
            f"  {result.devices_keeping_own} device(s) keep an assignment of their own: "
            f"{named}{f' and {more} more' if more > 0 else ''} "
            "(`homefleet unassign MODEL --device ID` makes one follow its class)"
        )
    if result.warning:
        output.note(result.warning)


def unassign(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="The model's name.")],
    device_id: Annotated[
        str,
        typer.Option("--device", metavar="DEVICE_ID", help="The device whose own assignment goes."),
    ],
    as_json: JsonOption = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """Remove a device's own assignment of MODEL: it follows its class's assignment again.

    If the device ran a newer version, the class's artifact is re-released first (printed).
    """
    request = fleet_pb2.UnassignRequest(model_name=model, device_id=device_id)
    with session(controller, timeout) as client:
        reply = client.unassign(request)
    result = views.AssignmentView(
        artifact_id=reply.artifact_id,
        requested_artifact_id="",
        device_class=None,
        device_id=device_id,
        devices_affected=reply.devices_affected,
        devices_keeping_own=0,
        devices_keeping_own_ids=[],
        rereleases=reply.rereleased_from,
    )
    if as_json:
        output.print_json(result)
        return
    follows = (
        f"now {result.artifact_id}"
        if result.artifact_id
        else "its class has no assignment for it, so it keeps what it runs"
    )
    output.say(f"device {device_id} follows its class for {model} again: {follows}")
    if result.rereleases:
        output.say(
            f"  {result.rereleases} was re-released as {result.artifact_id} for the class "
            "(the same bytes under a new version): a device that ran a newer version refuses "
            "an older manifest; devices already serving these bytes download nothing"
        )
