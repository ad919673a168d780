"""Command groups that list when called alone (`homefleet jobs`, `homefleet rollouts`,
`homefleet devices`) and take subcommands too (`jobs watch 3`, `rollouts pause ...`)."""

from __future__ import annotations

import typer


def refuse_listing_options(ctx: typer.Context, example: str) -> None:
    """`homefleet jobs --controller X watch 3` would silently drop X: the listing's options
    belong to the listing, a subcommand takes its own after its name. ``example`` is the
    subcommand's usage up to its options (e.g. "homefleet jobs watch ID"). The advice
    moves only the options the subcommand takes; the others only narrow the listing."""
    # ParameterSource.COMMANDLINE by name: typer vendors click and does not export the enum
    given = [
        param.opts[0]
        for param in ctx.command.params
        if param.name is not None
        and (source := ctx.get_parameter_source(param.name)) is not None
        and source.name == "COMMANDLINE"
    ]
    if not given:
        return
    subcommand = ctx.invoked_subcommand or ""
    # a group command (typer's vendored click has its type): the subcommand's own options
    lookup = getattr(ctx.command, "get_command", None)
    sub = lookup(ctx, subcommand) if lookup is not None else None
    takes: set[str] = {str(opt) for param in getattr(sub, "params", ()) for opt in param.opts}
    movable = [flag for flag in given if flag in takes]
    listing_only = [flag for flag in given if flag not in takes]
    advice = []
    if movable:
        advice.append(
            f"give {', '.join(movable)} after the subcommand, e.g. `{example} {movable[0]} ...`"
        )
    if listing_only:
        one = len(listing_only) == 1
        advice.append(
            f"{', '.join(listing_only)} only {'narrows' if one else 'narrow'} the listing: "
            f"`{subcommand}` does not take {'it' if one else 'them'}"
        )
    raise typer.BadParameter(
        ctx=ctx,
        message=f"{', '.join(given)} before `{subcommand}` would be ignored: " + "; ".join(advice),
    )
