"""onnxruntime sessions for scoring: CPU, with the settings the artifact asks for.

Torch-free, so ONNX-only paths (fidelity scoring) can use it without loading torch.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from artifact import runtime_hints


def session(path: Path) -> ort.InferenceSession:
    """A CPU session with the settings the artifact asks for (`artifact.runtime_hints`):
    scores are taken on what the edge agent will run."""
    options = ort.SessionOptions()
    for key, value in runtime_hints.session_config_of_file(path).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
