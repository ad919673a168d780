"""`homefleet evaluate` refuses what onnxruntime cannot load or run: one line, exit 2.

Real processes (a traceback would show on their stderr), real onnxruntime and the
workloads' real data; the models are tiny ONNX files made here, shaped like an
italy-power model (x float32[N,1,24] -> logits[N,2]).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from homefleet.cli import app

EXIT_BAD_INPUT = 2


def italy_shaped(path: Path) -> Path:
    """logits = flatten(x) @ W: takes what italy-power feeds, returns what it reads."""
    weight = numpy_helper.from_array(np.ones((24, 2), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        "italy-shaped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 24])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def evaluate(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "homefleet", "evaluate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def italy_model(tmp_path: Path) -> Path:
    model = italy_shaped(tmp_path / "italy.onnx")
    # it is a model italy-power can score, so a refusal below is about the mismatch
    scored = CliRunner().invoke(
        app, ["evaluate", "--workload", "italy-power", str(model), "--json"]
    )
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["samples"] > 0
    return model


def assert_one_line_refusal(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr


def test_a_file_that_is_not_onnx_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "notonnx.onnx").write_bytes(b"these bytes are not an ONNX model")
    done = evaluate(tmp_path, "--workload", "italy-power", "notonnx.onnx", "--json")
    assert_one_line_refusal(done, "notonnx.onnx is not an ONNX model", "exported for italy-power")
    assert [p.name for p in tmp_path.iterdir()] == ["notonnx.onnx"]  # nothing written


def test_a_model_made_for_another_workload_is_bad_input(tmp_path: Path, italy_model: Path) -> None:
    done = evaluate(tmp_path, "--workload", "basic-motions", italy_model.name)
    assert_one_line_refusal(
        done,
        "italy.onnx does not fit the basic-motions workload",
        "Got invalid dimensions for input: x",
        "basic-motions feeds x float32[N,6,100] and reads logits",
    )
    assert [p.name for p in tmp_path.iterdir()] == ["italy.onnx"]  # nothing written
