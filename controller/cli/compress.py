"""`homefleet compress` and `homefleet evaluate`: compression on this machine.

Exit codes: 0 every budget holds; 5 no recipe meets the budget (the best trial is
written, with the gap per budget); 2 bad input (file, device class, calibration,
flags), with nothing written to --out; 130 interrupted (Ctrl-C), nothing written. The
heavy stack (torch, onnx, onnxruntime) is imported inside the commands, so the rest of
the CLI starts without it.

With --controller the same job runs on a controller instead (controller.cli.jobs),
with the same exit codes; the result becomes a signed artifact there.

--previous ARTIFACT.onnx (a static int8 artifact of an earlier release of this model)
makes the first recipe reuse its quantization parameters, for a small delta to the
devices that hold it; a controller finds that artifact itself.

`evaluate` exits 2 too when onnxruntime cannot load the file (not an ONNX model) or
cannot run it on the workload's inputs (a model made for another workload): one line
naming the file and the inputs the workload feeds, never a traceback.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import rich
import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from controller.cli.client import DEFAULT_TIMEOUT_S
from controller.cli.errors import ExitCode
from controller.cli.jobs import (
    DEFAULT_WAIT_S,
    EXIT_INTERRUPTED,
    RemoteCompression,
    budget_amount,
    compress_on_controller,
)

if TYPE_CHECKING:
    from controller.compression.planner import Trial
    from controller.workloads.base import Workload

EXIT_MET, EXIT_BAD_INPUT, EXIT_NOT_MET = ExitCode.OK, ExitCode.USAGE, ExitCode.BUDGET_NOT_MET
err = Console(stderr=True)
# The global console: training's epoch bars (controller.workloads.training) draw on it,
# and live displays nest only on one console.
out = rich.get_console()


def _written_verdict(out_dir: Path) -> bool | None:
    """Whether the run in ``out_dir`` met its budgets, if its results were published there
    (moved into place in one rename, manifest.json included); None if not."""
    try:
        met = json.loads((out_dir / "manifest.json").read_text())["met"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return bool(met)


def _fail(message: str) -> typer.Exit:
    """One unwrapped line (paths and messages are never read as markup), exit 2."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_BAD_INPUT)


def _show_trial(trial: Trial) -> None:
    if trial.error:
        out.print(
            f"  trial {trial.index:2d} [yellow]skipped[/] {trial.recipe.describe()}: {trial.error}"
        )
        return
    quality = f"{trial.quality.metric} {trial.quality.value:.4f}" if trial.quality else "-"
    timing = (
        f"p95 {trial.timing.p95_ms:.2f} ms, {trial.timing.energy_mj:.2f} mJ" if trial.timing else ""
    )
    missed = ", ".join(v.budget for v in trial.verdicts if not v.met)
    state = "[green]meets budget[/]" if trial.met else f"[dim]misses {missed}[/]"
    out.print(
        f"  trial {trial.index:2d} {state} {trial.recipe.describe()}: "
        f"{trial.artifact_bytes:,} B, {quality}, {timing} [dim]({trial.seconds:.1f} s)[/]"
    )


def _check_quality_flags(
    labelled: bool, min_fidelity: float | None, max_accuracy_drop: float | None
) -> None:
    """A quality flag of the other kind would be ignored: refuse it instead."""
    if labelled and min_fidelity is not None:
        raise _fail(
            "--min-fidelity is for models without labels; a classifier workload is judged by "
            "its accuracy: use --max-accuracy-drop (a fraction: 0.01 = one point)"
        )
    if not labelled and max_accuracy_drop is not None:
        raise _fail(
            "--max-accuracy-drop needs labelled data (a classifier --workload); this model "
            "is judged by fidelity to its source's outputs: use --min-fidelity (e.g. 0.99)"
        )


def _note_looser(looser: list[str], device_class: Path) -> None:
    """Budget flags replace the class's budgets for this run; loosening one is allowed
    (to see what a looser budget buys) but said, since the result may then miss the
    class's own budget."""
    if looser:
        typer.echo(
            f"note: these flags loosen {device_class} for this run: {'; '.join(looser)}; "
            "the result may miss the class's own budgets",
            err=True,
        )


class _Interrupts:
    """Ctrl-C during a search. onnxruntime and torch call back into Python from C, where
    a KeyboardInterrupt can be swallowed ("Exception ignored in ..."); the flag stops the
    run at the next trial boundary even then."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: object = None

    def __enter__(self) -> _Interrupts:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        self._hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
        sys.unraisablehook = self._hook

    def _unraisable(self, unraisable: sys.UnraisableHookArgs) -> None:
        """The swallowed interrupt is not news to the person who pressed Ctrl-C."""
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            self._hook(unraisable)

    def _handle(self, _signum: int, _frame: object) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt


class _Activity:
    """A spinner line with the time spent, saying what compress is doing now."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def __call__(self, text: str) -> None:
        if self._task is None:
            self._task = self._progress.add_task(text, total=None)
        else:
            self._progress.reset(self._task, description=text)
        self._progress.refresh()  # at once: a trial may end before the next tick


@contextmanager
def _activity() -> Iterator[_Activity | None]:
    """On a terminal, the spinner (gone when compress ends); in a pipe, nothing."""
    if not out.is_terminal:
        yield None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=out, transient=True) as progress:
        yield _Activity(progress)


def compress(
    device_class: Path = typer.Option(..., "--device-class", help="device-class YAML file"),
    out_dir: Path | None = typer.Option(
        None, "--out", help="new directory for the results (on this machine)"
    ),
    onnx_model: Path | None = typer.Option(None, "--onnx", help="ONNX model (post-training only)"),
    calib: Path | None = typer.Option(None, "--calib", help=".npz of inputs, named after them"),
    workload: str | None = typer.Option(None, "--workload", help="reference workload name"),
    min_fidelity: float | None = typer.Option(
        None,
        "--min-fidelity",
        min=0.0,
        max=1.0,
        help=(
            "least agreement with the source's outputs on the --calib inputs (models without "
            "labels): class scores [N, C], share of samples with the same top-1 class; "
            "binary [N] or [N, 1], share on the same side of 0.5 (probabilities) or 0 "
            "(logits); embeddings (task metadata 'embedding', or rank 3 and up), mean "
            "cosine similarity"
        ),
    ),
    max_accuracy_drop: float | None = typer.Option(
        None,
        "--max-accuracy-drop",
        min=0.0,
        max=1.0,
        help="most accuracy lost against the source, as a fraction (0.005 = half a point)",
    ),
    max_bytes: int | None = typer.Option(
        None, "--max-bytes", min=1, help="largest artifact file, in bytes"
    ),
    max_size_ratio: float | None = typer.Option(
        None,
        "--max-size-ratio",
        min=0.0,
        max=1.0,
        help="largest artifact as a fraction of the source's bytes (0.1 = 10x smaller)",
    ),
    p95_ms: float | None = typer.Option(
        None,
        "--p95-ms",
        min=0.0,
        help="p95 latency budget in ms, predicted for the class's speed",
    ),
    previous: Path | None = typer.Option(
        None,
        "--previous",
        metavar="ARTIFACT.onnx",
        help="the class's earlier static int8 artifact of this model: try reusing its "
        "quantization parameters first (a small delta for devices that hold it)",
    ),
    controller: str | None = typer.Option(
        None,
        "--controller",
        metavar="HOST:PORT",
        help="run the job on this controller instead (with --model or --workload); the "
        "result becomes a signed artifact there",
    ),
    model: str | None = typer.Option(
        None, "--model", metavar="NAME", help="with --controller: a registered model's name"
    ),
    model_version: int = typer.Option(
        0, "--model-version", min=0, metavar="N", help="with --model: its version; 0 = latest"
    ),
    wait: bool = typer.Option(
        True, "--wait/--no-wait", help="with --controller: follow the job until it ends"
    ),
    wait_timeout: float = typer.Option(
        DEFAULT_WAIT_S, "--wait-timeout", min=1.0, metavar="SECONDS", help="how long to follow"
    ),
    timeout: float = typer.Option(
        DEFAULT_TIMEOUT_S, "--timeout", min=0.1, metavar="SECONDS", help="deadline per call"
    ),
    as_json: bool = typer.Option(
        False, "--json", help="with --controller: print the finished job as JSON"
    ),
) -> None:
    """Search recipes for one device class until every budget holds: on this machine, or
    as a job on a controller (--controller), which publishes the result as an artifact."""
    if controller is not None:
        if onnx_model is not None or out_dir is not None:
            raise _fail(
                "with --controller, register the model first (`homefleet model add NAME "
                "FILE.onnx`) and name it with --model NAME; the result becomes an artifact "
                "on the controller, so there is no --out"
            )
        if max_bytes is not None and max_size_ratio is not None:
            raise _fail("give --max-bytes or --max-size-ratio, not both")
        from controller.workloads.names import UNLABELLED_WORKLOADS

        labelled = workload is not None and workload not in UNLABELLED_WORKLOADS
        _check_quality_flags(labelled, min_fidelity, max_accuracy_drop)
        from controller.device_classes import DeviceClassError, load_device_class

        try:
            looser = load_device_class(device_class).loosened_by(
                max_artifact_bytes=max_bytes,
                p95_latency_ms=p95_ms,
                min_fidelity=min_fidelity,
                max_accuracy_drop=max_accuracy_drop,
            )
        except DeviceClassError as exc:
            raise _fail(str(exc)) from exc
        _note_looser(looser, device_class)
        if previous is not None:
            raise _fail(
                "--previous is for compressing on this machine: a controller reuses the "
                "parameters of the class's latest static int8 artifact of the model by itself"
            )
        compress_on_controller(
            RemoteCompression(
                device_class=device_class,
                model=model,
                model_version=model_version,
                workload=workload,
                calibration=calib,
                min_fidelity=min_fidelity,
                max_accuracy_drop=max_accuracy_drop,
                max_bytes=max_bytes,
                max_size_ratio=max_size_ratio,
                p95_ms=p95_ms,
            ),
            address=controller.strip(),
            timeout_s=timeout,
            wait=wait,
            wait_timeout_s=wait_timeout,
            as_json=as_json,
        )
        return
    if model is not None:
        raise _fail(
            "--model names a model registered with a controller: add --controller HOST:PORT, "
            "or compress a file here with --onnx FILE.onnx"
        )
    if out_dir is None:
        raise _fail("--out DIR is required when compressing on this machine")
    if (onnx_model is None) == (workload is None):
        raise _fail("give exactly one of --onnx MODEL.onnx (with --calib) or --workload NAME")
    if max_bytes is not None and max_size_ratio is not None:
        raise _fail("give --max-bytes or --max-size-ratio, not both")
    if onnx_model is not None and calib is None:
        raise _fail("--onnx needs --calib INPUTS.npz (arrays named after the model's inputs)")
    if previous is not None and not previous.is_file():
        raise _fail(f"--previous {previous} does not exist or is not a file")

    # Every flag is checked with light imports (the compression stack takes seconds to
    # load), so bad input is refused at once.
    from pydantic import ValidationError

    from controller.compression.budgets import quality_budget_problem
    from controller.compression.errors import CompressionError, check_out_dir
    from controller.device_classes import (
        DeviceClassError,
        load_device_class,
        validation_problems,
    )
    from controller.workloads.names import (
        UNLABELLED_WORKLOADS,
        UnknownWorkloadError,
        check_workload_name,
    )

    flags = {
        "max_artifact_bytes": max_bytes,
        "p95_latency_ms": p95_ms,
        "min_fidelity": min_fidelity,
        "max_accuracy_drop": max_accuracy_drop,
    }
    try:
        declared = load_device_class(device_class)
        _note_looser(declared.loosened_by(**flags), device_class)
        dc = declared.with_budgets(**flags)
    except ValidationError as exc:  # a flag the class cannot take (over its storage)
        raise _fail(
            f"the budget flags do not fit {device_class}: {validation_problems(exc)}"
        ) from exc
    except (DeviceClassError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    try:
        workload = check_workload_name(workload) if workload is not None else None
    except UnknownWorkloadError as exc:
        raise _fail(str(exc)) from exc
    if onnx_model is not None and not onnx_model.is_file():
        raise _fail(f"--onnx {onnx_model} does not exist")
    labelled = workload is not None and workload not in UNLABELLED_WORKLOADS
    _check_quality_flags(labelled, min_fidelity, max_accuracy_drop)
    source = f"workload {workload}" if workload is not None else f"the ONNX model {onnx_model}"
    problem = quality_budget_problem(dc.budgets, labelled=labelled, source=source)
    if problem is not None:
        raise _fail(f"{problem} (device class {dc.name})")
    try:
        check_out_dir(out_dir)
    except CompressionError as exc:
        raise _fail(str(exc)) from exc

    from controller.compression.job import compress_onnx, compress_workload
    from controller.workloads.registry import get_workload

    chosen = get_workload(workload) if workload is not None else None
    out.print(f"compressing for [bold]{dc.name}[/] into {out_dir}")
    try:
        with _activity() as spinner, _Interrupts() as interrupts:

            def on_trial(trial: Trial) -> None:
                interrupts.check()
                _show_trial(trial)

            def activity(text: str) -> None:
                interrupts.check()
                if spinner is not None:
                    spinner(text)

            if onnx_model is None or calib is None:
                assert chosen is not None  # exactly one of --onnx / --workload, checked above
                outcome = compress_workload(
                    chosen, dc, out_dir,
                    max_size_ratio=max_size_ratio, on_trial=on_trial, previous=previous,
                    on_activity=activity, show_progress=spinner is not None,
                )  # fmt: skip
            else:
                from controller.workloads.fidelity import load_calibration

                name = re.sub(r"[^a-z0-9._-]", "-", onnx_model.stem.lower()).strip("-._") or "model"
                outcome = compress_onnx(
                    onnx_model, load_calibration(calib), dc, out_dir,
                    name=name, max_size_ratio=max_size_ratio, on_trial=on_trial,
                    previous=previous, on_activity=activity,
                )  # fmt: skip
    except (CompressionError, UnknownWorkloadError) as exc:
        raise _fail(str(exc)) from exc
    except KeyboardInterrupt:
        written = _written_verdict(out_dir)
        if written is not None:  # landed after the results were moved into place
            typer.echo(f"interrupted after the results were written to {out_dir} in full",
                       err=True)  # fmt: skip
            raise typer.Exit(EXIT_MET if written else EXIT_NOT_MET) from None
        typer.echo(
            f"interrupted: nothing was written to {out_dir} (a source model that finished "
            "training stays cached for the next run)",
            err=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    # The results are in place: a Ctrl-C from here on (printing them, the interpreter
    # shutting down) must not make a finished run look failed and tempt a rerun into
    # an --out that is no longer empty (QA).
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    table = Table(title=f"budgets for {dc.name}: {outcome.chosen.recipe.describe()}")
    for column in ("budget", "limit", "observed", "verdict"):
        table.add_column(column)
    for v in outcome.chosen.verdicts:
        gap = budget_amount(v.budget, v.gap)
        verdict = "[green]ok[/]" if v.met else f"[red]missed by {gap}[/]"
        limit, observed = (budget_amount(v.budget, x) for x in (v.limit, v.observed))
        table.add_row(v.budget, limit, observed, verdict)
    out.print(table)
    out.print(
        "[dim]p95 and energy are predicted for the class (measured here, scaled by its "
        "relative_speed and power model); devices report what they observe[/]"
    )
    if not outcome.met:
        from controller.compression.budgets import misses_a_known_budget

        best = outcome.chosen
        why = (
            "it misses only budgets a device measures (predicted p95 or energy), which a canary "
            "may refute"
            if not misses_a_known_budget(best.verdicts)
            else "none is within size and quality, so it is the one that misses the fewest of "
            "those budgets, by the least"
        )
        typer.echo(  # one unwrapped line, like every message a script may grep
            f"no recipe meets every budget; the best trial, {best.index} "
            f"({best.recipe.describe()}), is in {out_dir}: {why}",
            err=True,
        )
        raise typer.Exit(EXIT_NOT_MET)
    out.print(f"[green]budget holds[/]: {out_dir / 'model.onnx'}")


def evaluate(
    model: Path = typer.Argument(..., help="ONNX model to score"),
    workload: str = typer.Option(..., "--workload", help="reference workload name"),
    split: str = typer.Option("test", "--split", help="test (default) or val"),
    as_json: bool = typer.Option(False, "--json", help="print JSON for scripts"),
) -> None:
    """Score any ONNX file on a workload's held-out split, with its own preprocessing."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    from controller.compression.errors import CompressionError
    from controller.workloads.registry import UnknownWorkloadError, get_workload
    from controller.workloads.training import WorkloadError

    if not model.is_file():
        raise _fail(f"{model} does not exist or is not a file")
    if split not in ("test", "val"):
        raise _fail(f"--split must be test or val, got {split!r}")
    try:
        chosen = get_workload(workload)
    except UnknownWorkloadError as exc:
        raise _fail(str(exc)) from exc
    chosen.data()  # loaded (and kept) first: a failure below is the model's, not the data's
    # What onnxruntime raises for a file it cannot load, and for a model it can load but
    # not run on these inputs (wrong shapes, names or types; an operator it lacks).
    unloadable = (
        ort_errors.InvalidProtobuf,
        ort_errors.InvalidGraph,
        ort_errors.NoModel,
        ort_errors.NoSuchFile,
    )
    unrunnable = (ort_errors.InvalidArgument, ort_errors.Fail, ort_errors.NotImplemented)
    try:
        score = chosen.score_onnx(model, split=split)
    except CompressionError as exc:
        raise _fail(str(exc)) from exc
    except unloadable as exc:
        raise _fail(
            f"{model} is not an ONNX model onnxruntime can load ({_ort_text(exc)}): give the "
            f".onnx file exported for {workload}"
        ) from exc
    except (*unrunnable, ValueError, WorkloadError) as exc:  # ValueError: a missing input
        raise _fail(
            f"{model} does not fit the {workload} workload: onnxruntime cannot run it "
            f"({_ort_text(exc)}); {_expects(chosen, split)}: give a model exported for "
            f"{workload}, or the --workload this one was made for"
        ) from exc
    document = {
        "workload": workload,
        "model": str(model),
        "split": split,
        "metric": score.metric,
        "value": score.value,
        "samples": score.samples,
        "extra": score.extra,
    }
    if as_json:
        print(json.dumps(document))
    else:
        out.print(
            f"{workload} {split}: {score.metric} = {score.value:.4f} on {score.samples} samples"
        )
        for key, value in score.extra.items():
            out.print(f"  {key} = {value:.4f}")


def _ort_text(exc: BaseException) -> str:
    """onnxruntime's message on one line, without its "[ONNXRuntimeError] : 2 : NAME :"
    prefix (the status is in the exception's type; the prefix is only noise here)."""
    text = " ".join(str(exc).split())
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)


def _expects(workload: Workload, split: str) -> str:
    """What the workload feeds a model and reads from it, e.g. "basic-motions feeds
    x float32[N,6,100] and reads logits"."""
    from controller.workloads.training import select_split

    inputs = select_split(workload.data(), split).inputs  # loaded already (evaluate)
    feeds = ", ".join(
        f"{name} {array.dtype}[{','.join(['N', *map(str, array.shape[1:])])}]"
        for name, array in inputs.items()
    )
    return f"{workload.name} feeds {feeds} and reads {', '.join(workload.output_names)}"
