"""`homefleet events`: what happened in the fleet, oldest first.

Without --after it lists the newest events (as `tail` would); with --after ID the ones
that follow ID, a page at a time. When more events match than were listed, a note on
stderr says how to see them (`--json` carries it as ``more``).
"""

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
        int | None,
        typer.Option(
            "--after",
            min=0,
            metavar="ID",
            help="The events after this id, oldest first (default: the newest N).",
        ),
    ] = None,
    as_json: JsonOption = False,
    controller: ControllerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_S,
) -> None:
    """List controller events: models added, artifacts created, assignments, device reports."""
    newest = after is None
    request = fleet_pb2.ListEventsRequest(
        after_id=after or 0, limit=limit, kind_prefix=kind, newest=newest
    )
    with session(controller, timeout) as client:
        reply = client.list_events(request)
    listed = views.EventList(
        events=[views.event_from_proto(e) for e in reply.events], more=reply.more
    )
    if as_json:
        output.print_json(listed)
        return
    table = output.table("id", "time", "kind", "subject", "message")
    for e in listed.events:
        output.add_row(table, str(e.id), output.local_time(e.unix_ms), e.kind, e.subject, e.message)
    which = f" of a kind starting with {kind!r}" if kind else ""
    since = f" after event {after}" if after is not None else ""
    output.print_table(table, empty=f"no events{which}{since}")
    if reply.more and listed.events:
        if newest:
            output.note(
                f"these are the newest {len(listed.events)}; older events exist: a larger "
                f"--limit (at most {MAX_LIMIT}), or page from the start with `--after 0`"
            )
        else:
            output.note(f"more events follow: `--after {listed.events[-1].id}`")
