"""Child processes for demos and end-to-end tests: start, wait until ready, always stop.

Every child writes its stdout and stderr to one log file, so a failure can show what
the child said. A `ProcessGroup` is a context manager: leaving it — normally, on an
exception or on Ctrl-C — stops every child it started (SIGTERM, a grace period,
then SIGKILL of the child's whole process group). On Linux a child is also asked to
die with its parent, so even a SIGKILLed demo leaves no servers behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

DEFAULT_STOP_TIMEOUT = 10.0
_POLL_SECONDS = 0.05
_PR_SET_PDEATHSIG = 1


class ProcessError(RuntimeError):
    """A child process died, or did not become ready in time; the message shows its log."""


@dataclass(frozen=True)
class StopResult:
    name: str
    returncode: int | None  # None: it could not be reaped even after SIGKILL
    killed: bool  # True: it ignored SIGTERM for the whole grace period
    exited_before_stop: bool  # True: it had already exited (crashed?) when asked to stop


@dataclass
class ManagedProcess:
    """One child: its name (for messages), the Popen handle and its log file."""

    name: str
    argv: tuple[str, ...]
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines the child wrote, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(log {self.log_path} unreadable: {exc})"
        tail = text.splitlines()[-lines:]
        return "\n".join(tail) if tail else "(log is empty)"

    def describe_failure(self, what: str) -> str:
        return (
            f"{self.name} (pid {self.pid}) {what}.\n"
            f"command: {' '.join(self.argv)}\n"
            f"log: {self.log_path}\n"
            f"--- last lines of the log ---\n{self.log_tail()}"
        )

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> StopResult:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL the child's process group."""
        was_alive = self.alive()
        if was_alive:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
        return self._reap(time.monotonic() + timeout, was_alive=was_alive)

    def _reap(self, deadline: float, *, was_alive: bool) -> StopResult:
        killed = False
        try:
            self.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed = True
            self._kill_group()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=5.0)
        return StopResult(self.name, self.popen.returncode, killed, not was_alive)

    def _kill_group(self) -> None:
        # start_new_session made the child a group leader: its own children go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()


# Run first in the child (single-threaded, unlike the parent, which may hold gRPC and
# torch threads, so no preexec_fn): ask Linux to SIGTERM us when the parent dies, check
# the parent did not die already, then become the real command (execvp keeps the pid).
_PARENT_DEATH_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    f"libc.prctl({_PR_SET_PDEATHSIG}, int(signal.SIGTERM), 0, 0, 0)\n"
    "os.getppid() == int(sys.argv[1]) or os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _launch_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` itself, wrapped on Linux so the child dies with this process."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-c", _PARENT_DEATH_LAUNCHER, str(os.getpid()), *argv]


@dataclass
class ProcessGroup:
    """Starts named children with logs under ``log_dir``; stops them all on exit."""

    log_dir: Path
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    processes: list[ManagedProcess] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start ``argv`` with stdout+stderr to ``log_dir/<name>.log``; stdin is closed."""
        if any(p.name == name for p in self.processes):
            raise ValueError(f"a process named {name!r} was already started in this group")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                _launch_argv(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=cwd,
                start_new_session=True,
            )
        process = ManagedProcess(name, tuple(argv), popen, log_path)
        self.processes.append(process)
        return process

    def stop_all(self) -> list[StopResult]:
        """SIGTERM every live child at once, wait for all, SIGKILL what is left."""
        alive = {id(p): p.alive() for p in self.processes}
        for process in reversed(self.processes):
            if alive[id(process)]:
                with contextlib.suppress(ProcessLookupError):
                    process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        return [
            process._reap(deadline, was_alive=alive[id(process)])
            for process in reversed(self.processes)
        ]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def wait_for_json_file(
    path: Path, process: ManagedProcess, *, timeout: float, what: str = "become ready"
) -> dict[str, Any]:
    """Wait until ``process`` writes the JSON object at ``path``; raise if it dies or is late.

    The file must be written atomically (rename), so a file that exists is complete.
    """
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            try:
                loaded = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ProcessError(
                    process.describe_failure(f"wrote {path}, which is not valid JSON ({exc})")
                ) from exc
            if not isinstance(loaded, dict):
                raise ProcessError(process.describe_failure(f"wrote {path}, not a JSON object"))
            return loaded
        if not process.alive():
            raise ProcessError(
                process.describe_failure(
                    f"exited with code {process.popen.returncode} before it wrote {path}"
                )
            )
        if time.monotonic() >= deadline:
            raise ProcessError(
                process.describe_failure(f"did not {what} within {timeout:.0f} s (no {path})")
            )
        time.sleep(_POLL_SECONDS)
