"""Weight-only low-bit quantization with onnxruntime's ``MatMulNBitsQuantizer``.

Constant MatMul weights become block-wise 4- or 8-bit ``com.microsoft.MatMulNBits``
nodes (with ``accuracy_level=4`` the CPU kernel quantizes activations to int8 per block
and multiplies in int8); constant Gather tables — embeddings — become 4-bit
``GatherBlockQuantized``. Activations stay float and no calibration is needed, except
to choose which MatMuls to quantize when ``matmul_share`` < 1.

Choosing a share: each eligible MatMul is quantized once and onnxruntime's own kernel
dequantizes the result (MatMulNBits at float compute times an identity matrix). A probe
model then computes every such node with ``W + s[i] * (rounded - W)``, ``s`` a graph
input, so one session measures each node alone: a one-hot ``s`` swaps in exactly one
node's rounded weights, and its harm is how far the model's outputs move on a few
calibration inputs (relative squared error). The nodes that cost least per weight
element are quantized until the share of elements is reached; the rest stay float, for
a following ``Quantize(mode="dynamic")`` to make int8. Rounding harm only: the int8
activations of ``accuracy_level=4`` are not part of the ranking.

Speed, measured on this project's x86 machine with onnxruntime 1.32: MatMulNBits is a
matrix-vector kernel; at 32 tokens per call it is ~1.5x faster than float MatMul but
~2.5x slower than dynamic int8 (MatMulInteger). Low-bit weights buy bytes, int8 buys
time; the recipes in candidates.py combine the two.

Gather quantization needs INT4 tensors, i.e. opset 21: older models are converted with
onnx's version converter first (a failure is refused, naming it). Bad requests are
refused before any work, naming the argument; the output appears at ``out`` only when
complete and checked (onnx checker, loads in onnxruntime with the source's outputs).
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.checker
import onnx.helper
import onnx.numpy_helper
import onnx.version_converter
import onnxruntime as ort
from numpy.typing import NDArray
from onnxruntime.quantization.quant_utils import QuantFormat

from controller.compression import quant_graph
from controller.compression.calibration import batch_size, check_calibration
from controller.compression.errors import CompressionError, UnsupportedModelError
from controller.compression.recipe import WeightOnlyQuantize

log = logging.getLogger(__name__)

INT4_OPSET = 21  # INT4/UINT4 tensors (GatherBlockQuantized's data) need opset 21, IR 10
MS_DOMAIN = "com.microsoft"
HARM_SAMPLES = 8  # calibration samples the ranking runs on
_SWITCH = "weight_only_probe_switch"
_QUANTIZER_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"


@dataclass(frozen=True)
class NodeHarm:
    """How far one MatMul's low-bit weights move the model's outputs, alone."""

    node: str
    elements: int  # weight elements
    harm: float  # mean over float outputs of ||quantized - float||^2 / ||float||^2


@dataclass(frozen=True)
class WeightOnlyResult:
    """What weight-only quantization wrote and which nodes it changed."""

    out: Path
    bytes: int
    source_bytes: int  # including external data files
    matmul_nodes: tuple[str, ...]  # now MatMulNBits
    gather_nodes: tuple[str, ...]  # now GatherBlockQuantized
    float_matmuls: tuple[str, ...]  # eligible, left float (matmul_share < 1)
    ranking: tuple[NodeHarm, ...]  # least harm per element first; empty unless ranked
    seconds: float


@dataclass(frozen=True)
class _Eligible:
    matmuls: dict[str, int]  # node name -> weight elements, graph order
    gathers: tuple[str, ...]


def quantize_weight_only(
    source: Path,
    out: Path,
    step: WeightOnlyQuantize,
    *,
    calibration: Mapping[str, NDArray[np.generic]] | None = None,
) -> WeightOnlyResult:
    """Quantize ``source``'s weights into ``out`` as ``step`` says.

    ``calibration`` (input arrays by name, samples on axis 0) is needed only when
    ``step.matmul_share`` is strictly between 0 and 1, to rank the MatMuls.
    """
    started = time.perf_counter()
    source, out = Path(source), Path(out)
    model = quant_graph.load_model(source)
    source_bytes = quant_graph.onnx_file_bytes(source)
    quant_graph.name_nodes(model)
    eligible = _eligible(model, step)
    ranked = 0 < step.matmul_share < 1 and bool(eligible.matmuls)
    if ranked and calibration is None:
        raise CompressionError(
            f"matmul_share={step.matmul_share} ranks MatMuls by measured harm and needs "
            "calibration=: representative input arrays by input name"
        )
    if calibration is not None and ranked:
        check_calibration(model, calibration)
    if step.include_gather and eligible.gathers:
        model = to_int4_opset(model)
        quant_graph.name_nodes(model)
        eligible = _eligible(model, step)
    ranking: tuple[NodeHarm, ...] = ()
    chosen: tuple[str, ...] = tuple(eligible.matmuls) if step.matmul_share == 1 else ()
    if ranked and calibration is not None:
        ranking = _rank(model, eligible.matmuls, step, calibration)
        chosen = _choose(ranking, step.matmul_share)
    gathers = eligible.gathers if step.include_gather else ()
    if not chosen and not gathers:
        raise UnsupportedModelError(
            f"matmul_share={step.matmul_share} of {len(eligible.matmuls)} eligible MatMul(s) "
            "selects none and there is no Gather table to quantize: nothing would change"
        )
    if gathers:
        model = _run_quantizer(
            model, step, block_size=step.gather_block, op_types=("Gather",), exclude=()
        )
    if chosen:
        others = [
            n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in chosen
        ]
        model = _run_quantizer(
            model, step, block_size=step.block_size, op_types=("MatMul",), exclude=tuple(others)
        )
    _check_replaced(model, chosen, gathers)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        written = Path(tmp) / "model.onnx"
        onnx.save(model, str(written))
        quant_graph.verify_result(written, source, "the weight-only quantized model")
        quant_graph.publish(written, out)
    result = WeightOnlyResult(
        out=out,
        bytes=out.stat().st_size,
        source_bytes=source_bytes,
        matmul_nodes=tuple(chosen),
        gather_nodes=tuple(gathers),
        float_matmuls=tuple(n for n in eligible.matmuls if n not in chosen),
        ranking=ranking,
        seconds=time.perf_counter() - started,
    )
    log.info(
        "weight-only %d-bit %s → %s: %d → %d bytes, %d MatMul(s) and %d Gather(s) quantized, "
        "%d MatMul(s) left float, %.1f s",
        step.bits,
        source.name,
        out,
        source_bytes,
        result.bytes,
        len(chosen),
        len(gathers),
        len(result.float_matmuls),
        result.seconds,
    )
    return result


# ------------------------------------------------------------------ what can be quantized


def _eligible(model: onnx.ModelProto, step: WeightOnlyQuantize) -> _Eligible:
    """MatMuls with a constant 2-D float32 weight and Gathers over a constant 2-D float32
    table on axis 0, each tensor used by that node alone (the quantizer writes one
    low-bit copy per node)."""
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1

    def weight(name: str) -> onnx.TensorProto | None:
        tensor = inits.get(name)
        if tensor is None or uses.get(name) != 1 or len(tensor.dims) != 2:
            return None
        return tensor if tensor.data_type == onnx.TensorProto.FLOAT else None

    matmuls: dict[str, int] = {}
    gathers: list[str] = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2:
            tensor = weight(node.input[1])
            if tensor is not None:
                matmuls[node.name] = int(np.prod(tensor.dims))
        elif node.op_type == "Gather" and step.include_gather and weight(node.input[0]) is not None:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if axis == 0:
                gathers.append(node.name)
    if not matmuls and not gathers:
        ops = sorted({n.op_type for n in model.graph.node})
        wanted = "MatMul with a constant 2-D float32 weight"
        if step.include_gather:
            wanted += " or Gather over a constant 2-D float32 table"
        raise UnsupportedModelError(
            f"weight-only quantization has nothing to quantize: the model has no {wanted} "
            f"(it has {', '.join(ops)})"
        )
    return _Eligible(matmuls, tuple(gathers))


def to_int4_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Convert to opset 21 when older (the quantizer would only relabel it)."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version >= INT4_OPSET:
        return model
    try:
        converted: onnx.ModelProto = onnx.version_converter.convert_version(model, INT4_OPSET)
    except Exception as exc:
        raise CompressionError(
            f"4-bit Gather tables need opset {INT4_OPSET} and onnx cannot convert this "
            f"opset-{version} model: {exc}; use include_gather=False"
        ) from exc
    converted.ir_version = max(converted.ir_version, 10)
    return converted


# ------------------------------------------------------------------ the quantizer


@functools.cache
def _quantizer_class() -> Any:
    """onnxruntime's MatMulNBitsQuantizer, imported without its side effects on logging.

    At import the module calls ``logging.basicConfig(level=INFO)``, which would give the
    root logger a handler and print every later log call of the process; it also logs
    each node it visits at INFO. Both are undone here, once.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        logging.getLogger(_QUANTIZER_LOGGER).setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


def _run_quantizer(
    model: onnx.ModelProto,
    step: WeightOnlyQuantize,
    *,
    block_size: int,
    op_types: tuple[str, ...],
    exclude: tuple[str, ...],
) -> onnx.ModelProto:
    """One MatMulNBitsQuantizer pass over ``op_types`` (in place), returning the model."""
    try:
        quantizer = _quantizer_class()(
            model,
            bits=step.bits,
            block_size=block_size,
            is_symmetric=step.symmetric,
            accuracy_level=step.accuracy_level,
            nodes_to_exclude=list(exclude),
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=op_types,
            quant_axes=(("MatMul", 0), ("Gather", 1)),
        )
        quantizer.process()
    except Exception as exc:
        raise CompressionError(
            f"onnxruntime weight-only {step.bits}-bit quantization of "
            f"{'/'.join(op_types)} failed: {type(exc).__name__}: {exc}"
        ) from exc
    result: onnx.ModelProto = quantizer.model.model
    return result


def _check_replaced(model: onnx.ModelProto, matmuls: Sequence[str], gathers: Sequence[str]) -> None:
    """Every node asked for must have become its low-bit operator (the quantizer only logs
    the nodes it skips)."""
    left = {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gather")}
    missed = [n for n in (*matmuls, *gathers) if n in left]
    if missed:
        raise CompressionError(
            f"onnxruntime's weight-only quantizer left {missed[:10]} unquantized"
        )


# ------------------------------------------------------------------ ranking by measured harm


def _rank(
    model: onnx.ModelProto,
    matmuls: Mapping[str, int],
    step: WeightOnlyQuantize,
    calibration: Mapping[str, NDArray[np.generic]],
) -> tuple[NodeHarm, ...]:
    """Measure each MatMul's harm alone; order by harm per weight element, least first."""
    quantized = onnx.ModelProto()
    quantized.CopyFrom(model)
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in matmuls]
    quantized = _run_quantizer(
        quantized, step, block_size=step.block_size, op_types=("MatMul",), exclude=tuple(others)
    )
    names = list(matmuls)
    rounded = _dequantized(model, quantized, names)
    probe = probe_model(model, names, rounded)
    harms = measure_harms(probe, len(names), calibration, batch_size(model))
    ranking = [NodeHarm(n, matmuls[n], float(h)) for n, h in zip(names, harms, strict=True)]
    ranking.sort(key=lambda r: r.harm / r.elements)
    log.info(
        "weight-only ranking: least harm %s (%.2g), most %s (%.2g)",
        ranking[0].node,
        ranking[0].harm,
        ranking[-1].node,
        ranking[-1].harm,
    )
    return tuple(ranking)


def _choose(ranking: Sequence[NodeHarm], share: float) -> tuple[str, ...]:
    """Least harm per element first, skipping nodes that would pass the share."""
    budget = share * sum(r.elements for r in ranking)
    chosen, used = [], 0
    for item in ranking:
        if used + item.elements <= budget * (1 + 1e-9):
            chosen.append(item.node)
            used += item.elements
    return tuple(chosen)


def _dequantized(
    model: onnx.ModelProto, quantized: onnx.ModelProto, names: Sequence[str]
) -> dict[str, NDArray[np.float32]]:
    """The weights each MatMul computes with after rounding, by node name.

    onnxruntime's own kernel dequantizes them: each MatMulNBits node, set to float
    compute (accuracy_level 0), multiplies an identity matrix, in one session.
    """
    lowbit = {n.output[0]: n for n in quantized.graph.node if n.op_type == "MatMulNBits"}
    used = {t for n in lowbit.values() for t in n.input[1:]}
    nodes, outputs, sizes = [], [], set()
    for node in model.graph.node:
        if node.name not in names:
            continue
        source = lowbit.get(node.output[0])
        if source is None:
            raise CompressionError(f"onnxruntime's weight-only quantizer skipped {node.name}")
        copy = onnx.NodeProto()
        copy.CopyFrom(source)
        k = next(a.i for a in copy.attribute if a.name == "K")
        n = next(a.i for a in copy.attribute if a.name == "N")
        for attr in copy.attribute:
            if attr.name == "accuracy_level":
                attr.i = 0
        copy.input[0], copy.output[0] = f"eye_{k}", f"{node.name}__rounded"
        nodes.append(copy)
        outputs.append(
            onnx.helper.make_tensor_value_info(copy.output[0], onnx.TensorProto.FLOAT, [k, n])
        )
        sizes.add(k)
    graph = onnx.helper.make_graph(
        nodes,
        "dequantize",
        [
            onnx.helper.make_tensor_value_info(f"eye_{k}", onnx.TensorProto.FLOAT, [k, k])
            for k in sorted(sizes)
        ],
        outputs,
        [t for t in quantized.graph.initializer if t.name in used],
    )
    unpack = onnx.helper.make_model(
        graph,
        opset_imports=[
            onnx.helper.make_opsetid("", INT4_OPSET),
            onnx.helper.make_opsetid(MS_DOMAIN, 1),
        ],
    )
    unpack.ir_version = 10
    session = _session(unpack, "the weight dequantization model")
    arrays = session.run(
        [o.name for o in outputs], {f"eye_{k}": np.eye(k, dtype=np.float32) for k in sizes}
    )
    return {
        o.name.removesuffix("__rounded"): np.asarray(a, dtype=np.float32)
        for o, a in zip(outputs, arrays, strict=True)
    }


def probe_model(
    model: onnx.ModelProto, names: Sequence[str], rounded: Mapping[str, NDArray[np.float32]]
) -> onnx.ModelProto:
    """The float model where node ``names[i]`` multiplies by ``W + s[i] * (rounded - W)``
    (its input 1; codebook.py ranks its tensors with this probe too).

    ``s`` is a graph input: all zeros runs the float model, a one-hot vector swaps in
    exactly one node's rounded weights.
    """
    inits = {t.name: t for t in model.graph.initializer}
    index = {name: i for i, name in enumerate(names)}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    extra: list[onnx.TensorProto] = []
    for node in probe.graph.node:
        if node.name in index:
            i, weight = index[node.name], node.input[1]
            tag = f"{weight}__probe"
            delta = rounded[node.name] - onnx.numpy_helper.to_array(inits[weight])
            extra += [
                onnx.numpy_helper.from_array(delta.astype(np.float32), f"{tag}_delta"),
                onnx.numpy_helper.from_array(np.array(i, dtype=np.int64), f"{tag}_index"),
            ]
            nodes += [
                onnx.helper.make_node("Gather", [_SWITCH, f"{tag}_index"], [f"{tag}_s"]),
                onnx.helper.make_node("Mul", [f"{tag}_delta", f"{tag}_s"], [f"{tag}_d"]),
                onnx.helper.make_node("Add", [weight, f"{tag}_d"], [f"{tag}_w"]),
            ]
            node.input[1] = f"{tag}_w"
        nodes.append(node)
    copies = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(copies, nodes, strict=True):
        copy.CopyFrom(node)
    del probe.graph.node[:]
    probe.graph.node.extend(copies)
    probe.graph.initializer.extend(extra)
    switch = onnx.helper.make_tensor_value_info(_SWITCH, onnx.TensorProto.FLOAT, [len(names)])
    probe.graph.input.append(switch)
    return probe


def _session(model: onnx.ModelProto, what: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(
            model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise CompressionError(f"{what} does not load in onnxruntime: {exc}") from exc


def measure_harms(
    probe: onnx.ModelProto,
    count: int,
    calibration: Mapping[str, NDArray[np.generic]],
    batch: int,
) -> NDArray[np.float64]:
    """Per switched node: mean over float outputs of the relative squared output change."""
    session = _session(probe, "the weight-only ranking model")
    samples = min(HARM_SAMPLES, len(next(iter(calibration.values()))))
    samples = max(batch, samples - samples % batch)
    feeds = [
        {k: np.asarray(v)[start : start + batch] for k, v in calibration.items()}
        for start in range(0, samples, batch)
    ]
    outputs = [o.name for o in session.get_outputs()]

    def run(switch: NDArray[np.float32]) -> list[NDArray[np.float64]]:
        results: list[NDArray[np.float64]] = []
        for feed in feeds:
            for value in session.run(outputs, {**feed, _SWITCH: switch}):
                array = np.asarray(value)
                if np.issubdtype(array.dtype, np.floating):
                    results.append(array.astype(np.float64))
        return results

    reference = run(np.zeros(count, dtype=np.float32))
    norms = [max(float(np.sum(r**2)), 1e-30) for r in reference]
    harms = np.zeros(count, dtype=np.float64)
    for i in range(count):
        switch = np.zeros(count, dtype=np.float32)
        switch[i] = 1.0
        moved = run(switch)
        errors = [
            float(np.sum((m - r) ** 2)) / norm
            for m, r, norm in zip(moved, reference, norms, strict=True)
        ]
        harms[i] = float(np.mean(errors)) if errors else 0.0
    return harms


# ------------------------------------------------------------------ checks and output
