"""The edge agent must not pull in the training stack (torch, onnx), not even transitively."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import edge_agent

ROOT = Path(__file__).resolve().parents[2]


def test_no_torch_and_no_onnx_after_importing_every_edge_agent_module() -> None:
    names = sorted(
        f"edge_agent.{m.name}"
        for m in pkgutil.iter_modules(edge_agent.__path__)
        if m.name != "__main__"  # running it would start the CLI
    )
    assert {"edge_agent.agent", "edge_agent.cli", "edge_agent.runtime", "edge_agent.sync"} <= set(
        names
    )
    script = "\n".join(
        [
            "import importlib, sys",
            "import edge_agent",
            *(f"importlib.import_module({n!r})" for n in names),
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx'))",
            "print(','.join(bad))",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"edge_agent imported: {result.stdout.strip()}"
