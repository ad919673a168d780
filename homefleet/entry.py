"""The `homefleet` command's entry point.

Loading the command line takes about a second (typer, rich, gRPC, the generated protos);
a Ctrl-C in that second ends it quietly with exit 130, as a Ctrl-C does later, instead
of a traceback from whichever import it interrupted.
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


def main() -> None:
    """Commands handle their own Ctrl-C (a job keeps running, a patch is written whole or
    not at all); one that reaches here came while typer was still building the command."""
    try:
        from homefleet.cli import main as run

        run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
