"""`homefleet artifact diff|patch`: model-aware deltas between two local ONNX files.

  homefleet artifact diff OLD.onnx NEW.onnx -o PATCH      (where the models are built)
  homefleet artifact patch OLD.onnx PATCH -o OUT.onnx     (on a device: `edge` extra only)

This module imports typer and `artifact` only (numpy, zstandard): no onnx, no torch, no
gRPC, so `patch` runs wherever the edge agent does.

Exit codes:
  0  ok
  1  the patch does not apply: damaged, made against another base, or a newer format
     (the message says which); nothing is written to -o
  2  usage error, or a file that cannot be read or written
  130  interrupted (Ctrl-C); nothing is written to -o

On a terminal `diff` shows its progress (coding a 90 MB encoder takes ~20 s) on stderr.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from artifact.delta import DeltaError, EncodeOptions, apply_delta, write_delta
from artifact.delta.encode import EncodeProgress
from artifact.digest import InvalidDigestError

app = typer.Typer(no_args_is_help=True)


class ExitCode(enum.IntEnum):
    OK = 0
    REFUSED = 1
    USAGE = 2
    INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


def _fail(message: str, code: ExitCode) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(int(code))


def _check_out(out: Path, *inputs: Path) -> None:
    """-o names a file in a directory that exists (a typo must not create directories)
    and is none of the inputs (which it would replace)."""
    for given in inputs:
        if out.exists() and out.samefile(given):
            raise _fail(
                f"-o {out} is the input {given}, which it would replace; choose another -o",
                ExitCode.USAGE,
            )
    if out.is_dir():
        raise _fail(f"{out} is a directory; give -o a file name", ExitCode.USAGE)
    if not out.parent.is_dir():
        raise _fail(
            f"directory {out.parent} does not exist; create it first or choose another -o",
            ExitCode.USAGE,
        )


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


def _interrupted(out: Path, before: tuple[int, int] | None) -> typer.Exit:
    """Ctrl-C. The result is renamed over -o only once whole (a patch's result verified
    too), so -o is either as it was or complete: a rename before the interrupt arrived
    (a new file at -o) means the work is done, and saying "nothing written" would lie."""
    if _identity(out) in (None, before):
        return _fail(f"interrupted: nothing written to {out}", ExitCode.INTERRUPTED)
    _share(out)
    typer.echo(f"interrupted after {out} was written in full: it is complete", err=True)
    _done()
    return typer.Exit(int(ExitCode.OK))


def _done() -> None:
    """The result is in place and said: a Ctrl-C from here on (the interpreter still has
    to shut down) must not make a finished command look failed (QA: exit by SIGINT and
    an "Exception ignored in threading._shutdown" after the "wrote" line)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _share(out: Path) -> None:
    """Written files start private (0600, as for keys); a model or patch a person asked
    for gets the usual permissions, as `cp` would give it (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    out.chmod(0o666 & ~umask)


def _ratio(payload: int, target: int) -> str:
    if payload <= target:
        return f"{target / max(payload, 1):.1f}x smaller"
    return f"{payload / max(target, 1):.1f}x larger than the file itself"


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # unreachable


@contextmanager
def _encode_progress() -> Iterator[EncodeProgress | None]:
    """A bar on stderr while the delta is coded, on a terminal only (gone when done)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("reading the models", total=None)

        def report(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=max(total, 1))

        yield report


@app.command("diff")
def diff(
    old: Annotated[Path, typer.Argument(metavar="OLD.onnx", exists=True, dir_okay=False)],
    new: Annotated[Path, typer.Argument(metavar="NEW.onnx", exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option("-o", "--out", metavar="PATCH", help="Where to write it.")],
    level: Annotated[int, typer.Option(min=1, max=22, help="zstd level for what is kept.")] = 19,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stats as JSON.")] = False,
) -> None:
    """Write the delta that turns OLD.onnx into NEW.onnx (any two files work; ONNX best)."""
    _check_out(out, old, new)
    before = _identity(out)
    try:
        with _encode_progress() as progress:
            stats = write_delta(old, new, out, EncodeOptions(level=level), progress)
        _share(out)
        if as_json:
            typer.echo(json.dumps(dataclasses.asdict(stats), indent=2))
        else:
            what = (
                "model" if stats.tensors else "file (no ONNX tensors in it: coded as plain bytes)"
            )
            typer.echo(
                f"wrote {out}: {_human(stats.payload_size)} for a {_human(stats.target_size)} "
                f"{what} ({_ratio(stats.payload_size, stats.target_size)}, {stats.mode})"
            )
        _done()
    except OSError as exc:
        raise _fail(f"cannot read the models or write {out}: {exc}", ExitCode.USAGE) from None
    except KeyboardInterrupt:
        raise _interrupted(out, before) from None


@app.command("patch")
def patch(
    old: Annotated[Path, typer.Argument(metavar="OLD.onnx", exists=True, dir_okay=False)],
    patch_file: Annotated[Path, typer.Argument(metavar="PATCH", exists=True, dir_okay=False)],
    out: Annotated[
        Path, typer.Option("-o", "--out", metavar="OUT.onnx", help="Where to write the model.")
    ],
    sha256: Annotated[
        str | None,
        typer.Option("--sha256", metavar="HEX", help="Refuse unless the result has this digest."),
    ] = None,
) -> None:
    """Rebuild the new model from OLD.onnx and PATCH, bit for bit, verified by sha256."""
    _check_out(out, old, patch_file)
    before = _identity(out)
    try:
        result = apply_delta(old, patch_file, out, expected_sha256=sha256)
        _share(out)
        how = result.mode + (", compiled decoder" if result.decoder == "native" else "")
        typer.echo(f"wrote {out}: {_human(result.size)}, sha256 {result.sha256} ({how})")
        _done()
    except KeyboardInterrupt:
        raise _interrupted(out, before) from None
    except InvalidDigestError as exc:
        raise _fail(str(exc), ExitCode.USAGE) from None
    except DeltaError as exc:
        raise _fail(f"{patch_file} does not apply to {old}: {exc}", ExitCode.REFUSED) from None
    except OSError as exc:
        raise _fail(f"cannot read the inputs or write {out}: {exc}", ExitCode.USAGE) from None
