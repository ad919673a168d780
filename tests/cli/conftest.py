"""Fixtures for the `homefleet` command's tests: a runner, and the real controller.

The controller is controller.server.ControllerServer on a loopback port, serving from
an event loop in a thread (tests.support.controller.ControllerThread), with a real
SQLite database and blob store in the test's tmp dir. Tests against a controller
*process* live in test_with_controller.py.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.support.controller import ControllerThread

StartController = Callable[..., ControllerThread]


@pytest.fixture
def runner() -> CliRunner:
    # Wide enough that table cells are not folded; no ambient controller address.
    return CliRunner(env={"COLUMNS": "200", "HOMEFLEET_CONTROLLER": None, "HOMEFLEET_TLS": None})


@pytest.fixture
def start_controller(tmp_path: Path) -> Iterator[StartController]:
    """Start a real controller with ControllerConfig overrides; stopped after the test."""
    numbers = itertools.count()
    with contextlib.ExitStack() as stack:

        def start(**overrides: Any) -> ControllerThread:
            data_dir = tmp_path / f"controller-{next(numbers)}"
            return stack.enter_context(ControllerThread(data_dir, **overrides))

        yield start


@pytest.fixture
def live(start_controller: StartController) -> ControllerThread:
    """A real controller with the default settings."""
    return start_controller()
