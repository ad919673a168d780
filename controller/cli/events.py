"""`homefleet events`: what happened in the fleet, oldest first."""

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

MAX_LIMIT = 1000  # the server's bound (fleet.proto: ListEventsRequest.limit)


def events(
    kind: Annotated[
        str,
        typer.Option(
            "--kind", metavar="PREFIX", help='Only kinds starting with PREFIX, e.g. "artifact.".'
        ),
    ] = "",
    limit: Annotated[
        int, typer.Option("--limit", min=1, max=MAX_LIMIT, metavar="N", help="At most N events.")
    ] = 100,
    after: Annotated[
        int, typer.Option("--after", min=0, metavar="ID", help="Only events after this id.")
    ] = 0,
    as_json: JsonOption = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """List controller events: models added, artifacts created, assignments, device reports."""
    request = fleet_pb2.ListEventsRequest(after_id=after, limit=limit, kind_prefix=kind)
    with session(controller, timeout) as client:
        reply = client.list_events(request)
    listed = views.EventList(events=[views.event_from_proto(e) for e in reply.events])
    if as_json:
        output.print_json(listed)
        return
    table = output.table("id", "time", "kind", "subject", "message")
    for e in listed.events:
        output.add_row(table, str(e.id), output.local_time(e.unix_ms), e.kind, e.subject, e.message)
    output.print_table(table)
