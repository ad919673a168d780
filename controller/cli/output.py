"""How results reach the terminal: rich tables for people, JSON for scripts.

Data goes to stdout, everything else (errors, progress) to stderr, so `--json` output
can be piped as it is.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from typing import Annotated

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text

JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print machine-readable JSON to stdout, and nothing else."),
]

SHORT_SHA = 12


PIPE_WIDTH = 1000  # tables piped to a file or `grep` keep whole rows, never folded


def stdout() -> Console:
    """The terminal's width on a terminal; into a pipe, wide enough for any row (rich
    would otherwise assume 80 columns and fold cells), unless $COLUMNS says otherwise."""
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(highlight=False, width=PIPE_WIDTH if piped else None)


def stderr() -> Console:
    return Console(stderr=True, highlight=False)


def say(line: str) -> None:
    """A one-line result for a person, unwrapped so it can be copied whole."""
    typer.echo(line)


def note(line: str) -> None:
    """Something a person should know about the result (stderr: `--json` stays clean)."""
    typer.echo(f"note: {line}", err=True)


def print_json(view: BaseModel) -> None:
    sys.stdout.write(view.model_dump_json(indent=2) + "\n")


def print_table(table: Table, empty: str | None = None) -> None:
    """The table; with no rows and ``empty`` given, that note instead (an empty frame
    looks like a failure, and says nothing of why)."""
    if empty is not None and table.row_count == 0:
        note(empty)
        return
    stdout().print(table)


def table(*columns: str, title: str | None = None) -> Table:
    """Long cells fold onto more lines; headers keep their width (at 80 columns rich
    would otherwise split 'serving' into 'servin g')."""
    t = Table(*columns, title=title, title_justify="left", header_style="bold")
    for column, header in zip(t.columns, columns, strict=True):
        column.overflow = "fold"
        column.min_width = len(header)
    return t


def add_row(table: Table, *cells: str) -> None:
    """Add a row of plain text: names and server messages are never read as rich markup."""
    table.add_row(*(Text(cell) for cell in cells))


def short_sha(sha256: str) -> str:
    return sha256[:SHORT_SHA]


def human_size(size_bytes: int) -> str:
    """1536 -> "1.5 KiB": binary units, like the limits in the docs (8 MiB, 256 KiB)."""
    if size_bytes < 1024:
        return f"{size_bytes} B"
    units = ("KiB", "MiB", "GiB", "TiB")
    size, index = size_bytes / 1024, 0
    while size >= 1024 and index < len(units) - 1:
        size, index = size / 1024, index + 1
    return f"{size:.1f} {units[index]}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def relative_time(unix_ms: int, *, now: int | None = None) -> str:
    """How long ago, for a person: "3s ago", "5m ago", "2h ago", "4d ago"; "never" for 0."""
    if unix_ms <= 0:
        return "never"
    seconds = ((now if now is not None else now_ms()) - unix_ms) // 1000
    if seconds < 0:
        return "just now"
    for unit, span in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= span:
            return f"{seconds // span}{unit} ago"
    return f"{seconds}s ago"


def local_time(unix_ms: int) -> str:
    """A wall-clock time in the operator's time zone; "-" for 0 (not set)."""
    if unix_ms <= 0:
        return "-"
    return datetime.fromtimestamp(unix_ms / 1000, tz=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def local_datetime(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
