"""Non-uniform quantization by weight sharing: each weight becomes an index into a codebook.

The weights of a tensor, or of each output channel, share ``2**bits`` levels fitted by
codebook_fit.py (k-means or Lloyd-Max). With calibration inputs, ``error_feedback``
assigns the indices of 2-D weights GPTQ's way (the layer's output error is what stays
small) and ``share`` < 1 keeps the weights whose codebook moves the model's outputs most
(measured, each alone, with weight_only.py's probe) as they were.

Storage, standard operators only: 4-bit indices as a native UINT4 tensor (opset 21; the
model is converted when older), other widths as bit planes, eight indices per byte, or
uint8 at 8 bits; the levels as float16 (float compute) or int8 (int8 compute). Two
decodings:

- at session load, for MatMul / Gemm / Conv weights: ``Cast`` of the UINT4 indices (or
  two ``BitShift`` and one uint8 ``MatMulInteger`` weighing the planes by powers of two),
  then ``Gather`` (one codebook) or ``GatherElements`` (one per channel), under the
  weight's original name. Every input is an initializer, so onnxruntime's constant
  folding rebuilds the weight tensor when the session is created: the file is small,
  and the session holds the same weights as without codebooks.
- per call, for Gather tables (embeddings): only the rows the ids select are gathered
  from the packed table and decoded, so the table stays packed in memory too.

Folding costs memory during the load: onnxruntime keeps every folded intermediate until
the pass ends. On MiniLM (4-bit UINT4) that is ~60 MB more peak than dynamic int8 (bit
planes at 5 bits: ~280 MB, the reason 4 bits are stored natively), and glibc's
allocator keeps that memory after the load unless it is trimmed (``malloc_trim``, or
``MALLOC_MMAP_THRESHOLD_``): resident after load is then below dynamic int8's.

``compute="int8"`` is for speed. onnxruntime's dynamic quantization (quantize.py, per
channel when ``granularity="channel"``) runs first, with the tables to decode per call
kept out of it; then each int8 weight ``X_quantized`` of a MatMulInteger / ConvInteger
becomes the decoding of int8 levels — fitted on the float weights, then snapped to the
int8 grid with a new per-channel scale that replaces ``X_scale`` — and the zero points
stay 0. After folding, the graph is the one dynamic quantization produced, with fewer
distinct weight values: onnxruntime fuses it into DynamicQuantizeMatMul exactly as
before and the latency is dynamic int8's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import onnx
import onnx.checker
import onnx.helper
import onnx.numpy_helper
import onnxruntime as ort
from numpy.typing import NDArray

from controller.compression import quant_graph
from controller.compression.calibration import Calibration, batch_size, check_calibration
from controller.compression.codebook_fit import (
    assign,
    fit_codebooks,
    gptq_assign,
    pack_indices,
    snap_int8,
)
from controller.compression.cpu_features import host_reduce_range
from controller.compression.errors import CompressionError, UnsupportedModelError
from controller.compression.quantize import quantize_onnx
from controller.compression.recipe import CodebookQuantize, Quantize
from controller.compression.weight_only import (
    INT4_OPSET,
    measure_harms,
    probe_model,
    to_int4_opset,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T", bound=np.generic)
Decode = Literal["load", "call"]
MIN_OPSET = 11  # BitShift, GatherElements
# Gather tables from this size on are decoded per call, rows only (about ten small ops,
# ~0.1 ms on MiniLM); smaller ones at session load, costing their float size in memory.
CALL_DECODE_ELEMENTS = 1 << 20
_INT8_QMAX = 127
_REDUCED_QMAX = 63  # reduce_range: 7-bit weights


# ------------------------------------------------------------------ graph building


@dataclass
class _Builder:
    """New nodes and initializers, with shared constants created once."""

    opset: int
    taken: set[str]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    _constants: dict[str, str] = field(default_factory=dict)

    def unique(self, name: str) -> str:
        candidate, index = name, 1
        while candidate in self.taken:
            candidate, index = f"{name}_{index}", index + 1
        self.taken.add(candidate)
        return candidate

    def tensor(self, name: str, array: NDArray[np.generic]) -> str:
        unique = self.unique(name)
        self.initializers.append(onnx.numpy_helper.from_array(np.asarray(array), unique))
        return unique

    def constant(self, key: str, array: NDArray[np.generic]) -> str:
        if key not in self._constants:
            self._constants[key] = self.tensor(f"codebook/{key}", array)
        return self._constants[key]

    def node(
        self, op: str, inputs: list[str], output: str, *, exact: bool = False, **attrs: Any
    ) -> str:
        """Append a node; its output is ``output`` itself with ``exact`` (the name of the
        tensor it replaces), else a fresh name from it."""
        out = output if exact else self.unique(output)
        self.taken.add(out)
        self.nodes.append(
            onnx.helper.make_node(op, inputs, [out], name=self.unique(f"{out}/{op}"), **attrs)
        )
        return out

    def shape(self, dims: Iterable[int]) -> str:
        values = [int(d) for d in dims]
        return self.constant(f"shape_{'x'.join(map(str, values))}", np.array(values, np.int64))

    @contextlib.contextmanager
    def section(self) -> Iterator[list[onnx.NodeProto]]:
        """Collect the nodes added inside the block in a separate list (yielded)."""
        saved, collected = self.nodes, list[onnx.NodeProto]()
        self.nodes = collected
        try:
            yield collected
        finally:
            self.nodes = saved

    def raw(self, tensor: onnx.TensorProto) -> str:
        tensor.name = self.unique(tensor.name)
        self.initializers.append(tensor)
        return tensor.name

    def plane_indices(self, packed: str, bits: int, count: int, prefix: str, *, rows: bool) -> str:
        """int32 indices from bit planes: [rows, count] from [rows, bits, ceil(count/8), 1],
        or [1, count] from [bits, ceil(count/8), 1].

        Two BitShifts spread each byte's eight bits; one uint8 MatMulInteger weighs the
        planes by powers of two: few, small intermediates when onnxruntime folds them.
        """
        if bits == 8:
            return self.node("Cast", [packed], f"{prefix}/indices", to=onnx.TensorProto.INT32)
        shifts = self.constant("shifts", np.arange(7, -1, -1, dtype=np.uint8))
        seven = self.constant("seven", np.array(7, dtype=np.uint8))
        up = self.node("BitShift", [packed, shifts], f"{prefix}/up", direction="LEFT")
        bit = self.node("BitShift", [up, seven], f"{prefix}/bit", direction="RIGHT")
        planes = self.node(
            "Reshape", [bit, self.shape([0, bits, -1] if rows else [bits, -1])], f"{prefix}/planes"
        )
        powers = self.constant(
            f"powers{bits}", (1 << np.arange(bits, dtype=np.uint8))[None, :].astype(np.uint8)
        )
        summed = self.node("MatMulInteger", [powers, planes], f"{prefix}/indices")
        if rows:  # [rows, 1, padded] -> [rows, padded]
            summed = self.node("Reshape", [summed, self.shape([0, -1])], f"{prefix}/index_rows")
        if (-count) % 8 == 0:
            return summed
        return self.node(
            "Slice",
            [
                summed,
                self.constant("zero1", np.array([0], dtype=np.int64)),
                self.constant(f"end{count}", np.array([count], dtype=np.int64)),
                self.constant("last_axis", np.array([-1], dtype=np.int64)),
            ],
            f"{prefix}/indices_cut",
        )

    def levels(self, name: str, codebook: NDArray[np.generic]) -> str:
        """The codebook as the decoding reads it: float16 levels cast to float32."""
        stored = self.tensor(f"{name}/codebook", codebook)
        if codebook.dtype == np.float16:
            return self.node("Cast", [stored], f"{name}/codebook_f32", to=onnx.TensorProto.FLOAT)
        return stored


# ------------------------------------------------------------------ what gets a codebook


@dataclass(frozen=True)
class _GatherUse:
    """A Gather node reading a table: replaced by a per-call decoding of its rows."""

    node: str
    ids: str
    output: str


@dataclass(frozen=True)
class _Target:
    """One weight tensor and how its codebook is laid out and decoded."""

    name: str
    op: str  # the consuming operator
    axis: int | None  # output-channel axis (0 or last); None: one codebook per tensor
    decode: Decode
    gathers: tuple[_GatherUse, ...] = ()  # decode="call": the Gather nodes to rewrite
    inputs: tuple[_Feature, ...] = ()  # decode="load": the activations it multiplies


@dataclass(frozen=True)
class _Feature:
    """An activation a weight multiplies, and where its input features lie in both."""

    activation: str
    activation_axis: int  # -1 for MatMul / Gemm, 1 for Conv (NCHW)
    weight_axis: int  # 0 for MatMul, 0 or 1 for Gemm (transB), 1 for Conv


@dataclass(frozen=True)
class TensorReport:
    """What one tensor became."""

    name: str
    op: str
    shape: tuple[int, ...]
    bits: int
    codebooks: int  # 1 per tensor, or 1 per output channel
    decode: Decode  # folded at session load, or rows decoded per call
    relative_error: float  # ||W - W_codebook||^2 / ||W||^2
    output_error: float  # ||X (W - W_codebook)||^2 / ||X W||^2 on calibration, else as above
    stored_bytes: int  # packed indices + levels (+ int8 scales)


@dataclass(frozen=True)
class CodebookResult:
    """What codebook quantization wrote."""

    out: Path
    bytes: int
    source_bytes: int
    compute: str
    tensors: tuple[TensorReport, ...]
    seconds: float


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    uses: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            uses.setdefault(name, []).append(node)
    return uses


@dataclass(frozen=True)
class _Role:
    """How one node uses a weight: operator, output-channel axis, decoding, activation."""

    op: str
    axis: int
    decode: Decode
    feature: _Feature | None = None

    @property
    def key(self) -> tuple[str, int, Decode]:
        return self.op, self.axis, self.decode


def _role(node: onnx.NodeProto, name: str, rank: int) -> _Role | None:
    """How ``node`` uses ``name``, when it is a weight this step handles."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    weight = len(node.input) > 1 and node.input[1] == name and node.input[0] != name
    if node.op_type in ("MatMul", "MatMulInteger") and weight and rank == 2:
        return _Role(node.op_type, 1, "load", _Feature(node.input[0], -1, 0))
    if node.op_type == "Gemm" and weight and rank == 2:
        trans_b = int(attrs.get("transB", 0))
        plain = not attrs.get("transA", 0)
        feature = _Feature(node.input[0], -1, trans_b) if plain else None
        return _Role(node.op_type, 0 if trans_b else 1, "load", feature)
    if node.op_type in ("Conv", "ConvInteger") and weight and rank >= 3:
        feature = _Feature(node.input[0], 1, 1) if attrs.get("group", 1) == 1 else None
        return _Role(node.op_type, 0, "load", feature)
    table = node.op_type == "Gather" and node.input[0] == name and node.input[1] != name
    if table and rank == 2 and attrs.get("axis", 0) == 0:
        return _Role("Gather", 1, "call")
    return None


def _targets(
    model: onnx.ModelProto,
    step: CodebookQuantize,
    *,
    dtype: int,
    ops: frozenset[str],
) -> list[_Target]:
    """Initializers of ``dtype`` with ``min_elements`` or more whose consumers all use them
    the same way as an ``ops`` weight."""
    uses = _consumers(model)
    graph_io = {v.name for v in (*model.graph.input, *model.graph.output)}
    found: list[_Target] = []
    for tensor in model.graph.initializer:
        if tensor.data_type != dtype or tensor.name in graph_io:
            continue
        if int(np.prod(tensor.dims)) < step.min_elements or tensor.name not in uses:
            continue
        roles = [_role(node, tensor.name, len(tensor.dims)) for node in uses[tensor.name]]
        known = [r for r in roles if r is not None]
        if len(known) != len(roles) or len({r.key for r in known}) != 1:
            continue  # used by something else too, or in two different ways
        op, axis, decode = known[0].key
        if op not in ops or (decode == "call" and not step.include_gather):
            continue
        gathers = tuple(
            _GatherUse(n.name, n.input[1], n.output[0])
            for n in uses[tensor.name]
            if decode == "call"
        )
        if decode == "call" and int(np.prod(tensor.dims)) < CALL_DECODE_ELEMENTS:
            decode = "load"  # small table: decoded once, not in every call
        features = tuple(r.feature for r in known if r.feature is not None)
        found.append(
            _Target(
                tensor.name,
                op,
                axis if step.granularity == "channel" else None,
                decode,
                gathers,
                features if len(features) == len(known) else (),
            )
        )
    return found


# ------------------------------------------------------------------ the step


def quantize_codebook(
    source: Path,
    out: Path,
    step: CodebookQuantize,
    *,
    calibration: Calibration | None = None,
) -> CodebookResult:
    """Write ``source`` with codebook-quantized weights to ``out``, as ``step`` says.

    ``calibration`` (input arrays by name, samples on axis 0) is needed with
    ``step.weighting="activation"`` or ``step.error_feedback``.
    """
    started = time.perf_counter()
    source, out = Path(source), Path(out)
    if step.needs_calibration and calibration is None:
        raise CompressionError(
            "weighting='activation' and error_feedback use the inputs' statistics and need "
            "calibration=: representative input arrays by input name"
        )
    model = quant_graph.load_model(source)
    source_bytes = quant_graph.onnx_file_bytes(source)
    quant_graph.name_nodes(model)
    _opset(model)
    if calibration is not None:
        check_calibration(model, calibration)
    if step.bits == 4:
        model = _with_uint4(model)
    data = calibration if step.needs_calibration else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        if step.compute == "int8":
            model, reports = _int8(model, step, Path(tmp), data)
        else:
            model, reports = _float(model, step, data)
        written = Path(tmp) / "model.onnx"
        onnx.save(model, str(written))
        quant_graph.verify_result(written, source, "the codebook-quantized model")
        quant_graph.publish(written, out)
    result = CodebookResult(
        out=out,
        bytes=out.stat().st_size,
        source_bytes=source_bytes,
        compute=step.compute,
        tensors=tuple(reports),
        seconds=time.perf_counter() - started,
    )
    log.info(
        "codebook %d-bit (%s, %s) %s → %s: %d → %d bytes, %d tensor(s), %.1f s",
        step.bits,
        step.granularity,
        step.compute,
        source.name,
        out,
        source_bytes,
        result.bytes,
        len(reports),
        result.seconds,
    )
    return result


def _float(
    model: onnx.ModelProto, step: CodebookQuantize, calibration: Calibration | None
) -> tuple[onnx.ModelProto, list[TensorReport]]:
    """Float16 codebooks for float weights, decoded to float32."""
    ops = frozenset({"MatMul", "Gemm", "Conv", "Gather"})
    targets = _targets(model, step, dtype=onnx.TensorProto.FLOAT, ops=ops)
    if not targets:
        raise UnsupportedModelError(_nothing_message(model, step))
    moments = input_moments(model, targets, calibration) if calibration is not None else {}
    inits = {t.name: t for t in model.graph.initializer}
    rewrite = _Rewrite(_Builder(_opset(model), _names(model)))
    candidates = []
    for target in targets:
        weights = onnx.numpy_helper.to_array(inits[target.name]).astype(np.float32)
        if target.op == "Gather":
            rewrite.reports.append(_encode_table(rewrite, target, weights, step))
            continue
        moment = moments.get(target.name)
        coded = _code(weights, target, step, step.bits, moment, qmax=None)
        candidates.append(_Candidate(target, weights, coded, _harm(target, weights, coded, moment)))
    if calibration is not None and step.share < 1:
        candidates = _measured(model, candidates, calibration)
    for candidate in _choose(candidates, step.share):
        target, weights, coded = candidate.target, candidate.weights, candidate.coded
        stored = _emit_load(rewrite.builder, target, weights.shape, coded, step.bits)
        rewrite.reports.append(_report(candidate, step.bits, stored))
        rewrite.done.append(target)
    if not rewrite.done:
        raise UnsupportedModelError(_unchanged_message(step, candidates))
    return rewrite.apply(model), rewrite.reports


@dataclass(frozen=True)
class _Candidate:
    """A weight coded but not yet written: the share keeps the least harmful ones."""

    target: _Target
    weights: NDArray[np.float32]  # float, the tensor's own layout
    coded: _Coded
    harm: float  # relative change of the layer's output (or of the weights)
    scale: onnx.TensorProto | None = None  # int8 compute: the scale it replaces


def _harm(
    target: _Target, weights: NDArray[np.float32], coded: _Coded, moment: InputMoment | None
) -> float:
    """||X dW||^2 / ||X W||^2 over the calibration inputs X when their moment is known
    (how much the layer's output moves), else ||dW||^2 / ||W||^2."""
    decoded = _from_groups(coded.decoded(), target.axis, weights.shape)
    delta = weights.astype(np.float64) - decoded
    if moment is None or weights.ndim != 2:
        energy = float(np.sum(weights.astype(np.float64) ** 2))
        return float(np.sum(delta**2)) / energy if energy > 0 else 0.0
    w = weights.astype(np.float64)
    if moment.weight_axis == 1:
        w, delta = w.T, delta.T
    energy = float(np.sum((moment.moment @ w) * w))
    return float(np.sum((moment.moment @ delta) * delta)) / energy if energy > 0 else 0.0


def _measured(
    model: onnx.ModelProto,
    candidates: list[_Candidate],
    calibration: Calibration,
    *,
    suffix: str = "",
) -> list[_Candidate]:
    """The candidates with their harm measured on the model's outputs, each alone.

    One probe session of the float ``model`` (weight_only.probe_model) swaps in one
    tensor's decoded codebook weights at a time: the harm is the mean relative squared
    change of the outputs on a few calibration inputs. ``suffix`` maps a candidate's
    name to its float weight's (dynamic quantization's "_quantized").
    """
    users: dict[str, str] = {}
    for op in model.graph.node:
        if len(op.input) > 1:
            users.setdefault(op.input[1], op.name)
    named: dict[str, tuple[_Candidate, NDArray[np.float32]]] = {}
    for candidate in candidates:
        node = users.get(candidate.target.name.removesuffix(suffix))
        if node is not None:
            decoded = _from_groups(
                candidate.coded.decoded(), candidate.target.axis, candidate.weights.shape
            )
            named[node] = (candidate, decoded.astype(np.float32))
    if not named:
        return candidates
    names = list(named)
    probe = probe_model(model, names, {n: named[n][1] for n in names})
    harms = measure_harms(probe, len(names), calibration, batch_size(model))
    measured = {named[n][0].target.name: float(h) for n, h in zip(names, harms, strict=True)}
    return [dataclasses.replace(c, harm=measured.get(c.target.name, c.harm)) for c in candidates]


def _choose(candidates: list[_Candidate], share: float) -> list[_Candidate]:
    """The least harm per element first, skipping those that would pass the share of
    elements; graph order kept."""
    total = sum(c.weights.size for c in candidates)
    if share >= 1:
        return candidates
    ranked = sorted(candidates, key=lambda c: c.harm / c.weights.size)
    chosen, used = set(), 0
    for candidate in ranked:
        if used + candidate.weights.size <= share * total * (1 + 1e-9):
            chosen.add(candidate.target.name)
            used += candidate.weights.size
    left = [c.target.name for c in candidates if c.target.name not in chosen]
    if left:
        log.info("codebook: share %.2f leaves %d tensor(s) as they are", share, len(left))
    return [c for c in candidates if c.target.name in chosen]


def _int8(
    model: onnx.ModelProto, step: CodebookQuantize, work: Path, calibration: Calibration | None
) -> tuple[onnx.ModelProto, list[TensorReport]]:
    """Dynamic int8 first, then int8 codebooks for its weights (and float16 ones for the
    tables decoded per call, which dynamic quantization is told to leave alone)."""
    quant_graph.gemm_to_matmul(model)  # as quantize.py would: the weights keep known names
    tables = _targets(model, step, dtype=onnx.TensorProto.FLOAT, ops=frozenset({"Gather"}))
    moments: dict[str, InputMoment] = {}
    if calibration is not None:
        ops = frozenset({"MatMul", "Conv"})
        matmuls = _targets(model, step, dtype=onnx.TensorProto.FLOAT, ops=ops)
        moments = input_moments(model, matmuls, calibration)
    floats = {t.name: t for t in model.graph.initializer}
    prepared = work / "prepared.onnx"
    onnx.save(model, str(prepared))
    quantize_onnx(
        prepared,
        work / "dynamic.onnx",
        Quantize(
            mode="dynamic",
            per_channel=step.granularity == "channel",
            accuracy_aware=False,
            exclude_nodes=tuple(g.node for t in tables for g in t.gathers),
        ),
        calibration=None,
        progress=False,
    )
    quantized = onnx.load(str(work / "dynamic.onnx"))
    ops = frozenset({"MatMulInteger", "ConvInteger"})
    weights = _targets(quantized, step, dtype=onnx.TensorProto.INT8, ops=ops)
    rewrite = _Rewrite(_Builder(_opset(quantized), _names(quantized)))
    inits = {t.name: t for t in quantized.graph.initializer}
    qmax = _REDUCED_QMAX if host_reduce_range().reduce_range else _INT8_QMAX
    candidates: list[_Candidate] = []
    for target in weights:
        base = target.name.removesuffix("_quantized")
        scale, zero = inits.get(f"{base}_scale"), inits.get(f"{base}_zero_point")
        if scale is None or zero is None or onnx.numpy_helper.to_array(zero).any():
            log.info("codebook: %s has no symmetric int8 scale; left as it is", target.name)
            continue
        source = floats.get(base)
        weight = _Int8Weight(
            inits[target.name],
            scale,
            onnx.numpy_helper.to_array(source) if source is not None else None,
            moments.get(base),
        )
        candidate = _code_int8(target, weight, step, qmax)
        if candidate is not None:
            candidates.append(candidate)
    if calibration is not None and step.share < 1:
        candidates = _measured(model, candidates, calibration, suffix="_quantized")
    for candidate in _choose(candidates, step.share):
        rewrite.reports.append(_emit_int8(rewrite, candidate, step.bits))
    nodes = {n.name for n in quantized.graph.node}
    for target in tables:
        table = inits.get(target.name)
        if table is None or not all(g.node in nodes for g in target.gathers):
            continue
        weights_table = onnx.numpy_helper.to_array(table).astype(np.float32)
        rewrite.reports.append(_encode_table(rewrite, target, weights_table, step))
    if not rewrite.done:
        raise UnsupportedModelError(_unchanged_message(step, candidates))
    return rewrite.apply(quantized), rewrite.reports


@dataclass
class _Rewrite:
    """Tensors being replaced: the builder's new nodes, the Gather nodes to swap for a
    per-call decoding, and what each tensor became."""

    builder: _Builder
    done: list[_Target] = field(default_factory=list)
    calls: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    new_initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)  # by name
    reports: list[TensorReport] = field(default_factory=list)

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Initializer-only decodings first, Gathers replaced in place, old tensors gone."""
        removed = {t.name for t in self.done}
        kept = [
            self.new_initializers.get(t.name, t)
            for t in model.graph.initializer
            if t.name not in removed
        ]
        nodes = list(self.builder.nodes)
        for node in model.graph.node:
            nodes.extend(self.calls.get(node.name, [node]))
        del model.graph.initializer[:]
        model.graph.initializer.extend([*kept, *self.builder.initializers])
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        return model


@dataclass(frozen=True)
class _Coded:
    """One tensor's codebooks as stored, what they decode to, and an index per weight."""

    stored: NDArray[np.float16] | NDArray[np.int8]  # [groups, L]
    values: NDArray[np.float64]  # [groups, L]: stored levels (times scale), as decoded
    scales: NDArray[np.float32] | None  # int8 levels: one per group
    indices: NDArray[np.uint8]  # [groups, weights per group]
    groups: NDArray[np.float32]  # the weights, grouped

    def decoded(self) -> NDArray[np.float64]:
        return np.take_along_axis(self.values, self.indices.astype(np.intp), axis=1)


def _code(
    weights: NDArray[np.float32],
    target: _Target,
    step: CodebookQuantize,
    bits: int,
    moment: InputMoment | None,
    *,
    qmax: int | None,
    shared_scale: bool = False,
) -> _Coded:
    """Fit, store (float16, or int8 levels on a ``qmax`` grid), and assign indices:
    nearest level, or with error feedback when the inputs' moment is known."""
    groups = _groups(weights, target.axis, target.name, bits)
    importance = None
    if moment is not None and step.weighting == "activation":
        importance = _as_groups(moment.importance(weights.shape), target.axis)
    fit = fit_codebooks(
        groups,
        bits,
        method=step.method,
        iterations=step.iterations,
        keep_zero=step.keep_zero,
        importance=importance,
    )
    scales: NDArray[np.float32] | None = None
    stored: NDArray[np.float16] | NDArray[np.int8]
    if qmax is None:
        stored = fit.levels.astype(np.float16)
        values = stored.astype(np.float64)
    else:
        stored, scales = snap_int8(fit.levels, qmax, shared_scale=shared_scale)
        values = stored.astype(np.float64) * scales[:, None].astype(np.float64)
    if step.error_feedback and moment is not None and weights.ndim == 2:
        input_major = weights if moment.weight_axis == 0 else weights.T
        chosen = gptq_assign(input_major, values, moment.moment)
        indices = _as_groups(chosen if moment.weight_axis == 0 else chosen.T, target.axis)
    else:
        indices = assign(groups, values)
    return _Coded(stored, values, scales, np.ascontiguousarray(indices), groups)


# ------------------------------------------------------------------ calibration statistics


MAX_MOMENT_FEATURES = 8192  # wider inputs get no statistics (a K x K float64 matrix each)


@dataclass(frozen=True)
class InputMoment:
    """E[x x^T] over the calibration inputs of the activations a weight multiplies (summed
    over the nodes that use it), and the weight's input-feature axis."""

    moment: NDArray[np.float64]  # [K, K]
    weight_axis: int

    def importance(self, shape: tuple[int, ...]) -> NDArray[np.float64]:
        """Each weight's share of the output error: the mean square of its input feature."""
        power = np.diag(self.moment).copy()
        view = [1] * len(shape)
        view[self.weight_axis] = power.size
        full = np.broadcast_to(power.reshape(view), shape)
        result: NDArray[np.float64] = full + 1e-6 * max(float(power.max()), 1e-30)
        return result


def input_moments(
    model: onnx.ModelProto, targets: Iterable[_Target], calibration: Calibration
) -> dict[str, InputMoment]:
    """Per weight name: the second moment of its inputs on ``calibration``."""
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    usable = [
        t
        for t in targets
        if t.inputs
        and len({f.weight_axis for f in t.inputs}) == 1
        and shapes[t.name][t.inputs[0].weight_axis] <= MAX_MOMENT_FEATURES
    ]
    wanted = {f.activation: f.activation_axis for t in usable for f in t.inputs}
    if not wanted:
        return {}
    moments = _activation_moments(model, wanted, calibration)
    result: dict[str, InputMoment] = {}
    for target in usable:
        axis = target.inputs[0].weight_axis
        parts = [moments[f.activation] for f in target.inputs]
        if all(m.shape[0] == shapes[target.name][axis] for m in parts):
            result[target.name] = InputMoment(np.sum(parts, axis=0), axis)
    return result


def _activation_moments(
    model: onnx.ModelProto, wanted: Mapping[str, int], calibration: Calibration
) -> dict[str, NDArray[np.float64]]:
    """E[x x^T] over every position of each named activation, features on the given axis."""
    graph_inputs = {v.name for v in model.graph.input}
    outputs = [name for name in wanted if name not in graph_inputs]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session: ort.InferenceSession | None = None
    if outputs:  # else every activation wanted is a graph input: nothing to run
        try:
            session = ort.InferenceSession(
                probe.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise CompressionError(f"the activation statistics model does not load: {exc}") from exc
    batch = batch_size(model)
    total = len(next(iter(calibration.values())))
    sums: dict[str, NDArray[np.float64]] = {}
    counts: dict[str, int] = {}
    for start in range(0, total, batch):
        feed = {k: np.asarray(v)[start : start + batch] for k, v in calibration.items()}
        run = session.run(outputs, feed) if session is not None else []
        values = dict(zip(outputs, run, strict=True))
        values.update({name: feed[name] for name in wanted if name in graph_inputs})
        for name, axis in wanted.items():
            array = np.moveaxis(np.asarray(values[name], dtype=np.float64), axis, -1)
            flat = array.reshape(-1, array.shape[-1])
            if flat.shape[1] > MAX_MOMENT_FEATURES:
                continue
            sums[name] = sums.get(name, 0.0) + flat.T @ flat
            counts[name] = counts.get(name, 0) + flat.shape[0]
    return {name: sums[name] / max(counts[name], 1) for name in sums}


def _encode_table(
    rewrite: _Rewrite, target: _Target, table: NDArray[np.float32], step: CodebookQuantize
) -> TensorReport:
    """A Gather table: packed rows decoded per call for the ids asked, or, when small,
    the whole table decoded at session load."""
    bits = step.table_bits
    coded = _code(table, target, step, bits, None, qmax=None)
    candidate = _Candidate(target, table, coded, _harm(target, table, coded, None))
    if target.decode == "load":
        stored_bytes = _emit_load(rewrite.builder, target, table.shape, coded, bits)
        rewrite.done.append(target)
        return _report(candidate, bits, stored_bytes)
    builder = rewrite.builder
    codebook = builder.levels(target.name, _layout(coded.stored, target.axis))
    rows = coded.indices.reshape(table.shape) if target.axis is None else coded.indices.T
    packed = pack_indices(rows, bits)
    stored = builder.tensor(f"{target.name}/indices", packed if bits == 8 else packed[..., None])
    for use in target.gathers:
        with builder.section() as nodes:
            _decode_rows(builder, use, stored, codebook, bits, table.shape[1], target.axis)
        rewrite.calls[use.node] = nodes
    rewrite.done.append(target)
    return _report(candidate, bits, packed.nbytes + coded.stored.nbytes)


def _decode_rows(
    builder: _Builder,
    use: _GatherUse,
    packed: str,
    codebook: str,
    bits: int,
    width: int,
    axis: int | None,
) -> None:
    """Gather(table, ids) as: the packed rows of the ids, unpacked, looked up, reshaped."""
    prefix = use.output
    flat = builder.node(
        "Reshape",
        [use.ids, builder.constant("flat", np.array([-1], dtype=np.int64))],
        f"{prefix}/ids",
    )
    rows = builder.node("Gather", [packed, flat], f"{prefix}/rows", axis=0)
    indices = builder.plane_indices(rows, bits, width, prefix, rows=True)
    if axis is None:  # one codebook [L]
        values = builder.node("Gather", [codebook, indices], f"{prefix}/values", axis=0)
    else:
        values = builder.node("GatherElements", [codebook, indices], f"{prefix}/values", axis=0)
    shape = builder.node(
        "Concat",
        [
            builder.node("Shape", [use.ids], f"{prefix}/ids_shape"),
            builder.constant(f"width{width}", np.array([width], dtype=np.int64)),
        ],
        f"{prefix}/shape",
        axis=0,
    )
    builder.node("Reshape", [values, shape], use.output, exact=True)


@dataclass(frozen=True)
class _Int8Weight:
    """An int8 weight of dynamic quantization with what it was made from."""

    quantized: onnx.TensorProto
    scale: onnx.TensorProto
    source: NDArray[np.generic] | None  # the float weights, when known by name
    moment: InputMoment | None  # of the float weights' inputs


def _code_int8(
    target: _Target, weight: _Int8Weight, step: CodebookQuantize, qmax: int
) -> _Candidate | None:
    """An int8 weight of dynamic quantization as int8 levels with new scales; None (left
    as it is) when its scales are neither per tensor nor per output channel."""
    q = onnx.numpy_helper.to_array(weight.quantized)
    scales = onnx.numpy_helper.to_array(weight.scale).astype(np.float32).reshape(-1)
    channel_axis = q.ndim - 1 if target.op == "MatMulInteger" else 0
    channels = q.shape[channel_axis]
    if scales.size not in (1, channels):
        log.info(
            "codebook: %s: %d scales for %d channels; left as it is",
            target.name,
            scales.size,
            channels,
        )
        return None
    moment = weight.moment
    if weight.source is not None and weight.source.shape == q.shape:
        weights = weight.source.astype(np.float32)
    else:  # fit on what int8 kept of the weights
        shape = [1] * q.ndim
        shape[channel_axis] = scales.size
        weights = q.astype(np.float32) * scales.reshape(shape)
        moment = None
    per_channel = scales.size == channels and target.axis is not None
    coded = _code(weights, target, step, step.bits, moment, qmax=qmax, shared_scale=not per_channel)
    harm = _harm(target, weights, coded, moment)
    return _Candidate(target, weights, coded, harm, weight.scale)


def _emit_int8(rewrite: _Rewrite, candidate: _Candidate, bits: int) -> TensorReport:
    """Write a chosen int8 codebook and replace its scale initializer."""
    target, coded, scale = candidate.target, candidate.coded, candidate.scale
    if coded.scales is None or scale is None:  # int8 candidates always carry both
        raise CompressionError(f"{target.name}: int8 codebook without scales")
    stored = _emit_load(rewrite.builder, target, candidate.weights.shape, coded, bits)
    per_channel = int(np.prod(scale.dims)) == coded.scales.size and coded.scales.size > 1
    kept = coded.scales if per_channel else coded.scales[:1]
    rewrite.new_initializers[scale.name] = onnx.numpy_helper.from_array(
        kept.reshape(tuple(scale.dims)).astype(np.float32), scale.name
    )
    rewrite.done.append(target)
    return _report(candidate, bits, stored + kept.nbytes)


def _emit_load(
    builder: _Builder, target: _Target, shape: tuple[int, ...], coded: _Coded, bits: int
) -> int:
    """Nodes that rebuild ``target`` from initializers alone (folded at session load);
    returns the bytes stored.

    4-bit indices are a native UINT4 tensor when the opset allows (one Cast to int32 is
    all the unpacking); other widths are bit planes (``_Builder.plane_indices``).
    """
    indices, codebook = coded.indices, _layout(coded.stored, target.axis)
    flat = (indices.T if target.axis == 1 else indices).reshape(-1)  # C order of ``shape``
    count, name = flat.size, target.name
    if target.axis == 0:
        matrix: tuple[int, ...] = (shape[0], count // shape[0])
    else:
        matrix = shape
    if bits == 4 and builder.opset >= INT4_OPSET:
        stored = builder.raw(_uint4(f"{name}/indices", flat, matrix))
        index = builder.node("Cast", [stored], f"{name}/indices_i32", to=onnx.TensorProto.INT32)
        size = (count + 1) // 2
    else:
        packed = pack_indices(flat, bits)
        stored = builder.tensor(f"{name}/indices", packed if bits == 8 else packed[..., None])
        index = builder.plane_indices(stored, bits, count, name, rows=False)
        index = builder.node("Reshape", [index, builder.shape(matrix)], f"{name}/index_matrix")
        size = packed.nbytes
    levels = builder.levels(name, codebook)
    if target.axis is None:
        builder.node("Gather", [levels, index], name, axis=0, exact=True)
    elif len(shape) == 2:
        builder.node("GatherElements", [levels, index], name, axis=1 - target.axis, exact=True)
    else:
        values = builder.node("GatherElements", [levels, index], f"{name}/values", axis=1)
        builder.node("Reshape", [values, builder.shape(shape)], name, exact=True)
    return size + codebook.nbytes


def _uint4(name: str, flat: NDArray[np.uint8], dims: tuple[int, ...]) -> onnx.TensorProto:
    """A UINT4 initializer: element 2i in the low nibble of byte i, 2i+1 in the high one."""
    padded = np.concatenate([flat, np.zeros(flat.size % 2, dtype=np.uint8)])
    packed = (padded[0::2] & 0x0F) | (padded[1::2] << 4)
    return onnx.helper.make_tensor(name, onnx.TensorProto.UINT4, dims, packed.tobytes(), raw=True)


# ------------------------------------------------------------------ small helpers


def _from_groups(
    groups: NDArray[np.float64], axis: int | None, shape: tuple[int, ...]
) -> NDArray[np.float64]:
    """Inverse of ``_as_groups``."""
    return (groups.T if axis == 1 else groups).reshape(shape)


def _as_groups(array: NDArray[_T], axis: int | None) -> NDArray[_T]:
    """[groups, values]: the whole tensor, or one row per output channel (axis 0 or 1)."""
    if axis is None:
        return array.reshape(1, -1)
    if axis == 0:
        return array.reshape(array.shape[0], -1)
    return array.reshape(-1, array.shape[-1]).T


def _groups(
    weights: NDArray[np.floating], axis: int | None, name: str, bits: int
) -> NDArray[np.floating]:
    """The weights as groups, refused when a group has fewer weights than levels."""
    groups = _as_groups(weights, axis)
    if groups.shape[1] < 1 << bits:
        what = "the tensor" if axis is None else "each output channel"
        raise CompressionError(
            f"{name}: {1 << bits} levels ({bits} bits) but {what} has only "
            f"{groups.shape[1]} weights; use fewer bits, granularity='tensor', or "
            f"min_elements above {weights.size} to leave this tensor alone"
        )
    return groups


def _layout(levels: NDArray[np.generic], axis: int | None) -> NDArray[np.generic]:
    """Levels as the decoding gathers them: [L] per tensor, [C, L] for axis 0, [L, C]
    for axis 1."""
    if axis is None:
        return np.ascontiguousarray(levels.reshape(-1))
    return np.ascontiguousarray(levels if axis == 0 else levels.T)


def _report(candidate: _Candidate, bits: int, stored: int) -> TensorReport:
    target, coded = candidate.target, candidate.coded
    reference = coded.groups.astype(np.float64)
    energy = float(np.sum(reference**2))
    error = float(np.sum((reference - coded.decoded()) ** 2)) / energy if energy > 0 else 0.0
    return TensorReport(
        name=target.name,
        op=target.op,
        shape=tuple(int(d) for d in candidate.weights.shape),
        bits=bits,
        codebooks=coded.groups.shape[0],
        decode=target.decode,
        relative_error=error,
        output_error=candidate.harm,
        stored_bytes=int(stored),
    )


def _with_uint4(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset 21 (UINT4 tensors); as it is when onnx cannot convert it (the
    indices are then bit planes, a few more bytes to fold)."""
    try:
        converted = to_int4_opset(model)
    except CompressionError as exc:
        log.info("codebook: 4-bit indices as bit planes: %s", exc)
        return model
    quant_graph.name_nodes(converted)
    return converted


def _opset(model: onnx.ModelProto) -> int:
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version < MIN_OPSET:
        raise UnsupportedModelError(
            f"codebook decoding needs opset {MIN_OPSET} or later (BitShift, GatherElements); "
            f"the model has opset {version}: convert it first (onnx.version_converter)"
        )
    return version


def _names(model: onnx.ModelProto) -> set[str]:
    """Every tensor and node name in use."""
    names = {t.name for t in model.graph.initializer}
    names |= {v.name for v in (*model.graph.input, *model.graph.output, *model.graph.value_info)}
    for node in model.graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def _unchanged_message(step: CodebookQuantize, candidates: list[_Candidate]) -> str:
    if not candidates:
        return (
            f"compute='{step.compute}' found no weight of {step.min_elements}+ elements to "
            "give a codebook (dynamic quantization made none int8 with a symmetric scale) "
            "and no Gather table; use compute='float'"
        )
    sizes = sorted(c.weights.size for c in candidates)
    return (
        f"share={step.share} of {len(candidates)} weight(s) of {sizes} elements selects "
        "none (a weight is taken only whole) and there is no Gather table: nothing would "
        "change; raise share"
    )


def _nothing_message(model: onnx.ModelProto, step: CodebookQuantize) -> str:
    ops = sorted({n.op_type for n in model.graph.node})
    wanted = "MatMul/Gemm/Conv weights" + (" or Gather tables" if step.include_gather else "")
    return (
        f"codebook quantization has nothing to quantize: no float32 {wanted} of "
        f"{step.min_elements}+ elements used by those operators alone (the model has "
        f"{', '.join(ops)})"
    )
