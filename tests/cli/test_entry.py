"""The `homefleet` entry point: a Ctrl-C while the command line is still loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Ctrl-C lands while homefleet.cli is being imported (QA: a traceback from an import
# deep in gRPC or rich, in the first second of any command)
INTERRUPTED_IMPORT = """
import importlib.abc, sys

class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "homefleet.cli":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, CtrlC())
sys.argv[0] = "homefleet"
from homefleet.entry import main
main()
"""


def test_ctrl_c_while_the_cli_loads_exits_130_without_a_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_IMPORT, "devices"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr == "interrupted\n"


def test_the_console_script_and_python_m_run_the_same_entry_point() -> None:
    """`homefleet` (pyproject's script) and `python -m homefleet` both go through it."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'homefleet = "homefleet.entry:main"' in pyproject
    done = subprocess.run(
        [sys.executable, "-m", "homefleet", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "Usage: homefleet" in done.stdout, done.stderr
