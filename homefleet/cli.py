"""The `homefleet` command: wiring only; every command lives in its own module.

  homefleet agent ...        the edge agent (edge_agent.cli; needs the `edge` extra)
  homefleet controller ...   the controller server (controller.serve; `controller` extra)
  homefleet certs ...        the HomeFleet CA and mutual-TLS certificates (offline)
  homefleet artifact diff|patch   model deltas between local files (artifact.cli;
                             `patch` needs only the edge extra)
  homefleet model|artifact|assign|unassign|devices|events|rollouts
                             operator commands (controller.cli), which talk to a
                             controller's AdminService over gRPC
  homefleet compress|evaluate   compression on this machine (controller extra)
  homefleet compress --controller HOST:PORT, homefleet jobs   compression jobs that a
                             controller runs (gRPC only here)

`agent` and `controller` are imported only when used, so each runs where only its
own extra is installed, and the operator commands start without loading either.

Exit codes:
  0  ok
  1  the controller refused or failed the request (its message is printed)
  2  usage error: bad arguments, or a local file that cannot be read
  3  the command group needs an extra that is not installed here
  4  the controller cannot be reached, or did not answer before the deadline
"""

from __future__ import annotations

import typer

from artifact import cli as artifact_files
from controller.cli import (
    artifacts,
    assign,
    certs,
    compress,
    devices,
    events,
    jobs,
    models,
    rollouts,
)
from controller.cli.errors import ExitCode
from homefleet.lazy import LazyGroup, root_group_class

PROCESSES = "Processes"
OPERATE = "Operate the fleet"
COMPRESS = "Compress models (needs the controller extra)"

EPILOG = (
    "Exit codes: 0 ok; 1 the controller refused the request; 2 usage error; "
    "3 command group not installed here; 4 controller unreachable; 5 compression ran but "
    "no recipe met every budget."
)

_root = root_group_class(
    LazyGroup(
        name="agent",
        module="edge_agent.cli",
        attribute="app",
        summary="Run the edge agent on a device.",
        extra="edge",
        missing_exit_code=ExitCode.MISSING_EXTRA,
        panel=PROCESSES,
    ),
    LazyGroup(
        name="controller",
        module="controller.serve",
        attribute="app",
        summary="Run the controller (gRPC API, registry, artifact store).",
        extra="controller",
        missing_exit_code=ExitCode.MISSING_EXTRA,
        panel=PROCESSES,
    ),
)

app = typer.Typer(
    name="homefleet",
    cls=_root,
    help="HomeFleet: compress models per smart-home device class and ship them to devices.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(models.app, name="model", rich_help_panel=OPERATE)
# `artifact` merges the operator commands (create, list: via a controller) with the local
# delta commands (diff, patch: files only, so `patch` works with just the edge extra).
artifact_app = typer.Typer(
    help="Create and list signed artifacts; diff and patch model files locally.",
    no_args_is_help=True,
)
for commands in (artifacts.app, artifact_files.app):
    artifact_app.registered_commands.extend(commands.registered_commands)
app.add_typer(artifact_app, name="artifact", rich_help_panel=OPERATE)
app.add_typer(certs.app, name="certs", rich_help_panel=PROCESSES)
app.command("assign", rich_help_panel=OPERATE)(assign.assign)
app.command("unassign", rich_help_panel=OPERATE)(assign.unassign)
# `homefleet devices [--class ...]` lists; `homefleet devices remove ID` forgets one.
app.add_typer(devices.app, name="devices", rich_help_panel=OPERATE)
app.command("events", rich_help_panel=OPERATE)(events.events)
# `homefleet rollouts [--model ...]` lists; `rollouts pause|resume|abort` steer the budget loop.
app.add_typer(rollouts.app, name="rollouts", rich_help_panel=OPERATE)
app.command("compress", rich_help_panel=COMPRESS)(compress.compress)
app.command("evaluate", rich_help_panel=COMPRESS)(compress.evaluate)
# `homefleet jobs [--model ...]` lists; `homefleet jobs watch|cancel ID` follow or stop one.
app.add_typer(jobs.app, name="jobs", rich_help_panel=COMPRESS)


def main() -> None:
    """Console-script entry point (`homefleet`)."""
    app(prog_name="homefleet")
