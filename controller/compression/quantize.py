"""Post-training quantization of an ONNX model with onnxruntime: dynamic, static QDQ, fp16.

Every mode first runs onnxruntime's ``quant_pre_process`` (symbolic and ONNX shape
inference, and for static/fp16 the basic graph optimisations, e.g. Conv+BN folding).
Dynamic mode skips the optimisations: they fuse MatMul+Add into Gemm, which dynamic mode
cannot quantize; for the same reason it rewrites plain Gemm nodes back to MatMul + Add.
Node names (``exclude_nodes``, trials) refer to the pre-processed graph; an
optimiser-fused node is also matched by its original name (``mm`` matches
``mm/MatMulAddFusion``).

A static int8 output is written in the canonical QDQ form (canonical_qdq.py: rebuilt by
a device from ``source`` and a few bytes) whenever that form runs bit-identically to
onnxruntime's file on the calibration inputs; otherwise onnxruntime's file is shipped.

Bad requests are refused before any work, naming the argument. The output appears at
``out`` only when complete and checked (it loads in onnxruntime with the source's
output names); on any failure nothing is written there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.checker
from numpy.typing import NDArray
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from controller.compression import quant_graph, rounding
from controller.compression.calibration import (
    DictCalibrationReader,
    batch_size,
    check_calibration,
)
from controller.compression.canonical_qdq import CanonicalResult, canonicalize
from controller.compression.cpu_features import RangeChoice, host_reduce_range
from controller.compression.errors import CompressionError, UnsupportedModelError
from controller.compression.recipe import Quantize
from controller.compression.sensitivity import (
    QuantizeTrial,
    TrialCallback,
    TrialRunner,
    fallback,
    fits,
)

log = logging.getLogger(__name__)

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
DEFAULT_MAX_EVALUATIONS = 32
QUANTIZED_NODE_TYPES = frozenset(
    {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul"}
)
LOW_PRECISION = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT16})


@dataclass(frozen=True)
class QuantizeResult:
    """What quantization produced, and every trial the accuracy-aware search made."""

    out: Path
    bytes: int  # the output is always one self-contained file
    source_bytes: int  # including external data files
    mode: str
    quantizable_nodes: tuple[str, ...]  # candidates in the pre-processed graph
    excluded_nodes: tuple[str, ...]  # kept in float: the step's exclusions, then the fallback's
    fallback_nodes: tuple[str, ...]  # the subset the accuracy-aware search added
    baseline_score: float | None  # evaluate(source)
    final_score: float | None  # evaluate(out)
    met: bool  # drop <= max_drop (True when no max_drop was asked for)
    trials: tuple[QuantizeTrial, ...]
    ranking: tuple[tuple[str, float | None], ...]  # (node, measured harm or None), worst first
    reduce_range: bool
    reduce_range_reason: str
    per_channel: bool
    calibration_method: str | None  # static only
    calibration_samples: int
    canonical: CanonicalResult | None = None  # static: whether ``out`` is the canonical form

    @property
    def drop(self) -> float | None:
        if self.baseline_score is None or self.final_score is None:
            return None
        return self.baseline_score - self.final_score


@dataclass(frozen=True)
class _Job:
    """Everything one quantization call needs, fixed after the up-front checks."""

    step: Quantize
    pre: Path
    work: Path
    calibration: Mapping[str, NDArray[np.generic]] | None
    batch: int
    user_excluded: frozenset[str]
    range_choice: RangeChoice


def quantize_onnx(
    source: Path,
    out: Path,
    step: Quantize,
    *,
    calibration: Mapping[str, NDArray[np.generic]] | None,
    evaluate: Callable[[Path], float] | None = None,
    max_drop: float | None = None,
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
    progress: bool = True,
    on_trial: TrialCallback | None = None,
) -> QuantizeResult:
    """Quantize ``source`` into ``out`` as ``step`` says.

    ``calibration``: input arrays (samples on axis 0), required for static mode and
    checked against the model's inputs whenever given. ``evaluate`` scores an ONNX file
    (higher is better); with ``max_drop`` and ``step.accuracy_aware`` the nodes that
    cost most are kept in float until ``evaluate(source) - evaluate(out) <= max_drop``,
    using at most ``max_evaluations`` quantized candidates (see sensitivity.py). A
    search that never fits returns its best candidate with ``met=False``.
    """
    _check_arguments(step, calibration, evaluate, max_drop, max_evaluations)
    source, out = Path(source), Path(out)
    model = quant_graph.load_model(source)
    source_bytes = quant_graph.onnx_file_bytes(source)
    samples = check_calibration(model, calibration) if calibration is not None else 0
    batch = batch_size(model) if calibration is not None else 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        work = Path(tmp)
        pre = prepare_for_quantization(source, work / "pre.onnx", step.mode)
        pre_model = onnx.load(str(pre))
        candidates = quant_graph.quantizable_nodes(pre_model, step.mode)
        compute = quant_graph.compute_nodes(pre_model, step.mode)
        _check_quantizable(pre_model, step, compute)
        user_excluded = _resolve_exclusions(pre_model, step.exclude_nodes)
        active = [c for c in candidates if c not in user_excluded]
        if compute and all(c in user_excluded for c in compute):
            raise UnsupportedModelError(
                f"exclude_nodes keeps every quantizable node in float ({list(compute)}): "
                "nothing would be quantized"
            )
        job = _Job(step, pre, work, calibration, batch, user_excluded, host_reduce_range())
        baseline = evaluate(source) if evaluate is not None else None
        with _progress_bar(progress, max_evaluations) as report:
            callback = _chain(report, on_trial)
            counter = itertools.count()
            runner = TrialRunner(
                lambda kept: _build(job, kept, next(counter)),
                evaluate,
                baseline,
                budget=max_evaluations,
                on_trial=callback,
            )
            full = runner.run(frozenset(), "full")
            _check_something_quantized(runner.path_of(full), active)
            if step.accuracy_aware and max_drop is not None and not fits(full, max_drop):
                prior = _prior(job, pre_model)
                outcome = fallback(runner, full, active, prior, max_drop)
                best, met, ranking = outcome.best, outcome.met, outcome.ranking
            else:
                best, ranking = full, ()
                met = max_drop is None or fits(full, max_drop)
        chosen = runner.path_of(best)
        canonical = _canonicalize(job, chosen, source)
        quant_graph.verify_result(chosen, source, "the quantized model")
        size = chosen.stat().st_size
        quant_graph.publish(chosen, out)
    fallback_nodes = best.kept_float
    log.info(
        "quantized %s (%s) → %s: %d → %d bytes, %d node(s) kept float, met=%s",
        source.name,
        step.mode,
        out,
        source_bytes,
        size,
        len(user_excluded) + len(fallback_nodes),
        met,
    )
    return QuantizeResult(
        out=out,
        bytes=size,
        source_bytes=source_bytes,
        mode=step.mode,
        quantizable_nodes=candidates,
        excluded_nodes=tuple(n for n in candidates if n in user_excluded)
        + tuple(sorted(user_excluded - set(candidates)))
        + fallback_nodes,
        fallback_nodes=fallback_nodes,
        baseline_score=baseline,
        final_score=best.score,
        met=met,
        trials=tuple(_moved(t, best, out) for t in runner.trials),
        ranking=ranking,
        reduce_range=job.range_choice.reduce_range if step.mode != "fp16" else False,
        reduce_range_reason=job.range_choice.reason if step.mode != "fp16" else "fp16: n/a",
        per_channel=step.per_channel and step.mode != "fp16",
        calibration_method=step.calibration if step.mode == "static" else None,
        calibration_samples=samples,
        canonical=None if canonical is None else dataclasses.replace(canonical, out=out),
    )


def list_quantizable_nodes(source: Path, mode: quant_graph.Mode) -> tuple[str, ...]:
    """The node names ``exclude_nodes`` can name for ``mode`` (after pre-processing)."""
    quant_graph.load_model(source)
    with tempfile.TemporaryDirectory(prefix="homefleet-quant-") as tmp:
        pre = prepare_for_quantization(Path(source), Path(tmp) / "pre.onnx", mode)
        return quant_graph.quantizable_nodes(onnx.load(str(pre)), mode)


# ------------------------------------------------------------------ up-front checks


def _check_arguments(
    step: Quantize,
    calibration: Mapping[str, NDArray[np.generic]] | None,
    evaluate: Callable[[Path], float] | None,
    max_drop: float | None,
    max_evaluations: int,
) -> None:
    if step.mode == "static" and calibration is None:
        raise CompressionError(
            "static quantization needs calibration=: representative input arrays by input name"
        )
    if max_drop is not None and evaluate is None:
        raise CompressionError("max_drop needs evaluate=: a function that scores an ONNX file")
    if max_drop is not None and not (max_drop >= 0):
        raise CompressionError(f"max_drop must be >= 0, got {max_drop}")
    if max_evaluations < 1:
        raise CompressionError(f"max_evaluations must be >= 1, got {max_evaluations}")


def _check_quantizable(model: onnx.ModelProto, step: Quantize, compute: tuple[str, ...]) -> None:
    if step.mode == "fp16":
        if not quant_graph.has_float_weights(model):
            raise UnsupportedModelError(
                "fp16 conversion has nothing to convert: the model has no float32 weights"
            )
        return
    if not compute:
        ops = sorted({n.op_type for n in model.graph.node})
        wanted = quant_graph.DYNAMIC_OPS if step.mode == "dynamic" else quant_graph.STATIC_OPS
        note = " with constant weights" if step.mode == "dynamic" else ""
        raise UnsupportedModelError(
            f"{step.mode} quantization has nothing to quantize: the model has no "
            f"{'/'.join(sorted(wanted))} nodes{note} (it has {', '.join(ops)})"
        )


def _resolve_exclusions(model: onnx.ModelProto, names: tuple[str, ...]) -> frozenset[str]:
    """Map exclude_nodes to pre-processed node names; unknown names are refused."""
    existing = [n.name for n in model.graph.node]
    resolved: set[str] = set()
    unknown = []
    for name in names:
        matches = [n for n in existing if n == name or n.startswith(f"{name}/")]
        if matches:
            resolved.update(matches)
        else:
            unknown.append(name)
    if unknown:
        shown = ", ".join(existing[:20]) + (" ..." if len(existing) > 20 else "")
        raise CompressionError(
            f"exclude_nodes names {unknown} that are not nodes of the model "
            f"(after quant_pre_process); its nodes are: {shown}"
        )
    return frozenset(resolved)


# ------------------------------------------------------------------ the work


def _prior(job: _Job, model: onnx.ModelProto) -> dict[str, float]:
    """Estimated rounding damage per node: weights always, activations given calibration."""
    activations = None
    if job.calibration is not None:
        try:
            activations = rounding.activation_errors(
                job.pre, job.calibration, job.step.mode, job.batch
            )
        except Exception as exc:  # only a prior: fall back to weights alone
            log.info("activation statistics unavailable (%s); ranking by weights only", exc)
    return rounding.node_priors(model, job.step.mode, activations)


def prepare_for_quantization(source: Path, pre: Path, mode: quant_graph.Mode) -> Path:
    """quant_pre_process, then unique node names (and Gemm → MatMul for dynamic).

    Symbolic shape inference runs first, through quant_graph.symbolic_shapes (auto-merge
    on, no stray files on failure); quant_pre_process then adds ONNX shape inference and,
    except in dynamic mode, the basic graph optimisations.
    """
    source_model = onnx.load(str(source))
    inferred = quant_graph.symbolic_shapes(source_model)
    start = source
    if inferred is not None:
        start = pre.with_name("symbolic.onnx")
        onnx.save(inferred, str(start))
    try:
        quant_pre_process(
            str(start), str(pre), skip_optimization=mode == "dynamic", skip_symbolic_shape=True
        )
    except Exception as exc:
        raise CompressionError(
            f"onnxruntime quant_pre_process cannot prepare {source.name}: {exc}"
        ) from exc
    finally:
        if start != source:
            start.unlink(missing_ok=True)
    model = onnx.load(str(pre))
    quant_graph.name_nodes(model)
    if mode == "dynamic":
        quant_graph.gemm_to_matmul(model)
    onnx.save(model, str(pre))
    return pre


class _DemoteToDebug(logging.Filter):
    """onnxruntime's quantizer warns on the root logger about what it handles anyway
    (per-channel axis of a 1-D weight, ...): those go to our debug log instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        log.debug("onnxruntime: %s", record.getMessage())
        return False


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """Keep onnxruntime's prints ("Number of histogram bins : 128") and root-logger
    warnings out of the operator's terminal and the controller's log."""
    root = logging.getLogger()
    demote = _DemoteToDebug()
    root.addFilter(demote)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        root.removeFilter(demote)
        for line in printed.getvalue().splitlines():
            if line.strip() and "\x1b" not in line:  # not a progress bar's redraw
                log.debug("onnxruntime: %s", line)


def _build(job: _Job, kept: frozenset[str], index: int) -> Path:
    """Quantize the pre-processed model with ``kept`` (and the user's exclusions) in float."""
    target = job.work / f"trial-{index:03d}.onnx"
    exclude = sorted(job.user_excluded | kept)
    step = job.step
    reduce_range = job.range_choice.reduce_range
    try:
        with _quiet_onnxruntime():
            _run_quantizer(job, step, target, exclude, reduce_range)
    except CompressionError:
        raise
    except Exception as exc:
        raise CompressionError(
            f"onnxruntime {step.mode} quantization failed: {type(exc).__name__}: {exc}"
        ) from exc
    return target


def _run_quantizer(
    job: _Job, step: Quantize, target: Path, exclude: list[str], reduce_range: bool
) -> None:
    """The onnxruntime call for ``step``: dynamic or static int8 (QDQ), or fp16."""
    if step.mode == "dynamic":
        quantize_dynamic(
            job.pre,
            target,
            per_channel=step.per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            # outputs of com.microsoft ops (a weight-only step's MatMulNBits) get no
            # type from ONNX shape inference; every tensor dynamic mode reads is float
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    elif step.mode == "static":
        if job.calibration is None:  # refused up front; kept for the type checker
            raise CompressionError("static quantization needs calibration=")
        quantize_static(
            job.pre,
            target,
            DictCalibrationReader(job.calibration, job.batch),
            quant_format=QuantFormat.QDQ,
            per_channel=step.per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            calibrate_method=CALIBRATION_METHODS[step.calibration],
            calibration_providers=["CPUExecutionProvider"],
        )
    else:
        model = convert_float_to_float16(
            onnx.load(str(job.pre)), keep_io_types=True, node_block_list=exclude or None
        )
        quant_graph.topological_sort(model)
        onnx.save(model, str(target))


def _canonicalize(job: _Job, path: Path, source: Path) -> CanonicalResult | None:
    """Static int8: rewrite the chosen file in place into the canonical form devices that
    hold ``source`` rebuild from a few bytes of decisions (canonical_qdq.py), when it
    runs bit-identically on the calibration inputs. The search scored onnxruntime's
    file; the planner scores the file it ships again."""
    if job.step.mode != "static" or job.calibration is None:
        return None
    return canonicalize(path, source, job.calibration, path)


def _check_something_quantized(path: Path, active: list[str]) -> None:
    model = onnx.load(str(path), load_external_data=False)
    low = any(t.data_type in LOW_PRECISION for t in model.graph.initializer)
    quant_ops = any(n.op_type in QUANTIZED_NODE_TYPES for n in model.graph.node)
    if not (low or quant_ops):
        raise UnsupportedModelError(
            f"onnxruntime quantized none of the candidate nodes {active[:10]}: "
            "their operators or input types are not supported in this mode"
        )


def _moved(trial: QuantizeTrial, best: QuantizeTrial, out: Path) -> QuantizeTrial:
    """Trial files lived in a temporary directory: only the chosen one remains, at ``out``."""
    return dataclasses.replace(trial, path=out if trial.index == best.index else None)


# ------------------------------------------------------------------ progress


@contextlib.contextmanager
def _progress_bar(show: bool, budget: int) -> Iterator[TrialCallback]:
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("evaluations"),
        TimeElapsedColumn(),
        disable=not show,
        transient=True,
    )
    with bar:
        task = bar.add_task("quantizing", total=budget)

        def report(trial: QuantizeTrial) -> None:
            score = "" if trial.score is None else f", score {trial.score:.4f}"
            kept = f"{len(trial.kept_float)} float" if trial.kept_float else "all quantized"
            log.debug("trial %d %s: %s%s", trial.index, trial.purpose, kept, score)
            bar.update(task, advance=1, description=f"quantize {trial.purpose} ({kept}{score})")

        yield report


def _chain(first: TrialCallback, second: TrialCallback | None) -> TrialCallback:
    def both(trial: QuantizeTrial) -> None:
        first(trial)
        if second is not None:
            second(trial)

    return both
