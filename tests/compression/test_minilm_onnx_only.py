"""The MiniLM sentence encoder handed over as a plain ONNX file: ≥ 6x smaller at cosine ≥ 0.98.

The planner gets the exported file and unlabelled token ids alone (no PyTorch model, no
workload), and a size budget of 1/6 of the source that fp16, dynamic int8 and 4-bit
embeddings with int8 MatMuls all miss: 4-bit codebooks for most MatMuls and the
embedding tables meet it, in dynamic int8's graph once onnxruntime has folded them.
The FP32 export (~90 MB, ~10 s) is cached under .cache/ and reused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from controller.compression.job import compress_onnx
from controller.device_classes import Budgets, load_device_class
from controller.workloads.fidelity import load_calibration
from controller.workloads.minilm import MiniLMWorkload

ROOT = Path(__file__).resolve().parents[2]
HOME_HUB = ROOT / "deploy" / "device-classes" / "home-hub.yaml"
CALIBRATION_SAMPLES = 32


@pytest.fixture(scope="module")
def handed_over(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The encoder as a plain ONNX file plus an .npz of token ids and attention masks."""
    workload = MiniLMWorkload()
    base = tmp_path_factory.mktemp("minilm-onnx-only")
    source = base / "encoder.onnx"
    shutil.copyfile(workload.fp32_onnx(), source)
    calib = base / "inputs.npz"
    arrays: dict[str, Any] = dict(workload.calibration_inputs(CALIBRATION_SAMPLES))
    np.savez(calib, **arrays)
    return source, calib


def test_onnx_only_minilm_is_6x_smaller_at_fidelity_098(
    tmp_path: Path, handed_over: tuple[Path, Path]
) -> None:
    source, calib = handed_over
    # size and fidelity only: latency budgets would make the test depend on machine load
    device_class = load_device_class(HOME_HUB).model_copy(
        update={"budgets": Budgets(min_fidelity=0.98)}
    )
    out = tmp_path / "out"
    outcome = compress_onnx(
        source, load_calibration(calib), device_class, out, name="minilm", max_size_ratio=1 / 6
    )
    assert outcome.met, [v.describe() for v in outcome.chosen.verdicts]
    assert (out / "model.onnx").stat().st_size * 6 <= source.stat().st_size
    fidelity = next(v for v in outcome.manifest["budgets"] if v["budget"] == "min_fidelity")  # type: ignore[attr-defined]
    assert fidelity["met"] and fidelity["observed"] >= 0.98
    kinds = [step["kind"] for step in outcome.manifest["recipe"]]  # type: ignore[attr-defined]
    assert kinds == ["quantize.codebook"]
    model = onnx.load(str(out / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMulInteger", "GatherElements"} <= ops  # int8 compute, codebook decoding
    assert any(t.data_type == onnx.TensorProto.UINT4 for t in model.graph.initializer)
    # the cheaper recipes came first and missed the size budget (built, or skipped as
    # unable to reach it), never the fidelity floor
    trials = json.loads((out / "trials.json").read_text())
    assert trials[-1]["met"] and not any(t["met"] for t in trials[:-1])
    built = [t for t in trials[1:-1] if not t["error"]]
    assert built, "4-bit embeddings with int8 MatMuls are built and miss the size budget"
    for trial in built:
        verdicts = {v["budget"]: v["met"] for v in trial["verdicts"]}
        assert verdicts == {"max_artifact_bytes": False, "min_fidelity": True}, trial
    for trial in trials[1:-1]:
        assert not trial["error"] or "max_artifact_bytes" in trial["error"], trial
