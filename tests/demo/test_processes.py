"""demo.processes with real child processes: ready files, deaths, stubborn children."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from demo.processes import ProcessError, ProcessGroup, wait_for_json_file

REPO_ROOT = Path(__file__).resolve().parents[2]


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


READY_THEN_SERVE = """
    import json, os, signal, sys, time
    from pathlib import Path
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ready = Path(sys.argv[1])
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid()}))
    os.replace(tmp, ready)
    print("serving", flush=True)
    while True:
        time.sleep(0.1)
"""


def test_ready_file_is_returned_and_stop_is_graceful(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    with ProcessGroup(tmp_path / "logs") as group:
        child = group.start("server", [*python(READY_THEN_SERVE), str(ready)])
        info = wait_for_json_file(ready, child, timeout=30)
        assert info["pid"] == child.pid  # the launcher execs: the pid is the command's own
        (result,) = group.stop_all()
    assert result.name == "server"
    assert result.returncode == 0
    assert not result.killed
    assert not result.exited_before_stop
    assert "serving" in (tmp_path / "logs" / "server.log").read_text()


def test_a_child_that_dies_early_is_reported_with_its_log(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path / "logs") as group:
        child = group.start("broken", python("print('cannot bind port'); raise SystemExit(3)"))
        with pytest.raises(ProcessError) as caught:
            wait_for_json_file(tmp_path / "never.json", child, timeout=30)
        (result,) = group.stop_all()
    assert result.exited_before_stop
    assert result.returncode == 3
    message = str(caught.value)
    assert "broken" in message
    assert "exited with code 3" in message
    assert "cannot bind port" in message
    assert str(tmp_path / "logs" / "broken.log") in message


def test_a_child_that_is_never_ready_times_out_and_is_stopped(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path / "logs") as group:
        child = group.start("slow", python("import time; print('starting'); time.sleep(60)"))
        with pytest.raises(ProcessError, match="did not become ready within"):
            wait_for_json_file(tmp_path / "never.json", child, timeout=0.5)
    assert not child.alive()


def test_a_child_ignoring_sigterm_is_killed_with_its_own_children(tmp_path: Path) -> None:
    grandchild_pid = tmp_path / "grandchild.pid"
    stubborn = f"""
        import signal, subprocess, sys, time
        from pathlib import Path
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        g = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        Path({str(grandchild_pid)!r}).write_text(str(g.pid))
        time.sleep(60)
    """
    group = ProcessGroup(tmp_path / "logs", stop_timeout=0.5)
    child = group.start("stubborn", python(stubborn))
    deadline = time.monotonic() + 30
    while not grandchild_pid.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    (result,) = group.stop_all()
    assert result.killed
    assert result.returncode == -signal.SIGKILL
    assert not child.alive()
    pid = int(grandchild_pid.read_text())
    deadline = time.monotonic() + 10
    while _exists(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _exists(pid)


def test_children_die_when_the_parent_is_killed(tmp_path: Path) -> None:
    """Even if the demo itself is SIGKILLed (no finally runs), its servers do not linger."""
    ready = tmp_path / "ready.json"
    server = textwrap.dedent(READY_THEN_SERVE)
    parent = f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from demo.processes import ProcessGroup, wait_for_json_file
        group = ProcessGroup(Path({str(tmp_path / "logs")!r}))
        child = group.start("server", [sys.executable, "-c", {server!r}, {str(ready)!r}])
        wait_for_json_file(Path({str(ready)!r}), child, timeout=30)
        time.sleep(60)
    """
    proc = subprocess.Popen(python(parent))
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        child_pid = json.loads(ready.read_text())["pid"]
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while _exists(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _exists(child_pid)


def test_names_are_unique_within_a_group(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path / "logs") as group:
        group.start("a", python("pass"))
        with pytest.raises(ValueError, match="already started"):
            group.start("a", python("pass"))


def _exists(pid: int) -> bool:
    """True while ``pid`` runs (zombies count as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
