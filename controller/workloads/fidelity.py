"""Fidelity of a candidate ONNX model to a reference ONNX model, from ONNX files alone.

When a model arrives as an ONNX file without labels or training data, the only quality
we can measure is how closely a compressed candidate reproduces the original's outputs
on calibration inputs. The metric follows what the output means:

- ``top1_agreement`` — classifiers, output [N, C] with C > 1: the share of samples
  whose arg-max class is the same.
- ``threshold_agreement`` — binary outputs, [N] or [N, 1]: the share of samples on the
  same side of a threshold. Unless ``threshold`` is given it follows from the reference:
  0.5 for probabilities (the output comes from a Sigmoid, through shape-only ops such as
  Reshape or Squeeze, or every reference output on the calibration inputs lies in
  [0, 1]), else 0.0 for logits (the same decision: sigmoid(x) > 0.5 exactly when
  x > 0). A fixed 0.0 on probabilities would put every sample on the same side and
  score any candidate 1.0. The threshold used is in ``Score.extra["threshold"]``.
- ``cosine`` — embeddings: the mean cosine similarity of each sample's output vector
  (flattened) with the reference's.

Unless ``metric`` is given, the reference model's metadata decides first (our exports
write ``task`` = "embedding" or "classification"; an embedding output is [N, D] too, so
the shape alone cannot tell it from logits), then the output shape: [N] or [N, 1] →
threshold, [N, C>1] → top-1, rank 3 or more → cosine.

Calibration arrays are keyed by input name with samples on axis 0 (``INPUTS.npz``
holds one array per model input); they are checked against both models' inputs before
anything runs, and a mismatch raises ``CalibrationMismatchError`` naming the input. So
does a reference (source) model that onnxruntime cannot run on the values themselves
(token ids past an embedding's end, say): that is the input file's problem, said in one
line. ``split_holdout`` keeps part of the samples out of calibration to judge candidates
on, and ``warn_few_samples`` logs when too few are judged for a fidelity budget to be
resolved at all (one sample moves an agreement by 1/n).

Models must be self-contained: ``check_self_contained`` refuses one that keeps its
weights in external data files, which would not follow the model into trial directories.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from controller.compression.calibration import check_calibration, input_specs
from controller.compression.errors import CalibrationMismatchError, CompressionError
from controller.workloads.base import Score
from controller.workloads.sessions import session as onnx_session

log = logging.getLogger(__name__)

Calibration = Mapping[str, NDArray[np.generic]]
DEFAULT_BATCH = 64
_REFERENCE_CACHE_SIZE = 8
LOGIT_THRESHOLD = 0.0
PROBABILITY_THRESHOLD = 0.5
# Fewer samples than this make any fidelity a coin toss, whatever the budget.
MIN_SAMPLES = 20
# Ops that pass values through unchanged (only reshaped or retyped): a Sigmoid behind
# them still makes the output a probability.
_SHAPE_ONLY_OPS = frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast"})
_PROBABILITY_OPS = frozenset({"Sigmoid", "HardSigmoid"})
# What onnxruntime raises from InferenceSession.run for values a model cannot take.
_ORT_RUN_ERRORS = (
    ort_errors.InvalidArgument,
    ort_errors.Fail,
    ort_errors.RuntimeException,
    ort_errors.NotImplemented,
)


class FidelityMetric(enum.StrEnum):
    TOP1 = "top1_agreement"
    THRESHOLD = "threshold_agreement"
    COSINE = "cosine"


# ------------------------------------------------------------------ inputs


def load_calibration(path: Path) -> dict[str, NDArray[np.generic]]:
    """Arrays from an ``.npz`` file, one per model input (named after it), samples on axis 0.

    Pickled object arrays are refused: a calibration file must never run code.
    """
    if not path.is_file():
        raise CalibrationMismatchError(f"calibration file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: np.asarray(archive[name]) for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise CalibrationMismatchError(
            f"calibration file {path} is not a readable .npz of numeric arrays "
            f"(one per model input, named after it): {exc}"
        ) from exc
    if not arrays:
        raise CalibrationMismatchError(f"calibration file {path} holds no arrays")
    return arrays


def samples_needed(min_fidelity: float | None) -> int:
    """How many judged samples resolve ``min_fidelity``: one disagreement must cost no
    more than ``1 - min_fidelity``, and never fewer than ``MIN_SAMPLES``."""
    allowed = None if min_fidelity is None else 1.0 - min_fidelity
    # The 1e-9 keeps float noise (1 - 0.9 = 0.0999...) from asking for 11 at 0.9.
    if allowed is not None and allowed > 0:
        return max(MIN_SAMPLES, math.ceil(1.0 / allowed - 1e-9))
    return MIN_SAMPLES


@dataclass(frozen=True)
class CalibrationSplit:
    """The calibration inputs in two disjoint parts: ``fit`` calibrates the quantizers
    and steers their own searches, ``judge`` scores the candidates. Static int8 fits its
    activation ranges to the inputs it sees, so judging it on those same inputs flatters
    it; with too few samples to spare (``held_out`` False) both are every sample."""

    fit: Calibration
    judge: Calibration
    held_out: bool

    @property
    def judge_samples(self) -> int:
        return _count(self.judge)

    @property
    def fit_samples(self) -> int:
        return _count(self.fit)


def split_holdout(calibration: Calibration, min_fidelity: float | None) -> CalibrationSplit:
    """Hold out what resolves the budget (``samples_needed``; at least a quarter, at most
    half of the samples), chosen by a fixed-seed permutation, so files sorted by class
    give both parts every class and the same file always splits the same way. Under
    2 x ``MIN_SAMPLES`` nothing is held out, and that is logged. Too few judged samples for
    the budget are logged too (``warn_few_samples``). Arrays of unequal lengths are not
    split: check_calibration names them when they are used."""
    n = _count(calibration)
    judge_n = min(max(samples_needed(min_fidelity), math.ceil(n / 4)), n // 2)
    if n < 1 or judge_n < MIN_SAMPLES:
        if n >= 1:
            log.warning(
                "the calibration file holds %d sample(s), too few to hold any out: fidelity "
                "is judged on the inputs static quantization calibrates on, which flatters "
                "it; give at least %d samples (a quarter or more is then held out to judge)",
                n,
                2 * MIN_SAMPLES,
            )
        warn_few_samples(n, min_fidelity)
        return CalibrationSplit(calibration, calibration, held_out=False)
    order = np.random.default_rng(0).permutation(n)
    judge = np.sort(order[:judge_n])
    fit = np.sort(order[judge_n:])
    split = CalibrationSplit(
        {k: v[fit] for k, v in calibration.items()},
        {k: v[judge] for k, v in calibration.items()},
        held_out=True,
    )
    log.info(
        "calibration inputs: %d calibrate the quantizers, %d held out to judge fidelity",
        n - judge_n,
        judge_n,
    )
    warn_few_samples(judge_n, min_fidelity, what=f"{judge_n} held-out sample(s) of {n}")
    return split


def _count(calibration: Calibration) -> int:
    """The samples every array holds (axis 0); 0 when they disagree or there are none."""
    counts = {np.shape(a)[0] for a in calibration.values() if np.ndim(a)}
    return counts.pop() if len(counts) == 1 else 0


def warn_few_samples(samples: int, min_fidelity: float | None, *, what: str = "") -> None:
    """Log when ``samples`` cannot resolve the fidelity budget (one sample moves an
    agreement by 1/n): fewer than ``MIN_SAMPLES``, or so few that a single disagreement
    already costs more than ``1 - min_fidelity``. Nothing stops: the caller chose them."""
    allowed = None if min_fidelity is None else 1.0 - min_fidelity
    needed = samples_needed(min_fidelity)
    if samples < 1 or samples >= needed:
        return  # none at all is refused elsewhere
    step = 1.0 / samples
    if allowed is not None and samples * allowed < 1.0 - 1e-9:
        why = (
            f"one disagreeing sample moves fidelity by {step:.3g}, more than the "
            f"{allowed:.3g} that min_fidelity {min_fidelity:g} allows"
        )
    else:
        why = f"one sample moves fidelity by {step:.3g}, too coarse to judge a model"
    log.warning(
        "fidelity is judged on only %s: %s; give at least %d judged samples "
        "(ten times that to measure fidelity reliably)",
        what or f"the calibration file's {samples} sample(s)",
        why,
        needed,
    )


def _parse_model(path: Path, role: str) -> onnx.ModelProto:
    """The graph without its external data (the checker reads that from beside the file)."""
    if not path.is_file():
        raise CompressionError(f"{role} model {path} does not exist")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ...
        raise CompressionError(f"{role} model {path} is not a valid ONNX model: {exc}") from exc


def _load_model(path: Path, role: str) -> onnx.ModelProto:
    model = _parse_model(path, role)
    try:
        # Checked by path, so external data resolves beside the model, not in the cwd.
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises ValidationError, ...
        raise CompressionError(f"{role} model {path} is not a valid ONNX model: {exc}") from exc
    return model


def _external_tensors(graph: onnx.GraphProto) -> list[str]:
    """Names of tensors (initializers, Constant values, subgraphs') stored outside the file."""
    names = [t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for node in graph.node:
        for attr in node.attribute:
            tensors = [attr.t] if attr.HasField("t") else list(attr.tensors)
            names += [
                t.name or f"{node.name or node.op_type}.{attr.name}"
                for t in tensors
                if t.data_location == onnx.TensorProto.EXTERNAL
            ]
            subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for subgraph in subgraphs:
                names += _external_tensors(subgraph)
    return names


def check_self_contained(path: Path) -> None:
    """Refuse a model whose weights live in external data files beside it.

    Compression copies the model into trial directories and ships one file; a separate
    ``.data`` file would be left behind, and the failure would surface later as a
    confusing load error or traceback.
    """
    external = _external_tensors(_parse_model(path, "source").graph)
    if external:
        raise CompressionError(
            f"source model {path}: tensors {external[:3]} keep their data in external files; "
            "give one self-contained .onnx file (onnx.save(onnx.load(PATH), NEW_PATH) "
            "writes one, for models under 2 GB)"
        )


def _check_same_inputs(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    ref = [s.name for s in input_specs(reference)]
    cand = [s.name for s in input_specs(candidate)]
    if sorted(ref) != sorted(cand):
        raise CalibrationMismatchError(
            f"candidate model inputs {cand} differ from the reference's {ref}; "
            "both must take the same calibration arrays"
        )


def _output_name(reference: onnx.ModelProto, candidate: onnx.ModelProto, output: str | None) -> str:
    ref = [o.name for o in reference.graph.output]
    cand = [o.name for o in candidate.graph.output]
    name = output if output is not None else ref[0]
    if name not in ref:
        raise CompressionError(f"reference model has no output {name!r}; it has {ref}")
    if name not in cand:
        raise CompressionError(
            f"candidate model has no output {name!r} (the reference's); it has {cand}"
        )
    return name


# ------------------------------------------------------------------ running


def _static_batch(model: onnx.ModelProto) -> int | None:
    sizes = {s.dims[0] for s in input_specs(model) if s.dims and isinstance(s.dims[0], int)}
    return sizes.pop() if len(sizes) == 1 else None


def run_output(
    path: Path,
    model: onnx.ModelProto,
    calibration: Calibration,
    output: str,
    batch_size: int = DEFAULT_BATCH,
) -> NDArray[np.float64]:
    """One output over all calibration samples, in batches (the static batch if any)."""
    return _run_session(onnx_session(path), model, calibration, output, batch_size)


def _run_session(
    session: ort.InferenceSession,
    model: onnx.ModelProto,
    calibration: Calibration,
    output: str,
    batch_size: int,
) -> NDArray[np.float64]:
    batch = _static_batch(model) or batch_size
    n = len(next(iter(calibration.values())))
    # A failing run raises with the whole message; onnxruntime's own log line of it
    # (severity ERROR) would only print the same text again, unformatted, on stderr.
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # FATAL only
    outs = []
    for start in range(0, n, batch):
        feed = {k: np.ascontiguousarray(v[start : start + batch]) for k, v in calibration.items()}
        (out,) = session.run([output], feed, quiet)
        outs.append(np.asarray(out, dtype=np.float64))
    return np.concatenate(outs)


def _run_reference(
    path: Path, model: onnx.ModelProto, calibration: Calibration, output: str, batch_size: int
) -> NDArray[np.float64]:
    """The reference's outputs; a run failure is the calibration file's problem.

    The inputs already passed the name/dtype/shape checks, so when the source model
    itself cannot run on them it is the values (token ids past an embedding's end, ...)
    that are wrong. Loading errors stay as they are: they are not about the inputs.
    """
    session = onnx_session(path)
    try:
        return _run_session(session, model, calibration, output, batch_size)
    except _ORT_RUN_ERRORS as exc:
        raise CalibrationMismatchError(
            f"the source model cannot run on the calibration inputs: {_ort_text(exc)}"
        ) from exc


def _ort_text(exc: BaseException) -> str:
    """onnxruntime's message on one line, without its "[ONNXRuntimeError] : 2 : NAME :"."""
    text = " ".join(str(exc).split())
    return re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)


@dataclass(frozen=True)
class _RefKey:
    path: str
    mtime_ns: int
    size: int
    output: str
    calibration: str


_reference_cache: OrderedDict[_RefKey, NDArray[np.float64]] = OrderedDict()


def _calibration_digest(calibration: Calibration) -> str:
    h = hashlib.sha256()
    for name in sorted(calibration):
        array = np.ascontiguousarray(calibration[name])
        h.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def _reference_outputs(
    path: Path, model: onnx.ModelProto, calibration: Calibration, output: str, batch_size: int
) -> NDArray[np.float64]:
    """The reference's outputs, remembered: accuracy-aware quantization asks many times."""
    stat = path.stat()
    digest = _calibration_digest(calibration)
    key = _RefKey(str(path.resolve()), stat.st_mtime_ns, stat.st_size, output, digest)
    cached = _reference_cache.get(key)
    if cached is None:
        cached = _run_reference(path, model, calibration, output, batch_size)
        _reference_cache[key] = cached
        while len(_reference_cache) > _REFERENCE_CACHE_SIZE:
            _reference_cache.popitem(last=False)
    else:
        _reference_cache.move_to_end(key)
    return cached


# ------------------------------------------------------------------ metrics


def choose_metric(model: onnx.ModelProto, output_shape: tuple[int, ...]) -> FidelityMetric:
    """The metric for an output: the model's "task" metadata first, else the shape."""
    task = {p.key: p.value for p in model.metadata_props}.get("task")
    if task == "embedding":
        return FidelityMetric.COSINE
    if len(output_shape) == 1 or (len(output_shape) == 2 and output_shape[1] == 1):
        return FidelityMetric.THRESHOLD
    if len(output_shape) == 2:
        return FidelityMetric.TOP1
    if task == "classification":
        raise CompressionError(
            f"classification output has shape {list(output_shape)}; expected [N, C] or [N]"
        )
    return FidelityMetric.COSINE


def choose_threshold(model: onnx.ModelProto, output: str, reference: NDArray[np.float64]) -> float:
    """0.5 when the reference outputs probabilities, 0.0 when it outputs logits.

    Probabilities: the output comes from a Sigmoid (through shape-only ops), or every
    reference value on the calibration inputs lies in [0, 1].
    """
    if _produced_by_sigmoid(model.graph, output):
        return PROBABILITY_THRESHOLD
    if reference.size and bool(((reference >= 0.0) & (reference <= 1.0)).all()):
        return PROBABILITY_THRESHOLD
    return LOGIT_THRESHOLD


def _produced_by_sigmoid(graph: onnx.GraphProto, output: str) -> bool:
    producers = {name: node for node in graph.node for name in node.output if name}
    name = output
    for _ in range(len(graph.node)):  # a graph is acyclic; the bound only guards bad files
        node = producers.get(name)
        if node is None:
            return False
        if node.op_type in _PROBABILITY_OPS and node.domain in ("", "ai.onnx"):
            return True
        if node.op_type not in _SHAPE_ONLY_OPS or not node.input:
            return False
        name = node.input[0]
    return False


def top1_agreement(reference: NDArray[np.float64], candidate: NDArray[np.float64]) -> float:
    return float((reference.argmax(axis=1) == candidate.argmax(axis=1)).mean())


def threshold_agreement(
    reference: NDArray[np.float64], candidate: NDArray[np.float64], threshold: float = 0.0
) -> float:
    same_side = (reference.reshape(-1) > threshold) == (candidate.reshape(-1) > threshold)
    return float(same_side.mean())


def cosine_per_sample(
    reference: NDArray[np.float64], candidate: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Cosine of each sample's flattened output with the reference's (1.0 when both are 0)."""
    ref = reference.reshape(len(reference), -1)
    cand = candidate.reshape(len(candidate), -1)
    ref_norm = np.linalg.norm(ref, axis=1)
    cand_norm = np.linalg.norm(cand, axis=1)
    dot = (ref * cand).sum(axis=1)
    both_zero = (ref_norm == 0) & (cand_norm == 0)
    cos = dot / np.maximum(ref_norm * cand_norm, 1e-30)
    result: NDArray[np.float64] = np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))
    return result


# ------------------------------------------------------------------ entry point


def fidelity(
    reference: Path,
    candidate: Path,
    calibration: Calibration,
    *,
    metric: FidelityMetric | str | None = None,
    output: str | None = None,
    threshold: float | None = None,
    batch_size: int = DEFAULT_BATCH,
) -> Score:
    """How faithfully ``candidate`` reproduces ``reference`` on the calibration inputs.

    ``output`` defaults to the reference's first output; ``metric`` to the one its
    task metadata or output shape implies, ``threshold`` to the one its outputs imply
    (see the module docstring). The Score's ``extra`` holds the worst sample's cosine
    ("cosine_min") for embeddings, the threshold used for binary outputs
    ("threshold"), and the largest absolute output difference ("max_abs_diff") for
    every metric.
    """
    if batch_size < 1:
        raise CompressionError(f"batch_size must be >= 1, got {batch_size}")
    chosen = None if metric is None else _parse_metric(metric)
    ref_model = _load_model(reference, "reference")
    cand_model = _load_model(candidate, "candidate")
    _check_same_inputs(ref_model, cand_model)
    n = check_calibration(ref_model, calibration, label="calibration")
    check_calibration(cand_model, calibration, label="calibration")
    name = _output_name(ref_model, cand_model, output)
    want = _reference_outputs(reference, ref_model, calibration, name, batch_size)
    got = run_output(candidate, cand_model, calibration, name, batch_size)
    if got.shape != want.shape:
        raise CompressionError(
            f"candidate output {name!r} has shape {list(got.shape)}; "
            f"the reference's is {list(want.shape)}"
        )
    chosen = chosen or choose_metric(ref_model, want.shape)
    extra = {"max_abs_diff": float(np.abs(got - want).max()) if got.size else 0.0}
    if chosen is FidelityMetric.TOP1:
        if want.ndim != 2 or want.shape[1] < 2:
            raise CompressionError(
                f"top1_agreement needs [N, C>1] outputs; {name!r} is {list(want.shape)}"
            )
        value = top1_agreement(want, got)
    elif chosen is FidelityMetric.THRESHOLD:
        if want.size != len(want):
            raise CompressionError(
                f"threshold_agreement needs [N] or [N, 1] outputs; {name!r} is {list(want.shape)}"
            )
        used = choose_threshold(ref_model, name, want) if threshold is None else threshold
        value = threshold_agreement(want, got, used)
        extra["threshold"] = used
    else:
        cosines = cosine_per_sample(want, got)
        value = float(cosines.mean())
        extra["cosine_min"] = float(cosines.min())
    return Score(metric=chosen.value, value=value, samples=n, extra=extra)


def _parse_metric(metric: FidelityMetric | str) -> FidelityMetric:
    try:
        return FidelityMetric(metric)
    except ValueError:
        known = ", ".join(m.value for m in FidelityMetric)
        raise CompressionError(
            f"unknown fidelity metric {metric!r}; expected one of {known}"
        ) from None
