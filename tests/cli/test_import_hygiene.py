"""`homefleet` must start on a device that has only the `edge` extra, and start fast.

Importing the CLI, and showing its help, may load neither the training stack nor the
controller's server; the operator commands may load only the client side of `controller`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "onnx", "onnxruntime", "sqlalchemy", "sktime", "edge_agent")

PROBE = """
import json, sys
import homefleet.cli
if sys.argv[1] == "help":
    try:
        homefleet.cli.app(["--help"], prog_name="homefleet")
    except SystemExit:
        pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def loaded_modules(mode: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


def test_importing_the_cli_loads_no_heavy_or_server_modules() -> None:
    for mode in ("import", "help"):
        modules = loaded_modules(mode)
        heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
        assert not heavy, f"{mode}: {heavy}"
        controller_side = sorted(
            m for m in modules if m.startswith("controller.") and not m.startswith("controller.cli")
        )
        assert not controller_side, f"{mode}: the CLI imported server modules {controller_side}"


EDGE_ONLY = """
import importlib.abc, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    '''Pretend the controller extra is absent, as on a device.'''
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "onnx", "sqlalchemy", "sktime", "onnxscript"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from homefleet.cli import app
try:
    app(sys.argv[1:], prog_name="homefleet")
except SystemExit as exit:
    sys.exit(exit.code)
"""


def run_edge_only(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", EDGE_ONLY, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
    )


def test_agent_and_operator_commands_work_without_the_controller_extra() -> None:
    for args in (["--help"], ["agent", "--help"], ["agent", "run", "--help"], ["model", "--help"]):
        done = run_edge_only(*args)
        assert done.returncode == 0, (args, done.stderr)
        assert "Usage: homefleet" in done.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    done = run_edge_only("devices", "--controller", closed)
    assert done.returncode == 4, done.stderr
    assert "cannot reach the controller" in done.stderr
