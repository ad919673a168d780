"""--emulate-slowdown: a demo's "slower device" reports scaled numbers, and says so."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from artifact import histogram
from edge_agent.config import AgentConfig
from edge_agent.errors import AgentError
from edge_agent.meters import NoMeter
from edge_agent.runtime import ModelRuntime
from edge_agent.telemetry import Telemetry
from homefleet.cli import app
from tests.edge_agent.conftest import load
from tests.edge_agent.models import add_model


def ticking(step: float) -> Callable[[], float]:
    """A clock that advances ``step`` seconds each time it is read."""
    ticks: Iterator[float] = (i * step for i in range(1_000_000))
    return lambda: next(ticks)


def one_window(tmp_path: Path, slowdown: float) -> tuple[int, float, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    slot = load(ModelRuntime(threads=1), tmp_path, "m", add_model(1.0))
    telemetry = Telemetry(
        NoMeter(), slowdown=slowdown, wall_clock=ticking(0.002), cpu_clock=ticking(0.001)
    )
    for _ in range(4):
        telemetry.measured_run(slot, {"x": np.zeros((1, 4), np.float32)})
    (window,) = telemetry.close_windows()
    (bucket,) = [i for i, n in enumerate(window.latency_bucket_counts) if n]
    assert window.latency_bucket_counts[bucket] == 4
    return bucket, window.cpu_seconds, window.energy_source


def test_emulated_slowdown_scales_latency_and_cpu_and_marks_the_source(tmp_path: Path) -> None:
    real_bucket, real_cpu, real_source = one_window(tmp_path / "real", 1.0)
    slow_bucket, slow_cpu, slow_source = one_window(tmp_path / "slow", 3.0)
    assert real_bucket == histogram.bucket_index(0.002)
    assert slow_bucket == histogram.bucket_index(0.006)
    assert slow_cpu == pytest.approx(3 * real_cpu) and real_cpu == pytest.approx(0.004)
    assert (real_source, slow_source) == ("none", "none*3")


@pytest.mark.parametrize("factor", [0.5, 0.0, 101.0])
def test_a_slowdown_outside_1_to_100_is_refused(tmp_path: Path, factor: float) -> None:
    with pytest.raises(AgentError, match="emulate-slowdown"):
        AgentConfig(
            controller="127.0.0.1:1",
            device_id="d",
            device_class="home-hub",
            state_dir=tmp_path,
            emulate_slowdown=factor,
        )


@pytest.mark.parametrize("seconds", ["0", "-1", "nan"])
def test_a_telemetry_window_that_is_not_positive_is_refused_naming_the_flag(
    tmp_path: Path, seconds: str
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "agent",
            "run",
            "--device-id",
            "d",
            "--device-class",
            "home-hub",
            "--state-dir",
            str(tmp_path / "state"),
            "--telemetry-window-seconds",
            seconds,
        ],
    )
    assert result.exit_code == 2, result.output
    assert "--telemetry-window-seconds" in result.output
    assert not (tmp_path / "state").exists()  # refused before anything was written
