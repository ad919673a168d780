"""`python -m demo` (what `make demo` runs): train, start a fleet, deploy, infer, report.

Exit codes: 0 the whole scenario worked and every process stopped cleanly; 1 a step
failed (the message says which and where its log is); 130 interrupted (Ctrl-C or
SIGTERM). Every process the demo started is stopped before it exits, in every case.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.panel import Panel
from rich.rule import Rule
from rich.text import Text

from controller.workloads.basic_motions import (
    DEFAULT_EPOCHS,
    DEFAULT_SEED,
    MODEL_NAME,
    BasicMotionsData,
    TrainResult,
    WorkloadError,
    load_basic_motions,
    train_and_export,
)
from demo.fleet import (
    DEMO_DEVICES,
    ControllerInfo,
    RunDirError,
    RunLayout,
    prepare_run_dir,
    start_agents,
    start_controller,
)
from demo.inference import InferenceError, run_test_set
from demo.operator import ArtifactRef, CliResult, Operator, OperatorError
from demo.processes import ProcessError, ProcessGroup, StopResult
from demo.report import DeviceResult, results_table, write_result_json

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIR = REPO_ROOT / ".demo"
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
_EXPECTED_ERRORS = (ProcessError, OperatorError, InferenceError, WorkloadError, RunDirError)
_SHOWN_CLI_LINES = 6
_LOG_WIDTH = 160

Update = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    run_dir: Path
    seed: int
    epochs: int


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m demo", description="Run the HomeFleet demo scenario end to end."
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=DEFAULT_RUN_DIR,
        help=f"where the run's files and logs go, recreated each run (default {DEFAULT_RUN_DIR})",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="training seed")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    return Options(run_dir=args.run_dir.resolve(), seed=args.seed, epochs=args.epochs)


@contextlib.contextmanager
def phase(console: Console, title: str, *, spinner: bool = True) -> Iterator[Update]:
    """Show a phase as a spinner line while it runs, then one line saying how it ended."""
    started = time.perf_counter()
    try:
        if spinner:
            with console.status(f"{title}…") as status:
                yield lambda text: status.update(f"{title}: {text}")
        else:
            console.print(f"[bold]…[/] {title}")
            yield lambda text: None
    except BaseException:
        console.print(f"[red]✗[/] {title} [dim]({time.perf_counter() - started:.1f} s)[/]")
        raise
    console.print(f"[green]✓[/] {title} [dim]({time.perf_counter() - started:.1f} s)[/]")


class Demo:
    """One run of the scenario; ``run`` returns the exit code."""

    def __init__(self, console: Console, options: Options) -> None:
        self.console = console
        self.options = options

    def run(self) -> int:
        console = self.console
        started = time.perf_counter()
        layout = prepare_run_dir(self.options.run_dir)
        console.print(Rule("HomeFleet demo: activity recognition on three devices"))
        console.print(
            f"run directory [cyan]{layout.root}[/], process logs in [cyan]{layout.logs_dir}[/]"
        )

        data, training = self.train(layout)
        group = ProcessGroup(layout.logs_dir)
        stops: list[StopResult] = []
        try:
            results = self.deploy_and_infer(group, layout, data)
        finally:
            stops = self.stop(group)
        write_result_json(layout.result_path, training, results, stops)
        console.print(results_table(results, f"BasicMotions test set ({len(data.y_test)} samples)"))
        console.print(f"results as JSON: [cyan]{layout.result_path}[/]")
        if any(s.returncode != 0 for s in stops):
            console.print("[red]demo failed[/]: not every process stopped cleanly (see above)")
            return EXIT_FAILED
        console.print(
            f"[bold green]demo finished in {time.perf_counter() - started:.0f} s[/]; "
            f"logs: {layout.logs_dir}"
        )
        return EXIT_OK

    def train(self, layout: RunLayout) -> tuple[BasicMotionsData, TrainResult]:
        o = self.options
        with phase(self.console, "loading BasicMotions from sktime"):
            data = load_basic_motions()
        title = f"training the 1D-CNN (seed {o.seed}, {o.epochs} epochs) and exporting ONNX"
        with phase(self.console, title, spinner=False):
            training = train_and_export(
                layout.model_dir,
                seed=o.seed,
                epochs=o.epochs,
                show_progress=self.console.is_terminal,
                data=data,
            )
        size_kib = training.onnx_path.stat().st_size / 1024
        self.console.print(
            f"  {training.parameters:,} parameters, trained in {training.train_seconds:.1f} s; "
            f"test accuracy torch {training.test_accuracy_torch:.3f}, "
            f"onnxruntime {training.test_accuracy_onnx:.3f}; "
            f"{training.onnx_path.name} {size_kib:.0f} KiB"
        )
        return data, training

    def deploy_and_infer(
        self, group: ProcessGroup, layout: RunLayout, data: BasicMotionsData
    ) -> list[DeviceResult]:
        console = self.console
        with phase(console, "starting the controller"):
            _, controller = start_controller(group, layout, cwd=REPO_ROOT)
        console.print(
            f"  controller at [cyan]{controller.address}[/], signing key {controller.key_id}"
        )

        with phase(console, f"starting {len(DEMO_DEVICES)} edge agents"):
            agents = start_agents(group, layout, controller, DEMO_DEVICES, cwd=REPO_ROOT)
        for device in DEMO_DEVICES:
            console.print(
                f"  {device.device_id} ({device.device_class}, {device.threads} thread(s)) "
                f"local API at [cyan]{agents[device.device_id].local_api}[/]"
            )

        with self.operator(controller, layout) as operator:
            artifacts = self.deploy(operator, layout)
            results = self.infer(
                agents_api={d: a.local_api for d, a in agents.items()},
                artifacts=artifacts,
                data=data,
            )
            console.print(Rule("the controller's view"))
            console.print("  [dim]$[/] [bold]homefleet devices[/]")
            table = operator.devices_table(console.width, color=console.is_terminal)
            console.print(Text.from_ansi(table.rstrip("\n")))
        return results

    def operator(self, controller: ControllerInfo, layout: RunLayout) -> Operator:
        def show(result: CliResult) -> None:
            self.console.print(f"  [dim]$[/] [bold]{result.shown}[/]")
            lines = result.stdout.strip().splitlines()
            for line in lines[:_SHOWN_CLI_LINES]:
                self.console.print(Text("    " + line, style="dim"))
            if len(lines) > _SHOWN_CLI_LINES:
                self.console.print(
                    Text(f"    … {len(lines) - _SHOWN_CLI_LINES} more lines", style="dim")
                )

        return Operator(
            controller.address,
            cwd=REPO_ROOT,
            log_path=layout.logs_dir / "operator.log",
            on_command=show,
        )

    def deploy(self, operator: Operator, layout: RunLayout) -> dict[str, ArtifactRef]:
        """Register the model, build one artifact per class, assign; wait until all serve."""
        with phase(self.console, "operator: register the model", spinner=False):
            operator.add_model(
                MODEL_NAME,
                layout.model_dir / f"{MODEL_NAME}.onnx",
                "BasicMotions activity recognition (1D-CNN, raw 6x100 IMU window)",
            )
        by_class: dict[str, ArtifactRef] = {}
        with phase(
            self.console, "operator: one artifact per device class, assigned", spinner=False
        ):
            for device_class in dict.fromkeys(d.device_class for d in DEMO_DEVICES):
                artifact = operator.create_artifact(MODEL_NAME, device_class)
                operator.assign_class(artifact.artifact_id, device_class)
                by_class[device_class] = artifact
        expected = {d.device_id: by_class[d.device_class] for d in DEMO_DEVICES}
        with phase(self.console, "waiting until every device serves its artifact") as update:
            operator.wait_until_serving(
                expected, on_poll=lambda ready, total: update(f"{ready}/{total} serving")
            )
        return expected

    def infer(
        self,
        *,
        agents_api: dict[str, str],
        artifacts: dict[str, ArtifactRef],
        data: BasicMotionsData,
    ) -> list[DeviceResult]:
        results = []
        n = len(data.y_test)
        for device in DEMO_DEVICES:
            artifact = artifacts[device.device_id]
            title = f"{n} test samples, one call each, through {device.device_id}'s local API"
            with phase(self.console, title) as update:
                run = run_test_set(
                    agents_api[device.device_id],
                    MODEL_NAME,
                    data.x_test,
                    data.y_test,
                    on_sample=lambda i: update(f"{i}/{n}"),
                )
            if run.answered_by != {artifact.sha256}:
                raise InferenceError(
                    f"{device.device_id} answered with artifact(s) {sorted(run.answered_by)}, "
                    f"but serves {artifact.artifact_id} ({artifact.sha256})"
                )
            results.append(DeviceResult(device, artifact, run))
        return results

    def stop(self, group: ProcessGroup) -> list[StopResult]:
        """Stop every child; a second Ctrl-C must not cut this short."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            count = len(group.processes)
            with phase(self.console, f"stopping {count} process{'es' if count != 1 else ''}"):
                stops = group.stop_all()
        finally:
            signal.signal(signal.SIGINT, previous)
        for s in stops:
            if s.returncode != 0:
                if s.exited_before_stop:
                    how = f"had already exited with code {s.returncode}"
                elif s.killed:
                    how = "ignored SIGTERM and was killed"
                elif s.returncode == -signal.SIGTERM:
                    how = "died of SIGTERM without handling it (was it still starting?)"
                else:
                    how = f"exited with code {s.returncode} on SIGTERM (0 expected)"
                self.console.print(f"[red]✗[/] {s.name} {how}; see {group.log_dir / s.name}.log")
        return stops


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=_LOG_WIDTH)  # a log file or CI: no reason to wrap at 80
    previous = signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        return Demo(console, options).run()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: every process the demo started was stopped")
        return EXIT_INTERRUPTED
    except _EXPECTED_ERRORS as exc:
        console.print(Panel(Text(str(exc)), title="demo failed", border_style="red"))
        console.print(f"process logs: {options.run_dir / 'logs'}")
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
