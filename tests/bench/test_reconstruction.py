"""bench/reconstruction.py: the error each quantizer leaves in real weights, measured right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.reconstruction import (
    linear_blocks,
    linear_channel,
    reconstruction_rows,
    render_reconstruction,
)


def conv_model(path: Path, weights: np.ndarray) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weights.shape[1], 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_linear_quantizers_round_to_their_grid() -> None:
    w = np.random.default_rng(0).standard_normal((4, 96))
    q = linear_channel(w, 4)
    # at most 15 symmetric levels per channel, the channel's largest weight kept exactly
    assert all(len(np.unique(row)) <= 15 for row in q)
    assert np.allclose(np.abs(q).max(axis=1), np.abs(w).max(axis=1))
    blocks = linear_blocks(w, 4)
    assert blocks.shape == w.shape
    assert all(len(np.unique(blocks[r, i : i + 32])) <= 16 for r in range(4) for i in (0, 32, 64))
    assert np.abs(blocks - w).max() < np.abs(q - w).max()  # finer scales, smaller error


def test_codebooks_beat_linear_per_channel_at_equal_bits(tmp_path: Path) -> None:
    weights = np.random.default_rng(1).standard_normal((16, 8, 16)) ** 3  # heavy tails
    rows = reconstruction_rows("toy", conv_model(tmp_path / "m.onnx", weights), bits=(3,))
    error = {r.method: r.relative_error for r in rows}
    assert error["codebook-kmeans"] < error["linear-channel"] / 2
    assert all(r.weights == weights.size for r in rows)
    side = {r.method: r.bits_per_weight for r in rows}
    assert side["linear-channel"] == 3 + 32 * 16 / weights.size
    table = "\n".join(render_reconstruction(rows))
    assert "| 3 |" in table and "codebook, k-means per channel" in table


def test_small_tensors_are_left_out(tmp_path: Path) -> None:
    small = np.ones((2, 2, 3))  # 12 weights: below MIN_ELEMENTS, a quantizer skips it
    assert reconstruction_rows("toy", conv_model(tmp_path / "s.onnx", small), bits=(4,)) == []
