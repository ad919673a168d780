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
from rich.markup import escape
from rich.panel import Panel
from rich.rule import Rule
from rich.text import Text

from controller.device_classes import load_device_class
from controller.workloads.basic_motions import (
    BasicMotionsData,
    WorkloadError,
    load_basic_motions,
)
from demo.budget_loop import (
    Decision,
    numbers_table,
    scrape_numbers,
    timeline_table,
    watch_decisions,
)
from demo.fleet import (
    BUDGET_WINDOWS,
    DEMO_CLASSES_DIR,
    DEMO_DEVICES,
    WINDOW_SECONDS,
    AgentInfo,
    ControllerInfo,
    RunDirError,
    RunLayout,
    prepare_run_dir,
    start_agents,
    start_controller,
)
from demo.inference import InferenceError, run_test_set
from demo.load import LoadGenerator
from demo.operator import ArtifactRef, CliResult, Operator, OperatorError
from demo.processes import ProcessError, ProcessGroup, StopResult
from demo.report import DeviceResult, LoopResult, results_table, write_result_json

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIR = REPO_ROOT / ".demo"
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
_EXPECTED_ERRORS = (ProcessError, OperatorError, InferenceError, WorkloadError, RunDirError)
_SHOWN_CLI_LINES = 6
_LOG_WIDTH = 160
WORKLOAD = "basic-motions-wide"  # compute, not per-call cost, decides its latency
SLOW_CLASS = "camera"  # the class whose devices turn out slower than the planner assumed
LOAD_RATE = 10.0  # Predict calls per second per device while the loop runs
LOOP_TIMEOUT = 420.0  # a safety limit for the whole loop, never a timing assertion

Update = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    run_dir: Path
    loop_timeout: float


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
    parser.add_argument(
        "--loop-timeout",
        type=float,
        default=LOOP_TIMEOUT,
        help=f"give up on the budget loop after this many seconds (default {LOOP_TIMEOUT:.0f})",
    )
    args = parser.parse_args(argv)
    if not args.loop_timeout > 0:
        parser.error(f"--loop-timeout must be > 0, got {args.loop_timeout}")
    return Options(run_dir=args.run_dir.resolve(), loop_timeout=args.loop_timeout)


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
        console.print(Rule("HomeFleet demo: activity recognition on three device classes"))
        console.print(
            f"run directory [cyan]{layout.root}[/], process logs in [cyan]{layout.logs_dir}[/]"
        )
        with phase(console, "loading BasicMotions from sktime"):
            data = load_basic_motions()

        group = ProcessGroup(layout.logs_dir)
        stops: list[StopResult] = []
        try:
            results, loop = self.fleet(group, layout, data)
        finally:
            stops = self.stop(group)
        write_result_json(layout.result_path, results, loop, stops)
        console.print(f"results as JSON: [cyan]{layout.result_path}[/]")
        if any(s.returncode != 0 for s in stops):
            console.print("[red]demo failed[/]: not every process stopped cleanly (see above)")
            return EXIT_FAILED
        console.print(
            f"[bold green]demo finished in {time.perf_counter() - started:.0f} s[/]; "
            f"logs: {layout.logs_dir}"
        )
        return EXIT_OK

    def fleet(
        self, group: ProcessGroup, layout: RunLayout, data: BasicMotionsData
    ) -> tuple[list[DeviceResult], LoopResult]:
        console = self.console
        with phase(console, "starting the controller"):
            _, controller = start_controller(group, layout, cwd=REPO_ROOT)
        console.print(
            f"  controller at [cyan]{controller.address}[/], signing key {controller.key_id}; "
            f"dashboard at [cyan]http://{controller.metrics_address}/[/]"
        )

        with phase(console, f"starting {len(DEMO_DEVICES)} edge agents"):
            agents = start_agents(group, layout, controller, DEMO_DEVICES, cwd=REPO_ROOT)
        for device in DEMO_DEVICES:
            slow = (
                f", reports {device.emulate_slowdown:g}x this machine's latency"
                if device.emulate_slowdown != 1
                else ""
            )
            console.print(
                f"  {device.device_id} ({device.device_class}, {device.threads} thread(s){slow}) "
                f"local API at [cyan]{agents[device.device_id].local_api}[/]"
            )

        with self.operator(controller, layout) as operator:
            artifacts = self.deploy(operator)
            results = self.infer(
                agents_api={d: a.local_api for d, a in agents.items()},
                artifacts=artifacts,
                data=data,
            )
            console.print(
                results_table(results, f"BasicMotions test set ({len(data.y_test)} samples)")
            )
            loop = self.closed_loop(operator, controller, agents, data)
            console.print(Rule("the controller's view"))
            console.print("  [dim]$[/] [bold]homefleet devices[/]")
            table = operator.devices_table(console.width, color=console.is_terminal)
            console.print(Text.from_ansi(table.rstrip("\n")))
        return results, loop

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

    def deploy(self, operator: Operator) -> dict[str, ArtifactRef]:
        """The controller trains and compresses the workload for each class (one job per
        class, its planner picking the recipe), the operator assigns; wait until all serve."""
        by_class: dict[str, ArtifactRef] = {}
        classes = list(dict.fromkeys(d.device_class for d in DEMO_DEVICES))
        with phase(
            self.console,
            f"controller: compress {WORKLOAD} for {len(classes)} device classes, assign",
            spinner=False,
        ):
            for device_class in classes:
                artifact = operator.compress_on_controller(
                    WORKLOAD, DEMO_CLASSES_DIR / f"{device_class}.yaml", WORKLOAD
                )
                operator.assign_class(artifact.artifact_id, device_class)
                by_class[device_class] = artifact
        if len({a.sha256 for a in by_class.values()}) == 1:
            self.console.print(
                "  [dim]every class got the same bytes: the planner tries the cheapest recipe "
                "first, and the FP32 model already meets each class's budgets as predicted "
                "from its declared speed; the closed loop below finds a class that is slower "
                "than declared[/]"
            )
        expected = {d.device_id: by_class[d.device_class] for d in DEMO_DEVICES}
        with phase(self.console, "waiting until every device serves its artifact") as update:
            operator.wait_until_serving(
                expected, on_poll=lambda ready, total: update(f"{ready}/{total} serving")
            )
        return expected

    def closed_loop(
        self,
        operator: Operator,
        controller: ControllerInfo,
        agents: dict[str, AgentInfo],
        data: BasicMotionsData,
    ) -> LoopResult:
        """Steady traffic on every device; the controller notices the slow class, fixes it."""
        console = self.console
        console.print(Rule("the closed loop: telemetry, budgets, recompression, canary"))
        console.print(
            f"  every device now answers {LOAD_RATE:g} requests/s; agents report "
            f"{WINDOW_SECONDS} s telemetry windows; the controller judges each class's p95 "
            f"and energy on {BUDGET_WINDOWS} slices in a row"
        )
        load = LoadGenerator(
            {d: a.local_api for d, a in agents.items()}, WORKLOAD, "x", data.x_test, LOAD_RATE
        )
        started = time.time()
        load.start()
        try:

            def show(decision: Decision) -> None:
                style = {"rollout.promote": "green", "rollout.rollback": "yellow"}.get(
                    decision.kind, "red" if decision.kind.endswith(("miss", "failed")) else "cyan"
                )
                console.print(
                    f"  [dim]{decision.at_s:5.0f} s[/] [{style}]{decision.kind}[/] "
                    f"{escape(decision.subject)}: {escape(decision.message)}"
                )

            with phase(
                console, f"waiting for the controller's decisions on {SLOW_CLASS}"
            ) as update:
                decisions = watch_decisions(
                    operator,
                    started,
                    device_class=SLOW_CLASS,
                    timeout=self.options.loop_timeout,
                    on_decision=show,
                    on_poll=lambda t: update(f"{t:.0f} s, {load.total_sent():,} inferences"),
                )
            ending = decisions[-1]
            if ending.kind != "rollout.promote":
                raise OperatorError(
                    f"the rollout on {SLOW_CLASS} ended {ending.kind}: {ending.message}"
                )
            promoted = operator.latest_artifact_by_id(str(ending.detail["class_artifact_id"]))
            cameras = {d.device_id: promoted for d in DEMO_DEVICES if d.device_class == SLOW_CLASS}
            with phase(console, f"waiting until every {SLOW_CLASS} serves {promoted.artifact_id}"):
                operator.wait_until_serving(cameras)
            settle = WINDOW_SECONDS * (BUDGET_WINDOWS + 1)
            with phase(console, f"{settle} s more traffic on the promoted artifact"):
                time.sleep(settle)
        finally:
            load.stop()
        numbers = scrape_numbers(controller.metrics_address, WORKLOAD)
        budgets = {
            d.device_class: load_device_class(
                DEMO_CLASSES_DIR / f"{d.device_class}.yaml"
            ).budgets.p95_latency_ms
            for d in DEMO_DEVICES
        }
        console.print(timeline_table(decisions))
        console.print(numbers_table(numbers, budgets))
        return LoopResult(decisions=decisions, numbers=numbers, inferences=load.total_sent())

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
                    WORKLOAD,
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
