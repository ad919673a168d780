"""Weight reconstruction error at equal bits: linear against codebook quantizers.

Issue 6 asks to compare the non-uniform family with linear int8 and int4 at equal bits
on reconstruction error, not only on accuracy. Over every weight a quantizer would touch
(Conv, Gemm and MatMul initializers of at least ``MIN_ELEMENTS``, as the codebook step
selects them), grouped per output channel, this measures the relative squared error
sum((w - w_hat)^2) / sum(w^2) of:

- linear, per channel, symmetric (onnxruntime's static/dynamic per-channel weights);
- linear, blocks of 32 along the input, asymmetric (onnxruntime's MatMulNBits int4);
- codebook, k-means per channel (``quantize.codebook``'s default);
- codebook, Lloyd-Max for a Gaussian fitted per channel (``method="gaussian"``).

A channel with fewer weights than a codebook has levels is exact (it would be stored
as it is). "Equal bits" counts the indices; what each quantizer stores beside them
differs, so the table also gives bits per weight including it: a float32 scale per
channel (linear per channel), a float32 scale and a zero point per block of 32
(MatMulNBits), 2**bits int8 levels and a float32 scale per channel (a codebook with int8
compute, the step's default). Pure numpy on the FP32 ONNX file: seconds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import numpy_helper

from controller.compression.codebook_fit import fit_codebooks

MIN_ELEMENTS = 1024  # CodebookQuantize.min_elements: smaller tensors stay as they are
BLOCK = 32  # MatMulNBits' default block along the input dimension
BITS = (2, 3, 4)  # codebooks with int8 compute go up to 7 bits; 8-bit linear is the int8 row
METHODS = {
    "linear-channel": "linear, per channel, symmetric",
    "linear-block32": "linear, blocks of 32, asymmetric",
    "codebook-kmeans": "codebook, k-means per channel",
    "codebook-gaussian": "codebook, Gaussian Lloyd-Max per channel",
}


@dataclass(frozen=True)
class ReconstructionRow:
    workload: str
    bits: int
    method: str  # a key of METHODS
    relative_error: float  # sum of squared errors over the sum of squared weights
    weights: int  # how many weights were measured
    bits_per_weight: float  # indices plus what the quantizer stores beside them


def weight_groups(path: Path) -> Iterator[NDArray[np.float64]]:
    """Each quantizable weight as [output channels, weights per channel]."""
    model = onnx.load(str(path))
    initializers = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        tensor = initializers.get(node.input[1])
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        w = numpy_helper.to_array(tensor).astype(np.float64)
        if w.size < MIN_ELEMENTS or w.ndim < 2:
            continue
        trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b):
            yield w.reshape(w.shape[0], -1)  # [out, in...]
        else:
            yield w.reshape(-1, w.shape[-1]).T  # MatMul/Gemm B is [in, out]


def linear_channel(groups: NDArray[np.float64], bits: int) -> NDArray[np.float64]:
    top = 2 ** (bits - 1) - 1
    scale = np.abs(groups).max(axis=1, keepdims=True) / top
    scale[scale == 0] = 1.0
    out: NDArray[np.float64] = np.clip(np.round(groups / scale), -top, top) * scale
    return out


def linear_blocks(groups: NDArray[np.float64], bits: int) -> NDArray[np.float64]:
    rows, cols = groups.shape
    padded = -(-cols // BLOCK) * BLOCK
    blocks = np.pad(groups, ((0, 0), (0, padded - cols)), mode="edge").reshape(rows, -1, BLOCK)
    low = np.minimum(blocks.min(axis=2, keepdims=True), 0.0)
    high = np.maximum(blocks.max(axis=2, keepdims=True), 0.0)
    scale = (high - low) / (2**bits - 1)
    scale[scale == 0] = 1.0
    zero = np.round(-low / scale)
    q = np.clip(np.round(blocks / scale) + zero, 0, 2**bits - 1)
    out: NDArray[np.float64] = ((q - zero) * scale).reshape(rows, padded)[:, :cols]
    return out


def codebook(groups: NDArray[np.float64], bits: int, method: str) -> NDArray[np.float64]:
    if groups.shape[1] < 2**bits:
        return groups  # too few weights per channel for the levels: stored as they are
    kind: Literal["kmeans", "gaussian"] = "gaussian" if method.endswith("gaussian") else "kmeans"
    return fit_codebooks(groups, bits, method=kind).values()


def reconstruction_rows(
    workload: str, path: Path, bits: Sequence[int] = BITS
) -> list[ReconstructionRow]:
    groups = list(weight_groups(path))
    if not groups:
        return []  # nothing a quantizer would touch
    total = sum(float((g**2).sum()) for g in groups)
    count = sum(g.size for g in groups)
    channels = sum(g.shape[0] for g in groups)
    blocks = sum(g.shape[0] * -(-g.shape[1] // BLOCK) for g in groups)
    rows = []
    for b in bits:
        side = {
            "linear-channel": 32 * channels,
            "linear-block32": (32 + b) * blocks,
            "codebook-kmeans": (2**b * 8 + 32) * channels,
            "codebook-gaussian": (2**b * 8 + 32) * channels,
        }
        for method in METHODS:
            error = 0.0
            for g in groups:
                if method == "linear-channel":
                    approx = linear_channel(g, b)
                elif method == "linear-block32":
                    approx = linear_blocks(g, b)
                else:
                    approx = codebook(g, b, method)
                error += float(((g - approx) ** 2).sum())
            per_weight = b + side[method] / count
            rows.append(ReconstructionRow(workload, b, method, error / total, count, per_weight))
    return rows


def render_reconstruction(rows: Sequence[ReconstructionRow]) -> list[str]:
    """One Markdown table: a row per bit width, a column per quantizer (error, and bits
    per weight with what it stores beside the indices)."""
    if not rows:
        return []
    lines = [
        f"Weight reconstruction error at equal index bits ({rows[0].weights:,} weights of "
        "the quantizable Conv/Gemm/MatMul tensors, per output channel; relative squared "
        "error, lower is better, then bits per weight with scales, zero points or levels; "
        "`bench/reconstruction.py`):",
        "",
        "| bits | " + " | ".join(METHODS.values()) + " |",
        "|---|" + "---|" * len(METHODS),
    ]
    for b in dict.fromkeys(r.bits for r in rows):
        mine = {r.method: r for r in rows if r.bits == b}
        cells = " | ".join(
            f"{mine[m].relative_error:.2e} ({mine[m].bits_per_weight:.2f} b)" for m in METHODS
        )
        lines.append(f"| {b} | {cells} |")
    return [*lines, ""]


def as_json(rows: Sequence[ReconstructionRow]) -> list[dict[str, object]]:
    return [asdict(r) for r in rows]
