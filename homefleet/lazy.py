"""Command groups imported on first use, so one side's dependencies never burden another's.

`homefleet agent ...` must run on a device with only the `edge` extra, where importing
the controller's server (SQLAlchemy, onnx, torch) would fail; and nobody should wait
for torch to import just to list devices. The root group therefore knows these groups
by import path, and imports one only when it is invoked or its own help is asked for.
`homefleet --help` lists them from their declared summary without importing anything.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

if TYPE_CHECKING:  # typer vendors click; only its types are needed, not at run time
    from typer._click import Command, Context, HelpFormatter

_LISTING = "homefleet.lazy.listing"


@dataclass(frozen=True)
class LazyGroup:
    """A command group defined by a typer app in a module that may be heavy or absent."""

    name: str
    module: str  # e.g. "controller.serve"
    attribute: str  # the typer.Typer in that module, e.g. "app"
    summary: str  # shown in `homefleet --help` without importing the module
    extra: str  # the pip extra that provides the module's dependencies
    missing_exit_code: int
    panel: str | None = None


@functools.cache
def _load(spec: LazyGroup) -> Command:
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        return _unavailable(spec, exc)
    sub_app = getattr(module, spec.attribute, None)
    if not isinstance(sub_app, typer.Typer):
        raise TypeError(f"{spec.module}.{spec.attribute} is not a typer.Typer app")
    # Always a group, even when the app has a single command: `homefleet agent run`.
    group = typer.main.get_group(sub_app)
    group.name = spec.name
    if group.help is None:
        group.help = spec.summary
    return group


def _unavailable(spec: LazyGroup, exc: ImportError) -> Command:
    """Stands in for a group whose dependencies are not installed, and says how to fix it."""
    message = (
        f"`homefleet {spec.name}` is not available in this installation ({exc}); "
        f"install it with: pip install 'homefleet[{spec.extra}]'"
    )

    def report(**_: Any) -> None:
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(spec.missing_exit_code)

    return TyperCommand(
        spec.name,
        callback=report,
        help=f"{spec.summary} (not installed here: needs the '{spec.extra}' extra)",
        add_help_option=False,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


def _summary(spec: LazyGroup) -> Command:
    return TyperCommand(spec.name, help=spec.summary, rich_help_panel=spec.panel)


class LazyRootGroup(TyperGroup):
    """A typer root group that also offers `lazy_groups`, imported when first used."""

    lazy_groups: ClassVar[Mapping[str, LazyGroup]] = {}

    def list_commands(self, ctx: Context) -> list[str]:
        return [*super().list_commands(ctx), *self.lazy_groups]

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        spec = self.lazy_groups.get(cmd_name)
        if spec is None:
            return super().get_command(ctx, cmd_name)
        if ctx.meta.get(_LISTING):
            return _summary(spec)
        return _load(spec)

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        ctx.meta[_LISTING] = True
        try:
            super().format_help(ctx, formatter)
        finally:
            del ctx.meta[_LISTING]


def root_group_class(*groups: LazyGroup) -> type[TyperGroup]:
    """A `LazyRootGroup` subclass offering ``groups``, for `typer.Typer(cls=...)`."""
    return type("HomefleetGroup", (LazyRootGroup,), {"lazy_groups": {g.name: g for g in groups}})
