"""`homefleet jobs watch|cancel` and Ctrl-C while following, against a real controller.

The controller is a real ControllerServer (real gRPC, SQLite, its process pool) in a
thread of the test process; `homefleet compress --controller` runs as a real process
when it must receive Ctrl-C (SIGINT). Jobs compress the tiny classifier of the
compression-job tests, so each takes about a second once the pool has imported the
compression stack.

To catch a job while it runs, the test stops the job's worker process (SIGSTOP) as soon
as it reports its start, and lets it go on (SIGCONT) once the test has done what it
needs with a running job: the job is running for as long as the test needs, whatever
the machine's speed.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from homefleet.cli import app
from tests.controller.test_compression_jobs import (
    CALIBRATION,
    HOME_HUB,
    POOL,
    classifier,
    inputs,
    npz,
)
from tests.support.controller import ControllerThread

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 120.0  # a safety limit for a hung job, never a timing assertion
POLL_S = 0.01
EXIT_REFUSED, EXIT_BAD_INPUT, EXIT_NOT_MET, EXIT_INTERRUPTED = 1, 2, 5, 130
EASY = ["--min-fidelity", "0.9", "--max-size-ratio", "0.6"]
IMPOSSIBLE = ["--max-bytes", "100"]  # every recipe is tried: the job runs longest


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerThread]:
    """One controller for the module, its pool cold until the first job (one thread)."""
    with ControllerThread(tmp_path_factory.mktemp("jobs") / "data", **POOL) as controller:
        controller.add_model("clf", classifier())
        yield controller


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("inputs")
    device_class, calib = base / "home-hub.yaml", base / "inputs.npz"
    device_class.write_text(HOME_HUB)
    calib.write_bytes(CALIBRATION)
    return device_class, calib


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"COLUMNS": "200", "HOMEFLEET_CONTROLLER": None, "HOMEFLEET_TLS": None})


def compress_args(live: ControllerThread, files: tuple[Path, Path], *budget: str) -> list[str]:
    device_class, calib = files
    return [
        "compress", "--controller", live.address, "--model", "clf",
        "--device-class", str(device_class), "--calib", str(calib), *budget,
    ]  # fmt: skip


def jobs(runner: CliRunner, live: ControllerThread, *args: str) -> Result:
    return runner.invoke(app, ["jobs", *args, "--controller", live.address])


def start_without_waiting(runner: CliRunner, live: ControllerThread, args: list[str]) -> int:
    started = runner.invoke(app, [*args, "--no-wait", "--json"])
    assert started.exit_code == 0, started.output
    job_id = json.loads(started.stdout)["id"]
    assert isinstance(job_id, int)
    return job_id


class Follower:
    """`homefleet compress --controller …` as a process; its stderr lines as they come."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "homefleet", *args],
            cwd=ROOT,
            env={**os.environ, "COLUMNS": "200"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.seen}"
                continue
            self.seen.append(line)
            if found := re.search(pattern, line):
                return found
        raise AssertionError(f"no line matching {pattern!r} in {self.seen}")

    def finish(self) -> tuple[int, list[str]]:
        """Its exit code and every stderr line, once it has exited."""
        code = self.proc.wait(timeout=WAIT_S)
        self.reader.join(timeout=WAIT_S)
        while not self.lines.empty():
            self.seen.append(self.lines.get_nowait())
        return code, self.seen

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def stop_worker_once_building(live: ControllerThread, job_id: int) -> int:
    """SIGSTOP the worker process of ``job_id`` as soon as it reports building a trial
    (its pid is its first line); returns the pid."""
    progress = live.controller.config.jobs_dir / str(job_id) / "progress.jsonl"
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            complete = progress.read_text().rpartition("\n")[0]  # never a half-written line
            lines = [json.loads(line) for line in complete.splitlines()]
        except FileNotFoundError:
            lines = []
        if any(line["kind"] == "activity" and "building" in line["text"] for line in lines):
            pid = int(lines[0]["pid"])
            os.kill(pid, signal.SIGSTOP)
            return pid
        time.sleep(POLL_S)
    raise AssertionError(f"job {job_id} never built a trial: {progress}")


def test_ctrl_c_leaves_the_job_running_and_cancel_ends_it(
    runner: CliRunner, live: ControllerThread, files: tuple[Path, Path]
) -> None:
    follower = Follower(compress_args(live, files, *IMPOSSIBLE))
    worker = 0
    try:
        job_id = int(follower.wait_for(r"^compression job (\d+) for clf/home-hub: ").group(1))
        worker = stop_worker_once_building(live, job_id)
        follower.wait_for(r"^  running$")
        # what the job works on now, from the controller running it
        follower.wait_for(r"^  … trial \d+: building ")

        # Ctrl-C stops the follower, says what became of the job and how to reach it
        follower.proc.send_signal(signal.SIGINT)
        code, lines = follower.finish()
        assert code == EXIT_INTERRUPTED, lines
        last = lines[-1]
        assert f"compression job {job_id} keeps running on the controller" in last
        assert f"`homefleet jobs watch {job_id} --controller {live.address}`" in last
        assert f"`homefleet jobs cancel {job_id} --controller {live.address}`" in last
        assert not any("Traceback" in line for line in lines)

        # the listing keeps its options; the job still runs
        listed = jobs(runner, live, "--model", "clf", "--json")
        assert listed.exit_code == 0, listed.output
        states = {j["id"]: j["state"] for j in json.loads(listed.stdout)["jobs"]}
        assert states[job_id] == "running"

        # starting another job for the pair names the real commands for the active one
        again = runner.invoke(app, compress_args(live, files, *EASY))
        assert again.exit_code == EXIT_REFUSED, again.output
        assert f"homefleet jobs watch {job_id}" in again.stderr
        assert f"homefleet jobs cancel {job_id}" in again.stderr

        # following it for a while: the job outlasts --wait-timeout (its worker is
        # stopped), which is no unreachable controller (QA: exit 4, "retry --timeout")
        waited = jobs(runner, live, "watch", str(job_id), "--wait-timeout", "1")
        assert waited.exit_code == EXIT_REFUSED, waited.output
        assert f"compression job {job_id} did not end within --wait-timeout 1 s" in waited.stderr
        assert "(it is running); it keeps running on the controller" in waited.stderr
        assert "did not answer" not in waited.stderr

        cancelled = jobs(runner, live, "cancel", str(job_id))
        assert cancelled.exit_code == 0, cancelled.output
        assert f"compression job {job_id} is running" in cancelled.stdout
        assert "stops after its current trial" in cancelled.stdout
    finally:
        follower.kill()
        if worker:
            os.kill(worker, signal.SIGCONT)

    # the worker goes on, sees the cancellation after its trial: watch shows the end
    watched = jobs(runner, live, "watch", str(job_id))
    assert watched.exit_code == EXIT_REFUSED, watched.output
    assert f"compression job {job_id} for clf/home-hub: " in watched.stderr
    assert f"compression job {job_id} cancelled" in watched.stderr
    assert watched.stdout == ""  # no artifact

    # a job that has ended cannot be cancelled again; an unknown id is bad input
    ended = jobs(runner, live, "cancel", str(job_id))
    assert ended.exit_code == EXIT_REFUSED, ended.output
    assert ended.stderr.startswith("error: ") and "already ended (cancelled)" in ended.stderr
    for command in ("watch", "cancel"):
        unknown = jobs(runner, live, command, "9999")
        assert unknown.exit_code == EXIT_BAD_INPUT, (command, unknown.output)
        assert unknown.stderr.startswith("error: compression job 9999 does not exist")
        assert unknown.stdout == ""


def test_watch_follows_a_job_and_shows_an_ended_one_with_its_exit_code(
    runner: CliRunner, live: ControllerThread, files: tuple[Path, Path]
) -> None:
    met = start_without_waiting(runner, live, compress_args(live, files, *EASY))
    followed = jobs(runner, live, "watch", str(met))
    assert followed.exit_code == 0, followed.output
    artifact = followed.stdout.strip()
    assert re.fullmatch(r"clf/home-hub/v\d+", artifact), followed.stdout
    assert "trial 1: quantize(mode=fp16)" in followed.stderr
    assert f"budget holds: quantize(mode=fp16) is artifact {artifact}" in followed.stderr

    # once it has ended: the same result at once, trials included, and as JSON
    again = jobs(runner, live, "watch", str(met))
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == artifact
    assert f"compression job {met} for clf/home-hub: succeeded" in again.stderr
    assert "trial 1: quantize(mode=fp16)" in again.stderr
    as_json = jobs(runner, live, "watch", str(met), "--json")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["artifact_id"] == artifact

    missed = start_without_waiting(runner, live, compress_args(live, files, *IMPOSSIBLE))
    assert jobs(runner, live, "watch", str(missed)).exit_code == EXIT_NOT_MET  # until it ends
    ended = jobs(runner, live, "watch", str(missed))
    assert ended.exit_code == EXIT_NOT_MET, ended.output
    assert "no recipe met every budget" in ended.stderr and ended.stdout.strip()
    assert ": misses max_artifact_bytes" in ended.stderr  # each trial names what it missed
    assert "none is within size and quality, so it is the one that misses" in ended.stderr


def test_what_the_compression_warns_of_reaches_the_operator(
    runner: CliRunner, live: ControllerThread, files: tuple[Path, Path], tmp_path: Path
) -> None:
    """A remote job's warnings (here: too few calibration samples to hold any out) were
    only in the controller's log; the person who started the job sees them too."""
    few = tmp_path / "few.npz"
    few.write_bytes(npz(**inputs(samples=30)))
    device_class, _ = files
    started = runner.invoke(app, [*compress_args(live, (device_class, few), *EASY)])
    assert started.exit_code == 0, started.output
    expected = "warning: the calibration file holds 30 sample(s), too few to hold any out"
    assert sum(expected in line for line in started.stderr.splitlines()) == 1
    job_id = int(re.search(r"compression job (\d+)", started.stderr).group(1))  # type: ignore[union-attr]
    again = jobs(runner, live, "watch", str(job_id))  # an ended job: from the event log
    assert expected in again.stderr
    as_json = jobs(runner, live, "watch", str(job_id), "--json")
    (warning,) = json.loads(as_json.stdout)["warnings"]
    assert warning.startswith("the calibration file holds 30 sample(s)")


def test_the_listing_options_belong_before_no_subcommand(runner: CliRunner) -> None:
    """`jobs --controller X watch 1` would watch on another controller: refused."""
    result = runner.invoke(app, ["jobs", "--controller", "127.0.0.1:1", "watch", "1"])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "--controller before `watch` would be ignored" in result.output
    helped = runner.invoke(app, ["jobs", "--help"])
    assert helped.exit_code == 0 and "watch" in helped.stdout and "cancel" in helped.stdout
