"""The README's home-application client runs as printed against a real agent."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from .harness import Agent, Controller, linear_model, reference_output

ROOT = Path(__file__).resolve().parents[2]


def readme_client() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("**Calling a model from a home application.**", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README lost its client example"
    return match.group(1)


def test_the_readme_client_calls_the_model_a_device_serves(tmp_path: Path) -> None:
    controller = Controller(tmp_path / "controller").start()
    hub = Agent(
        "hub-1", "home-hub", tmp_path / "agents" / "hub-1", controller.address,
        controller.public_key,
    ).start()  # fmt: skip
    try:
        model = linear_model(tmp_path / "v1.onnx", seed=1)
        artifact = controller.release("motion", model, "home-hub")
        controller.wait_serving("hub-1", "motion", artifact.sha256)
        code = readme_client()
        assert 'AGENT = "unix:/run/homefleet/agent.sock"' in code
        code = code.replace("unix:/run/homefleet/agent.sock", hub.local_api)
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert f"answered by artifact {artifact.sha256[:12]}" in done.stdout
        expected = reference_output(model, np.zeros((1, 16), np.float32))
        assert done.stdout.startswith("y [[")
        printed = np.array(
            [float(v) for v in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", done.stdout.split("]]")[0])]
        )
        np.testing.assert_allclose(printed, expected.ravel(), rtol=1e-4, atol=1e-4)
    finally:
        assert hub.stop() == 0, hub.process.log()
        assert controller.stop() == 0, controller.process.log()
