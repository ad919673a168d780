"""`agent run` flags that would start an agent doing something else than meant (QA).

An empty --state-dir (an unset variable in a unit file) used to run the agent in the
working directory; --telemetry-window-seconds inf used to start an agent that sent its
telemetry only when it stopped. Both are refused at start with exit 2, one line, and
nothing written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from homefleet.cli import app


def run_agent(*flags: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, ["agent", "run", "--device-id", "hub-1", "--device-class", "home-hub", *flags]
    )
    return result.exit_code, result.output


def test_an_empty_state_dir_is_refused_not_read_as_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for empty in ("", "  "):
        code, output = run_agent("--state-dir", empty)
        assert code == 2, output
        assert "error: --state-dir is empty" in output
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("seconds", ["inf", "3601", "0", "nan"])
def test_a_telemetry_window_that_would_never_close_is_refused(tmp_path: Path, seconds: str) -> None:
    state = tmp_path / "state"
    code, output = run_agent("--state-dir", str(state), "--telemetry-window-seconds", seconds)
    assert code == 2, output
    (line,) = output.strip().splitlines()
    assert line.startswith("error: --telemetry-window-seconds: expected a positive number")
    assert "at most 3600" in line
    assert not state.exists()


def test_a_state_dir_the_file_system_cannot_hold_is_a_configuration_error() -> None:
    """Exit 2 (systemd does not restart it), not 1 with advice to free space (QA)."""
    code, output = run_agent(
        "--state-dir", "/proc/self/homefleet-state", "--allow-unsigned-manifests"
    )
    assert code == 2, output
    assert "choose another --state-dir" in output and "free space" not in output
