"""Learned step sizes (LSQ) against post-training static quantization at the same bit width.

Per workload: the FP32 source, static QDQ PTQ (minmax, per channel, int8 activations:
the planner's ``Quantize(mode="static")`` without its accuracy-aware fallback; and the same
restricted to Conv/Gemm/MatMul, the layers learned quantization quantizes)
with int8 and with int4 weights, and learned quantization (learned.py) with 8- and
4-bit weights; test and val accuracy and bytes of each. PTQ keeps onnxruntime's own
reduce_range choice for the host; learned 8-bit weights are 7-bit (see learned.py).

Part of ``make bench`` as the ``learned`` section (``python -m bench --sections
learned``); ``python -m bench.learned [--epochs N] [workload ...]`` prints the table alone.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from controller.compression.calibration import DictCalibrationReader, batch_size
from controller.compression.candidates import LEARNED_INT4, LEARNED_INT8
from controller.compression.cpu_features import host_reduce_range
from controller.compression.learned import learned_quantize
from controller.compression.quantize import prepare_for_quantization
from controller.compression.recipe import LearnedQuantize
from controller.compression.training import TrainOptions
from controller.workloads.base import Workload
from controller.workloads.registry import get_workload

PTQ_WEIGHT_TYPES = {8: QuantType.QInt8, 4: QuantType.QInt4}
SEEDS = (0, 1, 2)  # learned quantization trains: a difference must outlast the seed
# The ops learned quantization quantizes: "ptq-static-layers" quantizes just these too,
# at the same points (their weights and inputs; onnxruntime adds their outputs).
LEARNED_OPS = ["Conv", "Gemm", "MatMul"]


@dataclass(frozen=True)
class Row:
    workload: str
    method: str  # "fp32", "ptq-static", "ptq-static-layers", "learned"
    weight_bits: int
    bytes: int
    val_accuracy: float
    test_accuracy: float  # the mean over ``seeds`` for learned rows
    seconds: float
    seeds: tuple[int, ...] = ()  # learned rows: the training seeds
    test_by_seed: tuple[float, ...] = ()


def ptq_static(
    workload: Workload, source: Path, out: Path, bits: int, ops: list[str] | None = None
) -> Path:
    """onnxruntime static QDQ with ``bits``-bit per-channel weights, int8 activations;
    ``ops``: quantize only these op types (None: onnxruntime's default list)."""
    pre = prepare_for_quantization(source, out.with_name(f"pre-{out.stem}.onnx"), "static")
    calibration = workload.calibration_inputs()
    quantize_static(
        pre,
        out,
        DictCalibrationReader(calibration, batch_size(onnx.load(str(pre)))),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=host_reduce_range().reduce_range,
        activation_type=QuantType.QInt8,
        weight_type=PTQ_WEIGHT_TYPES[bits],
        op_types_to_quantize=ops,
        calibration_providers=["CPUExecutionProvider"],
    )
    return out


def _row(workload: Workload, method: str, bits: int, path: Path, seconds: float) -> Row:
    return Row(
        workload.name,
        method,
        bits,
        path.stat().st_size,
        workload.score_onnx(path, split="val").value,
        workload.score_onnx(path, split="test").value,
        round(seconds, 1),
    )


def compare(
    name: str,
    epochs: int,
    work: Path,
    lr: float | None = None,
    seeds: Sequence[int] = SEEDS,
) -> list[Row]:
    """fp32, PTQ static and learned quantization at 8 and 4 bits for one workload; learned
    is trained once per seed (PTQ is deterministic), its accuracy the mean."""
    workload = get_workload(name)
    model = workload.source_model()
    source = workload.export_onnx(model, work / f"{name}-fp32.onnx")
    rows = [_row(workload, "fp32", 32, source, 0.0)]
    for bits in (8, 4):
        started = time.perf_counter()
        ptq = ptq_static(workload, source, work / f"{name}-ptq-w{bits}.onnx", bits)
        rows.append(_row(workload, "ptq-static", bits, ptq, time.perf_counter() - started))
        started = time.perf_counter()
        out = work / f"{name}-ptq-layers-w{bits}.onnx"
        ptq = ptq_static(workload, source, out, bits, LEARNED_OPS)
        rows.append(_row(workload, "ptq-static-layers", bits, ptq, time.perf_counter() - started))
        learned = LEARNED_INT8 if bits == 8 else LEARNED_INT4  # the planner's own steps
        step = learned.model_copy(update={"epochs": epochs, "lr": lr or learned.lr})
        per_seed = []
        for seed in seeds:
            started = time.perf_counter()
            result = learned_quantize(
                workload, model, step, work / f"{name}-learned-w{bits}-s{seed}.onnx",
                options=TrainOptions(show_progress=False, seed=seed),
            )  # fmt: skip
            per_seed.append(
                _row(workload, "learned", bits, result.out, time.perf_counter() - started)
            )
        rows.append(
            Row(
                workload.name,
                "learned",
                bits,
                per_seed[0].bytes,
                sum(r.val_accuracy for r in per_seed) / len(per_seed),
                sum(r.test_accuracy for r in per_seed) / len(per_seed),
                round(sum(r.seconds for r in per_seed) / len(per_seed), 1),
                tuple(seeds),
                tuple(r.test_accuracy for r in per_seed),
            )
        )
    return rows


WORKLOADS = ("plaid", "basic-motions")
METHODS = {
    "fp32": "FP32 source",
    "ptq-static": "PTQ static (onnxruntime's default ops)",
    "ptq-static-layers": "PTQ static (Conv/Gemm/MatMul, as learned)",
    "learned": "learned step sizes (LSQ)",
}


def learned_rows(
    work: Path, progress: Callable[[str], None], workloads: Sequence[str] = WORKLOADS
) -> list[Row]:
    """Every workload's comparison, torch on one thread (the bench's section entry point)."""
    torch.set_num_threads(1)
    rows: list[Row] = []
    for name in workloads:
        progress(f"learned quantization vs PTQ on {name}")
        target = work / "learned" / name
        target.mkdir(parents=True, exist_ok=True)
        rows += compare(name, LearnedQuantize().epochs, target)
    return rows


def render_learned(rows: Sequence[Row], command: str) -> list[str]:
    """The RESULTS.md section: learned against PTQ at the same weight bits."""
    lines = [
        "## Learned step sizes vs post-training quantization (issue 6)",
        "",
        f"Reproduce: `{command}` (`bench/learned.py`). Same source model, same calibration "
        "inputs; int8 activations everywhere; weights 8- or 4-bit per channel (learned 8-bit "
        "weights keep to 7 bits, see `controller/compression/learned.py`). PTQ is "
        "onnxruntime's static QDQ (MinMax, per channel) without the planner's accuracy-aware "
        "fallback, once with its default op list and once restricted to the layers learned "
        "quantization quantizes. Learned: the planner's own steps (10 epochs; at 8 bits only "
        "the step sizes and zero points train, at 4 bits the weights too), trained with "
        f"seeds {', '.join(map(str, SEEDS))}; its accuracy is their mean.",
        "",
        "| workload | method | weight bits | bytes | val accuracy | test accuracy | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        test = f"{100 * r.test_accuracy:.1f} %"
        if r.test_by_seed:
            test += " (seeds: " + ", ".join(f"{100 * t:.1f}" for t in r.test_by_seed) + ")"
        lines.append(
            f"| {r.workload} | {METHODS.get(r.method, r.method)} | {r.weight_bits} | "
            f"{r.bytes:,} | {100 * r.val_accuracy:.1f} % | {test} | {r.seconds} |"
        )
    lines += ["", *_learned_verdict(rows), ""]
    return lines


def _learned_verdict(rows: Sequence[Row]) -> list[str]:
    """Learned against the like-for-like PTQ (same layers) at each bit width."""
    out = []
    for workload in dict.fromkeys(r.workload for r in rows):
        for bits in (8, 4):
            mine = [r for r in rows if r.workload == workload and r.weight_bits == bits]
            learned = next((r for r in mine if r.method == "learned"), None)
            ptq = next((r for r in mine if r.method == "ptq-static-layers"), None)
            if learned is None or ptq is None:
                continue
            diff = round(100 * (learned.test_accuracy - ptq.test_accuracy), 1) + 0.0  # no -0.0
            every = learned.test_by_seed or (learned.test_accuracy,)
            if all(t > ptq.test_accuracy for t in every):
                verdict = "beats PTQ on the same layers with every seed"
            elif diff > 0:
                verdict = "beats PTQ on the same layers on the mean, not with every seed"
            elif diff == 0 and all(t == ptq.test_accuracy for t in every):
                verdict = "ties PTQ on the same layers with every seed"
            else:
                verdict = "does not beat PTQ on the same layers"
            out.append(
                f"- {workload}, {bits}-bit weights: learned {verdict} "
                f"(test {100 * learned.test_accuracy:.1f} % mean against "
                f"{100 * ptq.test_accuracy:.1f} %, {diff:+.1f} pt), "
                f"{ptq.bytes / learned.bytes:.2f}x fewer bytes."
            )
    return out


def as_json(rows: Sequence[Row]) -> list[dict[str, object]]:
    return [asdict(r) for r in rows]


def table(rows: list[Row]) -> str:
    lines = [
        "| workload | method | weight bits | bytes | val acc | test acc | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.workload} | {r.method} | {r.weight_bits} | {r.bytes} | "
            f"{r.val_accuracy:.3f} | {r.test_accuracy:.3f} | {r.seconds} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workloads", nargs="*", default=["plaid", "basic-motions"])
    parser.add_argument("--epochs", type=int, default=LearnedQuantize().epochs)
    parser.add_argument("--lr", type=float, default=LearnedQuantize().lr)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="homefleet-learned-") as tmp:
        for name in args.workloads:
            rows += compare(name, args.epochs, Path(tmp), args.lr)
    print(table(rows))


if __name__ == "__main__":
    main()
