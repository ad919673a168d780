"""`homefleet devices`: every device, its status, and what it serves versus what it should."""

from __future__ import annotations

from typing import Annotated

import typer

from controller.cli import output, pages, views
from controller.cli.client import (
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT_S,
    ControllerOption,
    TimeoutOption,
    session,
)
from controller.cli.groups import refuse_listing_options
from controller.cli.output import JsonOption
from protos import fleet_pb2

COLUMNS = (
    "device", "class", "status", "last seen", "model", "serving", "desired", "last outcome",
    "last download",
)  # fmt: skip


def _artifact(artifact_id: str, sha256: str) -> str:
    """An artifact as a person knows it: its id, or its short digest when it has none."""
    return artifact_id or output.short_sha(sha256) or "-"


def _desired(state: views.DeviceModelView) -> str:
    """Shown only while it differs from what the device serves: that is the news; and
    always marked when it is the device's own assignment, which class assignments skip."""
    own = " (own assignment)" if state.own_assignment else ""
    if state.desired_sha256 == state.serving_sha256:
        return own.strip(" ()")
    return _artifact(state.desired_artifact_id, state.desired_sha256) + own


def _outcome(state: views.DeviceModelView) -> str:
    if state.last_outcome == "unspecified":
        return "-"
    return f"{state.last_outcome}: {state.last_reason}" if state.last_reason else state.last_outcome


def _download(state: views.DeviceModelView) -> str:
    """What the last update cost on the wire: its encoding (full or delta) and bytes."""
    if not state.bytes_received:
        return ""
    return f"{state.encoding or 'full'} {output.human_size(state.bytes_received)}"


def _rows(device: views.DeviceView, now_ms: int) -> list[tuple[str, ...]]:
    head = (
        device.device_id,
        device.device_class,
        device.status,
        output.relative_time(device.last_seen_unix_ms, now=now_ms),
    )
    blank = ("",) * len(head)
    if not device.models:
        return [(*head, "-", "", "", "", "")]
    return [
        (
            *(head if i == 0 else blank),
            m.model_name,
            _artifact(m.serving_artifact_id, m.serving_sha256),
            _desired(m),
            _outcome(m),
            _download(m),
        )
        for i, m in enumerate(device.models)
    ]


PAGE_SIZE = pages.PAGE_SIZE  # devices asked for per ListDevices call


app = typer.Typer(name="devices", no_args_is_help=False)


@app.callback(invoke_without_command=True)
def devices(
    ctx: typer.Context,
    device_class: Annotated[
        str, typer.Option("--class", metavar="CLASS", help="Only devices of this class.")
    ] = "",
    limit: Annotated[
        int,
        typer.Option(
            "--limit", min=0, metavar="N", help="Show at most N devices (in id order); 0: all."
        ),
    ] = 0,
    as_json: JsonOption = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """List devices: status, last contact, and per model what is served and what is desired.

    The controller sends the fleet in pages; this fetches as many as needed.

    `homefleet devices remove ID` forgets a device.
    """
    if ctx.invoked_subcommand is not None:
        refuse_listing_options(ctx, f"homefleet devices {ctx.invoked_subcommand} ID")
        return
    with session(controller, timeout) as client:

        def page(size: int, token: str) -> tuple[list[fleet_pb2.Device], str]:
            reply = client.list_devices(
                fleet_pb2.ListDevicesRequest(
                    device_class=device_class, page_size=size, page_token=token
                )
            )
            return list(reply.devices), reply.next_page_token

        fetched = pages.fetch_pages(page, limit, PAGE_SIZE)
    found, more = fetched.items, fetched.more
    fleet = views.DeviceList(devices=[views.device_from_proto(d) for d in found], more=more)
    if more:
        output.note(f"showing the first {len(found)} devices; more exist (--limit 0 shows all)")
    if as_json:
        output.print_json(fleet)
        return
    table = output.table(*COLUMNS)
    now_ms = output.now_ms()
    for device in fleet.devices:
        for row in _rows(device, now_ms):
            output.add_row(table, *row)
    which = f" of class {device_class}" if device_class else ""
    output.print_table(table, empty=f"no devices{which} are registered")


@app.command("remove")
def remove(
    device_id: Annotated[
        str, typer.Argument(metavar="ID", help="The device's id (the first column of `devices`).")
    ],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Remove it even while its agent is connected (it registers again, as a new "
            "device, when it next connects).",
        ),
    ] = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """Forget a device that left the fleet, or one to register afresh.

    Its status, its own assignments and its telemetry windows go; the per-class counters
    and the event log keep its history. To move a device to another class, stop its
    agent, remove it, and start the agent with the new --device-class."""
    with session(controller, timeout) as client:
        removed = client.remove_device(
            fleet_pb2.RemoveDeviceRequest(device_id=device_id, force=force)
        )
    own = (
        f"; its own assignment(s) of {', '.join(removed.own_assignments)} went"
        if removed.own_assignments
        else ""
    )
    typer.echo(
        f"removed device {removed.device_id} ({removed.device_class}) with "
        f"{removed.telemetry_windows} telemetry window(s){own}"
    )
    for rerelease in removed.rereleased:
        output.note(
            f"re-released {rerelease} for class {removed.device_class}: the device ran a "
            "newer version of its own, and would refuse the class's older one"
        )
