"""Command groups that list when called alone (`homefleet jobs`, `homefleet rollouts`) and
take subcommands too (`jobs watch 3`, `rollouts pause ...`)."""

from __future__ import annotations

import typer


def refuse_listing_options(ctx: typer.Context, example: str) -> None:
    """`homefleet jobs --controller X watch 3` would silently drop X: the listing's options
    belong to the listing, a subcommand takes its own after its name. ``example`` is the
    subcommand's usage up to its options (e.g. "homefleet jobs watch ID")."""
    # ParameterSource.COMMANDLINE by name: typer vendors click and does not export the enum
    given = [
        param.opts[0]
        for param in ctx.command.params
        if param.name is not None
        and (source := ctx.get_parameter_source(param.name)) is not None
        and source.name == "COMMANDLINE"
    ]
    if given:
        raise typer.BadParameter(
            ctx=ctx,
            message=f"{', '.join(given)} before `{ctx.invoked_subcommand}` would be ignored: "
            f"give the options after the subcommand, e.g. `{example} {given[0]} ...`",
        )
