"""`homefleet assign`: make an artifact the desired one for a device class or one device."""

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
        artifact_id=artifact_id,
        device_class=device_class,
        device_id=device_id,
        devices_affected=reply.devices_affected,
    )
    if as_json:
        output.print_json(result)
        return
    affected = result.devices_affected
    output.say(
        f"assigned {artifact_id} to {target}: "
        f"{affected} device{'' if affected == 1 else 's'} affected"
    )
