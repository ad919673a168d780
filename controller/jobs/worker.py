"""What runs inside a pool process: one compression job, by the code `homefleet compress` runs.

Only this module's functions import the compression stack (torch, onnxruntime's
quantizer), and only when called, so the server process can build a ``WorkerSpec``
without loading it. The result is a small picklable value: a failure comes back as a
message for the operator rather than as an exception that might not survive pickling.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from controller.config import LOG_FORMAT
from controller.jobs.progress import Activity, ProgressWriter, Started, TrialDone, Warned
from controller.records import TrialRecord

if TYPE_CHECKING:
    from controller.compression.planner import Trial

log = logging.getLogger(__name__)

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, as paths and plain values (it crosses a process boundary)."""

    job_id: int
    name: str  # the model name the manifest records
    device_class_json: str  # DeviceClass with the job's overrides applied
    max_size_ratio: float | None
    out_dir: Path  # must not exist yet; job.py writes it atomically
    progress_path: Path
    cancel_path: Path  # its existence asks the worker to stop after the current trial
    source_onnx: Path | None = None  # a checked copy of a registered model's blob
    calibration: Path | None = None  # its .npz
    workload: str = ""  # or a reference workload
    previous: Path | None = None  # a checked copy of the class's static int8 artifact


@dataclass(frozen=True)
class WorkerResult:
    met: bool = False
    error: str = ""
    cancelled: bool = False


class JobCancelledError(Exception):
    """The controller asked this job to stop (raised between trials)."""


def init_worker(threads: int, scratch_prefix: Path, log_level: int = logging.INFO) -> None:
    """Pool initializer: cap the numeric libraries' threads before any of them loads, and
    work in a scratch directory of the controller's, where stray temporary files (ORT's
    shape inference leaves some in the working directory) are cleaned up. Its log lines
    join the controller's in the controller's format (a spawned process starts bare)."""
    logging.basicConfig(level=log_level, format=LOG_FORMAT, force=True)
    if threads > 0:
        for name in THREAD_VARIABLES:
            os.environ[name] = str(threads)
    scratch = scratch_prefix.with_name(f"{scratch_prefix.name}{os.getpid()}")
    scratch.mkdir(parents=True, exist_ok=True)
    os.chdir(scratch)
    _exit_with(os.getppid())


PARENT_POLL_S = 1.0


def _exit_with(controller_pid: int) -> None:
    """A controller killed with SIGKILL cannot stop its workers, and nothing else would:
    the job is failed at its restart, but the orphan would go on computing (and holding
    half a gigabyte) for as long as the job takes. A daemon thread watches the parent and
    ends the process once it is gone (the worker is then re-parented)."""

    def watch() -> None:
        while os.getppid() == controller_pid:
            time.sleep(PARENT_POLL_S)
        log.warning("controller %d is gone: this compression worker exits", controller_pid)
        os._exit(1)

    threading.Thread(target=watch, name="controller-watch", daemon=True).start()


def summarize(trial: Trial) -> TrialRecord:
    """A trial as the controller records it, with the one line an operator reads."""
    recipe = trial.recipe.describe()
    if trial.error:
        summary = f"trial {trial.index}: {recipe}: could not run: {trial.error}"
    else:
        parts = [f"{trial.artifact_bytes:,} B"]
        if trial.quality:
            parts.append(f"{trial.quality.metric} {trial.quality.value:.4f}")
        if trial.timing:
            parts.append(f"p95 {trial.timing.p95_ms:.3g} ms")
            parts.append(f"{trial.timing.energy_mj:.3g} mJ")
        missed = ", ".join(v.budget for v in trial.verdicts if not v.met)
        verdict = "meets every budget" if trial.met else f"misses {missed}"
        summary = f"trial {trial.index}: {recipe}: {', '.join(parts)}: {verdict}"
    return TrialRecord(
        index=trial.index,
        summary=summary,
        recipe=recipe,
        met=trial.met,
        artifact_bytes=trial.artifact_bytes,
        quality_metric=trial.quality.metric if trial.quality else "",
        quality_value=trial.quality.value if trial.quality else 0.0,
        p95_ms=trial.timing.p95_ms if trial.timing else 0.0,
        energy_mj=trial.timing.energy_mj if trial.timing else 0.0,
        seconds=round(trial.seconds, 3),
        error=trial.error,
    )


# Loggers whose warnings are about the job's own inputs and choices (too few calibration
# samples, none to hold out, a budget flag that loosens a class): passed on to the operator.
WARNING_LOGGERS = ("controller.compression", "controller.workloads")
MAX_WARNINGS = 20  # per job: a warning logged per trial is said once, and a flood is cut


class _WarningsToProgress(logging.Handler):
    """Writes each distinct warning of the job's loggers to the progress file, once."""

    def __init__(self, progress: ProgressWriter) -> None:
        super().__init__(logging.WARNING)
        self._progress = progress
        self._seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a bad format string must not fail the job
            return
        if text in self._seen or len(self._seen) >= MAX_WARNINGS:
            return
        self._seen.add(text)
        self._progress.write(Warned(text=text))


def run_job(spec: WorkerSpec) -> WorkerResult:
    """Run one job to its end; report each trial, and the warnings the compression code
    logs, through the progress file."""
    progress = ProgressWriter(spec.progress_path)
    progress.write(Started(pid=os.getpid()))
    handler = _WarningsToProgress(progress)
    for name in WARNING_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    try:
        return _run(spec, progress)
    except JobCancelledError:
        return WorkerResult(cancelled=True)
    except ValueError as exc:  # CompressionError, CalibrationMismatchError, unknown workload
        return WorkerResult(error=str(exc))
    except Exception as exc:
        log.exception("compression job %d failed unexpectedly", spec.job_id)
        return WorkerResult(
            error=f"compression failed unexpectedly ({type(exc).__name__}: {exc}); "
            "the controller log has the detail"
        )
    finally:
        for name in WARNING_LOGGERS:
            logging.getLogger(name).removeHandler(handler)


def _run(spec: WorkerSpec, progress: ProgressWriter) -> WorkerResult:
    if spec.cancel_path.exists():
        raise JobCancelledError
    from controller.compression.job import compress_onnx, compress_workload
    from controller.device_classes import DeviceClass

    device_class = DeviceClass.model_validate_json(spec.device_class_json)

    def on_trial(trial: Trial) -> None:
        progress.write(TrialDone.of(summarize(trial)))
        if spec.cancel_path.exists():
            raise JobCancelledError

    def on_activity(text: str) -> None:
        progress.write(Activity(text=text))

    if spec.workload:
        from controller.workloads.registry import get_workload

        outcome = compress_workload(
            get_workload(spec.workload),
            device_class,
            spec.out_dir,
            max_size_ratio=spec.max_size_ratio,
            on_trial=on_trial,
            on_activity=on_activity,
            previous=spec.previous,
            previous_required=False,
        )
    else:
        from controller.workloads.fidelity import load_calibration

        if spec.source_onnx is None or spec.calibration is None:
            raise ValueError("a model job needs its source model and calibration data")
        outcome = compress_onnx(
            spec.source_onnx,
            load_calibration(spec.calibration),
            device_class,
            spec.out_dir,
            name=spec.name,
            max_size_ratio=spec.max_size_ratio,
            on_trial=on_trial,
            on_activity=on_activity,
            previous=spec.previous,
            previous_required=False,
        )
    return WorkerResult(met=outcome.met)
