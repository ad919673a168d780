"""MiniLM workload: the packaged pretrained encoder, exported once, run in onnxruntime.

Exporting the ~90 MB FP32 graph takes ~5-10 s; the module does it once, into a temporary
cache directory, and reuses it for every test.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from controller.workloads.intents import CENTROID_PHRASINGS, INTENT_NAMES, INTENTS, VAL_PHRASINGS
from controller.workloads.minilm import (
    EMBEDDING_DIM,
    FP32_ONNX,
    INPUT_NAMES,
    MAX_LENGTH,
    OUTPUT_NAME,
    MiniLMWorkload,
    cosine_rows,
)
from controller.workloads.training import run_onnx


@pytest.fixture(scope="module")
def workload() -> MiniLMWorkload:
    return MiniLMWorkload()


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory, workload: MiniLMWorkload) -> Path:
    return workload.fp32_onnx(tmp_path_factory.mktemp("minilm-cache"))


def test_intent_phrasings_are_distinct_and_split_by_position(workload: MiniLMWorkload) -> None:
    phrases = [p for intent in INTENTS for p in intent.phrasings]
    assert len(phrases) == len(set(phrases)) == 120
    assert len(INTENT_NAMES) == 12
    data = workload.data()
    assert len(data.train) == 12 * CENTROID_PHRASINGS
    assert len(data.val) == 12 * VAL_PHRASINGS
    assert len(data.test) == 12 * (10 - CENTROID_PHRASINGS - VAL_PHRASINGS)
    assert data.class_names == INTENT_NAMES
    for split in (data.train, data.val, data.test):
        assert list(split.inputs) == list(INPUT_NAMES)
        for array in split.inputs.values():
            assert array.dtype == np.int64 and array.shape == (len(split), MAX_LENGTH)
        assert split.labels is not None
        assert np.bincount(split.labels).tolist() == [len(split) // 12] * 12
        mask = split.inputs["attention_mask"]
        assert mask[:, 0].all() and not mask[:, -1].any()  # short commands: padded


def test_stays_offline(workload: MiniLMWorkload) -> None:
    workload.source_model()
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_export_signature_is_dynamic_in_batch_and_seq(fp32: Path) -> None:
    assert fp32.name == FP32_ONNX
    proto = onnx.load(str(fp32), load_external_data=False)
    assert [i.name for i in proto.graph.input] == list(INPUT_NAMES)
    for value in proto.graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        batch, seq = value.type.tensor_type.shape.dim
        assert batch.dim_param and seq.dim_param
    (out,) = proto.graph.output
    assert out.name == OUTPUT_NAME
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.type.tensor_type.shape.dim[1].dim_value == EMBEDDING_DIM
    assert {p.key: p.value for p in proto.metadata_props}["task"] == "embedding"
    assert not list(fp32.parent.glob("*.tmp"))


def test_onnx_matches_torch_at_other_batch_and_seq(workload: MiniLMWorkload, fp32: Path) -> None:
    phrases = ["lock the front door", "play some jazz in the kitchen please", "stop"]
    batch = workload.tokenizer(phrases, padding=True, return_tensors="np")  # seq < MAX_LENGTH
    feed = {name: np.asarray(batch[name], dtype=np.int64) for name in INPUT_NAMES}
    assert feed["input_ids"].shape[1] < MAX_LENGTH
    got = run_onnx(fp32, feed, OUTPUT_NAME)
    with torch.no_grad():
        want = workload.source_model()(*(torch.from_numpy(feed[n]) for n in INPUT_NAMES)).numpy()
    assert got.shape == (3, EMBEDDING_DIM)
    assert cosine_rows(got, want).min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    single = run_onnx(fp32, {n: v[1:2] for n, v in feed.items()}, OUTPUT_NAME)
    assert cosine_rows(single, got[1:2]).min() > 0.9999


def test_fp32_scores_cosine_one_and_reports_intent_accuracy(
    workload: MiniLMWorkload, fp32: Path
) -> None:
    score = workload.score_onnx(fp32)
    assert score.metric == "cosine" and score.samples == len(workload.data().test)
    assert score.value > 0.9999 and score.extra["cosine_min"] > 0.9999
    assert score.extra["intent_accuracy"] == score.extra["reference_intent_accuracy"]
    assert score.extra["intent_accuracy"] >= 0.9


def test_fp32_export_is_cached(workload: MiniLMWorkload, fp32: Path) -> None:
    stamp = fp32.stat().st_mtime_ns
    assert workload.fp32_onnx(fp32.parent) == fp32
    assert fp32.stat().st_mtime_ns == stamp


def test_int8_encoder_scores_below_fp32(
    workload: MiniLMWorkload, fp32: Path, tmp_path: Path
) -> None:
    """A real degradation (dynamic int8) shows up in both measurements, bounded."""
    quantized = tmp_path / "int8.onnx"
    quantize_dynamic(str(fp32), str(quantized), weight_type=QuantType.QInt8)
    score = workload.score_onnx(quantized)
    assert 0.9 < score.value < 0.999
    assert score.extra["cosine_min"] < score.value
    assert 0.5 < score.extra["intent_accuracy"] <= 1.0


def test_calibration_inputs_are_token_ids(workload: MiniLMWorkload) -> None:
    calib = workload.calibration_inputs(8)
    assert list(calib) == list(INPUT_NAMES)
    assert all(v.shape == (8, MAX_LENGTH) and v.dtype == np.int64 for v in calib.values())
