"""Models in onnxruntime: load into a spare slot, self-test, switch atomically, switch back.

A model is only served after it loaded and answered one synthetic inference with
finite outputs; until then the previous model keeps serving. The slot it replaced stays
loaded, so switching back costs nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail as OrtFail
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as OrtInvalidArgument

from artifact import runtime_hints
from artifact.manifest import TensorSpec
from edge_agent.convert import SUPPORTED_DTYPES, Array, spec_from_ort
from edge_agent.errors import AgentError, ErrorCode
from edge_agent.store import ModelSlots, SlotRecord, SlotsFile

log = logging.getLogger(__name__)

_MAX_ERROR_TEXT = 600


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= _MAX_ERROR_TEXT else text[: _MAX_ERROR_TEXT - 3] + "..."


@dataclass(frozen=True, eq=False)
class ModelSlot:
    """One loaded artifact of one model: the session plus the specs Predict checks against."""

    model_name: str
    record: SlotRecord
    session: Any  # onnxruntime.InferenceSession (untyped)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def sha256(self) -> str:
        return self.record.sha256

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        """One inference; onnxruntime's own refusals become INVALID_INPUT errors.

        The feeds match the model's declared names, types and ranks (checked before), so
        a run that fails (FAIL: e.g. two inputs whose lengths the graph needs equal, or an
        empty sequence) failed on these inputs, not inside the agent.
        """
        size = sum(array.nbytes for array in feeds.values())
        try:
            results = self.session.run(None, dict(feeds), _run_options(size))
        except (OrtInvalidArgument, OrtFail) as exc:
            raise AgentError(
                ErrorCode.INVALID_INPUT,
                f"model {self.model_name!r} refused the inputs: {_short(exc)}",
            ) from exc
        return {
            spec.name: np.asarray(value) for spec, value in zip(self.outputs, results, strict=True)
        }


# onnxruntime's memory arena grows to the largest run's peak and keeps it: a few large
# batches (QA: 64 concurrent 5.7 MB requests to a 16 KB model) left the agent at 3.9 GB
# for good. A run with inputs over this size gives the arena back as it ends (measured
# here, the same bursts then leave 0.15-0.4 GB); small ones keep it, a few % faster.
SHRINK_ARENA_ABOVE_BYTES = 1 << 20


def _run_options(input_bytes: int) -> ort.RunOptions | None:
    if input_bytes <= SHRINK_ARENA_ABOVE_BYTES:
        return None
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def session_options(threads: int, config: Mapping[str, str] | None = None) -> ort.SessionOptions:
    """The agent's session settings, plus those the artifact asks for (``config``: see
    `artifact.runtime_hints`; the planner measured the artifact with them)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # onnxruntime's pool threads spin after each run by default: on a device that answers
    # occasional requests that burns a core between them (a third of one in the demo's
    # idle hub), energy no inference is charged for. Sleeping threads cost a wake-up.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: warnings about unused initialisers are noise here
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    return opts


def load_slot(model_name: str, path: Path, record: SlotRecord, threads: int) -> ModelSlot:
    """Load ``path`` into a new session; a file onnxruntime refuses raises LOAD_FAILED."""
    try:
        options = session_options(threads, runtime_hints.session_config_of_file(path))
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises several unrelated types for a bad file
        raise AgentError(
            ErrorCode.LOAD_FAILED,
            f"onnxruntime could not load artifact {record.sha256}: {_short(exc)}",
        ) from exc
    release_free_memory()
    inputs = tuple(spec_from_ort(a.name, a.type, a.shape) for a in session.get_inputs())
    outputs = tuple(spec_from_ort(a.name, a.type, a.shape) for a in session.get_outputs())
    return ModelSlot(model_name, record, session, inputs, outputs)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    return trim


def release_free_memory() -> bool:
    """Give the heap that loading freed back to the system; True when it could.

    Loading folds constant subgraphs (a codebook-quantized model's packed weights are
    decoded once at load), and glibc keeps the freed intermediates mapped: for MiniLM's
    4-bit codebook artifact we saw 56 MB resident after load instead of 23 MB (one run,
    this machine). ``malloc_trim(0)`` returns them.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def synthetic_inputs(specs: tuple[TensorSpec, ...]) -> dict[str, Array]:
    """Ones of each input's dtype and shape, dynamic dims set to 1.

    Ones rather than zeros: they are valid for log, sqrt and division, and as token ids.
    """
    feeds: dict[str, Array] = {}
    for spec in specs:
        if spec.dtype not in SUPPORTED_DTYPES:
            raise AgentError(
                ErrorCode.SELF_TEST_FAILED,
                f"self-test cannot build input {spec.name!r} of type {spec.dtype}",
            )
        shape = tuple(1 if d < 0 else d for d in spec.shape)
        feeds[spec.name] = np.ones(shape, dtype=np.dtype(spec.dtype))
    return feeds


def self_test(slot: ModelSlot) -> None:
    """One inference on synthetic inputs: every output must exist and floats be finite."""
    feeds = synthetic_inputs(slot.inputs)
    try:
        results = slot.session.run(None, feeds)
    except Exception as exc:
        raise AgentError(
            ErrorCode.SELF_TEST_FAILED, f"self-test inference failed: {_short(exc)}"
        ) from exc
    if not slot.outputs or len(results) != len(slot.outputs):
        raise AgentError(
            ErrorCode.SELF_TEST_FAILED,
            f"self-test expected {len(slot.outputs)} outputs, got {len(results)}",
        )
    for spec, value in zip(slot.outputs, results, strict=True):
        if value is None:
            raise AgentError(
                ErrorCode.SELF_TEST_FAILED, f"self-test output {spec.name!r} is missing"
            )
        array = np.asarray(value)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise AgentError(
                ErrorCode.SELF_TEST_FAILED,
                f"self-test output {spec.name!r} has non-finite values (NaN or inf)",
            )


class ModelRuntime:
    """The served slot and the previous slot of every model; switches happen under a lock.

    Predict takes a slot reference once, so a switch never disturbs a call in flight.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._lock = threading.Lock()
        self._active: dict[str, ModelSlot] = {}
        self._previous: dict[str, ModelSlot] = {}
        self._floors: dict[str, dict[str, int]] = {}  # model -> device class -> version
        self._floor_shas: dict[str, dict[str, str]] = {}  # ... -> the sha it was accepted with

    def prepare(self, model_name: str, path: Path, record: SlotRecord) -> ModelSlot:
        """Load and self-test in a spare slot; blocking, so call it from a worker thread."""
        slot = load_slot(model_name, path, record, self.threads)
        self_test(slot)
        return slot

    def activate(self, slot: ModelSlot) -> ModelSlot | None:
        """Serve ``slot``; the slot it replaces becomes the previous one. Returns that slot."""
        with self._lock:
            old = self._active.get(slot.model_name)
            self._active[slot.model_name] = slot
            if old is not None and old.sha256 != slot.sha256:
                self._previous[slot.model_name] = old
            return old

    def switch_back(self, model_name: str, record: SlotRecord | None = None) -> ModelSlot:
        """Serve the previous slot again (the current one becomes the previous).

        ``record`` replaces the slot's record: a rollback arrives as a new manifest
        (a higher version) for the bytes the previous slot already holds.
        """
        with self._lock:
            previous = self._previous.get(model_name)
            if previous is None:
                raise AgentError(
                    ErrorCode.MODEL_NOT_FOUND,
                    f"model {model_name!r} has no previous slot to switch back to",
                )
            if record is not None:
                if record.sha256 != previous.sha256:
                    raise AgentError(
                        ErrorCode.MANIFEST_MISMATCH,
                        f"the new record names {record.sha256}, the previous slot holds "
                        f"{previous.sha256}",
                    )
                previous = dataclasses.replace(previous, record=record)
            current = self._active.get(model_name)
            self._active[model_name] = previous
            if current is not None:
                self._previous[model_name] = current
            else:
                del self._previous[model_name]
            return previous

    def restore(self, active: ModelSlot, previous: ModelSlot | None) -> None:
        """Put slots back as they were before a restart (no switch, nothing reported)."""
        with self._lock:
            self._active[active.model_name] = active
            if previous is not None:
                self._previous[active.model_name] = previous

    def put_back(
        self, model_name: str, active: ModelSlot | None, previous: ModelSlot | None
    ) -> None:
        """Undo a switch whose slot table could not be persisted: serve exactly these."""
        with self._lock:
            for slots, slot in ((self._active, active), (self._previous, previous)):
                if slot is None:
                    slots.pop(model_name, None)
                else:
                    slots[model_name] = slot

    def version_floor(self, model_name: str, device_class: str) -> int:
        """The highest manifest version activated for this model and class (0: none yet)."""
        with self._lock:
            return self._floors.get(model_name, {}).get(device_class, 0)

    def floor_artifact(self, model_name: str, device_class: str) -> str:
        """The artifact the floor version was accepted with ("": none recorded)."""
        with self._lock:
            return self._floor_shas.get(model_name, {}).get(device_class, "")

    def raise_floor(self, model_name: str, device_class: str, version: int, sha256: str) -> None:
        """Record that ``sha256`` was activated under ``version``; a lower version changes
        nothing, and the floor version keeps the artifact it was first accepted with."""
        with self._lock:
            floors = self._floors.setdefault(model_name, {})
            shas = self._floor_shas.setdefault(model_name, {})
            floor = floors.get(device_class, 0)
            if version > floor or (version == floor and device_class not in shas):
                floors[device_class] = version
                shas[device_class] = sha256

    def restore_floors(
        self, model_name: str, floors: Mapping[str, int], shas: Mapping[str, str]
    ) -> None:
        if floors:
            with self._lock:
                self._floors[model_name] = dict(floors)
                self._floor_shas[model_name] = {c: s for c, s in shas.items() if c in floors}

    def get(self, model_name: str) -> ModelSlot:
        slot = self._active.get(model_name)
        if slot is None:
            served = ", ".join(sorted(self._active)) or "none yet"
            raise AgentError(
                ErrorCode.MODEL_NOT_FOUND,
                f"model {model_name!r} is not served by this agent; served models: {served}",
            )
        return slot

    def active(self, model_name: str) -> ModelSlot | None:
        return self._active.get(model_name)

    def previous(self, model_name: str) -> ModelSlot | None:
        return self._previous.get(model_name)

    def model_names(self) -> list[str]:
        with self._lock:
            return sorted(self._active)

    def snapshot(self) -> SlotsFile:
        """The slot table as it must be persisted now."""
        with self._lock:
            names = sorted(set(self._active) | set(self._floors))
            return SlotsFile(
                models={
                    name: ModelSlots(
                        active=a.record if (a := self._active.get(name)) else None,
                        previous=p.record if (p := self._previous.get(name)) else None,
                        version_floor=dict(self._floors.get(name, {})),
                        floor_sha256=dict(self._floor_shas.get(name, {})),
                    )
                    for name in names
                }
            )
